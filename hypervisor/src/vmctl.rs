//! VMs as objects of the guest-OS AM (`am/guest-os`): the board of VM records the AM's
//! `inspect` reads (state, CPU, exits, published here at slice boundaries), and the
//! control requests (`Effect::VmControl`: stop, start, destroy) its operations emit.
//!
//! An effect is applied on the caller's CPU, before its call returns: it records the
//! request for the VM and raises the flag of the VM's CPU; if that is another CPU, the
//! wake-up IPI (the doorbell's vector) makes an idle CPU notice, and a CPU running a guest
//! takes the request at its next slice boundary (a slice is at most `TIME_SLICE_TICKS`).
//! The scheduler of the VM's CPU then applies it (`sched`): a stopped VM gets no slices
//! until started; a destroyed VM ends as a guest ends, its capabilities dying on every
//! kernel, once any cross-kernel operation it is parked on has finished.
//!
//! Only a running VM can start a stopped one: when every VM is stopped or ended, the
//! stopped ones (and created ones never started) can never run again and are ended (each
//! with a line saying so), so a run always finishes.
//!
//! `create` (`Effect::CreateVm`) builds a VM from an image at run time, in two halves: on
//! the creator's CPU, before its call returns, the lent RAM is zeroed and loaded and an
//! EPT mapping it is registered (the frames cannot die meanwhile: the exo AM lends only an
//! allocation whose capability lives on the creator's own kernel instance, whose lock the
//! call holds); then the VM's CPU registers it with its kernel instance and makes its
//! vCPU at its next slice boundary ([`adopt`]), in state created, until a `start`.
//! The VM's NKCP ACPI table is written then, on its own CPU, from its own kernel
//! instance (which the creator's call could not lock): see [`write_nkcp`].
//!
//! **Boot VMs.** A boot module that is a guest OS (Linux, Multiboot) comes into being the
//! same way (`bootvm.rs`): it is an image of the guest-OS AM, held by the hypervisor's
//! boot principal ([`BOOT_PRINCIPAL`], a principal on CPU 0's kernel instance for the
//! boot), which allocates the VM's RAM with the exo AM (charged to its own frame quota,
//! the sum of those modules' `mem=`), `create`s the VM under the id the boot gave it, and
//! `start`s it. The boot principal ends when every guest has, and its frames go back then.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use nk_am::VmAction;
use nk_am_guest_os::{state, VmBoard, VmRecord};
use nk_caps::VmId;
use spin::{Mutex, Once};

use crate::arch::apic;
use crate::guest::GuestSpec;
use crate::osvm::OsStart;
use crate::percpu::{self, MAX_CPUS};

/// The principal that builds the boot VMs that are guest OSes (not a VM: it never runs).
pub const BOOT_PRINCIPAL: VmId = VmId::new(0);

static BOARD: Once<Arc<VmBoard>> = Once::new();
/// The boot VMs (ids 1 to this); created VMs follow.
static BOOT_VMS: AtomicU32 = AtomicU32::new(0);
/// The `image` modules, by image number (the guest-OS AM's `image` object ids).
static IMAGES: Once<Vec<GuestSpec>> = Once::new();
/// The boot VMs built from an image (`bootvm.rs`), with it.
static BOOT_IMAGES: Once<Vec<nk_am_guest_os::BootVm>> = Once::new();

/// A VM `create` built on its creator's CPU, waiting for its own CPU to adopt it.
pub struct Prepared {
    pub vm: VmId,
    pub cpu: usize,
    pub image: u32,
    pub start: OsStart,
    /// Its RAM: (host-physical address, bytes).
    pub ram: (u64, u64),
    /// A boot VM (registered with its kernel instance at boot already).
    pub boot: bool,
    /// Its creator, and which of the creator's `INITIAL` capabilities the VM gets copies
    /// of (bit i: capability i), made when its CPU (the creator's) adopts it.
    pub creator: VmId,
    pub caps: u32,
}

/// The VMs created and not adopted yet (at most `CREATED_VMS_MAX` over the run).
static PREPARED: Mutex<Vec<Prepared>> = Mutex::new(Vec::new());
/// The request waiting for each VM (at most one: a later one replaces it, but nothing
/// replaces a destroy), with the VM that asked.
static REQUESTS: Mutex<Vec<(VmId, VmAction, VmId)>> = Mutex::new(Vec::new());
/// A CPU has requests for its VMs.
/// The VM each CPU runs next (a directed yield, `VmAction::YieldTo`; 0: none).
static YIELDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static PENDING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// VMs that are neither stopped nor ended (created ones count: they will run). When none
/// is left, no VM can ever start a stopped one again.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Makes the board of the VMs the boot modules describe (VM i+1 is module i), with
/// their CPU unknown until placed; the AM gets a reference to it.
pub fn install(records: Vec<VmRecord>) -> Arc<VmBoard> {
    BOARD
        .call_once(|| {
            ACTIVE.store(records.len(), Ordering::Release);
            BOOT_VMS.store(records.len() as u32, Ordering::Release);
            Arc::new(VmBoard::new(records))
        })
        .clone()
}

fn record(vm: VmId) -> Option<&'static VmRecord> {
    BOARD.get().and_then(|board| board.get(vm))
}

/// Publishes the CPU a VM was placed on.
pub fn placed(vm: VmId, cpu: usize) {
    if let Some(r) = record(vm) {
        r.set_cpu(cpu as u32);
    }
}

/// Publishes a VM's state (`nk_am_guest_os::state`) and counts the active VMs; when the
/// last active VM stops or ends while some are stopped, every CPU is told (`orphaned`).
pub fn set_state(vm: VmId, new: u8) {
    let Some(r) = record(vm) else { return };
    let old = r.set_state(new);
    // A boot VM that is created will run; a VM created at run time runs only if started.
    let boot = vm.raw() <= BOOT_VMS.load(Ordering::Acquire);
    let active = |s: u8| s == state::RUNNING || (boot && s == state::CREATED);
    if active(old) == active(new) || old == state::ENDED {
        return;
    }
    if active(new) {
        ACTIVE.fetch_add(1, Ordering::AcqRel);
    } else if ACTIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
        let board = BOARD.get().expect("records exist only on the board");
        let mut cpus = 0u64;
        let boot_vms = BOOT_VMS.load(Ordering::Acquire);
        let waiting =
            |r: &&VmRecord| r.state() == state::STOPPED || (r.state() == state::CREATED && r.vm().raw() > boot_vms);
        for stopped in board.records().filter(waiting) {
            cpus |= 1 << stopped.cpu().min(63);
        }
        let me = percpu::current_index() as usize;
        while cpus != 0 {
            let cpu = cpus.trailing_zeros() as usize;
            cpus &= cpus - 1;
            if cpu >= MAX_CPUS {
                continue;
            }
            PENDING[cpu].store(true, Ordering::Release);
            if cpu != me {
                let _ = apic::send_wakeup(percpu::get(cpu).map_or(0, |c| c.apic_id()));
            }
        }
    }
}

/// Tells whether no VM is active any more (all stopped or ended): then nothing can start
/// a stopped VM again. Read before [`take`], so every request an active VM made before it
/// stopped or ended is among those taken.
pub fn orphaned() -> bool {
    ACTIVE.load(Ordering::Acquire) == 0
}

/// Publishes a VM's exit count (at the end of each of its slices).
pub fn set_exits(vm: VmId, exits: u64) {
    if let Some(r) = record(vm) {
        r.set_exits(exits);
    }
}

/// Publishes that a VM ended.
pub fn ended(vm: VmId) {
    set_state(vm, state::ENDED);
}

/// Applies an `Effect::VmControl`: records the request and makes the VM's CPU notice it.
pub fn apply(vm: VmId, action: VmAction, by: VmId) {
    let Some(r) = record(vm) else {
        log::error!(target: "guest", "vm{}: control request from vm{} for an unknown VM ignored", vm.raw(), by.raw());
        return;
    };
    let cpu = r.cpu() as usize;
    if cpu >= MAX_CPUS {
        return;
    }
    if action == VmAction::YieldTo {
        // The caller's hypercall is being dispatched on its own CPU, the target's (the AM
        // checked): the caller's VMCS is the current one, and its next entry exits at once.
        if cpu == percpu::current_index() as usize {
            YIELDS[cpu].store(vm.raw(), Ordering::Relaxed);
            crate::vmx::vcpu::expire_current_slice();
        }
        return;
    }
    {
        let mut requests = REQUESTS.lock();
        match requests.iter_mut().find(|(v, _, _)| *v == vm) {
            Some((_, VmAction::Destroy, _)) => {}
            Some(request) => *request = (vm, action, by),
            None => requests.push((vm, action, by)),
        }
    }
    PENDING[cpu].store(true, Ordering::Release);
    if cpu != percpu::current_index() as usize {
        let apic_id = percpu::get(cpu).map_or(0, |c| c.apic_id());
        if !apic::send_wakeup(apic_id) {
            log::error!(target: "guest", "cpu {cpu} did not accept the wake-up for vm{}'s control request", vm.raw());
        }
    }
}

/// Takes the VM a guest of `cpu` yielded to in the slice that just ended.
pub fn take_yield(cpu: usize) -> Option<VmId> {
    let vm = YIELDS[cpu].swap(0, Ordering::Relaxed);
    (vm != 0).then(|| VmId::new(vm))
}

/// Tells whether requests wait for `cpu`'s VMs (one atomic load: cheap at every slice).
pub fn pending(cpu: usize) -> bool {
    PENDING[cpu].load(Ordering::Acquire)
}

/// Takes the requests for `cpu`'s VMs, in the order they came.
pub fn take(cpu: usize) -> Vec<(VmId, VmAction, VmId)> {
    if !PENDING[cpu].swap(false, Ordering::AcqRel) {
        return Vec::new();
    }
    let mut requests = REQUESTS.lock();
    let mine = requests.iter().filter(|(vm, _, _)| record(*vm).is_some_and(|r| r.cpu() as usize == cpu)).copied();
    let taken: Vec<_> = mine.collect();
    requests.retain(|request| !taken.contains(request));
    taken
}

/// Returns a VM's name for log lines (`?` if unknown).
pub fn name(vm: VmId) -> &'static str {
    if vm == BOOT_PRINCIPAL {
        return "boot";
    }
    record(vm).map_or("?", VmRecord::name)
}

/// Keeps the images the guest-OS AM's `create` builds VMs from: the `image` modules, then
/// the boot modules that are guest OSes (`boot` says which VM each is).
pub fn install_images(images: Vec<GuestSpec>, boot: Vec<nk_am_guest_os::BootVm>) {
    IMAGES.call_once(|| images);
    BOOT_IMAGES.call_once(|| boot);
}

/// Returns the image boot VM `vm` is built from, if it is built through the guest-OS AM.
pub fn boot_image(vm: VmId) -> Option<u32> {
    BOOT_IMAGES.get()?.iter().find(|b| b.vm == vm).map(|b| b.image)
}

fn is_boot_vm(vm: VmId) -> bool {
    vm.raw() <= BOOT_VMS.load(Ordering::Acquire)
}

fn image(index: u32) -> Option<&'static GuestSpec> {
    IMAGES.get()?.get(index as usize)
}

/// Tells whether image `index` loads into `bytes` of RAM: its loader runs against that
/// much memory, checking every write's bounds and writing nothing (the guest-OS AM's
/// `ImageFits`).
pub fn image_fits(index: u32, bytes: u64) -> bool {
    let Some(spec) = image(index) else { return false };
    let kind = nk_loader::image::ImageKind::detect(spec.image);
    let mut bounds = crate::osvm::Bounds { size: bytes };
    crate::osvm::load(VmId::new(0), kind, spec, &mut bounds, false, &[]).is_ok()
}

/// Applies an `Effect::CreateVm` on the creator's CPU, before its call returns: zeroes the
/// lent RAM, loads the image into it, registers an EPT mapping it at guest-physical 0 for
/// the VM's CPU, and hands the VM to that CPU ([`adopt`]). A failure ends the VM with a
/// line (the frames stay the creator's).
pub fn create(vm: VmId, image_index: u32, cpu: u32, ram: (u64, u64), creator: (VmId, u32)) {
    let (by, handed) = creator;
    let cpu = cpu as usize;
    let name = self::name(vm);
    let fail = |why: &str| {
        log::error!(target: "guest", "vm{}/{name}: not created for vm{}/{}: {why}", vm.raw(), by.raw(), self::name(by));
        ended(vm);
    };
    let Some(spec) = image(image_index) else { return fail("no such image") };
    if cpu >= MAX_CPUS || percpu::get(cpu).is_none_or(|c| !c.in_vmx_root()) {
        return fail("its CPU is not online");
    }
    let (hpa, bytes) = ram;
    let boot = is_boot_vm(vm) && by == BOOT_PRINCIPAL;
    if !boot {
        // SAFETY: the exo AM lent these frames (the creator's own allocation from the
        // hypervisor's allocator, identity-mapped, bounded by its frame quota) for this
        // VM; they cannot be freed before this effect returns (see the module docs). The
        // new VM does not run yet; a VM the creator shared part of the set with may write
        // it meanwhile, which only changes what the new VM sees: the loader writes and
        // never reads back. (A boot VM's frames come zeroed from the allocator, and only
        // the boot principal, which never runs, holds them: not zeroed twice.)
        unsafe { core::ptr::write_bytes(hpa as *mut u8, 0, bytes as usize) };
    }
    let kind = nk_loader::image::ImageKind::detect(spec.image);
    let mut memory = crate::osvm::GuestRam { base: hpa, size: bytes };
    // The creator's kernel instance is locked while this effect is applied, and the new
    // VM's capabilities live on its own CPU's: its NKCP table is written when that CPU
    // adopts it (`write_nkcp`).
    let start = match crate::osvm::load(vm, kind, spec, &mut memory, true, &[]) {
        Ok(start) => start,
        Err(why) => return fail(&why),
    };
    let caps = crate::vmx::capabilities();
    let mut ept = match crate::vmx::ept::GuestEpt::new(&caps) {
        Ok(ept) => ept,
        Err(e) => return fail(&alloc::format!("EPT: {e}")),
    };
    if let Err(e) = ept.map_range(0, hpa, bytes, nk_paging::EptPerms::RWX) {
        return fail(&alloc::format!("EPT: {e}"));
    }
    crate::exomem::register(vm, ept, cpu, ram);
    if boot {
        log::info!(target: "guest", "vm{}/{name}: created through the guest-OS AM by the boot principal on cpu {cpu}, {} KiB of its frames as RAM",
            vm.raw(), bytes / 1024);
    } else {
        log::info!(target: "guest", "vm{}/{name}: created by vm{}/{} from image '{}' on cpu {cpu}, {} KiB of its frames as RAM",
            vm.raw(), by.raw(), self::name(by), spec.name, bytes / 1024);
    }
    PREPARED.lock().push(Prepared { vm, cpu, image: image_index, start, ram, boot, creator: by, caps: handed });
    PENDING[cpu].store(true, Ordering::Release);
    crate::sched::assign(cpu);
}

/// Takes the VMs created for `cpu`, with their image, for it to adopt.
pub fn adopt(cpu: usize) -> Vec<(Prepared, &'static GuestSpec)> {
    let mut prepared = PREPARED.lock();
    if prepared.iter().all(|p| p.cpu != cpu) {
        return Vec::new();
    }
    let (mine, others): (Vec<Prepared>, Vec<Prepared>) =
        core::mem::take(&mut *prepared).into_iter().partition(|p| p.cpu == cpu);
    *prepared = others;
    drop(prepared);
    mine.into_iter().filter_map(|p| image(p.image).map(|spec| (p, spec))).collect()
}

/// Writes VM `vm`'s ACPI tables again, with its NKCP table listing `handed` (its initial
/// capabilities, read from its own kernel instance on its own CPU when that CPU adopts it;
/// `osvm::write_nkcp`). The VM has not run yet.
pub fn write_nkcp(vm: VmId, spec: &GuestSpec, ram: (u64, u64), handed: &[nk_abi::nkcp::Entry]) {
    let mut memory = crate::osvm::GuestRam { base: ram.0, size: ram.1 };
    if let Err(why) = crate::osvm::write_acpi(vm, spec, &mut memory, handed) {
        log::error!(target: "guest", "vm{}/{}: its NKCP table could not be written: {why}", vm.raw(), spec.name);
    }
}
