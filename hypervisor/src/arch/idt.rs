//! The IDT shared by all CPUs and the exception path (SDM Vol. 3 §6.10-§6.15).
//!
//! Each of the 32 architectural vectors has an assembly stub that pushes a uniform frame
//! (all general-purpose registers, the vector and an error code) and calls
//! `nk_exception`. A breakpoint (#BP) returns; every other exception in hypervisor code
//! prints a register dump and stops the machine.

use core::arch::{asm, global_asm};
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;

use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CODE};

/// Exception vectors (SDM Vol. 3 Table 6-1).
pub mod vector {
    pub const BREAKPOINT: u64 = 3;
    pub const NMI: u64 = 2;
    pub const DOUBLE_FAULT: u64 = 8;
    pub const MACHINE_CHECK: u64 = 18;
    /// The IPI that wakes an idle CPU (arch::apic::send_wakeup).
    pub const WAKEUP: u64 = 0xF0;
    /// The local APIC's spurious-interrupt vector.
    pub const SPURIOUS: u64 = 0xFF;
}

/// Mnemonics of the architectural exception vectors.
const MNEMONICS: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

// Vectors that push an error code: 8, 10-14, 17, 21, 29, 30.
global_asm!(
    r#"
.macro NK_EXC_NOERR vec
nk_exc_\vec:
    push 0
    push \vec
    jmp nk_exc_common
.endm
.macro NK_EXC_ERR vec
nk_exc_\vec:
    push \vec
    jmp nk_exc_common
.endm

.section .text.nk_exceptions, "ax"
NK_EXC_NOERR 0
NK_EXC_NOERR 1
NK_EXC_NOERR 2
NK_EXC_NOERR 3
NK_EXC_NOERR 4
NK_EXC_NOERR 5
NK_EXC_NOERR 6
NK_EXC_NOERR 7
NK_EXC_ERR 8
NK_EXC_NOERR 9
NK_EXC_ERR 10
NK_EXC_ERR 11
NK_EXC_ERR 12
NK_EXC_ERR 13
NK_EXC_ERR 14
NK_EXC_NOERR 15
NK_EXC_NOERR 16
NK_EXC_ERR 17
NK_EXC_NOERR 18
NK_EXC_NOERR 19
NK_EXC_NOERR 20
NK_EXC_ERR 21
NK_EXC_NOERR 22
NK_EXC_NOERR 23
NK_EXC_NOERR 24
NK_EXC_NOERR 25
NK_EXC_NOERR 26
NK_EXC_NOERR 27
NK_EXC_NOERR 28
NK_EXC_ERR 29
NK_EXC_ERR 30
NK_EXC_NOERR 31
NK_EXC_NOERR 240
NK_EXC_NOERR 255

nk_exc_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call nk_exception
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

.section .rodata.nk_exceptions, "a"
.balign 8
.global nk_exception_stubs
nk_exception_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad nk_exc_\vec
.endr
.global nk_interrupt_stubs
nk_interrupt_stubs:
    .quad nk_exc_240
    .quad nk_exc_255
"#
);

unsafe extern "C" {
    /// The 32 stub addresses, in vector order.
    static nk_exception_stubs: [u64; 32];
    /// The stubs of the wake-up IPI and the spurious-interrupt vector.
    static nk_interrupt_stubs: [u64; 2];
}

/// The frame `nk_exc_common` builds on the stack, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    fn interrupt(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist,
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Counts breakpoints taken (the test build checks that #BP returns).
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

fn build() -> Idt {
    let mut idt = Idt([Gate::MISSING; 256]);
    // SAFETY: `nk_exception_stubs` is an immutable table of 32 addresses in .rodata.
    let stubs = unsafe { &nk_exception_stubs };
    for (vector, &stub) in stubs.iter().enumerate() {
        let ist = match vector as u64 {
            vector::DOUBLE_FAULT => IST_DOUBLE_FAULT,
            vector::NMI => IST_NMI,
            vector::MACHINE_CHECK => IST_MACHINE_CHECK,
            _ => 0,
        };
        idt.0[vector] = Gate::interrupt(stub, ist);
    }
    // SAFETY: as above.
    let [wakeup, spurious] = unsafe { nk_interrupt_stubs };
    idt.0[vector::WAKEUP as usize] = Gate::interrupt(wakeup, 0);
    idt.0[vector::SPURIOUS as usize] = Gate::interrupt(spurious, 0);
    // Spurious IRQ 7 and 15 of the (remapped, masked) legacy PICs: ignored like the
    // APIC's spurious vector.
    for irq_vector in [super::pic::MASTER_BASE + 7, super::pic::SLAVE_BASE + 7] {
        idt.0[usize::from(irq_vector)] = Gate::interrupt(spurious, 0);
    }
    idt
}

/// Loads the shared IDT on this CPU (building it on first use).
pub fn load() {
    let idt = IDT.call_once(build);
    #[repr(C, packed(2))]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer { limit: (size_of::<Idt>() - 1) as u16, base: idt as *const Idt as u64 };
    // SAFETY: the IDT is 'static and every present gate points at a stub that saves all
    // registers before calling Rust.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(nostack, preserves_flags)) }
}

fn read_control_registers() -> [u64; 4] {
    let (cr0, cr2, cr3, cr4): (u64, u64, u64, u64);
    // SAFETY: reading control registers at CPL0 has no side effects.
    unsafe {
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    [cr0, cr2, cr3, cr4]
}

/// Handles every exception taken in hypervisor code (called by `nk_exc_common`).
#[unsafe(no_mangle)]
extern "C" fn nk_exception(frame: &mut ExceptionFrame) {
    match frame.vector {
        vector::WAKEUP => return super::apic::end_of_interrupt(),
        vector::SPURIOUS => return,
        _ => {}
    }
    if frame.vector == vector::BREAKPOINT {
        BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
        log::debug!(target: "exception", "#BP at rip={:#x}, resuming", frame.rip);
        return;
    }
    dump(frame);
    crate::power::stop_machine("exception");
}

/// Prints the exception line and the register dump of docs/emulator-protocol.md.
fn dump(f: &ExceptionFrame) {
    use crate::console::emergency_line as line;
    use log::Level::Error;
    let name = MNEMONICS.get(f.vector as usize).copied().unwrap_or("#??");
    let [cr0, cr2, cr3, cr4] = read_control_registers();
    line(
        Error,
        "exception",
        format_args!("{} (vector {}) error={:#x} at rip={:#018x}", name, f.vector, f.error_code, f.rip),
    );
    line(
        Error,
        "exception",
        format_args!("  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", f.rax, f.rbx, f.rcx, f.rdx),
    );
    line(
        Error,
        "exception",
        format_args!("  rsi={:#018x} rdi={:#018x} rbp={:#018x} rsp={:#018x}", f.rsi, f.rdi, f.rbp, f.rsp),
    );
    line(
        Error,
        "exception",
        format_args!("  r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}", f.r8, f.r9, f.r10, f.r11),
    );
    line(
        Error,
        "exception",
        format_args!("  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}", f.r12, f.r13, f.r14, f.r15),
    );
    line(
        Error,
        "exception",
        format_args!("  rip={:#018x} rflags={:#010x} cs={:#06x} ss={:#06x}", f.rip, f.rflags, f.cs, f.ss),
    );
    line(Error, "exception", format_args!("  cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x}", cr0, cr2, cr3, cr4));
}
