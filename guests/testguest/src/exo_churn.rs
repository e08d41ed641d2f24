//! The exo AM's capability quota under churn (every frame set that dies gives the AM its
//! root capability back).
//!
//! * `exochurn ROUNDS PEER`: allocates a 2-page set, splits a page off it, maps both,
//!   writes and reads them, unmaps one, then kills the set in turn by `free`, by revoking
//!   its capability, and by deleting it (the split piece dies with it), and deletes what
//!   it still holds; ROUNDS times. Each round makes two sets (two AM roots): before the
//!   AM retired the roots of dead sets, the AM's shared capability quota (4096) ran out
//!   after about 2,000 rounds and every VM's `alloc` was refused. Then it delegates its
//!   address-space capability with no rights to VM PEER as the signal that it is done,
//!   and waits for PEER's answer before it ends (the signal is derived from its own
//!   capability, so it dies when its sender ends: a peer that had not looked yet would
//!   wait for ever).
//! * `exochurnafter CHURN`: waits for that signal, checks that the signal (a no-rights
//!   copy of CHURN's address-space capability) maps nothing into CHURN and unmaps nothing
//!   from it, then allocates, maps, writes and frees a few sets of its own (the AM still
//!   has room for another VM), answers VM CHURN the same way and waits until the signal
//!   dies (CHURN, having seen the answer, ended).

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

use nk_guest::abi::exo_op::{ALLOC, FREE, MAP, SPLIT, UNMAP};
const RW: u64 = 3;
const PAGE: u64 = 0x1000;
/// Where the guests map exo frames (identity-mapped by their page tables).
const WINDOW: u64 = 0x2000_0000;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Runs mode `mode`.
pub fn run<'a>(mode: &str, mut words: impl Iterator<Item = &'a str>) {
    match mode {
        "exochurn" => {
            let rounds = words.next().and_then(|w| w.parse().ok()).unwrap_or(6000);
            let peer = words.next().and_then(|w| w.parse().ok()).unwrap_or(2);
            let (aspace, am) = match aspace() {
                Ok(found) => found,
                Err(Why(line)) => return println!("GTEST FAILED exo_churn: {}", line.as_str()),
            };
            report("exo_churn", churn(aspace, am, rounds));
            // The signal that the churn is over (a capability with no rights), sent even
            // when it failed, so the peer does not wait for ever.
            if let Err(status) = nk::delegate(aspace, peer, 0, false) {
                return println!("GTEST FAILED exo_churn_signal: {status}");
            }
            let _ = nk::wait_received(0);
        }
        _ => {
            let churn = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
            let (aspace, am) = match aspace() {
                Ok(found) => found,
                Err(Why(line)) => return println!("GTEST FAILED exo_churn_after: {}", line.as_str()),
            };
            let signal = nk::wait_received(0);
            report("exo_churn_after", after(aspace, am, signal));
            // The answer, sent even when the checks failed (so the churn ends), then wait
            // until the signal dies: the churn saw the answer and ended.
            if let Err(status) = nk::delegate(aspace, churn, 0, false) {
                return println!("GTEST FAILED exo_churn_answer: {status}");
            }
            while nk::inspect(signal).is_ok() {
                core::hint::spin_loop();
            }
        }
    }
}

/// Returns the address-space capability and the exo AM's id: the exo capability whose
/// `unmap` of a page inside the guest's memory is a bad argument, not a wrong kind.
fn aspace() -> Result<(Cap, u16), Why> {
    for index in 0..16 {
        let Ok((cap, am)) = nk::initial(index) else { break };
        if nk::call(am, UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
            return Ok((cap, am));
        }
    }
    Err(why(format_args!("no address-space capability among the initial ones")))
}

fn call(am: u16, op: u32, caps: &[Cap], args: &[u64]) -> Result<nk_guest::abi::Reply, Why> {
    let reply = nk::call(am, op, caps, args);
    ensure!(reply.status().is_ok(), "exo op {op} {args:?}: {}", reply.status());
    Ok(reply)
}

fn peek(gpa: u64) -> u64 {
    // SAFETY: `gpa` lies in the identity-mapped first GiB and the caller mapped frames there.
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

fn poke(gpa: u64, value: u64) {
    // SAFETY: as for `peek`; the caller mapped the page writable.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

fn churn(aspace: Cap, am: u16, rounds: u64) -> CheckResult {
    for round in 0..rounds {
        let reply = nk::call(am, ALLOC, &[aspace], &[2, 0]);
        ensure!(reply.status().is_ok(), "round {round}: alloc: {}", reply.status());
        let set = reply.name;
        let piece = call(am, SPLIT, &[set], &[PAGE, PAGE])?.name;
        call(am, MAP, &[set, aspace], &[WINDOW, RW])?;
        call(am, MAP, &[piece, aspace], &[WINDOW + 4 * PAGE, RW])?;
        ensure!(peek(WINDOW + PAGE) == 0 && peek(WINDOW + 4 * PAGE) == 0, "round {round}: fresh frames are zeroed");
        poke(WINDOW + PAGE, round + 1);
        ensure!(peek(WINDOW + 4 * PAGE) == round + 1, "round {round}: the piece shows the set's second page");
        call(am, UNMAP, &[aspace], &[WINDOW])?;
        match round % 3 {
            0 => drop(call(am, FREE, &[set], &[])?),
            1 => ensure!(nk::revoke(set).is_ok(), "round {round}: revoke"),
            _ => ensure!(nk::delete(set).is_ok(), "round {round}: delete"),
        }
        // The piece's mapping went with the set: the address is free again.
        ensure!(
            nk::call(am, UNMAP, &[aspace], &[WINDOW + 4 * PAGE]).status().code() == Status::BAD_ARGUMENT,
            "round {round}: the piece is still mapped"
        );
        // What is left is revoked (or gone): delete it so this VM's own quota comes back.
        let _ = nk::delete(piece);
        let _ = nk::delete(set);
    }
    println!("exochurn: {rounds} rounds of alloc, split, map, free/revoke/delete done");
    Ok(())
}

fn after(aspace: Cap, am: u16, signal: Cap) -> CheckResult {
    // The signal is a copy of the churn VM's address-space capability with no rights:
    // mapping into (or unmapping from) that VM with it is refused before the AM runs.
    let set = call(am, ALLOC, &[aspace], &[1, 0])?.name;
    let into_other = nk::call(am, MAP, &[set, signal], &[WINDOW, RW]).status();
    ensure!(into_other.code() == Status::MISSING_RIGHTS, "map into another VM without the right: {into_other}");
    let from_other = nk::call(am, UNMAP, &[signal], &[WINDOW]).status();
    ensure!(from_other.code() == Status::MISSING_RIGHTS, "unmap from another VM without the right: {from_other}");
    // Nothing changed: the set is still unmapped, so it maps into this VM.
    call(am, MAP, &[set, aspace], &[WINDOW, RW])?;
    call(am, FREE, &[set], &[])?;
    let _ = nk::delete(set);
    for round in 0..8u64 {
        let set = call(am, ALLOC, &[aspace], &[4, 0])?.name;
        call(am, MAP, &[set, aspace], &[WINDOW, RW])?;
        poke(WINDOW + 3 * PAGE, round);
        ensure!(peek(WINDOW + 3 * PAGE) == round, "round {round}: read back");
        call(am, FREE, &[set], &[])?;
        let _ = nk::delete(set);
    }
    println!("exochurnafter: allocated after the churn");
    Ok(())
}
