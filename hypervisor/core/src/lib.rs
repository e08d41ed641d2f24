//! The null-Kernel's hypercall path, without hardware: one [`NullKernel`] per kernel
//! instance (one per CPU) holds that instance's share of the distributed capability system
//! (an [`nk_protocol::Kernel`] over its capability table) and the registered AMs, and
//! [`NullKernel::dispatch`] turns a hypercall's registers ([`nk_abi::Call`]) into a reply.
//!
//! AMs are shared by every kernel instance ([`SharedAm`]: one object, behind a lock, whose
//! operations run on the calling CPU); capabilities are per instance. Derive, delegate,
//! revoke and delete go through the protocol: when one needs other kernels, `dispatch`
//! returns [`Dispatched::Pending`], the hypervisor parks the calling vCPU, carries the
//! messages ([`NullKernel::handle`]) and resumes the vCPU with the reply that
//! [`NullKernel::poll`] hands back.
//!
//! Dispatch follows seL4's decode-then-invoke: the selector, the operation and *every*
//! capability argument are decoded and checked before anything changes; only then does
//! the AM's handler run, and it sees only checked references to its own objects. A call
//! that fails a check returns a status and leaves every capability and AM as it was.
//!
//! # Bounds
//!
//! Nothing a guest does makes an instance allocate without a bound or a charge:
//! capabilities are charged to the quota of the principal that causes them (the delegator
//! of a delegation, the VM that asks an AM for an object: nk-caps, "Quotas"); each VM's
//! inbox lists at most [`INBOX_MAX`] capabilities and never one that died (a death marks
//! its holder's inbox, which is pruned before it is next read or filled); a delegation to a VM whose inbox is full is refused with
//! `QUOTA_EXCEEDED`; a vCPU has at most one pending operation; and what the AMs keep per
//! VM is bounded by the AMs themselves (the exo AM's and the counter AM's per-VM limits).
//!
//! # Who may enumerate
//!
//! `INITIAL` and `RECEIVED` list a VM's capabilities: by default only the guest's ring 0
//! (its kernel) may call them, and a call from another ring gets `NOT_PERMITTED`, so a
//! process of the guest cannot learn, and then revoke or give away, its kernel's
//! capabilities. The hypervisor allows every ring for a VM whose module line says
//! `ring3-caps` ([`NullKernel::allow_all_rings`]). Only these two operations ask the
//! caller's privilege level (through the reader [`NullKernel::set_caller_ring`] installs;
//! the hypervisor's reads the VMCS), so no other call pays for it; every other operation
//! is guarded by the capabilities it names.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status, ABI_VERSION, NULL_KERNEL_AM};
use nk_am::{
    AbstractMachine, AmError, DirtySource, Effect, Effects, FrameSource, HostMemory, Kernel, Media, MediaSource,
    Registrar,
};
use nk_caps::{
    AmId, ArgFault, Binding, CapError, CapName, CapTable, CheckError, Checked, DeadCap, EntropySource, KernelId,
    NewTableError, ObjId, Object, OpId, Principal, PrincipalError, RegisterError, Rights, VmId,
};
pub use nk_protocol::{Message, OpId as PendingOp, Outbox};
use nk_protocol::{Outcome, ProtoError, Started};
use spin::Mutex;

/// The first id given to a registered AM (0 is the null-Kernel itself).
pub const FIRST_AM_ID: u16 = 1;

/// An AM that could not grant a new VM its initial capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFailure {
    pub am: AmId,
    pub error: AmError,
}

/// An AM as every kernel instance holds it: one object behind a lock, whose operations
/// run on the CPU of the caller.
pub type SharedAm = Arc<Mutex<Box<dyn AbstractMachine + Send>>>;

/// Wraps an AM for [`NullKernel::add_shared_am`] on every kernel instance.
pub fn shared_am(am: Box<dyn AbstractMachine + Send>) -> SharedAm {
    Arc::new(Mutex::new(am))
}

/// The most capabilities a VM's inbox lists (the VM's capability quota is of this order).
pub const INBOX_MAX: usize = 4096;

/// A VM's inbox: what others delegated to it, in arrival order.
#[derive(Debug, Default)]
struct Inbox {
    entries: Vec<InboxEntry>,
    /// A capability the VM held died since the entries were last pruned: some may be dead.
    stale: bool,
}

impl Inbox {
    /// Drops the entries whose capabilities died (linear, and only after a death); returns
    /// how many it dropped.
    fn prune(&mut self, vm: VmId, table: &CapTable) -> usize {
        if !self.stale {
            return 0;
        }
        let before = self.entries.len();
        self.entries.retain(|entry| alive(table, vm, entry.name));
        self.stale = false;
        before - self.entries.len()
    }
}

/// Tells whether `vm`'s capability `name` is live, whichever of its processes asks: not
/// `inspect`, which refuses a process-bound capability to a call with another page-table
/// root (nk-caps `pin.rs`), so an inbox pruned during such a call would drop it.
fn alive(table: &CapTable, vm: VmId, name: CapName) -> bool {
    table.node(name).is_some_and(|node| {
        node.state == nk_caps::NodeState::Live && node.cap.is_some_and(|cap| cap.holder == Principal::Vm(vm))
    })
}

/// One capability another principal delegated to a VM, as `RECEIVED` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxEntry {
    /// The capability.
    pub name: CapName,
    /// The principal that delegated it.
    pub sender: Principal,
}

/// An emulated device's operations and capability, resolved once
/// ([`NullKernel::device_route`]) instead of by name at every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRoute<const N: usize> {
    /// The operations, in the order they were asked for.
    pub ops: [OpId; N],
    /// The VM's initial capability of their AM.
    pub cap: CapName,
}

/// Holds one hypercall in place: its call, which the reply then overwrites (the
/// hypervisor's saved guest registers, where the call's RAX..R8 are the reply's).
/// [`NullKernel::dispatch_stateful_in_place`] reads [`call`](Self::call) and, once done with
/// it, writes [`reply_mut`](Self::reply_mut).
pub trait CallFrame {
    /// Returns the call.
    fn call(&self) -> &Call;
    /// Returns where the reply goes (it may overlap the call).
    fn reply_mut(&mut self) -> &mut Reply;
}

/// A [`CallFrame`] whose call and reply are apart: [`NullKernel::am_op`]'s, for the
/// callers that hand a call and take a reply.
struct SplitFrame<'a> {
    call: &'a Call,
    reply: Reply,
}

impl CallFrame for SplitFrame<'_> {
    #[inline(always)]
    fn call(&self) -> &Call {
        self.call
    }

    #[inline(always)]
    fn reply_mut(&mut self) -> &mut Reply {
        &mut self.reply
    }
}

/// What a hypercall produced: its reply, or an operation that waits for other kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatched {
    /// The call finished: hand this reply to the caller.
    Reply(Reply),
    /// The call waits for other kernels: park the caller until [`NullKernel::poll`] returns
    /// a [`Finished`] with this id.
    Pending(PendingOp),
}

impl Dispatched {
    /// Returns the reply of a call that finished.
    pub fn reply(self) -> Option<Reply> {
        match self {
            Dispatched::Reply(reply) => Some(reply),
            Dispatched::Pending(_) => None,
        }
    }
}

/// A call (or a VM's removal) that waited for other kernels and is now finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The id [`Dispatched::Pending`] returned.
    pub op: PendingOp,
    /// The reply for the parked caller.
    pub reply: Reply,
}

/// Why a kernel instance could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewKernelError {
    /// The capability table could not be created.
    Table(NewTableError),
    /// The instance's id is not below the number of instances.
    KernelOutOfRange,
}

/// One kernel instance's capabilities and AMs.
pub struct NullKernel {
    proto: nk_protocol::Kernel,
    /// Indexed by `AmId::raw() - FIRST_AM_ID`.
    /// Each VM's initial capabilities (AM id, name), in AM order.
    initial: BTreeMap<VmId, Vec<(AmId, CapName)>>,
    /// Capabilities other principals delegated to each VM of this instance, in order.
    inbox: BTreeMap<VmId, Inbox>,
    /// Entries in all inboxes (dead ones included until pruned): while 0, a revocation
    /// pays nothing per dead capability for the inboxes.
    listed: usize,
    /// VMs whose every ring may call `INITIAL` and `RECEIVED`.
    all_rings: BTreeSet<VmId>,
    /// Reads the privilege level (CPL) of the guest whose call is being dispatched; asked
    /// only by `INITIAL` and `RECEIVED`.
    caller_ring: fn() -> u8,
    /// VMs whose first refusal of each kind (status code) was logged: one line per VM and
    /// kind, not one per call.
    refusals_logged: BTreeSet<(VmId, u16)>,
    /// The kernel instance each VM runs on (every instance knows every VM).
    placement: BTreeMap<VmId, KernelId>,
    /// Pending delegations whose child, once granted, goes to a VM's inbox (with its
    /// sender).
    inbox_on_completion: BTreeMap<PendingOp, (VmId, Principal)>,
    /// Effects the AMs emitted that the hypervisor has not applied yet.
    effects: Vec<Effect>,
    /// The AMs, and what the hypervisor lends them about memory.
    shared: Shared,
    /// Root deletions ([`Effect::Retire`]) and removals of destroyed lwCs
    /// ([`Effect::LwcDestroy`]) that wait for other kernels: their completion is no
    /// caller's reply.
    retiring: BTreeSet<PendingOp>,
    /// The checked arguments of the AM call being dispatched, filled in place by
    /// [`CapTable::check_into`] and reused by every call (no clearing or copying of the
    /// argument array on the hypercall path, issue 14).
    checked: Checked,
    /// The revocation hook's run of dead capabilities (keeps its allocation).
    dead: Vec<DeadCap>,
}

/// The AMs and what the hypervisor lends them about memory (one reference in
/// [`AmServices`], so an AM call that uses none of it pays for a pointer, not for each
/// service).
struct Shared {
    /// The registered AMs, AM id `FIRST_AM_ID + i` at index i.
    ams: Vec<SharedAm>,
    /// The host frames AMs may allocate from (none until the hypervisor lends them).
    frames: Option<&'static dyn FrameSource>,
    /// Where each VM's initial memory lies in host memory (none until the hypervisor says).
    guest_memory: fn(VmId) -> Option<(u64, u64)>,
    /// Host memory AMs read and write (the NVRAM AM's copies of a region).
    host: Option<&'static dyn HostMemory>,
    /// The durable device (the NVRAM AM's).
    media: Option<&'static dyn MediaSource>,
    /// Synchronous EPT dirty-flag reads (the NVRAM AM's write sets).
    dirty: Option<&'static dyn DirtySource>,
}

impl core::fmt::Debug for NullKernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NullKernel").field("kernel", &self.proto.id()).field("ams", &self.shared.ams.len()).finish()
    }
}

/// Collects effects into the kernel's pending list.
struct EffectList<'a>(&'a mut Vec<Effect>);

impl Effects for EffectList<'_> {
    fn emit(&mut self, effect: Effect) {
        self.0.push(effect);
    }
}

/// Passes messages on to `out` and notes whether one of them accepts the delegation of
/// `child` (`DelegateAck` with `Ok`).
struct AcceptWatch<'a, O: ?Sized> {
    out: &'a mut O,
    child: CapName,
    accepted: bool,
}

impl<O: Outbox + ?Sized> Outbox for AcceptWatch<'_, O> {
    fn send(&mut self, to: KernelId, message: Message) {
        if let Message::DelegateAck { child, result: Ok(()) } = message {
            self.accepted |= child == self.child;
        }
        self.out.send(to, message);
    }
}

/// Dead capabilities an [`AmHook`] collects before it takes their AM's lock to tell it.
const HOOK_RUN: usize = 32;

/// Routes each dead capability to the AM that implements its object, and marks the inbox
/// of its holder stale.
struct AmHook<'a> {
    ams: &'a [SharedAm],
    effects: &'a mut Vec<Effect>,
    inboxes: &'a mut BTreeMap<VmId, Inbox>,
    /// Whether any inbox lists anything (decided once per operation, so a revocation
    /// while every inbox is empty pays nothing per dead capability).
    watch_inboxes: bool,
    /// The holder whose inbox was marked last (a subtree's capabilities often share one).
    marked: Option<VmId>,
    /// Dead capabilities of one AM (index `run_am`) not told to it yet, at most
    /// [`HOOK_RUN`]: a subtree's capabilities mostly belong to one AM, so a revocation
    /// takes its lock once per run of them, not once per capability, and holds it only
    /// while the AM handles the run, never across the walk (issue 14). An AM is shared by
    /// every kernel instance: a lock held across a walk made the kernels that revoke their
    /// shares of one tree at once wait for each other's whole walks (bench protocol,
    /// revoke_1000_4k). The run is told when it is full, before a capability of another
    /// AM, at `finished` and when the hook is dropped, so always before the operation's
    /// messages leave; one AM lock at a time, so no lock order can form.
    run: &'a mut Vec<DeadCap>,
    run_am: usize,
}

impl<'a> AmHook<'a> {
    fn new(
        ams: &'a [SharedAm],
        effects: &'a mut Vec<Effect>,
        inboxes: &'a mut BTreeMap<VmId, Inbox>,
        listed: usize,
        run: &'a mut Vec<DeadCap>,
    ) -> Self {
        run.clear();
        Self { ams, effects, inboxes, watch_inboxes: listed > 0, marked: None, run, run_am: 0 }
    }

    /// Tells the run's AM of the capabilities collected, under one take of its lock.
    #[cold]
    #[inline(never)]
    fn tell(&mut self) {
        if let Some(am) = self.ams.get(self.run_am) {
            let mut am = am.lock();
            for dead in self.run.iter() {
                am.revoked(dead, &mut EffectList(self.effects));
            }
        }
        self.run.clear();
    }
}

impl nk_caps::RevocationHook for AmHook<'_> {
    #[inline]
    fn revoked(&mut self, dead: &DeadCap) {
        let index = usize::from(dead.object.am.raw()).wrapping_sub(usize::from(FIRST_AM_ID));
        if !self.run.is_empty() && (index != self.run_am || self.run.len() >= HOOK_RUN) {
            self.tell();
        }
        self.run_am = index;
        self.run.push(*dead);
        if let (true, Principal::Vm(vm)) = (self.watch_inboxes, dead.holder) {
            if self.marked != Some(vm) {
                self.marked = Some(vm);
                if let Some(inbox) = self.inboxes.get_mut(&vm) {
                    inbox.stale |= !inbox.entries.is_empty();
                }
            }
        }
    }

    fn finished(&mut self) {
        if !self.run.is_empty() {
            self.tell();
        }
    }
}

impl Drop for AmHook<'_> {
    fn drop(&mut self) {
        if !self.run.is_empty() {
            self.tell();
        }
    }
}

/// The null-Kernel services one AM gets while it handles a call.
struct AmServices<'a> {
    am: AmId,
    table: &'a mut CapTable,
    effects: &'a mut Vec<Effect>,
    /// Every AM of the instance (`lend_frames` asks the AM of another object) and the
    /// memory services.
    shared: &'a Shared,
}

impl Effects for AmServices<'_> {
    fn emit(&mut self, effect: Effect) {
        self.effects.push(effect);
    }
}

impl Kernel for AmServices<'_> {
    fn grant_new_root(
        &mut self,
        object: Object,
        rights: Rights,
        to: Principal,
        binding: Binding,
    ) -> Result<(CapName, CapName), CapError> {
        let me = Principal::Am(self.am);
        let root = self.table.mint(me, object, rights)?;
        // The receiver asked for the object (or is being set up): it pays for its
        // capability, so what a VM makes an AM hand out counts against its own quota.
        match self.table.grant(me, root, to, Rights::ALL, binding) {
            Ok(child) => Ok((root, child)),
            Err(error) => {
                // Undo the mint so a failed grant leaves nothing behind; nothing was
                // enabled yet, so no AM needs to hear of it.
                let _ = self.table.delete(me, root, &mut |_: &DeadCap| {});
                Err(error)
            }
        }
    }

    fn allocate_frames(&mut self, bytes: u64, align: u64) -> Option<u64> {
        self.shared.frames?.allocate(bytes, align)
    }

    fn guest_memory(&self, vm: VmId) -> Option<(u64, u64)> {
        (self.shared.guest_memory)(vm)
    }

    fn lend_frames(
        &mut self,
        caller: VmId,
        name: CapName,
        to: VmId,
        fits: &mut dyn FnMut(u64) -> Result<(), AmError>,
    ) -> Result<(u64, u64), AmError> {
        // The same check as for a capability argument: the caller may use it, it is live.
        let info = self.table.inspect(Principal::Vm(caller), name)?;
        // An AM cannot lend to itself through this path (it is locked by the call).
        if info.object.am == self.am {
            return Err(AmError::NotPermitted);
        }
        let index = usize::from(info.object.am.raw()).wrapping_sub(usize::from(FIRST_AM_ID));
        let owner = self.shared.ams.get(index).ok_or(AmError::NotPermitted)?;
        let cap = nk_am::PresentedCap { name, object: info.object, rights: info.rights, presenter: caller };
        owner.lock().lend_frames(&cap, to, fits, &mut EffectList(self.effects))
    }

    fn host_memory(&self) -> Option<&'static dyn HostMemory> {
        self.shared.host
    }

    fn with_media(&mut self, f: &mut dyn FnMut(&mut dyn Media)) -> bool {
        self.shared.media.is_some_and(|m| m.with_media(f))
    }

    fn take_dirty(&mut self, vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool {
        self.shared.dirty.is_some_and(|d| d.take_dirty(vm, gpa, pages, bitmap))
    }

    fn call_am(
        &mut self,
        op: OpId,
        caps: &[CapName],
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, AmError> {
        am_to_am::call(self, op, caps, args, data)
    }

    fn find_op(&self, am: &str, op: &str) -> Option<OpId> {
        let am = am_to_am::am_named(self.shared, self.table, am)?;
        self.table.registry().find_op(am, op)
    }

    fn find_held(&self, holder: VmId, am: &str, kind: &str, id: ObjId, rights: &[&str]) -> Option<CapName> {
        am_to_am::find_held(self, holder, am, kind, id, rights)
    }

    fn take_cap(&mut self, from: VmId, name: CapName, rights: &[&str]) -> Result<(CapName, Object), AmError> {
        let info = self.table.inspect(Principal::Vm(from), name)?;
        if info.object.am.raw() >= self.am.raw() {
            return Err(AmError::NotPermitted);
        }
        let (am, kind) = (info.object.am, info.object.kind);
        let mut mask = Rights::NONE;
        for right in rights {
            let bits = self.table.registry().find_right(am, kind, right).ok_or(AmError::BadArgument)?;
            mask = Rights::from_bits(mask.bits() | bits.bits());
        }
        if !info.rights.contains(mask) {
            return Err(AmError::NotPermitted);
        }
        let child = self.table.delegate(Principal::Vm(from), name, Principal::Am(self.am), mask, Binding::Bound)?;
        Ok((child, info.object))
    }

    fn drop_cap(&mut self, name: CapName) -> bool {
        am_to_am::drop_cap(self, name)
    }

    fn instance(&self) -> u32 {
        u32::from(self.table.kernel().raw())
    }
}

/// AM-to-AM calls (seed §5.2.1, hierarchical capabilities): an AM, as the principal
/// `Principal::Am(id)`, holds capabilities of lower AMs and invokes them through the same
/// check as a hypercall's. Out of line from the hypercall path: nothing here runs unless
/// an AM asks.
mod am_to_am {
    use super::*;

    /// The AM called `name`, among this instance's registered AMs.
    pub(super) fn am_named(shared: &Shared, table: &CapTable, name: &str) -> Option<AmId> {
        (0..shared.ams.len())
            .filter_map(|i| u16::try_from(i).ok())
            .map(|i| AmId::new(FIRST_AM_ID + i))
            .find(|&am| table.registry().am_name(am) == Some(name))
    }

    /// [`Kernel::call_am`]: refuses calls that do not go down, checks `caps` for the
    /// calling AM as a hypercall's are checked, and runs the callee's `invoke_by_am` with
    /// services of its own (its effects join the caller's).
    #[inline(never)]
    pub(super) fn call(
        services: &mut AmServices<'_>,
        op: OpId,
        caps: &[CapName],
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, AmError> {
        // Down only: the caller's lock is held, and every chain of calls takes locks in
        // decreasing id order, so no cycle (on one CPU or across CPUs) can form.
        if op.am().raw() >= services.am.raw() || op.am().raw() < FIRST_AM_ID {
            return Err(AmError::NotPermitted);
        }
        let caller = Principal::Am(services.am);
        checked_invoke(services, caller, op, caps, args, data)
    }

    /// Checks `caps` for `caller` (an AM, or a VM whose device the hypervisor emulates:
    /// `NullKernel::call_for_vm`) as a hypercall's are checked, and runs the callee's
    /// `invoke_by_am` with services of its own (its effects join the caller's). The one
    /// place both reach the check, so the hypercall path's own check stays inlined.
    pub(super) fn checked_invoke(
        services: &mut AmServices<'_>,
        caller: Principal,
        op: OpId,
        caps: &[CapName],
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, AmError> {
        let mut checked = Checked::blank();
        if let Err(error) = services.table.check_into(caller, op, caps, &mut checked) {
            return Err(match error {
                CheckError::Arg { fault: ArgFault::UnknownName, .. } => AmError::Capability(CapError::UnknownName),
                CheckError::Arg { fault: ArgFault::WrongHolder, .. } => AmError::Capability(CapError::WrongHolder),
                CheckError::Arg { fault: ArgFault::Revoked, .. } => AmError::Capability(CapError::Revoked),
                CheckError::Arg { .. } => AmError::NotPermitted,
                CheckError::UnknownOperation | CheckError::WrongArgCount { .. } => AmError::BadArgument,
            });
        }
        let index = usize::from(op.am().raw() - FIRST_AM_ID);
        let callee = services.shared.ams.get(index).ok_or(AmError::NotPermitted)?;
        let mut inner =
            AmServices { am: op.am(), table: services.table, effects: services.effects, shared: services.shared };
        let result = callee.lock().invoke_by_am(&checked, args, data, &mut inner);
        result
    }

    /// [`Kernel::find_held`].
    pub(super) fn find_held(
        services: &AmServices<'_>,
        holder: VmId,
        am: &str,
        kind: &str,
        id: ObjId,
        rights: &[&str],
    ) -> Option<CapName> {
        let registry = services.table.registry();
        let am = am_named(services.shared, services.table, am)?;
        let kind = registry.find_kind(am, kind)?;
        let mut wanted = Rights::NONE;
        for right in rights {
            wanted = Rights::from_bits(wanted.bits() | registry.find_right(am, kind, right)?.bits());
        }
        let object = Object::new(am, kind, id);
        let holder = Principal::Vm(holder);
        services.table.nodes().find_map(|node| {
            let cap = node.cap?;
            let usable = node.state == nk_caps::NodeState::Live
                && cap.holder == holder
                && cap.binding == Binding::Bound
                && cap.object == object
                && cap.rights.contains(wanted);
            usable.then_some(node.name)
        })
    }

    /// [`Kernel::drop_cap`]: deletes the capability, telling the object's AM (a lower
    /// one, so its lock comes after the caller's) if it was live.
    pub(super) fn drop_cap(services: &mut AmServices<'_>, name: CapName) -> bool {
        let me = Principal::Am(services.am);
        let Some(node) = services.table.node(name) else { return false };
        let Some(cap) = node.cap else { return false };
        if cap.holder != me || cap.object.am.raw() >= services.am.raw() {
            return false;
        }
        let (ams, effects) = (&services.shared.ams, &mut *services.effects);
        let mut tell = |dead: &DeadCap| {
            let index = usize::from(dead.object.am.raw()).wrapping_sub(usize::from(FIRST_AM_ID));
            if let Some(am) = ams.get(index) {
                am.lock().revoked(dead, &mut EffectList(effects));
            }
        };
        services.table.delete(me, name, &mut tell).is_ok()
    }
}

fn name_of(words: NameWords) -> CapName {
    CapName::from_words(words.high, words.low)
}

/// Returns `name` in the hypercall ABI's two words.
pub fn words_of(name: CapName) -> NameWords {
    let (high, low) = name.words();
    NameWords { low, high }
}

fn arg_status(index: u8, fault: ArgFault) -> Status {
    let code = match fault {
        ArgFault::UnknownName => Status::UNKNOWN_NAME,
        ArgFault::WrongHolder => Status::WRONG_HOLDER,
        ArgFault::Revoked => Status::REVOKED,
        ArgFault::WrongKind => Status::WRONG_KIND,
        ArgFault::MissingRights => Status::MISSING_RIGHTS,
    };
    Status::new(code, Some(index))
}

/// Maps a capability-operation error on argument 0 to a status.
fn cap_status(error: CapError) -> Status {
    let (code, arg) = match error {
        CapError::UnknownName => (Status::UNKNOWN_NAME, Some(0)),
        CapError::WrongHolder => (Status::WRONG_HOLDER, Some(0)),
        CapError::Revoked => (Status::REVOKED, Some(0)),
        CapError::UnknownPrincipal => (Status::BAD_ARGUMENT, None),
        CapError::QuotaExceeded | CapError::TableFull => (Status::QUOTA_EXCEEDED, None),
        CapError::NotImplementer | CapError::NotBindable => (Status::NOT_PERMITTED, None),
        CapError::UndefinedRights | CapError::UnknownKind | CapError::UnknownAm => (Status::BAD_ARGUMENT, None),
    };
    Status::new(code, arg)
}

fn am_status(error: AmError) -> Status {
    match error {
        AmError::BadArgument => Status::new(Status::BAD_ARGUMENT, None),
        AmError::NoMemory => Status::new(Status::NO_MEMORY, None),
        AmError::QuotaExceeded => Status::new(Status::QUOTA_EXCEEDED, None),
        AmError::NotPermitted => Status::new(Status::NOT_PERMITTED, None),
        AmError::Capability(e) => cap_status(e),
    }
}

fn proto_status(error: ProtoError) -> Status {
    match error {
        ProtoError::Cap(error) => cap_status(error),
        ProtoError::UnknownKernel => Status::new(Status::BAD_ARGUMENT, None),
    }
}

/// The reply for a finished capability operation: a name, or a count in result 0.
#[inline]
fn outcome_reply(result: Result<Outcome, ProtoError>) -> Reply {
    match result {
        Ok(Outcome::Name(name)) => success(Some(name), [0; 4]),
        Ok(Outcome::Count(count)) => success(None, [count, 0, 0, 0]),
        Err(error) => failure(proto_status(error)),
    }
}

/// Turns a started protocol operation into what dispatch returns.
#[inline]
fn started(started: Started) -> Dispatched {
    match started {
        Started::Done(result) => Dispatched::Reply(outcome_reply(result)),
        Started::Pending(op) => Dispatched::Pending(op),
    }
}

/// Encodes a principal as `INSPECT` and `RECEIVED` report it: a VM's id << 1, or an AM's
/// id << 1 with bit 63 set.
fn principal_word(principal: Principal) -> u64 {
    match principal {
        Principal::Vm(vm) => u64::from(vm.raw()) << 1,
        Principal::Am(am) => (u64::from(am.raw()) << 1) | (1 << 63),
    }
}

fn failure(status: Status) -> Reply {
    Reply { status: status.0, ..Reply::default() }
}

fn success(name: Option<CapName>, results: [u64; 4]) -> Reply {
    Reply { status: 0, name: name.map(words_of).unwrap_or_default(), results }
}

/// Answers the calls that need no kernel state: a wrong ABI version and `NULL`. The
/// hypervisor asks this before it takes its instance's lock, so the null call costs the
/// VM exit, this check and the VM entry (issue 14, the seL4 fast path's shape); every
/// other call returns `None` and goes to [`NullKernel::dispatch`], which asks it too.
#[inline]
pub fn stateless_reply(call: &Call) -> Option<Reply> {
    let selector = Selector::decode(call.selector);
    if selector.version != ABI_VERSION {
        return Some(failure(Status::new(Status::BAD_VERSION, None)));
    }
    (selector.am == NULL_KERNEL_AM && selector.op == nk_op::NULL).then(|| success(None, [0; 4]))
}

impl NullKernel {
    /// Creates kernel instance `kernel` of `kernels` (ids `0..kernels`) with room for
    /// `capacity` capabilities.
    pub fn new(
        kernel: KernelId,
        kernels: u16,
        capacity: u32,
        entropy: &mut dyn EntropySource,
    ) -> Result<Self, NewKernelError> {
        let table = CapTable::new(kernel, capacity, entropy).map_err(NewKernelError::Table)?;
        let proto = nk_protocol::Kernel::new(table, kernels).map_err(|_| NewKernelError::KernelOutOfRange)?;
        Ok(Self {
            proto,
            initial: BTreeMap::new(),
            inbox: BTreeMap::new(),
            listed: 0,
            all_rings: BTreeSet::new(),
            caller_ring: || 3,
            refusals_logged: BTreeSet::new(),
            placement: BTreeMap::new(),
            inbox_on_completion: BTreeMap::new(),
            effects: Vec::new(),
            shared: Shared {
                ams: Vec::new(),
                frames: None,
                guest_memory: |_| None,
                host: None,
                media: None,
                dirty: None,
            },
            retiring: BTreeSet::new(),
            checked: Checked::blank(),
            dead: Vec::with_capacity(HOOK_RUN),
        })
    }

    /// Returns this instance's id.
    pub fn id(&self) -> KernelId {
        self.proto.id()
    }

    /// Returns the capability table (for inspection and tests).
    pub fn table(&self) -> &CapTable {
        self.proto.table()
    }

    /// Returns the capability table for setup by the hypervisor (minting boot-time roots).
    pub fn table_mut(&mut self) -> &mut CapTable {
        self.proto.table_mut()
    }

    /// Returns this instance's protocol state (for checks: idle, pending operations).
    pub fn protocol(&self) -> &nk_protocol::Kernel {
        &self.proto
    }

    /// Registers an AM that only this instance uses; returns its id.
    pub fn add_am(&mut self, am: Box<dyn AbstractMachine + Send>, quota: u32) -> Result<AmId, RegisterError> {
        self.add_shared_am(shared_am(am), quota)
    }

    /// Registers an AM shared with the other kernel instances (each registers the same AMs
    /// in the same order, so AM ids, kinds and operations agree everywhere); returns its id.
    pub fn add_shared_am(&mut self, am: SharedAm, quota: u32) -> Result<AmId, RegisterError> {
        let raw = u16::try_from(self.shared.ams.len()).ok().and_then(|n| n.checked_add(FIRST_AM_ID));
        let id = AmId::new(raw.ok_or(RegisterError::AmIdTaken)?);
        let table = self.proto.table_mut();
        {
            let mut locked = am.lock();
            table.register_am(id, locked.name(), quota)?;
            locked.register(&mut Registrar::new(id, table))?;
        }
        self.shared.ams.push(am);
        Ok(id)
    }

    /// Records that `vm` runs on kernel instance `kernel` (delegations to it go there), and
    /// registers it here as a principal with `quota`, which it holds nothing with: what
    /// it delegates to VMs of this instance is charged to it here (nk-caps, "Quotas").
    pub fn place(&mut self, vm: VmId, kernel: KernelId, quota: u32) -> Result<(), PrincipalError> {
        self.placement.insert(vm, kernel);
        if kernel != self.id() {
            self.proto.table_mut().add_vm(vm, quota)?;
        }
        Ok(())
    }

    /// Sets how the instance learns the caller's privilege level (CPL): the hypervisor
    /// reads the current VMCS. Until it is set every caller counts as ring 3, so
    /// `INITIAL` and `RECEIVED` answer only VMs that allow every ring.
    pub fn set_caller_ring(&mut self, reader: fn() -> u8) {
        self.caller_ring = reader;
    }

    /// Installs the reader of the calling guest's page-table root (the hypervisor's reads
    /// the VMCS guest CR3 and applies [`nk_abi::process_root`]): asked only by `BIND` and
    /// when a process-bound capability is presented (nk-caps `pin.rs`).
    pub fn set_caller_root(&mut self, reader: fn() -> u64) {
        self.proto.table_mut().set_root_reader(reader);
    }

    /// Lends the AMs the hypervisor's frame allocator (the exo AM's `alloc`); until it is
    /// set, allocations fail with `NO_MEMORY`.
    pub fn set_frame_source(&mut self, frames: &'static dyn FrameSource) {
        self.shared.frames = Some(frames);
    }

    /// Sets how AMs learn where a VM's initial memory lies in host memory (the exo AM's
    /// initial frame sets): the hypervisor reads its EPT registry.
    pub fn set_guest_memory(&mut self, reader: fn(VmId) -> Option<(u64, u64)>) {
        self.shared.guest_memory = reader;
    }

    /// Lends the AMs host memory to read and write (the NVRAM AM's region copies, in
    /// frames it allocated); until it is set, such AMs refuse to load regions.
    pub fn set_host_memory(&mut self, host: &'static dyn HostMemory) {
        self.shared.host = Some(host);
    }

    /// Lends the AMs the durable device chosen at boot (the NVRAM AM's); until it is set,
    /// NVRAM operations fail with `NOT_PERMITTED`.
    pub fn set_media(&mut self, media: &'static dyn MediaSource) {
        self.shared.media = Some(media);
    }

    /// Lends the AMs synchronous dirty-flag reads; until it is set, every page of a
    /// region counts as dirty at commit (the diff still writes only changed blocks).
    pub fn set_dirty_source(&mut self, dirty: &'static dyn DirtySource) {
        self.shared.dirty = Some(dirty);
    }

    /// Lets every ring of `vm`, not only ring 0, call `INITIAL` and `RECEIVED` (the
    /// module option `ring3-caps`).
    pub fn allow_all_rings(&mut self, vm: VmId) {
        self.all_rings.insert(vm);
    }

    /// Registers a VM of this instance with a capability quota, and lets every AM grant it
    /// its initial capabilities. An AM that fails to grant is skipped and listed in the
    /// result.
    pub fn add_vm(&mut self, vm: VmId, quota: u32) -> Result<Vec<GrantFailure>, PrincipalError> {
        self.proto.table_mut().add_vm(vm, quota)?;
        self.placement.insert(vm, self.id());
        let mut granted = Vec::new();
        let mut report = Vec::new();
        for (slot, am) in self.shared.ams.iter().enumerate() {
            let id = AmId::new(FIRST_AM_ID + slot as u16);
            let mut services =
                AmServices { am: id, table: self.proto.table_mut(), effects: &mut self.effects, shared: &self.shared };
            match am.lock().grant_initial(vm, &mut services) {
                Ok(names) => granted.extend(names.into_iter().map(|name| (id, name))),
                Err(error) => report.push(GrantFailure { am: id, error }),
            }
        }
        self.initial.insert(vm, granted);
        self.inbox.insert(vm, Inbox::default());
        Ok(report)
    }

    /// Registers VM `vm` as [`add_vm`](Self::add_vm) does, then appends to its `INITIAL`
    /// list a delegated child (same rights, bound to `vm`) of each of `creator`'s `INITIAL`
    /// capabilities whose index is set in `mask` (the guest-OS AM's `create`, which
    /// checked that `creator` lives on this instance). A capability that cannot be
    /// delegated here at once (gone since, or held on another instance) is skipped; the
    /// list keeps index order. Revoking the creator's capability kills the VM's copy.
    #[cold]
    #[inline(never)]
    pub fn add_vm_with_copies<O>(
        &mut self,
        vm: VmId,
        quota: u32,
        creator: VmId,
        mask: u64,
        out: &mut O,
    ) -> Result<Vec<GrantFailure>, PrincipalError>
    where
        O: Outbox + ?Sized,
    {
        let report = self.add_vm(vm, quota)?;
        let chosen: Vec<(AmId, CapName)> = self
            .initial_caps(creator)
            .iter()
            .enumerate()
            .filter(|&(i, _)| i < 64 && mask & (1 << i) != 0)
            .map(|(_, &cap)| cap)
            .collect();
        let mut copies = Vec::new();
        for (am, name) in chosen {
            let (caller, to, kernel) = (Principal::Vm(creator), Principal::Vm(vm), self.id());
            if let Started::Done(Ok(Outcome::Name(copy))) =
                self.proto.delegate(caller, name, to, kernel, Rights::ALL, Binding::Bound, out)
            {
                copies.push((am, copy));
            }
        }
        self.initial.entry(vm).or_default().extend(copies);
        Ok(report)
    }

    /// Lets each AM grant the AMs registered after it (the layers above) capabilities to
    /// its objects on this instance ([`AbstractMachine::grant_to_am`], then
    /// [`AbstractMachine::received_from_am`]; seed §5.2.1): called once per instance after
    /// every AM was added. Returns the grants that failed.
    pub fn connect_ams(&mut self) -> Vec<GrantFailure> {
        let mut report = Vec::new();
        let instance = u32::from(self.id().raw());
        for lower in 0..self.shared.ams.len() {
            for upper in lower + 1..self.shared.ams.len() {
                let (lower_id, upper_id) =
                    (AmId::new(FIRST_AM_ID + lower as u16), AmId::new(FIRST_AM_ID + upper as u16));
                let registry = self.proto.table().registry();
                let (Some(lower_name), Some(upper_name)) = (registry.am_name(lower_id), registry.am_name(upper_id))
                else {
                    continue;
                };
                let (lower_name, upper_name) =
                    (alloc::string::String::from(lower_name), alloc::string::String::from(upper_name));
                let mut services = AmServices {
                    am: lower_id,
                    table: self.proto.table_mut(),
                    effects: &mut self.effects,
                    shared: &self.shared,
                };
                match self.shared.ams[lower].lock().grant_to_am(upper_id, &upper_name, &mut services) {
                    Ok(names) if !names.is_empty() => {
                        self.shared.ams[upper].lock().received_from_am(lower_id, &lower_name, instance, &names);
                    }
                    Ok(_) => {}
                    Err(error) => report.push(GrantFailure { am: lower_id, error }),
                }
            }
        }
        report
    }

    /// Takes the effects the AMs emitted since the last call, for the hypervisor to apply
    /// (in order) before the operation that caused them returns to its caller, and before
    /// the messages it produced are sent.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        core::mem::take(&mut self.effects)
    }

    /// Hands the effects the AMs emitted since the last call to `apply`, in order (as
    /// [`take_effects`](Self::take_effects), but the list keeps its memory, so the next
    /// effect needs no allocation). `Effect::Retire` is the null-Kernel's own: it deletes
    /// the retired root here (what that deletion makes the AMs emit is handed to `apply`
    /// after the rest of the list), and its messages to other kernels go to `out`; a root
    /// held on another instance is handed to `apply`, to be forwarded there
    /// ([`retire_forwarded`](Self::retire_forwarded)).
    ///
    /// Retirement lives here, not in [`dispatch`](Self::dispatch): the AM that retired is
    /// no longer busy with its call, and a call that retired nothing pays nothing.
    pub fn apply_effects<O>(&mut self, out: &mut O, mut apply: impl FnMut(Effect))
    where
        O: Outbox + ?Sized,
    {
        // By index: a retirement appends what it causes, handled in this same loop.
        let mut next = 0;
        while let Some(&effect) = self.effects.get(next) {
            next += 1;
            match effect {
                // A root another kernel holds (an lwC's, whose copy with the `destroy`
                // right died here): the hypervisor forwards it to that kernel, which
                // retires it with `retire_forwarded`.
                Effect::Retire { root, .. } if root.kernel() != self.id() => apply(effect),
                Effect::Retire { am, root } => self.retire(am, root, out),
                Effect::LwcCreate { parent, child, mask, received, .. } => {
                    self.add_lwc(parent, child, (mask, received), out);
                    apply(effect);
                }
                Effect::LwcImport { from, to, mask } => {
                    self.import_lwc(from, to, mask, out);
                    apply(effect);
                }
                Effect::LwcDestroy { child, .. } => {
                    // Ended already when the creator's principal went first. The removal
                    // waits for other kernels when the lwC delegated there; its completion
                    // is nobody's reply, as a retirement's.
                    if let Ok(Dispatched::Pending(op)) = self.remove_vm(child, out) {
                        self.retiring.insert(op);
                    }
                    self.placement.remove(&child);
                    apply(effect);
                }
                effect => apply(effect),
            }
        }
        self.effects.clear();
    }

    /// Deletes root capability `root` of AM `am` ([`Effect::Retire`]) with its subtree, as
    /// the AM's own `DELETE`: the AMs hear of every capability that dies, and remote
    /// copies leave through the protocol, whose completion is nobody's reply
    /// ([`poll`](Self::poll) drops it). A root the AM does not hold (gone already) is left
    /// alone (the table refuses it).
    #[cold]
    #[inline(never)]
    fn retire<O>(&mut self, am: AmId, root: CapName, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        let am = Principal::Am(am);
        let hook = &mut AmHook::new(&self.shared.ams, &mut self.effects, &mut self.inbox, self.listed, &mut self.dead);
        if let Started::Pending(op) = self.proto.delete(am, root, hook, out) {
            self.retiring.insert(op);
        }
    }

    /// Retires root capability `root` of AM `am`, held on this instance, for another
    /// instance whose AM hook emitted the [`Effect::Retire`] (its `apply_effects` handed it
    /// on, as the root is not there): as [`apply_effects`](Self::apply_effects) would have.
    /// What the deletion makes the AMs emit waits for the next `apply_effects`.
    #[cold]
    #[inline(never)]
    pub fn retire_forwarded<O>(&mut self, am: AmId, root: CapName, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        if root.kernel() == self.id() {
            self.retire(am, root, out);
        }
    }

    /// Registers principal `child`, a new light-weight context of `parent`
    /// ([`Effect::LwcCreate`]), on this instance with `parent`'s quota, and hands it a
    /// delegated child (same rights, bound) of each of `parent`'s `INITIAL` capabilities
    /// whose index is set in `mask`, then of each of its `RECEIVED` ones whose index is set
    /// in `received`, as its own `INITIAL` list. A capability that fails to
    /// delegate (gone since) is skipped; the child's list stays in index order.
    #[cold]
    #[inline(never)]
    fn add_lwc<O>(&mut self, parent: VmId, child: VmId, (mask, received): (u64, u32), out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        let quota = self.table().usage(Principal::Vm(parent)).map_or(0, |usage| usage.quota);
        if self.proto.table_mut().add_vm(child, quota).is_err() {
            return;
        }
        self.placement.insert(child, self.id());
        let mut chosen: Vec<(AmId, CapName)> = self
            .initial_caps(parent)
            .iter()
            .enumerate()
            .filter(|&(i, _)| i < 64 && mask & (1 << i) != 0)
            .map(|(_, &cap)| cap)
            .collect();
        if received != 0 {
            // The parent's inbox as `RECEIVED` lists it now (dead entries pruned first).
            let names: Vec<CapName> = self.pruned_inbox(parent).map_or_else(Vec::new, |inbox| {
                let listed = inbox.entries.iter().take(32).enumerate();
                listed.filter(|&(i, _)| received & (1 << i) != 0).map(|(_, entry)| entry.name).collect()
            });
            for name in names {
                if let Ok(info) = self.table().inspect(Principal::Vm(parent), name) {
                    chosen.push((info.object.am, name));
                }
            }
        }
        let mut granted = Vec::new();
        for (am, name) in chosen {
            let (caller, to, kernel) = (Principal::Vm(parent), Principal::Vm(child), self.id());
            if let Started::Done(Ok(Outcome::Name(copy))) =
                self.proto.delegate(caller, name, to, kernel, Rights::ALL, Binding::Bound, out)
            {
                granted.push((am, copy));
            }
        }
        self.initial.insert(child, granted);
        self.inbox.insert(child, Inbox::default());
    }

    /// Appends to lwC `to`'s `INITIAL` list a delegated copy (same rights, bound) of each
    /// `INITIAL` capability of lwC `from` whose index is set in `mask`
    /// ([`Effect::LwcImport`], `lwOverlay`'s capability part); charged to `from` as any
    /// delegation to its delegator. A capability that fails to delegate is skipped; the list
    /// holds at most 64 (what a mask can name).
    #[cold]
    #[inline(never)]
    fn import_lwc<O>(&mut self, from: VmId, to: VmId, mask: u64, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        let chosen: Vec<(AmId, CapName)> = self
            .initial_caps(from)
            .iter()
            .enumerate()
            .filter(|&(i, _)| i < 64 && mask & (1 << i) != 0)
            .map(|(_, &cap)| cap)
            .collect();
        for (am, name) in chosen {
            if self.initial_caps(to).len() >= 64 || !self.initial.contains_key(&to) {
                return;
            }
            let (caller, target, kernel) = (Principal::Vm(from), Principal::Vm(to), self.id());
            if let Started::Done(Ok(Outcome::Name(copy))) =
                self.proto.delegate(caller, name, target, kernel, Rights::ALL, Binding::Bound, out)
            {
                if let Some(list) = self.initial.get_mut(&to) {
                    list.push((am, copy));
                }
            }
        }
    }

    /// Tells whether effects are waiting to be applied.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// Runs operation `op` of the AM called `am` for `vm` on the VM's initial capability of
    /// that AM, with a data buffer (the AM's `invoke_by_am`): how a device the hypervisor
    /// emulates for a VM (the virtio block device, osvm.rs) turns the VM's requests into
    /// AM operations checked against the VM's own capability, as the VM's hypercall would
    /// be. A capability the VM no longer holds (revoked, deleted) finds no object, so the
    /// request fails. Out of line from the hypercall path: only device exits call it.
    #[cold]
    #[inline(never)]
    pub fn call_for_vm(
        &mut self,
        vm: VmId,
        am: &str,
        op: &str,
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, AmError> {
        let route = self.device_route(vm, am, [op]).ok_or(AmError::NotPermitted)?;
        self.call_routed(vm, route.ops[0], route.cap, args, data)
    }

    /// Resolves, once, what [`call_for_vm`](Self::call_for_vm) looks up by name at every
    /// call: AM `am`'s operations `ops` and `vm`'s initial capability of that AM (an
    /// emulated device keeps it and calls [`call_routed`](Self::call_routed)). None when
    /// the AM, an operation or the capability is missing.
    pub fn device_route<const N: usize>(&self, vm: VmId, am: &str, ops: [&str; N]) -> Option<DeviceRoute<N>> {
        let table = self.proto.table();
        let am_id = am_to_am::am_named(&self.shared, table, am)?;
        let mut found = [OpId::new(am_id, 0); N];
        for (slot, name) in found.iter_mut().zip(ops) {
            *slot = table.registry().find_op(am_id, name)?;
        }
        let cap = self.initial.get(&vm)?.iter().find(|(a, _)| *a == am_id).map(|&(_, name)| name)?;
        Some(DeviceRoute { ops: found, cap })
    }

    /// Runs operation `op` for `vm` on capability `cap` (a [`DeviceRoute`]'s) with a data
    /// buffer, checked as [`call_for_vm`](Self::call_for_vm)'s call is: the capability
    /// must still be the VM's and live, with the operation's rights.
    pub fn call_routed(
        &mut self,
        vm: VmId,
        op: OpId,
        cap: CapName,
        args: &[u64; nk_am::PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<nk_am::Outcome, AmError> {
        if op.am().raw() < FIRST_AM_ID {
            return Err(AmError::NotPermitted);
        }
        let table = self.proto.table_mut();
        let mut services = AmServices { am: op.am(), table, effects: &mut self.effects, shared: &self.shared };
        am_to_am::checked_invoke(&mut services, Principal::Vm(vm), op, &[cap], args, data)
    }

    /// Returns the initial capabilities of `vm` (AM id, name).
    pub fn initial_caps(&self, vm: VmId) -> &[(AmId, CapName)] {
        self.initial.get(&vm).map_or(&[], Vec::as_slice)
    }

    /// Describes `vm`'s live initial capabilities for its NKCP table (`nk_abi::nkcp`, the
    /// channel by which a guest OS's operator hands capability names to its processes):
    /// name, AM, kind and an `<am>/<kind>` label, in `INITIAL` order.
    pub fn handed_caps(&self, vm: VmId) -> Vec<nk_abi::nkcp::Entry> {
        let registry = self.table().registry();
        self.initial_caps(vm)
            .iter()
            .filter_map(|&(_, name)| {
                let info = self.table().inspect(Principal::Vm(vm), name).ok()?;
                let object = info.object;
                let am = registry.am_name(object.am).unwrap_or("am");
                let kind = registry.kind_name(object.am, object.kind).unwrap_or("object");
                let label = alloc::format!("{am}/{kind}");
                Some(nk_abi::nkcp::Entry::new(words_of(name), object.am.raw(), u32::from(object.kind.raw()), &label))
            })
            .collect()
    }

    /// Returns the live capabilities other principals delegated to `vm`, in arrival order.
    pub fn inbox(&self, vm: VmId) -> Vec<InboxEntry> {
        let live = |entry: &&InboxEntry| alive(self.table(), vm, entry.name);
        self.inbox.get(&vm).map_or(Vec::new(), |inbox| inbox.entries.iter().filter(live).copied().collect())
    }

    /// Returns `vm`'s inbox, pruned of dead capabilities.
    fn pruned_inbox(&mut self, vm: VmId) -> Option<&mut Inbox> {
        let inbox = self.inbox.get_mut(&vm)?;
        self.listed -= inbox.prune(vm, self.proto.table());
        Some(inbox)
    }

    /// Tells whether `vm`'s inbox has room for one more entry.
    fn inbox_has_room(&mut self, vm: VmId) -> bool {
        match self.inbox.get(&vm) {
            Some(inbox) if inbox.entries.len() < INBOX_MAX => true,
            Some(_) => self.pruned_inbox(vm).is_some_and(|inbox| inbox.entries.len() < INBOX_MAX),
            None => false,
        }
    }

    fn deliver_to_inbox(&mut self, vm: VmId, name: CapName, sender: Principal) {
        let Some(mut inbox) = self.inbox.get_mut(&vm) else { return };
        if inbox.entries.len() >= INBOX_MAX {
            match self.pruned_inbox(vm) {
                Some(pruned) if pruned.entries.len() < INBOX_MAX => inbox = pruned,
                _ => return,
            }
        }
        inbox.entries.push(InboxEntry { name, sender });
        self.listed += 1;
    }

    /// Removes a VM of this instance (it ended or crashed): every capability it held dies
    /// on every kernel, and derived ones with them; the AMs undo their effects. The reply
    /// (now, or from [`NullKernel::poll`]) counts the capabilities that died in result 0.
    pub fn remove_vm<O>(&mut self, vm: VmId, out: &mut O) -> Result<Dispatched, PrincipalError>
    where
        O: Outbox + ?Sized,
    {
        if self.table().usage(Principal::Vm(vm)).is_none() {
            return Err(PrincipalError::UnknownPrincipal);
        }
        self.initial.remove(&vm);
        self.all_rings.remove(&vm);
        if let Some(inbox) = self.inbox.remove(&vm) {
            self.listed -= inbox.entries.len();
        }
        let hook = &mut AmHook::new(&self.shared.ams, &mut self.effects, &mut self.inbox, self.listed, &mut self.dead);
        Ok(started(self.proto.crash(vm, &[], hook, out)))
    }

    /// Handles a message another kernel instance sent; the messages it causes go to `out`.
    /// Completions of parked calls become available through [`NullKernel::poll`].
    pub fn handle<O>(&mut self, from: KernelId, message: Message, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        if let Message::Delegate { grant, holder: Principal::Vm(vm), delegator, .. } = message {
            // The answer says whether the child was created (live, held by the VM): watch
            // it leave instead of looking the child up again (issue 14).
            let mut watch = AcceptWatch { out, child: grant.child, accepted: false };
            {
                // The hook (and any AM lock it holds) goes before the inbox is touched.
                let hook =
                    &mut AmHook::new(&self.shared.ams, &mut self.effects, &mut self.inbox, self.listed, &mut self.dead);
                self.proto.handle(from, message, hook, &mut watch);
            }
            if watch.accepted {
                self.deliver_to_inbox(vm, grant.child, delegator);
            }
            return;
        }
        let hook = &mut AmHook::new(&self.shared.ams, &mut self.effects, &mut self.inbox, self.listed, &mut self.dead);
        self.proto.handle(from, message, hook, out);
    }

    /// Tells whether [`NullKernel::poll`] has something to return, so the hypercall path
    /// polls only when a call or removal finished.
    pub fn has_finished(&self) -> bool {
        self.proto.has_completions()
    }

    /// Returns the next call (or VM removal) that waited for other kernels and finished.
    pub fn poll(&mut self) -> Option<Finished> {
        let mut done = self.proto.poll()?;
        while self.retiring.remove(&done.op) {
            // A retired root's remote copies are gone: no one waits for that.
            done = self.proto.poll()?;
        }
        if let (Some((vm, sender)), Ok(Outcome::Name(name))) = (self.inbox_on_completion.remove(&done.op), done.result)
        {
            self.deliver_to_inbox(vm, name, sender);
        }
        Some(Finished { op: done.op, reply: outcome_reply(done.result) })
    }

    /// Handles one hypercall from `caller`; the messages it needs go to `out`.
    pub fn dispatch<O>(&mut self, caller: VmId, call: &Call, out: &mut O) -> Dispatched
    where
        O: Outbox + ?Sized,
    {
        if let Some(reply) = stateless_reply(call) {
            return Dispatched::Reply(reply);
        }
        self.dispatch_stateful(caller, call, out)
    }

    /// Handles one hypercall as [`dispatch_stateful`](Self::dispatch_stateful) does, reading
    /// the call from `frame` and writing a finished call's reply back over it (the
    /// hypervisor's saved guest registers): the hypercall path's entry, so an AM call's
    /// reply goes from the handler's outcome straight to the registers the guest resumes
    /// with, not through a [`Dispatched`] copied twice (issue 14). Returns the operation
    /// the caller waits for, leaving `frame` as it was, or `None` once the reply is in
    /// place.
    #[inline]
    pub fn dispatch_stateful_in_place<O, F>(&mut self, caller: VmId, frame: &mut F, out: &mut O) -> Option<PendingOp>
    where
        O: Outbox + ?Sized,
        F: CallFrame + ?Sized,
    {
        let call = frame.call();
        let selector = Selector::decode(call.selector);
        // Each branch stores its reply itself: one copy, not two through a common local.
        if selector.am != NULL_KERNEL_AM {
            self.am_op_inline(Principal::Vm(caller), selector, frame);
        } else if selector.op == nk_op::DERIVE && name_of(call.caps[0]).kernel() == self.id() {
            *frame.reply_mut() = self.local_derive(caller, name_of(call.caps[0]), call.args[0]);
        } else {
            match self.null_kernel_op(caller, selector.op, call, out) {
                Dispatched::Reply(reply) => *frame.reply_mut() = reply,
                Dispatched::Pending(op) => return Some(op),
            }
        }
        None
    }

    /// Tells whether `frame` holds an AM call (an operation of a registered AM, not of the
    /// null-Kernel): [`dispatch_stateful_in_place`](Self::dispatch_stateful_in_place) gives
    /// such a call to [`am_call_in_place`](Self::am_call_in_place) and never an outbox.
    #[inline(always)]
    pub fn is_am_call(call: &Call) -> bool {
        Selector::decode(call.selector).am != NULL_KERNEL_AM
    }

    /// Handles an AM call ([`is_am_call`](Self::is_am_call)) of `caller` as
    /// [`dispatch_stateful_in_place`](Self::dispatch_stateful_in_place) does, for a caller
    /// that asked [`stateless_reply`] already: it always finishes and sends no message, so
    /// the hypervisor's path for it builds no outbox (issue 14).
    #[inline(always)]
    pub fn am_call_in_place<F: CallFrame + ?Sized>(&mut self, caller: VmId, frame: &mut F) {
        let selector = Selector::decode(frame.call().selector);
        debug_assert_ne!(selector.am, NULL_KERNEL_AM);
        self.am_op_inline(Principal::Vm(caller), selector, frame);
    }

    /// Handles one hypercall as [`dispatch`](Self::dispatch) does, for a caller that asked
    /// [`stateless_reply`] already and got `None` (the hypervisor, which asks before it
    /// takes the instance's lock): the hypercall path decodes the selector once.
    #[inline]
    pub fn dispatch_stateful<O>(&mut self, caller: VmId, call: &Call, out: &mut O) -> Dispatched
    where
        O: Outbox + ?Sized,
    {
        let selector = Selector::decode(call.selector);
        if selector.am == NULL_KERNEL_AM {
            if selector.op == nk_op::DERIVE {
                let c = name_of(call.caps[0]);
                if c.kernel() == self.id() {
                    return Dispatched::Reply(self.local_derive(caller, c, call.args[0]));
                }
            }
            return self.null_kernel_op(caller, selector.op, call, out);
        }
        Dispatched::Reply(self.am_op(Principal::Vm(caller), selector, call))
    }

    /// Derives a child of `c`, a capability of this instance, for `caller`: the reply
    /// `DERIVE` gets through the protocol (whose derive of a local capability is the
    /// table's derive and nothing else), without the protocol operation's wrapping of the
    /// result, so a local derive pays for the table's work alone (issue 14).
    #[inline]
    fn local_derive(&mut self, caller: VmId, c: CapName, mask: u64) -> Reply {
        match self.proto.table_mut().derive(Principal::Vm(caller), c, Rights::from_bits(mask)) {
            Ok(name) => success(Some(name), [0; 4]),
            Err(error) => failure(cap_status(error)),
        }
    }

    /// An operation of a registered AM: decode, check every capability, invoke.
    fn am_op(&mut self, caller: Principal, selector: Selector, call: &Call) -> Reply {
        let mut frame = SplitFrame { call, reply: Reply::default() };
        self.am_op_inline(caller, selector, &mut frame);
        frame.reply
    }

    /// [`am_op`](Self::am_op) inlined into the hypercall path's
    /// [`dispatch_stateful_in_place`](Self::dispatch_stateful_in_place): the call is read
    /// from `frame` and the reply written over it, the handler's outcome copied once (issue
    /// 14: through a returned `Reply` it was copied twice).
    #[inline(always)]
    fn am_op_inline<F: CallFrame + ?Sized>(&mut self, caller: Principal, selector: Selector, frame: &mut F) {
        let call = frame.call();
        let am = AmId::new(selector.am);
        let table = self.proto.table_mut();
        let checked = &mut self.checked;
        // One registry lookup, in the check; the names are read where the call holds them.
        // Which of the two refusals a miss gets is decided off the fast path.
        let check = match u16::try_from(selector.op) {
            Ok(index) => table.check_slots_into(
                caller,
                OpId::new(am, index),
                call.caps.iter().map(|&words| name_of(words)),
                checked,
            ),
            Err(_) => Err(CheckError::UnknownOperation),
        };
        let refused = match check {
            Ok(()) => None,
            Err(CheckError::Arg { index, fault }) => Some(arg_status(index, fault)),
            Err(CheckError::UnknownOperation) => {
                let code = if table.registry().has_am(am) { Status::UNKNOWN_OPERATION } else { Status::UNKNOWN_AM };
                Some(Status::new(code, None))
            }
            Err(CheckError::WrongArgCount { .. }) => Some(Status::new(Status::BAD_ARGUMENT, None)),
        };
        if let Some(status) = refused {
            *frame.reply_mut() = failure(status);
            return;
        }
        let slot = usize::from(am.raw() - FIRST_AM_ID);
        let Some(handler) = self.shared.ams.get(slot) else {
            *frame.reply_mut() = failure(Status::new(Status::UNKNOWN_AM, None));
            return;
        };
        let mut services = AmServices { am, table, effects: &mut self.effects, shared: &self.shared };
        let result = handler.lock().invoke(checked, &call.args, &mut services);
        match result {
            Ok(outcome) => {
                let reply = frame.reply_mut();
                reply.status = 0;
                reply.name = outcome.name.map(words_of).unwrap_or_default();
                reply.results = outcome.results;
            }
            Err(error) => *frame.reply_mut() = self.refusal(caller, failure(am_status(error))),
        }
    }

    /// Logs the first refusal of `caller` for a spent quota or a ring-3 enumeration
    /// (issue 9: a guest that tries to make the hypervisor allocate without bound, or a
    /// process that lists its kernel's capabilities, is refused, and the log says so once
    /// per VM); returns `reply`. Runs only on failures.
    #[cold]
    #[inline(never)]
    fn refusal(&mut self, caller: Principal, reply: Reply) -> Reply {
        if let (Principal::Vm(vm), Status::QUOTA_EXCEEDED) = (caller, reply.status().code()) {
            self.log_refusal(vm, Status::QUOTA_EXCEEDED, "quota exceeded (its share of capabilities, inbox or AM objects is spent; later refusals are not logged)");
        }
        reply
    }

    /// Logs `why` the first time `vm` is refused with `code`.
    #[cold]
    #[inline(never)]
    fn log_refusal(&mut self, vm: VmId, code: u16, why: &str) {
        if self.refusals_logged.insert((vm, code)) {
            log::warn!(target: "nk", "vm{}: refused: {why}", vm.raw());
        }
    }

    /// The null-Kernel's own operations on capabilities (but NULL, which `dispatch`
    /// answers itself). Kept out of line so the AM-call path in `dispatch` stays small.
    #[inline(never)]
    fn null_kernel_op<O>(&mut self, vm: VmId, op: u32, call: &Call, out: &mut O) -> Dispatched
    where
        O: Outbox + ?Sized,
    {
        let caller = Principal::Vm(vm);
        let c = name_of(call.caps[0]);
        let reply =
            |result: Result<Reply, CapError>| Dispatched::Reply(result.unwrap_or_else(|e| failure(cap_status(e))));
        // Built only on the paths that refuse (not before every operation).
        let bad_argument = || Dispatched::Reply(failure(Status::new(Status::BAD_ARGUMENT, None)));
        match op {
            nk_op::NULL => Dispatched::Reply(success(None, [0; 4])),
            nk_op::DERIVE => started(self.proto.derive(caller, c, Rights::from_bits(call.args[0]), out)),
            nk_op::DELEGATE => {
                let Ok(target) = u32::try_from(call.args[1]) else {
                    return bad_argument();
                };
                let binding = match call.args[2] {
                    0 => Binding::Bound,
                    1 => Binding::Bearer,
                    _ => return bad_argument(),
                };
                let target = VmId::new(target);
                let Some(&kernel) = self.placement.get(&target) else {
                    return bad_argument();
                };
                let to = Principal::Vm(target);
                let mask = Rights::from_bits(call.args[0]);
                let inboxed = kernel == self.id() && target != vm;
                if inboxed && !self.inbox_has_room(target) {
                    return Dispatched::Reply(self.refusal(caller, failure(Status::new(Status::QUOTA_EXCEEDED, None))));
                }
                let result = self.proto.delegate(caller, c, to, kernel, mask, binding, out);
                match result {
                    Started::Done(Ok(Outcome::Name(name))) if inboxed => self.deliver_to_inbox(target, name, caller),
                    Started::Pending(op) if inboxed => {
                        self.inbox_on_completion.insert(op, (target, caller));
                    }
                    Started::Done(Err(error)) => {
                        return Dispatched::Reply(self.refusal(caller, failure(proto_status(error))))
                    }
                    _ => {}
                }
                started(result)
            }
            nk_op::REVOKE | nk_op::DELETE => {
                let hook =
                    &mut AmHook::new(&self.shared.ams, &mut self.effects, &mut self.inbox, self.listed, &mut self.dead);
                started(match op {
                    nk_op::REVOKE => self.proto.revoke(caller, c, hook, out),
                    _ => self.proto.delete(caller, c, hook, out),
                })
            }
            nk_op::INSPECT => reply(self.table().inspect(caller, c).map(|info| {
                let holder = principal_word(info.holder);
                let bearer = u64::from(info.binding == Binding::Bearer);
                let process = u64::from(info.binding == Binding::Process) << 62;
                let object = (u64::from(info.object.am.raw()) << 32) | u64::from(info.object.kind.raw());
                success(None, [object, info.object.id.raw(), info.rights.bits(), holder | process | bearer])
            })),
            nk_op::BIND => {
                reply(self.proto.table_mut().bind_process(caller, c).map(|root| success(None, [root, 0, 0, 0])))
            }
            nk_op::INITIAL | nk_op::RECEIVED if (self.caller_ring)() != 0 && !self.all_rings.contains(&vm) => {
                let why = "INITIAL/RECEIVED from a ring other than 0 (the module line does not say ring3-caps)";
                self.log_refusal(vm, Status::NOT_PERMITTED, why);
                Dispatched::Reply(failure(Status::new(Status::NOT_PERMITTED, None)))
            }
            nk_op::INITIAL => {
                let index = usize::try_from(call.args[0]).unwrap_or(usize::MAX);
                match self.initial_caps(vm).get(index) {
                    Some(&(am, name)) => Dispatched::Reply(success(Some(name), [u64::from(am.raw()), 0, 0, 0])),
                    None => bad_argument(),
                }
            }
            nk_op::RECEIVED => {
                let index = usize::try_from(call.args[0]).unwrap_or(usize::MAX);
                let Some(inbox) = self.pruned_inbox(vm) else {
                    return bad_argument();
                };
                let count = inbox.entries.len() as u64;
                let Some(&InboxEntry { name, sender }) = inbox.entries.get(index) else {
                    return bad_argument();
                };
                let am = self.table().inspect(caller, name).map_or(0, |info| u64::from(info.object.am.raw()));
                Dispatched::Reply(success(Some(name), [am, count, principal_word(sender), 0]))
            }
            _ => Dispatched::Reply(failure(Status::new(Status::UNKNOWN_OPERATION, None))),
        }
    }
}

#[cfg(test)]
mod tests;
