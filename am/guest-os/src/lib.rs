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
//! - 1 `stop(c: vm/stop)`; 2 `start(c: vm/start)`; 3 `destroy(c: vm/destroy)`: each emits
//!   [`Effect::VmControl`], which the hypervisor applies at the VM's next time-slice
//!   boundary on the VM's own CPU (a wake-up IPI makes an idle CPU notice). They return
//!   at once; `inspect` shows when the state changed. Stopping a stopped VM or starting a
//!   running one is harmless; any of them on a VM that ended is `NOT_PERMITTED`.
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
//! every right per named VM, in the order named ([`VmGrant`]); the AM holds each root.
//! A VM may not manage itself. Nothing is allocated per call, so no per-VM bound is needed.
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

/// ABI operation numbers.
pub mod op {
    pub const INSPECT: u16 = 0;
    pub const STOP: u16 = 1;
    pub const START: u16 = 2;
    pub const DESTROY: u16 = 3;
}

/// Rights bits of a `vm` capability, in registration order.
pub mod rights {
    pub const INSPECT: u64 = 1 << 0;
    pub const STOP: u64 = 1 << 1;
    pub const START: u64 = 1 << 2;
    pub const DESTROY: u64 = 1 << 3;
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

/// Every VM's record: written by the hypervisor, read by `inspect`. Its set of VMs is
/// fixed when it is made (at boot), so reading it never allocates.
#[derive(Debug, Default)]
pub struct VmBoard {
    records: Vec<VmRecord>,
}

impl VmBoard {
    /// Makes a board of `records`.
    pub fn new(records: Vec<VmRecord>) -> Self {
        Self { records }
    }

    /// Returns the record of `vm`.
    pub fn get(&self, vm: VmId) -> Option<&VmRecord> {
        self.records.iter().find(|r| r.vm == vm)
    }

    /// Returns every record.
    pub fn records(&self) -> &[VmRecord] {
        &self.records
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

/// The guest-OS AM.
#[derive(Debug)]
pub struct GuestOsAm {
    am: Option<AmId>,
    kind: Option<ObjKind>,
    board: Arc<VmBoard>,
    grants: Vec<VmGrant>,
}

impl GuestOsAm {
    /// Creates the AM over the hypervisor's `board`, with the capabilities VMs start with.
    pub fn new(board: Arc<VmBoard>, grants: Vec<VmGrant>) -> Self {
        Self { am: None, kind: None, board, grants }
    }
}

impl AbstractMachine for GuestOsAm {
    fn name(&self) -> &'static str {
        "guest-os"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "vm", rights: &["inspect", "stop", "start", "destroy"] })?;
        self.kind = Some(kind);
        self.am = Some(r.am());
        for (name, right) in [("inspect", "inspect"), ("stop", "stop"), ("start", "start"), ("destroy", "destroy")] {
            let needed = r.rights(kind, &[right]).ok_or(RegisterError::UnknownKind)?;
            r.operation(OpSpec { name, args: &[ArgSpec::new(kind, needed)] })?;
        }
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        _args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let Principal::Vm(caller) = checked.caller() else {
            return Err(AmError::NotPermitted);
        };
        let object = checked.args()[0].object();
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
        Ok(names)
    }

    fn revoked(&mut self, _dead: &DeadCap, _effects: &mut dyn Effects) {
        // A capability to a VM enables nothing lasting: what it stopped stays stopped
        // (another holder, or none, may start it).
    }
}

#[cfg(test)]
mod tests;
