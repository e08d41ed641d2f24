//! The interface between the null-Kernel and an abstract machine (AM), DESIGN.md §1-§2.
//!
//! An AM is safe code (`#![forbid(unsafe_code)]`) that:
//! 1. registers its object kinds (with right names) and its operations (with the kind and
//!    rights each capability argument needs) through a [`Registrar`]; the n-th operation it
//!    registers is operation number n of the hypercall ABI;
//! 2. handles invocations: the null-Kernel has already checked every capability argument,
//!    and the handler sees only [`Checked`] references to its own objects;
//! 3. undoes effects when capabilities to its objects die ([`AbstractMachine::revoked`]).
//!
//! An AM call runs to completion and restores its invariants before it returns (seed
//! §5.3, "AM composition"): an invocation either succeeds or fails without changes.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

use core::fmt;

pub use nk_caps::{
    AmId, ArgSpec, Binding, CapError, CapName, Checked, CheckedCap, DeadCap, KindSpec, ObjId, ObjKind, Object, OpId,
    OpSpec, Principal, RegisterError, Rights, VmId,
};

/// Plain (non-capability) arguments of an invocation.
pub const PLAIN_ARGS: usize = 5;
/// Plain results of an invocation.
pub const RESULTS: usize = 4;

/// Registers one AM's kinds and operations with the null-Kernel's capability table.
pub struct Registrar<'a> {
    am: AmId,
    table: &'a mut nk_caps::CapTable,
}

impl fmt::Debug for Registrar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registrar").field("am", &self.am).finish_non_exhaustive()
    }
}

impl<'a> Registrar<'a> {
    /// Makes a registrar for `am` (the null-Kernel does this when it adds an AM).
    pub fn new(am: AmId, table: &'a mut nk_caps::CapTable) -> Self {
        Self { am, table }
    }

    /// Returns the AM being registered.
    pub fn am(&self) -> AmId {
        self.am
    }

    /// Registers an object kind and the names of its rights (bit n is the n-th name).
    pub fn kind(&mut self, spec: KindSpec<'_>) -> Result<ObjKind, RegisterError> {
        self.table.register_kind(self.am, spec)
    }

    /// Registers an operation; its ABI number is its registration order, from 0.
    pub fn operation(&mut self, spec: OpSpec<'_>) -> Result<OpId, RegisterError> {
        self.table.register_op(self.am, spec)
    }

    /// Returns the rights bits named `names` of `kind`.
    pub fn rights(&self, kind: ObjKind, names: &[&str]) -> Option<Rights> {
        let mut rights = Rights::NONE;
        for name in names {
            rights = Rights::from_bits(rights.bits() | self.table.registry().find_right(self.am, kind, name)?.bits());
        }
        Some(rights)
    }
}

/// Why an AM operation failed (the null-Kernel turns it into a hypercall status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmError {
    /// A plain argument is out of range or malformed.
    BadArgument,
    /// The AM ran out of memory or objects.
    NoMemory,
    /// The caller used up its share of the AM's objects (a per-VM bound the AM documents);
    /// it gets more by giving some back.
    QuotaExceeded,
    /// The operation is not allowed in the object's current state.
    NotPermitted,
    /// A capability operation the AM asked the null-Kernel for failed.
    Capability(CapError),
}

impl From<CapError> for AmError {
    fn from(error: CapError) -> Self {
        AmError::Capability(error)
    }
}

/// What an invocation returns to its caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// A capability name handed to the caller (e.g. for a newly created object).
    pub name: Option<CapName>,
    pub results: [u64; RESULTS],
}

impl Outcome {
    /// Returns an outcome with the first result set.
    pub fn value(value: u64) -> Self {
        Self { name: None, results: [value, 0, 0, 0] }
    }
}

/// Access to I/O ports, as bits of an `Effect::IoPorts`.
pub mod port_access {
    /// `in` instructions.
    pub const IN: u8 = 1;
    /// `out` instructions.
    pub const OUT: u8 = 2;
}

/// A change to the machine an AM asks the hypervisor to make for it: AMs are safe code and
/// touch no hardware, so what a capability enables (and what its revocation undoes) is
/// described here and applied by the hypervisor before the call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Lets `vm` execute `access` (`port_access` bits) on ports `[first, first + count)`
    /// without exiting, or (`allow == false`) takes that back.
    IoPorts { vm: VmId, first: u16, count: u32, access: u8, allow: bool },
    /// Lets `vm` read (`msr_access::READ`) or write (`msr_access::WRITE`) model-specific
    /// register `msr` without exiting, or (`allow == false`) takes that back.
    Msr { vm: VmId, msr: u32, access: u8, allow: bool },
    /// Maps host frames `[hpa, hpa + bytes)` into `vm`'s EPT at guest-physical `gpa` with
    /// `access` (`frame_access` bits), with 2 MiB pages when `large` (SDM Vol. 3 §29.3.2).
    /// The range was free in that EPT.
    MapFrames { vm: VmId, gpa: u64, hpa: u64, bytes: u64, large: bool, access: u8 },
    /// Removes `vm`'s translations of `[gpa, gpa + bytes)`, and makes every CPU that may
    /// cache them invalidate them before the operation returns (docs/tlb.md).
    UnmapFrames { vm: VmId, gpa: u64, bytes: u64 },
    /// Cuts `vm`'s access to `[gpa, gpa + bytes)` down to `access` (`frame_access` bits),
    /// invalidating as for an unmap.
    ProtectFrames { vm: VmId, gpa: u64, bytes: u64, access: u8 },
    /// Gives frames `[hpa, hpa + bytes)` back to the hypervisor's allocator, zeroed. Emitted
    /// after the effects that unmapped them from every EPT.
    FreeFrames { hpa: u64, bytes: u64 },
    /// Reads and clears the EPT dirty flags (SDM Vol. 3 §29.3.5) of the `pages` 4 KiB pages
    /// from `gpa` in `vm`, and writes them as a bitmap (bit i of byte i / 8 for page i; 1 =
    /// written since the last read) into host frames at `bitmap_hpa`, which the AM checked
    /// belong to the caller. Then invalidates as for an unmap, so the next write to a page
    /// sets its flag again. Where the CPU has no EPT A/D flags every page reads as dirty.
    /// With `keep`, the flags are only read, not cleared (so whoever owns them, e.g. the
    /// NVRAM AM's commit, still sees every write), and nothing is invalidated.
    TakeDirty { vm: VmId, gpa: u64, pages: u64, bitmap_hpa: u64, keep: bool },
    /// Turns on Page-Modification Logging (SDM Vol. 3 §29.3.6) for `vm`, tracking the
    /// `pages` 4 KiB pages from `gpa`: their dirty flags are cleared, so each first write
    /// is logged. `vm` is the caller (its VMCS is the current one).
    PmlEnable { vm: VmId, gpa: u64, pages: u64 },
    /// Writes the pages of `vm`'s PML range logged since the last drain (including what
    /// PML-full exits collected) as a bitmap at `bitmap_hpa` (as for `TakeDirty`), and
    /// clears their dirty flags so their next write is logged again.
    PmlDrain { vm: VmId, pages: u64, bitmap_hpa: u64 },
    /// Stops, starts or destroys VM `vm` (the guest-OS AM's operations), at the VM's next
    /// time-slice boundary on its own CPU; `by` is the VM that asked, for the log.
    VmControl { vm: VmId, action: VmAction, by: VmId },
    /// Creates VM `vm` (the guest-OS AM's `create`) from boot image `image`, on CPU `cpu`,
    /// in state created: its RAM is the frames `[hpa, hpa + bytes)` the creator lent
    /// (`Kernel::lend_frames`), mapped at guest-physical 0 and loaded with the image before
    /// the call returns; `by` is the creator. The VM runs once a `VmControl` starts it.
    /// `caps` (bit i: the creator's `INITIAL` capability i) chooses capabilities the VM
    /// starts with, as delegated copies after its own initial ones (the creator lives on
    /// the VM's CPU, so the copies are made on one kernel instance when that CPU adopts it).
    CreateVm { vm: VmId, image: u32, cpu: u32, hpa: u64, bytes: u64, by: VmId, caps: u32 },
    /// Tells the null-Kernel that the object of `root` died: it deletes `root`, the root
    /// capability [`Kernel::grant_new_root`] minted for AM `am` (held by the AM, charged
    /// to the AM's capability quota), with every capability derived from it, as the AM's
    /// own `DELETE` once the step that emitted this is over (the AM hears of each
    /// capability that dies; remote copies leave through the distributed protocol). This
    /// gives the AM's quota back. The null-Kernel handles it; the hypervisor never sees
    /// it. (No `Object` here: it would make every effect 8 bytes larger.)
    Retire { am: AmId, root: CapName },
    /// Registers principal `child` on the caller's kernel instance for a new light-weight
    /// context (the lwC AM's `lwCreate`) of the VM whose principal `parent` made the call,
    /// with copies (delegated children) of the parent's `INITIAL` capabilities whose index
    /// is set in `mask` as its own `INITIAL` list. The null-Kernel registers it; then the
    /// hypervisor snapshots the caller's registers as the child's (its one entry point)
    /// and gives it the view of the VM's memory `memory` describes.
    /// `systrap`: the child was created with `LWC_SYSTRAP`: a call of it refused for a
    /// capability it does not hold is handed to this AM's `lwTrap` (op 5) instead.
    /// `received` (bit i: the parent's `RECEIVED` capability i, its inbox at the call)
    /// chooses more copies, appended after the `INITIAL` ones in index order
    /// (`lwCreate` with `LWC_RECEIVED`).
    LwcCreate { parent: VmId, child: VmId, mask: u64, received: u32, memory: LwcMemory, systrap: Option<AmId> },
    /// One more exception range of the resource spec of lwC `child`, whose `LwcCreate`
    /// came just before (`lwCreate` with `LWC_RANGES`; one effect per range after the
    /// first, in the list's order): its `pages` 4 KiB pages from page `first_page` get
    /// `mode`, over what the spec and the earlier ranges said. The hypervisor takes them
    /// with that `LwcCreate`, so the child's view is made once, whole.
    LwcRange { child: VmId, first_page: u32, pages: u32, mode: u8 },
    /// Switches the calling vCPU from the lwC of principal `from` (its registers saved) to
    /// the lwC of principal `to` (its registers loaded; the call's reply goes to it), whose
    /// capabilities every later hypercall of the vCPU is checked against (`lwSwitch`).
    LwcSwitch { from: VmId, to: VmId },
    /// Destroys the lwC of principal `child` (the capability `lwCreate` handed out died):
    /// the null-Kernel removes the principal, so every capability it holds dies on every
    /// kernel, and the hypervisor drops its saved registers and its view of memory. If
    /// it was running, its vCPU goes back to lwC `resume` (its creator, or the VM's root
    /// lwC when the creator is gone too), whose pending `lwSwitch` returns `REVOKED`: the
    /// AM names it for every child, the hypervisor knows whether a vCPU runs it.
    LwcDestroy { child: VmId, resume: Option<VmId> },
    /// A capability to lwC `lwc` other than its creator's died (revoked or deleted; the lwC
    /// lives on): what the hypervisor remembers of switches made with a capability must be
    /// checked again (hypervisor/src/lwc.rs, the switch cache).
    LwcCapGone { lwc: VmId },
    /// Hands lwC `to` (the caller of `lwOverlay`) a delegated copy (same rights, bound) of
    /// each `INITIAL` capability of lwC `from` whose index is set in `mask`, appended to
    /// `to`'s `INITIAL` list (seed §4.2.4, the capability part of a resource spec). The lwC
    /// AM checked `to` may import them.
    LwcImport { from: VmId, to: VmId, mask: u64 },
    /// Overlays the `pages` 4 KiB pages from page `first_page` of lwC `from`'s memory
    /// onto lwC `to`'s (the caller of `lwOverlay`), as `mode` says (`LwcMemory::COW`: a
    /// copy of `from`'s pages; `SHARED`: the VM's own frames, writable; `UNMAP`: the pages
    /// leave `to`'s view). The lwC AM checked `to` may (seed §4.2.4).
    LwcOverlay { from: VmId, to: VmId, first_page: u32, pages: u32, mode: u8 },
    /// Performs the call `target` trapped with (`LWC_SYSTRAP`) as if `target` made it
    /// (`mask` 0) or with the capabilities of `by`, the caller of `lwSyscall` (`mask` not
    /// 0; seed §4.2.6); its reply becomes the reply of `lwSyscall`.
    LwcSyscall { by: VmId, target: VmId, mask: u64 },
}

/// How a new lwC sees its VM's initial memory (the memory part of `lwCreate`'s resource
/// spec, checked by the lwC AM): `mode` everywhere but in the `pages` 4 KiB pages from
/// page `first_page`, which get `range_mode`. Modes are [`LwcMemory::SHARED`], `COW` and
/// `UNMAP` (the ABI's `lwc_op::LWC_SHARED`, `LWC_COW`, `LWC_UNMAP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LwcMemory {
    pub mode: u8,
    pub range_mode: u8,
    pub first_page: u32,
    pub pages: u32,
}

impl LwcMemory {
    /// The child shares the pages with its creator.
    pub const SHARED: u8 = 0;
    /// The child gets copy-on-write snapshots of the pages.
    pub const COW: u8 = 1;
    /// The pages are not mapped in the child.
    pub const UNMAP: u8 = 2;

    /// Tells whether the child shares all of its creator's memory (no view of its own).
    pub fn all_shared(&self) -> bool {
        self.mode == Self::SHARED && (self.pages == 0 || self.range_mode == self.mode)
    }

    /// Returns the mode of 4 KiB page `page`.
    pub fn mode_of(&self, page: u64) -> u8 {
        let first = u64::from(self.first_page);
        if page >= first && page < first + u64::from(self.pages) {
            self.range_mode
        } else {
            self.mode
        }
    }
}

/// Access through a guest-physical mapping, as bits of `Effect::MapFrames` and
/// `Effect::ProtectFrames` (the EPT entry's bits 0-2, SDM Vol. 3 §29.3.2).
pub mod frame_access {
    /// Reads.
    pub const READ: u8 = 1;
    /// Writes.
    pub const WRITE: u8 = 2;
    /// Instruction fetches.
    pub const EXECUTE: u8 = 4;
    /// Every access.
    pub const ALL: u8 = READ | WRITE | EXECUTE;
}

/// Where host frames come from: the hypervisor owns the allocator, and lends an AM this
/// view of it (host tests use a fake). Frames go back through `Effect::FreeFrames`.
pub trait FrameSource: Sync {
    /// Allocates `bytes` of contiguous host-physical memory aligned to `align` (both
    /// multiples of 4 KiB, `align` a power of two), zeroed; None when there is none.
    fn allocate(&self, bytes: u64, align: u64) -> Option<u64>;
}

/// The unit of durable writes: `Media` offsets and lengths are multiples of it. A unit is
/// written atomically (a power cut leaves it all old or all new); PTx's 256-byte block
/// (seed null-kernel-ptx-lwc-thesis.txt §3.2.4).
pub const MEDIA_UNIT: u64 = 256;

/// Why a `Media` access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaError {
    /// The range is not inside the device.
    OutOfRange,
    /// The offset or length is not a multiple of `MEDIA_UNIT`.
    Misaligned,
    /// The device reported an error or did not answer.
    Device,
}

impl MediaError {
    /// Checks a `Media` access of `len` bytes at `offset` on a device of `size` bytes:
    /// both multiples of [`MEDIA_UNIT`] (else `Misaligned`) and inside it (else `OutOfRange`).
    pub fn check_range(offset: u64, len: usize, size: u64) -> Result<(), MediaError> {
        if !offset.is_multiple_of(MEDIA_UNIT) || !(len as u64).is_multiple_of(MEDIA_UNIT) {
            return Err(MediaError::Misaligned);
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(MediaError::OutOfRange),
        }
    }
}

/// Durable media under the NVRAM AM: persistent memory the firmware describes, or
/// emulated NVRAM whose durable copy is a disk. The hypervisor owns the device and lends
/// the AM this view of it (host tests use a fake that can cut power after any write).
pub trait Media {
    /// Describes the device for the boot log (kind, size, how writes are made durable).
    fn describe(&self) -> &str;
    /// Returns the device's size in bytes (a multiple of `MEDIA_UNIT`).
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError>;
    /// Writes `data` at `offset`. It is durable only once a later `fence` returns; a power
    /// cut before that leaves each unit of it either old or new, in no particular order.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError>;
    /// Writes `data` at `offset` as [`write`](Self::write) does, from a buffer the device
    /// may use as it goes (its contents afterwards are unspecified): a device behind an
    /// AM-to-AM call (`call_am` lends a mutable buffer) then needs no copy of it.
    fn write_buf(&mut self, offset: u64, data: &mut [u8]) -> Result<(), MediaError> {
        self.write(offset, data)
    }
    /// [`write_buf`](Self::write_buf) then [`fence`](Self::fence), in this order on the
    /// device (the data reaches it, then every write so far is made durable): one request
    /// where the device is behind an AM-to-AM call. Returns after the fence; an error
    /// from the write skips the fence.
    fn write_buf_fenced(&mut self, offset: u64, data: &mut [u8]) -> Result<(), MediaError> {
        self.write_buf(offset, data)?;
        self.fence()
    }
    /// Writes `data[..split]` at `first`, fences, writes `data[split..]` at `second` and
    /// fences, in this order on the device, stopping at the first error (two
    /// [`write_buf_fenced`](Self::write_buf_fenced)): a commit's data and then its header,
    /// which reaches the device only once the data is durable. One request where the
    /// device is behind an AM-to-AM call. `split` past `data` is `OutOfRange`, nothing
    /// written.
    fn write_fenced_pair(&mut self, first: u64, second: u64, data: &mut [u8], split: usize) -> Result<(), MediaError> {
        if split > data.len() {
            return Err(MediaError::OutOfRange);
        }
        let (a, b) = data.split_at_mut(split);
        self.write_buf_fenced(first, a)?;
        self.write_buf_fenced(second, b)
    }
    /// Returns once every earlier write is durable (CLWB and SFENCE on persistent memory,
    /// a completed write on a disk).
    fn fence(&mut self) -> Result<(), MediaError>;
}

/// Host memory the hypervisor lends AMs that keep data in frames they allocated (the NVRAM
/// AM's working and committed copies of a region): an AM reads and writes only frames it
/// got from `Kernel::allocate_frames` and has not given back.
pub trait HostMemory: Sync {
    /// Copies `buf.len()` bytes from host-physical `hpa` into `buf`; false if the range is
    /// not memory the hypervisor maps.
    fn read(&self, hpa: u64, buf: &mut [u8]) -> bool;
    /// Copies `data` to host-physical `hpa`; false if the range is not memory the
    /// hypervisor maps.
    fn write(&self, hpa: u64, data: &[u8]) -> bool;
    /// Tells whether the `len` bytes at host-physical `a` and at `b` are equal, without
    /// copying them out (an AM diffing two copies of its data); `None` if a range is not
    /// memory the hypervisor maps. The default reads both through buffers.
    fn equal(&self, a: u64, b: u64, len: usize) -> Option<bool> {
        let (mut x, mut y) = ([0u8; 256], [0u8; 256]);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(x.len());
            if !self.read(a.checked_add(done as u64)?, &mut x[..n])
                || !self.read(b.checked_add(done as u64)?, &mut y[..n])
            {
                return None;
            }
            if x[..n] != y[..n] {
                return Some(false);
            }
            done += n;
        }
        Some(true)
    }

    /// Compares `units` (at most 64) consecutive units of `unit` bytes at host-physical
    /// `a` and at `b`, and returns a bitmap of those that differ (bit i for unit i), without
    /// copying them out (an AM diffing a page of two copies of its data in one call);
    /// `None` if a range is not memory the hypervisor maps or `units` exceeds 64. The
    /// default asks [`equal`](Self::equal) of each unit.
    fn differing_units(&self, a: u64, b: u64, unit: usize, units: usize) -> Option<u64> {
        if units > 64 {
            return None;
        }
        let mut differ = 0;
        for i in 0..units {
            let at = (i * unit) as u64;
            if !self.equal(a.checked_add(at)?, b.checked_add(at)?, unit)? {
                differ |= 1 << i;
            }
        }
        Some(differ)
    }
}

/// The durable device the hypervisor chose at boot, lent to the NVRAM AM (one device,
/// shared by every kernel instance: the lender serializes the calls).
pub trait MediaSource: Sync {
    /// Runs `f` with the device; false (without running it) when there is none.
    fn with_media(&self, f: &mut dyn FnMut(&mut dyn Media)) -> bool;
}

/// Reads and clears the EPT dirty flags of guest pages for an AM, synchronously (the
/// service behind `Effect::TakeDirty`, for an AM that needs the bitmap during the call).
pub trait DirtySource: Sync {
    /// Reads and clears the dirty flags of the `pages` 4 KiB pages from `gpa` in `vm`
    /// into `bitmap` (bit i of byte i / 8 for page i), as `Effect::TakeDirty` does; false
    /// when it cannot (then every page must count as dirty).
    fn take_dirty(&self, vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool;
}

/// What an `Effect::VmControl` does to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    /// Pauses the VM: it gets no more time slices until started.
    Stop,
    /// Resumes a stopped VM.
    Start,
    /// Ends the VM: its capabilities die on every kernel, as when a guest ends.
    Destroy,
    /// A directed yield: `by` gives the rest of its time slice on its CPU to the VM, which
    /// runs there next (the guest-OS AM's `yield_to`).
    YieldTo,
}

/// Access to an MSR, as bits of an `Effect::Msr`.
pub mod msr_access {
    /// `rdmsr`.
    pub const READ: u8 = 1;
    /// `wrmsr`.
    pub const WRITE: u8 = 2;
}

/// Where an AM emits effects.
pub trait Effects {
    /// Asks the hypervisor to apply `effect`.
    fn emit(&mut self, effect: Effect);
}

/// The null-Kernel services an AM may use while it handles an invocation.
pub trait Kernel: Effects {
    /// Mints a root capability to `object` (which must be this AM's) with `rights`, held by
    /// the AM, and delegates a child with the same rights to `to`. Returns the child's name.
    fn grant_new(
        &mut self,
        object: Object,
        rights: Rights,
        to: Principal,
        binding: Binding,
    ) -> Result<CapName, CapError> {
        self.grant_new_root(object, rights, to, binding).map(|(_, child)| child)
    }

    /// As [`grant_new`](Self::grant_new), but returns the root's name too, (root, child),
    /// so the AM can give the root back with [`Effect::Retire`] when the object dies.
    fn grant_new_root(
        &mut self,
        object: Object,
        rights: Rights,
        to: Principal,
        binding: Binding,
    ) -> Result<(CapName, CapName), CapError>;

    /// Allocates `bytes` of zeroed, contiguous host frames aligned to `align` from the
    /// hypervisor's allocator (`FrameSource`); None when there are none or no allocator is
    /// lent to AMs. The AM charges the caller before it asks, and gives the frames back
    /// with `Effect::FreeFrames`.
    fn allocate_frames(&mut self, bytes: u64, align: u64) -> Option<u64> {
        let _ = (bytes, align);
        None
    }

    /// Returns where `vm`'s initial memory (its module's `mem=`) lies in host memory:
    /// (first host-physical address, bytes), once the hypervisor has created the VM.
    fn guest_memory(&self, vm: VmId) -> Option<(u64, u64)> {
        let _ = vm;
        None
    }

    /// Lends the frames that `caller`'s capability `name` (an object of another AM, passed
    /// by name in plain arguments) refers to, as the whole RAM of VM `to`: the null-Kernel
    /// checks that `caller` may use the capability, and the AM that implements its object
    /// ([`AbstractMachine::lend_frames`]) checks the object and its rights, asks `fits`
    /// whether that many bytes are enough, and records the loan so that the capability's
    /// death takes the frames away from `to` again. Returns (host-physical address, bytes).
    /// Nothing changes when it fails.
    fn lend_frames(
        &mut self,
        caller: VmId,
        name: CapName,
        to: VmId,
        fits: &mut dyn FnMut(u64) -> Result<(), AmError>,
    ) -> Result<(u64, u64), AmError> {
        let _ = (caller, name, to, fits);
        Err(AmError::NotPermitted)
    }

    /// Returns the host memory the hypervisor lends AMs (`HostMemory`); None when it lends
    /// none.
    fn host_memory(&self) -> Option<&'static dyn HostMemory> {
        None
    }

    /// Runs `f` with the durable device (`MediaSource`); false when there is none.
    fn with_media(&mut self, f: &mut dyn FnMut(&mut dyn Media)) -> bool {
        let _ = f;
        false
    }

    /// Reads and clears the dirty flags of `pages` pages from `gpa` in `vm` into `bitmap`
    /// (`DirtySource`); false when the hypervisor lends no dirty tracking (every page then
    /// counts as dirty).
    fn take_dirty(&mut self, vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool {
        let _ = (vm, gpa, pages, bitmap);
        false
    }

    /// Invokes operation `op` of another AM as this AM, a principal of its own (seed
    /// §5.2.1, "hierarchical capabilities": an AM built on a lower one holds capabilities
    /// of it and uses them as any caller would). The null-Kernel checks `caps` against the
    /// operation's declared kinds and rights for the principal `Principal::Am(self)`, as
    /// it checks a hypercall's, then runs the other AM's
    /// [`AbstractMachine::invoke_by_am`], which may fill `data` (a buffer of the caller's,
    /// e.g. a dirty bitmap). Calls go down only: `op`'s AM must have been registered
    /// before this one (a lower layer), so an AM never calls itself or one that may be
    /// calling it, and AM locks are always taken in decreasing id order (no deadlock).
    /// Nothing changes when the check fails.
    fn call_am(
        &mut self,
        op: OpId,
        caps: &[CapName],
        args: &[u64; PLAIN_ARGS],
        data: &mut [u8],
    ) -> Result<Outcome, AmError> {
        let _ = (op, caps, args, data);
        Err(AmError::NotPermitted)
    }

    /// Returns operation `op` of the AM named `am` (for [`call_am`](Self::call_am)); None
    /// when no such AM or operation is registered.
    fn find_op(&self, am: &str, op: &str) -> Option<OpId> {
        let _ = (am, op);
        None
    }

    /// Returns a live capability that VM `holder` holds (bound to it) to object `id` of
    /// kind `kind` of the AM named `am`, carrying at least the rights named `rights`;
    /// None when it holds none (a scan of the kernel instance's capabilities: for calls
    /// that set things up, not for every call).
    fn find_held(&self, holder: VmId, am: &str, kind: &str, id: ObjId, rights: &[&str]) -> Option<CapName> {
        let _ = (holder, am, kind, id, rights);
        None
    }

    /// Delegates to this AM (as a principal) a child of capability `name` held by VM
    /// `from`, with only the rights named `rights` (of the object's kind; `from`'s
    /// capability must carry them): `from` lends it, during a call `from` made, so
    /// the AM can later use it with [`call_am`](Self::call_am). The child is charged to
    /// `from`'s capability quota (the delegator pays, nk-caps "Quotas") and dies when
    /// `from` revokes its capability (or `name`'s ancestors), when `from` ends, or when
    /// the AM gives it back with [`drop_cap`](Self::drop_cap).
    /// Returns the child's name and the object it refers to.
    fn take_cap(&mut self, from: VmId, name: CapName, rights: &[&str]) -> Result<(CapName, Object), AmError> {
        let _ = (from, name, rights);
        Err(AmError::NotPermitted)
    }

    /// Deletes capability `name` this AM holds (one [`take_cap`](Self::take_cap) gave it,
    /// live or revoked), which gives its charge back; the object's AM hears of it if it
    /// was live. Only capabilities to objects of lower AMs (as for `call_am`); false when
    /// `name` is no such capability of this AM's.
    fn drop_cap(&mut self, name: CapName) -> bool {
        let _ = name;
        false
    }

    /// Returns the kernel instance running the call (capabilities are per instance, AMs
    /// shared: an AM that holds capabilities of every instance picks this one's).
    fn instance(&self) -> u32 {
        0
    }
}

/// A capability presented by name to another AM's operation ([`Kernel::lend_frames`]),
/// after the null-Kernel checked that its presenter may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresentedCap {
    pub name: CapName,
    pub object: Object,
    pub rights: Rights,
    pub presenter: VmId,
}

/// An abstract machine.
pub trait AbstractMachine {
    /// Returns the AM's name (for logs and tools).
    fn name(&self) -> &'static str;

    /// Registers the AM's kinds and operations.
    fn register(&mut self, registrar: &mut Registrar<'_>) -> Result<(), RegisterError>;

    /// Handles operation `checked.op()`, whose capability arguments were all checked.
    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError>;

    /// Handles operation `checked.op()` invoked by another AM ([`Kernel::call_am`]; the
    /// caller is `Principal::Am(..)`), with `data`, a buffer of the calling AM's that the
    /// operation may read or fill as it documents. The default is
    /// [`invoke`](Self::invoke), ignoring `data`.
    fn invoke_by_am(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        data: &mut [u8],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let _ = data;
        self.invoke(checked, args, kernel)
    }

    /// Grants AM `to` (named `name`, registered after this one: a layer above) capabilities
    /// to this AM's objects at start-up, on each kernel instance (the null-Kernel's
    /// `connect_ams`), held by `Principal::Am(to)` and charged to it; `to` gets them with
    /// [`received_from_am`](Self::received_from_am). The default grants nothing.
    fn grant_to_am(&mut self, to: AmId, name: &str, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let _ = (to, name, kernel);
        Ok(Vec::new())
    }

    /// Receives the capabilities AM `from` (named `name`, a lower layer) granted this AM
    /// on kernel instance `instance` at start-up ([`grant_to_am`](Self::grant_to_am)).
    fn received_from_am(&mut self, from: AmId, name: &str, instance: u32, caps: &[CapName]) {
        let _ = (from, name, instance, caps);
    }

    /// Grants a new VM its initial capabilities to this AM's objects (e.g. a factory), by
    /// `kernel.grant_new`, in an order the AM documents. The default grants nothing.
    fn grant_initial(&mut self, _vm: VmId, _kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        Ok(Vec::new())
    }

    /// Undoes what `dead` enabled (emitting effects that take back what it allowed);
    /// called for every capability to this AM's objects that dies (revoked, deleted, or
    /// its holder gone).
    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects);

    /// Lends the frames `cap` (one of this AM's objects) refers to as the RAM of VM `to`
    /// (see [`Kernel::lend_frames`]); an AM without frames refuses (`NOT_PERMITTED`).
    fn lend_frames(
        &mut self,
        cap: &PresentedCap,
        to: VmId,
        fits: &mut dyn FnMut(u64) -> Result<(), AmError>,
        effects: &mut dyn Effects,
    ) -> Result<(u64, u64), AmError> {
        let _ = (cap, to, fits, effects);
        Err(AmError::NotPermitted)
    }
}
