//! Per-CPU GDT and TSS (SDM Vol. 3 §3.4.5, §7.7). The TSS carries the interrupt stacks
//! (IST) used for double faults, NMIs and machine checks, and VMX needs a usable TR for
//! the host state (SDM Vol. 3 §26.2.3).

use core::arch::asm;
use core::mem::size_of;

/// Selector of the 64-bit kernel code segment.
pub const KERNEL_CODE: u16 = 0x08;
/// Selector of the kernel data segment.
pub const KERNEL_DATA: u16 = 0x10;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x18;

/// IST slot (1-based, as in the IDT gate) for double faults.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot for NMIs.
pub const IST_NMI: u8 = 2;
/// IST slot for machine checks.
pub const IST_MACHINE_CHECK: u8 = 3;

/// A GDT: null, code, data, and the two-slot TSS descriptor.
#[repr(C, align(16))]
pub struct Gdt([u64; 5]);

impl Gdt {
    pub(crate) const fn new() -> Self {
        Self([0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0, 0])
    }
}

/// The 64-bit TSS (SDM Vol. 3 Figure 7-11).
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

impl Tss {
    pub(crate) const fn new() -> Self {
        Self {
            reserved0: 0,
            rsp: [0; 3],
            reserved1: 0,
            ist: [0; 7],
            reserved2: 0,
            reserved3: 0,
            // No I/O permission bitmap: the offset points past the limit.
            iomap_base: size_of::<Tss>() as u16,
        }
    }
}

#[repr(C, packed(2))]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Fills this CPU's GDT and TSS (with the IST stack tops given, indexed by IST slot - 1),
/// loads them, reloads the segment registers and the task register.
///
/// # Safety
/// `gdt` and `tss` must point to this CPU's own 'static descriptor tables, which no other
/// CPU uses, and the IST stacks must be 'static memory reserved for this CPU.
pub unsafe fn load(gdt: *mut Gdt, tss: *mut Tss, ist_tops: [u64; 3]) {
    // SAFETY: the caller guarantees exclusive access to this CPU's tables.
    let (gdt, tss) = unsafe { (&mut *gdt, &mut *tss) };
    let mut ists = [0u64; 7];
    ists[..3].copy_from_slice(&ist_tops);
    tss.ist = ists;

    let base = tss as *const Tss as u64;
    let limit = (size_of::<Tss>() - 1) as u64;
    gdt.0[3] = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    gdt.0[4] = base >> 32;

    let pointer = DescriptorPointer { limit: (size_of::<Gdt>() - 1) as u16, base: gdt as *const Gdt as u64 };
    // SAFETY: the GDT is 'static and holds valid code/data/TSS descriptors at the
    // selectors used; the far return reloads CS with the same 64-bit code segment.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "ltr {tss:x}",
            ptr = in(reg) &pointer,
            code = in(reg) u64::from(KERNEL_CODE),
            data = in(reg) u64::from(KERNEL_DATA),
            tss = in(reg) u64::from(TSS_SELECTOR),
            tmp = lateout(reg) _,
        );
    }
}
