//! The NKCP table: how a guest OS's VM hands its capability names to the processes its
//! operator chooses (layer bypass, seed §5.2.2).
//!
//! The hypervisor puts one ACPI table with signature `NKCP` among the VM's ACPI tables
//! (listed in the XSDT). It lists the VM's initial capabilities in `INITIAL` order, each
//! with its AM, its kind and a label (`<am>/<kind>`, e.g. `exo/frames`). Linux shows
//! every XSDT table as `/sys/firmware/acpi/tables/NKCP`, readable by root only (mode
//! 0400), and the physical copy only through `/dev/mem`, also root only: so the names
//! reach root's processes and those root hands them to (by file permissions or by passing
//! the names on), and no other process; the names are 128-bit random values, so a process
//! that was not given one cannot guess it. (The kernel command line, by contrast, is
//! world-readable in `/proc/cmdline`.)
//!
//! Layout (little-endian): the 36-byte ACPI SDT header (ACPI 6.5 §5.2.6; signature
//! `NKCP`, revision [`REVISION`], the whole table summing to 0), then `count: u32` and
//! `entry_size: u32` ([`ENTRY_SIZE`]), then `count` entries of:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | name, low word |
//! | 8 | 8 | name, high word |
//! | 16 | 2 | AM id |
//! | 18 | 2 | reserved, 0 |
//! | 20 | 4 | kind (within the AM) |
//! | 24 | 24 | label, ASCII, NUL-padded |

use crate::NameWords;

/// The table's ACPI signature.
pub const SIGNATURE: [u8; 4] = *b"NKCP";
/// The layout revision this module reads and writes.
pub const REVISION: u8 = 1;
/// Bytes of the SDT header plus `count` and `entry_size`.
pub const HEADER_SIZE: usize = 36 + 8;
/// Bytes of one entry.
pub const ENTRY_SIZE: usize = 48;
/// Bytes of a label.
pub const LABEL_SIZE: usize = 24;

/// One capability in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: NameWords,
    pub am: u16,
    pub kind: u32,
    /// `<am>/<kind>`, NUL-padded.
    pub label: [u8; LABEL_SIZE],
}

impl Entry {
    /// Makes an entry, cutting `label` to [`LABEL_SIZE`] bytes.
    pub fn new(name: NameWords, am: u16, kind: u32, label: &str) -> Self {
        let mut bytes = [0u8; LABEL_SIZE];
        let len = label.len().min(LABEL_SIZE);
        bytes[..len].copy_from_slice(&label.as_bytes()[..len]);
        Self { name, am, kind, label: bytes }
    }

    /// Returns the label without its padding (empty if it is not ASCII).
    pub fn label(&self) -> &str {
        let len = self.label.iter().position(|&b| b == 0).unwrap_or(LABEL_SIZE);
        core::str::from_utf8(&self.label[..len]).ok().filter(|s| s.is_ascii()).unwrap_or("")
    }

    /// Writes the entry's [`ENTRY_SIZE`] bytes.
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0u8; ENTRY_SIZE];
        out[0..8].copy_from_slice(&self.name.low.to_le_bytes());
        out[8..16].copy_from_slice(&self.name.high.to_le_bytes());
        out[16..18].copy_from_slice(&self.am.to_le_bytes());
        out[20..24].copy_from_slice(&self.kind.to_le_bytes());
        out[24..].copy_from_slice(&self.label);
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let mut label = [0u8; LABEL_SIZE];
        label.copy_from_slice(&bytes[24..ENTRY_SIZE]);
        Self {
            name: NameWords { low: u64_at(0), high: u64_at(8) },
            am: u16::from_le_bytes([bytes[16], bytes[17]]),
            kind: u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            label,
        }
    }
}

/// Why a table was not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Shorter than its header or than its own length field says.
    Truncated,
    /// Not `NKCP`.
    WrongSignature,
    /// A revision this module does not know.
    UnknownRevision(u8),
    /// The bytes do not sum to 0.
    BadChecksum,
    /// `entry_size` or `count` do not fit the length.
    BadLayout,
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TableError::Truncated => f.write_str("the NKCP table is truncated"),
            TableError::WrongSignature => f.write_str("not an NKCP table"),
            TableError::UnknownRevision(r) => {
                write!(f, "NKCP table revision {r} is not known (this reader knows {REVISION})")
            }
            TableError::BadChecksum => f.write_str("the NKCP table's checksum is wrong"),
            TableError::BadLayout => f.write_str("the NKCP table's count or entry size do not fit its length"),
        }
    }
}

/// Checks a whole table (header, checksum, layout) and returns its entries.
pub fn entries(table: &[u8]) -> Result<impl Iterator<Item = Entry> + '_, TableError> {
    if table.len() < HEADER_SIZE {
        return Err(TableError::Truncated);
    }
    if table[..4] != SIGNATURE {
        return Err(TableError::WrongSignature);
    }
    let length = u32::from_le_bytes([table[4], table[5], table[6], table[7]]) as usize;
    if length < HEADER_SIZE || length > table.len() {
        return Err(TableError::Truncated);
    }
    let table = &table[..length];
    if table[8] != REVISION {
        return Err(TableError::UnknownRevision(table[8]));
    }
    if table.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) != 0 {
        return Err(TableError::BadChecksum);
    }
    let count = u32::from_le_bytes([table[36], table[37], table[38], table[39]]) as usize;
    let size = u32::from_le_bytes([table[40], table[41], table[42], table[43]]) as usize;
    let fits = count.checked_mul(ENTRY_SIZE).and_then(|n| n.checked_add(HEADER_SIZE)) == Some(length);
    if size != ENTRY_SIZE || !fits {
        return Err(TableError::BadLayout);
    }
    Ok(table[HEADER_SIZE..].chunks_exact(ENTRY_SIZE).map(Entry::decode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table as the hypervisor's builder lays it out (nk-devices builds the real one).
    fn table(entries: &[Entry]) -> std::vec::Vec<u8> {
        let mut t = std::vec![0u8; HEADER_SIZE];
        t[..4].copy_from_slice(&SIGNATURE);
        t[8] = REVISION;
        t[36..40].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        t[40..44].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        for e in entries {
            t.extend_from_slice(&e.encode());
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn entries_round_trip() {
        let a = Entry::new(NameWords { low: 1, high: 2 }, 2, 3, "exo/frames");
        let b = Entry::new(NameWords { low: u64::MAX, high: 7 }, 3, 0, "guest-os/vm-with-a-very-long-label");
        let t = table(&[a, b]);
        let got: std::vec::Vec<Entry> = entries(&t).unwrap().collect();
        assert_eq!(got, [a, b]);
        assert_eq!(got[0].label(), "exo/frames");
        assert_eq!(got[1].label().len(), LABEL_SIZE);
    }

    #[test]
    fn damaged_tables_are_refused() {
        let t = table(&[Entry::new(NameWords { low: 1, high: 2 }, 2, 3, "exo/frames")]);
        assert_eq!(entries(&t[..40]).err(), Some(TableError::Truncated));
        assert_eq!(entries(&t[..t.len() - 1]).err(), Some(TableError::Truncated));
        let mut flipped = t.clone();
        flipped[50] ^= 1;
        assert_eq!(entries(&flipped).err(), Some(TableError::BadChecksum));
        let mut other = t.clone();
        other[0] = b'X';
        assert_eq!(entries(&other).err(), Some(TableError::WrongSignature));
        let mut count = table(&[]);
        count[36] = 5;
        count[9] = count[9].wrapping_sub(5);
        assert_eq!(entries(&count).err(), Some(TableError::BadLayout));
        let mut rev = table(&[]);
        rev[8] = 9;
        rev[9] = rev[9].wrapping_sub(9 - REVISION);
        assert_eq!(entries(&rev).err(), Some(TableError::UnknownRevision(9)));
    }
}
