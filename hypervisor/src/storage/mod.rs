//! The durable device under the NVRAM AM (issue 12, "Durable device behind one
//! interface"), chosen once at boot and named in the boot log by one `nvram: device:`
//! line. Today that is emulated NVRAM: a DRAM mirror of the durable area of an ATA disk
//! labelled for it (`nk_storage::label`, written by xtask), read at memory speed and
//! written through sector by sector (`nk_storage::nvram`). Without such a disk there is no
//! device: the line says why and everything else runs as before.
//!
//! Persistent memory (`pmem`: an NFIT or E820 type-7 range, or RAM set aside with
//! `memmap=`) is chosen first; only without it is the ATA disk probed.
//!
//! The NVRAM AM reaches the device through [`with_media`], which lends it as
//! `&mut dyn nk_am::Media` under a lock (one caller at a time, on any CPU).
//!
//! Crash injection: with `nvram-crash-after=<k>` on the command line the machine stops
//! dead right after the device's k-th sector write completes, as a power cut: it prints
//! `nvram: power cut after write <k>` and ends the emulator at once, with no further write,
//! no flush and no `nk: shutdown` line.

mod ata;
pub mod pmem;
#[cfg(feature = "test-harness")]
pub mod pmem_selftest;
#[cfg(feature = "test-harness")]
pub mod selftest;

use alloc::format;
use core::sync::atomic::{AtomicU64, Ordering};

use nk_am::Media;
use nk_storage::ata::Drive;
use nk_storage::label;
use nk_storage::nvram::{EmulatedNvram, NvramStats};
use spin::Mutex;

use crate::memory::{self, HostPhysAddr, PAGE_SIZE};

/// The device, once chosen; `None` when there is none.
static DEVICE: Mutex<Option<EmulatedNvram<ata::AtaDisk, Mirror>>> = Mutex::new(None);

/// `nvram-crash-after=`: the write after which the power is cut (0: never).
static CRASH_AFTER: AtomicU64 = AtomicU64::new(0);

/// Lends the durable device to `f`; returns `None` when the machine has none. The device
/// is locked for the call: `f` must not call `with_media` again.
pub fn with_media<R>(f: impl FnOnce(&mut dyn Media) -> R) -> Option<R> {
    if pmem::present() {
        return pmem::with_device(|device| f(device));
    }
    let mut device = DEVICE.lock();
    device.as_mut().map(|device| f(device))
}

/// Returns the device's counters (sector writes, fences, bytes), `None` without a device.
pub fn stats() -> Option<NvramStats> {
    DEVICE.lock().as_ref().map(|device| device.stats())
}

/// Memory of the DRAM mirror: contiguous frames, identity-mapped, owned by the device
/// for the rest of the run (it never gives them back).
struct Mirror {
    base: HostPhysAddr,
    len: usize,
}

impl Mirror {
    /// Allocates a zeroed mirror of `len` bytes from the frame allocator.
    fn allocate(len: u64) -> Option<Mirror> {
        let frames = usize::try_from(len.div_ceil(PAGE_SIZE)).ok()?;
        let base = memory::alloc_frames(frames)?;
        let len = usize::try_from(len).ok()?;
        let mut mirror = Mirror { base, len };
        mirror.as_mut().fill(0);
        Some(mirror)
    }
}

impl AsRef<[u8]> for Mirror {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `base..base + len` are frames this mirror alone owns (allocated in
        // `allocate`, never freed), identity-mapped read-write below 4 GiB like all of the
        // frame allocator's memory; the shared borrow of `self` excludes a mutable one.
        unsafe { core::slice::from_raw_parts(self.base.as_u64() as *const u8, self.len) }
    }
}

impl AsMut<[u8]> for Mirror {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`; the exclusive borrow of `self` makes this the only
        // reference to the mirror's bytes.
        unsafe { core::slice::from_raw_parts_mut(self.base.as_u64() as *mut u8, self.len) }
    }
}

impl core::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Mirror({:#x}, {} bytes)", self.base.as_u64(), self.len)
    }
}

/// Looks for an NVRAM disk on the legacy ATA channels, loads its mirror, and prints the
/// one `nvram: device:` line. `crash_after` is `nvram-crash-after=`.
pub fn init(crash_after: Option<u64>) {
    CRASH_AFTER.store(crash_after.unwrap_or(0), Ordering::Relaxed);
    let mut refusals = alloc::vec::Vec::new();
    for channel in ata::CHANNELS {
        for drive in [Drive::Master, Drive::Slave] {
            let mut disk = match ata::AtaDisk::probe(channel, drive, after_write) {
                Ok(disk) => disk,
                Err(why) => {
                    refusals.push(format!("{}-{}: {why}", channel.name, drive.name()));
                    continue;
                }
            };
            let (channel_name, drive_name) = disk.position();
            let area = match label::read(&mut disk) {
                Ok(area) => area,
                Err(why) => {
                    refusals.push(format!("{channel_name}-{drive_name}: {why}"));
                    continue;
                }
            };
            let Some(mirror) = Mirror::allocate(area) else {
                refusals.push(format!("{channel_name}-{drive_name}: no {} KiB of frames for the mirror", area / 1024));
                continue;
            };
            let flush = match disk.identity().flush_command() {
                Some(_) => "FLUSH CACHE",
                None => "no write cache",
            };
            let description = format!(
                "emulated NVRAM, {} KiB, DRAM mirror written through to ATA disk {channel_name}-{drive_name} ({}, {} sectors), durable at each fence ({flush})",
                area / 1024,
                disk.identity().model(),
                disk.identity().sectors,
            );
            let started = crate::arch::rdtsc();
            match EmulatedNvram::load(disk, mirror, area, description) {
                Ok(device) => {
                    let ticks = crate::arch::rdtsc().wrapping_sub(started);
                    log::info!(target: "nvram", "device: {}; mirror loaded in {ticks} TSC ticks{}",
                        device.describe(),
                        crash_after.map(|k| format!("; nvram-crash-after={k} armed")).unwrap_or_default());
                    *DEVICE.lock() = Some(device);
                    return;
                }
                Err(why) => refusals.push(format!("{channel_name}-{drive_name}: loading the mirror: {why}")),
            }
        }
    }
    log::info!(target: "nvram", "device: none ({}); the NVRAM AM has no durable media{}", refusals.join(", "),
        if crash_after.is_some() { "; nvram-crash-after has no effect" } else { "" });
}

/// Runs after every completed sector write of the NVRAM disk: cuts the power after the
/// write `nvram-crash-after=` names.
fn after_write(writes: u64) {
    if writes == CRASH_AFTER.load(Ordering::Relaxed) {
        crate::power::power_cut(format_args!("power cut after write {writes}"));
    }
}
