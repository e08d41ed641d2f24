//! The typed, versioned boot information both entry protocols are parsed into.

use core::fmt;

use crate::fixed::FixedList;
use crate::memory::{self, PhysRange, UsableRanges};

/// The layout version of [`BootInfo`]; raised whenever its meaning changes.
pub const BOOT_INFO_VERSION: u32 = 1;

/// The most memory regions a [`BootInfo`] holds (non-empty entries of the loader's map).
pub const MAX_REGIONS: usize = 128;

/// The most modules (guest images) a [`BootInfo`] holds.
pub const MAX_MODULES: usize = 16;

/// The most physical ranges of boot data a [`BootInfo`] borrows from: the PVH start info,
/// its module list, memory map, command line and one command line per module.
pub const MAX_BOOT_DATA_RANGES: usize = 4 + MAX_MODULES;

/// Names the protocol the hypervisor was entered through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootSource {
    /// Multiboot2 (GRUB): EAX = 0x36d76289, EBX = the boot information.
    Multiboot2,
    /// The Xen/QEMU PVH boot protocol: EBX = the `hvm_start_info`.
    Pvh,
}

impl fmt::Display for BootSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootSource::Multiboot2 => "Multiboot2",
            BootSource::Pvh => "PVH",
        })
    }
}

/// Classifies a memory region. The numbers are the E820 types that both the Multiboot2
/// memory map (Multiboot2 spec §3.6, "Memory map") and the PVH memory map (xen
/// `arch-x86/hvm/start_info.h`, `hvm_memmap_table_entry`) use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Type 1: RAM free for use.
    Available,
    /// Type 2: reserved.
    #[default]
    Reserved,
    /// Type 3: ACPI tables, reclaimable once they are read.
    AcpiReclaimable,
    /// Type 4: ACPI non-volatile storage, to be preserved across hibernation.
    AcpiNvs,
    /// Type 5: defective RAM.
    Defective,
    /// Any other type: treated as reserved.
    Other(u32),
}

impl MemoryKind {
    /// Classifies the raw type number of a memory-map entry.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            1 => MemoryKind::Available,
            2 => MemoryKind::Reserved,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Defective,
            other => MemoryKind::Other(other),
        }
    }

    /// Returns the raw type number.
    pub const fn raw(self) -> u32 {
        match self {
            MemoryKind::Available => 1,
            MemoryKind::Reserved => 2,
            MemoryKind::AcpiReclaimable => 3,
            MemoryKind::AcpiNvs => 4,
            MemoryKind::Defective => 5,
            MemoryKind::Other(raw) => raw,
        }
    }
}

/// Prints the kind as the memory-map log line spells it (docs/emulator-protocol.md).
impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryKind::Available => f.write_str("available"),
            MemoryKind::Reserved => f.write_str("reserved"),
            MemoryKind::AcpiReclaimable => f.write_str("acpi-reclaimable"),
            MemoryKind::AcpiNvs => f.write_str("acpi-nvs"),
            MemoryKind::Defective => f.write_str("defective"),
            MemoryKind::Other(raw) => write!(f, "type-{raw}"),
        }
    }
}

/// Describes one entry of the loader's memory map. Regions from the parsers are never empty
/// and end at or below 2^64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// The first physical address.
    pub start: u64,
    /// The length in bytes.
    pub len: u64,
    /// What the memory may be used for.
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// Returns the physical address one past the region (saturating at `u64::MAX`).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Returns the last physical address in the region (the start of an empty region).
    pub const fn last(&self) -> u64 {
        self.start.saturating_add(self.len.saturating_sub(1))
    }

    /// Returns the region as a half-open physical range (clipped at `u64::MAX`).
    pub const fn range(&self) -> PhysRange {
        PhysRange::saturating(self.start, self.len)
    }
}

/// Prints `0x<start>-0x<last> <kind>`, the body of the `mem: region` log line
/// (docs/emulator-protocol.md: 16 hex digits each, inclusive end).
impl fmt::Display for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}-{:#018x} {}", self.start, self.last(), self.kind)
    }
}

/// Describes a module the loader placed in memory (a guest image).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Module<'a> {
    /// The first physical address.
    pub start: u64,
    /// The physical address one past the module (`start <= end`).
    pub end: u64,
    /// The module's command line (empty if none).
    pub cmdline: &'a str,
}

impl Module<'_> {
    /// Returns the module's bytes as a half-open physical range.
    pub const fn range(&self) -> PhysRange {
        PhysRange::saturating(self.start, self.end.saturating_sub(self.start))
    }
}

/// Says where an RSDP lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpLocation {
    /// A copy inside the Multiboot2 information (tags 14 and 15), at this byte offset from
    /// its start.
    MbiOffset(usize),
    /// The firmware's RSDP at this physical address (PVH `rsdp_paddr`).
    Phys(u64),
}

/// Describes the validated ACPI Root System Description Pointer (ACPI 6.5 §5.2.5.3): its
/// signature and checksums were checked by the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rsdp {
    /// Where the validated bytes are.
    pub location: RsdpLocation,
    /// The ACPI revision field: 0 for ACPI 1.0, 2 or more for ACPI 2.0 and later.
    pub revision: u8,
    /// The physical address of the RSDT.
    pub rsdt_address: u32,
    /// The physical address of the XSDT (revision 2 and later, when not zero).
    pub xsdt_address: Option<u64>,
}

impl Rsdp {
    /// Returns the physical address of the validated RSDP, given the physical address the
    /// boot information was passed at (EBX at entry); `None` if the sum overflows.
    pub fn physical_address(&self, info_paddr: u64) -> Option<u64> {
        match self.location {
            RsdpLocation::MbiOffset(offset) => info_paddr.checked_add(u64::try_from(offset).ok()?),
            RsdpLocation::Phys(paddr) => Some(paddr),
        }
    }
}

/// Holds everything the hypervisor needs from the boot loader, whichever protocol delivered
/// it. The strings borrow from the boot information, which must stay intact (see
/// [`BootInfo::reserved_ranges`]) while this value lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo<'a> {
    pub(crate) version: u32,
    pub(crate) source: BootSource,
    pub(crate) command_line: &'a str,
    pub(crate) bootloader_name: Option<&'a str>,
    pub(crate) memory_map: FixedList<MemoryRegion, MAX_REGIONS>,
    pub(crate) modules: FixedList<Module<'a>, MAX_MODULES>,
    pub(crate) rsdp: Option<Rsdp>,
    pub(crate) boot_data: FixedList<PhysRange, MAX_BOOT_DATA_RANGES>,
}

impl<'a> BootInfo<'a> {
    /// Creates empty boot information for `source`.
    pub(crate) fn empty(source: BootSource) -> Self {
        Self {
            version: BOOT_INFO_VERSION,
            source,
            command_line: "",
            bootloader_name: None,
            memory_map: FixedList::new(),
            modules: FixedList::new(),
            rsdp: None,
            boot_data: FixedList::new(),
        }
    }

    /// Returns the layout version, [`BOOT_INFO_VERSION`].
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Returns the protocol the information came from.
    pub fn source(&self) -> BootSource {
        self.source
    }

    /// Returns the hypervisor's command line (empty if the loader passed none).
    pub fn command_line(&self) -> &'a str {
        self.command_line
    }

    /// Returns the boot loader's name (Multiboot2 only).
    pub fn bootloader_name(&self) -> Option<&'a str> {
        self.bootloader_name
    }

    /// Returns the memory map in the loader's order, without empty entries.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.memory_map
    }

    /// Returns the modules in the loader's order.
    pub fn modules(&self) -> &[Module<'a>] {
        &self.modules
    }

    /// Returns the validated RSDP, if the loader passed one.
    pub fn rsdp(&self) -> Option<Rsdp> {
        self.rsdp
    }

    /// Returns the physical ranges of boot data this value borrows from: the Multiboot2
    /// information, or the PVH start info with its tables and strings. Empty when the
    /// Multiboot2 information was parsed from a slice with [`crate::multiboot2::parse`].
    pub fn boot_data(&self) -> &[PhysRange] {
        &self.boot_data
    }

    /// Returns every range the frame allocator must leave alone while this value lives:
    /// the boot data and the modules.
    pub fn reserved_ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.boot_data.iter().copied().chain(self.modules.iter().map(Module::range))
    }

    /// Computes the page-aligned RAM the frame allocator may hand out: the available regions
    /// minus the first MiB, the hypervisor `image`, the boot data and the modules
    /// (see [`memory::usable_ranges`]).
    pub fn usable_memory(&self, image: PhysRange) -> Result<UsableRanges, memory::MemoryError> {
        let fixed = [memory::FIRST_MIB, image];
        memory::usable_ranges(&self.memory_map, fixed.into_iter().chain(self.reserved_ranges()))
    }
}
