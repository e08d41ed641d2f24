//! x86-64 mechanisms: port I/O, descriptor tables, exceptions, the local APIC, timers and
//! CPU identification.

pub mod apic;
mod cpu;
mod entropy;
pub mod gdt;
pub mod idt;
pub mod pic;
pub mod pit;
pub mod port;
pub mod switched;
pub mod xsave;

pub use cpu::{cpu_summary, sleep_unless};
pub use entropy::HardwareEntropy;

/// Reads the time-stamp counter (in Bochs: emulated instructions).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

static TSC_HZ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Measures the TSC's rate against the PIT over 20 ms and keeps it (rounded to 100 kHz:
/// in Bochs it is exactly the emulator's instructions per second); call once, on the BSP,
/// while no other CPU uses the PIT. Returns the rate in Hz.
pub fn calibrate_tsc() -> u64 {
    let start = rdtsc();
    pit::wait_us(20_000);
    let ticks = rdtsc().wrapping_sub(start);
    let hz = ((ticks * 50 + 50_000) / 100_000 * 100_000).max(1_000_000);
    TSC_HZ.store(hz, core::sync::atomic::Ordering::Relaxed);
    hz
}

/// Returns the TSC's rate measured by [`calibrate_tsc`] (1 MHz before that).
pub fn tsc_hz() -> u64 {
    match TSC_HZ.load(core::sync::atomic::Ordering::Relaxed) {
        0 => 1_000_000,
        hz => hz,
    }
}
