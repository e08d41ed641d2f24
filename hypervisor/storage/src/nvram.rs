//! Emulated NVRAM: a DRAM mirror of the whole durable area, loaded from the disk at boot
//! and written through to it (issue 12, "Durable device behind one interface", option 2).
//! Reads are served from the mirror at memory speed. A write goes to the mirror, then every
//! 512-byte sector it touches is written to the disk from the mirror (a 256-byte unit
//! lies inside one sector, so a unit write is one sector write, read-modify-write from the
//! mirror: a sector is the disk's atomic unit, so each `MEDIA_UNIT` is all old or all new
//! after a power cut). `fence` issues the disk's cache flush and returns once it completes.
//!
//! If a disk write fails, the mirror is ahead of the disk for that sector; the write
//! returns `MediaError::Device` and the caller must treat the device as failed.

extern crate alloc;

use alloc::string::String;

use nk_am::{Media, MediaError, MEDIA_UNIT};

use crate::label::AREA_FIRST_SECTOR;
use crate::{DiskError, SectorDisk, SECTOR_SIZE};

/// The most sectors read by one command while loading the mirror.
const LOAD_CHUNK_SECTORS: usize = 128;

/// What emulated NVRAM has done to its disk since boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvramStats {
    /// Sector writes completed (one per sector a `write` touched).
    pub sector_writes: u64,
    /// Fences completed.
    pub fences: u64,
    /// Bytes callers wrote (before rounding up to sectors).
    pub bytes_written: u64,
}

/// Emulated NVRAM over `disk`, with `mirror` holding the durable area's contents.
#[derive(Debug)]
pub struct EmulatedNvram<D, M> {
    disk: D,
    mirror: M,
    size: u64,
    description: String,
    stats: NvramStats,
}

/// Why emulated NVRAM could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The mirror is smaller than the area (mirror bytes, area bytes).
    MirrorTooSmall(usize, u64),
    /// Reading the area failed at this sector.
    Disk(u64, DiskError),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LoadError::MirrorTooSmall(mirror, area) => write!(f, "a mirror of {mirror} bytes cannot hold {area} bytes"),
            LoadError::Disk(lba, why) => write!(f, "reading sector {lba}: {why}"),
        }
    }
}

impl<D: SectorDisk, M: AsRef<[u8]> + AsMut<[u8]>> EmulatedNvram<D, M> {
    /// Loads the durable area of `area_bytes` bytes (from the disk's label) into `mirror`.
    /// `description` is what `Media::describe` returns (for the boot log).
    pub fn load(mut disk: D, mut mirror: M, area_bytes: u64, description: String) -> Result<Self, LoadError> {
        let area = usize::try_from(area_bytes).ok().and_then(|area| mirror.as_mut().get_mut(..area));
        let Some(area) = area else {
            return Err(LoadError::MirrorTooSmall(mirror.as_ref().len(), area_bytes));
        };
        for (index, chunk) in area.chunks_mut(LOAD_CHUNK_SECTORS * SECTOR_SIZE).enumerate() {
            let lba = AREA_FIRST_SECTOR + (index * LOAD_CHUNK_SECTORS) as u64;
            disk.read_sectors(lba, chunk).map_err(|why| LoadError::Disk(lba, why))?;
        }
        Ok(EmulatedNvram { disk, mirror, size: area_bytes, description, stats: NvramStats::default() })
    }

    /// Returns what this device has done since boot.
    pub fn stats(&self) -> NvramStats {
        self.stats
    }

    /// Returns the disk underneath (e.g. for its own counters).
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// Returns the mirror's bytes `offset..offset + len` after checking the request.
    fn range(&self, offset: u64, len: usize) -> Result<core::ops::Range<usize>, MediaError> {
        let len = len as u64;
        if !offset.is_multiple_of(MEDIA_UNIT) || !len.is_multiple_of(MEDIA_UNIT) {
            return Err(MediaError::Misaligned);
        }
        let end = offset.checked_add(len).filter(|end| *end <= self.size).ok_or(MediaError::OutOfRange)?;
        Ok(offset as usize..end as usize)
    }
}

impl<D: SectorDisk, M: AsRef<[u8]> + AsMut<[u8]>> Media for EmulatedNvram<D, M> {
    fn describe(&self) -> &str {
        &self.description
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.mirror.as_ref()[range]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        let range = self.range(offset, data.len())?;
        if range.is_empty() {
            return Ok(());
        }
        let first_sector = range.start / SECTOR_SIZE;
        let last_sector = (range.end - 1) / SECTOR_SIZE;
        self.mirror.as_mut()[range].copy_from_slice(data);
        // The sectors it touches, from the mirror, as one run (one command on the ATA disk).
        let sectors = &self.mirror.as_ref()[first_sector * SECTOR_SIZE..(last_sector + 1) * SECTOR_SIZE];
        self.disk.write_sectors(AREA_FIRST_SECTOR + first_sector as u64, sectors).map_err(|_| MediaError::Device)?;
        self.stats.sector_writes += (last_sector + 1 - first_sector) as u64;
        self.stats.bytes_written += data.len() as u64;
        Ok(())
    }

    fn fence(&mut self) -> Result<(), MediaError> {
        self.disk.flush().map_err(|_| MediaError::Device)?;
        self.stats.fences += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label;

    /// A disk in a vector that loses power after `power_after` sector writes: later
    /// writes fail and change nothing, as the machine would have stopped.
    struct FakeDisk {
        sectors: Vec<[u8; SECTOR_SIZE]>,
        writes: u64,
        flushes: u64,
        power_after: Option<u64>,
    }

    impl FakeDisk {
        fn new(area_bytes: u64) -> Self {
            let mut sectors = vec![[0u8; SECTOR_SIZE]; 1 + area_bytes as usize / SECTOR_SIZE];
            sectors[0] = label::encode(area_bytes);
            FakeDisk { sectors, writes: 0, flushes: 0, power_after: None }
        }
    }

    impl SectorDisk for FakeDisk {
        fn sectors(&self) -> u64 {
            self.sectors.len() as u64
        }
        fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            for (i, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
                chunk.copy_from_slice(self.sectors.get(lba as usize + i).ok_or(DiskError::OutOfRange)?);
            }
            Ok(())
        }
        fn write_sector(&mut self, lba: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), DiskError> {
            if self.power_after.is_some_and(|k| self.writes >= k) {
                return Err(DiskError::Timeout);
            }
            *self.sectors.get_mut(lba as usize).ok_or(DiskError::OutOfRange)? = *data;
            self.writes += 1;
            Ok(())
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            self.flushes += 1;
            Ok(())
        }
    }

    fn nvram(disk: FakeDisk) -> EmulatedNvram<FakeDisk, Vec<u8>> {
        let size = label::decode(&disk.sectors[0], disk.sectors()).expect("label");
        EmulatedNvram::load(disk, vec![0u8; size as usize], size, "fake".into()).expect("loads")
    }

    #[test]
    fn a_unit_write_is_one_sector_write_and_keeps_its_neighbour() {
        let mut disk = FakeDisk::new(4096);
        disk.sectors[2][..256].fill(0xAA); // area sector 1, first unit: loaded into the mirror
        let mut media = nvram(disk);
        assert_eq!(media.size(), 4096);
        media.write(768, &[0x55; 256]).expect("writes");
        assert_eq!(media.stats().sector_writes, 1);
        let sector = media.disk().sectors[2];
        assert!(sector[..256].iter().all(|b| *b == 0xAA), "the other unit of the sector is kept");
        assert!(sector[256..].iter().all(|b| *b == 0x55));
        let mut back = [0u8; 512];
        media.read(512, &mut back).expect("reads");
        assert_eq!(back, sector);
    }

    #[test]
    fn a_long_write_touches_each_sector_once_and_fence_flushes() {
        let mut media = nvram(FakeDisk::new(8192));
        media.write(256, &[7; 1024]).expect("writes");
        assert_eq!(media.stats().sector_writes, 3, "units 1-4 lie in sectors 0, 1 and 2");
        media.fence().expect("fences");
        assert_eq!((media.disk().flushes, media.stats().fences, media.stats().bytes_written), (1, 1, 1024));
    }

    #[test]
    fn bad_ranges_are_refused_without_a_write() {
        let mut media = nvram(FakeDisk::new(1024));
        assert_eq!(media.write(100, &[0; 256]), Err(MediaError::Misaligned));
        assert_eq!(media.write(0, &[0; 100]), Err(MediaError::Misaligned));
        assert_eq!(media.write(1024, &[0; 256]), Err(MediaError::OutOfRange));
        assert_eq!(media.write(u64::MAX - 255, &[0; 256]), Err(MediaError::OutOfRange));
        assert_eq!(media.read(768, &mut [0; 512]), Err(MediaError::OutOfRange));
        assert_eq!(media.stats().sector_writes, 0);
        assert_eq!(media.write(0, &[]), Ok(()));
    }

    #[test]
    fn a_power_cut_keeps_exactly_the_completed_units() {
        for k in 0..8 {
            let mut disk = FakeDisk::new(8 * 512);
            disk.power_after = Some(k);
            let mut media = nvram(disk);
            for unit in 0..8u64 {
                let _ = media.write(unit * 512, &[unit as u8 + 1; 256]);
                let _ = media.fence();
            }
            let disk = FakeDisk { power_after: None, ..media.disk };
            let mut restored = nvram(disk);
            for unit in 0..8u64 {
                let mut buf = [0u8; 256];
                restored.read(unit * 512, &mut buf).expect("reads");
                let expected = if unit < k { unit as u8 + 1 } else { 0 };
                assert!(buf.iter().all(|b| *b == expected), "k {k} unit {unit}: {:?}", &buf[..4]);
            }
        }
    }

    #[test]
    fn a_mirror_too_small_is_refused() {
        let result = EmulatedNvram::load(FakeDisk::new(1024), vec![0u8; 512], 1024, String::new());
        assert_eq!(result.map(|_| ()).unwrap_err(), LoadError::MirrorTooSmall(512, 1024));
    }

    #[test]
    fn a_failed_load_names_the_sector() {
        let result = EmulatedNvram::load(FakeDisk::new(1024), vec![0u8; 4096], 4096, String::new());
        assert_eq!(result.map(|_| ()).unwrap_err(), LoadError::Disk(1, DiskError::OutOfRange));
    }
}
