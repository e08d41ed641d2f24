//! Ending a run: the emulator exit ports, ACPI power-off, and a clean halt otherwise.

use core::arch::asm;

use crate::arch::port::{outb, outw};
use crate::console::emergency_line;

/// Bochs leaves when the string `Shutdown` is written to this port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
/// QEMU `-device isa-debug-exit,iobase=0xf4,iosize=4` exits with (value << 1) | 1.
const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;
/// PIIX4 power-management control (PM base 0xB000 in Bochs and QEMU's i440fx) and the
/// ICH9 one of QEMU's q35: SLP_TYP 0 | SLP_EN.
const ACPI_PM1A_CONTROL_PORTS: [u16; 2] = [0xB004, 0x604];
const ACPI_SLEEP_S5: u16 = 0x2000;

/// How a run ended, for the emulator's exit status where it has one (QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success,
    Failure,
}

/// Prints `nk: shutdown (<reason>)`, asks the emulator or the machine to power off, and
/// halts this CPU if nothing did.
pub fn shutdown(status: ExitStatus, reason: &str) -> ! {
    emergency_line(log::Level::Info, "nk", format_args!("shutdown ({reason})"));
    crate::console::flush();
    for byte in b"Shutdown" {
        outb(BOCHS_SHUTDOWN_PORT, *byte);
    }
    outb(QEMU_DEBUG_EXIT_PORT, if status == ExitStatus::Success { 0 } else { 1 });
    for port in ACPI_PM1A_CONTROL_PORTS {
        outw(port, ACPI_SLEEP_S5);
    }
    halt_forever()
}

/// Stops the machine dead, as a power cut (NVRAM crash tests): prints one `nvram:` line
/// with `what`, then asks the emulator to exit at once, without the `nk: shutdown` line or
/// anything else an orderly shutdown does. The caller holds the NVRAM device's lock, so no
/// other CPU writes the device while this one stops.
pub fn power_cut(what: core::fmt::Arguments<'_>) -> ! {
    emergency_line(log::Level::Warn, "nvram", what);
    crate::console::flush();
    for byte in b"Shutdown" {
        outb(BOCHS_SHUTDOWN_PORT, *byte);
    }
    outb(QEMU_DEBUG_EXIT_PORT, 1);
    for port in ACPI_PM1A_CONTROL_PORTS {
        outw(port, ACPI_SLEEP_S5);
    }
    halt_forever()
}

/// Stops the machine after a fatal error in the hypervisor.
pub fn stop_machine(reason: &str) -> ! {
    emergency_line(log::Level::Error, "exception", format_args!("machine stopped"));
    shutdown(ExitStatus::Failure, reason)
}

/// Halts this CPU with interrupts off, for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt at CPL0 parks the CPU; only NMI/INIT/SMI can wake it, and the
        // loop parks it again.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
