//! Little-endian field readers over untrusted byte slices: every read is bounds-checked and
//! returns `None` instead of panicking.

/// Reads the little-endian `u32` at byte `offset`.
pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let field = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

/// Reads the little-endian `u64` at byte `offset`.
pub(crate) fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let field = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// Splits a NUL-terminated string off the front of `bytes`: returns the bytes before the
/// first NUL, or `None` when there is no NUL.
pub(crate) fn until_nul(bytes: &[u8]) -> Option<&[u8]> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    bytes.get(..nul)
}

/// Rounds `value` up to the next multiple of 8 (the Multiboot2 tag alignment).
pub(crate) fn align_up_8(value: usize) -> Option<usize> {
    Some(value.checked_add(7)? & !7)
}

/// Adds the 8-bit values of `bytes`, wrapping: an ACPI checksum is correct when the sum of
/// all bytes it covers is 0.
pub(crate) fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}
