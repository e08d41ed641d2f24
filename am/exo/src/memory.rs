//! The exo AM's memory: frame sets, address spaces and mappings (issue 10).
//!
//! - A *frame set* is a run of host frames (4 KiB pages, or 2 MiB pages when allocated
//!   `large`), with the rights `read`, `write`, `execute`, `map` and `split`. `alloc` makes
//!   one from the hypervisor's allocator, charged to the calling VM's frame quota; `split`
//!   derives a smaller set (a sub-range) from one, which dies with it; `free` gives an
//!   allocation back at once (its capabilities, and those of sets split from it, are then
//!   revoked: `REVOKED`; a holder deletes them to get its capability quota back), and so
//!   does deleting or revoking the capability `alloc` granted.
//! - Each VM's guest-physical address space is an object too (kind `aspace`, rights `map`,
//!   `alloc` and `dirty`); a VM assigned memory is granted a capability to its own at
//!   creation. Mapping into a VM takes a capability to that VM's address space: without
//!   one, another VM's EPT cannot be touched.
//! - A *mapping* is a frame set mapped into a VM at a guest-physical address with access no
//!   larger than the rights of the frame capability that mapped it. It lives as long as
//!   both capabilities that made it: when either dies (revoked, deleted, its VM gone) the
//!   AM emits the unmap, which the hypervisor applies on every CPU before the revoking call
//!   returns. When a set dies (its allocation capability dies or it is freed), every
//!   mapping of it and of the sets split from it goes, then its frames go back, zeroed.
//!
//! - *Dirty tracking* of a guest-physical range of the caller's address space (right
//!   `dirty`): `dirty` reads and clears the EPT accessed/dirty flags of up to
//!   [`DIRTY_PAGES_MAX`] pages into a bitmap in a frame set the caller names with the
//!   `write` right (the hypervisor writes guest memory only there); `pml-enable` turns on
//!   Page-Modification Logging for a range of the caller's own address space and
//!   `pml-drain` writes the pages logged since the last drain (PML-full exits included)
//!   into such a bitmap. A/D reads are exact for pages the VM does not write during the
//!   call (its own call, on one vCPU, always). `dirty` with the flag `exo_dirty::KEEP`
//!   reads without clearing, and may also read the *keep window* the hypervisor names
//!   (`ExoAm::with_dirty_keep_window`: the NVRAM AM's, whose dirty flags are that AM's
//!   write set, so only a read that leaves them set is allowed there).
//!
//! A VM's initial memory (its module's `mem=`) is a frame set too, already mapped at
//! guest-physical 0 when the VM starts, so the guest may share parts of it (split and
//! delegate), protect or unmap it like any other; it is not the allocator's and is never
//! freed to it (the hypervisor frees it after the VM's capabilities died, so after every
//! mapping of it was undone).
//!
//! # Bounds
//!
//! A VM holds at most [`FRAME_SETS_PER_VM`] sets and has made at most
//! [`MAPPINGS_PER_VM`] mappings; what it allocates is bounded by its frame quota (bytes);
//! past any of them the call fails with `QUOTA_EXCEEDED`.
//!
//! Each set has a root capability (`Kernel::grant_new_root`), held by the AM and charged to
//! the AM's capability quota; the VM's capability is its child. When the set dies (freed,
//! its capability or its parent's revoked or deleted, its owner removed) the AM retires
//! the root (`Effect::Retire`): the null-Kernel deletes it with every capability derived
//! from it, on every kernel, so a guest that allocates and frees in a loop gives the quota
//! back each time. The holders of a dead set's capabilities find them revoked and get
//! their own quota back by deleting them. The AM's live roots are therefore bounded by the
//! live sets: at most [`FRAME_SETS_PER_VM`] per VM (plus one address space per VM).
//!
//! # Limits
//!
//! - `unmap` and `protect` act on a whole mapping, named by its first guest-physical
//!   address; to unmap or protect part of a set, split it first and map the pieces.
//! - The AM's capability quota (4,096 per kernel instance in the hypervisor) is shared:
//!   it is not split per VM, so 16 VMs on one kernel that each hold 256 live sets would use
//!   it up. What retirement fixes is the leak: dead sets give their roots back.
//! - The roots of what a VM is granted at creation (its address space, ports, MSRs) are not
//!   retired when it ends; VMs are made at boot only, so they are bounded by the modules.
//! - Mappings are one list over all VMs: `map` and `unmap` scan it (at most
//!   [`MAPPINGS_PER_VM`] per VM).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{
    frame_access, AmError, Binding, CapName, Effect, Effects, Kernel, ObjId, Object, Outcome, Principal, Rights, VmId,
};

/// The most frame sets (allocated and split) one VM may hold at a time.
pub const FRAME_SETS_PER_VM: usize = 256;
/// The most mappings one VM may have made at a time.
pub const MAPPINGS_PER_VM: usize = 256;
/// The most pages one `dirty` call reads (bounds the hypervisor's work per call).
pub const DIRTY_PAGES_MAX: u64 = 1 << 16;
/// A small page.
pub const PAGE_4K: u64 = 0x1000;
/// A large page.
pub const PAGE_2M: u64 = 0x20_0000;

/// The memory the hypervisor gives a VM at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmMemory {
    /// Guest-physical addresses `[gpa_base, gpa_limit)` may be mapped in the VM (below
    /// `gpa_base` lies memory the hypervisor mapped itself and the AM does not manage).
    pub gpa_base: u64,
    pub gpa_limit: u64,
    /// How many bytes of frames the VM may allocate at a time.
    pub frame_quota: u64,
    /// The bytes of its initial memory, mapped at guest-physical 0 (0: none). Where it
    /// lies in host memory is `initial_hpa`, or asked of the hypervisor when first needed
    /// (`Kernel::guest_memory`: the VM's memory is allocated when it starts, after its
    /// initial capabilities are granted).
    pub initial_bytes: u64,
    pub initial_hpa: Option<u64>,
}

/// A run of host frames.
#[derive(Clone, Copy, Debug)]
struct FrameSet {
    id: u64,
    /// None for a VM's initial memory until the hypervisor said where it lies.
    hpa: Option<u64>,
    bytes: u64,
    /// Made of 2 MiB pages (mapped with large EPT entries where the address allows).
    large: bool,
    /// The VM charged for it (its quota when allocated, its set count always).
    owner: VmId,
    /// The set it was split from.
    parent: Option<u64>,
    /// The capability granted for it: the set dies with it.
    granted: CapName,
    /// The capability it was split with (its parent's): the set dies with that too.
    origin: CapName,
    /// From the hypervisor's allocator (given back when the set dies).
    allocated: bool,
    /// The object its capabilities name and the AM's root capability to it (retired when
    /// the set dies, which gives the AM's capability quota back).
    object: Object,
    root: CapName,
}

/// A frame set mapped into a VM.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    set: u64,
    /// The frame capability that mapped it, and the address-space capability.
    frames_cap: CapName,
    aspace_cap: CapName,
    vm: VmId,
    gpa: u64,
    bytes: u64,
    access: u8,
    /// The VM that made it (charged).
    by: VmId,
    /// The set is the whole RAM of a VM created at run time (`lend`), not a `map`.
    lent: bool,
}

impl Mapping {
    fn unmap(&self) -> Effect {
        Effect::UnmapFrames { vm: self.vm, gpa: self.gpa, bytes: self.bytes }
    }

    fn overlaps(&self, vm: VmId, gpa: u64, bytes: u64) -> bool {
        self.vm == vm && gpa < self.gpa + self.bytes && self.gpa < gpa + bytes
    }
}

/// Right bits of the two kinds, as registered.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MemoryRights {
    pub read: Rights,
    pub write: Rights,
    pub execute: Rights,
    pub map: Rights,
    pub split: Rights,
    pub dirty: Rights,
    pub frames_all: Rights,
    pub aspace_all: Rights,
}

impl MemoryRights {
    /// Returns the frame rights that access `access` (`frame_access` bits) needs.
    fn for_access(&self, access: u8) -> Rights {
        let mut bits = 0;
        if access & frame_access::READ != 0 {
            bits |= self.read.bits();
        }
        if access & frame_access::WRITE != 0 {
            bits |= self.write.bits();
        }
        if access & frame_access::EXECUTE != 0 {
            bits |= self.execute.bits();
        }
        Rights::from_bits(bits)
    }
}

/// The frame sets, mappings and charges of every VM.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    vms: BTreeMap<VmId, VmMemory>,
    sets: BTreeMap<u64, FrameSet>,
    mappings: Vec<Mapping>,
    /// Bytes allocated by each VM.
    charged: BTreeMap<VmId, u64>,
    /// Each VM's PML range: (first guest-physical address, pages).
    pml: BTreeMap<VmId, (u64, u64)>,
    next_set: u64,
    /// Where `dirty` with `KEEP` may read besides a VM's own range: `[start, end)`.
    keep_window: Option<(u64, u64)>,
}

fn aligned(value: u64, to: u64) -> bool {
    value.is_multiple_of(to)
}

impl Memory {
    pub fn new() -> Self {
        Self { next_set: 1, ..Self::default() }
    }

    /// Lets `dirty` with the flag `KEEP` (read without clearing) read `[start, end)` of
    /// any VM's address space too (the hypervisor passes another AM's window).
    pub fn set_keep_window(&mut self, start: u64, end: u64) {
        self.keep_window = Some((start, end));
    }

    /// Records what `vm` was given at creation.
    pub fn assign(&mut self, vm: VmId, memory: VmMemory) {
        self.vms.insert(vm, memory);
    }

    /// Returns the bytes `vm` has allocated and not given back.
    pub fn charged(&self, vm: VmId) -> u64 {
        self.charged.get(&vm).copied().unwrap_or(0)
    }

    fn sets_of(&self, vm: VmId) -> usize {
        self.sets.values().filter(|s| s.owner == vm).count()
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_set;
        self.next_set += 1;
        id
    }

    /// Grants a new VM its initial memory capabilities: its address space, then its
    /// initial frame set (already mapped at 0, so no effect is emitted).
    pub fn grant_initial(
        &mut self,
        vm: VmId,
        kinds: (Object, Object),
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<Vec<CapName>, AmError> {
        let Some(memory) = self.vms.get(&vm).copied() else {
            return Ok(Vec::new());
        };
        let (aspace_template, frames_template) = kinds;
        let mut aspace = aspace_template;
        aspace.id = ObjId::new(u64::from(vm.raw()));
        let aspace_cap = kernel.grant_new(aspace, rights.aspace_all, Principal::Vm(vm), Binding::Bound)?;
        let mut names = alloc::vec![aspace_cap];
        if memory.initial_bytes > 0 {
            let (hpa, bytes) = (memory.initial_hpa, memory.initial_bytes);
            let id = self.new_id();
            let mut object = frames_template;
            object.id = ObjId::new(id);
            let (root, granted) =
                kernel.grant_new_root(object, rights.frames_all, Principal::Vm(vm), Binding::Bound)?;
            let set = FrameSet {
                id,
                hpa,
                bytes,
                large: false,
                owner: vm,
                parent: None,
                granted,
                origin: granted,
                allocated: false,
                object,
                root,
            };
            self.sets.insert(id, set);
            self.mappings.push(Mapping {
                set: id,
                frames_cap: granted,
                aspace_cap,
                vm,
                gpa: 0,
                bytes,
                access: frame_access::ALL,
                by: vm,
                lent: false,
            });
            names.push(granted);
        }
        Ok(names)
    }

    /// `alloc(c: aspace[alloc], pages, large)`: allocates `pages` pages (2 MiB ones when
    /// `large` is 1) charged to `caller`, and grants it a capability with every frame right.
    pub fn alloc(
        &mut self,
        caller: VmId,
        args: &[u64],
        frames_template: Object,
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (pages, large) = (args[0], args[1]);
        let page = match large {
            0 => PAGE_4K,
            1 => PAGE_2M,
            _ => return Err(AmError::BadArgument),
        };
        let bytes = pages.checked_mul(page).filter(|&b| b > 0).ok_or(AmError::BadArgument)?;
        let quota = self.vms.get(&caller).map_or(0, |m| m.frame_quota);
        let charged = self.charged(caller);
        if charged.checked_add(bytes).is_none_or(|total| total > quota) || self.sets_of(caller) >= FRAME_SETS_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        let hpa = kernel.allocate_frames(bytes, page).ok_or(AmError::NoMemory)?;
        let id = self.new_id();
        let mut object = frames_template;
        object.id = ObjId::new(id);
        let (root, granted) =
            match kernel.grant_new_root(object, rights.frames_all, Principal::Vm(caller), Binding::Bound) {
                Ok(names) => names,
                Err(error) => {
                    kernel.emit(Effect::FreeFrames { hpa, bytes });
                    return Err(error.into());
                }
            };
        let set = FrameSet {
            id,
            hpa: Some(hpa),
            bytes,
            large: large == 1,
            owner: caller,
            parent: None,
            granted,
            origin: granted,
            allocated: true,
            object,
            root,
        };
        self.sets.insert(id, set);
        self.charged.insert(caller, charged + bytes);
        Ok(Outcome { name: Some(granted), results: [bytes, 0, 0, 0] })
    }

    /// `split(c: frames[split], offset, bytes)`: derives the sub-range `[offset, offset +
    /// bytes)` of the set as a new set with the capability's rights; it dies with `c`.
    pub fn split(
        &mut self,
        caller: VmId,
        cap: (CapName, ObjId, Rights),
        args: &[u64],
        frames_template: Object,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (name, id, held) = cap;
        let parent = *self.sets.get(&id.raw()).ok_or(AmError::NotPermitted)?;
        let parent_hpa = self.resolve(parent.id, kernel)?;
        let (offset, bytes) = (args[0], args[1]);
        let end = offset.checked_add(bytes).ok_or(AmError::BadArgument)?;
        if bytes == 0 || !aligned(offset, PAGE_4K) || !aligned(bytes, PAGE_4K) || end > parent.bytes {
            return Err(AmError::BadArgument);
        }
        if self.sets_of(caller) >= FRAME_SETS_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        let large = parent.large && aligned(offset, PAGE_2M) && aligned(bytes, PAGE_2M);
        let new = self.new_id();
        let mut object = frames_template;
        object.id = ObjId::new(new);
        let (root, granted) = kernel.grant_new_root(object, held, Principal::Vm(caller), Binding::Bound)?;
        let set = FrameSet {
            id: new,
            hpa: Some(parent_hpa + offset),
            bytes,
            large,
            owner: caller,
            parent: Some(parent.id),
            granted,
            origin: name,
            allocated: false,
            object,
            root,
        };
        self.sets.insert(new, set);
        Ok(Outcome { name: Some(granted), results: [bytes, 0, 0, 0] })
    }

    /// `map(c0: frames[map], c1: aspace[map], gpa, access)`: maps the whole set into the
    /// address space's VM at `gpa`. Refused, changing nothing: access beyond the frame
    /// capability's rights (`NOT_PERMITTED`), over an existing mapping (`NOT_PERMITTED`),
    /// misaligned or outside the VM's range (`BAD_ARGUMENT`).
    pub fn map(
        &mut self,
        caller: VmId,
        frames: (CapName, ObjId, Rights),
        aspace: (CapName, ObjId),
        args: &[u64],
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (frames_cap, set_id, held) = frames;
        let set = self.sets.get(&set_id.raw()).ok_or(AmError::NotPermitted)?;
        let (id, bytes, large) = (set.id, set.bytes, set.large);
        let hpa = match set.hpa {
            Some(hpa) => hpa,
            None => self.resolve(id, kernel)?,
        };
        let vm = aspace_vm(aspace.1)?;
        let (gpa, access) = (args[0], args[1]);
        let access = u8::try_from(access).ok().filter(|&a| valid_access(a));
        let access = access.ok_or(AmError::BadArgument)?;
        if !held.contains(rights.for_access(access)) {
            return Err(AmError::NotPermitted);
        }
        let (base, limit) = self.vms.get(&vm).map_or((0, 0), |m| (m.gpa_base, m.gpa_limit));
        let end = gpa.checked_add(bytes).ok_or(AmError::BadArgument)?;
        if !aligned(gpa, PAGE_4K) || gpa < base || end > limit {
            return Err(AmError::BadArgument);
        }
        // One pass over the mappings: none may overlap, and the caller's are counted.
        let mut made = 0;
        for m in &self.mappings {
            if m.overlaps(vm, gpa, bytes) {
                return Err(AmError::NotPermitted);
            }
            made += usize::from(m.by == caller);
        }
        if made >= MAPPINGS_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        let large = large && aligned(gpa, PAGE_2M);
        self.mappings.push(Mapping {
            set: id,
            frames_cap,
            aspace_cap: aspace.0,
            vm,
            gpa,
            bytes,
            access,
            by: caller,
            lent: false,
        });
        kernel.emit(Effect::MapFrames { vm, gpa, hpa, bytes, large, access });
        Ok(Outcome::value(bytes))
    }

    /// Lends set `set` (presented by `caller` with capability `name` and rights `held`) as
    /// the whole RAM of VM `to`, a VM the guest-OS AM creates at run time
    /// (`Kernel::lend_frames`): recorded as a mapping at guest-physical 0 with every
    /// access, so the capability's death (or a `free`) unmaps it from `to` before the frames
    /// go back. No effect is emitted: the hypervisor maps the RAM when it builds the VM, as
    /// for a VM's initial memory. Refused, changing nothing: a set the caller did not
    /// allocate itself or presented through another capability than the one `alloc`
    /// granted (then the set's death is decided on the caller's own kernel instance, never
    /// while the VM is being built), a capability without `read`, `write` and `execute`, a
    /// set already lent (`NOT_PERMITTED`); the caller's mapping bound (`QUOTA_EXCEEDED`);
    /// what `fits` refuses.
    pub fn lend(
        &mut self,
        caller: VmId,
        frames: (CapName, ObjId, Rights),
        to: VmId,
        rights: &MemoryRights,
        fits: &mut dyn FnMut(u64) -> Result<(), AmError>,
    ) -> Result<(u64, u64), AmError> {
        let (name, id, held) = frames;
        let set = *self.sets.get(&id.raw()).ok_or(AmError::NotPermitted)?;
        let hpa = match (set.allocated, set.owner == caller, set.granted == name, set.hpa) {
            (true, true, true, Some(hpa)) => hpa,
            _ => return Err(AmError::NotPermitted),
        };
        if !held.contains(rights.for_access(frame_access::ALL)) {
            return Err(AmError::NotPermitted);
        }
        // The VM has no memory yet: no mapping but, for a boot VM built through the guest-OS
        // AM, its initial memory's, whose place is not known until these frames are lent.
        let placeholder = |m: &Mapping| self.sets.get(&m.set).is_some_and(|s| !s.allocated && s.hpa.is_none());
        if self.mappings.iter().any(|m| m.lent && m.set == set.id)
            || self.mappings.iter().any(|m| m.vm == to && !placeholder(m))
        {
            return Err(AmError::NotPermitted);
        }
        if self.mappings.iter().filter(|m| m.by == caller).count() >= MAPPINGS_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        fits(set.bytes)?;
        self.mappings.push(Mapping {
            set: set.id,
            frames_cap: name,
            aspace_cap: name,
            vm: to,
            gpa: 0,
            bytes: set.bytes,
            access: frame_access::ALL,
            by: caller,
            lent: true,
        });
        Ok((hpa, set.bytes))
    }

    /// Returns where set `id` lies in host memory, asking the hypervisor for a VM's
    /// initial memory the first time (`NOT_PERMITTED` before the VM has started).
    fn resolve(&mut self, id: u64, kernel: &dyn Kernel) -> Result<u64, AmError> {
        let set = self.sets.get_mut(&id).ok_or(AmError::NotPermitted)?;
        if let Some(hpa) = set.hpa {
            return Ok(hpa);
        }
        let (hpa, bytes) = kernel.guest_memory(set.owner).ok_or(AmError::NotPermitted)?;
        if bytes < set.bytes {
            return Err(AmError::NotPermitted);
        }
        set.hpa = Some(hpa);
        Ok(hpa)
    }

    fn mapping_at(&self, vm: VmId, gpa: u64) -> Result<usize, AmError> {
        self.mappings.iter().position(|m| m.vm == vm && m.gpa == gpa).ok_or(AmError::BadArgument)
    }

    /// `unmap(c: aspace[map], gpa)`: removes the mapping that starts at `gpa`.
    pub fn unmap(&mut self, aspace: ObjId, args: &[u64], effects: &mut dyn Effects) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        let index = self.mapping_at(vm, args[0])?;
        let mapping = self.mappings.remove(index);
        effects.emit(mapping.unmap());
        Ok(Outcome::value(mapping.bytes))
    }

    /// `protect(c: aspace[map], gpa, access)`: cuts the access of the mapping at `gpa` to
    /// `access`, which must be a subset of what it has (widening takes a new mapping).
    pub fn protect(&mut self, aspace: ObjId, args: &[u64], effects: &mut dyn Effects) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        let index = self.mapping_at(vm, args[0])?;
        let access = u8::try_from(args[1]).ok().filter(|&a| valid_access(a)).ok_or(AmError::BadArgument)?;
        let mapping = &mut self.mappings[index];
        if access & !mapping.access != 0 {
            return Err(AmError::NotPermitted);
        }
        if access != mapping.access {
            mapping.access = access;
            effects.emit(Effect::ProtectFrames { vm, gpa: mapping.gpa, bytes: mapping.bytes, access });
        }
        Ok(Outcome::value(mapping.bytes))
    }

    /// `dirty(c0: aspace[dirty], c1: frames[write], gpa, pages, offset, flags)`: reads and
    /// clears the dirty flags of `pages` 4 KiB pages from `gpa` in the address space's VM,
    /// into a bitmap at byte `offset` of the frame set `c1` names (the hypervisor writes
    /// only there). At most [`DIRTY_PAGES_MAX`] pages a call. With `flags` =
    /// `exo_dirty::KEEP` the flags are only read, which is allowed in the keep window too
    /// (another AM's mappings, whose flags that AM owns: reading them leaves its view
    /// whole).
    pub fn dirty(
        &mut self,
        aspace: ObjId,
        bitmap: (ObjId, Rights),
        args: &[u64],
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        let (gpa, pages, offset, flags) = (args[0], args[1], args[2], args[3]);
        if flags & !nk_abi::exo_dirty::KEEP != 0 {
            return Err(AmError::BadArgument);
        }
        let bitmap_hpa = self.bitmap_at(bitmap, offset, pages, rights, kernel)?;
        if flags & nk_abi::exo_dirty::KEEP == 0 {
            self.check_range(vm, gpa, pages)?;
            kernel.emit(Effect::TakeDirty { vm, gpa, pages, bitmap_hpa, keep: false });
            return Ok(Outcome::value(pages));
        }
        let in_window = self.keep_window.is_some_and(|(start, end)| {
            pages > 0
                && pages <= DIRTY_PAGES_MAX
                && aligned(gpa, PAGE_4K)
                && gpa >= start
                && gpa.checked_add(pages * PAGE_4K).is_some_and(|last| last <= end)
        });
        if !in_window {
            self.check_range(vm, gpa, pages)?;
        }
        kernel.emit(Effect::TakeDirty { vm, gpa, pages, bitmap_hpa, keep: true });
        Ok(Outcome::value(pages))
    }

    /// `dirty-read(c: aspace[dirty], gpa, pages)`: reads and clears the dirty flags of
    /// `pages` 4 KiB pages from `gpa` in the address space's VM into `bitmap` (bit i of
    /// byte i / 8 for page i), synchronously (`Kernel::take_dirty`). The range may lie
    /// anywhere in the VM's guest-physical space, not only where this AM maps: the right
    /// `dirty` covers the whole address space, and reading flags changes no mapping (it is
    /// how the NVRAM AM reads the write set of a region it mapped). Where the hypervisor
    /// cannot tell, every page reads as dirty. At most [`DIRTY_PAGES_MAX`] pages.
    pub fn dirty_read(
        &mut self,
        aspace: ObjId,
        args: &[u64],
        bitmap: &mut [u8],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        let (gpa, pages) = (args[0], args[1]);
        if pages == 0 || pages > DIRTY_PAGES_MAX || !aligned(gpa, PAGE_4K) {
            return Err(AmError::BadArgument);
        }
        gpa.checked_add(pages * PAGE_4K).ok_or(AmError::BadArgument)?;
        let bitmap = bitmap.get_mut(..pages.div_ceil(8) as usize).ok_or(AmError::BadArgument)?;
        if !kernel.take_dirty(vm, gpa, pages, bitmap) {
            bitmap.fill(0xFF);
        }
        // No bits past the range.
        if let (Some(last), rest @ 1..) = (bitmap.last_mut(), pages % 8) {
            *last &= (1u8 << rest) - 1;
        }
        Ok(Outcome::value(pages))
    }

    /// `pml-enable(c: aspace[dirty], gpa, pages)`: turns on Page-Modification Logging for
    /// `pages` pages from `gpa` of the caller's own address space (PML is a VMCS setting:
    /// only the VM itself, on its CPU, switches it); a new range replaces the old one.
    pub fn pml_enable(
        &mut self,
        caller: VmId,
        aspace: ObjId,
        args: &[u64],
        effects: &mut dyn Effects,
    ) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        if vm != caller {
            return Err(AmError::NotPermitted);
        }
        let (gpa, pages) = (args[0], args[1]);
        self.check_range(vm, gpa, pages)?;
        self.pml.insert(vm, (gpa, pages));
        effects.emit(Effect::PmlEnable { vm, gpa, pages });
        Ok(Outcome::value(pages))
    }

    /// `pml-drain(c0: aspace[dirty], c1: frames[write], offset)`: writes the pages of the
    /// caller's PML range logged since the last drain into a bitmap at byte `offset` of
    /// the frame set `c1` names.
    pub fn pml_drain(
        &mut self,
        caller: VmId,
        aspace: ObjId,
        bitmap: (ObjId, Rights),
        args: &[u64],
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let vm = aspace_vm(aspace)?;
        if vm != caller {
            return Err(AmError::NotPermitted);
        }
        let &(_, pages) = self.pml.get(&vm).ok_or(AmError::NotPermitted)?;
        let bitmap_hpa = self.bitmap_at(bitmap, args[0], pages, rights, kernel)?;
        kernel.emit(Effect::PmlDrain { vm, pages, bitmap_hpa });
        Ok(Outcome::value(pages))
    }

    fn check_range(&self, vm: VmId, gpa: u64, pages: u64) -> Result<(), AmError> {
        if pages == 0 || pages > DIRTY_PAGES_MAX || !aligned(gpa, PAGE_4K) {
            return Err(AmError::BadArgument);
        }
        let (base, limit) = self.vms.get(&vm).map_or((0, 0), |m| (m.gpa_base, m.gpa_limit));
        let end = gpa.checked_add(pages * PAGE_4K).ok_or(AmError::BadArgument)?;
        if gpa < base || end > limit {
            return Err(AmError::BadArgument);
        }
        Ok(())
    }

    /// Returns where a bitmap of `pages` bits at byte `offset` of the set `bitmap` names
    /// lies, if it fits and the capability may write.
    fn bitmap_at(
        &mut self,
        bitmap: (ObjId, Rights),
        offset: u64,
        pages: u64,
        rights: &MemoryRights,
        kernel: &mut dyn Kernel,
    ) -> Result<u64, AmError> {
        let set = *self.sets.get(&bitmap.0.raw()).ok_or(AmError::NotPermitted)?;
        if !bitmap.1.contains(rights.write) {
            return Err(AmError::NotPermitted);
        }
        let end = offset.checked_add(pages.div_ceil(8)).ok_or(AmError::BadArgument)?;
        if end > set.bytes {
            return Err(AmError::BadArgument);
        }
        Ok(self.resolve(set.id, kernel)? + offset)
    }

    /// `free(c: frames)`: gives back an allocation the caller made (every mapping of it
    /// and of its split sets goes first).
    pub fn free(&mut self, caller: VmId, set: ObjId, effects: &mut dyn Effects) -> Result<Outcome, AmError> {
        let set = *self.sets.get(&set.raw()).ok_or(AmError::NotPermitted)?;
        if set.owner != caller || !set.allocated {
            return Err(AmError::NotPermitted);
        }
        self.kill(set.id, effects);
        Ok(Outcome::value(set.bytes))
    }

    /// Undoes what a dead capability enabled: its mappings, and the sets that die with it.
    pub fn revoked(&mut self, dead: CapName, effects: &mut dyn Effects) {
        self.mappings.retain(|m| {
            let dies = m.frames_cap == dead || m.aspace_cap == dead;
            if dies {
                effects.emit(m.unmap());
            }
            !dies
        });
        let dying: Vec<u64> =
            self.sets.values().filter(|s| s.granted == dead || s.origin == dead).map(|s| s.id).collect();
        for id in dying {
            self.kill(id, effects);
        }
    }

    /// Kills set `id` and every set split from it: unmaps them everywhere, then gives
    /// allocated frames back and credits their owner.
    fn kill(&mut self, id: u64, effects: &mut dyn Effects) {
        let mut family = alloc::vec![id];
        let mut next = 0;
        while next < family.len() {
            let parent = family[next];
            family.extend(self.sets.values().filter(|s| s.parent == Some(parent)).map(|s| s.id));
            next += 1;
        }
        self.mappings.retain(|m| {
            let dies = family.contains(&m.set);
            if dies {
                effects.emit(m.unmap());
            }
            !dies
        });
        for id in family {
            let Some(set) = self.sets.remove(&id) else { continue };
            effects.emit(Effect::Retire { am: set.object.am, root: set.root });
            if let (true, Some(hpa)) = (set.allocated, set.hpa) {
                effects.emit(Effect::FreeFrames { hpa, bytes: set.bytes });
                if let Some(charged) = self.charged.get_mut(&set.owner) {
                    *charged -= set.bytes;
                }
            }
        }
    }
}

/// Tells whether `access` is a set of `frame_access` bits an EPT entry can hold: not empty,
/// and no write without read (SDM Vol. 3 §29.3.3.1: that is a misconfiguration).
fn valid_access(access: u8) -> bool {
    access != 0
        && access & !frame_access::ALL == 0
        && (access & frame_access::WRITE == 0 || access & frame_access::READ != 0)
}

fn aspace_vm(id: ObjId) -> Result<VmId, AmError> {
    u32::try_from(id.raw()).map(VmId::new).map_err(|_| AmError::BadArgument)
}
