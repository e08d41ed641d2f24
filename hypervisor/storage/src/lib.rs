//! The hypervisor's durable device for the NVRAM AM, without the hardware access: what a
//! driver writes to and reads from an ATA disk, and how a disk becomes NVRAM.
//!
//! - [`ata`]: the ATA PIO protocol (task-file encoding for LBA28 and LBA48, status
//!   decoding, IDENTIFY parsing, device signatures), ATA/ATAPI-8 ACS (T13/1699-D);
//! - [`label`]: sector 0 of an NVRAM disk, which marks it as one (the hypervisor never
//!   writes a disk without it) and gives the size of the durable area;
//! - [`nvram`]: emulated NVRAM, a DRAM mirror of the whole durable area written through to
//!   a [`SectorDisk`], implementing [`nk_am::Media`];
//! - [`nfit`]: the ACPI NFIT's SPA ranges, where the firmware says persistent memory is;
//! - [`pmem`]: persistent memory behind [`nk_am::Media`] (cache write-back and SFENCE at
//!   each ordering point, a redo journal for 256-byte unit atomicity), and the choice of
//!   CLWB, CLFLUSHOPT or CLFLUSH.
//!
//! The hypervisor (hypervisor/src/storage) supplies the port I/O and the mirror's memory.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod ata;
pub mod label;
pub mod nfit;
pub mod nvram;
pub mod pmem;

/// The bytes in a disk sector (ATA logical sector of 512 bytes; larger ones are refused).
pub const SECTOR_SIZE: usize = 512;

/// Why a disk access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The device did not clear BSY or set DRQ in time.
    Timeout,
    /// The device set ERR (the error register's value) or DF.
    DeviceError(u8),
    /// The request lies outside the disk or does not fit the command.
    OutOfRange,
    /// The buffer is not a whole number of sectors.
    BadLength,
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskError::Timeout => f.write_str("the device did not answer in time"),
            DiskError::DeviceError(error) => write!(f, "the device reported an error (error register {error:#04x})"),
            DiskError::OutOfRange => f.write_str("the sectors lie outside the disk"),
            DiskError::BadLength => f.write_str("the buffer is not a whole number of sectors"),
        }
    }
}

/// A disk addressed in 512-byte sectors: what emulated NVRAM writes through to. The
/// hypervisor's ATA driver implements it; host tests use a fake that can lose power.
pub trait SectorDisk {
    /// Returns how many sectors the disk has.
    fn sectors(&self) -> u64;
    /// Reads `buf.len() / SECTOR_SIZE` sectors starting at `lba`.
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes one sector at `lba`; it returns once the device has taken the data (not
    /// necessarily on the medium: see `flush`).
    fn write_sector(&mut self, lba: u64, data: &[u8; SECTOR_SIZE]) -> Result<(), DiskError>;
    /// Writes `data.len() / SECTOR_SIZE` consecutive sectors from `lba`, each as
    /// [`write_sector`](Self::write_sector) would (each sector is all old or all new after
    /// a power cut; they complete in order). A driver may move them with fewer commands.
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        if !data.len().is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadLength);
        }
        for (i, sector) in data.chunks_exact(SECTOR_SIZE).enumerate() {
            let sector: &[u8; SECTOR_SIZE] = sector.try_into().map_err(|_| DiskError::BadLength)?;
            self.write_sector(lba + i as u64, sector)?;
        }
        Ok(())
    }
    /// Returns once every written sector is on the medium (ATA FLUSH CACHE).
    fn flush(&mut self) -> Result<(), DiskError>;
}
