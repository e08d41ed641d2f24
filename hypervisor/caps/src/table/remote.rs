//! The distributed protocol's side of a table (DESIGN.md §3): proxies for capabilities of
//! other kernels, the mark-and-wait revocation walk, and the steps of the cross-kernel
//! delegation and obtain handshakes.
//!
//! nk-protocol drives these methods; the table sends no message itself. What a message must
//! carry comes out through a [`LinkSink`]: "revoke this remote child" and "this capability's
//! subtree is now dead everywhere".
//!
//! # Proxies
//!
//! A capability tree may span kernels (SemperOS slides, "Distributed Capabilities –
//! Delegation"): a parent on kernel A, a child on kernel B. Each side records the link with
//! a *proxy*, a node named after the capability on the other side (its name's kernel bits
//! say where that is) with no object, rights or holder:
//!
//! * on A, a proxy for the child hangs in the parent's list of children;
//! * on B, the child hangs below a proxy for the parent, shared by all of that parent's
//!   children on B.
//!
//! One proxy node serves both roles when a tree zigzags (A → B → A): it is the child of a
//! local capability and the parent of others. Local names and proxy names never collide, as
//! a proxy's name carries another kernel's id, so the index holds both and a lookup of a
//! name presented by a guest (which must carry this kernel's id) never finds a proxy.
//! Proxies count against the table's capacity but against no principal's quota: each one
//! stands for a capability that is charged (to its payer) on its own kernel.
//!
//! # Revocation: mark, forward, wait, finalize
//!
//! The walk of SemperOS's revocation ("Distributed Capabilities – Revocation"), done here
//! without recursion or a stack: every live capability of the subtree is made unusable and
//! reported to its AM at once (in post-order, descendants first); each proxy of a remote
//! child becomes [`NodeState::RemoteRevoking`] and is reported as
//! [`LinkEvent::RevokeRemote`]. A capability whose local subtree is then empty is
//! *finalized* (state `Revoked`, out of the tree); one that still has such a proxy below it
//! stays in the tree as [`NodeState::Revoking`]. When a remote kernel reports a child gone
//! ([`CapTable::remote_gone`]), its proxy is removed and every ancestor left without
//! children is finalized in turn. So a capability is finalized exactly when its whole
//! subtree, on every kernel, is dead, and waiting follows the tree downward only: two
//! revocations of overlapping or zigzagging trees can never wait for each other in a cycle.

use alloc::vec::Vec;

use super::node::{Account, Link, Node, State};
use super::{CapError, CapInfo, CapTable, NewCap, PrincipalError};
use crate::ids::{AmId, Binding, KernelId, ObjId, ObjKind, Object, Principal, Rights};
use crate::name::CapName;
use crate::table::revoke::{DeadCap, RevocationHook};

/// Tells what a node holds, as [`CapTable::node`] and [`CapTable::nodes`] report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// A usable capability.
    Live,
    /// A capability whose revocation waits for remote parts of its subtree: unusable, its AM
    /// told, still in the tree.
    Revoking,
    /// A revoked capability, out of the tree, kept until its holder deletes it.
    Revoked,
    /// A capability reserved for a cross-kernel obtain, not yet granted.
    Pending,
    /// A proxy for a capability of another kernel.
    Remote,
    /// A proxy whose remote capability has been sent a revoke.
    RemoteRevoking,
}

/// Describes one node of a table, for the protocol's invariant checks, tools and tests
/// (it bypasses the holder checks a guest's request goes through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The capability's name (for a proxy, the remote capability's name).
    pub name: CapName,
    /// What the node holds.
    pub state: NodeState,
    /// The name of the node it hangs from: a local capability or a proxy.
    pub parent: Option<CapName>,
    /// The object, rights, holder and binding; `None` for a proxy. A pending reservation
    /// has its holder but no object or rights yet.
    pub cap: Option<CapInfo>,
}

/// Reports what the distributed protocol must tell other kernels after a table operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A revocation reached the proxy of a remote child: `child.kernel()` must revoke
    /// `child` and its subtree, and report it gone.
    RevokeRemote {
        /// The remote child's name.
        child: CapName,
        /// The local capability its proxy hangs from, when a walk marked it: the protocol
        /// revokes all of one parent's children on one kernel with one message (see
        /// [`CapTable::revoke_below`]). `None` for a single child revoked by its parent's
        /// holder ([`CapTable::revoke_remote_child`]).
        parent: Option<CapName>,
    },
    /// The capability `name` was finalized: it and its whole subtree are dead on every
    /// kernel. Reported for the root of every revocation walk, for every capability that
    /// waited in [`NodeState::Revoking`], and for every capability whose parent is remote
    /// (whose kernel, `remote_parent.kernel()`, must then drop its proxy).
    Finalized {
        /// The finalized capability.
        name: CapName,
        /// Its parent's name, when the parent lives on another kernel.
        remote_parent: Option<CapName>,
    },
}

/// Receives the [`LinkEvent`]s of a table operation. The table calls it while borrowed
/// mutably, so an implementation records events and acts on them afterwards.
pub trait LinkSink {
    /// Records one event.
    fn link_event(&mut self, event: LinkEvent);
}

impl LinkSink for Vec<LinkEvent> {
    fn link_event(&mut self, event: LinkEvent) {
        self.push(event);
    }
}

/// Drops events, for the single-kernel methods that tear down remote relations locally.
pub(super) struct Discard;

impl LinkSink for Discard {
    fn link_event(&mut self, _: LinkEvent) {}
}

/// Tells what one revocation walk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The live capabilities that died (each reported to the hook once).
    pub killed: usize,
    /// Whether the root was finalized at once (no remote part below it); otherwise it is
    /// [`NodeState::Revoking`] until a [`LinkEvent::Finalized`] reports it.
    pub finished: bool,
}

/// Tells what a batched revoke ([`CapTable::revoke_below`]) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BelowWalk {
    /// The children that will report their finalization to the batch (among the walk's
    /// events or later): those left revoking. Children finalized during the call are
    /// not reported and not counted here.
    pub members: usize,
    /// The live capabilities that died.
    pub killed: usize,
}

/// Tells what became of a revoke of a proxy (a remote child) by its local parent's holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeStart {
    /// The proxy was marked and a [`LinkEvent::RevokeRemote`] reported.
    Sent,
    /// A revoke of it was sent already; its gone report is awaited.
    InProgress,
}

/// Tells what a revoke that arrived from another kernel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncomingRevoke {
    /// A live capability: its subtree was walked.
    Walked(Walk),
    /// A capability already revoking: it will be reported finalized.
    InProgress,
    /// Nothing live: the capability is revoked already, was never created, was deleted,
    /// or was a reservation (now cancelled).
    Dead,
}

/// Describes a child being created on another kernel: what the delegation or obtain
/// message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteGrant {
    /// The child's name (its kernel bits name the kernel it lives on).
    pub child: CapName,
    /// The object it refers to (its parent's).
    pub object: Object,
    /// Its rights: the parent's, masked.
    pub rights: Rights,
    /// Whether it is bound to its holder or a bearer capability.
    pub binding: Binding,
}

/// The placeholder object of a reservation and of a proxy.
const NO_OBJECT: Object = Object::new(AmId::new(0), ObjKind::new(0), ObjId::new(0));

impl From<State> for NodeState {
    fn from(state: State) -> Self {
        match state {
            State::Live => NodeState::Live,
            State::Revoking => NodeState::Revoking,
            State::Revoked => NodeState::Revoked,
            State::Pending => NodeState::Pending,
            State::Remote => NodeState::Remote,
            State::RemoteRevoking => NodeState::RemoteRevoking,
            State::Free => unreachable!("free nodes are never viewed"),
        }
    }
}

impl CapTable {
    // ---------------------------------------------------------------------------------
    // Introspection.
    // ---------------------------------------------------------------------------------

    /// Describes the node named `name`, a local capability in any state or a proxy.
    pub fn node(&self, name: CapName) -> Option<NodeView> {
        let slot = self.lookup(name).or_else(|| self.lookup_foreign(name))?;
        Some(self.view(slot))
    }

    /// Returns the state of the node named `name` (a local capability or a proxy), as
    /// [`node`](Self::node) reports it, without describing the rest.
    pub fn node_state(&self, name: CapName) -> Option<NodeState> {
        let slot = self.lookup(name).or_else(|| self.lookup_foreign(name))?;
        Some(self.nodes[slot].state.into())
    }

    /// Describes every node in use, in slab order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeView> + '_ {
        self.nodes.iter().enumerate().filter(|(_, node)| node.state != State::Free).map(|(slot, _)| self.view(slot))
    }

    fn view(&self, slot: usize) -> NodeView {
        let node = &self.nodes[slot];
        let cap = (!node.state.is_proxy()).then(|| CapInfo {
            object: node.object(),
            rights: node.rights,
            holder: node.holder,
            binding: node.binding,
        });
        NodeView {
            name: node.name,
            state: node.state.into(),
            parent: node.parent.get().map(|parent| self.nodes[parent].name),
            cap,
        }
    }

    // ---------------------------------------------------------------------------------
    // Permission checks (the same rules as the single-kernel methods).
    // ---------------------------------------------------------------------------------

    /// Checks that `caller` may revoke the local capability `name` (it may use it, or it
    /// holds its local parent) and returns its state: `Live`, `Revoking` or `Revoked`.
    pub fn may_revoke(&self, caller: Principal, name: CapName) -> Result<NodeState, CapError> {
        let slot = self.lookup(name).ok_or(CapError::UnknownName)?;
        self.may_revoke_slot(caller, slot).map(NodeState::from)
    }

    /// Checks that `caller` holds the local capability `name` and may delete it, and returns
    /// its state: `Live`, `Revoking` or `Revoked`.
    pub fn may_delete(&self, caller: Principal, name: CapName) -> Result<NodeState, CapError> {
        let slot = self.lookup(name).ok_or(CapError::UnknownName)?;
        self.may_delete_slot(caller, slot).map(NodeState::from)
    }

    pub(super) fn may_revoke_slot(&self, caller: Principal, slot: usize) -> Result<State, CapError> {
        let node = &self.nodes[slot];
        if node.state == State::Pending {
            return Err(CapError::UnknownName);
        }
        // A proxy parent has no holder: holding "the parent" means holding a local one.
        let holds_parent =
            node.parent.get().is_some_and(|parent| !self.nodes[parent].state.is_proxy() && self.holds(parent, caller));
        if !self.usable(slot, caller) && !holds_parent {
            return Err(CapError::WrongHolder);
        }
        Ok(node.state)
    }

    pub(super) fn may_delete_slot(&self, caller: Principal, slot: usize) -> Result<State, CapError> {
        let node = &self.nodes[slot];
        if node.state == State::Pending {
            return Err(CapError::UnknownName);
        }
        if !self.holds(slot, caller) {
            return Err(CapError::WrongHolder);
        }
        Ok(node.state)
    }

    // ---------------------------------------------------------------------------------
    // Revocation.
    // ---------------------------------------------------------------------------------

    /// Starts the distributed revocation of the live local capability `name` (the caller
    /// checked permission with [`may_revoke`](Self::may_revoke) or
    /// [`may_delete`](Self::may_delete)): marks its subtree, tells `hook` of every death and
    /// `links` of every remote child to revoke. Returns `None` if `name` is not a live local
    /// capability.
    pub fn revoke_walk<H, L>(&mut self, name: CapName, hook: &mut H, links: &mut L) -> Option<Walk>
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
    {
        let slot = self.lookup(name)?;
        if self.nodes[slot].state != State::Live {
            return None;
        }
        let walk = self.mark_subtree(slot, hook, links, true);
        hook.finished();
        Some(walk)
    }

    /// Checks as [`may_revoke`](Self::may_revoke) does (as
    /// [`may_delete`](Self::may_delete) if `delete` is set) and, if the capability is
    /// live, walks its subtree as [`revoke_walk`](Self::revoke_walk) does, with one
    /// look-up of `name` for both (issue 14: a local revoke looked it up twice). Returns
    /// the walk, or the state of a capability that is not live (nothing walked).
    pub fn check_and_walk<H, L>(
        &mut self,
        caller: Principal,
        name: CapName,
        delete: bool,
        hook: &mut H,
        links: &mut L,
    ) -> Result<Result<Walk, NodeState>, CapError>
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
    {
        let slot = self.lookup(name).ok_or(CapError::UnknownName)?;
        let state = if delete { self.may_delete_slot(caller, slot)? } else { self.may_revoke_slot(caller, slot)? };
        if state != State::Live {
            return Ok(Err(NodeState::from(state)));
        }
        let walk = self.mark_subtree(slot, hook, links, true);
        hook.finished();
        Ok(Ok(walk))
    }

    /// Handles a revoke of the local capability `name` sent by the kernel of its parent.
    pub fn revoke_incoming<H, L>(&mut self, name: CapName, hook: &mut H, links: &mut L) -> IncomingRevoke
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
    {
        let Some(slot) = self.lookup(name) else {
            return IncomingRevoke::Dead;
        };
        match self.nodes[slot].state {
            State::Live => {
                let walk = self.mark_subtree(slot, hook, links, true);
                hook.finished();
                IncomingRevoke::Walked(walk)
            }
            State::Revoking => IncomingRevoke::InProgress,
            State::Pending => {
                self.cancel_slot(slot);
                IncomingRevoke::Dead
            }
            State::Revoked => IncomingRevoke::Dead,
            State::Free | State::Remote | State::RemoteRevoking => unreachable!("lookup finds local nodes only"),
        }
    }

    /// Handles a batched revoke sent by the kernel of remote capability `parent`: revokes
    /// every child of this kernel's proxy of `parent` in one pass (SemperOS sends one
    /// revoke per child; one message per parent and kernel costs the same per capability
    /// on the receiver and a constant on the link).
    ///
    /// A live child is walked as [`revoke_incoming`](Self::revoke_incoming) walks it; a
    /// revoking one is left to its revocation, and counted unless `individual` says its
    /// parent's kernel waits for its own `Gone` (a revoke of that child alone arrived
    /// first); a reservation is left to its obtain, which the revoked parent refuses.
    /// A live child whose subtree dies here at once is finalized without a report; each of
    /// the others will report one [`LinkEvent::Finalized`] with `remote_parent ==
    /// Some(parent)` (now, among `links`, or later). Returns how many children will
    /// report (so the batch is answered at once when none will) and what the walks
    /// killed.
    pub fn revoke_below<H, L, F>(
        &mut self,
        parent: CapName,
        hook: &mut H,
        links: &mut L,
        mut individual: F,
    ) -> BelowWalk
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
        F: FnMut(CapName) -> bool,
    {
        let mut below = BelowWalk { members: 0, killed: 0 };
        let Some(proxy) = self.lookup_foreign(parent) else {
            return below;
        };
        // The walks change the list under the cursor, but only at the child just walked:
        // a walk finalizes (unlinks) its own root and touches nothing outside its subtree
        // but the proxy above it, which it releases only once no child is left. So the
        // next sibling, read before the walk, is still the proxy's next child after it (no
        // copy of the names and no index look-up per child, issue 14).
        let mut cursor = self.nodes[proxy].first_child;
        while let Some(slot) = cursor.get() {
            cursor = self.nodes[slot].next_sibling;
            match self.nodes[slot].state {
                State::Live => {
                    // A child whose subtree dies here at once is done: it is counted, not
                    // reported (issue 14: no event per capability for the batch's
                    // answer to count down). One with remote parts reports later.
                    let walk = self.mark_subtree(slot, hook, links, false);
                    below.members += usize::from(!walk.finished);
                    below.killed += walk.killed;
                }
                State::Revoking if !individual(self.nodes[slot].name) => below.members += 1,
                _ => {}
            }
        }
        hook.finished();
        below
    }

    /// Handles the batched report that the children of the local capability `parent`
    /// named in `proxies` (those a walk sent one batched revoke, all of one kernel) are
    /// gone with their subtrees, except those for which `individual` says a report of
    /// their own follows: drops their proxies as [`remote_gone`](Self::remote_gone) does
    /// (a name whose proxy is gone already, or hangs elsewhere, is skipped), then finalizes
    /// the revoking ancestors left without children. Returns how many it dropped; the
    /// names dropped are left at the front of `proxies`, the rest removed.
    pub fn remote_children_gone<L, F>(
        &mut self,
        parent: CapName,
        proxies: &mut Vec<CapName>,
        mut individual: F,
        links: &mut L,
    ) -> usize
    where
        L: LinkSink + ?Sized,
        F: FnMut(CapName) -> bool,
    {
        let Some(parent_slot) = self.lookup(parent) else {
            proxies.clear();
            return 0;
        };
        let mut dropped = 0;
        // The batch lists the proxies in the order the walk met them, the parent's list
        // order, and that list only loses members meanwhile: the node after the last one
        // dropped is usually the next one named, found without the index (a name is in
        // the index once, so a node of the list that bears it is the one the index holds).
        let own = self.kernel();
        let mut guess = self.nodes[parent_slot].first_child;
        for at in 0..proxies.len() {
            let name = proxies[at];
            let slot = match guess.get() {
                Some(slot) if self.nodes[slot].name == name && name.kernel() != own => slot,
                _ => match self.lookup_foreign(name) {
                    Some(slot) => slot,
                    None => continue,
                },
            };
            // One read of the node's links serves the checks and the unlinking.
            let Node { state, parent, first_child, prev_sibling, next_sibling, .. } = self.nodes[slot];
            guess = next_sibling;
            if state != State::RemoteRevoking || parent.get() != Some(parent_slot) || individual(name) {
                continue;
            }
            proxies[dropped] = name;
            dropped += 1;
            // Unlink from the parent's children (as unlink_from_parent does); a node that
            // is released needs no links of its own cleared, as releasing blanks it.
            match prev_sibling.get() {
                Some(prev) => self.nodes[prev].next_sibling = next_sibling,
                None => self.nodes[parent_slot].first_child = next_sibling,
            }
            if let Some(next) = next_sibling.get() {
                self.nodes[next].prev_sibling = prev_sibling;
            }
            if first_child.get().is_none() {
                self.release(slot);
            } else {
                let node = &mut self.nodes[slot];
                node.parent = Link::NIL;
                node.prev_sibling = Link::NIL;
                node.next_sibling = Link::NIL;
                node.state = State::Remote;
            }
        }
        proxies.truncate(dropped);
        if dropped > 0 {
            self.prune(Link::to(parent_slot), links);
        }
        dropped
    }

    /// Starts the revoke of the remote child `child` by `caller`, the holder of the local
    /// capability that `child`'s proxy hangs from (a principal takes back what it
    /// delegated). Returns `None` when there is no such proxy or `caller` does not hold its
    /// parent.
    pub fn revoke_remote_child<L>(&mut self, caller: Principal, child: CapName, links: &mut L) -> Option<RevokeStart>
    where
        L: LinkSink + ?Sized,
    {
        let slot = self.lookup_foreign(child)?;
        let parent = self.nodes[slot].parent.get()?;
        if self.nodes[parent].state.is_proxy() || !self.holds(parent, caller) {
            return None;
        }
        match self.nodes[slot].state {
            State::Remote => {
                self.nodes[slot].state = State::RemoteRevoking;
                links.link_event(LinkEvent::RevokeRemote { child, parent: None });
                Some(RevokeStart::Sent)
            }
            State::RemoteRevoking => Some(RevokeStart::InProgress),
            _ => None,
        }
    }

    /// Handles the report that remote child `child` and its whole subtree are gone: drops
    /// its proxy's link to its local parent (and the proxy, unless local children still
    /// hang from it), then finalizes every revoking ancestor left without children.
    /// Returns `None` if no proxy of `child` had a local parent (a repeated report), else
    /// whether a revoke had been sent to it.
    pub fn remote_gone<L>(&mut self, child: CapName, links: &mut L) -> Option<bool>
    where
        L: LinkSink + ?Sized,
    {
        let slot = self.lookup_foreign(child)?;
        let parent = self.nodes[slot].parent;
        parent.get()?;
        let was_revoking = self.nodes[slot].state == State::RemoteRevoking;
        self.unlink_from_parent(slot);
        if self.nodes[slot].first_child.get().is_none() {
            self.release(slot);
        } else {
            self.nodes[slot].state = State::Remote;
        }
        self.prune(parent, links);
        Some(was_revoking)
    }

    /// Frees the revoked capability `name` (the second half of a delete whose revocation
    /// had to wait). Returns whether it did.
    pub fn free_revoked(&mut self, name: CapName) -> bool {
        match self.lookup(name) {
            Some(slot) if self.nodes[slot].state == State::Revoked => {
                self.free(slot);
                true
            }
            _ => false,
        }
    }

    /// Marks the subtree of the live capability in `root`: walks it in post-order without
    /// recursion (descending through first children, moving to the next sibling or back up
    /// through the parent link), so each node is entered and left once and the walk takes
    /// linear time and constant memory, whatever the tree's shape. On leaving a node:
    ///
    /// * a live capability is reported to `hook`; it is finalized if nothing is left below
    ///   it, else it becomes `Revoking`;
    /// * a proxy of a remote child is marked `RemoteRevoking` and reported to `links` (the
    ///   walk first descends into the local children a zigzagging tree hangs below it);
    /// * a reservation below such a proxy is cancelled;
    /// * a subtree already revoking is left to the revocation that marked it.
    ///
    /// The root, when finalized, is reported to `links` if `report_root` is set (every
    /// finalized node whose parent is a proxy is reported otherwise).
    fn mark_subtree<H, L>(&mut self, root: usize, hook: &mut H, links: &mut L, report_root: bool) -> Walk
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
    {
        debug_assert_eq!(self.nodes[root].state, State::Live);
        let root_parent = self.nodes[root].parent;
        let mut killed = 0;
        let mut current = root;
        let mut entering = true;
        loop {
            if entering {
                let node = &self.nodes[current];
                if matches!(node.state, State::Live | State::Remote) {
                    if let Some(child) = node.first_child.get() {
                        current = child;
                        continue;
                    }
                }
            }
            // Leave `current`; where to go next is read first, as leaving may unlink it.
            let Node { parent, mut next_sibling, .. } = self.nodes[current];
            let at_root = current == root;
            match self.nodes[current].state {
                State::Live => {
                    let node = &self.nodes[current];
                    hook.revoked(&DeadCap {
                        name: node.name,
                        object: node.object(),
                        rights: node.rights,
                        holder: node.holder,
                    });
                    killed += 1;
                    if node.first_child.get().is_none() {
                        if at_root && !report_root {
                            self.unlink_from_parent(current);
                            self.nodes[current].state = State::Revoked;
                        } else {
                            self.finalize(current, at_root, links);
                        }
                    } else {
                        self.nodes[current].state = State::Revoking;
                    }
                }
                State::Remote => {
                    let node = &mut self.nodes[current];
                    node.state = State::RemoteRevoking;
                    let child = node.name;
                    let parent = parent.get().map(|parent| self.nodes[parent].name);
                    links.link_event(LinkEvent::RevokeRemote { child, parent });
                    // The siblings that follow are mostly proxies without children too
                    // (a parent's delegations to other kernels): each would be entered
                    // and left at once, in this order. Leave them here in one run, with
                    // the parent's name read once (issue 14).
                    while let Some(sibling) = next_sibling.get() {
                        let node = &mut self.nodes[sibling];
                        if node.state != State::Remote || node.first_child.get().is_some() {
                            break;
                        }
                        node.state = State::RemoteRevoking;
                        next_sibling = node.next_sibling;
                        links.link_event(LinkEvent::RevokeRemote { child: node.name, parent });
                    }
                }
                State::Pending => self.cancel_slot(current),
                State::Revoking | State::RemoteRevoking => {}
                State::Free | State::Revoked => unreachable!("nodes in the tree are in use and not revoked"),
            }
            if at_root {
                break;
            }
            match next_sibling.get() {
                Some(sibling) => {
                    current = sibling;
                    entering = true;
                }
                None => {
                    current = parent.get().expect("a non-root node of the walk has a parent");
                    entering = false;
                }
            }
        }
        let finished = self.nodes[root].state == State::Revoked;
        if finished {
            // The root left its parent: a proxy parent may now be unused.
            self.prune(root_parent, links);
        }
        Walk { killed, finished }
    }

    /// Finalizes the childless node in `slot`: it leaves the tree as `Revoked`. Reports it
    /// to `links` if `report` is set or its parent is a proxy. Returns its former parent.
    /// Inlined: it runs once per capability of a revoked subtree (issue 14).
    #[inline(always)]
    fn finalize<L>(&mut self, slot: usize, report: bool, links: &mut L) -> Link
    where
        L: LinkSink + ?Sized,
    {
        debug_assert!(self.nodes[slot].first_child.get().is_none());
        let parent = self.nodes[slot].parent;
        let remote_parent =
            parent.get().filter(|&parent| self.nodes[parent].state.is_proxy()).map(|parent| self.nodes[parent].name);
        self.unlink_from_parent(slot);
        self.nodes[slot].state = State::Revoked;
        if report || remote_parent.is_some() {
            links.link_event(LinkEvent::Finalized { name: self.nodes[slot].name, remote_parent });
        }
        parent
    }

    /// Walks up from `start` after a child left it: finalizes each revoking node left
    /// without children, and releases a proxy left with neither parent nor children.
    pub(super) fn prune<L>(&mut self, start: Link, links: &mut L)
    where
        L: LinkSink + ?Sized,
    {
        let mut cursor = start;
        while let Some(slot) = cursor.get() {
            let node = &self.nodes[slot];
            if node.first_child.get().is_some() {
                return;
            }
            match node.state {
                State::Revoking => cursor = self.finalize(slot, true, links),
                State::Remote if node.parent.get().is_none() => {
                    self.release(slot);
                    return;
                }
                _ => return,
            }
        }
    }

    /// Frees the reservation in `slot` and any proxy it leaves unused.
    fn cancel_slot(&mut self, slot: usize) {
        debug_assert_eq!(self.nodes[slot].state, State::Pending);
        let parent = self.nodes[slot].parent;
        self.unlink_from_parent(slot);
        self.nodes[slot].state = State::Revoked;
        self.free(slot);
        self.prune(parent, &mut Discard);
    }

    // ---------------------------------------------------------------------------------
    // Delegation and obtain across kernels (SemperOS slides, "Delegation").
    // ---------------------------------------------------------------------------------

    /// Starts a delegation of the local capability `parent`, which `caller` may use, to a
    /// holder on kernel `kernel`: draws the child's name (with `kernel`'s id), hangs its
    /// proxy below `parent`, and returns what the delegation message carries.
    pub fn delegate_remote(
        &mut self,
        caller: Principal,
        parent: CapName,
        kernel: KernelId,
        mask: Rights,
        binding: Binding,
    ) -> Result<RemoteGrant, CapError> {
        let slot = self.resolve(caller, parent)?;
        if kernel == self.kernel() {
            return Err(CapError::UnknownPrincipal);
        }
        if self.in_use >= self.capacity {
            return Err(CapError::TableFull);
        }
        let (index, nodes) = (&self.index, &self.nodes);
        let (child, hash) =
            self.names.fresh_for(kernel, |candidate, hash| index.find(hash, |s| nodes[s].name == candidate).is_some());
        self.create_proxy(child, hash, Link::to(slot));
        let node = &self.nodes[slot];
        Ok(RemoteGrant { child, object: node.object(), rights: node.rights & mask, binding })
    }

    /// Grants an obtain: `presenter`, a principal of the kernel named in `child`, asks for
    /// a child of the local capability `parent` with the rights in `mask`. Checks that
    /// `presenter` may use `parent`, hangs the child's proxy below it, and returns what the
    /// answer carries (the binding is `binding`, or the parent's if `None`).
    pub fn grant_remote(
        &mut self,
        presenter: Principal,
        parent: CapName,
        child: CapName,
        mask: Rights,
        binding: Option<Binding>,
    ) -> Result<RemoteGrant, CapError> {
        let slot = self.resolve(presenter, parent)?;
        if self.nodes[slot].binding == Binding::Process {
            // The root is the call's on this kernel instance, not the presenter's.
            return Err(CapError::NotBindable);
        }
        if child.kernel() == self.kernel() || self.lookup_foreign(child).is_some() {
            return Err(CapError::UnknownName);
        }
        if self.in_use >= self.capacity {
            return Err(CapError::TableFull);
        }
        self.create_proxy(child, self.names.hash(child), Link::to(slot));
        let node = &self.nodes[slot];
        Ok(RemoteGrant {
            child,
            object: node.object(),
            rights: node.rights & mask,
            binding: binding.unwrap_or(node.binding),
        })
    }

    /// Accepts a delegated child: creates the live capability `grant.child`, held by
    /// `holder`, below the proxy of its remote parent `parent` (made if this is the
    /// parent's first child here). It is charged to `delegator` (the principal of the other
    /// kernel that delegated it) if that principal is registered here as well, so a
    /// delegation across kernels costs the delegator as a local one does; otherwise to
    /// `holder`.
    pub fn accept_remote(
        &mut self,
        grant: RemoteGrant,
        parent: CapName,
        holder: Principal,
        delegator: Principal,
    ) -> Result<(), CapError> {
        let child = grant.child;
        if child.kernel() != self.kernel() || self.lookup(child).is_some() || parent.kernel() == self.kernel() {
            return Err(CapError::UnknownName);
        }
        self.check_object(grant.object, grant.rights)?;
        let proxy = self.usable_proxy(parent)?;
        let (holder_at, payer_at) = self.admit(holder, delegator, true, if proxy.is_some() { 1 } else { 2 })?;
        let proxy = proxy.unwrap_or_else(|| self.create_proxy(parent, self.names.hash(parent), Link::NIL));
        let new = NewCap {
            object: grant.object,
            rights: grant.rights,
            holder,
            payer: self.principals[payer_at].principal,
            binding: grant.binding,
            parent: Link::to(proxy),
        };
        self.insert_at(new, State::Live, child, self.names.hash(child), holder_at, payer_at);
        Ok(())
    }

    /// Reserves a child of the remote capability `parent` for `holder`, for an obtain: the
    /// reservation is charged to `payer` (the principal that asked: `holder` for a derive,
    /// the delegator for a delegation to a principal of this kernel), hangs below
    /// `parent`'s proxy and is unusable until [`activate_pending`](Self::activate_pending).
    /// Returns its name.
    pub fn reserve_remote(
        &mut self,
        holder: Principal,
        payer: Principal,
        parent: CapName,
    ) -> Result<CapName, CapError> {
        if parent.kernel() == self.kernel() {
            return Err(CapError::UnknownName);
        }
        let proxy = self.usable_proxy(parent)?;
        let (holder_at, payer_at) = self.admit(holder, payer, false, if proxy.is_some() { 1 } else { 2 })?;
        let proxy = proxy.unwrap_or_else(|| self.create_proxy(parent, self.names.hash(parent), Link::NIL));
        let (index, nodes) = (&self.index, &self.nodes);
        let (name, hash) =
            self.names.fresh(|candidate, hash| index.find(hash, |s| nodes[s].name == candidate).is_some());
        let new = NewCap {
            object: NO_OBJECT,
            rights: Rights::NONE,
            holder,
            payer,
            binding: Binding::Bound,
            parent: Link::to(proxy),
        };
        Ok(self.insert_at(new, State::Pending, name, hash, holder_at, payer_at))
    }

    /// Completes an obtain: the reservation `child` becomes a live capability to `object`
    /// with `rights`. Fails if `child` is no reservation (it was cancelled) or the object's
    /// kind or rights are not registered here.
    pub fn activate_pending(
        &mut self,
        child: CapName,
        object: Object,
        rights: Rights,
        binding: Binding,
    ) -> Result<(), CapError> {
        let slot = self.lookup(child).ok_or(CapError::UnknownName)?;
        if self.nodes[slot].state != State::Pending {
            return Err(CapError::UnknownName);
        }
        self.check_object(object, rights)?;
        let node = &mut self.nodes[slot];
        node.am = object.am;
        node.kind = object.kind;
        node.object_id = object.id;
        node.rights = rights;
        node.binding = binding;
        node.state = State::Live;
        Ok(())
    }

    /// Cancels the reservation `child` (the obtain failed). Returns whether there was one.
    pub fn cancel_pending(&mut self, child: CapName) -> bool {
        match self.lookup(child) {
            Some(slot) if self.nodes[slot].state == State::Pending => {
                self.cancel_slot(slot);
                true
            }
            _ => false,
        }
    }

    // ---------------------------------------------------------------------------------
    // A principal's crash.
    // ---------------------------------------------------------------------------------

    /// Marks `principal` as being removed: from now on it receives no new capability.
    pub fn close_principal(&mut self, principal: Principal) -> Result<(), PrincipalError> {
        self.principal_mut(principal).ok_or(PrincipalError::UnknownPrincipal)?.closing = true;
        Ok(())
    }

    /// Tells whether `principal` is registered and not being removed.
    pub fn is_open(&self, principal: Principal) -> bool {
        self.principal(principal).is_some_and(|entry| !entry.closing)
    }

    /// Starts the distributed revocation of everything `principal` holds: cancels its
    /// reservations and walks each live capability's subtree. Pushes to `in_progress` the
    /// names of its capabilities that are left revoking (their finalization must be
    /// awaited before the principal is removed). Returns how many capabilities died.
    pub fn revoke_held<H, L>(
        &mut self,
        principal: Principal,
        hook: &mut H,
        links: &mut L,
        in_progress: &mut Vec<CapName>,
    ) -> Result<usize, PrincipalError>
    where
        H: RevocationHook + ?Sized,
        L: LinkSink + ?Sized,
    {
        let head = self.principal(principal).ok_or(PrincipalError::UnknownPrincipal)?.held_head;
        // Cancelling a reservation takes it off the held list, so the list is walked once
        // for those and once more for the walks (which never touch this holder's list).
        let mut cursor = head;
        while let Some(slot) = cursor.get() {
            cursor = self.nodes[slot].held_next;
            if self.nodes[slot].state == State::Pending {
                self.cancel_slot(slot);
            }
        }
        let mut killed = 0;
        let mut cursor = self.principal(principal).ok_or(PrincipalError::UnknownPrincipal)?.held_head;
        while let Some(slot) = cursor.get() {
            if self.nodes[slot].state == State::Live {
                killed += self.mark_subtree(slot, hook, links, true).killed;
            }
            cursor = self.nodes[slot].held_next;
        }
        let mut cursor = self.principal(principal).ok_or(PrincipalError::UnknownPrincipal)?.held_head;
        while let Some(slot) = cursor.get() {
            if self.nodes[slot].state == State::Revoking {
                in_progress.push(self.nodes[slot].name);
            }
            cursor = self.nodes[slot].held_next;
        }
        hook.finished();
        Ok(killed)
    }

    // ---------------------------------------------------------------------------------
    // Internals.
    // ---------------------------------------------------------------------------------

    /// Finds the proxy named `name` (a capability of another kernel).
    #[inline]
    pub(super) fn lookup_foreign(&self, name: CapName) -> Option<usize> {
        if name.kernel() == self.kernel() {
            return None;
        }
        self.index.find(self.names.hash(name), |slot| self.nodes[slot].name == name)
    }

    /// Finds the proxy of remote parent `parent` that a new child may hang below: `Ok(None)`
    /// if there is none yet, `Err(Revoked)` if its revoke is under way.
    fn usable_proxy(&self, parent: CapName) -> Result<Option<usize>, CapError> {
        match self.lookup_foreign(parent) {
            Some(slot) if self.nodes[slot].state == State::RemoteRevoking => Err(CapError::Revoked),
            found => Ok(found),
        }
    }

    /// Checks that `object`'s AM and kind are registered here and define `rights`.
    fn check_object(&self, object: Object, rights: Rights) -> Result<(), CapError> {
        if !self.registry.has_am(object.am) {
            return Err(CapError::UnknownAm);
        }
        let kind = self.registry.kind(object.am, object.kind).ok_or(CapError::UnknownKind)?;
        if !kind.defined_rights().contains(rights) {
            return Err(CapError::UndefinedRights);
        }
        Ok(())
    }

    /// Creates a proxy named `name` below `parent` (or as a root); the caller checked that
    /// the table has room. Returns its slot.
    fn create_proxy(&mut self, name: CapName, hash: u64, parent: Link) -> usize {
        debug_assert_ne!(name.kernel(), self.kernel());
        let slot = self.allocate_slot();
        let first_sibling = parent.get().map_or(Link::NIL, |p| self.nodes[p].first_child);
        self.nodes[slot] = Node {
            name,
            rights: Rights::NONE,
            object_id: NO_OBJECT.id,
            holder: Principal::Am(NO_OBJECT.am),
            payer: Account::NONE,
            am: NO_OBJECT.am,
            kind: NO_OBJECT.kind,
            state: State::Remote,
            binding: Binding::Bound,
            parent,
            first_child: Link::NIL,
            next_sibling: first_sibling,
            prev_sibling: Link::NIL,
            held_prev: Link::NIL,
            held_next: Link::NIL,
        };
        if let Some(parent) = parent.get() {
            self.nodes[parent].first_child = Link::to(slot);
        }
        if let Some(sibling) = first_sibling.get() {
            self.nodes[sibling].prev_sibling = Link::to(slot);
        }
        self.index.insert(hash, slot);
        slot
    }
}
