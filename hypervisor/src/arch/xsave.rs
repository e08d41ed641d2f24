//! Extended processor state (x87, SSE, AVX, ... through XSAVE; SDM Vol. 1 §13): enabling
//! it in the host, and switching a guest's state and XCR0 when guests share a CPU. VMX
//! switches neither XCR0 nor the XSAVE components, so the hypervisor must.
//!
//! Saving and restoring run with the *switch mask* in XCR0: every component the CPU
//! supports, whatever the guest enabled. A guest's XCR0 is loaded only for its slice. So a
//! guest's registers are switched even where its XCR0 lacks their component (XMM and MXCSR
//! are usable with CR4.OSFXSR and XCR0 = 1), and XSTATE_BV never holds a bit the XCR0 at
//! XRSTOR time lacks (XRSTOR's #GP, SDM Vol. 1 §13.8). A guest's area starts with
//! XSTATE_BV = 0, so its first XRSTOR puts every component in its initial state: a
//! component the guest enables later starts clean, never with another guest's values.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use nk_cpustate::xcr0;
use x86::cpuid::CpuId;

use crate::memory::{self, HostPhysAddr, PAGE_SIZE};

const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 with x87 only: the architectural reset value, and what a guest starts with.
pub const XCR0_RESET: u64 = xcr0::X87;
/// MXCSR's reset value (all exceptions masked), which XRSTOR loads from the area whenever
/// SSE or AVX is restored (SDM Vol. 1 §13.8.1), even with XSTATE_BV[1] = 0.
const MXCSR_RESET: u32 = 0x1F80;
const MXCSR_OFFSET: u64 = 24;

/// The XCR0 loaded while guests' state is saved and restored (0: not yet known).
static SWITCH_MASK: AtomicU64 = AtomicU64::new(0);

/// Tells whether the CPU has XSAVE.
pub fn supported() -> bool {
    CpuId::new().get_feature_info().is_some_and(|f| f.has_xsave())
}

/// Returns the XCR0 bits the CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
pub fn supported_xcr0() -> u64 {
    let r = core::arch::x86_64::__cpuid_count(0xD, 0);
    (u64::from(r.edx) << 32) | u64::from(r.eax)
}

/// Returns the XCR0 value the hypervisor saves and restores guests' state with.
fn switch_mask() -> u64 {
    match SWITCH_MASK.load(Ordering::Relaxed) {
        0 => {
            let mask = xcr0::switch_mask(supported_xcr0());
            SWITCH_MASK.store(mask, Ordering::Relaxed);
            mask
        }
        mask => mask,
    }
}

/// Returns the XCR0 guests' state is switched under and the bytes of its save area, for
/// the boot log.
pub fn switching() -> (u64, u32) {
    (switch_mask(), core::arch::x86_64::__cpuid_count(0xD, 0).ecx)
}

/// Sets CR4.OSXSAVE on this CPU so XSAVE, XRSTOR and XSETBV work, and loads the switch
/// mask into XCR0 (the host's XCR0 between guest slices). Returns false without XSAVE.
pub fn enable_on_this_cpu() -> bool {
    if !supported() {
        return false;
    }
    // SAFETY: CPUID reported XSAVE, so CR4.OSXSAVE may be set; it changes no Rust state.
    // The switch mask passes every XCR0 rule (nk_cpustate::xcr0::switch_mask).
    unsafe {
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        asm!("mov cr4, {}", in(reg) cr4 | CR4_OSXSAVE, options(nomem, nostack));
        set_xcr0(switch_mask());
    }
    true
}

/// Checks a value a guest wants in XCR0 against every rule of SDM Vol. 1 §13.3 and the
/// components this CPU supports; a value XSETBV would refuse is an error (a #GP for the
/// guest, never a host fault).
pub fn check_guest_xcr0(value: u64) -> Result<(), xcr0::Xcr0Error> {
    xcr0::check(value, switch_mask())
}

/// Writes XCR0.
///
/// # Safety
/// `value` must pass `check_guest_xcr0` (or be the switch mask), and CR4.OSXSAVE must be
/// set.
unsafe fn set_xcr0(value: u64) {
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
    /// Allocates a save area for every supported component (CPUID.(EAX=0DH,ECX=0):ECX,
    /// the size for all of them, where EBX is only for the XCR0 loaded now) holding the
    /// initial state: XSTATE_BV = 0 (every component in its reset state) and MXCSR's
    /// reset value.
    pub fn new() -> Option<Self> {
        let size = u64::from(core::arch::x86_64::__cpuid_count(0xD, 0).ecx);
        let pages = size.div_ceil(PAGE_SIZE).max(1) as usize;
        let area = memory::alloc_frames(pages)?;
        // SAFETY: freshly allocated, identity-mapped frames owned by this state; MXCSR
        // lies inside the legacy region at the start of the area.
        unsafe {
            core::ptr::write_bytes(area.as_u64() as *mut u8, 0, pages * PAGE_SIZE as usize);
            ((area.as_u64() + MXCSR_OFFSET) as *mut u32).write(MXCSR_RESET);
        }
        Some(Self { area, pages, xcr0: XCR0_RESET })
    }

    /// Records and loads a new guest XCR0 (after `check_guest_xcr0`) while the guest's
    /// slice runs.
    pub fn set_guest_xcr0(&mut self, value: u64) {
        self.xcr0 = value;
        // SAFETY: the caller checked the value; the guest's XCR0 is live while it runs.
        unsafe { set_xcr0(value) };
    }

    /// Loads the guest's extended state (with the switch mask in XCR0, as the host keeps
    /// it between slices), then the guest's XCR0, before its slice.
    pub fn restore(&self) {
        let mask = switch_mask();
        // SAFETY: the area is this guest's 64-byte-aligned save area, written only by
        // XSAVE under the same mask or initialised by `new`, so XRSTOR's header checks
        // hold; XCR0 is the switch mask here, and the guest's value was checked.
        unsafe {
            asm!("xrstor64 [{}]", in(reg) self.area.as_u64(), in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack));
            set_xcr0(self.xcr0);
        }
    }

    /// Saves the guest's extended state after its slice: loads the switch mask into XCR0
    /// first, so every component is saved whatever the guest's XCR0 holds, and leaves it
    /// there for the host.
    pub fn save(&mut self) {
        let mask = switch_mask();
        // SAFETY: the switch mask is a valid XCR0; the area is this guest's and large
        // enough for every component of the mask.
        unsafe {
            set_xcr0(mask);
            asm!("xsave64 [{}]", in(reg) self.area.as_u64(), in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack));
        }
    }
}

impl Drop for ExtendedState {
    fn drop(&mut self) {
        memory::free_frames(self.area, self.pages);
    }
}
