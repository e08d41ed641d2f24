//! Reads a guest image (a static 64-bit x86-64 ELF executable, ELF-64 Object File Format
//! v1.5 and the System V x86-64 psABI) and returns the segments to copy into guest memory.
//! Every header field is checked against the file and the guest's memory size before
//! anything is copied: a malformed image is refused with a reason and never panics.
//! [`cpuid`] computes the CPUID answers a guest sees.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod bzimage;
pub mod cpuid;
pub mod image;
pub mod multiboot;

use core::fmt;

/// The most loadable segments a guest image may have.
pub const MAX_SEGMENTS: usize = 16;

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// Why an image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Shorter than an ELF header.
    Truncated,
    /// Not `\x7fELF`, not 64-bit little-endian, not x86-64, or not an executable.
    NotX86_64Executable,
    /// The program-header table lies outside the file or has a wrong entry size.
    BadProgramHeaders,
    /// A segment's file bytes lie outside the file, or its file size exceeds its memory size.
    SegmentOutsideFile { index: usize },
    /// A segment does not fit in the guest's memory (or wraps around).
    SegmentOutsideGuest { index: usize },
    /// Two loadable segments overlap in guest memory.
    SegmentsOverlap { first: usize, second: usize },
    /// More than `MAX_SEGMENTS` loadable segments.
    TooManySegments,
    /// No loadable segment, or the entry point lies in no executable segment.
    BadEntry,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Truncated => write!(f, "image shorter than an ELF header"),
            LoadError::NotX86_64Executable => write!(f, "not a 64-bit little-endian x86-64 ELF executable"),
            LoadError::BadProgramHeaders => write!(f, "program-header table outside the file or malformed"),
            LoadError::SegmentOutsideFile { index } => write!(f, "segment {index}: file bytes outside the image"),
            LoadError::SegmentOutsideGuest { index } => write!(f, "segment {index}: does not fit in guest memory"),
            LoadError::SegmentsOverlap { first, second } => write!(f, "segments {first} and {second} overlap"),
            LoadError::TooManySegments => write!(f, "more than {MAX_SEGMENTS} loadable segments"),
            LoadError::BadEntry => write!(f, "entry point not in an executable segment"),
        }
    }
}

/// One loadable segment: copy `file_range` of the image to guest-physical `gpa`, then zero
/// up to `mem_size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub file_offset: usize,
    pub file_size: usize,
    pub mem_size: u64,
    pub executable: bool,
    pub writable: bool,
}

/// A checked guest image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestImage {
    pub entry: u64,
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
}

impl GuestImage {
    /// Returns the loadable segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    /// Returns the end of the highest segment in guest memory.
    pub fn end(&self) -> u64 {
        self.segments().iter().map(|s| s.gpa + s.mem_size).max().unwrap_or(0)
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Checks `image` for a guest with `guest_mem` bytes of memory starting at GPA 0; segments
/// must lie within `[min_gpa, guest_mem)` (memory below `min_gpa` belongs to the loader:
/// page tables, boot data).
pub fn parse(image: &[u8], min_gpa: u64, guest_mem: u64) -> Result<GuestImage, LoadError> {
    if image.len() < EHDR_SIZE {
        return Err(LoadError::Truncated);
    }
    let ident_ok = image[..4] == *b"\x7fELF" && image[4] == 2 && image[5] == 1;
    let header = (|| Some((u16_at(image, 16)?, u16_at(image, 18)?)))();
    if !ident_ok || header != Some((ET_EXEC, EM_X86_64)) {
        return Err(LoadError::NotX86_64Executable);
    }
    let bad = LoadError::BadProgramHeaders;
    let entry = u64_at(image, 24).ok_or(bad)?;
    let phoff = usize::try_from(u64_at(image, 32).ok_or(bad)?).map_err(|_| bad)?;
    let phentsize = usize::from(u16_at(image, 54).ok_or(bad)?);
    let phnum = usize::from(u16_at(image, 56).ok_or(bad)?);
    if phentsize != PHDR_SIZE {
        return Err(bad);
    }
    let table_end = phnum.checked_mul(PHDR_SIZE).and_then(|n| n.checked_add(phoff)).ok_or(bad)?;
    if table_end > image.len() {
        return Err(bad);
    }

    let mut out = GuestImage { entry, segments: [Segment::default(); MAX_SEGMENTS], count: 0 };
    for index in 0..phnum {
        let at = phoff + index * PHDR_SIZE;
        let field = |offset: usize| u64_at(image, at + offset).ok_or(bad);
        if u32_at(image, at).ok_or(bad)? != PT_LOAD {
            continue;
        }
        let flags = u32_at(image, at + 4).ok_or(bad)?;
        let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
        if memsz == 0 {
            continue;
        }
        let outside_file = LoadError::SegmentOutsideFile { index };
        let file_end = offset.checked_add(filesz).ok_or(outside_file)?;
        if filesz > memsz || file_end > image.len() as u64 {
            return Err(outside_file);
        }
        let mem_end = paddr.checked_add(memsz).ok_or(LoadError::SegmentOutsideGuest { index })?;
        if paddr < min_gpa || mem_end > guest_mem {
            return Err(LoadError::SegmentOutsideGuest { index });
        }
        if out.count == MAX_SEGMENTS {
            return Err(LoadError::TooManySegments);
        }
        for (other_index, other) in out.segments().iter().enumerate() {
            if paddr < other.gpa + other.mem_size && other.gpa < mem_end {
                return Err(LoadError::SegmentsOverlap { first: other_index, second: index });
            }
        }
        out.segments[out.count] = Segment {
            gpa: paddr,
            file_offset: offset as usize,
            file_size: filesz as usize,
            mem_size: memsz,
            executable: flags & 1 != 0,
            writable: flags & 2 != 0,
        };
        out.count += 1;
    }
    let entry_ok = out.segments().iter().any(|s| s.executable && s.gpa <= entry && entry < s.gpa + s.mem_size);
    if !entry_ok {
        return Err(LoadError::BadEntry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds an ELF image with the given (paddr, file bytes, memsz, flags) segments.
    fn elf(entry: u64, segments: &[(u64, Vec<u8>, u64, u32)]) -> Vec<u8> {
        let mut image = vec![0u8; EHDR_SIZE + segments.len() * PHDR_SIZE];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4] = 2;
        image[5] = 1;
        image[6] = 1;
        image[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        image[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        image[24..32].copy_from_slice(&entry.to_le_bytes());
        image[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        image[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        image[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (paddr, bytes, memsz, flags)) in segments.iter().enumerate() {
            let offset = image.len() as u64;
            image.extend_from_slice(bytes);
            let at = EHDR_SIZE + i * PHDR_SIZE;
            image[at..at + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            image[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
            image[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            image[at + 16..at + 24].copy_from_slice(&paddr.to_le_bytes());
            image[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            image[at + 32..at + 40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            image[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        image
    }

    const RX: u32 = 5;
    const RW: u32 = 6;

    #[test]
    fn accepts_a_well_formed_image() {
        let image = elf(0x20_0000, &[(0x20_0000, vec![0x90; 16], 16, RX), (0x20_1000, vec![1; 8], 0x2000, RW)]);
        let parsed = parse(&image, 0x10_0000, 4 << 20).unwrap();
        assert_eq!(parsed.entry, 0x20_0000);
        assert_eq!(parsed.segments().len(), 2);
        assert!(parsed.segments()[0].executable && !parsed.segments()[0].writable);
        assert_eq!(parsed.end(), 0x20_3000);
    }

    #[test]
    fn refuses_each_malformation_with_its_reason() {
        assert_eq!(parse(&[0x7f; 10], 0, 1 << 20), Err(LoadError::Truncated));
        let mut not_elf = elf(0x1000, &[(0x1000, vec![0; 4], 4, RX)]);
        not_elf[18] = 3; // EM_386
        assert_eq!(parse(&not_elf, 0, 1 << 20), Err(LoadError::NotX86_64Executable));
        let mut bad_table = elf(0x1000, &[(0x1000, vec![0; 4], 4, RX)]);
        bad_table[56] = 200; // phnum past the end
        assert_eq!(parse(&bad_table, 0, 1 << 20), Err(LoadError::BadProgramHeaders));
        let outside = elf(0x1000, &[(0x1000, vec![0; 4], 2, RX)]); // filesz > memsz
        assert_eq!(parse(&outside, 0, 1 << 20), Err(LoadError::SegmentOutsideFile { index: 0 }));
        let too_high = elf(0xFF000, &[(0xFF000, vec![0; 4], 0x2000, RX)]);
        assert_eq!(parse(&too_high, 0, 1 << 20), Err(LoadError::SegmentOutsideGuest { index: 0 }));
        let too_low = elf(0x1000, &[(0x1000, vec![0; 4], 4, RX)]);
        assert_eq!(parse(&too_low, 0x10_0000, 4 << 20), Err(LoadError::SegmentOutsideGuest { index: 0 }));
        let wrapping = elf(0x1000, &[(u64::MAX - 1, vec![], 16, RX)]);
        assert_eq!(parse(&wrapping, 0, 1 << 20), Err(LoadError::SegmentOutsideGuest { index: 0 }));
        let overlap = elf(0x1000, &[(0x1000, vec![0; 4], 0x1000, RX), (0x1800, vec![0; 4], 0x1000, RW)]);
        assert_eq!(parse(&overlap, 0, 1 << 20), Err(LoadError::SegmentsOverlap { first: 0, second: 1 }));
        let data_entry = elf(0x1000, &[(0x1000, vec![0; 4], 4, RW)]);
        assert_eq!(parse(&data_entry, 0, 1 << 20), Err(LoadError::BadEntry));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, 0, 1 << 20);
        }

        #[test]
        fn never_panics_on_mutated_images(flips in proptest::collection::vec((0usize..300, any::<u8>()), 1..8)) {
            let mut image = elf(0x20_0000, &[(0x20_0000, vec![0x90; 64], 64, RX), (0x20_1000, vec![1; 8], 0x2000, RW)]);
            for (at, value) in flips {
                if let Some(byte) = image.get_mut(at) {
                    *byte = value;
                }
            }
            if let Ok(parsed) = parse(&image, 0x10_0000, 4 << 20) {
                for s in parsed.segments() {
                    prop_assert!(s.file_offset + s.file_size <= image.len());
                    prop_assert!(s.gpa >= 0x10_0000 && s.gpa + s.mem_size <= 4 << 20);
                }
            }
        }
    }
}
