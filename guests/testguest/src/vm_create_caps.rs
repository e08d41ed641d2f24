//! `vmcreate-caps CPU MIB`: a control guest creates a Linux VM on its own CPU `CPU` with
//! `MIB` MiB of its exo frames and hands it a copy of one of its own capabilities (its
//! `image` capability, bit i of `create`'s fifth argument for its `INITIAL` capability i).
//! Linux's /init uses the copy from ring 3 (`nkctl inspect guest-os/image`, the label the
//! VM's NKCP table gives it), then writes `nkcp-used` at guest-physical 0xE8000 (below
//! 1 MiB, outside System RAM, so root's /dev/mem reaches it) and polls the copy. The
//! controller maps the VM's frames into its own address space read-only (they are its own
//! memory), waits for that marker, and revokes its own image capability: the VM's copy
//! dies with it, and Linux's next use is refused in words. The controller then waits for
//! Linux to power off and frees the frames.

use nk_guest::abi::exo_access::READ;
use nk_guest::abi::exo_op::{ALLOC, FREE, MAP, UNMAP};
use nk_guest::abi::guest_os_op::{CREATE, INSPECT, START};
use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

/// Where the controller maps the VM's RAM (in its identity-mapped first GiB, above its
/// own memory).
const WINDOW_GPA: u64 = 0x2000_0000;
/// Where Linux writes its marker (the NKCP table's BIOS area, after the ACPI tables).
const MARKER_GPA: u64 = 0xE_8000;
const MARKER: &[u8] = b"nkcp-used";
const ENDED: u64 = 3;
const PAGE: u64 = 0x1000;
/// The longest wait for Linux (TSC ticks; a boot takes about 2^31).
const TIMEOUT_TICKS: u64 = 1 << 40;

fn pause() {
    let start = nk::rdtsc();
    while nk::rdtsc().wrapping_sub(start) < 1 << 18 {
        core::hint::spin_loop();
    }
}

fn marker_seen() -> bool {
    MARKER.iter().enumerate().all(|(i, &byte)| {
        // SAFETY: the window lies in the identity-mapped first GiB and the VM's frames are
        // mapped there (read-only) for as long as this runs.
        let got = unsafe { core::ptr::read_volatile((WINDOW_GPA + MARKER_GPA + i as u64) as *const u8) };
        got == byte
    })
}

fn check(cpu: u64, mib: u64) -> CheckResult {
    // The exo AM's address space (the one `unmap` answers with a bad address), and the
    // image capability (the last one: the guest-OS AM grants last).
    let (mut aspace, mut image, mut index) = (None, None, 0);
    while let Ok((cap, am)) = nk::initial(index) {
        if aspace.is_none() && nk::call(am, UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
            aspace = Some((cap, am));
        }
        image = Some((cap, am, index));
        index += 1;
    }
    let (Some((aspace, exo)), Some((image, guest_os, image_index))) = (aspace, image) else {
        return Err(why(format_args!("no address space or image among {index} initial capabilities")));
    };
    let r = nk::call(exo, ALLOC, &[aspace], &[mib / 2, 1]);
    ensure!(r.status().is_ok(), "alloc: {}", r.status());
    let frames: Cap = r.name;
    let r = nk::call(guest_os, CREATE, &[image], &[frames.low, frames.high, cpu, 0, 1 << image_index]);
    ensure!(r.status().is_ok(), "create with a copy of INITIAL {image_index}: {}", r.status());
    let (vm, id) = (r.name, r.results[0]);
    let start = nk::call(guest_os, START, &[vm], &[]).status();
    ensure!(start.is_ok(), "start: {start}");
    let mapped = nk::call(exo, MAP, &[frames, aspace], &[WINDOW_GPA, READ]).status();
    ensure!(mapped.is_ok(), "map of the VM's frames: {mapped}");
    let began = nk::rdtsc();
    while !marker_seen() {
        ensure!(nk::rdtsc().wrapping_sub(began) < TIMEOUT_TICKS, "vm{id} never wrote its marker");
        pause();
    }
    println!("vmcreate-caps: vm{id} used its copy of the image capability from ring 3");
    let died = nk::revoke(image).map_err(|s| why(format_args!("revoke: {s}")))?;
    ensure!(died >= 2, "revoke killed {died} capabilities: not the VM's copy too");
    println!("vmcreate-caps: revoked the image capability: {died} capabilities died, the VM's copy among them");
    loop {
        let r = nk::call(guest_os, INSPECT, &[vm], &[]);
        ensure!(r.status().is_ok(), "inspect: {}", r.status());
        if r.results[0] & 0xFF == ENDED {
            break;
        }
        ensure!(nk::rdtsc().wrapping_sub(began) < TIMEOUT_TICKS, "vm{id} never ended");
        pause();
    }
    let unmapped = nk::call(exo, UNMAP, &[aspace], &[WINDOW_GPA]).status();
    ensure!(unmapped.is_ok(), "unmap: {unmapped}");
    let freed = nk::call(exo, FREE, &[frames], &[]).status();
    ensure!(freed.is_ok(), "free: {freed}");
    println!("vmcreate-caps: Linux vm{id} ran to its end");
    Ok(())
}

/// Runs the check with the mode's words `CPU MIB`; see the module docs.
#[inline(never)]
pub fn run<'a>(mut words: impl Iterator<Item = &'a str>) {
    let cpu = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let mib = words.next().and_then(|n| n.parse().ok()).unwrap_or(128);
    match check(cpu, mib) {
        Ok(()) => println!("GTEST ok vmcreate_caps_linux"),
        Err(Why(line)) => println!("GTEST FAILED vmcreate_caps_linux: {}", line.as_str()),
    }
}
