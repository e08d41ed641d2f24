//! The NVRAM AM on the exo AM (issue 12, seed §5.2.1 "hierarchical capabilities"), mode
//! `nvramexo`: the NVRAM AM reads a region's write set through an exo `aspace[dirty]`
//! capability the guest lends it at `map`. The guest lends a derived copy of its
//! address-space capability, commits (one dirty page, read through the exo AM), revokes
//! the copy, and finds the next commit refused with `REVOKED` (nothing committed, the
//! machine and the guest unharmed); restore still aborts; a new mapping (lending its own
//! capability, found by the AM) commits again.
//!
//! Modes `nvramshare` and `nvramborrow` (seed §5.4 `map-region(region, aspace, offset)`
//! into another VM): the borrower (VM 2) delegates its exo address-space capability to the
//! sharer (VM 1, with an NVRAM factory), which maps its region into the borrower's address
//! space through a child region capability, and into its own; the borrower writes into it,
//! the sharer commits the borrower's writes (its write set, read through the lent
//! capability) and then revokes the child capability: the region is unmapped from the
//! borrower, whose next read of it stops it (EPT violation), while the sharer goes on.

use nk_guest::abi::nvram_op::{ALLOCATE, COMMIT, MAP, RESTORE, SEQ, UNMAP};
use nk_guest::abi::{exo_op, Status};
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::nvram::{factory, map_window, peek, poke};
use super::{why, CheckResult, Why};

const WINDOW: u64 = 1 << 30;
const REGION: u64 = 64 * 1024;
const PAGE: u64 = 4096;
const RW: u64 = 3;
const MAP_READ: u64 = 1;

/// Runs mode `nvramexo`, `nvramshare` or `nvramborrow`.
pub fn run(mode: &str) {
    let (name, result) = match mode {
        "nvramshare" => ("nvram_map_other", share()),
        "nvramborrow" => ("nvram_borrow", borrow()),
        _ => ("nvram_exo_revoke", exo_revoke()),
    };
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// What the sharer writes first, and the borrower's words.
const MAGIC: u64 = 0x5348_4152_4544_0001;
const DONE: u64 = 0xD0_4E;
const BORROWED: u64 = 0xB0_2204_ED;
/// The VMs of the two modes (module order).
const SHARER: u32 = 1;
const BORROWER: u32 = 2;

fn share() -> CheckResult {
    let (factory, am) = factory()?;
    let region = nk::call(am, ALLOCATE, &[factory], &[REGION, 11]);
    ensure!(region.status().is_ok(), "allocate: {}", region.status());
    let region = region.name;
    let lent = nk::wait_received(0);
    let child = nk::derive(region, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    let map = nk::call(am, MAP, &[child], &[WINDOW, RW, lent.high, lent.low]);
    ensure!(map.status().is_ok(), "map into vm{BORROWER}: {}", map.status());
    ensure!(nk::call(am, MAP, &[region], &[WINDOW, RW]).status().is_ok(), "map into itself");
    map_window();
    poke(WINDOW, MAGIC);
    println!("nvram: region mapped into vm{BORROWER}'s address space and its own");
    let signal = nk::derive(region, MAP_READ).map_err(|s| why(format_args!("derive signal: {s}")))?;
    nk::delegate(signal, BORROWER, u64::MAX, false).map_err(|s| why(format_args!("delegate signal: {s}")))?;
    while peek(WINDOW + 8) != DONE {
        core::hint::spin_loop();
    }
    let commit = nk::call(am, COMMIT, &[region], &[]);
    ensure!(commit.status().is_ok(), "commit: {}", commit.status());
    ensure!(commit.results[3] == 2, "commit saw {} dirty pages, not 2", commit.results[3]);
    ensure!(peek(WINDOW + 2 * PAGE) == BORROWED, "the borrower's write is not in the region");
    println!("nvram: commit {} took vm{BORROWER}'s writes (2 dirty pages)", commit.results[0]);
    nk::revoke(child).map_err(|s| why(format_args!("revoke the mapping capability: {s}")))?;
    println!("nvram: revoked the capability the region was mapped into vm{BORROWER} with");
    ensure!(peek(WINDOW + 2 * PAGE) == BORROWED, "the sharer's own mapping went too");
    // The next commit diffs every page (what vm2 wrote after the last read of its flags
    // is unknown once its mapping went) but writes only the changed block.
    poke(WINDOW + 3 * PAGE, 1);
    let commit = nk::call(am, COMMIT, &[region], &[]);
    ensure!(
        commit.status().is_ok() && commit.results[1] == 1,
        "commit after: {} {:?}",
        commit.status(),
        commit.results
    );
    Ok(())
}

fn borrow() -> CheckResult {
    let aspace = aspace()?;
    nk::delegate(aspace, SHARER, u64::MAX, false).map_err(|s| why(format_args!("delegate aspace: {s}")))?;
    nk::wait_received(0);
    map_window();
    while peek(WINDOW) != MAGIC {
        core::hint::spin_loop();
    }
    poke(WINDOW + 2 * PAGE, BORROWED);
    poke(WINDOW + 8, DONE);
    println!("nvram: wrote into vm{SHARER}'s region, mapped in this address space");
    // Reads until the sharer's revocation unmaps the region: the next read stops this VM.
    loop {
        let _ = peek(WINDOW);
        core::hint::spin_loop();
    }
}

/// The exo address-space capability: the initial exo capability whose `unmap` of an
/// unmapped page of the guest's memory is a bad argument (not a wrong kind).
fn aspace() -> Result<Cap, Why> {
    for index in 0..16 {
        let Ok((cap, am)) = nk::initial(index) else { break };
        if nk::call(am, exo_op::UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
            return Ok(cap);
        }
    }
    Err(why(format_args!("no address-space capability among the initial ones")))
}

fn exo_revoke() -> CheckResult {
    let (factory, am) = factory()?;
    let aspace = aspace()?;
    let region = nk::call(am, ALLOCATE, &[factory], &[REGION, 9]);
    ensure!(region.status().is_ok(), "allocate: {}", region.status());
    let cap = region.name;
    // Lend a copy of the address-space capability (every right it has).
    let lent = nk::derive(aspace, u64::MAX).map_err(|s| why(format_args!("derive aspace: {s}")))?;
    let map = nk::call(am, MAP, &[cap], &[WINDOW, RW, lent.high, lent.low]);
    ensure!(map.status().is_ok(), "map lending the copy: {}", map.status());
    map_window();
    poke(WINDOW + PAGE + 8, 0x1111);
    let commit = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(commit.status().is_ok(), "commit 1: {}", commit.status());
    ensure!(commit.results[3] == 1, "commit 1 saw {} dirty pages, not 1", commit.results[3]);
    println!("nvram: commit {} read 1 dirty page through the exo AM", commit.results[0]);
    // Take the capability back: the NVRAM AM's child dies with the copy.
    nk::revoke(lent).map_err(|s| why(format_args!("revoke the lent copy: {s}")))?;
    poke(WINDOW + 2 * PAGE + 8, 0x2222);
    let refused = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(refused.status().code() == Status::REVOKED, "commit after the revocation: {}", refused.status());
    println!("nvram: commit refused after the exo capability was revoked: {}", refused.status());
    let seq = nk::call(am, SEQ, &[cap], &[]);
    ensure!(seq.status().is_ok() && seq.results[0] == 1, "seq after the refusal: {:?}", seq.results);
    let restore = nk::call(am, RESTORE, &[cap], &[]);
    ensure!(restore.status().is_ok(), "restore: {}", restore.status());
    ensure!(peek(WINDOW + 2 * PAGE + 8) == 0, "restore did not abort the uncommitted store");
    ensure!(peek(WINDOW + PAGE + 8) == 0x1111, "restore lost the committed store");
    // A new mapping lends the guest's own capability (the AM finds it) and commits work.
    ensure!(nk::call(am, UNMAP, &[cap], &[WINDOW]).status().is_ok(), "unmap");
    ensure!(nk::call(am, MAP, &[cap], &[WINDOW, RW]).status().is_ok(), "map again");
    poke(WINDOW + 3 * PAGE + 8, 0x3333);
    let commit = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(commit.status().is_ok(), "commit after a new mapping: {}", commit.status());
    poke(WINDOW + 4 * PAGE + 8, 0x4444);
    let commit = nk::call(am, COMMIT, &[cap], &[]);
    ensure!(commit.status().is_ok() && commit.results[3] == 1, "commit 3: {} {:?}", commit.status(), commit.results);
    println!("nvram: commit {} after a new mapping read 1 dirty page", commit.results[0]);
    Ok(())
}
