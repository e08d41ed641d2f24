//! Bare-metal VMs with several vCPUs (a module's `vcpus=<n>`, docs/multi-vcpu.md).
//!
//! Every vCPU of a VM stays on the VM's CPU: the VM's capabilities live in that CPU's
//! kernel instance (nk-core's `NullKernel`, one per CPU), and the null-Kernel's dispatch,
//! the lwC AM's current-principal rule and the distributed protocol all assume that a
//! principal's calls arrive at the instance that owns it. Keeping the vCPUs there means
//! none of that changes: they share the VM's memory (one EPT, and the lwC views), its
//! capabilities and its quotas, and each has its own VMCS, registers, XSAVE area, the
//! registers VMX does not switch, and the lwC it runs (its principal).
//!
//! The scheduler gives each vCPU slices of its own, round-robin with the CPU's other guests:
//! [`Guest::run_slice`] runs the vCPU whose state is in the guest's per-vCPU fields (the
//! *active* one), and after its slice this module swaps the next vCPU's state in
//! (`core::mem::swap` of a few fields, no copy of guest memory); [`Guest::takes_next_turn`]
//! tells the scheduler whether that next vCPU runs at once (the same round) or after the
//! CPU's other guests. A VM with one vCPU has no [`Siblings`] and pays one `is_some` test
//! per slice; its hypercall path is untouched.
//!
//! A vCPU that halts is done; the VM ends when all have halted. One that is stopped (a
//! fault, an access it was not given) stops the VM, with a line that names the vCPU. A
//! vCPU whose hypercall waits for other kernels (parked) holds the VM: its siblings run
//! again once the reply is in. lwC effects a vCPU's hypercall left waiting are applied
//! before the next vCPU is swapped in, so they always reach the vCPU that caused them; a
//! child lwC destroyed (revoked) while a sibling that is not active runs it sends that
//! sibling back to where the lwC AM says, as for the active one.
//!
//! Spreading a VM's vCPUs over several CPUs would need: the VM's principal (and each of
//! its lwCs) to be callable from several kernel instances (a hypercall forwarded to the
//! owning instance over the protocol's rings, or capability state replicated), the lwC
//! effects routed to the CPU of the vCPU that caused them, an EPT shootdown to every CPU
//! that runs the VM on each copy-on-write fault and view change (today one INVEPT on the
//! one CPU), and per-CPU VMCS ownership for each vCPU.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use nk_abi::Reply;
use nk_caps::VmId;

use super::{Guest, GuestEnd, GuestError, HypercallSink, Slice};
use crate::arch::switched::UnswitchedRegs;
use crate::arch::xsave::{self, ExtendedState};
use crate::vmx::vcpu::{GuestRegs, GuestStart, Vcpu};

/// The per-vCPU state of a vCPU that is not the active one.
struct Sibling {
    index: u8,
    vcpu: Vcpu,
    principal: VmId,
    xstate: Option<ExtendedState>,
    unswitched: UnswitchedRegs,
    reply: Option<Reply>,
    sandboxed: bool,
    halted: bool,
}

/// A VM's vCPUs other than the active one, and which is active.
pub(super) struct Siblings {
    /// The index of the vCPU whose state is in the guest's fields.
    active: u8,
    /// The others, in no particular order.
    others: Vec<Sibling>,
    /// The vCPU swapped in after the last slice runs in the same round.
    again: bool,
}

/// Returns the index of the active vCPU (0 for a VM with one).
pub(super) fn active_index(siblings: &Option<Box<Siblings>>) -> u8 {
    siblings.as_ref().map_or(0, |s| s.active)
}

/// Returns where in `saved` the register file of lwC `principal` is for the active vCPU
/// of a VM whose other vCPUs are `siblings`: a root lwC (a VM's own principal) keeps one
/// per vCPU, a child one for all. A VM with one vCPU searches as before (the lwSwitch path).
#[inline(always)]
pub(super) fn saved_slot(
    saved: &[crate::lwc::Saved],
    principal: u32,
    siblings: &Option<Box<Siblings>>,
) -> Option<usize> {
    match siblings {
        None => saved.iter().position(|l| l.principal == principal),
        Some(s) => saved_slot_of(saved, principal, s.active),
    }
}

/// Returns where in `saved` the register file of lwC `principal` is for vCPU `vcpu`.
#[cold]
fn saved_slot_of(saved: &[crate::lwc::Saved], principal: u32, vcpu: u8) -> Option<usize> {
    let child = principal >= nk_am_lwc::FIRST_CHILD;
    saved.iter().position(|l| l.principal == principal && (child || l.vcpu == vcpu))
}

/// Returns where vCPU `vcpu`, whose lwC was destroyed, goes back to and where that lwC's
/// register file is in `saved`: `resume` (the destroyed lwC's creator, as the lwC AM names
/// it) when its file is there, else the VM's `root` lwC (a creator another vCPU runs now
/// has its file live on that vCPU, so it cannot take this one).
#[cold]
pub(super) fn resume_slot(saved: &[crate::lwc::Saved], resume: VmId, root: VmId, vcpu: u8) -> Option<(VmId, usize)> {
    [resume, root].into_iter().find_map(|to| saved_slot_of(saved, to.raw(), vcpu).map(|slot| (to, slot)))
}

impl Siblings {
    /// Makes vCPUs 1 to `count - 1` of VM `vm` on this CPU, each starting where `start`
    /// and `regs` say with its own stack (nk-abi `vcpu`: RSP `i * STACK_BYTES` lower, above
    /// `image_end`) and R8 = its index, in the VM's root lwC. Nothing is left allocated on
    /// failure.
    pub(super) fn create(
        vm: VmId,
        start: &GuestStart,
        regs: &GuestRegs,
        count: u8,
        image_end: u64,
    ) -> Result<Box<Self>, GuestError> {
        let caps = crate::vmx::capabilities();
        let mut others = Vec::new();
        for index in 1..count {
            let rsp = nk_cpustate::vcpus::stack_top(start.rsp, index, nk_abi::vcpu::STACK_BYTES, image_end)
                .ok_or(GuestError::Memory("no room for the vCPUs' stacks above the image (give more mem=)"))?;
            let mut vcpu = Vcpu::new(&caps, &GuestStart { rsp, ..*start }).map_err(GuestError::Vcpu)?;
            vcpu.regs = GuestRegs { r8: u64::from(index), ..*regs };
            let xstate = match xsave::supported() {
                true => Some(ExtendedState::new().ok_or(GuestError::Memory("no memory for a vCPU's XSAVE area"))?),
                false => None,
            };
            others.push(Sibling {
                index,
                vcpu,
                principal: vm,
                xstate,
                unswitched: UnswitchedRegs::default(),
                reply: None,
                sandboxed: false,
                halted: false,
            });
        }
        Ok(Box::new(Siblings { active: 0, others, again: false }))
    }
}

impl Guest {
    /// Tells the scheduler whether the vCPU swapped in after the last slice runs now, in
    /// the same round (false: the CPU's next guest runs first).
    pub fn takes_next_turn(&mut self) -> bool {
        self.siblings.as_mut().is_some_and(|s| core::mem::take(&mut s.again))
    }

    /// Ends a slice of a VM with several vCPUs: applies lwC effects the active vCPU left
    /// waiting, then swaps the next runnable vCPU in. A halted vCPU is done (the VM ends
    /// with the last); a stopped one stops the VM, named in the line.
    #[cold]
    #[inline(never)]
    pub(super) fn after_sibling_slice(&mut self, slice: Slice, sink: &mut impl HypercallSink) -> Slice {
        let index = active_index(&self.siblings);
        let halted = match slice {
            Slice::Parked(op) => return Slice::Parked(op),
            Slice::Ended(GuestEnd::Stopped(why)) => {
                return Slice::Ended(GuestEnd::Stopped(alloc::format!("vCPU {index}: {why}")));
            }
            Slice::Ended(end) => {
                let runnable = self.siblings.as_ref().map_or(0, |s| s.others.iter().filter(|o| !o.halted).count());
                if runnable == 0 {
                    return Slice::Ended(end);
                }
                log::info!(target: "guest", "{}: vCPU {index} halted; {runnable} vCPU(s) run on", self.label);
                true
            }
            Slice::Expired => false,
        };
        // Effects still waiting for the active vCPU (its hypercall parked, or a destruction
        // decided on another CPU) are its own: apply them while its VMCS is still current.
        if crate::lwc::pending() {
            if let Some(end) = self.lwc_exit(sink) {
                return end;
            }
        }
        self.swap_next(halted);
        Slice::Expired
    }

    /// Makes the next runnable vCPU the active one (the active one stays if none other
    /// runs); `halted`: the active one is done.
    fn swap_next(&mut self, halted: bool) {
        let Some(siblings) = self.siblings.as_mut() else { return };
        let runnable = siblings.others.iter().filter(|o| !o.halted).map(|o| o.index);
        let Some((next, same_round)) = nk_cpustate::vcpus::next_vcpu(siblings.active, runnable) else { return };
        let Some(slot) = siblings.others.iter().position(|o| o.index == next) else { return };
        let mut incoming = siblings.others.swap_remove(slot);
        let Some(vcpu) = self.vcpu.take() else { return };
        let outgoing_vcpu = core::mem::replace(&mut incoming.vcpu, vcpu);
        self.vcpu = Some(outgoing_vcpu);
        // `incoming` now holds the outgoing vCPU's VMCS; the rest of its state follows.
        let mut outgoing = incoming;
        core::mem::swap(&mut self.principal, &mut outgoing.principal);
        core::mem::swap(&mut self.xstate, &mut outgoing.xstate);
        core::mem::swap(&mut self.unswitched, &mut outgoing.unswitched);
        core::mem::swap(&mut self.reply, &mut outgoing.reply);
        core::mem::swap(&mut self.sandbox.current, &mut outgoing.sandboxed);
        outgoing.halted = halted;
        outgoing.index = siblings.active;
        siblings.active = next;
        siblings.again = same_round;
        siblings.others.push(outgoing);
    }

    /// Sends the sibling (not active) vCPU that runs lwC `child`, just destroyed, back to
    /// `resume`'s saved registers with `REVOKED`, as `apply_lwc` does for the active one;
    /// its VMCS is made current for that and the active one's again after.
    #[cold]
    pub(super) fn resume_sibling(&mut self, child: VmId, resume: Option<VmId>) -> Result<(), String> {
        let fail = |e: crate::vmx::vcpu::VcpuError| alloc::format!("{e}");
        let Some(siblings) = self.siblings.as_mut() else { return Ok(()) };
        let Some(sibling) = siblings.others.iter_mut().find(|o| o.principal == child && !o.halted) else {
            return Ok(());
        };
        let Some(to) = resume else { return Ok(()) };
        let Some((to, slot)) = resume_slot(&self.lwcs, to, self.vm, sibling.index) else { return Ok(()) };
        let sandboxed = self.sandbox.am_of(to.raw()).is_some();
        let target = self.lwcs.swap_remove(slot);
        let eptp = match self.views.as_ref().and_then(|v| v.eptp_of(to.raw())) {
            Some(eptp) => Some(eptp),
            None => crate::exomem::eptp(self.vm),
        };
        sibling.vcpu.activate().map_err(fail)?;
        sibling.vcpu.regs = target.regs;
        let reply = Reply {
            status: nk_abi::Status::new(nk_abi::Status::REVOKED, None).0,
            results: [u64::from(child.raw()), 0, 0, 0],
            ..Reply::default()
        };
        super::write_reply(&mut sibling.vcpu.regs, &reply);
        let loaded = sibling
            .vcpu
            .set_flow_registers(target.flow)
            .and_then(|()| eptp.map_or(Ok(()), |eptp| sibling.vcpu.set_eptp(eptp)));
        sibling.principal = to;
        sibling.sandboxed = sandboxed;
        log::info!(target: "lwc", "{}: lwC {:#x} that vCPU {} ran destroyed; back in lwC {:#x}",
            self.label, child.raw(), sibling.index, to.raw());
        if let Some(vcpu) = self.vcpu.as_ref() {
            vcpu.activate().map_err(fail)?;
        }
        loaded.map_err(fail)
    }
}
