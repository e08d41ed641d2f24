/*
 * Entry of the null-Kernel hypervisor (AT&T syntax; included by the hypervisor binary with
 * global_asm!(..., options(att_syntax))).
 *
 * - A Multiboot2 header (Multiboot2 spec §3.1) for GRUB and a PVH ELF note
 *   (XEN_ELFNOTE_PHYS32_ENTRY = 18) for QEMU -kernel: both enter in 32-bit protected mode
 *   with paging off.
 * - The 32-bit entry clears .bss, identity-maps the low 4 GiB with 2 MiB pages (the top GiB,
 *   which holds the APIC and other MMIO, uncached), enables PAE, long mode and paging with
 *   CR0.NE set (VMX requires it: SDM Vol. 3 §24.8 / A.7), and calls
 *   nk_main(magic: u64, info_paddr: u64) on the boot stack.
 * - The AP trampoline is copied to AP_TRAMPOLINE_BASE (below 1 MiB) by the hypervisor and
 *   started with INIT-SIPI-SIPI; it goes from real mode to long mode on the BSP's page
 *   tables and calls the Rust AP entry with the CPU index, on a stack the BSP chose.
 */

.set MB2_HEADER_MAGIC, 0xE85250D6
.set PVH_START_MAGIC, 0x336ec578
.set AP_TRAMPOLINE_BASE, 0x8000
.set SEL_CODE64, 0x08
.set SEL_DATA, 0x10
.set SEL_CODE32, 0x18
.set CR0_PE_NE_WP_PG, 0x80010021
.set CR4_PAE, 0x20
.set MSR_EFER, 0xC0000080
.set EFER_LME, 0x100
.set EFER_NXE, 0x800

/* Enters IA-32e mode from 32-bit protected mode with paging off, on the page tables
 * whose address is in EAX: CR4.PAE, CR3, EFER.LME (and EFER.NXE where CPUID.80000001H:EDX
 * bit 20 says execute-disable exists, so the hypervisor's tables may use XD: SDM Vol. 3
 * §4.1.4, §4.6), then CR0.PG (with NE, which VMX needs). Clobbers EAX, EBX, ECX, EDX. */
.macro ENTER_LONG_MODE
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $0x80000000, %eax
    cpuid
    xor %ebx, %ebx
    cmp $0x80000001, %eax
    jb 91f
    mov $0x80000001, %eax
    cpuid
    and $0x100000, %edx                       /* XD/NX */
    jz 91f
    mov $EFER_NXE, %ebx
91: mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    or %ebx, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_PE_NE_WP_PG, %eax
    mov %eax, %cr0
.endm

/* Loads the flat data segment into DS, ES and SS and clears FS and GS, first thing in
 * 64-bit mode. */
.macro LOAD_DATA_SEGMENTS_64
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
.endm

/* ---------------------------------------------------------------- Multiboot2 header */
.section .multiboot, "a"
.balign 8
mb2_header_start:
    .long MB2_HEADER_MAGIC
    .long 0                                   /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (MB2_HEADER_MAGIC + (mb2_header_end - mb2_header_start))
    /* Module alignment tag: modules (guest images) start on page boundaries. */
    .balign 8
    .short 6, 0
    .long 8
    /* End tag. */
    .balign 8
    .short 0, 0
    .long 8
mb2_header_end:

/* ---------------------------------------------------------------- PVH note */
.section .note.Xen, "a", @note
.balign 4
    .long 4                                   /* name size */
    .long 4                                   /* descriptor size */
    .long 18                                  /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start_pvh

/* ---------------------------------------------------------------- 32-bit entry */
.section .boot.text, "ax"
.code32
.global _start
_start:
    cli
    cld
    mov %eax, %edi                            /* Multiboot2 loader magic */
    mov %ebx, %esi                            /* Multiboot2 information structure */
    jmp boot32_common

.global _start_pvh
_start_pvh:
    cli
    cld
    mov $PVH_START_MAGIC, %edi
    mov %ebx, %esi                            /* hvm_start_info */

boot32_common:
    /* Clear .bss (the loader zeroes it too, but the image must not depend on that). */
    /* No stack yet (the loader leaves ESP undefined): keep the magic in EBP. */
    mov %edi, %ebp
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov %ebp, %edi

    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages. */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 1b

    /* 2048 entries of 2 MiB: present, writable, PS; the fourth GiB (MMIO) with PCD|PWT. */
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    cmp $1536, %ecx
    jb 3f
    or $0x18, %eax
3:  mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    mov $boot_pml4, %eax
    ENTER_LONG_MODE

    lgdt boot_gdt_ptr
    ljmp $SEL_CODE64, $boot64

.code64
boot64:
    LOAD_DATA_SEGMENTS_64
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov %edi, %edi                            /* zero-extend magic */
    mov %esi, %esi                            /* zero-extend information address */
    call nk_main
4:  cli
    hlt
    jmp 4b

/* ---------------------------------------------------------------- AP trampoline */
/* Position-dependent on AP_TRAMPOLINE_BASE: every address is computed from it. */
.section .rodata.ap_trampoline, "a"
.balign 16
.global nk_ap_trampoline_start
.global nk_ap_trampoline_end
.global nk_ap_trampoline_cr3
.global nk_ap_trampoline_stack
.global nk_ap_trampoline_cpu
.global nk_ap_trampoline_entry
.code16
nk_ap_trampoline_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (AP_TRAMPOLINE_BASE + (ap_gdt_ptr - nk_ap_trampoline_start))
    mov %cr0, %eax
    or $0x21, %eax                            /* PE | NE */
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $(AP_TRAMPOLINE_BASE + (ap_protected - nk_ap_trampoline_start))

.code32
ap_protected:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov (AP_TRAMPOLINE_BASE + (nk_ap_trampoline_cr3 - nk_ap_trampoline_start)), %eax
    ENTER_LONG_MODE
    ljmp $SEL_CODE64, $(AP_TRAMPOLINE_BASE + (ap_long - nk_ap_trampoline_start))

.code64
ap_long:
    LOAD_DATA_SEGMENTS_64
    mov (AP_TRAMPOLINE_BASE + (nk_ap_trampoline_stack - nk_ap_trampoline_start)), %rsp
    mov (AP_TRAMPOLINE_BASE + (nk_ap_trampoline_cpu - nk_ap_trampoline_start)), %rdi
    mov (AP_TRAMPOLINE_BASE + (nk_ap_trampoline_entry - nk_ap_trampoline_start)), %rax
    xor %ebp, %ebp
    call *%rax
5:  cli
    hlt
    jmp 5b

/* The boot GDT itself (below 4 GiB, so a 32-bit lgdt operand reaches it from real mode);
 * only this pointer must live in the trampoline page. */
.balign 8
ap_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
.balign 8
nk_ap_trampoline_cr3:
    .quad 0
nk_ap_trampoline_stack:
    .quad 0
nk_ap_trampoline_cpu:
    .quad 0
nk_ap_trampoline_entry:
    .quad 0
nk_ap_trampoline_end:

/* ---------------------------------------------------------------- boot GDT and tables */
.section .rodata.boot, "a"
.balign 16
boot_gdt:
    .quad 0
    /* Accessed bits preset: the CPU never writes this read-only GDT (SDM Vol. 3 §3.4.5.1). */
    .quad 0x00AF9B000000FFFF                  /* 0x08: 64-bit code */
    .quad 0x00CF93000000FFFF                  /* 0x10: data */
    .quad 0x00CF9B000000FFFF                  /* 0x18: 32-bit code */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

.section .bss.boot, "aw", @nobits
.balign 4096
.global nk_boot_pml4
nk_boot_pml4:
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
/* Left unmapped by the hypervisor's page tables: an overflow of the boot stack faults. */
.global nk_boot_stack_guard
nk_boot_stack_guard:
    .skip 4096
.global nk_boot_stack_bottom
nk_boot_stack_bottom:
    .skip 65536
boot_stack_top:
