//! The legacy 8259 interrupt controllers. The BIOS leaves them delivering IRQ 0-7 on
//! vectors 8-15, on top of the CPU's exceptions; the hypervisor moves them to 0x20-0x2F
//! and masks every line (it uses the local APIC only). A spurious IRQ 7 or 15 can still
//! arrive and is ignored by the IDT.

use super::port::{inb, outb};

const MASTER_COMMAND: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_COMMAND: u16 = 0xA0;
const SLAVE_DATA: u16 = 0xA1;
/// The first vector of the master controller after remapping.
pub const MASTER_BASE: u8 = 0x20;
/// The first vector of the slave controller after remapping.
pub const SLAVE_BASE: u8 = 0x28;

/// Remaps both controllers above the exception vectors and masks all their lines.
pub fn remap_and_mask() {
    // ICW1: initialise, expect ICW4; ICW2: vector base; ICW3: cascade on IRQ 2;
    // ICW4: 8086 mode. A read of an unused port between writes gives the old
    // controllers time to settle.
    let settle = || {
        let _ = inb(0x80);
    };
    for (command, data, base, cascade) in
        [(MASTER_COMMAND, MASTER_DATA, MASTER_BASE, 4), (SLAVE_COMMAND, SLAVE_DATA, SLAVE_BASE, 2)]
    {
        outb(command, 0x11);
        settle();
        outb(data, base);
        settle();
        outb(data, cascade);
        settle();
        outb(data, 0x01);
        settle();
        outb(data, 0xFF);
    }
}
