//! Extended processor state (x87, SSE, AVX, ... through XSAVE; SDM Vol. 1 §13): enabling
//! it in the host, and saving and restoring a guest's state and XCR0 when guests share a
//! CPU. VMX switches neither XCR0 nor the XSAVE components, so the hypervisor must.

use core::arch::asm;

use x86::cpuid::CpuId;

use crate::memory::{self, HostPhysAddr, PAGE_SIZE};

const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 with x87 only: the architectural reset value, and what a guest starts with.
pub const XCR0_RESET: u64 = 1;

/// Tells whether the CPU has XSAVE.
pub fn supported() -> bool {
    CpuId::new().get_feature_info().is_some_and(|f| f.has_xsave())
}

/// Returns the XCR0 bits the CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
pub fn supported_xcr0() -> u64 {
    let r = core::arch::x86_64::__cpuid_count(0xD, 0);
    (u64::from(r.edx) << 32) | u64::from(r.eax)
}

/// Sets CR4.OSXSAVE on this CPU so XSAVE, XRSTOR and XSETBV work. Returns false without
/// XSAVE.
pub fn enable_on_this_cpu() -> bool {
    if !supported() {
        return false;
    }
    // SAFETY: CPUID reported XSAVE, so CR4.OSXSAVE may be set; it changes no Rust state.
    unsafe {
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        asm!("mov cr4, {}", in(reg) cr4 | CR4_OSXSAVE, options(nomem, nostack));
    }
    true
}

/// Checks a value a guest wants in XCR0 (SDM Vol. 1 §13.3): x87 always set, AVX only
/// with SSE, the AVX-512 components together and only with AVX, and nothing the CPU lacks.
pub fn valid_xcr0(value: u64) -> bool {
    let avx512 = 0b111 << 5;
    value & 1 != 0
        && value & !supported_xcr0() == 0
        && (value & 4 == 0 || value & 2 != 0)
        && (value & avx512 == 0 || (value & avx512 == avx512 && value & 4 != 0))
}

/// Writes XCR0.
///
/// # Safety
/// `value` must pass `valid_xcr0`, and CR4.OSXSAVE must be set.
pub unsafe fn set_xcr0(value: u64) {
    // SAFETY: the caller guarantees a valid value and OSXSAVE.
    unsafe { asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack)) }
}

/// One guest's saved extended state and XCR0.
#[derive(Debug)]
pub struct ExtendedState {
    area: HostPhysAddr,
    pages: usize,
    xcr0: u64,
}

impl ExtendedState {
    /// Allocates a zeroed save area (the initial state: XSTATE_BV = 0 means every
    /// component in its reset state) for all supported components.
    pub fn new() -> Option<Self> {
        let size = core::arch::x86_64::__cpuid_count(0xD, 0).ecx as u64;
        let pages = size.div_ceil(PAGE_SIZE).max(1) as usize;
        let area = memory::alloc_frames(pages)?;
        // SAFETY: freshly allocated, identity-mapped frames owned by this state.
        unsafe { core::ptr::write_bytes(area.as_u64() as *mut u8, 0, pages * PAGE_SIZE as usize) };
        Some(Self { area, pages, xcr0: XCR0_RESET })
    }

    /// Records and loads a new guest XCR0 (after `valid_xcr0`).
    pub fn set_guest_xcr0(&mut self, value: u64) {
        self.xcr0 = value;
        // SAFETY: the caller validated the value; the guest's XCR0 is live while it runs.
        unsafe { set_xcr0(value) };
    }

    /// Loads the guest's XCR0 and extended state onto this CPU (before its slice).
    pub fn restore(&self) {
        // SAFETY: the area is this guest's 64-byte-aligned save area, written only by
        // XSAVE or zeroed; XCR0 was validated when the guest set it.
        unsafe {
            set_xcr0(self.xcr0);
            asm!("xrstor64 [{}]", in(reg) self.area.as_u64(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        }
    }

    /// Saves the guest's extended state from this CPU (after its slice).
    pub fn save(&mut self) {
        // SAFETY: as for `restore`; XCR0 is still the guest's.
        unsafe {
            asm!("xsave64 [{}]", in(reg) self.area.as_u64(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        }
    }
}

impl Drop for ExtendedState {
    fn drop(&mut self) {
        memory::free_frames(self.area, self.pages);
    }
}
