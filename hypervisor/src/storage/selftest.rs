//! In-emulator cases for the durable device (test build): one boot writes numbered units,
//! a later boot on the same disk reads them back. With `nvram-crash-after=<k>` the writing
//! boot is cut after its k-th device write, and the reading boot must find exactly units
//! 1..k, each whole (a unit is all old or all new), and nothing after.

use alloc::format;
use alloc::string::String;

use nk_am::MEDIA_UNIT;

use super::with_media;
use crate::console::print_line;

/// The units written, one device write each: two to a 512-byte sector, so every other
/// write is a read-modify-write of a sector that already holds a written unit.
pub const UNITS: u64 = 16;

/// The bytes unit `index` (0-based) holds once written: no byte is zero and no two units
/// agree, so a torn or misplaced unit shows.
fn pattern(index: u64) -> [u8; MEDIA_UNIT as usize] {
    let mut unit = [0u8; MEDIA_UNIT as usize];
    for (offset, byte) in unit.iter_mut().enumerate() {
        *byte = ((index as usize * 37 + offset * 11) % 255 + 1) as u8;
    }
    unit
}

/// Writes units 0..UNITS in order, each followed by a fence; prints what one write and
/// one fence cost in TSC ticks (emulated instructions in Bochs).
pub fn write_units() -> Result<(), String> {
    with_media(|media| {
        let mut write_ticks = 0u64;
        let mut fence_ticks = 0u64;
        for index in 0..UNITS {
            let unit = pattern(index);
            let started = crate::arch::rdtsc();
            media.write(index * MEDIA_UNIT, &unit).map_err(|why| format!("write of unit {index}: {why:?}"))?;
            let written = crate::arch::rdtsc();
            media.fence().map_err(|why| format!("fence after unit {index}: {why:?}"))?;
            write_ticks += written - started;
            fence_ticks += crate::arch::rdtsc() - written;
        }
        Ok((write_ticks / UNITS, fence_ticks / UNITS))
    })
    .unwrap_or_else(|| Err("no NVRAM device".into()))
    .map(|(write, fence)| {
        let stats = super::stats().unwrap_or_default();
        print_line(format_args!(
            "nvram: wrote {UNITS} units; per 256-byte write {write} TSC ticks, per fence {fence} TSC ticks; \
             device totals: {} sector writes, {} fences, {} bytes",
            stats.sector_writes, stats.fences, stats.bytes_written
        ));
    })
}

/// Reads units 0..UNITS: a prefix must hold its patterns and the rest be zero, every unit
/// whole; prints `nvram: restored <m> of 16 units`.
pub fn check_units() -> Result<(), String> {
    with_media(|media| {
        let mut restored = 0;
        for index in 0..UNITS {
            let mut unit = [0u8; MEDIA_UNIT as usize];
            media.read(index * MEDIA_UNIT, &mut unit).map_err(|why| format!("read of unit {index}: {why:?}"))?;
            let written = unit == pattern(index);
            let zero = unit.iter().all(|b| *b == 0);
            if !written && !zero {
                return Err(format!("unit {index} is torn or foreign: starts {:02x?}", &unit[..8]));
            }
            if written && restored != index {
                return Err(format!("unit {index} was written but unit {restored} was not: not a prefix"));
            }
            if written {
                restored += 1;
            }
        }
        print_line(format_args!("nvram: restored {restored} of {UNITS} units"));
        Ok(())
    })
    .unwrap_or_else(|| Err("no NVRAM device".into()))
}

/// Passes when the machine has no NVRAM device (a scenario without a disk).
pub fn absent() -> Result<(), String> {
    match with_media(|media| alloc::string::ToString::to_string(media.describe())) {
        None => Ok(()),
        Some(description) => Err(format!("a device was found: {description}")),
    }
}
