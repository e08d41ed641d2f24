//! Validation of the ACPI Root System Description Pointer (ACPI 6.5 §5.2.5.3): signature,
//! the ACPI 1.0 checksum over the first 20 bytes and, from revision 2, the extended
//! checksum over `length` bytes.

use crate::bytes::{byte_sum, u32_at, u64_at};
use crate::error::RsdpProblem;
use crate::info::{Rsdp, RsdpLocation};

/// The bytes covered by the ACPI 1.0 checksum.
pub(crate) const V1_LEN: usize = 20;
/// The size of a revision-2 RSDP.
pub(crate) const V2_LEN: usize = 36;
/// The largest `length` accepted (no revision defines fields past 36 bytes).
pub(crate) const MAX_LEN: usize = 4096;

const SIGNATURE: &[u8; 8] = b"RSD PTR ";
const REVISION_OFFSET: usize = 15;
const RSDT_OFFSET: usize = 16;
const LENGTH_OFFSET: usize = 20;
const XSDT_OFFSET: usize = 24;

/// Returns the revision byte, when `bytes` reaches it.
pub(crate) fn revision(bytes: &[u8]) -> Option<u8> {
    bytes.get(REVISION_OFFSET).copied()
}

/// Returns the `length` field of a revision-2 RSDP, when `bytes` reaches it.
pub(crate) fn length(bytes: &[u8]) -> Option<u32> {
    u32_at(bytes, LENGTH_OFFSET)
}

/// Validates the RSDP at the start of `bytes`. With `extended`, a revision-2-or-later RSDP
/// is checked over its `length` bytes (which `bytes` must hold) and its XSDT address read;
/// without it (Multiboot2 tag 14, a copy of the 20-byte ACPI 1.0 structure) only the first
/// 20 bytes are used.
pub(crate) fn validate(bytes: &[u8], location: RsdpLocation, extended: bool) -> Result<Rsdp, RsdpProblem> {
    let too_short = RsdpProblem::BadLength { length: u32::try_from(bytes.len()).unwrap_or(u32::MAX) };
    let v1 = bytes.get(..V1_LEN).ok_or(too_short)?;
    if v1.get(..SIGNATURE.len()) != Some(SIGNATURE.as_slice()) {
        return Err(RsdpProblem::BadSignature);
    }
    if byte_sum(v1) != 0 {
        return Err(RsdpProblem::BadChecksum);
    }
    let revision = revision(v1).ok_or(too_short)?;
    let rsdt_address = u32_at(v1, RSDT_OFFSET).ok_or(too_short)?;
    let mut rsdp = Rsdp { location, revision, rsdt_address, xsdt_address: None };
    if extended && revision >= 2 {
        let length = length(bytes).ok_or(too_short)?;
        let whole = usize::try_from(length)
            .ok()
            .filter(|&len| (V2_LEN..=MAX_LEN).contains(&len))
            .and_then(|len| bytes.get(..len))
            .ok_or(RsdpProblem::BadLength { length })?;
        if byte_sum(whole) != 0 {
            return Err(RsdpProblem::BadExtendedChecksum);
        }
        rsdp.xsdt_address = u64_at(whole, XSDT_OFFSET).filter(|&xsdt| xsdt != 0);
    }
    Ok(rsdp)
}
