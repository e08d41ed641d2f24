//! Placing guests on CPUs, sharing a CPU among its guests in time slices (the VMX
//! preemption timer ends each slice; every guest's registers, VMCS and XSAVE state are
//! switched), and parking a guest whose capability operation waits for other CPUs' kernel
//! instances.
//!
//! The BSP assigns each guest to a CPU (the command line's `place=`, else its module's
//! `cpu=`, else round-robin over the CPUs in VMX root), registers it with that CPU's kernel
//! instance (and tells every other instance where it runs), wakes the APs that got work
//! with an IPI, runs its own share, and waits for the others and for the protocol's
//! messages to settle.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use nk_abi::Call;
use nk_caps::{KernelId, VmId};
use nk_core::{Dispatched, PendingOp};
use spin::Mutex;

use crate::arch::{self, apic, pit};
use crate::guest::{Guest, GuestEnd, GuestSpec, HypercallSink, Slice};
use crate::mesh::{self, Mesh};
use crate::percpu::{self, MAX_CPUS};
use crate::vmx::vcpu::GuestRegs;

/// TSC ticks of one time slice.
const TIME_SLICE_TICKS: u64 = 1 << 18;
/// Capabilities one VM may be charged for on each kernel instance: those it holds and
/// did not receive, and those it delegated (nk-caps, "Quotas").
const VM_QUOTA: u32 = 4096;
/// How long the BSP waits for the protocol to settle once every guest ended.
const SETTLE_TIMEOUT_US: u64 = 5_000_000;

static QUEUES: [Mutex<Vec<(VmId, GuestSpec)>>; MAX_CPUS] = [const { Mutex::new(Vec::new()) }; MAX_CPUS];
/// Queues handed to each CPU and not yet taken: a CPU takes them all with one run of its
/// queue and counts them as finished when that run ends.
static ASSIGNED: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static CPUS_FINISHED: AtomicUsize = AtomicUsize::new(0);
/// Queues handed to CPUs (the APs' at boot, and each VM created at run time): the BSP waits
/// until as many have finished.
static WOKEN: AtomicUsize = AtomicUsize::new(0);
static HALTED: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicUsize = AtomicUsize::new(0);

/// The kernel instance of the CPU a guest runs on.
struct LocalKernel {
    cpu: usize,
    mesh: &'static Mesh,
}

impl HypercallSink for LocalKernel {
    fn hypercall(&mut self, vm: VmId, call: &Call) -> Dispatched {
        self.mesh.hypercall(self.cpu, vm, call)
    }

    #[inline(always)]
    fn hypercall_in_place(&mut self, vm: VmId, regs: &mut GuestRegs) -> Option<PendingOp> {
        self.mesh.hypercall_in_place(self.cpu, vm, regs)
    }

    fn interrupted(&mut self) {
        mesh::count_interrupt_exit();
        self.mesh.service(self.cpu);
    }
}

/// Runs every guest to its end on the CPUs in VMX root; returns (halted, stopped). A
/// guest runs where the hypervisor command line's `place=` puts it, else where its
/// module's `cpu=` does, else round-robin.
pub fn run_guests(specs: Vec<GuestSpec>, placements: &[(&str, u32)]) -> (usize, usize) {
    let frames_at_start = crate::memory::free_frame_count();
    log::info!(target: "mem", "{frames_at_start} frames free before the guests start");
    let mesh = mesh::mesh();
    let online: Vec<usize> = percpu::all().filter(|c| c.in_vmx_root()).map(|c| c.index() as usize).collect();
    // Guest OSes are built through the guest-OS AM once every VM is a principal (bootvm.rs).
    let mut guest_oses = Vec::new();
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
        let image = crate::vmctl::boot_image(vm);
        let refusal = match (image, spec.vcpus) {
            // A guest OS has one vCPU (SMP guest OSes: docs/multi-vcpu.md).
            (Some(_), 2..) => Some(alloc::format!(
                "vcpus={} is for bare-metal ELF guests; a guest OS runs on one vCPU (write vcpus=1 or drop it)",
                spec.vcpus
            )),
            (Some(_), _) => loader_refusal(&spec),
            (None, _) => None,
        };
        if let Some(why) = refusal {
            log::error!(target: "guest", "vm{}/{}: not started: bad image: {why}", vm.raw(), spec.name);
            crate::vmctl::ended(vm);
            STOPPED.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        // Every VM is a principal before any guest runs, so guests can delegate to each
        // other whatever CPU they start on.
        if !register(mesh, vm, cpu, &spec, false) {
            crate::vmctl::ended(vm);
            STOPPED.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        log::info!(target: "sched", "vm{}/{} -> cpu {cpu}", vm.raw(), spec.name);
        crate::vmctl::placed(vm, cpu);
        match image {
            Some(image) => guest_oses.push((vm, spec, cpu, image)),
            None => QUEUES[cpu].lock().push((vm, spec)),
        }
    }
    let boot_principal = (!guest_oses.is_empty()).then(|| crate::bootvm::register(mesh));
    for (vm, spec, cpu, image) in guest_oses {
        log::info!(target: "guest", "vm{}/{}: starting on cpu {cpu} ({} KiB image, {} MiB memory)",
            vm.raw(), spec.name, spec.image.len() / 1024, spec.memory >> 20);
        let built = match &boot_principal {
            Some(Ok(boot)) => boot.create(mesh, vm, &spec, cpu, image),
            Some(Err(why)) => Err(why.clone()),
            None => Err(alloc::string::String::from("no boot principal")),
        };
        if let Err(why) = built {
            log::error!(target: "guest", "vm{}/{}: not started: {why}", vm.raw(), spec.name);
            crate::vmctl::ended(vm);
            if let Err(e) = mesh.remove_vm(cpu, vm) {
                log::error!(target: "guest", "vm{}: cannot remove from the null-Kernel: {e:?}", vm.raw());
            }
            STOPPED.fetch_add(1, Ordering::AcqRel);
        }
    }
    for &cpu in online.iter().filter(|&&cpu| cpu != 0 && !QUEUES[cpu].lock().is_empty()) {
        WOKEN.fetch_add(1, Ordering::AcqRel);
        ASSIGNED[cpu].fetch_add(1, Ordering::AcqRel);
        let apic_id = percpu::get(cpu).map_or(0, |c| c.apic_id());
        if !apic::send_wakeup(apic_id) {
            log::error!(target: "sched", "cpu {cpu} did not accept its wake-up IPI; its guests do not run");
            ASSIGNED[cpu].fetch_sub(1, Ordering::AcqRel);
            WOKEN.fetch_sub(1, Ordering::AcqRel);
        }
    }
    run_queue(0);
    // VMs created at run time may give any CPU, this one too, a queue again.
    while CPUS_FINISHED.load(Ordering::Acquire) < WOKEN.load(Ordering::Acquire) {
        let taken = ASSIGNED[0].swap(0, Ordering::AcqRel);
        if taken > 0 {
            run_queue(0);
            CPUS_FINISHED.fetch_add(taken, Ordering::AcqRel);
            continue;
        }
        mesh.service(0);
        pit::wait_us(200);
    }
    if boot_principal.is_some() {
        crate::bootvm::retire(mesh);
    }
    settle(mesh);
    let frames_at_end = crate::memory::free_frame_count();
    match frames_at_start.checked_sub(frames_at_end) {
        Some(0) => {
            log::info!(target: "mem", "{frames_at_end} frames free after every guest ended, as at the start: none leaked ({} EPT shootdowns sent, {} PML-full exits)", crate::exomem::shootdowns(), crate::exomem::pml_full_exits())
        }
        Some(lost) => {
            log::error!(target: "mem", "{frames_at_end} frames free after every guest ended, {lost} fewer than at the start")
        }
        None => {
            log::info!(target: "mem", "{frames_at_end} frames free after every guest ended ({} more than at the start)", frames_at_end - frames_at_start)
        }
    }
    (HALTED.load(Ordering::Acquire), STOPPED.load(Ordering::Acquire))
}

/// Runs a guest OS module's loader against its `mem=` without writing anything; returns
/// its refusal, if any (a truncated or corrupt kernel is refused with one clear line).
fn loader_refusal(spec: &GuestSpec) -> Option<alloc::string::String> {
    let kind = nk_loader::image::ImageKind::detect(spec.image);
    let mut bounds = crate::osvm::Bounds { size: spec.memory };
    crate::osvm::load(VmId::new(0), kind, spec, &mut bounds, false, &[]).err()
}

/// Registers `vm` with the kernel instance of `cpu` (its AMs grant it its initial
/// capabilities) and makes it a payer on every other instance; false if the instance
/// refused it (reported). At run time (`running`), another CPU may hold its instance while
/// it waits for this CPU to answer an EPT shootdown: this CPU then answers while it waits
/// for that instance, instead of waiting blind.
fn register(mesh: &Mesh, vm: VmId, cpu: usize, spec: &GuestSpec, running: bool) -> bool {
    register_with(mesh, vm, cpu, spec, running, None)
}

/// As [`register`], and with `copies` (creator, mask) the VM's `INITIAL` list also gets
/// delegated copies of its creator's chosen initial capabilities (the guest-OS AM's
/// `create`; the creator lives on this CPU's instance, so nothing crosses kernels).
fn register_with(
    mesh: &Mesh,
    vm: VmId,
    cpu: usize,
    spec: &GuestSpec,
    running: bool,
    copies: Option<(VmId, u32)>,
) -> bool {
    let registered = {
        let mut kernel = mesh.instance(cpu).kernel.lock();
        match copies {
            None => kernel.add_vm(vm, VM_QUOTA),
            Some((creator, mask)) => {
                let mut out = Vec::new();
                let added = kernel.add_vm_with_copies(vm, VM_QUOTA, creator, u64::from(mask), &mut out);
                if !out.is_empty() {
                    log::error!(target: "guest", "vm{}: copies of its creator's capabilities sent {} messages to other kernels (not expected)", vm.raw(), out.len());
                }
                added
            }
        }
    };
    if spec.ring3_caps {
        mesh.instance(cpu).kernel.lock().allow_all_rings(vm);
    }
    if let Err(e) = registered {
        log::error!(target: "guest", "vm{}/{}: cannot register with the null-Kernel: {e:?}", vm.raw(), spec.name);
        return false;
    }
    let here = percpu::current_index() as usize;
    for (other, instance) in mesh.instances().enumerate() {
        if other != cpu {
            let mut kernel = loop {
                match instance.kernel.try_lock() {
                    Some(kernel) => break kernel,
                    None if running => crate::exomem::service(here),
                    None => {}
                }
                core::hint::spin_loop();
            };
            // The VM is a payer there too: what it delegates to that CPU's VMs is charged
            // to it (nk-caps, "Quotas").
            if let Err(e) = kernel.place(vm, KernelId::new(cpu as u16), VM_QUOTA) {
                log::error!(target: "guest", "vm{}/{}: cannot register with kernel {other}: {e:?}", vm.raw(), spec.name);
            }
        }
    }
    true
}

/// Hands `cpu` a queue again for a VM created at run time (`vmctl::create`): an idle AP
/// wakes and runs its queue, a CPU that runs one adopts the VM at its next slice boundary.
pub fn assign(cpu: usize) {
    WOKEN.fetch_add(1, Ordering::AcqRel);
    ASSIGNED[cpu].fetch_add(1, Ordering::AcqRel);
    if cpu != percpu::current_index() as usize {
        let apic_id = percpu::get(cpu).map_or(0, |c| c.apic_id());
        if !apic::send_wakeup(apic_id) {
            log::error!(target: "sched", "cpu {cpu} did not accept the wake-up for a created VM");
        }
    }
}

/// Makes the vCPUs of the VMs created for this CPU (`vmctl::adopt`) and adds them to
/// `guests`, stopped (state created) until a `start`.
fn adopt_created(cpu: usize, guests: &mut Vec<Running>, removals: &mut Vec<(PendingOp, VmId)>) {
    for (prepared, spec) in crate::vmctl::adopt(cpu) {
        let vm = prepared.vm;
        let mut spec = spec.clone();
        spec.name = alloc::string::String::from(crate::vmctl::name(vm));
        // A boot VM was registered at boot, with its module line's capabilities; a VM
        // created at run time gets the copies its creator chose.
        let copies = (prepared.caps != 0).then_some((prepared.creator, prepared.caps));
        if !prepared.boot && !register_with(mesh::mesh(), vm, cpu, &spec, true, copies) {
            drop(crate::exomem::unregister(vm));
            crate::vmctl::ended(vm);
            STOPPED.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        // Its capabilities live on this CPU's kernel instance: its NKCP table lists them.
        let handed = mesh::mesh().instance(cpu).kernel.lock().handed_caps(vm);
        crate::vmctl::write_nkcp(vm, &spec, prepared.ram, &handed);
        match Guest::create_lent(vm, &spec, &prepared.start, prepared.ram) {
            Ok(guest) => {
                guests.push(Running { guest, parked: None, stopped: true, destroyed: None });
            }
            Err(e) => {
                log::error!(target: "guest", "vm{}/{}: not created: {e}", vm.raw(), spec.name);
                finish(cpu, vm, false, removals);
            }
        }
    }
}

/// Waits for the protocol's last messages (every guest has ended, so no operation starts
/// any more), then checks that every kernel instance is idle and its table consistent.
fn settle(mesh: &Mesh) {
    let mut waited = 0;
    while !mesh::quiet() && waited < SETTLE_TIMEOUT_US {
        mesh.service(0);
        pit::wait_us(100);
        waited += 100;
    }
    let traffic = mesh::traffic();
    if !mesh::quiet() {
        log::error!(target: "mesh", "the protocol did not settle within {} s", SETTLE_TIMEOUT_US / 1_000_000);
    }
    let mut healthy = true;
    for (cpu, instance) in mesh.instances().enumerate() {
        let kernel = instance.kernel.lock();
        let pending = kernel.protocol().pending_ops();
        if !kernel.protocol().is_idle() {
            log::error!(target: "mesh", "kernel {cpu}: not idle after every guest ended ({pending} operations pending)");
            healthy = false;
        }
        if let Err(e) = kernel.table().check_consistency() {
            log::error!(target: "mesh", "kernel {cpu}: capability table inconsistent: {e:?}");
            healthy = false;
        }
    }
    if healthy {
        log::info!(target: "mesh", "{} kernel instances idle and consistent; {} messages sent ({} through overflow queues), {} doorbells, {} guest runs ended by an interrupt",
            mesh.len(), traffic.sent, traffic.overflowed, traffic.doorbells, traffic.interrupt_exits);
        if traffic.delegation_messages > 0 {
            // Read by `cargo xtask bench protocol` (the saturated simulation's message cost).
            log::info!(target: "mesh", "delegation messages handled: {}, {} TSC ticks each on the receiving CPU",
                traffic.delegation_messages, traffic.delegation_ticks / traffic.delegation_messages);
        }
    }
}

/// A guest of this CPU, the operation it waits for, if any, and what the guest-OS AM
/// asked of it (`vmctl`).
struct Running {
    guest: Guest,
    parked: Option<PendingOp>,
    /// Stopped by a `stop`: no slices until a `start`.
    stopped: bool,
    /// Destroyed (the log line's words): ends once no operation is parked.
    destroyed: Option<alloc::string::String>,
}

/// Runs this CPU's guests in round-robin time slices until each has ended and its removal
/// from the null-Kernel is complete on every kernel instance.
fn run_queue(cpu: usize) {
    let mesh = mesh::mesh();
    let specs = core::mem::take(&mut *QUEUES[cpu].lock());
    let rate = crate::vmx::capabilities().preemption_timer_rate;
    let mut sink = LocalKernel { cpu, mesh };
    let mut guests = Vec::new();
    let mut removals = Vec::new();
    adopt_created(cpu, &mut guests, &mut removals);
    for (vm, spec) in specs {
        let vcpus = match spec.vcpus {
            1 => alloc::string::String::new(),
            n => alloc::format!(", {n} vCPUs on this CPU"),
        };
        log::info!(target: "guest", "vm{}/{}: starting on cpu {cpu} ({} KiB image, {} MiB memory{vcpus})",
            vm.raw(), spec.name, spec.image.len() / 1024, spec.memory >> 20);
        match Guest::create(vm, &spec) {
            Ok(guest) => {
                crate::vmctl::set_state(vm, nk_am_guest_os::state::RUNNING);
                guests.push(Running { guest, parked: None, stopped: false, destroyed: None })
            }
            Err(e) => {
                log::error!(target: "guest", "vm{}/{}: not started: {e}", vm.raw(), spec.name);
                finish(cpu, vm, false, &mut removals);
            }
        }
    }
    let mut finished = Vec::new();
    while !guests.is_empty() || !removals.is_empty() {
        mesh.service(cpu);
        mesh.take_finished(cpu, &mut finished);
        for done in finished.drain(..) {
            if let Some(running) = guests.iter_mut().find(|r| r.parked == Some(done.op)) {
                if done.reply.status().code() == nk_abi::Status::QUOTA_EXCEEDED {
                    note_remote_quota_refusal(running.guest.vm());
                }
                running.guest.resume(done.reply);
                running.parked = None;
            } else if let Some(i) = removals.iter().position(|&(op, _)| op == done.op) {
                let (_, vm): (PendingOp, VmId) = removals.swap_remove(i);
                log::debug!(target: "guest", "vm{}: {} capabilities revoked on every kernel", vm.raw(), done.reply.results[0]);
            } else {
                log::error!(target: "sched", "cpu {cpu}: a finished operation ({:?}) that no one waits for", done.op);
            }
        }
        if crate::vmctl::pending(cpu) {
            control(cpu, &mut guests, &mut removals);
        }
        let mut ran = false;
        let mut index = 0;
        while index < guests.len() {
            if guests[index].parked.is_some() {
                index += 1;
                continue;
            }
            if guests[index].destroyed.is_some() {
                let Running { guest, destroyed, .. } = guests.swap_remove(index);
                let vm = guest.vm();
                if guest.is_debugged() {
                    crate::gdb::ended(vm, false);
                }
                log::warn!(target: "guest", "vm{}/{}: {}, after {} exits",
                    vm.raw(), guest.name(), destroyed.unwrap_or_default(), guest.exits());
                drop(guest);
                finish(cpu, vm, false, &mut removals);
                continue;
            }
            if guests[index].stopped {
                index += 1;
                continue;
            }
            ran = true;
            if guests[index].guest.is_debugged() && !crate::gdb::may_run(&mut guests[index].guest) {
                // Stopped in the debugger: the CPU's other guests take its turn.
                index += 1;
                continue;
            }
            let slice = guests[index].guest.run_slice(&mut sink, TIME_SLICE_TICKS, rate);
            crate::vmctl::set_exits(guests[index].guest.vm(), guests[index].guest.exits());
            match slice {
                // Another vCPU of the same VM may have its turn in this round (guest/vcpus.rs).
                Slice::Expired if guests[index].guest.takes_next_turn() => {}
                Slice::Expired => {
                    index += 1;
                    // A directed yield: the VM it named runs next when its turn in this
                    // round is still to come (it moves ahead; the others keep their turns).
                    if let Some(to) = crate::vmctl::take_yield(cpu) {
                        if let Some(at) = guests.iter().skip(index).position(|r| r.guest.vm() == to) {
                            guests.swap(index, index + at);
                        }
                    }
                }
                Slice::Parked(op) => {
                    guests[index].parked = Some(op);
                    index += 1;
                }
                Slice::Ended(end) => {
                    let guest = guests.swap_remove(index).guest;
                    if guest.is_debugged() {
                        crate::gdb::ended(guest.vm(), end.is_clean());
                    }
                    let (vm, name, exits) = (guest.vm(), guest.name(), guest.exits());
                    match &end {
                        GuestEnd::Halted => {
                            log::info!(target: "guest", "vm{}/{name}: halted after {exits} exits", vm.raw())
                        }
                        GuestEnd::Stopped(why) => log::warn!(target: "guest", "vm{}/{name}: stopped: {why}", vm.raw()),
                        GuestEnd::Finished(how) => {
                            log::info!(target: "guest", "vm{}/{name}: ended: {how}, after {exits} exits", vm.raw())
                        }
                    }
                    // Its capabilities die first: the exo AM undoes every mapping of its
                    // memory in other VMs (on every CPU) before the memory is freed.
                    finish(cpu, vm, end.is_clean(), &mut removals);
                    drop(guest);
                }
            }
        }
        // Sleep only while something still waits for other kernels: the completion just
        // handled may have been the last thing this CPU waited for.
        let waiting = !guests.is_empty() || !removals.is_empty();
        if !ran && waiting {
            arch::sleep_unless(|| mesh.service(cpu) > 0 || mesh.has_finished(cpu) || crate::vmctl::pending(cpu));
        }
    }
}

/// Applies the guest-OS AM's requests for this CPU's VMs (`vmctl`) at a slice boundary:
/// stop and start flip whether a VM gets slices (a parked VM stays parked either way);
/// destroy marks it to end before its next slice, or once its parked operation finished.
/// When no VM is active any more, the stopped ones left are ended (`vmctl::orphaned`).
/// VMs created for this CPU are adopted first, so requests for them apply.
fn control(cpu: usize, guests: &mut Vec<Running>, removals: &mut Vec<(PendingOp, VmId)>) {
    use nk_am::VmAction;
    use nk_am_guest_os::state;
    let orphaned = crate::vmctl::orphaned();
    let requests = crate::vmctl::take(cpu);
    adopt_created(cpu, guests, removals);
    for (vm, action, by) in requests {
        let Some(running) = guests.iter_mut().find(|r| r.guest.vm() == vm) else { continue };
        if running.destroyed.is_some() {
            continue;
        }
        let name = running.guest.name();
        match action {
            VmAction::Stop if !running.stopped => {
                running.stopped = true;
                crate::vmctl::set_state(vm, state::STOPPED);
                log::info!(target: "guest", "vm{}/{name}: stopped by vm{}/{} after {} exits",
                    vm.raw(), by.raw(), crate::vmctl::name(by), running.guest.exits());
            }
            VmAction::Start if running.stopped => {
                running.stopped = false;
                crate::vmctl::set_state(vm, state::RUNNING);
                // The boot principal's start of a boot VM is the boot's own (bootvm.rs).
                if by != crate::vmctl::BOOT_PRINCIPAL {
                    log::info!(target: "guest", "vm{}/{name}: started by vm{}/{}", vm.raw(), by.raw(), crate::vmctl::name(by));
                }
            }
            VmAction::Destroy => {
                let parked = if running.parked.is_some() {
                    " (once the cross-kernel operation it waited for finished)"
                } else {
                    ""
                };
                running.destroyed =
                    Some(alloc::format!("destroyed by vm{}/{}{parked}", by.raw(), crate::vmctl::name(by)))
            }
            VmAction::Stop | VmAction::Start | VmAction::YieldTo => {}
        }
    }
    if orphaned {
        for running in guests.iter_mut().filter(|r| r.stopped && r.destroyed.is_none()) {
            running.destroyed =
                Some(alloc::string::String::from("ended: stopped, and no running VM is left to start it"));
        }
    }
}

/// VMs whose first refusal by another kernel instance for a spent quota was logged.
static REMOTE_QUOTA_LOGGED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Logs, once per VM, that another kernel instance refused a parked call for a spent
/// quota (issue 9; nk-core logs the refusals its own instance makes).
#[cold]
fn note_remote_quota_refusal(vm: VmId) {
    if REMOTE_QUOTA_LOGGED.lock().insert(vm.raw()) {
        log::warn!(target: "nk", "vm{}: refused: quota exceeded on another kernel instance (later refusals are not logged)", vm.raw());
    }
}

/// Removes an ended VM from its kernel instance (its capabilities die on every kernel, its
/// AMs undo their effects); a removal that waits for other kernels is added to `removals`.
fn finish(cpu: usize, vm: VmId, halted: bool, removals: &mut Vec<(PendingOp, VmId)>) {
    crate::vmctl::ended(vm);
    match mesh::mesh().remove_vm(cpu, vm) {
        Ok(Dispatched::Reply(reply)) => {
            log::debug!(target: "guest", "vm{}: {} capabilities revoked", vm.raw(), reply.results[0])
        }
        Ok(Dispatched::Pending(op)) => removals.push((op, vm)),
        Err(e) => log::error!(target: "guest", "vm{}: cannot remove from the null-Kernel: {e:?}", vm.raw()),
    }
    let counter = if halted { &HALTED } else { &STOPPED };
    counter.fetch_add(1, Ordering::AcqRel);
}

/// The idle loop of an application processor: sleeps until the BSP assigns it guests.
pub fn ap_idle(cpu: usize) -> ! {
    loop {
        let taken = ASSIGNED[cpu].swap(0, Ordering::AcqRel);
        if taken > 0 {
            run_queue(cpu);
            CPUS_FINISHED.fetch_add(taken, Ordering::AcqRel);
        }
        // Until the BSP assigns guests, and after they ended, the CPU's kernel instance
        // still answers the other kernels.
        arch::sleep_unless(|| {
            mesh::get().is_some_and(|mesh| mesh.service(cpu) > 0) || ASSIGNED[cpu].load(Ordering::Acquire) > 0
        });
    }
}
