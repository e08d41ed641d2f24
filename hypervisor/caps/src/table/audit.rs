//! A full consistency audit of a table: the slab, the free list, the derivation tree with its
//! proxies, the index and the quotas. Linear in the table's size; used after every step of
//! the host tests and of nk-protocol's simulator, and available to a debugging hypervisor.

use alloc::vec;
use alloc::vec::Vec;

use super::node::{Account, Link, State};
use super::CapTable;
#[cfg(test)]
use crate::ids::{Binding, Object, Principal, Rights};
#[cfg(test)]
use crate::name::CapName;

/// Names the first internal invariant a table audit found broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditFailure(pub &'static str);

/// Fails the audit with `$what` unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $what:literal) => {
        if !$cond {
            return Err(AuditFailure($what));
        }
    };
}

/// Describes a capability regardless of who asks (tests only).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peek {
    pub(crate) live: bool,
    pub(crate) object: Object,
    pub(crate) rights: Rights,
    pub(crate) holder: Principal,
    pub(crate) binding: Binding,
    pub(crate) parent: Option<CapName>,
}

impl CapTable {
    /// Describes the capability `name`, live or revoked, to nobody in particular.
    #[cfg(test)]
    pub(crate) fn peek(&self, name: CapName) -> Option<Peek> {
        let node = &self.nodes[self.lookup(name)?];
        Some(Peek {
            live: node.state == State::Live,
            object: node.object(),
            rights: node.rights,
            holder: node.holder,
            binding: node.binding,
            parent: node.parent.get().map(|parent| self.nodes[parent].name),
        })
    }

    /// Panics unless every internal invariant holds (tests only).
    #[cfg(test)]
    pub(crate) fn audit(&self) {
        if let Err(failure) = self.check_consistency() {
            panic!("table audit failed: {}", failure.0);
        }
    }

    /// Checks every internal invariant of the table and names the first one broken. Linear
    /// in the table's capacity; allocates one bit per slab node.
    ///
    /// Beyond the single-kernel invariants (DESIGN.md §2: every live child refers to its
    /// parent's object with a subset of its rights; the tree is a forest; every node in use
    /// is indexed and on its holder's list, and quotas count those lists), it checks the
    /// shape the distributed protocol relies on:
    ///
    /// * a proxy carries another kernel's id, is on no holder's list, hangs from a local
    ///   capability if from anything, and has a parent or children (an unused proxy is
    ///   freed);
    /// * a revoking capability has children, and all of them are revoking capabilities or
    ///   proxies with a revoke sent: so every revoking subtree waits on at least one remote
    ///   kernel, and none is stuck;
    /// * a live capability hangs from nothing, a live capability or a proxy not revoking;
    /// * a reservation hangs from a proxy not revoking and has no children.
    pub fn check_consistency(&self) -> Result<(), AuditFailure> {
        let in_use = self.in_use as usize;
        ensure!(self.in_use <= self.capacity, "in_use exceeds the capacity");
        ensure!(self.nodes.len() == self.capacity as usize, "the slab has the capacity's size");

        // Slab and free list.
        let used = self.nodes.iter().filter(|n| n.state != State::Free).count();
        ensure!(used == in_use, "in_use counts the nodes in use");
        let mut free = 0;
        let mut cursor = self.free_head;
        while let Some(slot) = cursor.get() {
            ensure!(self.nodes[slot].state == State::Free, "the free list holds only free nodes");
            free += 1;
            ensure!(free <= self.nodes.len(), "the free list has a cycle");
            cursor = self.nodes[slot].next_sibling;
        }
        ensure!(free + in_use == self.nodes.len(), "every free node is on the free list");

        // Process bindings.
        self.check_pins().map_err(AuditFailure)?;

        // Index.
        self.index.check().map_err(AuditFailure)?;
        ensure!(self.index.len() == in_use, "the index holds exactly the nodes in use");
        for slot in self.index.slots() {
            ensure!(self.nodes[slot].state != State::Free, "the index holds no free node");
        }

        let mut in_tree = 0;
        for (slot, node) in self.nodes.iter().enumerate() {
            if node.state == State::Free {
                continue;
            }
            let found = if node.state.is_proxy() { self.lookup_foreign(node.name) } else { self.lookup(node.name) };
            ensure!(found == Some(slot), "the name finds its node");
            ensure!(
                node.state.is_proxy() == (node.name.kernel() != self.kernel()),
                "exactly the proxies carry another kernel's id"
            );
            let parent = node.parent.get().map(|parent| &self.nodes[parent]);
            let children = || {
                let mut child = node.first_child;
                core::iter::from_fn(move || {
                    let slot = child.get()?;
                    child = self.nodes[slot].next_sibling;
                    Some(&self.nodes[slot])
                })
            };
            match node.state {
                State::Free => unreachable!("skipped above"),
                State::Revoked => {
                    ensure!(node.parent == Link::NIL, "a revoked node has no parent");
                    ensure!(node.first_child == Link::NIL, "a revoked node has no children");
                    ensure!(node.next_sibling == Link::NIL, "a revoked node has no siblings");
                    ensure!(node.prev_sibling == Link::NIL, "a revoked node has no siblings");
                    self.check_kind(node.am, node.kind, node.rights)?;
                    continue;
                }
                State::Live => {
                    self.check_kind(node.am, node.kind, node.rights)?;
                    if let Some(parent) = parent {
                        ensure!(
                            matches!(parent.state, State::Live | State::Remote),
                            "a live node hangs from a live node or a proxy not revoking"
                        );
                        if parent.state == State::Live {
                            ensure!(parent.object() == node.object(), "derivation keeps the object");
                            ensure!(parent.rights.contains(node.rights), "no amplification");
                        }
                    }
                }
                State::Revoking => {
                    self.check_kind(node.am, node.kind, node.rights)?;
                    ensure!(node.first_child != Link::NIL, "a revoking node waits for children");
                    ensure!(
                        children().all(|c| matches!(c.state, State::Revoking | State::RemoteRevoking)),
                        "a revoking node's children are revoking"
                    );
                }
                State::Pending => {
                    ensure!(
                        parent.is_some_and(|p| p.state == State::Remote),
                        "a reservation hangs from a proxy not revoking"
                    );
                    ensure!(node.first_child == Link::NIL, "a reservation has no children");
                }
                State::Remote | State::RemoteRevoking => {
                    ensure!(node.held_prev == Link::NIL && node.held_next == Link::NIL, "a proxy has no holder");
                    ensure!(
                        parent.is_none_or(|p| matches!(p.state, State::Live | State::Revoking)),
                        "a proxy hangs from a local capability"
                    );
                    ensure!(node.parent != Link::NIL || node.first_child != Link::NIL, "an unused proxy is freed");
                    ensure!(
                        node.state == State::Remote || node.parent != Link::NIL,
                        "a proxy being revoked has a parent"
                    );
                    ensure!(
                        children().all(|c| !c.state.is_proxy() && c.state != State::Revoked),
                        "a proxy's children are local"
                    );
                    if node.state == State::RemoteRevoking {
                        ensure!(
                            children().all(|c| c.state == State::Revoking),
                            "a proxy being revoked keeps only revoking children"
                        );
                    }
                }
            }
            in_tree += 1;
            match node.prev_sibling.get() {
                Some(prev) => {
                    ensure!(self.nodes[prev].next_sibling == Link::to(slot), "sibling links agree");
                    ensure!(self.nodes[prev].parent == node.parent, "siblings share their parent");
                }
                None => {
                    if let Some(parent) = node.parent.get() {
                        ensure!(self.nodes[parent].first_child == Link::to(slot), "a first child is its parent's");
                    }
                }
            }
            if let Some(next) = node.next_sibling.get() {
                ensure!(self.nodes[next].prev_sibling == Link::to(slot), "sibling links agree");
                ensure!(self.nodes[next].parent == node.parent, "siblings share their parent");
            }
            if let Some(child) = node.first_child.get() {
                ensure!(self.nodes[child].parent == Link::to(slot), "a first child names its parent");
                ensure!(self.nodes[child].prev_sibling == Link::NIL, "a first child has no previous sibling");
            }
        }

        // The tree is a forest: a walk from the roots meets every node in it exactly once.
        let mut seen = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !matches!(n.state, State::Free | State::Revoked) && n.parent == Link::NIL)
            .map(|(slot, _)| slot)
            .collect();
        let mut reached = 0;
        while let Some(slot) = stack.pop() {
            ensure!(!seen[slot], "a node is reached twice");
            seen[slot] = true;
            reached += 1;
            let mut child = self.nodes[slot].first_child;
            while let Some(c) = child.get() {
                stack.push(c);
                child = self.nodes[c].next_sibling;
            }
        }
        ensure!(reached == in_tree, "every node in the tree hangs from a root");

        // Holders' lists and quotas.
        let mut listed = 0;
        for entry in self.principals.iter() {
            let mut count = 0;
            let mut prev = Link::NIL;
            let mut cursor = entry.held_head;
            while let Some(slot) = cursor.get() {
                let node = &self.nodes[slot];
                ensure!(node.state != State::Free && !node.state.is_proxy(), "a held list holds capabilities");
                ensure!(node.holder == entry.principal, "a node is on its holder's list");
                ensure!(node.held_prev == prev, "held links agree");
                count += 1;
                ensure!(count <= in_use, "a held list has a cycle");
                prev = cursor;
                cursor = node.held_next;
            }
            ensure!(count == entry.held as usize, "held counts the holder's list");
            listed += count;
            let charged = self.nodes.iter().filter(|node| node.payer == entry.account).count();
            ensure!(charged == entry.charged as usize, "charged counts the nodes the principal pays for");
            ensure!(self.accounts.get(usize::from(entry.account.0)) == Some(&Some(entry.principal)), "accounts agree");
        }
        let numbered = self.accounts.iter().filter(|a| a.is_some()).count();
        ensure!(numbered == self.principals.len(), "every account belongs to a registered principal");
        for node in self.nodes.iter().filter(|node| node.payer != Account::NONE) {
            ensure!(!matches!(node.state, State::Free) && !node.state.is_proxy(), "only capabilities have payers");
            ensure!(self.accounts.get(usize::from(node.payer.0)).is_some_and(Option::is_some), "a payer is registered");
        }
        let proxies = self.nodes.iter().filter(|n| n.state.is_proxy()).count();
        ensure!(listed + proxies == in_use, "every capability is on one holder's list");
        Ok(())
    }

    /// Checks that a capability's kind is registered and defines its rights.
    fn check_kind(
        &self,
        am: crate::ids::AmId,
        kind: crate::ids::ObjKind,
        rights: crate::ids::Rights,
    ) -> Result<(), AuditFailure> {
        let kind = self.registry.kind(am, kind).ok_or(AuditFailure("the object's kind is registered"))?;
        ensure!(kind.defined_rights().contains(rights), "the kind defines the rights");
        Ok(())
    }
}
