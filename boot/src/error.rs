//! Why boot information was refused: one small `Copy` enum, printable as one log line.

use core::fmt;

/// Locates a fault: a byte offset inside the Multiboot2 information, or a physical address
/// (PVH structures are spread over physical memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// A byte offset from the start of the Multiboot2 information.
    MbiOffset(usize),
    /// A physical address.
    Phys(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::MbiOffset(offset) => write!(f, "offset {offset} of the Multiboot2 information"),
            Position::Phys(paddr) => write!(f, "physical address {paddr:#x}"),
        }
    }
}

/// Names the string a [`BootInfoError::BadString`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringKind {
    /// The hypervisor's command line.
    CommandLine,
    /// The boot loader's name (Multiboot2 tag 2).
    BootloaderName,
    /// The command line of the module with this index (0-based, in boot-information order).
    ModuleCommandLine { index: usize },
}

impl fmt::Display for StringKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringKind::CommandLine => f.write_str("command line"),
            StringKind::BootloaderName => f.write_str("boot loader name"),
            StringKind::ModuleCommandLine { index } => write!(f, "command line of module {index}"),
        }
    }
}

/// Says what is wrong with a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringProblem {
    /// No NUL byte within the bytes that may hold the string.
    Unterminated { searched: usize },
    /// The bytes before the NUL are not UTF-8.
    InvalidUtf8,
}

impl fmt::Display for StringProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringProblem::Unterminated { searched } => {
                write!(f, "has no terminating NUL within {searched} bytes")
            }
            StringProblem::InvalidUtf8 => f.write_str("is not valid UTF-8"),
        }
    }
}

/// Says what is wrong with an RSDP (ACPI 6.5 §5.2.5.3, "Root System Description Pointer
/// (RSDP) Structure").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpProblem {
    /// The first 8 bytes are not `"RSD PTR "`.
    BadSignature,
    /// The first 20 bytes (the ACPI 1.0 part) do not sum to 0.
    BadChecksum,
    /// The whole structure (revision 2 and later) does not sum to 0.
    BadExtendedChecksum,
    /// The length field (revision 2 and later) is below 36 or beyond the bytes that hold it.
    BadLength { length: u32 },
}

impl fmt::Display for RsdpProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RsdpProblem::BadSignature => f.write_str("signature is not \"RSD PTR \""),
            RsdpProblem::BadChecksum => f.write_str("checksum of the first 20 bytes is wrong"),
            RsdpProblem::BadExtendedChecksum => f.write_str("extended checksum is wrong"),
            RsdpProblem::BadLength { length } => write!(f, "length {length} is out of range"),
        }
    }
}

/// Explains why the boot information was refused. Each variant carries the offset, address,
/// tag type or value at fault; `Display` renders it as one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The entry magic is neither the Multiboot2 loader magic nor the PVH start magic.
    UnknownMagic { magic: u64 },
    /// A fixed-size structure of `needed` bytes at `at` extends past the data that holds it.
    Truncated { at: Position, needed: usize },
    /// The Multiboot2 `total_size` is larger than the bytes given to the parser.
    SizeExceedsBuffer { total_size: u32, available: usize },
    /// The Multiboot2 `total_size` is below 16 (the fixed part plus the end tag).
    TotalSizeTooSmall { total_size: u32 },
    /// Multiboot2 tags are not padded to 8 bytes: the structure ends at `offset`, which is not
    /// a multiple of 8.
    Misaligned { offset: usize },
    /// A Multiboot2 tag's size is below the minimum for its type.
    TagTooSmall { offset: usize, tag_type: u32, size: u32, minimum: u32 },
    /// A Multiboot2 tag extends past `total_size`.
    TagOverrun { offset: usize, tag_type: u32, size: u32, total_size: u32 },
    /// A Multiboot2 end tag (type 0) whose size is not 8.
    BadEndTag { offset: usize, size: u32 },
    /// The Multiboot2 tags reach `total_size` without an end tag.
    MissingEndTag { total_size: u32 },
    /// A Multiboot2 memory-map tag's `entry_size` is below 24 or not a multiple of 8.
    BadMemoryMapEntrySize { offset: usize, entry_size: u32 },
    /// A Multiboot2 memory-map tag's entries are not a whole number of `entry_size` bytes.
    PartialMemoryMapEntry { offset: usize, entries_len: usize, entry_size: u32 },
    /// A memory region wraps past the top of the 64-bit address space.
    RegionWraps { start: u64, len: u64 },
    /// A module ends before it starts (a PVH module whose size wraps past 2^64 reports the
    /// wrapped end).
    BadModuleRange { start: u64, end: u64 },
    /// More memory regions than [`crate::MAX_REGIONS`].
    TooManyRegions { capacity: usize },
    /// More modules than [`crate::MAX_MODULES`].
    TooManyModules { capacity: usize },
    /// A string is unterminated or not UTF-8.
    BadString { kind: StringKind, at: Position, problem: StringProblem },
    /// The RSDP at `at` fails validation.
    BadRsdp { at: Position, problem: RsdpProblem },
    /// The PVH `hvm_start_info` magic is not `0x336ec578`.
    BadPvhMagic { magic: u32 },
    /// The PVH `hvm_start_info` version carries no memory map (version 0).
    UnsupportedPvhVersion { version: u32 },
    /// `len` bytes at physical address `paddr` cannot be read (absent, unmapped or wrapping).
    Unreadable { paddr: u64, len: usize },
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootInfoError::UnknownMagic { magic } => write!(
                f,
                "entry magic {magic:#x} is neither Multiboot2 ({:#x}) nor PVH ({:#x})",
                crate::multiboot2::LOADER_MAGIC,
                crate::pvh::START_MAGIC
            ),
            BootInfoError::Truncated { at, needed } => {
                write!(f, "{needed}-byte structure at {at} is cut short")
            }
            BootInfoError::SizeExceedsBuffer { total_size, available } => write!(
                f,
                "Multiboot2 total_size {total_size} is larger than the {available} bytes available"
            ),
            BootInfoError::TotalSizeTooSmall { total_size } => {
                write!(f, "Multiboot2 total_size {total_size} is below the minimum 16")
            }
            BootInfoError::Misaligned { offset } => {
                write!(f, "Multiboot2 tags are not padded to 8 bytes: they end at offset {offset}")
            }
            BootInfoError::TagTooSmall { offset, tag_type, size, minimum } => write!(
                f,
                "Multiboot2 tag type {tag_type} at offset {offset} has size {size}, below the minimum {minimum}"
            ),
            BootInfoError::TagOverrun { offset, tag_type, size, total_size } => write!(
                f,
                "Multiboot2 tag type {tag_type} at offset {offset} with size {size} runs past total_size {total_size}"
            ),
            BootInfoError::BadEndTag { offset, size } => {
                write!(f, "Multiboot2 end tag at offset {offset} has size {size}, not 8")
            }
            BootInfoError::MissingEndTag { total_size } => {
                write!(f, "Multiboot2 tags reach total_size {total_size} without an end tag")
            }
            BootInfoError::BadMemoryMapEntrySize { offset, entry_size } => write!(
                f,
                "Multiboot2 memory map at offset {offset} has entry_size {entry_size}, not a multiple of 8 of at least 24"
            ),
            BootInfoError::PartialMemoryMapEntry { offset, entries_len, entry_size } => write!(
                f,
                "Multiboot2 memory map at offset {offset} holds {entries_len} bytes, not a whole number of {entry_size}-byte entries"
            ),
            BootInfoError::RegionWraps { start, len } => {
                write!(f, "memory region at {start:#x} of length {len:#x} wraps past 2^64")
            }
            BootInfoError::BadModuleRange { start, end } => {
                write!(f, "module at {start:#x} ends at {end:#x}, before it starts")
            }
            BootInfoError::TooManyRegions { capacity } => {
                write!(f, "more than {capacity} memory regions")
            }
            BootInfoError::TooManyModules { capacity } => write!(f, "more than {capacity} modules"),
            BootInfoError::BadString { kind, at, problem } => write!(f, "{kind} at {at} {problem}"),
            BootInfoError::BadRsdp { at, problem } => write!(f, "ACPI RSDP at {at}: {problem}"),
            BootInfoError::BadPvhMagic { magic } => write!(
                f,
                "PVH start info magic {magic:#x} is not {:#x}",
                crate::pvh::START_MAGIC
            ),
            BootInfoError::UnsupportedPvhVersion { version } => write!(
                f,
                "PVH start info version {version} has no memory map; version 1 or later is required"
            ),
            BootInfoError::Unreadable { paddr, len } => {
                write!(f, "cannot read {len} bytes at physical address {paddr:#x}")
            }
        }
    }
}
