//! A Multiboot (v1) test kernel: the header asks for memory information and gives the
//! address fields (flag 16), so the loader's a.out-kludge path loads it; the kernel itself
//! is `guests/mbkernel/kernel.S` (32-bit, prints through the UART, takes APIC timer
//! interrupts, halts).
#![no_std]
#![no_main]

core::arch::global_asm!(
    ".set MB_MAGIC, 0x2BADB002",
    ".section .text.mb_header, \"ax\"",
    ".align 4",
    "mb1_header:",
    ".long 0x1BADB002",
    ".long 0x00010003",
    ".long 0xE4514FFB",
    ".long mb1_header",
    ".long _mb_load_start",
    ".long _mb_load_end",
    ".long _mb_bss_end",
    ".long _start",
    include_str!("../../mbkernel/print_cmdline_v1.S"),
    include_str!("../../mbkernel/kernel.S"),
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
