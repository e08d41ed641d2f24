//! One kernel's capability table: the slab of capability nodes, the name index, the
//! principals with their quotas, and the capability operations.

mod audit;
mod check;
mod index;
mod node;
mod pin;
mod remote;
mod revoke;

use core::cell::Cell;
use core::fmt;
use core::mem::size_of;

use alloc::vec::Vec;

use self::index::NameIndex;
use self::node::{Account, Link, Node, State};
use crate::ids::{AmId, Binding, KernelId, ObjKind, Object, OpId, Principal, Rights, VmId};
use crate::name::{CapName, EntropySource, NameSource};
use crate::registry::{KindSpec, OpSpec, RegisterError, Registry};

pub use self::audit::AuditFailure;
pub use self::check::{ArgFault, CheckError, Checked, CheckedCap};
pub use self::pin::NO_ROOT;
pub use self::remote::{
    BelowWalk, IncomingRevoke, LinkEvent, LinkSink, NodeState, NodeView, RemoteGrant, RevokeStart, Walk,
};
pub use self::revoke::{DeadCap, RevocationHook};

#[cfg(test)]
pub(crate) use self::audit::Peek;

/// Holds the capabilities one kernel owns and performs every operation on them.
///
/// A table is built once per kernel instance ([`CapTable::new`]) with that kernel's id and
/// a fixed capacity; all its memory is reserved then, so no capability operation allocates
/// or grows anything, and each fails with an error rather than a panic when a quota or the
/// capacity is exhausted.
pub struct CapTable {
    names: NameSource,
    registry: Registry,
    /// The slab: every capability is one fixed-size node, linked to others by index. It
    /// holds `capacity` nodes from the start; the unused ones form the free list.
    nodes: Vec<Node>,
    /// The first node of the free list, threaded through `Node::next_sibling`.
    free_head: Link,
    /// The number of nodes in use (live or revoked).
    in_use: u32,
    /// The most nodes the table may use.
    capacity: u32,
    /// Maps each name in use to its slab index.
    index: NameIndex,
    /// The registered principals, sorted by principal: they are few (VMs and AMs), and
    /// binary search over a vector needs no hashing and no allocation per look-up.
    principals: Vec<PrincipalEntry>,
    /// The position in `principals` of the principal looked up last: a hint that a look-up
    /// tries first (one comparison) before its binary search, since an operation's holder
    /// and payer are mostly the caller of the operation before it (issue 14: the binary
    /// search over `Principal`'s ordering was an eighth of a derive). Checked on every
    /// use, so a stale hint costs one comparison and is never wrong.
    principal_hint: Cell<u32>,
    /// The same for the payer of a capability whose holder is another principal (a
    /// delegation's delegator): a cross-kernel delegation looks up holder and delegator
    /// one after the other, and one shared hint would miss both every time.
    payer_hint: Cell<u32>,
    /// The principal of each account number (`Node::payer`); None for a free number.
    accounts: Vec<Option<Principal>>,
    /// The page-table root of each process-bound capability, by slot, sorted (`pin.rs`).
    pins: Vec<(u32, u64)>,
    /// Tells the page-table root of the call being dispatched (`pin.rs`).
    root_reader: fn() -> u64,
}

/// Holds a principal's quota and the head of the list of capabilities it holds.
#[derive(Clone, Copy, Debug)]
struct PrincipalEntry {
    principal: Principal,
    quota: u32,
    held: u32,
    /// Nodes whose `payer` is this principal's account.
    charged: u32,
    /// Its number in `CapTable::accounts`.
    account: Account,
    held_head: Link,
    /// Set when the principal is being removed (a crash under way): it may receive no new
    /// capability, so the revocation of what it holds can finish.
    closing: bool,
}

/// Says why a table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewTableError {
    /// The entropy source produced no seed.
    EntropyUnavailable,
    /// The slab or the index could not be allocated.
    OutOfMemory,
}

/// Says why a capability operation was refused. A refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// No capability has this name (never issued, deleted, or owned by another kernel).
    UnknownName,
    /// The caller may not use the capability for this operation: it is bound to another
    /// principal, or (for delete) the caller is not its holder.
    WrongHolder,
    /// The capability was revoked.
    Revoked,
    /// Only the AM that implements an object may mint capabilities to it.
    NotImplementer,
    /// The object's AM is not registered.
    UnknownAm,
    /// The object's kind is not registered by its AM.
    UnknownKind,
    /// The rights include bits the object's kind does not name.
    UndefinedRights,
    /// The principal that would hold the new capability is not registered.
    UnknownPrincipal,
    /// The principal that would hold the new capability has used up its quota.
    QuotaExceeded,
    /// The table holds as many capabilities as its capacity allows.
    TableFull,
    /// The capability cannot be bound to a process: it is a bearer capability, the
    /// caller's page-table root is unknown, or the binding could not be recorded
    /// ([`CapTable::bind_process`]).
    NotBindable,
}

/// Says why a principal could not be added, changed or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalError {
    /// The principal is registered already.
    AlreadyRegistered,
    /// The principal is not registered.
    UnknownPrincipal,
    /// Memory for the principal could not be allocated.
    OutOfMemory,
}

/// Describes a live capability (the answer of [`CapTable::inspect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapInfo {
    /// The object it refers to.
    pub object: Object,
    /// The rights it carries.
    pub rights: Rights,
    /// The principal that holds it.
    pub holder: Principal,
    /// Whether only the holder, or any presenter, may use it.
    pub binding: Binding,
}

/// Tells how much of its quota a principal uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The capabilities it holds, live or revoked and not yet deleted.
    pub held: u32,
    /// The capabilities charged to it: those it holds and did not receive by delegation,
    /// and those it delegated to others that are not freed yet.
    pub charged: u32,
    /// The most that may be charged to it.
    pub quota: u32,
}

/// Tells how much memory a table reserved, for the benchmark's bytes-per-capability figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// The size of one slab node.
    pub node_bytes: usize,
    /// The bytes reserved for the slab.
    pub slab_bytes: usize,
    /// The bytes reserved for the name index: 8-byte entries, a power of two at least
    /// twice the capacity.
    pub index_bytes: usize,
    /// The number of capabilities the reservation holds.
    pub capacity: u32,
}

/// Says why a presented name cannot be used, before any operation-specific check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UseFault {
    UnknownName,
    WrongHolder,
    Revoked,
    /// Only from [`CapTable::resolve_fast`]: a process-bound capability, which the check
    /// must resolve again with the call's root (`pin.rs`); never reported.
    ProcessBound,
}

impl From<UseFault> for CapError {
    fn from(fault: UseFault) -> Self {
        match fault {
            UseFault::UnknownName => CapError::UnknownName,
            UseFault::WrongHolder | UseFault::ProcessBound => CapError::WrongHolder,
            UseFault::Revoked => CapError::Revoked,
        }
    }
}

/// Describes a new capability: everything but its name and its place in the slab.
struct NewCap {
    object: Object,
    rights: Rights,
    holder: Principal,
    /// The principal charged for it (see [`CapTable::delegate`]).
    payer: Principal,
    binding: Binding,
    parent: Link,
}

impl CapTable {
    /// Builds the table of kernel `kernel`, able to hold `capacity` capabilities, with its
    /// name generator seeded from `entropy`. Reserves the slab and the index in full.
    pub fn new(
        kernel: KernelId,
        capacity: u32,
        entropy: &mut (impl EntropySource + ?Sized),
    ) -> Result<Self, NewTableError> {
        // Slab indices are 32-bit with `u32::MAX` meaning "no link", so every slot of a
        // `u32` capacity has an index.
        const _: () = assert!(Link::MAX_SLOT == u32::MAX - 1);
        let names = NameSource::new(kernel, entropy).map_err(|_| NewTableError::EntropyUnavailable)?;
        let capacity_slots = capacity as usize;
        let mut nodes = Vec::new();
        nodes.try_reserve_exact(capacity_slots).map_err(|_| NewTableError::OutOfMemory)?;
        // Initialise every node now, as one free list in ascending order: no capability
        // operation then touches fresh memory, and slots are handed out in address order.
        nodes.extend((0..capacity_slots).map(|slot| {
            let next = if slot + 1 < capacity_slots { Link::to(slot + 1) } else { Link::NIL };
            Node::free(next)
        }));
        let index = NameIndex::with_capacity(capacity).map_err(|_| NewTableError::OutOfMemory)?;
        Ok(Self {
            names,
            registry: Registry::default(),
            nodes,
            free_head: if capacity > 0 { Link::to(0) } else { Link::NIL },
            in_use: 0,
            capacity,
            index,
            principals: Vec::new(),
            principal_hint: Cell::new(0),
            payer_hint: Cell::new(0),
            accounts: Vec::new(),
            pins: Vec::new(),
            root_reader: pin::no_root,
        })
    }

    /// Returns the id of the kernel whose table this is.
    pub fn kernel(&self) -> KernelId {
        self.names.kernel()
    }

    /// Returns the most capabilities the table may hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Returns the number of capabilities the table holds, live or revoked.
    pub fn len(&self) -> u32 {
        self.in_use
    }

    /// Tells whether the table holds no capability.
    pub fn is_empty(&self) -> bool {
        self.in_use == 0
    }

    /// Returns the memory the table reserved for capabilities.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            node_bytes: size_of::<Node>(),
            slab_bytes: self.nodes.capacity() * size_of::<Node>(),
            index_bytes: self.index.bytes(),
            capacity: self.capacity,
        }
    }

    /// Returns the registry of AMs, kinds, rights and operations, for name look-ups.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    // ---------------------------------------------------------------------------------
    // Registration (seed §5.2.1 "Extensibility").
    // ---------------------------------------------------------------------------------

    /// Registers AM `am` under `name` and makes it a principal that may hold up to `quota`
    /// capabilities (the roots it mints and whatever it is delegated).
    pub fn register_am(&mut self, am: AmId, name: &str, quota: u32) -> Result<(), RegisterError> {
        let principal = Principal::Am(am);
        self.insert_principal(principal, quota).map_err(|error| match error {
            PrincipalError::AlreadyRegistered => RegisterError::AmIdTaken,
            // Inserting fails otherwise only when the principal list cannot grow.
            PrincipalError::UnknownPrincipal | PrincipalError::OutOfMemory => RegisterError::OutOfMemory,
        })?;
        if let Err(error) = self.registry.register_am(am, name) {
            let position = self.principal_position(principal).expect("the principal was just inserted");
            self.principals.remove(position);
            return Err(error);
        }
        Ok(())
    }

    /// Registers an object kind of AM `am`, with the names of its rights (bit `i` is
    /// `spec.rights[i]`), and returns the kind's number.
    pub fn register_kind(&mut self, am: AmId, spec: KindSpec<'_>) -> Result<ObjKind, RegisterError> {
        self.registry.register_kind(am, spec)
    }

    /// Adds rights to kind `kind` of AM `am` and returns their bits.
    pub fn add_rights(&mut self, am: AmId, kind: ObjKind, names: &[&str]) -> Result<Rights, RegisterError> {
        self.registry.add_rights(am, kind, names)
    }

    /// Registers an operation of AM `am` with the capability arguments it takes, and returns
    /// its id. Its arguments can only name kinds of `am` itself.
    pub fn register_op(&mut self, am: AmId, spec: OpSpec<'_>) -> Result<OpId, RegisterError> {
        self.registry.register_op(am, spec)
    }

    // ---------------------------------------------------------------------------------
    // Principals and quotas.
    // ---------------------------------------------------------------------------------

    /// Registers VM `vm` as a principal that may hold up to `quota` capabilities.
    pub fn add_vm(&mut self, vm: VmId, quota: u32) -> Result<(), PrincipalError> {
        self.insert_principal(Principal::Vm(vm), quota)
    }

    /// Sets the quota of `principal`. A quota below what it holds blocks new capabilities
    /// for it until it deletes enough; nothing it holds is taken away.
    pub fn set_quota(&mut self, principal: Principal, quota: u32) -> Result<(), PrincipalError> {
        let entry = self.principal_mut(principal).ok_or(PrincipalError::UnknownPrincipal)?;
        entry.quota = quota;
        Ok(())
    }

    /// Returns how much of its quota `principal` uses, if it is registered.
    pub fn usage(&self, principal: Principal) -> Option<Usage> {
        self.principal(principal).map(|entry| Usage { held: entry.held, charged: entry.charged, quota: entry.quota })
    }

    /// Removes VM `vm` (it was destroyed or crashed): revokes every live capability it
    /// holds, with their subtrees, frees all its capabilities, and forgets the VM. Returns
    /// the number of capabilities revoked.
    pub fn remove_vm<H>(&mut self, vm: VmId, hook: &mut H) -> Result<usize, PrincipalError>
    where
        H: RevocationHook + ?Sized,
    {
        let principal = Principal::Vm(vm);
        let head = self.principal(principal).ok_or(PrincipalError::UnknownPrincipal)?.held_head;
        // Revocation leaves the held list alone (revoked nodes stay on it), so the list can
        // be walked while subtrees, which may contain the VM's other capabilities, die.
        let mut revoked = 0;
        let mut cursor = head;
        while let Some(slot) = cursor.get() {
            if matches!(self.nodes[slot].state, State::Live | State::Revoking) {
                revoked += self.revoke_subtree(slot, hook);
            }
            cursor = self.nodes[slot].held_next;
        }
        hook.finished();
        let mut cursor = head;
        while let Some(slot) = cursor.get() {
            cursor = self.nodes[slot].held_next;
            if self.nodes[slot].state == State::Pending {
                // A reservation for a cross-kernel obtain still hangs below its proxy.
                let parent = self.nodes[slot].parent;
                self.unlink_from_parent(slot);
                self.prune(parent, &mut remote::Discard);
            }
            self.uncharge(slot);
            self.release(slot);
        }
        // What the VM paid for and others still hold is charged to no one from now on.
        let position = self.principal_position(principal).expect("the principal was found above");
        let account = self.principals[position].account;
        for node in self.nodes.iter_mut().filter(|node| node.payer == account) {
            node.payer = Account::NONE;
        }
        self.accounts[usize::from(account.0)] = None;
        self.principals.remove(position);
        Ok(revoked)
    }

    // ---------------------------------------------------------------------------------
    // Capability operations (DESIGN.md §2).
    // ---------------------------------------------------------------------------------

    /// Creates a root capability to `object` with `rights`, held by `caller` and bound to
    /// it. Only the AM that implements the object may mint: `caller` must be
    /// `Principal::Am(object.am)`.
    pub fn mint(&mut self, caller: Principal, object: Object, rights: Rights) -> Result<CapName, CapError> {
        if caller != Principal::Am(object.am) {
            return Err(CapError::NotImplementer);
        }
        if !self.registry.has_am(object.am) {
            return Err(CapError::UnknownAm);
        }
        let kind = self.registry.kind(object.am, object.kind).ok_or(CapError::UnknownKind)?;
        if !kind.defined_rights().contains(rights) {
            return Err(CapError::UndefinedRights);
        }
        self.create(NewCap {
            object,
            rights,
            holder: caller,
            payer: caller,
            binding: Binding::Bound,
            parent: Link::NIL,
        })
    }

    /// Creates a child of capability `name` holding only the rights in `mask`, held by
    /// `caller` with the same binding. Rights outside the parent's are dropped, never
    /// added (invariant 1).
    pub fn derive(&mut self, caller: Principal, name: CapName, mask: Rights) -> Result<CapName, CapError> {
        let parent = self.resolve(caller, name)?;
        let binding = self.nodes[parent].binding;
        if binding == Binding::Process {
            return self.derive_pinned(caller, parent, mask);
        }
        self.create_child(parent, caller, caller, mask, binding)
    }

    /// Creates a child of capability `name` holding only the rights in `mask`, held by
    /// `target`, bound to it or a bearer capability as `binding` says. The new capability
    /// is charged to the quota of `caller`, the delegator, until it is freed (deleted by its
    /// holder, or its holder removed): a principal cannot fill another's quota by giving it
    /// capabilities (`target` must be registered and open, but need have no room).
    pub fn delegate(
        &mut self,
        caller: Principal,
        name: CapName,
        target: Principal,
        mask: Rights,
        binding: Binding,
    ) -> Result<CapName, CapError> {
        let parent = self.resolve(caller, name)?;
        self.create_child(parent, target, caller, mask, binding)
    }

    /// Delegates as [`delegate`](Self::delegate) does, but charges the new capability to
    /// `target`: for an AM that hands a principal a capability that principal asked for
    /// (the counter AM's `create`, a VM's initial capabilities), so what a VM makes an AM
    /// allocate counts against the VM's own quota.
    pub fn grant(
        &mut self,
        caller: Principal,
        name: CapName,
        target: Principal,
        mask: Rights,
        binding: Binding,
    ) -> Result<CapName, CapError> {
        let parent = self.resolve(caller, name)?;
        self.create_child(parent, target, target, mask, binding)
    }

    /// Revokes capability `name` and, transitively, every capability derived from it: all
    /// are unusable when this returns, and `hook` has been told of each so their AMs undo
    /// what they enabled. Returns how many died.
    ///
    /// The caller must be able to use the capability, or hold its parent (so a principal
    /// can take back what it delegated). Revoked capabilities stay known, and charged to
    /// their holders, until their holders delete them.
    pub fn revoke<H>(&mut self, caller: Principal, name: CapName, hook: &mut H) -> Result<usize, CapError>
    where
        H: RevocationHook + ?Sized,
    {
        let slot = self.lookup(name).ok_or(CapError::UnknownName)?;
        if self.may_revoke_slot(caller, slot)? != State::Live {
            return Err(CapError::Revoked);
        }
        let revoked = self.revoke_subtree(slot, hook);
        hook.finished();
        Ok(revoked)
    }

    /// Deletes capability `name` from its holder, who must be `caller`: a live capability is
    /// revoked first with its subtree (nothing derived from a deleted capability outlives
    /// it), then its slot and quota are given back. Returns how many capabilities died
    /// (0 when deleting one that was revoked already).
    pub fn delete<H>(&mut self, caller: Principal, name: CapName, hook: &mut H) -> Result<usize, CapError>
    where
        H: RevocationHook + ?Sized,
    {
        let slot = self.lookup(name).ok_or(CapError::UnknownName)?;
        let revoked = match self.may_delete_slot(caller, slot)? {
            // A revocation under way elsewhere is finished here, locally: this method
            // does not talk to other kernels (nk-protocol's delete does).
            State::Live | State::Revoking => {
                let revoked = self.revoke_subtree(slot, hook);
                hook.finished();
                revoked
            }
            State::Revoked => 0,
            State::Free | State::Pending | State::Remote | State::RemoteRevoking => {
                unreachable!("may_delete_slot admits only local capabilities")
            }
        };
        self.free(slot);
        Ok(revoked)
    }

    /// Describes capability `name` to a caller that may use it.
    pub fn inspect(&self, caller: Principal, name: CapName) -> Result<CapInfo, CapError> {
        let node = &self.nodes[self.resolve(caller, name)?];
        Ok(CapInfo { object: node.object(), rights: node.rights, holder: node.holder, binding: node.binding })
    }

    // ---------------------------------------------------------------------------------
    // Internals.
    // ---------------------------------------------------------------------------------

    /// Finds the slab index of `name`, live or revoked.
    #[inline(always)]
    fn lookup(&self, name: CapName) -> Option<usize> {
        if name.kernel() != self.names.kernel() {
            return None;
        }
        self.index.find(self.names.hash(name), |slot| self.nodes[slot].name == name)
    }

    /// Finds the live capability `name` on behalf of `caller`. The holder is checked before
    /// the state, so a principal cannot learn that someone else's bound capability died.
    ///
    /// The test is `binding == Bound` where it could be `usable_by`: a capability bound to
    /// its holder passes with the same comparisons as before process binding existed, and
    /// a bearer one with one more; a process-bound one goes to
    /// [`resolve_other`](Self::resolve_other), which reads the call's root (`pin.rs`).
    #[inline(always)]
    fn resolve(&self, caller: Principal, name: CapName) -> Result<usize, UseFault> {
        let slot = self.lookup(name).ok_or(UseFault::UnknownName)?;
        let node = &self.nodes[slot];
        if node.state == State::Live
            && ((node.binding == Binding::Bound && node.holder == caller) || node.binding == Binding::Bearer)
        {
            return Ok(slot);
        }
        self.resolve_other(caller, slot)
    }

    /// Resolves as [`resolve`](Self::resolve) does, without a call: the check loops'
    /// version. A process-bound capability is [`UseFault::ProcessBound`] (whatever its
    /// holder and state), on which the check starts again with `resolve`, which reads the
    /// call's root; every other capability costs what it cost before process binding.
    #[inline(always)]
    fn resolve_fast(&self, caller: Principal, name: CapName) -> Result<usize, UseFault> {
        // Skips the test of the name's kernel bits when the look-up passes: only proxies
        // carry other kernels' names, and a proxy is never live, so a live node found
        // under `name` is this kernel's.
        if let Some(slot) = self.index.find(self.names.hash(name), |slot| self.nodes[slot].name == name) {
            let node = &self.nodes[slot];
            if node.state == State::Live
                && ((node.binding == Binding::Bound && node.holder == caller) || node.binding == Binding::Bearer)
            {
                debug_assert_eq!(name.kernel(), self.names.kernel());
                return Ok(slot);
            }
        }
        Err(self.use_fault(caller, name))
    }

    /// Why [`resolve_fast`](Self::resolve_fast) did not pass the capability `name`; out
    /// of line, so the check loops carry nothing for it.
    #[cold]
    #[inline(never)]
    fn use_fault(&self, caller: Principal, name: CapName) -> UseFault {
        let Some(slot) = self.lookup(name) else {
            return UseFault::UnknownName;
        };
        let node = &self.nodes[slot];
        if node.state == State::Pending {
            // Reserved for a cross-kernel obtain: not issued yet.
            UseFault::UnknownName
        } else if node.binding == Binding::Process {
            UseFault::ProcessBound
        } else if node.binding != Binding::Bearer && node.holder != caller {
            UseFault::WrongHolder
        } else {
            UseFault::Revoked
        }
    }

    /// [`resolve`](Self::resolve) for every capability but a live one bound to `caller`
    /// or a live bearer one: a refusal, or a process-bound capability.
    #[cold]
    #[inline(never)]
    fn resolve_other(&self, caller: Principal, slot: usize) -> Result<usize, UseFault> {
        let state = self.nodes[slot].state;
        if state == State::Pending {
            // Reserved for a cross-kernel obtain: not issued yet.
            Err(UseFault::UnknownName)
        } else if !self.usable(slot, caller) {
            Err(UseFault::WrongHolder)
        } else if state == State::Live {
            Ok(slot)
        } else {
            Err(UseFault::Revoked)
        }
    }

    /// Creates a child of the live capability in `parent`.
    #[inline(always)]
    fn create_child(
        &mut self,
        parent: usize,
        holder: Principal,
        payer: Principal,
        mask: Rights,
        binding: Binding,
    ) -> Result<CapName, CapError> {
        let parent_node = &self.nodes[parent];
        self.create(NewCap {
            object: parent_node.object(),
            rights: parent_node.rights & mask,
            holder,
            payer,
            binding,
            parent: Link::to(parent),
        })
    }

    /// Creates a capability: charges its payer's quota, takes a slab node, draws a fresh
    /// name, and links the node into the tree, the holder's list and the index.
    #[inline(always)]
    fn create(&mut self, new: NewCap) -> Result<CapName, CapError> {
        let (holder, payer) = self.admit(new.holder, new.payer, false, 1)?;
        let (index, nodes) = (&self.index, &self.nodes);
        let (name, hash) =
            self.names.fresh(|candidate, hash| index.find(hash, |slot| nodes[slot].name == candidate).is_some());
        Ok(self.insert_at(new, State::Live, name, hash, holder, payer))
    }

    /// Checks that `holder` may receive one more capability, that `payer` has quota left
    /// for it, and that the table has room for `nodes` more nodes (the capability and any
    /// proxy it needs).
    /// Returns the positions of the holder's and the payer's entries. With
    /// `holder_if_unknown`, a payer that is not registered here leaves the holder to pay.
    #[inline(always)]
    pub(super) fn admit(
        &self,
        holder: Principal,
        payer: Principal,
        holder_if_unknown: bool,
        nodes: u32,
    ) -> Result<(usize, usize), CapError> {
        let holder_at = self.principal_position(holder).map_err(|_| CapError::UnknownPrincipal)?;
        if self.principals[holder_at].closing {
            return Err(CapError::UnknownPrincipal);
        }
        let payer_at = if payer == holder {
            holder_at
        } else {
            match self.payer_position(payer) {
                Ok(position) => position,
                Err(_) if holder_if_unknown => holder_at,
                Err(_) => return Err(CapError::UnknownPrincipal),
            }
        };
        let entry = &self.principals[payer_at];
        if entry.charged >= entry.quota {
            return Err(CapError::QuotaExceeded);
        }
        if self.capacity - self.in_use < nodes {
            return Err(CapError::TableFull);
        }
        Ok((holder_at, payer_at))
    }

    /// Inserts a capability named `name` (with index hash `hash`) in state `state`: takes a
    /// slab node and links it into the tree, its holder's list and the index. The caller
    /// checked with [`admit`](Self::admit) that the holder, the payer and the table have
    /// room, and passes the holder's and the payer's positions it returned (no principal
    /// was added or removed in between), so nothing here can fail. Returns the name.
    #[inline(always)]
    fn insert_at(
        &mut self,
        new: NewCap,
        state: State,
        name: CapName,
        hash: u64,
        holder: usize,
        payer: usize,
    ) -> CapName {
        let held_next = self.principals[holder].held_head;
        let slot = self.allocate_slot();
        let first_sibling = new.parent.get().map_or(Link::NIL, |p| self.nodes[p].first_child);
        self.nodes[slot] = Node {
            name,
            rights: new.rights,
            object_id: new.object.id,
            holder: new.holder,
            payer: self.principals[payer].account,
            am: new.object.am,
            kind: new.object.kind,
            state,
            binding: new.binding,
            parent: new.parent,
            first_child: Link::NIL,
            next_sibling: first_sibling,
            prev_sibling: Link::NIL,
            held_prev: Link::NIL,
            held_next,
        };
        if let Some(parent) = new.parent.get() {
            self.nodes[parent].first_child = Link::to(slot);
        }
        if let Some(sibling) = first_sibling.get() {
            self.nodes[sibling].prev_sibling = Link::to(slot);
        }
        if let Some(next) = held_next.get() {
            self.nodes[next].held_prev = Link::to(slot);
        }
        let entry = &mut self.principals[holder];
        entry.held_head = Link::to(slot);
        entry.held += 1;
        self.principals[payer].charged += 1;

        self.index.insert(hash, slot);
        name
    }

    /// Takes a node from the free list; the caller checked that the table is not full.
    #[inline(always)]
    fn allocate_slot(&mut self) -> usize {
        let slot = self.free_head.get().expect("a table below its capacity has a free node");
        self.free_head = self.nodes[slot].next_sibling;
        self.in_use += 1;
        slot
    }

    /// Frees a node that left the tree: takes it off its holder's list, gives back the
    /// quota and releases it.
    fn free(&mut self, slot: usize) {
        let Node { holder, held_prev, held_next, .. } = self.nodes[slot];
        if let Some(next) = held_next.get() {
            self.nodes[next].held_prev = held_prev;
        }
        let entry = self.principal_mut(holder).expect("every node's holder is registered");
        entry.held -= 1;
        match held_prev.get() {
            Some(prev) => self.nodes[prev].held_next = held_next,
            None => entry.held_head = held_next,
        }
        self.uncharge(slot);
        self.release(slot);
    }

    /// Gives the quota a capability was charged to back to its payer.
    fn uncharge(&mut self, slot: usize) {
        let account = core::mem::replace(&mut self.nodes[slot].payer, Account::NONE);
        if account != Account::NONE {
            let payer = self.accounts[usize::from(account.0)].expect("a node's payer is registered while it pays");
            self.principal_mut(payer).expect("an account's principal is registered").charged -= 1;
        }
    }

    /// Removes a node that left the tree from the index and puts it on the free list,
    /// leaving its holder's list and quota to the caller.
    fn release(&mut self, slot: usize) {
        debug_assert_ne!(self.nodes[slot].state, State::Live);
        if self.nodes[slot].binding == Binding::Process {
            self.unpin(slot);
        }
        self.index.remove(self.names.hash(self.nodes[slot].name), slot);
        self.nodes[slot] = Node::free(self.free_head);
        self.free_head = Link::to(slot);
        self.in_use -= 1;
    }

    /// Finds where `principal` is in the sorted list of principals.
    #[inline]
    fn principal_position(&self, principal: Principal) -> Result<usize, usize> {
        let hint = self.principal_hint.get() as usize;
        if self.principals.get(hint).is_some_and(|entry| entry.principal == principal) {
            return Ok(hint);
        }
        self.principal_search(principal)
    }

    /// Finds where `payer`, the payer of a capability held by another principal, is in
    /// the sorted list of principals, trying its own hint first.
    #[inline]
    fn payer_position(&self, payer: Principal) -> Result<usize, usize> {
        let hint = self.payer_hint.get() as usize;
        if self.principals.get(hint).is_some_and(|entry| entry.principal == payer) {
            return Ok(hint);
        }
        let found = self.principals.binary_search_by_key(&payer, |entry| entry.principal);
        if let Ok(position) = found {
            // Fewer than u32::MAX principals (accounts are u16).
            self.payer_hint.set(position as u32);
        }
        found
    }

    /// The binary search behind [`principal_position`](Self::principal_position), which
    /// remembers what it found as the next look-up's hint.
    #[inline(never)]
    fn principal_search(&self, principal: Principal) -> Result<usize, usize> {
        let found = self.principals.binary_search_by_key(&principal, |entry| entry.principal);
        if let Ok(position) = found {
            // Fewer than u32::MAX principals (accounts are u16).
            self.principal_hint.set(position as u32);
        }
        found
    }

    fn principal(&self, principal: Principal) -> Option<&PrincipalEntry> {
        self.principal_position(principal).ok().map(|position| &self.principals[position])
    }

    fn principal_mut(&mut self, principal: Principal) -> Option<&mut PrincipalEntry> {
        self.principal_position(principal).ok().map(|position| &mut self.principals[position])
    }

    /// Registers a principal that is not registered yet.
    fn insert_principal(&mut self, principal: Principal, quota: u32) -> Result<(), PrincipalError> {
        let Err(position) = self.principal_position(principal) else {
            return Err(PrincipalError::AlreadyRegistered);
        };
        let number = match self.accounts.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.accounts.len() < Account::MAX => {
                self.accounts.try_reserve(1).map_err(|_| PrincipalError::OutOfMemory)?;
                self.accounts.push(None);
                self.accounts.len() - 1
            }
            None => return Err(PrincipalError::OutOfMemory),
        };
        self.principals.try_reserve(1).map_err(|_| PrincipalError::OutOfMemory)?;
        self.accounts[number] = Some(principal);
        let account = Account(number as u16);
        self.principals.insert(
            position,
            PrincipalEntry { principal, quota, held: 0, charged: 0, account, held_head: Link::NIL, closing: false },
        );
        Ok(())
    }
}

impl fmt::Debug for CapTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapTable")
            .field("kernel", &self.kernel())
            .field("in_use", &self.in_use)
            .field("capacity", &self.capacity)
            .field("principals", &self.principals.len())
            .finish_non_exhaustive()
    }
}
