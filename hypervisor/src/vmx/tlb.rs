//! Cached translations and their invalidation (SDM Vol. 3 §29.4): the CPU tags what it
//! caches for a guest with the guest's VPID (linear and combined mappings) and with its
//! EPT root (EP4TA: guest-physical and combined mappings), and keeps those entries across
//! VM exits and entries. A tag that is handed to another guest, or an EPT whose frames go
//! back to the allocator, must first be invalidated with INVVPID or INVEPT, or the next
//! owner of the tag or frame could reach the old guest's memory through stale entries.
//!
//! Rules this module implements:
//! - VPIDs come from one pool ([`Vpid`]): never 0 (the host's), never held by two live
//!   vCPUs. Dropping a `Vpid` invalidates its translations on the CPU that drops it, and
//!   handing out a VPID that was held before invalidates it again on the new CPU.
//! - [`flush_ept`] runs on teardown before an EPT's tables are freed.
//! - Both use the single-context type where IA32_VMX_EPT_VPID_CAP offers it, else the
//!   all-context type (§29.4.3.1, §29.4.3.3; the INVEPT/INVVPID instruction pages in
//!   Vol. 3 §31.3). A CPU with INVVPID in neither type runs its guests without VPIDs (every
//!   VM entry and exit then flushes); a CPU without INVEPT keeps an EPT's tables rather
//!   than reuse them.
//! - Invalidation acts only on the executing CPU. A vCPU never leaves the CPU that created
//!   it, so tearing a guest down on its CPU reaches every CPU that cached its
//!   translations. Once EPT mappings change while a VM runs (the exo AM's frames), the
//!   change must reach every CPU that runs or ran the VM (docs/tlb.md).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use nk_paging::vpid::VpidPool;
use spin::Mutex;

use super::caps::VmxCaps;
use super::vmcs::{self, VmFail};

/// INVEPT/INVVPID type: one context (an EPTP, a VPID).
const SINGLE_CONTEXT: u64 = 1;
/// INVEPT/INVVPID type: every context.
const ALL_CONTEXT: u64 = 2;

static VPIDS: Mutex<VpidPool> = Mutex::new(VpidPool::new());
static INVEPTS: AtomicU64 = AtomicU64::new(0);
static INVVPIDS: AtomicU64 = AtomicU64::new(0);
static RECYCLED: AtomicU64 = AtomicU64::new(0);

/// Counts of invalidations since boot (for the self-tests and the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub invepts: u64,
    pub invvpids: u64,
    /// VPIDs handed out again after an earlier vCPU held them.
    pub vpids_recycled: u64,
    /// VPIDs held by live vCPUs.
    pub vpids_live: u32,
}

/// Returns the invalidation counts.
pub fn stats() -> Stats {
    Stats {
        invepts: INVEPTS.load(Ordering::Relaxed),
        invvpids: INVVPIDS.load(Ordering::Relaxed),
        vpids_recycled: RECYCLED.load(Ordering::Relaxed),
        vpids_live: VPIDS.lock().live(),
    }
}

/// Executes INVEPT of `kind` with descriptor (`eptp`, 0) (SDM Vol. 3 §31.3 "INVEPT").
fn invept(kind: u64, eptp: u64) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: in VMX root (crate assumptions) INVEPT only drops cached translations; the
    // descriptor is a 16-byte value on this stack; the flags are read in the same block.
    unsafe {
        asm!("invept {k}, [{d}]", "setc {cf}", "setz {zf}",
             k = in(reg) kind, d = in(reg) descriptor.as_ptr(), cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack, readonly));
    }
    INVEPTS.fetch_add(1, Ordering::Relaxed);
    vmcs::status(cf, zf)
}

/// Executes INVVPID of `kind` for `vpid` (SDM Vol. 3 §31.3 "INVVPID"); the linear
/// address of the descriptor is 0 (only the individual-address type reads it).
fn invvpid(kind: u64, vpid: u16) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: as for `invept`.
    unsafe {
        asm!("invvpid {k}, [{d}]", "setc {cf}", "setz {zf}",
             k = in(reg) kind, d = in(reg) descriptor.as_ptr(), cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack, readonly));
    }
    INVVPIDS.fetch_add(1, Ordering::Relaxed);
    vmcs::status(cf, zf)
}

/// Why an invalidation could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushError {
    /// The CPU offers no INVEPT/INVVPID type that covers the context.
    Unsupported,
    /// The instruction failed.
    Vmx(VmFail),
}

impl core::fmt::Display for FlushError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FlushError::Unsupported => write!(f, "the CPU offers no usable INVEPT/INVVPID type"),
            FlushError::Vmx(fail) => write!(f, "{fail}"),
        }
    }
}

/// Invalidates, on this CPU, the guest-physical and combined translations cached for the
/// EPT whose pointer is `eptp`: single-context if offered, else all-context (§29.4.3.1).
pub fn flush_ept(caps: &VmxCaps, eptp: u64) -> Result<(), FlushError> {
    let kind = match (caps.invept_single, caps.invept_all) {
        (true, _) => SINGLE_CONTEXT,
        (false, true) => ALL_CONTEXT,
        (false, false) => return Err(FlushError::Unsupported),
    };
    invept(kind, eptp).map_err(FlushError::Vmx)
}

/// Invalidates, on this CPU, the linear and combined translations cached for `vpid`:
/// single-context if offered, else all-context (§29.4.3.1).
fn flush_vpid(caps: &VmxCaps, vpid: u16) -> Result<(), FlushError> {
    let kind = match (caps.invvpid_single, caps.invvpid_all) {
        (true, _) => SINGLE_CONTEXT,
        (false, true) => ALL_CONTEXT,
        (false, false) => return Err(FlushError::Unsupported),
    };
    invvpid(kind, vpid).map_err(FlushError::Vmx)
}

/// Invalidates every EPT- and VPID-tagged translation on this CPU: what the SDM asks for
/// right after VMXON (§29.4.3.3), since firmware or an earlier VMM may have left some.
pub fn flush_everything(caps: &VmxCaps) {
    if caps.invept_all {
        if let Err(e) = invept(ALL_CONTEXT, 0) {
            log::warn!(target: "vmx", "INVEPT (all contexts) after VMXON failed: {e}");
        }
    }
    if caps.invvpid_all {
        if let Err(e) = invvpid(ALL_CONTEXT, 0) {
            log::warn!(target: "vmx", "INVVPID (all contexts) after VMXON failed: {e}");
        }
    }
}

/// A VPID held by one vCPU. Dropping it invalidates the VPID's translations on this CPU
/// and gives it back to the pool; a VPID that cannot be invalidated is never given back.
#[derive(Debug)]
pub struct Vpid(u16);

impl Vpid {
    /// Takes a VPID from the pool for a vCPU of this CPU, or None when the CPU has no VPIDs
    /// or cannot invalidate them (the vCPU then runs without one), or all are held.
    pub fn allocate(caps: &VmxCaps) -> Option<Self> {
        if !caps.vpid || !(caps.invvpid_single || caps.invvpid_all) {
            return None;
        }
        let allocated = VPIDS.lock().allocate()?;
        if allocated.recycled {
            // Teardown invalidated it on the CPU its last vCPU ran on; this covers a CPU
            // that ran an even earlier holder (vCPUs never move, so it was that one's).
            RECYCLED.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = flush_vpid(caps, allocated.vpid) {
                log::error!(target: "vmx", "INVVPID of recycled VPID {} failed: {e}; not using it", allocated.vpid);
                return None;
            }
        }
        Some(Self(allocated.vpid))
    }

    /// Returns the VPID.
    pub fn raw(&self) -> u16 {
        self.0
    }
}

impl Drop for Vpid {
    fn drop(&mut self) {
        match flush_vpid(&super::capabilities(), self.0) {
            Ok(()) => {
                VPIDS.lock().release(self.0);
            }
            Err(e) => log::error!(target: "vmx", "INVVPID of VPID {} failed: {e}; the VPID is retired", self.0),
        }
    }
}
