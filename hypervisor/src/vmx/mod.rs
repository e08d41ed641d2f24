//! VMX root operation on each CPU (SDM Vol. 3 §23.6-§23.8): the checks, the fixed CR0/CR4
//! bits, the VMXON region, and VMXON itself.

pub mod caps;
pub mod ept;
pub mod tlb;
pub mod vcpu;
pub mod vmcs;

use core::arch::asm;
use core::fmt;

use caps::{msr, VmxCaps, VmxMsrs};
use x86::msr::{rdmsr, wrmsr};

use crate::memory::{self, HostPhysAddr};

const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const CR4_VMXE: u64 = 1 << 13;

/// Why a CPU could not enter VMX root operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX[bit 5] is clear (e.g. QEMU without KVM, or an AMD CPU).
    NotSupported,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled (a firmware setting).
    DisabledByFirmware,
    /// No frame was left for the VMXON region.
    OutOfMemory,
    /// VMXON failed: VMfailInvalid (CF) or VMfailValid (ZF).
    VmxonFailed { fail_valid: bool },
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::NotSupported => write!(f, "CPUID.1:ECX.VMX (bit 5) is clear"),
            VmxError::DisabledByFirmware => {
                write!(f, "IA32_FEATURE_CONTROL is locked with VMX disabled (enable VT-x in the firmware)")
            }
            VmxError::OutOfMemory => write!(f, "no free frame for the VMXON region"),
            VmxError::VmxonFailed { fail_valid: false } => {
                write!(f, "VMXON failed (VMfailInvalid)")
            }
            VmxError::VmxonFailed { fail_valid: true } => write!(f, "VMXON failed (VMfailValid)"),
        }
    }
}

/// Tells whether this CPU reports VMX in CPUID.
pub fn cpu_has_vmx() -> bool {
    x86::cpuid::CpuId::new().get_feature_info().is_some_and(|info| info.has_vmx())
}

fn read(msr: u32) -> u64 {
    // SAFETY: only called after CPUID reported VMX, which guarantees the IA32_VMX_* MSRs
    // and IA32_FEATURE_CONTROL exist (SDM Vol. 3 Appendix A.1).
    unsafe { rdmsr(msr) }
}

/// Reads and decodes this CPU's VMX capabilities. Requires `cpu_has_vmx()`.
pub fn capabilities() -> VmxCaps {
    let procbased = read(msr::IA32_VMX_PROCBASED_CTLS);
    let secondary = procbased & (1 << (32 + 31)) != 0;
    let procbased2 = if secondary { read(msr::IA32_VMX_PROCBASED_CTLS2) } else { 0 };
    let ept_vpid = if procbased2 & (1 << (32 + 1)) != 0 || procbased2 & (1 << (32 + 5)) != 0 {
        read(msr::IA32_VMX_EPT_VPID_CAP)
    } else {
        0
    };
    let vmfunc = if procbased2 & (1 << (32 + 13)) != 0 { read(msr::IA32_VMX_VMFUNC) } else { 0 };
    VmxCaps::decode(&VmxMsrs {
        basic: read(msr::IA32_VMX_BASIC),
        procbased,
        procbased2,
        ept_vpid,
        misc: read(msr::IA32_VMX_MISC),
        vmfunc,
    })
}

/// [`capabilities`], read once (on the first call) and kept: for hot paths that only ask
/// which INVEPT/INVVPID kinds exist (the capability MSRs do not change, and every CPU the
/// hypervisor runs on reports the same ones).
pub fn capabilities_cached() -> &'static VmxCaps {
    static CAPS: spin::Once<VmxCaps> = spin::Once::new();
    CAPS.call_once(capabilities)
}

/// Applies the fixed-0/fixed-1 constraints to a CR0 or CR4 value (SDM Vol. 3 A.7, A.8).
fn fixed(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// Enters VMX root operation on this CPU and returns the VMXON region's address.
pub fn enable_on_this_cpu() -> Result<HostPhysAddr, VmxError> {
    if !cpu_has_vmx() {
        return Err(VmxError::NotSupported);
    }
    let feature_control = read(msr::IA32_FEATURE_CONTROL);
    if feature_control & FEATURE_CONTROL_LOCKED == 0 {
        // SAFETY: the MSR is unlocked, so it may be written; enabling VMX outside SMX and
        // locking is what the SDM prescribes (§23.7).
        unsafe {
            wrmsr(msr::IA32_FEATURE_CONTROL, feature_control | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMX_OUTSIDE_SMX)
        };
    } else if feature_control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }

    let caps = capabilities();
    let region = memory::alloc_zeroed_frame().ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the frame was just allocated for this CPU and is identity-mapped; the first
    // dword of a VMXON region holds the VMCS revision identifier (SDM §24.11.5).
    unsafe { (region.as_u64() as *mut u32).write_volatile(caps.vmcs_revision) };

    // SAFETY: CR0/CR4 are changed only to satisfy the VMX fixed bits (plus CR4.VMXE); the
    // boot code already set PE, PG and NE, which are among the fixed-1 bits.
    unsafe {
        let cr0 = fixed(
            x86::controlregs::cr0().bits() as u64,
            read(msr::IA32_VMX_CR0_FIXED0),
            read(msr::IA32_VMX_CR0_FIXED1),
        );
        asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
        let cr4 = fixed(
            x86::controlregs::cr4().bits() as u64 | CR4_VMXE,
            read(msr::IA32_VMX_CR4_FIXED0),
            read(msr::IA32_VMX_CR4_FIXED1),
        );
        asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags));
    }

    let (fail_invalid, fail_valid): (u8, u8);
    let operand = region.as_u64();
    // SAFETY: CR4.VMXE is set, the fixed bits hold, and the operand is the physical address
    // of a zeroed, 4 KiB-aligned region carrying the revision id. The flags are read in
    // the same asm block as VMXON.
    unsafe {
        asm!(
            "vmxon [{op}]",
            "setc {invalid}",
            "setz {valid}",
            op = in(reg) &operand,
            invalid = out(reg_byte) fail_invalid,
            valid = out(reg_byte) fail_valid,
            options(nostack),
        );
    }
    if fail_invalid != 0 || fail_valid != 0 {
        memory::free_frame(region);
        return Err(VmxError::VmxonFailed { fail_valid: fail_valid != 0 });
    }
    tlb::flush_everything(&caps);
    Ok(region)
}
