//! x86-64 mechanisms: port I/O, descriptor tables, exceptions, the local APIC, timers and
//! CPU identification.

pub mod apic;
mod cpu;
mod entropy;
pub mod gdt;
pub mod idt;
pub mod pit;
pub mod port;

pub use cpu::cpu_summary;
pub use entropy::HardwareEntropy;
