//! The block AM (seed null-kernel-ptx-lwc-thesis.txt §5.2.2, the *d-AM*): it exports the
//! durable device the hypervisor lends AMs (`Kernel::with_media`: the ATA disk under the
//! emulated NVRAM in Bochs) as capability objects, so an AM layered on it (the NVRAM AM's
//! durable device) holds block capabilities and uses them through the null-Kernel's check
//! as any caller would (`Kernel::call_am`, seed §5.2.1 hierarchical capabilities) instead
//! of driving the storage itself.
//!
//! # Objects, rights and operations
//!
//! One kind, `block-range`, with rights `read`, `write` and `split` (bits 0-2): a range
//! of the device's bytes `[first, first + bytes)`, both multiples of [`UNIT`] (the
//! device's atomic unit, `nk_am::MEDIA_UNIT`). Offsets below are relative to the range.
//!
//! - 0 `read(c: block-range[read], offset, len)`: for an AM caller, reads `len` bytes into
//!   its buffer; for a VM, at most 32 bytes, returned as the four results (little-endian).
//! - 1 `write(c: block-range[write], offset, len, flags)`: writes `len` bytes from an AM
//!   caller's buffer (durable once a later `fence` returns, each unit atomically, as
//!   `nk_am::Media::write`); a VM cannot pass a buffer and is refused (`NOT_PERMITTED`).
//!   `flags` [`WRITE_FENCED`] makes it a write followed by a `fence` in one call (the
//!   data reaches the device, then every write so far is made durable:
//!   `nk_am::Media::write_buf_fenced`). `flags` `WRITE_FENCED | WRITE_PAIR` with two
//!   more arguments `(offset2, len2)`: the buffer holds `len + len2` bytes, and the call
//!   writes the first `len` at `offset`, fences, writes the other `len2` at `offset2`
//!   and fences, stopping at the first failure (`nk_am::Media::write_fenced_pair`: a
//!   commit's data, then its header); both ranges are checked before anything is
//!   written. Other flags are `BAD_ARGUMENT`.
//! - 2 `fence(c: block-range[write])`: returns once every earlier write is durable.
//! - 3 `split(c: block-range[split], offset, bytes)`: a new range, inside `c`'s, with
//!   `c`'s rights; it dies when `c`'s range dies.
//! - 4 `size(c: block-range)`: `[bytes, first byte on the device]`.
//!
//! A VM named in the grants ([`BlockGrant`]) gets one range at creation (its initial
//! capability); it lends it to an AM with the NVRAM AM's pattern (`Kernel::take_cap`), or
//! the hypervisor serves it as the VM's virtio block device (a module's `disk=`: each
//! request is a `read`, `write` or `fence` on the VM's capability, `NullKernel::call_for_vm`).
//! An AM this AM serves is granted the device below the lowest VM range.
//! Reads and writes outside the range are `BAD_ARGUMENT`; a misaligned offset or length
//! too. When the capability a range was granted or split with dies, the range and every
//! range split from it die (their roots retired, `Effect::Retire`), so their other
//! capabilities find no object (`NOT_PERMITTED`).
//!
//! [`BlockMedia`] is the other side: an `nk_am::Media` over a range capability, which an
//! AM builds from a capability it holds, during a call, to run code written against
//! `Media` (the NVRAM AM's PTx store) on block capabilities.
//!
//! # Bounds
//!
//! At most [`RANGES_MAX`] ranges live at a time (`NO_MEMORY` past it); a read or write
//! moves at most [`TRANSFER_MAX`] bytes (a caller splits larger transfers).
//!
//! # Under the NVRAM AM
//!
//! The hypervisor registers this AM right before the NVRAM AM (when a guest's module says
//! `nvram`), [`serving`](BlockAm::serving) it: at start-up each kernel instance's
//! `connect_ams` grants the NVRAM AM a range of the whole device (capabilities are per
//! instance, the AMs shared), and the NVRAM AM opens its directory and stores on
//! [`BlockMedia`] over the range of the instance running the call.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{
    AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effect, Effects, Kernel, KindSpec,
    Media, MediaError, ObjId, ObjKind, Object, OpId, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights,
    VmId, MEDIA_UNIT, PLAIN_ARGS,
};

/// The unit of offsets and lengths.
pub const UNIT: u64 = MEDIA_UNIT;
/// The most ranges live at a time.
pub const RANGES_MAX: usize = 256;
/// The most bytes one read or write moves (the caller's buffer; as large as the NVRAM
/// AM's largest write, a 16 MiB region's log cleared at format, so every `Media` write
/// of the AM above stays one device write, as the crash sweeps count them).
pub const TRANSFER_MAX: u64 = 32 << 20;

/// `write`'s flag (argument 2): fence after the write, in the same call.
pub const WRITE_FENCED: u64 = 1;
/// `write`'s flag (argument 2, with [`WRITE_FENCED`]): a second write, of `len2`
/// (argument 4) bytes at `offset2` (argument 3), then a second fence, in the same call.
pub const WRITE_PAIR: u64 = 2;

/// Operation numbers, in registration order.
pub mod op {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const FENCE: u16 = 2;
    pub const SPLIT: u16 = 3;
    pub const SIZE: u16 = 4;
}

/// Rights bits of a range capability.
pub mod rights {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const SPLIT: u64 = 1 << 2;
    pub const ALL: u64 = READ | WRITE | SPLIT;
}

/// A range a VM is granted at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGrant {
    pub vm: VmId,
    pub first: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct Range {
    first: u64,
    bytes: u64,
    /// The root the AM holds (retired when the range dies) and the capability it granted.
    root: CapName,
    granted: CapName,
    /// The range it was split from.
    parent: Option<u64>,
}

/// The block AM.
#[derive(Debug, Default)]
pub struct BlockAm {
    am: Option<AmId>,
    kind: Option<ObjKind>,
    grants: Vec<BlockGrant>,
    /// The AMs above granted the whole device on each kernel instance.
    serve: Vec<&'static str>,
    ranges: BTreeMap<u64, Range>,
    next: u64,
}

impl BlockAm {
    /// Creates the AM; `grants` says which VMs get a range at creation.
    pub fn new(grants: Vec<BlockGrant>) -> Self {
        Self { grants, next: 1, ..Self::default() }
    }

    /// Grants the AM named `name` (registered after this one) a range of the whole device,
    /// with every right, on each kernel instance at start-up (`grant_to_am`).
    pub fn serving(mut self, name: &'static str) -> Self {
        self.serve.push(name);
        self
    }

    fn new_range(
        &mut self,
        first: u64,
        bytes: u64,
        rights: Rights,
        to: Principal,
        parent: Option<u64>,
        kernel: &mut dyn Kernel,
    ) -> Result<CapName, AmError> {
        if self.ranges.len() >= RANGES_MAX {
            return Err(AmError::NoMemory);
        }
        let (am, kind) = (self.am.ok_or(AmError::NotPermitted)?, self.kind.ok_or(AmError::NotPermitted)?);
        let id = self.next;
        let (root, granted) =
            kernel.grant_new_root(Object::new(am, kind, ObjId::new(id)), rights, to, Binding::Bound)?;
        self.next += 1;
        self.ranges.insert(id, Range { first, bytes, root, granted, parent });
        Ok(granted)
    }

    /// Checks `[offset, offset + len)` against range `id`; returns the device offset.
    fn at(&self, id: u64, offset: u64, len: u64) -> Result<u64, AmError> {
        let range = self.ranges.get(&id).ok_or(AmError::NotPermitted)?;
        if !offset.is_multiple_of(UNIT) || !len.is_multiple_of(UNIT) || len > TRANSFER_MAX {
            return Err(AmError::BadArgument);
        }
        match offset.checked_add(len) {
            Some(end) if end <= range.bytes => Ok(range.first + offset),
            _ => Err(AmError::BadArgument),
        }
    }

    fn handle(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        data: Option<&mut [u8]>,
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let cap = &checked.args()[0];
        let id = cap.object().id.raw();
        let device = |kernel: &mut dyn Kernel, f: &mut dyn FnMut(&mut dyn Media) -> Result<(), MediaError>| {
            let mut result = Err(MediaError::Device);
            if !kernel.with_media(&mut |media| result = f(media)) {
                return Err(AmError::NotPermitted);
            }
            result.map_err(|_| AmError::NotPermitted)
        };
        match checked.op().index() {
            op::READ => {
                let (offset, len) = (args[0], args[1]);
                match data {
                    Some(buf) => {
                        let at = self.at(id, offset, len)?;
                        let buf = buf.get_mut(..len as usize).ok_or(AmError::BadArgument)?;
                        device(kernel, &mut |media| media.read(at, buf))?;
                        Ok(Outcome::value(len))
                    }
                    None => {
                        // A VM reads at most 32 bytes of a unit, into the results.
                        if len > 32 {
                            return Err(AmError::BadArgument);
                        }
                        let at = self.at(id, offset - offset % UNIT, UNIT)?;
                        let mut unit = [0u8; UNIT as usize];
                        device(kernel, &mut |media| media.read(at, &mut unit))?;
                        let mut results = [0u64; 4];
                        let start = (offset % UNIT) as usize;
                        let mut bytes = [0u8; 32];
                        let end = (start + len as usize).min(UNIT as usize);
                        bytes[..end - start].copy_from_slice(&unit[start..end]);
                        for (r, chunk) in results.iter_mut().zip(bytes.chunks_exact(8)) {
                            *r = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                        }
                        Ok(Outcome { name: None, results })
                    }
                }
            }
            op::WRITE => {
                let buf = data.ok_or(AmError::NotPermitted)?;
                let (offset, len, flags) = (args[0], args[1], args[2]);
                if flags == WRITE_FENCED | WRITE_PAIR {
                    let (offset2, len2) = (args[3], args[4]);
                    let at = self.at(id, offset, len)?;
                    let at2 = self.at(id, offset2, len2)?;
                    let end = (len as usize).checked_add(len2 as usize).ok_or(AmError::BadArgument)?;
                    let buf = buf.get(..end).ok_or(AmError::BadArgument)?;
                    let (first, second) = buf.split_at(len as usize);
                    // One visit to the device: the order of write, fence, write, fence calls.
                    device(kernel, &mut |media| {
                        media.write(at, first)?;
                        media.fence()?;
                        media.write(at2, second)?;
                        media.fence()
                    })?;
                    return Ok(Outcome::value(end as u64));
                }
                if flags & !WRITE_FENCED != 0 {
                    return Err(AmError::BadArgument);
                }
                let at = self.at(id, offset, len)?;
                let buf = buf.get(..len as usize).ok_or(AmError::BadArgument)?;
                if flags & WRITE_FENCED != 0 {
                    // One visit to the device: the write, then the fence (the order of
                    // a `write` call and a `fence` call).
                    device(kernel, &mut |media| media.write(at, buf).and_then(|()| media.fence()))?;
                } else {
                    device(kernel, &mut |media| media.write(at, buf))?;
                }
                Ok(Outcome::value(len))
            }
            op::FENCE => {
                self.ranges.get(&id).ok_or(AmError::NotPermitted)?;
                device(kernel, &mut |media| media.fence())?;
                Ok(Outcome::value(0))
            }
            op::SPLIT => {
                let (offset, bytes) = (args[0], args[1]);
                let range = *self.ranges.get(&id).ok_or(AmError::NotPermitted)?;
                if bytes == 0 || !offset.is_multiple_of(UNIT) || !bytes.is_multiple_of(UNIT) {
                    return Err(AmError::BadArgument);
                }
                if offset.checked_add(bytes).is_none_or(|end| end > range.bytes) {
                    return Err(AmError::BadArgument);
                }
                let name =
                    self.new_range(range.first + offset, bytes, cap.rights(), checked.caller(), Some(id), kernel)?;
                Ok(Outcome { name: Some(name), results: [bytes, range.first + offset, 0, 0] })
            }
            op::SIZE => {
                let range = self.ranges.get(&id).ok_or(AmError::NotPermitted)?;
                Ok(Outcome { name: None, results: [range.bytes, range.first, 0, 0] })
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    /// Removes range `id` and every range split from it, retiring their roots.
    fn kill(&mut self, id: u64, effects: &mut dyn Effects) {
        let Some(am) = self.am else { return };
        let mut doomed = alloc::vec![id];
        while let Some(id) = doomed.pop() {
            if let Some(range) = self.ranges.remove(&id) {
                effects.emit(Effect::Retire { am, root: range.root });
                doomed.extend(self.ranges.iter().filter(|(_, r)| r.parent == Some(id)).map(|(&child, _)| child));
            }
        }
    }
}

impl AbstractMachine for BlockAm {
    fn name(&self) -> &'static str {
        "block"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "block-range", rights: &["read", "write", "split"] })?;
        self.am = Some(r.am());
        self.kind = Some(kind);
        let right = |r: &Registrar<'_>, name| r.rights(kind, &[name]).ok_or(RegisterError::UnknownKind);
        let (read, write, split) = (right(r, "read")?, right(r, "write")?, right(r, "split")?);
        r.operation(OpSpec { name: "read", args: &[ArgSpec::new(kind, read)] })?;
        r.operation(OpSpec { name: "write", args: &[ArgSpec::new(kind, write)] })?;
        r.operation(OpSpec { name: "fence", args: &[ArgSpec::new(kind, write)] })?;
        r.operation(OpSpec { name: "split", args: &[ArgSpec::new(kind, split)] })?;
        r.operation(OpSpec { name: "size", args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        self.handle(checked, args, None, kernel)
    }

    fn invoke_by_am(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        data: &mut [u8],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        self.handle(checked, args, Some(data), kernel)
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let Some(grant) = self.grants.iter().find(|g| g.vm == vm).copied() else {
            return Ok(Vec::new());
        };
        if !grant.first.is_multiple_of(UNIT) || !grant.bytes.is_multiple_of(UNIT) {
            return Err(AmError::BadArgument);
        }
        let name =
            self.new_range(grant.first, grant.bytes, Rights::from_bits(rights::ALL), Principal::Vm(vm), None, kernel)?;
        Ok(alloc::vec![name])
    }

    /// Grants an AM it serves the device (one range per kernel instance): all of it below
    /// the lowest range granted to a VM, so a served AM (the NVRAM AM) never places its
    /// data where a VM's range is (the hypervisor grants VMs ranges at the device's end).
    fn grant_to_am(&mut self, to: AmId, name: &str, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        if !self.serve.contains(&name) {
            return Ok(Vec::new());
        }
        let mut bytes = 0;
        if !kernel.with_media(&mut |media| bytes = media.size()) || bytes < UNIT {
            return Ok(Vec::new());
        }
        let bytes = bytes - bytes % UNIT;
        // The VMs' ranges are not the served AM's: it gets the device up to the first.
        let bytes = self.grants.iter().map(|g| g.first).fold(bytes, u64::min);
        if bytes < UNIT {
            return Ok(Vec::new());
        }
        let name = self.new_range(0, bytes, Rights::from_bits(rights::ALL), Principal::Am(to), None, kernel)?;
        Ok(alloc::vec![name])
    }

    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects) {
        let id = dead.object.id.raw();
        if self.ranges.get(&id).is_some_and(|r| r.granted == dead.name) {
            self.kill(id, effects);
        }
    }
}

/// A `Media` over a block-range capability an AM holds: each read, write and fence is an
/// AM-to-AM call to the block AM (`Kernel::call_am`), checked as any caller's, so the
/// capability's death turns every access into `MediaError::Device`.
pub struct BlockMedia<'k> {
    kernel: &'k mut dyn Kernel,
    cap: CapName,
    ops: [OpId; 3],
    bytes: u64,
    /// A copy of the data of a write (`call_am` lends a mutable buffer).
    scratch: Vec<u8>,
}

impl core::fmt::Debug for BlockMedia<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BlockMedia").field("cap", &self.cap).field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

/// What [`BlockMedia::open`] learns about a range (the block AM's operations and the
/// range's size, which never change), for an AM that opens the same range at every call:
/// [`BlockMedia::with_info`] then costs no call.
#[derive(Clone, Copy, Debug)]
pub struct RangeInfo {
    ops: [OpId; 3],
    bytes: u64,
}

impl<'k> BlockMedia<'k> {
    /// Opens the range `cap` names (a capability the calling AM holds, with `read` and
    /// `write`): asks its size; refused as the block AM refuses.
    pub fn open(kernel: &'k mut dyn Kernel, cap: CapName) -> Result<Self, AmError> {
        let info = Self::probe(kernel, cap)?;
        Ok(Self::with_info(kernel, cap, info))
    }

    /// Finds the block AM's operations and asks the size of the range `cap` names.
    pub fn probe(kernel: &mut dyn Kernel, cap: CapName) -> Result<RangeInfo, AmError> {
        let find = |kernel: &dyn Kernel, name| kernel.find_op("block", name).ok_or(AmError::NotPermitted);
        let ops = [find(kernel, "read")?, find(kernel, "write")?, find(kernel, "fence")?];
        let size = find(kernel, "size")?;
        let bytes = kernel.call_am(size, &[cap], &[0; PLAIN_ARGS], &mut [])?.results[0];
        Ok(RangeInfo { ops, bytes })
    }

    /// Opens the range `cap` names with what [`probe`](Self::probe) said of it; every
    /// access is still checked by the block AM (a dead capability fails there).
    pub fn with_info(kernel: &'k mut dyn Kernel, cap: CapName, info: RangeInfo) -> Self {
        Self { kernel, cap, ops: info.ops, bytes: info.bytes, scratch: Vec::new() }
    }

    /// Moves `buf` in calls of at most [`TRANSFER_MAX`] bytes; `flags` (a write's) go
    /// with the last one.
    fn transfer(&mut self, op: OpId, offset: u64, buf: &mut [u8], flags: u64) -> Result<(), MediaError> {
        let total = buf.len() as u64;
        let mut done = 0u64;
        while done < total {
            let len = (total - done).min(TRANSFER_MAX);
            let chunk = &mut buf[done as usize..(done + len) as usize];
            let last = done + len == total;
            let flags = if last { flags } else { 0 };
            self.kernel.call_am(op, &[self.cap], &[offset + done, len, flags, 0, 0], chunk).map_err(
                |error| match error {
                    AmError::BadArgument => MediaError::OutOfRange,
                    _ => MediaError::Device,
                },
            )?;
            done += len;
        }
        Ok(())
    }
}

impl Media for BlockMedia<'_> {
    fn describe(&self) -> &str {
        "block AM range (block capabilities)"
    }

    fn size(&self) -> u64 {
        self.bytes
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        if !offset.is_multiple_of(UNIT) || !(buf.len() as u64).is_multiple_of(UNIT) {
            return Err(MediaError::Misaligned);
        }
        self.transfer(self.ops[0], offset, buf, 0)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        if !offset.is_multiple_of(UNIT) || !(data.len() as u64).is_multiple_of(UNIT) {
            return Err(MediaError::Misaligned);
        }
        let mut scratch = core::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(data);
        let result = self.transfer(self.ops[1], offset, &mut scratch, 0);
        self.scratch = scratch;
        result
    }

    /// Lends `data` itself to the block AM's `write` (no copy).
    fn write_buf(&mut self, offset: u64, data: &mut [u8]) -> Result<(), MediaError> {
        if !offset.is_multiple_of(UNIT) || !(data.len() as u64).is_multiple_of(UNIT) {
            return Err(MediaError::Misaligned);
        }
        self.transfer(self.ops[1], offset, data, 0)
    }

    /// One `write` call carrying [`WRITE_FENCED`] (an empty write is a `fence`).
    fn write_buf_fenced(&mut self, offset: u64, data: &mut [u8]) -> Result<(), MediaError> {
        if !offset.is_multiple_of(UNIT) || !(data.len() as u64).is_multiple_of(UNIT) {
            return Err(MediaError::Misaligned);
        }
        if data.is_empty() {
            return self.fence();
        }
        self.transfer(self.ops[1], offset, data, WRITE_FENCED)
    }

    /// One `write` call carrying [`WRITE_FENCED`] | [`WRITE_PAIR`] (two calls when a part
    /// is empty or larger than [`TRANSFER_MAX`]).
    fn write_fenced_pair(&mut self, first: u64, second: u64, data: &mut [u8], split: usize) -> Result<(), MediaError> {
        let aligned = |offset: u64, len: usize| offset.is_multiple_of(UNIT) && (len as u64).is_multiple_of(UNIT);
        if split > data.len() {
            return Err(MediaError::OutOfRange);
        }
        let rest = data.len() - split;
        if !aligned(first, split) || !aligned(second, rest) {
            return Err(MediaError::Misaligned);
        }
        if split == 0 || rest == 0 || split as u64 > TRANSFER_MAX || rest as u64 > TRANSFER_MAX {
            let (a, b) = data.split_at_mut(split);
            self.write_buf_fenced(first, a)?;
            return self.write_buf_fenced(second, b);
        }
        let args = [first, split as u64, WRITE_FENCED | WRITE_PAIR, second, rest as u64];
        self.kernel.call_am(self.ops[1], &[self.cap], &args, data).map(|_| ()).map_err(|error| match error {
            AmError::BadArgument => MediaError::OutOfRange,
            _ => MediaError::Device,
        })
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        self.kernel
            .call_am(self.ops[2], &[self.cap], &[0; PLAIN_ARGS], &mut [])
            .map(|_| ())
            .map_err(|_| MediaError::Device)
    }
}
