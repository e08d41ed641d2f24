//! ACPI discovery through the `acpi` crate: the MADT's processors and interrupt controllers
//! (ACPI 6.5 §5.2.12). Physical memory below 4 GiB is identity-mapped, so mapping a table
//! is taking its address. A table the firmware put elsewhere (above 4 GiB, or at address
//! 0) is not read: the crate is shown a page of zeroes there, whose signature matches no
//! table, and a WARN line names the address.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

/// The most processors the hypervisor records from the MADT.
pub const MAX_MADT_CPUS: usize = 64;

#[derive(Clone, Copy, Debug)]
struct IdentityMapped;

/// What the crate reads in place of a table outside the identity map: zeroes.
#[repr(C, align(4096))]
struct ZeroPage([u8; 4096]);

static ZERO_PAGE: ZeroPage = ZeroPage([0; 4096]);

/// Tells whether `[address, address + size)` is readable through the identity map.
pub fn identity_mapped(address: usize, size: usize) -> bool {
    let end = (address as u64).checked_add(size as u64);
    address != 0 && end.is_some_and(|end| end <= crate::memory::IDENTITY_MAPPED_LIMIT)
}

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let start = if identity_mapped(physical_address, size) {
            physical_address as *mut T
        } else if size <= ZERO_PAGE.0.len() {
            log::warn!(target: "acpi", "table at {physical_address:#x} ({size} bytes) lies outside the identity-mapped \
                low 4 GiB: skipped");
            ZERO_PAGE.0.as_ptr() as *mut T
        } else {
            log::error!(target: "acpi", "table at {physical_address:#x} ({size} bytes) lies outside the identity-mapped \
                low 4 GiB; stopping");
            crate::power::shutdown(crate::power::ExitStatus::Failure, "ACPI table above 4 GiB")
        };
        let virtual_start = NonNull::new(start).unwrap_or(NonNull::dangling());
        // SAFETY: the range is identity-mapped low memory (checked above; the crate
        // guarantees it holds a `T`), or the zero page, at least `size` bytes long, which
        // is never written (every ACPI structure is plain bytes, so zeroes are a valid
        // value, one whose signature matches nothing).
        unsafe { PhysicalMapping::new(physical_address, virtual_start, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// A processor the MADT lists as usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtCpu {
    pub acpi_id: u32,
    pub apic_id: u32,
}

/// What the hypervisor takes from ACPI.
#[derive(Debug)]
pub struct Platform {
    /// Enabled (or online-capable) processors, in MADT order.
    pub cpus: [Option<MadtCpu>; MAX_MADT_CPUS],
    pub cpu_count: usize,
    /// Processors listed beyond `MAX_MADT_CPUS`.
    pub cpus_ignored: usize,
    pub local_apic_address: u64,
    pub io_apic_address: Option<u32>,
    pub io_apic_count: usize,
}

impl Platform {
    /// Iterates over the usable processors.
    pub fn cpus(&self) -> impl Iterator<Item = MadtCpu> + '_ {
        self.cpus.iter().flatten().copied()
    }
}

/// Why ACPI discovery failed.
#[derive(Debug)]
pub enum AcpiDiscoveryError {
    Tables(acpi::AcpiError),
    NoMadt(acpi::AcpiError),
}

impl core::fmt::Display for AcpiDiscoveryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiDiscoveryError::Tables(e) => write!(f, "no usable RSDP/RSDT ({e:?})"),
            AcpiDiscoveryError::NoMadt(e) => write!(f, "no MADT ({e:?})"),
        }
    }
}

const MADT_LAPIC_ENABLED: u32 = 1 << 0;
const MADT_LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

/// Reads the MADT, from the RSDP the boot loader passed (its physical address), or from a
/// search of the BIOS areas when it passed none.
pub fn discover(rsdp_paddr: Option<u64>) -> Result<Platform, AcpiDiscoveryError> {
    let tables = match rsdp_paddr {
        // SAFETY: the boot loader's RSDP tag is a validated copy of the RSDP (checked by
        // nk-boot); the acpi crate validates it again.
        Some(paddr) => unsafe { AcpiTables::from_rsdp(IdentityMapped, paddr as usize) },
        // SAFETY: the BIOS areas the search reads (EBDA, 0xE0000-0xFFFFF) are identity-mapped.
        None => unsafe { AcpiTables::search_for_rsdp_bios(IdentityMapped) },
    }
    .map_err(AcpiDiscoveryError::Tables)?;
    let madt = tables.find_table::<Madt>().map_err(AcpiDiscoveryError::NoMadt)?;

    let mut platform = Platform {
        cpus: [None; MAX_MADT_CPUS],
        cpu_count: 0,
        cpus_ignored: 0,
        local_apic_address: u64::from(madt.get().local_apic_address),
        io_apic_address: None,
        io_apic_count: 0,
    };
    let mut record = |acpi_id: u32, apic_id: u32, flags: u32| {
        if flags & (MADT_LAPIC_ENABLED | MADT_LAPIC_ONLINE_CAPABLE) == 0 {
            return;
        }
        match platform.cpus.get_mut(platform.cpu_count) {
            Some(slot) => {
                *slot = Some(MadtCpu { acpi_id, apic_id });
                platform.cpu_count += 1;
            }
            None => platform.cpus_ignored += 1,
        }
    };
    let mut io_apics = (None, 0);
    let mut lapic_override = None;
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) => {
                let flags = e.flags;
                record(u32::from(e.processor_id), u32::from(e.apic_id), flags);
            }
            MadtEntry::LocalX2Apic(e) => {
                let (uid, id, flags) = (e.processor_uid, e.x2apic_id, e.flags);
                record(uid, id, flags);
            }
            MadtEntry::IoApic(e) => {
                let address = e.io_apic_address;
                io_apics.0.get_or_insert(address);
                io_apics.1 += 1;
            }
            MadtEntry::LocalApicAddressOverride(e) => lapic_override = Some(e.local_apic_address),
            _ => {}
        }
    }
    platform.io_apic_address = io_apics.0;
    platform.io_apic_count = io_apics.1;
    if let Some(address) = lapic_override {
        platform.local_apic_address = address;
    }
    Ok(platform)
}

/// The NFIT's fixed part (ACPI 6.5 §5.2.26): what the `acpi` crate needs to find and
/// checksum the table; its structures are read by `nk_storage::nfit`.
#[repr(C, packed)]
struct NfitHeader {
    header: acpi::sdt::SdtHeader,
    _reserved: u32,
}

// SAFETY: `NfitHeader` starts with the SDT header and is the NFIT's fixed part, so it
// describes a table with the NFIT signature.
unsafe impl acpi::AcpiTable for NfitHeader {
    const SIGNATURE: acpi::sdt::Signature = acpi::sdt::Signature::NFIT;

    fn header(&self) -> &acpi::sdt::SdtHeader {
        &self.header
    }
}

/// Returns the NVDIMM Firmware Interface Table's bytes (ACPI 6.5 §5.2.26), when the
/// firmware has one in identity-mapped memory; `None` otherwise (no ACPI, no NFIT).
pub fn nfit(rsdp_paddr: Option<u64>) -> Option<&'static [u8]> {
    let tables = match rsdp_paddr {
        // SAFETY: as in `discover`.
        Some(paddr) => unsafe { AcpiTables::from_rsdp(IdentityMapped, paddr as usize) },
        // SAFETY: as in `discover`.
        None => unsafe { AcpiTables::search_for_rsdp_bios(IdentityMapped) },
    }
    .ok()?;
    let mapping = tables.find_table::<NfitHeader>().ok()?;
    let (start, length) = (mapping.physical_start(), mapping.get().header.length as usize);
    if !identity_mapped(start, length) {
        return None;
    }
    // SAFETY: the table lies in identity-mapped low memory (checked above), which the
    // firmware reserved for it (ACPI reclaimable or NVS, never handed to the allocators);
    // nothing writes it.
    Some(unsafe { core::slice::from_raw_parts(start as *const u8, length) })
}
