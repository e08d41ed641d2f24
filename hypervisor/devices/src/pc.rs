//! The small virtual PC a guest OS sees, wiring the devices together: port I/O routed by
//! address, COM1's interrupt line into IRQ 4 of the 8259 pair, the 8259's INTR into the
//! local APIC's LINT0, the choice of the next interrupt to inject, and the three ways a
//! guest ends itself (ACPI S5, port 0xCF9, the 8042's reset line). Ports no device claims
//! read as all ones and ignore writes, as on a bus with nothing there.

use crate::acpi_pm::{AcpiPm, PmAction};
use crate::i8042::{KbcAction, I8042};
use crate::lapic::LocalApic;
use crate::pic8259::PicPair;
use crate::rtc::Rtc;
use crate::uart16550::Uart16550;

/// COM1's base port and ISA IRQ.
pub const COM1: u16 = 0x3F8;
pub const COM1_IRQ: u8 = 4;
/// The reset control register (PIIX/ICH "RST_CNT").
pub const RESET_CONTROL: u16 = 0xCF9;

/// How a guest asked its machine to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcEvent {
    None,
    /// ACPI S5.
    PowerOff,
    /// 0xCF9 or the 8042: the guest asked for a reset (a VM ends on it).
    Reset(&'static str),
}

/// Where the next interrupt comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Apic(u8),
    Pic,
}

/// The virtual PC of one single-vCPU VM.
#[derive(Debug)]
pub struct VirtualPc {
    pub uart: Uart16550,
    pub pic: PicPair,
    pub lapic: LocalApic,
    pub rtc: Rtc,
    pub pm: AcpiPm,
    pub kbc: I8042,
    reset_control: u8,
    /// Accesses to ports no device claims (for the VM's exit statistics).
    pub unclaimed: u64,
}

impl Default for VirtualPc {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualPc {
    /// Returns the board with every device in its firmware state.
    pub fn new() -> Self {
        Self {
            uart: Uart16550::new(),
            pic: PicPair::new(),
            lapic: LocalApic::new(0, true),
            rtc: Rtc::new(),
            pm: AcpiPm::default(),
            kbc: I8042,
            reset_control: 0,
            unclaimed: 0,
        }
    }

    /// Reads `size` bytes (1, 2 or 4) from `port`; `unix_seconds` is the wall clock.
    pub fn io_in(&mut self, port: u16, size: u8, unix_seconds: u64) -> u32 {
        let ones = match size {
            1 => 0xFF,
            2 => 0xFFFF,
            _ => 0xFFFF_FFFF,
        };
        let value = match port {
            p if (COM1..COM1 + 8).contains(&p) => u32::from(self.uart.read(p - COM1)),
            p if PicPair::claims(p) => u32::from(self.pic.read(p)),
            p if Rtc::claims(p) => u32::from(self.rtc.read(p, unix_seconds)),
            p if AcpiPm::claims(p) => self.pm.read(p, size),
            p if I8042::claims(p) => u32::from(self.kbc.read(p)),
            RESET_CONTROL => u32::from(self.reset_control),
            _ => {
                self.unclaimed += 1;
                ones
            }
        };
        self.sync_irqs();
        value & ones
    }

    /// Writes `size` bytes to `port`; completed UART lines go to `console`.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32, console: &mut dyn FnMut(&[u8])) -> PcEvent {
        let byte = value as u8;
        let event = match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                self.uart.write(p - COM1, byte, console);
                PcEvent::None
            }
            p if PicPair::claims(p) => {
                self.pic.write(p, byte);
                PcEvent::None
            }
            p if Rtc::claims(p) => {
                self.rtc.write(p, byte);
                PcEvent::None
            }
            p if AcpiPm::claims(p) => match self.pm.write(p, size, value) {
                PmAction::PowerOff => PcEvent::PowerOff,
                PmAction::None => PcEvent::None,
            },
            p if I8042::claims(p) => match self.kbc.write(p, byte) {
                KbcAction::Reset => PcEvent::Reset("keyboard controller reset (0x64 <- 0xFE)"),
                KbcAction::None => PcEvent::None,
            },
            RESET_CONTROL => {
                // Bit 2 (RST_CPU) set with bit 1 (SYS_RST) or on its rising edge resets.
                let old = self.reset_control;
                self.reset_control = byte & 0x0E;
                if byte & 0x04 != 0 && old & 0x04 == 0 {
                    PcEvent::Reset("reset control register (0xCF9)")
                } else {
                    PcEvent::None
                }
            }
            _ => {
                self.unclaimed += 1;
                PcEvent::None
            }
        };
        self.sync_irqs();
        event
    }

    /// Copies the UART's interrupt line into the PIC (edge detection happens there).
    pub fn sync_irqs(&mut self) {
        let level = self.uart.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
    }

    /// Returns where the next interrupt would come from: the APIC's highest deliverable
    /// vector, else the 8259 through LINT0 (ExtINT).
    pub fn pending(&self) -> Option<Source> {
        if let Some(v) = self.lapic.deliverable() {
            return Some(Source::Apic(v));
        }
        (self.pic.intr() && self.lapic.extint_open()).then_some(Source::Pic)
    }

    /// Takes the next interrupt for injection: returns its vector and records it as in
    /// service (APIC ISR or the 8259's acknowledge cycle).
    pub fn take_interrupt(&mut self) -> Option<u8> {
        match self.pending()? {
            Source::Apic(v) => {
                self.lapic.accept(v);
                Some(v)
            }
            Source::Pic => self.pic.acknowledge(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uart16550::{reg, IER_THRI};

    fn linux_pic_init(pc: &mut VirtualPc) {
        let mut none = |_: &[u8]| {};
        for (p, v) in
            [(0x20, 0x11), (0x21, 0x30), (0x21, 4), (0x21, 1), (0xA0, 0x11), (0xA1, 0x38), (0xA1, 2), (0xA1, 1)]
        {
            pc.io_out(p, 1, v, &mut none);
        }
        pc.io_out(0x21, 1, 0xEB, &mut none); // IRQ 2 and 4 unmasked
    }

    #[test]
    fn serial_interrupt_reaches_the_cpu_through_the_pic() {
        let mut pc = VirtualPc::new();
        linux_pic_init(&mut pc);
        let mut lines = Vec::new();
        let mut console = |l: &[u8]| lines.push(l.to_vec());
        assert_eq!(pc.take_interrupt(), None);
        pc.io_out(COM1 + reg::IER, 1, u32::from(IER_THRI), &mut console);
        assert_eq!(pc.pending(), Some(Source::Pic));
        assert_eq!(pc.take_interrupt(), Some(0x34));
        // The handler reads IIR (clearing THRE), writes a byte, EOIs.
        assert_eq!(pc.io_in(COM1 + reg::IIR_FCR, 1, 0) & 0xF, 2);
        pc.io_out(COM1, 1, u32::from(b'\n'), &mut console);
        pc.io_out(0x20, 1, 0x20, &mut console);
        assert_eq!(pc.take_interrupt(), Some(0x34), "THR empty again: a new edge");
        assert_eq!(lines, vec![Vec::<u8>::new()]);
    }

    #[test]
    fn apic_vectors_win_over_the_pic() {
        let mut pc = VirtualPc::new();
        linux_pic_init(&mut pc);
        let mut none = |_: &[u8]| {};
        pc.io_out(COM1 + 1, 1, u32::from(IER_THRI), &mut none);
        pc.lapic.raise(0xEC);
        assert_eq!(pc.take_interrupt(), Some(0xEC));
        assert_eq!(pc.take_interrupt(), Some(0x34));
    }

    #[test]
    fn ways_to_end() {
        let mut pc = VirtualPc::new();
        let mut none = |_: &[u8]| {};
        assert_eq!(pc.io_out(0x604, 2, (5 << 10) | (1 << 13), &mut none), PcEvent::PowerOff);
        assert!(matches!(pc.io_out(0x64, 1, 0xFE, &mut none), PcEvent::Reset(_)));
        assert_eq!(pc.io_out(0xCF9, 1, 0x02, &mut none), PcEvent::None);
        assert!(matches!(pc.io_out(0xCF9, 1, 0x06, &mut none), PcEvent::Reset(_)));
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let mut pc = VirtualPc::new();
        assert_eq!(pc.io_in(0x2F8, 1, 0), 0xFF, "no COM2");
        assert_eq!(pc.io_in(0x1234, 4, 0), 0xFFFF_FFFF);
        let mut none = |_: &[u8]| {};
        assert_eq!(pc.io_out(0x80, 1, 0, &mut none), PcEvent::None);
        assert_eq!(pc.unclaimed, 3);
    }
}
