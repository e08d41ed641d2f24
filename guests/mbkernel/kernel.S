/* A tiny Multiboot test kernel, 32-bit protected mode, no paging. It checks the magic in
 * EAX, prints through the 16550 UART on 0x3F8 (polling LSR.THRE) its command line from the
 * information structure, installs an IDT with a timer handler on vector 0x40, runs the
 * x2APIC timer periodically until it has taken 5 interrupts (sleeping in HLT between
 * them), prints the count and halts with interrupts off. A command line starting with
 * "xapic" (v1: print_cmdline sets mb_cmdline) switches the APIC to xAPIC mode through
 * IA32_APIC_BASE (x2APIC -> disabled -> xAPIC) and does the same through the xAPIC page
 * at 0xFEE00000, reading registers back (version, LVT timer, current count) and
 * signalling EOI by MMIO, and checks that the TPR written through the page masks the
 * timer and lowering it delivers the pending interrupt at once.
 * Expects MB_MAGIC (the boot magic) to be defined before it. */
.code32
.section .text, "ax"
.global _start
_start:
    mov esp, offset mb_stack_top
    mov [mb_info], ebx
    cmp eax, MB_MAGIC
    jne .Lbad_magic
    lea esi, [msg_hello]
    call puts
    mov ebx, [mb_info]
    call print_cmdline
    lea esi, [msg_newline]
    call puts

    /* IDT entry 0x40: 32-bit interrupt gate to timer_isr in the loader's code segment. */
    mov eax, offset timer_isr
    mov word ptr [mb_idt + 0x40 * 8], ax
    mov word ptr [mb_idt + 0x40 * 8 + 2], 0x20
    mov word ptr [mb_idt + 0x40 * 8 + 4], 0x8E00
    shr eax, 16
    mov word ptr [mb_idt + 0x40 * 8 + 6], ax
    lidt [mb_idtr]

    mov esi, [mb_cmdline]
    test esi, esi
    jz .Lx2apic
    cmp dword ptr [esi], 0x69706178
    jne .Lx2apic
    call xapic_start
    jmp .Lstarted
.Lx2apic:
    /* x2APIC timer: divide by 1, periodic on vector 0x40, 200000 ticks a period. */
    xor edx, edx
    mov ecx, 0x83E
    mov eax, 0xB
    wrmsr
    mov ecx, 0x832
    mov eax, 0x20040
    wrmsr
    mov ecx, 0x838
    mov eax, 200000
    wrmsr
.Lstarted:
    sti
.Lwait:
    hlt
    cmp dword ptr [mb_ticks], 5
    jb .Lwait
    cli
    cmp byte ptr [mb_xapic], 0
    je .Lstop_x2apic
    mov dword ptr [0xFEE00380], 0
    jmp .Lstopped
.Lstop_x2apic:
    mov ecx, 0x838
    xor eax, eax
    xor edx, edx
    wrmsr
.Lstopped:
    lea esi, [msg_ticks]
    call puts
    lea esi, [msg_done]
    call puts
    hlt
.Lbad_magic:
    lea esi, [msg_bad_magic]
    call puts
    cli
    hlt

/* xapic_start: IA32_APIC_BASE x2APIC -> disabled -> xAPIC, then the periodic timer
 * through the xAPIC page, checking what reads back. */
xapic_start:
    mov ecx, 0x1B
    rdmsr
    and eax, 0xFFFFF3FF
    wrmsr
    or eax, 0x800
    wrmsr
    mov byte ptr [mb_xapic], 1
    mov dword ptr [0xFEE000F0], 0x1FF
    mov eax, [0xFEE00030]
    cmp eax, 0x50014
    jne .Lxapic_bad
    mov dword ptr [0xFEE003E0], 0xB
    mov dword ptr [0xFEE00320], 0x20040
    mov ecx, 0xFEE00000
    mov edx, [ecx + 0x320]
    cmp edx, 0x20040
    jne .Lxapic_bad
    mov dword ptr [0xFEE00380], 200000
    mov ebx, [ecx + 0x390]
    test ebx, ebx
    jz .Lxapic_bad
    cmp ebx, 200000
    ja .Lxapic_bad
    lea esi, [msg_xapic]
    call puts
    /* TPR 0xF0 (an xAPIC write virtualized without an exit) holds the timer back while
     * interrupts are on; TPR 0 lets it in before the next instruction (the TPR-threshold
     * exit). */
    mov dword ptr [0xFEE00080], 0xF0
    sti
    mov ecx, 1000000
.Ltpr_spin:
    dec ecx
    jnz .Ltpr_spin
    cmp dword ptr [mb_ticks], 0
    jne .Lxapic_bad
    mov dword ptr [0xFEE00080], 0
    mov eax, [mb_ticks]
    cli
    test eax, eax
    jz .Lxapic_bad
    lea esi, [msg_tpr]
    call puts
    ret
.Lxapic_bad:
    lea esi, [msg_xapic_bad]
    call puts
    cli
    hlt

timer_isr:
    push eax
    push ecx
    push edx
    inc dword ptr [mb_ticks]
    cmp byte ptr [mb_xapic], 0
    je .Lisr_x2apic
    mov dword ptr [0xFEE000B0], 0
    jmp .Lisr_done
.Lisr_x2apic:
    mov ecx, 0x80B
    xor eax, eax
    xor edx, edx
    wrmsr
.Lisr_done:
    pop edx
    pop ecx
    pop eax
    iretd

/* puts: prints the NUL-terminated string at ESI. */
puts:
    push eax
    push edx
.Lputs_next:
    mov al, [esi]
    test al, al
    jz .Lputs_end
    mov ah, al
.Lputs_wait:
    mov dx, 0x3FD
    in al, dx
    test al, 0x20
    jz .Lputs_wait
    mov al, ah
    mov dx, 0x3F8
    out dx, al
    inc esi
    jmp .Lputs_next
.Lputs_end:
    pop edx
    pop eax
    ret

.section .rodata, "a"
msg_hello:
    .asciz "MBTEST magic ok, command line: "
msg_newline:
    .asciz "\n"
msg_ticks:
    .asciz "MBTEST timer: 5 interrupts taken\n"
msg_done:
    .asciz "MBTEST done, halting\n"
msg_xapic:
    .asciz "MBTEST xapic: version, LVT timer and current count read back through the xAPIC page\n"
msg_tpr:
    .asciz "MBTEST xapic: TPR 0xF0 held the timer back, TPR 0 let it in at once\n"
msg_xapic_bad:
    .asciz "MBTEST FAILED: an xAPIC register read back wrong\n"
msg_bad_magic:
    .asciz "MBTEST FAILED: wrong boot magic in EAX\n"

.section .data, "aw"
.align 8
mb_idtr:
    .word 256 * 8 - 1
    .long mb_idt
mb_info:
    .long 0
mb_ticks:
    .long 0
mb_cmdline:
    .long 0
mb_xapic:
    .byte 0

.section .bss, "aw", @nobits
.align 16
mb_idt:
    .skip 256 * 8
mb_stack:
    .skip 4096
mb_stack_top:
.code64
