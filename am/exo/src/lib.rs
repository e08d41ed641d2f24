//! The exo AM: the machine's low-level resources as objects guarded by capabilities, in the
//! manner of an exokernel (DESIGN.md §1; seed §5.3 "EXO AM"). So far its objects are I/O
//! port ranges; frames, guest mappings and EPT dirty bits come next.
//!
//! A VM's I/O ports are all denied until it opens some with a capability: the hypervisor
//! assigns a VM a port range at creation (its module's `ports=` option), this AM grants it
//! a bound capability to that range with the rights `in` and `out`, and the VM `open`s
//! ports within it. Opening emits an effect that lets the VM's `in`/`out` reach the ports;
//! when the capability that opened them dies (revoked, deleted, its VM gone), the AM emits
//! the effect that takes the access back, before the revoking call returns.
//!
//! Model-specific registers work the same way: a VM assigned an MSR (its module's `msrs=`
//! option) gets a capability with the rights `read` and `write`, and `open-msr` lets its
//! `rdmsr`/`wrmsr` of that MSR reach the hardware until the capability dies. (Which MSRs
//! may be assigned at all is the hypervisor's decision: only those the VMCS switches per
//! guest.)
//!
//! Memory (frame sets, address spaces, mappings) is described in [`memory`].
//!
//! Initial capabilities of a VM, in order: its port range (if assigned), then one per
//! assigned MSR, then (if it is assigned memory) its address space and its initial frame
//! set.
//!
//! Operations (ABI numbers): 0 `open(c: io-ports, first, count, access)` where `access` is
//! `port_access` bits the capability's rights must cover; 1 `close(c: io-ports, first,
//! count)`; 2 `open-msr(c: msr, access)` where `access` is `msr_access` bits; 3
//! `alloc(c: aspace[alloc], pages, large)`; 4 `split(c: frames[split], offset, bytes)`; 5
//! `map(c0: frames[map], c1: aspace[map], gpa, access)` where `access` is `frame_access`
//! bits; 6 `unmap(c: aspace[map], gpa)`; 7 `protect(c: aspace[map], gpa, access)`; 8
//! `free(c: frames)`; 9 `dirty(c0: aspace[dirty], c1: frames[write], gpa, pages, offset)`;
//! 10 `pml-enable(c: aspace[dirty], gpa, pages)`; 11 `pml-drain(c0: aspace[dirty], c1:
//! frames[write], offset)`.
//!
//! # Bounds
//!
//! What the AM keeps for a VM is bounded: opening what the same capability opened already
//! (same range or MSR, same access) adds nothing and succeeds, and a VM has at most
//! [`OPENED_PER_VM`] openings at a time; past that `open` and `open-msr` fail with
//! `QUOTA_EXCEEDED` ([`AmError::QuotaExceeded`]) until it closes some or their
//! capabilities die. So the effects the hypervisor applies, and the grants it keeps per VM,
//! are bounded too.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

pub mod memory;

pub use memory::{VmMemory, DIRTY_PAGES_MAX, FRAME_SETS_PER_VM, MAPPINGS_PER_VM, PAGE_2M, PAGE_4K};

use nk_am::{
    msr_access, port_access, AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effect,
    Effects, Kernel, KindSpec, ObjId, ObjKind, Object, OpSpec, Outcome, PresentedCap, Principal, RegisterError,
    Registrar, Rights, VmId, PLAIN_ARGS,
};

/// The most openings (port ranges and MSRs) one VM may have at a time.
pub const OPENED_PER_VM: usize = 64;

/// ABI operation numbers, as the shared ABI crate defines them (`nk_abi::exo_op`).
pub mod op {
    pub const OPEN: u16 = nk_abi::exo_op::OPEN as u16;
    pub const CLOSE: u16 = nk_abi::exo_op::CLOSE as u16;
    pub const OPEN_MSR: u16 = nk_abi::exo_op::OPEN_MSR as u16;
    pub const ALLOC: u16 = nk_abi::exo_op::ALLOC as u16;
    pub const SPLIT: u16 = nk_abi::exo_op::SPLIT as u16;
    pub const MAP: u16 = nk_abi::exo_op::MAP as u16;
    pub const UNMAP: u16 = nk_abi::exo_op::UNMAP as u16;
    pub const PROTECT: u16 = nk_abi::exo_op::PROTECT as u16;
    pub const FREE: u16 = nk_abi::exo_op::FREE as u16;
    pub const DIRTY: u16 = nk_abi::exo_op::DIRTY as u16;
    pub const PML_ENABLE: u16 = nk_abi::exo_op::PML_ENABLE as u16;
    pub const PML_DRAIN: u16 = nk_abi::exo_op::PML_DRAIN as u16;
    pub const DIRTY_READ: u16 = nk_abi::exo_op::DIRTY_READ as u16;
}

/// What the hypervisor gives one VM at creation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmAssignment {
    pub vm: Option<VmId>,
    pub ports: Option<PortRange>,
    pub msrs: Vec<u32>,
    pub memory: Option<VmMemory>,
}

/// A range of I/O ports `[first, first + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub count: u32,
}

impl PortRange {
    /// Makes a range, or None if it is empty or runs past port 0xFFFF.
    pub fn new(first: u16, count: u32) -> Option<Self> {
        (count > 0 && u32::from(first) + count <= 0x1_0000).then_some(Self { first, count })
    }

    fn contains(&self, other: &PortRange) -> bool {
        self.first <= other.first && u32::from(other.first) + other.count <= u32::from(self.first) + self.count
    }

    /// Encodes the range as an object id (first << 32 | count).
    fn object_id(&self) -> ObjId {
        ObjId::new((u64::from(self.first) << 32) | u64::from(self.count))
    }

    fn from_object_id(id: ObjId) -> Option<Self> {
        let raw = id.raw();
        PortRange::new(u16::try_from(raw >> 32).ok()?, raw as u32)
    }
}

/// A resource a capability opened for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Ports(PortRange),
    Msr(u32),
}

/// What a capability opened for a VM, and how.
#[derive(Clone, Copy, Debug)]
struct Opened {
    cap: CapName,
    vm: VmId,
    resource: Resource,
    access: u8,
}

impl Opened {
    fn effect(&self, allow: bool) -> Effect {
        match self.resource {
            Resource::Ports(range) => {
                Effect::IoPorts { vm: self.vm, first: range.first, count: range.count, access: self.access, allow }
            }
            Resource::Msr(msr) => Effect::Msr { vm: self.vm, msr, access: self.access, allow },
        }
    }
}

/// The exo AM.
#[derive(Debug, Default)]
pub struct ExoAm {
    am: Option<AmId>,
    ports_kind: Option<ObjKind>,
    rights_in: Rights,
    rights_out: Rights,
    msr_kind: Option<ObjKind>,
    rights_read: Rights,
    rights_write: Rights,
    /// What each VM is given at creation.
    assignments: Vec<VmAssignment>,
    opened: Vec<Opened>,
    frames_kind: Option<ObjKind>,
    aspace_kind: Option<ObjKind>,
    memory_rights: memory::MemoryRights,
    memory: memory::Memory,
}

impl ExoAm {
    /// Creates the AM with what VMs get at creation.
    pub fn new(assignments: Vec<VmAssignment>) -> Self {
        let mut memory = memory::Memory::new();
        for a in &assignments {
            if let (Some(vm), Some(m)) = (a.vm, a.memory) {
                memory.assign(vm, m);
            }
        }
        Self { assignments, memory, ..Self::default() }
    }

    /// Lets `dirty` with `exo_dirty::KEEP` read (never clear) the dirty flags of
    /// guest-physical `[start, end)` too, outside the VMs' own ranges: where the hypervisor
    /// lets another AM map (the NVRAM window), so a process sees its region's write set
    /// without taking it from that AM.
    pub fn with_dirty_keep_window(mut self, start: u64, end: u64) -> Self {
        self.memory.set_keep_window(start, end);
        self
    }

    /// Returns the bytes of frames `vm` has allocated and not given back.
    pub fn frames_charged(&self, vm: VmId) -> u64 {
        self.memory.charged(vm)
    }

    fn object_templates(&self) -> Result<(Object, Object), AmError> {
        let am = self.am.ok_or(AmError::NotPermitted)?;
        let aspace = self.aspace_kind.ok_or(AmError::NotPermitted)?;
        let frames = self.frames_kind.ok_or(AmError::NotPermitted)?;
        Ok((Object::new(am, aspace, ObjId::new(0)), Object::new(am, frames, ObjId::new(0))))
    }

    fn invoke_memory(
        &mut self,
        vm: VmId,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let caps = checked.args();
        let first = &caps[0];
        let frames = (first.name(), first.object().id, first.rights());
        let (_, frames_template) = self.object_templates()?;
        let rights = self.memory_rights;
        match checked.op().index() {
            op::ALLOC => self.memory.alloc(vm, args, frames_template, &rights, kernel),
            op::SPLIT => self.memory.split(vm, frames, args, frames_template, kernel),
            op::MAP => {
                let aspace = caps.get(1).ok_or(AmError::BadArgument)?;
                let aspace = (aspace.name(), aspace.object().id);
                self.memory.map(vm, frames, aspace, args, &rights, kernel)
            }
            op::UNMAP => self.memory.unmap(first.object().id, args, kernel),
            op::PROTECT => self.memory.protect(first.object().id, args, kernel),
            op::FREE => self.memory.free(vm, first.object().id, kernel),
            op::DIRTY => {
                let bitmap = caps.get(1).ok_or(AmError::BadArgument)?;
                let bitmap = (bitmap.object().id, bitmap.rights());
                self.memory.dirty(first.object().id, bitmap, args, &rights, kernel)
            }
            op::PML_ENABLE => self.memory.pml_enable(vm, first.object().id, args, kernel),
            op::DIRTY_READ => {
                let mut bitmap = [0u8; 32];
                let pages = args[1];
                if pages > 256 {
                    return Err(AmError::BadArgument);
                }
                self.memory.dirty_read(first.object().id, args, &mut bitmap, kernel)?;
                let mut results = [0u64; 4];
                for (i, chunk) in bitmap.chunks_exact(8).enumerate() {
                    results[i] = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                }
                Ok(Outcome { name: None, results })
            }
            op::PML_DRAIN => {
                let bitmap = caps.get(1).ok_or(AmError::BadArgument)?;
                let bitmap = (bitmap.object().id, bitmap.rights());
                self.memory.pml_drain(vm, first.object().id, bitmap, args, &rights, kernel)
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    fn rights_for(&self, access: u8) -> Rights {
        let mut bits = 0;
        if access & port_access::IN != 0 {
            bits |= self.rights_in.bits();
        }
        if access & port_access::OUT != 0 {
            bits |= self.rights_out.bits();
        }
        Rights::from_bits(bits)
    }

    /// Tells whether `opened` is new (Ok(false) when the same capability opened the same
    /// thing with the same access already), or refuses it when its VM has
    /// [`OPENED_PER_VM`] openings.
    fn admit(&self, opened: &Opened) -> Result<bool, AmError> {
        let mut of_vm = 0;
        for o in self.opened.iter().filter(|o| o.vm == opened.vm) {
            if o.cap == opened.cap && o.resource == opened.resource && o.access == opened.access {
                return Ok(false);
            }
            of_vm += 1;
        }
        if of_vm >= OPENED_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        Ok(true)
    }

    fn close_where(&mut self, effects: &mut dyn Effects, mut matches: impl FnMut(&Opened) -> bool) -> u64 {
        let mut closed = 0;
        self.opened.retain(|o| {
            if matches(o) {
                effects.emit(o.effect(false));
                closed += 1;
                false
            } else {
                true
            }
        });
        closed
    }
}

impl AbstractMachine for ExoAm {
    fn name(&self) -> &'static str {
        "exo"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "io-ports", rights: &["in", "out"] })?;
        self.rights_in = r.rights(kind, &["in"]).ok_or(RegisterError::UnknownKind)?;
        self.rights_out = r.rights(kind, &["out"]).ok_or(RegisterError::UnknownKind)?;
        self.ports_kind = Some(kind);
        let msr = r.kind(KindSpec { name: "msr", rights: &["read", "write"] })?;
        self.rights_read = r.rights(msr, &["read"]).ok_or(RegisterError::UnknownKind)?;
        self.rights_write = r.rights(msr, &["write"]).ok_or(RegisterError::UnknownKind)?;
        self.msr_kind = Some(msr);
        self.am = Some(r.am());
        let any = ArgSpec::new(kind, Rights::NONE);
        r.operation(OpSpec { name: "open", args: &[any] })?;
        r.operation(OpSpec { name: "close", args: &[any] })?;
        r.operation(OpSpec { name: "open-msr", args: &[ArgSpec::new(msr, Rights::NONE)] })?;
        let frames = r.kind(KindSpec { name: "frames", rights: &["read", "write", "execute", "map", "split"] })?;
        let aspace = r.kind(KindSpec { name: "aspace", rights: &["map", "alloc", "dirty"] })?;
        let right = |r: &Registrar<'_>, kind, name| r.rights(kind, &[name]).ok_or(RegisterError::UnknownKind);
        self.memory_rights = memory::MemoryRights {
            read: right(r, frames, "read")?,
            write: right(r, frames, "write")?,
            execute: right(r, frames, "execute")?,
            map: right(r, frames, "map")?,
            split: right(r, frames, "split")?,
            dirty: right(r, aspace, "dirty")?,
            frames_all: r
                .rights(frames, &["read", "write", "execute", "map", "split"])
                .ok_or(RegisterError::UnknownKind)?,
            aspace_all: r.rights(aspace, &["map", "alloc", "dirty"]).ok_or(RegisterError::UnknownKind)?,
        };
        let aspace_map = right(r, aspace, "map")?;
        let aspace_alloc = right(r, aspace, "alloc")?;
        self.frames_kind = Some(frames);
        self.aspace_kind = Some(aspace);
        r.operation(OpSpec { name: "alloc", args: &[ArgSpec::new(aspace, aspace_alloc)] })?;
        r.operation(OpSpec { name: "split", args: &[ArgSpec::new(frames, self.memory_rights.split)] })?;
        r.operation(OpSpec {
            name: "map",
            args: &[ArgSpec::new(frames, self.memory_rights.map), ArgSpec::new(aspace, aspace_map)],
        })?;
        r.operation(OpSpec { name: "unmap", args: &[ArgSpec::new(aspace, aspace_map)] })?;
        r.operation(OpSpec { name: "protect", args: &[ArgSpec::new(aspace, aspace_map)] })?;
        r.operation(OpSpec { name: "free", args: &[ArgSpec::new(frames, Rights::NONE)] })?;
        r.operation(OpSpec {
            name: "dirty",
            args: &[ArgSpec::new(aspace, self.memory_rights.dirty), ArgSpec::new(frames, self.memory_rights.write)],
        })?;
        r.operation(OpSpec { name: "pml-enable", args: &[ArgSpec::new(aspace, self.memory_rights.dirty)] })?;
        r.operation(OpSpec {
            name: "pml-drain",
            args: &[ArgSpec::new(aspace, self.memory_rights.dirty), ArgSpec::new(frames, self.memory_rights.write)],
        })?;
        r.operation(OpSpec { name: "dirty-read", args: &[ArgSpec::new(aspace, self.memory_rights.dirty)] })?;
        Ok(())
    }

    /// Serves another AM's call (`Kernel::call_am`, seed §5.2.1): only `dirty-read`, whose
    /// bitmap goes into the caller's buffer `data` (the NVRAM AM's write sets come from
    /// here). Every other operation is for VMs.
    fn invoke_by_am(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        data: &mut [u8],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        if checked.op().index() != op::DIRTY_READ {
            return Err(AmError::NotPermitted);
        }
        self.memory.dirty_read(checked.args()[0].object().id, args, data, kernel)
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
        if checked.op().index() >= op::ALLOC {
            return self.invoke_memory(vm, checked, args, kernel);
        }
        let cap = &checked.args()[0];
        if checked.op().index() == op::OPEN_MSR {
            let access = u8::try_from(args[0]).map_err(|_| AmError::BadArgument)?;
            if access == 0 || access & !(msr_access::READ | msr_access::WRITE) != 0 {
                return Err(AmError::BadArgument);
            }
            let mut needed = 0;
            if access & msr_access::READ != 0 {
                needed |= self.rights_read.bits();
            }
            if access & msr_access::WRITE != 0 {
                needed |= self.rights_write.bits();
            }
            if !cap.rights().contains(Rights::from_bits(needed)) {
                return Err(AmError::NotPermitted);
            }
            let msr = u32::try_from(cap.object().id.raw()).map_err(|_| AmError::BadArgument)?;
            let opened = Opened { cap: cap.name(), vm, resource: Resource::Msr(msr), access };
            if self.admit(&opened)? {
                self.opened.push(opened);
                kernel.emit(opened.effect(true));
            }
            return Ok(Outcome::default());
        }
        let granted = PortRange::from_object_id(cap.object().id).ok_or(AmError::BadArgument)?;
        let first = u16::try_from(args[0]).map_err(|_| AmError::BadArgument)?;
        let count = u32::try_from(args[1]).map_err(|_| AmError::BadArgument)?;
        let range = PortRange::new(first, count).ok_or(AmError::BadArgument)?;
        if !granted.contains(&range) {
            return Err(AmError::BadArgument);
        }
        match checked.op().index() {
            op::OPEN => {
                let access = u8::try_from(args[2]).map_err(|_| AmError::BadArgument)?;
                if access == 0 || access & !(port_access::IN | port_access::OUT) != 0 {
                    return Err(AmError::BadArgument);
                }
                if !cap.rights().contains(self.rights_for(access)) {
                    return Err(AmError::NotPermitted);
                }
                let opened = Opened { cap: cap.name(), vm, resource: Resource::Ports(range), access };
                if self.admit(&opened)? {
                    self.opened.push(opened);
                    kernel.emit(opened.effect(true));
                }
                Ok(Outcome::default())
            }
            op::CLOSE => {
                let name = cap.name();
                let closed =
                    self.close_where(kernel, |o| o.cap == name && o.vm == vm && o.resource == Resource::Ports(range));
                Ok(Outcome::value(closed))
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let Some(assignment) = self.assignments.iter().find(|a| a.vm == Some(vm)).cloned() else {
            return Ok(Vec::new());
        };
        let am = self.am.ok_or(AmError::NotPermitted)?;
        let mut names = Vec::new();
        if let (Some(range), Some(kind)) = (assignment.ports, self.ports_kind) {
            let all = Rights::from_bits(self.rights_in.bits() | self.rights_out.bits());
            let object = Object::new(am, kind, range.object_id());
            names.push(kernel.grant_new(object, all, Principal::Vm(vm), Binding::Bound)?);
        }
        if let Some(kind) = self.msr_kind {
            let all = Rights::from_bits(self.rights_read.bits() | self.rights_write.bits());
            for &msr in &assignment.msrs {
                let object = Object::new(am, kind, ObjId::new(u64::from(msr)));
                names.push(kernel.grant_new(object, all, Principal::Vm(vm), Binding::Bound)?);
            }
        }
        if assignment.memory.is_some() {
            let templates = self.object_templates()?;
            names.extend(self.memory.grant_initial(vm, templates, &self.memory_rights, kernel)?);
        }
        Ok(names)
    }

    fn lend_frames(
        &mut self,
        cap: &PresentedCap,
        to: VmId,
        fits: &mut dyn FnMut(u64) -> Result<(), AmError>,
        _effects: &mut dyn Effects,
    ) -> Result<(u64, u64), AmError> {
        if Some(cap.object.am) != self.am || Some(cap.object.kind) != self.frames_kind {
            return Err(AmError::NotPermitted);
        }
        let frames = (cap.name, cap.object.id, cap.rights);
        self.memory.lend(cap.presenter, frames, to, &self.memory_rights, fits)
    }

    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects) {
        let kind = Some(dead.object.kind);
        if kind == self.frames_kind || kind == self.aspace_kind {
            self.memory.revoked(dead.name, effects);
        } else {
            self.close_where(effects, |o| o.cap == dead.name);
        }
    }
}

#[cfg(test)]
mod memory_tests;
#[cfg(test)]
mod tests;
