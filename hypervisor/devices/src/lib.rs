//! The small virtual PC of guest-OS VMs, one device a file, each a safe state machine with
//! register-level `read`/`write` and host tests written from what the guest's drivers
//! (Linux's in particular) write and expect to read back:
//!
//! - [`uart16550`]: COM1, a 16550A whose output becomes console lines;
//! - [`lapic`]: the local APIC (x2APIC MSRs and the xAPIC register file, timer);
//! - [`pic8259`]: the 8259 pair for legacy IRQs (COM1 on IRQ 4);
//! - [`rtc`]: CMOS/RTC on 0x70/0x71;
//! - [`acpi_pm`] and [`i8042`]: the ports through which a guest powers off or resets;
//! - [`mmio`]: the MOV forms decoded for xAPIC accesses that exit fault-like;
//! - [`msr`]: which MSRs a guest OS gets, and the informational ones' values;
//! - [`acpi`]: the VM's ACPI tables (RSDP, XSDT, MADT, FADT, FACS, DSDT);
//! - [`pc`]: the board that routes ports to devices and picks the next interrupt;
//! - [`virtio_blk`]: a virtio-mmio block device over a backend (the block AM);
//! - [`startup`]: INIT and Start-Up IPIs between the vCPUs of an SMP guest (not wired yet).
//!
//! The hypervisor only decodes exits and calls these; it owns the VMCS and the timers.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod acpi_pm;
pub mod i8042;
pub mod lapic;
pub mod mmio;
pub mod msr;
pub mod pc;
pub mod pic8259;
pub mod rtc;
pub mod startup;
pub mod uart16550;
pub mod virtio_blk;
