//! Bringing up every CPU: the BSP's own descriptor tables and VMX, then each application
//! processor of the MADT through the real-mode trampoline and INIT-SIPI-SIPI
//! (SDM Vol. 3 §8.4.4). Each CPU gets its own stack, GDT, TSS with IST stacks (every stack
//! above an unmapped guard page), and per-CPU slot, executes VMXON and reports online.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::Platform;
use crate::arch::{apic, gdt, idt, pit};
use crate::memory::{self, PAGE_SIZE};
use crate::percpu::{self, MAX_CPUS};
use crate::{power, vmx};

/// Physical address the AP trampoline is copied to (a page below 1 MiB; the SIPI vector is
/// its page number). Must match AP_TRAMPOLINE_BASE in boot/src/entry.S.
pub const AP_TRAMPOLINE_BASE: u64 = 0x8000;
const AP_STACK_PAGES: usize = 16;
const IST_STACK_PAGES: usize = 2;
const IST_STACK_BYTES: usize = IST_STACK_PAGES * PAGE_SIZE as usize;
/// An IST stack with its guard page below it.
const IST_SLOT_BYTES: usize = IST_STACK_BYTES + PAGE_SIZE as usize;
/// How long the BSP waits for one AP to report online.
const AP_START_TIMEOUT_US: u64 = 2_000_000;

unsafe extern "C" {
    static nk_ap_trampoline_start: u8;
    static nk_ap_trampoline_end: u8;
    static nk_ap_trampoline_cr3: u8;
    static nk_ap_trampoline_stack: u8;
    static nk_ap_trampoline_cpu: u8;
    static nk_ap_trampoline_entry: u8;
}

/// The BSP's IST stacks, in .bss (the BSP needs them before the frame allocator exists),
/// each above its guard page (the first page of its slot, unmapped by `hostmap`).
#[repr(C, align(4096))]
struct BspIstStacks(UnsafeCell<[[u8; IST_SLOT_BYTES]; 3]>);

// SAFETY: only the BSP's CPU uses these stacks, and only through the TSS (no Rust
// references are ever made to their contents).
unsafe impl Sync for BspIstStacks {}

static BSP_IST_STACKS: BspIstStacks = BspIstStacks(UnsafeCell::new([[0; IST_SLOT_BYTES]; 3]));

/// Returns the guard pages under the BSP's IST stacks.
pub fn bsp_stack_guards() -> [u64; 3] {
    let base = BSP_IST_STACKS.0.get() as u64;
    [0, 1, 2].map(|i| base + i * IST_SLOT_BYTES as u64)
}

/// IST stack tops of each AP, written by the BSP before it starts that AP.
static AP_IST_TOPS: [[AtomicU64; 3]; MAX_CPUS] = [const { [const { AtomicU64::new(0) }; 3] }; MAX_CPUS];

/// Sets up the BSP's per-CPU slot, GDT, TSS and IDT. Runs first in `nk_main`.
pub fn init_bsp_early() {
    let slot = percpu::install(0);
    let base = BSP_IST_STACKS.0.get() as u64;
    let tops = [1, 2, 3].map(|i| base + i * IST_SLOT_BYTES as u64);
    let (gdt_ptr, tss_ptr) = slot.descriptor_tables();
    // SAFETY: slot 0 belongs to the BSP, which is the only CPU running; the IST stacks are
    // the BSP's own static stacks.
    unsafe { gdt::load(gdt_ptr, tss_ptr, tops) };
    idt::load();
    crate::arch::pic::remap_and_mask();
}

/// Enables the BSP's local APIC and VMX. Returns the VMX error if VMX is unusable.
pub fn init_bsp_vmx() -> Result<(), vmx::VmxError> {
    let slot = percpu::current();
    slot.set_apic_id(apic::init_local());
    let region = vmx::enable_on_this_cpu()?;
    slot.mark_vmx_root(region.as_u64());
    crate::arch::xsave::enable_on_this_cpu();
    report_online(slot);
    Ok(())
}

fn report_online(slot: &percpu::PerCpu) {
    log::info!(target: "smp", "cpu {} online (apic id {}), VMX root", slot.index(), slot.apic_id());
    slot.mark_online();
}

fn trampoline_field(field: &u8) -> *mut u64 {
    // SAFETY: both symbols are in the trampoline's section; their distance is the
    // field's offset inside the copy.
    let offset = field as *const u8 as u64 - unsafe { &nk_ap_trampoline_start as *const u8 as u64 };
    (AP_TRAMPOLINE_BASE + offset) as *mut u64
}

/// Copies the real-mode trampoline to `AP_TRAMPOLINE_BASE`.
fn install_trampoline() {
    // SAFETY: the linker places start before end in one section.
    let (start, end) = unsafe { (&nk_ap_trampoline_start as *const u8, &nk_ap_trampoline_end as *const u8) };
    let len = end as usize - start as usize;
    assert!(len <= PAGE_SIZE as usize, "AP trampoline larger than a page");
    // SAFETY: the page at AP_TRAMPOLINE_BASE is below 1 MiB, never handed out by the frame
    // allocator, not part of the image, and identity-mapped; `nk_main` checked that no boot
    // module or boot information lies there.
    unsafe { core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE_BASE as *mut u8, len) };
}

/// Starts every MADT processor other than the BSP, up to `limit` CPUs in all, one after
/// the other. Returns how many CPUs (the BSP included) were attempted.
pub fn start_aps(platform: &Platform, limit: usize) -> usize {
    install_trampoline();
    let bsp_apic = percpu::current().apic_id();
    // The hypervisor's tables (below 4 GiB: the trampoline loads CR3 in 32-bit mode).
    let cr3 = crate::hostmap::root();
    let mut attempted = 1;
    for cpu in platform.cpus().filter(|cpu| cpu.apic_id != bsp_apic) {
        if attempted >= limit.min(MAX_CPUS) {
            log::info!(target: "smp", "cpu limit {} reached: apic id {} and later stay off", limit, cpu.apic_id);
            break;
        }
        let index = attempted;
        attempted += 1;
        if let Err(why) = start_one(index, cpu.apic_id, cr3) {
            log::error!(target: "smp", "cpu {} (apic id {}) did not come up: {}", index, cpu.apic_id, why);
        }
    }
    crate::hostmap::seal_trampoline();
    attempted
}

fn start_one(index: usize, apic_id: u32, cr3: u64) -> Result<(), &'static str> {
    // Each stack's lowest page is its guard, unmapped before the AP ever runs.
    let stack = memory::alloc_frames(AP_STACK_PAGES).ok_or("no memory for its stack")?;
    crate::hostmap::unmap_guard(stack.as_u64())?;
    for top in &AP_IST_TOPS[index] {
        let ist = memory::alloc_frames(IST_STACK_PAGES + 1).ok_or("no memory for its IST stacks")?;
        crate::hostmap::unmap_guard(ist.as_u64())?;
        top.store(ist.as_u64() + IST_SLOT_BYTES as u64, Ordering::Release);
    }
    let stack_top = stack.as_u64() + AP_STACK_PAGES as u64 * PAGE_SIZE;
    // SAFETY: the trampoline copy is identity-mapped low memory only this BSP writes, and
    // no AP is running it now (APs are started one at a time).
    unsafe {
        trampoline_field(&nk_ap_trampoline_cr3).write_volatile(cr3);
        trampoline_field(&nk_ap_trampoline_stack).write_volatile(stack_top);
        trampoline_field(&nk_ap_trampoline_cpu).write_volatile(index as u64);
        trampoline_field(&nk_ap_trampoline_entry).write_volatile(nk_ap_main as *const () as usize as u64);
    }
    if !apic::start_ap(apic_id, (AP_TRAMPOLINE_BASE / PAGE_SIZE) as u8) {
        return Err("the local APIC did not deliver INIT/SIPI");
    }
    let slot = percpu::get(index).ok_or("no per-CPU slot")?;
    let mut waited = 0;
    while !slot.is_online() {
        if waited >= AP_START_TIMEOUT_US {
            return Err("timed out waiting for it to report online");
        }
        pit::wait_us(1_000);
        waited += 1_000;
    }
    Ok(())
}

/// The Rust entry of every application processor (called by the trampoline on the stack
/// the BSP allocated for it).
extern "C" fn nk_ap_main(index: u64) -> ! {
    let index = index as usize;
    let slot = percpu::install(index);
    let tops = [0, 1, 2].map(|i| AP_IST_TOPS[index][i].load(Ordering::Acquire));
    let (gdt_ptr, tss_ptr) = slot.descriptor_tables();
    // SAFETY: slot `index` belongs to this AP alone; its IST stacks were allocated for it.
    unsafe { gdt::load(gdt_ptr, tss_ptr, tops) };
    idt::load();
    slot.set_apic_id(apic::init_local());
    match vmx::enable_on_this_cpu() {
        Ok(region) => {
            slot.mark_vmx_root(region.as_u64());
            crate::arch::xsave::enable_on_this_cpu();
            report_online(slot);
            crate::sched::ap_idle(index)
        }
        Err(why) => {
            log::error!(target: "smp", "cpu {} (apic id {}): VMX unusable: {}", index, slot.apic_id(), why);
            slot.mark_online();
        }
    }
    power::halt_forever()
}
