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
