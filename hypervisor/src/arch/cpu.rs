//! CPU identification through CPUID, summarised in one boot line, and sleeping until an
//! interrupt without losing a wake-up.

use alloc::string::String;
use core::fmt::Write;

use x86::cpuid::CpuId;

/// Returns "vendor brand, family/model/stepping, features" for the boot log.
pub fn cpu_summary() -> String {
    let cpuid = CpuId::new();
    let mut line = String::new();
    let vendor = cpuid.get_vendor_info();
    let _ = write!(line, "{}", vendor.as_ref().map_or("unknown vendor", |v| v.as_str()));
    if let Some(brand) = cpuid.get_processor_brand_string() {
        let _ = write!(line, " \"{}\"", brand.as_str().trim());
    }
    if let Some(info) = cpuid.get_feature_info() {
        let _ = write!(
            line,
            ", family {:#x} model {:#x} stepping {}",
            info.family_id(),
            info.model_id(),
            info.stepping_id()
        );
        let features = [
            (info.has_vmx(), "vmx"),
            (info.has_x2apic(), "x2apic"),
            (info.has_xsave(), "xsave"),
            (info.has_rdrand(), "rdrand"),
            (info.has_pcid(), "pcid"),
        ];
        line.push_str(", features:");
        for (present, name) in features {
            if present {
                let _ = write!(line, " {name}");
            }
        }
    }
    if cpuid.get_extended_feature_info().is_some_and(|f| f.has_rdseed()) {
        line.push_str(" rdseed");
    }
    if cpuid.get_extended_processor_and_feature_identifiers().is_some_and(|f| f.has_1gib_pages()) {
        line.push_str(" 1g-pages");
    }
    line
}

/// Halts until the next interrupt (a wake-up or doorbell IPI) unless `busy` finds work.
/// `busy` runs with interrupts off, and `sti; hlt` enables them only for the halt (the
/// instruction after `sti` still runs with them off), so an interrupt that comes after the
/// check ends the halt instead of being missed. Returns with interrupts off.
pub fn sleep_unless(busy: impl FnOnce() -> bool) {
    // SAFETY: only IF changes; host code runs with interrupts off anyway.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    if !busy() {
        // SAFETY: see above; the IDT handles the wake-up and spurious vectors.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}
