//! Modes that exercise the distributed capability protocol: guests on different CPUs (so
//! different kernel instances) delegate to each other, revoke a tree that spans every
//! kernel, run operations concurrently, and measure local against cross-kernel operations.
//!
//! Guests learn what their peers delegated to them from their inbox (`nk::received`).

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{counter, create_counter, kernel_of, measure, read, why, CheckResult, Why};

/// Reports a check as a GTEST line.
fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

fn add(am: u16, cap: Cap, amount: u64) -> Status {
    nk::call(am, counter::ADD, &[cap], &[amount]).status()
}

/// `tree NEXT`: starts a ring of delegations through every CPU and revokes it.
///
/// This guest derives T from a fresh counter, derives T1 from T and delegates it to VM
/// NEXT; each `relay` guest adds 1 to the counter through what it received, derives from
/// it and delegates onward, and the last one delegates back here. Then T is revoked: the
/// count must cover every copy on every kernel, and once the revoke returns the copy that
/// came back is dead here. A signal delegated to each relay afterwards makes them check
/// that their copies were dead by then too.
pub fn tree(next: u32, relays: &[u32]) {
    report("tree_revoke", tree_revoke(next, relays));
}

fn tree_revoke(next: u32, relays: &[u32]) -> CheckResult {
    let (am, root) = create_counter()?;
    let top = nk::derive(root, u64::MAX).map_err(|s| why(format_args!("derive T: {s}")))?;
    let first = nk::derive(top, u64::MAX).map_err(|s| why(format_args!("derive T1: {s}")))?;
    let sent =
        nk::delegate(first, next, u64::MAX, false).map_err(|s| why(format_args!("delegate to vm{next}: {s}")))?;
    println!("delegated T1 to vm{next} (kernel {} -> kernel {})", kernel_of(first), kernel_of(sent));
    let back = nk::wait_received(0);
    ensure!(kernel_of(back) == kernel_of(root), "the copy that came back lives on kernel {}", kernel_of(back));
    let sender = nk::received(0).map(|got| got.sender).map_err(|s| why(format_args!("received(0): {s}")))?;
    let last = relays.last().copied();
    ensure!(sender == last, "the inbox says {sender:?} sent the copy that came back, not {last:?}");
    ensure!(add(am, back, 1).is_ok(), "the copy that came back is unusable");
    let total = read(am, root).map_err(|s| why(format_args!("read: {s}")))?.0;
    let hops = relays.len() as u64;
    ensure!(total == hops + 1, "the counter is {total}: not every kernel added through its copy");
    println!("the ring of delegations came back through {hops} other kernels; revoking T");
    let killed = nk::revoke(top).map_err(|s| why(format_args!("revoke T: {s}")))?;
    // T and T1 here, then per relay the copy it received and the one it derived, and the
    // copy that came back.
    let expected = 2 + 2 * hops + 1;
    ensure!(killed == expected, "revoke killed {killed} capabilities, expected {expected}");
    let status = read(am, back).err().unwrap_or(Status(0));
    ensure!(status == Status::new(Status::REVOKED, Some(0)), "the copy that came back: {status} after the revoke");
    ensure!(read(am, root).is_ok(), "the root above T died");
    println!("revoke of T killed {killed} capabilities on {} kernels", hops + 1);
    for &relay in relays {
        nk::delegate(root, relay, 0b01, false).map_err(|s| why(format_args!("signal to vm{relay}: {s}")))?;
    }
    Ok(())
}

/// `relay NEXT`: the other guests of `tree`.
pub fn relay(next: u32) {
    report("tree_relay", relay_once(next));
}

fn relay_once(next: u32) -> CheckResult {
    let got = nk::wait_received(0);
    let info = nk::inspect(got).map_err(|s| why(format_args!("inspect of the received capability: {s}")))?;
    let am = (info[0] >> 32) as u16;
    ensure!(add(am, got, 1).is_ok(), "add through the received capability");
    let mine = nk::derive(got, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    nk::delegate(mine, next, u64::MAX, false).map_err(|s| why(format_args!("delegate to vm{next}: {s}")))?;
    // The signal comes after the revoke of the tree returned: both copies must be dead
    // (and the received one has left the inbox, so the signal is the first entry).
    while nk::received(0).map_or(true, |first| first.cap == got) {
        core::hint::spin_loop();
    }
    for (what, cap) in [("received", got), ("derived", mine)] {
        let status = add(am, cap, 1);
        ensure!(status == Status::new(Status::REVOKED, Some(0)), "the {what} copy: {status} after the revoke");
    }
    Ok(())
}

/// `storm NEXT ROUNDS GUESTS [PEER...]`: every guest runs this at once, each delegating to
/// the next CPU's guest, so operations of all kernels overlap and race: a guest revokes
/// what it delegated while the receiver uses it, derives from it and delegates it onward
/// to its own next guest. Every operation must succeed or fail `REVOKED`; nothing else is
/// allowed.
///
/// The guest given PEERs leads: it creates a barrier counter and delegates it to the peers
/// (last peer first, so each one's first capability is the barrier). Each guest adds 1 to
/// the barrier when its rounds are done and halts when all GUESTS have, so no delegation
/// ever targets a guest that has ended.
pub fn storm(next: u32, rounds: u64, guests: u64, peers: &[u32]) {
    let (am, barrier) = match create_counter() {
        Ok(counter) if !peers.is_empty() => counter,
        Ok((am, _)) => (am, nk::wait_received(0)),
        Err(Why(line)) => return println!("GTEST FAILED storm: {}", line.as_str()),
    };
    for &peer in peers.iter().rev() {
        if let Err(s) = nk::delegate(barrier, peer, u64::MAX, false) {
            println!("GTEST FAILED storm: barrier to vm{peer}: {s}");
        }
    }
    let first = if peers.is_empty() { 1 } else { 0 };
    let (_, root) = match create_counter() {
        Ok(counter) => counter,
        Err(Why(line)) => return println!("GTEST FAILED storm: {}", line.as_str()),
    };
    report("storm", storm_rounds(am, root, next, rounds, first));
    // Whatever happened, arrive at the barrier so the other guests can end.
    if !add(am, barrier, 1).is_ok() {
        return println!("GTEST FAILED storm: cannot add to the barrier");
    }
    while read(am, barrier).is_ok_and(|(arrived, _)| arrived < guests) {
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
    }
    // Everyone is done: take back what is left of this guest's delegations.
    match nk::revoke(root) {
        Ok(killed) => println!("storm: the final revoke killed {killed}"),
        Err(s) => println!("GTEST FAILED storm: final revoke: {s}"),
    }
}

fn storm_rounds(am: u16, root: Cap, next: u32, rounds: u64, mut seen: u64) -> CheckResult {
    let revoked = Status::new(Status::REVOKED, Some(0));
    let (mut ok, mut refused) = (0u64, 0u64);
    let mut tally = |what: &str, status: Status| -> CheckResult {
        if status.is_ok() {
            ok += 1;
        } else if status == revoked {
            refused += 1;
        } else {
            return Err(why(format_args!("{what}: {status}")));
        }
        Ok(())
    };
    let status_of = |result: Result<Cap, Status>| result.err().unwrap_or(Status(0));
    for round in 0..rounds {
        let mine = nk::derive(root, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
        nk::delegate(mine, next, u64::MAX, false).map_err(|s| why(format_args!("delegate: {s}")))?;
        // Work on what the previous guest delegated so far, racing its revokes.
        // Entries of revoked capabilities leave the inbox, so this may skip some: they
        // are dead anyway.
        while let Ok(nk::Received { cap: got, .. }) = nk::received(seen) {
            seen += 1;
            tally("add", add(am, got, 1))?;
            tally("derive", status_of(nk::derive(got, u64::MAX)))?;
            if seen & 1 == 0 {
                tally("delegate onward", status_of(nk::delegate(got, next, u64::MAX, false)))?;
            }
        }
        if round % 2 == 1 {
            let killed = nk::revoke(mine).map_err(|s| why(format_args!("revoke: {s}")))?;
            ensure!(killed >= 2, "the revoke of a delegated capability killed {killed}");
        }
    }
    println!("storm: {rounds} rounds to vm{next}: {ok} operations succeeded, {refused} refused as revoked");
    Ok(())
}

/// `hold`: keeps a VM alive for `pbench` until the first capability it received dies.
pub fn hold() {
    let lifeline = nk::wait_received(0);
    while nk::inspect(lifeline).is_ok() {
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
    }
    println!("GTEST ok hold");
}

/// `pbench PEER...`: emulated instructions of a delegation inside this kernel and to
/// another CPU's kernel, and of revoking a tree of 1,000 capabilities spread over this
/// kernel and the peers' (run with three peers on three other CPUs, each in `hold`).
pub fn bench(peers: &[u32], self_vm: u32) {
    let empty = measure(|| {});
    let report = |metric: &str, ticks: u64| println!("GBENCH {metric} {}", ticks.saturating_sub(empty));
    let Ok((_, root)) = create_counter() else {
        println!("GBENCH error: no counter");
        return;
    };
    let Some(&remote) = peers.first() else {
        println!("GBENCH error: name the peer VMs");
        return;
    };
    let Ok(lifeline) = nk::derive(root, u64::MAX) else { return };
    for &peer in peers {
        if nk::delegate(lifeline, peer, 0b01, false).is_err() {
            println!("GBENCH error: cannot reach vm{peer}");
            return;
        }
    }
    report(
        "delegate_local_instructions",
        measure(|| {
            let _ = nk::delegate(root, self_vm, u64::MAX, false);
        }),
    );
    report(
        "delegate_remote_instructions",
        measure(|| {
            let _ = nk::delegate(root, remote, u64::MAX, false);
        }),
    );
    // T and 333 children on each of the three peers' kernels: 1,000 capabilities.
    let Ok(top) = nk::derive(root, u64::MAX) else { return };
    let per_peer = 999 / peers.len().max(1) as u64;
    for &peer in peers {
        for _ in 0..per_peer {
            if let Err(s) = nk::delegate(top, peer, u64::MAX, false) {
                println!("GBENCH error: delegate to vm{peer}: {s}");
                return;
            }
        }
    }
    let start = nk::rdtsc();
    let killed = nk::revoke(top);
    let ticks = nk::rdtsc() - start;
    match killed {
        Ok(1000) => {
            println!("revoked a tree of 1000 capabilities over {} kernels", peers.len() + 1);
            report("revoke_1000_4k_instructions", ticks);
        }
        Ok(n) => println!("GBENCH error: the revoked tree had {n} capabilities, not 1000"),
        Err(s) => println!("GBENCH error: revoke: {s}"),
    }
    let _ = nk::revoke(lifeline);
}
