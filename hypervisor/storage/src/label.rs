//! Sector 0 of an NVRAM disk. The hypervisor uses a disk as NVRAM only when this label is
//! there (xtask writes it when it creates the image), so it never overwrites a disk that
//! holds something else; the label gives the size of the durable area, which starts at
//! sector [`AREA_FIRST_SECTOR`].
//!
//! Layout (little-endian): bytes 0-15 [`MAGIC`], 16-19 the version ([`VERSION`]), 20-23
//! zero, 24-31 the area's size in bytes (a multiple of 512), the rest zero.

use crate::{SectorDisk, SECTOR_SIZE};

/// The first 16 bytes of a labelled disk.
pub const MAGIC: [u8; 16] = *b"null-Kernel NVRM";
/// The on-disk format this code writes and reads: 2 since the NVRAM store seals its
/// 256-byte units with the word-wise hash (issue 13); a disk of version 1 holds units
/// sealed byte-wise, which would read as corrupt, so it is not used (xtask makes it anew).
pub const VERSION: u32 = 2;
/// The sector where the durable area begins (sector 0 is the label).
pub const AREA_FIRST_SECTOR: u64 = 1;

/// Why a disk is not used as NVRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelError {
    /// Sector 0 does not start with [`MAGIC`]: the disk is not an NVRAM disk.
    NotLabelled,
    /// The label has another version.
    Version(u32),
    /// The area size is zero or not a multiple of 512.
    BadSize(u64),
    /// The area is larger than the disk past the label (size, sectors on the disk).
    TooLarge(u64, u64),
}

impl core::fmt::Display for LabelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LabelError::NotLabelled => f.write_str("sector 0 holds no null-Kernel NVRAM label (xtask writes one)"),
            LabelError::Version(version) => write!(f, "the NVRAM label has version {version}, not {VERSION} (another on-disk format: `cargo xtask run --fresh-nvram` makes the disk anew)"),
            LabelError::BadSize(size) => {
                write!(f, "the NVRAM label gives a size of {size} bytes, not a multiple of 512")
            }
            LabelError::TooLarge(size, sectors) => {
                write!(f, "the NVRAM label gives {size} bytes but the disk has {sectors} sectors")
            }
        }
    }
}

/// Returns the label for an area of `area_bytes` bytes.
pub fn encode(area_bytes: u64) -> [u8; SECTOR_SIZE] {
    let mut sector = [0u8; SECTOR_SIZE];
    sector[..16].copy_from_slice(&MAGIC);
    sector[16..20].copy_from_slice(&VERSION.to_le_bytes());
    sector[24..32].copy_from_slice(&area_bytes.to_le_bytes());
    sector
}

/// Reads a label on a disk of `disk_sectors` sectors; returns the area's size in bytes.
pub fn decode(sector: &[u8; SECTOR_SIZE], disk_sectors: u64) -> Result<u64, LabelError> {
    if sector[..16] != MAGIC {
        return Err(LabelError::NotLabelled);
    }
    let word = |range: core::ops::Range<usize>| {
        let mut bytes = [0u8; 8];
        bytes[..range.len()].copy_from_slice(&sector[range]);
        u64::from_le_bytes(bytes)
    };
    let version = word(16..20) as u32;
    if version != VERSION {
        return Err(LabelError::Version(version));
    }
    let size = word(24..32);
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE as u64) {
        return Err(LabelError::BadSize(size));
    }
    if size / SECTOR_SIZE as u64 > disk_sectors.saturating_sub(AREA_FIRST_SECTOR) {
        return Err(LabelError::TooLarge(size, disk_sectors));
    }
    Ok(size)
}

/// Why reading a disk's label failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLabelError {
    Disk(crate::DiskError),
    Label(LabelError),
}

impl core::fmt::Display for ReadLabelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ReadLabelError::Disk(why) => write!(f, "cannot read sector 0: {why}"),
            ReadLabelError::Label(why) => write!(f, "{why}"),
        }
    }
}

/// Reads sector 0 of `disk` and decodes its label.
pub fn read(disk: &mut impl SectorDisk) -> Result<u64, ReadLabelError> {
    let mut sector = [0u8; SECTOR_SIZE];
    disk.read_sectors(0, &mut sector).map_err(ReadLabelError::Disk)?;
    decode(&sector, disk.sectors()).map_err(ReadLabelError::Label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_round_trips() {
        assert_eq!(decode(&encode(1 << 20), 2049), Ok(1 << 20));
    }

    #[test]
    fn bad_labels_are_refused() {
        assert_eq!(decode(&[0; 512], 100), Err(LabelError::NotLabelled));
        let mut old = encode(512);
        old[16] = 7;
        assert_eq!(decode(&old, 100), Err(LabelError::Version(7)));
        assert_eq!(decode(&encode(0), 100), Err(LabelError::BadSize(0)));
        assert_eq!(decode(&encode(700), 100), Err(LabelError::BadSize(700)));
        assert_eq!(decode(&encode(1 << 20), 2048), Err(LabelError::TooLarge(1 << 20, 2048)), "sector 0 is the label's");
    }
}
