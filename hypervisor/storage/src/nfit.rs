//! The ACPI NVDIMM Firmware Interface Table (NFIT, ACPI 6.5 §5.2.26): where the firmware
//! says persistent memory lies. Only the System Physical Address (SPA) Range structures
//! (§5.2.26.2) are read; the others (region mappings, interleave, control regions, flush
//! hint addresses) are skipped by their length. QEMU's `-device nvdimm` with
//! `-machine nvdimm=on` builds one SPA range per NVDIMM with the persistent-memory GUID.
//!
//! The table comes from firmware, so nothing here trusts it: the header's signature,
//! length and checksum are checked, and every structure must lie inside the table with a
//! length of at least 4; one that does not makes the whole table [`NfitError`].

/// The table's signature.
pub const SIGNATURE: [u8; 4] = *b"NFIT";
/// Bytes before the first structure: the 36-byte SDT header and 4 reserved bytes.
pub const STRUCTURES_OFFSET: usize = 40;
/// The structure type of an SPA Range structure.
pub const SPA_RANGE_TYPE: u16 = 0;
/// The SPA Range structure's length up to ACPI 6.3 (6.4 appends an 8-byte location cookie).
pub const SPA_RANGE_MIN_LEN: usize = 56;
/// Address Range Type GUID "Persistent Memory (PM) Region", 66F0D379-B4F3-4074-AC43-
/// 0D3318B78CDB, in its byte order in the table (ACPI 6.5 Table 5.150).
pub const PERSISTENT_MEMORY_GUID: [u8; 16] =
    [0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, 0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb];
/// SPA range flag: the control region is only for management during hot add/online.
pub const FLAG_HOT_ADD: u16 = 1 << 0;
/// SPA range flag: the proximity domain field is valid.
pub const FLAG_PROXIMITY_VALID: u16 = 1 << 1;
/// UEFI memory attribute "write-back cacheable" (EFI_MEMORY_WB) in the mapping attributes.
pub const EFI_MEMORY_WB: u64 = 0x8;
/// UEFI memory attribute "non-volatile" (EFI_MEMORY_NV).
pub const EFI_MEMORY_NV: u64 = 0x8000;

/// One SPA Range structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaRange {
    /// The SPA Range Structure Index (other structures refer to the range by it).
    pub index: u16,
    pub flags: u16,
    pub proximity_domain: u32,
    /// The Address Range Type GUID, in the table's byte order.
    pub range_type: [u8; 16],
    /// The range's first system physical address.
    pub base: u64,
    /// The range's length in bytes.
    pub length: u64,
    /// The Address Range Memory Mapping Attribute (UEFI memory attributes, e.g.
    /// [`EFI_MEMORY_WB`]).
    pub attributes: u64,
}

impl SpaRange {
    /// Tells whether the firmware calls the range persistent memory.
    pub fn is_persistent(&self) -> bool {
        self.range_type == PERSISTENT_MEMORY_GUID
    }

    /// Returns the end address (exclusive), `None` if it would pass 2^64.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.length)
    }
}

/// Why an NFIT was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NfitError {
    /// Fewer bytes than a header and the reserved field.
    TooShort,
    /// The signature is not `NFIT`.
    BadSignature,
    /// The header's length is below 40 or above the bytes given.
    BadLength { length: u32 },
    /// The bytes of the table do not sum to 0 (mod 256).
    BadChecksum,
    /// The structure at `offset` has a length below 4 or runs past the table (or is an SPA
    /// range shorter than 56 bytes).
    BadStructure { offset: usize },
}

impl core::fmt::Display for NfitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NfitError::TooShort => f.write_str("shorter than its header"),
            NfitError::BadSignature => f.write_str("signature is not NFIT"),
            NfitError::BadLength { length } => write!(f, "header length {length} does not fit the table"),
            NfitError::BadChecksum => f.write_str("checksum does not sum to 0"),
            NfitError::BadStructure { offset } => write!(f, "malformed structure at byte {offset}"),
        }
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// A checked NFIT: its SPA ranges are read with [`Nfit::spa_ranges`].
#[derive(Clone, Copy, Debug)]
pub struct Nfit<'a> {
    table: &'a [u8],
}

impl<'a> Nfit<'a> {
    /// Checks `bytes` (the table from its signature; extra bytes after its length are
    /// ignored): header, checksum and every structure's bounds.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, NfitError> {
        if bytes.len() < STRUCTURES_OFFSET {
            return Err(NfitError::TooShort);
        }
        if bytes[..4] != SIGNATURE {
            return Err(NfitError::BadSignature);
        }
        let length = u32_at(bytes, 4).ok_or(NfitError::TooShort)?;
        let table = usize::try_from(length)
            .ok()
            .filter(|&len| len >= STRUCTURES_OFFSET)
            .and_then(|len| bytes.get(..len))
            .ok_or(NfitError::BadLength { length })?;
        if table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) != 0 {
            return Err(NfitError::BadChecksum);
        }
        let mut offset = STRUCTURES_OFFSET;
        while offset < table.len() {
            let kind = u16_at(table, offset).ok_or(NfitError::BadStructure { offset })?;
            let len = u16_at(table, offset + 2).ok_or(NfitError::BadStructure { offset })? as usize;
            let fits = len >= 4 && offset.checked_add(len).is_some_and(|end| end <= table.len());
            if !fits || (kind == SPA_RANGE_TYPE && len < SPA_RANGE_MIN_LEN) {
                return Err(NfitError::BadStructure { offset });
            }
            offset += len;
        }
        Ok(Nfit { table })
    }

    /// Returns the table's length in bytes.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Tells whether the table has no structures.
    pub fn is_empty(&self) -> bool {
        self.table.len() == STRUCTURES_OFFSET
    }

    /// Returns every SPA Range structure, in table order.
    pub fn spa_ranges(&self) -> impl Iterator<Item = SpaRange> + 'a {
        let table = self.table;
        let mut offset = STRUCTURES_OFFSET;
        core::iter::from_fn(move || {
            while offset < table.len() {
                let at = offset;
                let kind = u16_at(table, at)?;
                let len = u16_at(table, at + 2)? as usize;
                offset = at.checked_add(len.max(4))?;
                if kind != SPA_RANGE_TYPE {
                    continue;
                }
                return Some(SpaRange {
                    index: u16_at(table, at + 4)?,
                    flags: u16_at(table, at + 6)?,
                    proximity_domain: u32_at(table, at + 12)?,
                    range_type: table.get(at + 16..at + 32)?.try_into().ok()?,
                    base: u64_at(table, at + 32)?,
                    length: u64_at(table, at + 40)?,
                    attributes: u64_at(table, at + 48)?,
                });
            }
            None
        })
    }

    /// Returns the SPA ranges the firmware calls persistent memory, with a non-zero length
    /// that does not wrap.
    pub fn persistent_ranges(&self) -> impl Iterator<Item = SpaRange> + 'a {
        self.spa_ranges().filter(|r| r.is_persistent() && r.length > 0 && r.end().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2's NFIT for `-machine pc,nvdimm=on -m 512M,slots=2,maxmem=2G` and one
    /// `-device nvdimm` of 16 MiB: read out of the guest's memory (`pmemsave`) after
    /// SeaBIOS installed the tables. One SPA range (index 2, persistent memory, 16 MiB at
    /// 4 GiB, WB|NV), a region mapping, a control region and a flush hint address.
    const QEMU_NFIT: &str =
        "4e464954e00000000122424f43485320425850432020202001000000425850430100000000000000000038000200\
        0300000000000000000079d3f066f3b47440ac430d3318b78cdb0000000001000000000000010000000008800000\
        00000000010030000100000000000000020003000000000100000000000000000000000000000000000000000000\
        01000000000004005000030086800100010000000000000000000000000056341200010300000000000000000000\
        00000000000000000000000000000000000000000000000000000000000000000000000000000000";

    fn qemu_nfit() -> Vec<u8> {
        let hex: String = QEMU_NFIT.chars().filter(|c| !c.is_whitespace()).collect();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    /// Sets the checksum byte so the table sums to 0 again after an edit.
    fn fix_checksum(table: &mut [u8]) {
        table[9] = 0;
        let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        table[9] = 0u8.wrapping_sub(sum);
    }

    #[test]
    fn qemu_table_gives_its_one_persistent_range() {
        let bytes = qemu_nfit();
        assert_eq!(bytes.len(), 224);
        let nfit = Nfit::parse(&bytes).unwrap();
        let ranges: Vec<_> = nfit.spa_ranges().collect();
        assert_eq!(ranges.len(), 1);
        let range = ranges[0];
        assert_eq!(range.index, 2);
        assert_eq!(range.flags, FLAG_HOT_ADD | FLAG_PROXIMITY_VALID);
        assert!(range.is_persistent());
        assert_eq!(range.base, 0x1_0000_0000);
        assert_eq!(range.length, 16 << 20);
        assert_eq!(range.attributes, EFI_MEMORY_WB | EFI_MEMORY_NV);
        assert_eq!(nfit.persistent_ranges().count(), 1);
    }

    #[test]
    fn a_damaged_header_is_refused() {
        let good = qemu_nfit();
        assert_eq!(Nfit::parse(&good[..39]).unwrap_err(), NfitError::TooShort);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Nfit::parse(&bad).unwrap_err(), NfitError::BadSignature);
        // Every single-byte change breaks the checksum.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            assert!(Nfit::parse(&bad).is_err(), "byte {at}");
        }
        // A length past the bytes given, or below the header.
        for length in [225u32, 39, 0, u32::MAX] {
            let mut bad = good.clone();
            bad[4..8].copy_from_slice(&length.to_le_bytes());
            fix_checksum(&mut bad);
            assert_eq!(Nfit::parse(&bad).unwrap_err(), NfitError::BadLength { length });
        }
    }

    #[test]
    fn a_structure_running_past_the_table_is_refused() {
        let good = qemu_nfit();
        for len in [0u16, 3, 0x39 + 200, u16::MAX] {
            let mut bad = good.clone();
            bad[42..44].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut bad);
            assert_eq!(Nfit::parse(&bad).unwrap_err(), NfitError::BadStructure { offset: 40 }, "len {len}");
        }
        // An SPA range too short to hold its fields.
        let mut bad = good.clone();
        bad[42..44].copy_from_slice(&48u16.to_le_bytes());
        fix_checksum(&mut bad);
        assert!(Nfit::parse(&bad).is_err());
    }

    #[test]
    fn ranges_of_other_types_and_empty_ones_are_not_persistent() {
        let mut table = qemu_nfit();
        table[40 + 16] ^= 1; // another GUID (e.g. volatile memory)
        fix_checksum(&mut table);
        let nfit = Nfit::parse(&table).unwrap();
        assert_eq!(nfit.spa_ranges().count(), 1);
        assert_eq!(nfit.persistent_ranges().count(), 0);
        let mut table = qemu_nfit();
        table[40 + 40..40 + 48].fill(0); // zero length
        fix_checksum(&mut table);
        assert_eq!(Nfit::parse(&table).unwrap().persistent_ranges().count(), 0);
        let mut table = qemu_nfit();
        table[40 + 32..40 + 40].copy_from_slice(&u64::MAX.to_le_bytes()); // wraps
        fix_checksum(&mut table);
        assert_eq!(Nfit::parse(&table).unwrap().persistent_ranges().count(), 0);
    }

    #[test]
    fn trailing_bytes_after_the_table_are_ignored() {
        let mut bytes = qemu_nfit();
        bytes.extend_from_slice(&[0xff; 64]);
        assert_eq!(Nfit::parse(&bytes).unwrap().len(), 224);
    }
}
