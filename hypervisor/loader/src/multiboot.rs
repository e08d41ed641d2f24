//! Multiboot (0.6.96) and Multiboot2 (1.6) kernels: the header is found and checked
//! ([`crate::image::ImageKind::detect`]), the kernel is loaded by the header's address
//! fields (v1 flag 16, v2 address tag) or else by its ELF program headers (ELF32 or ELF64,
//! physical addresses), boot modules are placed page-aligned after it, and the information
//! structure (memory, command line, modules, memory map, loader name; for v2 also the ACPI
//! RSDP) is written below 640 KiB. The vCPU enters in 32-bit protected mode without paging
//! with EAX = the magic, EBX = the structure, flat CS/DS, interrupts off (Multiboot §3.2,
//! Multiboot2 §3.3).

use core::fmt;

use crate::image::{
    pc_e820, u16_at, u32_at, u64_at, write_boot_gdt, GuestMemory, OutOfGuest, BOOT_GDT_LIMIT, HIGH_RAM_START,
};

/// The value in EAX at a v1 entry.
pub const MB1_BOOT_MAGIC: u32 = 0x2BAD_B002;
/// The value in EAX at a v2 entry.
pub const MB2_BOOT_MAGIC: u32 = 0x36D7_6289;
/// Where the boot GDT and the information structure go.
pub const GDT_GPA: u64 = 0x6000;
pub const INFO_GPA: u64 = 0x1_0000;
const INFO_MAX: usize = 0x2000;
/// The stack a Multiboot kernel finds in ESP (the spec leaves it undefined; a valid one
/// is kinder than 0).
pub const STACK_TOP: u64 = 0x9_0000;
/// The most modules one kernel gets.
pub const MAX_MODULES: usize = 8;
const LOADER_NAME: &str = "null-Kernel hypervisor";

/// Why a Multiboot kernel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MbError {
    /// The header is cut off or a field lies outside the file.
    Truncated,
    /// A required feature this loader does not provide (v1 flag bit, or a v2 tag).
    Unsupported(&'static str),
    /// The address fields are inconsistent (load above the header, end before start, ...).
    BadAddresses,
    /// No address fields and no usable ELF program headers.
    NoLoadableSegments,
    /// The kernel or a module lies outside the VM's memory or below 1 MiB.
    DoesNotFit,
    TooManyModules,
    Memory(OutOfGuest),
}

impl From<OutOfGuest> for MbError {
    fn from(e: OutOfGuest) -> Self {
        MbError::Memory(e)
    }
}

impl fmt::Display for MbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MbError::Truncated => write!(f, "Multiboot header or image truncated"),
            MbError::Unsupported(what) => write!(f, "kernel requires {what}, which this loader does not provide"),
            MbError::BadAddresses => write!(f, "Multiboot address fields are inconsistent"),
            MbError::NoLoadableSegments => write!(f, "no address fields and no loadable ELF segments"),
            MbError::DoesNotFit => write!(f, "kernel or module does not fit in the VM's memory above 1 MiB"),
            MbError::TooManyModules => write!(f, "more than {MAX_MODULES} modules"),
            MbError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// A module handed to the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub bytes: &'a [u8],
    pub cmdline: &'a str,
}

/// How to enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootEntry {
    pub eip: u32,
    pub eax: u32,
    pub ebx: u32,
    pub esp: u32,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    /// The end of the kernel's memory (page-aligned): modules start here.
    pub kernel_end: u64,
}

/// One contiguous piece of the kernel image to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    gpa: u64,
    file_offset: usize,
    file_len: usize,
    mem_len: u64,
}

const MAX_PIECES: usize = 16;

struct Pieces {
    list: [Piece; MAX_PIECES],
    count: usize,
    entry: u32,
}

/// Loads the kernel's ELF (32- or 64-bit) segments by physical address.
fn elf_pieces(image: &[u8]) -> Result<Pieces, MbError> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(MbError::NoLoadableSegments);
    }
    let class64 = match image.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(MbError::NoLoadableSegments),
    };
    let t = MbError::Truncated;
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(image, 24).ok_or(t)?,
            u64_at(image, 32).ok_or(t)?,
            u16_at(image, 54).ok_or(t)?,
            u16_at(image, 56).ok_or(t)?,
        )
    } else {
        (
            u64::from(u32_at(image, 24).ok_or(t)?),
            u64::from(u32_at(image, 28).ok_or(t)?),
            u16_at(image, 42).ok_or(t)?,
            u16_at(image, 44).ok_or(t)?,
        )
    };
    let mut pieces =
        Pieces { list: [Piece { gpa: 0, file_offset: 0, file_len: 0, mem_len: 0 }; MAX_PIECES], count: 0, entry: 0 };
    pieces.entry = u32::try_from(entry).map_err(|_| MbError::BadAddresses)?;
    for i in 0..u64::from(phnum) {
        let at = usize::try_from(phoff + i * u64::from(phentsize)).map_err(|_| t)?;
        if u32_at(image, at) != Some(1) {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = if class64 {
            (u64_at(image, at + 8), u64_at(image, at + 24), u64_at(image, at + 32), u64_at(image, at + 40))
        } else {
            (
                u32_at(image, at + 4).map(u64::from),
                u32_at(image, at + 12).map(u64::from),
                u32_at(image, at + 16).map(u64::from),
                u32_at(image, at + 20).map(u64::from),
            )
        };
        let (offset, paddr, filesz, memsz) = (offset.ok_or(t)?, paddr.ok_or(t)?, filesz.ok_or(t)?, memsz.ok_or(t)?);
        if filesz > memsz || offset.checked_add(filesz).is_none_or(|end| end > image.len() as u64) {
            return Err(MbError::Truncated);
        }
        if memsz == 0 {
            continue;
        }
        if pieces.count == MAX_PIECES {
            return Err(MbError::NoLoadableSegments);
        }
        pieces.list[pieces.count] =
            Piece { gpa: paddr, file_offset: offset as usize, file_len: filesz as usize, mem_len: memsz };
        pieces.count += 1;
    }
    if pieces.count == 0 {
        return Err(MbError::NoLoadableSegments);
    }
    Ok(pieces)
}

/// The a.out-kludge address fields shared by v1 (flag 16) and v2 (address tag).
fn address_pieces(image: &[u8], header: usize, fields: [u32; 4], entry: u32) -> Result<Pieces, MbError> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr] = fields;
    if load_addr > header_addr {
        return Err(MbError::BadAddresses);
    }
    let file_offset = (header as u64).checked_sub(u64::from(header_addr - load_addr)).ok_or(MbError::BadAddresses)?;
    let file_len = if load_end_addr == 0 {
        image.len() as u64 - file_offset
    } else {
        u64::from(load_end_addr.checked_sub(load_addr).ok_or(MbError::BadAddresses)?)
    };
    if file_offset + file_len > image.len() as u64 {
        return Err(MbError::Truncated);
    }
    let end = u64::from(load_addr) + file_len;
    let mem_len = if bss_end_addr == 0 {
        file_len
    } else {
        u64::from(bss_end_addr)
            .checked_sub(u64::from(load_addr))
            .filter(|&m| m >= file_len)
            .ok_or(MbError::BadAddresses)?
    };
    let _ = end;
    let mut pieces =
        Pieces { list: [Piece { gpa: 0, file_offset: 0, file_len: 0, mem_len: 0 }; MAX_PIECES], count: 1, entry };
    pieces.list[0] =
        Piece { gpa: u64::from(load_addr), file_offset: file_offset as usize, file_len: file_len as usize, mem_len };
    Ok(pieces)
}

/// Copies the pieces into memory (zeroed already, so BSS needs nothing) and returns the
/// page-aligned end of the kernel.
fn load_pieces(mem: &mut dyn GuestMemory, image: &[u8], pieces: &Pieces) -> Result<u64, MbError> {
    let mut end = HIGH_RAM_START;
    for p in &pieces.list[..pieces.count] {
        let top = p.gpa.checked_add(p.mem_len).ok_or(MbError::DoesNotFit)?;
        if p.gpa < HIGH_RAM_START || top > mem.size() || top > 1 << 32 {
            return Err(MbError::DoesNotFit);
        }
        mem.write(p.gpa, &image[p.file_offset..p.file_offset + p.file_len])?;
        end = end.max(top);
    }
    let entry_ok =
        pieces.list[..pieces.count].iter().any(|p| (p.gpa..p.gpa + p.mem_len).contains(&u64::from(pieces.entry)));
    if !entry_ok {
        return Err(MbError::BadAddresses);
    }
    Ok(end.next_multiple_of(4096))
}

/// Places the modules page-aligned from `start`; returns (start, end) of each.
fn load_modules(
    mem: &mut dyn GuestMemory,
    start: u64,
    modules: &[Module<'_>],
) -> Result<[(u64, u64); MAX_MODULES], MbError> {
    if modules.len() > MAX_MODULES {
        return Err(MbError::TooManyModules);
    }
    let mut places = [(0, 0); MAX_MODULES];
    let mut at = start;
    for (i, m) in modules.iter().enumerate() {
        let end = at.checked_add(m.bytes.len() as u64).ok_or(MbError::DoesNotFit)?;
        if end > mem.size() || end > 1 << 32 {
            return Err(MbError::DoesNotFit);
        }
        mem.write(at, m.bytes)?;
        places[i] = (at, end);
        at = end.next_multiple_of(4096);
    }
    Ok(places)
}

/// A small bump writer for the information structure's area.
struct InfoArea {
    buf: [u8; INFO_MAX],
    len: usize,
}

impl InfoArea {
    fn new() -> Self {
        Self { buf: [0; INFO_MAX], len: 0 }
    }
    fn reserve(&mut self, n: usize, align: usize) -> Result<usize, MbError> {
        let at = self.len.next_multiple_of(align);
        let end = at.checked_add(n).filter(|&e| e <= INFO_MAX).ok_or(MbError::DoesNotFit)?;
        self.len = end;
        Ok(at)
    }
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.put(at, &v.to_le_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.put(at, &v.to_le_bytes());
    }
    /// Stores a NUL-terminated string; returns its guest-physical address.
    fn string(&mut self, s: &str) -> Result<u32, MbError> {
        let at = self.reserve(s.len() + 1, 1)?;
        self.put(at, s.as_bytes());
        Ok((INFO_GPA as usize + at) as u32)
    }
}

fn mem_kib(size: u64) -> (u32, u32) {
    let upper = size.min(1 << 32).saturating_sub(HIGH_RAM_START) >> 10;
    ((crate::image::LOW_RAM_END >> 10) as u32, upper as u32)
}

/// Loads a Multiboot v1 kernel whose header is at `header`.
pub fn load_v1(
    mem: &mut dyn GuestMemory,
    image: &[u8],
    header: usize,
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<MultibootEntry, MbError> {
    let field = |i: usize| u32_at(image, header + 4 * i).ok_or(MbError::Truncated);
    let flags = field(1)?;
    // Bits 0-15 are requirements: 0 (page-aligned modules) and 1 (memory information) are
    // met; 2 (video mode table) and the undefined ones are not (§3.1.2).
    if flags & 0x4 != 0 {
        return Err(MbError::Unsupported("a video mode (flag 2)"));
    }
    if flags & 0xFFF8 != 0 {
        return Err(MbError::Unsupported("an undefined feature (flags bits 3-15)"));
    }
    let pieces = if flags & (1 << 16) != 0 {
        address_pieces(image, header, [field(3)?, field(4)?, field(5)?, field(6)?], field(7)?)?
    } else {
        elf_pieces(image)?
    };
    let kernel_end = load_pieces(mem, image, &pieces)?;
    let places = load_modules(mem, kernel_end, modules)?;

    let mut area = InfoArea::new();
    let info = area.reserve(128, 8)?;
    let (lower, upper) = mem_kib(mem.size());
    area.put_u32(info + 4, lower);
    area.put_u32(info + 8, upper);
    let cmd = area.string(cmdline)?;
    area.put_u32(info + 16, cmd);
    let mods = area.reserve(16 * modules.len().max(1), 4)?;
    for (i, m) in modules.iter().enumerate() {
        let s = area.string(m.cmdline)?;
        let (start, end) = places[i];
        area.put_u32(mods + 16 * i, start as u32);
        area.put_u32(mods + 16 * i + 4, end as u32);
        area.put_u32(mods + 16 * i + 8, s);
    }
    area.put_u32(info + 20, modules.len() as u32);
    area.put_u32(info + 24, (INFO_GPA as usize + mods) as u32);
    let map = pc_e820(mem.size());
    let mmap = area.reserve(24 * map.len(), 4)?;
    for (i, e) in map.iter().enumerate() {
        let at = mmap + 24 * i;
        area.put_u32(at, 20);
        area.put_u64(at + 4, e.addr);
        area.put_u64(at + 12, e.size);
        area.put_u32(at + 20, e.kind);
    }
    area.put_u32(info + 44, (24 * map.len()) as u32);
    area.put_u32(info + 48, (INFO_GPA as usize + mmap) as u32);
    let name = area.string(LOADER_NAME)?;
    area.put_u32(info + 64, name);
    // mem, cmdline, mods, mmap, boot_loader_name.
    area.put_u32(info, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9));
    mem.write(INFO_GPA, &area.buf[..area.len])?;
    write_boot_gdt(mem, GDT_GPA)?;
    Ok(MultibootEntry {
        eip: pieces.entry,
        eax: MB1_BOOT_MAGIC,
        ebx: (INFO_GPA + info as u64) as u32,
        esp: STACK_TOP as u32,
        gdt_base: GDT_GPA,
        gdt_limit: BOOT_GDT_LIMIT,
        kernel_end,
    })
}

/// Copies `s` NUL-terminated into `text`; returns the length with the NUL.
fn cstring(text: &mut [u8; 256], s: &str) -> Result<usize, MbError> {
    let n = s.len();
    if n + 1 > text.len() {
        return Err(MbError::DoesNotFit);
    }
    text[..n].copy_from_slice(s.as_bytes());
    text[n] = 0;
    Ok(n + 1)
}

/// The information tags this loader provides (v2 §3.6).
const PROVIDED_TAGS: [u32; 7] = [1, 2, 3, 4, 6, 14, 15];

/// Loads a Multiboot2 kernel whose header is at `header`; `rsdp` is the VM's ACPI RSDP
/// (36 bytes), if it has ACPI tables.
pub fn load_v2(
    mem: &mut dyn GuestMemory,
    image: &[u8],
    header: usize,
    cmdline: &str,
    modules: &[Module<'_>],
    rsdp: Option<&[u8]>,
) -> Result<MultibootEntry, MbError> {
    let header_len = u32_at(image, header + 8).ok_or(MbError::Truncated)? as usize;
    let end = header.checked_add(header_len).filter(|&e| e <= image.len()).ok_or(MbError::Truncated)?;
    let mut at = header + 16;
    let mut address: Option<[u32; 4]> = None;
    let mut entry: Option<u32> = None;
    while at + 8 <= end {
        let kind = u16_at(image, at).ok_or(MbError::Truncated)?;
        let optional = u16_at(image, at + 2).ok_or(MbError::Truncated)? & 1 != 0;
        let size = u32_at(image, at + 4).ok_or(MbError::Truncated)? as usize;
        if size < 8 || at + size > end {
            return Err(MbError::Truncated);
        }
        let word = |i: usize| u32_at(image, at + 8 + 4 * i).ok_or(MbError::Truncated);
        match kind {
            0 => break,
            1 => {
                for i in 0..(size - 8) / 4 {
                    let wanted = word(i)?;
                    if !optional && !PROVIDED_TAGS.contains(&wanted) {
                        return Err(MbError::Unsupported("an information tag it does not provide"));
                    }
                }
            }
            2 => address = Some([word(0)?, word(1)?, word(2)?, word(3)?]),
            3 => entry = Some(word(0)?),
            4 | 6 | 10 => {} // console flags, module alignment (always page-aligned), relocatable
            _ if optional => {}
            5 => return Err(MbError::Unsupported("a framebuffer")),
            7..=9 => return Err(MbError::Unsupported("EFI boot services")),
            _ => return Err(MbError::Unsupported("an unknown header tag")),
        }
        at += size.next_multiple_of(8);
    }
    let pieces = match (address, entry) {
        (Some(fields), Some(entry)) => address_pieces(image, header, fields, entry)?,
        (None, entry) => {
            let mut p = elf_pieces(image)?;
            if let Some(e) = entry {
                p.entry = e;
            }
            p
        }
        (Some(_), None) => return Err(MbError::BadAddresses),
    };
    let kernel_end = load_pieces(mem, image, &pieces)?;
    let places = load_modules(mem, kernel_end, modules)?;

    let mut area = InfoArea::new();
    let start = area.reserve(8, 8)?;
    let tag = |area: &mut InfoArea, kind: u32, body: &[u8]| -> Result<usize, MbError> {
        let at = area.reserve(8 + body.len(), 8)?;
        area.put_u32(at, kind);
        area.put_u32(at + 4, (8 + body.len()) as u32);
        area.put(at + 8, body);
        Ok(at)
    };
    let mut text = [0u8; 256];
    let n = cstring(&mut text, cmdline)?;
    tag(&mut area, 1, &text[..n])?;
    let n = cstring(&mut text, LOADER_NAME)?;
    tag(&mut area, 2, &text[..n])?;
    for (i, m) in modules.iter().enumerate() {
        let (s, e) = places[i];
        let mut body = [0u8; 8 + 256];
        body[..4].copy_from_slice(&(s as u32).to_le_bytes());
        body[4..8].copy_from_slice(&(e as u32).to_le_bytes());
        let n = cstring(&mut text, m.cmdline)?;
        body[8..8 + n].copy_from_slice(&text[..n]);
        tag(&mut area, 3, &body[..8 + n])?;
    }
    let (lower, upper) = mem_kib(mem.size());
    let mut meminfo = [0u8; 8];
    meminfo[..4].copy_from_slice(&lower.to_le_bytes());
    meminfo[4..].copy_from_slice(&upper.to_le_bytes());
    tag(&mut area, 4, &meminfo)?;
    let map = pc_e820(mem.size());
    let mut mmap = [0u8; 8 + 24 * 3];
    mmap[..4].copy_from_slice(&24u32.to_le_bytes());
    for (i, e) in map.iter().enumerate() {
        let at = 8 + 24 * i;
        mmap[at..at + 8].copy_from_slice(&e.addr.to_le_bytes());
        mmap[at + 8..at + 16].copy_from_slice(&e.size.to_le_bytes());
        mmap[at + 16..at + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    tag(&mut area, 6, &mmap)?;
    if let Some(rsdp) = rsdp {
        tag(&mut area, 14, &rsdp[..rsdp.len().min(20)])?;
        tag(&mut area, 15, rsdp)?;
    }
    tag(&mut area, 0, &[])?;
    let total = area.len as u32;
    area.put_u32(start, total);
    mem.write(INFO_GPA, &area.buf[..area.len])?;
    write_boot_gdt(mem, GDT_GPA)?;
    Ok(MultibootEntry {
        eip: pieces.entry,
        eax: MB2_BOOT_MAGIC,
        ebx: INFO_GPA as u32,
        esp: STACK_TOP as u32,
        gdt_base: GDT_GPA,
        gdt_limit: BOOT_GDT_LIMIT,
        kernel_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testmem::VecMemory;
    use crate::image::{ImageKind, MB1_MAGIC, MB2_MAGIC};

    /// A flat kernel linked at 1 MiB with a v1 header (address fields) at offset 0x10.
    fn mb1_kernel(extra_flags: u32) -> Vec<u8> {
        let mut k = vec![0x90u8; 0x2000];
        let flags = (1 << 16) | 0x3 | extra_flags;
        let fields = [
            MB1_MAGIC,
            flags,
            0u32.wrapping_sub(MB1_MAGIC).wrapping_sub(flags),
            0x10_0010, // header_addr
            0x10_0000, // load_addr
            0x10_2000, // load_end_addr
            0x10_4000, // bss_end_addr
            0x10_0100, // entry
        ];
        for (i, f) in fields.iter().enumerate() {
            k[0x10 + 4 * i..0x14 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        k
    }

    fn mb2_kernel(extra_tag: Option<(u16, u16, &[u32])>) -> Vec<u8> {
        let mut tags: Vec<u8> = Vec::new();
        let mut push = |kind: u16, flags: u16, words: &[u32]| {
            let size = 8 + 4 * words.len();
            tags.extend_from_slice(&kind.to_le_bytes());
            tags.extend_from_slice(&flags.to_le_bytes());
            tags.extend_from_slice(&(size as u32).to_le_bytes());
            for w in words {
                tags.extend_from_slice(&w.to_le_bytes());
            }
            while !tags.len().is_multiple_of(8) {
                tags.push(0);
            }
        };
        push(1, 0, &[1, 6]);
        push(2, 0, &[0x10_0000, 0x10_0000, 0, 0x10_3000]);
        push(3, 0, &[0x10_0200]);
        if let Some((k, f, w)) = extra_tag {
            push(k, f, w);
        }
        push(0, 0, &[]);
        let len = 16 + tags.len() as u32;
        let mut k = Vec::new();
        for w in [MB2_MAGIC, 0, len, 0u32.wrapping_sub(MB2_MAGIC).wrapping_sub(len)] {
            k.extend_from_slice(&w.to_le_bytes());
        }
        k.extend_from_slice(&tags);
        k.resize(0x1000, 0xF4);
        k
    }

    #[test]
    fn v1_kernel_loads_with_info_and_modules() {
        let k = mb1_kernel(0);
        let ImageKind::Multiboot1 { header } = ImageKind::detect(&k) else { panic!("not detected") };
        let mut mem = VecMemory(vec![0; 8 << 20]);
        let module = [7u8; 100];
        let e = load_v1(&mut mem, &k, header, "kernel arg", &[Module { bytes: &module, cmdline: "mod1" }]).unwrap();
        assert_eq!((e.eip, e.eax), (0x10_0100, MB1_BOOT_MAGIC));
        assert_eq!(e.kernel_end, 0x10_4000);
        let info = u64::from(e.ebx);
        assert_eq!(mem.u32(info) & 0x24D, 0x24D);
        assert_eq!(mem.u32(info + 4), 636);
        assert_eq!(mem.u32(info + 8), 7 * 1024);
        let cmd = mem.u32(info + 16) as usize;
        assert_eq!(&mem.0[cmd..cmd + 11], b"kernel arg\0");
        assert_eq!(mem.u32(info + 20), 1);
        let m = u64::from(mem.u32(info + 24));
        assert_eq!(mem.u32(m), 0x10_4000);
        assert_eq!(mem.u32(m + 4), 0x10_4000 + 100);
        assert_eq!(mem.0[0x10_4000], 7);
        let mmap = u64::from(mem.u32(info + 48));
        assert_eq!(mem.u32(info + 44), 72);
        assert_eq!((mem.u32(mmap), mem.u64(mmap + 12), mem.u32(mmap + 20)), (20, 0x9F000, 1));
        assert_eq!(mem.0[0x10_0000], 0x90, "kernel loaded from its load address");
    }

    #[test]
    fn v1_refusals() {
        let mut mem = VecMemory(vec![0; 8 << 20]);
        let k = mb1_kernel(0x4);
        assert_eq!(load_v1(&mut mem, &k, 0x10, "", &[]), Err(MbError::Unsupported("a video mode (flag 2)")));
        let k = mb1_kernel(0);
        assert_eq!(load_v1(&mut mem, &k[..0x1800], 0x10, "", &[]), Err(MbError::Truncated));
        let mut small = VecMemory(vec![0; 0x10_2000]);
        assert_eq!(load_v1(&mut small, &k, 0x10, "", &[]), Err(MbError::DoesNotFit));
        let mods = [Module { bytes: &[], cmdline: "" }; MAX_MODULES + 1];
        assert_eq!(load_v1(&mut mem, &k, 0x10, "", &mods), Err(MbError::TooManyModules));
        let mut noaddr = mb1_kernel(0);
        let flags = 3u32;
        noaddr[0x14..0x18].copy_from_slice(&flags.to_le_bytes());
        noaddr[0x18..0x1C].copy_from_slice(&0u32.wrapping_sub(MB1_MAGIC).wrapping_sub(flags).to_le_bytes());
        assert_eq!(load_v1(&mut mem, &noaddr, 0x10, "", &[]), Err(MbError::NoLoadableSegments));
    }

    #[test]
    fn v2_kernel_loads_with_tags() {
        let k = mb2_kernel(None);
        let ImageKind::Multiboot2 { header } = ImageKind::detect(&k) else { panic!("not detected") };
        let mut mem = VecMemory(vec![0; 8 << 20]);
        let rsdp = [0x52u8; 36];
        let e =
            load_v2(&mut mem, &k, header, "hello", &[Module { bytes: &[1, 2, 3], cmdline: "m" }], Some(&rsdp)).unwrap();
        assert_eq!((e.eip, e.eax, u64::from(e.ebx)), (0x10_0200, MB2_BOOT_MAGIC, INFO_GPA));
        let total = mem.u32(INFO_GPA) as u64;
        let mut at = INFO_GPA + 8;
        let mut seen = Vec::new();
        while at < INFO_GPA + total {
            let (kind, size) = (mem.u32(at), mem.u32(at + 4) as u64);
            seen.push(kind);
            match kind {
                1 => assert_eq!(&mem.0[at as usize + 8..at as usize + 14], b"hello\0"),
                3 => assert_eq!((mem.u32(at + 8), mem.u32(at + 12)), (0x10_3000, 0x10_3003)),
                4 => assert_eq!(mem.u32(at + 12), 7 * 1024),
                6 => assert_eq!((mem.u32(at + 8), mem.u64(at + 16 + 24 + 8)), (24, 0x100000 - 0x9F000)),
                15 => assert_eq!(size, 8 + 36),
                _ => {}
            }
            at += size.next_multiple_of(8);
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 6, 14, 15, 0]);
    }

    #[test]
    fn v2_refuses_what_it_cannot_give() {
        let mut mem = VecMemory(vec![0; 8 << 20]);
        let fb = mb2_kernel(Some((5, 0, &[1024, 768, 32])));
        assert_eq!(load_v2(&mut mem, &fb, 0, "", &[], None), Err(MbError::Unsupported("a framebuffer")));
        let optional_fb = mb2_kernel(Some((5, 1, &[1024, 768, 32])));
        assert!(load_v2(&mut mem, &optional_fb, 0, "", &[], None).is_ok());
        let wants_efi = mb2_kernel(Some((1, 0, &[17])));
        assert!(matches!(load_v2(&mut mem, &wants_efi, 0, "", &[], None), Err(MbError::Unsupported(_))));
    }

    #[test]
    fn elf32_kernels_load_by_physical_address() {
        let mut e = vec![0u8; 0x2000];
        e[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
        e[24..28].copy_from_slice(&0x20_0010u32.to_le_bytes()); // entry
        e[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        e[42..44].copy_from_slice(&32u16.to_le_bytes());
        e[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        for (off, v) in [(0, 1u32), (4, 0x1000), (8, 0xC020_0000), (12, 0x20_0000), (16, 0x100), (20, 0x3000)] {
            e[ph + off..ph + off + 4].copy_from_slice(&v.to_le_bytes());
        }
        let flags = 0x3u32;
        for (i, w) in [MB1_MAGIC, flags, 0u32.wrapping_sub(MB1_MAGIC).wrapping_sub(flags)].iter().enumerate() {
            e[0x1000 + 4 * i..0x1004 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        let mut mem = VecMemory(vec![0; 8 << 20]);
        let entry = load_v1(&mut mem, &e, 0x1000, "", &[]).unwrap();
        assert_eq!(entry.eip, 0x20_0010);
        assert_eq!(entry.kernel_end, 0x20_3000);
        assert_eq!(mem.u32(0x20_0000), MB1_MAGIC);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_mutated_headers(flips in proptest::collection::vec((0usize..0x80, proptest::prelude::any::<u8>()), 1..8)) {
            let mut mem = VecMemory(vec![0; 4 << 20]);
            let mut k1 = mb1_kernel(0);
            let mut k2 = mb2_kernel(None);
            for &(at, v) in &flips { k1[at] = v; k2[at] = v; }
            let m = [Module { bytes: &[1], cmdline: "x" }];
            let _ = load_v1(&mut mem, &k1, 0x10, "c", &m);
            let _ = load_v2(&mut mem, &k2, 0, "c", &m, None);
        }
    }
}
