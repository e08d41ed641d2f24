//! The fixed-size slab node that holds one capability, and the index links between nodes.

use crate::ids::{AmId, Binding, ObjId, ObjKind, Object, Principal, Rights};
use crate::name::CapName;

/// Links one slab node to another by index: the derivation tree and the per-holder lists
/// are intrusive, so a capability costs one node and no allocation of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Link(u32);

impl Link {
    /// Links nowhere.
    pub(super) const NIL: Link = Link(u32::MAX);
    /// The largest slab index a link can name; `u32::MAX` is [`Link::NIL`].
    pub(super) const MAX_SLOT: u32 = u32::MAX - 1;

    /// Links to slab index `slot`, which the caller keeps within [`Link::MAX_SLOT`].
    #[inline]
    pub(super) fn to(slot: usize) -> Link {
        debug_assert!(slot <= Self::MAX_SLOT as usize);
        Link(slot as u32)
    }

    /// Returns the slab index linked to, if any.
    #[inline]
    pub(super) fn get(self) -> Option<usize> {
        (self != Self::NIL).then_some(self.0 as usize)
    }
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.get() {
            Some(slot) => write!(f, "#{slot}"),
            None => f.write_str("nil"),
        }
    }
}

/// Tells what a slab node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Nothing: the node is on the free list (threaded through `next_sibling`).
    Free,
    /// A usable capability, linked into the derivation tree.
    Live,
    /// A revoked capability: out of the tree, kept in the index and on its holder's list
    /// (charged to its quota) until its holder deletes it, so that presenting its name says
    /// "revoked" rather than "unknown".
    Revoked,
    /// A capability whose revocation has begun but whose subtree still reaches other
    /// kernels: unusable (presenting it says "revoked"), its AM already told, and kept in
    /// the tree with its remaining children until the last remote part is gone (the mark
    /// phase of SemperOS's revocation; Barrelfish thesis §4.3, "marked" slots).
    Revoking,
    /// A capability reserved for a cross-kernel obtain: named and charged to its future
    /// holder, hung below the proxy of its remote parent, but without object or rights until
    /// the parent's kernel grants it. Nobody knows its name yet, so it resolves as unknown.
    Pending,
    /// A proxy for a capability that lives on another kernel (its name's kernel bits say
    /// which): a remote child of the local parent it hangs from, and/or the parent of the
    /// local children that hang from it. It has no object, rights or holder of its own.
    Remote,
    /// A [`State::Remote`] proxy whose remote capability has been sent a revoke: it stays in
    /// the tree until that kernel reports the subtree gone.
    RemoteRevoking,
}

impl State {
    /// Tells whether the node stands for a capability of another kernel.
    #[inline]
    pub(super) fn is_proxy(self) -> bool {
        matches!(self, State::Remote | State::RemoteRevoking)
    }
}

/// Holds one capability. 72 bytes: the object is stored flattened so that no padding sits
/// between its fields, and the hot fields of a check come first; the payer's account
/// number fills what was padding.
#[derive(Clone, Copy, Debug)]
pub(super) struct Node {
    pub(super) name: CapName,
    pub(super) rights: Rights,
    pub(super) object_id: ObjId,
    pub(super) holder: Principal,
    pub(super) am: AmId,
    pub(super) kind: ObjKind,
    pub(super) state: State,
    pub(super) binding: Binding,
    /// The capability this one was derived from; nil for a root.
    pub(super) parent: Link,
    /// The most recently derived child.
    pub(super) first_child: Link,
    /// The next older sibling; on a free node, the next free node.
    pub(super) next_sibling: Link,
    /// The next younger sibling; nil for the first child.
    pub(super) prev_sibling: Link,
    /// The neighbours in the list of capabilities the holder holds (live or revoked).
    pub(super) held_prev: Link,
    pub(super) held_next: Link,
    /// The account of the principal whose quota the capability is charged to: its
    /// holder's, except for a delegated one, which is charged to the delegator (nk-caps,
    /// "Quotas"). [`Account::NONE`] for a proxy, a free node, and a capability whose payer
    /// was removed.
    pub(super) payer: Account,
}

/// Numbers a registered principal within its table (`CapTable::accounts`), so a node names
/// its payer in two bytes. Numbers are reused once a principal is removed, after every
/// node it paid for was cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Account(pub(super) u16);

impl Account {
    /// No payer.
    pub(super) const NONE: Account = Account(u16::MAX);
    /// The most accounts a table numbers.
    pub(super) const MAX: usize = u16::MAX as usize;
}

impl Node {
    /// Builds a node on the free list, linking to the next free node.
    pub(super) const fn free(next_free: Link) -> Node {
        Node {
            name: CapName::from_words(0, 0),
            rights: Rights::NONE,
            object_id: ObjId::new(0),
            holder: Principal::Am(AmId::new(0)),
            payer: Account::NONE,
            am: AmId::new(0),
            kind: ObjKind::new(0),
            state: State::Free,
            binding: Binding::Bound,
            parent: Link::NIL,
            first_child: Link::NIL,
            next_sibling: next_free,
            prev_sibling: Link::NIL,
            held_prev: Link::NIL,
            held_next: Link::NIL,
        }
    }

    /// Returns the object the capability refers to.
    #[inline]
    pub(super) fn object(&self) -> Object {
        Object::new(self.am, self.kind, self.object_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_fits_its_budget() {
        // The benchmark reports bytes per capability from this size; keep it in sight.
        assert_eq!(core::mem::size_of::<Node>(), 72);
        assert_eq!(core::mem::size_of::<Link>(), 4);
    }

    #[test]
    fn links() {
        assert_eq!(Link::NIL.get(), None);
        assert_eq!(Link::to(5).get(), Some(5));
        assert_eq!(Link::to(Link::MAX_SLOT as usize).get(), Some(Link::MAX_SLOT as usize));
    }
}
