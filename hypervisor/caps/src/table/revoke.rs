//! Revocation: the iterative subtree walk and the hook through which the owning AMs undo
//! the effects of dead capabilities (DESIGN.md §2 "Revocation revokes effects").

use super::node::{Link, Node, State};
use super::CapTable;
use crate::ids::{Object, Principal, Rights};
use crate::name::CapName;

/// Describes a capability that has just died, for the AM that implements its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadCap {
    /// The dead capability's name (an AM that keyed an effect by name finds it here).
    pub name: CapName,
    /// The object it referred to; `object.am` is the AM to tell.
    pub object: Object,
    /// The rights it carried.
    pub rights: Rights,
    /// The principal that held it (e.g. the VM whose EPT maps the frame).
    pub holder: Principal,
}

/// Tells the owning AMs which capabilities died, so they undo what those enabled: unmap a
/// frame from an EPT, close a port in an I/O bitmap, abort a transaction.
///
/// The table calls [`revoked`](Self::revoked) once per dead capability, descendants before
/// their ancestors, while it is borrowed mutably: a hook cannot reach back into the table,
/// and every capability of the subtree is already unusable when the operation returns.
/// [`finished`](Self::finished) follows once per operation, so an implementation can batch
/// costly work (one INVEPT for many unmappings).
pub trait RevocationHook {
    /// Undoes what `dead` enabled, or records it to be undone in [`finished`](Self::finished).
    fn revoked(&mut self, dead: &DeadCap);

    /// Completes the work of one revocation (default: nothing).
    fn finished(&mut self) {}
}

impl<F: FnMut(&DeadCap)> RevocationHook for F {
    fn revoked(&mut self, dead: &DeadCap) {
        self(dead);
    }
}

impl CapTable {
    /// Revokes the live capability in `root` and its whole subtree, and returns how many
    /// died. Walks the tree without recursion or a stack (a guest controls its depth):
    /// it descends through first children, revokes a leaf, unlinks it from its parent and
    /// moves to its next sibling or back up to the parent. Each node is entered once from
    /// above and left once upward, so the walk takes time linear in the subtree's size and
    /// constant memory.
    ///
    /// This is the purely local revocation of the single-kernel methods: it tears down the
    /// whole local subtree at once, and drops any proxy of a remote capability it meets
    /// without telling that kernel (the distributed walk, `remote.rs`, is the one that does).
    pub(super) fn revoke_subtree<H>(&mut self, root: usize, hook: &mut H) -> usize
    where
        H: RevocationHook + ?Sized,
    {
        debug_assert!(matches!(self.nodes[root].state, State::Live | State::Revoking));
        let parent = self.nodes[root].parent;
        self.unlink_from_parent(root);
        self.prune(parent, &mut super::remote::Discard);
        let mut revoked = 0;
        let mut current = root;
        loop {
            if let Some(child) = self.nodes[current].first_child.get() {
                current = child;
                continue;
            }
            // `current` has no children left. Unless it is the root, it is the first child
            // of its parent: the walk only enters a node as a first child, or as the next
            // sibling of a first child that it just unlinked.
            let Node { parent, next_sibling, .. } = self.nodes[current];
            if self.kill(current, hook) {
                revoked += 1;
            }
            if current == root {
                return revoked;
            }
            let parent = parent.get().expect("a non-root node of a subtree being revoked has a parent");
            self.nodes[parent].first_child = next_sibling;
            current = match next_sibling.get() {
                Some(sibling) => {
                    self.nodes[sibling].prev_sibling = Link::NIL;
                    sibling
                }
                None => parent,
            };
        }
    }

    /// Marks a childless node revoked, takes it out of the tree and tells the hook; returns
    /// whether a live capability died. A node the distributed protocol left behind is
    /// cleared without a second report: a capability already revoking (its AM was told),
    /// a reservation for an obtain (freed), or a proxy (released).
    fn kill<H>(&mut self, slot: usize, hook: &mut H) -> bool
    where
        H: RevocationHook + ?Sized,
    {
        let node = &mut self.nodes[slot];
        let state = node.state;
        node.parent = Link::NIL;
        node.next_sibling = Link::NIL;
        node.prev_sibling = Link::NIL;
        match state {
            State::Live => {
                node.state = State::Revoked;
                let dead = DeadCap { name: node.name, object: node.object(), rights: node.rights, holder: node.holder };
                hook.revoked(&dead);
                true
            }
            State::Revoking => {
                node.state = State::Revoked;
                false
            }
            State::Pending => {
                node.state = State::Revoked;
                self.free(slot);
                false
            }
            State::Remote | State::RemoteRevoking => {
                node.state = State::Revoked;
                self.release(slot);
                false
            }
            State::Free | State::Revoked => unreachable!("a node in the tree is in use and not revoked"),
        }
    }

    /// Takes a node out of its parent's list of children; its own subtree stays attached.
    #[inline(always)]
    pub(super) fn unlink_from_parent(&mut self, slot: usize) {
        let Node { parent, prev_sibling, next_sibling, .. } = self.nodes[slot];
        match prev_sibling.get() {
            Some(prev) => self.nodes[prev].next_sibling = next_sibling,
            None => {
                if let Some(parent) = parent.get() {
                    self.nodes[parent].first_child = next_sibling;
                }
            }
        }
        if let Some(next) = next_sibling.get() {
            self.nodes[next].prev_sibling = prev_sibling;
        }
        let node = &mut self.nodes[slot];
        node.parent = Link::NIL;
        node.prev_sibling = Link::NIL;
        node.next_sibling = Link::NIL;
    }
}
