//! The guest's own descriptor tables and the ring-3 trampoline.
//!
//! GDT: 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS.
//! `run_in_ring3(f)` enters ring 3 with `iretq`, runs `f` there, and comes back to ring 0
//! through `int 0x80` (a DPL-3 gate), whose handler resumes the ring-0 caller. Ring 3
//! runs with IOPL 3 so it can write the console port (every port access still exits to
//! the hypervisor, which decides).
//!
//! Both rings run with interrupts enabled (RFLAGS.IF = 1). The hypervisor takes every
//! external interrupt with a VM exit, so none reaches the guest's IDT; but Bochs 2.7 only
//! makes that exit while the guest's IF is 1, and the hypervisor's doorbell IPIs (the
//! distributed capability protocol's) would otherwise wait for the end of a time slice.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::mem::size_of;

const USER_DATA: u64 = 0x18 | 3;
const USER_CODE: u64 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
const RETURN_VECTOR: usize = 0x80;
const STACK_BYTES: usize = 16 * 1024;

#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 7],
    idt: [[u64; 2]; 256],
    tss: Tss,
    ring0_stack: [u8; STACK_BYTES],
    ring3_stack: [u8; STACK_BYTES],
}

/// The guest's tables: one vCPU, written once by `init` and then only by the CPU.
struct TablesCell(UnsafeCell<Tables>);

// SAFETY: a bare-metal guest here has one vCPU; the tables are written by `init` before
// any other code runs and afterwards only read by the CPU.
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0x00CF_F200_0000_FFFF, 0x00AF_FA00_0000_FFFF, 0, 0],
    idt: [[0; 2]; 256],
    tss: Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 104 },
    ring0_stack: [0; STACK_BYTES],
    ring3_stack: [0; STACK_BYTES],
}));

global_asm!(
    r#"
.section .text.nk_guest_ring3, "ax"
// nk_enter_ring3(entry: rdi, user_stack: rsi): saves the ring-0 context and irets to ring 3.
.global nk_enter_ring3
nk_enter_ring3:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + nk_ring0_saved_rsp], rsp
    push {user_data}
    push rsi
    push 0x3202
    push {user_code}
    push rdi
    iretq

// The int 0x80 handler: drops the interrupt frame and resumes nk_enter_ring3's caller.
.global nk_ring3_return
nk_ring3_return:
    mov rsp, [rip + nk_ring0_saved_rsp]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

// Any exception in the guest: report its vector on the console and halt. Each vector's
// stub pushes its number; the word above it is the error code or the faulting RIP.
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
nk_guest_fault_\vec:
    push \vec
    jmp nk_guest_fault
.endr
nk_guest_fault:
    pop rdi
    mov rsi, [rsp]
    and rsp, -16
    call nk_guest_fault_report
3:  hlt
    jmp 3b

.section .rodata.nk_guest_ring3, "a"
.balign 8
nk_guest_fault_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad nk_guest_fault_\vec
.endr

.section .bss.nk_guest_ring3, "aw", @nobits
.balign 8
nk_ring0_saved_rsp:
    .skip 8
"#,
    user_data = const USER_DATA,
    user_code = const USER_CODE,
);

unsafe extern "C" {
    fn nk_enter_ring3(entry: u64, user_stack: u64);
    fn nk_ring3_return();
    static nk_guest_fault_stubs: [u64; 32];
}

#[unsafe(no_mangle)]
extern "C" fn nk_guest_fault_report(vector: u64, word: u64) {
    crate::println!("guest fault: exception {vector} (error code or rip {word:#x}), halting");
}

fn gate(handler: u64, dpl: u64) -> [u64; 2] {
    let low = (handler & 0xFFFF) | (0x08 << 16) | ((0x8E | (dpl << 5)) << 40) | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

/// The first vCPU filled the tables (a VM with several vCPUs: nk-abi `vcpu`).
static TABLES_READY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Loads the guest's GDT, TSS and IDT. The first vCPU (`vcpu` 0) fills them; another vCPU
/// waits until it has, loads the same GDT and IDT and no TSS (a TSS is busy once loaded:
/// ring 3 is for the first vCPU only).
pub(crate) fn init(vcpu: u64) {
    let tables = TABLES.0.get();
    if vcpu != 0 {
        while !TABLES_READY.load(core::sync::atomic::Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    // SAFETY: the first vCPU runs this once, first thing after _start, before any other
    // vCPU reads TABLES (they wait for TABLES_READY); the others only read them.
    unsafe {
        let t = &mut *tables;
        if vcpu != 0 {
            load_tables(t, false);
            return;
        }
        let tss = &t.tss as *const Tss as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        t.gdt[5] = (limit & 0xFFFF) | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | (((tss >> 24) & 0xFF) << 56);
        t.gdt[6] = tss >> 32;
        t.tss.rsp[0] = t.ring0_stack.as_ptr() as u64 + STACK_BYTES as u64;
        for (vector, &stub) in nk_guest_fault_stubs.iter().enumerate() {
            t.idt[vector] = gate(stub, 0);
        }
        t.idt[RETURN_VECTOR] = gate(nk_ring3_return as *const () as usize as u64, 3);
        TABLES_READY.store(true, core::sync::atomic::Ordering::Release);
        load_tables(t, true);
    }
}

/// Loads the GDT and IDT of `t`, reloads the segment registers and, with `tss`, the task
/// register; then enables interrupts.
///
/// # Safety
///
/// `t` holds valid tables (filled by `init` on the first vCPU) that stay in place.
unsafe fn load_tables(t: &Tables, tss: bool) {
    // SAFETY: the caller guarantees valid, static tables; the far return reloads CS with
    // their kernel code selector, and TR only on the first vCPU (a loaded TSS is busy).
    unsafe {
        #[repr(C, packed(2))]
        struct Pointer {
            limit: u16,
            base: u64,
        }
        let gdt = Pointer { limit: (size_of::<[u64; 7]>() - 1) as u16, base: t.gdt.as_ptr() as u64 };
        let idt = Pointer { limit: (size_of::<[[u64; 2]; 256]>() - 1) as u16, base: t.idt.as_ptr() as u64 };
        asm!(
            "lgdt [{gdt}]",
            "lidt [{idt}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            gdt = in(reg) &gdt,
            idt = in(reg) &idt,
            tmp = out(reg) _,
        );
        if tss {
            asm!("ltr {tss:x}", tss = in(reg) TSS_SELECTOR);
        }
        asm!("sti");
    }
}

/// Returns the current privilege level (0 or 3).
pub fn current_ring() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack)) };
    (cs & 3) as u8
}

static mut RING3_TASK: Option<fn()> = None;

extern "C" fn ring3_entry() -> ! {
    // SAFETY: set by run_in_ring3 right before entering ring 3, on the only vCPU.
    let task = unsafe { RING3_TASK };
    if let Some(task) = task {
        task();
    }
    // SAFETY: int 0x80 goes to nk_ring3_return (a DPL-3 gate), which never comes back.
    unsafe { asm!("int 0x80", options(noreturn)) }
}

/// Runs `task` in ring 3 and returns when it is done.
pub fn run_in_ring3(task: fn()) {
    let tables = TABLES.0.get();
    // SAFETY: one vCPU; RING3_TASK is read only by ring3_entry, which this call starts.
    // The ring-3 stack is the guest's own; nk_enter_ring3 returns through nk_ring3_return
    // with every callee-saved register restored.
    unsafe {
        RING3_TASK = Some(task);
        let stack_top = (*tables).ring3_stack.as_ptr() as u64 + STACK_BYTES as u64;
        nk_enter_ring3(ring3_entry as *const () as usize as u64, stack_top);
        // The int 0x80 gate cleared IF on the way back; see the module docs.
        asm!("sti", options(nomem, nostack));
    }
}

/// Halts the vCPU for good (the hypervisor ends the guest).
pub fn halt() -> ! {
    loop {
        // SAFETY: hlt exits to the hypervisor, which ends the guest.
        unsafe { asm!("hlt", options(nomem, nostack)) }
    }
}
