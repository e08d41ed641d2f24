//! A 16550A UART (National Semiconductor PC16550D datasheet; the register set Linux's
//! `drivers/tty/serial/8250` probes and drives): eight byte registers at a base port,
//! divisor latch behind LCR.DLAB, a receive FIFO fed by [`Uart16550::push_input`], and an
//! interrupt line (IRQ 4 on COM1) computed from IER and the pending conditions.
//!
//! Transmission is instantaneous: a byte written to THR is appended to the current output
//! line and THR/TSR are empty again at once, so LSR always reads THRE|TEMT. Complete lines
//! (or lines that reach [`LINE_MAX`] bytes) are handed to the caller's sink.

/// Register offsets from the base port.
pub mod reg {
    /// Receive buffer (read) / transmit holding (write); divisor low with DLAB.
    pub const RBR_THR: u16 = 0;
    /// Interrupt enable; divisor high with DLAB.
    pub const IER: u16 = 1;
    /// Interrupt identification (read) / FIFO control (write).
    pub const IIR_FCR: u16 = 2;
    /// Line control.
    pub const LCR: u16 = 3;
    /// Modem control.
    pub const MCR: u16 = 4;
    /// Line status.
    pub const LSR: u16 = 5;
    /// Modem status.
    pub const MSR: u16 = 6;
    /// Scratch.
    pub const SCR: u16 = 7;
}

/// IER bits.
pub const IER_RDI: u8 = 0x01;
pub const IER_THRI: u8 = 0x02;
pub const IER_RLSI: u8 = 0x04;
pub const IER_MSI: u8 = 0x08;

/// IIR values (bits 6-7 report the FIFOs enabled).
pub const IIR_NO_INT: u8 = 0x01;
pub const IIR_MSI: u8 = 0x00;
pub const IIR_THRI: u8 = 0x02;
pub const IIR_RDI: u8 = 0x04;
pub const IIR_RLSI: u8 = 0x06;
pub const IIR_FIFO_ENABLED: u8 = 0xC0;

/// LSR bits.
pub const LSR_DR: u8 = 0x01;
pub const LSR_OE: u8 = 0x02;
pub const LSR_THRE: u8 = 0x20;
pub const LSR_TEMT: u8 = 0x40;

/// MCR bits.
pub const MCR_DTR: u8 = 0x01;
pub const MCR_RTS: u8 = 0x02;
pub const MCR_OUT1: u8 = 0x04;
pub const MCR_OUT2: u8 = 0x08;
pub const MCR_LOOP: u8 = 0x10;

/// MSR bits (status in the high nibble, deltas in the low one).
pub const MSR_CTS: u8 = 0x10;
pub const MSR_DSR: u8 = 0x20;
pub const MSR_RI: u8 = 0x40;
pub const MSR_DCD: u8 = 0x80;

const LCR_DLAB: u8 = 0x80;
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

/// The receive FIFO's depth: input pushed beyond it is dropped and sets LSR.OE.
pub const RX_FIFO: usize = 256;
/// The longest output line handed to the sink; a longer one is cut into pieces.
pub const LINE_MAX: usize = 200;

/// A 16550A at one base port.
#[derive(Debug)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// A THR-empty interrupt is pending (raised when THR empties or THRI is enabled,
    /// cleared by reading IIR while it is the source, or by writing THR).
    thre_pending: bool,
    overrun: bool,
    msr_delta: u8,
    rx: [u8; RX_FIFO],
    rx_head: usize,
    rx_len: usize,
    line: [u8; LINE_MAX],
    line_len: usize,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// Returns a UART in its reset state (SDM-free: datasheet table 2, "reset").
    pub const fn new() -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll: 12, // 9600 baud
            dlm: 0,
            fifo_enabled: false,
            thre_pending: false,
            overrun: false,
            msr_delta: 0,
            rx: [0; RX_FIFO],
            rx_head: 0,
            rx_len: 0,
            line: [0; LINE_MAX],
            line_len: 0,
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// Returns the divisor latch (baud = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    fn modem_status(&self) -> u8 {
        let status = if self.mcr & MCR_LOOP != 0 {
            // Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (datasheet §8.6).
            let mut s = 0;
            if self.mcr & MCR_RTS != 0 {
                s |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                s |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                s |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                s |= MSR_DCD;
            }
            s
        } else {
            MSR_DCD | MSR_DSR | MSR_CTS
        };
        status | self.msr_delta
    }

    fn line_status(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if self.rx_len > 0 {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    /// Returns the highest-priority pending interrupt's IIR identification, if any
    /// (priority: line status, received data, THR empty, modem status).
    fn pending(&self) -> Option<u8> {
        if self.ier & IER_RLSI != 0 && self.overrun {
            Some(IIR_RLSI)
        } else if self.ier & IER_RDI != 0 && self.rx_len > 0 {
            Some(IIR_RDI)
        } else if self.ier & IER_THRI != 0 && self.thre_pending {
            Some(IIR_THRI)
        } else if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            Some(IIR_MSI)
        } else {
            None
        }
    }

    /// Returns the level of the interrupt line (the PC routes it to IRQ 4 for COM1).
    pub fn irq_level(&self) -> bool {
        self.pending().is_some()
    }

    /// Reads register `offset` (0..=7; others read 0xFF).
    pub fn read(&mut self, offset: u16) -> u8 {
        match offset {
            reg::RBR_THR if self.dlab() => self.dll,
            reg::RBR_THR => {
                if self.rx_len == 0 {
                    return 0;
                }
                let byte = self.rx[self.rx_head];
                self.rx_head = (self.rx_head + 1) % RX_FIFO;
                self.rx_len -= 1;
                byte
            }
            reg::IER if self.dlab() => self.dlm,
            reg::IER => self.ier,
            reg::IIR_FCR => {
                let fifo = if self.fifo_enabled { IIR_FIFO_ENABLED } else { 0 };
                match self.pending() {
                    Some(id) => {
                        if id == IIR_THRI {
                            // Reading IIR with THRE as the source clears it (datasheet table 4).
                            self.thre_pending = false;
                        }
                        fifo | id
                    }
                    None => fifo | IIR_NO_INT,
                }
            }
            reg::LCR => self.lcr,
            reg::MCR => self.mcr,
            reg::LSR => {
                let lsr = self.line_status();
                self.overrun = false;
                lsr
            }
            reg::MSR => {
                let msr = self.modem_status();
                self.msr_delta = 0;
                msr
            }
            reg::SCR => self.scr,
            _ => 0xFF,
        }
    }

    /// Writes `value` to register `offset`; a byte written to THR goes to the output line,
    /// and `sink` receives each completed line (without its newline).
    pub fn write(&mut self, offset: u16, value: u8, sink: &mut dyn FnMut(&[u8])) {
        match offset {
            reg::RBR_THR if self.dlab() => self.dll = value,
            reg::RBR_THR => {
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                } else {
                    self.transmit(value, sink);
                }
                // THR is empty again at once.
                self.thre_pending = true;
            }
            reg::IER if self.dlab() => self.dlm = value,
            reg::IER => {
                let old = self.ier;
                self.ier = value & 0x0F;
                if self.ier & IER_THRI != 0 && old & IER_THRI == 0 {
                    // THR is empty: enabling THRI raises the interrupt (what Linux's
                    // UART_BUG_THRE test expects to read back from IIR).
                    self.thre_pending = true;
                }
            }
            reg::IIR_FCR => {
                self.fifo_enabled = value & FCR_ENABLE != 0;
                if value & FCR_CLEAR_RX != 0 || !self.fifo_enabled {
                    self.rx_len = 0;
                    self.rx_head = 0;
                }
            }
            reg::LCR => self.lcr = value,
            reg::MCR => {
                let old_status = self.modem_status() & 0xF0;
                self.mcr = value & 0x1F;
                let new_status = self.modem_status() & 0xF0;
                let changed = (old_status ^ new_status) >> 4;
                // Delta bits: CTS, DSR, trailing edge of RI, DCD.
                self.msr_delta |= changed & 0x0B;
                if changed & 0x04 != 0 && new_status & MSR_RI == 0 {
                    self.msr_delta |= 0x04;
                }
            }
            reg::SCR => self.scr = value,
            _ => {}
        }
    }

    fn transmit(&mut self, byte: u8, sink: &mut dyn FnMut(&[u8])) {
        match byte {
            b'\n' => self.flush(sink),
            b'\r' => {}
            _ => {
                self.line[self.line_len] = byte;
                self.line_len += 1;
                if self.line_len == LINE_MAX {
                    self.flush(sink);
                }
            }
        }
    }

    /// Hands a partial output line to `sink` (at the VM's end, so nothing is lost).
    pub fn flush(&mut self, sink: &mut dyn FnMut(&[u8])) {
        sink(&self.line[..self.line_len]);
        self.line_len = 0;
    }

    /// Returns whether an unfinished output line is buffered.
    pub fn has_partial_line(&self) -> bool {
        self.line_len > 0
    }

    fn receive(&mut self, byte: u8) {
        if self.rx_len == RX_FIFO {
            self.overrun = true;
            return;
        }
        self.rx[(self.rx_head + self.rx_len) % RX_FIFO] = byte;
        self.rx_len += 1;
    }

    /// Returns whether the guest's driver listens for input: receive interrupts enabled
    /// (IER.RDI) with the interrupt line connected (MCR.OUT2) outside loopback, which a
    /// driver sets up only once its port is open (Linux's probe sets IER alone, and its
    /// start-up clears the FIFO before enabling both). Input typed earlier would be lost.
    pub fn listening(&self) -> bool {
        self.ier & IER_RDI != 0 && self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    /// Queues as many of `bytes` as the receive FIFO has room for (never overrunning it);
    /// returns how many it took, so the caller feeds the rest as the guest drains it.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let room = RX_FIFO - self.rx_len;
        let taken = bytes.len().min(room);
        for &b in &bytes[..taken] {
            self.receive(b);
        }
        taken
    }

    /// Queues bytes as if typed on the line; returns how many fit (the rest set LSR.OE).
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let before = self.rx_len;
        for &b in bytes {
            self.receive(b);
        }
        self.rx_len - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_sink() -> impl FnMut(&[u8]) {
        |_: &[u8]| {}
    }

    #[test]
    fn linux_autoconfig_sees_a_16550a() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        // autoconfig(): IER test.
        u.write(reg::IER, 0, &mut s);
        assert_eq!(u.read(reg::IER) & 0x0F, 0);
        u.write(reg::IER, 0x0F, &mut s);
        assert_eq!(u.read(reg::IER) & 0x0F, 0x0F);
        u.write(reg::IER, 0, &mut s);
        // Scratch register.
        u.write(reg::SCR, 0xA5, &mut s);
        assert_eq!(u.read(reg::SCR), 0xA5);
        // Loopback test: MCR = LOOP|OUT2|RTS must read MSR & 0xF0 == DCD|CTS (0x90).
        u.write(reg::MCR, MCR_LOOP | 0x0A, &mut s);
        assert_eq!(u.read(reg::MSR) & 0xF0, 0x90);
        u.write(reg::MCR, 0, &mut s);
        // FIFO test: FCR=1 then IIR bits 6-7 == 3 means a 16550A.
        u.write(reg::IIR_FCR, FCR_ENABLE, &mut s);
        assert_eq!(u.read(reg::IIR_FCR) >> 6, 3);
        // No interrupt pending with IER 0.
        assert_eq!(u.read(reg::IIR_FCR) & IIR_NO_INT, IIR_NO_INT);
        assert!(!u.irq_level());
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        u.write(reg::LCR, 0x83, &mut s);
        u.write(reg::RBR_THR, 1, &mut s);
        u.write(reg::IER, 0, &mut s);
        assert_eq!(u.read(reg::RBR_THR), 1);
        assert_eq!(u.divisor(), 1);
        u.write(reg::LCR, 0x03, &mut s);
        assert_eq!(u.read(reg::LCR), 0x03);
        assert_eq!(u.read(reg::IER), 0, "IER untouched by the DLM write");
    }

    #[test]
    fn thre_test_in_startup_reads_a_pending_thri() {
        // serial8250_do_startup: IER=THRI then IIR must not say NO_INT (else UART_BUG_THRE).
        let mut u = Uart16550::new();
        let mut s = no_sink();
        u.write(reg::IER, IER_THRI, &mut s);
        assert!(u.irq_level());
        assert_eq!(u.read(reg::IIR_FCR) & 0x0F, IIR_THRI);
        // Reading IIR cleared it.
        assert_eq!(u.read(reg::IIR_FCR) & IIR_NO_INT, IIR_NO_INT);
        assert!(!u.irq_level());
        u.write(reg::IER, 0, &mut s);
        u.write(reg::IER, IER_THRI, &mut s);
        assert_eq!(u.read(reg::IIR_FCR) & 0x0F, IIR_THRI);
    }

    #[test]
    fn output_becomes_lines_and_thr_write_raises_thre() {
        let mut u = Uart16550::new();
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut sink = |l: &[u8]| lines.push(l.to_vec());
        u.write(reg::IER, IER_THRI, &mut sink);
        let _ = u.read(reg::IIR_FCR);
        for &b in b"hello\r\nworld\n" {
            assert_ne!(u.read(reg::LSR) & LSR_THRE, 0);
            u.write(reg::RBR_THR, b, &mut sink);
            assert!(u.irq_level(), "THR empty again after every byte");
        }
        assert_eq!(lines, vec![b"hello".to_vec(), b"world".to_vec()]);
    }

    #[test]
    fn long_lines_are_cut() {
        let mut u = Uart16550::new();
        let mut count = 0;
        let mut sink = |l: &[u8]| {
            assert!(l.len() <= LINE_MAX);
            count += 1;
        };
        for _ in 0..LINE_MAX * 2 + 5 {
            u.write(reg::RBR_THR, b'x', &mut sink);
        }
        assert_eq!(count, 2);
        assert!(u.has_partial_line());
    }

    #[test]
    fn input_raises_rdi_until_drained() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        u.write(reg::IER, IER_RDI, &mut s);
        assert!(!u.irq_level());
        assert_eq!(u.push_input(b"ls\n"), 3);
        assert!(u.irq_level());
        assert_eq!(u.read(reg::IIR_FCR) & 0x0F, IIR_RDI);
        let mut got = Vec::new();
        while u.read(reg::LSR) & LSR_DR != 0 {
            got.push(u.read(reg::RBR_THR));
        }
        assert_eq!(got, b"ls\n");
        assert!(!u.irq_level());
    }

    #[test]
    fn input_overflow_sets_overrun_and_is_bounded() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        let big = [b'a'; RX_FIFO + 10];
        assert_eq!(u.push_input(&big), RX_FIFO);
        u.write(reg::IER, IER_RLSI, &mut s);
        assert_eq!(u.read(reg::IIR_FCR) & 0x0F, IIR_RLSI);
        assert_ne!(u.read(reg::LSR) & LSR_OE, 0);
        assert_eq!(u.read(reg::LSR) & LSR_OE, 0, "reading LSR clears OE");
        // FCR clear-RX empties the FIFO.
        u.write(reg::IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX, &mut s);
        assert_eq!(u.read(reg::LSR) & LSR_DR, 0);
    }

    #[test]
    fn listening_only_once_the_port_is_open() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        // Linux's autoconfig writes IER = 0x0F with MCR = 0: not listening.
        u.write(reg::IER, 0x0F, &mut s);
        assert!(!u.listening());
        u.write(reg::MCR, MCR_LOOP | MCR_OUT2, &mut s);
        assert!(!u.listening(), "loopback");
        // serial8250_do_startup: MCR with OUT2 (set_mctrl), then IER = RLSI|RDI.
        u.write(reg::MCR, MCR_OUT2 | MCR_DTR | MCR_RTS, &mut s);
        u.write(reg::IER, IER_RLSI | IER_RDI, &mut s);
        assert!(u.listening());
    }

    #[test]
    fn feeding_never_overruns() {
        let mut u = Uart16550::new();
        let big = [b'k'; RX_FIFO + 7];
        assert_eq!(u.feed(&big), RX_FIFO);
        assert_eq!(u.feed(&big), 0);
        assert_eq!(u.read(reg::LSR) & LSR_OE, 0);
        let _ = u.read(reg::RBR_THR);
        assert_eq!(u.feed(&big[..3]), 1);
    }

    #[test]
    fn loopback_echoes_into_rbr() {
        let mut u = Uart16550::new();
        let mut lines = 0;
        let mut sink = |_: &[u8]| lines += 1;
        u.write(reg::MCR, MCR_LOOP, &mut sink);
        u.write(reg::RBR_THR, b'\n', &mut sink);
        assert_eq!(u.read(reg::RBR_THR), b'\n');
        assert_eq!(lines, 0);
    }

    #[test]
    fn unknown_offsets_are_harmless() {
        let mut u = Uart16550::new();
        let mut s = no_sink();
        u.write(8, 1, &mut s);
        assert_eq!(u.read(8), 0xFF);
        assert_eq!(u.read(u16::MAX), 0xFF);
    }
}
