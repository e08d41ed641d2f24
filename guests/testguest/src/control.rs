//! `control`: a controller guest that manages other VMs through the guest-OS AM
//! (am/guest-os), with the `vm` capabilities its module line's `manages=worker,victim`
//! gave it (its initial capabilities of the guest-OS AM, in that order). It inspects the worker (running on another
//! CPU), stops it and checks that its exit count stands still while stopped, derives an
//! inspect-only copy and checks that stop and start are refused through it, starts the
//! worker again (it then finishes its work and says so itself), and destroys the victim,
//! which then ends with a `destroyed by` line. Forged names and a capability of another
//! kind are refused too.

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{create_counter, why, CheckResult, Why};

/// Guest-OS AM operation numbers (nk-abi), rights and codes (am/guest-os).
mod vm {
    pub use nk_guest::abi::guest_os_op::{DESTROY, INSPECT, START, STOP};
    pub const RIGHT_INSPECT: u64 = 1;
    pub const RUNNING: u64 = 1;
    pub const STOPPED: u64 = 2;
    pub const ENDED: u64 = 3;
    pub const BARE_METAL: u64 = 0;
    pub const LINUX: u64 = 1;
}

/// TSC ticks to wait while checking that a VM makes (or does not make) progress: a few of
/// the hypervisor's time slices (2^18 ticks each).
const WATCH_TICKS: u64 = 4 << 18;
/// The longest wait for a request to take effect.
const TIMEOUT_TICKS: u64 = 400 << 18;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

fn spin(ticks: u64) {
    let start = nk::rdtsc();
    while nk::rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// Inspects a VM: (state, image kind, cpu, memory, exits, vm id).
fn inspect(am: u16, cap: Cap) -> Result<(u64, u64, u64, u64, u64, u64), Status> {
    let r = nk::call(am, vm::INSPECT, &[cap], &[]);
    if !r.status().is_ok() {
        return Err(r.status());
    }
    let w = r.results[0];
    Ok((w & 0xFF, (w >> 8) & 0xFF, w >> 16, r.results[1], r.results[2], r.results[3]))
}

fn wait_for_state(am: u16, cap: Cap, wanted: u64) -> Result<u64, Why> {
    let start = nk::rdtsc();
    loop {
        let (state, _, _, _, exits, _) = inspect(am, cap).map_err(|s| why(format_args!("inspect: {s}")))?;
        if state == wanted {
            return Ok(exits);
        }
        ensure!(nk::rdtsc().wrapping_sub(start) < TIMEOUT_TICKS, "state {state}, never {wanted}");
        spin(1 << 14);
    }
}

fn exits_of(am: u16, cap: Cap) -> Result<u64, Why> {
    inspect(am, cap).map(|i| i.4).map_err(|s| why(format_args!("inspect: {s}")))
}

fn expect(status: Status, code: u16, what: &str) -> CheckResult {
    ensure!(status == Status::new(code, Some(0)), "{what}: got '{status}', expected '{}'", Status::new(code, Some(0)));
    Ok(())
}

/// Returns the guest-OS AM's id and the first two `vm` capabilities among this guest's
/// initial ones (after the counter AM's factory, which every VM gets first; the exo AM's
/// address-space and memory capabilities are told apart by a `vm` inspect, which they
/// refuse as the wrong kind without changing anything).
fn managed() -> Result<(u16, Cap, Cap), Why> {
    let (_, counter_am) = nk::initial(0).map_err(|s| why(format_args!("initial(0): {s}")))?;
    let mut found = [None, None];
    let mut index = 1;
    while let Ok((cap, am)) = nk::initial(index) {
        if am != counter_am && inspect(am, cap).is_ok() {
            match found {
                [None, _] => found[0] = Some((cap, am)),
                [Some(_), None] => found[1] = Some((cap, am)),
                _ => break,
            }
        }
        index += 1;
    }
    let [Some((worker, am)), victim] = found else {
        return Err(why(format_args!("no vm capability among {index} initial ones")));
    };
    Ok((am, worker, victim.map_or(Cap::default(), |(cap, _)| cap)))
}

/// `control [orphan|busy|linux]`: the checks above; with `orphan`, only stops the worker
/// and ends, leaving it stopped with no running VM to start it (the hypervisor then ends
/// it); with `busy`, destroys a worker that is busy with cross-kernel operations;
/// with `linux`, stops a booting Linux VM (its first `vm` capability) and starts it again.
pub fn run(mode: Option<&str>) {
    let orphan = mode == Some("orphan");
    let (am, worker, victim) = match managed() {
        Ok(found) => found,
        Err(Why(line)) => {
            println!("GTEST FAILED control_caps: {}", line.as_str());
            return;
        }
    };
    println!("GTEST ok control_caps");
    if orphan {
        report("control_stop", stop_worker(am, worker));
        return;
    }
    if mode == Some("busy") {
        report("control_destroy_busy", destroy_busy(am, worker));
        return;
    }
    if mode == Some("linux") {
        report("control_linux", stop_and_start_linux(am, worker));
        return;
    }
    report("control_inspect", inspect_worker(am, worker));
    report("control_stop", stop_worker(am, worker));
    report("control_read_only_copy", read_only_copy(am, worker));
    report("control_refusals", refusals(am, worker));
    report("control_start", start_worker(am, worker));
    report("control_destroy", destroy_victim(am, victim));
}

fn inspect_worker(am: u16, worker: Cap) -> CheckResult {
    let exits = wait_for_state(am, worker, vm::RUNNING)?;
    let (_, image, cpu, memory, _, id) = inspect(am, worker).map_err(|s| why(format_args!("inspect: {s}")))?;
    println!("control: worker is vm{id} on cpu {cpu}, image kind {image}, {} KiB, {exits} exits", memory / 1024);
    ensure!(image == vm::BARE_METAL && memory == 4 << 20, "image kind {image}, memory {memory}");
    spin(WATCH_TICKS);
    let later = exits_of(am, worker)?;
    ensure!(later > exits, "the running worker's exits did not advance ({exits} -> {later})");
    Ok(())
}

fn stop_worker(am: u16, worker: Cap) -> CheckResult {
    let stop = nk::call(am, vm::STOP, &[worker], &[]).status();
    ensure!(stop.is_ok(), "stop: {stop}");
    let exits = wait_for_state(am, worker, vm::STOPPED)?;
    spin(WATCH_TICKS);
    let later = exits_of(am, worker)?;
    ensure!(later == exits, "the stopped worker's exits moved ({exits} -> {later})");
    println!("control: worker stopped at {exits} exits, still {later} after {WATCH_TICKS} ticks");
    Ok(())
}

fn read_only_copy(am: u16, worker: Cap) -> CheckResult {
    let copy = nk::derive(worker, vm::RIGHT_INSPECT).map_err(|s| why(format_args!("derive: {s}")))?;
    ensure!(inspect(am, copy).is_ok(), "inspect through the read-only copy refused");
    expect(nk::call(am, vm::STOP, &[copy], &[]).status(), Status::MISSING_RIGHTS, "stop through the copy")?;
    expect(nk::call(am, vm::START, &[copy], &[]).status(), Status::MISSING_RIGHTS, "start through the copy")?;
    expect(nk::call(am, vm::DESTROY, &[copy], &[]).status(), Status::MISSING_RIGHTS, "destroy through the copy")?;
    let state = inspect(am, worker).map(|i| i.0).unwrap_or(0);
    ensure!(state == vm::STOPPED, "the worker left the stopped state ({state})");
    Ok(())
}

fn refusals(am: u16, worker: Cap) -> CheckResult {
    let forged = Cap { low: worker.low ^ 0x5A5A, high: worker.high.wrapping_add(1) };
    expect(nk::call(am, vm::STOP, &[forged], &[]).status(), Status::UNKNOWN_NAME, "stop with a forged name")?;
    let (_, counter) = create_counter()?;
    expect(nk::call(am, vm::STOP, &[counter], &[]).status(), Status::WRONG_KIND, "stop with a counter")?;
    Ok(())
}

fn start_worker(am: u16, worker: Cap) -> CheckResult {
    let start = nk::call(am, vm::START, &[worker], &[]).status();
    ensure!(start.is_ok(), "start: {start}");
    let exits = wait_for_state(am, worker, vm::RUNNING)?;
    spin(WATCH_TICKS);
    let (state, .., later, _) = inspect(am, worker).map_err(|s| why(format_args!("inspect: {s}")))?;
    ensure!(later > exits || state == vm::ENDED, "the restarted worker's exits did not advance ({exits} -> {later})");
    Ok(())
}

/// Waits until the Linux VM is well into its boot, stops it (its exits stand still), and
/// starts it again (its exits advance); Linux then finishes its boot and powers off.
fn stop_and_start_linux(am: u16, linux: Cap) -> CheckResult {
    const BOOTING_EXITS: u64 = 2000;
    let start = nk::rdtsc();
    loop {
        let (state, image, .., exits, _) = inspect(am, linux).map_err(|s| why(format_args!("inspect: {s}")))?;
        ensure!(image == vm::LINUX, "image kind {image}, not Linux");
        ensure!(state != vm::ENDED, "Linux ended before it was stopped");
        if exits >= BOOTING_EXITS {
            break;
        }
        ensure!(nk::rdtsc().wrapping_sub(start) < 4000 * TIMEOUT_TICKS, "Linux never reached {BOOTING_EXITS} exits");
        spin(WATCH_TICKS);
    }
    stop_worker(am, linux)?;
    start_worker(am, linux)
}

/// Destroys a worker that is busy with cross-kernel delegations (so often parked),
/// once it is well under way.
fn destroy_busy(am: u16, worker: Cap) -> CheckResult {
    const BUSY_EXITS: u64 = 500;
    let start = nk::rdtsc();
    while exits_of(am, worker)? < BUSY_EXITS {
        ensure!(nk::rdtsc().wrapping_sub(start) < TIMEOUT_TICKS, "the worker never reached {BUSY_EXITS} exits");
        spin(1 << 14);
    }
    destroy_victim(am, worker)
}

fn destroy_victim(am: u16, victim: Cap) -> CheckResult {
    let destroy = nk::call(am, vm::DESTROY, &[victim], &[]).status();
    ensure!(destroy.is_ok(), "destroy: {destroy}");
    wait_for_state(am, victim, vm::ENDED)?;
    let again = nk::call(am, vm::STOP, &[victim], &[]).status();
    ensure!(again == Status::new(Status::NOT_PERMITTED, None), "stop after destroy: {again}");
    Ok(())
}
