//! Parses the PVH boot protocol's `hvm_start_info` (xen `include/public/arch-x86/hvm/
//! start_info.h`) into [`BootInfo`]. The start info points at its module list, memory map
//! and strings by physical address, so everything is read through [`PhysMemory`]; a zero
//! address means "not present" (start_info.h). Every read is bounds-checked; malformed data
//! yields a [`BootInfoError`], never a panic.

use crate::bytes::{u32_at, u64_at, until_nul};
use crate::error::{BootInfoError, Position, StringKind, StringProblem};
use crate::info::{BootInfo, BootSource, MemoryKind, MemoryRegion, Module, RsdpLocation, MAX_MODULES, MAX_REGIONS};
use crate::memory::{PhysRange, PAGE_SIZE};
use crate::{read_phys, rsdp, PhysMemory};

/// `XEN_HVM_START_MAGIC_VALUE`, the first field of `hvm_start_info` ("xEn3" with the 0x80
/// bit of the "E" set). The entry stub passes it as the entry magic for PVH boots.
pub const START_MAGIC: u32 = 0x336e_c578;

/// The longest string read from physical memory, terminating NUL included.
pub const MAX_STRING_LEN: usize = 4096;

/// `hvm_start_info` up to and including `rsdp_paddr` (version 0).
const START_INFO_V0_LEN: usize = 40;
/// `hvm_start_info` with `memmap_paddr`, `memmap_entries` and `reserved` (version 1).
const START_INFO_V1_LEN: usize = 56;
/// `hvm_modlist_entry`: `u64 paddr, u64 size, u64 cmdline_paddr, u64 reserved`.
const MODLIST_ENTRY_LEN: usize = 32;
/// `hvm_memmap_table_entry`: `u64 addr, u64 size, u32 type, u32 reserved`.
const MEMMAP_ENTRY_LEN: usize = 24;

/// Parses the `hvm_start_info` at physical address `paddr`, with its module list, memory map,
/// command lines and RSDP, and records the ranges it read as boot data.
pub fn parse<M: PhysMemory + ?Sized>(memory: &M, paddr: u64) -> Result<BootInfo<'_>, BootInfoError> {
    let head = read_phys(memory, paddr, 8)?;
    let unreadable = BootInfoError::Unreadable { paddr, len: START_INFO_V1_LEN };
    let magic = u32_at(head, 0).ok_or(unreadable)?;
    if magic != START_MAGIC {
        return Err(BootInfoError::BadPvhMagic { magic });
    }
    let version = u32_at(head, 4).ok_or(unreadable)?;
    if version == 0 {
        return Err(BootInfoError::UnsupportedPvhVersion { version });
    }
    // Later versions only append fields (start_info.h), so version 1's layout is read.
    let start_info = read_phys(memory, paddr, START_INFO_V1_LEN)?;
    let field64 = |offset| u64_at(start_info, offset).ok_or(unreadable);
    let field32 = |offset| u32_at(start_info, offset).ok_or(unreadable);
    let nr_modules = field32(12)?;
    let modlist_paddr = field64(16)?;
    let cmdline_paddr = field64(24)?;
    let rsdp_paddr = field64(32)?;
    let memmap_paddr = field64(START_INFO_V0_LEN)?;
    let memmap_entries = field32(48)?;

    let mut reader = Reader { memory, info: BootInfo::empty(BootSource::Pvh) };
    reader.note(paddr, START_INFO_V1_LEN)?;
    if cmdline_paddr != 0 {
        reader.info.command_line = reader.string(cmdline_paddr, StringKind::CommandLine)?;
    }
    reader.modules(nr_modules, modlist_paddr)?;
    reader.memory_map(memmap_entries, memmap_paddr)?;
    if rsdp_paddr != 0 {
        reader.info.rsdp = Some(reader.rsdp(rsdp_paddr)?);
    }
    Ok(reader.info)
}

/// Reads the structures the start info points at and records what it read.
struct Reader<'a, M: ?Sized> {
    memory: &'a M,
    info: BootInfo<'a>,
}

impl<'a, M: PhysMemory + ?Sized> Reader<'a, M> {
    /// Reads a table of `count` entries of `entry_len` bytes; address 0 with a non-zero count
    /// is unreadable.
    fn table(&mut self, paddr: u64, count: usize, entry_len: usize) -> Result<&'a [u8], BootInfoError> {
        let len = count.checked_mul(entry_len).ok_or(BootInfoError::Unreadable { paddr, len: usize::MAX })?;
        if paddr == 0 {
            return Err(BootInfoError::Unreadable { paddr, len });
        }
        let bytes = read_phys(self.memory, paddr, len)?;
        self.note(paddr, len)?;
        Ok(bytes)
    }

    /// Records `len` bytes at `paddr` as boot data this information borrows from.
    fn note(&mut self, paddr: u64, len: usize) -> Result<(), BootInfoError> {
        let unreadable = BootInfoError::Unreadable { paddr, len };
        let range = u64::try_from(len).ok().and_then(|len| PhysRange::from_start_len(paddr, len)).ok_or(unreadable)?;
        // One range each for the start info, module list, memory map and command line, and
        // one per module command line: MAX_BOOT_DATA_RANGES holds them all.
        self.info.boot_data.push(range).map_err(|_| BootInfoError::TooManyModules { capacity: MAX_MODULES })
    }

    /// Reads the NUL-terminated UTF-8 string at `paddr`: first up to the end of its page,
    /// then up to [`MAX_STRING_LEN`] bytes, so that a short string at the end of readable
    /// memory is still found.
    fn string(&mut self, paddr: u64, kind: StringKind) -> Result<&'a str, BootInfoError> {
        let problem = |problem| BootInfoError::BadString { kind, at: Position::Phys(paddr), problem };
        let to_page_end = PAGE_SIZE - (paddr % PAGE_SIZE);
        let first = usize::try_from(to_page_end).unwrap_or(MAX_STRING_LEN).min(MAX_STRING_LEN);
        for len in [first, MAX_STRING_LEN] {
            let bytes = read_phys(self.memory, paddr, len)?;
            if let Some(text) = until_nul(bytes) {
                self.note(paddr, text.len().saturating_add(1))?;
                return core::str::from_utf8(text).map_err(|_| problem(StringProblem::InvalidUtf8));
            }
        }
        Err(problem(StringProblem::Unterminated { searched: MAX_STRING_LEN }))
    }

    /// Reads the module list: `nr_modules` `hvm_modlist_entry`s at `modlist_paddr`.
    fn modules(&mut self, nr_modules: u32, modlist_paddr: u64) -> Result<(), BootInfoError> {
        let too_many = BootInfoError::TooManyModules { capacity: MAX_MODULES };
        let count = usize::try_from(nr_modules).map_err(|_| too_many)?;
        if count == 0 {
            return Ok(());
        }
        if count > MAX_MODULES {
            return Err(too_many);
        }
        let list = self.table(modlist_paddr, count, MODLIST_ENTRY_LEN)?;
        for (index, entry) in list.chunks_exact(MODLIST_ENTRY_LEN).enumerate() {
            let unreadable = BootInfoError::Unreadable { paddr: modlist_paddr, len: list.len() };
            let start = u64_at(entry, 0).ok_or(unreadable)?;
            let size = u64_at(entry, 8).ok_or(unreadable)?;
            let cmdline_paddr = u64_at(entry, 16).ok_or(unreadable)?;
            let end = start
                .checked_add(size)
                .ok_or(BootInfoError::BadModuleRange { start, end: start.wrapping_add(size) })?;
            let cmdline = match cmdline_paddr {
                0 => "",
                paddr => self.string(paddr, StringKind::ModuleCommandLine { index })?,
            };
            self.info.modules.push(Module { start, end, cmdline }).map_err(|_| too_many)?;
        }
        Ok(())
    }

    /// Reads the memory map: `memmap_entries` `hvm_memmap_table_entry`s at `memmap_paddr`
    /// (E820 types). Empty entries are dropped.
    fn memory_map(&mut self, entries: u32, memmap_paddr: u64) -> Result<(), BootInfoError> {
        let too_many = BootInfoError::TooManyRegions { capacity: MAX_REGIONS };
        let count = usize::try_from(entries).map_err(|_| too_many)?;
        if count == 0 {
            return Ok(());
        }
        // Checked before reading so a garbage count does not make us walk gigabytes.
        if count > MAX_REGIONS {
            return Err(too_many);
        }
        let table = self.table(memmap_paddr, count, MEMMAP_ENTRY_LEN)?;
        for entry in table.chunks_exact(MEMMAP_ENTRY_LEN) {
            let unreadable = BootInfoError::Unreadable { paddr: memmap_paddr, len: table.len() };
            let start = u64_at(entry, 0).ok_or(unreadable)?;
            let len = u64_at(entry, 8).ok_or(unreadable)?;
            let kind = MemoryKind::from_raw(u32_at(entry, 16).ok_or(unreadable)?);
            crate::multiboot2::push_region(&mut self.info, MemoryRegion { start, len, kind })?;
        }
        Ok(())
    }

    /// Reads and validates the RSDP at `paddr`: 20 bytes, then, from revision 2, its
    /// `length` bytes.
    fn rsdp(&mut self, paddr: u64) -> Result<crate::info::Rsdp, BootInfoError> {
        let at = Position::Phys(paddr);
        let location = RsdpLocation::Phys(paddr);
        let bad = |problem| BootInfoError::BadRsdp { at, problem };
        let v1 = read_phys(self.memory, paddr, rsdp::V1_LEN)?;
        let extended = rsdp::revision(v1).is_some_and(|revision| revision >= 2);
        if !extended {
            return rsdp::validate(v1, location, false).map_err(bad);
        }
        // Check signature and the 1.0 checksum before trusting the length field.
        rsdp::validate(v1, location, false).map_err(bad)?;
        let v2 = read_phys(self.memory, paddr, rsdp::V2_LEN)?;
        let length = rsdp::length(v2).unwrap_or(0);
        let whole_len = usize::try_from(length)
            .ok()
            .filter(|len| (rsdp::V2_LEN..=rsdp::MAX_LEN).contains(len))
            .ok_or(bad(crate::error::RsdpProblem::BadLength { length }))?;
        let whole = read_phys(self.memory, paddr, whole_len)?;
        rsdp::validate(whole, location, true).map_err(bad)
    }
}
