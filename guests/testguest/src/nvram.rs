//! The NVRAM AM from a guest (issue 12), mode `nvram`: allocates a region, maps it at
//! 1 GiB (its page tables get a page directory for 1-2 GiB), writes, commits and checks
//! that only the changed blocks were written, writes again and restores (abort) and finds
//! the committed data, checks the refusals (a mapping outside the window, commit without
//! the right, a second transaction), and reads the sequence number.

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

use nk_guest::abi::nvram_op::{ALLOCATE, BEGIN, COMMIT, MAP, RESTORE, SEQ, UNMAP};
/// Region rights (am/nvram `rights`).
const MAP_READ: u64 = 1;
const RW: u64 = 3;
/// Where regions map (the hypervisor's window is 1-2 GiB) and how big this one is.
const WINDOW: u64 = 1 << 30;
const REGION: u64 = 64 * 1024;
const PAGE: u64 = 4096;

/// The page directory for guest-virtual 1-2 GiB (identity, 2 MiB pages).
#[repr(C, align(4096))]
struct PageDirectory([u64; 512]);
static mut WINDOW_PD: PageDirectory = PageDirectory([0; 512]);

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Runs mode `nvram`, `nvramseq COUNT` or `nvrambench` (`cargo xtask bench nvram`).
pub fn run<'a>(mode: &str, mut words: impl Iterator<Item = &'a str>) {
    match mode {
        "nvramseq" => {
            let count = words.next().and_then(|w| w.parse().ok()).unwrap_or(8);
            let shape = if words.next() == Some("small") { Shape::SMALL } else { Shape::WIDE };
            report("nvram_sequence", sequence(count, shape));
        }
        "nvrambench" => {
            if let Err(Why(line)) = bench() {
                println!("GBENCH error: {}", line.as_str());
            }
        }
        _ => report("nvram_commit_restore", commit_restore()),
    }
}

/// `cargo xtask bench nvram`: commit cost against write-set size (1, 16 and 256 dirty pages
/// of a 1 MiB region, sparse: one 8-byte store per page, dense: whole pages), with the
/// blocks and device bytes each commit wrote; the naive commit (every block of the whole
/// region written through the device, `commit` with `whole` = 1, after one store); and the start-up restore of the 1 MiB region
/// (unload, then allocate again) and of a 16 MiB one committed whole (needs a durable
/// device of about 36 MiB: xtask gives the bench a 40 MiB NVRAM disk). Minimum of 5 guest-side RDTSC deltas (emulated
/// instructions in Bochs), RDTSC overhead subtracted.
fn bench() -> CheckResult {
    const PAGES: u64 = 256;
    const BENCH_REGION: u64 = PAGES * PAGE;
    let (factory, am) = factory()?;
    let region = nk::call(am, ALLOCATE, &[factory], &[BENCH_REGION, 2]);
    ensure!(region.status().is_ok(), "allocate: {}", region.status());
    let mut cap = region.name;
    ensure!(nk::call(am, MAP, &[cap], &[WINDOW, RW]).status().is_ok(), "map");
    map_window();
    let overhead = min_of_5(|| {
        let start = nk::rdtsc();
        Ok(nk::rdtsc() - start)
    })?;
    // Every page written once, so the commits measured supersede committed blocks.
    for word in 0..BENCH_REGION / 8 {
        poke(WINDOW + word * 8, word);
    }
    ensure!(nk::call(am, COMMIT, &[cap], &[]).status().is_ok(), "first commit");
    let mut round = 1u64;
    for pages in [1u64, 16, 256] {
        for dense in [false, true] {
            let mut written = [0u64; 2];
            let ticks = min_of_5(|| {
                round += 1;
                for p in 0..pages {
                    let page = WINDOW + p * (PAGES / pages) * PAGE;
                    if dense {
                        for word in 0..PAGE / 8 {
                            poke(page + word * 8, round << 32 | word);
                        }
                    } else {
                        poke(page + 8 * (round % (PAGE / 8)), round << 40 | 0xA5A5);
                    }
                }
                let start = nk::rdtsc();
                let commit = nk::call(am, COMMIT, &[cap], &[]);
                let ticks = nk::rdtsc() - start;
                ensure!(commit.status().is_ok(), "commit: {}", commit.status());
                written = [commit.results[1], commit.results[2]];
                Ok(ticks)
            })?;
            let kind = if dense { "dense" } else { "sparse" };
            println!("GBENCH commit_{pages}_pages_{kind}_instructions {}", ticks.saturating_sub(overhead));
            println!("GBENCH commit_{pages}_pages_{kind}_changed_bytes {}", written[0] * 256);
            println!("GBENCH commit_{pages}_pages_{kind}_device_bytes {}", written[1]);
        }
    }
    // The naive commit: the whole region copied to the device (every block, changed or
    // not: `commit` with `whole` = 1), after one 8-byte store, as a system without write
    // sets would.
    let mut naive_bytes = 0;
    let naive = min_of_5(|| {
        round += 1;
        poke(WINDOW + 8 * (round % (PAGE / 8)), round << 40 | 0x5A5A);
        let start = nk::rdtsc();
        let commit = nk::call(am, COMMIT, &[cap], &[1]);
        let ticks = nk::rdtsc() - start;
        ensure!(commit.status().is_ok(), "whole commit: {}", commit.status());
        ensure!(commit.results[1] == BENCH_REGION / 256, "whole commit wrote {} blocks", commit.results[1]);
        naive_bytes = commit.results[2];
        Ok(ticks)
    })?;
    println!("GBENCH naive_commit_{PAGES}_pages_instructions {}", naive.saturating_sub(overhead));
    println!("GBENCH naive_commit_{PAGES}_pages_device_bytes {naive_bytes}");
    let restore = min_of_5(|| {
        ensure!(nk::delete(cap).is_ok(), "delete");
        let start = nk::rdtsc();
        let again = nk::call(am, ALLOCATE, &[factory], &[BENCH_REGION, 2]);
        let ticks = nk::rdtsc() - start;
        ensure!(again.status().is_ok() && again.results[2] == 0, "restore: {} {:?}", again.status(), again.results);
        cap = again.name;
        Ok(ticks)
    })?;
    println!("GBENCH restore_1_mib_instructions {}", restore.saturating_sub(overhead));
    // The largest region (16 MiB), every word written and committed once, then restored
    // (the 1 MiB one unloaded first: a VM loads at most 32 MiB, twice its regions).
    ensure!(nk::delete(cap).is_ok(), "delete");
    const BIG: u64 = 16 << 20;
    let big = nk::call(am, ALLOCATE, &[factory], &[BIG, 5]);
    ensure!(big.status().is_ok(), "allocate 16 MiB: {}", big.status());
    let mut cap = big.name;
    ensure!(nk::call(am, MAP, &[cap], &[WINDOW, RW]).status().is_ok(), "map 16 MiB");
    for word in 0..BIG / 8 {
        poke(WINDOW + word * 8, word ^ 0x5A5A);
    }
    let commit = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(commit.status().is_ok(), "commit 16 MiB: {}", commit.status());
    let restore = min_of_5(|| {
        ensure!(nk::delete(cap).is_ok(), "delete");
        let start = nk::rdtsc();
        let again = nk::call(am, ALLOCATE, &[factory], &[BIG, 5]);
        let ticks = nk::rdtsc() - start;
        ensure!(
            again.status().is_ok() && again.results[2] == 0,
            "restore 16 MiB: {} {:?}",
            again.status(),
            again.results
        );
        cap = again.name;
        Ok(ticks)
    })?;
    println!("GBENCH restore_16_mib_instructions {}", restore.saturating_sub(overhead));
    println!("GBENCH done");
    Ok(())
}

/// The region `nvramseq` commits versions of: 64 pages, a hash table of 64-byte buckets
/// with a version word at its start.
const SEQ_REGION: u64 = 64 * PAGE;
const SEQ_WORDS: usize = (SEQ_REGION / 8) as usize;
/// Version `v` of the structure, rebuilt from zeros to check what a restore gave.
#[repr(C, align(4096))]
struct Scratch([u64; SEQ_WORDS]);
static mut SCRATCH: Scratch = Scratch([0; SEQ_WORDS]);

/// The structure `nvramseq` commits versions of: its size and region key.
#[derive(Clone, Copy)]
struct Shape {
    pages: u64,
    key: u64,
}

impl Shape {
    /// 64 pages (region 3): sparse commits of 24 buckets, every fourth version 8 whole
    /// pages (several blocksets, a log record).
    const WIDE: Shape = Shape { pages: 64, key: 3 };
    /// `nvramseq COUNT small`: 4 pages (region 4), whose store has 6 blocksets and a log of
    /// 4 units, so every fifth logged commit wraps the log: odd versions rewrite 42
    /// consecutive 256-byte blocks (two blocksets, a one-unit log record), even ones 8
    /// buckets (one blockset). Few device writes per commit: a crash sweep can try each.
    const SMALL: Shape = Shape { pages: 4, key: 4 };

    fn words(self) -> usize {
        (self.pages * PAGE / 8) as usize
    }
}

/// Applies version `v`'s updates to `words` (word 0 holds the version), as `shape` says.
fn apply_version(v: u64, shape: Shape, write: &mut dyn FnMut(usize, u64)) {
    let mut x = v.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = shape.words();
    if shape.pages != Shape::WIDE.pages {
        if v % 2 == 1 {
            const BLOCK_WORDS: usize = 32;
            let blocks = words / BLOCK_WORDS;
            let first = (next() % (blocks - 42) as u64) as usize;
            for word in first * BLOCK_WORDS..(first + 42) * BLOCK_WORDS {
                write(word, next());
            }
        } else {
            for _ in 0..8 {
                let bucket = (next() as usize % (words / 8)) * 8;
                let key = next();
                write(bucket.max(8), key);
                write(bucket.max(8) + 1, key ^ v);
            }
        }
    } else if v % 4 == 3 {
        let first = (next() % 56) as usize;
        for word in first * 512..(first + 8) * 512 {
            write(word, next());
        }
    } else {
        for _ in 0..24 {
            let bucket = (next() as usize % (SEQ_WORDS / 8)) * 8;
            let key = next();
            write(bucket.max(8), key);
            write(bucket + 1, key ^ v);
        }
    }
    write(0, v);
}

/// `nvramseq COUNT [small]`: allocates (or restores) region 3 of 256 KiB (`small`: region
/// 4 of 16 KiB, [`Shape::SMALL`]), checks that it holds
/// exactly one committed version of the structure, whole (`nvram: restored version V
/// (seq S), intact`), commits COUNT more versions (`nvram: committed version V seq S`
/// after each commit returned), then unloads the region, allocates it again and checks
/// the last version is what is restored. After a power cut at any device write, a
/// reboot on the same durable device must print a version at least the last one whose
/// commit returned, and at most one more.
fn sequence(count: u64, shape: Shape) -> CheckResult {
    let (factory, am) = factory()?;
    let open = || -> Result<(Cap, u64), Why> {
        let region = nk::call(am, ALLOCATE, &[factory], &[shape.pages * PAGE, shape.key]);
        ensure!(region.status().is_ok(), "allocate: {}", region.status());
        ensure!(nk::call(am, MAP, &[region.name], &[WINDOW, RW]).status().is_ok(), "map");
        Ok((region.name, region.results[1]))
    };
    let (mut cap, seq) = open()?;
    map_window();
    let restored = check_version(seq, shape)?;
    let mut version = restored;
    for _ in 0..count {
        version += 1;
        apply_version(version, shape, &mut |word, value| poke(WINDOW + 8 * word as u64, value));
        let commit = nk::call(am, COMMIT, &[cap], &[]);
        ensure!(commit.status().is_ok(), "commit version {version}: {}", commit.status());
        println!("nvram: committed version {version} seq {}", commit.results[0]);
    }
    ensure!(nk::delete(cap).is_ok(), "delete");
    let (again, seq) = open()?;
    cap = again;
    let last = check_version(seq, shape)?;
    ensure!(last == version, "restored version {last}, committed {version}");
    let _ = cap;
    Ok(())
}

/// Checks that the mapped region holds version V (its word 0) exactly, and returns V.
fn check_version(seq: u64, shape: Shape) -> Result<u64, Why> {
    let v = peek(WINDOW);
    ensure!(v <= 1 << 20, "word 0 holds no version ({v:#x}): torn or wrong (seq {seq})");
    // SAFETY: SCRATCH is used only by this guest's one vCPU, here.
    let scratch = &mut unsafe { &mut (*core::ptr::addr_of_mut!(SCRATCH)).0 }[..shape.words()];
    scratch.fill(0);
    for u in 1..=v {
        apply_version(u, shape, &mut |word, value| scratch[word] = value);
    }
    for (word, &expected) in scratch.iter().enumerate() {
        let found = peek(WINDOW + 8 * word as u64);
        ensure!(found == expected, "version {v} (seq {seq}) torn at word {word}: {found:#x}, expected {expected:#x}");
    }
    println!("nvram: restored version {v} (seq {seq}), intact");
    Ok(v)
}

fn min_of_5(mut f: impl FnMut() -> Result<u64, Why>) -> Result<u64, Why> {
    let mut best = u64::MAX;
    for _ in 0..5 {
        best = best.min(f()?);
    }
    Ok(best)
}

/// Identity-maps guest-virtual 1-2 GiB with 2 MiB pages: a page directory in this image
/// (identity-mapped, so its address is its guest-physical one) in the PDPT's second slot.
pub(crate) fn map_window() {
    /// The hypervisor's layout for bare-metal guests: PML4 at 0x1000, PDPT at 0x2000.
    const PDPT: u64 = 0x2000;
    // SAFETY: the PD is this guest's own static, used only here; the PDPT lies in the
    // guest's page tables (identity-mapped, writable, ring 0); reloading CR3 flushes the
    // TLB so the new entry is seen.
    unsafe {
        let pd = core::ptr::addr_of_mut!(WINDOW_PD);
        for i in 0..512u64 {
            core::ptr::write_volatile(&mut (*pd).0[i as usize], (WINDOW + (i << 21)) | 0x87);
        }
        core::ptr::write_volatile((PDPT + 8) as *mut u64, (pd as u64) | 0x7);
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _);
    }
}

pub(crate) fn peek(gpa: u64) -> u64 {
    // SAFETY: `gpa` lies in the region mapped at the window (identity-mapped above).
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

pub(crate) fn poke(gpa: u64, value: u64) {
    // SAFETY: as for `peek`; the region is mapped writable.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

/// The NVRAM factory: the last initial capability (the NVRAM AM registers last).
pub(crate) fn factory() -> Result<(Cap, u16), Why> {
    let mut last = None;
    for index in 0..32 {
        match nk::initial(index) {
            Ok(found) => last = Some(found),
            Err(_) => break,
        }
    }
    last.ok_or_else(|| why(format_args!("no initial capabilities")))
}

fn commit_restore() -> CheckResult {
    let (factory, am) = factory()?;
    let region = nk::call(am, ALLOCATE, &[factory], &[REGION, 1]);
    ensure!(region.status().is_ok(), "allocate: {}", region.status());
    ensure!(region.results[..3] == [REGION, 0, 1], "allocate results {:?}", region.results);
    let cap = region.name;
    let below = nk::call(am, MAP, &[cap], &[0x2000_0000, RW]).status();
    ensure!(below.code() == Status::BAD_ARGUMENT, "map below the window: {below}");
    let mapped = nk::call(am, MAP, &[cap], &[WINDOW, RW]).status();
    ensure!(mapped.is_ok(), "map: {mapped}");
    map_window();
    ensure!(nk::call(am, BEGIN, &[cap], &[]).status().is_ok(), "begin");
    let again = nk::call(am, BEGIN, &[cap], &[]).status();
    ensure!(again.code() == Status::NOT_PERMITTED, "second begin: {again}");
    // One 8-byte store on page 0, a whole page 3.
    poke(WINDOW + 8, 0x1111);
    for word in 0..PAGE / 8 {
        poke(WINDOW + 3 * PAGE + word * 8, word | 0x3333 << 32);
    }
    let commit = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(commit.status().is_ok(), "commit: {}", commit.status());
    ensure!(
        commit.results[0] == 1 && commit.results[1] == 17,
        "commit results {:?} (seq 1, 17 blocks)",
        commit.results
    );
    println!(
        "nvram: commit 1 wrote {} blocks, {} device bytes, for {} dirty pages",
        commit.results[1], commit.results[2], commit.results[3]
    );
    // An aborted transaction: restore puts the committed data back.
    ensure!(nk::call(am, BEGIN, &[cap], &[]).status().is_ok(), "begin 2");
    poke(WINDOW + 8, 0x2222);
    poke(WINDOW + 5 * PAGE, 0x5555);
    let restore = nk::call(am, RESTORE, &[cap], &[]);
    ensure!(restore.status().is_ok() && restore.results[0] == 1, "restore: {} {:?}", restore.status(), restore.results);
    ensure!(peek(WINDOW + 8) == 0x1111, "after restore page 0 holds {:#x}", peek(WINDOW + 8));
    ensure!(peek(WINDOW + 5 * PAGE) == 0, "after restore page 5 holds {:#x}", peek(WINDOW + 5 * PAGE));
    ensure!(peek(WINDOW + 3 * PAGE + 8) == 1 | 0x3333 << 32, "page 3 kept");
    // Nothing changed: nothing written.
    let empty = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(empty.status().is_ok() && empty.results[1] == 0, "empty commit {:?}", empty.results);
    // A capability without the commit right is refused before the AM runs.
    let read_only = nk::derive(cap, MAP_READ).map_err(|s| why(format_args!("derive: {s}")))?;
    let refused = nk::call(am, COMMIT, &[read_only], &[]).status();
    ensure!(refused.code() == Status::MISSING_RIGHTS, "commit without the right: {refused}");
    let seq = nk::call(am, SEQ, &[read_only], &[]);
    ensure!(seq.status().is_ok() && seq.results[..3] == [1, REGION, 0], "seq {:?}", seq.results);
    ensure!(nk::call(am, UNMAP, &[cap], &[WINDOW]).status().is_ok(), "unmap");
    Ok(())
}
