//! The local APIC in xAPIC mode (SDM Vol. 3 §11.4-§11.6): enabling it, its id, and the
//! INIT-SIPI-SIPI sequence that starts application processors (SDM Vol. 3 §8.4.4.1).

use core::sync::atomic::{AtomicU64, Ordering};

use super::pit::wait_us;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xB0;
const REG_SPURIOUS: usize = 0xF0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;

const SPURIOUS_VECTOR: u32 = 0xFF;
const SOFTWARE_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;

static MMIO_BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);

fn read_msr(msr: u32) -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC (all x86-64 CPUs).
    unsafe { x86::msr::rdmsr(msr) }
}

fn register(offset: usize) -> *mut u32 {
    (MMIO_BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: the APIC page is identity-mapped uncached by the boot page tables (top GiB)
    // and `offset` is an architectural, 16-byte aligned register.
    unsafe { register(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as for `read`.
    unsafe { register(offset).write_volatile(value) }
}

/// Enables this CPU's local APIC (globally and in software) and returns its id.
pub fn init_local() -> u32 {
    let base = read_msr(IA32_APIC_BASE);
    MMIO_BASE.store(base & APIC_BASE_ADDRESS_MASK, Ordering::Relaxed);
    if base & APIC_GLOBAL_ENABLE == 0 {
        // SAFETY: setting the global enable bit of this CPU's own APIC base MSR keeps the
        // base address unchanged.
        unsafe { x86::msr::wrmsr(IA32_APIC_BASE, base | APIC_GLOBAL_ENABLE) }
    }
    write(REG_SPURIOUS, SOFTWARE_ENABLE | SPURIOUS_VECTOR);
    id()
}

/// Returns this CPU's local APIC id.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

fn wait_icr_idle() -> bool {
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn send_ipi(apic_id: u32, command: u32) -> bool {
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, command);
    wait_icr_idle()
}

/// Signals the end of the interrupt being handled.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

/// Wakes CPU `apic_id` from `hlt` with the wake-up IPI (fixed delivery).
pub fn send_wakeup(apic_id: u32) -> bool {
    send_ipi(apic_id, ICR_LEVEL_ASSERT | super::idt::vector::WAKEUP as u32)
}

/// Sends INIT, then two STARTUP IPIs for the real-mode code at `trampoline_page * 4096`.
/// Returns false if the APIC never accepted one of them.
pub fn start_ap(apic_id: u32, trampoline_page: u8) -> bool {
    if !send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT) {
        return false;
    }
    wait_us(10_000);
    for _ in 0..2 {
        if !send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | u32::from(trampoline_page)) {
            return false;
        }
        wait_us(200);
    }
    true
}
