//! The null-Kernel hypercall ABI (DESIGN.md §4), version [`ABI_VERSION`].
//!
//! A guest calls the null-Kernel with `VMCALL`, from ring 0 or ring 3 (ring 3 is how a
//! process of an unmodified guest OS bypasses its OS). Registers in:
//!
//! | register | meaning |
//! |---|---|
//! | RAX | [`Selector`]: ABI version (bits 63:48), AM id (47:32), operation (31:0) |
//! | RBX:RCX | capability argument 0 (low word, high word) |
//! | RDX:RSI | capability argument 1 |
//! | RDI:R8 | capability argument 2 |
//! | R9:R10 | capability argument 3 |
//! | R11..R15 | plain arguments 0..4 |
//!
//! Registers out: RAX holds a [`Status`] (0 on success); RBX:RCX a capability name the call
//! returned (derive, delegate), RDX, RSI, RDI, R8 four plain results. Every other register
//! is preserved. A malformed call returns a status and changes nothing.
//!
//! AM id 0 is the null-Kernel itself; its operations are in [`nk_op`].
//!
//! # Revisions
//!
//! The selector's version changes only when a call stops meaning what it meant; additions
//! that old guests can ignore raise [`ABI_REVISION`] and are listed here.
//!
//! * Revision 2: `RECEIVED` returns the sender in result 2; its inbox drops an entry when
//!   the capability dies (later entries move up); `INITIAL` and `RECEIVED` answer
//!   `NOT_PERMITTED` outside ring 0 unless the VM's module line says `ring3-caps`; a
//!   delegation is charged to the delegator's quota, and one to a VM whose inbox is full
//!   fails with `QUOTA_EXCEEDED`.
//! * Revision 3: `BIND` ([`nk_op::BIND`]) binds a capability to the calling guest
//!   process (its page-table root, [`process_root`]); `INSPECT`'s result 3 has bit 62 set
//!   for a process-bound capability.
#![cfg_attr(not(test), no_std)]

use core::fmt;

pub mod nkcp;

/// The ABI version this crate speaks.
pub const ABI_VERSION: u16 = 1;
/// The revision of [`ABI_VERSION`] this crate documents (see "Revisions" above).
pub const ABI_REVISION: u16 = 3;
/// Capability arguments a call can carry.
pub const MAX_CAP_ARGS: usize = 4;
/// Plain arguments a call can carry.
pub const MAX_PLAIN_ARGS: usize = 5;
/// The AM id of the null-Kernel's own operations.
pub const NULL_KERNEL_AM: u16 = 0;

/// How a bare-metal VM with several vCPUs starts them (its module says `vcpus=<n>`;
/// docs/multi-vcpu.md).
///
/// Every vCPU enters the guest image at its ELF entry at boot, in the same state as the
/// first (64-bit mode, paging on the hypervisor's identity map, RDI = the VM id, RSI = its
/// memory size, RDX:RCX = its arguments), and two registers more: R8 = the vCPU's index
/// (0 for the first) and R9 = how many vCPUs the VM has. vCPU `i` starts with RSP at the
/// top of guest memory less `i * STACK_BYTES`: each vCPU's first stack is its own
/// [`STACK_BYTES`] below the previous one's. A VM with one vCPU (the default) sees R8 = 0
/// and R9 = 1. All vCPUs share the VM's memory, capabilities and quotas; each has its own
/// registers and runs its own light-weight context (the lwC AM): while vCPU `i` runs lwC
/// X, its hypercalls are checked against X's capabilities, whatever the other vCPUs run.
/// The VM ends when every vCPU halted; one vCPU stopped (a fault) stops the VM.
pub mod vcpu {
    /// The most vCPUs a VM may have (`vcpus=1` to `vcpus=4`).
    pub const MAX_VCPUS: u64 = 4;
    /// The bytes of stack each vCPU starts with, below the previous vCPU's.
    pub const STACK_BYTES: u64 = 64 * 1024;
}

/// Operations of the null-Kernel itself (AM id 0).
pub mod nk_op {
    /// Does nothing and returns: the round trip of a hypercall.
    pub const NULL: u32 = 0;
    /// `derive(c, mask)` -> new name. Args: cap 0 = c; plain 0 = rights mask.
    pub const DERIVE: u32 = 1;
    /// `delegate(c, target vm, mask, binding)` -> new name. Args: cap 0; plain 0 = mask,
    /// plain 1 = target VM id, plain 2 = 0 bound / 1 bearer. The new capability is
    /// charged to the caller's quota until the target deletes it (`QUOTA_EXCEEDED` when
    /// the caller's is spent, or the target's inbox is full).
    pub const DELEGATE: u32 = 2;
    /// `revoke(c)`: c and its whole subtree. Args: cap 0. Result 0 = capabilities revoked.
    pub const REVOKE: u32 = 3;
    /// `delete(c)`. Args: cap 0.
    pub const DELETE: u32 = 4;
    /// `inspect(c)`. Args: cap 0. Results: 0 = AM id << 32 | kind, 1 = object id,
    /// 2 = rights, 3 = holder VM id << 1 | bearer.
    pub const INSPECT: u32 = 5;
    /// `initial(index)` -> name: the caller's index-th initial capability (the ones its
    /// AMs granted when the VM was created). Args: plain 0 = index. Results: 0 = the AM
    /// id of the capability's object. `BAD_ARGUMENT` past the last one; `NOT_PERMITTED`
    /// from a ring other than 0 unless the VM's module line says `ring3-caps`.
    pub const INITIAL: u32 = 6;
    /// `received(index)` -> name: the index-th capability another principal delegated to
    /// the caller (its inbox, in arrival order; how a VM learns what its peers gave it).
    /// An entry leaves the inbox when its capability dies (revoked or deleted), so later
    /// ones move up. Args: plain 0 = index. Results: 0 = the AM id of the capability's
    /// object, 1 = how many the inbox holds, 2 = the sender as `inspect` encodes a holder
    /// (VM id << 1; an AM's id << 1 with bit 63 set; revision 2). `BAD_ARGUMENT` past the
    /// last one; `NOT_PERMITTED` from a ring other than 0 unless the VM's module line says
    /// `ring3-caps`.
    pub const RECEIVED: u32 = 7;
    /// `bind(c)`: binds c, which the caller's VM holds (bound to it, not a bearer
    /// capability), to the guest process making the call: its page-table root
    /// ([`process_root`](crate::process_root) of the guest CR3 at the call). From then on a
    /// call with another root that presents c (to use, inspect, derive, delegate, revoke or
    /// delete it) gets `WRONG_HOLDER`, as another VM would, and changes nothing; holding
    /// c's parent still allows revoking it. One-way: there is no unbind, binding again
    /// from the same root changes nothing, and a child derived from c is bound to the same
    /// root (a delegation makes what the bound process asks for). Args: cap 0. Results:
    /// 0 = the root. `NOT_PERMITTED` for a bearer capability (revision 3; docs/guest-os.md
    /// "Binding a capability to one process" for what it costs and where it is weak).
    pub const BIND: u32 = 8;
}

/// The page-table root a process-bound capability is bound to, from the guest's CR3 at
/// the call ([`nk_op::BIND`]): CR3 without bits 12:0 (and without bit 63).
///
/// Bits 11:0 are the PCID (or the PWT/PCD flags), which change with the TLB tag, not
/// with the process. Bit 12 is Linux's page-table isolation (PTI): a process has two
/// roots, the kernel's PGD and the user PGD 4 KiB above it in one 8 KiB-aligned
/// allocation (`PTI_USER_PGTABLE_MASK`), and a call from ring 3 comes with the user root
/// while the process's kernel code runs on the kernel root; clearing bit 12 makes both
/// the same process. The price: a kernel whose PGDs are single 4 KiB pages (no PTI built
/// in) could give two processes the two halves of one 8 KiB block.
pub const fn process_root(cr3: u64) -> u64 {
    cr3 & !(0x1fff | (1 << 63))
}

/// Operations of the exo AM (`am/exo`; its AM id is found at run time, e.g. from an
/// `initial` capability's result 0). Frame and address-space arguments are capabilities of
/// the kinds `exo/frames` and `exo/aspace`; the AM's crate docs give the refusals.
pub mod exo_op {
    /// `open(c: io-ports, first, count, access)`: lets the caller's `in`/`out` reach ports
    /// `first..first+count`; `access` = [`crate::exo_access::PORT_IN`] | `PORT_OUT`.
    pub const OPEN: u32 = 0;
    /// `close(c: io-ports, first, count)`.
    pub const CLOSE: u32 = 1;
    /// `open-msr(c: msr, access)`: `access` = 1 read | 2 write.
    pub const OPEN_MSR: u32 = 2;
    /// `alloc(c: aspace[alloc], pages, large)` -> a frame-set capability (every right) and
    /// `[pages, 0, 0, 0]`; `large` = 1 asks for 2 MiB pages.
    pub const ALLOC: u32 = 3;
    /// `split(c: frames[split], offset, bytes)` -> a capability to the part.
    pub const SPLIT: u32 = 4;
    /// `map(c0: frames[map], c1: aspace[map], gpa, access)`: maps the set at guest-physical
    /// `gpa`; `access` = [`crate::exo_access`] bits the frames' rights must cover.
    pub const MAP: u32 = 5;
    /// `unmap(c: aspace[map], gpa)`: removes the mapping that starts at `gpa`.
    pub const UNMAP: u32 = 6;
    /// `protect(c: aspace[map], gpa, access)`: changes a mapping's access.
    pub const PROTECT: u32 = 7;
    /// `free(c: frames)`: gives the set back (its capabilities die).
    pub const FREE: u32 = 8;
    /// `dirty(c0: aspace[dirty], c1: frames[write], gpa, pages, offset)`: reads and clears
    /// the EPT dirty flags (SDM Vol. 3C §29.3.5) of `pages` 4 KiB pages from `gpa` of
    /// the address space's VM, writing a bitmap (bit i % 8 of byte i / 8 = page i written
    /// since the last read) into frame set c1 at byte `offset`. At most 65,536 pages a
    /// call. Results: 0 = pages read. Plain argument 3 holds flags ([`crate::exo_dirty`]):
    /// with `KEEP` the flags are read and left set, which is allowed also in the range
    /// the hypervisor gives another AM's mappings (the NVRAM window, whose flags are that
    /// AM's write set).
    pub const DIRTY: u32 = 9;
    /// `pml-enable(c: aspace[dirty], gpa, pages)`: logs writes with the page-modification
    /// log (SDM Vol. 3C §29.3.6) for the range.
    pub const PML_ENABLE: u32 = 10;
    /// `pml-drain(c0: aspace[dirty], c1: frames[write], offset)`: copies the logged
    /// pages of the range into a bitmap in frame set c1 at `offset`. Results: 0 = pages.
    pub const PML_DRAIN: u32 = 11;
    /// `dirty-read(c: aspace[dirty], gpa, pages)`: reads and clears the EPT dirty flags of
    /// `pages` 4 KiB pages from `gpa` of the address space's VM, anywhere in it (also
    /// ranges other AMs map, e.g. NVRAM regions), synchronously. A VM caller gets the
    /// bitmap in the results (at most 256 pages; result i bit j = page 64 i + j); an AM
    /// caller (AM-to-AM call) gets it in its buffer, up to 65,536 pages.
    pub const DIRTY_READ: u32 = 12;
}

/// Flags of the exo AM's `dirty` (its plain argument 3).
pub mod exo_dirty {
    /// Reads the dirty flags without clearing them.
    pub const KEEP: u64 = 1;
}

/// Access bits of the exo AM's `map`, `protect` and `open` calls.
pub mod exo_access {
    /// Read (also `in` for `open`).
    pub const READ: u64 = 1;
    /// Write (also `out` for `open`).
    pub const WRITE: u64 = 2;
    /// Execute.
    pub const EXECUTE: u64 = 4;
    /// A port may be read with `in`.
    pub const PORT_IN: u64 = 1;
    /// A port may be written with `out`.
    pub const PORT_OUT: u64 = 2;
}

/// Operations of the guest-OS AM (`am/guest-os`): VMs as `vm` capabilities.
pub mod guest_os_op {
    /// `inspect(c: vm[inspect])` -> `[state | image << 8 | cpu << 16, memory bytes, exits,
    /// vm id]`.
    pub const INSPECT: u32 = 0;
    /// `stop(c: vm[stop])`: the VM gets no time slices until started.
    pub const STOP: u32 = 1;
    /// `start(c: vm[start])`: resumes a stopped VM (or first starts a created one).
    pub const START: u32 = 2;
    /// `destroy(c: vm[destroy])`: ends the VM.
    pub const DESTROY: u32 = 3;
    /// `create(c: image[create], frames low, frames high, cpu)` -> a `vm` capability and
    /// `[vm id, RAM bytes, 0, 0]`.
    pub const CREATE: u32 = 4;
    /// `yield_to(c: vm[start])`: a directed yield. The caller gives the rest of its time
    /// slice to the VM, which must run on the caller's CPU (and not be the caller): the
    /// hypervisor runs it next when its turn in the CPU's round of slices is still to come
    /// (it moves ahead; every other VM keeps its turn), else at its turn in the next
    /// round. Returns when the caller's turn comes again. `NOT_PERMITTED` for the caller
    /// itself, a VM on another CPU or one not running.
    pub const YIELD_TO: u32 = 5;
}

/// Operations of the NVRAM AM (`am/nvram`): persistent regions, committed atomically.
pub mod nvram_op {
    /// `allocate(c: nvram-factory[allocate], bytes, key)` -> a region capability (every
    /// right) and `[bytes, committed seq, 1 if created, region id]`; an existing region
    /// `key` of the same owner is restored instead of created.
    pub const ALLOCATE: u32 = 0;
    /// `map(c: region[map-read], gpa, access, aspace high, aspace low)`: maps the region's
    /// working copy at `gpa` (1-2 GiB); `access` = 1 read, 3 read-write (write needs
    /// `map-write`). With the last two 0, into the caller's own address space; else into
    /// the address space of the exo `aspace` capability those words name (rights `map`
    /// and `dirty`: the caller's own or another VM's), which the NVRAM AM keeps a child of
    /// to read the write set.
    pub const MAP: u32 = 1;
    /// `unmap(c: region[map-read], gpa, vm)`: the mapping the caller made at `gpa` in its
    /// own address space (`vm` 0) or in VM `vm`'s.
    pub const UNMAP: u32 = 2;
    /// `begin(c: region[commit])`: opens a transaction; results: 0 = seq.
    pub const BEGIN: u32 = 3;
    /// `commit(c: region[commit], whole)`: makes every write since the last commit or
    /// restore durable, atomically; results `[seq, blocks written, device bytes, dirty
    /// pages]`. `whole` = 1 writes every block of the region instead of the write set (a
    /// naive whole-region copy, for comparison); 0 (the default) the write set.
    pub const COMMIT: u32 = 4;
    /// `restore(c: region[restore])`: puts the working copy back to the last commit;
    /// results: 0 = seq.
    pub const RESTORE: u32 = 5;
    /// `seq(c: region)` -> `[committed seq, bytes, 1 if a transaction is open]`.
    pub const SEQ: u32 = 6;
}

/// Rights bits of an NVRAM region capability.
#[allow(missing_docs)]
pub mod nvram_rights {
    pub const MAP_READ: u64 = 1 << 0;
    pub const MAP_WRITE: u64 = 1 << 1;
    pub const COMMIT: u64 = 1 << 2;
    pub const RESTORE: u64 = 1 << 3;
}

/// Operations of the counter AM (`am/counter`), the test AM.
pub mod counter_op {
    /// `create(f: factory[create])` -> a counter capability.
    pub const CREATE: u32 = 0;
    /// `read(c: counter[read])` -> `[value, deaths]`.
    pub const READ: u32 = 1;
    /// `add(c: counter[increment], amount)` -> `[new value]`.
    pub const ADD: u32 = 2;
    /// `sum4(a, b, c, d: counter[read])` -> `[sum]`.
    pub const SUM4: u32 = 3;
}

/// Operations of the lwC AM (`am/lwc`, docs/lwc.md), with the seed's names (Table 4.1).
pub mod lwc_op {
    /// `lwCreate(self: lwc[create], mask, options, mode, range, bytes)`: returns `{new,
    /// caller, args}` like fork. `mode` is how the child sees the VM's memory
    /// ([`LWC_SHARED`], [`LWC_COW`] or [`LWC_UNMAP`]); `range` is a page-aligned
    /// guest-physical address with another mode in its low two bits, for `bytes` bytes
    /// (0: no such range); with the option [`LWC_RANGES`], a list of such ranges.
    pub const LW_CREATE: u32 = 0;
    /// Resource-spec mode: the child shares the memory with its creator.
    pub const LWC_SHARED: u64 = 0;
    /// Resource-spec mode: the child gets a copy-on-write snapshot (seed §4.2.1's default).
    pub const LWC_COW: u64 = 1;
    /// Resource-spec mode: the memory is not mapped in the child.
    pub const LWC_UNMAP: u64 = 2;
    /// `lwSwitch(target: lwc[switch], a0, a1)`: returns `{caller, switcher, a0, a1}`.
    pub const LW_SWITCH: u32 = 1;
    /// `lwRestrict(l: lwc, at, bytes, caps)`: what holders of `l` may overlay becomes the
    /// intersection of what they could and the pages `[at, at + bytes)`, and what they may
    /// import the intersection with `caps` (bit i: `l`'s `INITIAL` capability i).
    pub const LW_RESTRICT: u32 = 2;
    /// `lwOverlay(l: lwc, at | mode, bytes, caps)`: `l`'s pages `[at, at + bytes)` into
    /// the caller's memory as `mode` says, and delegated copies of `l`'s `INITIAL`
    /// capabilities chosen by `caps` appended to the caller's `INITIAL` list.
    pub const LW_OVERLAY: u32 = 3;
    /// `lwSyscall(target: lwc[switch]; mask)`: performs the call `target` trapped with
    /// (`LWC_SYSTRAP`) as if `target` made it (`mask` 0) or with the caller's capabilities
    /// (`mask` not 0); the reply is that call's.
    pub const LW_SYSCALL: u32 = 4;
    /// `lwTrap()`: made by the hypervisor for an `LWC_SYSTRAP` child whose call was refused
    /// for a capability it does not hold: switches to its creator, whose reply is
    /// `{TRAPPED, child id, selector, args[0]}` of the refused call.
    pub const LW_TRAP: u32 = 5;
    /// `lwCreate` option: calls the child holds no capability for trap to its creator.
    pub const LWC_SYSTRAP: u64 = 1;
    /// `lwCreate` option: `range` is the guest-physical address (8-byte aligned, in the
    /// VM's initial memory) of a list of `bytes` exception ranges (1 to [`MAX_RANGES`]),
    /// each two words: a page-aligned address with its mode in the low two bits, and a
    /// length in bytes. They apply in order over `mode`, a later one over an earlier one
    /// where they overlap.
    pub const LWC_RANGES: u64 = 2;
    /// The most exception ranges an `LWC_RANGES` list holds.
    pub const MAX_RANGES: u64 = 8;
    /// `lwCreate` option: the capability mask's bits 0-31 name the caller's `INITIAL`
    /// capabilities 0-31 and bits 32-63 its `RECEIVED` capabilities 0-31 (its inbox at the
    /// call), each handed to the child as a delegated copy after the `INITIAL` ones.
    pub const LWC_RECEIVED: u64 = 4;
    /// The first result of a creator's `lwSwitch` that a trapped call ended.
    pub const TRAPPED: u64 = u64::MAX - 1;
    /// "No lwC" in results (the creator's `caller` after `lwCreate`; a root's creator).
    pub const NONE: u64 = u64::MAX;
}

/// The (version, AM, operation) selector carried in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    pub version: u16,
    pub am: u16,
    pub op: u32,
}

impl Selector {
    /// Makes a selector of the current ABI version.
    pub const fn new(am: u16, op: u32) -> Self {
        Self { version: ABI_VERSION, am, op }
    }

    /// Packs the selector into RAX.
    pub const fn encode(self) -> u64 {
        ((self.version as u64) << 48) | ((self.am as u64) << 32) | self.op as u64
    }

    /// Unpacks RAX. Any value decodes; the version is checked by the caller.
    pub const fn decode(rax: u64) -> Self {
        Self { version: (rax >> 48) as u16, am: (rax >> 32) as u16, op: rax as u32 }
    }
}

/// A 128-bit capability name as it travels in two registers (`repr(C)`: low word first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameWords {
    pub low: u64,
    pub high: u64,
}

/// The status codes of RAX on return (low 16 bits); bits 23:16 hold the index + 1 of the
/// capability argument that failed, or 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u64);

#[allow(missing_docs)]
impl Status {
    pub const OK: u16 = 0;
    pub const BAD_VERSION: u16 = 1;
    pub const UNKNOWN_AM: u16 = 2;
    pub const UNKNOWN_OPERATION: u16 = 3;
    pub const UNKNOWN_NAME: u16 = 4;
    pub const WRONG_HOLDER: u16 = 5;
    pub const WRONG_KIND: u16 = 6;
    pub const MISSING_RIGHTS: u16 = 7;
    pub const REVOKED: u16 = 8;
    pub const BAD_ARGUMENT: u16 = 9;
    pub const QUOTA_EXCEEDED: u16 = 10;
    pub const NOT_PERMITTED: u16 = 11;
    pub const NO_MEMORY: u16 = 12;
    pub const AM_FAILED: u16 = 13;

    /// Makes a status about capability argument `arg` (0-based), or about the call.
    pub const fn new(code: u16, arg: Option<u8>) -> Self {
        let arg = match arg {
            Some(i) => (i as u64 + 1) << 16,
            None => 0,
        };
        Status(code as u64 | arg)
    }

    /// Returns the code.
    pub const fn code(self) -> u16 {
        self.0 as u16
    }

    /// Returns the capability argument that failed, if the status names one.
    pub const fn arg(self) -> Option<u8> {
        match (self.0 >> 16) as u8 {
            0 => None,
            n => Some(n - 1),
        }
    }

    /// Tells whether the call succeeded.
    pub const fn is_ok(self) -> bool {
        self.code() == Self::OK
    }

    /// Names a code.
    pub const fn code_name(code: u16) -> &'static str {
        match code {
            Self::OK => "ok",
            Self::BAD_VERSION => "bad ABI version",
            Self::UNKNOWN_AM => "unknown AM",
            Self::UNKNOWN_OPERATION => "unknown operation",
            Self::UNKNOWN_NAME => "unknown capability name",
            Self::WRONG_HOLDER => "capability held by another principal",
            Self::WRONG_KIND => "capability of the wrong kind",
            Self::MISSING_RIGHTS => "capability lacks rights",
            Self::REVOKED => "capability revoked",
            Self::BAD_ARGUMENT => "bad argument",
            Self::QUOTA_EXCEEDED => "quota exceeded",
            Self::NOT_PERMITTED => "not permitted",
            Self::NO_MEMORY => "out of memory",
            Self::AM_FAILED => "AM operation failed",
            _ => "unknown status",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::code_name(self.code()))?;
        if let Some(arg) = self.arg() {
            write!(f, " (capability argument {arg})")?;
        }
        Ok(())
    }
}

/// A call as the guest lays it out in registers. `repr(C)`, in register order (RAX, RBX,
/// RCX, RDX, RSI, RDI, R8..R15), so a hypervisor can read it in place from its saved
/// registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Call {
    pub selector: u64,
    pub caps: [NameWords; MAX_CAP_ARGS],
    pub args: [u64; MAX_PLAIN_ARGS],
}

/// What the null-Kernel returns. `repr(C)`, in register order (RAX, RBX, RCX, RDX, RSI,
/// RDI, R8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub status: u64,
    pub name: NameWords,
    pub results: [u64; 4],
}

impl Reply {
    /// Returns the status.
    pub const fn status(&self) -> Status {
        Status(self.status)
    }
}

/// Issues a hypercall (guest side: a bare-metal guest, or a Linux process, where VMCALL
/// from ring 3 exits to the null-Kernel as from ring 0; outside a VM it raises #UD).
#[cfg(all(target_arch = "x86_64", any(target_os = "none", target_os = "linux")))]
#[inline(always)]
pub fn hypercall(call: &Call) -> Reply {
    let (status, name_low, name_high, r0, r1, r2, r3): (u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: VMCALL traps to the null-Kernel, which reads the documented registers and
    // writes only RAX, RBX, RCX, RDX, RSI, RDI and R8; every register the asm names is
    // declared as input, output or clobbered. RBX cannot be named as an operand, so it
    // is swapped through a scratch register.
    unsafe {
        core::arch::asm!(
            "xchg rbx, {b}",
            "vmcall",
            "xchg rbx, {b}",
            b = inout(reg) call.caps[0].low => name_low,
            inout("rax") call.selector => status,
            inout("rcx") call.caps[0].high => name_high,
            inout("rdx") call.caps[1].low => r0,
            inout("rsi") call.caps[1].high => r1,
            inout("rdi") call.caps[2].low => r2,
            inout("r8") call.caps[2].high => r3,
            in("r9") call.caps[3].low,
            in("r10") call.caps[3].high,
            in("r11") call.args[0],
            in("r12") call.args[1],
            in("r13") call.args[2],
            in("r14") call.args[3],
            in("r15") call.args[4],
            options(nostack),
        );
    }
    Reply { status, name: NameWords { low: name_low, high: name_high }, results: [r0, r1, r2, r3] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_round_trips() {
        let s = Selector::new(7, 0xDEAD_BEEF);
        assert_eq!(Selector::decode(s.encode()), s);
        assert_eq!(s.encode() >> 48, u64::from(ABI_VERSION));
    }

    #[test]
    fn process_roots_drop_the_pcid_and_the_pti_half() {
        // Linux's PTI pair: the kernel PGD (8 KiB-aligned) and the user PGD 4 KiB above.
        assert_eq!(process_root(0x0123_6000), 0x0123_6000);
        assert_eq!(process_root(0x0123_7000 | 0x805), 0x0123_6000);
        assert_eq!(process_root((1 << 63) | 0x0123_6001), 0x0123_6000);
        assert_ne!(process_root(0x0123_8000), process_root(0x0123_6000));
    }

    #[test]
    fn status_carries_the_failing_argument() {
        let s = Status::new(Status::MISSING_RIGHTS, Some(2));
        assert_eq!((s.code(), s.arg()), (Status::MISSING_RIGHTS, Some(2)));
        assert_eq!(s.to_string(), "capability lacks rights (capability argument 2)");
        assert_eq!(Status::new(Status::OK, None).arg(), None);
        assert!(Status::new(Status::OK, None).is_ok());
    }
}
