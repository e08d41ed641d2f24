//! The PC's cascaded pair of 8259A interrupt controllers (Intel 8259A datasheet; ports
//! 0x20/0x21 master, 0xA0/0xA1 slave on IRQ 2): the ICW1-ICW4 initialisation sequence,
//! OCW1 (mask), OCW2 (EOI), OCW3 (IRR/ISR read select), edge-triggered requests, fixed
//! priority (IRQ 0 highest) and the interrupt-acknowledge cycle that turns a request into
//! a vector. It reaches the CPU through the local APIC's LINT0 in ExtINT mode.

/// One 8259A.
#[derive(Clone, Copy, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// The input lines' levels, for edge detection.
    lines: u8,
    vector_base: u8,
    /// Next initialisation word expected: 0 none, 2 ICW2, 3 ICW3, 4 ICW4.
    init_step: u8,
    single: bool,
    needs_icw4: bool,
    auto_eoi: bool,
    read_isr: bool,
}

impl Chip {
    fn set_line(&mut self, line: u8, level: bool) {
        let bit = 1 << line;
        if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
            // A request withdrawn before acknowledge is lost (edge mode, level-sensitive IRR).
            self.irr &= !bit;
        }
    }

    /// Returns the highest-priority unmasked request that is not blocked by one in service.
    fn highest_request(&self) -> Option<u8> {
        let pending = self.irr & !self.imr;
        (0..8).take_while(|&l| self.isr & (1 << l) == 0).find(|&l| pending & (1 << l) != 0)
    }

    fn ack(&mut self, line: u8) {
        self.irr &= !(1 << line);
        if !self.auto_eoi {
            self.isr |= 1 << line;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: starts initialisation; clears IMR and ISR.
            *self = Chip {
                lines: self.lines,
                init_step: 2,
                single: value & 0x02 != 0,
                needs_icw4: value & 0x01 != 0,
                ..Chip::default()
            };
        } else if value & 0x08 != 0 {
            // OCW3: bit 1 enables the register select in bit 0.
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
        } else {
            // OCW2.
            match value >> 5 {
                1 => {
                    // Non-specific EOI: the highest-priority in-service line.
                    if let Some(l) = (0..8).find(|&l| self.isr & (1 << l) != 0) {
                        self.isr &= !(1 << l);
                    }
                }
                3 => self.isr &= !(1 << (value & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            2 => {
                self.vector_base = value & 0xF8;
                self.init_step = if !self.single {
                    3
                } else if self.needs_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => self.init_step = if self.needs_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The master/slave pair.
#[derive(Clone, Debug)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

/// The cascade input on the master.
const CASCADE: u8 = 2;

impl PicPair {
    /// Returns a pair as firmware leaves it: vectors 0x08/0x70, every line masked.
    pub fn new() -> Self {
        let master = Chip { vector_base: 0x08, imr: 0xFF, ..Chip::default() };
        let slave = Chip { vector_base: 0x70, imr: 0xFF, ..Chip::default() };
        Self { master, slave }
    }

    /// Returns whether `port` belongs to the pair.
    pub fn claims(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xA0 | 0xA1)
    }

    /// Sets the level of ISA line `irq` (0-15); a rising edge requests it.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 => self.master.set_line(irq, level),
            8..=15 => {
                self.slave.set_line(irq - 8, level);
                let slave_out = self.slave.highest_request().is_some();
                self.master.set_line(CASCADE, slave_out);
            }
            _ => {}
        }
    }

    fn refresh_cascade(&mut self) {
        let slave_out = self.slave.highest_request().is_some();
        self.master.set_line(CASCADE, slave_out);
    }

    /// Returns whether the INTR output is raised.
    pub fn intr(&self) -> bool {
        self.master.highest_request().is_some()
    }

    /// Runs the interrupt-acknowledge cycle: returns the vector of the highest-priority
    /// request and marks it in service, or None if nothing is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let line = self.master.highest_request()?;
        self.master.ack(line);
        if line != CASCADE || self.master.single {
            return Some(self.master.vector_base + line);
        }
        let vector = match self.slave.highest_request() {
            Some(s) => {
                self.slave.ack(s);
                self.slave.vector_base + s
            }
            // Spurious on the slave: IRQ 15's vector (8259A datasheet).
            None => self.slave.vector_base + 7,
        };
        self.refresh_cascade();
        Some(vector)
    }

    /// Reads `port`.
    pub fn read(&self, port: u16) -> u8 {
        match port {
            0x20 => self.master.read_command(),
            0x21 => self.master.imr,
            0xA0 => self.slave.read_command(),
            0xA1 => self.slave.imr,
            _ => 0xFF,
        }
    }

    /// Writes `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.master.write_command(value),
            0x21 => self.master.write_data(value),
            0xA0 => self.slave.write_command(value),
            0xA1 => self.slave.write_data(value),
            _ => {}
        }
        self.refresh_cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Linux's `init_8259A` writes (arch/x86/kernel/i8259.c).
    fn linux_init(p: &mut PicPair) {
        p.write(0x21, 0xFF);
        p.write(0xA1, 0xFF);
        p.write(0x20, 0x11); // ICW1: edge, cascade, ICW4
        p.write(0x21, 0x30); // ICW2: vectors 0x30-0x37
        p.write(0x21, 0x04); // ICW3: slave on IRQ2
        p.write(0x21, 0x01); // ICW4: 8086, normal EOI
        p.write(0xA0, 0x11);
        p.write(0xA1, 0x38);
        p.write(0xA1, 0x02);
        p.write(0xA1, 0x01);
        p.write(0x21, 0xFB); // everything masked but the cascade
        p.write(0xA1, 0xFF);
    }

    #[test]
    fn linux_probe_reads_the_mask_back() {
        let mut p = PicPair::new();
        p.write(0xA1, 0xFF);
        p.write(0x21, 0xA5);
        assert_eq!(p.read(0x21), 0xA5);
    }

    #[test]
    fn serial_irq_4_delivers_its_vector_once() {
        let mut p = PicPair::new();
        linux_init(&mut p);
        p.set_irq(4, true);
        assert!(!p.intr(), "masked");
        p.write(0x21, 0xEB); // unmask IRQ 4
        assert!(p.intr());
        assert_eq!(p.acknowledge(), Some(0x34));
        assert!(!p.intr());
        // ISR read through OCW3.
        p.write(0x20, 0x0B);
        assert_eq!(p.read(0x20), 0x10);
        // Level stays high: no new edge, no new request.
        p.set_irq(4, true);
        assert!(!p.intr());
        p.write(0x20, 0x20); // non-specific EOI
        assert_eq!(p.read(0x20), 0);
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), Some(0x34));
    }

    #[test]
    fn in_service_line_blocks_lower_priority() {
        let mut p = PicPair::new();
        linux_init(&mut p);
        p.write(0x21, 0x00);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), Some(0x33));
        p.set_irq(4, true);
        assert!(!p.intr(), "IRQ 4 waits behind IRQ 3 in service");
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), Some(0x31), "higher priority nests");
        p.write(0x20, 0x63); // specific EOI for 3
        p.write(0x20, 0x61);
        assert_eq!(p.acknowledge(), Some(0x34));
    }

    #[test]
    fn slave_requests_cascade_through_irq2() {
        let mut p = PicPair::new();
        linux_init(&mut p);
        p.write(0xA1, 0xFE); // unmask IRQ 8
        p.set_irq(8, true);
        assert!(p.intr());
        assert_eq!(p.acknowledge(), Some(0x38));
        assert!(!p.intr());
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut p = PicPair::new();
        p.write(0x20, 0x11);
        p.write(0x21, 0x20);
        p.write(0x21, 0x04);
        p.write(0x21, 0x03);
        p.write(0x21, 0x00);
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), Some(0x20));
        p.write(0x20, 0x0B);
        assert_eq!(p.read(0x20), 0);
    }

    #[test]
    fn out_of_range_lines_and_ports_are_ignored() {
        let mut p = PicPair::new();
        p.set_irq(16, true);
        p.set_irq(255, true);
        assert!(!p.intr());
        assert_eq!(p.read(0x22), 0xFF);
        assert_eq!(p.acknowledge(), None);
    }
}
