//! Boot information for the null-Kernel hypervisor: parses what the boot loader passed —
//! a Multiboot2 information structure (GRUB) or a PVH `hvm_start_info` (QEMU `-kernel`) —
//! into one typed, versioned [`BootInfo`]; computes the RAM the frame allocator may use
//! ([`memory`]); and parses the hypervisor command line ([`cmdline`]) and the command lines
//! of guest modules ([`module`]).
//!
//! Everything here runs before the heap exists and reads untrusted loader data: no
//! allocation, no `unsafe`, and no panic on any input (checked arithmetic and `get()`
//! throughout). The only access to physical memory is the [`PhysMemory`] trait, which the
//! hypervisor implements over its identity map and host tests implement over a `Vec`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod bytes;
pub mod cmdline;
mod error;
mod fixed;
mod info;
pub mod memory;
pub mod module;
pub mod multiboot2;
pub mod pvh;
mod rsdp;

#[cfg(test)]
mod tests;

pub use error::{BootInfoError, Position, RsdpProblem, StringKind, StringProblem};
pub use fixed::FixedList;
pub use info::{
    BootInfo, BootSource, MemoryKind, MemoryRegion, Module, Rsdp, RsdpLocation, BOOT_INFO_VERSION,
    MAX_BOOT_DATA_RANGES, MAX_MODULES, MAX_REGIONS,
};
pub use memory::PhysRange;

/// Gives read access to physical memory. The hypervisor implements it over its identity map
/// of low memory; host tests implement it over a buffer.
pub trait PhysMemory {
    /// Returns the `len` bytes at physical address `paddr`, or `None` when any of them is
    /// not readable. A slice of another length is treated as unreadable.
    fn bytes(&self, paddr: u64, len: usize) -> Option<&[u8]>;
}

/// Reads exactly `len` bytes at `paddr`, or reports them unreadable.
pub(crate) fn read_phys<M: PhysMemory + ?Sized>(memory: &M, paddr: u64, len: usize) -> Result<&[u8], BootInfoError> {
    let wraps = u64::try_from(len).ok().and_then(|len| paddr.checked_add(len)).is_none();
    match memory.bytes(paddr, len) {
        Some(bytes) if !wraps && bytes.len() == len => Ok(bytes),
        _ => Err(BootInfoError::Unreadable { paddr, len }),
    }
}

/// Parses the boot information the entry stub received: `magic` is EAX for Multiboot2
/// ([`multiboot2::LOADER_MAGIC`]) or [`pvh::START_MAGIC`] for a PVH entry, and `info_paddr`
/// is EBX, the physical address of the structure.
pub fn parse<M: PhysMemory + ?Sized>(magic: u64, info_paddr: u64, memory: &M) -> Result<BootInfo<'_>, BootInfoError> {
    if magic == u64::from(multiboot2::LOADER_MAGIC) {
        multiboot2::parse_at(memory, info_paddr)
    } else if magic == u64::from(pvh::START_MAGIC) {
        pvh::parse(memory, info_paddr)
    } else {
        Err(BootInfoError::UnknownMagic { magic })
    }
}
