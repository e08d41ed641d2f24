//! `vmcreate CPU`: a control guest that creates guest-OS VMs at run time (issue 11) from
//! the `image` capability its module line's `images=` gave it (a Multiboot test kernel),
//! with RAM it allocates itself from the exo AM (charged to its own frame quota), on CPU
//! `CPU`. First every bad input is refused and changes nothing (a CPU that does not exist,
//! a forged frame name, a capability of the wrong kind, a derived copy of the frames, a
//! frame set too small for the image, an image capability without `create`, naming a boot
//! VM as only the boot principal may, copies of its capabilities for a VM on another CPU or
//! of `INITIAL` 32 and up): the first
//! VM that is created afterwards gets the first VM id after the boot VMs. Then:
//!
//! * VM A is created (state created, image kind Multiboot, 2 MiB), its frames cannot be
//!   lent twice, it is started, prints its `MBTEST` lines and ends by itself; inspect then
//!   says ended, and destroy is refused (`NOT_PERMITTED`);
//! * VM B is created, started and destroyed once it has run (`destroyed by`);
//! * VM C is created and started, and its frames are freed while it runs: the exo AM
//!   unmaps them from C first, so C is stopped at its next access to its RAM (an EPT
//!   violation line), and the hypervisor never touches the frames again;
//! * VMs D, E and F are created back to back (the module line's `frames=8M` allows 6 MiB)
//!   and their `vm` capabilities deleted: they are destroyed without ever running.
//!
//! The boot VMs' count is `BOOT_VMS` below (the scenario's module list).
//!
//! `vmcreate-linux CPU MIB`: creates one VM from its image (a Linux bzImage) with `MIB` MiB
//! of exo frames (2 MiB pages; the module line's `frames=` must allow them), starts it and
//! waits until it ended (Linux boots, runs its commands and powers off), then frees the
//! frames.

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use super::{why, CheckResult, Why};

use nk_guest::abi::guest_os_op::{CREATE, DESTROY, INSPECT, START};
/// Guest-OS AM states and image kinds (am/guest-os).
const CREATED: u64 = 0;
const ENDED: u64 = 3;
const LINUX: u64 = 1;
const MULTIBOOT: u64 = 2;
use nk_guest::abi::exo_op::{ALLOC, FREE, UNMAP};
/// `frames` rights: read, write, execute, map, split (am/exo, in registration order).
const FRAMES_RW: u64 = 0b11;
/// The boot VMs of the scenario: created VMs get ids from `BOOT_VMS + 1`.
const BOOT_VMS: u64 = 3;
const RAM_PAGES: u64 = 512;
const PAGE: u64 = 0x1000;
/// The longest wait for a created VM to reach a state (TSC ticks).
const TIMEOUT_TICKS: u64 = 4_000 << 18;

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// What the control guest holds: the exo AM (id, address space) and the guest-OS AM's
/// image capability (the last initial capability: the guest-OS AM grants last, and images
/// after any `vm` capabilities).
struct Held {
    exo: u16,
    aspace: Cap,
    guest_os: u16,
    image: Cap,
}

fn held() -> Result<Held, Why> {
    let mut aspace = None;
    let mut last = None;
    let mut index = 0;
    while let Ok((cap, am)) = nk::initial(index) {
        if aspace.is_none() && nk::call(am, UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
            aspace = Some((cap, am));
        }
        last = Some((cap, am));
        index += 1;
    }
    let (Some((aspace, exo)), Some((image, guest_os))) = (aspace, last) else {
        return Err(why(format_args!("no address space or image among {index} initial capabilities")));
    };
    Ok(Held { exo, aspace, guest_os, image })
}

fn alloc(h: &Held, pages: u64) -> Result<Cap, Why> {
    alloc_pages(h, pages, 0)
}

/// Allocates `pages` pages, 2 MiB ones when `large` is 1.
fn alloc_pages(h: &Held, pages: u64, large: u64) -> Result<Cap, Why> {
    let r = nk::call(h.exo, ALLOC, &[h.aspace], &[pages, large]);
    ensure!(r.status().is_ok(), "alloc of {pages} pages: {}", r.status());
    Ok(r.name)
}

fn free(h: &Held, frames: Cap) -> CheckResult {
    let status = nk::call(h.exo, FREE, &[frames], &[]).status();
    ensure!(status.is_ok(), "free: {status}");
    Ok(())
}

/// `create(image, frames, cpu)`: the new VM's capability and id, or the refusal.
fn create(h: &Held, image: Cap, frames: Cap, cpu: u64) -> Result<(Cap, u64), Status> {
    let r = nk::call(h.guest_os, CREATE, &[image], &[frames.low, frames.high, cpu]);
    match r.status().is_ok() {
        true => Ok((r.name, r.results[0])),
        false => Err(r.status()),
    }
}

/// `create(image, frames, cpu, boot vm, caps)`: as [`create`] with the last two arguments.
fn create_with(h: &Held, frames: Cap, cpu: u64, last: [u64; 2]) -> Result<(Cap, u64), Status> {
    let r = nk::call(h.guest_os, CREATE, &[h.image], &[frames.low, frames.high, cpu, last[0], last[1]]);
    match r.status().is_ok() {
        true => Ok((r.name, r.results[0])),
        false => Err(r.status()),
    }
}

fn refused(got: Result<(Cap, u64), Status>, code: u16, what: &str) -> CheckResult {
    match got {
        Ok((_, vm)) => Err(why(format_args!("{what}: created vm{vm}"))),
        Err(status) if status.code() == code => Ok(()),
        Err(status) => Err(why(format_args!("{what}: got '{status}', expected code {code}"))),
    }
}

/// (state, image kind, cpu, memory).
fn inspect(h: &Held, vm: Cap) -> Result<(u64, u64, u64, u64), Why> {
    let r = nk::call(h.guest_os, INSPECT, &[vm], &[]);
    ensure!(r.status().is_ok(), "inspect: {}", r.status());
    let w = r.results[0];
    Ok((w & 0xFF, (w >> 8) & 0xFF, w >> 16, r.results[1]))
}

fn wait_for(h: &Held, vm: Cap, wanted: u64) -> CheckResult {
    wait_longer(h, vm, wanted, TIMEOUT_TICKS)
}

fn wait_longer(h: &Held, vm: Cap, wanted: u64, ticks: u64) -> CheckResult {
    let start = nk::rdtsc();
    loop {
        let (state, ..) = inspect(h, vm)?;
        if state == wanted {
            return Ok(());
        }
        ensure!(nk::rdtsc().wrapping_sub(start) < ticks, "state {state}, never {wanted}");
        let pause = nk::rdtsc();
        while nk::rdtsc().wrapping_sub(pause) < 1 << 16 {
            core::hint::spin_loop();
        }
    }
}

/// Runs the checks; `cpu` is where the created VMs go.
pub fn run(cpu: u64) {
    let h = match held() {
        Ok(h) => h,
        Err(Why(line)) => {
            println!("GTEST FAILED vmcreate_caps: {}", line.as_str());
            return;
        }
    };
    println!("GTEST ok vmcreate_caps");
    report("vmcreate_refusals", refusals(&h, cpu));
    report("vmcreate_run_to_end", run_to_end(&h, cpu));
    report("vmcreate_destroy", create_and_destroy(&h, cpu));
    report("vmcreate_free_frames", free_under_a_running_vm(&h, cpu));
    report("vmcreate_delete_capability", delete_capability(&h, cpu));
}

/// `vmcreate-linux CPU MIB`: see the module docs.
pub fn run_linux(cpu: u64, mib: u64) {
    let result = held().and_then(|h| {
        let frames = alloc_pages(&h, mib / 2, 1)?;
        let (vm, id) = create(&h, h.image, frames, cpu).map_err(|s| why(format_args!("create: {s}")))?;
        let (state, image, on, memory) = inspect(&h, vm)?;
        ensure!(
            (state, image, on, memory) == (CREATED, LINUX, cpu, mib << 20),
            "inspect: state {state}, image {image}, cpu {on}, {memory} bytes"
        );
        let start = nk::call(h.guest_os, START, &[vm], &[]).status();
        ensure!(start.is_ok(), "start: {start}");
        wait_longer(&h, vm, ENDED, 1 << 40)?;
        free(&h, frames)?;
        println!("vmcreate: Linux vm{id} ran to its end on cpu {cpu}");
        Ok(())
    });
    report("vmcreate_linux", result);
}

fn refusals(h: &Held, cpu: u64) -> CheckResult {
    let frames = alloc(h, RAM_PAGES)?;
    refused(create(h, h.image, frames, 7), Status::BAD_ARGUMENT, "a CPU that does not exist")?;
    refused(create(h, h.image, frames, 64), Status::BAD_ARGUMENT, "CPU 64")?;
    let forged = Cap { low: frames.low ^ 0x5A5A, high: frames.high };
    refused(create(h, h.image, forged, cpu), Status::UNKNOWN_NAME, "a forged frame name")?;
    refused(create(h, h.image, h.aspace, cpu), Status::NOT_PERMITTED, "an address space as frames")?;
    refused(create(h, h.image, h.image, cpu), Status::NOT_PERMITTED, "the image as frames")?;
    let copy = nk::derive(frames, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    refused(create(h, h.image, copy, cpu), Status::NOT_PERMITTED, "a derived copy of the frames")?;
    let read_write = nk::derive(frames, FRAMES_RW).map_err(|s| why(format_args!("derive: {s}")))?;
    refused(create(h, h.image, read_write, cpu), Status::NOT_PERMITTED, "frames without execute")?;
    let small = alloc(h, 256)?;
    refused(create(h, h.image, small, cpu), Status::BAD_ARGUMENT, "a frame set too small for the image")?;
    free(h, small)?;
    let no_create = nk::derive(h.image, 0).map_err(|s| why(format_args!("derive: {s}")))?;
    refused(create(h, no_create, frames, cpu), Status::MISSING_RIGHTS, "an image capability without create")?;
    // Only the hypervisor's boot principal may name a boot VM (the fourth argument), and
    // copies of the caller's capabilities (the fifth) go only to a VM on its own CPU
    // (this guest runs on CPU 0; the scenario creates on CPU 1).
    for boot_vm in [1, 2, BOOT_VMS] {
        refused(create_with(h, frames, cpu, [boot_vm, 0]), Status::NOT_PERMITTED, "naming a boot VM")?;
    }
    if cpu != 0 {
        refused(create_with(h, frames, cpu, [0, 1]), Status::BAD_ARGUMENT, "copies for a VM on another CPU")?;
    }
    refused(create_with(h, frames, 0, [0, 1 << 32]), Status::BAD_ARGUMENT, "copies of INITIAL 32")?;
    free(h, frames)?;
    println!("vmcreate: every bad create refused");
    Ok(())
}

fn run_to_end(h: &Held, cpu: u64) -> CheckResult {
    let frames = alloc(h, RAM_PAGES)?;
    let (vm, id) = create(h, h.image, frames, cpu).map_err(|s| why(format_args!("create: {s}")))?;
    ensure!(id == BOOT_VMS + 1, "the first created VM is vm{id}: a refused create changed something");
    let (state, image, on, memory) = inspect(h, vm)?;
    ensure!(
        (state, image, on, memory) == (CREATED, MULTIBOOT, cpu, RAM_PAGES * PAGE),
        "inspect: state {state}, image {image}, cpu {on}, {memory} bytes"
    );
    refused(create(h, h.image, frames, cpu), Status::NOT_PERMITTED, "frames lent twice")?;
    let start = nk::call(h.guest_os, START, &[vm], &[]).status();
    ensure!(start.is_ok(), "start: {start}");
    wait_for(h, vm, ENDED)?;
    let destroy = nk::call(h.guest_os, DESTROY, &[vm], &[]).status();
    ensure!(destroy.code() == Status::NOT_PERMITTED, "destroy of an ended VM: {destroy}");
    free(h, frames)?;
    println!("vmcreate: vm{id} ran to its end on cpu {cpu}");
    Ok(())
}

fn create_and_destroy(h: &Held, cpu: u64) -> CheckResult {
    let frames = alloc(h, RAM_PAGES)?;
    let (vm, id) = create(h, h.image, frames, cpu).map_err(|s| why(format_args!("create: {s}")))?;
    let start = nk::call(h.guest_os, START, &[vm], &[]).status();
    ensure!(start.is_ok(), "start: {start}");
    // Destroyed once it runs (it has taken exits).
    let started = nk::rdtsc();
    while nk::call(h.guest_os, INSPECT, &[vm], &[]).results[2] == 0 {
        ensure!(nk::rdtsc().wrapping_sub(started) < TIMEOUT_TICKS, "vm{id} never ran");
        core::hint::spin_loop();
    }
    let destroy = nk::call(h.guest_os, DESTROY, &[vm], &[]).status();
    ensure!(destroy.is_ok(), "destroy: {destroy}");
    wait_for(h, vm, ENDED)?;
    free(h, frames)?;
    println!("vmcreate: vm{id} destroyed");
    Ok(())
}

fn free_under_a_running_vm(h: &Held, cpu: u64) -> CheckResult {
    let frames = alloc(h, RAM_PAGES)?;
    let (vm, id) = create(h, h.image, frames, cpu).map_err(|s| why(format_args!("create: {s}")))?;
    let start = nk::call(h.guest_os, START, &[vm], &[]).status();
    ensure!(start.is_ok(), "start: {start}");
    free(h, frames)?;
    wait_for(h, vm, ENDED)?;
    println!("vmcreate: vm{id} ended after its frames were freed");
    Ok(())
}

/// Creates three VMs back to back (their CPU adopts several at once, and is handed a
/// queue three times) and deletes their capabilities without starting them.
fn delete_capability(h: &Held, cpu: u64) -> CheckResult {
    let frames = [alloc(h, RAM_PAGES)?, alloc(h, RAM_PAGES)?, alloc(h, RAM_PAGES)?];
    let mut vms = [Cap::default(); 3];
    let mut first = 0;
    for (vm, set) in vms.iter_mut().zip(frames) {
        let (cap, id) = create(h, h.image, set, cpu).map_err(|s| why(format_args!("create: {s}")))?;
        (*vm, first) = (cap, if first == 0 { id } else { first });
    }
    // The hypervisor's `destroyed by` lines for the VMs are what the scenario checks.
    for vm in vms {
        nk::delete(vm).map_err(|s| why(format_args!("delete: {s}")))?;
    }
    for set in frames {
        free(h, set)?;
    }
    println!("vmcreate: vm{first} to vm{} destroyed when their capabilities were deleted", first + 2);
    Ok(())
}
