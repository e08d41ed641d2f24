//! PVH parsing: an `hvm_start_info` with its tables and strings laid out in a test memory.

use super::{fix_rsdp_checksums, rsdp_bytes, VecMemory};
use crate::pvh::{self, MAX_STRING_LEN, START_MAGIC};
use crate::{
    BootInfoError, BootSource, MemoryKind, Module, PhysRange, Position, RsdpLocation, RsdpProblem, StringKind,
    StringProblem, MAX_MODULES, MAX_REGIONS,
};

/// Where the test layout puts each structure.
pub(crate) const BASE: u64 = 0x1000;
pub(crate) const MEMORY_LEN: usize = 0x8000;
pub(crate) const START_INFO: u64 = 0x1000;
const CMDLINE: u64 = 0x2000;
const MODLIST: u64 = 0x3000;
const MEMMAP: u64 = 0x4000;
const RSDP: u64 = 0x5000;
const MODULE_CMDLINES: u64 = 0x6000;

/// Describes an `hvm_start_info` to lay out.
#[derive(Debug, Clone)]
pub(crate) struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub cmdline: Option<Vec<u8>>,
    pub modules: Vec<(u64, u64, Option<&'static str>)>,
    pub memmap: Vec<(u64, u64, u32)>,
    pub rsdp: Option<Vec<u8>>,
}

impl StartInfo {
    pub fn valid() -> Self {
        Self {
            magic: START_MAGIC,
            version: 1,
            cmdline: Some(b"log=trace test=vmx_*\0".to_vec()),
            modules: vec![(0x20_0000, 0x1234, Some("guest0 verbose")), (0x30_0000, 0x1000, None)],
            memmap: super::mb2::MAP.to_vec(),
            rsdp: Some(rsdp_bytes(2, 0x7fe_1000, 0x7fe_2000)),
        }
    }

    /// Writes the start info at [`START_INFO`] and what it points at into a fresh memory.
    pub fn layout(&self) -> VecMemory {
        let mut memory = VecMemory::new(BASE, MEMORY_LEN);
        let mut info = Vec::new();
        info.extend_from_slice(&self.magic.to_le_bytes());
        info.extend_from_slice(&self.version.to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes()); // flags
        info.extend_from_slice(&u32::try_from(self.modules.len()).unwrap().to_le_bytes());
        info.extend_from_slice(&(if self.modules.is_empty() { 0 } else { MODLIST }).to_le_bytes());
        info.extend_from_slice(&(if self.cmdline.is_some() { CMDLINE } else { 0 }).to_le_bytes());
        info.extend_from_slice(&(if self.rsdp.is_some() { RSDP } else { 0 }).to_le_bytes());
        info.extend_from_slice(&(if self.memmap.is_empty() { 0 } else { MEMMAP }).to_le_bytes());
        info.extend_from_slice(&u32::try_from(self.memmap.len()).unwrap().to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(info.len(), 56);
        memory.write(START_INFO, &info);
        if let Some(cmdline) = &self.cmdline {
            memory.write(CMDLINE, cmdline);
        }
        let mut list = Vec::new();
        for (index, &(paddr, size, cmdline)) in self.modules.iter().enumerate() {
            let cmdline_paddr = match cmdline {
                Some(text) => {
                    let at = MODULE_CMDLINES + 0x80 * index as u64;
                    memory.write(at, text.as_bytes());
                    memory.write(at + text.len() as u64, &[0]);
                    at
                }
                None => 0,
            };
            for field in [paddr, size, cmdline_paddr, 0] {
                list.extend_from_slice(&field.to_le_bytes());
            }
        }
        memory.write(MODLIST, &list);
        let mut map = Vec::new();
        for &(addr, size, kind) in &self.memmap {
            map.extend_from_slice(&addr.to_le_bytes());
            map.extend_from_slice(&size.to_le_bytes());
            map.extend_from_slice(&kind.to_le_bytes());
            map.extend_from_slice(&0u32.to_le_bytes());
        }
        memory.write(MEMMAP, &map);
        if let Some(rsdp) = &self.rsdp {
            memory.write(RSDP, rsdp);
        }
        memory
    }

    fn parse_err(&self) -> BootInfoError {
        pvh::parse(&self.layout(), START_INFO).unwrap_err()
    }
}

/// Writes a 64-bit field of the start info in place.
fn poke64(memory: &mut VecMemory, offset: u64, value: u64) {
    memory.write(START_INFO + offset, &value.to_le_bytes());
}

#[test]
fn parses_a_full_start_info() {
    let memory = StartInfo::valid().layout();
    let info = pvh::parse(&memory, START_INFO).unwrap();
    assert_eq!(info.source(), BootSource::Pvh);
    assert_eq!(info.command_line(), "log=trace test=vmx_*");
    assert_eq!(info.bootloader_name(), None);
    assert_eq!(
        info.modules(),
        &[
            Module { start: 0x20_0000, end: 0x20_1234, cmdline: "guest0 verbose" },
            Module { start: 0x30_0000, end: 0x30_1000, cmdline: "" },
        ]
    );
    let map: Vec<(u64, u64, u32)> = info.memory_map().iter().map(|r| (r.start, r.len, r.kind.raw())).collect();
    assert_eq!(map, super::mb2::MAP);
    assert_eq!(info.memory_map()[4].kind, MemoryKind::AcpiReclaimable);
    let rsdp = info.rsdp().unwrap();
    assert_eq!(rsdp.location, RsdpLocation::Phys(RSDP));
    assert_eq!(rsdp.physical_address(START_INFO), Some(RSDP));
    assert_eq!((rsdp.revision, rsdp.rsdt_address, rsdp.xsdt_address), (2, 0x7fe_1000, Some(0x7fe_2000)));
    let expected = [(START_INFO, 56), (CMDLINE, 21), (MODLIST, 64), (MODULE_CMDLINES, 15), (MEMMAP, 7 * 24)]
        .map(|(start, len)| PhysRange::from_start_len(start, len).unwrap());
    assert_eq!(info.boot_data(), expected);
    // The boot data and the modules are what the allocator must keep away from.
    let reserved: Vec<PhysRange> = info.reserved_ranges().collect();
    assert_eq!(reserved.len(), expected.len() + 2);
    assert_eq!(reserved[expected.len()], PhysRange::new(0x20_0000, 0x20_1234).unwrap());
    // Through the magic dispatcher too.
    assert_eq!(crate::parse(u64::from(START_MAGIC), START_INFO, &memory).unwrap(), info);
}

#[test]
fn absent_fields_give_empty_defaults() {
    let start = StartInfo { cmdline: None, modules: vec![], memmap: vec![], rsdp: None, ..StartInfo::valid() };
    let memory = start.layout();
    let info = pvh::parse(&memory, START_INFO).unwrap();
    assert_eq!(info.command_line(), "");
    assert!(info.modules().is_empty() && info.memory_map().is_empty() && info.rsdp().is_none());
    assert_eq!(info.boot_data(), [PhysRange::from_start_len(START_INFO, 56).unwrap()]);
}

#[test]
fn later_versions_are_read_as_version_1() {
    let start = StartInfo { version: 7, ..StartInfo::valid() };
    assert_eq!(pvh::parse(&start.layout(), START_INFO).unwrap().memory_map().len(), 7);
}

#[test]
fn version_0_is_refused() {
    let start = StartInfo { version: 0, ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::UnsupportedPvhVersion { version: 0 });
}

#[test]
fn bad_magic_is_refused() {
    let start = StartInfo { magic: 0x336e_c579, ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadPvhMagic { magic: 0x336e_c579 });
}

#[test]
fn unreadable_start_info_is_refused() {
    let memory = StartInfo::valid().layout();
    assert_eq!(pvh::parse(&memory, 0x10).unwrap_err(), BootInfoError::Unreadable { paddr: 0x10, len: 8 });
    let end = BASE + MEMORY_LEN as u64;
    let mut memory = VecMemory::new(BASE, MEMORY_LEN);
    memory.write(end - 8, &START_MAGIC.to_le_bytes());
    memory.write(end - 4, &1u32.to_le_bytes());
    assert_eq!(pvh::parse(&memory, end - 8).unwrap_err(), BootInfoError::Unreadable { paddr: end - 8, len: 56 });
    assert_eq!(
        pvh::parse(&memory, u64::MAX - 3).unwrap_err(),
        BootInfoError::Unreadable { paddr: u64::MAX - 3, len: 8 }
    );
}

#[test]
fn unterminated_command_line_is_refused() {
    let start = StartInfo { cmdline: Some(vec![b'a'; MAX_STRING_LEN]), ..StartInfo::valid() };
    assert_eq!(
        start.parse_err(),
        BootInfoError::BadString {
            kind: StringKind::CommandLine,
            at: Position::Phys(CMDLINE),
            problem: StringProblem::Unterminated { searched: MAX_STRING_LEN },
        }
    );
    // The longest accepted string leaves room for its NUL.
    let mut longest = vec![b'a'; MAX_STRING_LEN - 1];
    longest.push(0);
    let start = StartInfo { cmdline: Some(longest), ..StartInfo::valid() };
    assert_eq!(pvh::parse(&start.layout(), START_INFO).unwrap().command_line().len(), MAX_STRING_LEN - 1);
}

#[test]
fn command_line_not_utf8_is_refused() {
    let start = StartInfo { cmdline: Some(b"log=\xfe\0".to_vec()), ..StartInfo::valid() };
    assert_eq!(
        start.parse_err(),
        BootInfoError::BadString {
            kind: StringKind::CommandLine,
            at: Position::Phys(CMDLINE),
            problem: StringProblem::InvalidUtf8
        }
    );
}

#[test]
fn short_string_at_the_end_of_memory_is_read() {
    let mut memory = StartInfo::valid().layout();
    let end = BASE + MEMORY_LEN as u64;
    memory.write(end - 7, b"cpus=1\0");
    poke64(&mut memory, 24, end - 7);
    assert_eq!(pvh::parse(&memory, START_INFO).unwrap().command_line(), "cpus=1");
    // Without its NUL the string runs into unreadable memory.
    memory.write(end - 1, b"9");
    assert_eq!(
        pvh::parse(&memory, START_INFO).unwrap_err(),
        BootInfoError::Unreadable { paddr: end - 7, len: MAX_STRING_LEN }
    );
}

#[test]
fn too_many_modules_are_refused() {
    let modules = vec![(0x10_0000, 0x1000, None); MAX_MODULES + 1];
    let start = StartInfo { modules: modules.clone(), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::TooManyModules { capacity: MAX_MODULES });
    let start = StartInfo { modules: modules[..MAX_MODULES].to_vec(), ..StartInfo::valid() };
    assert_eq!(pvh::parse(&start.layout(), START_INFO).unwrap().modules().len(), MAX_MODULES);
}

#[test]
fn module_list_at_address_0_is_unreadable() {
    let mut memory = StartInfo::valid().layout();
    poke64(&mut memory, 16, 0);
    assert_eq!(pvh::parse(&memory, START_INFO).unwrap_err(), BootInfoError::Unreadable { paddr: 0, len: 64 });
}

#[test]
fn wrapping_module_is_refused() {
    let start = StartInfo { modules: vec![(u64::MAX - 0xFFF, 0x2000, None)], ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadModuleRange { start: u64::MAX - 0xFFF, end: 0x1000 });
}

#[test]
fn bad_module_command_line_is_refused() {
    let start = StartInfo { modules: vec![(0x1000, 1, Some("ok")), (0x2000, 1, Some("b\u{0}"))], ..StartInfo::valid() };
    assert!(pvh::parse(&start.layout(), START_INFO).is_ok());
    let mut memory = start.layout();
    memory.write(MODULE_CMDLINES + 0x80, b"\xff\0");
    assert_eq!(
        pvh::parse(&memory, START_INFO).unwrap_err(),
        BootInfoError::BadString {
            kind: StringKind::ModuleCommandLine { index: 1 },
            at: Position::Phys(MODULE_CMDLINES + 0x80),
            problem: StringProblem::InvalidUtf8,
        }
    );
}

#[test]
fn too_many_regions_are_refused() {
    let memmap: Vec<(u64, u64, u32)> = (0..=MAX_REGIONS as u64).map(|i| (i << 12, 0x1000, 1)).collect();
    let start = StartInfo { memmap: memmap.clone(), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::TooManyRegions { capacity: MAX_REGIONS });
    let start = StartInfo { memmap: memmap[..MAX_REGIONS].to_vec(), ..StartInfo::valid() };
    assert_eq!(pvh::parse(&start.layout(), START_INFO).unwrap().memory_map().len(), MAX_REGIONS);
}

#[test]
fn unreadable_memory_map_is_refused() {
    let mut memory = StartInfo::valid().layout();
    poke64(&mut memory, 40, 0x100_0000);
    assert_eq!(
        pvh::parse(&memory, START_INFO).unwrap_err(),
        BootInfoError::Unreadable { paddr: 0x100_0000, len: 7 * 24 }
    );
}

#[test]
fn wrapping_region_is_refused() {
    let start = StartInfo { memmap: vec![(u64::MAX, 2, 1)], ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::RegionWraps { start: u64::MAX, len: 2 });
}

#[test]
fn acpi_1_rsdp_is_read_from_20_bytes() {
    let start = StartInfo { rsdp: Some(rsdp_bytes(0, 0xE_0000, 0)), ..StartInfo::valid() };
    let rsdp = pvh::parse(&start.layout(), START_INFO).unwrap().rsdp().unwrap();
    assert_eq!((rsdp.revision, rsdp.rsdt_address, rsdp.xsdt_address), (0, 0xE_0000, None));
}

#[test]
fn bad_rsdp_is_refused() {
    let at = Position::Phys(RSDP);
    let mut rsdp = rsdp_bytes(2, 1, 2);
    rsdp[0] = b'X';
    let start = StartInfo { rsdp: Some(rsdp), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadSignature });

    let mut rsdp = rsdp_bytes(0, 1, 0);
    rsdp[19] ^= 0x40;
    let start = StartInfo { rsdp: Some(rsdp), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadChecksum });

    let mut rsdp = rsdp_bytes(2, 1, 2);
    rsdp[30] = 1;
    let start = StartInfo { rsdp: Some(rsdp), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadExtendedChecksum });

    let mut rsdp = rsdp_bytes(2, 1, 2);
    rsdp[20..24].copy_from_slice(&0x10_0000u32.to_le_bytes());
    fix_rsdp_checksums(&mut rsdp);
    let start = StartInfo { rsdp: Some(rsdp), ..StartInfo::valid() };
    assert_eq!(start.parse_err(), BootInfoError::BadRsdp { at, problem: RsdpProblem::BadLength { length: 0x10_0000 } });
}

#[test]
fn longer_rsdp_is_checked_over_its_length() {
    let mut rsdp = rsdp_bytes(2, 1, 2);
    rsdp[20..24].copy_from_slice(&40u32.to_le_bytes());
    rsdp.extend_from_slice(&[9, 0, 0, 0]);
    fix_rsdp_checksums(&mut rsdp);
    let start = StartInfo { rsdp: Some(rsdp.clone()), ..StartInfo::valid() };
    assert!(pvh::parse(&start.layout(), START_INFO).is_ok());
    // A byte past 36 but inside `length` is covered by the extended checksum.
    let mut memory = start.layout();
    memory.write(RSDP + 37, &[1]);
    assert_eq!(
        pvh::parse(&memory, START_INFO).unwrap_err(),
        BootInfoError::BadRsdp { at: Position::Phys(RSDP), problem: RsdpProblem::BadExtendedChecksum }
    );
}
