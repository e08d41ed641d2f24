//! The hypervisor's side of light-weight contexts (am/lwc, docs/lwc.md): each vCPU runs
//! one lwC at a time, whose principal every hypercall is checked against; the lwC AM's
//! effects save and load register files and switch that principal.
//!
//! The AM's effects are applied while the caller's hypercall is dispatched, where the
//! vCPU is out of reach: they wait here, tagged with the CPU, and the caller's VMCS (the
//! current one) gets a zero VMX-preemption timer, so the entry after the hypercall exits
//! before any guest instruction runs (SDM Vol. 3 §26.7.4) and the slice loop's timer
//! branch applies them. The hypercall path itself pays nothing for lwCs.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use nk_am::Effect;
use spin::Mutex;

use crate::percpu;
use crate::vmx::vcpu::GuestRegs;

/// Some CPU has lwC effects to take.
static PENDING: AtomicBool = AtomicBool::new(false);
/// (CPU, effect), in the order the AM emitted them.
static REQUESTS: Mutex<Vec<(u32, Effect)>> = Mutex::new(Vec::new());

/// An lwC's saved register file: the general registers and RIP, RSP, RFLAGS.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    pub principal: u32,
    pub regs: GuestRegs,
    pub flow: [u64; 3],
}

/// Records an lwC effect for the calling CPU's vCPU (a destroy needs nothing here: the
/// saved registers of a dead lwC are dropped at the owning guest's next create or end).
pub fn apply(effect: Effect) {
    if let Effect::LwcDestroy { child } = effect {
        log::debug!(target: "lwc", "lwC principal {:#x} destroyed", child.raw());
        return;
    }
    REQUESTS.lock().push((percpu::current_index(), effect));
    PENDING.store(true, Ordering::Release);
    crate::vmx::vcpu::expire_current_slice();
}

/// Tells whether lwC effects wait (one atomic load).
pub fn pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}

/// Takes the lwC effects of this CPU, in order.
pub fn take() -> Vec<Effect> {
    let cpu = percpu::current_index();
    let mut requests = REQUESTS.lock();
    let mine = requests.iter().filter(|(c, _)| *c == cpu).map(|&(_, e)| e).collect();
    requests.retain(|(c, _)| *c != cpu);
    PENDING.store(!requests.is_empty(), Ordering::Release);
    mine
}
