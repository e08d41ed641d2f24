//! Test-only views of a table's internals: a holder-blind look at one capability, and a
//! full consistency audit of the slab, the tree, the index and the quotas.

use alloc::vec;
use alloc::vec::Vec;

use super::node::{Link, State};
use super::CapTable;
use crate::ids::{Binding, Object, Principal, Rights};
use crate::name::CapName;

/// Describes a capability regardless of who asks (tests only).
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

    /// Panics unless every internal invariant holds. Linear in the table's size.
    pub(crate) fn audit(&self) {
        let in_use = self.in_use as usize;
        assert!(self.in_use <= self.capacity);
        assert_eq!(self.nodes.len(), self.capacity as usize);

        // Slab and free list.
        let used = self.nodes.iter().filter(|n| n.state != State::Free).count();
        assert_eq!(used, in_use, "in_use counts the nodes in use");
        let mut free = 0;
        let mut cursor = self.free_head;
        while let Some(slot) = cursor.get() {
            assert_eq!(self.nodes[slot].state, State::Free);
            free += 1;
            assert!(free <= self.nodes.len(), "the free list has a cycle");
            cursor = self.nodes[slot].next_sibling;
        }
        assert_eq!(free + in_use, self.nodes.len(), "every free node is on the free list");

        // Index.
        self.index.audit();
        assert_eq!(self.index.len(), in_use, "the index holds exactly the nodes in use");
        for slot in self.index.slots() {
            assert_ne!(self.nodes[slot].state, State::Free);
        }

        let mut live = 0;
        for (slot, node) in self.nodes.iter().enumerate() {
            if node.state == State::Free {
                continue;
            }
            assert_eq!(self.lookup(node.name), Some(slot), "the name finds its node");
            assert_eq!(node.name.kernel(), self.kernel());
            let kind = self.registry.kind(node.am, node.kind).expect("the object's kind is registered");
            assert!(kind.defined_rights().contains(node.rights));
            if node.state == State::Revoked {
                assert_eq!(node.parent, Link::NIL);
                assert_eq!(node.first_child, Link::NIL);
                assert_eq!(node.next_sibling, Link::NIL);
                assert_eq!(node.prev_sibling, Link::NIL);
                continue;
            }
            live += 1;
            if let Some(parent) = node.parent.get() {
                let parent = &self.nodes[parent];
                assert_eq!(parent.state, State::Live, "a live node's parent is live");
                assert_eq!(parent.object(), node.object(), "derivation keeps the object");
                assert!(parent.rights.contains(node.rights), "no amplification");
            }
            match node.prev_sibling.get() {
                Some(prev) => {
                    assert_eq!(self.nodes[prev].next_sibling, Link::to(slot));
                    assert_eq!(self.nodes[prev].parent, node.parent);
                }
                None => {
                    if let Some(parent) = node.parent.get() {
                        assert_eq!(self.nodes[parent].first_child, Link::to(slot));
                    }
                }
            }
            if let Some(next) = node.next_sibling.get() {
                assert_eq!(self.nodes[next].prev_sibling, Link::to(slot));
                assert_eq!(self.nodes[next].parent, node.parent);
            }
            if let Some(child) = node.first_child.get() {
                assert_eq!(self.nodes[child].parent, Link::to(slot));
                assert_eq!(self.nodes[child].prev_sibling, Link::NIL);
            }
        }

        // The tree is a forest: a walk from the roots meets every live node exactly once.
        let mut seen = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.state == State::Live && n.parent == Link::NIL)
            .map(|(slot, _)| slot)
            .collect();
        let mut reached = 0;
        while let Some(slot) = stack.pop() {
            assert!(!seen[slot], "a node is reached twice");
            seen[slot] = true;
            reached += 1;
            let mut child = self.nodes[slot].first_child;
            while let Some(c) = child.get() {
                stack.push(c);
                child = self.nodes[c].next_sibling;
            }
        }
        assert_eq!(reached, live, "every live node hangs from a root");

        // Holders' lists and quotas.
        let mut listed = 0;
        for entry in self.principals.iter() {
            let mut count = 0;
            let mut prev = Link::NIL;
            let mut cursor = entry.held_head;
            while let Some(slot) = cursor.get() {
                let node = &self.nodes[slot];
                assert_ne!(node.state, State::Free);
                assert_eq!(node.holder, entry.principal, "a node is on its holder's list");
                assert_eq!(node.held_prev, prev);
                count += 1;
                assert!(count <= in_use, "a held list has a cycle");
                prev = cursor;
                cursor = node.held_next;
            }
            assert_eq!(count, entry.held as usize, "held counts the holder's list");
            listed += count;
        }
        assert_eq!(listed, in_use, "every node in use is on one holder's list");
    }
}
