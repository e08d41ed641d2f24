//! Persistent memory as the NVRAM AM's durable device (issue 12, device (1)): a range the
//! firmware calls persistent (an ACPI NFIT SPA range, [`crate::nfit`], or an E820 type-7
//! entry), or RAM the command line sets aside to emulate one (`memmap=<size>!<start>`),
//! behind the same [`nk_am::Media`] as the ATA-backed emulated NVRAM.
//!
//! # Durability: write-back and SFENCE
//!
//! A store to persistent memory sits in the CPU's caches until its line is written back.
//! [`PmemMedia`] writes back every line it stores with the best instruction the CPU has
//! ([`FlushKind::choose`]: CLWB, else CLFLUSHOPT, else CLFLUSH; SDM Vol. 2A "CLWB",
//! "CLFLUSHOPT", "CLFLUSH") and orders those write-backs with SFENCE: CLWB and CLFLUSHOPT
//! are ordered only by fences (SDM Vol. 3A §11.10 and the instructions' pages), so an
//! SFENCE returns once every line written back before it is in the persistence domain
//! (the memory controller's ADR domain on real hardware). The ordering points are the
//! NVRAM store's `Media::fence` calls (am/nvram's crate docs, "Commit order": after the
//! data blocks, after the log record, after the headers; the directory's and the
//! formatter's), each one SFENCE here, plus the two the journal below adds per write.
//!
//! # Unit atomicity: a redo journal
//!
//! `Media` promises that a 256-byte unit is written atomically (old or new after a power
//! cut); persistent memory promises only aligned 8-byte stores. So every write goes
//! through a redo journal at the start of the range (16 KiB, [`JOURNAL_BYTES`]): the
//! units, each with its target offset and a sequence number, sealed by a hash, then a
//! journal header with the same sequence number and the count; SFENCE; then the units in
//! place, written back (made durable by the next SFENCE: the next write's first step, or
//! the caller's fence). At mount a complete journal (header and every entry intact, with
//! one sequence number) is replayed: its in-place writes may have been cut, and replaying
//! the newest write again is harmless, because every write goes through the journal and
//! the previous write's in-place lines were fenced before the journal was reused. An
//! incomplete journal means the cut came before the in-place writes began: it is ignored.
//! A write of more than [`JOURNAL_ENTRIES`] units is journaled in chunks (each chunk
//! atomic per unit, as `Media` asks). The cost: each unit is stored twice, and each write
//! takes two SFENCEs.
//!
//! # Label
//!
//! The range's first 256 bytes label it (magic, data size, hash). A range without a valid
//! label is formatted at mount (zeroed, then labelled), so an emulated range whose RAM held
//! anything else never passes for a device with data.

extern crate alloc;

use alloc::string::String;

use nk_am::{Media, MediaError, MEDIA_UNIT};

/// The cache-line size write-backs work on (every x86-64 CPU so far; CPUID.1:EBX[15:8]
/// gives it in units of 8).
pub const CACHE_LINE: u64 = 64;
/// Bytes at the start of the range for the label and the journal; the device's data
/// starts after them.
pub const JOURNAL_BYTES: u64 = 16 * 1024;
/// Units one journal write holds.
pub const JOURNAL_ENTRIES: usize = 48;
/// Where the journal header lies (after the label unit).
const HEADER_OFFSET: u64 = 256;
/// Where the first journal entry lies.
const ENTRIES_OFFSET: u64 = 512;
/// One entry: the unit, then its target offset, sequence number and hash.
const ENTRY_BYTES: u64 = 320;
const UNIT: usize = MEDIA_UNIT as usize;
const LABEL_MAGIC: &[u8; 8] = b"NK-PMEM1";
const JOURNAL_MAGIC: &[u8; 8] = b"NK-PMJNL";

/// The smallest range [`PmemMedia::mount`] takes: the journal and 64 KiB of data.
pub const MIN_RANGE_BYTES: u64 = JOURNAL_BYTES + 64 * 1024;

const _: () = assert!(ENTRIES_OFFSET + JOURNAL_ENTRIES as u64 * ENTRY_BYTES <= JOURNAL_BYTES);

/// The cache write-back instruction the device uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushKind {
    /// CLWB: writes the line back and may keep it cached (weakly ordered).
    Clwb,
    /// CLFLUSHOPT: writes back and invalidates (weakly ordered).
    Clflushopt,
    /// CLFLUSH: writes back and invalidates, ordered with other CLFLUSHes and stores.
    Clflush,
}

/// CPUID.(EAX=07H,ECX=0):EBX bit 24: CLWB.
pub const CPUID7_EBX_CLWB: u32 = 1 << 24;
/// CPUID.(EAX=07H,ECX=0):EBX bit 23: CLFLUSHOPT.
pub const CPUID7_EBX_CLFLUSHOPT: u32 = 1 << 23;
/// CPUID.01H:EDX bit 19: CLFSH (CLFLUSH).
pub const CPUID1_EDX_CLFSH: u32 = 1 << 19;

impl FlushKind {
    /// Picks CLWB, else CLFLUSHOPT, else CLFLUSH from CPUID leaf 1's EDX and leaf 7's EBX
    /// (SDM Vol. 2A, CPUID, Tables 3-11 and 3-8); `None` when the CPU has none of them.
    pub fn choose(leaf1_edx: u32, leaf7_ebx: u32) -> Option<FlushKind> {
        if leaf7_ebx & CPUID7_EBX_CLWB != 0 {
            Some(FlushKind::Clwb)
        } else if leaf7_ebx & CPUID7_EBX_CLFLUSHOPT != 0 {
            Some(FlushKind::Clflushopt)
        } else if leaf1_edx & CPUID1_EDX_CLFSH != 0 {
            Some(FlushKind::Clflush)
        } else {
            None
        }
    }

    /// Returns the instruction's mnemonic.
    pub fn mnemonic(self) -> &'static str {
        match self {
            FlushKind::Clwb => "CLWB",
            FlushKind::Clflushopt => "CLFLUSHOPT",
            FlushKind::Clflush => "CLFLUSH",
        }
    }
}

/// A range of persistent memory as the hardware gives it: loads, stores, cache-line
/// write-backs and SFENCE. Offsets are relative to the range; [`PmemMedia`] checks every
/// offset against [`PersistentMemory::len`] before it calls.
pub trait PersistentMemory {
    /// Returns the range's length in bytes.
    fn len(&self) -> u64;
    /// Tells whether the range is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn load(&self, offset: u64, buf: &mut [u8]);
    /// Stores `data` at `offset` (into the cache: not durable until written back and
    /// fenced).
    fn store(&mut self, offset: u64, data: &[u8]);
    /// Writes back every cache line that holds a byte of `offset..offset + len`.
    fn write_back(&mut self, offset: u64, len: u64);
    /// SFENCE: returns once every earlier write-back has reached the persistence domain.
    fn sfence(&mut self);
}

/// What a [`PmemMedia`] did since it was mounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmemStats {
    /// `Media::write` calls completed.
    pub writes: u64,
    /// Units written through the journal.
    pub units: u64,
    /// `Media::fence` calls (the caller's ordering points).
    pub fences: u64,
    /// SFENCEs executed, the journal's included.
    pub sfences: u64,
    /// Bytes callers wrote.
    pub bytes_written: u64,
}

/// What mounting found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mounted {
    /// The range had no label: it was zeroed and labelled.
    Formatted,
    /// A labelled range whose journal held nothing to replay.
    Clean,
    /// A labelled range whose last journaled write was replayed (`units` units).
    Replayed { units: u64 },
}

/// Why a range cannot be a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmemError {
    /// The range is shorter than [`MIN_RANGE_BYTES`].
    TooSmall,
    /// The label names another size than the range has.
    SizeMismatch { labelled: u64, range: u64 },
}

impl core::fmt::Display for PmemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PmemError::TooSmall => write!(f, "the range is smaller than {} KiB", MIN_RANGE_BYTES / 1024),
            PmemError::SizeMismatch { labelled, range } => {
                write!(f, "the label says {labelled} data bytes, the range holds {range}")
            }
        }
    }
}

/// FNV-1a 64 of `bytes`.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Persistent memory behind [`Media`], with unit atomicity from a redo journal (module
/// docs). Device offset `o` is range offset [`JOURNAL_BYTES`]` + o`.
#[derive(Debug)]
pub struct PmemMedia<P> {
    pm: P,
    size: u64,
    seq: u64,
    description: String,
    stats: PmemStats,
    mounted: Mounted,
    /// Stores left before a simulated power cut (`cut_after_stores`); `None`: never.
    stores_left: Option<u64>,
}

impl<P: PersistentMemory> PmemMedia<P> {
    /// Mounts `pm`: formats it if it has no label, else replays a complete journal.
    /// `description` is what `Media::describe` returns.
    pub fn mount(pm: P, description: String) -> Result<Self, PmemError> {
        let range = pm.len();
        if range < MIN_RANGE_BYTES {
            return Err(PmemError::TooSmall);
        }
        let size = (range - JOURNAL_BYTES) / MEDIA_UNIT * MEDIA_UNIT;
        let mut label = [0u8; 24];
        pm.load(0, &mut label);
        let labelled = &label[..8] == LABEL_MAGIC && word(&label, 16) == hash(&label[..16]);
        let mut media = PmemMedia {
            pm,
            size,
            seq: 0,
            description,
            stats: PmemStats::default(),
            mounted: Mounted::Clean,
            stores_left: None,
        };
        if !labelled {
            media.format();
            media.mounted = Mounted::Formatted;
            return Ok(media);
        }
        if word(&label, 8) != size {
            return Err(PmemError::SizeMismatch { labelled: word(&label, 8), range: size });
        }
        media.replay();
        Ok(media)
    }

    /// Mounts the same memory again, as after a power cut (the journal is replayed); the
    /// counters start over.
    pub fn remount(self) -> Result<Self, PmemError> {
        PmemMedia::mount(self.pm, self.description)
    }

    /// Returns what mounting found.
    pub fn mounted(&self) -> Mounted {
        self.mounted
    }

    /// Returns the counters.
    pub fn stats(&self) -> PmemStats {
        self.stats
    }

    /// Returns the memory underneath.
    pub fn memory(&self) -> &P {
        &self.pm
    }

    /// Simulates a power cut right after the next `stores` stores to the memory (a
    /// journal entry, the journal header or a write's units in place count one each):
    /// every later store, write-back and fence does nothing. `remount` then sees the
    /// memory as a reboot would (in an emulator, which keeps every store; host tests also
    /// lose unfenced lines).
    pub fn cut_after_stores(&mut self, stores: u64) {
        self.stores_left = Some(stores);
    }

    /// Tells whether a simulated cut happened.
    pub fn is_cut(&self) -> bool {
        self.stores_left == Some(0)
    }

    fn store(&mut self, offset: u64, data: &[u8]) {
        match &mut self.stores_left {
            Some(0) => return,
            Some(left) => *left -= 1,
            None => {}
        }
        self.pm.store(offset, data);
        self.pm.write_back(offset, data.len() as u64);
    }

    fn sfence(&mut self) {
        if self.is_cut() {
            return;
        }
        self.pm.sfence();
        self.stats.sfences += 1;
    }

    /// Zeroes the range, then writes the label (a cut in between leaves no label: the next
    /// mount formats again).
    fn format(&mut self) {
        let zeros = [0u8; 4096];
        let range = self.pm.len();
        let mut offset = 0;
        while offset < range {
            let len = (range - offset).min(zeros.len() as u64);
            self.store(offset, &zeros[..len as usize]);
            offset += len;
        }
        self.sfence();
        let mut label = [0u8; 24];
        label[..8].copy_from_slice(LABEL_MAGIC);
        label[8..16].copy_from_slice(&self.size.to_le_bytes());
        let sum = hash(&label[..16]);
        label[16..].copy_from_slice(&sum.to_le_bytes());
        self.store(0, &label);
        self.sfence();
    }

    fn entry_offset(index: usize) -> u64 {
        ENTRIES_OFFSET + index as u64 * ENTRY_BYTES
    }

    /// Reads entry `index`: `(unit, target, seq)` if its hash holds.
    fn read_entry(&self, index: usize) -> Option<([u8; UNIT], u64, u64)> {
        let mut entry = [0u8; UNIT + 24];
        self.pm.load(Self::entry_offset(index), &mut entry);
        if word(&entry, UNIT + 16) != hash(&entry[..UNIT + 16]) {
            return None;
        }
        let mut unit = [0u8; UNIT];
        unit.copy_from_slice(&entry[..UNIT]);
        Some((unit, word(&entry, UNIT), word(&entry, UNIT + 8)))
    }

    /// Replays the journal if it is complete, and sets the next sequence number above
    /// every one the journal holds.
    fn replay(&mut self) {
        let mut header = [0u8; 32];
        self.pm.load(HEADER_OFFSET, &mut header);
        let header_ok = &header[..8] == JOURNAL_MAGIC && word(&header, 24) == hash(&header[..24]);
        let (seq, count) = (word(&header, 8), word(&header, 16));
        let mut highest = if header_ok { seq } else { 0 };
        for index in 0..JOURNAL_ENTRIES {
            if let Some((_, _, entry_seq)) = self.read_entry(index) {
                highest = highest.max(entry_seq);
            }
        }
        self.seq = highest;
        if !header_ok || count == 0 || count > JOURNAL_ENTRIES as u64 {
            return;
        }
        let complete = (0..count as usize).all(|index| {
            self.read_entry(index).is_some_and(|(_, target, entry_seq)| {
                entry_seq == seq
                    && target.is_multiple_of(MEDIA_UNIT)
                    && target.checked_add(MEDIA_UNIT).is_some_and(|end| end <= self.size)
            })
        });
        if !complete {
            return;
        }
        for index in 0..count as usize {
            if let Some((unit, target, _)) = self.read_entry(index) {
                self.store(JOURNAL_BYTES + target, &unit);
            }
        }
        self.sfence();
        self.mounted = Mounted::Replayed { units: count };
    }

    /// Journals `data` (at most [`JOURNAL_ENTRIES`] units) for `offset`, then writes it in
    /// place (module docs).
    fn write_chunk(&mut self, offset: u64, data: &[u8]) {
        // The previous write's in-place lines become durable before its journal is reused.
        self.sfence();
        self.seq += 1;
        let count = data.len() / UNIT;
        for (index, unit) in data.chunks_exact(UNIT).enumerate() {
            let mut entry = [0u8; UNIT + 24];
            entry[..UNIT].copy_from_slice(unit);
            entry[UNIT..UNIT + 8].copy_from_slice(&(offset + (index * UNIT) as u64).to_le_bytes());
            entry[UNIT + 8..UNIT + 16].copy_from_slice(&self.seq.to_le_bytes());
            let sum = hash(&entry[..UNIT + 16]);
            entry[UNIT + 16..].copy_from_slice(&sum.to_le_bytes());
            self.store(Self::entry_offset(index), &entry);
        }
        let mut header = [0u8; 32];
        header[..8].copy_from_slice(JOURNAL_MAGIC);
        header[8..16].copy_from_slice(&self.seq.to_le_bytes());
        header[16..24].copy_from_slice(&(count as u64).to_le_bytes());
        let sum = hash(&header[..24]);
        header[24..].copy_from_slice(&sum.to_le_bytes());
        self.store(HEADER_OFFSET, &header);
        self.sfence();
        self.store(JOURNAL_BYTES + offset, data);
        self.stats.units += count as u64;
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), MediaError> {
        MediaError::check_range(offset, len, self.size)
    }
}

impl<P: PersistentMemory> Media for PmemMedia<P> {
    fn describe(&self) -> &str {
        &self.description
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.check(offset, buf.len())?;
        self.pm.load(JOURNAL_BYTES + offset, buf);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        self.check(offset, data.len())?;
        for (index, chunk) in data.chunks(JOURNAL_ENTRIES * UNIT).enumerate() {
            self.write_chunk(offset + (index * JOURNAL_ENTRIES * UNIT) as u64, chunk);
        }
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        Ok(())
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        self.sfence();
        self.stats.fences += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
