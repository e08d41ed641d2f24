//! The lwC AM: light-weight contexts inside one VM (seed null-kernel-ptx-lwc-thesis.txt
//! chapter 4, and §5.5 where the lwC becomes an AM), switched like coroutines by the
//! null-Kernel.
//!
//! # How an lwC maps onto VT-x (the choice the seed leaves open)
//!
//! An lwC is three things:
//! - **a capability set**: every lwC is its own principal of the null-Kernel (a VM root
//!   lwC is the VM's own principal; a child gets a fresh principal number from
//!   [`FIRST_CHILD`] up, registered on the creator's kernel instance). The hypervisor
//!   keeps, per vCPU, the *current principal* and hands it to the null-Kernel's dispatch
//!   for every hypercall, so while an lwC runs its calls are checked against its own
//!   capabilities only: a child cannot use a capability it does not hold even by its name
//!   (`UNKNOWN_NAME` / `WRONG_HOLDER`). This is §5.5's "capability register";
//! - **a register file**: the hypervisor saves the caller's general registers, RIP, RSP
//!   and RFLAGS in its lwC at `lwSwitch` and loads the target's;
//! - **a view of memory**: the VM's own EPT (the root lwC, and children that share all
//!   memory), or an EPT of its own for a child whose resource spec has `LWC_COW` or
//!   `LWC_UNMAP` pages: the hypervisor copies a shared page on the write's EPT violation,
//!   charged to the VM's frame quota (hypervisor/src/lwc.rs, docs/lwc.md). The AM checks
//!   the spec and passes it on in [`Effect::LwcCreate`]; [`Effect::LwcOverlay`] carries
//!   `lwOverlay`.
//!
//! Destroying an lwC is revoking (or deleting) the capability `lwCreate` handed its
//! creator: the AM hears of the death, and [`Effect::LwcDestroy`] makes the null-Kernel
//! remove the principal, so every capability it holds dies on every kernel. A destroyed
//! child names the lwC a vCPU that runs it goes back to: its creator, or the VM's root lwC.
//! A capability to a child with the [`rights::DESTROY`] right (the creator's has it; a
//! copy keeps it unless its mask drops it) destroys the lwC when it dies too, on whatever
//! kernel it lived: the AM retires the lwC's root, which the null-Kernel forwards to the
//! creator's kernel instance, and the creator's capability dies with it there.
//!
//! Which lwC a vCPU runs is the vCPU's state, kept by the hypervisor (its current
//! principal, the caller of every call it makes), not the AM's: the AM checks what the
//! capabilities say (the target's kind and rights, the same VM, not the caller itself), so
//! an `lwSwitch` changes nothing in the AM and the hypervisor may repeat one it allowed
//! without asking again while no capability to an lwC died ([`Effect::LwcCapGone`] says
//! one did; hypervisor/src/lwc.rs). An lwC runs on at most one vCPU because every VM has
//! one: a VM with several needs the hypervisor's switch to refuse an lwC another of its
//! vCPUs runs.
//!
//! Only the VMs the AM was made for ([`LwcAm::for_vms`]: the guests whose module says
//! `lwc`) get a root lwC.
//!
//! # Operations (ABI numbers; seed Table 4.1)
//!
//! - 0 `lwCreate(self: lwc/create; mask, options, mode, range, bytes)` -> name of the new lwC's capability,
//!   results `{new, caller, 0, 0}` = `{child id, NONE}`. `self` must be the caller's own
//!   lwC (its id is the caller's principal). `mask` is the resource spec's capability part:
//!   bit i hands the child a copy of the caller's `INITIAL` capability i (its own `INITIAL`
//!   list, in index order); include your own lwC capability for the child to switch back.
//!   The child starts as a snapshot of the caller's registers at the call: the first switch
//!   into it returns there with `{new, caller, args}` = `{creator id, switcher id, a0, a1}`
//!   (the creator sees `caller == NONE`). With the option `LWC_RECEIVED` (4) the mask's
//!   bits 0-31 name `INITIAL` capabilities 0-31 and bits 32-63 the caller's `RECEIVED`
//!   capabilities 0-31 (its inbox at the call), copied after the `INITIAL` ones in index
//!   order by the same rules. `options`: bits `LWC_SYSTRAP` (1), `LWC_RANGES` (2) and
//!   `LWC_RECEIVED` (4); anything else
//!   (signal sharing is not implemented): `BAD_ARGUMENT`. The spec's memory part: `mode` for the
//!   VM's whole initial memory (0 `LWC_SHARED`, 1 `LWC_COW`, 2 `LWC_UNMAP`), and another
//!   mode (the low two bits of `range`) for the `bytes` bytes from page-aligned `range`;
//!   beyond the VM's memory, unaligned or an unknown mode: `BAD_ARGUMENT`. With the option
//!   `LWC_RANGES` (2, besides `LWC_SYSTRAP`), `range` is the guest-physical address of a
//!   list of `bytes` such ranges (1 to `MAX_RANGES`, two words each, applied in order),
//!   read from the VM's memory through the hypervisor and all checked first
//!   (`BAD_ARGUMENT`; from an lwC with a view of its own: `NOT_PERMITTED`); the first
//!   rides in [`Effect::LwcCreate`], each other in an [`Effect::LwcRange`] after it. Only an lwC on
//!   the VM's own EPT may create a child with a view of its own (`NOT_PERMITTED`).
//! - 1 `lwSwitch(target: lwc/switch; a0, a1)`: the reply goes to the target, with results
//!   `{new, caller, a0, a1}` = `{target's creator (NONE for a root), caller id, a0, a1}`.
//!   Refused (`NOT_PERMITTED`) for the caller itself or an lwC of another VM; a destroyed
//!   target's capability is dead (`REVOKED` /
//!   `UNKNOWN_NAME`).
//! - 2 `lwRestrict(l: lwc; at, bytes, caps)`: what holders of `l` may overlay becomes the
//!   intersection of what they could and `[at, at + bytes)`, and which of `l`'s `INITIAL`
//!   capabilities they may import the intersection with the mask `caps` (seed §4.2.5; every
//!   lwC starts with its VM's whole memory and every capability; `caps` 0, as a call with
//!   two arguments passes: none). Any holder may narrow it; it never widens.
//! - 3 `lwOverlay(l: lwc; at | mode, bytes, caps)`: `LWC_COW` copies `l`'s pages into the
//!   caller's memory, `LWC_SHARED` maps the VM's own frames writable into the caller's
//!   view, `LWC_UNMAP` takes the pages out of it (seed §4.2.4). Copied or shared pages
//!   outside `l`'s access, `LWC_SHARED`/`LWC_UNMAP` by an lwC on the VM's own EPT, or
//!   `LWC_SHARED` from an lwC with a view of its own: `NOT_PERMITTED`. The capability part
//!   (a third argument, `caps`): a delegated copy (same rights, bound to the caller) of each
//!   of `l`'s `INITIAL` capabilities whose index is set, appended to the caller's `INITIAL`
//!   list ([`Effect::LwcImport`]); an index `lwRestrict` took away: `NOT_PERMITTED`. For a
//!   capability, a copy and a share are one thing (revoking `l`'s takes the copy too). With
//!   no pages (`bytes` 0) the call imports only.
//! - 4 `lwSyscall(target: lwc/switch; mask)`: performs the call `target` trapped with, as
//!   if `target` made it (`mask` 0) or with the caller's capabilities (`mask` not 0: the
//!   call is checked against the caller's principal; capability sets are not mixed per
//!   argument); the reply is that call's (the hypervisor writes it, [`Effect::LwcSyscall`]).
//!   Only for an `LWC_SYSTRAP` lwC of the caller's VM other than the caller
//!   (`NOT_PERMITTED`); with no trapped call, or a null-Kernel call: `NOT_PERMITTED`.
//! - 5 `lwTrap(creator: lwc; selector, a0)`: a running `LWC_SYSTRAP` child switches to
//!   its creator (a capability to it with any rights, e.g. the copy of the creator's lwC
//!   capability the child's mask gave it), whose `lwSwitch` returns `{TRAPPED, child id, selector, a0}`. The
//!   hypervisor calls it for the child when one of its calls is refused for a capability
//!   it does not hold (`UNKNOWN_NAME`, `WRONG_HOLDER`); when the creator switches back,
//!   the child's call returns with status `a0` and first result `a1` of that switch (seed
//!   §4.2.6). Anyone else: `NOT_PERMITTED`.
//!
//! Ids are the lwCs' principal numbers; `NONE` is `u64::MAX`. A VM holds at most
//! [`MAX_LWCS_PER_VM`] live children (`QUOTA_EXCEEDED`), the AM [`MAX_LWCS`]
//! (`NO_MEMORY`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{
    AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effect, Effects, Kernel, KindSpec,
    LwcMemory, ObjId, ObjKind, Object, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights, VmId, PLAIN_ARGS,
};

/// The first principal number of a child lwC (VMs are numbered from 1, far below).
pub const FIRST_CHILD: u32 = 0x4000_0000;
/// The most live child lwCs the AM keeps.
pub const MAX_LWCS: usize = 1024;
/// The most live child lwCs one VM may have.
pub const MAX_LWCS_PER_VM: usize = 64;
/// "No lwC" in results (the creator's `caller` after `lwCreate`; a root's creator).
pub const NONE: u64 = nk_abi::lwc_op::NONE;

/// ABI operation numbers, as the shared ABI crate defines them (`nk_abi::lwc_op`).
pub mod op {
    pub const LW_CREATE: u16 = nk_abi::lwc_op::LW_CREATE as u16;
    pub const LW_SWITCH: u16 = nk_abi::lwc_op::LW_SWITCH as u16;
    pub const LW_RESTRICT: u16 = nk_abi::lwc_op::LW_RESTRICT as u16;
    pub const LW_OVERLAY: u16 = nk_abi::lwc_op::LW_OVERLAY as u16;
    pub const LW_SYSCALL: u16 = nk_abi::lwc_op::LW_SYSCALL as u16;
    pub const LW_TRAP: u16 = nk_abi::lwc_op::LW_TRAP as u16;
}

/// Rights bits of an lwC capability (registration order).
pub mod rights {
    /// May switch into the lwC.
    pub const SWITCH: u64 = 1;
    /// May create children of the lwC (only the lwC itself, with its own capability).
    pub const CREATE: u64 = 2;
    /// Its death destroys the lwC, as the creator's capability's does: the creator may
    /// hand a copy with this right to another principal (another VM, on another CPU), whose
    /// revocation (or deletion, or end) then destroys the lwC. A child's creator gets it;
    /// a VM's root lwC, which dies only with its VM, is granted without it.
    pub const DESTROY: u64 = 4;
}

#[derive(Debug, Clone, Copy)]
struct Lwc {
    /// The VM whose vCPUs run it.
    vm: VmId,
    /// The lwC that created it (None: a VM's root lwC).
    creator: Option<u32>,
    /// (root held by the AM, capability handed to the creator), for a child.
    caps: Option<(CapName, CapName)>,
    /// It runs on the VM's own EPT (a root lwC, or a child that shares all of its
    /// creator's memory with a creator that does): only such an lwC may create children
    /// with views of their own.
    root_view: bool,
    /// The pages holders of its capability may overlay: `[first, end)` (seed §4.2.5's
    /// access capabilities; `lwRestrict` narrows it).
    access: (u32, u32),
    /// Created with `LWC_SYSTRAP`: its refused calls trap to its creator.
    systrap: bool,
    /// Which of its `INITIAL` capabilities holders of its capability may import with
    /// `lwOverlay` (bit i: index i; `lwRestrict` narrows it).
    cap_access: u64,
}

/// The lwC AM.
#[derive(Debug, Default)]
pub struct LwcAm {
    am: Option<AmId>,
    kind: Option<ObjKind>,
    /// Every live lwC, by principal number.
    lwcs: BTreeMap<u32, Lwc>,
    next_child: u32,
    /// The VMs that get a root lwC, with their initial memory in bytes (None: every VM,
    /// with at most [`MAX_MEMORY`]).
    vms: Option<BTreeMap<u32, u64>>,
}

/// An exception range of a resource spec: (first page, pages, mode).
type Range = (u32, u32, u8);

/// The memory bound of a VM whose size the AM was not told ([`LwcAm::new`]).
pub const MAX_MEMORY: u64 = 1 << 30;
const PAGE: u64 = 4096;

impl LwcAm {
    /// Creates the AM with no lwCs.
    pub fn new() -> Self {
        Self { next_child: FIRST_CHILD, ..Self::default() }
    }

    /// Creates the AM for the VMs `vms` only (the guests whose module says `lwc`), each
    /// with its initial memory in bytes: other VMs get no root lwC.
    pub fn for_vms(vms: impl IntoIterator<Item = (VmId, u64)>) -> Self {
        Self { vms: Some(vms.into_iter().map(|(vm, bytes)| (vm.raw(), bytes)).collect()), ..Self::new() }
    }

    /// Returns the initial memory of `vm` in bytes, if it may have lwCs.
    fn memory_of(&self, vm: VmId) -> Option<u64> {
        match &self.vms {
            Some(vms) => vms.get(&vm.raw()).copied(),
            None => Some(MAX_MEMORY),
        }
    }

    /// Returns how many 4 KiB pages of memory `vm` has.
    fn pages_of(&self, vm: VmId) -> u32 {
        u32::try_from(self.memory_of(vm).unwrap_or(0) / PAGE).unwrap_or(u32::MAX)
    }

    /// Reads a page range argument: a page-aligned address (its low bits: a mode, returned)
    /// and a length in bytes, within `pages` pages. Returns (first page, end page, mode).
    fn page_range(at: u64, bytes: u64, pages: u32) -> Result<(u32, u32, u8), AmError> {
        let mode = at & (PAGE - 1);
        let (first, len) = ((at & !(PAGE - 1)) / PAGE, bytes / PAGE);
        if mode > 2 || !bytes.is_multiple_of(PAGE) || first.checked_add(len).is_none_or(|end| end > u64::from(pages)) {
            return Err(AmError::BadArgument);
        }
        Ok((first as u32, (first + len) as u32, mode as u8))
    }

    /// `lwRestrict(l; at, bytes)`: what holders of `l` may overlay becomes the intersection
    /// of what they could and `[at, at + bytes)` (seed §4.2.5). Any holder may narrow it.
    fn restrict(&mut self, checked: &Checked, args: &[u64; PLAIN_ARGS]) -> Result<Outcome, AmError> {
        let caller = Self::number(checked.caller())?;
        let (id, l) = self.lwc_of(checked.args()[0].object())?;
        let me = self.lwcs.get(&caller).ok_or(AmError::NotPermitted)?;
        if me.vm != l.vm {
            return Err(AmError::NotPermitted);
        }
        let (first, end, _) = Self::page_range(args[0], args[1], self.pages_of(l.vm))?;
        let (lo, hi) = (l.access.0.max(first), l.access.1.min(end));
        if let Some(l) = self.lwcs.get_mut(&id) {
            l.access = if lo < hi { (lo, hi) } else { (0, 0) };
            l.cap_access &= args[2];
        }
        Ok(Outcome { name: None, results: [0; 4] })
    }

    /// `lwOverlay(l; at | mode, bytes)`: puts `l`'s pages `[at, at + bytes)` into the
    /// caller's view, copied (`LWC_COW`) or shared (`LWC_SHARED`), or takes them out of it
    /// (`LWC_UNMAP`), seed §4.2.4. Copied and shared pages must lie in what holders of `l`
    /// may access; the VM's own EPT (a caller without a view) only takes copies; only
    /// memory of an lwC without a view of its own (the VM's frames) can be shared.
    fn overlay(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let caller = Self::number(checked.caller())?;
        let (id, l) = self.lwc_of(checked.args()[0].object())?;
        let me = *self.lwcs.get(&caller).ok_or(AmError::NotPermitted)?;
        if me.vm != l.vm || id == caller {
            return Err(AmError::NotPermitted);
        }
        let (first, end, mode) = Self::page_range(args[0], args[1], self.pages_of(l.vm))?;
        let caps = args[2];
        if caps & !l.cap_access != 0 {
            return Err(AmError::NotPermitted);
        }
        let inside = first >= l.access.0 && end <= l.access.1;
        let refused = match mode {
            LwcMemory::COW => !inside,
            LwcMemory::SHARED => !inside || me.root_view || !l.root_view,
            _ => me.root_view,
        };
        // An empty page range with capabilities is an import only.
        if refused && (first < end || caps == 0) {
            return Err(AmError::NotPermitted);
        }
        if caps != 0 {
            kernel.emit(Effect::LwcImport { from: VmId::new(id), to: VmId::new(caller), mask: caps });
        }
        if first < end {
            kernel.emit(Effect::LwcOverlay {
                from: VmId::new(id),
                to: VmId::new(caller),
                first_page: first,
                pages: end - first,
                mode,
            });
        }
        Ok(Outcome { name: None, results: [0; 4] })
    }

    /// `lwTrap(creator: lwc; selector, a0)`: the caller, a running `LWC_SYSTRAP` child,
    /// switches to its creator (named by a capability it holds), which gets `{TRAPPED, child id, selector, a0}` (the hypervisor makes this
    /// call for a refused one, seed §4.2.6).
    fn trap(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let caller = Self::number(checked.caller())?;
        let me = *self.lwcs.get(&caller).ok_or(AmError::NotPermitted)?;
        let (named, _) = self.lwc_of(checked.args()[0].object())?;
        let creator = me.creator.filter(|&c| c == named && self.lwcs.get(&c).is_some_and(|l| l.vm == me.vm));
        let (true, Some(creator)) = (me.systrap, creator) else {
            return Err(AmError::NotPermitted);
        };
        kernel.emit(Effect::LwcSwitch { from: VmId::new(caller), to: VmId::new(creator) });
        Ok(Outcome { name: None, results: [nk_abi::lwc_op::TRAPPED, u64::from(caller), args[0], args[1]] })
    }

    /// `lwSyscall(target: lwc/switch; mask)`: the hypervisor performs the call `target`
    /// trapped with, as `target` (`mask` 0) or as the caller; only for an `LWC_SYSTRAP`
    /// lwC of the caller's VM, not the caller.
    fn syscall(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let caller = Self::number(checked.caller())?;
        let (id, target) = self.lwc_of(checked.args()[0].object())?;
        let me = self.lwcs.get(&caller).ok_or(AmError::NotPermitted)?;
        if id == caller || me.vm != target.vm || !target.systrap {
            return Err(AmError::NotPermitted);
        }
        kernel.emit(Effect::LwcSyscall { by: VmId::new(caller), target: VmId::new(id), mask: args[0] });
        Ok(Outcome { name: None, results: [0; 4] })
    }

    /// Reads the memory part of `lwCreate`'s resource spec (`args[2..5]`: the mode, a
    /// page-aligned range with its mode in the low two bits, the range's bytes) for a VM
    /// of `bytes` bytes of memory.
    fn memory_spec(args: &[u64; PLAIN_ARGS], bytes: u64) -> Result<LwcMemory, AmError> {
        let (first_page, pages, range_mode) = Self::exception_range(args[3], args[4], bytes)?;
        Ok(LwcMemory { mode: Self::mode(args[2])?, range_mode, first_page, pages })
    }

    /// Reads a resource-spec mode (`LWC_SHARED`, `LWC_COW`, `LWC_UNMAP`).
    fn mode(mode: u64) -> Result<u8, AmError> {
        match mode {
            0..=2 => Ok(mode as u8),
            _ => Err(AmError::BadArgument),
        }
    }

    /// Reads one exception range (a page-aligned address with its mode in the low two
    /// bits, a length in bytes) of a VM of `bytes` bytes: (first page, pages, mode).
    fn exception_range(at: u64, len: u64, bytes: u64) -> Result<Range, AmError> {
        let range = at & !(PAGE - 1);
        let mode = Self::mode(at & (PAGE - 1))?;
        if !len.is_multiple_of(PAGE) || range.checked_add(len).is_none_or(|end| end > bytes) {
            return Err(AmError::BadArgument);
        }
        let first = u32::try_from(range / PAGE).map_err(|_| AmError::BadArgument)?;
        let pages = u32::try_from(len / PAGE).map_err(|_| AmError::BadArgument)?;
        Ok((first, pages, mode))
    }

    /// Reads `lwCreate`'s `LWC_RANGES` spec: `args[2]` the mode, `args[3]` the
    /// guest-physical address of a list of `args[4]` exception ranges (two words each) in
    /// the memory of `vm` (`bytes` bytes), read through the hypervisor's view of it. Returns
    /// the spec with the first range, and the others in order. Every range is checked
    /// before anything changes.
    fn range_list(
        args: &[u64; PLAIN_ARGS],
        vm: VmId,
        bytes: u64,
        kernel: &dyn Kernel,
    ) -> Result<(LwcMemory, Vec<Range>), AmError> {
        let (at, count) = (args[3], args[4]);
        let mode = Self::mode(args[2])?;
        if count == 0 || count > nk_abi::lwc_op::MAX_RANGES || !at.is_multiple_of(8) {
            return Err(AmError::BadArgument);
        }
        let len = count * 16;
        if at.checked_add(len).is_none_or(|end| end > bytes) {
            return Err(AmError::BadArgument);
        }
        let (base, size) = kernel.guest_memory(vm).ok_or(AmError::NotPermitted)?;
        if at + len > size {
            return Err(AmError::BadArgument);
        }
        let host = kernel.host_memory().ok_or(AmError::NotPermitted)?;
        let mut raw = [0u8; 16 * nk_abi::lwc_op::MAX_RANGES as usize];
        let raw = &mut raw[..len as usize];
        if !host.read(base + at, raw) {
            return Err(AmError::BadArgument);
        }
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let mut ranges = Vec::new();
        ranges.try_reserve_exact(count as usize).map_err(|_| AmError::NoMemory)?;
        for i in 0..count as usize {
            ranges.push(Self::exception_range(word(2 * i), word(2 * i + 1), bytes)?);
        }
        let (first_page, pages, range_mode) = ranges.remove(0);
        Ok((LwcMemory { mode, range_mode, first_page, pages }, ranges))
    }

    /// Returns the principal number of `principal` when it is a VM-like principal.
    fn number(principal: Principal) -> Result<u32, AmError> {
        match principal {
            Principal::Vm(vm) => Ok(vm.raw()),
            _ => Err(AmError::NotPermitted),
        }
    }

    /// Returns the live lwC an argument names.
    fn lwc_of(&self, object: Object) -> Result<(u32, Lwc), AmError> {
        let id = u32::try_from(object.id.raw()).map_err(|_| AmError::BadArgument)?;
        self.lwcs.get(&id).map(|l| (id, *l)).ok_or(AmError::NotPermitted)
    }

    fn create(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let (am, kind) = (self.am.ok_or(AmError::NotPermitted)?, self.kind.ok_or(AmError::NotPermitted)?);
        let caller = Self::number(checked.caller())?;
        let (id, me) = self.lwc_of(checked.args()[0].object())?;
        if id != caller {
            return Err(AmError::NotPermitted);
        }
        use nk_abi::lwc_op::{LWC_RANGES, LWC_RECEIVED, LWC_SYSTRAP};
        if args[1] & !(LWC_SYSTRAP | LWC_RANGES | LWC_RECEIVED) != 0 {
            return Err(AmError::BadArgument);
        }
        // The capability part: bits of INITIAL indices, or with LWC_RECEIVED 32 of each.
        let (mask, received) = match args[1] & LWC_RECEIVED {
            0 => (args[0], 0),
            _ => (args[0] & u64::from(u32::MAX), (args[0] >> 32) as u32),
        };
        let systrap = args[1] & LWC_SYSTRAP != 0;
        let bytes = self.memory_of(me.vm).ok_or(AmError::NotPermitted)?;
        let (memory, more) = if args[1] & LWC_RANGES != 0 {
            // The list is read from the VM's own memory, which only an lwC on the VM's
            // own EPT sees as it is.
            if !me.root_view {
                return Err(AmError::NotPermitted);
            }
            Self::range_list(args, me.vm, bytes, &*kernel)?
        } else {
            (Self::memory_spec(args, bytes)?, Vec::new())
        };
        let all_shared = memory.all_shared() && more.iter().all(|&(_, pages, mode)| pages == 0 || mode == memory.mode);
        // A view of its own is made from the VM's own EPT only (docs/lwc.md).
        if !all_shared && !me.root_view {
            return Err(AmError::NotPermitted);
        }
        if self.lwcs.len() >= MAX_LWCS || self.next_child == u32::MAX {
            return Err(AmError::NoMemory);
        }
        if self.lwcs.values().filter(|l| l.vm == me.vm && l.creator.is_some()).count() >= MAX_LWCS_PER_VM {
            return Err(AmError::QuotaExceeded);
        }
        let child = self.next_child;
        let object = Object::new(am, kind, ObjId::new(u64::from(child)));
        let all = Rights::from_bits(rights::SWITCH | rights::CREATE | rights::DESTROY);
        let (root, name) = kernel.grant_new_root(object, all, checked.caller(), Binding::Bound)?;
        self.next_child += 1;
        let root_view = all_shared && me.root_view;
        let access = (0, self.pages_of(me.vm));
        let lwc = Lwc {
            vm: me.vm,
            creator: Some(caller),
            caps: Some((root, name)),
            root_view,
            access,
            systrap,
            cap_access: u64::MAX,
        };
        self.lwcs.insert(child, lwc);
        let systrap = systrap.then_some(am);
        kernel.emit(Effect::LwcCreate {
            parent: VmId::new(caller),
            child: VmId::new(child),
            mask,
            received,
            memory,
            systrap,
        });
        for (first_page, pages, mode) in more {
            kernel.emit(Effect::LwcRange { child: VmId::new(child), first_page, pages, mode });
        }
        Ok(Outcome { name: Some(name), results: [u64::from(child), NONE, 0, 0] })
    }

    fn switch(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let caller = Self::number(checked.caller())?;
        let (target, to) = self.lwc_of(checked.args()[0].object())?;
        let from = self.lwcs.get(&caller).copied().ok_or(AmError::NotPermitted)?;
        if target == caller || to.vm != from.vm {
            return Err(AmError::NotPermitted);
        }
        kernel.emit(Effect::LwcSwitch { from: VmId::new(caller), to: VmId::new(target) });
        let creator = to.creator.map_or(NONE, u64::from);
        Ok(Outcome { name: None, results: [creator, u64::from(caller), args[0], args[1]] })
    }
}

impl AbstractMachine for LwcAm {
    fn name(&self) -> &'static str {
        "lwc"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "lwc", rights: &["switch", "create", "destroy"] })?;
        let switch = r.rights(kind, &["switch"]).ok_or(RegisterError::UnknownKind)?;
        let create = r.rights(kind, &["create"]).ok_or(RegisterError::UnknownKind)?;
        self.kind = Some(kind);
        self.am = Some(r.am());
        r.operation(OpSpec { name: "lwCreate", args: &[ArgSpec::new(kind, create)] })?;
        r.operation(OpSpec { name: "lwSwitch", args: &[ArgSpec::new(kind, switch)] })?;
        r.operation(OpSpec { name: "lwRestrict", args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        r.operation(OpSpec { name: "lwOverlay", args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        r.operation(OpSpec { name: "lwSyscall", args: &[ArgSpec::new(kind, switch)] })?;
        r.operation(OpSpec { name: "lwTrap", args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        match checked.op().index() {
            op::LW_CREATE => self.create(checked, args, kernel),
            op::LW_SWITCH => self.switch(checked, args, kernel),
            op::LW_RESTRICT => self.restrict(checked, args),
            op::LW_OVERLAY => self.overlay(checked, args, kernel),
            op::LW_SYSCALL => self.syscall(checked, args, kernel),
            op::LW_TRAP => self.trap(checked, args, kernel),
            _ => Err(AmError::NotPermitted),
        }
    }

    /// Grants every VM its root lwC (object id = the VM's number) with both rights.
    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let (am, kind) = (self.am.ok_or(AmError::NotPermitted)?, self.kind.ok_or(AmError::NotPermitted)?);
        if vm.raw() >= FIRST_CHILD || self.memory_of(vm).is_none() {
            return Ok(Vec::new());
        }
        let object = Object::new(am, kind, ObjId::new(u64::from(vm.raw())));
        let all = Rights::from_bits(rights::SWITCH | rights::CREATE);
        let name = kernel.grant_new(object, all, Principal::Vm(vm), Binding::Bound)?;
        self.lwcs.insert(
            vm.raw(),
            Lwc {
                vm,
                creator: None,
                caps: None,
                root_view: true,
                access: (0, self.pages_of(vm)),
                systrap: false,
                cap_access: u64::MAX,
            },
        );
        Ok(alloc::vec![name])
    }

    fn revoked(&mut self, dead: &DeadCap, effects: &mut dyn Effects) {
        if Some(dead.object.kind) != self.kind {
            return;
        }
        let Ok(id) = u32::try_from(dead.object.id.raw()) else { return };
        let Some(lwc) = self.lwcs.get(&id).copied() else { return };
        match lwc.caps {
            // The creator's capability died: the lwC with it.
            Some((root, handed)) if handed == dead.name => {
                self.lwcs.remove(&id);
                // Where a vCPU that runs it goes back to: its creator (or the VM's root lwC).
                // Which lwC a vCPU runs is the hypervisor's to know, not the AM's.
                let resume = match lwc.creator.filter(|c| self.lwcs.contains_key(c)) {
                    Some(creator) => creator,
                    None => lwc.vm.raw(),
                };
                let resume = Some(resume).filter(|r| self.lwcs.contains_key(r)).map(VmId::new);
                effects.emit(Effect::LwcDestroy { child: VmId::new(id), resume });
                if let Some(am) = self.am {
                    effects.emit(Effect::Retire { am, root });
                }
            }
            // A root lwC's capability dies with its VM.
            None if dead.holder == Principal::Vm(lwc.vm) => {
                self.lwcs.remove(&id);
            }
            // A capability with the `destroy` right died (a copy the creator handed out,
            // perhaps to another VM on another kernel): the lwC dies with it. Retiring the
            // root deletes the creator's capability on the creator's kernel (the
            // null-Kernel forwards a retirement there from another kernel), and that
            // death, heard there, destroys the lwC as above.
            Some((root, _)) if dead.rights.bits() & rights::DESTROY != 0 => {
                effects.emit(Effect::LwcCapGone { lwc: VmId::new(id) });
                if let Some(am) = self.am {
                    effects.emit(Effect::Retire { am, root });
                }
            }
            // Another capability to the lwC died: a switch the hypervisor remembers made
            // with it must take the full check again.
            _ => effects.emit(Effect::LwcCapGone { lwc: VmId::new(id) }),
        }
    }
}

#[cfg(test)]
mod tests;
