//! Checks that CPUID advertises no instruction the hypervisor's VMCS makes fault: with an
//! "enable" secondary control clear, RDTSCP/RDPID, INVPCID, XSAVES/XRSTORS, TPAUSE/UMWAIT
//! and PCONFIG raise #UD in the guest (SDM Vol. 3 §25.6.2, §26.3), so their CPUID bits must
//! be clear. The hypervisor enables none of those controls today.

use core::fmt::Write;

use nk_guest::println;

/// Prints `GTEST ok ring0/cpuid_matches_vmx_controls`, or the features still advertised.
pub fn check() {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    let max_extended = __cpuid(0x8000_0000).eax;
    let leaf7 = if max_leaf >= 7 { __cpuid_count(7, 0) } else { __cpuid_count(0, 0) };
    let xsave1 = if max_leaf >= 0xD { Some(__cpuid_count(0xD, 1)) } else { None };
    let ext1 = if max_extended >= 0x8000_0001 { __cpuid(0x8000_0001).edx } else { 0 };
    let found = [
        ("RDTSCP", ext1 & (1 << 27) != 0),
        ("RDPID", max_leaf >= 7 && leaf7.ecx & (1 << 22) != 0),
        ("INVPCID", max_leaf >= 7 && leaf7.ebx & (1 << 10) != 0),
        ("WAITPKG", max_leaf >= 7 && leaf7.ecx & (1 << 5) != 0),
        ("PCONFIG", max_leaf >= 7 && leaf7.edx & (1 << 18) != 0),
        ("XSAVES", xsave1.is_some_and(|r| r.eax & (1 << 3) != 0)),
        ("IA32_XSS components", xsave1.is_some_and(|r| r.ecx != 0)),
    ];
    if found.iter().all(|&(_, advertised)| !advertised) {
        println!("GTEST ok ring0/cpuid_matches_vmx_controls");
        return;
    }
    let mut names = crate::heapless_line::Line { bytes: [0; 96], len: 0 };
    for (name, _) in found.iter().filter(|&&(_, advertised)| advertised) {
        let _ = write!(names, "{name} ");
    }
    let names = core::str::from_utf8(&names.bytes[..names.len]).unwrap_or("?");
    println!("GTEST FAILED ring0/cpuid_matches_vmx_controls: advertised with the VMX control off: {names}");
}
