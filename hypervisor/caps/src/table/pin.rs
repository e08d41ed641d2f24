//! Process binding: a capability usable only from one guest process (issue 13's stretch,
//! the seed's §5.5 "capability register" convention).
//!
//! A VM's capabilities are the VM's: any of its processes that learns a name can present
//! it. [`CapTable::bind_process`] narrows one capability the caller holds to the guest
//! page-table root the call was made with (the hypervisor reads it from the VMCS and
//! masks it, nk-core `process_root`): from then on only calls made with that root may use,
//! inspect, derive from, delegate, revoke or delete it, and any other root gets
//! [`CapError::WrongHolder`] (`ArgFault::WrongHolder` in an AM call), before its state is
//! revealed, exactly as another principal would. Holding the capability's *parent*
//! still allows revoking it (a principal takes back what it gave).
//!
//! * **One-way.** There is no unbind, and binding again from the same root changes
//!   nothing; from another root the capability is not usable, so it cannot be rebound.
//! * **Derived copies stay bound**: [`CapTable::derive`] from a process-bound capability
//!   makes a child bound to the same root, so a copy cannot slip the binding. A
//!   delegation is the bound process's deliberate act and makes what it asks for (bound
//!   to the target VM, or a bearer capability).
//! * **Only bound capabilities** (held by the caller, [`Binding::Bound`]): a bearer
//!   capability is usable by anyone, and binding it to the presenter would take it from its
//!   holder ([`CapError::NotBindable`]).
//! * **Local only.** The root is the one of the call being dispatched on this kernel
//!   instance, so a process-bound capability is not obtained by another kernel
//!   ([`CapTable::grant_remote`] refuses it) and its binding never travels.
//!
//! Cost: nothing on the check of other capabilities. The check loops' resolve
//! (`resolve_fast`) passes a live capability bound to the caller, or a live bearer one,
//! with the comparisons it made before; anything else goes out of line (`use_fault`), and
//! a process-bound argument ends the loop, whose check starts again out of line
//! (`check_pinned`) with `resolve`, which reads the root (one VMREAD in the hypervisor).
//! `cargo xtask bench hypercall`: `am_call_1cap_instructions` 484 before, 483 after. The roots are kept beside the slab, sorted by slot
//! ([`CapTable::pins`]), one entry per process-bound capability, removed when its node is
//! freed: at most one per capability, so the table's capacity bounds them.

use super::node::State;
use super::CapTable;
use crate::ids::{Binding, Principal, Rights};
use crate::name::CapName;
use crate::table::CapError;

/// What the root reader returns when it cannot tell the caller's page-table root: matches
/// no binding, and `bind_process` refuses it.
pub const NO_ROOT: u64 = u64::MAX;

/// The root reader of a table nobody installed one in.
pub(super) fn no_root() -> u64 {
    NO_ROOT
}

impl CapTable {
    /// Installs the function that tells the page-table root of the call being dispatched
    /// (the hypervisor's reads the current VMCS's guest CR3), asked only for
    /// process-bound capabilities and by [`bind_process`](Self::bind_process).
    pub fn set_root_reader(&mut self, reader: fn() -> u64) {
        self.root_reader = reader;
    }

    /// Binds capability `name`, which `caller` holds, to the page-table root of the call
    /// (the root reader's answer): afterwards only calls made with that root may use it
    /// (module docs). Returns the root. Binding again from the same root changes
    /// nothing; a bearer capability, or a call whose root is unknown, is
    /// [`CapError::NotBindable`]; every refusal changes nothing.
    pub fn bind_process(&mut self, caller: Principal, name: CapName) -> Result<u64, CapError> {
        let slot = self.resolve(caller, name)?;
        let root = (self.root_reader)();
        match self.nodes[slot].binding {
            // `resolve` checked the root already.
            Binding::Process => Ok(root),
            Binding::Bearer => Err(CapError::NotBindable),
            Binding::Bound if root == NO_ROOT => Err(CapError::NotBindable),
            Binding::Bound => {
                self.pin(slot, root)?;
                self.nodes[slot].binding = Binding::Process;
                Ok(root)
            }
        }
    }

    /// The root the process-bound capability in `slot` is bound to.
    pub(super) fn pinned_root(&self, slot: usize) -> Option<u64> {
        let at = self.pins.binary_search_by_key(&(slot as u32), |&(s, _)| s).ok()?;
        Some(self.pins[at].1)
    }

    /// Records `root` for `slot` (not pinned yet); fails without change if it cannot
    /// allocate.
    fn pin(&mut self, slot: usize, root: u64) -> Result<(), CapError> {
        let key = slot as u32;
        let at = self.pins.binary_search_by_key(&key, |&(s, _)| s).err().ok_or(CapError::NotBindable)?;
        self.pins.try_reserve(1).map_err(|_| CapError::NotBindable)?;
        self.pins.insert(at, (key, root));
        Ok(())
    }

    /// Forgets the root of `slot`, whose node is being freed.
    pub(super) fn unpin(&mut self, slot: usize) {
        if let Ok(at) = self.pins.binary_search_by_key(&(slot as u32), |&(s, _)| s) {
            self.pins.remove(at);
        }
    }

    /// Tells whether `caller` holds the capability in `slot` in the sense that counts for
    /// delete: it is the holder, and for a process-bound one the call has its root.
    pub(super) fn holds(&self, slot: usize, caller: Principal) -> bool {
        let node = &self.nodes[slot];
        node.holder == caller && (node.binding != Binding::Process || self.root_matches(slot))
    }

    /// Tells whether `caller` may use the capability in `slot` (whatever its state): the
    /// holder of a bound one, anyone for a bearer one, the holder calling with the
    /// right root for a process-bound one.
    pub(super) fn usable(&self, slot: usize, caller: Principal) -> bool {
        let node = &self.nodes[slot];
        match node.binding {
            Binding::Bearer => true,
            Binding::Bound => node.holder == caller,
            Binding::Process => node.holder == caller && self.root_matches(slot),
        }
    }

    /// Reads the call's root (the only place the check path does) and compares.
    fn root_matches(&self, slot: usize) -> bool {
        let root = (self.root_reader)();
        root != NO_ROOT && self.pinned_root(slot) == Some(root)
    }

    /// [`derive`](Self::derive) from the process-bound capability in `slot`: the child
    /// is bound to the same root.
    #[cold]
    #[inline(never)]
    pub(super) fn derive_pinned(&mut self, caller: Principal, slot: usize, mask: Rights) -> Result<CapName, CapError> {
        let root = self.pinned_root(slot).ok_or(CapError::NotBindable)?;
        self.pins.try_reserve(1).map_err(|_| CapError::NotBindable)?;
        let child = self.create_child(slot, caller, caller, mask, Binding::Process)?;
        let child_slot = self.lookup(child).expect("a capability just made is indexed");
        self.pin(child_slot, root).expect("room was reserved and a fresh node has no pin");
        Ok(child)
    }

    /// Checks the pins against the slab: exactly the process-bound nodes in use have one.
    pub(super) fn check_pins(&self) -> Result<(), &'static str> {
        if !self.pins.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err("the pins are sorted by slot, one each");
        }
        for &(slot, _) in &self.pins {
            let node = self.nodes.get(slot as usize).ok_or("a pin names a slot of the slab")?;
            if node.state == State::Free || node.binding != Binding::Process {
                return Err("a pin belongs to a process-bound capability in use");
            }
        }
        let bound = self.nodes.iter().filter(|n| n.state != State::Free && n.binding == Binding::Process).count();
        if bound != self.pins.len() {
            return Err("every process-bound capability has its pin");
        }
        Ok(())
    }
}
