//! Host tests: hand-built Multiboot2 and PVH structures (valid and malformed), memory-range
//! arithmetic against a page-level model, command-line diagnostics, and property tests that
//! no input makes a parser panic.

mod cmdline;
mod mb2;
mod memory;
mod module;
mod props;
mod pvh;

use crate::PhysMemory;

/// Physical memory for tests: `bytes` seen at physical addresses `base..base + len`.
#[derive(Debug, Clone)]
pub(crate) struct VecMemory {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl VecMemory {
    /// Creates `len` zeroed bytes at `base`.
    pub fn new(base: u64, len: usize) -> Self {
        Self { base, bytes: vec![0; len] }
    }

    /// Writes `data` at physical address `paddr`.
    pub fn write(&mut self, paddr: u64, data: &[u8]) {
        let offset = usize::try_from(paddr - self.base).unwrap();
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }
}

impl PhysMemory for VecMemory {
    fn bytes(&self, paddr: u64, len: usize) -> Option<&[u8]> {
        let offset = usize::try_from(paddr.checked_sub(self.base)?).ok()?;
        self.bytes.get(offset..offset.checked_add(len)?)
    }
}

/// Builds an RSDP: revision 0 gives the 20-byte ACPI 1.0 form, revision 2 the 36-byte form;
/// both checksums are set.
pub(crate) fn rsdp_bytes(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"RSD PTR ");
    bytes.push(0); // checksum
    bytes.extend_from_slice(b"NKTEST");
    bytes.push(revision);
    bytes.extend_from_slice(&rsdt.to_le_bytes());
    if revision >= 2 {
        bytes.extend_from_slice(&36u32.to_le_bytes());
        bytes.extend_from_slice(&xsdt.to_le_bytes());
        bytes.push(0); // extended checksum
        bytes.extend_from_slice(&[0; 3]);
    }
    fix_rsdp_checksums(&mut bytes);
    bytes
}

/// Recomputes both RSDP checksums after a test changed a field.
pub(crate) fn fix_rsdp_checksums(bytes: &mut [u8]) {
    bytes[8] = 0;
    bytes[8] = 0u8.wrapping_sub(crate::bytes::byte_sum(&bytes[..20]));
    if bytes.len() >= 36 {
        bytes[32] = 0;
        bytes[32] = 0u8.wrapping_sub(crate::bytes::byte_sum(bytes));
    }
}
