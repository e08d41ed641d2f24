//! The crash sweep (issue 12): a numbered sequence of versions of a hash-table-like
//! structure spanning many pages is committed; power is cut right after every device
//! write of every commit in turn (dropping all, keeping all, or a random subset of the
//! unfenced units); after each cut the store is restored from what survived and must hold
//! exactly one committed version, never older than the last commit that returned, never a
//! mix. Then corrupted metadata must be reported, never restored.

use nk_am_nvram::ptx::{CommitStats, Corruption, Geometry, Store, StoreError, BLOCK};
use nk_am_nvram::testing::{CrashMedia, CutPolicy};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PAGE: usize = 4096;

/// One step of the workload: what the structure looks like after it.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `n` updates of hash-table buckets (64 bytes each) at random: one 8-byte store and
    /// a value each, scattered over the pages (sparse).
    Buckets(usize),
    /// One 8-byte store on each of `n` random pages (sparse, one block per page).
    Sparse(usize),
    /// `n` whole pages rewritten (dense: a B-tree node split moving whole pages).
    Dense(usize),
}

fn apply(rng: &mut ChaCha8Rng, region: &mut [u8], step: Step) {
    let pages = region.len() / PAGE;
    match step {
        Step::Buckets(n) => {
            for _ in 0..n {
                let bucket = (rng.next_u64() as usize % (region.len() / 64)) * 64;
                let key = rng.next_u64();
                region[bucket..bucket + 8].copy_from_slice(&key.to_le_bytes());
                region[bucket + 8..bucket + 16].copy_from_slice(&key.wrapping_mul(31).to_le_bytes());
            }
        }
        Step::Sparse(n) => {
            for _ in 0..n {
                let page = rng.next_u64() as usize % pages;
                let at = page * PAGE + (rng.next_u64() as usize % (PAGE / 8)) * 8;
                region[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        Step::Dense(n) => {
            let first = rng.next_u64() as usize % pages;
            for p in 0..n {
                let page = (first + p) % pages;
                for word in region[page * PAGE..(page + 1) * PAGE].chunks_exact_mut(8) {
                    word.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
    }
}

/// Diffs `working` against `committed` in 256-byte blocks and commits the changed ones.
fn commit(
    store: &mut Store,
    media: &mut CrashMedia,
    committed: &[u8],
    working: &[u8],
) -> Result<CommitStats, StoreError> {
    let mut writes = Vec::new();
    for (i, (new, old)) in working.chunks_exact(BLOCK).zip(committed.chunks_exact(BLOCK)).enumerate() {
        if new != old {
            writes.push(i as u32);
        }
    }
    let mut fetched = 0;
    let stats = store.commit(media, &writes, &mut |blocks, out| {
        assert_eq!(out.len(), blocks.len() * BLOCK);
        for (&block, out) in blocks.iter().zip(out.chunks_exact_mut(BLOCK)) {
            out.copy_from_slice(&working[block as usize * BLOCK..(block as usize + 1) * BLOCK]);
            fetched += 1;
        }
    });
    if stats.is_ok() {
        assert_eq!(fetched, writes.len(), "each block fetched once");
    }
    stats
}

fn read_region(store: &Store, media: &mut CrashMedia, bytes: usize) -> Vec<u8> {
    let mut region = vec![0u8; bytes];
    store
        .read_committed(media, &mut |block, data| {
            region[block as usize * BLOCK..(block as usize + 1) * BLOCK].copy_from_slice(data)
        })
        .unwrap();
    region
}

struct Scenario {
    name: &'static str,
    bytes: usize,
    seed: u64,
    steps: Vec<Step>,
}

/// The versions a scenario commits (version 0 is the empty region) and their sequence
/// numbers, with the formatted media and each commit's stats.
struct Run {
    versions: Vec<Vec<u8>>,
    seqs: Vec<u64>,
    stats: Vec<CommitStats>,
}

fn geometry(bytes: usize) -> Geometry {
    Geometry::for_region(0, 0x5eed_0000_0000_0001, bytes as u64).unwrap()
}

fn formatted(bytes: usize) -> CrashMedia {
    let g = geometry(bytes);
    let mut media = CrashMedia::new(g.extent_bytes());
    Store::format(&mut media, g).unwrap();
    media
}

fn versions(s: &Scenario) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut region = vec![0u8; s.bytes];
    let mut out = vec![region.clone()];
    for &step in &s.steps {
        apply(&mut rng, &mut region, step);
        out.push(region.clone());
    }
    out
}

/// Runs the scenario on `media` until it ends or the media dies; returns the index of
/// the last version whose commit returned.
fn run(store: &mut Store, media: &mut CrashMedia, versions: &[Vec<u8>], stats: &mut Vec<CommitStats>) -> usize {
    for i in 1..versions.len() {
        match commit(store, media, &versions[i - 1], &versions[i]) {
            Ok(s) => stats.push(s),
            Err(StoreError::Media(_)) => return i - 1,
            Err(e) => panic!("commit {i}: {e:?}"),
        }
    }
    versions.len() - 1
}

fn clean_run(s: &Scenario) -> Run {
    let versions = versions(s);
    let mut media = formatted(s.bytes);
    let (mut store, _) = Store::open(&mut media, geometry(s.bytes)).unwrap();
    let mut stats = Vec::new();
    assert_eq!(run(&mut store, &mut media, &versions, &mut stats), versions.len() - 1);
    let mut seqs = vec![0];
    seqs.extend(stats.iter().map(|s| s.seq));
    let (store, report) = Store::open(&mut media, geometry(s.bytes)).unwrap();
    assert_eq!(report.rolled_back, None);
    assert_eq!(read_region(&store, &mut media, s.bytes), *versions.last().unwrap(), "{}: clean restore", s.name);
    Run { versions, seqs, stats }
}

/// Restores from `image` and returns the index of the version it holds (checked to be
/// `returned` or `returned + 1`) and whether a roll-back happened.
fn check_restore(s: &Scenario, run: &Run, image: Vec<u8>, returned: usize, what: &str) -> (usize, bool) {
    let mut media = CrashMedia::from_image(image);
    let (store, report) = Store::open(&mut media, geometry(s.bytes))
        .unwrap_or_else(|e| panic!("{}: {what}: restore failed: {e:?}", s.name));
    let region = read_region(&store, &mut media, s.bytes);
    let held = [returned, returned + 1]
        .into_iter()
        .find(|&v| v < run.versions.len() && run.versions[v] == region)
        .unwrap_or_else(|| {
            let older = run.versions.iter().position(|v| *v == region);
            panic!(
                "{}: {what}: restored region is no committed version at or after {returned} (matches {older:?})",
                s.name
            )
        });
    assert_eq!(store.seq(), run.seqs[held], "{}: {what}: sequence number of version {held}", s.name);
    (held, report.rolled_back.is_some())
}

/// Sweeps power cuts over every write of the scenario's commits; returns the crash
/// points tried.
fn sweep(s: &Scenario) -> u64 {
    let run_clean = clean_run(s);
    let total_writes: u64 = run_clean.stats.iter().map(|c| c.writes).sum();
    let policies =
        |k: u64| [CutPolicy::DropAll, CutPolicy::KeepAll, CutPolicy::Random(k), CutPolicy::Random(k << 32 | 7)];
    let mut points = 0;
    let (mut newer, mut rollbacks, mut nested) = (0, 0, 0);
    for k in 1..=total_writes {
        for policy in policies(k) {
            let mut media = formatted(s.bytes);
            let (mut store, _) = Store::open(&mut media, geometry(s.bytes)).unwrap();
            media.crash_after(k, policy);
            let returned = run(&mut store, &mut media, &run_clean.versions, &mut Vec::new());
            assert!(media.is_dead());
            let image = media.durable_image();
            let what = format!("cut after write {k} ({policy:?})");
            let (held, rolled_back) = check_restore(s, &run_clean, image.clone(), returned, &what);
            points += 1;
            newer += usize::from(held > returned);
            rollbacks += usize::from(rolled_back);
            if rolled_back {
                // A power cut during the roll-back itself: restore again from what survived.
                for j in 1..=8 {
                    let mut media = CrashMedia::from_image(image.clone());
                    media.crash_after(j, policy);
                    if Store::open(&mut media, geometry(s.bytes)).is_ok() && !media.is_dead() {
                        break;
                    }
                    let again = check_restore(s, &run_clean, media.durable_image(), returned, &what);
                    assert_eq!(again.0, held, "{}: {what}: cut {j} in roll-back changed the version", s.name);
                    nested += 1;
                    points += 1;
                }
            }
            // The store goes on after a crash: one more commit, then restore.
            let mut media = CrashMedia::from_image(image);
            let (mut store, _) = Store::open(&mut media, geometry(s.bytes)).unwrap();
            let before = read_region(&store, &mut media, s.bytes);
            let mut next = before.clone();
            apply(&mut ChaCha8Rng::seed_from_u64(k), &mut next, Step::Dense(2));
            apply(&mut ChaCha8Rng::seed_from_u64(k + 1), &mut next, Step::Sparse(3));
            let stats = commit(&mut store, &mut media, &before, &next).unwrap();
            assert!(stats.seq > run_clean.seqs[held], "{}: {what}: sequence numbers go on increasing", s.name);
            let (store, report) = Store::open(&mut media, geometry(s.bytes)).unwrap();
            assert_eq!(report.rolled_back, None);
            assert_eq!(read_region(&store, &mut media, s.bytes), next, "{}: {what}: commit after recovery", s.name);
        }
    }
    let log_units: u64 = run_clean.stats.iter().map(|c| c.log_units).sum();
    let single = run_clean.stats.iter().filter(|c| c.log_units == 0).count();
    println!(
        "{}: {} commits ({} single-blockset, {} logged; {} log units written into a {}-unit log), {} writes; \
         {} crash points ({} in roll-backs), all recovered ({} held the interrupted commit, {} rolled back)",
        s.name,
        run_clean.stats.len(),
        single,
        run_clean.stats.len() - single,
        log_units,
        geometry(s.bytes).log_units,
        total_writes,
        points,
        nested,
        newer,
        rollbacks
    );
    assert!(single > 0 && single < run_clean.stats.len(), "{}: both kinds of commit", s.name);
    points
}

fn small_scenario() -> Scenario {
    use Step::*;
    Scenario {
        name: "64 KiB region, log wraps",
        bytes: 64 * 1024,
        seed: 1,
        steps: vec![
            Dense(16),
            Sparse(1),
            Buckets(3),
            Dense(4),
            Sparse(12),
            Dense(16),
            Buckets(40),
            Sparse(2),
            Dense(7),
            Dense(16),
            Buckets(1),
            Dense(5),
            Sparse(30),
            Dense(16),
            Dense(9),
            Sparse(20),
            Dense(16),
            Dense(11),
            Buckets(100),
            Dense(16),
        ],
    }
}

#[test]
fn crash_sweep_small_region_with_log_wrap() {
    let s = small_scenario();
    let run = clean_run(&s);
    let log_units: u64 = run.stats.iter().map(|c| c.log_units).sum();
    assert!(log_units > u64::from(geometry(s.bytes).log_units), "the log wraps ({log_units} units written)");
    let points = sweep(&s);
    assert!(points > 0);
}

#[test]
fn crash_sweep_hash_table_region() {
    use Step::*;
    let s = Scenario {
        name: "256 KiB hash table",
        bytes: 256 * 1024,
        seed: 2,
        steps: vec![Buckets(500), Buckets(5), Sparse(64), Buckets(1), Dense(64), Buckets(60), Sparse(1), Dense(3)],
    };
    sweep(&s);
}

/// Every byte of a header, of a log unit (hash bytes included) and of an unused log
/// unit, flipped one at a time, is reported at restore.
#[test]
fn corrupted_metadata_is_reported() {
    let s = small_scenario();
    let run = clean_run(&s);
    assert!(run.stats.last().unwrap().log_units > 0, "the last commit is logged");
    let mut media = formatted(s.bytes);
    let (mut store, _) = Store::open(&mut media, geometry(s.bytes)).unwrap();
    assert_eq!(self::run(&mut store, &mut media, &run.versions, &mut Vec::new()), run.versions.len() - 1);
    let image = media.durable_image();
    let g = geometry(s.bytes);
    let header = |set: u64| (u64::from(g.log_units) + set * 42) * BLOCK as u64;
    let unit = |u: u64| u * BLOCK as u64;
    let mut log_used = Vec::new();
    let mut log_empty = Vec::new();
    for u in 0..u64::from(g.log_units) {
        if image[unit(u) as usize..unit(u + 1) as usize].iter().all(|&b| b == 0) {
            log_empty.push(u);
        } else {
            log_used.push(u);
        }
    }
    assert!(!log_used.is_empty());
    let mut cases = 0;
    let mut check = |offset: u64, expect: &dyn Fn(Corruption) -> bool| {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut media = CrashMedia::from_image(image.clone());
            media.corrupt(offset, mask);
            match Store::open(&mut media, g) {
                Err(StoreError::Corrupt(c)) => assert!(expect(c), "byte {offset:#x} ^ {mask:#x}: reported as {c:?}"),
                Ok(_) => panic!("byte {offset:#x} ^ {mask:#x}: not reported"),
                Err(e) => panic!("byte {offset:#x} ^ {mask:#x}: {e:?}"),
            }
            cases += 1;
        }
    };
    for set in [0, u64::from(g.sets) - 1] {
        for byte in 0..BLOCK as u64 {
            check(header(set) + byte, &|c| matches!(c, Corruption::Header { set: s } if u64::from(s) == set));
        }
    }
    for &u in log_used.iter().chain(log_empty.first()) {
        for byte in 0..BLOCK as u64 {
            check(unit(u) + byte, &|c| matches!(c, Corruption::LogUnit { unit } if u64::from(unit) == u));
        }
    }
    println!("corruption: {cases} flipped metadata bytes, all reported");
}

/// A header made to look like a logged commit newer than any log record (a record lost
/// after it was made durable) is reported.
#[test]
fn lost_log_record_is_reported() {
    let s = small_scenario();
    let run = clean_run(&s);
    let mut media = formatted(s.bytes);
    let (mut store, _) = Store::open(&mut media, geometry(s.bytes)).unwrap();
    self::run(&mut store, &mut media, &run.versions, &mut Vec::new());
    let g = geometry(s.bytes);
    // Zero the whole log: the last commit's headers say "logged" but no record is left.
    let mut image = media.durable_image();
    image[..g.log_units as usize * BLOCK].fill(0);
    let mut media = CrashMedia::from_image(image);
    assert!(matches!(Store::open(&mut media, g), Err(StoreError::Corrupt(Corruption::MissingLogRecord { .. }))));
}

/// Write amplification (device bytes over changed bytes, minus 1) for the write
/// sets: 1, 16 and 256 pages, sparse (one 8-byte store per page) and dense.
#[test]
fn write_amplification() {
    let bytes = 1024 * PAGE;
    let g = geometry(bytes);
    for pages in [1usize, 16, 256] {
        for dense in [false, true] {
            let mut media = CrashMedia::new(g.extent_bytes());
            let mut store = Store::format(&mut media, g).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(pages as u64);
            let mut committed = vec![0u8; bytes];
            // A populated region first, so the commit measured supersedes old versions.
            let mut working = committed.clone();
            apply(&mut rng, &mut working, Step::Dense(1024));
            commit(&mut store, &mut media, &committed, &working).unwrap();
            committed.clone_from(&working);
            for p in 0..pages {
                let page = p * (1024 / pages);
                if dense {
                    for word in working[page * PAGE..(page + 1) * PAGE].chunks_exact_mut(8) {
                        word.copy_from_slice(&rng.next_u64().to_le_bytes());
                    }
                } else {
                    let at = page * PAGE + 8 * (rng.next_u64() as usize % (PAGE / 8));
                    let old = u64::from_le_bytes(working[at..at + 8].try_into().unwrap());
                    working[at..at + 8].copy_from_slice(&(!old).to_le_bytes());
                }
            }
            let stats = commit(&mut store, &mut media, &committed, &working).unwrap();
            let changed = stats.blocks * BLOCK as u64;
            let amplification = stats.device_bytes as f64 / changed as f64 - 1.0;
            println!(
                "write_amplification_{pages}_pages_{}: {:.2}% ({} device bytes for {} changed blocks, {} blocksets, {} log units)",
                if dense { "dense" } else { "sparse" },
                amplification * 100.0,
                stats.device_bytes,
                stats.blocks,
                stats.sets,
                stats.log_units
            );
            if dense && pages >= 16 {
                assert!(amplification < 0.05, "dense commits stay below 5% ({amplification})");
            }
            if pages == 1 && !dense {
                assert!(amplification <= 1.0, "a one-block commit costs at most 100% ({amplification})");
            }
        }
    }
}

/// A commit of every block fits after any history of scattered commits (the bench's
/// sparse-then-dense sequence once ran out of blocksets when a block's new version was
/// kept out of every blockset holding any block of the write set).
#[test]
fn a_full_commit_always_fits() {
    let bytes = 256 * PAGE;
    let g = geometry(bytes);
    let mut media = CrashMedia::new(g.extent_bytes());
    let mut store = Store::format(&mut media, g).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut committed = vec![0u8; bytes];
    for round in 0..40 {
        let mut working = committed.clone();
        let step = match round % 4 {
            0 => Step::Sparse(1 + round),
            1 => Step::Dense(256),
            2 => Step::Buckets(200),
            _ => Step::Dense(round % 97),
        };
        apply(&mut rng, &mut working, step);
        commit(&mut store, &mut media, &committed, &working)
            .unwrap_or_else(|e| panic!("round {round} {step:?}: {e:?}"));
        committed = working;
    }
    let (store, _) = Store::open(&mut media, g).unwrap();
    assert_eq!(read_region(&store, &mut media, bytes), committed);
}
