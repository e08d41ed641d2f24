//! Walks a guest's own page tables: translates a guest-virtual address to guest-physical
//! the way the guest's CPU would (SDM Vol. 3 §4.5, 4-level and 5-level paging), reading
//! the tables through a caller's accessor of guest-physical memory. Used by the guest
//! debugger, whose addresses are the guest program's virtual ones. Read-only: accessed
//! and dirty flags are not set. Bounded: at most five reads.

/// The guest's paging state, from its control registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestPaging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Why a guest-virtual address has no translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical for the guest's paging mode.
    NotCanonical,
    /// An entry on the way is not present (level 5..1, 1 being the page table).
    NotPresent(u8),
    /// A table could not be read (outside the guest's memory).
    Unreadable(u64),
    /// 32-bit or PAE paging without long mode: not walked.
    Unsupported,
}

/// Translates `gva` under `paging`, reading 8-byte table entries through `read` (which
/// returns None for a guest-physical address it cannot read). Without paging (CR0.PG
/// clear) the address is the physical one.
pub fn translate(paging: GuestPaging, gva: u64, mut read: impl FnMut(u64) -> Option<u64>) -> Result<u64, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(gva);
    }
    if paging.efer & EFER_LMA == 0 || paging.cr4 & CR4_PAE == 0 {
        return Err(WalkError::Unsupported);
    }
    let levels: u8 = if paging.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let bits = 12 + 9 * u32::from(levels);
    // Canonical: bits 63..bits-1 all equal (SDM Vol. 1 §3.3.7.1).
    let high = (gva as i64) >> (bits - 1);
    if high != 0 && high != -1 {
        return Err(WalkError::NotCanonical);
    }
    let mut table = paging.cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (gva >> shift) & 0x1FF;
        let address = table + index * 8;
        let entry = read(address).ok_or(WalkError::Unreadable(address))?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent(level));
        }
        // A large page at level 3 (1 GiB) or 2 (2 MiB), SDM Vol. 3 §4.5.4.
        if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
            let size = 1u64 << shift;
            return Ok((entry & ADDR_MASK & !(size - 1)) | (gva & (size - 1)));
        }
        table = entry & ADDR_MASK;
    }
    Ok(table | (gva & 0xFFF))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LONG: GuestPaging = GuestPaging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | (1 << 8) };

    fn memory(entries: &[(u64, u64)]) -> HashMap<u64, u64> {
        entries.iter().copied().collect()
    }

    #[test]
    fn without_paging_addresses_are_physical() {
        let paging = GuestPaging::default();
        assert_eq!(translate(paging, 0x1234_5678, |_| None), Ok(0x1234_5678));
    }

    #[test]
    fn a_2m_identity_map_like_the_bare_metal_guests() {
        // PML4[0] -> 0x2000, PDPT[0] -> 0x3000, PD[i] = i * 2 MiB | PS.
        let mut entries = vec![(0x1000, 0x2007), (0x2000, 0x3007)];
        entries.extend((0..512u64).map(|i| (0x3000 + i * 8, (i << 21) | 0x87)));
        let mem = memory(&entries);
        let read = |a| Some(mem.get(&a).copied().unwrap_or(0));
        assert_eq!(translate(LONG, 0x10_2345, read), Ok(0x10_2345));
        assert_eq!(translate(LONG, 0x3FFF_FFFF, read), Ok(0x3FFF_FFFF));
        assert_eq!(translate(LONG, 0x4000_0000, read), Err(WalkError::NotPresent(3)));
    }

    #[test]
    fn four_kib_pages_and_1g_pages_at_the_top() {
        let top = 0xFFFF_FFFF_8000_0000u64; // PML4 511, PDPT 510
        let mem = memory(&[
            (0x1000 + 511 * 8, 0x2003),
            (0x2000 + 510 * 8, 0x4000_0000 | 0x83),
            (0x1000, 0x5003),
            (0x5000 + 8, 0x6003),
            (0x6000 + 2 * 8, 0x7003),
            (0x7000 + 3 * 8, 0xABC_D000 | 3),
        ]);
        let read = |a| Some(mem.get(&a).copied().unwrap_or(0));
        assert_eq!(translate(LONG, top + 0x1234, read), Ok(0x4000_1234));
        let gva = (1u64 << 30) | (2 << 21) | (3 << 12) | 0x56;
        assert_eq!(translate(LONG, gva, read), Ok(0xABC_D056));
        assert_eq!(translate(LONG, gva + 0x1000, read), Err(WalkError::NotPresent(1)));
    }

    #[test]
    fn refusals() {
        assert_eq!(translate(LONG, 0x0000_8000_0000_0000, |_| Some(0)), Err(WalkError::NotCanonical));
        assert_eq!(translate(LONG, 0x1000, |_| None), Err(WalkError::Unreadable(0x1000)));
        let pae32 = GuestPaging { efer: 0, ..LONG };
        assert_eq!(translate(pae32, 0, |_| Some(0)), Err(WalkError::Unsupported));
    }

    #[test]
    fn five_level_paging_walks_five_tables() {
        let paging = GuestPaging { cr4: CR4_PAE | CR4_LA57, ..LONG };
        let mem = memory(&[(0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x4000, 0x5003), (0x5000, 0x9003)]);
        let mut reads = 0;
        let result = translate(paging, 0x12, |a| {
            reads += 1;
            Some(mem.get(&a).copied().unwrap_or(0))
        });
        assert_eq!((result, reads), (Ok(0x9012), 5));
        // 0x0000_8000_0000_0000 is canonical with 57 bits.
        assert_eq!(translate(paging, 0x0000_8000_0000_0000, |_| Some(0)), Err(WalkError::NotPresent(5)));
    }
}
