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

/// Adjusts a [`guest_cpuid`] answer for a guest OS on the virtual PC (LINUX-GUEST.md §3):
/// - leaf 0: at least leaf 0x16, so the OS reads the frequency leaves;
/// - leaf 1: the vCPU's APIC id and one logical CPU in EBX; MONITOR, DTES64, DS-CPL, EST,
///   TM2 and PDCM hidden in ECX, TSC-deadline set (the virtual APIC has it); MCE, MCA, DS,
///   ACPI and TM hidden in EDX (none of their MSRs exist);
/// - leaf 6: ARAT only (the APIC timer does not stop in C-states; no EPB, no HWP);
/// - leaf 7: TSC_ADJUST, and the speculation-control MSRs (IBRS/STIBP, L1D_FLUSH,
///   ARCH_CAPABILITIES, SSBD) hidden: the VM does not get them;
/// - leaf 0xA: no performance monitoring (Bochs reports v4 without the MSRs);
/// - leaves 0xB/0x1F: the vCPU's x2APIC id in EDX;
/// - leaf 0x15: crystal = TSC = `tsc_hz` (ratio 1/1), and leaf 0x16: `tsc_hz` in MHz, so the
///   OS's idea of the TSC and APIC-timer rate matches the tick source (under Bochs, the
///   emulator's instructions per second).
pub fn os_guest_cpuid(leaf: u32, subleaf: u32, answer: CpuidRegs, tsc_hz: u32, apic_id: u32) -> CpuidRegs {
    let mut r = answer;
    match leaf {
        0 => r.eax = r.eax.max(0x16),
        1 => {
            r.ebx = (r.ebx & 0xFFFF) | (1 << 16) | (apic_id << 24);
            r.ecx &= !((1 << 3) | (1 << 2) | (1 << 4) | (1 << 7) | (1 << 8) | (1 << 15));
            r.ecx |= 1 << 24;
            r.edx &= !((1 << 7) | (1 << 14) | (1 << 21) | (1 << 22) | (1 << 29));
        }
        6 => r = CpuidRegs { eax: 1 << 2, ..CpuidRegs::default() },
        7 if subleaf == 0 => {
            r.ebx &= !(1 << 1);
            r.edx &= !((1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31));
        }
        0xA => r = CpuidRegs::default(),
        0xB | 0x1F => r.edx = apic_id,
        0x15 => r = CpuidRegs { eax: 1, ebx: 1, ecx: tsc_hz, edx: 0 },
        0x16 => {
            let mhz = (tsc_hz / 1_000_000).max(1);
            r = CpuidRegs { eax: mhz, ebx: mhz, ecx: mhz, edx: 0 };
        }
        _ => {}
    }
    r
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

    #[test]
    fn os_guests_see_a_consistent_clock_and_their_apic() {
        let ips = 1_000_000;
        assert_eq!(os_guest_cpuid(0x15, 0, ALL, ips, 0), CpuidRegs { eax: 1, ebx: 1, ecx: ips, edx: 0 });
        assert_eq!(os_guest_cpuid(0x16, 0, ALL, ips, 0).eax, 1);
        assert_eq!(os_guest_cpuid(0x16, 0, ALL, 4_000_000, 0).ebx, 4);
        assert_eq!(os_guest_cpuid(0, 0, CpuidRegs { eax: 0xD, ..CpuidRegs::default() }, ips, 0).eax, 0x16);
        assert_eq!(os_guest_cpuid(0, 0, CpuidRegs { eax: 0x20, ..CpuidRegs::default() }, ips, 0).eax, 0x20);
        let l1 = os_guest_cpuid(1, 0, ALL, ips, 0);
        assert_eq!(l1.ebx >> 16, 1, "APIC id 0, one logical CPU");
        assert_eq!(l1.ecx & (1 << 3), 0, "no MONITOR");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.ecx & (1 << 21), 0, "x2APIC");
        assert_eq!(l1.edx & (1 << 14 | 1 << 7), 0, "no MCA/MCE");
        assert_eq!(os_guest_cpuid(6, 0, ALL, ips, 0), CpuidRegs { eax: 4, ..CpuidRegs::default() });
        assert_eq!(os_guest_cpuid(0xA, 0, ALL, ips, 0), CpuidRegs::default());
        assert_eq!(os_guest_cpuid(0xB, 1, ALL, ips, 0).edx, 0);
        assert_eq!(os_guest_cpuid(7, 0, ALL, ips, 0).edx & (1 << 29), 0, "no ARCH_CAPABILITIES");
        assert_eq!(os_guest_cpuid(7, 1, ALL, ips, 0), ALL);
    }
}
