//! The library every bare-metal null-Kernel guest links: the entry point, a console on the
//! debug port, the guest's own GDT/TSS/IDT, hypercalls through `nk-abi`, and a way to run a
//! function in ring 3 (how a process bypasses its OS, DESIGN.md §4).
//!
//! The hypervisor enters `_start` in 64-bit mode, paging on (guest memory identity-mapped
//! and user-accessible), RSP at the top of guest memory, RDI = the guest's VM id, RSI =
//! its memory size, RDX:RCX = address and length of its arguments (the words after `--`
//! on its module command line), R8 = the vCPU's index and R9 = how many vCPUs the VM has
//! (nk-abi `vcpu`: each vCPU of a VM with `vcpus=<n>` enters here, on a stack of its own;
//! `nk_guest_main` sees them in [`BootArgs`]). The guest crate defines
//! `#[unsafe(no_mangle)] fn nk_guest_main(boot: &nk_guest::BootArgs)`; when it returns the
//! guest halts, which ends it.
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
    push rdx
    push rcx
    push r8
    push r9
    mov rdi, r8
    call nk_guest_init
    pop r9
    pop r8
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    call nk_guest_start
2:  hlt
    jmp 2b
"#
);

#[unsafe(no_mangle)]
extern "C" fn nk_guest_init(vcpu: u64) {
    cpu::init(vcpu);
}

/// What the hypervisor tells a guest at start.
#[derive(Debug, Clone, Copy)]
pub struct BootArgs {
    /// The guest's VM id (a principal of the null-Kernel).
    pub vm: u64,
    /// Bytes of guest-physical memory, from 0.
    pub memory: u64,
    /// The words after `--` on the guest's module command line.
    pub args: &'static str,
    /// This vCPU's index: 0 for the first (nk-abi `vcpu`; a module's `vcpus=<n>`).
    pub vcpu: u64,
    /// How many vCPUs the VM has (1 unless its module says `vcpus=`).
    pub vcpus: u64,
}

unsafe extern "Rust" {
    /// The guest program's main function.
    fn nk_guest_main(boot: &BootArgs);
}

#[unsafe(no_mangle)]
extern "C" fn nk_guest_start(vm: u64, memory: u64, args_addr: u64, args_len: u64, vcpu: u64, vcpus: u64) {
    let len = args_len.min(256) as usize;
    let in_memory = args_addr.checked_add(len as u64).is_some_and(|end| end <= memory);
    let args = if in_memory && len > 0 {
        // SAFETY: the hypervisor wrote `len` bytes at `args_addr` inside guest memory,
        // which is identity-mapped and never written again.
        let bytes = unsafe { core::slice::from_raw_parts(args_addr as *const u8, len) };
        core::str::from_utf8(bytes).unwrap_or("")
    } else {
        ""
    };
    // SAFETY: every guest binary defines nk_guest_main with this signature.
    unsafe { nk_guest_main(&BootArgs { vm, memory, args, vcpu, vcpus }) }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    cpu::halt()
}
