//! The hypervisor's side of the NVRAM AM (am/nvram): the durable device it lends the AM
//! (`MediaSource`), host memory the AM reads and writes its region copies through
//! (`HostMemory`), and synchronous EPT dirty-flag reads (`DirtySource`).
//!
//! The device is the durable one the hypervisor found at boot (`crate::storage`: emulated
//! NVRAM over a labelled ATA disk, named in the boot log's `nvram: device:` line), or,
//! when there is none, [`RamMedia`]: frames of host RAM, **not durable** (lost at power
//! off), a stand-in so that allocate/map/commit/restore still run, installed with
//! [`install`] and named in the log too.

use alloc::boxed::Box;

use nk_am::{DirtySource, HostMemory, Media, MediaError, MediaSource};
use nk_caps::VmId;
use spin::Mutex;

use crate::memory::{self, IDENTITY_MAPPED_LIMIT, PAGE_SIZE};

/// RAM standing in for a durable device: `size` bytes of host frames at `base`. Writes
/// are plain stores, a fence is a store fence; nothing survives a restart.
pub struct RamMedia {
    base: u64,
    size: u64,
}

impl RamMedia {
    /// Allocates `bytes` (a multiple of 4 KiB) of zeroed frames for it.
    pub fn allocate(bytes: u64) -> Option<Self> {
        let frames = memory::alloc_frames((bytes / PAGE_SIZE) as usize)?;
        // SAFETY: the frames were just allocated (nobody else holds them) and lie below
        // the identity-mapped limit the allocator was given.
        unsafe { core::ptr::write_bytes(frames.as_u64() as *mut u8, 0, bytes as usize) };
        Some(Self { base: frames.as_u64(), size: bytes })
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), MediaError> {
        MediaError::check_range(offset, len, self.size)
    }
}

impl Media for RamMedia {
    fn describe(&self) -> &str {
        "RAM (NOT durable: a stand-in until a durable device is installed)"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.check(offset, buf.len())?;
        // SAFETY: the range lies inside frames this device owns (checked above), which are
        // identity-mapped and not aliased by any Rust reference.
        unsafe { core::ptr::copy_nonoverlapping((self.base + offset) as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        self.check(offset, data.len())?;
        // SAFETY: as for `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), (self.base + offset) as *mut u8, data.len()) };
        Ok(())
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The one durable device, lent to every kernel instance (calls are serialized here).
pub struct Device(Mutex<Option<Box<dyn Media + Send>>>);

/// The device the NVRAM AM uses.
pub static DEVICE: Device = Device(Mutex::new(None));

impl MediaSource for Device {
    fn with_media(&self, f: &mut dyn FnMut(&mut dyn Media)) -> bool {
        // The durable device the hypervisor found at boot (crate::storage) comes first.
        if crate::storage::with_media(|media| f(media)).is_some() {
            return true;
        }
        let mut device = self.0.lock();
        match device.as_mut() {
            Some(media) => {
                f(media.as_mut());
                true
            }
            None => false,
        }
    }
}

/// Installs `media` as the device and names it in the boot log.
pub fn install(media: Box<dyn Media + Send>) {
    log::info!(target: "nvram", "device: {}, {} KiB", media.describe(), media.size() / 1024);
    *DEVICE.0.lock() = Some(media);
}

/// Host memory as the AMs see it: the identity-mapped frames below
/// `IDENTITY_MAPPED_LIMIT` (the NVRAM AM touches only frames it allocated).
pub struct HostFrames;

/// The one instance lent to every kernel instance.
pub static HOST: HostFrames = HostFrames;

fn in_identity_map(hpa: u64, len: usize) -> bool {
    hpa >= PAGE_SIZE && hpa.checked_add(len as u64).is_some_and(|end| end <= IDENTITY_MAPPED_LIMIT)
}

impl HostMemory for HostFrames {
    fn read(&self, hpa: u64, buf: &mut [u8]) -> bool {
        if !in_identity_map(hpa, buf.len()) {
            return false;
        }
        // SAFETY: the range is identity-mapped (checked above); the AM reads only frames
        // it allocated, which no Rust reference aliases (guests may write them meanwhile:
        // a plain byte copy of guest memory, as the exo AM's bitmaps are written).
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }

    fn write(&self, hpa: u64, data: &[u8]) -> bool {
        if !in_identity_map(hpa, data.len()) {
            return false;
        }
        // SAFETY: as for `read`; the AM writes only frames it allocated.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hpa as *mut u8, data.len()) };
        true
    }

    /// Compares in place, a word at a time (the NVRAM AM's diff of a dirty page against
    /// its committed copy, without copying either out).
    fn equal(&self, a: u64, b: u64, len: usize) -> Option<bool> {
        if !in_identity_map(a, len) || !in_identity_map(b, len) {
            return None;
        }
        let words = if a % 8 == 0 && b % 8 == 0 { len / 8 } else { 0 };
        for i in 0..words {
            // SAFETY: both ranges are identity-mapped (checked above) and 8-byte aligned,
            // and `i * 8 + 8 <= len`; volatile reads of frames the AM allocated, which a
            // guest may write meanwhile (as for `read`), into no Rust reference.
            let (x, y) = unsafe {
                (core::ptr::read_volatile((a as *const u64).add(i)), core::ptr::read_volatile((b as *const u64).add(i)))
            };
            if x != y {
                return Some(false);
            }
        }
        for i in words * 8..len {
            // SAFETY: as above, byte `i < len` of each range.
            let (x, y) = unsafe {
                (core::ptr::read_volatile((a as *const u8).add(i)), core::ptr::read_volatile((b as *const u8).add(i)))
            };
            if x != y {
                return Some(false);
            }
        }
        Some(true)
    }

    /// Compares each unit a word at a time, stopping at its first difference (a unit
    /// rewritten whole differs in its first word), with one range check for all of them.
    fn differing_units(&self, a: u64, b: u64, unit: usize, units: usize) -> Option<u64> {
        let len = unit.checked_mul(units)?;
        if units > 64 || !in_identity_map(a, len) || !in_identity_map(b, len) {
            return None;
        }
        if a % 8 != 0 || b % 8 != 0 || unit % 8 != 0 {
            let mut differ = 0;
            for i in 0..units {
                let at = (i * unit) as u64;
                if !self.equal(a + at, b + at, unit)? {
                    differ |= 1 << i;
                }
            }
            return Some(differ);
        }
        let (a, b) = (a as *const u64, b as *const u64);
        let words = unit / 8;
        let mut differ = 0u64;
        for i in 0..units {
            for w in i * words..(i + 1) * words {
                // SAFETY: both ranges are identity-mapped (checked above: `len` bytes from
                // each) and 8-byte aligned, and `w * 8 + 8 <= len`; volatile reads of
                // frames the AM allocated, which a guest may write meanwhile (as for
                // `read`), into no Rust reference.
                let (x, y) = unsafe { (core::ptr::read_volatile(a.add(w)), core::ptr::read_volatile(b.add(w))) };
                if x != y {
                    differ |= 1 << i;
                    break;
                }
            }
        }
        Some(differ)
    }
}

/// EPT dirty flags read synchronously (`exomem::take_dirty`).
pub struct EptDirty;

/// The one instance lent to every kernel instance.
pub static DIRTY: EptDirty = EptDirty;

impl DirtySource for EptDirty {
    fn take_dirty(&self, vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool {
        crate::exomem::take_dirty(vm, gpa, pages, bitmap)
    }
}
