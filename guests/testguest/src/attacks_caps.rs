//! Capability-level attacks (issue 9): each mode tries to make the null-Kernel allocate
//! without bound, or to reach what it should not, and reports `GTEST ok <check>` only if it
//! was refused the way the hypervisor documents.
//!
//! * `openloop`: opens the same port again and again (each used to append an entry to the
//!   exo AM and a grant to the hypervisor, until the host heap ran out), then distinct
//!   openings through derived capabilities until the exo AM says `QUOTA_EXCEEDED`.
//! * `ring3caps`: from ring 3, `INITIAL` and `RECEIVED` must answer (the VM's module line
//!   says `ring3-caps`). The `checks` mode probes the default: both refused.
//! * `flood VICTIM`: delegates a signal counter to VICTIM, then its counter factory until
//!   refused; the refusal must be `QUOTA_EXCEEDED` (its own quota), and it must come before
//!   the victim's quota or the kernel's table runs out. Then it adds 1 to the signal and
//!   waits for the victim to add 1 too (its own end would revoke what it delegated).
//! * `victim ATTACKER`: waits for the signal, then checks that the inbox names the
//!   attacker and that it can still create and use capabilities of its own, and adds 1 to
//!   the signal.

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::{println, run_in_ring3};

use super::{create_counter, factory, read, why, CheckResult, Why};

use nk_guest::abi::exo_op::OPEN as EXO_OPEN;
/// Same-port openings the loop tries (the old code ran out of host memory at 65,536).
const SAME_OPENS: u64 = 70_000;
/// Delegations after which the victim stops waiting for more (the attacker's quota, 4096,
/// less what it holds).
const FLOOD_SEEN: u64 = 4000;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Runs mode `mode` with the words after it.
pub fn run<'a>(mode: &str, mut words: impl Iterator<Item = &'a str>) {
    let mut number = || words.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    match mode {
        "openloop" => report("open_loop_quota", open_loop()),
        "ring3caps" => {
            // Ring 0 may always enumerate; ring 3 may here because of ring3-caps.
            report("ring0/enumeration_allowed", enumerate_expecting(true));
            run_in_ring3(|| ring3_enumeration(true));
        }
        "flood" => report("delegation_flood_refused", flood(number())),
        "victim" => report("delegation_flood_victim", victim(number())),
        _ => println!("GTEST FAILED attacks: unknown mode '{mode}'"),
    }
}

fn open_loop() -> CheckResult {
    let (ports, am) = nk::initial(1).map_err(|s| why(format_args!("initial(1): {s} (run with ports=)")))?;
    let open = |cap: Cap, count: u64| nk::call(am, EXO_OPEN, &[cap], &[0x80, count, 3]).status();
    for i in 0..SAME_OPENS {
        let status = open(ports, 1);
        ensure!(status.is_ok(), "the {i}th opening of the same port: {status}");
    }
    println!("{SAME_OPENS} openings of port 0x80 by one capability all succeeded");
    // Distinct openings: a fresh derived capability each time, until the quota status.
    let mut opened = 0u64;
    let refusal = loop {
        let child = nk::derive(ports, u64::MAX).map_err(|s| why(format_args!("derive after {opened}: {s}")))?;
        let status = open(child, 1);
        if !status.is_ok() {
            break status;
        }
        opened += 1;
        ensure!(opened <= 100_000, "100,000 distinct openings and no refusal");
    };
    println!("distinct openings: {opened}, then '{refusal}'");
    ensure!(refusal == Status::new(Status::QUOTA_EXCEEDED, None), "refused with '{refusal}', not a quota status");
    // Closing one gives room back.
    let closed = nk::call(am, 1, &[ports], &[0x80, 1]);
    ensure!(closed.status().is_ok() && closed.results[0] == 1, "close: {}", closed.status());
    let child = nk::derive(ports, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    let again = open(child, 1);
    ensure!(again.is_ok(), "an opening after a close: {again}");
    Ok(())
}

/// Calls INITIAL(0) and RECEIVED(0) and checks they are refused (`allowed` false) or
/// answered (an empty inbox says BAD_ARGUMENT).
fn enumerate_expecting(allowed: bool) -> CheckResult {
    let initial = nk::initial(0).err().unwrap_or(Status(0));
    let received = nk::received(0).err().unwrap_or(Status(0));
    let refused = Status::new(Status::NOT_PERMITTED, None);
    if allowed {
        ensure!(initial.is_ok(), "INITIAL: {initial}");
        ensure!(received != refused, "RECEIVED: {received}");
    } else {
        ensure!(initial == refused, "INITIAL answered ring 3: {initial}");
        ensure!(received == refused, "RECEIVED answered ring 3: {received}");
    }
    Ok(())
}

/// The ring-3 probe: refused by default, answered with `ring3-caps`.
pub fn ring3_enumeration(allowed: bool) {
    let name = if allowed { "ring3/enumeration_allowed" } else { "ring3/enumeration_refused" };
    report(name, enumerate_expecting(allowed));
}

fn flood(victim: u32) -> CheckResult {
    ensure!(victim != 0, "name the victim VM");
    let (am, signal) = create_counter()?;
    nk::delegate(signal, victim, u64::MAX, false).map_err(|s| why(format_args!("signal to vm{victim}: {s}")))?;
    let (_, factory) = factory()?;
    let mut given = 0u64;
    let refusal = loop {
        match nk::delegate(factory, victim, u64::MAX, false) {
            Ok(_) => given += 1,
            Err(status) => break status,
        }
        ensure!(given <= 1_000_000, "a million delegations and no refusal");
    };
    println!("delegated the factory {given} times to vm{victim}, then '{refusal}'");
    let added = nk::call(am, 2, &[signal], &[1]).status();
    ensure!(refusal == Status::new(Status::QUOTA_EXCEEDED, None), "refused with '{refusal}'");
    ensure!(given >= FLOOD_SEEN, "refused after only {given}");
    ensure!(added.is_ok(), "signal: {added}");
    while read(am, signal).is_ok_and(|(value, _)| value < 2) {
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
    }
    Ok(())
}

fn victim(attacker: u32) -> CheckResult {
    let signal = nk::wait_received(0);
    let am = nk::received(0).map_err(|s| why(format_args!("received(0): {s}")))?.am;
    let mut polls = 0u64;
    while read(am, signal).is_ok_and(|(value, _)| value == 0) {
        polls += 1;
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
        ensure!(polls < 5_000_000, "the flood never ended");
    }
    let first = nk::received(0).map_err(|s| why(format_args!("received(0): {s}")))?;
    println!("inbox holds {} capabilities", first.count);
    ensure!(first.count > FLOOD_SEEN, "only {} capabilities arrived", first.count);
    for i in 0..8 {
        let (am, counter) =
            create_counter().map_err(|Why(line)| why(format_args!("counter {i}: {}", line.as_str())))?;
        ensure!(nk::call(am, 2, &[counter], &[5]).status().is_ok(), "add to my counter {i}");
        ensure!(read(am, counter).is_ok_and(|(value, _)| value == 5), "read of my counter {i}");
    }
    println!("created 8 counters of its own after the flood");
    ensure!(first.sender == Some(attacker), "the inbox says {:?} sent them, not vm{attacker}", first.sender);
    let answered = nk::call(am, 2, &[signal], &[1]).status();
    ensure!(answered.is_ok(), "answer through the signal: {answered}");
    Ok(())
}
