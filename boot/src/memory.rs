//! Physical-range arithmetic for the frame allocator: which page-aligned RAM is free once
//! the hypervisor image, the boot data, the modules and the first MiB are set aside.

use core::fmt;

use crate::fixed::FixedList;
use crate::info::{MemoryKind, MemoryRegion};

/// The frame size the allocator hands out (4 KiB, SDM Vol. 3A §4.5).
pub const PAGE_SIZE: u64 = 4096;

/// The first MiB: real-mode IVT, BIOS data, EBDA, option ROMs and the AP trampoline.
pub const FIRST_MIB: PhysRange = PhysRange { start: 0, end: 0x10_0000 };

/// The most usable ranges [`usable_ranges`] returns.
pub const MAX_USABLE_RANGES: usize = 256;

/// The usable ranges, sorted, disjoint, non-adjacent and page-aligned.
pub type UsableRanges = FixedList<PhysRange, MAX_USABLE_RANGES>;

/// Names a half-open range of physical addresses `[start, end)`, with `start <= end`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysRange {
    start: u64,
    end: u64,
}

impl PhysRange {
    /// Creates `[start, end)`, or `None` when `end < start`.
    pub const fn new(start: u64, end: u64) -> Option<Self> {
        if start <= end {
            Some(Self { start, end })
        } else {
            None
        }
    }

    /// Creates `[start, start + len)`, or `None` when the end wraps past 2^64.
    pub const fn from_start_len(start: u64, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Creates `[start, start + len)`, clipping the end at `u64::MAX`.
    pub const fn saturating(start: u64, len: u64) -> Self {
        Self { start, end: start.saturating_add(len) }
    }

    /// Returns the first address.
    pub const fn start(self) -> u64 {
        self.start
    }

    /// Returns the address one past the range.
    pub const fn end(self) -> u64 {
        self.end
    }

    /// Returns the length in bytes.
    pub const fn len(self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Tells whether the range holds no address.
    pub const fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// Tells whether `addr` lies in the range.
    pub const fn contains(self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Tells whether the two ranges share an address.
    pub const fn overlaps(self, other: PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Shrinks the range to the whole pages inside it; `None` when it holds no whole page.
    pub const fn page_aligned_inward(self) -> Option<PhysRange> {
        let start = match self.start.checked_add(PAGE_SIZE - 1) {
            Some(rounded) => rounded & !(PAGE_SIZE - 1),
            None => return None,
        };
        let end = self.end & !(PAGE_SIZE - 1);
        if start < end {
            Some(PhysRange { start, end })
        } else {
            None
        }
    }

    /// Returns the parts of `self` below and above `hole`, either possibly empty.
    const fn minus(self, hole: PhysRange) -> (PhysRange, PhysRange) {
        let below_end = if hole.start < self.end { hole.start } else { self.end };
        let above_start = if hole.end > self.start { hole.end } else { self.start };
        let below = if self.start < below_end {
            PhysRange { start: self.start, end: below_end }
        } else {
            PhysRange { start: self.start, end: self.start }
        };
        let above = if above_start < self.end {
            PhysRange { start: above_start, end: self.end }
        } else {
            PhysRange { start: self.end, end: self.end }
        };
        (below, above)
    }
}

/// Prints `[0x<start>, 0x<end>)`.
impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// Explains why the usable ranges could not be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// The ranges do not fit in [`MAX_USABLE_RANGES`] entries.
    TooManyRanges { capacity: usize },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::TooManyRanges { capacity } => {
                write!(f, "usable memory is split into more than {capacity} ranges")
            }
        }
    }
}

const TOO_MANY: MemoryError = MemoryError::TooManyRanges { capacity: MAX_USABLE_RANGES };

/// Computes the RAM the frame allocator may use. An address is usable when an
/// [`MemoryKind::Available`] region holds it, no region of another kind holds it (buggy
/// firmware maps overlap; the conservative kind wins) and no `reserved` range holds it.
/// Available regions are merged first, so adjacent regions form one range; each result is
/// then shrunk to whole 4 KiB pages. The result is sorted, disjoint and never holds a
/// partial page.
pub fn usable_ranges(
    map: &[MemoryRegion],
    reserved: impl IntoIterator<Item = PhysRange>,
) -> Result<UsableRanges, MemoryError> {
    let mut ranges = UsableRanges::new();
    for region in map.iter().filter(|r| r.kind == MemoryKind::Available) {
        let range = region.range();
        if !range.is_empty() {
            ranges.push(range).map_err(|_| TOO_MANY)?;
        }
    }
    ranges.as_mut_slice().sort_unstable();
    merge_sorted(&mut ranges);
    let mut aligned = UsableRanges::new();
    for range in ranges.iter().filter_map(|r| r.page_aligned_inward()) {
        aligned.push(range).map_err(|_| TOO_MANY)?;
    }

    let unavailable = map.iter().filter(|r| r.kind != MemoryKind::Available).map(MemoryRegion::range);
    for hole in unavailable.chain(reserved).filter(|hole| !hole.is_empty()) {
        aligned = subtract(&aligned, hole)?;
    }
    Ok(aligned)
}

/// Merges overlapping and adjacent ranges of a list sorted by start, in place.
fn merge_sorted(ranges: &mut UsableRanges) {
    let mut merged: usize = 0;
    let slice = ranges.as_mut_slice();
    for index in 0..slice.len() {
        let Some(&next) = slice.get(index) else { break };
        match merged.checked_sub(1).and_then(|last| slice.get_mut(last)) {
            Some(last) if next.start <= last.end => last.end = last.end.max(next.end),
            _ => {
                if let Some(slot) = slice.get_mut(merged) {
                    *slot = next;
                }
                merged += 1;
            }
        }
    }
    ranges.truncate(merged);
}

/// Removes `hole` from every range, keeping only the whole pages of what remains.
fn subtract(ranges: &UsableRanges, hole: PhysRange) -> Result<UsableRanges, MemoryError> {
    let mut out = UsableRanges::new();
    for &range in ranges.iter() {
        if !range.overlaps(hole) {
            out.push(range).map_err(|_| TOO_MANY)?;
            continue;
        }
        let (below, above) = range.minus(hole);
        for piece in [below, above].into_iter().filter_map(PhysRange::page_aligned_inward) {
            out.push(piece).map_err(|_| TOO_MANY)?;
        }
    }
    Ok(out)
}

/// Adds up the bytes of `ranges` (saturating at `u64::MAX`).
pub fn total_bytes(ranges: &[PhysRange]) -> u64 {
    ranges.iter().fold(0u64, |sum, r| sum.saturating_add(r.len()))
}
