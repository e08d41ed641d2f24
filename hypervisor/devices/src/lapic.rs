//! A local APIC (SDM Vol. 3A ch. 11): the register file at its xAPIC offsets (reached
//! through the APIC-access page) and as x2APIC MSRs 0x800-0x8FF (§11.12), the
//! IRR/ISR/TPR/PPR priority logic (§11.8), EOI, self-IPIs, and the timer in one-shot,
//! periodic and TSC-deadline mode (§11.5.4) driven by a tick source: the caller passes the
//! current tick (the guest's TSC) to every call, arms its own timer for
//! [`LocalApic::next_timer_deadline`] and calls [`LocalApic::tick`] when it expires.
//!
//! The APIC timer's clock is the tick source itself (divided by the divide configuration),
//! so CPUID leaf 0x15 can report one crystal frequency for both TSC and APIC timer.

/// xAPIC register offsets (SDM Vol. 3A table 11-1); the x2APIC MSR is `0x800 + offset/16`.
pub mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0A0;
    pub const EOI: u32 = 0x0B0;
    pub const RRD: u32 = 0x0C0;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const ISR0: u32 = 0x100;
    pub const TMR0: u32 = 0x180;
    pub const IRR0: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const LVT_CMCI: u32 = 0x2F0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// x2APIC only (MSR 0x83F).
    pub const SELF_IPI: u32 = 0x3F0;
}

/// First and last x2APIC MSR.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8FF;

/// The default APIC base (IA32_APIC_BASE bits 12+).
pub const DEFAULT_BASE: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE bits (SDM Vol. 3A §11.4.4, §11.12.1).
pub const BASE_BSP: u64 = 1 << 8;
pub const BASE_EXTD: u64 = 1 << 10;
pub const BASE_ENABLE: u64 = 1 << 11;

const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_MODE: u32 = 7 << 8;
const LVT_EXTINT: u32 = 7 << 8;
const TIMER_MODE_SHIFT: u32 = 17;
const SVR_ENABLE: u32 = 1 << 8;
/// Version 0x14 (integrated), max LVT entry 5 (timer, thermal, perf, LINT0, LINT1, error).
const VERSION_VALUE: u32 = 0x0005_0014;

/// The LVT timer's mode (bits 17-18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// What a register access asks of the rest of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicAction {
    None,
    /// An IPI to other CPUs (or INIT/SIPI/NMI): the ICR value, destination in bits 32-63 in
    /// x2APIC form. Self-IPIs with fixed delivery are handled inside.
    Ipi(u64),
    /// An NMI to this CPU.
    SelfNmi,
}

/// An access the architecture refuses: the guest gets #GP (x2APIC MSRs, IA32_APIC_BASE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicFault;

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct LocalApic {
    id: u32,
    base: u64,
    tpr: u32,
    svr: u32,
    ldr: u32,
    dfr: u32,
    esr: u32,
    irr: [u32; 8],
    isr: [u32; 8],
    tmr: [u32; 8],
    lvt_timer: u32,
    lvt_thermal: u32,
    lvt_perf: u32,
    lvt_lint0: u32,
    lvt_lint1: u32,
    lvt_error: u32,
    lvt_cmci: u32,
    icr: u64,
    timer_initial: u32,
    timer_divide: u32,
    /// The tick at which the one-shot/periodic count reaches zero.
    timer_due: Option<u64>,
    tsc_deadline: u64,
}

fn bit(vector: u8) -> (usize, u32) {
    ((vector / 32) as usize, 1 << (vector % 32))
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    for word in (0..8).rev() {
        if bits[word] != 0 {
            return Some((word * 32 + 31 - bits[word].leading_zeros() as usize) as u8);
        }
    }
    None
}

impl LocalApic {
    /// Returns an APIC as firmware leaves it for the OS (xAPIC mode at the default base,
    /// software-enabled, LINT0 as ExtINT and LINT1 as NMI: the PC's "virtual wire" so the
    /// 8259's interrupts pass through; SDM Vol. 3A §11.4.7 and MP spec §3.6.2.2).
    pub fn new(id: u32, bsp: bool) -> Self {
        Self {
            id,
            base: DEFAULT_BASE | BASE_ENABLE | if bsp { BASE_BSP } else { 0 },
            tpr: 0,
            svr: 0x1FF,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            esr: 0,
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            lvt_timer: LVT_MASKED,
            lvt_thermal: LVT_MASKED,
            lvt_perf: LVT_MASKED,
            lvt_lint0: LVT_EXTINT,
            lvt_lint1: 4 << 8,
            lvt_error: LVT_MASKED,
            lvt_cmci: LVT_MASKED,
            icr: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_due: None,
            tsc_deadline: 0,
        }
    }

    /// Returns IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base
    }

    /// Returns whether the APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.base & BASE_EXTD != 0 && self.base & BASE_ENABLE != 0
    }

    fn hw_enabled(&self) -> bool {
        self.base & BASE_ENABLE != 0
    }

    fn sw_enabled(&self) -> bool {
        self.hw_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// Writes IA32_APIC_BASE, allowing only the transitions of SDM Vol. 3A figure 11-27
    /// (x2APIC -> xAPIC directly, or setting EXTD while disabled, is #GP) and refusing
    /// reserved bits and a moved base (the APIC-access page stays where it is).
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), ApicFault> {
        let allowed = BASE_BSP | BASE_EXTD | BASE_ENABLE | 0xF_FFFF_F000;
        if value & !allowed != 0 {
            return Err(ApicFault);
        }
        let enable = value & BASE_ENABLE != 0;
        let extd = value & BASE_EXTD != 0;
        if extd && !enable {
            return Err(ApicFault);
        }
        if self.x2apic() && enable && !extd {
            return Err(ApicFault);
        }
        if value & BASE_BSP != self.base & BASE_BSP {
            return Err(ApicFault);
        }
        if value & 0xF_FFFF_F000 != DEFAULT_BASE {
            return Err(ApicFault);
        }
        if !enable {
            // Disabling resets the APIC (SDM §11.4.3): all LVTs masked, state cleared.
            let bsp = self.base & BASE_BSP != 0;
            *self = Self::new(self.id, bsp);
            self.svr = 0xFF;
            self.lvt_lint0 = LVT_MASKED;
            self.lvt_lint1 = LVT_MASKED;
            self.base = value;
            return Ok(());
        }
        if extd && !self.x2apic() {
            // Entering x2APIC mode: LDR is derived from the ID (SDM §11.12.10.2).
            self.ldr = ((self.id >> 4) << 16) | (1 << (self.id & 0xF));
        }
        self.base = value;
        Ok(())
    }

    /// Returns the processor priority (SDM §11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if (self.tpr >> 4) >= (isrv >> 4) {
            self.tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    /// Returns the vector the APIC would deliver now, if any: the highest requested vector
    /// whose priority class exceeds the PPR's (SDM §11.8.3).
    pub fn deliverable(&self) -> Option<u8> {
        if !self.sw_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        ((u32::from(v) >> 4) > (self.ppr() >> 4)).then_some(v)
    }

    /// Returns the priority class of the highest requested vector when the PPR holds it
    /// back (SDM §11.8.3.1): the caller can ask to hear when the TPR drops below it (the
    /// TPR threshold, SDM Vol. 3 §30.1.2).
    pub fn blocked_class(&self) -> Option<u8> {
        if !self.sw_enabled() || self.deliverable().is_some() {
            return None;
        }
        highest(&self.irr).map(|v| v >> 4)
    }

    /// Moves `vector` from IRR to ISR: the CPU has taken it (an injected interrupt).
    pub fn accept(&mut self, vector: u8) {
        let (w, b) = bit(vector);
        self.irr[w] &= !b;
        self.isr[w] |= b;
    }

    /// Requests `vector` (edge-triggered, fixed delivery); vectors 0-15 are illegal and set
    /// the ESR's "received illegal vector" bit instead (SDM §11.5.3).
    pub fn raise(&mut self, vector: u8) {
        if vector < 16 {
            self.esr |= 1 << 6;
            return;
        }
        let (w, b) = bit(vector);
        self.irr[w] |= b;
    }

    /// Returns whether LINT0 passes the 8259's INTR (ExtINT, not masked) or the APIC is off
    /// (then INTR goes straight to the processor).
    pub fn extint_open(&self) -> bool {
        if !self.hw_enabled() {
            return true;
        }
        self.sw_enabled() && self.lvt_lint0 & LVT_MASKED == 0 && self.lvt_lint0 & LVT_DELIVERY_MODE == LVT_EXTINT
    }

    fn eoi(&mut self) {
        if let Some(v) = highest(&self.isr) {
            let (w, b) = bit(v);
            self.isr[w] &= !b;
            self.tmr[w] &= !b;
        }
    }

    /// Returns the timer's mode.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt_timer >> TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    fn divisor(&self) -> u64 {
        // Divide configuration bits 0,1,3 (SDM figure 11-10): 0b111 is divide by 1.
        let v = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn period(&self) -> u64 {
        u64::from(self.timer_initial) * self.divisor()
    }

    /// Returns the tick at which the timer fires next, if it is armed and not masked.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        if self.lvt_timer & LVT_MASKED != 0 || !self.sw_enabled() {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => self.timer_due,
        }
    }

    /// Advances the timer to tick `now`: an expired timer requests its vector (once per
    /// call however many periods passed; a periodic timer re-arms for the next period
    /// after `now`).
    pub fn tick(&mut self, now: u64) {
        let vector = (self.lvt_timer & 0xFF) as u8;
        let masked = self.lvt_timer & LVT_MASKED != 0 || !self.sw_enabled();
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                if self.tsc_deadline != 0 && now >= self.tsc_deadline {
                    self.tsc_deadline = 0;
                    if !masked {
                        self.raise(vector);
                    }
                }
            }
            mode => {
                let Some(due) = self.timer_due else { return };
                if now < due {
                    return;
                }
                if !masked {
                    self.raise(vector);
                }
                let period = self.period();
                self.timer_due = if mode == TimerMode::Periodic && period != 0 {
                    let late = now - due;
                    Some(now + period - late % period)
                } else {
                    None
                };
            }
        }
    }

    /// Returns IA32_TSC_DEADLINE (0 when disarmed or not in TSC-deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Writes IA32_TSC_DEADLINE (ignored outside TSC-deadline mode, SDM §11.5.4.1).
    pub fn set_tsc_deadline(&mut self, value: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline = value;
        }
    }

    fn current_count(&self, now: u64) -> u32 {
        match (self.timer_mode(), self.timer_due) {
            (TimerMode::TscDeadline, _) | (_, None) => 0,
            (_, Some(due)) => {
                let left = due.saturating_sub(now) / self.divisor();
                left.min(u64::from(self.timer_initial)) as u32
            }
        }
    }

    /// Reads a register by its xAPIC offset (the x2APIC-only and write-only ones read 0).
    pub fn read(&self, offset: u32, now: u64) -> u32 {
        match offset {
            reg::ID => {
                if self.x2apic() {
                    self.id
                } else {
                    self.id << 24
                }
            }
            reg::VERSION => VERSION_VALUE,
            reg::TPR => self.tpr,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o if (reg::ISR0..reg::ISR0 + 0x80).contains(&o) && o % 16 == 0 => self.isr[((o - reg::ISR0) / 16) as usize],
            o if (reg::TMR0..reg::TMR0 + 0x80).contains(&o) && o % 16 == 0 => self.tmr[((o - reg::TMR0) / 16) as usize],
            o if (reg::IRR0..reg::IRR0 + 0x80).contains(&o) && o % 16 == 0 => self.irr[((o - reg::IRR0) / 16) as usize],
            reg::ESR => self.esr,
            reg::LVT_CMCI => self.lvt_cmci,
            reg::ICR_LOW => self.icr as u32,
            reg::ICR_HIGH => (self.icr >> 32) as u32,
            reg::LVT_TIMER => self.lvt_timer,
            reg::LVT_THERMAL => self.lvt_thermal,
            reg::LVT_PERF => self.lvt_perf,
            reg::LVT_LINT0 => self.lvt_lint0,
            reg::LVT_LINT1 => self.lvt_lint1,
            reg::LVT_ERROR => self.lvt_error,
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => 0,
        }
    }

    /// Writes a register by its xAPIC offset (read-only registers ignore the write).
    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> ApicAction {
        let lvt_mask = if self.sw_enabled() { 0 } else { LVT_MASKED };
        match offset {
            reg::ID if !self.x2apic() => self.id = value >> 24,
            reg::TPR => self.tpr = value & 0xFF,
            reg::EOI => self.eoi(),
            reg::LDR if !self.x2apic() => self.ldr = value & 0xFF00_0000,
            reg::DFR if !self.x2apic() => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => {
                self.svr = value & 0x13FF;
                if !self.sw_enabled() {
                    // Software disable masks every LVT (SDM §11.4.7.2).
                    for lvt in [
                        &mut self.lvt_timer,
                        &mut self.lvt_thermal,
                        &mut self.lvt_perf,
                        &mut self.lvt_lint0,
                        &mut self.lvt_lint1,
                        &mut self.lvt_error,
                        &mut self.lvt_cmci,
                    ] {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => self.esr = 0,
            reg::LVT_CMCI => self.lvt_cmci = (value & 0x1_07FF) | lvt_mask,
            reg::ICR_HIGH if !self.x2apic() => self.icr = (self.icr & 0xFFFF_FFFF) | (u64::from(value) << 32),
            reg::ICR_LOW => {
                let dest = if self.x2apic() { self.icr >> 32 } else { (self.icr >> 56) << 32 };
                return self.send_ipi(u64::from(value) | dest);
            }
            reg::LVT_TIMER => {
                let old_mode = self.timer_mode();
                self.lvt_timer = (value & 0x7_00FF) | lvt_mask;
                if self.timer_mode() != old_mode {
                    // A mode change disarms the timer (SDM §11.5.4.1).
                    self.timer_due = None;
                    self.tsc_deadline = 0;
                }
            }
            reg::LVT_THERMAL => self.lvt_thermal = (value & 0x1_07FF) | lvt_mask,
            reg::LVT_PERF => self.lvt_perf = (value & 0x1_07FF) | lvt_mask,
            reg::LVT_LINT0 => self.lvt_lint0 = (value & 0x1_A7FF) | lvt_mask,
            reg::LVT_LINT1 => self.lvt_lint1 = (value & 0x1_A7FF) | lvt_mask,
            reg::LVT_ERROR => self.lvt_error = (value & 0x1_00FF) | lvt_mask,
            reg::TIMER_INITIAL if self.timer_mode() != TimerMode::TscDeadline => {
                self.timer_initial = value;
                self.timer_due = (value != 0).then(|| now + self.period());
            }
            reg::TIMER_DIVIDE => self.timer_divide = value & 0xB,
            reg::SELF_IPI if self.x2apic() => self.raise(value as u8),
            _ => {}
        }
        ApicAction::None
    }

    fn send_ipi(&mut self, icr: u64) -> ApicAction {
        self.icr = icr & !(1 << 12); // delivery status always idle
        let vector = icr as u8;
        let mode = (icr >> 8) & 7;
        let shorthand = (icr >> 18) & 3;
        let dest = (icr >> 32) as u32;
        let to_self = shorthand == 1 || (shorthand == 0 && dest == self.id && (icr >> 11) & 1 == 0);
        match (mode, to_self) {
            (0, true) => {
                self.raise(vector);
                ApicAction::None
            }
            (4, true) => ApicAction::SelfNmi,
            (0, false) if shorthand == 2 => {
                // All including self.
                self.raise(vector);
                ApicAction::Ipi(icr)
            }
            _ => ApicAction::Ipi(icr),
        }
    }

    /// Returns the xAPIC register offsets whose reads APIC-register virtualization serves
    /// from the virtual-APIC page (SDM Vol. 3 §30.4.2.1): the caller keeps those words of
    /// the page equal to [`LocalApic::read`] (the current count, 0x390, is not among
    /// them: its reads exit).
    pub fn page_offsets() -> impl Iterator<Item = u32> {
        [reg::ID, reg::VERSION, reg::TPR, reg::APR, reg::PPR, reg::EOI, reg::LDR, reg::DFR, reg::SVR]
            .into_iter()
            .chain((reg::ISR0..reg::IRR0 + 0x80).step_by(16))
            .chain([reg::ESR, reg::ICR_LOW, reg::ICR_HIGH])
            .chain((reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16))
            .chain([reg::TIMER_INITIAL, reg::TIMER_DIVIDE])
    }

    /// Reads the register at `offset` of the xAPIC page (SDM §11.4.1): only in xAPIC
    /// mode (in x2APIC mode or disabled the page is not the APIC's, §11.12.2), only whole
    /// registers (16-byte aligned).
    pub fn mmio_read(&self, offset: u32, now: u64) -> Result<u32, ApicFault> {
        if self.x2apic() || !self.hw_enabled() || !offset.is_multiple_of(16) || offset >= 0x400 {
            return Err(ApicFault);
        }
        Ok(self.read(offset, now))
    }

    /// Writes the register at `offset` of the xAPIC page (the checks of
    /// [`LocalApic::mmio_read`]; read-only registers ignore the write).
    pub fn mmio_write(&mut self, offset: u32, value: u32, now: u64) -> Result<ApicAction, ApicFault> {
        if self.x2apic() || !self.hw_enabled() || !offset.is_multiple_of(16) || offset >= 0x400 {
            return Err(ApicFault);
        }
        Ok(self.write(offset, value, now))
    }

    /// Reads x2APIC MSR `msr` (SDM §11.12.1.2): #GP outside x2APIC mode, for write-only
    /// and absent registers.
    pub fn read_msr(&self, msr: u32, now: u64) -> Result<u64, ApicFault> {
        if !self.x2apic() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicFault);
        }
        let offset = (msr - X2APIC_MSR_FIRST) << 4;
        match offset {
            reg::EOI | reg::SELF_IPI | reg::DFR | reg::ICR_HIGH | reg::APR | reg::RRD => Err(ApicFault),
            reg::ICR_LOW => Ok(self.icr),
            o if Self::exists(o) => Ok(u64::from(self.read(o, now))),
            _ => Err(ApicFault),
        }
    }

    fn exists(offset: u32) -> bool {
        matches!(
            offset,
            reg::ID
                | reg::VERSION
                | reg::TPR
                | reg::PPR
                | reg::EOI
                | reg::LDR
                | reg::SVR
                | reg::ESR
                | reg::LVT_CMCI
                | reg::ICR_LOW
                | reg::LVT_TIMER
                | reg::LVT_THERMAL
                | reg::LVT_PERF
                | reg::LVT_LINT0
                | reg::LVT_LINT1
                | reg::LVT_ERROR
                | reg::TIMER_INITIAL
                | reg::TIMER_CURRENT
                | reg::TIMER_DIVIDE
                | reg::SELF_IPI
        ) || (reg::ISR0..reg::IRR0 + 0x80).contains(&offset)
    }

    /// Writes x2APIC MSR `msr`: #GP outside x2APIC mode, for read-only and absent
    /// registers, for a non-zero EOI and reserved bits in the high half (SDM §11.12.1.2).
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<ApicAction, ApicFault> {
        if !self.x2apic() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicFault);
        }
        let offset = (msr - X2APIC_MSR_FIRST) << 4;
        match offset {
            reg::ICR_LOW => {
                return Ok(self.send_ipi(value));
            }
            reg::EOI if value != 0 => return Err(ApicFault),
            reg::TPR
            | reg::EOI
            | reg::SVR
            | reg::ESR
            | reg::LVT_CMCI
            | reg::LVT_TIMER
            | reg::LVT_THERMAL
            | reg::LVT_PERF
            | reg::LVT_LINT0
            | reg::LVT_LINT1
            | reg::LVT_ERROR
            | reg::TIMER_INITIAL
            | reg::TIMER_DIVIDE
            | reg::SELF_IPI => {}
            _ => return Err(ApicFault),
        }
        if value >> 32 != 0 {
            return Err(ApicFault);
        }
        Ok(self.write(offset, value as u32, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x2apic() -> LocalApic {
        let mut a = LocalApic::new(0, true);
        a.write_apic_base(DEFAULT_BASE | BASE_BSP | BASE_ENABLE | BASE_EXTD).unwrap();
        a
    }

    #[test]
    fn xapic_page_after_switching_from_x2apic() {
        let mut a = x2apic();
        // x2APIC mode: the page is not the APIC's.
        assert_eq!(a.mmio_read(reg::VERSION, 0), Err(ApicFault));
        assert_eq!(a.mmio_write(reg::EOI, 0, 0), Err(ApicFault));
        // x2APIC -> xAPIC directly is refused; through disabled it is allowed (SDM fig. 11-27).
        assert_eq!(a.write_apic_base(DEFAULT_BASE | BASE_BSP | BASE_ENABLE), Err(ApicFault));
        a.write_apic_base(DEFAULT_BASE | BASE_BSP).unwrap();
        assert_eq!(a.mmio_read(reg::VERSION, 0), Err(ApicFault), "disabled");
        a.write_apic_base(DEFAULT_BASE | BASE_BSP | BASE_ENABLE).unwrap();
        assert_eq!(a.mmio_read(reg::VERSION, 0), Ok(VERSION_VALUE));
        assert_eq!(a.mmio_read(reg::ID, 0), Ok(0));
        assert_eq!(a.mmio_read(reg::SVR, 0), Ok(0xFF), "software-disabled after the reset");
        assert_eq!(a.mmio_read(reg::VERSION + 4, 0), Err(ApicFault), "misaligned");
        // What a simple kernel does: enable, periodic timer on 0x40, take it, EOI by MMIO.
        a.mmio_write(reg::SVR, 0x1FF, 0).unwrap();
        a.mmio_write(reg::TIMER_DIVIDE, 0xB, 0).unwrap();
        a.mmio_write(reg::LVT_TIMER, 0x2_0040, 0).unwrap();
        a.mmio_write(reg::TIMER_INITIAL, 1000, 0).unwrap();
        assert_eq!(a.next_timer_deadline(), Some(1000));
        assert_eq!(a.mmio_read(reg::TIMER_CURRENT, 400), Ok(600));
        a.tick(1000);
        assert_eq!(a.deliverable(), Some(0x40));
        a.accept(0x40);
        assert_eq!(a.mmio_read(reg::ISR0 + 0x20, 1000), Ok(1));
        a.mmio_write(reg::EOI, 0, 1001).unwrap();
        assert_eq!(a.mmio_read(reg::ISR0 + 0x20, 1001), Ok(0));
        // xAPIC -> x2APIC by setting EXTD.
        a.write_apic_base(DEFAULT_BASE | BASE_BSP | BASE_ENABLE | BASE_EXTD).unwrap();
        assert!(a.x2apic());
        assert_eq!(a.mmio_read(reg::VERSION, 0), Err(ApicFault));
    }

    #[test]
    fn blocked_class_names_what_the_tpr_holds_back() {
        let mut a = x2apic();
        assert_eq!(a.blocked_class(), None);
        a.write(reg::TPR, 0x50, 0);
        a.raise(0x41);
        assert_eq!(a.deliverable(), None);
        assert_eq!(a.blocked_class(), Some(4));
        a.write(reg::TPR, 0x30, 0);
        assert_eq!(a.blocked_class(), None);
        assert_eq!(a.deliverable(), Some(0x41));
    }

    #[test]
    fn page_offsets_are_the_virtualized_reads() {
        let offsets: Vec<u32> = LocalApic::page_offsets().collect();
        assert_eq!(offsets.len(), 9 + 24 + 3 + 6 + 2);
        assert!(offsets.contains(&reg::IRR0) && offsets.contains(&(reg::IRR0 + 0x70)));
        assert!(!offsets.contains(&reg::TIMER_CURRENT));
        assert!(offsets.iter().all(|o| o % 16 == 0 && *o < 0x400));
    }

    #[test]
    fn firmware_state_is_virtual_wire() {
        let a = LocalApic::new(0, true);
        assert_eq!(a.apic_base(), 0xFEE0_0900);
        assert!(a.extint_open());
        assert_eq!(a.read(reg::VERSION, 0), 0x50014);
        assert_eq!(a.read(reg::LVT_LINT0, 0), 0x700);
    }

    #[test]
    fn apic_base_transitions() {
        let mut a = LocalApic::new(3, false);
        assert_eq!(a.write_apic_base(DEFAULT_BASE | BASE_EXTD), Err(ApicFault), "EXTD without EN");
        assert_eq!(a.write_apic_base(DEFAULT_BASE | BASE_ENABLE | 1), Err(ApicFault), "reserved bit");
        assert_eq!(a.write_apic_base(0xFEB0_0000 | BASE_ENABLE), Err(ApicFault), "moved base");
        a.write_apic_base(DEFAULT_BASE | BASE_ENABLE | BASE_EXTD).unwrap();
        assert!(a.x2apic());
        assert_eq!(a.read_msr(0x802, 0), Ok(3));
        assert_eq!(a.read_msr(0x80D, 0), Ok(1 << 3), "LDR derived: cluster 0, bit 3");
        assert_eq!(a.write_apic_base(DEFAULT_BASE | BASE_ENABLE), Err(ApicFault), "x2APIC -> xAPIC");
        a.write_apic_base(DEFAULT_BASE).unwrap();
        assert!(!a.x2apic());
        assert_eq!(a.read_msr(0x802, 0), Err(ApicFault));
    }

    #[test]
    fn x2apic_msr_rules() {
        let mut a = x2apic();
        assert_eq!(a.read_msr(0x80B, 0), Err(ApicFault), "EOI is write-only");
        assert_eq!(a.write_msr(0x80B, 1, 0), Err(ApicFault), "non-zero EOI");
        assert_eq!(a.write_msr(0x803, 0, 0), Err(ApicFault), "version is read-only");
        assert_eq!(a.write_msr(0x80E, 0, 0), Err(ApicFault), "no DFR in x2APIC");
        assert_eq!(a.read_msr(0x8FF, 0), Err(ApicFault));
        assert_eq!(a.write_msr(0x808, 1 << 40, 0), Err(ApicFault), "reserved high bits");
        assert!(a.write_msr(0x808, 0x20, 0).is_ok());
        assert_eq!(a.read_msr(0x808, 0), Ok(0x20));
        let a2 = LocalApic::new(0, true);
        assert_eq!(a2.read_msr(0x802, 0), Err(ApicFault), "xAPIC mode");
    }

    #[test]
    fn priority_and_eoi() {
        let mut a = x2apic();
        a.raise(0x31);
        a.raise(0x52);
        assert_eq!(a.deliverable(), Some(0x52));
        a.accept(0x52);
        assert_eq!(a.ppr(), 0x50);
        assert_eq!(a.deliverable(), None, "0x31 is below the in-service class");
        a.raise(0x61);
        assert_eq!(a.deliverable(), Some(0x61), "a higher class nests");
        a.accept(0x61);
        a.write_msr(0x80B, 0, 0).unwrap();
        assert_eq!(a.ppr(), 0x50, "EOI retires the highest in-service vector first");
        a.write_msr(0x80B, 0, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0x31));
        a.write_msr(0x808, 0x40, 0).unwrap();
        assert_eq!(a.deliverable(), None, "TPR class 4 blocks class 3");
        a.write_msr(0x808, 0x20, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0x31));
        a.raise(3);
        assert_ne!(a.read_msr(0x828, 0).unwrap() & (1 << 6), 0, "illegal vector in ESR");
    }

    #[test]
    fn sw_disabled_apic_delivers_nothing_and_masks_lvts() {
        let mut a = x2apic();
        a.raise(0x40);
        a.write_msr(0x80F, 0xFF, 0).unwrap();
        assert_eq!(a.deliverable(), None);
        a.write_msr(0x832, 0x20, 0).unwrap();
        assert_ne!(a.read_msr(0x832, 0).unwrap() & LVT_MASKED as u64, 0);
        assert!(!a.extint_open());
    }

    #[test]
    fn one_shot_timer_with_divider() {
        let mut a = x2apic();
        a.write_msr(0x83E, 0b0001, 0).unwrap(); // divide by 4
        a.write_msr(0x832, 0xEC, 0).unwrap();
        a.write_msr(0x838, 100, 1000).unwrap();
        assert_eq!(a.next_timer_deadline(), Some(1400));
        assert_eq!(a.read_msr(0x839, 1200), Ok(50));
        a.tick(1399);
        assert_eq!(a.deliverable(), None);
        a.tick(1400);
        assert_eq!(a.deliverable(), Some(0xEC));
        assert_eq!(a.next_timer_deadline(), None);
        assert_eq!(a.read_msr(0x839, 1500), Ok(0));
    }

    #[test]
    fn periodic_timer_rearms_after_now() {
        let mut a = x2apic();
        a.write_msr(0x83E, 0b1011, 0).unwrap(); // divide by 1
        a.write_msr(0x832, (1 << 17) | 0xEC, 0).unwrap();
        a.write_msr(0x838, 1000, 0).unwrap();
        a.tick(1000);
        assert_eq!(a.next_timer_deadline(), Some(2000));
        a.tick(4500); // late by 2.5 periods: one interrupt, next due on the grid
        assert_eq!(a.next_timer_deadline(), Some(5000));
        a.write_msr(0x838, 0, 4600).unwrap();
        assert_eq!(a.next_timer_deadline(), None, "count 0 stops the timer");
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut a = x2apic();
        a.set_tsc_deadline(500);
        assert_eq!(a.tsc_deadline(), 0, "ignored outside deadline mode");
        a.write_msr(0x832, (2 << 17) | 0xEF, 0).unwrap();
        a.set_tsc_deadline(500);
        assert_eq!(a.next_timer_deadline(), Some(500));
        a.write_msr(0x838, 77, 0).unwrap();
        assert_eq!(a.read_msr(0x838, 0), Ok(0), "initial count ignored in deadline mode");
        a.tick(499);
        assert_eq!(a.deliverable(), None);
        a.tick(600);
        assert_eq!(a.deliverable(), Some(0xEF));
        assert_eq!(a.tsc_deadline(), 0, "disarmed after firing");
        a.set_tsc_deadline(700);
        a.write_msr(0x832, 0xEF, 0).unwrap();
        assert_eq!(a.next_timer_deadline(), None, "mode change disarms");
    }

    #[test]
    fn masked_timer_fires_silently() {
        let mut a = x2apic();
        a.write_msr(0x832, LVT_MASKED as u64 | 0xEC, 0).unwrap();
        a.write_msr(0x838, 10, 0).unwrap();
        assert_eq!(a.next_timer_deadline(), None);
        a.tick(1000);
        assert_eq!(a.deliverable(), None);
    }

    #[test]
    fn self_ipi_and_icr() {
        let mut a = x2apic();
        a.write_msr(0x83F, 0x45, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0x45));
        a.accept(0x45);
        a.write_msr(0x80B, 0, 0).unwrap();
        // ICR to self (destination 0 = our id), fixed.
        assert_eq!(a.write_msr(0x830, 0x46, 0), Ok(ApicAction::None));
        assert_eq!(a.deliverable(), Some(0x46));
        // INIT to CPU 1 goes out.
        assert_eq!(a.write_msr(0x830, (1 << 32) | 0x500, 0), Ok(ApicAction::Ipi((1 << 32) | 0x500)));
        assert_eq!(a.write_msr(0x830, (1 << 18) | 0x400, 0), Ok(ApicAction::SelfNmi));
    }

    #[test]
    fn xapic_register_file() {
        let mut a = LocalApic::new(0, true);
        assert_eq!(a.read(reg::ID, 0), 0);
        a.write(reg::TPR, 0x1F0, 0);
        assert_eq!(a.read(reg::TPR, 0), 0xF0);
        a.write(reg::TPR, 0, 0);
        a.write(reg::ICR_HIGH, 0, 0);
        a.write(reg::ICR_LOW, 0x4030, 0);
        assert_eq!(a.deliverable(), Some(0x30));
        a.write(reg::DFR, 0, 0);
        assert_eq!(a.read(reg::DFR, 0), 0x0FFF_FFFF);
        a.write(reg::LVT_TIMER, 0xEC, 0);
        a.write(reg::TIMER_DIVIDE, 0xB, 0);
        a.write(reg::TIMER_INITIAL, 10, 5);
        assert_eq!(a.read(reg::TIMER_CURRENT, 8), 7);
    }
}
