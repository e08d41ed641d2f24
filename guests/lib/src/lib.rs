//! The library every bare-metal null-Kernel guest links: the entry point, a console on the
//! debug port, the guest's own GDT/TSS/IDT, hypercalls through `nk-abi`, and a way to run a
//! function in ring 3 (how a process bypasses its OS, DESIGN.md §4).
//!
//! The hypervisor enters `_start` in 64-bit mode, paging on (guest memory identity-mapped
//! and user-accessible), RSP at the top of guest memory, RDI = the guest's VM id, RSI =
//! its memory size. The guest crate defines `nk_guest_main(vm: u64, memory: u64)`; when it
//! returns the guest halts, which ends it.
#![no_std]

pub mod console;
mod cpu;
pub mod nk;

pub use cpu::{current_ring, run_in_ring3};
pub use nk_abi as abi;

use core::arch::global_asm;
use core::panic::PanicInfo;

global_asm!(
    r#"
.section .text.nk_guest_entry, "ax"
.global _start
_start:
    xor ebp, ebp
    and rsp, -16
    push rdi
    push rsi
    call nk_guest_init
    pop rsi
    pop rdi
    call nk_guest_main
2:  hlt
    jmp 2b
"#
);

#[unsafe(no_mangle)]
extern "C" fn nk_guest_init() {
    cpu::init();
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    cpu::halt()
}
