//! Which MSRs a guest OS may use and where each one lives (LINUX-GUEST.md §3, "MSRs"):
//! in the VMCS guest-state area, in the processor while the VM's slice runs (switched
//! at slice boundaries), in the virtual local APIC, or as a value kept here. The
//! informational MSRs an OS reads get constant values consistent with the CPUID the VM
//! sees; every other MSR is #GP, as on a CPU without it (SDM Vol. 4).

/// Where an MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A VMCS guest-state field the processor loads at entry and saves at exit.
    Vmcs(VmcsMsr),
    /// The processor's own MSR, holding the VM's value during its slices (the hypervisor
    /// saves and restores it around them); the access is performed on the real MSR.
    Switched,
    /// IA32_APIC_BASE.
    ApicBase,
    /// IA32_TSC_DEADLINE.
    TscDeadline,
    /// The x2APIC registers 0x800-0x8FF.
    X2apic,
    /// Kept in [`MsrFile`].
    Emulated,
    /// Not available: #GP.
    Denied,
}

/// The MSRs that are VMCS guest-state fields (SDM Vol. 3 §25.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcsMsr {
    Efer,
    FsBase,
    GsBase,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    Pat,
    DebugCtl,
}

/// MSR numbers (SDM Vol. 4 table 2-2).
pub mod index {
    pub const TSC: u32 = 0x10;
    pub const FEATURE_CONTROL: u32 = 0x3A;
    pub const TSC_ADJUST: u32 = 0x3B;
    pub const UCODE_REV: u32 = 0x8B;
    pub const PLATFORM_INFO: u32 = 0xCE;
    pub const MTRRCAP: u32 = 0xFE;
    pub const MISC_FEATURES_ENABLES: u32 = 0x140;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1A0;
    pub const ENERGY_PERF_BIAS: u32 = 0x1B0;
    pub const APIC_BASE: u32 = 0x1B;
    pub const DEBUGCTL: u32 = 0x1D9;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2FF;
    pub const PERF_CAPABILITIES: u32 = 0x345;
    pub const TSC_DEADLINE: u32 = 0x6E0;
    pub const EFER: u32 = 0xC000_0080;
    pub const STAR: u32 = 0xC000_0081;
    pub const LSTAR: u32 = 0xC000_0082;
    pub const CSTAR: u32 = 0xC000_0083;
    pub const SFMASK: u32 = 0xC000_0084;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    pub const TSC_AUX: u32 = 0xC000_0103;
}

/// The MSRs switched at slice boundaries (the SYSCALL MSRs, KERNEL_GS_BASE for SWAPGS,
/// TSC_AUX for RDTSCP/RDPID).
pub const SWITCHED: [u32; 6] =
    [index::STAR, index::LSTAR, index::CSTAR, index::SFMASK, index::KERNEL_GS_BASE, index::TSC_AUX];

/// Returns where `msr` lives for a guest OS.
pub fn route(msr: u32) -> Route {
    use index::*;
    match msr {
        EFER => Route::Vmcs(VmcsMsr::Efer),
        FS_BASE => Route::Vmcs(VmcsMsr::FsBase),
        GS_BASE => Route::Vmcs(VmcsMsr::GsBase),
        SYSENTER_CS => Route::Vmcs(VmcsMsr::SysenterCs),
        SYSENTER_ESP => Route::Vmcs(VmcsMsr::SysenterEsp),
        SYSENTER_EIP => Route::Vmcs(VmcsMsr::SysenterEip),
        PAT => Route::Vmcs(VmcsMsr::Pat),
        DEBUGCTL => Route::Vmcs(VmcsMsr::DebugCtl),
        m if SWITCHED.contains(&m) => Route::Switched,
        APIC_BASE => Route::ApicBase,
        TSC_DEADLINE => Route::TscDeadline,
        0x800..=0x8FF => Route::X2apic,
        TSC
        | FEATURE_CONTROL
        | TSC_ADJUST
        | UCODE_REV
        | PLATFORM_INFO
        | MTRRCAP
        | MISC_FEATURES_ENABLES
        | MISC_ENABLE
        | ENERGY_PERF_BIAS
        | MTRR_DEF_TYPE
        | PERF_CAPABILITIES => Route::Emulated,
        _ => Route::Denied,
    }
}

/// Returns whether `value` is a valid IA32_EFER for the guest (SCE, LME, LMA, NXE only;
/// LMA is the processor's, so the caller keeps the current LMA).
pub fn efer_valid(value: u64) -> bool {
    value & !((1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)) == 0
}

/// Returns whether `value` is a valid IA32_PAT: each byte a memory type 0, 1, 4, 5, 6 or 7.
pub fn pat_valid(value: u64) -> bool {
    (0..8).all(|i| matches!((value >> (8 * i)) & 0xFF, 0 | 1 | 4 | 5 | 6 | 7))
}

/// The emulated MSRs of one vCPU.
#[derive(Clone, Debug)]
pub struct MsrFile {
    mtrr_def_type: u64,
    energy_perf_bias: u64,
}

impl Default for MsrFile {
    fn default() -> Self {
        Self::new()
    }
}

/// MISC_ENABLE: fast strings, BTS and PEBS unavailable (SDM Vol. 4 table 2-2).
const MISC_ENABLE_VALUE: u64 = 1 | (1 << 11) | (1 << 12);

impl MsrFile {
    /// Returns the file at reset: MTRRs enabled with write-back as the default type and no
    /// ranges, EPB "normal" (6).
    pub fn new() -> Self {
        Self { mtrr_def_type: 0xC06, energy_perf_bias: 6 }
    }

    /// Reads an emulated MSR; `tsc` is the current time stamp counter. None means #GP.
    pub fn read(&self, msr: u32, tsc: u64) -> Option<u64> {
        use index::*;
        Some(match msr {
            TSC => tsc,
            FEATURE_CONTROL => 1, // locked, VMX off in and outside SMX
            TSC_ADJUST | UCODE_REV | PLATFORM_INFO | MISC_FEATURES_ENABLES | PERF_CAPABILITIES => 0,
            MTRRCAP => 0, // no variable ranges, no fixed ranges, no WC
            MISC_ENABLE => MISC_ENABLE_VALUE,
            ENERGY_PERF_BIAS => self.energy_perf_bias,
            MTRR_DEF_TYPE => self.mtrr_def_type,
            _ => return None,
        })
    }

    /// Writes an emulated MSR. Returns false for #GP: read-only MSRs (except a write of
    /// the value they hold, and 0 to UCODE_REV, which an OS writes before reading it back),
    /// and reserved bits.
    pub fn write(&mut self, msr: u32, value: u64) -> bool {
        use index::*;
        match msr {
            UCODE_REV | TSC_ADJUST | MISC_FEATURES_ENABLES => value == 0,
            MISC_ENABLE => value == MISC_ENABLE_VALUE,
            ENERGY_PERF_BIAS if value <= 0xF => {
                self.energy_perf_bias = value;
                true
            }
            MTRR_DEF_TYPE if value & !0xCFF == 0 && matches!(value & 0xFF, 0 | 1 | 4 | 5 | 6) => {
                self.mtrr_def_type = value;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use index::*;

    #[test]
    fn linux_must_work_msrs_have_a_home() {
        for msr in [
            EFER,
            FS_BASE,
            GS_BASE,
            KERNEL_GS_BASE,
            STAR,
            LSTAR,
            CSTAR,
            SFMASK,
            SYSENTER_CS,
            SYSENTER_ESP,
            SYSENTER_EIP,
            TSC_AUX,
            PAT,
            APIC_BASE,
            TSC_DEADLINE,
            0x802,
            0x8FF,
        ] {
            assert_ne!(route(msr), Route::Denied, "{msr:#x}");
            assert_ne!(route(msr), Route::Emulated, "{msr:#x}");
        }
    }

    #[test]
    fn informational_msrs_read_consistently() {
        let f = MsrFile::new();
        assert_eq!(f.read(FEATURE_CONTROL, 0), Some(1), "locked, no VMX");
        assert_eq!(f.read(MISC_ENABLE, 0).map(|v| v & 1), Some(1));
        assert_eq!(f.read(MTRRCAP, 0), Some(0));
        assert_eq!(f.read(MTRR_DEF_TYPE, 0), Some(0xC06));
        assert_eq!(f.read(TSC, 1234), Some(1234));
        for msr in [UCODE_REV, PLATFORM_INFO, TSC_ADJUST, ENERGY_PERF_BIAS, PERF_CAPABILITIES, 0x140] {
            assert_eq!(route(msr), Route::Emulated);
            assert!(f.read(msr, 0).is_some());
        }
    }

    #[test]
    fn read_only_msrs_refuse_changes() {
        let mut f = MsrFile::new();
        assert!(f.write(UCODE_REV, 0));
        assert!(!f.write(UCODE_REV, 5));
        assert!(!f.write(FEATURE_CONTROL, 5), "locked");
        assert!(!f.write(PLATFORM_INFO, 0));
        assert!(!f.write(MISC_ENABLE, 0));
        assert!(f.write(MISC_ENABLE, f.read(MISC_ENABLE, 0).unwrap()));
        assert!(f.write(MTRR_DEF_TYPE, 0x800));
        assert_eq!(f.read(MTRR_DEF_TYPE, 0), Some(0x800));
        assert!(!f.write(MTRR_DEF_TYPE, 0x1000), "reserved bit");
        assert!(!f.write(MTRR_DEF_TYPE, 0xC02), "bad type");
        assert!(f.write(ENERGY_PERF_BIAS, 0));
        assert!(!f.write(ENERGY_PERF_BIAS, 0x10));
    }

    #[test]
    fn everything_else_is_denied() {
        for msr in [0x48, 0x10A, 0x179, 0x17A, 0x400, 0xC000_0104, 0x3A0, 0x480, 0x491, 0x9FF, 0xFFFF_FFFF] {
            assert_eq!(route(msr), Route::Denied, "{msr:#x}");
            assert_eq!(MsrFile::new().read(msr, 0), None);
        }
    }

    #[test]
    fn efer_and_pat_checks() {
        assert!(efer_valid(0xD01));
        assert!(!efer_valid(1 << 12), "SVME");
        assert!(pat_valid(0x0007_0406_0007_0406));
        assert!(!pat_valid(0x02));
    }
}
