//! `bypasskeep [KEY] [BYTES]`: the keeper of the layer-bypass demo (issue 13,
//! `cargo xtask run --linux`, scenario `linux-bypass-demo`). Its module line says `nvram`
//! and `manages=<the Linux VM>`. It allocates (or, on a later boot of the same NVRAM disk,
//! finds again) the NVRAM region `KEY`, derives a branch of its capability and delegates a
//! child of that branch to the Linux VM, with a doorbell (a counter it creates, delegated
//! too). A process of that Linux (`nkctl demo`) works on the region and rings the doorbell
//! when done; the keeper then revokes the branch, so the process's capability (and its
//! mapping of the region) dies from outside, while the keeper's own capability, the region
//! and what was committed stay. It checks that the Linux VM still runs after the
//! revocation, and that it may still use the region itself.

use nk_guest::abi::counter_op as counter;
use nk_guest::abi::guest_os_op;
use nk_guest::abi::nvram_op::{ALLOCATE, SEQ};
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

/// The guest-OS AM's `running` state (am/guest-os).
const RUNNING: u64 = 1;
/// The longest wait for the doorbell, in TSC ticks (Bochs: emulated instructions): a Linux
/// boot to its /init takes about 2 G.
const DOORBELL_TICKS: u64 = 60_000_000_000;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Runs mode `bypasskeep`.
pub fn run<'a>(mut words: impl Iterator<Item = &'a str>) {
    let key = words.next().and_then(|w| w.parse().ok()).unwrap_or(42);
    let bytes = words.next().and_then(|w| w.parse().ok()).unwrap_or(64 * 1024);
    report("bypass_keeper", keep(key, bytes));
}

/// This guest's initial capabilities: (counter AM, its factory), (guest-OS AM, the managed
/// VM's capability) and (NVRAM AM, its factory, the last one).
fn caps() -> Result<((u16, Cap), (u16, Cap), (u16, Cap)), Why> {
    let (factory, counter_am) = nk::initial(0).map_err(|s| why(format_args!("initial(0): {s}")))?;
    let (mut vm, mut last) = (None, None);
    let mut index = 1;
    while let Ok((cap, am)) = nk::initial(index) {
        // Only a `vm` capability answers the guest-OS AM's inspect.
        if vm.is_none() && am != counter_am && nk::call(am, guest_os_op::INSPECT, &[cap], &[]).status().is_ok() {
            vm = Some((am, cap));
        }
        last = Some((am, cap));
        index += 1;
    }
    let vm = vm.ok_or_else(|| why(format_args!("no vm capability (the module line needs manages=<Linux VM>)")))?;
    let nvram = last.filter(|&(am, _)| am != vm.0 && am != counter_am);
    let nvram = nvram.ok_or_else(|| why(format_args!("no NVRAM factory (the module line needs nvram)")))?;
    Ok(((counter_am, factory), vm, nvram))
}

fn keep(key: u64, bytes: u64) -> CheckResult {
    let ((counter_am, counter_factory), (os_am, vm_cap), (nvram_am, factory)) = caps()?;
    let inspected = nk::call(os_am, guest_os_op::INSPECT, &[vm_cap], &[]);
    let target = inspected.results[3] as u32;
    let region = nk::call(nvram_am, ALLOCATE, &[factory], &[bytes, key]);
    ensure!(region.status().is_ok(), "allocate: {}", region.status());
    let (parent, seq, created) = (region.name, region.results[1], region.results[2] == 1);
    println!(
        "bypass keeper: region {key} of {bytes} bytes {} at seq {seq}",
        if created { "created" } else { "restored" }
    );
    // The branch is what gets revoked: the parent (which loaded the region) stays.
    let branch = nk::derive(parent, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    let doorbell = nk::call(counter_am, counter::CREATE, &[counter_factory], &[]);
    ensure!(doorbell.status().is_ok(), "doorbell: {}", doorbell.status());
    let doorbell = doorbell.name;
    nk::delegate(branch, target, u64::MAX, false).map_err(|s| why(format_args!("delegate region: {s}")))?;
    nk::delegate(doorbell, target, u64::MAX, false).map_err(|s| why(format_args!("delegate doorbell: {s}")))?;
    println!("bypass keeper: delegated vm{target} a child of the region and a doorbell; waiting for the doorbell");
    let start = nk::rdtsc();
    loop {
        let rung = nk::call(counter_am, counter::READ, &[doorbell], &[]);
        ensure!(rung.status().is_ok(), "doorbell read: {}", rung.status());
        if rung.results[0] > 0 {
            break;
        }
        ensure!(nk::rdtsc().wrapping_sub(start) < DOORBELL_TICKS, "no doorbell from vm{target}");
        // A PAUSE loop longer than the PLE window (4,096 ticks) gives the rest of the
        // slice to the CPU's other guests (Linux, when they share it).
        for _ in 0..20_000 {
            core::hint::spin_loop();
        }
    }
    let seq = nk::call(nvram_am, SEQ, &[parent], &[]);
    ensure!(seq.status().is_ok(), "seq: {}", seq.status());
    println!("bypass keeper: doorbell rung; vm{target} committed up to seq {}", seq.results[0]);
    let died = nk::revoke(branch).map_err(|s| why(format_args!("revoke: {s}")))?;
    println!("bypass keeper: revoked vm{target}'s region capability from outside ({died} capabilities)");
    ensure!(died == 2, "the revocation took {died} capabilities, not the branch and vm{target}'s child");
    let again = nk::call(nvram_am, SEQ, &[parent], &[]);
    ensure!(
        again.status().is_ok() && again.results[0] == seq.results[0],
        "own seq after the revocation: {}",
        again.status()
    );
    let state = nk::call(os_am, guest_os_op::INSPECT, &[vm_cap], &[]);
    ensure!(state.status().is_ok(), "inspect vm{target}: {}", state.status());
    ensure!(state.results[0] & 0xFF == RUNNING, "vm{target} is in state {}, not running", state.results[0] & 0xFF);
    println!("bypass keeper: vm{target} still runs; the region keeps seq {}", again.results[0]);
    Ok(())
}
