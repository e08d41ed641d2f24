//! Port I/O: the only way the hypervisor touches legacy devices (UART, PIT, debug ports).

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the hypervisor runs at CPL0 (crate-level assumption); writing a legacy port
    // has no memory-safety effect on Rust state.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reading a legacy port has no memory-safety effect.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a double word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a word from an I/O port.
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `inb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a double word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads `buf.len() / 2` words from an I/O port into `buf` (REP INSW, SDM Vol. 2A "INS"):
/// the PIO data-in transfer of a disk sector. A trailing odd byte is left as it was.
pub fn read_words(port: u16, buf: &mut [u8]) {
    let count = buf.len() / 2;
    // SAFETY: REP INSW stores `count` words at [RDI] upwards (the direction flag is clear,
    // as the ABI requires at every call), all inside `buf`, which is borrowed exclusively;
    // reading the port itself has no memory-safety effect.
    unsafe {
        asm!("rep insw", in("dx") port, inout("rdi") buf.as_mut_ptr() => _, inout("rcx") count => _,
            options(nostack, preserves_flags))
    }
}

/// Writes `data.len() / 2` words from `data` to an I/O port (REP OUTSW, SDM Vol. 2B
/// "OUTS"): the PIO data-out transfer of a disk sector. A trailing odd byte is not sent.
pub fn write_words(port: u16, data: &[u8]) {
    let count = data.len() / 2;
    // SAFETY: REP OUTSW loads `count` words from [RSI] upwards (direction flag clear), all
    // inside `data`; writing the port has no memory-safety effect on Rust state.
    unsafe {
        asm!("rep outsw", in("dx") port, inout("rsi") data.as_ptr() => _, inout("rcx") count => _,
            options(nostack, preserves_flags, readonly))
    }
}

/// Writes `data.len() / 4` double words from `data` to an I/O port (REP OUTSD): the 32-bit
/// PIO data-out transfer of a disk sector, half the port accesses of [`write_words`]
/// where the device takes double words (IDENTIFY word 48). Trailing bytes are not sent.
pub fn write_dwords(port: u16, data: &[u8]) {
    let count = data.len() / 4;
    // SAFETY: REP OUTSD loads `count` double words from [RSI] upwards (direction flag
    // clear), all inside `data`; writing the port has no memory-safety effect on Rust state.
    unsafe {
        asm!("rep outsd", in("dx") port, inout("rsi") data.as_ptr() => _, inout("rcx") count => _,
            options(nostack, preserves_flags, readonly))
    }
}

/// Reads `buf.len() / 4` double words from an I/O port into `buf` (REP INSD): the 32-bit
/// PIO data-in transfer. Trailing bytes are left as they were.
pub fn read_dwords(port: u16, buf: &mut [u8]) {
    let count = buf.len() / 4;
    // SAFETY: REP INSD stores `count` double words at [RDI] upwards (direction flag clear),
    // all inside `buf`, which is borrowed exclusively.
    unsafe {
        asm!("rep insd", in("dx") port, inout("rdi") buf.as_mut_ptr() => _, inout("rcx") count => _,
            options(nostack, preserves_flags))
    }
}
