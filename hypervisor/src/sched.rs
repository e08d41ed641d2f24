//! Placing guests on CPUs, and sharing a CPU among its guests in time slices (the VMX
//! preemption timer ends each slice; every guest's registers, VMCS and XSAVE state are
//! switched).
//!
//! The BSP assigns each guest to a CPU (its module's `cpu=`, else round-robin over the
//! CPUs in VMX root), wakes the APs that got work with an IPI, runs its own share, and
//! waits for the others. The null-Kernel instance is shared behind a lock until the
//! distributed protocol gives each CPU its own.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nk_abi::{Call, Reply};
use nk_caps::VmId;
use nk_core::NullKernel;
use spin::{Mutex, Once};

use crate::arch::{apic, pit};
use crate::guest::{Guest, GuestEnd, GuestSpec, HypercallSink};
use crate::percpu::{self, MAX_CPUS};

/// TSC ticks of one time slice.
const TIME_SLICE_TICKS: u64 = 1 << 18;
/// Capabilities one VM may hold.
const VM_QUOTA: u32 = 4096;

/// The null-Kernel instance every CPU dispatches to.
pub static KERNEL: Once<Mutex<NullKernel>> = Once::new();

static QUEUES: [Mutex<Vec<(VmId, GuestSpec)>>; MAX_CPUS] = [const { Mutex::new(Vec::new()) }; MAX_CPUS];
static ASSIGNED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static CPUS_FINISHED: AtomicUsize = AtomicUsize::new(0);
static HALTED: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicUsize = AtomicUsize::new(0);

struct SharedKernel;

impl HypercallSink for SharedKernel {
    fn hypercall(&mut self, vm: VmId, call: &Call) -> Reply {
        let mut kernel = KERNEL.get().expect("the null-Kernel starts before any guest").lock();
        let reply = kernel.dispatch(vm, call);
        apply_effects(&mut kernel);
        reply
    }
}

/// Applies what the AMs asked for (and what revocations took back) before the call that
/// caused it returns: nothing a dead capability enabled survives its revocation.
fn apply_effects(kernel: &mut NullKernel) {
    if kernel.has_effects() {
        for effect in kernel.take_effects() {
            crate::ioports::apply(effect);
        }
    }
}

/// Runs every guest to its end on the CPUs in VMX root; returns (halted, stopped). A
/// guest runs where the hypervisor command line's `place=` puts it, else where its
/// module's `cpu=` does, else round-robin.
pub fn run_guests(specs: Vec<GuestSpec>, placements: &[(&str, u32)]) -> (usize, usize) {
    let online: Vec<usize> = percpu::all().filter(|c| c.in_vmx_root()).map(|c| c.index() as usize).collect();
    for (i, spec) in specs.into_iter().enumerate() {
        let vm = VmId::new(i as u32 + 1);
        let fallback = online[i % online.len()];
        let placed = placements.iter().find(|(name, _)| *name == spec.name).map(|&(_, cpu)| cpu as usize);
        let cpu = match placed.or(spec.cpu) {
            Some(cpu) if online.contains(&cpu) => cpu,
            Some(cpu) => {
                log::warn!(target: "sched", "vm{}/{}: cpu={cpu} is not online; running it on cpu {fallback}", vm.raw(), spec.name);
                fallback
            }
            None => fallback,
        };
        // Every VM is a principal before any guest runs, so guests can delegate to each
        // other whatever CPU they start on.
        let registered = KERNEL.get().expect("the null-Kernel starts before any guest").lock().add_vm(vm, VM_QUOTA);
        if let Err(e) = registered {
            log::error!(target: "guest", "vm{}/{}: cannot register with the null-Kernel: {e:?}", vm.raw(), spec.name);
            STOPPED.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        log::info!(target: "sched", "vm{}/{} -> cpu {cpu}", vm.raw(), spec.name);
        QUEUES[cpu].lock().push((vm, spec));
    }
    let mut woken = 0;
    for &cpu in online.iter().filter(|&&cpu| cpu != 0 && !QUEUES[cpu].lock().is_empty()) {
        ASSIGNED[cpu].store(true, Ordering::Release);
        let apic_id = percpu::get(cpu).map_or(0, |c| c.apic_id());
        if apic::send_wakeup(apic_id) {
            woken += 1;
        } else {
            log::error!(target: "sched", "cpu {cpu} did not accept its wake-up IPI; its guests do not run");
            ASSIGNED[cpu].store(false, Ordering::Release);
        }
    }
    run_queue(0);
    while CPUS_FINISHED.load(Ordering::Acquire) < woken {
        pit::wait_us(1_000);
    }
    (HALTED.load(Ordering::Acquire), STOPPED.load(Ordering::Acquire))
}

/// Runs this CPU's guests in round-robin time slices until each has ended.
fn run_queue(cpu: usize) {
    let specs = core::mem::take(&mut *QUEUES[cpu].lock());
    let rate = crate::vmx::capabilities().preemption_timer_rate;
    let mut guests = Vec::new();
    for (vm, spec) in specs {
        log::info!(target: "guest", "vm{}/{}: starting on cpu {cpu} ({} KiB image, {} MiB memory)",
            vm.raw(), spec.name, spec.image.len() / 1024, spec.memory >> 20);
        match Guest::create(vm, &spec) {
            Ok(guest) => guests.push(guest),
            Err(e) => {
                log::error!(target: "guest", "vm{}/{}: not started: {e}", vm.raw(), spec.name);
                finish(vm, false);
            }
        }
    }
    while !guests.is_empty() {
        let mut index = 0;
        while index < guests.len() {
            match guests[index].run_slice(&mut SharedKernel, TIME_SLICE_TICKS, rate) {
                None => index += 1,
                Some(end) => {
                    let guest = guests.swap_remove(index);
                    let (vm, name, exits) = (guest.vm(), guest.name(), guest.exits());
                    match &end {
                        GuestEnd::Halted => {
                            log::info!(target: "guest", "vm{}/{name}: halted after {exits} exits", vm.raw())
                        }
                        GuestEnd::Stopped(why) => log::warn!(target: "guest", "vm{}/{name}: stopped: {why}", vm.raw()),
                    }
                    drop(guest);
                    finish(vm, end == GuestEnd::Halted);
                }
            }
        }
    }
}

/// Removes an ended VM from the null-Kernel (its capabilities die, its AMs undo effects).
fn finish(vm: VmId, halted: bool) {
    let mut kernel = KERNEL.get().expect("started").lock();
    let removed = kernel.remove_vm(vm);
    apply_effects(&mut kernel);
    drop(kernel);
    match removed {
        Ok(dead) => log::debug!(target: "guest", "vm{}: {dead} capabilities revoked", vm.raw()),
        Err(e) => log::error!(target: "guest", "vm{}: cannot remove from the null-Kernel: {e:?}", vm.raw()),
    }
    let counter = if halted { &HALTED } else { &STOPPED };
    counter.fetch_add(1, Ordering::AcqRel);
}

/// The idle loop of an application processor: sleeps until the BSP assigns it guests.
pub fn ap_idle(cpu: usize) -> ! {
    loop {
        // SAFETY: interrupts are off while checking for work; `sti; hlt` re-enables them
        // only for the halt (the wake-up IPI ends it), so no wake-up is lost.
        unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
        if ASSIGNED[cpu].swap(false, Ordering::AcqRel) {
            run_queue(cpu);
            CPUS_FINISHED.fetch_add(1, Ordering::AcqRel);
        } else {
            // SAFETY: see above; the IDT handles the wake-up and spurious vectors.
            unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
        }
    }
}
