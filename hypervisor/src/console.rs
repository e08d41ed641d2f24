//! The serial console: every log line goes to COM1 and to port 0xE9 (Bochs `port_e9_hack`,
//! QEMU `-debugcon`), in the format of docs/emulator-protocol.md:
//! `[cpu<N> <LEVEL>] <target>: <message>`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};
use spin::Mutex;

use crate::arch::port::{inb, outb};
use crate::percpu;

const COM1: u16 = 0x3F8;
const DEBUG_PORT_E9: u16 = 0xE9;

/// Serialises whole lines across CPUs, so lines from different CPUs never interleave.
static LINE_LOCK: Mutex<()> = Mutex::new(());
static COM1_PRESENT: AtomicBool = AtomicBool::new(false);
static MAX_LEVEL: AtomicU8 = AtomicU8::new(LevelFilter::Info as u8);

/// Initialises COM1 at 115200 8N1 (no interrupts) and installs the logger.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
                          // A UART answers its scratch register; a missing one reads back 0xFF.
    outb(COM1 + 7, 0x5A);
    COM1_PRESENT.store(inb(COM1 + 7) == 0x5A, Ordering::Relaxed);
    // A second call (never made) would only fail to replace the logger: nothing to undo.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Trace);
}

/// Sets the most verbose level that is printed (from the `log=` option).
pub fn set_level(level: LevelFilter) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

fn level_enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes raw bytes to both console devices.
fn put_bytes(bytes: &[u8]) {
    let com1 = COM1_PRESENT.load(Ordering::Relaxed);
    for &byte in bytes {
        outb(DEBUG_PORT_E9, byte);
        if com1 {
            // Wait (bounded) for the transmit holding register to empty.
            for _ in 0..100_000 {
                if inb(COM1 + 5) & 0x20 != 0 {
                    break;
                }
            }
            outb(COM1, byte);
        }
    }
}

/// Waits (bounded) until COM1 has sent every byte: an emulator that exits right after
/// loses what is still in the UART.
pub fn flush() {
    if COM1_PRESENT.load(Ordering::Relaxed) {
        for _ in 0..1_000_000 {
            if inb(COM1 + 5) & 0x40 != 0 {
                break;
            }
        }
    }
}

/// A `fmt::Write` sink that writes straight to the devices.
struct RawWriter;

impl Write for RawWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put_bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
/// Prints one line without the log prefix (the NKTEST protocol lines), atomically.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _guard = LINE_LOCK.lock();
    // RawWriter never fails.
    let _ = RawWriter.write_fmt(args);
    put_bytes(b"\n");
}

/// Prints one log-formatted line even if another CPU (or this one, interrupted) holds the
/// line lock: used by the exception path, which must never wait.
pub fn emergency_line(level: Level, target: &str, args: fmt::Arguments<'_>) {
    let _ = write_record(&mut RawWriter, level, target, args);
}

fn level_tag(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN ",
        Level::Info => "INFO ",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

fn write_record(out: &mut impl Write, level: Level, target: &str, args: fmt::Arguments<'_>) -> fmt::Result {
    // Module paths become their last segment: `nk_hypervisor::smp` prints as `smp`.
    let short_target = target.rsplit("::").next().unwrap_or(target);
    writeln!(out, "[cpu{} {}] {}: {}", percpu::current_index(), level_tag(level), short_target, args)
}

struct ConsoleLogger;

static LOGGER: ConsoleLogger = ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // gdbstub reports each packet it does not know at info level (gdb probes many):
        // shown from log=debug on.
        match metadata.target().starts_with("gdbstub") {
            true => level_enabled(metadata.level().max(Level::Debug)),
            false => level_enabled(metadata.level()),
        }
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let _guard = LINE_LOCK.lock();
        let _ = write_record(&mut RawWriter, record.level(), record.target(), *record.args());
    }

    fn flush(&self) {}
}
