//! The ACPI tables of one VM (ACPI 6.5 ch. 5), built with rust-vmm's `acpi_tables` and laid
//! out in one blob at a guest-physical base: RSDP (revision 2, pointing at the XSDT), XSDT,
//! MADT with one Processor Local APIC entry per vCPU and no IO-APIC (so Linux runs in
//! "virtual wire" mode: legacy IRQs through the 8259 pair and LINT0), a FADT that is not
//! hardware-reduced (a hardware-reduced FADT makes Linux drop the 8259 and with it IRQ 4)
//! with PM1a blocks at [`crate::acpi_pm`], no SMI port, the reset register on 0xCF9, and
//! IA-PC flags "no 8042, no VGA, no MSI", a FACS, and a DSDT whose objects are `\_S5` and
//! any devices the VM has (a virtio-mmio block device, [`virtio_mmio_device`]).

extern crate alloc;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::{facs::FACS, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use alloc::vec::Vec;

use crate::acpi_pm::{PM1_CNT, PM1_EVT, SLP_TYP_S5};
use crate::lapic::DEFAULT_BASE;

const OEM_ID: [u8; 6] = *b"NKHYPV";
const OEM_TABLE: [u8; 8] = *b"NKVIRTPC";
/// The SCI's ISA IRQ (no event ever raises it).
pub const SCI_IRQ: u16 = 9;

fn align(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn serialize(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT body: `Name (\_S5, Package (4) { 5, 5, 0, 0 })` in AML (ACPI 6.5 §20.2).
fn dsdt_body() -> [u8; 15] {
    let s5 = SLP_TYP_S5 as u8;
    [0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, s5, 0x0A, s5, 0x00, 0x00]
}

/// The tables of one VM.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// The bytes to copy to guest-physical [`AcpiTables::base`].
    pub blob: Vec<u8>,
    pub base: u64,
}

impl AcpiTables {
    /// Returns the RSDP's guest-physical address (the start of the blob).
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }

    /// Builds the tables for `cpus` vCPUs (APIC ids 0..cpus) at guest-physical `base`
    /// (16-byte aligned, below 4 GiB so the 32-bit FADT fields also hold).
    pub fn build(base: u64, cpus: u8) -> Self {
        Self::build_with(base, cpus, &[])
    }

    /// Builds the tables as [`AcpiTables::build`] does, with `extra` (whole tables, each
    /// with its SDT header and checksum, e.g. [`nkcp_table`]) placed after the others
    /// and listed in the XSDT after the MADT and FADT.
    pub fn build_with(base: u64, cpus: u8, extra: &[&[u8]]) -> Self {
        Self::build_with_devices(base, cpus, extra, &[])
    }

    /// Builds the tables as [`AcpiTables::build_with`] does, with `devices` (AML, e.g.
    /// [`virtio_mmio_device`]) appended to the DSDT's body after `\_S5`.
    pub fn build_with_devices(base: u64, cpus: u8, extra: &[&[u8]], devices: &[u8]) -> Self {
        let rsdp_len = 64; // RSDP is 36 bytes; keep the next table aligned.
        let mut madt = MADT::new(OEM_ID, OEM_TABLE, 1, LocalInterruptController::Address(DEFAULT_BASE as u32));
        for cpu in 0..cpus {
            madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
        }
        let mut madt = serialize(&madt);
        madt[40] |= 1; // PCAT_COMPAT: a dual 8259 is present (ACPI 6.5 table 5.20)
        fix_checksum(&mut madt);

        let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
        dsdt.append_slice(&dsdt_body());
        dsdt.append_slice(devices);
        let dsdt = dsdt.as_slice().to_vec();

        let facs = serialize(&FACS::new());

        let xsdt_off = rsdp_len;
        let xsdt_len = 36 + 8 * (2 + extra.len());
        let madt_off = align(xsdt_off + xsdt_len, 16);
        let fadt_off = align(madt_off + madt.len(), 16);
        let fadt_len = acpi_tables::fadt::FADT::len();
        let facs_off = align(fadt_off + fadt_len, 64);
        let dsdt_off = align(facs_off + facs.len(), 16);
        let mut extra_offs = Vec::with_capacity(extra.len());
        let mut end = dsdt_off + dsdt.len();
        for table in extra {
            let off = align(end, 16);
            extra_offs.push(off);
            end = off + table.len();
        }
        let at = |off: usize| base + off as u64;

        let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
            .dsdt_64(at(dsdt_off))
            .firmware_ctrl_64(at(facs_off))
            .flag(Flags::Wbinvd)
            .flag(Flags::ProcC1)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton)
            .flag(Flags::ResetRegSup);
        fadt.sci_int = SCI_IRQ.into();
        fadt.pm1a_evt_blk = u32::from(PM1_EVT).into();
        fadt.pm1a_cnt_blk = u32::from(PM1_CNT).into();
        fadt.pm1_evt_len = 4;
        fadt.pm1_cnt_len = 2;
        fadt.x_pm1a_evt_blk = GAS::new(AddressSpace::SystemIo, 32, 0, AccessSize::WordAccess, u64::from(PM1_EVT));
        fadt.x_pm1a_cnt_blk = GAS::new(AddressSpace::SystemIo, 16, 0, AccessSize::WordAccess, u64::from(PM1_CNT));
        fadt.century = crate::rtc::reg::CENTURY;
        // IA-PC boot architecture: no 8042 (bit 1 clear), VGA not present, MSI not supported.
        fadt.iapc_boot_arch = ((1u16 << 2) | (1 << 3)).into();
        fadt.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, 0xCF9);
        fadt.reset_value = 0x06;
        let fadt = serialize(&fadt.finalize());

        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
        xsdt.add_entry(at(madt_off));
        xsdt.add_entry(at(fadt_off));
        for &off in &extra_offs {
            xsdt.add_entry(at(off));
        }
        let xsdt = serialize(&xsdt);
        let rsdp = serialize(&Rsdp::new(OEM_ID, at(xsdt_off)));

        let mut blob = alloc::vec![0u8; end];
        blob[..rsdp.len()].copy_from_slice(&rsdp);
        blob[xsdt_off..xsdt_off + xsdt.len()].copy_from_slice(&xsdt);
        blob[madt_off..madt_off + madt.len()].copy_from_slice(&madt);
        blob[fadt_off..fadt_off + fadt.len()].copy_from_slice(&fadt);
        blob[facs_off..facs_off + facs.len()].copy_from_slice(&facs);
        blob[dsdt_off..dsdt_off + dsdt.len()].copy_from_slice(&dsdt);
        for (table, &off) in extra.iter().zip(&extra_offs) {
            blob[off..off + table.len()].copy_from_slice(table);
        }
        Self { blob, base }
    }
}

/// Returns the AML of a virtio-mmio device (Linux's `virtio_mmio` matches `_HID`
/// "LNRO0005"): `Scope (\_SB) { Device (VRnn) { _HID, _UID, _CRS } }` with the register
/// window `[base, base + len)` and an edge-triggered, active-high ISA interrupt `irq`
/// (with no IO-APIC, Linux routes it through the 8259 pair).
pub fn virtio_mmio_device(index: u8, base: u32, len: u32, irq: u32) -> Vec<u8> {
    use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope};
    let name = alloc::format!("VR{:02}", index % 100);
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &index);
    let memory = Memory32Fixed::new(true, base, len);
    let interrupt = Interrupt::new(true, true, false, false, irq);
    let resources = ResourceTemplate::new(alloc::vec![&memory, &interrupt]);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let device = Device::new(Path::new(&name), alloc::vec![&hid, &uid, &crs]);
    serialize(&Scope::new(Path::new("\\_SB_"), alloc::vec![&device]))
}

/// Builds the NKCP table listing `entries` (the layout is `nk_abi::nkcp`'s: how a guest
/// OS's operator hands capability names to its processes).
pub fn nkcp_table(entries: &[nk_abi::nkcp::Entry]) -> Vec<u8> {
    use nk_abi::nkcp::{ENTRY_SIZE, REVISION, SIGNATURE};
    let mut sdt = Sdt::new(SIGNATURE, 36, REVISION, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&(entries.len() as u32).to_le_bytes());
    sdt.append_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    for entry in entries {
        sdt.append_slice(&entry.encode());
    }
    sdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Walks the tables as an OS does: RSDP -> XSDT -> each table, checking signatures,
    /// lengths and checksums.
    #[test]
    fn virtio_device_is_in_the_dsdt() {
        let aml = virtio_mmio_device(0, 0xD000_0000, 0x200, 5);
        let t = AcpiTables::build_with_devices(0xE_0000, 1, &[], &aml);
        let b = &t.blob;
        let find = |needle: &[u8]| b.windows(needle.len()).position(|w| w == needle);
        let dsdt = find(b"DSDT").unwrap();
        let dlen = u32_at(b, dsdt + 4) as usize;
        assert_eq!(sum(&b[dsdt..dsdt + dlen]), 0);
        assert_eq!(&b[dsdt + 36 + 15..dsdt + dlen], &aml[..]);
        assert!(find(b"LNRO0005\0").is_some());
        // Memory32Fixed: 0x86, length 9, read-write, base, length.
        assert!(find(&[0x86, 9, 0, 1, 0, 0, 0, 0xD0, 0, 2, 0, 0]).is_some());
        // Extended interrupt: consumer, edge, active high, exclusive, one GSI: 5.
        assert!(find(&[0x89, 6, 0, 3, 1, 5, 0, 0, 0]).is_some());
        assert!(find(b"_SB_").is_some() && find(b"VR00").is_some());
    }

    #[test]
    fn tables_walk_and_checksum() {
        let base = 0xE_0000;
        let t = AcpiTables::build(base, 2);
        let b = &t.blob;
        assert_eq!(&b[..8], b"RSD PTR ");
        assert_eq!(sum(&b[..20]), 0);
        assert_eq!(sum(&b[..36]), 0);
        assert_eq!(b[15], 2, "revision 2");
        let xsdt = (u64_at(b, 24) - base) as usize;
        assert_eq!(&b[xsdt..xsdt + 4], b"XSDT");
        let xlen = u32_at(b, xsdt + 4) as usize;
        assert_eq!(sum(&b[xsdt..xsdt + xlen]), 0);
        let mut sigs = Vec::new();
        for i in 0..(xlen - 36) / 8 {
            let off = (u64_at(b, xsdt + 36 + 8 * i) - base) as usize;
            let len = u32_at(b, off + 4) as usize;
            assert_eq!(sum(&b[off..off + len]), 0, "checksum of {:?}", &b[off..off + 4]);
            sigs.push((b[off..off + 4].to_vec(), off, len));
        }
        assert_eq!(sigs[0].0, b"APIC");
        assert_eq!(sigs[1].0, b"FACP");
        // MADT: LAPIC address, PCAT_COMPAT, two LAPIC entries, no IO-APIC.
        let (_, madt, mlen) = sigs[0].clone();
        assert_eq!(u32_at(b, madt + 36), 0xFEE0_0000);
        assert_eq!(u32_at(b, madt + 40) & 1, 1);
        let entries: Vec<u8> = (0..2).map(|i| b[madt + 44 + 8 * i]).collect();
        assert_eq!(entries, vec![0, 0]);
        assert_eq!(mlen, 44 + 16);
        assert_eq!(b[madt + 44 + 8 + 3], 1, "second APIC id");
        // FADT: not hardware-reduced, PM1 blocks, SCI, reset register, DSDT and FACS.
        let (_, fadt, _) = sigs[1].clone();
        assert_eq!(u32_at(b, fadt + 112) & (1 << 20), 0);
        assert_ne!(u32_at(b, fadt + 112) & (1 << 10), 0);
        assert_eq!(u32_at(b, fadt + 56), 0x600);
        assert_eq!(u32_at(b, fadt + 64), 0x604);
        assert_eq!(b[fadt + 88], 4);
        assert_eq!(b[fadt + 89], 2);
        assert_eq!(u32_at(b, fadt + 48), 0, "no SMI command port");
        assert_eq!(u64_at(b, fadt + 116 + 4), 0xCF9);
        let dsdt = (u64_at(b, fadt + 140) - base) as usize;
        assert_eq!(&b[dsdt..dsdt + 4], b"DSDT");
        let dlen = u32_at(b, dsdt + 4) as usize;
        assert_eq!(sum(&b[dsdt..dsdt + dlen]), 0);
        assert_eq!(&b[dsdt + 36..dsdt + 42], b"\x08\\_S5_");
        let facs = (u64_at(b, fadt + 132) - base) as usize;
        assert_eq!(&b[facs..facs + 4], b"FACS");
        assert_eq!((base as usize + facs) % 64, 0, "FACS 64-byte aligned");
    }

    /// An NKCP table built here reads back through the ABI's reader, and the XSDT lists it
    /// after the MADT and FADT with every checksum right.
    #[test]
    fn nkcp_table_is_listed_and_reads_back() {
        use nk_abi::{nkcp, NameWords};
        let caps = [
            nkcp::Entry::new(NameWords { low: 0x1111, high: 0x2222 }, 2, 3, "exo/frames"),
            nkcp::Entry::new(NameWords { low: 0x3333, high: 0x4444 }, 3, 0, "guest-os/vm"),
        ];
        let table = nkcp_table(&caps);
        assert_eq!(nkcp::entries(&table).unwrap().collect::<Vec<_>>(), caps);
        let base = 0xE_0000;
        let t = AcpiTables::build_with(base, 1, &[&table]);
        let b = &t.blob;
        let xsdt = (u64_at(b, 24) - base) as usize;
        let xlen = u32_at(b, xsdt + 4) as usize;
        assert_eq!(xlen, 36 + 3 * 8);
        assert_eq!(sum(&b[xsdt..xsdt + xlen]), 0);
        let off = (u64_at(b, xsdt + 36 + 16) - base) as usize;
        assert_eq!(off % 16, 0);
        assert_eq!(&b[off..off + 4], b"NKCP");
        let got: Vec<_> = nkcp::entries(&b[off..]).unwrap().collect();
        assert_eq!(got[1].label(), "guest-os/vm");
        assert_eq!(got[1].name, NameWords { low: 0x3333, high: 0x4444 });
    }
}
