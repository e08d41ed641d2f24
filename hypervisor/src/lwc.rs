//! The hypervisor's side of light-weight contexts (am/lwc, docs/lwc.md): each vCPU runs
//! one lwC at a time, whose principal every hypercall of that vCPU is checked against (a
//! VM with several vCPUs keeps one such principal per vCPU: guest/vcpus.rs); the lwC AM's
//! effects save and load register files, switch that principal and the EPT the vCPU runs
//! on, and give copy-on-write children views of their VM's memory.
//!
//! The AM's effects are applied while the caller's hypercall is dispatched, where the
//! vCPU is out of reach: a switch waits in this CPU's slot, every other effect in a queue
//! tagged with the VM, and the lwC instance of the guest's slice loop (guests whose module
//! says `lwc`) applies them after the exit, before the next entry. The plain instance,
//! every other guest's, pays nothing for lwCs. A destruction decided on another CPU (a
//! revocation) is taken at the VM's next exit. An `lwSwitch` the null-Kernel allowed is
//! repeated at the exit without the dispatch while no capability to an lwC died
//! ([`SwitchCache`]; docs/lwc.md, "The fast path").
//!
//! # Views (copy-on-write on EPT)
//!
//! A child created with `LWC_COW` or `LWC_UNMAP` pages gets an EPT of its own over the
//! VM's initial memory, with 4 KiB pages: `LWC_SHARED` pages map the VM's own frames
//! writable, `LWC_COW` pages map them read-only (execute allowed), `LWC_UNMAP` pages are
//! absent. The VM's own EPT (the root lwC's, and that of children that share everything)
//! is remapped with 4 KiB pages the first time, and every page some view shares
//! copy-on-write is made read-only there too (then INVEPT: rights taken away, docs/tlb.md).
//! A write to such a page exits with an EPT violation (SDM Vol. 3 §28.3.3.2):
//! - in a view: the page is copied into a fresh frame, mapped writable in that view only;
//! - in the VM's own EPT: the page is first copied out for every view that still shares
//!   it, so each keeps its snapshot, then made writable again.
//!
//! Each view whose entry changed is invalidated (INVEPT, single-context; a VM's vCPU
//! never leaves its CPU, nor do the other vCPUs of a VM with several, so this CPU is the
//! only one that may cache its translations).
//! Copies are charged to the VM's frame quota (its module's `frames=`, 4 MiB by default):
//! a write that needs a frame past it stops the VM with a log line that says so. A view
//! dies with the last lwC that runs on it (its creator's destruction, or the VM's end):
//! its EPT first (INVEPT, then its tables), then its frames, zeroed.
//!
//! Switching lwCs writes the target's EPTP into the VMCS; cached translations are tagged
//! with the EPTP (SDM Vol. 3 §29.4.1), so a switch needs no invalidation.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nk_am::{Effect, LwcMemory};
use nk_caps::VmId;
use nk_paging::EptPerms;
use spin::Mutex;

use crate::memory::{self, HostPhysAddr, PAGE_SIZE};
use crate::vmx::ept::GuestEpt;
use crate::vmx::vcpu::GuestRegs;

/// Some VM has lwC effects to take.
static PENDING: AtomicBool = AtomicBool::new(false);
/// (VM, effect), in the order the AM emitted them.
static REQUESTS: Mutex<Vec<(u32, Effect)>> = Mutex::new(Vec::new());
/// The `lwSwitch` (or trap) the running vCPU of each CPU just made, as `from << 32 | to`
/// (0: none): its own CPU takes it after that hypercall's exit, without the queue.
static SWITCHES: [AtomicU64; crate::percpu::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::percpu::MAX_CPUS];
/// Bumped at every death of a capability to an lwC (and of an lwC): a remembered switch
/// ([`SwitchCache`]) made before it is checked again.
static EPOCH: AtomicU64 = AtomicU64::new(1);
/// The VM of every live child lwC (its principal number -> the VM's).
static OWNERS: Mutex<BTreeMap<u32, u32>> = Mutex::new(BTreeMap::new());

/// A new lwC's resource spec (its memory part): the `LwcCreate`'s, and the exception
/// ranges of the `LwcRange`s that followed it (`LWC_RANGES`), each (first page, pages,
/// mode), a later one over an earlier one.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub memory: LwcMemory,
    pub more: &'a [(u32, u32, u8)],
}

impl Spec<'_> {
    /// Tells whether the child shares all of its creator's memory (no view of its own).
    pub fn all_shared(&self) -> bool {
        self.memory.all_shared() && self.more.iter().all(|&(_, pages, mode)| pages == 0 || mode == LwcMemory::SHARED)
    }

    /// Returns the mode of 4 KiB page `page`: the last range's that holds it, else the
    /// `LwcCreate`'s.
    pub fn mode_of(&self, page: u64) -> u8 {
        let holds = |&&(first, pages, _): &&(u32, u32, u8)| {
            page >= u64::from(first) && page < u64::from(first) + u64::from(pages)
        };
        match self.more.iter().rev().find(holds) {
            Some(&(_, _, mode)) => mode,
            None => self.memory.mode_of(page),
        }
    }
}

/// An lwC's saved register file: the general registers and RIP, RSP, RFLAGS.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    pub principal: u32,
    /// The vCPU that saved it (a VM with several vCPUs, guest/vcpus.rs): a root lwC is
    /// every vCPU's home, so each keeps its own root register file; a child's one file
    /// may be loaded by any vCPU.
    pub vcpu: u8,
    pub regs: GuestRegs,
    pub flow: [u64; 3],
}

/// Swaps the general registers a hypercall's reply does not cover (R9-R15, RBP) between
/// the running register file and a saved one (an lwC switch: RAX-R8 hold the reply).
#[inline(always)]
pub fn swap_kept(running: &mut GuestRegs, saved: &mut GuestRegs) {
    core::mem::swap(&mut running.r9, &mut saved.r9);
    core::mem::swap(&mut running.r10, &mut saved.r10);
    core::mem::swap(&mut running.r11, &mut saved.r11);
    core::mem::swap(&mut running.r12, &mut saved.r12);
    core::mem::swap(&mut running.r13, &mut saved.r13);
    core::mem::swap(&mut running.r14, &mut saved.r14);
    core::mem::swap(&mut running.r15, &mut saved.r15);
    core::mem::swap(&mut running.rbp, &mut saved.rbp);
}

/// Returns the VM whose lwC `principal` is (a VM's own principal is its own).
fn vm_of(principal: VmId) -> Option<u32> {
    if principal.raw() < nk_am_lwc::FIRST_CHILD {
        return Some(principal.raw());
    }
    OWNERS.lock().get(&principal.raw()).copied()
}

/// Records an lwC effect for the VM it concerns; the VM's slice loop applies it after the
/// exit that caused it (or, from another CPU, after its next exit).
pub fn apply(effect: Effect) {
    let vm = match effect {
        // Emitted by the running lwC's own call on this CPU.
        Effect::LwcSwitch { from, to } => {
            let slot = &SWITCHES[crate::percpu::current_index() as usize];
            slot.store(u64::from(from.raw()) << 32 | u64::from(to.raw()), Ordering::Relaxed);
            return;
        }
        Effect::LwcCreate { parent, child, .. } => {
            let Some(vm) = vm_of(parent) else { return };
            OWNERS.lock().insert(child.raw(), vm);
            vm
        }
        Effect::LwcOverlay { to: from, .. }
        | Effect::LwcSyscall { by: from, .. }
        | Effect::LwcRange { child: from, .. } => match vm_of(from) {
            Some(vm) => vm,
            None => return,
        },
        Effect::LwcCapGone { .. } => {
            EPOCH.fetch_add(1, Ordering::Release);
            return;
        }
        Effect::LwcDestroy { child, .. } => {
            EPOCH.fetch_add(1, Ordering::Release);
            log::debug!(target: "lwc", "lwC principal {:#x} destroyed", child.raw());
            match OWNERS.lock().remove(&child.raw()) {
                Some(vm) => vm,
                None => return,
            }
        }
        _ => return,
    };
    REQUESTS.lock().push((vm, effect));
    PENDING.store(true, Ordering::Release);
}

/// Tells whether lwC effects wait: a switch of this CPU's running vCPU, or some VM's
/// queued effects (two atomic loads).
pub fn pending() -> bool {
    SWITCHES[crate::percpu::current_index() as usize].load(Ordering::Relaxed) != 0 || PENDING.load(Ordering::Relaxed)
}

/// Takes the switch this CPU's running vCPU made: (from, to).
pub fn take_switch() -> Option<(VmId, VmId)> {
    let packed = SWITCHES[crate::percpu::current_index() as usize].swap(0, Ordering::Relaxed);
    (packed != 0).then(|| (VmId::new((packed >> 32) as u32), VmId::new(packed as u32)))
}

/// One `lwSwitch` the null-Kernel allowed: lwC `from` called `selector` with capability
/// `name` (and no other) and was switched to `to`, whose creator is `creator` (the call's
/// first result).
#[derive(Debug, Clone, Copy, Default)]
struct Allowed {
    epoch: u64,
    selector: u64,
    name: (u64, u64),
    from: u32,
    to: u32,
    /// The reply's status word and first result (the target's creator).
    status: u64,
    creator: u64,
}

/// The `lwSwitch` calls a vCPU made lately, so the same call again switches at its exit
/// without the null-Kernel's dispatch (as seL4's fastpath does for IPC). What the dispatch
/// decided depends only on the caller, the selector and the capability: the capability
/// names the target with the `switch` right, of the caller's VM, not the caller, and that
/// stays so while the capability lives (the target dies only with its creator's
/// capability, and so every other capability to it, derived from that one). Every death
/// of a capability to an lwC bumps the epoch ([`Effect::LwcCapGone`], `LwcDestroy`), and
/// an entry of an older epoch is not used; a name is never reused before its capability
/// died. Which lwC runs is the vCPU's own state ([`crate::guest`]'s current principal), so
/// the AM has nothing to update.
#[derive(Debug, Default)]
pub struct SwitchCache {
    entries: [Allowed; 4],
    next: usize,
}

impl SwitchCache {
    /// Returns (target, the reply's status word, its first result: the target's creator) of
    /// an allowed switch that `call` of lwC `from` repeats, if no capability to an lwC died
    /// since.
    #[inline(always)]
    pub fn find(&self, from: u32, call: &nk_abi::Call) -> Option<(u32, u64, u64)> {
        let name = (call.caps[0].low, call.caps[0].high);
        let entry = self.entries.iter().find(|e| e.name == name && e.selector == call.selector && e.from == from)?;
        let others = call.caps[1..].iter().all(|c| c.low == 0 && c.high == 0);
        (others && entry.epoch == EPOCH.load(Ordering::Acquire)).then_some((entry.to, entry.status, entry.creator))
    }

    /// Remembers that `call` (its selector and capabilities, read before the dispatch at
    /// `epoch`) of lwC `from` switched it to `to` with reply status word `status` and
    /// first result `creator`.
    pub fn remember(&mut self, epoch: u64, call: (u64, [nk_abi::NameWords; 4]), from: u32, to: u32, reply: (u64, u64)) {
        let (status, creator) = reply;
        let (selector, caps) = call;
        if caps[1..].iter().any(|c| c.low != 0 || c.high != 0) {
            return;
        }
        self.entries[self.next] =
            Allowed { epoch, selector, name: (caps[0].low, caps[0].high), from, to, status, creator };
        self.next = (self.next + 1) % self.entries.len();
    }
}

/// Returns the epoch of capability deaths (read before a dispatch whose switch is
/// remembered).
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// Peeks at the switch this CPU's running vCPU just made (its call's reply was written).
pub fn switch_made() -> Option<(VmId, VmId)> {
    let packed = SWITCHES[crate::percpu::current_index() as usize].load(Ordering::Relaxed);
    (packed != 0).then(|| (VmId::new((packed >> 32) as u32), VmId::new(packed as u32)))
}

/// Takes the queued lwC effects of `vm`, in order.
pub fn take(vm: VmId) -> Vec<Effect> {
    if !PENDING.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let mut requests = REQUESTS.lock();
    let mine = requests.iter().filter(|(v, _)| *v == vm.raw()).map(|&(_, e)| e).collect();
    requests.retain(|(v, _)| *v != vm.raw());
    PENDING.store(!requests.is_empty(), Ordering::Release);
    mine
}

/// Forgets the children of `vm` (its end).
pub fn forget(vm: VmId) {
    OWNERS.lock().retain(|_, v| *v != vm.raw());
    REQUESTS.lock().retain(|(v, _)| *v != vm.raw());
}

/// The `LWC_SYSTRAP` lwCs of a VM (seed §4.2.6), kept by its guest: a call of one that
/// is refused for a capability it does not hold is handed to the lwC AM's `lwTrap`, which
/// switches to its creator; `lwSyscall` performs the trapped call.
#[derive(Default)]
pub struct Sandbox {
    /// The lwC that runs now is one of them (its calls take the sandboxed path).
    pub current: bool,
    /// (principal, the lwC AM's id) of each.
    members: Vec<(u32, nk_am::AmId)>,
    /// The trapped call of each member that waits for its creator's answer, by member: as
    /// many as wait at once (a vCPU's root may leave one child's trap unanswered while it
    /// runs another, and every vCPU of the VM may have its own; docs/multi-vcpu.md), at
    /// most one per member.
    trapped: Vec<(u32, nk_abi::Call)>,
}

impl Sandbox {
    /// Adds `principal`, created with `LWC_SYSTRAP` by the lwC AM `am`.
    pub fn add(&mut self, principal: u32, am: nk_am::AmId) {
        if self.members.len() <= nk_am_lwc::MAX_LWCS_PER_VM {
            self.members.push((principal, am));
        }
    }

    /// Tells whether the VM has no `LWC_SYSTRAP` lwC (and so no trapped call).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && !self.current
    }

    /// Forgets `principal` (destroyed).
    pub fn remove(&mut self, principal: u32) {
        self.members.retain(|&(p, _)| p != principal);
        self.trapped.retain(|&(p, _)| p != principal);
    }

    /// Notes that `principal` runs now.
    pub fn entered(&mut self, principal: u32) {
        self.current = self.members.iter().any(|&(p, _)| p == principal);
    }

    /// Returns the lwC AM of member `principal`.
    pub fn am_of(&self, principal: u32) -> Option<nk_am::AmId> {
        self.members.iter().find(|&&(p, _)| p == principal).map(|&(_, am)| am)
    }

    /// Records the trapped call of member `principal` (in place of one it had: a member
    /// traps only while it runs, so an older one was answered or abandoned).
    pub fn trap(&mut self, principal: u32, call: nk_abi::Call) {
        if let Some(entry) = self.trapped.iter_mut().find(|(p, _)| *p == principal) {
            entry.1 = call;
        } else if self.members.iter().any(|&(p, _)| p == principal) {
            // At most one per member, and members are bounded: this stays bounded too.
            self.trapped.push((principal, call));
        }
    }

    /// Takes the trapped call of `principal`, if it waits.
    pub fn take_trapped(&mut self, principal: u32) -> Option<nk_abi::Call> {
        let at = self.trapped.iter().position(|(p, _)| *p == principal)?;
        Some(self.trapped.swap_remove(at).1)
    }

    /// Returns the trapped call `principal` waits with.
    pub fn trapped_call(&self, principal: u32) -> Option<nk_abi::Call> {
        self.trapped.iter().find(|(p, _)| *p == principal).map(|&(_, call)| call)
    }
}

/// Read and execute, no write: a copy-on-write page.
const READ_EXECUTE: EptPerms = EptPerms::from_bits(5);

/// A view of the VM's memory of its own (an EPT), for a child made with copy-on-write or
/// unmapped pages.
struct View {
    /// The lwC that was created with it (it dies with the last of `users`).
    owner: u32,
    /// The lwCs that run on it: the owner and the children that share all its memory.
    users: Vec<u32>,
    ept: GuestEpt,
    /// One bit per page of the VM's memory: the view maps the VM's own frame read-only.
    shared: Vec<u64>,
    /// Its own frames: page number -> host-physical address.
    private: BTreeMap<u32, u64>,
    /// One bit per page: not mapped (`LWC_UNMAP`).
    unmapped: Vec<u64>,
}

/// What an EPT violation was to the views.
pub enum Fault {
    /// A copy-on-write page was copied: the guest goes on.
    Copied,
    /// Not a copy-on-write write: the usual handling.
    NotOurs,
    /// The copy needs a frame past the VM's quota (or the allocator is empty).
    Exhausted(&'static str),
}

/// The views of one VM's lwCs, kept by its guest on its CPU.
pub struct Views {
    /// The VM's initial memory: (host-physical address, bytes).
    memory: (u64, u64),
    views: Vec<View>,
    /// One bit per page: read-only in the VM's own EPT because some view shares it.
    protected: Vec<u64>,
    /// One bit per page: some view maps the VM's own frame writable (`LWC_SHARED`), so a
    /// new copy-on-write view copies it at once (its snapshot must not see those writes).
    shared_rw: Vec<u64>,
    /// The VM's own EPT maps its memory with 4 KiB pages.
    split: bool,
    /// Frames the views may still take.
    budget: u64,
}

fn bit(map: &[u64], page: u64) -> bool {
    map.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn set_bit(map: &mut [u64], page: u64, on: bool) {
    if let Some(w) = map.get_mut((page / 64) as usize) {
        if on {
            *w |= 1 << (page % 64);
        } else {
            *w &= !(1 << (page % 64));
        }
    }
}

impl Views {
    /// Makes the (empty) views of a VM whose memory is `memory` and whose frame quota is
    /// `quota_bytes`.
    pub fn new(memory: (u64, u64), quota_bytes: u64) -> Self {
        Self {
            memory,
            views: Vec::new(),
            protected: Vec::new(),
            shared_rw: Vec::new(),
            split: false,
            budget: quota_bytes / PAGE_SIZE,
        }
    }

    fn pages(&self) -> u64 {
        self.memory.1 / PAGE_SIZE
    }

    /// Returns the EPTP `principal` runs on (None: the VM's own EPT).
    pub fn eptp_of(&self, principal: u32) -> Option<u64> {
        self.views.iter().find(|v| v.users.contains(&principal)).map(|v| v.ept.eptp())
    }

    /// Makes the view of new lwC `child` of `parent` as `spec` says (a child that shares all
    /// memory runs where its parent runs). Says why it cannot.
    pub fn create(&mut self, vm: VmId, parent: u32, child: u32, spec: &Spec<'_>) -> Result<(), &'static str> {
        if spec.all_shared() {
            if let Some(view) = self.views.iter_mut().find(|v| v.users.contains(&parent)) {
                view.users.push(child);
            }
            return Ok(());
        }
        let pages = self.pages();
        let words = pages.div_ceil(64) as usize;
        if self.protected.len() < words {
            self.protected.resize(words, 0);
            self.shared_rw.resize(words, 0);
        }
        let mut ept = GuestEpt::new(&crate::vmx::capabilities()).map_err(|_| "no frames for its EPT")?;
        let mut shared = alloc::vec![0u64; words];
        let (base, _) = self.memory;
        // Map runs of pages of one mode.
        let mut page = 0;
        while page < pages {
            let mode = spec.mode_of(page);
            let mut end = page + 1;
            while end < pages && spec.mode_of(end) == mode {
                end += 1;
            }
            let (gpa, len) = (page * PAGE_SIZE, (end - page) * PAGE_SIZE);
            let mapped = match mode {
                LwcMemory::SHARED => ept.map_range_4k(gpa, base + gpa, len, EptPerms::RWX),
                LwcMemory::COW => ept.map_range_4k(gpa, base + gpa, len, READ_EXECUTE),
                _ => Ok(()),
            };
            mapped.map_err(|_| "no frames for its EPT")?;
            if mode == LwcMemory::COW {
                for p in page..end {
                    set_bit(&mut shared, p, true);
                }
            }
            if mode == LwcMemory::SHARED {
                for p in page..end {
                    set_bit(&mut self.shared_rw, p, true);
                }
            }
            page = end;
        }
        // The VM's own EPT: 4 KiB pages, the shared ones read-only.
        let (split, memory) = (self.split, self.memory);
        let protected = &mut self.protected;
        let changed = crate::exomem::with_ept(vm, |root| {
            if !split {
                root.unmap_range(0, memory.1);
                root.map_range_4k(0, memory.0, memory.1, EptPerms::RWX).map_err(|_| "no frames to split its EPT")?;
            }
            for p in 0..pages {
                if bit(&shared, p) && !bit(protected, p) {
                    root.protect_range(p * PAGE_SIZE, PAGE_SIZE, READ_EXECUTE);
                    set_bit(protected, p, true);
                }
            }
            Ok::<u64, &'static str>(root.eptp())
        });
        let root_eptp = changed.ok_or("the VM has no EPT")??;
        self.split = true;
        flush(root_eptp);
        let writable: Vec<u64> = (0..pages).filter(|&p| bit(&shared, p) && bit(&self.shared_rw, p)).collect();
        let released: Vec<u64> = (0..pages).filter(|&p| spec.mode_of(p) == LwcMemory::SHARED).collect();
        for p in released {
            self.release_page(p)?;
        }
        let mut unmapped = alloc::vec![0u64; words];
        for p in (0..pages).filter(|&p| spec.mode_of(p) == LwcMemory::UNMAP) {
            set_bit(&mut unmapped, p, true);
        }
        let view = View { owner: child, users: alloc::vec![child], ept, shared, private: BTreeMap::new(), unmapped };
        self.views.push(view);
        // Pages another view writes in place: this snapshot gets its copy now.
        let new = self.views.len() - 1;
        for p in writable {
            self.copy_out(new, p)?;
        }
        Ok(())
    }

    /// Returns the view `principal` runs on (None: the VM's own EPT).
    fn view_of(&self, principal: u32) -> Option<usize> {
        self.views.iter().position(|v| v.users.contains(&principal))
    }

    /// Gives every view that shares `page` copy-on-write its own copy.
    fn release_page(&mut self, page: u64) -> Result<(), &'static str> {
        for i in 0..self.views.len() {
            if bit(&self.views[i].shared, page) {
                self.copy_out(i, page)?;
            }
        }
        Ok(())
    }

    /// Returns the frame that holds `page` for an lwC on view `view` (None: the VM's own
    /// EPT), or None where the page is not mapped there.
    fn frame_of(&self, view: Option<usize>, page: u64) -> Option<u64> {
        let own = self.memory.0 + page * PAGE_SIZE;
        let Some(v) = view.map(|i| &self.views[i]) else { return Some(own) };
        if let Some(&hpa) = v.private.get(&(page as u32)) {
            return Some(hpa);
        }
        (!bit(&v.unmapped, page)).then_some(own)
    }

    /// Applies an `lwOverlay` (checked by the lwC AM): pages `[first, first + pages)` of
    /// lwC `from` into lwC `to`'s view, as `mode` says (seed §4.2.4).
    pub fn overlay(
        &mut self,
        vm: VmId,
        from: u32,
        to: u32,
        first: u64,
        pages: u64,
        mode: u8,
    ) -> Result<(), &'static str> {
        let (source, target) = (self.view_of(from), self.view_of(to));
        let end = first.checked_add(pages).filter(|&e| e <= self.pages()).ok_or("overlay past the VM's memory")?;
        for page in first..end {
            let gpa = page * PAGE_SIZE;
            match (target, mode) {
                (None, LwcMemory::COW) => {
                    // Into the VM's own frames: the views that share the page keep theirs.
                    let own = self.memory.0 + gpa;
                    let src = self.frame_of(source, page);
                    if src == Some(own) {
                        continue;
                    }
                    self.release_page(page)?;
                    copy_page(src, own);
                }
                (Some(t), LwcMemory::COW) => {
                    let src = self.frame_of(source, page);
                    let dst = self.private_frame(t, page)?;
                    if src != Some(dst) {
                        copy_page(src, dst);
                    }
                }
                (Some(t), LwcMemory::SHARED) => {
                    self.views[t].drop_page(page, &mut self.budget);
                    self.release_page(page)?;
                    let own = self.memory.0 + gpa;
                    self.views[t]
                        .ept
                        .map_range_4k(gpa, own, PAGE_SIZE, EptPerms::RWX)
                        .map_err(|_| "overlay could not map")?;
                    set_bit(&mut self.shared_rw, page, true);
                }
                (Some(t), _) => {
                    self.views[t].drop_page(page, &mut self.budget);
                    set_bit(&mut self.views[t].unmapped, page, true);
                }
                (None, _) => return Err("the VM's own EPT only takes copies"),
            }
        }
        let eptp = match target {
            Some(t) => Some(self.views[t].ept.eptp()),
            None => crate::exomem::eptp(vm),
        };
        if let Some(eptp) = eptp {
            flush(eptp);
        }
        Ok(())
    }

    /// Returns view `i`'s own frame for `page`, made (a copy of what it mapped) if needed.
    fn private_frame(&mut self, i: usize, page: u64) -> Result<u64, &'static str> {
        if let Some(&hpa) = self.views[i].private.get(&(page as u32)) {
            return Ok(hpa);
        }
        self.copy_out(i, page)?;
        self.views[i].private.get(&(page as u32)).copied().ok_or("no private frame")
    }

    /// Handles an EPT violation at `gpa` (exit qualification `qualification`) of the lwC
    /// `principal` of `vm`.
    pub fn fault(&mut self, vm: VmId, principal: u32, gpa: u64, qualification: u64) -> Fault {
        let page = gpa / PAGE_SIZE;
        if qualification & 2 == 0 || page >= self.pages() {
            return Fault::NotOurs;
        }
        if let Some(i) = self.views.iter().position(|v| v.users.contains(&principal)) {
            if !bit(&self.views[i].shared, page) {
                return Fault::NotOurs;
            }
            return match self.copy_out(i, page) {
                Ok(()) => Fault::Copied,
                Err(why) => Fault::Exhausted(why),
            };
        }
        if !bit(&self.protected, page) {
            return Fault::NotOurs;
        }
        for i in 0..self.views.len() {
            if bit(&self.views[i].shared, page) {
                if let Err(why) = self.copy_out(i, page) {
                    return Fault::Exhausted(why);
                }
            }
        }
        set_bit(&mut self.protected, page, false);
        let eptp = crate::exomem::with_ept(vm, |root| {
            root.protect_range(page * PAGE_SIZE, PAGE_SIZE, EptPerms::RWX);
            root.eptp()
        });
        if let Some(eptp) = eptp {
            flush(eptp);
        }
        Fault::Copied
    }

    /// Gives view `i` its own copy of `page` (shared with the VM until now), writable.
    fn copy_out(&mut self, i: usize, page: u64) -> Result<(), &'static str> {
        if self.budget == 0 {
            return Err("copy-on-write needs a frame past the VM's frame quota");
        }
        let frame = memory::alloc_frame().ok_or("copy-on-write found no free frame")?;
        let gpa = page * PAGE_SIZE;
        copy_page(self.frame_of(Some(i), page), frame.as_u64());
        let view = &mut self.views[i];
        view.ept.unmap_range(gpa, PAGE_SIZE);
        if view.ept.map_range_4k(gpa, frame.as_u64(), PAGE_SIZE, EptPerms::RWX).is_err() {
            // The table of this page existed a moment ago: only a broken EPT gets here.
            memory::free_frame(frame);
            flush(view.ept.eptp());
            return Err("copy-on-write could not map its copy");
        }
        self.budget -= 1;
        set_bit(&mut view.shared, page, false);
        set_bit(&mut view.unmapped, page, false);
        view.private.insert(page as u32, frame.as_u64());
        flush(view.ept.eptp());
        Ok(())
    }

    /// Takes lwC `principal` off its view; a view with no lwC left dies (EPT, then frames).
    pub fn destroy(&mut self, principal: u32) {
        let Some(i) = self.views.iter().position(|v| v.users.contains(&principal)) else { return };
        self.views[i].users.retain(|&u| u != principal);
        if self.views[i].owner == principal {
            // Children that shared its memory fall back to nothing of theirs: they die with
            // their creator's capability anyway (derived from it).
            self.views[i].users.clear();
        }
        if self.views[i].users.is_empty() {
            let view = self.views.swap_remove(i);
            self.budget += view.private.len() as u64;
            view.release();
        }
    }
}

impl View {
    /// Takes `page` out of the view (unmapped, invalidated, its own frame freed).
    fn drop_page(&mut self, page: u64, budget: &mut u64) {
        self.ept.unmap_range(page * PAGE_SIZE, PAGE_SIZE);
        flush(self.ept.eptp());
        set_bit(&mut self.shared, page, false);
        if let Some(hpa) = self.private.remove(&(page as u32)) {
            free_zeroed(hpa);
            *budget += 1;
        }
    }

    /// Drops the EPT (INVEPT, then its tables) and gives the frames back, zeroed.
    fn release(self) {
        drop(self.ept);
        for (_, hpa) in self.private {
            free_zeroed(hpa);
        }
    }
}

impl Drop for Views {
    fn drop(&mut self) {
        for view in self.views.drain(..) {
            view.release();
        }
    }
}

/// Invalidates the translations of `eptp` on this CPU (the only one that runs the VM).
fn flush(eptp: u64) {
    if let Err(e) = crate::vmx::tlb::flush_ept(&crate::vmx::capabilities(), eptp) {
        log::error!(target: "lwc", "INVEPT of {eptp:#x} failed: {e}");
    }
}

/// Zeroes a view's own frame, whose only mapping is gone and invalidated, and frees it.
fn free_zeroed(hpa: u64) {
    // SAFETY: the frame was one view's alone (`View::private`), and the caller unmapped and
    // invalidated its only mapping; it is identity-mapped.
    unsafe { core::ptr::write_bytes(hpa as *mut u8, 0, PAGE_SIZE as usize) };
    if let Some(frame) = HostPhysAddr::new(hpa) {
        memory::free_frame(frame);
    }
}

/// Copies the 4 KiB page at `from` (None: zeroes) to `to`.
fn copy_page(from: Option<u64>, to: u64) {
    // SAFETY: both are 4 KiB frames of this VM (its memory, or a view's own frame),
    // identity-mapped and distinct (the callers skip a page onto itself); no vCPU of the
    // VM runs while its effects or exits are handled.
    unsafe {
        match from {
            Some(from) => core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, PAGE_SIZE as usize),
            None => core::ptr::write_bytes(to as *mut u8, 0, PAGE_SIZE as usize),
        }
    }
}
