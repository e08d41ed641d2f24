//! How the vCPUs of an SMP guest OS start: the INIT and Start-Up IPIs one vCPU's local
//! APIC sends (its ICR, `lapic::ApicAction::Ipi`), decoded into what each other vCPU must
//! do, and each vCPU's start-up state (SDM Vol. 3 §9.4, "Multiple-Processor (MP)
//! Initialization"; §11.6.1, the ICR's delivery modes; §11.6.2, destinations).
//!
//! An application processor (AP) comes out of the firmware waiting for a SIPI. Linux
//! wakes it as the MP specification says (`wakeup_secondary_cpu_via_init`): an INIT (level
//! assert), an INIT level de-assert (which modern processors ignore), then two Start-Up
//! IPIs whose vector is the page of its real-mode trampoline. The first SIPI starts the
//! AP in real mode at `vector << 12` (CS selector `vector << 8`, base `vector << 12`, IP
//! 0); a SIPI to a vCPU that is not waiting for one is ignored, so the second is harmless.
//! An INIT to a running vCPU puts it back to waiting (the hypervisor resets its registers).
//!
//! This is the first step toward SMP Linux (issue 11's stretch goal): the hypervisor does
//! not run a VM with two vCPUs yet.

/// An IPI's delivery mode (ICR bits 10:8), as far as start-up is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Fixed or lowest-priority: an interrupt with this vector.
    Interrupt(u8),
    Nmi,
    /// INIT with level assert (or edge): resets the target to wait for a SIPI.
    Init,
    /// INIT level de-assert (level 0, trigger mode level): ignored (SDM §11.6.1).
    InitDeassert,
    /// Start-Up with this vector (the start page).
    StartUp(u8),
    /// SMI or a reserved mode: not delivered.
    Unsupported,
}

/// Decodes the delivery of an ICR value (SDM Vol. 3 figure 11-12).
pub fn delivery(icr: u64) -> Delivery {
    let vector = icr as u8;
    let level_assert = icr & (1 << 14) != 0;
    let trigger_level = icr & (1 << 15) != 0;
    match (icr >> 8) & 7 {
        0 | 1 => Delivery::Interrupt(vector),
        4 => Delivery::Nmi,
        5 if trigger_level && !level_assert => Delivery::InitDeassert,
        5 => Delivery::Init,
        6 => Delivery::StartUp(vector),
        _ => Delivery::Unsupported,
    }
}

/// Returns the vCPUs (bit i: APIC id i, for `vcpus` vCPUs with ids 0..vcpus) an ICR value
/// from vCPU `from` goes to: its destination shorthand (self, all, all but self) or its
/// physical destination (bits 63:32 in x2APIC form; 0xFFFF_FFFF broadcasts). Logical
/// destinations go nowhere (Linux uses physical mode for INIT and SIPI).
pub fn targets(icr: u64, from: u32, vcpus: u32) -> u64 {
    let all = if vcpus >= 64 { u64::MAX } else { (1u64 << vcpus) - 1 };
    let me = if from < 64 { 1u64 << from } else { 0 };
    match (icr >> 18) & 3 {
        1 => me & all,
        2 => all,
        3 => all & !me,
        _ => {
            let logical = icr & (1 << 11) != 0;
            let dest = (icr >> 32) as u32;
            match (logical, dest) {
                (true, _) => 0,
                (false, 0xFFFF_FFFF) => all,
                (false, d) if d < vcpus && d < 64 => 1 << d,
                _ => 0,
            }
        }
    }
}

/// Where a vCPU started by a SIPI begins, in real mode (SDM Vol. 3 §9.4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealModeStart {
    pub cs_selector: u16,
    pub cs_base: u32,
    pub ip: u16,
}

/// One vCPU's start-up state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupState {
    /// Runs (the bootstrap processor from power-on, an AP once a SIPI started it).
    Running,
    /// Waits for a Start-Up IPI and runs nothing until one comes.
    WaitForSipi,
}

/// What an IPI does to its target vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing (ignored).
    None,
    /// Stop running and wait for a SIPI: the hypervisor resets the vCPU's state.
    Reset,
    /// Start in real mode here.
    Start(RealModeStart),
    /// Deliver this interrupt vector, or an NMI (`None`), to the running vCPU.
    Interrupt(Option<u8>),
}

/// The start-up state machine of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Startup {
    state: StartupState,
}

impl Startup {
    /// The bootstrap processor: running from power-on.
    pub fn bsp() -> Self {
        Self { state: StartupState::Running }
    }

    /// An application processor: the firmware leaves it waiting for a SIPI.
    pub fn ap() -> Self {
        Self { state: StartupState::WaitForSipi }
    }

    /// Returns the vCPU's state.
    pub fn state(&self) -> StartupState {
        self.state
    }

    /// Takes an IPI of `delivery` and says what it does to this vCPU.
    pub fn receive(&mut self, delivery: Delivery) -> Effect {
        match (delivery, self.state) {
            (Delivery::Init, _) => {
                self.state = StartupState::WaitForSipi;
                Effect::Reset
            }
            (Delivery::StartUp(vector), StartupState::WaitForSipi) => {
                self.state = StartupState::Running;
                Effect::Start(RealModeStart {
                    cs_selector: u16::from(vector) << 8,
                    cs_base: u32::from(vector) << 12,
                    ip: 0,
                })
            }
            // A vCPU waiting for a SIPI takes no interrupt and no NMI (SDM §9.4.4).
            (Delivery::Interrupt(vector), StartupState::Running) => Effect::Interrupt(Some(vector)),
            (Delivery::Nmi, StartupState::Running) => Effect::Interrupt(None),
            _ => Effect::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `wakeup_secondary_cpu_via_init` in x2APIC mode: ICR values as it writes
    /// them to MSR 0x830 for APIC id 1 and a trampoline at 0x9A000.
    const INIT_ASSERT: u64 = (1 << 32) | (1 << 15) | (1 << 14) | (5 << 8);
    const INIT_DEASSERT: u64 = (1 << 32) | (1 << 15) | (5 << 8);
    const STARTUP: u64 = (1 << 32) | (6 << 8) | 0x9A;

    #[test]
    fn linux_wakes_an_ap_with_init_init_deassert_and_two_sipis() {
        let mut ap = Startup::ap();
        assert_eq!(targets(INIT_ASSERT, 0, 2), 0b10);
        assert_eq!(ap.receive(delivery(INIT_ASSERT)), Effect::Reset);
        assert_eq!(delivery(INIT_DEASSERT), Delivery::InitDeassert);
        assert_eq!(ap.receive(delivery(INIT_DEASSERT)), Effect::None);
        let start = RealModeStart { cs_selector: 0x9A00, cs_base: 0x9_A000, ip: 0 };
        assert_eq!(ap.receive(delivery(STARTUP)), Effect::Start(start));
        assert_eq!(ap.state(), StartupState::Running);
        assert_eq!(ap.receive(delivery(STARTUP)), Effect::None, "the second SIPI is ignored");
    }

    #[test]
    fn a_waiting_vcpu_takes_no_interrupts_and_init_resets_a_running_one() {
        let mut ap = Startup::ap();
        assert_eq!(ap.receive(delivery((1 << 32) | 0xEC)), Effect::None);
        assert_eq!(ap.receive(delivery((1 << 32) | (4 << 8))), Effect::None);
        let mut bsp = Startup::bsp();
        assert_eq!(bsp.receive(delivery(0xEC)), Effect::Interrupt(Some(0xEC)));
        assert_eq!(bsp.receive(delivery(4 << 8)), Effect::Interrupt(None));
        assert_eq!(bsp.receive(delivery(INIT_ASSERT)), Effect::Reset);
        assert_eq!(bsp.state(), StartupState::WaitForSipi);
        assert_eq!(bsp.receive(delivery(2 << 8)), Effect::None, "SMI is not delivered");
    }

    #[test]
    fn destinations_follow_the_shorthand_or_the_physical_id() {
        assert_eq!(targets(1 << 18, 1, 2), 0b10, "self");
        assert_eq!(targets(2 << 18, 1, 2), 0b11, "all including self");
        assert_eq!(targets(3 << 18, 1, 4), 0b1101, "all excluding self");
        assert_eq!(targets(0xFFFF_FFFF << 32, 0, 2), 0b11, "broadcast");
        assert_eq!(targets(5 << 32, 0, 2), 0, "no such vCPU");
        assert_eq!(targets((1 << 32) | (1 << 11), 0, 2), 0, "logical destinations are not modelled");
    }
}
