//! A map kept as a sorted vector, for the protocol's few pending entries (issue 14).
//!
//! The operations and handshakes waiting on one kernel are few (about one per parked vCPU)
//! and mostly end in the order they began. A `BTreeMap` pays a node search, a shift inside
//! the node and its rebalancing checks for each insert and remove (about a fifth of a
//! delegation message's handling); a sorted vector pays a binary search over a few
//! entries, appends new operation ids at its end, and keeps its memory, so an insert after
//! the first ones allocates nothing.

use alloc::vec::Vec;

/// Maps keys to values in a vector sorted by key.
#[derive(Debug)]
pub(crate) struct SortedMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K: Ord + Copy, V> SortedMap<K, V> {
    /// Builds an empty map (allocating nothing yet).
    pub(crate) const fn new() -> Self {
        Self { entries: Vec::new() }
    }

    /// Finds the position of `key`, or where it would go.
    #[inline]
    fn search(&self, key: &K) -> Result<usize, usize> {
        // New operation ids are the largest yet: try the end first.
        match self.entries.last() {
            None => Err(0),
            Some((last, _)) if *last < *key => Err(self.entries.len()),
            _ => self.entries.binary_search_by(|(k, _)| k.cmp(key)),
        }
    }

    /// Returns the number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Tells whether the map is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns the value of `key`.
    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.search(key).ok().map(|at| &self.entries[at].1)
    }

    /// Returns the value of `key`, mutably.
    #[inline]
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.search(key).ok().map(|at| &mut self.entries[at].1)
    }

    /// Sets the value of `key`; returns the value it replaced.
    #[inline]
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.search(&key) {
            Ok(at) => Some(core::mem::replace(&mut self.entries[at].1, value)),
            Err(at) => {
                self.entries.insert(at, (key, value));
                None
            }
        }
    }

    /// Removes `key` and returns its value.
    #[inline]
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let at = self.search(key).ok()?;
        if at + 1 == self.entries.len() {
            // The newest (or only) entry: nothing to shift.
            return self.entries.pop().map(|(_, value)| value);
        }
        Some(self.entries.remove(at).1)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::SortedMap;

    proptest! {
        /// Random inserts, removals and look-ups agree with a `BTreeMap`.
        #[test]
        fn matches_a_btree_map(ops in prop::collection::vec((0u8..3, 0u16..40, any::<u32>()), 1..300)) {
            let mut map = SortedMap::new();
            let mut model = BTreeMap::new();
            for (op, key, value) in ops {
                match op {
                    0 => prop_assert_eq!(map.insert(key, value), model.insert(key, value)),
                    1 => prop_assert_eq!(map.remove(&key), model.remove(&key)),
                    _ => {
                        if let Some(v) = map.get_mut(&key) {
                            *v = v.wrapping_add(1);
                        }
                        if let Some(v) = model.get_mut(&key) {
                            *v = v.wrapping_add(1);
                        }
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(map.is_empty(), model.is_empty());
                for k in 0..40 {
                    prop_assert_eq!(map.get(&k), model.get(&k));
                }
            }
        }
    }
}
