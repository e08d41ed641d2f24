//! The name index: maps each name in use to its slab slot.
//!
//! Open addressing with linear probing over a fixed power-of-two array of 8-byte entries,
//! sized at construction to at least twice the table's capacity, so it is never more than
//! half full: a lookup probes 1.5 entries on average when the name is there and 2.5 when it
//! is not, usually within one cache line. Deletion shifts later entries of the cluster back
//! (Knuth's algorithm R) instead of leaving tombstones, so the index never degrades, never
//! rehashes and never allocates after construction.
//!
//! Each entry holds its slot and the low 32 bits of its name's hash: they give the entry's
//! home position and filter out almost every non-matching entry without touching its node.
//! The hash is keyed and names are CSPRNG output, so clusters stay short and a guest cannot
//! aim a lookup at a chosen one.

use alloc::vec::Vec;

use super::node::Link;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// The low 32 bits of the name's hash.
    tag: u32,
    /// The slab slot, or [`Link::NIL`] for an empty entry.
    slot: Link,
}

impl Entry {
    const EMPTY: Entry = Entry { tag: 0, slot: Link::NIL };
}

/// Maps names (through their hashes) to slab slots.
pub(super) struct NameIndex {
    entries: Vec<Entry>,
    /// `entries.len() - 1`; the length is a power of two.
    mask: usize,
    len: usize,
}

/// Reports that the index for a capacity could not be allocated.
#[derive(Clone, Copy, Debug)]
pub(super) struct IndexTooLarge;

impl NameIndex {
    /// The bytes one entry takes.
    pub(super) const ENTRY_BYTES: usize = core::mem::size_of::<Entry>();

    /// Builds an index for up to `capacity` names.
    pub(super) fn with_capacity(capacity: u32) -> Result<Self, IndexTooLarge> {
        let size =
            (capacity as usize).checked_mul(2).and_then(usize::checked_next_power_of_two).ok_or(IndexTooLarge)?.max(2);
        let mut entries = Vec::new();
        entries.try_reserve_exact(size).map_err(|_| IndexTooLarge)?;
        entries.resize(size, Entry::EMPTY);
        Ok(Self { entries, mask: size - 1, len: 0 })
    }

    /// Returns the number of names indexed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Returns the bytes the index occupies.
    pub(super) fn bytes(&self) -> usize {
        self.entries.len() * Self::ENTRY_BYTES
    }

    /// Returns the number of entries, indexed names and empty ones (tests only).
    #[cfg(test)]
    pub(super) fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Finds the slot whose name has hash `hash` and satisfies `is_name`.
    #[inline]
    pub(super) fn find(&self, hash: u64, mut is_name: impl FnMut(usize) -> bool) -> Option<usize> {
        let tag = hash as u32;
        let mut position = tag as usize & self.mask;
        loop {
            let entry = self.entries[position];
            let slot = entry.slot.get()?;
            if entry.tag == tag && is_name(slot) {
                return Some(slot);
            }
            position = (position + 1) & self.mask;
        }
    }

    /// Indexes `slot` under `hash`. The caller ensures the name is not indexed yet and that
    /// no more names than the capacity given at construction are indexed.
    pub(super) fn insert(&mut self, hash: u64, slot: usize) {
        assert!(self.len < self.entries.len() / 2, "the index is sized for the capacity");
        let tag = hash as u32;
        let mut position = tag as usize & self.mask;
        while self.entries[position].slot != Link::NIL {
            position = (position + 1) & self.mask;
        }
        self.entries[position] = Entry { tag, slot: Link::to(slot) };
        self.len += 1;
    }

    /// Removes `slot`, indexed under `hash`, and closes the gap it leaves in its cluster.
    pub(super) fn remove(&mut self, hash: u64, slot: usize) {
        let target = Link::to(slot);
        let mut hole = hash as u32 as usize & self.mask;
        while self.entries[hole].slot != target {
            assert_ne!(self.entries[hole].slot, Link::NIL, "a removed slot is indexed");
            hole = (hole + 1) & self.mask;
        }
        // Move each later entry of the cluster whose home is not between the hole and the
        // entry itself (cyclically) back into the hole, so every entry stays reachable from
        // its home without crossing an empty entry.
        let mut position = hole;
        loop {
            position = (position + 1) & self.mask;
            let entry = self.entries[position];
            if entry.slot == Link::NIL {
                break;
            }
            let home = entry.tag as usize & self.mask;
            let from_home = position.wrapping_sub(home) & self.mask;
            let from_hole = position.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                self.entries[hole] = entry;
                hole = position;
            }
        }
        self.entries[hole] = Entry::EMPTY;
        self.len -= 1;
    }

    /// Lists the indexed slots.
    pub(super) fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries.iter().filter_map(|entry| entry.slot.get())
    }

    /// Checks that every entry can be found from its home and that `len` counts them.
    pub(super) fn check(&self) -> Result<(), &'static str> {
        let mut count = 0;
        for (position, entry) in self.entries.iter().enumerate() {
            if entry.slot == Link::NIL {
                continue;
            }
            count += 1;
            let mut probe = entry.tag as usize & self.mask;
            while probe != position {
                if self.entries[probe].slot == Link::NIL {
                    return Err("an index entry is cut off from its home");
                }
                probe = (probe + 1) & self.mask;
            }
        }
        if count != self.len {
            return Err("the index's length counts its entries");
        }
        Ok(())
    }

    /// Panics unless every entry can be found from its home (tests only).
    #[cfg(test)]
    pub(super) fn audit(&self) {
        if let Err(what) = self.check() {
            panic!("{what}");
        }
    }
}

impl core::fmt::Debug for NameIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NameIndex").field("len", &self.len).field("entries", &self.entries.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sizes_to_at_least_twice_the_capacity() {
        assert_eq!(NameIndex::with_capacity(0).unwrap().entries(), 2);
        assert_eq!(NameIndex::with_capacity(1).unwrap().entries(), 2);
        assert_eq!(NameIndex::with_capacity(3).unwrap().entries(), 8);
        assert_eq!(NameIndex::with_capacity(1024).unwrap().entries(), 2048);
        assert_eq!(NameIndex::ENTRY_BYTES, 8);
    }

    #[test]
    fn colliding_entries_survive_removals_in_any_order() {
        // Every hash has home 14 in an index of 16 entries: one cluster, wrapping past the
        // end, with tags that differ above the home bits.
        let mut index = NameIndex::with_capacity(8).unwrap();
        let hash = |slot: usize| ((slot as u64) << 8) | 14;
        for slot in 0..8 {
            index.insert(hash(slot), slot);
        }
        index.audit();
        for slot in [3, 0, 7, 5, 1, 6, 2, 4] {
            index.remove(hash(slot), slot);
            index.audit();
            assert_eq!(index.find(hash(slot), |s| s == slot), None);
        }
        assert_eq!(index.len(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Checks that random inserts and removals (with few distinct homes, so clusters
        /// form and wrap) agree with a `HashMap`.
        #[test]
        fn matches_a_hash_map(ops in prop::collection::vec((any::<bool>(), 0u64..64, 0usize..32), 1..300)) {
            let mut index = NameIndex::with_capacity(32).unwrap();
            let mut model: HashMap<usize, u64> = HashMap::new();
            for (insert, hash, slot) in ops {
                if insert && !model.contains_key(&slot) && model.len() < 32 {
                    index.insert(hash, slot);
                    model.insert(slot, hash);
                } else if let Some(hash) = model.remove(&slot) {
                    index.remove(hash, slot);
                }
                index.audit();
                prop_assert_eq!(index.len(), model.len());
                for (&slot, &hash) in &model {
                    prop_assert_eq!(index.find(hash, |s| s == slot), Some(slot));
                }
            }
        }
    }
}
