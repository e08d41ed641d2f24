//! The hypervisor's side of the exo AM's memory (issue 10): it lends the AM its frame
//! allocator, keeps every guest's EPT where the AM's effects can reach it, and applies
//! `MapFrames`, `UnmapFrames`, `ProtectFrames` and `FreeFrames`.
//!
//! A guest's EPT is registered here when the guest is created and taken back (and
//! dropped: INVEPT, then its tables freed) when it is torn down, on its CPU. An effect for
//! a VM that is not registered (gone, or not started yet) changes no EPT.
//!
//! # Invalidation (docs/tlb.md, "The rule for every CPU")
//!
//! Taking access away (unmap, protect) invalidates the VM's EPTP on every CPU that may
//! cache its translations before the effect returns, so before the call that caused it
//! returns, before the protocol's answer for a remote copy leaves (the mesh applies a
//! step's effects before it sends the step's messages), and before the frames it freed
//! can be handed out again. A vCPU never leaves the CPU that created it, so that CPU is
//! the only one: when it is the CPU applying the effect, a local INVEPT suffices;
//! otherwise this CPU asks it (a per-CPU request count and a wake-up IPI) and waits for its
//! answer. The guest's CPU answers in [`service`], which the mesh runs whenever the CPU
//! takes an interrupt that ended a guest's run, waits, or idles: a guest that runs when
//! the IPI arrives exits (external-interrupt exiting), and one about to enter takes the
//! pending IPI as an exit right after VM entry, so the next guest access re-walks the
//! EPT. While it waits, the asking CPU answers requests made of it, so two CPUs that shoot
//! each other down both finish. A CPU that does not answer in time leaves the VM marked:
//! frames unmapped from it are never given back (a `FreeFrames` is dropped, with an error
//! line), so no other owner gets a frame a stale translation may still reach.
//!
//! Freed frames are zeroed before they go back to the allocator; the allocator hands AMs
//! zeroed frames too.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use nk_am::{Effect, FrameSource};
use nk_caps::VmId;
use spin::Mutex;

use crate::memory::{self, HostPhysAddr, PAGE_SIZE};
use crate::percpu::MAX_CPUS;
use crate::vmx::ept::GuestEpt;

/// A guest's EPT and the CPU that runs it.
struct Registered {
    ept: GuestEpt,
    cpu: usize,
    /// The VM's initial memory: (host-physical address, bytes).
    memory: (u64, u64),
    /// An unmap could not be invalidated on the VM's CPU: frames it unmapped stay out of
    /// the allocator.
    remote_stale: bool,
    /// Its Page-Modification Log, once the VM turned it on.
    pml: Option<Pml>,
}

/// A VM's Page-Modification Log (SDM Vol. 3 §29.3.6): the CPU writes the guest-physical
/// address of each page whose EPT dirty flag it sets into `log` (512 entries, from index
/// 511 down); a PML-full exit and a drain move them into `seen`, a bitmap of the range.
struct Pml {
    gpa: u64,
    pages: u64,
    log: HostPhysAddr,
    seen: Vec<u64>,
}

/// Secondary processor-based control "enable PML" (SDM Vol. 3 §25.6.2, bit 17).
const ENABLE_PML: u64 = 1 << 17;
const PML_ENTRIES: u64 = 512;

impl Pml {
    /// Moves the logged addresses into `seen` and resets the index (the VM's VMCS must be
    /// the current one).
    fn collect(&mut self) {
        use crate::vmx::vmcs::{self, VmcsField};
        let index = vmcs::read(VmcsField::GUEST_PML_INDEX).unwrap_or(PML_ENTRIES - 1) & 0xFFFF;
        // The CPU logs at the index, then decrements it; past 0 it wraps and the log is full.
        let first = if index >= PML_ENTRIES { 0 } else { index + 1 };
        for entry in first..PML_ENTRIES {
            // SAFETY: the log frame is this VM's, identity-mapped; the CPU wrote the
            // entries below the index before this exit (no guest runs meanwhile).
            let gpa = unsafe { core::ptr::read_volatile((self.log.as_u64() + 8 * entry) as *const u64) } & !0xFFF;
            if gpa >= self.gpa && gpa < self.gpa + self.pages * PAGE_SIZE {
                let page = (gpa - self.gpa) / PAGE_SIZE;
                self.seen[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        // SAFETY: resets the index of the current VMCS, which is this VM's.
        let _ = unsafe { vmcs::write(VmcsField::GUEST_PML_INDEX, PML_ENTRIES - 1) };
    }
}

/// Counts PML-full exits (for the log).
static PML_FULL_EXITS: AtomicU64 = AtomicU64::new(0);

/// Handles a PML-full exit of `vm` (its VMCS is current): collects the log.
pub fn pml_full(vm: VmId) {
    PML_FULL_EXITS.fetch_add(1, Ordering::Relaxed);
    if let Some(pml) = EPTS.lock().get_mut(&vm.raw()).and_then(|r| r.pml.as_mut()) {
        pml.collect();
    }
}

/// Returns how many PML-full exits were handled.
pub fn pml_full_exits() -> u64 {
    PML_FULL_EXITS.load(Ordering::Relaxed)
}

static EPTS: Mutex<BTreeMap<u32, Registered>> = Mutex::new(BTreeMap::new());

/// Invalidation requests made of each CPU, and the last one it answered.
static REQUESTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static ANSWERED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// How long a CPU waits for another's answer (TSC ticks: emulated instructions in Bochs).
const SHOOTDOWN_TIMEOUT: u64 = 2_000_000_000;
/// Shootdowns sent to other CPUs (for the log).
static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);

/// The frame allocator as the AMs see it.
pub struct HypervisorFrames;

/// The one instance lent to every kernel instance.
pub static FRAMES: HypervisorFrames = HypervisorFrames;

impl FrameSource for HypervisorFrames {
    fn allocate(&self, bytes: u64, align: u64) -> Option<u64> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) || bytes < align {
            return None;
        }
        // The buddy allocator aligns a run to its size rounded up to a power of two, which
        // covers `align` (a power of two no larger than `bytes`).
        let frame = memory::alloc_frames((bytes / PAGE_SIZE) as usize)?;
        // SAFETY: the frames were just allocated (nobody else holds them) and lie below
        // the identity-mapped limit the allocator was given.
        unsafe { core::ptr::write_bytes(frame.as_u64() as *mut u8, 0, bytes as usize) };
        Some(frame.as_u64())
    }
}

/// Registers `vm`'s EPT, which runs on `cpu`, and its initial memory `(hpa, bytes)`.
pub fn register(vm: VmId, ept: GuestEpt, cpu: usize, memory: (u64, u64)) {
    EPTS.lock().insert(vm.raw(), Registered { ept, cpu, memory, remote_stale: false, pml: None });
}

/// Maps a hypervisor-owned page (a guest OS's APIC-access page) into `vm`'s EPT before the
/// VM first runs, so no CPU holds a translation to invalidate. The exo AM never maps at
/// such an address: it lies above the range its mappings may use. A VM with no EPT
/// registered gets `NotMapped`.
pub fn map_device_page(vm: VmId, gpa: u64, hpa: u64, perms: nk_paging::EptPerms) -> Result<(), nk_paging::EptError> {
    let mut epts = EPTS.lock();
    match epts.get_mut(&vm.raw()) {
        Some(r) => r.ept.map_range(gpa, hpa, PAGE_SIZE, perms),
        None => Err(nk_paging::EptError::NotMapped),
    }
}

/// Returns the EPTP of `vm`'s registered EPT.
pub fn eptp(vm: VmId) -> Option<u64> {
    EPTS.lock().get(&vm.raw()).map(|r| r.ept.eptp())
}

/// Runs `f` on `vm`'s registered EPT (the lwC views' copy-on-write protection, lwc.rs;
/// the caller invalidates what it took away). None when `vm` has no EPT here.
pub fn with_ept<R>(vm: VmId, f: impl FnOnce(&mut GuestEpt) -> R) -> Option<R> {
    EPTS.lock().get_mut(&vm.raw()).map(|r| f(&mut r.ept))
}

/// Returns where `vm`'s initial memory lies (the exo AM's `Kernel::guest_memory`).
pub fn guest_memory(vm: VmId) -> Option<(u64, u64)> {
    EPTS.lock().get(&vm.raw()).map(|r| r.memory)
}

/// Takes `vm`'s EPT back (to drop it on its CPU at teardown, after its VMCS was cleared),
/// and frees its PML log.
pub fn unregister(vm: VmId) -> Option<GuestEpt> {
    let r = EPTS.lock().remove(&vm.raw())?;
    if let Some(pml) = r.pml {
        memory::free_frame(pml.log);
    }
    Some(r.ept)
}

/// Reads and clears the EPT dirty flags (SDM Vol. 3 §29.3.5) of the `pages` 4 KiB pages
/// from `gpa` in `vm` into `bitmap` (bit i of byte i / 8 for page i), then invalidates
/// the VM's translations if any was dirty, so the next write sets the flag again (SDM
/// Vol. 3 §29.4.3.1). Without EPT A/D flags every page reads as dirty. False (bitmap
/// untouched) when `vm` has no EPT here or the bitmap is too short.
pub fn take_dirty(vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool {
    let mut epts = EPTS.lock();
    let Some(r) = epts.get_mut(&vm.raw()) else { return false };
    let Some(bitmap) = bitmap.get_mut(..pages.div_ceil(8) as usize) else { return false };
    if !r.ept.has_dirty_flags() {
        bitmap.fill(0xFF);
        return true;
    }
    bitmap.fill(0);
    let mut found = false;
    // A large page's flag stands for each of its 4 KiB pages in the range.
    r.ept.take_dirty_pages(gpa, pages, &mut |first, count| {
        found = true;
        for p in first..first + count {
            if let Some(byte) = bitmap.get_mut((p / 8) as usize) {
                *byte |= 1 << (p % 8);
            }
        }
    });
    let (cpu, eptp) = (r.cpu, r.ept.eptp());
    drop(epts);
    if found {
        invalidate(vm, cpu, eptp);
    }
    true
}

/// Reads the dirty flags of `pages` pages from `gpa` in `vm` into `bitmap` as
/// [`take_dirty`] does, leaving them set (no invalidation needed: nothing changed).
fn peek_dirty(vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) {
    let mut epts = EPTS.lock();
    let Some(r) = epts.get_mut(&vm.raw()) else { return };
    let Some(bitmap) = bitmap.get_mut(..pages.div_ceil(8) as usize) else { return };
    if !r.ept.has_dirty_flags() {
        bitmap.fill(0xFF);
        return;
    }
    bitmap.fill(0);
    let mut page = 0;
    while page < pages {
        let (dirty, size) = r.ept.peek_dirty(gpa + page * PAGE_SIZE);
        let step = (size / PAGE_SIZE).min(pages - page).max(1);
        if dirty {
            for p in page..page + step {
                bitmap[(p / 8) as usize] |= 1 << (p % 8);
            }
        }
        page += step;
    }
}

/// Applies an exo memory effect.
pub fn apply(effect: Effect) {
    let mut epts = EPTS.lock();
    match effect {
        Effect::MapFrames { vm, gpa, hpa, bytes, large, access } => {
            let Some(r) = epts.get_mut(&vm.raw()) else { return };
            // No INVEPT: the range was not present (the AM refuses a map over a mapping),
            // and a translation that causes an EPT violation creates no guest-physical or
            // combined mapping (SDM Vol. 3 §29.4.2), so no CPU caches anything for a
            // not-present entry and the next access walks the EPT and finds the new one;
            // a change from not present to present needs no invalidation (§29.4.3.3, as
            // §4.10.4.3 says for ordinary paging). Widening an entry needs none either
            // (the CPU re-walks on a violation, §29.4.3.1).
            // Small-page sets stay small pages, so their dirty flags are per 4 KiB.
            let perms = nk_paging::EptPerms::from_bits(access);
            let mapped = match large {
                true => r.ept.map_range(gpa, hpa, bytes, perms),
                false => r.ept.map_range_4k(gpa, hpa, bytes, perms),
            };
            if let Err(e) = mapped {
                log::error!(target: "exo", "vm{}: mapping {bytes:#x} bytes at {gpa:#x} failed: {e}", vm.raw());
            }
        }
        Effect::UnmapFrames { vm, gpa, bytes } => {
            let Some(r) = epts.get_mut(&vm.raw()) else { return };
            r.ept.unmap_range(gpa, bytes);
            let (cpu, eptp) = (r.cpu, r.ept.eptp());
            drop(epts);
            invalidate(vm, cpu, eptp);
        }
        Effect::ProtectFrames { vm, gpa, bytes, access } => {
            let Some(r) = epts.get_mut(&vm.raw()) else { return };
            r.ept.protect_range(gpa, bytes, nk_paging::EptPerms::from_bits(access));
            let (cpu, eptp) = (r.cpu, r.ept.eptp());
            drop(epts);
            invalidate(vm, cpu, eptp);
        }
        Effect::FreeFrames { hpa, bytes } => {
            if epts.values().any(|r| r.remote_stale) {
                log::error!(target: "exo", "frames at {hpa:#x} ({bytes:#x} bytes) kept out of the allocator: a remote CPU may still translate to them");
                return;
            }
            drop(epts);
            free(hpa, bytes);
        }
        Effect::TakeDirty { vm, gpa, pages, bitmap_hpa, keep } => {
            drop(epts);
            let bytes = pages.div_ceil(8) as usize;
            // SAFETY: the exo AM checked that the bitmap lies in a frame set the caller
            // holds with the write right (allocated from this allocator, identity-mapped).
            let bitmap = unsafe { core::slice::from_raw_parts_mut(bitmap_hpa as *mut u8, bytes) };
            if keep {
                peek_dirty(vm, gpa, pages, bitmap);
            } else {
                take_dirty(vm, gpa, pages, bitmap);
            }
        }
        Effect::PmlEnable { vm, gpa, pages } => {
            let Some(r) = epts.get_mut(&vm.raw()) else { return };
            let caps = crate::vmx::capabilities();
            if !caps.pml || !r.ept.has_dirty_flags() {
                log::warn!(target: "guest", "vm{}: PML requested, but this CPU has no PML or EPT A/D flags; drains report every page", vm.raw());
                return;
            }
            let log = match r.pml.take() {
                Some(old) => old.log,
                None => match memory::alloc_zeroed_frame() {
                    Some(frame) => frame,
                    None => {
                        log::warn!(target: "guest", "vm{}: no frame for a PML log", vm.raw());
                        return;
                    }
                },
            };
            // Every first write after this is logged: clear the range's dirty flags.
            let mut page = 0;
            while page < pages {
                let (_, size) = r.ept.take_dirty(gpa + page * PAGE_SIZE);
                page += (size / PAGE_SIZE).max(1);
            }
            r.pml = Some(Pml { gpa, pages, log, seen: alloc::vec![0; pages.div_ceil(64) as usize] });
            let eptp = r.ept.eptp();
            drop(epts);
            let _ = crate::vmx::tlb::flush_ept(&caps, eptp);
            use crate::vmx::vmcs::{self, VmcsField};
            let secondary = vmcs::read(VmcsField::SECONDARY_PROCESSOR_CONTROLS).unwrap_or(0);
            // SAFETY: the caller's own VMCS is current (the exo AM takes PML calls only
            // for the caller's address space, applied during its hypercall); the log is a
            // frame it owns, and the CPU offers PML (checked above), so the control is
            // allowed-1.
            let written = unsafe {
                vmcs::write(VmcsField::PML_ADDRESS, log.as_u64())
                    .and_then(|()| vmcs::write(VmcsField::GUEST_PML_INDEX, PML_ENTRIES - 1))
                    .and_then(|()| vmcs::write(VmcsField::SECONDARY_PROCESSOR_CONTROLS, secondary | ENABLE_PML))
            };
            if let Err(e) = written {
                log::warn!(target: "guest", "vm{}: enabling PML failed: {e:?}", vm.raw());
            }
        }
        Effect::PmlDrain { vm, pages, bitmap_hpa } => {
            let Some(r) = epts.get_mut(&vm.raw()) else { return };
            // SAFETY: the exo AM checked that the bitmap of `pages` bits lies in a frame
            // set the caller holds with the write right (identity-mapped host frames).
            let bitmap = unsafe { core::slice::from_raw_parts_mut(bitmap_hpa as *mut u8, pages.div_ceil(8) as usize) };
            let ept = &mut r.ept;
            let Some(pml) = r.pml.as_mut() else {
                // No PML (the CPU lacks it): every page counts as written.
                bitmap.fill(0xFF);
                return;
            };
            pml.collect();
            bitmap.fill(0);
            let (gpa, mut found) = (pml.gpa, false);
            for (w, word) in pml.seen.iter_mut().enumerate() {
                let mut bits = core::mem::take(word);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if let Some(byte) = bitmap.get_mut((page / 8) as usize) {
                        *byte |= 1 << (page % 8);
                    }
                    // Its next write must set the flag, and so log, again.
                    ept.take_dirty(gpa + page * PAGE_SIZE);
                    found = true;
                }
            }
            let eptp = ept.eptp();
            drop(epts);
            if found {
                let _ = crate::vmx::tlb::flush_ept(&crate::vmx::capabilities(), eptp);
            }
        }
        Effect::IoPorts { .. }
        | Effect::Msr { .. }
        | Effect::VmControl { .. }
        | Effect::CreateVm { .. }
        | Effect::LwcCreate { .. }
        | Effect::LwcSwitch { .. }
        | Effect::LwcDestroy { .. }
        | Effect::LwcOverlay { .. }
        | Effect::LwcSyscall { .. }
        | Effect::LwcCapGone { .. }
        | Effect::LwcRange { .. }
        | Effect::LwcImport { .. }
        | Effect::Retire { .. } => {}
    }
}

/// Invalidates `vm`'s translations (EPTP `eptp`, run by `cpu`) after access was taken
/// away, on `cpu`; marks the VM if that cannot be made sure of.
fn invalidate(vm: VmId, cpu: usize, eptp: u64) {
    let here = crate::percpu::current_index() as usize;
    let done = if cpu == here {
        crate::vmx::tlb::flush_ept(crate::vmx::capabilities_cached(), eptp)
            .map_err(
                |e| log::error!(target: "exo", "vm{}: INVEPT failed ({e}); unmapped frames are not reused", vm.raw()),
            )
            .is_ok()
    } else {
        shoot_down(here, cpu)
    };
    if !done {
        if let Some(r) = EPTS.lock().get_mut(&vm.raw()) {
            r.remote_stale = true;
        }
    }
}

/// Asks `cpu` to invalidate the EPTs of its guests and waits for its answer (answering
/// requests made of `here` meanwhile). Returns false if it did not answer in time.
fn shoot_down(here: usize, cpu: usize) -> bool {
    let (Some(requested), Some(answered), Some(target)) =
        (REQUESTED.get(cpu), ANSWERED.get(cpu), crate::percpu::get(cpu))
    else {
        return false;
    };
    // Release: the EPT entries changed above are visible to the CPU that reads the request.
    let ticket = requested.fetch_add(1, Ordering::AcqRel) + 1;
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    if !crate::arch::apic::send_wakeup(target.apic_id()) {
        log::error!(target: "exo", "cpu {cpu} did not accept the shootdown IPI");
    }
    let start = crate::arch::rdtsc();
    while answered.load(Ordering::Acquire) < ticket {
        service(here);
        if crate::arch::rdtsc().wrapping_sub(start) > SHOOTDOWN_TIMEOUT {
            log::error!(target: "exo", "cpu {cpu} did not answer a shootdown; frames unmapped from its guests are not reused");
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Answers the invalidation requests made of `cpu` (run on `cpu`): INVEPT for every EPT of
/// a guest of this CPU, then the answer. Costs two loads when there is none.
pub fn service(cpu: usize) {
    let (Some(requested), Some(answered)) = (REQUESTED.get(cpu), ANSWERED.get(cpu)) else { return };
    let wanted = requested.load(Ordering::Acquire);
    if answered.load(Ordering::Relaxed) == wanted {
        return;
    }
    let eptps: Vec<u64> = EPTS.lock().values().filter(|r| r.cpu == cpu).map(|r| r.ept.eptp()).collect();
    let caps = crate::vmx::capabilities();
    for eptp in eptps {
        if let Err(e) = crate::vmx::tlb::flush_ept(&caps, eptp) {
            // Not answered: the asking CPU times out and keeps the frames.
            log::error!(target: "exo", "cpu {cpu}: INVEPT of {eptp:#x} for a shootdown failed: {e}");
            return;
        }
    }
    answered.fetch_max(wanted, Ordering::AcqRel);
}

/// Returns how many shootdowns this CPU and the others sent.
pub fn shootdowns() -> u64 {
    SHOOTDOWNS.load(Ordering::Relaxed)
}

/// Zeroes frames and gives them back to the allocator.
fn free(hpa: u64, bytes: u64) {
    let Some(frame) = HostPhysAddr::new(hpa) else { return };
    // SAFETY: the exo AM emits FreeFrames once per allocation, after unmapping it from
    // every EPT (and the invalidation above ran); the frames are identity-mapped and no
    // one else uses them any more.
    unsafe { core::ptr::write_bytes(hpa as *mut u8, 0, bytes as usize) };
    memory::free_frames(frame, (bytes / PAGE_SIZE) as usize);
}
