//! The Linux x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst, protocol
//! 2.12 and later): the setup header is parsed and checked against the file, the
//! protected-mode kernel is placed at its preferred address, the initramfs at the top of
//! RAM, and the zero page (`struct boot_params`) is filled with the header, command line,
//! initramfs, E820 map and ACPI RSDP. The vCPU then enters at `load + 0x200` in long mode
//! with RSI = the zero page, on identity-mapped page tables and the boot GDT.

use core::fmt;

use crate::image::{
    pc_e820, u16_at, u32_at, u64_at, write_boot_gdt, write_identity_map, GuestMemory, OutOfGuest, BOOT_GDT_LIMIT,
};

/// Fixed guest-physical places of the boot data (all in RAM below 640 KiB).
pub const GDT_GPA: u64 = 0x6000;
pub const ZERO_PAGE_GPA: u64 = 0x7000;
pub const PAGE_TABLES_GPA: u64 = 0x9000;
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// The lowest protocol version with `xloadflags` (2.12).
pub const MIN_PROTOCOL: u16 = 0x020C;
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADED_HIGH: u8 = 1 << 0;

/// Why a bzImage was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BzError {
    /// Shorter than the setup header.
    Truncated {
        need: u64,
        have: u64,
    },
    /// No 0xAA55 boot signature or "HdrS".
    NotBzImage,
    ProtocolTooOld(u16),
    /// No 64-bit entry point (xloadflags.XLF_KERNEL_64 clear) or not loaded high.
    No64BitEntry,
    /// The kernel's alignment is not a power of two, or its preferred address is not aligned.
    BadAlignment,
    /// The kernel plus its decompression space does not fit in the VM's memory.
    KernelDoesNotFit {
        need: u64,
        have: u64,
    },
    CmdlineTooLong {
        max: u32,
    },
    /// The initramfs does not fit between the kernel and the top of memory.
    InitrdDoesNotFit,
    Memory(OutOfGuest),
}

impl From<OutOfGuest> for BzError {
    fn from(e: OutOfGuest) -> Self {
        BzError::Memory(e)
    }
}

impl fmt::Display for BzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BzError::Truncated { need, have } => {
                write!(f, "bzImage truncated: its header says {need} bytes, the module has {have}")
            }
            BzError::NotBzImage => write!(f, "no bzImage boot signature"),
            BzError::ProtocolTooOld(v) => {
                write!(f, "boot protocol {}.{:02} is older than 2.12", v >> 8, v & 0xFF)
            }
            BzError::No64BitEntry => write!(f, "kernel has no 64-bit entry point (xloadflags)"),
            BzError::BadAlignment => write!(f, "kernel alignment or preferred address malformed"),
            BzError::KernelDoesNotFit { need, have } => {
                write!(f, "kernel needs {} MiB of guest memory, the VM has {} MiB", need >> 20, have >> 20)
            }
            BzError::CmdlineTooLong { max } => write!(f, "command line longer than the kernel's {max} bytes"),
            BzError::InitrdDoesNotFit => write!(f, "initramfs does not fit above the kernel"),
            BzError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// The checked setup header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage {
    pub protocol: u16,
    /// File offset of the protected-mode kernel ((setup_sects + 1) * 512).
    pub kernel_offset: usize,
    /// Its length (syssize * 16).
    pub kernel_len: usize,
    pub pref_address: u64,
    pub init_size: u64,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
    /// Where the setup header ends in the file (0x202 + the jump's offset byte).
    header_end: usize,
}

/// Parses and checks the setup header of `image`.
pub fn parse(image: &[u8]) -> Result<BzImage, BzError> {
    let have = image.len() as u64;
    if image.len() < 0x268 {
        return Err(BzError::Truncated { need: 0x268, have });
    }
    if u16_at(image, 0x1FE) != Some(0xAA55) || &image[0x202..0x206] != b"HdrS" {
        return Err(BzError::NotBzImage);
    }
    let protocol = u16_at(image, 0x206).unwrap_or(0);
    if protocol < MIN_PROTOCOL {
        return Err(BzError::ProtocolTooOld(protocol));
    }
    let setup_sects = match image[0x1F1] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_offset = (setup_sects + 1) * 512;
    let kernel_len = u32_at(image, 0x1F4).unwrap_or(0) as usize * 16;
    let need = (kernel_offset + kernel_len) as u64;
    if need > have || kernel_len == 0 {
        return Err(BzError::Truncated { need, have });
    }
    let loadflags = image[0x211];
    let xloadflags = u16_at(image, 0x236).unwrap_or(0);
    if xloadflags & XLF_KERNEL_64 == 0 || loadflags & LOADED_HIGH == 0 {
        return Err(BzError::No64BitEntry);
    }
    let alignment = u32_at(image, 0x230).unwrap_or(0);
    let pref_address = u64_at(image, 0x258).unwrap_or(0);
    if !alignment.is_power_of_two() || !pref_address.is_multiple_of(u64::from(alignment)) || pref_address < 0x10_0000 {
        return Err(BzError::BadAlignment);
    }
    Ok(BzImage {
        protocol,
        kernel_offset,
        kernel_len,
        pref_address,
        init_size: u64::from(u32_at(image, 0x260).unwrap_or(0)),
        cmdline_size: u32_at(image, 0x238).unwrap_or(255),
        initrd_addr_max: u32_at(image, 0x22C).unwrap_or(0x37FF_FFFF),
        header_end: (0x202 + usize::from(image[0x201])).min(0x290),
    })
}

/// Where a loaded kernel starts and with what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    /// The 64-bit entry point (`load + 0x200`).
    pub rip: u64,
    /// The zero page.
    pub rsi: u64,
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub initrd: Option<(u64, u64)>,
}

/// Loads a checked bzImage with its command line and initramfs into `mem` (already zeroed)
/// and returns the entry state. `rsdp` is the ACPI RSDP's guest-physical address, if the
/// VM has ACPI tables.
pub fn load(
    mem: &mut dyn GuestMemory,
    image: &[u8],
    bz: &BzImage,
    cmdline: &str,
    initrd: Option<&[u8]>,
    rsdp: Option<u64>,
) -> Result<LinuxEntry, BzError> {
    let size = mem.size();
    let load = bz.pref_address;
    let kernel_end = load + bz.init_size.max(bz.kernel_len as u64);
    if kernel_end > size {
        return Err(BzError::KernelDoesNotFit { need: kernel_end, have: size });
    }
    if cmdline.len() as u64 >= u64::from(bz.cmdline_size) || cmdline.len() >= 0x1_0000 {
        return Err(BzError::CmdlineTooLong { max: bz.cmdline_size });
    }
    let initrd_place = match initrd {
        None => None,
        Some(bytes) => {
            let top = size.min(u64::from(bz.initrd_addr_max) + 1);
            let len = bytes.len() as u64;
            let at = top.checked_sub(len).ok_or(BzError::InitrdDoesNotFit)? & !0xFFF;
            if at < kernel_end {
                return Err(BzError::InitrdDoesNotFit);
            }
            Some((at, len))
        }
    };

    mem.write(load, &image[bz.kernel_offset..bz.kernel_offset + bz.kernel_len])?;
    if let (Some(bytes), Some((at, _))) = (initrd, initrd_place) {
        mem.write(at, bytes)?;
    }
    mem.write(CMDLINE_GPA, cmdline.as_bytes())?;
    mem.write(CMDLINE_GPA + cmdline.len() as u64, &[0])?;
    // BIOS data area: 636 KiB of base memory (0x413), no EBDA pointer (0x40E).
    mem.write(0x413, &((crate::image::LOW_RAM_END >> 10) as u16).to_le_bytes())?;

    let mut zp = [0u8; 4096];
    zp[0x1F1..bz.header_end].copy_from_slice(&image[0x1F1..bz.header_end]);
    zp[0x210] = 0xFF; // type_of_loader: undefined
    zp[0x211] &= !(1 << 6); // loadflags: KEEP_SEGMENTS clear
    zp[0x214..0x218].copy_from_slice(&(load as u32).to_le_bytes()); // code32_start
    zp[0x228..0x22C].copy_from_slice(&(CMDLINE_GPA as u32).to_le_bytes());
    if let Some((at, len)) = initrd_place {
        zp[0x218..0x21C].copy_from_slice(&(at as u32).to_le_bytes());
        zp[0x21C..0x220].copy_from_slice(&(len as u32).to_le_bytes());
        zp[0xC0..0xC4].copy_from_slice(&((at >> 32) as u32).to_le_bytes());
        zp[0xC4..0xC8].copy_from_slice(&((len >> 32) as u32).to_le_bytes());
    }
    if let Some(rsdp) = rsdp {
        zp[0x70..0x78].copy_from_slice(&rsdp.to_le_bytes());
    }
    let map = pc_e820(size);
    zp[0x1E8] = map.len() as u8;
    for (i, e) in map.iter().enumerate() {
        let at = 0x2D0 + i * 20;
        zp[at..at + 8].copy_from_slice(&e.addr.to_le_bytes());
        zp[at + 8..at + 16].copy_from_slice(&e.size.to_le_bytes());
        zp[at + 16..at + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    zp[0x1EF] = 0; // sentinel
    mem.write(ZERO_PAGE_GPA, &zp)?;
    write_boot_gdt(mem, GDT_GPA)?;
    let cr3 = write_identity_map(mem, PAGE_TABLES_GPA)?;
    Ok(LinuxEntry {
        rip: load + 0x200,
        rsi: ZERO_PAGE_GPA,
        cr3,
        gdt_base: GDT_GPA,
        gdt_limit: BOOT_GDT_LIMIT,
        initrd: initrd_place,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testmem::VecMemory;

    /// A bzImage with Debian cloud 6.1's header values and a small payload.
    pub(crate) fn fake_bzimage(payload: usize) -> Vec<u8> {
        let setup_sects = 39u8;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        b[0x1F1] = setup_sects;
        b[0x1F4..0x1F8].copy_from_slice(&((payload / 16) as u32).to_le_bytes());
        b[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
        b[0x201] = 0x6A; // header ends at 0x26C
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        b[0x211] = 0x01;
        b[0x22C..0x230].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&0x7Fu16.to_le_bytes());
        b[0x238..0x23C].copy_from_slice(&2047u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
        let start = (usize::from(setup_sects) + 1) * 512;
        for (i, byte) in b[start..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        b
    }

    #[test]
    fn parses_debian_like_header() {
        let img = fake_bzimage(0x1000);
        let bz = parse(&img).unwrap();
        assert_eq!(bz.protocol, 0x20F);
        assert_eq!(bz.kernel_offset, 0x5000);
        assert_eq!(bz.kernel_len, 0x1000);
        assert_eq!(bz.pref_address, 0x100_0000);
        assert_eq!(bz.header_end, 0x26C);
    }

    #[test]
    fn refuses_truncated_and_malformed() {
        let img = fake_bzimage(0x1000);
        assert!(matches!(parse(&img[..img.len() - 1]), Err(BzError::Truncated { need: 0x6000, have: 0x5FFF })));
        assert!(matches!(parse(&img[..0x100]), Err(BzError::Truncated { .. })));
        let mut old = img.clone();
        old[0x206..0x208].copy_from_slice(&0x0208u16.to_le_bytes());
        assert_eq!(parse(&old), Err(BzError::ProtocolTooOld(0x208)));
        let mut no64 = img.clone();
        no64[0x236] = 0;
        assert_eq!(parse(&no64), Err(BzError::No64BitEntry));
        let mut bad = img.clone();
        bad[0x202] = b'X';
        assert_eq!(parse(&bad), Err(BzError::NotBzImage));
        let mut misaligned = img;
        misaligned[0x258] = 0x10;
        assert_eq!(parse(&misaligned), Err(BzError::BadAlignment));
    }

    #[test]
    fn loads_kernel_initrd_and_zero_page() {
        let img = fake_bzimage(0x1000);
        let bz = parse(&img).unwrap();
        let mut mem = VecMemory(vec![0; 32 << 20]);
        let initrd = vec![0xAB; 5000];
        let e = load(&mut mem, &img, &bz, "console=ttyS0 nokaslr", Some(&initrd), Some(0xE_0000)).unwrap();
        assert_eq!(e.rip, 0x100_0200);
        assert_eq!(e.rsi, ZERO_PAGE_GPA);
        let (at, len) = e.initrd.unwrap();
        assert_eq!((at % 4096, len), (0, 5000));
        assert!(at + len <= 32 << 20 && at >= 0x140_0000);
        assert_eq!(mem.0[at as usize], 0xAB);
        assert_eq!(mem.0[0x100_0000 + 7], 7, "kernel copied");
        let zp = ZERO_PAGE_GPA;
        assert_eq!(mem.0[(zp + 0x210) as usize], 0xFF);
        assert_eq!(&mem.0[(zp + 0x202) as usize..(zp + 0x206) as usize], b"HdrS");
        assert_eq!(mem.u32(zp + 0x228), CMDLINE_GPA as u32);
        assert_eq!(&mem.0[CMDLINE_GPA as usize..CMDLINE_GPA as usize + 22], b"console=ttyS0 nokaslr\0");
        assert_eq!(mem.u32(zp + 0x218), at as u32);
        assert_eq!(mem.u32(zp + 0x21C), 5000);
        assert_eq!(mem.u64(zp + 0x70), 0xE_0000);
        assert_eq!(mem.0[(zp + 0x1E8) as usize], 3);
        assert_eq!(mem.u64(zp + 0x2D0 + 8), 0x9F000, "RAM below 636 KiB");
        assert_eq!(mem.u32(zp + 0x2D0 + 40 + 16), 1);
        assert_eq!(mem.u64(zp + 0x2D0 + 40 + 8), (32 << 20) - 0x10_0000);
        assert_eq!(mem.u64(GDT_GPA + 0x10), 0x00AF_9B00_0000_FFFF);
        assert_eq!(mem.u64(PAGE_TABLES_GPA), PAGE_TABLES_GPA + 0x1003);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let img = fake_bzimage(0x1000);
        let bz = parse(&img).unwrap();
        let mut small = VecMemory(vec![0; 16 << 20]);
        assert!(matches!(load(&mut small, &img, &bz, "", None, None), Err(BzError::KernelDoesNotFit { .. })));
        let mut mem = VecMemory(vec![0; 0x160_0000]);
        let big = vec![0; 0x30_0000];
        assert_eq!(load(&mut mem, &img, &bz, "", Some(&big), None), Err(BzError::InitrdDoesNotFit));
        let long = "x".repeat(2047);
        assert_eq!(load(&mut mem, &img, &bz, &long, None, None), Err(BzError::CmdlineTooLong { max: 2047 }));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_mutated_headers(flips in proptest::collection::vec((0x1F0usize..0x270, proptest::prelude::any::<u8>()), 1..10)) {
            let mut img = fake_bzimage(0x1000);
            for (at, v) in flips { img[at] = v; }
            if let Ok(bz) = parse(&img) {
                let mut mem = VecMemory(vec![0; 24 << 20]);
                let _ = load(&mut mem, &img, &bz, "console=ttyS0", Some(&[1, 2, 3]), None);
            }
        }
    }
}
