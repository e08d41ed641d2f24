//! A list with a capacity fixed at compile time: boot parsing runs before the heap exists.

use core::fmt;
use core::ops::Deref;

/// Holds up to `N` values inline, in the order they were pushed, and reads as a slice of
/// the values pushed so far.
#[derive(Clone)]
pub struct FixedList<T: Copy, const N: usize> {
    items: [T; N],
    len: usize,
}

/// Reports that a [`FixedList`] is full; the caller turns it into its own error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl<T: Copy + Default, const N: usize> FixedList<T, N> {
    /// Creates an empty list.
    pub fn new() -> Self {
        Self::with_filler(T::default())
    }
}

impl<T: Copy + Default, const N: usize> Default for FixedList<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy, const N: usize> FixedList<T, N> {
    /// The most values the list holds.
    pub const CAPACITY: usize = N;

    /// Creates an empty list whose unused slots hold `filler` (never visible through the
    /// slice).
    pub(crate) const fn with_filler(filler: T) -> Self {
        Self { items: [filler; N], len: 0 }
    }

    /// Appends `value`, or reports that the list is full.
    pub(crate) fn push(&mut self, value: T) -> Result<(), Full> {
        let slot = self.items.get_mut(self.len).ok_or(Full)?;
        *slot = value;
        self.len += 1;
        Ok(())
    }

    /// Returns the values pushed so far.
    pub fn as_slice(&self) -> &[T] {
        self.items.get(..self.len).unwrap_or(&[])
    }

    /// Returns the values pushed so far, for in-place sorting and merging.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        self.items.get_mut(..self.len).unwrap_or(&mut [])
    }

    /// Keeps the first `len` values and drops the rest (no-op when `len` is not smaller).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl<T: Copy, const N: usize> Deref for FixedList<T, N> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<'l, T: Copy, const N: usize> IntoIterator for &'l FixedList<T, N> {
    type Item = &'l T;
    type IntoIter = core::slice::Iter<'l, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<T: Copy + PartialEq, const N: usize> PartialEq for FixedList<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Eq, const N: usize> Eq for FixedList<T, N> {}

impl<T: Copy + fmt::Debug, const N: usize> fmt::Debug for FixedList<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}
