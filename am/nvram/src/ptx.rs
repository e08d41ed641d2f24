//! PTx's on-media store for one region (one PTx *color*, seed §3.2.4): blocksets of 41
//! data blocks and a header, a circular log for commits that span blocksets, and the map
//! and free list rebuilt in memory from the headers at restore (seed Alg. 3).
//!
//! The layout of a store's extent of the device, in `MEDIA_UNIT`s (256 bytes):
//!
//! ```text
//! [ log: log_units units ][ blockset 0: header, 41 data ][ blockset 1 ] ... [ blockset N-1 ]
//! ```
//!
//! The crate docs say why each step is ordered as it is; [`Store::commit`] and
//! [`Store::open`] implement them.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use nk_am::{Media, MediaError, MEDIA_UNIT};

/// Bytes in a block (PTx's 256-byte block, and our `MEDIA_UNIT`).
pub const BLOCK: usize = MEDIA_UNIT as usize;
/// Data blocks in a blockset (seed §3.2.4).
pub const BLOCKS_PER_SET: usize = 41;
/// Units a blockset takes: its header and its data blocks.
pub const SET_UNITS: u64 = 1 + BLOCKS_PER_SET as u64;
/// Blockset locations one log unit holds.
pub const LOCATIONS_PER_UNIT: usize = 7;
/// Every slot of a blockset, as a bitmap.
const ALL_SLOTS: u64 = (1 << BLOCKS_PER_SET) - 1;

/// The slots set in a bitmap, lowest first (a step per set bit, not per slot).
struct SlotBits(u64);

impl Iterator for SlotBits {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let slot = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(slot)
    }
}

/// A header address field that names no block (PTx's ⊥).
const NO_BLOCK: u32 = u32::MAX;
/// The largest region, in blocks (block numbers must fit below the header's ⊥, `u32::MAX`).
pub const MAX_BLOCKS: u64 = 1 << 24;

const HEADER_MAGIC: &[u8; 8] = b"NKPTXHDR";
const LOG_MAGIC: &[u8; 8] = b"NKPTXLOG";
/// Header flag: the stamp belongs to a commit that wrote a log record.
const FLAG_LOGGED: u8 = 1;
/// Bit 63 of a location's previous sequence number: the previous stamp was logged.
const PREV_LOGGED: u64 = 1 << 63;
const HASH_AT: usize = BLOCK - 8;

/// Why a store could not be opened or committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The device failed or refused an access (a store that saw this on commit is
    /// poisoned until it is opened again).
    Media(MediaError),
    /// Durable metadata failed its check at restore: nothing is restored from it.
    Corrupt(Corruption),
    /// No blocksets are left for this write set under the placement rules.
    NoSpace,
    /// A block number, size or geometry is out of range.
    BadArgument,
    /// A commit failed part-way on the device: the store must be opened again.
    Poisoned,
}

impl From<MediaError> for StoreError {
    fn from(error: MediaError) -> Self {
        StoreError::Media(error)
    }
}

/// Which durable metadata failed its check, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Blockset `set`'s header: bad hash, magic or region id, or a block out of range.
    Header { set: u32 },
    /// Log unit `unit`: not empty and fails its hash, magic or region id, or it lists a
    /// blockset out of range.
    LogUnit { unit: u32 },
    /// A header stamped by a logged commit `seq` newer than every complete log record:
    /// that record was made durable before any header, so it was destroyed afterwards.
    MissingLogRecord { seq: u64 },
}

/// Where a store lies on the device and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// First byte of the store's extent (a multiple of `MEDIA_UNIT`).
    pub base: u64,
    /// Region id written into every header and log unit (so that metadata of another
    /// region, or of an older region in the same place, never counts as this one's).
    pub uid: u64,
    /// The region's size in blocks.
    pub blocks: u64,
    /// Blocksets in the store.
    pub sets: u32,
    /// Units in the circular log.
    pub log_units: u32,
}

impl Geometry {
    /// Returns the geometry for a region of `bytes` (rounded up to blocks) at `base`:
    /// twice the blocksets the region fills plus two, so that a commit of every block
    /// always finds blocksets free of the versions it supersedes, and a log that holds
    /// three of the largest records, so that appending one (at the head, or from unit 0
    /// when it does not fit before the end) never overwrites the previous one (restore
    /// needs the last complete record).
    pub fn for_region(base: u64, uid: u64, bytes: u64) -> Option<Self> {
        let blocks = bytes.div_ceil(BLOCK as u64);
        if blocks == 0 || blocks > MAX_BLOCKS || !base.is_multiple_of(MEDIA_UNIT) {
            return None;
        }
        let filled = blocks.div_ceil(BLOCKS_PER_SET as u64);
        let sets = u32::try_from(2 * filled + 2).ok()?;
        let log_units = u32::try_from(3 * record_units(sets as usize) + 1).ok()?;
        Some(Self { base, uid, blocks, sets, log_units })
    }

    /// Returns the bytes of the extent.
    pub fn extent_bytes(&self) -> u64 {
        (u64::from(self.log_units) + u64::from(self.sets) * SET_UNITS) * MEDIA_UNIT
    }

    fn log_offset(&self, unit: u32) -> u64 {
        self.base + u64::from(unit) * MEDIA_UNIT
    }

    fn set_offset(&self, set: u32) -> u64 {
        self.base + (u64::from(self.log_units) + u64::from(set) * SET_UNITS) * MEDIA_UNIT
    }

    fn block_offset(&self, set: u32, slot: usize) -> u64 {
        self.set_offset(set) + (1 + slot as u64) * MEDIA_UNIT
    }
}

/// Units a log record listing `sets` blocksets takes.
fn record_units(sets: usize) -> usize {
    sets.div_ceil(LOCATIONS_PER_UNIT).max(1)
}

/// Seals `unit` with the hash of its first 248 bytes (crate docs, "Hash").
fn seal(unit: &mut [u8; BLOCK]) {
    let hash = hash(&unit[..HASH_AT]);
    unit[HASH_AT..].copy_from_slice(&hash.to_le_bytes());
}

fn sealed(unit: &[u8; BLOCK]) -> bool {
    hash(&unit[..HASH_AT]).to_le_bytes() == unit[HASH_AT..]
}

/// Seals a unit of other metadata (the region directory) the same way.
pub(crate) fn seal_unit(unit: &mut [u8; BLOCK]) {
    seal(unit);
}

/// Tells whether a unit sealed with [`seal_unit`] is intact.
pub(crate) fn unit_sealed(unit: &[u8; BLOCK]) -> bool {
    sealed(unit)
}

/// FNV-1a 64 taken a little-endian 8-byte word at a time (a sealed prefix is 31 words)
/// with a rotation after each multiply, so high bits reach the low ones: each step
/// (xor a word, multiply by the odd FNV prime, rotate) is a bijection of the state for a
/// given word, so two inputs that differ in one word, and so in any one byte, always
/// hash differently. A trailing partial word (never, for units) is taken a byte at a time.
fn hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let step = |state: u64, word: u64| (state ^ word).wrapping_mul(PRIME).rotate_left(23);
    let mut words = bytes.chunks_exact(8);
    let mut state = OFFSET;
    for word in &mut words {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        state = step(state, u64::from_le_bytes(le));
    }
    for &byte in words.remainder() {
        state = step(state, u64::from(byte));
    }
    state
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// A blockset header: PTx's `Header = {seqNum, VAddr[41]}` (seed Alg. 1), with the
/// address of each slot a block number of the region or ⊥.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    logged: bool,
    /// Slots written by the commit that stamped `seq` (bit per slot): between two
    /// blocksets with the same stamp, a fresh slot's block is newer than a kept one's.
    fresh: u64,
    fields: [u32; BLOCKS_PER_SET],
}

impl Header {
    const EMPTY: Header = Header { seq: 0, logged: false, fresh: 0, fields: [NO_BLOCK; BLOCKS_PER_SET] };

    /// Encodes the header: magic, region id, sequence number, flags, 41 block numbers
    /// (u32, ⊥ = 0xFFFF_FFFF), the fresh-slot bitmap (u64 at byte 200), then the hash in
    /// the last 8 bytes.
    fn encode(&self, uid: u64) -> [u8; BLOCK] {
        let mut unit = [0; BLOCK];
        unit[..8].copy_from_slice(HEADER_MAGIC);
        unit[8..16].copy_from_slice(&uid.to_le_bytes());
        unit[16..24].copy_from_slice(&self.seq.to_le_bytes());
        unit[24] = if self.logged { FLAG_LOGGED } else { 0 };
        for (out, field) in unit[32..32 + 4 * BLOCKS_PER_SET].chunks_exact_mut(4).zip(&self.fields) {
            out.copy_from_slice(&field.to_le_bytes());
        }
        unit[200..208].copy_from_slice(&self.fresh.to_le_bytes());
        seal(&mut unit);
        unit
    }

    fn decode(unit: &[u8; BLOCK], uid: u64, blocks: u64) -> Option<Header> {
        if !sealed(unit) || &unit[..8] != HEADER_MAGIC || u64_at(unit, 8) != uid || unit[24] & !FLAG_LOGGED != 0 {
            return None;
        }
        let mut fields = [NO_BLOCK; BLOCKS_PER_SET];
        for (i, field) in fields.iter_mut().enumerate() {
            *field = u32_at(unit, 32 + 4 * i);
            if *field != NO_BLOCK && u64::from(*field) >= blocks {
                return None;
            }
        }
        let fresh = u64_at(unit, 200);
        if fresh >> BLOCKS_PER_SET != 0 {
            return None;
        }
        Some(Header { seq: u64_at(unit, 16), logged: unit[24] & FLAG_LOGGED != 0, fresh, fields })
    }
}

/// One blockset of a logged commit: PTx's `BlockLocation`s of one blockset (its id and a
/// bitmap of the slots written), with the header's stamp before the commit so that a
/// roll-back can put it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    set: u32,
    slots: u64,
    prev_seq: u64,
    prev_logged: bool,
    prev_fresh: u64,
}

/// One log unit: part `part` of `parts` of commit `seq`'s record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LogUnit {
    seq: u64,
    part: u16,
    parts: u16,
    locations: Vec<Location>,
}

impl LogUnit {
    /// Encodes the unit: magic, region id, sequence number, part, parts, count, then
    /// up to 7 locations of 28 bytes (blockset u32, slot bitmap u64, previous stamp u64
    /// with bit 63 = logged, previous fresh-slot bitmap u64), then the hash in the last 8
    /// bytes.
    fn encode(&self, uid: u64) -> [u8; BLOCK] {
        let mut unit = [0; BLOCK];
        unit[..8].copy_from_slice(LOG_MAGIC);
        unit[8..16].copy_from_slice(&uid.to_le_bytes());
        unit[16..24].copy_from_slice(&self.seq.to_le_bytes());
        unit[24..26].copy_from_slice(&self.part.to_le_bytes());
        unit[26..28].copy_from_slice(&self.parts.to_le_bytes());
        unit[28..30].copy_from_slice(&(self.locations.len() as u16).to_le_bytes());
        for (i, l) in self.locations.iter().enumerate() {
            let at = 32 + 28 * i;
            unit[at..at + 4].copy_from_slice(&l.set.to_le_bytes());
            unit[at + 4..at + 12].copy_from_slice(&l.slots.to_le_bytes());
            let prev = l.prev_seq | if l.prev_logged { PREV_LOGGED } else { 0 };
            unit[at + 12..at + 20].copy_from_slice(&prev.to_le_bytes());
            unit[at + 20..at + 28].copy_from_slice(&l.prev_fresh.to_le_bytes());
        }
        seal(&mut unit);
        unit
    }

    fn decode(unit: &[u8; BLOCK], uid: u64, sets: u32) -> Option<LogUnit> {
        if !sealed(unit) || &unit[..8] != LOG_MAGIC || u64_at(unit, 8) != uid {
            return None;
        }
        let (part, parts, count) = (u16_at(unit, 24), u16_at(unit, 26), usize::from(u16_at(unit, 28)));
        if part >= parts || count == 0 || count > LOCATIONS_PER_UNIT {
            return None;
        }
        let mut locations = Vec::with_capacity(count);
        for i in 0..count {
            let at = 32 + 28 * i;
            let prev = u64_at(unit, at + 12);
            let location = Location {
                set: u32_at(unit, at),
                slots: u64_at(unit, at + 4),
                prev_seq: prev & !PREV_LOGGED,
                prev_logged: prev & PREV_LOGGED != 0,
                prev_fresh: u64_at(unit, at + 20),
            };
            if location.set >= sets
                || location.slots == 0
                || location.slots >> BLOCKS_PER_SET != 0
                || location.prev_fresh >> BLOCKS_PER_SET != 0
            {
                return None;
            }
            locations.push(location);
        }
        Some(LogUnit { seq: u64_at(unit, 16), part, parts, locations })
    }
}

/// What a restore found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// The sequence number of the last committed transaction (0: none).
    pub seq: u64,
    /// A logged commit found incomplete and rolled back (its sequence number).
    pub rolled_back: Option<u64>,
    /// Blocks that have a committed version.
    pub live_blocks: u64,
}

/// What a commit wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// The commit's sequence number.
    pub seq: u64,
    /// Data blocks written.
    pub blocks: u64,
    /// Blocksets that received blocks (headers written).
    pub sets: u64,
    /// Log units written (0: the commit fit one blockset and skipped the log).
    pub log_units: u64,
    /// Bytes written to the device.
    pub device_bytes: u64,
    /// Writes and fences issued.
    pub writes: u64,
    pub fences: u64,
}

/// PTx's map from a block to the blockset and slot of its committed version: one word per
/// block of the region (4 bytes a block, a 64th of the region; a lookup or an update is an
/// index, where a commit's updates in a tree cost a search each).
#[derive(Debug)]
struct BlockMap {
    /// `set * 64 + slot`, or [`NO_BLOCK`] for a block never committed.
    entries: Vec<u32>,
    len: usize,
}

impl BlockMap {
    fn new(blocks: u64) -> Self {
        Self { entries: vec![NO_BLOCK; blocks as usize], len: 0 }
    }

    fn get(&self, block: u32) -> Option<(u32, u8)> {
        match self.entries.get(block as usize) {
            Some(&entry) if entry != NO_BLOCK => Some((entry / 64, (entry % 64) as u8)),
            _ => None,
        }
    }

    /// Maps `block` to `(set, slot)`; returns its previous place. A block outside the
    /// region is never mapped (callers check block numbers first).
    fn insert(&mut self, block: u32, (set, slot): (u32, u8)) -> Option<(u32, u8)> {
        let previous = self.get(block);
        let entry = self.entries.get_mut(block as usize)?;
        *entry = set * 64 + u32::from(slot);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    fn clear(&mut self) {
        self.entries.fill(NO_BLOCK);
        self.len = 0;
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// One region's PTx store: the durable layout's in-memory mirror (headers, map, free
/// slots, log head) and the operations on it.
#[derive(Debug)]
pub struct Store {
    geometry: Geometry,
    headers: Vec<Header>,
    /// Slots holding the committed version of their block (the complement is PTx's free
    /// list: ⊥ slots and slots whose block was superseded).
    live: Vec<u64>,
    /// PTx's map: block number -> (blockset, slot) of its committed version.
    map: BlockMap,
    seq: u64,
    next_seq: u64,
    /// Unit where the next log record starts.
    log_head: u32,
    poisoned: bool,
    /// The buffer a commit fills each run of adjacent slots in (at most a blockset's data,
    /// kept between commits so a commit allocates nothing for its data).
    run: Vec<u8>,
    /// A commit's placement (blockset, slots), kept between commits likewise.
    placement: Vec<(u32, u64)>,
}

impl Store {
    /// Writes an empty store (every header empty, the log zeroed) over `geometry`'s
    /// extent, durably, and returns it.
    pub fn format(media: &mut dyn Media, geometry: Geometry) -> Result<Store, StoreError> {
        if geometry.base.checked_add(geometry.extent_bytes()).is_none_or(|end| end > media.size()) {
            return Err(StoreError::BadArgument);
        }
        let zeros = vec![0u8; geometry.log_units as usize * BLOCK];
        media.write(geometry.log_offset(0), &zeros)?;
        let empty = Header::EMPTY.encode(geometry.uid);
        for set in 0..geometry.sets {
            media.write(geometry.set_offset(set), &empty)?;
        }
        media.fence()?;
        Ok(Store::empty(geometry))
    }

    fn empty(geometry: Geometry) -> Store {
        Store {
            geometry,
            headers: vec![Header::EMPTY; geometry.sets as usize],
            live: vec![0; geometry.sets as usize],
            map: BlockMap::new(geometry.blocks),
            seq: 0,
            next_seq: 1,
            log_head: 0,
            poisoned: false,
            run: Vec::new(),
            placement: Vec::new(),
        }
    }

    /// Restores the store from the device (seed §3.2.5 and Alg. 3, in the order the crate
    /// docs give): checks every header and log unit, rolls back a logged commit whose
    /// headers were not all stamped, and rebuilds the map and free list from the headers.
    pub fn open(media: &mut dyn Media, geometry: Geometry) -> Result<(Store, RestoreReport), StoreError> {
        if geometry.base.checked_add(geometry.extent_bytes()).is_none_or(|end| end > media.size()) {
            return Err(StoreError::BadArgument);
        }
        let mut store = Store::empty(geometry);
        let mut unit = [0u8; BLOCK];
        for set in 0..geometry.sets {
            media.read(geometry.set_offset(set), &mut unit)?;
            store.headers[set as usize] = Header::decode(&unit, geometry.uid, geometry.blocks)
                .ok_or(StoreError::Corrupt(Corruption::Header { set }))?;
        }
        // The log: every unit is zero (never written) or a sealed part of a record.
        let mut log = vec![0u8; geometry.log_units as usize * BLOCK];
        media.read(geometry.log_offset(0), &mut log)?;
        let mut parts: BTreeMap<u64, Vec<(u32, LogUnit)>> = BTreeMap::new();
        for (index, chunk) in log.chunks_exact(BLOCK).enumerate() {
            let chunk: &[u8; BLOCK] = chunk.try_into().map_err(|_| StoreError::BadArgument)?;
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let unit_index = index as u32;
            let entry = LogUnit::decode(chunk, geometry.uid, geometry.sets)
                .ok_or(StoreError::Corrupt(Corruption::LogUnit { unit: unit_index }))?;
            parts.entry(entry.seq).or_default().push((unit_index, entry));
        }
        let max_log_seq = parts.keys().next_back().copied().unwrap_or(0);
        // The last complete record: all its parts present, in consecutive units.
        let mut last: Option<(u64, u32, Vec<Location>)> = None;
        for (&seq, units) in parts.iter().rev() {
            if let Some((end, locations)) = complete_record(units, geometry.log_units) {
                last = Some((seq, end, locations));
                break;
            }
        }
        let last_seq = last.as_ref().map_or(0, |l| l.0);
        for header in &store.headers {
            if header.logged && header.seq > last_seq {
                return Err(StoreError::Corrupt(Corruption::MissingLogRecord { seq: header.seq }));
            }
        }
        let mut report = RestoreReport::default();
        if let Some((seq, end, locations)) = last {
            store.log_head = end;
            let stamped = locations.iter().all(|l| store.headers[l.set as usize].seq >= seq);
            if !stamped {
                // Roll back (Alg. 3 rollBack): every listed header that carries this
                // commit's stamp gets its previous stamp back and ⊥ in the slots the
                // commit wrote. Headers restamped by a later commit, or never stamped,
                // are left alone, so the roll-back is idempotent.
                let mut wrote = false;
                for l in &locations {
                    let header = &mut store.headers[l.set as usize];
                    if header.seq != seq {
                        continue;
                    }
                    for slot in 0..BLOCKS_PER_SET {
                        if l.slots & (1 << slot) != 0 {
                            header.fields[slot] = NO_BLOCK;
                        }
                    }
                    header.seq = l.prev_seq;
                    header.logged = l.prev_logged;
                    header.fresh = l.prev_fresh;
                    media.write(geometry.set_offset(l.set), &header.encode(geometry.uid))?;
                    wrote = true;
                }
                if wrote {
                    media.fence()?;
                    report.rolled_back = Some(seq);
                }
            }
        }
        store.rebuild();
        report.seq = store.seq;
        report.live_blocks = store.map.len() as u64;
        store.next_seq = store.seq.max(max_log_seq) + 1;
        Ok((store, report))
    }

    /// Rebuilds the map and free list from the headers: walking blocksets by decreasing
    /// sequence number, the first occurrence of a block is its committed version (seed
    /// §3.2.5, Invariant 1); later ones are free. Among blocksets with the same stamp,
    /// fresh slots (written by that commit) come before kept ones: a commit that spans
    /// blocksets keeps the version it supersedes listed until its headers are all
    /// written (a roll-back needs it), so both may carry its stamp.
    fn rebuild(&mut self) {
        let mut order: Vec<u32> = (0..self.geometry.sets).collect();
        order.sort_by_key(|&s| core::cmp::Reverse(self.headers[s as usize].seq));
        self.map.clear();
        self.seq = 0;
        let mut group = 0;
        while group < order.len() {
            let seq = self.headers[order[group] as usize].seq;
            let end = order[group..]
                .iter()
                .position(|&s| self.headers[s as usize].seq != seq)
                .map_or(order.len(), |n| group + n);
            self.seq = self.seq.max(seq);
            for fresh_pass in [true, false] {
                for &set in &order[group..end] {
                    let header = self.headers[set as usize];
                    for (slot, &field) in header.fields.iter().enumerate() {
                        let fresh = header.fresh & (1 << slot) != 0;
                        if fresh == fresh_pass && field != NO_BLOCK && self.map.get(field).is_none() {
                            self.map.insert(field, (set, slot as u8));
                            self.live[set as usize] |= 1 << slot;
                        }
                    }
                }
            }
            group = end;
        }
    }

    /// Returns the store's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Returns the sequence number of the last committed transaction (0: none).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Returns the number of blocks that have a committed version.
    pub fn live_blocks(&self) -> u64 {
        self.map.len() as u64
    }

    /// Reads block `block`'s committed version (zeros if it never was committed).
    pub fn read_block(&self, media: &mut dyn Media, block: u32, out: &mut [u8; BLOCK]) -> Result<(), StoreError> {
        if u64::from(block) >= self.geometry.blocks {
            return Err(StoreError::BadArgument);
        }
        match self.map.get(block) {
            Some((set, slot)) => media.read(self.geometry.block_offset(set, usize::from(slot)), out)?,
            None => out.fill(0),
        }
        Ok(())
    }

    /// Reads the committed version of every block that has one, a blockset at a time,
    /// and hands each to `sink` (block number, data); blocks never committed are not
    /// handed (they are zero).
    pub fn read_committed(
        &self,
        media: &mut dyn Media,
        sink: &mut dyn FnMut(u32, &[u8; BLOCK]),
    ) -> Result<(), StoreError> {
        let mut data = vec![0u8; BLOCKS_PER_SET * BLOCK];
        for set in 0..self.geometry.sets {
            let live = self.live[set as usize];
            if live == 0 {
                continue;
            }
            media.read(self.geometry.block_offset(set, 0), &mut data)?;
            let header = &self.headers[set as usize];
            for slot in 0..BLOCKS_PER_SET {
                if live & (1 << slot) != 0 {
                    let block: &[u8; BLOCK] =
                        data[slot * BLOCK..(slot + 1) * BLOCK].try_into().map_err(|_| StoreError::BadArgument)?;
                    sink(header.fields[slot], block);
                }
            }
        }
        Ok(())
    }

    /// Commits new versions of `writes` (block numbers, strictly increasing) atomically:
    /// after a power cut at any point the store restores either all of them or none.
    /// `fetch(blocks, out)` gives the new data of `blocks` (a slice of `writes`, in order)
    /// in `out` (`BLOCK` bytes each), once per block, as they are written (so a write set
    /// needs no copy of its own; a caller holding adjacent blocks together copies a run at
    /// once). The steps and their order are in the crate docs
    /// ("Commit").
    pub fn commit(
        &mut self,
        media: &mut dyn Media,
        writes: &[u32],
        fetch: &mut dyn FnMut(&[u32], &mut [u8]),
    ) -> Result<CommitStats, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if writes.windows(2).any(|w| w[0] >= w[1])
            || writes.iter().any(|&block| u64::from(block) >= self.geometry.blocks)
        {
            return Err(StoreError::BadArgument);
        }
        let seq = self.next_seq;
        let mut stats = CommitStats { seq, ..CommitStats::default() };
        if writes.is_empty() {
            return Ok(stats);
        }
        let mut placement = core::mem::take(&mut self.placement);
        let placed = self.place(writes, &mut placement);
        let result = placed.and_then(|()| {
            let logged = placement.len() > 1;
            self.write_commit(media, writes, fetch, &placement, logged, &mut stats).inspect_err(|_| {
                self.poisoned = true;
            })
        });
        if let Err(error) = result {
            self.placement = placement;
            return Err(error);
        }
        // The commit is durable: update the map and free list (seed §3.2.5 step 6). The
        // headers were stamped as they were written (`write_commit`).
        let mut next = 0;
        for &(set, slots) in &placement {
            let slots = slots & ALL_SLOTS;
            for (slot, &block) in SlotBits(slots).zip(&writes[next..]) {
                if let Some((old_set, old_slot)) = self.map.insert(block, (set, slot as u8)) {
                    if let Some(live) = self.live.get_mut(old_set as usize) {
                        *live &= !(1 << old_slot);
                    }
                }
            }
            next += slots.count_ones() as usize;
            if let Some(live) = self.live.get_mut(set as usize) {
                *live |= slots;
            }
        }
        self.placement = placement;
        self.seq = seq;
        self.next_seq = seq + 1;
        Ok(stats)
    }

    /// Chooses blocksets and slots for the new versions of `writes` (seed §3.2.5 step 2):
    /// only free slots (⊥ or superseded by a committed transaction). A write set that fits
    /// one blockset goes into the blockset with the fewest free slots that hold it
    /// (keeping empty blocksets for large commits); a larger one into as few blocksets as
    /// possible, those with the most free slots first. Returns (blockset, slot bitmap)
    /// pairs; the writes fill them in order.
    ///
    /// PTx also keeps a block's new version out of the blockset of its previous one; here
    /// the fresh-slot bitmap orders them instead (see [`Store::rebuild`]), so a commit of
    /// every block always fits (a store has more than twice the blocks of its region).
    /// The placement goes into `placement` (cleared first; a buffer kept between commits).
    fn place(&self, writes: &[u32], placement: &mut Vec<(u32, u64)>) -> Result<(), StoreError> {
        placement.clear();
        let free = |live: u64| (!live & ALL_SLOTS).count_ones() as usize;
        // The `count` lowest free slots of a blockset (a step per slot taken).
        let lowest = |live: u64, count: usize| {
            let mut free = !live & ALL_SLOTS;
            let mut slots = 0u64;
            for _ in 0..count {
                let bit = free & free.wrapping_neg();
                slots |= bit;
                free ^= bit;
            }
            slots
        };
        let wanted = writes.len();
        if wanted <= BLOCKS_PER_SET {
            // The blockset with the fewest free slots that hold it (the lowest such).
            let mut best: Option<(usize, usize, u64)> = None;
            for (set, &live) in self.live.iter().enumerate() {
                let n = free(live);
                if n >= wanted && best.is_none_or(|(fewest, _, _)| n < fewest) {
                    best = Some((n, set, live));
                }
            }
            if let Some((_, set, live)) = best {
                placement.push((set as u32, lowest(live, wanted)));
                return Ok(());
            }
        }
        let mut candidates: Vec<usize> = (0..self.live.len()).filter(|&s| free(self.live[s]) > 0).collect();
        candidates.sort_by_key(|&s| (core::cmp::Reverse(free(self.live[s])), s));
        let mut left = wanted;
        for set in candidates {
            if left == 0 {
                break;
            }
            let take = free(self.live[set]).min(left);
            placement.push((set as u32, lowest(self.live[set], take)));
            left -= take;
        }
        if left > 0 {
            placement.clear();
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    fn write_commit(
        &mut self,
        media: &mut dyn Media,
        writes: &[u32],
        fetch: &mut dyn FnMut(&[u32], &mut [u8]),
        placement: &[(u32, u64)],
        logged: bool,
        stats: &mut CommitStats,
    ) -> Result<(), StoreError> {
        let g = self.geometry;
        // A commit of one run of slots in one blockset (no log record): the data and the
        // header in one buffer and one request (`Media::write_fenced_pair`: data, fence,
        // header, fence, the order of the steps below).
        if let [(set, slots)] = *placement {
            if !logged && (slots & ALL_SLOTS & !(slots << 1)).count_ones() == 1 && slots & !ALL_SLOTS == 0 {
                let (first, count) = (slots.trailing_zeros() as usize, slots.count_ones() as usize);
                let len = count * BLOCK;
                if self.run.len() < len + BLOCK {
                    self.run.resize(len + BLOCK, 0);
                }
                let stamped = self.stamped_header(set, slots, writes);
                let header = stamped.encode(g.uid);
                let buf = &mut self.run[..len + BLOCK];
                fetch(writes, &mut buf[..len]);
                buf[len..].copy_from_slice(&header);
                media.write_fenced_pair(g.block_offset(set, first), g.set_offset(set), buf, len)?;
                self.headers[set as usize] = stamped;
                stats.writes += 2;
                stats.fences += 2;
                stats.device_bytes += (len + BLOCK) as u64;
                stats.blocks += count as u64;
                stats.sets += 1;
                return Ok(());
            }
        }
        // 1. The data, into free slots (runs of adjacent slots in one write each); the
        // last run's write carries the fence (`Media::write_buf_fenced`: the same order
        // on the device, one request fewer behind an AM-to-AM call).
        let mut runs_left: u32 =
            placement.iter().map(|&(_, slots)| (slots & ALL_SLOTS & !(slots << 1)).count_ones()).sum();
        let mut next = 0;
        for &(set, slots) in placement {
            let mut slot = 0;
            while slot < BLOCKS_PER_SET {
                if slots & (1 << slot) == 0 {
                    slot += 1;
                    continue;
                }
                let first = slot;
                while slot < BLOCKS_PER_SET && slots & (1 << slot) != 0 {
                    slot += 1;
                }
                let count = slot - first;
                if self.run.len() < count * BLOCK {
                    self.run.resize(count * BLOCK, 0);
                }
                let run = &mut self.run[..count * BLOCK];
                fetch(&writes[next..next + count], run);
                next += count;
                // The device may use the buffer as it goes: it is filled again next time.
                runs_left = runs_left.saturating_sub(1);
                if runs_left == 0 {
                    media.write_buf_fenced(g.block_offset(set, first), run)?;
                    stats.fences += 1;
                } else {
                    media.write_buf(g.block_offset(set, first), run)?;
                }
                stats.writes += 1;
                stats.device_bytes += run.len() as u64;
                stats.blocks += (slot - first) as u64;
            }
        }
        if stats.fences == 0 {
            // No run was written (never: a commit writes at least one block); fence anyway.
            media.fence()?;
            stats.fences += 1;
        }
        // 2. A commit over several blocksets: its log record, sealed, before any header.
        if logged {
            let locations: Vec<Location> = placement
                .iter()
                .map(|&(set, slots)| {
                    let prev = self.headers[set as usize];
                    Location { set, slots, prev_seq: prev.seq, prev_logged: prev.logged, prev_fresh: prev.fresh }
                })
                .collect();
            let units = record_units(locations.len());
            let mut start = self.log_head;
            if start as usize + units > g.log_units as usize {
                start = 0;
            }
            let mut record = Vec::with_capacity(units * BLOCK);
            for (part, chunk) in locations.chunks(LOCATIONS_PER_UNIT).enumerate() {
                let unit =
                    LogUnit { seq: self.next_seq, part: part as u16, parts: units as u16, locations: chunk.to_vec() };
                record.extend_from_slice(&unit.encode(g.uid));
            }
            media.write_buf_fenced(g.log_offset(start), &mut record)?;
            stats.writes += 1;
            stats.fences += 1;
            stats.device_bytes += record.len() as u64;
            stats.log_units = units as u64;
            self.log_head = start + units as u32;
        }
        // 3. The headers: stamped with this commit, superseded slots cleared, new slots set;
        // the last one's write carries the fence.
        let mut next = 0;
        for (i, &(set, slots)) in placement.iter().enumerate() {
            let count = (slots & ALL_SLOTS).count_ones() as usize;
            let mut header = self.stamped_header(set, slots, &writes[next..next + count]);
            header.logged = logged;
            next += count;
            let mut unit = header.encode(g.uid);
            if i + 1 == placement.len() {
                media.write_buf_fenced(g.set_offset(set), &mut unit)?;
                stats.fences += 1;
            } else {
                media.write_buf(g.set_offset(set), &mut unit)?;
            }
            // Written: the in-memory header is the one on the device (a failure poisons
            // the store, which is then opened again from the device).
            self.headers[set as usize] = header;
            stats.writes += 1;
            stats.device_bytes += BLOCK as u64;
            stats.sets += 1;
        }
        Ok(())
    }
}

impl Store {
    /// Blockset `set`'s header for this commit (not logged): stamped with it, superseded
    /// slots cleared, `slots` set to `writes` in order.
    fn stamped_header(&self, set: u32, slots: u64, writes: &[u32]) -> Header {
        let mut header = self.headers[set as usize];
        header.seq = self.next_seq;
        header.logged = false;
        header.fresh = slots;
        for slot in SlotBits(!self.live[set as usize] & ALL_SLOTS) {
            header.fields[slot] = NO_BLOCK;
        }
        for (slot, &block) in SlotBits(slots & ALL_SLOTS).zip(writes) {
            header.fields[slot] = block;
        }
        header
    }
}

/// Finds whether the units of one sequence number form a complete record: parts 0..n,
/// each once, in consecutive log units. Returns the unit after it and its locations.
fn complete_record(units: &[(u32, LogUnit)], log_units: u32) -> Option<(u32, Vec<Location>)> {
    let parts = units.first()?.1.parts;
    if units.len() != usize::from(parts) || units.iter().any(|(_, u)| u.parts != parts) {
        return None;
    }
    let mut sorted: Vec<&(u32, LogUnit)> = units.iter().collect();
    sorted.sort_by_key(|(_, u)| u.part);
    let first = sorted[0].0;
    let mut locations = Vec::new();
    for (i, (index, unit)) in sorted.iter().enumerate() {
        if usize::from(unit.part) != i || *index != first + i as u32 {
            return None;
        }
        locations.extend_from_slice(&unit.locations);
    }
    let end = first + u32::from(parts);
    Some((if end >= log_units { 0 } else { end }, locations))
}
