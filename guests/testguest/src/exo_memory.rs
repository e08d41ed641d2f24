//! The exo AM's memory from a guest (issue 10): frame sets, mappings, and what happens to a
//! guest that touches a mapping that is gone.
//!
//! * `exomem`: allocates frames and maps them above its memory, writes and reads them,
//!   checks every refusal (more rights than held, over a mapping, below its memory or past
//!   the 1 GiB limit, past its frame quota) changes nothing, protects, remaps the same
//!   frames elsewhere and finds its data, then maps, unmaps, frees and deletes in a loop
//!   and finds its whole quota free again. Then it checks the dirty bitmap (EPT A/D) is
//!   exact: the pages it wrote, then none, also across time slices; and the same through
//!   Page-Modification Logging, across a PML-full exit. Last, it unmaps a page and reads it: the
//!   hypervisor must stop it (an EPT violation), so it never prints `GTEST FAILED
//!   exomem_unmapped_access`.
//! * `exolend BORROWER..`: allocates a page, writes a pattern, derives a capability to
//!   share and delegates it to each BORROWER (VM ids), waits until each borrower has
//!   written its answer into the page (at 8 * its VM id), then revokes the shared
//!   capability: one revoke that must reach every borrower, on any CPU, before it returns.
//!   `exolend initial BORROWER..` shares a page of its own initial memory instead (split
//!   off the initial frame set it holds). `exolend free BORROWER..` frees the set instead, which unmaps it from every borrower
//!   from the lender's CPU (a cross-CPU shootdown).
//! * `exoborrow`: maps what it received, checks the lender's pattern, writes its answer,
//!   then reads the page in a loop: once the lender revokes, its next read must stop it.

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

use nk_guest::abi::exo_op::{ALLOC, DIRTY, FREE, MAP, PML_DRAIN, PML_ENABLE, PROTECT, SPLIT, UNMAP};
/// The exo AM operations that take two capabilities (the hypercall fuzzer's model).
pub(crate) const TWO_CAPABILITY_OPS: [u32; 3] = [MAP, DIRTY, PML_DRAIN];
/// `frame_access` bits.
const READ: u64 = 1;
const RW: u64 = 3;
/// Where the guests map exo frames (identity-mapped by their page tables).
const WINDOW: u64 = 0x2000_0000;
const PAGE: u64 = 0x1000;
/// The hypervisor's per-VM frame quota and mapping limit (hypervisor/src/main.rs).
const QUOTA: u64 = 4 << 20;
const GPA_LIMIT: u64 = 1 << 30;
/// What the lender writes and the borrower answers.
const LENT: u64 = 0x1e17_0000_0000_0001;
const ANSWER: u64 = 0xb0_0000_0000_0002;
/// How long the lender's last revoke took (TSC ticks: emulated instructions in Bochs).
static REVOKE_TICKS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// What the lender writes into the signal page once its revoke (or free) returned.
const REVOKED: u64 = 0xdead;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Runs mode `mode`.
pub fn run<'a>(mode: &str, words: impl Iterator<Item = &'a str>, memory: u64, vm: u64) {
    match mode {
        "exomem" => {
            // The dirty checks first, while the survivor still shares the CPU.
            report("exomem_dirty_ad", dirty_exact());
            report("exomem_dirty_pml", dirty_pml());
            report("exomem_map_refusals_loop", exomem(memory));
            report("exomem_unmapped_access", unmapped_access());
        }
        "exolend" => {
            let mut borrowers = [0u32; 8];
            let mut count = 0;
            let mut words = words.peekable();
            let free = words.next_if_eq(&"free").is_some();
            let timed = words.next_if_eq(&"bench").is_some();
            let initial = words.next_if_eq(&"initial").is_some();
            for vm in words.filter_map(|w| w.parse().ok()).take(borrowers.len()) {
                borrowers[count] = vm;
                count += 1;
            }
            let started = nk::rdtsc();
            let result = lend(&borrowers[..count], free, initial);
            if timed {
                // `lend` stores the revoke's own duration.
                let _ = started;
                println!(
                    "GBENCH revoke_shared_2cpu_instructions {}",
                    REVOKE_TICKS.load(core::sync::atomic::Ordering::Relaxed)
                );
            }
            report("exomem_lend_revoke", result);
        }
        "exoborrow" => report("exomem_borrow", borrow(vm)),
        "exobench" => {
            if let Err(Why(line)) = bench() {
                println!("GBENCH error: {}", line.as_str());
            }
        }
        _ => println!("GTEST FAILED exomem: unknown mode '{mode}'"),
    }
}

/// Finds this guest's address-space capability among its initial ones: the one of the exo
/// AM whose `unmap` of an unmapped address is a bad argument, not a wrong kind.
fn aspace() -> Result<(Cap, u16), Why> {
    aspace_and_memory().map(|(aspace, _, am)| (aspace, am))
}

/// Returns the address-space capability, the initial-memory frame capability (granted
/// right after it) and the exo AM's id. The address space is the exo capability whose
/// `unmap` of a page inside the guest's memory is a bad argument (no mapping starts there),
/// not a wrong kind.
fn aspace_and_memory() -> Result<(Cap, Cap, u16), Why> {
    for index in 0..16 {
        let Ok((cap, am)) = nk::initial(index) else { break };
        if nk::call(am, UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
            let (memory, _) =
                nk::initial(index + 1).map_err(|s| why(format_args!("no initial memory capability: {s}")))?;
            return Ok((cap, memory, am));
        }
    }
    Err(why(format_args!("no address-space capability among the initial ones")))
}

/// A page of this guest's own (initial) memory that `exolend initial` shares.
#[repr(C, align(4096))]
struct SharedPage([u64; 512]);
static mut SHARED_PAGE: SharedPage = SharedPage([0; 512]);

fn alloc(am: u16, aspace: Cap, pages: u64) -> Result<Cap, Why> {
    let reply = nk::call(am, ALLOC, &[aspace], &[pages, 0]);
    ensure!(reply.status().is_ok(), "alloc {pages} pages: {}", reply.status());
    Ok(reply.name)
}

fn map(am: u16, set: Cap, aspace: Cap, gpa: u64, access: u64) -> Status {
    nk::call(am, MAP, &[set, aspace], &[gpa, access]).status()
}

fn peek(gpa: u64) -> u64 {
    // SAFETY: `gpa` lies in the identity-mapped first GiB; the caller mapped frames there
    // (or expects the hypervisor to stop it for touching an unmapped page).
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

fn poke(gpa: u64, value: u64) {
    // SAFETY: as for `peek`; the caller mapped the page writable.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

fn exomem(memory: u64) -> CheckResult {
    let (aspace, am) = aspace()?;
    let set = alloc(am, aspace, 4)?;
    ensure!(map(am, set, aspace, WINDOW, RW).is_ok(), "map 4 pages at {WINDOW:#x}");
    for page in 0..4 {
        ensure!(peek(WINDOW + page * PAGE) == 0, "fresh frames are zeroed");
        poke(WINDOW + page * PAGE, 0x5eed + page);
    }
    // Refusals change nothing.
    let refused = |caps: &[Cap], gpa: u64, access: u64, code: u16, what: &str| -> CheckResult {
        let status = nk::call(am, MAP, caps, &[gpa, access]).status();
        ensure!(status.code() == code, "{what}: {status}, expected code {code}");
        Ok(())
    };
    let other = alloc(am, aspace, 1)?;
    refused(&[other, aspace], WINDOW + PAGE, RW, Status::NOT_PERMITTED, "over a mapping")?;
    refused(&[other, aspace], memory - PAGE, RW, Status::NOT_PERMITTED, "over the guest's own memory")?;
    refused(&[other, aspace], GPA_LIMIT, RW, Status::BAD_ARGUMENT, "past the limit")?;
    let read_map = nk::derive(other, 0b1001).map_err(|s| why(format_args!("derive: {s}")))?;
    refused(&[read_map, aspace], WINDOW + 8 * PAGE, RW, Status::NOT_PERMITTED, "more rights than held")?;
    let status = nk::call(am, ALLOC, &[aspace], &[QUOTA / PAGE, 0]).status();
    ensure!(status.code() == Status::QUOTA_EXCEEDED, "past the quota: {status}");
    for page in 0..4 {
        ensure!(peek(WINDOW + page * PAGE) == 0x5eed + page, "page {page} changed by a refusal");
    }
    // Read-only, then the same frames elsewhere.
    ensure!(map(am, read_map, aspace, WINDOW + 8 * PAGE, READ).is_ok(), "map read-only");
    ensure!(peek(WINDOW + 8 * PAGE) == 0, "read through the read-only mapping");
    let status = nk::call(am, PROTECT, &[aspace], &[WINDOW, READ]).status();
    ensure!(status.is_ok(), "protect: {status}");
    ensure!(peek(WINDOW + PAGE) == 0x5eed + 1, "read after protect");
    ensure!(nk::call(am, UNMAP, &[aspace], &[WINDOW]).status().is_ok(), "unmap");
    ensure!(map(am, set, aspace, WINDOW + 16 * PAGE, RW).is_ok(), "map again elsewhere");
    for page in 0..4 {
        ensure!(peek(WINDOW + (16 + page) * PAGE) == 0x5eed + page, "page {page} kept its data across the remap");
    }
    // Give everything back, then map, unmap, free and delete in a loop.
    for cap in [set, other] {
        ensure!(nk::call(am, FREE, &[cap], &[]).status().is_ok(), "free");
        ensure!(nk::delete(cap).is_ok(), "delete");
    }
    for round in 0..200u64 {
        let pages = 1 + round % 4;
        let set = alloc(am, aspace, pages)?;
        let gpa = WINDOW + (round % 64) * 4 * PAGE;
        ensure!(map(am, set, aspace, gpa, RW).is_ok(), "round {round}: map");
        poke(gpa + (pages - 1) * PAGE, round);
        ensure!(nk::call(am, UNMAP, &[aspace], &[gpa]).status().is_ok(), "round {round}: unmap");
        if round % 2 == 0 {
            ensure!(nk::call(am, FREE, &[set], &[]).status().is_ok(), "round {round}: free");
        }
        ensure!(nk::delete(set).is_ok(), "round {round}: delete");
    }
    let all = alloc(am, aspace, QUOTA / PAGE)?;
    ensure!(nk::delete(all).is_ok(), "delete the whole quota");
    Ok(())
}

/// Writes chosen pages of a 64-page mapping, then reads the dirty bitmap: exactly those
/// pages, then none; again after spinning across time slices (a survivor shares the CPU).
fn dirty_exact() -> CheckResult {
    const PAGES: u64 = 64;
    let (aspace, am) = aspace()?;
    let data = alloc(am, aspace, PAGES)?;
    let bitmap = alloc(am, aspace, 1)?;
    let (data_gpa, bitmap_gpa) = (WINDOW + 0x200 * PAGE, WINDOW + 0x180 * PAGE);
    ensure!(map(am, data, aspace, data_gpa, RW).is_ok(), "map the data");
    ensure!(map(am, bitmap, aspace, bitmap_gpa, RW).is_ok(), "map the bitmap");
    let harvest = || -> Result<u64, Why> {
        let status = nk::call(am, DIRTY, &[aspace, bitmap], &[data_gpa, PAGES, 0]).status();
        ensure!(status.is_ok(), "dirty: {status}");
        Ok(peek(bitmap_gpa))
    };
    harvest()?;
    ensure!(harvest()? == 0, "nothing written since the last read");
    for round in 0..3u64 {
        let pages = [round, 17 + round, 63 - round];
        let mut expected = 0u64;
        for page in pages {
            poke(data_gpa + page * PAGE + 8 * round, round + 1);
            expected |= 1 << page;
        }
        if round == 1 {
            // Across time slices: the CPU runs the other guest meanwhile.
            for _ in 0..3_000_000u64 {
                core::hint::spin_loop();
            }
        }
        let got = harvest()?;
        ensure!(got == expected, "round {round}: dirty pages {got:#x}, written {expected:#x}");
        ensure!(harvest()? == 0, "round {round}: read again, nothing is dirty");
    }
    // Reading a page does not make it dirty.
    let _ = peek(data_gpa + 5 * PAGE);
    ensure!(harvest()? == 0, "a read made a page dirty");
    // Refused: a bitmap past its frame set.
    let status = nk::call(am, DIRTY, &[aspace, bitmap], &[data_gpa, PAGES, PAGE - 1]).status();
    ensure!(status.code() == Status::BAD_ARGUMENT, "a bitmap past its set: {status}");
    for set in [data, bitmap] {
        ensure!(nk::delete(set).is_ok(), "delete");
    }
    Ok(())
}

/// Page-Modification Logging over 640 pages: chosen pages, then all of them (more than the
/// 512-entry log holds: a PML-full exit comes in between), then some across time slices;
/// each drain reports exactly the pages written since the last.
fn dirty_pml() -> CheckResult {
    const PAGES: u64 = 640;
    const WORDS: usize = (PAGES / 64) as usize;
    let (aspace, am) = aspace()?;
    let data = alloc(am, aspace, PAGES)?;
    let bitmap = alloc(am, aspace, 1)?;
    let (data_gpa, bitmap_gpa) = (WINDOW + 0x400 * PAGE, WINDOW + 0x380 * PAGE);
    ensure!(map(am, data, aspace, data_gpa, RW).is_ok(), "map the data");
    ensure!(map(am, bitmap, aspace, bitmap_gpa, RW).is_ok(), "map the bitmap");
    let status = nk::call(am, PML_ENABLE, &[aspace], &[data_gpa, PAGES]).status();
    ensure!(status.is_ok(), "pml-enable: {status}");
    let drain = || -> Result<[u64; WORDS], Why> {
        let status = nk::call(am, PML_DRAIN, &[aspace, bitmap], &[0]).status();
        ensure!(status.is_ok(), "pml-drain: {status}");
        let mut words = [0u64; WORDS];
        for (w, word) in words.iter_mut().enumerate() {
            *word = peek(bitmap_gpa + 8 * w as u64);
        }
        Ok(words)
    };
    ensure!(drain()? == [0; WORDS], "nothing written since PML was enabled");
    let pick = |pages: &[u64]| {
        let mut words = [0u64; WORDS];
        for &page in pages {
            words[(page / 64) as usize] |= 1 << (page % 64);
        }
        words
    };
    for round in 0..3u64 {
        let expected = match round {
            0 => pick(&[1, 200, 639]),
            1 => [u64::MAX; WORDS],
            _ => pick(&[5, 600]),
        };
        for page in 0..PAGES {
            if expected[(page / 64) as usize] & (1 << (page % 64)) != 0 {
                poke(data_gpa + page * PAGE + 16, page + round);
            }
        }
        if round == 2 {
            for _ in 0..3_000_000u64 {
                core::hint::spin_loop();
            }
        }
        let got = drain()?;
        ensure!(got == expected, "round {round}: drained {:x?}, written {:x?}", &got[..2], &expected[..2]);
        ensure!(drain()? == [0; WORDS], "round {round}: drained again, nothing is logged");
    }
    for set in [data, bitmap] {
        ensure!(nk::delete(set).is_ok(), "delete");
    }
    Ok(())
}

fn unmapped_access() -> CheckResult {
    let (aspace, am) = aspace()?;
    let set = alloc(am, aspace, 1)?;
    let gpa = WINDOW + 0x100 * PAGE;
    ensure!(map(am, set, aspace, gpa, RW).is_ok(), "map");
    poke(gpa, 1);
    ensure!(nk::call(am, UNMAP, &[aspace], &[gpa]).status().is_ok(), "unmap");
    println!("exomem: reading the page it unmapped (the hypervisor must stop this guest)");
    let value = peek(gpa);
    Err(why(format_args!("read {value:#x} from a page it unmapped")))
}

fn lend(borrowers: &[u32], free: bool, initial: bool) -> CheckResult {
    let (aspace, memory, am) = aspace_and_memory()?;
    let (set, shared_gpa) = if initial {
        // A page of its own memory (a static buffer: its address is its guest-physical
        // address), split off the initial frame set.
        let gpa = core::ptr::addr_of!(SHARED_PAGE) as u64;
        let reply = nk::call(am, SPLIT, &[memory], &[gpa, PAGE]);
        ensure!(reply.status().is_ok(), "split its initial memory at {gpa:#x}: {}", reply.status());
        (reply.name, gpa)
    } else {
        let set = alloc(am, aspace, 1)?;
        ensure!(map(am, set, aspace, WINDOW, RW).is_ok(), "map");
        (set, WINDOW)
    };
    let signal = alloc(am, aspace, 1)?;
    ensure!(map(am, signal, aspace, WINDOW + PAGE, RW).is_ok(), "map the signal page");
    poke(shared_gpa, LENT);
    let shared = nk::derive(set, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    for &vm in borrowers {
        nk::delegate(shared, vm, u64::MAX, false).map_err(|s| why(format_args!("delegate to vm{vm}: {s}")))?;
        nk::delegate(signal, vm, u64::MAX, false).map_err(|s| why(format_args!("delegate to vm{vm}: {s}")))?;
    }
    let mut waited = 0u64;
    while borrowers.iter().any(|&vm| peek(shared_gpa + 8 * u64::from(vm)) != ANSWER) {
        waited += 1;
        ensure!(waited < 50_000_000, "no answer from every borrower");
        core::hint::spin_loop();
    }
    if free {
        // Freeing unmaps the set from every VM, here (on the lender's CPU): the borrowers'
        // CPUs are shot down before the call returns and the frame goes back.
        let status = nk::call(am, FREE, &[set], &[]).status();
        ensure!(status.is_ok(), "free: {status}");
        poke(WINDOW + PAGE, REVOKED);
        let_borrowers_run();
        println!("exolend: freed the frames the borrowers map");
        return Ok(());
    }
    let start = nk::rdtsc();
    let revoked = nk::revoke(shared);
    REVOKE_TICKS.store(nk::rdtsc() - start, core::sync::atomic::Ordering::Relaxed);
    let revoked = revoked.map_err(|s| why(format_args!("revoke: {s}")))?;
    ensure!(revoked >= 1, "revoke killed nothing");
    // The revoke has returned: from now on no borrower may reach the page.
    poke(WINDOW + PAGE, REVOKED);
    let_borrowers_run();
    // The lender's own mapping stays.
    ensure!(peek(shared_gpa) == LENT, "the lender's view after the revoke");
    println!("exolend: revoked the borrowers' frame capabilities");
    Ok(())
}

/// Keeps this guest (and its signal page) alive for a while after the signal, so that each
/// borrower reads the signal and then the revoked page (on a shared CPU too: this spins
/// across several time slices).
fn let_borrowers_run() {
    for _ in 0..5_000_000u64 {
        core::hint::spin_loop();
    }
}

fn borrow(vm: u64) -> CheckResult {
    let (aspace, am) = aspace()?;
    let set = nk::wait_received(0);
    let signal = nk::wait_received(1);
    let gpa = WINDOW + 0x40 * PAGE;
    ensure!(map(am, set, aspace, gpa, RW).is_ok(), "map the lent frames");
    ensure!(map(am, signal, aspace, gpa + PAGE, RW).is_ok(), "map the signal page");
    ensure!(peek(gpa) == LENT, "the lender's pattern: {:#x}", peek(gpa));
    poke(gpa + 8 * vm, ANSWER);
    println!("exoborrow: answered; reading until the lender revokes");
    loop {
        // The signal first: once the lender says its revoke returned, the next read of the
        // lent page must be refused (this guest stopped), never answered.
        let revoked = peek(gpa + PAGE) == REVOKED;
        let value = peek(gpa);
        if revoked {
            return Err(why(format_args!("read {value:#x} from the lent page after the revoke returned")));
        }
        if value != LENT {
            return Err(why(format_args!("the page changed under the borrower")));
        }
        core::hint::spin_loop();
    }
}

/// The smallest of five TSC deltas of `f`.
fn min_of_5(mut f: impl FnMut() -> Result<u64, Why>) -> Result<u64, Why> {
    let mut best = u64::MAX;
    for _ in 0..5 {
        best = best.min(f()?);
    }
    Ok(best)
}

/// `cargo xtask bench exo`: map and unmap of one 4 KiB frame set, and the dirty bitmap of
/// N = 65,536 pages (one 2 MiB set of 4 KiB pages mapped 128 times) with K of them written.
fn bench() -> CheckResult {
    const N: u64 = 65_536;
    let (aspace, am) = aspace()?;
    let overhead = min_of_5(|| {
        let start = nk::rdtsc();
        Ok(nk::rdtsc() - start)
    })?;
    let page = alloc(am, aspace, 1)?;
    let gpa = WINDOW - 0x10 * PAGE;
    let mut unmap_best = u64::MAX;
    let map_best = min_of_5(|| {
        let start = nk::rdtsc();
        let status = map(am, page, aspace, gpa, RW);
        let mapped = nk::rdtsc() - start;
        ensure!(status.is_ok(), "map: {status}");
        poke(gpa, 1);
        let start = nk::rdtsc();
        let status = nk::call(am, UNMAP, &[aspace], &[gpa]).status();
        unmap_best = unmap_best.min(nk::rdtsc() - start);
        ensure!(status.is_ok(), "unmap: {status}");
        Ok(mapped)
    })?;
    println!("GBENCH map_4k_instructions {}", map_best.saturating_sub(overhead));
    println!("GBENCH unmap_4k_instructions {}", unmap_best.saturating_sub(overhead));
    ensure!(nk::delete(page).is_ok(), "delete");

    let block = alloc(am, aspace, 512)?;
    let bitmap = alloc(am, aspace, 2)?;
    let bitmap_gpa = WINDOW - 4 * PAGE;
    ensure!(map(am, bitmap, aspace, bitmap_gpa, RW).is_ok(), "map the bitmap");
    for copy in 0..N / 512 {
        let status = map(am, block, aspace, WINDOW + copy * 512 * PAGE, RW);
        ensure!(status.is_ok(), "map copy {copy}: {status}");
    }
    let harvest = || nk::call(am, DIRTY, &[aspace, bitmap], &[WINDOW, N, 0]).status();
    ensure!(harvest().is_ok(), "dirty");
    for k in [1u64, 64, 4096] {
        let ticks = min_of_5(|| {
            for i in 0..k {
                poke(WINDOW + i * (N / k) * PAGE, i);
            }
            let start = nk::rdtsc();
            let status = harvest();
            let ticks = nk::rdtsc() - start;
            ensure!(status.is_ok(), "dirty: {status}");
            let found: u32 = (0..N / 64).map(|w| peek(bitmap_gpa + 8 * w).count_ones()).sum();
            ensure!(u64::from(found) == k, "found {found} dirty pages, wrote {k}");
            Ok(ticks)
        })?;
        println!("GBENCH dirty_ad_{k}_instructions {}", ticks.saturating_sub(overhead));
    }
    let status = nk::call(am, PML_ENABLE, &[aspace], &[WINDOW, N]).status();
    ensure!(status.is_ok(), "pml-enable: {status}");
    let drain = || nk::call(am, PML_DRAIN, &[aspace, bitmap], &[0]).status();
    ensure!(drain().is_ok(), "pml-drain");
    for k in [1u64, 64, 4096] {
        let ticks = min_of_5(|| {
            for i in 0..k {
                poke(WINDOW + i * (N / k) * PAGE, i);
            }
            let start = nk::rdtsc();
            let status = drain();
            let ticks = nk::rdtsc() - start;
            ensure!(status.is_ok(), "pml-drain: {status}");
            let found: u32 = (0..N / 64).map(|w| peek(bitmap_gpa + 8 * w).count_ones()).sum();
            ensure!(u64::from(found) == k, "PML: found {found} dirty pages, wrote {k}");
            Ok(ticks)
        })?;
        println!("GBENCH dirty_pml_{k}_instructions {}", ticks.saturating_sub(overhead));
    }
    println!("GBENCH done");
    Ok(())
}
