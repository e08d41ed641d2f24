//! The CPUID a guest sees: the host's answer with VMX hidden, the hypervisor bit and leaf
//! range added, and every feature cleared whose instructions the VMCS makes fault.
//!
//! With an "enable ..." secondary processor-based control at 0, the instruction it governs
//! raises #UD in VMX non-root operation (SDM Vol. 3 §25.6.2, Table 25-7, and §26.3): a guest
//! told by CPUID that the feature exists would crash on it. [`guest_cpuid`] is a pure
//! function of the host's registers so that the host tests cover every leaf.

/// Secondary processor-based VM-execution controls that enable an instruction (SDM Vol. 3
/// Table 25-7); a clear bit makes the instruction #UD.
pub mod enable {
    /// "Enable RDTSCP" (bit 3): RDTSCP and RDPID.
    pub const RDTSCP: u32 = 1 << 3;
    /// "Enable INVPCID" (bit 12).
    pub const INVPCID: u32 = 1 << 12;
    /// "Enable XSAVES/XRSTORS" (bit 20).
    pub const XSAVES: u32 = 1 << 20;
    /// "Enable user wait and pause" (bit 26): TPAUSE, UMONITOR, UMWAIT.
    pub const USER_WAIT_PAUSE: u32 = 1 << 26;
    /// "Enable PCONFIG" (bit 27).
    pub const PCONFIG: u32 = 1 << 27;
}

/// The registers of one CPUID answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The hypervisor's CPUID leaf range signature (leaf 0x40000000, EBX:ECX:EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"NullKernelHV";

/// A feature bit the guest must not see unless `control` is set in the secondary controls.
struct Gated {
    leaf: u32,
    subleaf: Option<u32>,
    register: Register,
    bit: u32,
    control: u32,
}

#[derive(Clone, Copy)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Every CPUID feature bit gated by an "enable" control (SDM Vol. 2A, CPUID, Table 3-8).
const GATED: [Gated; 7] = [
    // CPUID.80000001H:EDX.RDTSCP[27].
    Gated { leaf: 0x8000_0001, subleaf: None, register: Register::Edx, bit: 27, control: enable::RDTSCP },
    // CPUID.(EAX=07H,ECX=0):ECX.RDPID[22]: RDPID is #UD with "enable RDTSCP" clear (§26.3).
    Gated { leaf: 7, subleaf: Some(0), register: Register::Ecx, bit: 22, control: enable::RDTSCP },
    // CPUID.(EAX=07H,ECX=0):EBX.INVPCID[10].
    Gated { leaf: 7, subleaf: Some(0), register: Register::Ebx, bit: 10, control: enable::INVPCID },
    // CPUID.(EAX=07H,ECX=0):ECX.WAITPKG[5].
    Gated { leaf: 7, subleaf: Some(0), register: Register::Ecx, bit: 5, control: enable::USER_WAIT_PAUSE },
    // CPUID.(EAX=07H,ECX=0):EDX.PCONFIG[18].
    Gated { leaf: 7, subleaf: Some(0), register: Register::Edx, bit: 18, control: enable::PCONFIG },
    // CPUID.(EAX=0DH,ECX=1):EAX.XSAVES[3].
    Gated { leaf: 0xD, subleaf: Some(1), register: Register::Eax, bit: 3, control: enable::XSAVES },
    // CPUID.(EAX=0DH,ECX=1):ECX: the IA32_XSS components, usable only through XSAVES.
    Gated { leaf: 0xD, subleaf: Some(1), register: Register::Ecx, bit: u32::MAX, control: enable::XSAVES },
];

/// Answers CPUID leaf `leaf`/`subleaf` for a guest from the host's answer `host`:
/// - leaf 1: VMX (ECX bit 5) cleared, the hypervisor bit (ECX bit 31) set, OSXSAVE (ECX
///   bit 27) following the guest's own CR4.OSXSAVE (`guest_osxsave`);
/// - leaves 0x40000000-0x4FFFFFFF: the hypervisor's signature, nothing else;
/// - every feature of [`GATED`] cleared unless `secondary` (the secondary processor-based
///   controls in force, 0 when they are not activated) enables it.
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: CpuidRegs, guest_osxsave: bool, secondary: u32) -> CpuidRegs {
    if leaf == 0x4000_0000 {
        let word = |i: usize| {
            let b = &HYPERVISOR_SIGNATURE[i..i + 4];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        return CpuidRegs { eax: 0x4000_0000, ebx: word(0), ecx: word(4), edx: word(8) };
    }
    if (0x4000_0001..0x5000_0000).contains(&leaf) {
        return CpuidRegs::default();
    }
    let mut regs = host;
    if leaf == 1 {
        let osxsave = if guest_osxsave { 1 << 27 } else { 0 };
        regs.ecx = (regs.ecx & !(1 << 5) & !(1 << 27)) | (1 << 31) | osxsave;
    }
    for gated in GATED.iter().filter(|g| g.leaf == leaf && g.subleaf.is_none_or(|s| s == subleaf)) {
        if secondary & gated.control != 0 {
            continue;
        }
        let mask = if gated.bit == u32::MAX { u32::MAX } else { 1 << gated.bit };
        let register = match gated.register {
            Register::Eax => &mut regs.eax,
            Register::Ebx => &mut regs.ebx,
            Register::Ecx => &mut regs.ecx,
            Register::Edx => &mut regs.edx,
        };
        *register &= !mask;
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CpuidRegs = CpuidRegs { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };

    #[test]
    fn disabled_controls_hide_their_features() {
        let leaf7 = guest_cpuid(7, 0, ALL, false, 0);
        assert_eq!(leaf7.ebx & (1 << 10), 0, "INVPCID");
        assert_eq!(leaf7.ecx & (1 << 5), 0, "WAITPKG");
        assert_eq!(leaf7.ecx & (1 << 22), 0, "RDPID");
        assert_eq!(leaf7.edx & (1 << 18), 0, "PCONFIG");
        assert_eq!(leaf7.eax, u32::MAX);
        assert_eq!(guest_cpuid(0x8000_0001, 0, ALL, false, 0).edx & (1 << 27), 0, "RDTSCP");
        let xsave = guest_cpuid(0xD, 1, ALL, false, 0);
        assert_eq!((xsave.eax & (1 << 3), xsave.ecx), (0, 0), "XSAVES and IA32_XSS");
        // Subleaf 0 of leaf 7 only; other subleaves keep their bits.
        assert_eq!(guest_cpuid(7, 1, ALL, false, 0), ALL);
        assert_eq!(guest_cpuid(0xD, 0, ALL, false, 0), ALL);
    }

    #[test]
    fn enabled_controls_keep_their_features() {
        let all = enable::RDTSCP | enable::INVPCID | enable::XSAVES | enable::USER_WAIT_PAUSE | enable::PCONFIG;
        for (leaf, subleaf) in [(7, 0), (0x8000_0001, 0), (0xD, 1)] {
            assert_eq!(guest_cpuid(leaf, subleaf, ALL, false, all), ALL, "{leaf:#x}");
        }
        let only_rdtscp = guest_cpuid(7, 0, ALL, false, enable::RDTSCP);
        assert_ne!(only_rdtscp.ecx & (1 << 22), 0);
        assert_eq!(only_rdtscp.ebx & (1 << 10), 0);
    }

    #[test]
    fn leaf_1_hides_vmx_and_mirrors_osxsave() {
        let plain = guest_cpuid(1, 0, CpuidRegs { ecx: 1 << 5 | 1 << 27, ..CpuidRegs::default() }, false, 0);
        assert_eq!(plain.ecx, 1 << 31);
        assert_eq!(guest_cpuid(1, 0, CpuidRegs::default(), true, 0).ecx, 1 << 31 | 1 << 27);
    }

    #[test]
    fn hypervisor_leaves() {
        let sig = guest_cpuid(0x4000_0000, 0, ALL, false, 0);
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&sig.ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
        bytes[8..].copy_from_slice(&sig.edx.to_le_bytes());
        assert_eq!((&bytes, sig.eax), (HYPERVISOR_SIGNATURE, 0x4000_0000));
        assert_eq!(guest_cpuid(0x4000_0001, 0, ALL, false, 0), CpuidRegs::default());
        assert_eq!(guest_cpuid(0x4FFF_FFFF, 0, ALL, false, 0), CpuidRegs::default());
        assert_eq!(guest_cpuid(0x5000_0000, 0, ALL, false, 0), ALL);
    }
}
