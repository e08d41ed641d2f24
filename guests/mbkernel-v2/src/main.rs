//! A Multiboot2 test kernel: the header has only an information request (command line,
//! memory map) and no address tag, so the loader loads its ELF segments by physical
//! address; the kernel itself is `guests/mbkernel/kernel.S` (32-bit, prints through the
//! UART, takes APIC timer interrupts, halts).
#![no_std]
#![no_main]

core::arch::global_asm!(
    ".set MB_MAGIC, 0x36D76289",
    ".section .text.mb_header, \"ax\"",
    ".align 8",
    "mb2_header:",
    ".long 0xE85250D6",
    ".long 0",
    ".long 40",
    ".long 0x17ADAF02",
    ".word 1, 0",
    ".long 16",
    ".long 1, 6",
    ".word 0, 0",
    ".long 8",
    include_str!("../../mbkernel/print_cmdline_v2.S"),
    include_str!("../../mbkernel/kernel.S"),
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
