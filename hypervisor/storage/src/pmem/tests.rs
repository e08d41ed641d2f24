//! Host tests of [`PmemMedia`] over simulated persistent memory that loses what was not
//! written back and fenced: at a power cut each 8-byte word of a line stored but not yet
//! fenced is kept or lost at random (x86's power-fail atomicity is an aligned 8-byte
//! store, not a line or a unit).

use std::collections::BTreeSet;

use super::*;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Persistent memory with a cache: `current` is what loads see, `durable` what survives.
#[derive(Debug)]
struct SimPmem {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Lines stored since their last write-back.
    dirty: BTreeSet<u64>,
    /// Lines written back, not yet fenced.
    pending: BTreeSet<u64>,
    /// Operations (store, write-back, SFENCE) so far.
    events: u64,
    /// The operation after which the power is cut, and the seed that picks surviving words.
    cut: Option<(u64, u64)>,
    /// What survived the cut.
    crashed: Option<Vec<u8>>,
    /// Write-backs of lines never stored since the last fence (wasted work).
    flushes: u64,
}

impl SimPmem {
    fn new(image: Vec<u8>) -> Self {
        SimPmem {
            current: image.clone(),
            durable: image,
            dirty: BTreeSet::new(),
            pending: BTreeSet::new(),
            events: 0,
            cut: None,
            crashed: None,
            flushes: 0,
        }
    }

    /// Counts one operation; at the cut, computes the surviving image. Returns false once
    /// the power is off.
    fn tick(&mut self) -> bool {
        if self.crashed.is_some() {
            return false;
        }
        self.events += 1;
        if let Some((at, seed)) = self.cut {
            if self.events > at {
                let mut rng = Rng(seed | 1);
                let mut image = self.durable.clone();
                for &line in self.dirty.union(&self.pending) {
                    for word in (line..line + CACHE_LINE).step_by(8) {
                        if rng.next() & 1 == 1 {
                            let w = word as usize;
                            image[w..w + 8].copy_from_slice(&self.current[w..w + 8]);
                        }
                    }
                }
                self.crashed = Some(image);
                return false;
            }
        }
        true
    }
}

impl PersistentMemory for SimPmem {
    fn len(&self) -> u64 {
        self.current.len() as u64
    }

    fn load(&self, offset: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.current[offset as usize..offset as usize + buf.len()]);
    }

    fn store(&mut self, offset: u64, data: &[u8]) {
        if !self.tick() {
            return;
        }
        self.current[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let first = offset / CACHE_LINE * CACHE_LINE;
        for line in (first..offset + data.len() as u64).step_by(CACHE_LINE as usize) {
            self.dirty.insert(line);
        }
    }

    fn write_back(&mut self, offset: u64, len: u64) {
        if !self.tick() {
            return;
        }
        let first = offset / CACHE_LINE * CACHE_LINE;
        for line in (first..offset + len).step_by(CACHE_LINE as usize) {
            if self.dirty.remove(&line) {
                self.pending.insert(line);
            } else {
                self.flushes += 1;
            }
        }
    }

    fn sfence(&mut self) {
        if !self.tick() {
            return;
        }
        for line in std::mem::take(&mut self.pending) {
            let l = line as usize;
            self.durable[l..l + CACHE_LINE as usize].copy_from_slice(&self.current[l..l + CACHE_LINE as usize]);
        }
    }
}

const DATA_UNITS: u64 = 256;
const RANGE: u64 = JOURNAL_BYTES + DATA_UNITS * MEDIA_UNIT;

fn fresh() -> PmemMedia<SimPmem> {
    PmemMedia::mount(SimPmem::new(vec![0xA5; RANGE as usize]), "sim".into()).unwrap()
}

fn unit_value(rng: &mut Rng) -> [u8; UNIT] {
    let mut unit = [0u8; UNIT];
    for w in unit.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    unit
}

/// One write of the workload: where, what, and when it started.
struct Write {
    first_unit: u64,
    units: Vec<[u8; UNIT]>,
    started: u64,
}

/// Runs the unit workload (single-unit, multi-unit and chunked writes, a fence every
/// third) on `media`; returns the writes and the event count at each fence's end.
fn workload(media: &mut PmemMedia<SimPmem>) -> (Vec<Write>, Vec<u64>) {
    let mut rng = Rng(0x1234_5678);
    let mut writes = Vec::new();
    let mut fences = Vec::new();
    for op in 0..30 {
        let n = match op % 7 {
            3 => 60, // more than one journal's worth: two chunks
            5 => 5,
            _ => 1 + rng.next() % 2,
        };
        let first_unit = rng.next() % (DATA_UNITS - n + 1);
        let units: Vec<_> = (0..n).map(|_| unit_value(&mut rng)).collect();
        let started = media.memory().events;
        let data: Vec<u8> = units.iter().flatten().copied().collect();
        media.write(first_unit * MEDIA_UNIT, &data).unwrap();
        writes.push(Write { first_unit, units, started });
        if op % 3 == 2 {
            media.fence().unwrap();
            fences.push(media.memory().events);
        }
    }
    (writes, fences)
}

#[test]
fn every_unit_is_old_or_new_after_a_cut_at_any_store_write_back_or_fence() {
    let mut reference = fresh();
    let start = reference.memory().events;
    let (writes, fences) = workload(&mut reference);
    let end = reference.memory().events;
    assert!(end - start > 300, "the workload is long enough to matter: {}", end - start);
    let mut points = 0;
    for cut in start..end {
        for seed in [1u64, 2, 3, 0xdead_beef] {
            let mut media = fresh();
            media.pm.cut = Some((cut, seed));
            let _ = workload(&mut media);
            let image = media.memory().crashed.clone().expect("the cut happened");
            let restored = PmemMedia::mount(SimPmem::new(image), "sim".into()).unwrap();
            assert!(matches!(restored.mounted(), Mounted::Clean | Mounted::Replayed { .. }));
            // The last fence that completed before the cut.
            let fenced = fences.iter().copied().filter(|&f| f <= cut).max().unwrap_or(0);
            for unit in 0..DATA_UNITS {
                let mut allowed: Vec<[u8; UNIT]> = Vec::new();
                let mut durable = [0u8; UNIT];
                for w in &writes {
                    if !(w.first_unit..w.first_unit + w.units.len() as u64).contains(&unit) {
                        continue;
                    }
                    let value = w.units[(unit - w.first_unit) as usize];
                    if w.started < fenced {
                        durable = value;
                    } else if w.started <= cut {
                        allowed.push(value);
                    }
                }
                allowed.push(durable);
                let mut got = [0u8; UNIT];
                restored.pm.load(JOURNAL_BYTES + unit * MEDIA_UNIT, &mut got);
                assert!(allowed.contains(&got), "cut after event {cut} (seed {seed}): unit {unit} is torn or too old");
            }
            points += 1;
        }
    }
    assert!(points > 1000);
}

#[test]
fn without_the_journal_a_cut_tears_units() {
    // The same simulated memory written in place only (no journal): some cut leaves a
    // unit that is neither old nor new, which is why PmemMedia journals.
    let mut torn = false;
    for cut in 0..8 {
        let mut pm = SimPmem::new(vec![0; 4096]);
        pm.cut = Some((cut, 7));
        let old = [0u8; UNIT];
        let new = [0xFFu8; UNIT];
        pm.store(0, &new);
        pm.write_back(0, UNIT as u64);
        pm.sfence();
        let image = pm.crashed.clone().unwrap_or(pm.durable.clone());
        let got = &image[..UNIT];
        torn |= got != old && got != new;
    }
    assert!(torn);
}

#[test]
fn a_write_is_durable_once_fence_returns_and_each_write_is_written_back() {
    let mut media = fresh();
    let unit = [0x5Au8; UNIT];
    media.write(3 * MEDIA_UNIT, &unit).unwrap();
    media.fence().unwrap();
    let durable = media.memory().durable.clone();
    let at = (JOURNAL_BYTES + 3 * MEDIA_UNIT) as usize;
    assert_eq!(&durable[at..at + UNIT], &unit[..]);
    assert!(media.memory().dirty.is_empty() && media.memory().pending.is_empty());
    let stats = media.stats();
    assert_eq!(
        (stats.writes, stats.units, stats.fences, stats.sfences),
        (1, 1, 1, 2 + 2 + 1),
        "format 2, the write 2, the fence 1"
    );
}

#[test]
fn mount_formats_an_unlabelled_range_and_keeps_a_labelled_one() {
    let mut media = fresh();
    assert_eq!(media.mounted(), Mounted::Formatted);
    let mut buf = [0xFFu8; UNIT];
    media.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0u8; UNIT], "formatting zeroes the data");
    media.write(0, &[7u8; UNIT]).unwrap();
    media.fence().unwrap();
    let mut media = media.remount().unwrap();
    assert!(matches!(media.mounted(), Mounted::Replayed { units: 1 }));
    media.read(0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; UNIT]);
    // A cut in the middle of formatting leaves no label: the next mount formats again.
    let mut pm = SimPmem::new(vec![0x11; RANGE as usize]);
    pm.cut = Some((10, 1));
    let cut = PmemMedia::mount(pm, "sim".into()).unwrap();
    let image = cut.memory().crashed.clone().unwrap();
    let again = PmemMedia::mount(SimPmem::new(image), "sim".into()).unwrap();
    assert_eq!(again.mounted(), Mounted::Formatted);
}

#[test]
fn bad_requests_and_ranges_are_refused() {
    let mut media = fresh();
    assert_eq!(media.size(), DATA_UNITS * MEDIA_UNIT);
    assert_eq!(media.write(1, &[0; UNIT]), Err(MediaError::Misaligned));
    assert_eq!(media.write(0, &[0; 10]), Err(MediaError::Misaligned));
    assert_eq!(media.write(DATA_UNITS * MEDIA_UNIT, &[0; UNIT]), Err(MediaError::OutOfRange));
    assert_eq!(media.read(u64::MAX - 255, &mut [0; UNIT]), Err(MediaError::OutOfRange));
    assert_eq!(
        PmemMedia::mount(SimPmem::new(vec![0; (MIN_RANGE_BYTES - 4096) as usize]), String::new()).unwrap_err(),
        PmemError::TooSmall
    );
    // A label for another size (the range shrank) is refused, not reformatted.
    let big = PmemMedia::mount(SimPmem::new(vec![0; (RANGE + 8192) as usize]), String::new()).unwrap();
    let mut image = big.memory().durable.clone();
    image.truncate(RANGE as usize);
    assert!(matches!(PmemMedia::mount(SimPmem::new(image), String::new()), Err(PmemError::SizeMismatch { .. })));
}

#[test]
fn the_flush_instruction_is_the_best_the_cpu_offers() {
    assert_eq!(FlushKind::choose(CPUID1_EDX_CLFSH, CPUID7_EBX_CLWB | CPUID7_EBX_CLFLUSHOPT), Some(FlushKind::Clwb));
    assert_eq!(FlushKind::choose(CPUID1_EDX_CLFSH, CPUID7_EBX_CLFLUSHOPT), Some(FlushKind::Clflushopt));
    assert_eq!(FlushKind::choose(CPUID1_EDX_CLFSH, 0), Some(FlushKind::Clflush));
    assert_eq!(FlushKind::choose(0, 0), None);
    // Bits beside them do not count.
    assert_eq!(FlushKind::choose(!CPUID1_EDX_CLFSH, !(CPUID7_EBX_CLWB | CPUID7_EBX_CLFLUSHOPT)), None);
    assert_eq!(FlushKind::Clwb.mnemonic(), "CLWB");
}

/// The NVRAM AM's PTx store on persistent memory: versions of a 16 KiB region are
/// committed (single-blockset and logged multi-blockset commits); the power is cut after
/// every store, write-back and SFENCE of the last commit, losing unfenced words at random;
/// the store restored from what survived holds exactly the previous or the last version.
#[test]
fn ptx_commits_on_pmem_survive_a_cut_anywhere() {
    use nk_am_nvram::directory::Directory;
    use nk_am_nvram::ptx::{Store, BLOCK};

    const BYTES: usize = 16 * 1024;
    // Version v rewrites a few blocks (sparse) and, every other version, 48 blocks (more
    // than one blockset: a logged commit).
    let mut versions = vec![vec![0u8; BYTES]];
    {
        let mut rng = Rng(42);
        for v in 1..=4u64 {
            let mut region = versions[(v - 1) as usize].clone();
            let dense = if v % 2 == 0 { 48 } else { 3 };
            for _ in 0..dense {
                let block = (rng.next() as usize) % (BYTES / BLOCK);
                for w in region[block * BLOCK..(block + 1) * BLOCK].chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            versions.push(region);
        }
    }
    let commit = |store: &mut Store, media: &mut PmemMedia<SimPmem>, old: &[u8], new: &[u8]| {
        let writes: Vec<u32> = (0..BYTES / BLOCK)
            .filter(|&b| old[b * BLOCK..(b + 1) * BLOCK] != new[b * BLOCK..(b + 1) * BLOCK])
            .map(|b| b as u32)
            .collect();
        store
            .commit(media, &writes, &mut |blocks, out| {
                for (&block, out) in blocks.iter().zip(out.chunks_exact_mut(BLOCK)) {
                    out.copy_from_slice(&new[block as usize * BLOCK..(block as usize + 1) * BLOCK])
                }
            })
            .unwrap();
    };
    let run = |cut: Option<(u64, u64)>| -> (PmemMedia<SimPmem>, u64, u64) {
        let mut media =
            PmemMedia::mount(SimPmem::new(vec![0; (JOURNAL_BYTES + 256 * 1024) as usize]), "sim".into()).unwrap();
        let mut directory = Directory::mount(&mut media).unwrap();
        let (_, mut store) = directory.create(&mut media, 1, 1, BYTES as u64).unwrap();
        for v in 1..=3 {
            commit(&mut store, &mut media, &versions[v - 1], &versions[v]);
        }
        let before = media.memory().events;
        media.pm.cut = cut.map(|(k, seed)| (before + k, seed));
        commit(&mut store, &mut media, &versions[3], &versions[4]);
        let after = media.memory().events;
        (media, before, after)
    };
    let (_, before, after) = run(None);
    let span = after - before;
    assert!(span > 50, "the last commit takes {span} operations");
    let mut recovered = [0u32; 2];
    for k in 0..span {
        for seed in [1u64, 5] {
            let (media, _, _) = run(Some((k, seed)));
            let image = media.memory().crashed.clone().expect("cut inside the commit");
            let mut media = PmemMedia::mount(SimPmem::new(image), "sim".into()).unwrap();
            let directory = Directory::mount(&mut media).unwrap();
            let entry = directory.find(1, 1).expect("the region's entry survived");
            let (store, _) = Store::open(&mut media, entry.geometry).unwrap_or_else(|e| panic!("cut at {k}: {e:?}"));
            let mut region = vec![0u8; BYTES];
            store
                .read_committed(&mut media, &mut |block, data| {
                    region[block as usize * BLOCK..(block as usize + 1) * BLOCK].copy_from_slice(data)
                })
                .unwrap();
            if region == versions[3] {
                recovered[0] += 1;
            } else if region == versions[4] {
                recovered[1] += 1;
            } else {
                panic!("cut at operation {k} of the last commit (seed {seed}): the region is neither version 3 nor 4");
            }
        }
    }
    assert!(recovered[0] > 0 && recovered[1] > 0, "cuts landed before and after the commit point: {recovered:?}");
}
