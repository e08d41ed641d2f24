//! Builds and edits Intel EPT paging structures (SDM Vol. 3 §29.3) through a
//! [`TableMemory`] that hands out zeroed table frames and gives access to them. The
//! hypervisor implements it over its identity-mapped frames; the tests over an emulated
//! memory (a `Vec` of tables), so every mapping rule is checked on the host.
//!
//! Entries are atomics: while a guest runs, the CPU sets the accessed and dirty flags of
//! the entries it walks (SDM Vol. 3 §29.3.5) with locked writes, so every change to an
//! entry that may be live is an atomic swap, AND or compare-exchange that cannot lose a
//! flag the CPU set meanwhile (docs/tlb.md). Walks are iterative and bounded by the four
//! levels; nothing recurses. The [`vpid`]
//! module holds the other TLB tag's bookkeeping: the pool of VPIDs.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

pub mod guest_walk;
pub mod vpid;

/// Size of a 4 KiB page.
pub const PAGE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub const PAGE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page.
pub const PAGE_1G: u64 = 1 << 30;
/// Guest-physical addresses the 4-level EPT can translate (48 bits).
pub const GPA_LIMIT: u64 = 1 << 48;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPhysAddr(u64);

impl GuestPhysAddr {
    /// Wraps `addr` if the 4-level EPT can translate it.
    pub const fn new(addr: u64) -> Option<Self> {
        if addr < GPA_LIMIT {
            Some(Self(addr))
        } else {
            None
        }
    }
    /// Returns the address as a number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

/// Access rights of an EPT mapping (bits 0-2 of an entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptPerms(u8);

impl EptPerms {
    pub const READ: EptPerms = EptPerms(1);
    pub const WRITE: EptPerms = EptPerms(2);
    pub const EXECUTE: EptPerms = EptPerms(4);
    pub const RW: EptPerms = EptPerms(3);
    pub const RWX: EptPerms = EptPerms(7);

    /// Makes a permission set from entry bits 0-2 (read, write, execute); other bits are
    /// dropped. Whether a set may be mapped is checked where it is used.
    pub const fn from_bits(bits: u8) -> EptPerms {
        EptPerms(bits & 7)
    }

    /// Returns the union of two permission sets.
    pub const fn union(self, other: EptPerms) -> EptPerms {
        EptPerms(self.0 | other.0)
    }
    /// Returns the raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// Leaf sizes the EPT supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    /// Returns the size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_4K,
            PageSize::Size2M => PAGE_2M,
            PageSize::Size1G => PAGE_1G,
        }
    }
    /// Returns the table level a leaf of this size sits in (1 = PT, 2 = PD, 3 = PDPT).
    const fn level(self) -> usize {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
}

/// Why a mapping operation was refused. Nothing was changed when one is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// An address is not aligned to the page size.
    Misaligned,
    /// A guest-physical address beyond 48 bits, or a host address beyond 52 bits.
    OutOfRange,
    /// The range is already (partly) mapped.
    AlreadyMapped,
    /// The operation would split a larger page.
    WouldSplitLargePage,
    /// The page size is not supported by this CPU (`EptBuilder::new` flags).
    UnsupportedPageSize,
    /// No permission bit set, or write without read (SDM §29.3.3.1: misconfiguration).
    BadPermissions,
    /// The table memory has no frame left.
    OutOfTables,
    /// Nothing is mapped at the address.
    NotMapped,
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            EptError::Misaligned => "address not aligned to the page size",
            EptError::OutOfRange => "address beyond what the EPT translates",
            EptError::AlreadyMapped => "range already mapped",
            EptError::WouldSplitLargePage => "range lies inside a larger page",
            EptError::UnsupportedPageSize => "page size not supported by this CPU",
            EptError::BadPermissions => "permissions empty or write without read",
            EptError::OutOfTables => "no frame left for a page table",
            EptError::NotMapped => "nothing mapped there",
        };
        f.write_str(text)
    }
}

/// Frames that hold EPT tables. Addresses are host-physical.
pub trait TableMemory {
    /// Returns a zeroed, 4 KiB-aligned frame for a new table.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Gives a table frame back.
    fn free_table(&mut self, paddr: u64);
    /// Returns the 512 entries of the table at `paddr` (the CPU may write them too).
    fn table(&mut self, paddr: u64) -> &[AtomicU64; 512];
}

const PERM_BITS: u64 = 0b111;
/// Memory type write-back in leaf entries (bits 5:3 = 6).
const MEMTYPE_WB: u64 = 6 << 3;
const LARGE_PAGE: u64 = 1 << 7;
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;

/// A translation found by [`EptBuilder::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub host_phys: u64,
    pub perms: EptPerms,
    pub size: PageSize,
    pub accessed: bool,
    pub dirty: bool,
}

/// One guest's EPT: the root table and the page sizes the CPU allows.
#[derive(Debug)]
pub struct EptBuilder {
    pml4: u64,
    allow_2m: bool,
    allow_1g: bool,
}

fn index(gpa: u64, level: usize) -> usize {
    ((gpa >> (12 + 9 * (level - 1))) & 0x1FF) as usize
}

impl EptBuilder {
    /// Creates an empty EPT with its root table taken from `memory`.
    pub fn new(memory: &mut impl TableMemory, allow_2m: bool, allow_1g: bool) -> Result<Self, EptError> {
        let pml4 = memory.alloc_table().ok_or(EptError::OutOfTables)?;
        Ok(Self { pml4, allow_2m, allow_1g })
    }

    /// Returns the EPT pointer for the VMCS (SDM §25.6.11): write-back, 4-level walk,
    /// accessed/dirty flags enabled if `ad` is set.
    pub fn eptp(&self, ad: bool) -> u64 {
        self.pml4 | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
    }

    /// Returns the host-physical address of the root table.
    pub fn root(&self) -> u64 {
        self.pml4
    }

    /// Maps one page of `size` at `gpa` to `hpa` with `perms`.
    pub fn map(
        &mut self,
        memory: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: EptPerms,
    ) -> Result<(), EptError> {
        match size {
            PageSize::Size2M if !self.allow_2m => return Err(EptError::UnsupportedPageSize),
            PageSize::Size1G if !self.allow_1g => return Err(EptError::UnsupportedPageSize),
            _ => {}
        }
        if perms.0 == 0 || perms.0 & 0b11 == 0b10 {
            return Err(EptError::BadPermissions);
        }
        if gpa >= GPA_LIMIT || hpa >= (1 << 52) {
            return Err(EptError::OutOfRange);
        }
        if !gpa.is_multiple_of(size.bytes()) || !hpa.is_multiple_of(size.bytes()) {
            return Err(EptError::Misaligned);
        }
        let leaf_level = size.level();
        // First pass: check the walk without changing anything, counting missing tables.
        let mut table = Some(self.pml4);
        let mut missing = 0;
        for level in (leaf_level + 1..=4).rev() {
            let entry = match table {
                Some(t) => memory.table(t)[index(gpa, level)].load(Ordering::Acquire),
                None => 0,
            };
            if entry & PERM_BITS == 0 {
                missing += 1;
                table = None;
            } else if entry & LARGE_PAGE != 0 {
                return Err(EptError::AlreadyMapped);
            } else {
                table = Some(entry & ADDR_MASK);
            }
        }
        let large = if leaf_level > 1 { LARGE_PAGE } else { 0 };
        let leaf = hpa | MEMTYPE_WB | large | u64::from(perms.0);
        if let Some(t) = table {
            let slot = &memory.table(t)[index(gpa, leaf_level)];
            if slot.load(Ordering::Acquire) & PERM_BITS != 0 {
                return Err(EptError::AlreadyMapped);
            }
            // Every table exists (the common case: a page next to mapped ones): the first
            // pass found the leaf's slot, so no second walk.
            slot.store(leaf, Ordering::Release);
            return Ok(());
        }
        // Second pass: allocate the missing tables (all or nothing), then link and map.
        let mut fresh = [0u64; 3];
        for slot in fresh.iter_mut().take(missing) {
            match memory.alloc_table() {
                Some(frame) => *slot = frame,
                None => {
                    for &frame in fresh.iter().take_while(|&&f| f != 0) {
                        memory.free_table(frame);
                    }
                    return Err(EptError::OutOfTables);
                }
            }
        }
        let mut fresh = fresh.into_iter().take(missing);
        let mut table = self.pml4;
        for level in (leaf_level + 1..=4).rev() {
            let slot = index(gpa, level);
            let entry = memory.table(table)[slot].load(Ordering::Acquire);
            table = if entry & PERM_BITS == 0 {
                let next = fresh.next().expect("counted in the first pass");
                // Release: the zeroed table is visible before the entry that links it.
                memory.table(table)[slot].store(next | PERM_BITS, Ordering::Release);
                next
            } else {
                entry & ADDR_MASK
            };
        }
        memory.table(table)[index(gpa, leaf_level)].store(leaf, Ordering::Release);
        Ok(())
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)` using the largest pages allowed by
    /// alignment and the CPU. On error, the pages mapped so far are unmapped again.
    pub fn map_range(
        &mut self,
        memory: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: EptPerms,
    ) -> Result<(), EptError> {
        if !gpa.is_multiple_of(PAGE_4K) || !hpa.is_multiple_of(PAGE_4K) || !len.is_multiple_of(PAGE_4K) {
            return Err(EptError::Misaligned);
        }
        let end = gpa.checked_add(len).ok_or(EptError::OutOfRange)?;
        let mut offset = 0;
        while gpa + offset < end {
            let (g, h, left) = (gpa + offset, hpa + offset, end - gpa - offset);
            let size = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K]
                .into_iter()
                .find(|s| {
                    let allowed = match s {
                        PageSize::Size1G => self.allow_1g,
                        PageSize::Size2M => self.allow_2m,
                        PageSize::Size4K => true,
                    };
                    allowed && g % s.bytes() == 0 && h % s.bytes() == 0 && left >= s.bytes()
                })
                .unwrap_or(PageSize::Size4K);
            if let Err(e) = self.map(memory, g, h, size, perms) {
                let mut undo = 0;
                while undo < offset {
                    let step = self.unmap(memory, gpa + undo).map(|s| s.bytes()).unwrap_or(PAGE_4K);
                    undo += step;
                }
                return Err(e);
            }
            offset += size.bytes();
        }
        Ok(())
    }

    /// Unmaps the page that contains `gpa` and returns its size (one atomic swap, so a
    /// flag the CPU sets concurrently lands in the old value, not in the cleared entry).
    /// The caller must INVEPT on every CPU that ran the EPT before reusing the page.
    pub fn unmap(&mut self, memory: &mut impl TableMemory, gpa: u64) -> Result<PageSize, EptError> {
        let (table, slot, size) = self.find_leaf(memory, gpa)?;
        memory.table(table)[slot].swap(0, Ordering::AcqRel);
        Ok(size)
    }

    /// Changes the permissions of the page that contains `gpa`, keeping the accessed and
    /// dirty flags the CPU may set meanwhile (a compare-exchange loop). Taking rights away
    /// needs an INVEPT before it is relied on.
    pub fn protect(&mut self, memory: &mut impl TableMemory, gpa: u64, perms: EptPerms) -> Result<(), EptError> {
        if perms.0 == 0 || perms.0 & 0b11 == 0b10 {
            return Err(EptError::BadPermissions);
        }
        let (table, slot, _) = self.find_leaf(memory, gpa)?;
        let entry = &memory.table(table)[slot];
        let _ = entry
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some((old & !PERM_BITS) | u64::from(perms.0)));
        Ok(())
    }

    /// Translates `gpa` through the EPT.
    pub fn translate(&self, memory: &mut impl TableMemory, gpa: u64) -> Result<Translation, EptError> {
        let (table, slot, size) = self.find_leaf(memory, gpa)?;
        let entry = memory.table(table)[slot].load(Ordering::Acquire);
        Ok(Translation {
            host_phys: (entry & ADDR_MASK & !(size.bytes() - 1)) | (gpa & (size.bytes() - 1)),
            perms: EptPerms((entry & PERM_BITS) as u8),
            size,
            accessed: entry & ACCESSED != 0,
            dirty: entry & DIRTY != 0,
        })
    }

    /// Reads and clears the dirty flag of the page containing `gpa` (EPT A/D, SDM §29.3.5)
    /// in one atomic AND, so a write the guest makes meanwhile is never lost: it is either
    /// in the value returned now or sets the flag again.
    pub fn take_dirty(&mut self, memory: &mut impl TableMemory, gpa: u64) -> Result<bool, EptError> {
        let (table, slot, _) = self.find_leaf(memory, gpa)?;
        let old = memory.table(table)[slot].fetch_and(!DIRTY, Ordering::AcqRel);
        Ok(old & DIRTY != 0)
    }

    /// Reads and clears, as [`take_dirty`](Self::take_dirty) does, the dirty flags of the
    /// `pages` 4 KiB pages from `gpa`, calling `mark(first, count)` for each dirty run
    /// (page numbers from `gpa`): a large page's flag stands for `count` pages (its size,
    /// at most the pages left); unmapped pages are clean. The 4 KiB entries of one leaf
    /// table are read in one pass after one walk (not a walk per page).
    pub fn take_dirty_pages(
        &mut self,
        memory: &mut impl TableMemory,
        gpa: u64,
        pages: u64,
        mark: &mut dyn FnMut(u64, u64),
    ) {
        let mut page = 0;
        while page < pages {
            let Some(at) = page.checked_mul(PAGE_4K).and_then(|offset| gpa.checked_add(offset)) else { return };
            match self.find_leaf(memory, at) {
                Ok((table, slot, PageSize::Size4K)) => {
                    let count = ((512 - slot) as u64).min(pages - page);
                    let entries = memory.table(table);
                    for i in 0..count {
                        let entry = &entries[slot + i as usize];
                        if entry.load(Ordering::Acquire) & PERM_BITS != 0
                            && entry.fetch_and(!DIRTY, Ordering::AcqRel) & DIRTY != 0
                        {
                            mark(page + i, 1);
                        }
                    }
                    page += count;
                }
                Ok((table, slot, size)) => {
                    let step = (size.bytes() / PAGE_4K).min(pages - page).max(1);
                    if memory.table(table)[slot].fetch_and(!DIRTY, Ordering::AcqRel) & DIRTY != 0 {
                        mark(page, step);
                    }
                    page += step;
                }
                Err(_) => page += 1,
            }
        }
    }

    /// Reads the dirty flag of the page containing `gpa` without clearing it; returns it
    /// and the page's size.
    pub fn peek_dirty(&self, memory: &mut impl TableMemory, gpa: u64) -> Result<(bool, PageSize), EptError> {
        let (table, slot, size) = self.find_leaf(memory, gpa)?;
        Ok((memory.table(table)[slot].load(Ordering::Acquire) & DIRTY != 0, size))
    }

    fn find_leaf(&self, memory: &mut impl TableMemory, gpa: u64) -> Result<(u64, usize, PageSize), EptError> {
        if gpa >= GPA_LIMIT {
            return Err(EptError::OutOfRange);
        }
        let mut table = self.pml4;
        for level in (1..=4).rev() {
            let slot = index(gpa, level);
            let entry = memory.table(table)[slot].load(Ordering::Acquire);
            if entry & PERM_BITS == 0 {
                return Err(EptError::NotMapped);
            }
            let size = match level {
                1 => Some(PageSize::Size4K),
                2 if entry & LARGE_PAGE != 0 => Some(PageSize::Size2M),
                3 if entry & LARGE_PAGE != 0 => Some(PageSize::Size1G),
                _ => None,
            };
            if let Some(size) = size {
                return Ok((table, slot, size));
            }
            table = entry & ADDR_MASK;
        }
        Err(EptError::NotMapped)
    }

    /// Frees every table of this EPT (not the mapped memory).
    pub fn destroy(self, memory: &mut impl TableMemory) {
        // Iterative post-order over at most four levels: a fixed-size stack suffices.
        let mut stack: [(u64, usize, usize); 4] = [(0, 0, 0); 4];
        let mut depth = 1;
        stack[0] = (self.pml4, 4, 0);
        while depth > 0 {
            let (table, level, next) = stack[depth - 1];
            if next == 512 || level == 1 {
                memory.free_table(table);
                depth -= 1;
                continue;
            }
            stack[depth - 1].2 += 1;
            let entry = memory.table(table)[next].load(Ordering::Acquire);
            if entry & PERM_BITS != 0 && entry & LARGE_PAGE == 0 {
                stack[depth] = (entry & ADDR_MASK, level - 1, 0);
                depth += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
