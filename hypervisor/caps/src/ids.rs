//! Identifiers of kernels, abstract machines, objects, principals and operations, and the
//! rights bit set.
//!
//! All are small `Copy` newtypes: the null-Kernel attaches no meaning to their values beyond
//! equality (seed §5.2.1 "Extensibility"); the names that give them meaning live in the
//! [`Registry`](crate::Registry).

use core::fmt;
use core::ops::{BitAnd, BitOr};

/// Identifies one kernel instance (one per CPU or group of CPUs, DESIGN.md §3).
///
/// Every capability name carries the id of the kernel that owns it in its top 16 bits
/// (see [`CapName`](crate::CapName)), so any kernel can route a request to the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelId(u16);

impl KernelId {
    /// Wraps a raw kernel number.
    pub const fn new(raw: u16) -> Self {
        Self(raw)
    }

    /// Returns the raw kernel number.
    pub const fn raw(self) -> u16 {
        self.0
    }
}

/// Identifies an abstract machine (AM): a software layer that exports operations on its own
/// objects. The hypervisor chooses AM ids (the same on every kernel) when it registers AMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AmId(u16);

impl AmId {
    /// Wraps a raw AM number.
    pub const fn new(raw: u16) -> Self {
        Self(raw)
    }

    /// Returns the raw AM number.
    pub const fn raw(self) -> u16 {
        self.0
    }

    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identifies an object kind within its AM (e.g. "frame" or "port" in the exo AM).
///
/// Kinds are numbered by [`CapTable::register_kind`](crate::CapTable::register_kind) in
/// registration order; the same number in two AMs names two unrelated kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKind(u16);

impl ObjKind {
    /// Wraps a raw kind number (as decoded from a hypercall or log).
    pub const fn new(raw: u16) -> Self {
        Self(raw)
    }

    /// Returns the raw kind number.
    pub const fn raw(self) -> u16 {
        self.0
    }

    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identifies an object within its AM and kind; the AM chooses the value (a frame number,
/// a port number, a region handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjId(u64);

impl ObjId {
    /// Wraps a raw object number.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// Returns the raw object number.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// Names an object: the AM that implements it, its kind and its id (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Object {
    /// The AM that implements the object and is told when a capability to it dies.
    pub am: AmId,
    /// The object's kind within `am`.
    pub kind: ObjKind,
    /// The object's id within `am` and `kind`.
    pub id: ObjId,
}

impl Object {
    /// Names object `id` of kind `kind` implemented by `am`.
    pub const fn new(am: AmId, kind: ObjKind, id: ObjId) -> Self {
        Self { am, kind, id }
    }
}

/// Identifies a virtual machine (a guest) as a holder of capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(u32);

impl VmId {
    /// Wraps a raw VM number.
    pub const fn new(raw: u32) -> Self {
        Self(raw)
    }

    /// Returns the raw VM number.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// Names a holder of capabilities: a VM or an AM (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    /// A guest VM (and every process inside it: the VM is the unit of holding).
    Vm(VmId),
    /// An abstract machine, which holds the root capabilities of its own objects.
    Am(AmId),
}

/// Identifies an operation exported by an AM: the AM and the operation's number within it,
/// as assigned by [`CapTable::register_op`](crate::CapTable::register_op).
///
/// A hypercall carries this pair as its selector (DESIGN.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId {
    am: AmId,
    index: u16,
}

impl OpId {
    /// Names operation number `index` of `am`.
    pub const fn new(am: AmId, index: u16) -> Self {
        Self { am, index }
    }

    /// Returns the AM that exports the operation.
    pub const fn am(self) -> AmId {
        self.am
    }

    /// Returns the operation's number within its AM.
    pub const fn index(self) -> u16 {
        self.index
    }
}

/// Holds a set of access rights on an object: bit `i` is the `i`-th right name its kind
/// registered (seed §5.2.1). The core compares and masks bits; it never interprets them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rights(u64);

impl Rights {
    /// The empty set.
    pub const NONE: Rights = Rights(0);
    /// Every bit; as a mask it keeps all rights (`derive(c, Rights::ALL)` copies `c`).
    pub const ALL: Rights = Rights(u64::MAX);
    /// The largest number of rights one kind can name.
    pub const MAX_NAMED: usize = 64;

    /// Wraps a raw bit set.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Returns the raw bit set.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Returns the set holding only right number `index`, or `None` past the 64th.
    pub const fn bit(index: usize) -> Option<Self> {
        if index < Self::MAX_NAMED {
            Some(Self(1 << index))
        } else {
            None
        }
    }

    /// Returns the set of the first `count` rights (all rights a kind with `count` names
    /// defines).
    pub const fn first(count: usize) -> Self {
        if count >= Self::MAX_NAMED {
            Self::ALL
        } else {
            Self((1 << count) - 1)
        }
    }

    /// Tells whether every right in `other` is also in `self`.
    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// Tells whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Returns the rights in `self` that are not in `other`.
    pub const fn without(self, other: Rights) -> Self {
        Self(self.0 & !other.0)
    }
}

impl BitAnd for Rights {
    type Output = Rights;

    fn bitand(self, rhs: Rights) -> Rights {
        Rights(self.0 & rhs.0)
    }
}

impl BitOr for Rights {
    type Output = Rights;

    fn bitor(self, rhs: Rights) -> Rights {
        Rights(self.0 | rhs.0)
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rights({:#b})", self.0)
    }
}

/// Says who may use a capability (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// Usable only by its holder principal: the name is useless to anyone else.
    Bound,
    /// Usable by whoever presents the name (it may travel through guest memory, files and
    /// sockets, seed §5.5).
    Bearer,
    /// Usable only by its holder principal, and within it only from one guest process:
    /// the call must come with the page-table root the capability was bound to (the
    /// seed's §5.5 "capability register" convention). Only
    /// [`CapTable::bind_process`](crate::CapTable::bind_process) makes a capability
    /// process-bound, once and for good; a child [`derive`](crate::CapTable::derive)d from
    /// one is bound to the same root (table module `pin.rs`).
    Process,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_algebra() {
        let rw = Rights::from_bits(0b11);
        let r = Rights::bit(0).unwrap();
        assert!(rw.contains(r));
        assert!(!r.contains(rw));
        assert_eq!(rw & r, r);
        assert_eq!(r | Rights::bit(1).unwrap(), rw);
        assert_eq!(rw.without(r), Rights::bit(1).unwrap());
        assert_eq!(Rights::first(2), rw);
        assert_eq!(Rights::first(64), Rights::ALL);
        assert_eq!(Rights::bit(64), None);
        assert!(Rights::NONE.is_empty());
    }
}
