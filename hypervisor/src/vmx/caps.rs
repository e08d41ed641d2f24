//! VMX capability discovery from the IA32_VMX_* MSRs (SDM Vol. 3 Appendix A). Decoding is
//! pure: `VmxCaps::decode` takes the raw MSR values.

use core::fmt;

/// MSR numbers (SDM Vol. 4 Table 2-2).
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
}

/// The raw MSR values `VmxCaps` is decoded from.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmxMsrs {
    pub basic: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub ept_vpid: u64,
    pub misc: u64,
    pub vmfunc: u64,
}

/// What this CPU's VMX offers, as far as the hypervisor uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxCaps {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub vmcs_revision: u32,
    /// Bytes of the VMXON region and VMCS (bits 44:32).
    pub vmcs_size: u32,
    /// The TRUE_*_CTLS MSRs exist (bit 55).
    pub true_controls: bool,
    pub ept: bool,
    pub ept_4level: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub ept_ad: bool,
    pub ept_execute_only: bool,
    pub vpid: bool,
    /// INVEPT exists (IA32_VMX_EPT_VPID_CAP bit 20) with the single-context (bit 25) and
    /// all-context (bit 26) types (SDM Vol. 3 Appendix A.10).
    pub invept: bool,
    pub invept_single: bool,
    pub invept_all: bool,
    /// INVVPID exists (bit 32) with the single-context (bit 41) and all-context (bit 42)
    /// types.
    pub invvpid: bool,
    pub invvpid_single: bool,
    pub invvpid_all: bool,
    pub unrestricted_guest: bool,
    pub vmfunc_eptp_switching: bool,
    pub pml: bool,
    pub vmcs_shadowing: bool,
    pub xsaves: bool,
    /// The preemption timer counts down every 2^rate TSC ticks (IA32_VMX_MISC bits 4:0).
    pub preemption_timer_rate: u8,
}

const fn bit(value: u64, n: u32) -> bool {
    value & (1 << n) != 0
}

impl VmxCaps {
    /// Decodes the capability MSRs. A secondary control counts only if the primary
    /// "activate secondary controls" bit (31) may be set.
    pub fn decode(m: &VmxMsrs) -> Self {
        let secondary_allowed = bit(m.procbased, 32 + 31);
        let allowed2 = if secondary_allowed { m.procbased2 >> 32 } else { 0 };
        let ept = bit(allowed2, 1);
        let vpid = bit(allowed2, 5);
        let vmfunc = bit(allowed2, 13);
        Self {
            vmcs_revision: (m.basic & 0x7FFF_FFFF) as u32,
            vmcs_size: ((m.basic >> 32) & 0x1FFF) as u32,
            true_controls: bit(m.basic, 55),
            ept,
            ept_4level: ept && bit(m.ept_vpid, 6),
            ept_2m: ept && bit(m.ept_vpid, 16),
            ept_1g: ept && bit(m.ept_vpid, 17),
            ept_ad: ept && bit(m.ept_vpid, 21),
            ept_execute_only: ept && bit(m.ept_vpid, 0),
            vpid,
            invept: ept && bit(m.ept_vpid, 20),
            invept_single: ept && bit(m.ept_vpid, 20) && bit(m.ept_vpid, 25),
            invept_all: ept && bit(m.ept_vpid, 20) && bit(m.ept_vpid, 26),
            invvpid: vpid && bit(m.ept_vpid, 32),
            invvpid_single: vpid && bit(m.ept_vpid, 32) && bit(m.ept_vpid, 41),
            invvpid_all: vpid && bit(m.ept_vpid, 32) && bit(m.ept_vpid, 42),
            unrestricted_guest: bit(allowed2, 7),
            vmfunc_eptp_switching: vmfunc && bit(m.vmfunc, 0),
            pml: bit(allowed2, 17),
            vmcs_shadowing: bit(allowed2, 14),
            xsaves: bit(allowed2, 20),
            preemption_timer_rate: (m.misc & 0x1F) as u8,
        }
    }
}

impl fmt::Display for VmxCaps {
    /// Formats the one-line summary printed at boot.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VMCS rev {:#x} ({} bytes)", self.vmcs_revision, self.vmcs_size)?;
        if self.ept {
            write!(f, ", EPT[")?;
            let features = [
                (self.ept_4level, "4-level"),
                (self.ept_2m, "2M"),
                (self.ept_1g, "1G"),
                (self.ept_ad, "A/D"),
                (self.ept_execute_only, "X-only"),
            ];
            let mut first = true;
            for (present, name) in features {
                if present {
                    write!(f, "{}{}", if first { "" } else { " " }, name)?;
                    first = false;
                }
            }
            write!(f, "]")?;
        } else {
            write!(f, ", no EPT")?;
        }
        let flags = [
            (self.vpid, "VPID"),
            (self.invept_single, "INVEPT(single)"),
            (self.invept_all, "INVEPT(all)"),
            (self.invvpid_single, "INVVPID(single)"),
            (self.invvpid_all, "INVVPID(all)"),
            (self.unrestricted_guest, "unrestricted-guest"),
            (self.vmfunc_eptp_switching, "VMFUNC(EPTP)"),
            (self.pml, "PML"),
            (self.vmcs_shadowing, "VMCS-shadowing"),
            (self.xsaves, "XSAVES"),
            (self.true_controls, "true-controls"),
        ];
        for (present, name) in flags {
            if present {
                write!(f, ", {name}")?;
            }
        }
        write!(f, ", preemption timer TSC/2^{}", self.preemption_timer_rate)
    }
}
