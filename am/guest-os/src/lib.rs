//! The guest-OS AM: VMs as objects guarded by capabilities (DESIGN.md §1; seed §5.3, the
//! third AM). Every VM the hypervisor creates at boot (a bare-metal guest, a Linux or a
//! Multiboot kernel) is an object of kind `vm`, numbered by its VM id; a VM holding a
//! capability to another VM can manage it. This is the first step toward a control guest
//! that is not all-powerful: it manages the VMs it was given, and nothing else.
//!
//! # Rights of a `vm` capability
//!
//! | right | bit | lets its holder |
//! |---|---|---|
//! | `inspect` | 0 | read the VM's state, CPU, image kind, memory size and exit count |
//! | `stop` | 1 | pause the VM (it gets no time slices until started) |
//! | `start` | 2 | resume a stopped VM |
//! | `destroy` | 3 | end the VM: its capabilities die on every kernel, as when a guest ends |
//!
//! A derived capability keeps a subset (e.g. inspect only): the null-Kernel refuses an
//! operation whose right it lacks with `MISSING_RIGHTS` before this AM runs.
//!
//! # Operations (ABI numbers)
//!
//! - 0 `inspect(c: vm/inspect)` -> `[state | image << 8 | cpu << 16, memory bytes, exits,
//!   vm id]`, with [`state`] and [`image`] codes;
//! - 1 `stop(c: vm/stop)`; 2 `start(c: vm/start)` (also the first start of a created VM);
//!   3 `destroy(c: vm/destroy)`: each emits
//!   [`Effect::VmControl`], which the hypervisor applies at the VM's next time-slice
//!   boundary on the VM's own CPU (a wake-up IPI makes an idle CPU notice). They return
//!   at once; `inspect` shows when the state changed. Stopping a stopped VM or starting a
//!   running one is harmless; any of them on a VM that ended is `NOT_PERMITTED`.
//!
//! - 4 `create(c: image/create, frames low, frames high, cpu, boot vm, caps)` -> a `vm` capability (every
//!   right) and `[vm id, RAM bytes, 0, 0]`. `frames` is the name (two words) of an exo AM
//!   frame capability the caller holds: the null-Kernel checks it as it checks capability
//!   arguments, and the exo AM lends the set (`Kernel::lend_frames`: only an allocation the
//!   caller made itself, presented with the capability `alloc` granted, with `read`,
//!   `write` and `execute`, not lent before). The hypervisor's image check (`fits`, the
//!   image's loader run against that much memory without writing) must accept the size.
//!   The VM is built before the call returns (its RAM zeroed, the image loaded, its EPT
//!   mapping the frames at guest-physical 0) in state `created` on CPU `cpu`, which must
//!   be online. Refusals change nothing: `BAD_ARGUMENT` (no such CPU, image too big for the
//!   frames, or a capability mask for a VM on another CPU), `NOT_PERMITTED` (the frames cannot be lent),
//!   a capability status for the frames name (`UNKNOWN_NAME`, `WRONG_HOLDER`...),
//!   `QUOTA_EXCEEDED` (all [`CREATED_VMS_MAX`] VMs were created already).
//!
//!   The fifth argument chooses capabilities the new VM starts with: bit i hands it a
//!   delegated copy (same rights, bound to it) of the caller's `INITIAL` capability i
//!   (i < 32), after the capabilities every VM gets; it sees them in its own `INITIAL`
//!   list, and a guest OS's NKCP table lists them with labels. Revoking (or deleting) the
//!   caller's capability kills the VM's copy. The copies are made on one kernel instance,
//!   so a non-zero mask needs the VM on the caller's own CPU (else `BAD_ARGUMENT`); an
//!   index the caller has no capability at is skipped.
//!
//!   The fourth argument is 0, or the id of a boot VM ([`BootVm`]): a boot module that
//!   is a guest OS becomes an image, and the hypervisor's boot principal
//!   ([`Images::boot_principal`]) builds its VM with this same `create` (frames it
//!   allocated with the exo AM, charged to its own frame quota), then `start`s it: one way
//!   for a VM to come into being. Only the boot principal may name a boot VM, only with
//!   the VM's own image and only once (else `NOT_PERMITTED`); a boot VM keeps the id and
//!   board record the boot gave it and uses none of the [`CREATED_VMS_MAX`] slots.
//!
//! A created VM lives as long as the capability `create` granted (and at most as long as
//! its creator: when the creator ends, its capabilities die): when that capability dies
//! the AM destroys the VM. When the frame capability dies (revoked, deleted, or freed with
//! the exo AM's `free`), the exo AM unmaps the frames from the VM on every CPU before they
//! go back: the VM's next access to its RAM is an EPT violation that stops it with a line,
//! and the hypervisor never touches the frames again.
//!
//! A VM that waits for a cross-kernel capability operation when it is stopped stays
//! parked until the operation finishes, and then does not run until started; destroying
//! it takes effect once that operation finished (the protocol always finishes it), so no
//! kernel instance is left waiting for a VM that is gone.
//!
//! # What the hypervisor shares
//!
//! The AM touches no hardware and does not run VMs: the hypervisor publishes each VM's
//! state, CPU and exit count on a [`VmBoard`] (atomics, written at slice boundaries)
//! that `inspect` reads, and applies the effects this AM emits.
//!
//! # Initial capabilities
//!
//! A VM whose module line says `manages=<name>[,<name>]` starts with one capability with
//! every right per named VM, in the order named ([`VmGrant`]); then, for `images=<name>`,
//! one `image` capability (right `create`) per named image ([`ImageGrant`]). The AM holds
//! each root. A VM may not manage itself. `inspect`, `stop`, `start` and `destroy`
//! allocate nothing; `create` is bounded by [`CREATED_VMS_MAX`] over the whole run.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use nk_am::{
    AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effect, Effects, Kernel, KindSpec,
    ObjId, ObjKind, Object, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights, VmAction, VmId, PLAIN_ARGS,
};

/// The most VMs `create` makes over the whole run (their records' slots are reserved on
/// the board at boot, so publishing one never allocates).
pub const CREATED_VMS_MAX: usize = 8;

/// ABI operation numbers, as the shared ABI crate defines them (`nk_abi::guest_os_op`).
pub mod op {
    pub const INSPECT: u16 = nk_abi::guest_os_op::INSPECT as u16;
    pub const STOP: u16 = nk_abi::guest_os_op::STOP as u16;
    pub const START: u16 = nk_abi::guest_os_op::START as u16;
    pub const DESTROY: u16 = nk_abi::guest_os_op::DESTROY as u16;
    pub const CREATE: u16 = nk_abi::guest_os_op::CREATE as u16;
    pub const YIELD_TO: u16 = nk_abi::guest_os_op::YIELD_TO as u16;
}

/// Rights bits of a `vm` capability, in registration order.
pub mod rights {
    pub const INSPECT: u64 = 1 << 0;
    pub const STOP: u64 = 1 << 1;
    pub const START: u64 = 1 << 2;
    pub const DESTROY: u64 = 1 << 3;
    /// The right of an `image` capability.
    pub const CREATE: u64 = 1 << 0;
}

/// A VM's state, as `inspect` reports it (result 0, bits 7:0).
pub mod state {
    /// Known to the hypervisor, not yet run.
    pub const CREATED: u8 = 0;
    /// Gets time slices.
    pub const RUNNING: u8 = 1;
    /// Stopped by a `stop`: no time slices until `start`.
    pub const STOPPED: u8 = 2;
    /// Ended (halted, powered off, stopped for misbehaving, or destroyed).
    pub const ENDED: u8 = 3;
}

/// The kind of a VM's image, as `inspect` reports it (result 0, bits 15:8).
pub mod image {
    /// One of our 64-bit ELF bare-metal guests.
    pub const BARE_METAL: u8 = 0;
    /// A Linux bzImage.
    pub const LINUX: u8 = 1;
    /// A Multiboot (v1) kernel.
    pub const MULTIBOOT: u8 = 2;
    /// A Multiboot2 kernel.
    pub const MULTIBOOT2: u8 = 3;
    /// Not recognised (the VM was refused and ended at once).
    pub const UNKNOWN: u8 = 0xFF;
}

/// What the hypervisor publishes about one VM.
#[derive(Debug)]
pub struct VmRecord {
    vm: VmId,
    name: String,
    image: u8,
    memory: u64,
    cpu: AtomicU32,
    state: AtomicU8,
    exits: AtomicU64,
}

impl VmRecord {
    /// Describes VM `vm` as created: its name, [`image`] kind, memory size in bytes and
    /// the CPU it is placed on.
    pub fn new(vm: VmId, name: &str, image: u8, memory: u64, cpu: u32) -> Self {
        Self {
            vm,
            name: String::from(name),
            image,
            memory,
            cpu: AtomicU32::new(cpu),
            state: AtomicU8::new(state::CREATED),
            exits: AtomicU64::new(0),
        }
    }

    /// Returns the VM's id.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Returns the VM's name (its module's first word).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the VM's [`state`].
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Returns the CPU the VM runs on.
    pub fn cpu(&self) -> u32 {
        self.cpu.load(Ordering::Acquire)
    }

    /// Returns the VM's exits so far (published at slice boundaries).
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Acquire)
    }

    /// Publishes the VM's [`state`] and returns the one it replaced; an ended VM stays
    /// ended (then the result is `ENDED`).
    pub fn set_state(&self, new: u8) -> u8 {
        match self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| (old != state::ENDED).then_some(new)) {
            Ok(old) | Err(old) => old,
        }
    }

    /// Publishes the CPU the VM runs on.
    pub fn set_cpu(&self, cpu: u32) {
        self.cpu.store(cpu, Ordering::Release);
    }

    /// Publishes the VM's exit count.
    pub fn set_exits(&self, exits: u64) {
        self.exits.store(exits, Ordering::Release);
    }
}

/// Every VM's record: written by the hypervisor, read by `inspect`. The boot VMs' records
/// (VM i+1 is record i) are fixed when it is made, and [`CREATED_VMS_MAX`] slots for VMs
/// created at run time are reserved then, so neither reading nor creating allocates.
#[derive(Debug, Default)]
pub struct VmBoard {
    records: Vec<VmRecord>,
    created: Vec<spin::Once<VmRecord>>,
}

impl VmBoard {
    /// Makes a board of the boot VMs' `records` (VM ids 1, 2, ... in order), with room for
    /// [`CREATED_VMS_MAX`] created VMs.
    pub fn new(records: Vec<VmRecord>) -> Self {
        let created = (0..CREATED_VMS_MAX).map(|_| spin::Once::new()).collect();
        Self { records, created }
    }

    /// Returns the record of `vm`.
    pub fn get(&self, vm: VmId) -> Option<&VmRecord> {
        let index = (vm.raw() as usize).checked_sub(1)?;
        match self.records.get(index) {
            Some(r) if r.vm == vm => Some(r),
            Some(_) => self.records.iter().find(|r| r.vm == vm),
            None => self.created.get(index - self.records.len())?.get(),
        }
    }

    /// Returns every record: the boot VMs', then the created ones'.
    pub fn records(&self) -> impl Iterator<Item = &VmRecord> {
        self.records.iter().chain(self.created.iter().filter_map(spin::Once::get))
    }

    /// Returns how many VMs the boot modules made (VM ids 1 to this; created VMs follow).
    pub fn boot_vms(&self) -> u32 {
        self.records.len() as u32
    }

    /// Publishes the record of created VM slot `slot` (VM id `boot_vms() + 1 + slot`);
    /// false if the slot does not exist or is taken.
    fn publish(&self, slot: usize, record: VmRecord) -> bool {
        let Some(once) = self.created.get(slot) else { return false };
        let mut fresh = false;
        once.call_once(|| {
            fresh = true;
            record
        });
        fresh
    }

    /// Returns the id of the VM named `name` (the first, if several share it).
    pub fn find(&self, name: &str) -> Option<VmId> {
        self.records.iter().find(|r| r.name == name).map(|r| r.vm)
    }
}

/// A VM that starts with a capability (every right) to another (`manages=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmGrant {
    pub holder: VmId,
    pub target: VmId,
}

/// A boot module marked `image`: what `create` builds VMs from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The module's name.
    pub name: String,
    /// Its [`image`] kind.
    pub kind: u8,
}

/// A VM that starts with a capability (right `create`) to image `image` (`images=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageGrant {
    pub holder: VmId,
    pub image: u32,
}

/// A boot VM that is built with `create` (its boot module is a guest OS): only the
/// hypervisor's boot principal may create it, once, from its own image, under the VM id
/// (and board record) the boot gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootVm {
    pub vm: VmId,
    pub image: u32,
}

/// Tells whether image `image` loads into `bytes` of RAM (the hypervisor runs the image's
/// loader against that much memory without writing it).
pub type ImageFits = fn(image: u32, bytes: u64) -> bool;

/// What `create` needs from the hypervisor: the images, who holds which, the CPUs a VM
/// may be placed on and the image check.
#[derive(Clone, Debug)]
pub struct Images {
    pub images: Vec<Image>,
    pub grants: Vec<ImageGrant>,
    /// Bit n set: CPU n is online (in VMX root).
    pub online_cpus: u64,
    pub fits: ImageFits,
    /// The boot VMs `create` builds (each from its own image), and the principal that
    /// builds them at boot (the hypervisor's; None: every VM comes from a run-time create).
    pub boot: Vec<BootVm>,
    pub boot_principal: Option<VmId>,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            images: Vec::new(),
            grants: Vec::new(),
            online_cpus: 0,
            fits: |_, _| false,
            boot: Vec::new(),
            boot_principal: None,
        }
    }
}

/// A VM `create` made: the capability it granted (the VM dies with it) and its creator.
#[derive(Clone, Copy, Debug)]
struct Creation {
    granted: CapName,
    vm: VmId,
    creator: VmId,
    /// A boot VM (its id and record are the boot's; it uses no created-VM slot).
    boot: bool,
}

/// The guest-OS AM.
#[derive(Debug)]
pub struct GuestOsAm {
    am: Option<AmId>,
    kind: Option<ObjKind>,
    image_kind: Option<ObjKind>,
    board: Arc<VmBoard>,
    grants: Vec<VmGrant>,
    images: Images,
    creations: Vec<Creation>,
}

impl GuestOsAm {
    /// Creates the AM over the hypervisor's `board`, with the capabilities VMs start with.
    pub fn new(board: Arc<VmBoard>, grants: Vec<VmGrant>) -> Self {
        Self { am: None, kind: None, image_kind: None, board, grants, images: Images::default(), creations: Vec::new() }
    }

    /// Adds the images `create` builds VMs from.
    pub fn with_images(mut self, images: Images) -> Self {
        self.images = images;
        self
    }

    /// `create(c: image/create, frames low, frames high, cpu)`: see the crate docs.
    fn create(
        &mut self,
        caller: VmId,
        image: ObjId,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (Some(am), Some(kind)) = (self.am, self.kind) else {
            return Err(AmError::NotPermitted);
        };
        let index = u32::try_from(image.raw()).map_err(|_| AmError::BadArgument)?;
        let info = self.images.images.get(index as usize).ok_or(AmError::BadArgument)?;
        let cpu = args[2];
        if cpu >= 64 || self.images.online_cpus & (1 << cpu) == 0 {
            return Err(AmError::BadArgument);
        }
        // Capabilities handed to the VM: copies made on one kernel instance, so only from
        // a creator on the VM's CPU (a VM whose record says where it runs).
        let caps = u32::try_from(args[4]).map_err(|_| AmError::BadArgument)?;
        if caps != 0 && self.board.get(caller).is_none_or(|r| u64::from(r.cpu()) != cpu) {
            return Err(AmError::BadArgument);
        }
        let boot = args[3] != 0;
        let slot = self.creations.iter().filter(|c| !c.boot).count();
        let vm = if boot {
            // A boot VM: only the boot principal, only from the VM's own image, only once.
            let vm = VmId::new(u32::try_from(args[3]).map_err(|_| AmError::BadArgument)?);
            let listed = self.images.boot.contains(&BootVm { vm, image: index });
            if self.images.boot_principal != Some(caller) || !listed || self.creations.iter().any(|c| c.vm == vm) {
                return Err(AmError::NotPermitted);
            }
            let record = self.board.get(vm).ok_or(AmError::NotPermitted)?;
            if record.state() != state::CREATED {
                return Err(AmError::NotPermitted);
            }
            vm
        } else {
            if slot >= CREATED_VMS_MAX {
                return Err(AmError::QuotaExceeded);
            }
            VmId::new(self.board.boot_vms() + 1 + slot as u32)
        };
        let frames = CapName::from_words(args[1], args[0]);
        let fits = self.images.fits;
        let mut check = |bytes: u64| if fits(index, bytes) { Ok(()) } else { Err(AmError::BadArgument) };
        let (hpa, bytes) = kernel.lend_frames(caller, frames, vm, &mut check)?;
        // From here on the slot is used, whatever happens: the exo AM keeps the loan
        // (keyed by this VM id) until the frames die.
        let published = match boot {
            true => self.board.get(vm).map(|record| record.set_cpu(cpu as u32)).is_some(),
            false => self.board.publish(slot, VmRecord::new(vm, &info.name, info.kind, bytes, cpu as u32)),
        };
        let all = Rights::from_bits(rights::INSPECT | rights::STOP | rights::START | rights::DESTROY);
        let object = Object::new(am, kind, ObjId::new(u64::from(vm.raw())));
        let granted = match kernel.grant_new(object, all, Principal::Vm(caller), Binding::Bound) {
            Ok(granted) => granted,
            Err(error) => {
                // The VM never runs: its record says it ended.
                if let Some(record) = self.board.get(vm) {
                    record.set_state(state::ENDED);
                }
                self.creations.push(Creation { granted: CapName::from_words(0, 0), vm, creator: caller, boot });
                return Err(error.into());
            }
        };
        debug_assert!(published, "slots are used in order, once");
        self.creations.push(Creation { granted, vm, creator: caller, boot });
        kernel.emit(Effect::CreateVm { vm, image: index, cpu: cpu as u32, hpa, bytes, by: caller, caps });
        Ok(Outcome { name: Some(granted), results: [u64::from(vm.raw()), bytes, 0, 0] })
    }
}

impl AbstractMachine for GuestOsAm {
    fn name(&self) -> &'static str {
        "guest-os"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "vm", rights: &["inspect", "stop", "start", "destroy"] })?;
        let image_kind = r.kind(KindSpec { name: "image", rights: &["create"] })?;
        self.kind = Some(kind);
        self.image_kind = Some(image_kind);
        self.am = Some(r.am());
        for (name, right) in [("inspect", "inspect"), ("stop", "stop"), ("start", "start"), ("destroy", "destroy")] {
            let needed = r.rights(kind, &[right]).ok_or(RegisterError::UnknownKind)?;
            r.operation(OpSpec { name, args: &[ArgSpec::new(kind, needed)] })?;
        }
        let create = r.rights(image_kind, &["create"]).ok_or(RegisterError::UnknownKind)?;
        r.operation(OpSpec { name: "create", args: &[ArgSpec::new(image_kind, create)] })?;
        // A directed yield gives the VM the CPU, as `start` does.
        let start = r.rights(kind, &["start"]).ok_or(RegisterError::UnknownKind)?;
        r.operation(OpSpec { name: "yield_to", args: &[ArgSpec::new(kind, start)] })?;
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let Principal::Vm(caller) = checked.caller() else {
            return Err(AmError::NotPermitted);
        };
        let object = checked.args()[0].object();
        if checked.op().index() == op::CREATE {
            return self.create(caller, object.id, args, kernel);
        }
        let vm = VmId::new(u32::try_from(object.id.raw()).map_err(|_| AmError::BadArgument)?);
        let record = self.board.get(vm).ok_or(AmError::BadArgument)?;
        let current = record.state();
        let action = match checked.op().index() {
            op::INSPECT => {
                let word0 = u64::from(current) | u64::from(record.image) << 8 | u64::from(record.cpu()) << 16;
                return Ok(Outcome {
                    name: None,
                    results: [word0, record.memory, record.exits(), u64::from(vm.raw())],
                });
            }
            _ if current == state::ENDED => return Err(AmError::NotPermitted),
            op::STOP => VmAction::Stop,
            op::START => VmAction::Start,
            op::DESTROY => VmAction::Destroy,
            // Only to another running VM of the caller's CPU.
            op::YIELD_TO => {
                let same_cpu = self.board.get(caller).is_some_and(|me| me.cpu() == record.cpu());
                if vm == caller || current != state::RUNNING || !same_cpu {
                    return Err(AmError::NotPermitted);
                }
                VmAction::YieldTo
            }
            _ => return Err(AmError::NotPermitted),
        };
        kernel.emit(Effect::VmControl { vm, action, by: caller });
        Ok(Outcome::default())
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let (Some(am), Some(kind)) = (self.am, self.kind) else {
            return Err(AmError::NotPermitted);
        };
        let all = Rights::from_bits(rights::INSPECT | rights::STOP | rights::START | rights::DESTROY);
        let mut names = Vec::new();
        for grant in self.grants.iter().filter(|g| g.holder == vm && g.target != vm) {
            let object = Object::new(am, kind, ObjId::new(u64::from(grant.target.raw())));
            names.push(kernel.grant_new(object, all, Principal::Vm(vm), Binding::Bound)?);
        }
        if let Some(image_kind) = self.image_kind {
            for grant in self.images.grants.iter().filter(|g| g.holder == vm) {
                let object = Object::new(am, image_kind, ObjId::new(u64::from(grant.image)));
                let create = Rights::from_bits(rights::CREATE);
                names.push(kernel.grant_new(object, create, Principal::Vm(vm), Binding::Bound)?);
            }
        }
        Ok(names)
    }

    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects) {
        // A capability to a VM enables nothing lasting: what it stopped stays stopped
        // (another holder, or none, may start it). But a created VM lives only as long as
        // the capability `create` granted: its death destroys the VM.
        if let Some(creation) = self.creations.iter_mut().find(|c| c.granted == dead.name) {
            creation.granted = CapName::from_words(0, 0);
            let (vm, by) = (creation.vm, creation.creator);
            if self.board.get(vm).is_some_and(|r| r.state() != state::ENDED) {
                effects.emit(Effect::VmControl { vm, action: VmAction::Destroy, by });
            }
        }
    }
}

#[cfg(test)]
mod tests;
