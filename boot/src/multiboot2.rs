//! Parses the Multiboot2 boot information structure (the "MBI", Multiboot2 spec §3.6,
//! "Boot information format"): a fixed part `u32 total_size, u32 reserved`, then tags
//! `u32 type, u32 size, payload`, each starting 8-byte aligned, ending with a tag of type 0
//! and size 8. Every field is bounds-checked; a malformed MBI yields a [`BootInfoError`],
//! never a panic.

use crate::bytes::{align_up_8, u32_at, u64_at, until_nul};
use crate::error::{BootInfoError, Position, StringKind, StringProblem};
use crate::info::{BootInfo, BootSource, MemoryKind, MemoryRegion, Module, RsdpLocation, MAX_MODULES, MAX_REGIONS};
use crate::memory::PhysRange;
use crate::{rsdp, PhysMemory};

/// The value a Multiboot2 loader leaves in EAX (Multiboot2 spec §3.3, "Machine state").
pub const LOADER_MAGIC: u32 = 0x36d7_6289;

/// The first field of the Multiboot2 header in the image (Multiboot2 spec §3.1.2).
pub const HEADER_MAGIC: u32 = 0xE852_50D6;

/// The fixed part: `total_size` and `reserved`.
const FIXED_PART_LEN: usize = 8;
/// A tag's `type` and `size`.
const TAG_HEADER_LEN: usize = 8;
/// The fixed part plus the end tag.
const MIN_TOTAL_SIZE: u32 = 16;

const TAG_END: u32 = 0;
const TAG_COMMAND_LINE: u32 = 1;
const TAG_BOOTLOADER_NAME: u32 = 2;
const TAG_MODULE: u32 = 3;
const TAG_MEMORY_MAP: u32 = 6;
const TAG_FRAMEBUFFER: u32 = 8;
const TAG_ACPI_OLD_RSDP: u32 = 14;
const TAG_ACPI_NEW_RSDP: u32 = 15;

/// Module tag: `mod_start`, `mod_end`, then the string (Multiboot2 spec §3.6, "Modules").
const MODULE_FIXED_LEN: usize = 8;
/// Memory-map tag: `entry_size`, `entry_version`, then entries (§3.6, "Memory map").
const MEMORY_MAP_FIXED_LEN: usize = 8;
/// A version-0 memory-map entry: `u64 base_addr, u64 length, u32 type, u32 reserved`.
const MEMORY_MAP_ENTRY_MIN: u32 = 24;

/// Parses the MBI at physical address `paddr`: reads `total_size`, then the whole structure
/// through `memory`, and records its range as boot data.
pub fn parse_at<M: PhysMemory + ?Sized>(memory: &M, paddr: u64) -> Result<BootInfo<'_>, BootInfoError> {
    let fixed = crate::read_phys(memory, paddr, FIXED_PART_LEN)?;
    let total_size = u32_at(fixed, 0).ok_or(BootInfoError::Unreadable { paddr, len: FIXED_PART_LEN })?;
    if total_size < MIN_TOTAL_SIZE {
        return Err(BootInfoError::TotalSizeTooSmall { total_size });
    }
    let len = usize::try_from(total_size).map_err(|_| BootInfoError::Unreadable { paddr, len: usize::MAX })?;
    let mbi = crate::read_phys(memory, paddr, len)?;
    let mut info = parse(mbi)?;
    let range =
        PhysRange::from_start_len(paddr, u64::from(total_size)).ok_or(BootInfoError::Unreadable { paddr, len })?;
    // Cannot fail: `parse` records no boot data, so the list is empty.
    info.boot_data.push(range).map_err(|_| BootInfoError::Unreadable { paddr, len })?;
    Ok(info)
}

/// Parses an MBI given as bytes (its `total_size` may be smaller than `mbi`). The RSDP, if
/// any, is located by its offset in `mbi`; [`BootInfo::boot_data`] stays empty.
pub fn parse(mbi: &[u8]) -> Result<BootInfo<'_>, BootInfoError> {
    let fixed = mbi.get(..FIXED_PART_LEN);
    let total_size = fixed
        .and_then(|fixed| u32_at(fixed, 0))
        .ok_or(BootInfoError::Truncated { at: Position::MbiOffset(0), needed: FIXED_PART_LEN })?;
    if total_size < MIN_TOTAL_SIZE {
        return Err(BootInfoError::TotalSizeTooSmall { total_size });
    }
    let too_big = BootInfoError::SizeExceedsBuffer { total_size, available: mbi.len() };
    let total = usize::try_from(total_size).map_err(|_| too_big)?;
    let mbi = mbi.get(..total).ok_or(too_big)?;
    if total % 8 != 0 {
        return Err(BootInfoError::Misaligned { offset: total });
    }

    let mut info = BootInfo::empty(BootSource::Multiboot2);
    let mut offset = FIXED_PART_LEN;
    // Each tag is at least 8 bytes (checked below), so this ends within total / 8 rounds.
    while offset < total {
        let truncated = BootInfoError::Truncated { at: Position::MbiOffset(offset), needed: TAG_HEADER_LEN };
        let tag_type = u32_at(mbi, offset).ok_or(truncated)?;
        let size = u32_at(mbi, offset.saturating_add(4)).ok_or(truncated)?;
        if tag_type == TAG_END {
            return if size == 8 { Ok(info) } else { Err(BootInfoError::BadEndTag { offset, size }) };
        }
        let tag = Tag { offset, tag_type, size };
        tag.require(TAG_HEADER_LEN)?;
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| offset.checked_add(size))
            .filter(|&end| end <= total)
            .ok_or(BootInfoError::TagOverrun { offset, tag_type, size, total_size })?;
        let payload = mbi.get(offset.saturating_add(TAG_HEADER_LEN)..end).ok_or(truncated)?;
        tag.apply(payload, &mut info)?;
        // `end <= total` and `total` is a multiple of 8, so the next tag starts at or before it.
        offset = align_up_8(end).ok_or(BootInfoError::Misaligned { offset: end })?;
    }
    Err(BootInfoError::MissingEndTag { total_size })
}

/// One tag's header, for error reports.
#[derive(Clone, Copy)]
struct Tag {
    offset: usize,
    tag_type: u32,
    size: u32,
}

impl Tag {
    /// Checks that the tag is at least `minimum` bytes long (header included).
    fn require(self, minimum: usize) -> Result<(), BootInfoError> {
        match usize::try_from(self.size) {
            Ok(size) if size >= minimum => Ok(()),
            _ => Err(BootInfoError::TagTooSmall {
                offset: self.offset,
                tag_type: self.tag_type,
                size: self.size,
                minimum: u32::try_from(minimum).unwrap_or(u32::MAX),
            }),
        }
    }

    /// Returns the offset of the payload byte `at` within the MBI.
    fn payload_offset(self, at: usize) -> usize {
        self.offset.saturating_add(TAG_HEADER_LEN).saturating_add(at)
    }

    /// Records what the tag says in `info`; unknown tags and the framebuffer are skipped.
    fn apply<'a>(self, payload: &'a [u8], info: &mut BootInfo<'a>) -> Result<(), BootInfoError> {
        match self.tag_type {
            TAG_COMMAND_LINE => info.command_line = self.string(payload, 0, StringKind::CommandLine)?,
            TAG_BOOTLOADER_NAME => {
                info.bootloader_name = Some(self.string(payload, 0, StringKind::BootloaderName)?);
            }
            TAG_MODULE => self.module(payload, info)?,
            TAG_MEMORY_MAP => self.memory_map(payload, info)?,
            TAG_ACPI_OLD_RSDP => self.rsdp(payload, info, false)?,
            TAG_ACPI_NEW_RSDP => self.rsdp(payload, info, true)?,
            TAG_FRAMEBUFFER => {}
            _ => {}
        }
        Ok(())
    }

    /// Reads the NUL-terminated UTF-8 string at payload byte `at`.
    fn string(self, payload: &[u8], at: usize, kind: StringKind) -> Result<&str, BootInfoError> {
        let position = Position::MbiOffset(self.payload_offset(at));
        let bytes = payload.get(at..).unwrap_or(&[]);
        let problem = |problem| BootInfoError::BadString { kind, at: position, problem };
        let text = until_nul(bytes).ok_or(problem(StringProblem::Unterminated { searched: bytes.len() }))?;
        core::str::from_utf8(text).map_err(|_| problem(StringProblem::InvalidUtf8))
    }

    /// Records a module tag: `u32 mod_start, u32 mod_end, string` (end exclusive).
    fn module<'a>(self, payload: &'a [u8], info: &mut BootInfo<'a>) -> Result<(), BootInfoError> {
        self.require(TAG_HEADER_LEN + MODULE_FIXED_LEN)?;
        let truncated = BootInfoError::Truncated { at: Position::MbiOffset(self.offset), needed: MODULE_FIXED_LEN };
        let start = u64::from(u32_at(payload, 0).ok_or(truncated)?);
        let end = u64::from(u32_at(payload, 4).ok_or(truncated)?);
        if end < start {
            return Err(BootInfoError::BadModuleRange { start, end });
        }
        let index = info.modules.len();
        let cmdline = self.string(payload, MODULE_FIXED_LEN, StringKind::ModuleCommandLine { index })?;
        info.modules
            .push(Module { start, end, cmdline })
            .map_err(|_| BootInfoError::TooManyModules { capacity: MAX_MODULES })
    }

    /// Records a memory-map tag: `u32 entry_size, u32 entry_version`, then entries of
    /// `entry_size` bytes starting `u64 base_addr, u64 length, u32 type`. Later entry
    /// versions are backward compatible (§3.6, "Memory map"), so any version is read as 0.
    /// Empty entries are dropped.
    fn memory_map(self, payload: &[u8], info: &mut BootInfo<'_>) -> Result<(), BootInfoError> {
        self.require(TAG_HEADER_LEN + MEMORY_MAP_FIXED_LEN)?;
        let truncated = BootInfoError::Truncated { at: Position::MbiOffset(self.offset), needed: MEMORY_MAP_FIXED_LEN };
        let entry_size = u32_at(payload, 0).ok_or(truncated)?;
        let bad_size = BootInfoError::BadMemoryMapEntrySize { offset: self.offset, entry_size };
        if entry_size < MEMORY_MAP_ENTRY_MIN || entry_size % 8 != 0 {
            return Err(bad_size);
        }
        let stride = usize::try_from(entry_size).map_err(|_| bad_size)?;
        let entries = payload.get(MEMORY_MAP_FIXED_LEN..).unwrap_or(&[]);
        if entries.len() % stride != 0 {
            return Err(BootInfoError::PartialMemoryMapEntry {
                offset: self.offset,
                entries_len: entries.len(),
                entry_size,
            });
        }
        for entry in entries.chunks_exact(stride) {
            let truncated = BootInfoError::Truncated { at: Position::MbiOffset(self.offset), needed: stride };
            let start = u64_at(entry, 0).ok_or(truncated)?;
            let len = u64_at(entry, 8).ok_or(truncated)?;
            let kind = MemoryKind::from_raw(u32_at(entry, 16).ok_or(truncated)?);
            push_region(info, MemoryRegion { start, len, kind })?;
        }
        Ok(())
    }

    /// Records an ACPI RSDP tag (type 14: a copy of the ACPI 1.0 RSDP; type 15: a copy of
    /// the ACPI 2.0+ RSDP). A type-15 RSDP takes precedence over a type-14 one.
    fn rsdp(self, payload: &[u8], info: &mut BootInfo<'_>, new: bool) -> Result<(), BootInfoError> {
        let minimum = if new { rsdp::V2_LEN } else { rsdp::V1_LEN };
        self.require(TAG_HEADER_LEN + minimum)?;
        let offset = self.payload_offset(0);
        let location = RsdpLocation::MbiOffset(offset);
        let parsed = rsdp::validate(payload, location, new)
            .map_err(|problem| BootInfoError::BadRsdp { at: Position::MbiOffset(offset), problem })?;
        if new || info.rsdp.is_none() {
            info.rsdp = Some(parsed);
        }
        Ok(())
    }
}

/// Appends a non-empty region to the memory map (empty ones are dropped).
pub(crate) fn push_region(info: &mut BootInfo<'_>, region: MemoryRegion) -> Result<(), BootInfoError> {
    if region.len == 0 {
        return Ok(());
    }
    // A region may end exactly at 2^64 (its `end()` then saturates), but not beyond.
    if region.start.checked_add(region.len.saturating_sub(1)).is_none() {
        return Err(BootInfoError::RegionWraps { start: region.start, len: region.len });
    }
    info.memory_map.push(region).map_err(|_| BootInfoError::TooManyRegions { capacity: MAX_REGIONS })
}
