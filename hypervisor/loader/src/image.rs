//! What kind of kernel a boot module holds, recognised from its headers alone, and the
//! pieces every OS loader shares: the guest memory it writes through ([`GuestMemory`]),
//! the PC memory map ([`pc_e820`]), identity-mapped page tables and a flat boot GDT.

use core::fmt;

/// The kinds of image the hypervisor can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A Linux bzImage (x86 boot protocol, "HdrS" at 0x202).
    BzImage,
    /// A Multiboot2 kernel; the header is at this file offset.
    Multiboot2 { header: usize },
    /// A Multiboot (v1) kernel; the header is at this file offset.
    Multiboot1 { header: usize },
    /// One of our own bare-metal guests: a 64-bit ELF executable.
    Elf64,
    /// None of these.
    Unknown,
}

/// Multiboot v1 header magic and search window (Multiboot 0.6.96 §3.1.1).
pub const MB1_MAGIC: u32 = 0x1BAD_B002;
pub const MB1_SEARCH: usize = 8192;
/// Multiboot2 header magic and search window (Multiboot2 1.6 §3.1.1).
pub const MB2_MAGIC: u32 = 0xE852_50D6;
pub const MB2_SEARCH: usize = 32768;

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Finds a Multiboot2 header: 8-aligned in the first 32 KiB, magic, architecture 0 (i386),
/// a length that fits, and a checksum that makes the four fields sum to 0.
fn find_mb2(image: &[u8]) -> Option<usize> {
    (0..image.len().min(MB2_SEARCH)).step_by(8).find(|&at| {
        let field = |i: usize| u32_at(image, at + 4 * i);
        match (field(0), field(1), field(2), field(3)) {
            (Some(MB2_MAGIC), Some(0), Some(len), Some(sum)) => {
                len >= 24
                    && (at as u64 + u64::from(len)) <= image.len() as u64
                    && MB2_MAGIC.wrapping_add(len).wrapping_add(sum) == 0
            }
            _ => false,
        }
    })
}

/// Finds a Multiboot v1 header: 4-aligned in the first 8 KiB, magic and checksum.
fn find_mb1(image: &[u8]) -> Option<usize> {
    (0..image.len().min(MB1_SEARCH)).step_by(4).find(|&at| {
        match (u32_at(image, at), u32_at(image, at + 4), u32_at(image, at + 8)) {
            (Some(MB1_MAGIC), Some(flags), Some(sum)) => MB1_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0,
            _ => false,
        }
    })
}

impl ImageKind {
    /// Recognises `image`: a bzImage by its boot sector and setup signature, then a
    /// Multiboot2 header, then a Multiboot v1 header, then a 64-bit ELF (the kernel's own
    /// multiboot header wins over its ELF container, as with GRUB).
    pub fn detect(image: &[u8]) -> ImageKind {
        if u16_at(image, 0x1FE) == Some(0xAA55) && image.get(0x202..0x206) == Some(b"HdrS") {
            return ImageKind::BzImage;
        }
        if let Some(header) = find_mb2(image) {
            return ImageKind::Multiboot2 { header };
        }
        if let Some(header) = find_mb1(image) {
            return ImageKind::Multiboot1 { header };
        }
        if image.get(..5) == Some(b"\x7fELF\x02") {
            return ImageKind::Elf64;
        }
        ImageKind::Unknown
    }

    /// Returns the kind's name for log lines.
    pub fn name(&self) -> &'static str {
        match self {
            ImageKind::BzImage => "Linux bzImage",
            ImageKind::Multiboot2 { .. } => "Multiboot2 kernel",
            ImageKind::Multiboot1 { .. } => "Multiboot kernel",
            ImageKind::Elf64 => "64-bit ELF guest",
            ImageKind::Unknown => "unknown image",
        }
    }
}

/// A write outside the guest's memory: a loader bug or an image that does not fit,
/// refused instead of performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfGuest {
    pub gpa: u64,
    pub len: u64,
}

impl fmt::Display for OutOfGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes at guest-physical {:#x} lie outside the VM's memory", self.len, self.gpa)
    }
}

/// Guest-physical memory as the loaders write it (zeroed before loading).
pub trait GuestMemory {
    /// Returns the memory's size in bytes (it starts at guest-physical 0).
    fn size(&self) -> u64;
    /// Copies `bytes` to guest-physical `gpa`; refuses a range outside the memory.
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), OutOfGuest>;
}

/// E820 types (ACPI 6.5 §15.1).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The top of conventional memory: the EBDA and the legacy ROM/video hole start here.
pub const LOW_RAM_END: u64 = 0x9F000;
/// Where the 1 MiB hole (EBDA, VGA, option ROMs, BIOS: the ACPI tables live in it) ends.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Returns a PC's memory map for `mem` bytes of guest memory: RAM below 636 KiB (Linux's
/// decompressor needs it), the hole reserved, RAM from 1 MiB to the end. Nothing else is
/// the VM's, so nothing else is described.
pub fn pc_e820(mem: u64) -> [E820Entry; 3] {
    [
        E820Entry { addr: 0, size: LOW_RAM_END, kind: E820_RAM },
        E820Entry { addr: LOW_RAM_END, size: HIGH_RAM_START - LOW_RAM_END, kind: E820_RESERVED },
        E820Entry { addr: HIGH_RAM_START, size: mem.saturating_sub(HIGH_RAM_START), kind: E820_RAM },
    ]
}

/// Writes page tables at `at` (six pages: PML4, PDPT, four page directories) that
/// identity-map the first 4 GiB with 2 MiB pages, writable and executable; returns the
/// value for CR3. The OS replaces them with its own early on.
pub fn write_identity_map(mem: &mut dyn GuestMemory, at: u64) -> Result<u64, OutOfGuest> {
    const PRESENT_RW: u64 = 0x3;
    const LARGE: u64 = 0x80;
    mem.write(at, &((at + 0x1000) | PRESENT_RW).to_le_bytes())?;
    for i in 0..4u64 {
        mem.write(at + 0x1000 + i * 8, &((at + 0x2000 + i * 0x1000) | PRESENT_RW).to_le_bytes())?;
    }
    let mut pd = [0u8; 4096];
    for dir in 0..4u64 {
        for i in 0..512u64 {
            let entry = ((dir << 30) | (i << 21)) | PRESENT_RW | LARGE;
            pd[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_le_bytes());
        }
        mem.write(at + 0x2000 + dir * 0x1000, &pd)?;
    }
    Ok(at)
}

/// The boot GDT's selectors: Linux's `__BOOT_CS`/`__BOOT_DS` (boot.rst, "64-bit boot
/// protocol"), also used as the flat 32-bit segments of a Multiboot entry.
pub const BOOT_CS64: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_CS32: u16 = 0x20;
/// The GDT's limit (five 8-byte descriptors).
pub const BOOT_GDT_LIMIT: u16 = 5 * 8 - 1;

/// Writes the boot GDT at `at`: null, null, 64-bit code (0x10), flat data (0x18), flat
/// 32-bit code (0x20), each base 0 limit 4 GiB.
pub fn write_boot_gdt(mem: &mut dyn GuestMemory, at: u64) -> Result<(), OutOfGuest> {
    let descriptors: [u64; 5] = [0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x00CF_9B00_0000_FFFF];
    for (i, d) in descriptors.iter().enumerate() {
        mem.write(at + i as u64 * 8, &d.to_le_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testmem {
    use super::*;

    /// A guest memory backed by a vector.
    pub struct VecMemory(pub Vec<u8>);

    impl GuestMemory for VecMemory {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), OutOfGuest> {
            let err = OutOfGuest { gpa, len: bytes.len() as u64 };
            let start = usize::try_from(gpa).map_err(|_| err)?;
            let end = start.checked_add(bytes.len()).ok_or(err)?;
            self.0.get_mut(start..end).ok_or(err)?.copy_from_slice(bytes);
            Ok(())
        }
    }

    impl VecMemory {
        pub fn u32(&self, at: u64) -> u32 {
            u32_at(&self.0, at as usize).unwrap()
        }
        pub fn u64(&self, at: u64) -> u64 {
            u64_at(&self.0, at as usize).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testmem::VecMemory;
    use super::*;

    #[test]
    fn detects_each_kind() {
        let mut bz = vec![0u8; 0x400];
        bz[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(ImageKind::detect(&bz), ImageKind::BzImage);

        let mut mb1 = vec![0u8; 0x100];
        mb1[0x40..0x44].copy_from_slice(&MB1_MAGIC.to_le_bytes());
        mb1[0x44..0x48].copy_from_slice(&0x10003u32.to_le_bytes());
        mb1[0x48..0x4C].copy_from_slice(&0u32.wrapping_sub(MB1_MAGIC).wrapping_sub(0x10003).to_le_bytes());
        assert_eq!(ImageKind::detect(&mb1), ImageKind::Multiboot1 { header: 0x40 });
        mb1[0x48] ^= 1;
        assert_eq!(ImageKind::detect(&mb1), ImageKind::Unknown, "bad checksum");

        let mut mb2 = vec![0u8; 0x100];
        mb2[0x18..0x1C].copy_from_slice(&MB2_MAGIC.to_le_bytes());
        mb2[0x20..0x24].copy_from_slice(&24u32.to_le_bytes());
        mb2[0x24..0x28].copy_from_slice(&0u32.wrapping_sub(MB2_MAGIC).wrapping_sub(24).to_le_bytes());
        assert_eq!(ImageKind::detect(&mb2), ImageKind::Multiboot2 { header: 0x18 });

        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        assert_eq!(ImageKind::detect(&elf), ImageKind::Elf64);
        assert_eq!(ImageKind::detect(b"#!/bin/sh\n"), ImageKind::Unknown);
        assert_eq!(ImageKind::detect(&[]), ImageKind::Unknown);
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mut m = VecMemory(vec![0; 0x10000]);
        let cr3 = write_identity_map(&mut m, 0x9000).unwrap();
        assert_eq!(cr3, 0x9000);
        assert_eq!(m.u64(0x9000), 0xA003);
        assert_eq!(m.u64(0xA000 + 3 * 8), 0xE003);
        assert_eq!(m.u64(0xB000 + 8), 0x20_0083);
        assert_eq!(m.u64(0xE000 + 511 * 8), 0xFFE0_0083);
        assert!(write_identity_map(&mut m, 0xC000).is_err(), "does not fit");
    }

    #[test]
    fn e820_has_low_ram_hole_and_high_ram() {
        let map = pc_e820(128 << 20);
        assert_eq!(map[0], E820Entry { addr: 0, size: 0x9F000, kind: E820_RAM });
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[2].addr + map[2].size, 128 << 20);
    }
}
