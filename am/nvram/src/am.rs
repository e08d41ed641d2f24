//! The NVRAM AM's objects and operations (the crate docs describe them for callers).

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use nk_am::{
    frame_access, AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effect, Effects,
    HostMemory, Kernel, KindSpec, Media, ObjId, ObjKind, Object, OpSpec, Outcome, Principal, RegisterError, Registrar,
    Rights, VmId, PLAIN_ARGS,
};

use crate::directory::{Directory, Entry, Slot};
use crate::ptx::{Store, StoreError, BLOCK};

/// ABI operation numbers, as the shared ABI crate defines them (`nk_abi::nvram_op`).
pub mod op {
    pub const ALLOCATE: u16 = nk_abi::nvram_op::ALLOCATE as u16;
    pub const MAP: u16 = nk_abi::nvram_op::MAP as u16;
    pub const UNMAP: u16 = nk_abi::nvram_op::UNMAP as u16;
    pub const BEGIN: u16 = nk_abi::nvram_op::BEGIN as u16;
    pub const COMMIT: u16 = nk_abi::nvram_op::COMMIT as u16;
    pub const RESTORE: u16 = nk_abi::nvram_op::RESTORE as u16;
    pub const SEQ: u16 = nk_abi::nvram_op::SEQ as u16;
}

/// Rights bits of a region capability, in registration order.
pub mod rights {
    pub const MAP_READ: u64 = 1 << 0;
    pub const MAP_WRITE: u64 = 1 << 1;
    pub const COMMIT: u64 = 1 << 2;
    pub const RESTORE: u64 = 1 << 3;
}

/// A page of a region (regions are whole pages, mapped with 4 KiB EPT entries).
pub const PAGE: u64 = 4096;
/// The largest region.
pub const REGION_MAX: u64 = 16 << 20;
/// The most regions one VM may have loaded at a time.
pub const REGIONS_PER_VM: usize = 4;
/// The most bytes of regions one VM may have loaded at a time (each costs twice its size
/// in host frames: the working copy and the committed copy).
pub const BYTES_PER_VM: u64 = 32 << 20;
/// The most bytes of regions loaded at a time, all VMs together: bounds the hypervisor heap
/// the AM uses (per loaded 16 MiB region, about 2.5 MiB: the map, the header copies, a
/// commit's block list and a restore's log buffer).
pub const LOADED_BYTES_MAX: u64 = 32 << 20;
/// The most mappings of one region at a time.
pub const MAPPINGS_PER_REGION: usize = 8;

/// What the hypervisor gives a VM at creation: a factory whose owner number names the
/// VM's regions on the device (stable across restarts: the hypervisor derives it from the
/// VM's module name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvramGrant {
    pub vm: VmId,
    pub owner: u64,
}

impl NvramGrant {
    /// Grants `vm` a factory whose owner number is the FNV-1a 64 hash of the guest's
    /// `name`, so a guest of the same name finds its regions again after a restart.
    pub fn for_guest(vm: VmId, name: &str) -> Self {
        use core::hash::Hasher as _;
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(name.as_bytes());
        Self { vm, owner: hasher.finish() }
    }
}

#[derive(Clone, Copy, Debug)]
struct RegionMapping {
    cap: CapName,
    /// The VM whose address space holds the mapping.
    vm: VmId,
    /// The VM that made it (its caller).
    by: VmId,
    gpa: u64,
    access: u8,
    /// The AM's capability to the exo AM's dirty tracking of the mapper's address space
    /// (`aspace[dirty]`, lent by the mapper at `map`), through which commit reads the
    /// mapping's write set; None when the mapper held none (every page then counts as
    /// dirty).
    exo: Option<CapName>,
}

#[derive(Debug)]
struct Region {
    entry: Entry,
    store: Store,
    /// The VM that loaded it (charged for its frames).
    loader: VmId,
    /// The capability `allocate` granted: the region is unloaded when it dies.
    granted: CapName,
    /// Host frames: the working copy (mapped into guests) and, after it, the committed
    /// copy (what commit diffs against).
    working: u64,
    mappings: Vec<RegionMapping>,
    /// The capability that opened the current transaction.
    transaction: Option<CapName>,
    /// Pages written since the last commit or restore, as far as known (bit per page).
    dirty: Vec<u8>,
    /// A commit failed on the device: the store and committed copy are reloaded from the
    /// device by the next restore, and nothing else is allowed before it.
    poisoned: bool,
}

impl Region {
    fn pages(&self) -> u64 {
        self.entry.bytes / PAGE
    }

    fn committed(&self) -> u64 {
        self.working + self.entry.bytes
    }

    fn mark_all_dirty(&mut self) {
        self.dirty.fill(0xFF);
    }
}

/// The NVRAM AM.
#[derive(Default)]
pub struct NvramAm {
    am: Option<AmId>,
    factory_kind: Option<ObjKind>,
    region_kind: Option<ObjKind>,
    grants: Vec<NvramGrant>,
    directory: Option<Directory>,
    regions: BTreeMap<u64, Region>,
    next_region: u64,
    /// Host memory, kept from the first call so revocations can abort transactions.
    host: Option<&'static dyn HostMemory>,
    /// Guest-physical addresses `[start, end)` where regions may be mapped (kept apart
    /// from where other AMs map, so no mapping lands over another AM's); None: anywhere.
    window: Option<(u64, u64)>,
    /// Regions (owner, key) whose corrupt metadata was logged.
    reported: alloc::collections::BTreeSet<(u64, u64)>,
    /// The exo AM's `dirty-read` (found at the first `map`).
    dirty_read: Option<nk_am::OpId>,
    /// Exo capabilities of mappings removed by a revocation (which cannot call the
    /// null-Kernel), given back at the AM's next call; at most one per mapping.
    orphans: Vec<CapName>,
    /// The block AM's range of the whole device, per kernel instance (granted at start-up):
    /// the durable device, through block capabilities (seed §5.2.2).
    block: BTreeMap<u32, BlockRange>,
    /// A commit's write set, kept between commits (a commit allocates nothing for it).
    writes: Vec<u32>,
}

/// Runs `f` with the durable device: the block AM's range of this kernel instance when
/// the AM holds one ([`nk_am_block::BlockMedia`]: every access an AM-to-AM call), else
/// the device the hypervisor lends (`Kernel::with_media`). False when there is none.
fn with_device(
    block: &mut BTreeMap<u32, BlockRange>,
    kernel: &mut dyn Kernel,
    f: &mut dyn FnMut(&mut dyn Media),
) -> bool {
    let Some(range) = block.get_mut(&kernel.instance()) else {
        return kernel.with_media(f);
    };
    let info = match range.info {
        Some(info) => info,
        None => match nk_am_block::BlockMedia::probe(kernel, range.cap) {
            Ok(info) => *range.info.insert(info),
            Err(_) => return false,
        },
    };
    f(&mut nk_am_block::BlockMedia::with_info(kernel, range.cap, info));
    true
}

/// The block AM's range of the device on one kernel instance, and what opening it said
/// (asked once: the operations and the range's size do not change).
#[derive(Clone, Copy, Debug)]
struct BlockRange {
    cap: CapName,
    info: Option<nk_am_block::RangeInfo>,
}

impl core::fmt::Debug for NvramAm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvramAm").field("regions", &self.regions).finish_non_exhaustive()
    }
}

fn media_error(error: StoreError) -> AmError {
    match error {
        StoreError::NoSpace => AmError::NoMemory,
        StoreError::BadArgument => AmError::BadArgument,
        _ => AmError::NotPermitted,
    }
}

impl NvramAm {
    /// Creates the AM; `grants` says which VMs get a factory and their owner numbers.
    pub fn new(grants: Vec<NvramGrant>) -> Self {
        Self { grants, next_region: 1, ..Self::default() }
    }

    /// Lets regions be mapped only inside guest-physical `[start, end)` (the hypervisor
    /// keeps it apart from the exo AM's range).
    pub fn with_window(mut self, start: u64, end: u64) -> Self {
        self.window = Some((start, end));
        self
    }

    /// Returns the directory's slots once mounted (for the boot log).
    pub fn directory(&self) -> Option<&[Slot]> {
        self.directory.as_ref().map(|d| d.slots())
    }

    /// Mounts the directory on first use.
    fn mount(&mut self, kernel: &mut dyn Kernel) -> Result<(), AmError> {
        if self.directory.is_some() {
            return Ok(());
        }
        let mut result = None;
        with_device(&mut self.block, kernel, &mut |media| result = Some(Directory::mount(media)));
        let directory = result.ok_or(AmError::NotPermitted)?.map_err(|e| {
            log::error!(target: "nvram", "the device's region directory cannot be used: {e:?}");
            AmError::NotPermitted
        })?;
        for (slot, entry) in directory.slots().iter().enumerate() {
            if *entry == Slot::Corrupt {
                log::error!(target: "nvram", "directory entry {slot} is corrupt: its region cannot be opened");
            }
        }
        self.directory = Some(directory);
        Ok(())
    }

    fn region_object(&self, id: u64) -> Result<Object, AmError> {
        let am = self.am.ok_or(AmError::NotPermitted)?;
        let kind = self.region_kind.ok_or(AmError::NotPermitted)?;
        Ok(Object::new(am, kind, ObjId::new(id)))
    }

    /// `allocate(c: nvram-factory, bytes, key)`.
    fn allocate(
        &mut self,
        vm: VmId,
        owner: u64,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (bytes, key) = (args[0], args[1]);
        if bytes == 0 || !bytes.is_multiple_of(PAGE) || bytes > REGION_MAX {
            return Err(AmError::BadArgument);
        }
        let host = kernel.host_memory().ok_or(AmError::NotPermitted)?;
        self.host = Some(host);
        let mine: Vec<&Region> = self.regions.values().filter(|r| r.loader == vm).collect();
        if mine.len() >= REGIONS_PER_VM || mine.iter().map(|r| r.entry.bytes).sum::<u64>() + bytes > BYTES_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        if self.regions.values().map(|r| r.entry.bytes).sum::<u64>() + bytes > LOADED_BYTES_MAX {
            return Err(AmError::NoMemory);
        }
        if self.regions.values().any(|r| r.entry.owner == owner && r.entry.key == key) {
            // Loaded already: whoever loaded it shares it by delegating its capability.
            return Err(AmError::NotPermitted);
        }
        self.mount(kernel)?;
        let object = self.region_object(self.next_region)?;
        let directory = self.directory.as_mut().ok_or(AmError::NotPermitted)?;
        let existing = directory.find(owner, key);
        if existing.is_some_and(|e| e.bytes != bytes) {
            return Err(AmError::BadArgument);
        }
        let working = kernel.allocate_frames(2 * bytes, PAGE).ok_or(AmError::NoMemory)?;
        let free = |kernel: &mut dyn Kernel| kernel.emit(Effect::FreeFrames { hpa: working, bytes: 2 * bytes });
        // Open (restore) the region's store, or create it; then load its committed state
        // into both copies.
        let mut result = None;
        let mut corrupt = None;
        with_device(&mut self.block, kernel, &mut |media: &mut dyn Media| {
            result = Some(
                match existing {
                    Some(entry) => {
                        Store::open(media, entry.geometry).map(|(store, _)| (entry, store, false)).map_err(|error| {
                            if let StoreError::Corrupt(what) = error {
                                corrupt = Some(what);
                            }
                            media_error(error)
                        })
                    }
                    None => directory
                        .create(media, owner, key, bytes)
                        .map(|(entry, store)| (entry, store, true))
                        .map_err(|_| AmError::NoMemory),
                }
                .and_then(|(entry, store, created)| {
                    load(&store, media, host, working, bytes)?;
                    Ok((entry, store, created))
                }),
            );
        });
        if let Some(what) = corrupt {
            // Reported once per region a boot, however often a guest asks again.
            if self.reported.insert((owner, key)) {
                log::error!(target: "nvram", "region {owner:#x}/{key}: restore found corrupt metadata ({what:?}); not loaded");
            }
        }
        let (entry, store, created) = match result.unwrap_or(Err(AmError::NotPermitted)) {
            Ok(opened) => opened,
            Err(error) => {
                free(kernel);
                return Err(error);
            }
        };
        let id = self.next_region;
        let all = Rights::from_bits(rights::MAP_READ | rights::MAP_WRITE | rights::COMMIT | rights::RESTORE);
        let granted = match kernel.grant_new(object, all, Principal::Vm(vm), Binding::Bound) {
            Ok(name) => name,
            Err(error) => {
                free(kernel);
                return Err(error.into());
            }
        };
        self.next_region += 1;
        let seq = store.seq();
        let pages = (bytes / PAGE) as usize;
        self.regions.insert(
            id,
            Region {
                entry,
                store,
                loader: vm,
                granted,
                working,
                mappings: Vec::new(),
                transaction: None,
                dirty: vec![0; pages.div_ceil(8)],
                poisoned: false,
            },
        );
        Ok(Outcome { name: Some(granted), results: [bytes, seq, u64::from(created), id] })
    }

    /// `map(c: region[map-read], gpa, access)`: maps the region's working copy into the
    /// caller at `gpa` with `access` (`frame_access::READ`, plus `WRITE` with the right
    /// `map-write`; never `EXECUTE`).
    fn map(
        &mut self,
        vm: VmId,
        cap: CapName,
        held: Rights,
        id: u64,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (gpa, access) = (args[0], args[1]);
        let access = u8::try_from(access).map_err(|_| AmError::BadArgument)?;
        if access & frame_access::READ == 0
            || access & !(frame_access::READ | frame_access::WRITE) != 0
            || !gpa.is_multiple_of(PAGE)
        {
            return Err(AmError::BadArgument);
        }
        if access & frame_access::WRITE != 0 && !held.contains(Rights::from_bits(rights::MAP_WRITE)) {
            return Err(AmError::NotPermitted);
        }
        let region = self.regions.get(&id).ok_or(AmError::NotPermitted)?;
        let bytes = region.entry.bytes;
        let end = gpa.checked_add(bytes).ok_or(AmError::BadArgument)?;
        if self.window.is_some_and(|(start, limit)| gpa < start || end > limit) {
            return Err(AmError::BadArgument);
        }
        if region.mappings.len() >= MAPPINGS_PER_REGION {
            return Err(AmError::QuotaExceeded);
        }
        if self.dirty_read.is_none() {
            self.dirty_read = kernel.find_op("exo", "dirty-read");
        }
        // The address space: the caller's own, or the one of the exo capability it names.
        let (target, exo) = self.lend_aspace(vm, access, args, kernel)?;
        let overlaps = self.regions.values().flat_map(|r| r.mappings.iter().map(move |m| (m, r.entry.bytes)));
        for (m, other) in overlaps {
            if m.vm == target && gpa < m.gpa + other && m.gpa < end {
                if let Some(exo) = exo {
                    kernel.drop_cap(exo);
                }
                return Err(AmError::NotPermitted);
            }
        }
        let region = self.regions.get_mut(&id).ok_or(AmError::NotPermitted)?;
        region.mappings.push(RegionMapping { cap, vm: target, by: vm, gpa, access, exo });
        kernel.emit(Effect::MapFrames { vm: target, gpa, hpa: region.working, bytes, large: false, access });
        Ok(Outcome::value(bytes))
    }

    /// Decides where `map` maps and what exo capability the AM keeps for it: with a name
    /// in `args[2]` (high) and `args[3]` (low), a child of that exo `aspace` capability
    /// with the rights `map` and `dirty`, and its VM (§5.4's `aspace`: another VM's, if the
    /// caller holds a capability to it); without one, the caller's own address space and,
    /// for a writable mapping, a child of its own `aspace[dirty]` capability if it holds
    /// one.
    fn lend_aspace(
        &self,
        vm: VmId,
        access: u8,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<(VmId, Option<CapName>), AmError> {
        if (args[2], args[3]) == (0, 0) {
            let exo = if access & frame_access::WRITE != 0 { take_own_dirty_cap(vm, kernel) } else { None };
            return Ok((vm, exo));
        }
        let (child, object) = kernel.take_cap(vm, CapName::from_words(args[2], args[3]), &["map", "dirty"])?;
        let exo_am = self.dirty_read.map(|op| op.am());
        match u32::try_from(object.id.raw()) {
            Ok(target) if exo_am == Some(object.am) => Ok((VmId::new(target), Some(child))),
            _ => {
                kernel.drop_cap(child);
                Err(AmError::BadArgument)
            }
        }
    }

    /// `unmap(c: region[map-read], gpa, target)`: removes the mapping of the region at
    /// `gpa` that the caller made in its own address space (`target` 0) or in VM `target`'s,
    /// keeping what its dirty flags say for the next commit.
    fn unmap(&mut self, vm: VmId, id: u64, gpa: u64, target: u64, kernel: &mut dyn Kernel) -> Result<Outcome, AmError> {
        let target = match target {
            0 => vm,
            n => VmId::new(u32::try_from(n).map_err(|_| AmError::BadArgument)?),
        };
        let region = self.regions.get_mut(&id).ok_or(AmError::NotPermitted)?;
        let index = region
            .mappings
            .iter()
            .position(|m| m.by == vm && m.vm == target && m.gpa == gpa)
            .ok_or(AmError::BadArgument)?;
        // A mapping whose write set cannot be read any more leaves every page dirty.
        let _ = collect_dirty(region, self.dirty_read, kernel);
        let mapping = region.mappings.remove(index);
        if let Some(exo) = mapping.exo {
            kernel.drop_cap(exo);
        }
        kernel.emit(Effect::UnmapFrames { vm: target, gpa: mapping.gpa, bytes: region.entry.bytes });
        Ok(Outcome::value(region.entry.bytes))
    }

    /// `commit(c: region[commit])`: makes the region's writes since the last commit or
    /// restore durable, atomically, and closes the transaction.
    ///
    /// With `whole` (argument 0 = 1) it skips the write set and writes every block of the
    /// region (the naive whole-region copy `cargo xtask bench nvram` compares against).
    fn commit(&mut self, id: u64, whole: bool, kernel: &mut dyn Kernel) -> Result<Outcome, AmError> {
        let host = self.host.ok_or(AmError::NotPermitted)?;
        let region = self.regions.get_mut(&id).ok_or(AmError::NotPermitted)?;
        if region.poisoned {
            return Err(AmError::NotPermitted);
        }
        // The write set comes from below: a refusal there (the exo capability revoked)
        // refuses the commit, with nothing written; the pages stay dirty.
        collect_dirty(region, self.dirty_read, kernel)?;
        // The write set: each dirty page diffed against the committed copy in 256-byte
        // blocks (seed §3.2.6).
        let mut writes = core::mem::take(&mut self.writes);
        writes.clear();
        let mut dirty_pages = 0;
        if whole {
            let blocks = region.entry.bytes / BLOCK as u64;
            writes.extend(0..blocks as u32);
            dirty_pages = region.pages();
        }
        for page in 0..region.pages() {
            if whole || region.dirty[(page / 8) as usize] & (1 << (page % 8)) == 0 {
                continue;
            }
            dirty_pages += 1;
            let offset = page * PAGE;
            // Compared in place, the page's blocks in one call
            // (`HostMemory::differing_units`), not copied out.
            let blocks = (PAGE / BLOCK as u64) as usize;
            let differ = host
                .differing_units(region.working + offset, region.committed() + offset, BLOCK, blocks)
                .ok_or(AmError::NotPermitted)?;
            let first = (offset / BLOCK as u64) as u32;
            let mut bits = differ;
            while bits != 0 {
                writes.push(first + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        let (working, committed) = (region.working, region.committed());
        let mut result = None;
        let store = &mut region.store;
        with_device(&mut self.block, kernel, &mut |media: &mut dyn Media| {
            // Each block is read once from the working copy, written to the device and to
            // the committed copy, so the two agree even if a guest writes meanwhile.
            // Blocks with adjacent numbers are adjacent in both copies: one copy each way per
            // run of them.
            result = Some(store.commit(media, &writes, &mut |blocks, out| {
                let mut i = 0;
                while i < blocks.len() {
                    let mut j = i + 1;
                    while j < blocks.len() && blocks[j] == blocks[j - 1].wrapping_add(1) {
                        j += 1;
                    }
                    let at = u64::from(blocks[i]) * BLOCK as u64;
                    let Some(run) = out.get_mut(i * BLOCK..j * BLOCK) else { return };
                    host.read(working + at, run);
                    host.write(committed + at, run);
                    i = j;
                }
            }));
        });
        self.writes = writes;
        match result {
            Some(Ok(stats)) => {
                region.dirty.fill(0);
                region.transaction = None;
                Ok(Outcome {
                    name: None,
                    results: [stats.seq.max(region.store.seq()), stats.blocks, stats.device_bytes, dirty_pages],
                })
            }
            Some(Err(StoreError::NoSpace)) => Err(AmError::NoMemory),
            Some(Err(_)) | None => {
                region.poisoned = true;
                Err(AmError::NotPermitted)
            }
        }
    }

    /// `restore(c: region[restore])`: puts the working copy back to the last committed
    /// state and closes the transaction (PTx's `ptx_restore`, used to abort).
    fn restore(&mut self, id: u64, kernel: &mut dyn Kernel) -> Result<Outcome, AmError> {
        let host = self.host.ok_or(AmError::NotPermitted)?;
        let region = self.regions.get_mut(&id).ok_or(AmError::NotPermitted)?;
        // Pages whose flags cannot be read count as dirty, so the abort covers them.
        let _ = collect_dirty(region, self.dirty_read, kernel);
        if region.poisoned {
            let geometry = region.entry.geometry;
            let (working, bytes) = (region.working, region.entry.bytes);
            let mut result = None;
            with_device(&mut self.block, kernel, &mut |media: &mut dyn Media| {
                result = Some(Store::open(media, geometry).map_err(media_error).and_then(|(store, _)| {
                    // Both copies may hold blocks of the failed commit: start from zeros.
                    let zeros = vec![0u8; PAGE as usize];
                    for page in 0..2 * bytes / PAGE {
                        host.write(working + page * PAGE, &zeros);
                    }
                    load(&store, media, host, working, bytes)?;
                    Ok(store)
                }));
            });
            region.store = result.unwrap_or(Err(AmError::NotPermitted))?;
            region.poisoned = false;
        } else {
            abort(region, host);
        }
        region.dirty.fill(0);
        region.transaction = None;
        Ok(Outcome::value(region.store.seq()))
    }

    /// Unloads region `id`: unmaps it everywhere and gives its frames back (what is
    /// durable stays on the device).
    fn unload(&mut self, id: u64, effects: &mut dyn Effects) {
        if let Some(region) = self.regions.remove(&id) {
            for m in &region.mappings {
                self.orphans.extend(m.exo);
                effects.emit(Effect::UnmapFrames { vm: m.vm, gpa: m.gpa, bytes: region.entry.bytes });
            }
            effects.emit(Effect::FreeFrames { hpa: region.working, bytes: 2 * region.entry.bytes });
        }
    }
}

/// Writes the store's committed state into both copies (frames from the allocator start
/// zeroed, so blocks never committed are right already).
fn load(store: &Store, media: &mut dyn Media, host: &dyn HostMemory, working: u64, bytes: u64) -> Result<(), AmError> {
    let mut ok = true;
    store
        .read_committed(media, &mut |block, data| {
            let at = u64::from(block) * BLOCK as u64;
            ok &= host.write(working + at, data) && host.write(working + bytes + at, data);
        })
        .map_err(media_error)?;
    ok.then_some(()).ok_or(AmError::NotPermitted)
}

/// Copies the committed copy over the working copy's dirty pages.
fn abort(region: &mut Region, host: &dyn HostMemory) {
    let mut page_data = vec![0u8; PAGE as usize];
    for page in 0..region.pages() {
        if region.dirty[(page / 8) as usize] & (1 << (page % 8)) != 0 {
            host.read(region.committed() + page * PAGE, &mut page_data);
            host.write(region.working + page * PAGE, &page_data);
        }
    }
}

/// Takes a child (charged to `vm`) of an exo `aspace[dirty]` capability `vm` holds to its
/// own address space, for a writable mapping that names none; None when it holds none.
fn take_own_dirty_cap(vm: VmId, kernel: &mut dyn Kernel) -> Option<CapName> {
    let name = kernel.find_held(vm, "exo", "aspace", ObjId::new(u64::from(vm.raw())), &["dirty"])?;
    kernel.take_cap(vm, name, &["dirty"]).ok().map(|(child, _)| child)
}

/// Adds the write sets of the region's writable mappings to its dirty pages: each read
/// (and cleared) through the mapping's exo capability with the exo AM's `dirty-read`, an
/// AM-to-AM call checked as any caller's (seed §5.2.1); every page for a mapping without
/// one. A refused read (the capability revoked) marks every page dirty and returns the
/// refusal.
fn collect_dirty(region: &mut Region, op: Option<nk_am::OpId>, kernel: &mut dyn Kernel) -> Result<(), AmError> {
    // On the stack: a region has at most REGION_MAX / PAGE pages, a bit each.
    let mut buffer = [0u8; (REGION_MAX / PAGE / 8) as usize];
    let Some(bitmap) = buffer.get_mut(..region.dirty.len()) else {
        region.mark_all_dirty();
        return Err(AmError::NotPermitted);
    };
    let pages = region.entry.bytes / PAGE;
    let mut refused = Ok(());
    for m in region.mappings.iter().filter(|m| m.access & frame_access::WRITE != 0) {
        bitmap.fill(0);
        let read = match (m.exo, op) {
            (Some(exo), Some(op)) => {
                match kernel.call_am(op, &[exo], &[m.gpa, pages, 0, 0, 0], bitmap) {
                    // The capability lives on the kernel instance of the VM that mapped
                    // (capabilities are per instance); a call from another instance (a
                    // VM on another CPU the region was delegated to) cannot name it, and
                    // counts every page as dirty instead.
                    Err(AmError::Capability(nk_am::CapError::UnknownName)) => {
                        bitmap.fill(0xFF);
                        Ok(())
                    }
                    other => other.map(|_| ()),
                }
            }
            (Some(_), None) => Err(AmError::NotPermitted),
            (None, _) => {
                bitmap.fill(0xFF);
                Ok(())
            }
        };
        if let Err(error) = read {
            bitmap.fill(0xFF);
            refused = Err(error);
        }
        for (d, b) in region.dirty.iter_mut().zip(bitmap.iter()) {
            *d |= b;
        }
    }
    refused
}

impl AbstractMachine for NvramAm {
    fn name(&self) -> &'static str {
        "nvram"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let factory = r.kind(KindSpec { name: "nvram-factory", rights: &["allocate"] })?;
        let region =
            r.kind(KindSpec { name: "nvram-region", rights: &["map-read", "map-write", "commit", "restore"] })?;
        self.am = Some(r.am());
        self.factory_kind = Some(factory);
        self.region_kind = Some(region);
        let right = |r: &Registrar<'_>, kind, name| r.rights(kind, &[name]).ok_or(RegisterError::UnknownKind);
        let allocate = right(r, factory, "allocate")?;
        let map_read = right(r, region, "map-read")?;
        let commit = right(r, region, "commit")?;
        let restore = right(r, region, "restore")?;
        r.operation(OpSpec { name: "allocate", args: &[ArgSpec::new(factory, allocate)] })?;
        r.operation(OpSpec { name: "map", args: &[ArgSpec::new(region, map_read)] })?;
        r.operation(OpSpec { name: "unmap", args: &[ArgSpec::new(region, map_read)] })?;
        r.operation(OpSpec { name: "begin", args: &[ArgSpec::new(region, commit)] })?;
        r.operation(OpSpec { name: "commit", args: &[ArgSpec::new(region, commit)] })?;
        r.operation(OpSpec { name: "restore", args: &[ArgSpec::new(region, restore)] })?;
        r.operation(OpSpec { name: "seq", args: &[ArgSpec::new(region, Rights::NONE)] })?;
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let Principal::Vm(vm) = checked.caller() else {
            return Err(AmError::NotPermitted);
        };
        let cap = &checked.args()[0];
        let id = cap.object().id.raw();
        for orphan in core::mem::take(&mut self.orphans) {
            kernel.drop_cap(orphan);
        }
        match checked.op().index() {
            op::ALLOCATE => self.allocate(vm, id, args, kernel),
            op::MAP => self.map(vm, cap.name(), cap.rights(), id, args, kernel),
            op::UNMAP => self.unmap(vm, id, args[0], args[1], kernel),
            op::BEGIN => {
                let region = self.regions.get_mut(&id).ok_or(AmError::NotPermitted)?;
                if region.transaction.is_some() || region.poisoned {
                    return Err(AmError::NotPermitted);
                }
                region.transaction = Some(cap.name());
                Ok(Outcome::value(region.store.seq()))
            }
            op::COMMIT => self.commit(id, args[0] == 1, kernel),
            op::RESTORE => self.restore(id, kernel),
            op::SEQ => {
                let region = self.regions.get(&id).ok_or(AmError::NotPermitted)?;
                Ok(Outcome {
                    name: None,
                    results: [region.store.seq(), region.entry.bytes, u64::from(region.transaction.is_some()), 0],
                })
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    /// Grants a VM named in the grants its factory (right `allocate`), whose object id is
    /// its owner number.
    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let Some(grant) = self.grants.iter().find(|g| g.vm == vm).copied() else {
            return Ok(Vec::new());
        };
        let am = self.am.ok_or(AmError::NotPermitted)?;
        let kind = self.factory_kind.ok_or(AmError::NotPermitted)?;
        let object = Object::new(am, kind, ObjId::new(grant.owner));
        Ok(vec![kernel.grant_new(object, Rights::from_bits(1), Principal::Vm(vm), Binding::Bound)?])
    }

    /// Keeps the block AM's range of the whole device for instance `instance`.
    fn received_from_am(&mut self, _from: AmId, name: &str, instance: u32, caps: &[CapName]) {
        if let ("block", Some(&cap)) = (name, caps.first()) {
            if instance == 0 {
                log::info!(target: "nvram", "the durable device comes through the block AM (a range capability per kernel instance)");
            }
            self.block.insert(instance, BlockRange { cap, info: None });
        }
    }

    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects) {
        if Some(dead.object.kind) != self.region_kind {
            return;
        }
        let id = dead.object.id.raw();
        let Some(region) = self.regions.get_mut(&id) else { return };
        if region.granted == dead.name {
            self.unload(id, effects);
            return;
        }
        // Every mapping made through the dead capability goes; its dirty flags go with
        // it, so every page counts as dirty from now on. A transaction it opened, or one
        // open while it could write, is aborted.
        let mut wrote = false;
        let orphans = &mut self.orphans;
        region.mappings.retain(|m| {
            let dies = m.cap == dead.name;
            if dies {
                orphans.extend(m.exo);
                wrote |= m.access & frame_access::WRITE != 0;
                effects.emit(Effect::UnmapFrames { vm: m.vm, gpa: m.gpa, bytes: region.entry.bytes });
            }
            !dies
        });
        if wrote {
            region.mark_all_dirty();
        }
        if region.transaction == Some(dead.name) || (wrote && region.transaction.is_some()) {
            if let Some(host) = self.host {
                region.mark_all_dirty();
                abort(region, host);
                region.dirty.fill(0);
            }
            region.transaction = None;
        }
    }
}
