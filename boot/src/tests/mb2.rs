//! Multiboot2 parsing: a valid MBI with every tag type, and each malformation with its
//! specific error.

use super::{fix_rsdp_checksums, rsdp_bytes, VecMemory};
use crate::multiboot2::{self, parse};
use crate::{
    BootInfoError, BootSource, MemoryKind, MemoryRegion, Module, Position, RsdpLocation, RsdpProblem, StringKind,
    StringProblem, BOOT_INFO_VERSION, MAX_MODULES, MAX_REGIONS,
};

/// Writes Multiboot2 tags into a buffer; [`MbiBuilder::finish`] appends the end tag and sets
/// `total_size`.
#[derive(Debug, Clone)]
pub(crate) struct MbiBuilder {
    bytes: Vec<u8>,
}

impl MbiBuilder {
    pub fn new() -> Self {
        Self { bytes: vec![0; 8] }
    }

    /// Returns the offset the next tag will start at.
    pub fn offset(&self) -> usize {
        self.bytes.len()
    }

    /// Appends a tag with an explicit `size` field, then pads to 8 bytes.
    pub fn raw_tag(mut self, tag_type: u32, size: u32, payload: &[u8]) -> Self {
        self.bytes.extend_from_slice(&tag_type.to_le_bytes());
        self.bytes.extend_from_slice(&size.to_le_bytes());
        self.bytes.extend_from_slice(payload);
        while self.bytes.len() % 8 != 0 {
            self.bytes.push(0);
        }
        self
    }

    /// Appends a tag whose size is its header plus `payload`.
    pub fn tag(self, tag_type: u32, payload: &[u8]) -> Self {
        let size = u32::try_from(8 + payload.len()).unwrap();
        self.raw_tag(tag_type, size, payload)
    }

    /// Appends a tag without padding after it (malformed unless its size is a multiple of 8).
    pub fn unpadded_tag(mut self, tag_type: u32, payload: &[u8]) -> Self {
        let size = u32::try_from(8 + payload.len()).unwrap();
        self.bytes.extend_from_slice(&tag_type.to_le_bytes());
        self.bytes.extend_from_slice(&size.to_le_bytes());
        self.bytes.extend_from_slice(payload);
        self
    }

    pub fn string_tag(self, tag_type: u32, text: &str) -> Self {
        let mut payload = text.as_bytes().to_vec();
        payload.push(0);
        self.tag(tag_type, &payload)
    }

    pub fn cmdline(self, text: &str) -> Self {
        self.string_tag(1, text)
    }

    pub fn loader_name(self, text: &str) -> Self {
        self.string_tag(2, text)
    }

    pub fn module(self, start: u32, end: u32, cmdline: &str) -> Self {
        let mut payload = Vec::new();
        payload.extend_from_slice(&start.to_le_bytes());
        payload.extend_from_slice(&end.to_le_bytes());
        payload.extend_from_slice(cmdline.as_bytes());
        payload.push(0);
        self.tag(3, &payload)
    }

    /// Appends a memory map whose entries are `(base, length, type)`, each padded with 0xAA
    /// bytes to `entry_size` (at least 20 bytes are written per entry).
    pub fn memory_map(self, entry_size: u32, version: u32, entries: &[(u64, u64, u32)]) -> Self {
        let mut payload = Vec::new();
        payload.extend_from_slice(&entry_size.to_le_bytes());
        payload.extend_from_slice(&version.to_le_bytes());
        for &(base, len, kind) in entries {
            let mut entry = Vec::new();
            entry.extend_from_slice(&base.to_le_bytes());
            entry.extend_from_slice(&len.to_le_bytes());
            entry.extend_from_slice(&kind.to_le_bytes());
            entry.resize(usize::try_from(entry_size).unwrap().max(20), 0xAA);
            if entry_size >= 24 {
                entry[20..24].copy_from_slice(&[0; 4]);
            }
            payload.extend_from_slice(&entry);
        }
        self.tag(6, &payload)
    }

    /// Appends the end tag and sets `total_size`.
    pub fn finish(mut self) -> Vec<u8> {
        self = self.tag(0, &[]);
        let total = u32::try_from(self.bytes.len()).unwrap();
        self.bytes[..4].copy_from_slice(&total.to_le_bytes());
        self.bytes
    }

    /// Sets `total_size` to the current length without an end tag.
    pub fn finish_without_end_tag(mut self) -> Vec<u8> {
        let total = u32::try_from(self.bytes.len()).unwrap();
        self.bytes[..4].copy_from_slice(&total.to_le_bytes());
        self.bytes
    }
}

/// A QEMU-like memory map: low RAM, the BIOS hole, RAM above 1 MiB, ACPI and a PCI hole.
pub(crate) const MAP: [(u64, u64, u32); 7] = [
    (0, 0x9_fc00, 1),
    (0x9_fc00, 0x400, 2),
    (0xf_0000, 0x1_0000, 2),
    (0x10_0000, 0x7ee_0000, 1),
    (0x7fe_0000, 0x2_0000, 3),
    (0x800_0000, 0x1000, 4),
    (0xfffc_0000, 0x4_0000, 2),
];

/// Builds a valid MBI with every tag type the parser reads, plus a framebuffer tag and an
/// unknown tag it skips. Returns the MBI and the offset of the new-RSDP tag's payload.
pub(crate) fn full_mbi() -> (Vec<u8>, usize) {
    let mut extra_map = MAP.to_vec();
    extra_map.push((0x900_0000, 0, 1)); // empty: dropped
    extra_map.push((0x1_0000_0000, 0x1000, 5));
    extra_map.push((0x1_0000_1000, 0x1000, 12));
    let builder = MbiBuilder::new()
        .cmdline("log=debug cpus=2")
        .loader_name("GRUB 2.12")
        .module(0x20_0000, 0x20_1234, "guest0 arg")
        .module(0x30_0000, 0x30_0000, "")
        .memory_map(24, 0, &extra_map)
        .tag(8, &[0x55; 30]) // framebuffer: ignored
        .tag(21, &[1, 2, 3]) // load base address: skipped
        .tag(14, &rsdp_bytes(0, 0xE_0000, 0));
    let rsdp_offset = builder.offset() + 8;
    let mbi = builder.tag(15, &rsdp_bytes(2, 0x7fe_1000, 0x7fe_2000)).tag(4, &[0; 8]).finish();
    (mbi, rsdp_offset)
}

#[test]
fn parses_every_tag_type() {
    let (mbi, rsdp_offset) = full_mbi();
    let info = parse(&mbi).unwrap();
    assert_eq!(info.version(), BOOT_INFO_VERSION);
    assert_eq!(info.source(), BootSource::Multiboot2);
    assert_eq!(info.command_line(), "log=debug cpus=2");
    assert_eq!(info.bootloader_name(), Some("GRUB 2.12"));
    assert_eq!(
        info.modules(),
        &[
            Module { start: 0x20_0000, end: 0x20_1234, cmdline: "guest0 arg" },
            Module { start: 0x30_0000, end: 0x30_0000, cmdline: "" },
        ]
    );
    let kinds: Vec<MemoryKind> = info.memory_map().iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            MemoryKind::Available,
            MemoryKind::Reserved,
            MemoryKind::Reserved,
            MemoryKind::Available,
            MemoryKind::AcpiReclaimable,
            MemoryKind::AcpiNvs,
            MemoryKind::Reserved,
            MemoryKind::Defective,
            MemoryKind::Other(12),
        ]
    );
    assert_eq!(info.memory_map()[3], MemoryRegion { start: 0x10_0000, len: 0x7ee_0000, kind: MemoryKind::Available });
    let rsdp = info.rsdp().unwrap();
    assert_eq!(rsdp.location, RsdpLocation::MbiOffset(rsdp_offset));
    assert_eq!(&mbi[rsdp_offset..rsdp_offset + 8], b"RSD PTR ");
    assert_eq!(rsdp.revision, 2);
    assert_eq!(rsdp.rsdt_address, 0x7fe_1000);
    assert_eq!(rsdp.xsdt_address, Some(0x7fe_2000));
    assert_eq!(rsdp.physical_address(0x1_0000), Some(0x1_0000 + rsdp_offset as u64));
    assert!(info.boot_data().is_empty());
}

#[test]
fn memory_kinds_display_as_the_protocol_spells_them() {
    let names: Vec<String> =
        [1, 2, 3, 4, 5, 7, 0xF00].into_iter().map(|raw| MemoryKind::from_raw(raw).to_string()).collect();
    assert_eq!(names, ["available", "reserved", "acpi-reclaimable", "acpi-nvs", "defective", "type-7", "type-3840"]);
    for raw in 0..20 {
        assert_eq!(MemoryKind::from_raw(raw).raw(), raw);
    }
    let region = MemoryRegion { start: 0x10_0000, len: 0x3ef_0000, kind: MemoryKind::Available };
    assert_eq!(region.to_string(), "0x0000000000100000-0x0000000003feffff available");
}

#[test]
fn minimal_mbi_has_empty_defaults() {
    let mbi = MbiBuilder::new().finish();
    assert_eq!(mbi.len(), 16);
    let info = parse(&mbi).unwrap();
    assert_eq!(info.command_line(), "");
    assert_eq!(info.bootloader_name(), None);
    assert!(info.memory_map().is_empty() && info.modules().is_empty() && info.rsdp().is_none());
}

#[test]
fn bytes_after_total_size_are_ignored() {
    let mut mbi = MbiBuilder::new().cmdline("x").finish();
    mbi.extend_from_slice(&[0xFF; 40]);
    assert_eq!(parse(&mbi).unwrap().command_line(), "x");
}

#[test]
fn honours_larger_entry_size_and_later_entry_versions() {
    let mbi = MbiBuilder::new().memory_map(40, 1, &MAP).finish();
    let info = parse(&mbi).unwrap();
    let got: Vec<(u64, u64, u32)> = info.memory_map().iter().map(|r| (r.start, r.len, r.kind.raw())).collect();
    assert_eq!(got, MAP);
}

#[test]
fn old_rsdp_alone_gives_revision_0_without_xsdt() {
    let builder = MbiBuilder::new();
    let offset = builder.offset() + 8;
    let mbi = builder.tag(14, &rsdp_bytes(0, 0xE_0000, 0)).finish();
    let rsdp = parse(&mbi).unwrap().rsdp().unwrap();
    assert_eq!(
        (rsdp.location, rsdp.revision, rsdp.rsdt_address, rsdp.xsdt_address),
        (RsdpLocation::MbiOffset(offset), 0, 0xE_0000, None)
    );
}

#[test]
fn new_rsdp_wins_over_a_later_old_one() {
    let mbi = MbiBuilder::new().tag(15, &rsdp_bytes(2, 1, 2)).tag(14, &rsdp_bytes(0, 3, 0)).finish();
    let rsdp = parse(&mbi).unwrap().rsdp().unwrap();
    assert_eq!((rsdp.revision, rsdp.rsdt_address, rsdp.xsdt_address), (2, 1, Some(2)));
}

#[test]
fn new_rsdp_tag_with_revision_0_is_read_as_acpi_1() {
    let mut bytes = rsdp_bytes(0, 0x1234, 0);
    bytes.resize(36, 0);
    let mbi = MbiBuilder::new().tag(15, &bytes).finish();
    let rsdp = parse(&mbi).unwrap().rsdp().unwrap();
    assert_eq!((rsdp.revision, rsdp.xsdt_address), (0, None));
}

#[test]
fn parse_at_reads_physical_memory_and_records_the_mbi_range() {
    let (mbi, rsdp_offset) = full_mbi();
    let base = 0x9000;
    let mut memory = VecMemory::new(base, 0x2000);
    memory.write(base + 0x100, &mbi);
    let info = multiboot2::parse_at(&memory, base + 0x100).unwrap();
    assert_eq!(info.command_line(), "log=debug cpus=2");
    assert_eq!(info.boot_data().len(), 1);
    assert_eq!(info.boot_data()[0].start(), base + 0x100);
    assert_eq!(info.boot_data()[0].len(), mbi.len() as u64);
    assert_eq!(info.rsdp().unwrap().physical_address(base + 0x100), Some(base + 0x100 + rsdp_offset as u64));
    // Through the magic dispatcher too.
    let via_magic = crate::parse(u64::from(multiboot2::LOADER_MAGIC), base + 0x100, &memory).unwrap();
    assert_eq!(via_magic, info);
}

#[test]
fn parse_at_reports_unreadable_memory() {
    let memory = VecMemory::new(0x1000, 0x100);
    assert_eq!(multiboot2::parse_at(&memory, 0x5000).unwrap_err(), BootInfoError::Unreadable { paddr: 0x5000, len: 8 });
    let mut memory = VecMemory::new(0x1000, 0x100);
    memory.write(0x1000, &0x200u32.to_le_bytes());
    assert_eq!(
        multiboot2::parse_at(&memory, 0x1000).unwrap_err(),
        BootInfoError::Unreadable { paddr: 0x1000, len: 0x200 }
    );
    let mut memory = VecMemory::new(0x1000, 0x100);
    memory.write(0x1000, &4u32.to_le_bytes());
    assert_eq!(multiboot2::parse_at(&memory, 0x1000).unwrap_err(), BootInfoError::TotalSizeTooSmall { total_size: 4 });
}

#[test]
fn unknown_magic_is_refused() {
    let memory = VecMemory::new(0, 16);
    assert_eq!(crate::parse(0x2BAD_B002, 0, &memory).unwrap_err(), BootInfoError::UnknownMagic { magic: 0x2BAD_B002 });
}

fn set_total_size(mbi: &mut [u8], total: u32) {
    mbi[..4].copy_from_slice(&total.to_le_bytes());
}

#[test]
fn buffer_shorter_than_the_fixed_part_is_truncated() {
    for len in 0..8 {
        let err = parse(&vec![0x10; len]).unwrap_err();
        assert_eq!(err, BootInfoError::Truncated { at: Position::MbiOffset(0), needed: 8 }, "len {len}");
    }
}

#[test]
fn total_size_below_16_is_refused() {
    for total in [0, 4, 7, 8, 15] {
        let mut mbi = MbiBuilder::new().finish();
        set_total_size(&mut mbi, total);
        assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::TotalSizeTooSmall { total_size: total });
    }
}

#[test]
fn total_size_beyond_the_buffer_is_refused() {
    let mut mbi = MbiBuilder::new().cmdline("abc").finish();
    let len = mbi.len();
    set_total_size(&mut mbi, u32::try_from(len + 8).unwrap());
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::SizeExceedsBuffer { total_size: (len + 8) as u32, available: len }
    );
    set_total_size(&mut mbi, u32::MAX);
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::SizeExceedsBuffer { total_size: u32::MAX, available: len });
}

#[test]
fn unpadded_tags_are_refused() {
    // A 13-byte tag followed directly by the end tag: total_size 29 is not a multiple of 8.
    let mut mbi = MbiBuilder::new().unpadded_tag(1, b"abcd\0").unpadded_tag(0, &[]).finish_without_end_tag();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::Misaligned { offset: 29 });
    // Padded to a multiple of 8 at the end, the aligned reader lands inside the end tag.
    mbi.extend_from_slice(&[0; 3]);
    set_total_size(&mut mbi, 32);
    assert!(parse(&mbi).is_err());
}

#[test]
fn tag_smaller_than_its_header_is_refused() {
    for size in 0..8 {
        let mbi = MbiBuilder::new().cmdline("a").raw_tag(1, size, &[0; 8]).finish();
        assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::TagTooSmall { offset: 24, tag_type: 1, size, minimum: 8 });
    }
}

#[test]
fn tag_overrunning_total_size_is_refused() {
    let mbi = MbiBuilder::new().raw_tag(2, 40, b"grub\0").finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::TagOverrun { offset: 8, tag_type: 2, size: 40, total_size: 32 }
    );
    let mbi = MbiBuilder::new().raw_tag(77, u32::MAX, &[]).finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::TagOverrun { offset: 8, tag_type: 77, size: u32::MAX, total_size: 24 }
    );
}

#[test]
fn missing_end_tag_is_refused() {
    let mbi = MbiBuilder::new().cmdline("abc").finish_without_end_tag();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::MissingEndTag { total_size: 24 });
}

#[test]
fn end_tag_of_wrong_size_is_refused() {
    let mbi = MbiBuilder::new().raw_tag(0, 16, &[0; 8]).finish();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::BadEndTag { offset: 8, size: 16 });
}

#[test]
fn memory_map_entry_size_below_24_or_unaligned_is_refused() {
    for entry_size in [0, 8, 16, 20, 28, 36] {
        let mbi = MbiBuilder::new().memory_map(entry_size, 0, &MAP[..1]).finish();
        assert_eq!(
            parse(&mbi).unwrap_err(),
            BootInfoError::BadMemoryMapEntrySize { offset: 8, entry_size },
            "entry_size {entry_size}"
        );
    }
}

#[test]
fn memory_map_with_a_partial_entry_is_refused() {
    let mut payload = Vec::new();
    payload.extend_from_slice(&24u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&[0; 24 + 12]);
    let mbi = MbiBuilder::new().tag(6, &payload).finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::PartialMemoryMapEntry { offset: 8, entries_len: 36, entry_size: 24 }
    );
}

#[test]
fn memory_map_tag_without_its_fixed_fields_is_refused() {
    let mbi = MbiBuilder::new().tag(6, &24u32.to_le_bytes()).finish();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::TagTooSmall { offset: 8, tag_type: 6, size: 12, minimum: 16 });
}

#[test]
fn too_many_regions_are_refused() {
    let entries: Vec<(u64, u64, u32)> = (0..=MAX_REGIONS as u64).map(|i| (i << 12, 0x1000, 1)).collect();
    let full = MbiBuilder::new().memory_map(24, 0, &entries[..MAX_REGIONS]).finish();
    assert_eq!(parse(&full).unwrap().memory_map().len(), MAX_REGIONS);
    let over = MbiBuilder::new().memory_map(24, 0, &entries).finish();
    assert_eq!(parse(&over).unwrap_err(), BootInfoError::TooManyRegions { capacity: MAX_REGIONS });
    // Across two memory-map tags as well.
    let split = MbiBuilder::new().memory_map(24, 0, &entries[..64]).memory_map(24, 0, &entries[64..]).finish();
    assert_eq!(parse(&split).unwrap_err(), BootInfoError::TooManyRegions { capacity: MAX_REGIONS });
}

#[test]
fn wrapping_region_is_refused() {
    let mbi = MbiBuilder::new().memory_map(24, 0, &[(u64::MAX - 0xFFF, 0x1001, 2)]).finish();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::RegionWraps { start: u64::MAX - 0xFFF, len: 0x1001 });
    // Reaching exactly 2^64 is allowed; `end()` saturates, `last()` is exact.
    let mbi = MbiBuilder::new().memory_map(24, 0, &[(u64::MAX - 0xFFF, 0x1000, 2)]).finish();
    let region = parse(&mbi).unwrap().memory_map()[0];
    assert_eq!((region.end(), region.last()), (u64::MAX, u64::MAX));
    assert_eq!(region.to_string(), "0xfffffffffffff000-0xffffffffffffffff reserved");
}

#[test]
fn too_many_modules_are_refused() {
    let mut builder = MbiBuilder::new();
    for i in 0..MAX_MODULES as u32 {
        builder = builder.module(i << 20, (i << 20) + 0x1000, "m");
    }
    assert_eq!(parse(&builder.clone().finish()).unwrap().modules().len(), MAX_MODULES);
    let over = builder.module(0xF00_0000, 0xF00_1000, "one too many").finish();
    assert_eq!(parse(&over).unwrap_err(), BootInfoError::TooManyModules { capacity: MAX_MODULES });
}

#[test]
fn module_ending_before_its_start_is_refused() {
    let mbi = MbiBuilder::new().module(0x20_0000, 0x1F_0000, "").finish();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::BadModuleRange { start: 0x20_0000, end: 0x1F_0000 });
}

#[test]
fn module_tag_without_addresses_is_refused() {
    let mbi = MbiBuilder::new().tag(3, &[0; 4]).finish();
    assert_eq!(parse(&mbi).unwrap_err(), BootInfoError::TagTooSmall { offset: 8, tag_type: 3, size: 12, minimum: 16 });
}

#[test]
fn unterminated_strings_are_refused() {
    let mbi = MbiBuilder::new().tag(1, b"log=info").finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::BadString {
            kind: StringKind::CommandLine,
            at: Position::MbiOffset(16),
            problem: StringProblem::Unterminated { searched: 8 },
        }
    );
    // An empty payload has no terminator either.
    let mbi = MbiBuilder::new().tag(2, b"").finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::BadString {
            kind: StringKind::BootloaderName,
            at: Position::MbiOffset(16),
            problem: StringProblem::Unterminated { searched: 0 },
        }
    );
}

#[test]
fn strings_that_are_not_utf8_are_refused() {
    let mbi = MbiBuilder::new().tag(2, b"GR\xffUB\0").finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::BadString {
            kind: StringKind::BootloaderName,
            at: Position::MbiOffset(16),
            problem: StringProblem::InvalidUtf8
        }
    );
    let mut payload = vec![0, 0, 0x20, 0, 0, 0x10, 0x20, 0];
    payload.extend_from_slice(b"\xc3\x28\0");
    let mbi = MbiBuilder::new().module(1, 2, "ok").tag(3, &payload).finish();
    assert_eq!(
        parse(&mbi).unwrap_err(),
        BootInfoError::BadString {
            kind: StringKind::ModuleCommandLine { index: 1 },
            at: Position::MbiOffset(32 + 16),
            problem: StringProblem::InvalidUtf8,
        }
    );
}

#[test]
fn string_stops_at_the_first_nul() {
    let mbi = MbiBuilder::new().tag(1, b"cpus=1\0garbage\xff\0").finish();
    assert_eq!(parse(&mbi).unwrap().command_line(), "cpus=1");
}

fn rsdp_error(tag_type: u32, rsdp: &[u8]) -> BootInfoError {
    parse(&MbiBuilder::new().tag(tag_type, rsdp).finish()).unwrap_err()
}

#[test]
fn rsdp_with_bad_checksum_is_refused() {
    let at = Position::MbiOffset(16);
    let mut old = rsdp_bytes(0, 0xE_0000, 0);
    old[16] ^= 1;
    assert_eq!(rsdp_error(14, &old), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadChecksum });
    let mut new = rsdp_bytes(2, 0xE_0000, 0x1234);
    new[16] ^= 1;
    assert_eq!(rsdp_error(15, &new), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadChecksum });
    let mut new = rsdp_bytes(2, 0xE_0000, 0x1234);
    new[24] ^= 1; // XSDT address: only the extended checksum covers it
    assert_eq!(rsdp_error(15, &new), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadExtendedChecksum });
}

#[test]
fn rsdp_with_bad_signature_is_refused() {
    let mut old = rsdp_bytes(0, 1, 0);
    old[..8].copy_from_slice(b"RSD PTR_");
    fix_rsdp_checksums(&mut old);
    assert_eq!(
        rsdp_error(14, &old),
        BootInfoError::BadRsdp { at: Position::MbiOffset(16), problem: RsdpProblem::BadSignature }
    );
}

#[test]
fn rsdp_with_bad_length_is_refused() {
    for length in [0u32, 20, 35, 37, 4097, u32::MAX] {
        let mut new = rsdp_bytes(2, 1, 2);
        new[20..24].copy_from_slice(&length.to_le_bytes());
        fix_rsdp_checksums(&mut new);
        assert_eq!(
            rsdp_error(15, &new),
            BootInfoError::BadRsdp { at: Position::MbiOffset(16), problem: RsdpProblem::BadLength { length } },
            "length {length}"
        );
    }
}

#[test]
fn rsdp_tags_shorter_than_an_rsdp_are_refused() {
    let old = rsdp_bytes(0, 1, 0);
    assert_eq!(
        rsdp_error(14, &old[..19]),
        BootInfoError::TagTooSmall { offset: 8, tag_type: 14, size: 27, minimum: 28 }
    );
    let new = rsdp_bytes(2, 1, 2);
    assert_eq!(
        rsdp_error(15, &new[..20]),
        BootInfoError::TagTooSmall { offset: 8, tag_type: 15, size: 28, minimum: 44 }
    );
}

#[test]
fn errors_display_as_one_line() {
    let errors = [
        BootInfoError::UnknownMagic { magic: 1 },
        BootInfoError::Truncated { at: Position::MbiOffset(0), needed: 8 },
        BootInfoError::SizeExceedsBuffer { total_size: 64, available: 16 },
        BootInfoError::TotalSizeTooSmall { total_size: 4 },
        BootInfoError::Misaligned { offset: 29 },
        BootInfoError::TagTooSmall { offset: 8, tag_type: 6, size: 12, minimum: 16 },
        BootInfoError::TagOverrun { offset: 8, tag_type: 2, size: 40, total_size: 32 },
        BootInfoError::BadEndTag { offset: 8, size: 16 },
        BootInfoError::MissingEndTag { total_size: 24 },
        BootInfoError::BadMemoryMapEntrySize { offset: 8, entry_size: 0 },
        BootInfoError::PartialMemoryMapEntry { offset: 8, entries_len: 36, entry_size: 24 },
        BootInfoError::RegionWraps { start: 1, len: u64::MAX },
        BootInfoError::BadModuleRange { start: 2, end: 1 },
        BootInfoError::TooManyRegions { capacity: 128 },
        BootInfoError::TooManyModules { capacity: 16 },
        BootInfoError::BadString {
            kind: StringKind::ModuleCommandLine { index: 3 },
            at: Position::Phys(0x7000),
            problem: StringProblem::Unterminated { searched: 4096 },
        },
        BootInfoError::BadRsdp { at: Position::MbiOffset(16), problem: RsdpProblem::BadLength { length: 7 } },
        BootInfoError::BadPvhMagic { magic: 0 },
        BootInfoError::UnsupportedPvhVersion { version: 0 },
        BootInfoError::Unreadable { paddr: 0, len: 56 },
    ];
    for error in errors {
        let line = error.to_string();
        assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
    }
    assert_eq!(
        BootInfoError::TagOverrun { offset: 8, tag_type: 2, size: 40, total_size: 32 }.to_string(),
        "Multiboot2 tag type 2 at offset 8 with size 40 runs past total_size 32"
    );
    assert_eq!(
        BootInfoError::BadString {
            kind: StringKind::CommandLine,
            at: Position::Phys(0x7000),
            problem: StringProblem::InvalidUtf8
        }
        .to_string(),
        "command line at physical address 0x7000 is not valid UTF-8"
    );
    assert_eq!(
        BootInfoError::BadRsdp { at: Position::MbiOffset(16), problem: RsdpProblem::BadChecksum }.to_string(),
        "ACPI RSDP at offset 16 of the Multiboot2 information: checksum of the first 20 bytes is wrong"
    );
}
