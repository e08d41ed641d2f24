//! The device's region directory: which regions exist, whose they are and where their
//! PTx stores lie. It is the first [`DIRECTORY_BYTES`] of the device: a superblock unit,
//! then [`ENTRIES`] entry units, each a whole region record sealed with its hash. A
//! region is created by formatting its extent and only then writing its entry (one unit,
//! atomic, then a fence): a power cut before the entry leaves the extent free again, one
//! after it leaves a complete, empty region.

use alloc::vec::Vec;

use nk_am::{Media, MediaError, MEDIA_UNIT};

use crate::ptx::{Geometry, Store, StoreError, BLOCK};

/// Region entries in the directory.
pub const ENTRIES: usize = 63;
/// Bytes the directory takes at the start of the device.
pub const DIRECTORY_BYTES: u64 = (1 + ENTRIES as u64) * MEDIA_UNIT;

const SUPER_MAGIC: &[u8; 8] = b"NKNVDIR1";
const ENTRY_MAGIC: &[u8; 8] = b"NKNVREG1";

/// A region as its directory entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Who may open it again: the owner number the hypervisor gave the VM that created
    /// it (logical separation, seed §5.2.1).
    pub owner: u64,
    /// The caller's name for it, so the same owner finds it after a restart.
    pub key: u64,
    /// The region's size in bytes (whole 4 KiB pages).
    pub bytes: u64,
    /// Its store on the device.
    pub geometry: Geometry,
}

impl Entry {
    fn encode(&self) -> [u8; BLOCK] {
        let mut unit = [0; BLOCK];
        unit[..8].copy_from_slice(ENTRY_MAGIC);
        let words = [self.owner, self.key, self.bytes, self.geometry.uid, self.geometry.base];
        for (i, w) in words.iter().enumerate() {
            unit[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        crate::ptx::seal_unit(&mut unit);
        unit
    }

    fn decode(unit: &[u8; BLOCK]) -> Option<Entry> {
        if !crate::ptx::unit_sealed(unit) || &unit[..8] != ENTRY_MAGIC {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0; 8];
            w.copy_from_slice(&unit[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(w)
        };
        let (owner, key, bytes, uid, base) = (word(0), word(1), word(2), word(3), word(4));
        let geometry = Geometry::for_region(base, uid, bytes)?;
        Some(Entry { owner, key, bytes, geometry })
    }
}

/// Why the directory could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectoryError {
    Media(MediaError),
    /// The superblock fails its check (the device holds something else, or it is
    /// corrupted): nothing on it is used.
    CorruptSuperblock,
    /// No entry is free or no extent is large enough.
    NoSpace,
    /// The size is zero or too large.
    BadArgument,
    /// Formatting the region's store failed.
    Store(StoreError),
}

impl From<MediaError> for DirectoryError {
    fn from(error: MediaError) -> Self {
        DirectoryError::Media(error)
    }
}

/// A slot of the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Free,
    Region(Entry),
    /// A sealed entry failed its check: reported at mount, never reused or opened.
    Corrupt,
}

/// The directory, read from the device.
#[derive(Debug)]
pub struct Directory {
    slots: Vec<Slot>,
    size: u64,
}

impl Directory {
    /// Reads the directory, or writes an empty one on a device that is all zeros there.
    pub fn mount(media: &mut dyn Media) -> Result<Directory, DirectoryError> {
        let size = media.size();
        if size < DIRECTORY_BYTES {
            return Err(DirectoryError::NoSpace);
        }
        let mut units = alloc::vec![0u8; DIRECTORY_BYTES as usize];
        media.read(0, &mut units)?;
        let superblock: &[u8; BLOCK] = units[..BLOCK].try_into().map_err(|_| DirectoryError::BadArgument)?;
        if units.iter().all(|&b| b == 0) {
            let mut unit = [0u8; BLOCK];
            unit[..8].copy_from_slice(SUPER_MAGIC);
            unit[8..16].copy_from_slice(&(ENTRIES as u64).to_le_bytes());
            crate::ptx::seal_unit(&mut unit);
            media.write(0, &unit)?;
            media.fence()?;
            return Ok(Directory { slots: alloc::vec![Slot::Free; ENTRIES], size });
        }
        if !crate::ptx::unit_sealed(superblock)
            || &superblock[..8] != SUPER_MAGIC
            || superblock[8..16] != (ENTRIES as u64).to_le_bytes()
        {
            return Err(DirectoryError::CorruptSuperblock);
        }
        let slots = units[BLOCK..]
            .chunks_exact(BLOCK)
            .map(|chunk| {
                let unit: &[u8; BLOCK] = chunk.try_into().unwrap_or(&[0xFF; BLOCK]);
                if unit.iter().all(|&b| b == 0) {
                    Slot::Free
                } else {
                    Entry::decode(unit).map_or(Slot::Corrupt, Slot::Region)
                }
            })
            .collect();
        Ok(Directory { slots, size })
    }

    /// Returns the slots (for the boot log and tests).
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Finds the region `owner` named `key`.
    pub fn find(&self, owner: u64, key: u64) -> Option<Entry> {
        self.slots.iter().find_map(|s| match s {
            Slot::Region(e) if e.owner == owner && e.key == key => Some(*e),
            _ => None,
        })
    }

    /// Creates a region of `bytes` for `owner` named `key`: formats a free extent, then
    /// writes its entry. Returns the entry and the formatted store.
    pub fn create(
        &mut self,
        media: &mut dyn Media,
        owner: u64,
        key: u64,
        bytes: u64,
    ) -> Result<(Entry, Store), DirectoryError> {
        let slot = self.slots.iter().position(|s| *s == Slot::Free).ok_or(DirectoryError::NoSpace)?;
        let uid = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Region(e) => Some(e.geometry.uid),
                _ => None,
            })
            .max()
            .unwrap_or(0)
            + 1;
        let probe = Geometry::for_region(0, uid, bytes).ok_or(DirectoryError::BadArgument)?;
        let base = self.free_extent(probe.extent_bytes()).ok_or(DirectoryError::NoSpace)?;
        let geometry = Geometry::for_region(base, uid, bytes).ok_or(DirectoryError::BadArgument)?;
        let store = Store::format(media, geometry).map_err(DirectoryError::Store)?;
        let entry = Entry { owner, key, bytes, geometry };
        media.write((1 + slot as u64) * MEDIA_UNIT, &entry.encode())?;
        media.fence()?;
        self.slots[slot] = Slot::Region(entry);
        Ok((entry, store))
    }

    /// Returns the first offset after the directory where `bytes` fit between regions.
    /// Extents of corrupt entries are unknown: while any exists, nothing new is placed.
    fn free_extent(&self, bytes: u64) -> Option<u64> {
        if self.slots.contains(&Slot::Corrupt) {
            return None;
        }
        let mut used: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Region(e) => Some((e.geometry.base, e.geometry.base + e.geometry.extent_bytes())),
                _ => None,
            })
            .collect();
        used.sort_unstable();
        let mut at = DIRECTORY_BYTES;
        for (start, end) in used {
            if at.checked_add(bytes)? <= start {
                return Some(at);
            }
            at = at.max(end);
        }
        (at.checked_add(bytes)? <= self.size).then_some(at)
    }
}
