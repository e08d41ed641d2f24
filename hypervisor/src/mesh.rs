//! The null-Kernel's instances, one per CPU, and the transport of the distributed
//! capability protocol between them (DESIGN.md §3): a single-producer single-consumer ring
//! of encoded messages for every ordered pair of CPUs, a doorbell IPI, and a receive path
//! each CPU runs between guest slices, on doorbell exits and while idle.
//!
//! A CPU's instance is only ever used by that CPU once guests run (the BSP registers every
//! VM on every instance before), so its lock is uncontended. A message is sent after the
//! effects of the step that produced it are applied: when a `Gone` leaves, what the dead
//! capabilities enabled is already undone.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nk_abi::Call;
use nk_caps::{KernelId, VmId};
use nk_core::{CallFrame, Dispatched, Finished, Message, NullKernel, PendingOp};
use nk_protocol::MESSAGE_WORDS;
use nk_ring::Ring;
use spin::{Mutex, Once};

use crate::arch::{self, apic};

/// Slots of each per-pair ring; a sender whose ring is full queues the rest in order.
pub const RING_SLOTS: usize = 64;

type Channel = Ring<RING_SLOTS, MESSAGE_WORDS>;
type Words = [u64; MESSAGE_WORDS];

/// One CPU's kernel instance and its side of the transport.
pub struct Instance {
    pub kernel: Mutex<NullKernel>,
    /// Messages that found their ring full, per destination, in sending order.
    overflow: Mutex<Vec<VecDeque<Words>>>,
    /// Some destination's overflow queue is not empty (a receiver that drains a ring rings
    /// the sender's doorbell then, so the rest moves on).
    overflowing: AtomicBool,
    /// Calls and VM removals of this CPU that waited for other kernels and finished (the
    /// vector keeps its allocation: `take_finished` drains it).
    finished: Mutex<Vec<Finished>>,
    /// Roots of this instance whose retirement an AM hook on another instance asked for
    /// (`forward_retire`): an lwC's, whose copy with the `destroy` right died there.
    retires: Mutex<Vec<(nk_caps::AmId, nk_caps::CapName)>>,
    /// `retires` may hold some (set after a push, cleared before a take), so `service`
    /// pays one atomic load, not a lock, when it holds none.
    retires_pending: AtomicBool,
    /// An empty outbox that keeps its allocation between the messages `service` answers,
    /// so answering one allocates nothing.
    spare_outbox: Mutex<Vec<(KernelId, Message)>>,
    apic_id: u32,
}

/// Every instance and the rings between them.
pub struct Mesh {
    instances: Vec<Instance>,
    /// `rings[from * n + to]`.
    rings: Vec<Channel>,
}

static MESH: Once<Mesh> = Once::new();
/// Messages sent and not yet fully handled (their handler's own messages counted first).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);
static OVERFLOWED: AtomicU64 = AtomicU64::new(0);
static DOORBELLS: AtomicU64 = AtomicU64::new(0);
/// Delegation messages (`Delegate`, `DelegateAck`) handled, and the TSC ticks (emulated
/// instructions in Bochs) their receiving CPUs spent on them, from the ring to the
/// answers' doorbells: the per-message cost the protocol benchmark's saturated
/// simulation is calibrated with (issue 14).
static DELEGATION_MESSAGES: AtomicU64 = AtomicU64::new(0);
static DELEGATION_TICKS: AtomicU64 = AtomicU64::new(0);
static INTERRUPT_EXITS: AtomicU64 = AtomicU64::new(0);

/// Traffic since boot.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub sent: u64,
    pub overflowed: u64,
    pub doorbells: u64,
    /// Guest runs an interrupt (a doorbell, most likely) ended.
    pub interrupt_exits: u64,
    /// Delegation messages handled by a drain of a ring that held nothing else, and the
    /// TSC ticks those drains took on their receiving CPUs.
    pub delegation_messages: u64,
    pub delegation_ticks: u64,
}

/// Installs the instances (index = CPU index = kernel id) with their CPUs' APIC ids.
pub fn install(kernels: Vec<(NullKernel, u32)>) {
    let n = kernels.len();
    MESH.call_once(|| Mesh {
        instances: kernels
            .into_iter()
            .map(|(kernel, apic_id)| Instance {
                kernel: Mutex::new(kernel),
                overflow: Mutex::new((0..n).map(|_| VecDeque::new()).collect()),
                overflowing: AtomicBool::new(false),
                finished: Mutex::new(Vec::new()),
                retires: Mutex::new(Vec::new()),
                retires_pending: AtomicBool::new(false),
                spare_outbox: Mutex::new(Vec::new()),
                apic_id,
            })
            .collect(),
        rings: (0..n * n).map(|_| Channel::new()).collect(),
    });
}

/// Returns the mesh once installed.
pub fn get() -> Option<&'static Mesh> {
    MESH.get()
}

/// Returns the installed mesh; guests only run after it is.
pub fn mesh() -> &'static Mesh {
    MESH.get().expect("the null-Kernel instances start before any guest")
}

/// Returns the traffic counters.
pub fn traffic() -> Traffic {
    Traffic {
        sent: SENT.load(Ordering::Relaxed),
        overflowed: OVERFLOWED.load(Ordering::Relaxed),
        doorbells: DOORBELLS.load(Ordering::Relaxed),
        interrupt_exits: INTERRUPT_EXITS.load(Ordering::Relaxed),
        delegation_messages: DELEGATION_MESSAGES.load(Ordering::Relaxed),
        delegation_ticks: DELEGATION_TICKS.load(Ordering::Relaxed),
    }
}

/// Counts a guest run that an interrupt ended.
pub fn count_interrupt_exit() {
    INTERRUPT_EXITS.fetch_add(1, Ordering::Relaxed);
}

/// Tells whether no message is on the way or being handled anywhere.
pub fn quiet() -> bool {
    IN_FLIGHT.load(Ordering::Acquire) == 0
}

impl Mesh {
    /// Returns the number of instances.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Returns instance `cpu`.
    pub fn instance(&self, cpu: usize) -> &Instance {
        &self.instances[cpu]
    }

    /// Iterates over the instances.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter()
    }

    fn ring(&self, from: usize, to: usize) -> &Channel {
        &self.rings[from * self.instances.len() + to]
    }

    /// Handles a hypercall of `vm`, which runs on `cpu`.
    pub fn hypercall(&self, cpu: usize, vm: VmId, call: &Call) -> Dispatched {
        if let Some(reply) = nk_core::stateless_reply(call) {
            return Dispatched::Reply(reply);
        }
        self.on_instance(&self.instances[cpu], cpu, |kernel, out| kernel.dispatch_stateful(vm, call, out))
    }

    /// Runs `work` on `instance` (of `cpu`) under its lock, settles what it left (effects,
    /// finished operations) and sends the messages it caused: the frame of a hypercall or
    /// a device's call. The fast path (an AM call, a local derive) has no effects, nothing
    /// finished and no messages: it pays two tests and an empty check, not the calls
    /// (issue 14).
    #[inline(always)]
    fn on_instance<R>(
        &self,
        instance: &Instance,
        cpu: usize,
        work: impl FnOnce(&mut NullKernel, &mut Vec<(KernelId, Message)>) -> R,
    ) -> R {
        let mut out = Vec::new();
        let mut kernel = instance.kernel.lock();
        let result = work(&mut kernel, &mut out);
        if kernel.has_effects() || kernel.has_finished() {
            settle_locally(instance, &mut kernel, &mut out);
        }
        drop(kernel);
        if !out.is_empty() {
            self.send(cpu, &mut out);
        }
        result
    }

    /// Handles a hypercall of `vm`, which runs on `cpu`, as [`hypercall`](Self::hypercall)
    /// does, with the call read from `frame` and a finished call's reply written over it
    /// (the guest's saved registers): the VMCALL exit's path. Returns the operation the
    /// guest waits for, if any.
    #[inline]
    pub fn hypercall_in_place<F: CallFrame + ?Sized>(&self, cpu: usize, vm: VmId, frame: &mut F) -> Option<PendingOp> {
        if let Some(reply) = nk_core::stateless_reply(frame.call()) {
            *frame.reply_mut() = reply;
            return None;
        }
        let instance = &self.instances[cpu];
        // An AM call sends nothing itself: its outbox is made only if it left effects to
        // settle (issue 14: the empty one's set-up and drop showed in the call's cost).
        if NullKernel::is_am_call(frame.call()) {
            let mut kernel = instance.kernel.lock();
            kernel.am_call_in_place(vm, frame);
            if kernel.has_effects() || kernel.has_finished() {
                let mut out = Vec::new();
                settle_locally(instance, &mut kernel, &mut out);
                drop(kernel);
                self.send(cpu, &mut out);
            }
            return None;
        }
        self.on_instance(instance, cpu, |kernel, out| kernel.dispatch_stateful_in_place(vm, frame, out))
    }

    /// Resolves AM `am`'s operations `ops` and `vm`'s initial capability of that AM on
    /// `cpu`'s instance, once, for an emulated device (`NullKernel::device_route`).
    #[cold]
    #[inline(never)]
    pub fn device_route<const N: usize>(
        &self,
        cpu: usize,
        vm: VmId,
        am: &str,
        ops: [&str; N],
    ) -> Option<nk_core::DeviceRoute<N>> {
        self.instances.get(cpu)?.kernel.lock().device_route(vm, am, ops)
    }

    /// Runs AM operation `op` for `vm` (on `cpu`) on capability `cap` with a data buffer,
    /// on a route [`device_route`](Self::device_route) resolved (`NullKernel::call_routed`,
    /// checked as the VM's own call would be): an emulated device's request (osvm.rs's
    /// virtio block device on the block AM). Effects it leaves are settled as a
    /// hypercall's. Cold and out of line, so the hypercall path's code stays as it was.
    #[cold]
    #[inline(never)]
    pub fn device_call_routed(
        &self,
        cpu: usize,
        vm: VmId,
        op: nk_caps::OpId,
        cap: nk_caps::CapName,
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, nk_am::AmError> {
        let instance = self.instances.get(cpu).ok_or(nk_am::AmError::NotPermitted)?;
        self.on_instance(instance, cpu, |kernel, _| kernel.call_routed(vm, op, cap, args, data))
    }

    /// Removes an ended VM of `cpu` from its instance: its capabilities die everywhere.
    pub fn remove_vm(&self, cpu: usize, vm: VmId) -> Result<Dispatched, nk_caps::PrincipalError> {
        let instance = &self.instances[cpu];
        let mut out = Vec::new();
        let mut kernel = instance.kernel.lock();
        let removed = kernel.remove_vm(vm, &mut out);
        settle_locally(instance, &mut kernel, &mut out);
        drop(kernel);
        self.send(cpu, &mut out);
        removed
    }

    /// Moves the finished calls and removals of `cpu` to `into` (both vectors keep their
    /// allocations, so a remote call's completion allocates nothing).
    pub fn take_finished(&self, cpu: usize, into: &mut Vec<Finished>) {
        into.append(&mut self.instances[cpu].finished.lock());
    }

    /// Tells whether `cpu` has finished calls waiting to be taken.
    pub fn has_finished(&self, cpu: usize) -> bool {
        !self.instances[cpu].finished.lock().is_empty()
    }

    /// Sends `messages` from `cpu`, in order, and rings each receiver's doorbell; leaves
    /// `messages` empty.
    fn send(&self, cpu: usize, messages: &mut Vec<(KernelId, Message)>) {
        if messages.is_empty() {
            return;
        }
        IN_FLIGHT.fetch_add(messages.len(), Ordering::AcqRel);
        SENT.fetch_add(messages.len() as u64, Ordering::Relaxed);
        let instance = &self.instances[cpu];
        let mut bells = 0u64;
        let mut overflow = instance.overflow.lock();
        for (to, message) in messages.drain(..) {
            let to = usize::from(to.raw());
            let words = message.encode();
            let queue = &mut overflow[to];
            if !queue.is_empty() || self.ring(cpu, to).push(&words).is_err() {
                queue.push_back(words);
                instance.overflowing.store(true, Ordering::Release);
                OVERFLOWED.fetch_add(1, Ordering::Relaxed);
            }
            bells |= 1 << to;
        }
        drop(overflow);
        self.ring_doorbells(cpu, bells);
    }

    fn ring_doorbells(&self, cpu: usize, mut bells: u64) {
        bells &= !(1 << cpu);
        while bells != 0 {
            let to = bells.trailing_zeros() as usize;
            bells &= bells - 1;
            DOORBELLS.fetch_add(1, Ordering::Relaxed);
            if !apic::send_wakeup(self.instances[to].apic_id) {
                log::error!(target: "mesh", "cpu {to} did not accept the doorbell from cpu {cpu}");
            }
        }
    }

    /// Moves what fits of `cpu`'s overflow queues into its rings.
    fn retry_overflow(&self, cpu: usize) {
        let instance = &self.instances[cpu];
        if !instance.overflowing.load(Ordering::Acquire) {
            return;
        }
        let mut overflow = instance.overflow.lock();
        let mut bells = 0u64;
        for (to, queue) in overflow.iter_mut().enumerate() {
            while let Some(words) = queue.front() {
                if self.ring(cpu, to).push(words).is_err() {
                    break;
                }
                queue.pop_front();
                bells |= 1 << to;
            }
        }
        instance.overflowing.store(overflow.iter().any(|q| !q.is_empty()), Ordering::Release);
        drop(overflow);
        self.ring_doorbells(cpu, bells);
    }

    /// Asks the instance that holds root `root` of AM `am` to retire it (an
    /// `Effect::Retire` emitted on another instance: `NullKernel::apply_effects` handed it
    /// on), and rings that CPU's doorbell. It counts as a message in flight until done.
    pub fn forward_retire(&self, am: nk_caps::AmId, root: nk_caps::CapName) {
        let to = usize::from(root.kernel().raw());
        let Some(instance) = self.instances.get(to) else { return };
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        instance.retires.lock().push((am, root));
        instance.retires_pending.store(true, Ordering::Release);
        self.ring_doorbells(crate::percpu::current_index() as usize, 1 << to);
    }

    /// Retires the roots other instances asked `cpu`'s to (`forward_retire`).
    fn retire_forwarded(&self, cpu: usize) -> usize {
        let instance = &self.instances[cpu];
        if !instance.retires_pending.swap(false, Ordering::AcqRel) {
            return 0;
        }
        let retires = core::mem::take(&mut *instance.retires.lock());
        if retires.is_empty() {
            return 0;
        }
        let mut out = Vec::new();
        let mut kernel = instance.kernel.lock();
        for &(am, root) in &retires {
            kernel.retire_forwarded(am, root, &mut out);
        }
        settle_locally(instance, &mut kernel, &mut out);
        drop(kernel);
        self.send(cpu, &mut out);
        IN_FLIGHT.fetch_sub(retires.len(), Ordering::AcqRel);
        retires.len()
    }

    /// Handles every message waiting for `cpu`; returns how many it handled.
    pub fn service(&self, cpu: usize) -> usize {
        // First the exo AM's EPT shootdowns another CPU waits for (hypervisor/src/exomem.rs).
        crate::exomem::service(cpu);
        self.retry_overflow(cpu);
        let instance = &self.instances[cpu];
        let mut handled = self.retire_forwarded(cpu);
        for from in 0..self.instances.len() {
            let ring = self.ring(from, cpu);
            // The answers to everything drained from one ring leave together (one doorbell
            // per receiver), each after the effects of its own step.
            let start = arch::rdtsc();
            let Some(first) = ring.pop() else { continue };
            let mut out = core::mem::take(&mut *instance.spare_outbox.lock());
            let (mut drained, mut delegations) = (0, 0);
            let mut next = Some(first);
            while let Some(words) = next.take().or_else(|| ring.pop()) {
                drained += 1;
                let Ok(message) = Message::decode(&words) else {
                    log::error!(target: "mesh", "cpu {cpu}: malformed message from cpu {from} dropped: {words:x?}");
                    continue;
                };
                delegations += usize::from(matches!(message, Message::Delegate { .. } | Message::DelegateAck { .. }));
                let mut kernel = instance.kernel.lock();
                kernel.handle(KernelId::new(from as u16), message, &mut out);
                settle_locally(instance, &mut kernel, &mut out);
            }
            self.send(cpu, &mut out);
            *instance.spare_outbox.lock() = out;
            if drained > 0 && delegations == drained {
                DELEGATION_MESSAGES.fetch_add(drained as u64, Ordering::Relaxed);
                DELEGATION_TICKS.fetch_add(arch::rdtsc().wrapping_sub(start), Ordering::Relaxed);
            }
            // Only now, with their answers counted, are the drained messages done.
            IN_FLIGHT.fetch_sub(drained, Ordering::AcqRel);
            handled += drained;
            if drained > 0 && from != cpu && self.instances[from].overflowing.load(Ordering::Acquire) {
                // Room was made in a ring its sender is waiting to fill.
                self.ring_doorbells(cpu, 1 << from);
            }
        }
        handled
    }
}

/// Applies the effects of the step just taken and collects the calls it finished, before
/// the step's messages leave.
fn settle_locally(instance: &Instance, kernel: &mut NullKernel, out: &mut Vec<(KernelId, Message)>) {
    if kernel.has_effects() {
        kernel.apply_effects(out, crate::ioports::apply);
    }
    if kernel.has_finished() {
        let mut finished = instance.finished.lock();
        while let Some(done) = kernel.poll() {
            finished.push(done);
        }
    }
}
