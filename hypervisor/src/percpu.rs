//! Per-CPU data, reached through the GS base (IA32_GS_BASE) of each CPU.
//!
//! Every CPU's slot lives in one static array indexed by the CPU index the hypervisor
//! assigns (BSP = 0, APs in MADT order). A CPU writes its own slot's hardware structures
//! (GDT, TSS) only while it brings itself up; other CPUs read only the atomics.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::arch::gdt::{Gdt, Tss};

/// The most CPUs the hypervisor brings up.
pub const MAX_CPUS: usize = 32;

/// The data one CPU owns. `index` must stay the first field: `current_index` reads it at
/// GS:0.
#[repr(C)]
pub struct PerCpu {
    index: u32,
    apic_id: AtomicU32,
    online: AtomicBool,
    vmx_root: AtomicBool,
    /// Physical address of this CPU's VMXON region (0 until VMXON succeeded).
    vmxon_region: AtomicU64,
    gdt: UnsafeCell<Gdt>,
    tss: UnsafeCell<Tss>,
}

// SAFETY: the UnsafeCell fields (GDT, TSS) are written only by the CPU that owns the slot,
// during its own bring-up, before it loads them; nothing else reads them through Rust
// references. All other fields are atomics.
unsafe impl Sync for PerCpu {}

impl PerCpu {
    const fn new(index: u32) -> Self {
        Self {
            index,
            apic_id: AtomicU32::new(u32::MAX),
            online: AtomicBool::new(false),
            vmx_root: AtomicBool::new(false),
            vmxon_region: AtomicU64::new(0),
            gdt: UnsafeCell::new(Gdt::new()),
            tss: UnsafeCell::new(Tss::new()),
        }
    }

    /// Returns the hypervisor's index of this CPU.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Returns the local APIC id recorded when this CPU came up.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Acquire)
    }

    /// Tells whether this CPU finished its bring-up.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Tells whether this CPU executed VMXON successfully.
    pub fn in_vmx_root(&self) -> bool {
        self.vmx_root.load(Ordering::Acquire)
    }

    #[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
    /// Returns the physical address of this CPU's VMXON region, if it is in VMX root.
    pub fn vmxon_region(&self) -> Option<u64> {
        match self.vmxon_region.load(Ordering::Acquire) {
            0 => None,
            paddr => Some(paddr),
        }
    }

    pub(crate) fn set_apic_id(&self, apic_id: u32) {
        self.apic_id.store(apic_id, Ordering::Release);
    }

    pub(crate) fn mark_online(&self) {
        self.online.store(true, Ordering::Release);
    }

    pub(crate) fn mark_vmx_root(&self, vmxon_region: u64) {
        self.vmxon_region.store(vmxon_region, Ordering::Release);
        self.vmx_root.store(true, Ordering::Release);
    }

    /// Returns raw pointers to this CPU's GDT and TSS for `arch::gdt::load`.
    pub(crate) fn descriptor_tables(&self) -> (*mut Gdt, *mut Tss) {
        (self.gdt.get(), self.tss.get())
    }
}

static CPUS: [PerCpu; MAX_CPUS] = {
    let mut cpus = [const { PerCpu::new(0) }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        cpus[i] = PerCpu::new(i as u32);
        i += 1;
    }
    cpus
};

const IA32_GS_BASE: u32 = 0xC000_0101;

/// Points this CPU's GS base at slot `index`. Called first thing on every CPU, before
/// anything logs.
pub fn install(index: usize) -> &'static PerCpu {
    let slot = &CPUS[index];
    let addr = slot as *const PerCpu as u64;
    // SAFETY: writing IA32_GS_BASE at CPL0 only changes where GS-relative loads go; the
    // address is a 'static PerCpu whose first field is the u32 index `current_index` reads.
    unsafe {
        asm!("wrmsr", in("ecx") IA32_GS_BASE, in("eax") addr as u32, in("edx") (addr >> 32) as u32,
             options(nostack, preserves_flags));
    }
    slot
}

/// Returns the index of the CPU this code runs on.
pub fn current_index() -> u32 {
    let index: u32;
    // SAFETY: every CPU installs its GS base (`install`) before any code that calls this
    // runs; GS:0 is then the `index` field of its 'static PerCpu.
    unsafe { asm!("mov {:e}, gs:[0]", out(reg) index, options(nostack, preserves_flags, readonly)) }
    index
}

/// Returns this CPU's slot.
pub fn current() -> &'static PerCpu {
    &CPUS[current_index() as usize]
}

/// Returns the slot of CPU `index`.
pub fn get(index: usize) -> Option<&'static PerCpu> {
    CPUS.get(index)
}

/// Iterates over every slot.
pub fn all() -> impl Iterator<Item = &'static PerCpu> {
    CPUS.iter()
}
