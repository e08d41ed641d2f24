//! One kernel instance: its capability table and the operations that wait for other
//! kernels, with the local entry points that start operations (DESIGN.md §3).

use alloc::collections::{btree_map, BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;

use nk_caps::{
    Binding, CapError, CapName, CapTable, DeadCap, KernelId, LinkEvent, NodeState, Principal, RevocationHook,
    RevokeStart, Rights, VmId,
};

use crate::error::ProtoError;
use crate::small_map::SortedMap;

/// Up to this many waited-for names, a batched `GoneBelow` compares each of its names
/// with them instead of looking each up in the waiters' map.
const FEW_WAITERS: usize = 4;
use crate::message::{Message, Outbox, Routed};
use crate::op::{Completion, OpId, Outcome, Started};

/// Holds one kernel instance's share of the distributed capability system: its
/// [`CapTable`] and the protocol state of the operations under way.
///
/// Every method runs to completion on the calling CPU and never blocks: an operation that
/// needs other kernels sends its messages through the [`Outbox`] and returns
/// [`Started::Pending`]; its [`Completion`] appears in [`Kernel::poll`] once the answers
/// have been [`handle`](Kernel::handle)d. The crate docs describe the protocol.
pub struct Kernel {
    pub(crate) table: CapTable,
    /// The number of kernel instances; valid ids are `0..kernels`.
    kernels: u16,
    next_op: u64,
    /// The operations waiting for messages.
    pub(crate) ops: SortedMap<OpId, Op>,
    /// Completions not yet polled.
    done: VecDeque<Completion>,
    /// Revocations that a parent's kernel requested and that still wait for remote parts:
    /// root -> capabilities killed so far, reported in the root's [`Message::Gone`].
    pub(crate) requests: BTreeMap<CapName, u64>,
    /// Proxies sent a revoke of their own ([`Message::Revoke`]) -> what the count in
    /// their `Gone` adds to.
    pub(crate) sent_by: BTreeMap<CapName, Option<Tally>>,
    /// Batched revokes sent ([`Message::RevokeBelow`]), by local parent and the kernel of
    /// its children: what the count in their [`Message::GoneBelow`] adds to, and the
    /// proxies the batch covers (so the answer costs its own members, not a scan of the
    /// parent's children). One name per marked proxy: bounded by the table's capacity.
    pub(crate) batches: BTreeMap<(CapName, KernelId), Batch>,
    /// Batched revokes received and not yet answered, by the sender's parent: at most one
    /// per proxy of this table.
    pub(crate) below: BTreeMap<CapName, Below>,
    /// Operations waiting for a capability to be finalized or a proxy to be gone.
    pub(crate) waiters: BTreeMap<CapName, Vec<OpId>>,
    /// Delegations waiting for their acknowledgement, by child.
    pub(crate) delegations: SortedMap<CapName, OpId>,
    /// Obtains waiting for their grant, by reserved child.
    pub(crate) obtains: SortedMap<CapName, OpId>,
    /// The crash operation under way for each VM.
    pub(crate) crashes: BTreeMap<VmId, OpId>,
    /// Link events of the last table call, reused to avoid allocating.
    pub(crate) events: Vec<LinkEvent>,
    scratch: Vec<CapName>,
}

/// A batched revoke this kernel sent and whose answer it waits for.
#[derive(Debug)]
pub(crate) struct Batch {
    /// What the answer's count adds to.
    pub(crate) tally: Option<Tally>,
    /// The proxies it covers.
    pub(crate) proxies: Vec<CapName>,
}

/// A batched revoke this kernel received and has not answered yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Below {
    /// The kernel that sent it (the parent's).
    pub(crate) from: KernelId,
    /// The children whose finalization is still awaited.
    pub(crate) outstanding: usize,
    /// The capabilities the batch killed so far.
    pub(crate) killed: u64,
}

/// Says what the count in a proxy's `Gone` adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tally {
    /// A revocation a parent's kernel requested, by root.
    Request(CapName),
    /// An operation of this kernel.
    Op(OpId),
    /// A batched revoke a parent's kernel requested, by that parent.
    Below(CapName),
}

/// Says who waits for an operation's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A caller on this kernel: the result goes to [`Kernel::poll`].
    Local,
    /// Operation `op` of kernel `kernel`, which routed the request here.
    Remote(KernelId, OpId),
}

/// An operation waiting for messages.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) origin: Origin,
    pub(crate) state: OpState,
}

#[derive(Debug)]
pub(crate) enum OpState {
    /// Waits for the [`Message::ObtainAck`] of its reservation (`Kernel::obtains`).
    Obtain,
    /// Waits for the [`Message::DelegateAck`] of its child (`Kernel::delegations`).
    Delegate,
    /// Waits for the [`Message::RoutedDone`] of the owner's kernel.
    Routed,
    /// Waits for `target` (a local capability or a proxy) to be finalized.
    Revoke {
        target: CapName,
        waits: u32,
        killed: u64,
        /// It found the revocation under way (it reports `Revoked` when that ends).
        joined: bool,
        /// It is a delete: the capability is freed when finalized.
        delete: bool,
    },
    /// Waits for the VM's revoking capabilities here and for the other kernels' answers.
    Crash { vm: VmId, waits: u32, kernels: u32, killed: u64, followers: Vec<OpId> },
    /// Waits for another crash operation of the same VM: for its local part only when
    /// another kernel asks (so two kernels crashing one VM at once never wait for each
    /// other), for all of it when a local caller asks.
    Follow { local_only: bool },
}

impl Kernel {
    /// Wraps `table`, the capability table of one of `kernels` kernel instances (ids
    /// `0..kernels`). Fails if the table's kernel id is out of that range.
    pub fn new(table: CapTable, kernels: u16) -> Result<Self, ProtoError> {
        if table.kernel().raw() >= kernels {
            return Err(ProtoError::UnknownKernel);
        }
        Ok(Self {
            table,
            kernels,
            next_op: 0,
            ops: SortedMap::new(),
            done: VecDeque::new(),
            requests: BTreeMap::new(),
            sent_by: BTreeMap::new(),
            batches: BTreeMap::new(),
            below: BTreeMap::new(),
            waiters: BTreeMap::new(),
            delegations: SortedMap::new(),
            obtains: SortedMap::new(),
            crashes: BTreeMap::new(),
            events: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Returns this kernel's id.
    pub fn id(&self) -> KernelId {
        self.table.kernel()
    }

    /// Returns the number of kernel instances.
    pub fn kernels(&self) -> u16 {
        self.kernels
    }

    /// Returns the capability table, for checks of AM operations ([`CapTable::check`]),
    /// inspection and look-ups.
    pub fn table(&self) -> &CapTable {
        &self.table
    }

    /// Returns the capability table for setup: registering AMs and VMs, minting roots.
    /// Capability operations that may involve other kernels (derive, delegate, revoke,
    /// delete, a VM's removal) must go through this kernel's methods, not the table's, or
    /// the other kernels never hear of them.
    pub fn table_mut(&mut self) -> &mut CapTable {
        &mut self.table
    }

    /// Returns the next completion of an operation that had to wait, if any.
    pub fn poll(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    /// Tells whether a completion waits for [`Kernel::poll`] (a check that touches no
    /// map, for the hypercall path).
    pub fn has_completions(&self) -> bool {
        !self.done.is_empty()
    }

    /// Returns the number of this kernel's operations still waiting for messages
    /// (including those routed here by other kernels).
    pub fn pending_ops(&self) -> usize {
        self.ops.len()
    }

    /// Tells whether nothing waits here: no operation, no revocation, no handshake.
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty()
            && self.requests.is_empty()
            && self.sent_by.is_empty()
            && self.batches.is_empty()
            && self.below.is_empty()
            && self.waiters.is_empty()
            && self.delegations.is_empty()
            && self.obtains.is_empty()
            && self.crashes.is_empty()
    }

    // ---------------------------------------------------------------------------------
    // Operations a principal of this kernel starts.
    // ---------------------------------------------------------------------------------

    /// Derives a child of `cap` for `caller`, with `cap`'s rights masked by `mask` and
    /// its binding. For a capability of another kernel (a bearer name, or one `caller`
    /// holds there) this is SemperOS's *obtain*: the child is reserved here and granted by
    /// the owner's kernel.
    pub fn derive<O>(&mut self, caller: Principal, cap: CapName, mask: Rights, out: &mut O) -> Started
    where
        O: Outbox + ?Sized,
    {
        let owner = cap.kernel();
        if owner == self.id() {
            return Started::Done(self.table.derive(caller, cap, mask).map(Outcome::Name).map_err(ProtoError::from));
        }
        if !self.valid(owner) {
            return Started::Done(Err(CapError::UnknownName.into()));
        }
        self.start_obtain(Origin::Local, caller, caller, cap, mask, None, out)
    }

    /// Delegates a child of `cap` (rights masked by `mask`) to `target`, which lives on
    /// kernel `kernel`, bound to it or as a bearer capability. Across kernels this is
    /// SemperOS's delegation handshake: the child is created in `kernel`'s table, linked
    /// to its parent here. A `cap` of another kernel is delegated by that kernel (the
    /// request is routed there), or obtained for `target` when `target` lives here.
    #[allow(clippy::too_many_arguments)]
    pub fn delegate<O>(
        &mut self,
        caller: Principal,
        cap: CapName,
        target: Principal,
        kernel: KernelId,
        mask: Rights,
        binding: Binding,
        out: &mut O,
    ) -> Started
    where
        O: Outbox + ?Sized,
    {
        self.start_delegate(Origin::Local, caller, cap, target, kernel, mask, binding, out)
    }

    /// Revokes `cap` and, transitively, everything derived from it on every kernel. The
    /// completion comes when all of it is unusable everywhere and every AM concerned has
    /// undone its effects (`hook` here, the other kernels' hooks there). The caller must be
    /// able to use `cap` or hold its parent; for a capability of another kernel, either
    /// `caller` holds its parent here (it takes back what it delegated) or the request is
    /// routed to the owner's kernel.
    ///
    /// Revoking a capability whose revocation is under way waits for that one to end and
    /// then reports `Revoked`, as revoking an already revoked one does at once.
    pub fn revoke<H, O>(&mut self, caller: Principal, cap: CapName, hook: &mut H, out: &mut O) -> Started
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        self.start_revoke(Origin::Local, caller, cap, false, hook, out)
    }

    /// Deletes `cap`, which `caller` holds here: a live capability is revoked first, with
    /// its subtree on every kernel, and freed when that is complete.
    pub fn delete<H, O>(&mut self, caller: Principal, cap: CapName, hook: &mut H, out: &mut O) -> Started
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        self.start_revoke(Origin::Local, caller, cap, true, hook, out)
    }

    /// Handles the crash (or destruction) of VM `vm`: it may receive no new capability,
    /// everything it holds here and on the kernels in `also_on` (where it also runs) is
    /// revoked with its subtrees on every kernel, and when that is complete its
    /// capabilities are freed and it is forgotten. The count is of all capabilities that
    /// died.
    pub fn crash<H, O>(&mut self, vm: VmId, also_on: &[KernelId], hook: &mut H, out: &mut O) -> Started
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        self.start_crash(Origin::Local, vm, also_on, hook, out)
    }

    // ---------------------------------------------------------------------------------
    // Starting operations, for local callers and routed requests alike.
    // ---------------------------------------------------------------------------------

    /// Tells whether `kernel` is one of the machine's kernels.
    pub(crate) fn valid(&self, kernel: KernelId) -> bool {
        kernel.raw() < self.kernels
    }

    /// Records an operation that waits for messages and returns its id.
    fn park(&mut self, origin: Origin, state: OpState) -> OpId {
        let id = OpId::new(self.next_op);
        self.next_op += 1;
        self.ops.insert(id, Op { origin, state });
        id
    }

    /// Makes `op` wait for `name` to be finalized (or, for a proxy, gone).
    fn wait_for(&mut self, name: CapName, op: OpId) {
        self.waiters.entry(name).or_default().push(op);
    }

    /// Reserves a child of remote `parent` for `holder` and asks `parent`'s kernel to grant
    /// it to `presenter`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_obtain<O>(
        &mut self,
        origin: Origin,
        presenter: Principal,
        holder: Principal,
        parent: CapName,
        mask: Rights,
        binding: Option<Binding>,
        out: &mut O,
    ) -> Started
    where
        O: Outbox + ?Sized,
    {
        // The presenter asked for the child: a derive's holder, or a delegation's delegator.
        let child = match self.table.reserve_remote(holder, presenter, parent) {
            Ok(child) => child,
            Err(error) => return Started::Done(Err(error.into())),
        };
        let id = self.park(origin, OpState::Obtain);
        self.obtains.insert(child, id);
        out.send(parent.kernel(), Message::Obtain { child, parent, presenter, mask, binding });
        Started::Pending(id)
    }

    /// Starts a delegation for `origin`: local, across kernels from a local parent, an
    /// obtain for a target of this kernel, or routed to the parent's kernel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_delegate<O>(
        &mut self,
        origin: Origin,
        caller: Principal,
        cap: CapName,
        target: Principal,
        kernel: KernelId,
        mask: Rights,
        binding: Binding,
        out: &mut O,
    ) -> Started
    where
        O: Outbox + ?Sized,
    {
        if !self.valid(kernel) {
            return Started::Done(Err(ProtoError::UnknownKernel));
        }
        let owner = cap.kernel();
        let here = self.id();
        if owner == here {
            if kernel == here {
                // The delegator pays (nk-caps, "Quotas"); a routed request's presenter that is
                // not registered here cannot, and then the target does, as across kernels.
                let result = match self.table.delegate(caller, cap, target, mask, binding) {
                    Err(CapError::UnknownPrincipal) if self.table.usage(caller).is_none() => {
                        self.table.grant(caller, cap, target, mask, binding)
                    }
                    result => result,
                };
                return Started::Done(result.map(Outcome::Name).map_err(ProtoError::from));
            }
            return match self.table.delegate_remote(caller, cap, kernel, mask, binding) {
                Ok(grant) => {
                    let id = self.park(origin, OpState::Delegate);
                    self.delegations.insert(grant.child, id);
                    out.send(kernel, Message::Delegate { grant, parent: cap, holder: target, delegator: caller });
                    Started::Pending(id)
                }
                Err(error) => Started::Done(Err(error.into())),
            };
        }
        // A routed request names a capability of its receiver: never route it again.
        if !self.valid(owner) || origin != Origin::Local {
            return Started::Done(Err(CapError::UnknownName.into()));
        }
        if kernel == here {
            return self.start_obtain(origin, caller, target, cap, mask, Some(binding), out);
        }
        let id = self.park(origin, OpState::Routed);
        let request = Routed::Delegate { parent: cap, target, kernel, mask, binding };
        out.send(owner, Message::Routed { op: id, presenter: caller, request });
        Started::Pending(id)
    }

    /// Starts a revoke (or, with `delete`, a delete) for `origin`: a walk of a local
    /// capability, a wait for one already revoking, the revoke of a remote child by its
    /// parent's holder, or a request routed to the owner.
    pub(crate) fn start_revoke<H, O>(
        &mut self,
        origin: Origin,
        caller: Principal,
        cap: CapName,
        delete: bool,
        hook: &mut H,
        out: &mut O,
    ) -> Started
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        let revoke = |joined| OpState::Revoke { target: cap, waits: 1, killed: 0, joined, delete };
        if cap.kernel() != self.id() {
            // A holder's capabilities are on its kernel, and a routed request names a
            // capability of its receiver: neither is looked for elsewhere.
            if delete || !self.valid(cap.kernel()) || origin != Origin::Local {
                return Started::Done(Err(CapError::UnknownName.into()));
            }
            return match self.table.revoke_remote_child(caller, cap, &mut self.events) {
                Some(start) => {
                    let id = self.park(origin, revoke(start == RevokeStart::InProgress));
                    self.wait_for(cap, id);
                    self.process_events(Some(Tally::Op(id)), out);
                    Started::Pending(id)
                }
                None => {
                    let id = self.park(origin, OpState::Routed);
                    out.send(
                        cap.kernel(),
                        Message::Routed { op: id, presenter: caller, request: Routed::Revoke { target: cap } },
                    );
                    Started::Pending(id)
                }
            };
        }
        // One look-up for the check and the walk.
        match self.table.check_and_walk(caller, cap, delete, hook, &mut self.events) {
            Err(error) => Started::Done(Err(error.into())),
            Ok(Ok(walk)) => {
                if walk.finished {
                    self.process_events(None, out);
                    if delete {
                        self.table.free_revoked(cap);
                    }
                    return Started::Done(Ok(Outcome::Count(walk.killed as u64)));
                }
                let id = self.park(
                    origin,
                    OpState::Revoke { target: cap, waits: 1, killed: walk.killed as u64, joined: false, delete },
                );
                self.wait_for(cap, id);
                self.process_events(Some(Tally::Op(id)), out);
                Started::Pending(id)
            }
            Ok(Err(NodeState::Revoking)) => {
                let id = self.park(origin, revoke(true));
                self.wait_for(cap, id);
                Started::Pending(id)
            }
            Ok(Err(_)) if delete => {
                self.table.free_revoked(cap);
                Started::Done(Ok(Outcome::Count(0)))
            }
            Ok(Err(_)) => Started::Done(Err(CapError::Revoked.into())),
        }
    }

    /// Starts the removal of crashed VM `vm` for `origin`: closes it, walks what it holds
    /// here, asks the kernels in `also_on` to do the same, and waits for all of it.
    pub(crate) fn start_crash<H, O>(
        &mut self,
        origin: Origin,
        vm: VmId,
        also_on: &[KernelId],
        hook: &mut H,
        out: &mut O,
    ) -> Started
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        if let Some(&first) = self.crashes.get(&vm) {
            // A crash of this VM is under way here: end with it.
            let local_only = origin != Origin::Local;
            let local_done = matches!(self.ops.get(&first), Some(Op { state: OpState::Crash { waits: 0, .. }, .. }));
            if local_only && local_done {
                return Started::Done(Ok(Outcome::Count(0)));
            }
            let id = self.park(origin, OpState::Follow { local_only });
            if let Some(Op { state: OpState::Crash { followers, .. }, .. }) = self.ops.get_mut(&first) {
                followers.push(id);
            }
            return Started::Pending(id);
        }
        let principal = Principal::Vm(vm);
        let registered = self.table.usage(principal).is_some();
        let here = self.id();
        let mut others: Vec<KernelId> = also_on.iter().copied().filter(|&k| k != here && self.valid(k)).collect();
        others.sort_unstable();
        others.dedup();
        if !registered && others.is_empty() {
            return Started::Done(Err(CapError::UnknownPrincipal.into()));
        }
        let id = self.park(
            origin,
            OpState::Crash { vm, waits: 0, kernels: others.len() as u32, killed: 0, followers: Vec::new() },
        );
        for &kernel in &others {
            out.send(kernel, Message::Crash { op: id, vm });
        }
        if registered {
            self.crashes.insert(vm, id);
            let mut in_progress = core::mem::take(&mut self.scratch);
            in_progress.clear();
            let closed = self.table.close_principal(principal);
            debug_assert!(closed.is_ok());
            let killed = self.table.revoke_held(principal, hook, &mut self.events, &mut in_progress).unwrap_or(0);
            if let Some(Op { state: OpState::Crash { killed: total, waits, .. }, .. }) = self.ops.get_mut(&id) {
                *total += killed as u64;
                *waits += in_progress.len() as u32;
            }
            for &name in &in_progress {
                self.wait_for(name, id);
            }
            self.scratch = in_progress;
            self.process_events(Some(Tally::Op(id)), out);
        }
        if self.crash_ready(id) {
            let end = self.conclude(id).expect("the crash operation was just parked");
            return Started::Done(end.result);
        }
        Started::Pending(id)
    }

    // ---------------------------------------------------------------------------------
    // Ending operations.
    // ---------------------------------------------------------------------------------

    /// Acts on the link events the last table call recorded: sends revokes to the kernels
    /// of remote children (their counts going to `tally`), sends `Gone` for finalized
    /// capabilities whose parent is remote, and wakes the operations waiting for them.
    pub(crate) fn process_events<O>(&mut self, tally: Option<Tally>, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        // A local revocation's one event: its root left the tree, with no remote parent
        // to tell, no request to count it and no operation waiting for it. Handling it
        // below would do nothing; this skips the batch's take and drain (issue 14).
        if let [LinkEvent::Finalized { remote_parent: None, .. }] = self.events[..] {
            if self.requests.is_empty() && self.waiters.is_empty() {
                self.events.clear();
                return;
            }
        }
        while !self.events.is_empty() {
            let mut batch = core::mem::take(&mut self.events);
            let mut events = batch.drain(..).peekable();
            while let Some(event) = events.next() {
                match event {
                    LinkEvent::RevokeRemote { child, parent: None } => {
                        out.send(child.kernel(), Message::Revoke { target: child });
                        self.sent_by.insert(child, tally);
                    }
                    LinkEvent::RevokeRemote { child, parent: Some(parent) } => {
                        // One message per parent and kernel: the walk reports a parent's
                        // remote children together, and the first one sends for all.
                        let kernel = child.kernel();
                        let proxies = match self.batches.entry((parent, kernel)) {
                            btree_map::Entry::Vacant(entry) => {
                                out.send(kernel, Message::RevokeBelow { parent });
                                // Room for the rest of the run at once (at most the events
                                // left, each a marked proxy: bounded by the table's
                                // capacity), instead of growing by doubling and copying.
                                let mut proxies = Vec::with_capacity(1 + events.len());
                                proxies.push(child);
                                &mut entry.insert(Batch { tally, proxies }).proxies
                            }
                            btree_map::Entry::Occupied(entry) => {
                                let proxies = &mut entry.into_mut().proxies;
                                proxies.push(child);
                                proxies
                            }
                        };
                        // The walk reports a parent's children on one kernel in a run
                        // (delegation order): they join the batch without a map lookup each.
                        while let Some(&LinkEvent::RevokeRemote { child: next, parent: Some(next_parent) }) =
                            events.peek()
                        {
                            if next_parent != parent || next.kernel() != kernel {
                                break;
                            }
                            proxies.push(next);
                            events.next();
                        }
                    }
                    LinkEvent::Finalized { name, remote_parent } => {
                        let requested = if self.requests.is_empty() { None } else { self.requests.remove(&name) };
                        if let Some(parent) = remote_parent {
                            match (requested, self.below.get_mut(&parent)) {
                                (None, Some(below)) => {
                                    // A member of a batch: its parent's kernel hears of it
                                    // with the rest. The batch's walk finalizes its members
                                    // one after another: while no request and no waiter could
                                    // claim one, the run that follows is counted with this
                                    // one look-up (each member would only count itself down,
                                    // and the run stops at the batch's last member).
                                    let mut run = 1;
                                    if self.requests.is_empty() && self.waiters.is_empty() {
                                        while let Some(&LinkEvent::Finalized { remote_parent: Some(next), .. }) =
                                            events.peek()
                                        {
                                            if next != parent || run >= below.outstanding {
                                                break;
                                            }
                                            run += 1;
                                            events.next();
                                        }
                                    }
                                    below.outstanding = below.outstanding.saturating_sub(run);
                                    if below.outstanding == 0 {
                                        let Below { from, killed, .. } = *below;
                                        self.below.remove(&parent);
                                        out.send(from, Message::GoneBelow { parent, killed });
                                    }
                                }
                                (killed, _) => out
                                    .send(parent.kernel(), Message::Gone { child: name, killed: killed.unwrap_or(0) }),
                            }
                        }
                        if !self.waiters.is_empty() {
                            self.wake(name, out);
                        }
                    }
                }
            }
            drop(events);
            if self.events.is_empty() {
                self.events = batch;
            }
        }
    }

    /// Handles the news that remote child `child` and its subtree are gone (or were never
    /// created): drops its proxy, credits its count, wakes whoever waited for it.
    pub(crate) fn child_gone<O>(&mut self, child: CapName, killed: u64, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        if self.table.remote_gone(child, &mut self.events).is_some() {
            if let Some(Some(tally)) = self.sent_by.remove(&child) {
                self.credit(tally, killed);
            }
        }
        self.wake(child, out);
        self.process_events(None, out);
    }

    /// Handles a batched revoke from kernel `from`: revokes every child of its capability
    /// `parent` here in one pass, and answers with one [`Message::GoneBelow`] when all of
    /// them are finalized (at once, or when their remote parts are gone).
    pub(crate) fn revoke_below<H, O>(&mut self, from: KernelId, parent: CapName, hook: &mut H, out: &mut O)
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        // Only the parent's kernel revokes its children; one batch per parent at a time.
        if parent.kernel() != from || self.below.contains_key(&parent) {
            return;
        }
        let requests = &self.requests;
        let walk = self.table.revoke_below(parent, hook, &mut self.events, |name| requests.contains_key(&name));
        if walk.members == 0 {
            out.send(from, Message::GoneBelow { parent, killed: walk.killed as u64 });
            self.process_events(None, out);
            return;
        }
        self.below.insert(parent, Below { from, outstanding: walk.members, killed: walk.killed as u64 });
        self.process_events(Some(Tally::Below(parent)), out);
    }

    /// Handles the batched acknowledgement from kernel `from` that the children of local
    /// capability `parent` there are gone: drops their proxies, credits the count, wakes
    /// whoever waited for them. A report that matches no batch sent is ignored.
    pub(crate) fn children_gone<O>(&mut self, from: KernelId, parent: CapName, killed: u64, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        let Some(Batch { tally, proxies: mut gone }) = self.batches.remove(&(parent, from)) else {
            return;
        };
        let sent_by = &self.sent_by;
        self.table.remote_children_gone(parent, &mut gone, |name| sent_by.contains_key(&name), &mut self.events);
        if let Some(tally) = tally {
            self.credit(tally, killed);
        }
        if !self.waiters.is_empty() {
            // Usually one operation waits (the revoke's root) while a batch names hundreds
            // of proxies: then each name is compared with the few waited-for names instead
            // of being looked up in the map (same wakes, same order).
            let mut few = [CapName::from_u128(0); FEW_WAITERS];
            let mut count = self.snapshot_waiters(&mut few);
            if count <= FEW_WAITERS {
                for &name in &gone {
                    if count > FEW_WAITERS {
                        self.wake(name, out);
                    } else if few[..count].contains(&name) {
                        self.wake(name, out);
                        // A completion may change who waits: look again.
                        count = self.snapshot_waiters(&mut few);
                    }
                }
            } else {
                for &name in &gone {
                    self.wake(name, out);
                }
            }
        }
        self.process_events(None, out);
    }

    /// Copies the names operations wait for into `few` when they fit; returns how many
    /// there are (more than `few` holds: not copied).
    fn snapshot_waiters(&self, few: &mut [CapName; FEW_WAITERS]) -> usize {
        let count = self.waiters.len();
        if count <= FEW_WAITERS {
            for (slot, name) in few.iter_mut().zip(self.waiters.keys()) {
                *slot = *name;
            }
        }
        count
    }

    /// Adds `killed` capabilities to the count `tally` names.
    fn credit(&mut self, tally: Tally, killed: u64) {
        match tally {
            Tally::Request(root) => {
                if let Some(count) = self.requests.get_mut(&root) {
                    *count += killed;
                }
            }
            Tally::Op(id) => {
                if let Some(Op {
                    state: OpState::Revoke { killed: count, .. } | OpState::Crash { killed: count, .. },
                    ..
                }) = self.ops.get_mut(&id)
                {
                    *count += killed;
                }
            }
            Tally::Below(parent) => {
                if let Some(below) = self.below.get_mut(&parent) {
                    below.killed += killed;
                }
            }
        }
    }

    /// Wakes the operations waiting for `name` to be finalized or gone.
    fn wake<O>(&mut self, name: CapName, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        let Some(waiting) = self.waiters.remove(&name) else {
            return;
        };
        for id in waiting {
            let ready = match self.ops.get_mut(&id) {
                Some(Op { state: OpState::Revoke { waits, .. }, .. }) => {
                    *waits -= 1;
                    *waits == 0
                }
                Some(Op { state: OpState::Crash { waits, followers, .. }, .. }) => {
                    *waits -= 1;
                    if *waits == 0 {
                        // The local part is done: answer the kernels that only need it.
                        let followers = followers.clone();
                        for follower in followers {
                            if matches!(
                                self.ops.get(&follower),
                                Some(Op { state: OpState::Follow { local_only: true }, .. })
                            ) {
                                self.finish(follower, Ok(Outcome::Count(0)), out);
                            }
                        }
                    }
                    self.crash_ready(id)
                }
                _ => false,
            };
            if ready {
                self.complete(id, out);
            }
        }
    }

    /// Tells whether crash operation `id` waits for nothing any more.
    pub(crate) fn crash_ready(&self, id: OpId) -> bool {
        matches!(self.ops.get(&id), Some(Op { state: OpState::Crash { waits: 0, kernels: 0, .. }, .. }))
    }

    /// Ends operation `id`, whose result follows from its state, and delivers the result.
    pub(crate) fn complete<O>(&mut self, id: OpId, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        if let Some(end) = self.conclude(id) {
            self.deliver(id, end.origin, end.result, end.crash, out);
            for follower in end.followers {
                self.finish(follower, Ok(Outcome::Count(0)), out);
            }
        }
    }

    /// Ends operation `id` with `result` (handshakes, routed requests, followers of a
    /// crash) and delivers it.
    pub(crate) fn finish<O>(&mut self, id: OpId, result: Result<Outcome, ProtoError>, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        if let Some(op) = self.ops.remove(&id) {
            let crash = matches!(op.state, OpState::Crash { .. } | OpState::Follow { .. });
            self.deliver(id, op.origin, result, crash, out);
        }
    }

    /// Removes operation `id`, does what its end requires (free a deleted capability,
    /// forget a crashed VM) and returns its result.
    pub(crate) fn conclude(&mut self, id: OpId) -> Option<End> {
        let op = self.ops.remove(&id)?;
        let mut end =
            End { origin: op.origin, result: Err(CapError::Revoked.into()), crash: false, followers: Vec::new() };
        match op.state {
            OpState::Revoke { target, killed, joined, delete, .. } => {
                if delete {
                    self.table.free_revoked(target);
                    end.result = Ok(Outcome::Count(killed));
                } else if !joined {
                    end.result = Ok(Outcome::Count(killed));
                }
            }
            OpState::Crash { vm, killed, followers, .. } => {
                if self.crashes.get(&vm) == Some(&id) {
                    self.crashes.remove(&vm);
                    // Everything it held is revoked and finalized: this only frees.
                    let freed = self.table.remove_vm(vm, &mut |_: &DeadCap| {});
                    debug_assert_eq!(freed, Ok(0), "a crashed VM's capabilities were all revoked");
                }
                end.result = Ok(Outcome::Count(killed));
                end.crash = true;
                end.followers = followers;
            }
            OpState::Follow { .. } => end.crash = true,
            OpState::Obtain | OpState::Delegate | OpState::Routed => {}
        }
        Some(end)
    }

    /// Hands a result to whoever waits: the local caller through [`Kernel::poll`], or the
    /// kernel that routed the request here.
    fn deliver<O>(&mut self, id: OpId, origin: Origin, result: Result<Outcome, ProtoError>, crash: bool, out: &mut O)
    where
        O: Outbox + ?Sized,
    {
        match origin {
            Origin::Local => self.done.push_back(Completion { op: id, result }),
            Origin::Remote(kernel, op) if crash => {
                let killed = result.ok().and_then(Outcome::count).unwrap_or(0);
                out.send(kernel, Message::CrashDone { op, killed });
            }
            Origin::Remote(kernel, op) => out.send(kernel, Message::RoutedDone { op, result }),
        }
    }
}

/// What ending an operation produced.
pub(crate) struct End {
    pub(crate) origin: Origin,
    pub(crate) result: Result<Outcome, ProtoError>,
    /// The operation was a crash (its remote origin expects a `CrashDone`).
    pub(crate) crash: bool,
    /// Operations that end with it.
    pub(crate) followers: Vec<OpId>,
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("id", &self.id())
            .field("kernels", &self.kernels)
            .field("ops", &self.ops.len())
            .field("requests", &self.requests.len())
            .finish_non_exhaustive()
    }
}
