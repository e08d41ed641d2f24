//! Decoding of the instructions a guest uses on memory-mapped device registers (the xAPIC
//! page, the virtio-mmio window). [`decode`], for the xAPIC: the MOV forms compilers emit for a 32-bit register access (SDM Vol. 2 "MOV"):
//! `8B /r` (load), `89 /r` (store a register), `C7 /0 id` (store an immediate) and
//! `A1`/`A3` (EAX from/to an absolute offset), with an optional REX prefix in 64-bit mode.
//! [`decode_access`] adds 8- and 16-bit operands and MOVZX (Linux's `readb`/`readw`).
//! Anything else is refused: the caller stops the VM with a line rather than guessing.

/// What a decoded instruction does with the device register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Loads the register into general-purpose register `gpr` (encoding 0-15).
    Load { gpr: u8 },
    /// Stores general-purpose register `gpr`'s low 32 bits.
    Store { gpr: u8 },
    /// Stores an immediate.
    StoreImm(u32),
}

/// A decoded instruction: what it does and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInsn {
    pub op: MmioOp,
    pub len: u8,
}

/// Decodes the instruction at the start of `code` (the bytes at the guest's RIP) for a
/// 32-bit access; `long` says whether the code runs in 64-bit mode (REX and 8-byte
/// absolute offsets). Returns None for any other form (a 16- or 64-bit operand size
/// included: xAPIC registers are 32-bit, SDM Vol. 3A §11.4.1).
pub fn decode(code: &[u8], long: bool) -> Option<MmioInsn> {
    let a = decode_access(code, long)?;
    if a.size != 4 {
        return None;
    }
    let op = match a.kind {
        AccessKind::Load { gpr, zero_extend: false, .. } => MmioOp::Load { gpr },
        AccessKind::Store { gpr, .. } => MmioOp::Store { gpr },
        AccessKind::StoreImm(value) => MmioOp::StoreImm(value),
        AccessKind::Load { .. } => return None,
    };
    Some(MmioInsn { op, len: a.len })
}

/// What a decoded access does, for any operand size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Loads into general-purpose register `gpr` (encoding 0-15); `high8`: AH, CH, DH or
    /// BH (encodings 4-7 of a byte operand without REX); `zero_extend`: MOVZX.
    Load { gpr: u8, high8: bool, zero_extend: bool },
    /// Stores the low `size` bytes of register `gpr` (or its bits 8-15 with `high8`).
    Store { gpr: u8, high8: bool },
    /// Stores an immediate.
    StoreImm(u32),
}

/// A decoded memory access: what, how many bytes (1, 2 or 4), and the instruction's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub size: u8,
    pub len: u8,
}

impl Access {
    /// Returns the register's new value after a load of `value` into it (SDM Vol. 1
    /// §3.4.1.1: a 32-bit destination zero-extends to 64 bits, 8- and 16-bit destinations
    /// keep the other bits; MOVZX zero-extends). `old` is the register before.
    pub fn loaded(&self, old: u64, value: u32) -> u64 {
        let AccessKind::Load { high8, zero_extend, .. } = self.kind else { return old };
        let value = u64::from(value) & mask(self.size);
        match (self.size, zero_extend, high8) {
            (4, _, _) | (_, true, _) => value,
            (_, false, true) => (old & !0xFF00) | ((value & 0xFF) << 8),
            (size, false, false) => (old & !mask(size)) | value,
        }
    }

    /// Returns the bytes a store writes, from `reg` (the register's value; ignored for an
    /// immediate).
    pub fn stored(&self, reg: u64) -> u32 {
        let value = match self.kind {
            AccessKind::Store { high8: true, .. } => reg >> 8,
            AccessKind::Store { .. } => reg,
            AccessKind::StoreImm(imm) => u64::from(imm),
            AccessKind::Load { .. } => 0,
        };
        (value & mask(self.size)) as u32
    }
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// Decodes the MOV forms a guest uses on a memory-mapped device register (SDM Vol. 2
/// "MOV", "MOVZX"): `88`/`89` (store a register), `8A`/`8B` (load), `C6 /0 ib` and
/// `C7 /0 iw/id` (store an immediate), `0F B6`/`0F B7` (MOVZX from 8 or 16 bits), and
/// `A0`-`A3` (AL/eAX from/to an absolute offset), with a `66` operand-size prefix for 16
/// bits and, in 64-bit mode, a REX prefix (R for registers 8-15; W only on MOVZX). The
/// ModRM memory operand may have a SIB byte and an 8- or 32-bit displacement; the
/// address itself is the exit's (the guest-physical address), so only the length is
/// worked out. What Linux's `readb`/`readw`/`readl`/`writeb`/`writew`/`writel` emit is
/// among these. Anything else (a register operand, REX.W on a plain MOV, other opcodes,
/// other prefixes, truncated bytes) is None.
pub fn decode_access(code: &[u8], long: bool) -> Option<Access> {
    let mut at = 0usize;
    let mut opsize16 = false;
    if code.first() == Some(&0x66) {
        opsize16 = true;
        at = 1;
    }
    let mut rex = 0u8;
    if long && code.get(at).is_some_and(|b| b & 0xF0 == 0x40) {
        rex = code[at];
        at += 1;
    }
    let rex_w = rex & 8 != 0;
    let mut opcode = u16::from(*code.get(at)?);
    at += 1;
    if opcode == 0x0F {
        opcode = 0x0F00 | u16::from(*code.get(at)?);
        at += 1;
    }
    let wide = if opsize16 { 2 } else { 4 };
    if rex_w && !matches!(opcode, 0x0FB6 | 0x0FB7) {
        return None;
    }
    if matches!(opcode, 0xA0..=0xA3) {
        let len = at + if long { 8 } else { 4 };
        if code.len() < len {
            return None;
        }
        let size = if opcode & 1 == 0 { 1 } else { wide };
        let kind = if opcode <= 0xA1 {
            AccessKind::Load { gpr: 0, high8: false, zero_extend: false }
        } else {
            AccessKind::Store { gpr: 0, high8: false }
        };
        return Some(Access { kind, size, len: len as u8 });
    }
    if !matches!(opcode, 0x88 | 0x89 | 0x8A | 0x8B | 0xC6 | 0xC7 | 0x0FB6 | 0x0FB7) {
        return None;
    }
    let modrm = *code.get(at)?;
    at += 1;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return None;
    }
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *code.get(at)?;
        at += 1;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        disp = 4;
    }
    at += disp;
    let gpr = reg | if rex & 4 != 0 { 8 } else { 0 };
    // A byte register without REX: encodings 4-7 are AH, CH, DH, BH.
    let high8 = rex == 0 && (4..8).contains(&reg);
    let byte_gpr = if high8 { reg - 4 } else { gpr };
    let (kind, size) = match opcode {
        0x8A => (AccessKind::Load { gpr: byte_gpr, high8, zero_extend: false }, 1),
        0x8B => (AccessKind::Load { gpr, high8: false, zero_extend: false }, wide),
        0x88 => (AccessKind::Store { gpr: byte_gpr, high8 }, 1),
        0x89 => (AccessKind::Store { gpr, high8: false }, wide),
        0x0FB6 => (AccessKind::Load { gpr, high8: false, zero_extend: true }, 1),
        0x0FB7 => (AccessKind::Load { gpr, high8: false, zero_extend: true }, 2),
        _ if reg == 0 => {
            let size = if opcode == 0xC6 { 1 } else { wide };
            let imm = code.get(at..at + usize::from(size))?;
            at += usize::from(size);
            let mut bytes = [0u8; 4];
            bytes[..imm.len()].copy_from_slice(imm);
            (AccessKind::StoreImm(u32::from_le_bytes(bytes)), size)
        }
        _ => return None,
    };
    if code.len() < at {
        return None;
    }
    Some(Access { kind, size, len: at as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_stores_of_linux_and_simple_kernels() {
        // mov eax, [0xfee00030] (32-bit absolute, gcc -m32)
        assert_eq!(decode(&[0xA1, 0x30, 0, 0xE0, 0xFE], false), Some(MmioInsn { op: MmioOp::Load { gpr: 0 }, len: 5 }));
        // mov [0xfee000b0], eax
        assert_eq!(
            decode(&[0xA3, 0xB0, 0, 0xE0, 0xFE], false),
            Some(MmioInsn { op: MmioOp::Store { gpr: 0 }, len: 5 })
        );
        // mov eax, [rdi+0x390] (Linux native_apic_mem_read: mov eax, [rax+offset])
        assert_eq!(decode(&[0x8B, 0x87, 0x90, 3, 0, 0], true), Some(MmioInsn { op: MmioOp::Load { gpr: 0 }, len: 6 }));
        // mov r9d, [rax] with REX.R
        assert_eq!(decode(&[0x44, 0x8B, 0x08], true), Some(MmioInsn { op: MmioOp::Load { gpr: 9 }, len: 3 }));
        // mov [rdx+0x10], ecx (disp8)
        assert_eq!(decode(&[0x89, 0x4A, 0x10], true), Some(MmioInsn { op: MmioOp::Store { gpr: 1 }, len: 3 }));
        // mov dword ptr [0xfee000b0], 0 (modrm 05: disp32, then imm32)
        assert_eq!(
            decode(&[0xC7, 0x05, 0xB0, 0, 0xE0, 0xFE, 0, 0, 0, 0], false),
            Some(MmioInsn { op: MmioOp::StoreImm(0), len: 10 })
        );
        // mov eax, [rsp+rbx*4+0x20] (SIB, disp8)
        assert_eq!(decode(&[0x8B, 0x44, 0x9C, 0x20], true), Some(MmioInsn { op: MmioOp::Load { gpr: 0 }, len: 4 }));
        // mov eax, [disp32] via SIB with no base (mod 00, base 101)
        assert_eq!(
            decode(&[0x8B, 0x04, 0x25, 0x90, 3, 0xE0, 0xFE], true),
            Some(MmioInsn { op: MmioOp::Load { gpr: 0 }, len: 7 })
        );
    }

    #[test]
    fn refuses_other_forms_and_truncated_bytes() {
        assert_eq!(decode(&[0x48, 0x8B, 0x00], true), None, "64-bit operand");
        assert_eq!(decode(&[0x66, 0x8B, 0x00], false), None, "16-bit operand");
        assert_eq!(decode(&[0x8B, 0xC0], false), None, "register operand");
        assert_eq!(decode(&[0xC7, 0x08, 0, 0, 0, 0], false), None, "C7 /1");
        assert_eq!(decode(&[0xC7, 0x00, 0, 0], false), None, "truncated immediate");
        assert_eq!(decode(&[0x8B, 0x80, 0], false), None, "truncated displacement");
        assert_eq!(decode(&[0xF3, 0xA5], false), None, "MOVS");
        assert_eq!(decode(&[], true), None);
        assert_eq!(decode(&[0x40], true), None);
    }

    fn access(code: &[u8]) -> Access {
        decode_access(code, true).unwrap_or_else(|| panic!("{code:02x?} refused"))
    }

    #[test]
    fn linux_readb_readw_readl_writeb_writew_writel() {
        // readb: mov al, [rdi+0x100]
        let a = access(&[0x8A, 0x87, 0, 1, 0, 0]);
        assert_eq!((a.kind, a.size, a.len), (AccessKind::Load { gpr: 0, high8: false, zero_extend: false }, 1, 6));
        assert_eq!(a.loaded(0x1234_5678_9ABC_DEF0, 0x11), 0x1234_5678_9ABC_DE11, "a byte load keeps the rest");
        // readw: mov ax, [rdx]
        let a = access(&[0x66, 0x8B, 0x02]);
        assert_eq!((a.size, a.len), (2, 3));
        assert_eq!(a.loaded(u64::MAX, 0xABCD), 0xFFFF_FFFF_FFFF_ABCD);
        // readl: mov eax, [rax+0x70]; the upper half is cleared.
        let a = access(&[0x8B, 0x40, 0x70]);
        assert_eq!(a.loaded(u64::MAX, 7), 7);
        // writeb: mov [rdi+0x70], sil (REX for SIL)
        let a = access(&[0x40, 0x88, 0x77, 0x70]);
        assert_eq!(a.kind, AccessKind::Store { gpr: 6, high8: false });
        assert_eq!(a.stored(0x1FF), 0xFF);
        // mov [rax], dh (no REX: encoding 6 is DH)
        let a = access(&[0x88, 0x30]);
        assert_eq!(a.kind, AccessKind::Store { gpr: 2, high8: true });
        assert_eq!(a.stored(0xAB00), 0xAB);
        // mov ch, [rax]: a load into bits 8-15 of RCX
        let a = access(&[0x8A, 0x28]);
        assert_eq!(a.loaded(0xFFFF, 0x12), 0x12FF);
        // writew: mov [rdi+0x10], r8w
        let a = access(&[0x66, 0x44, 0x89, 0x47, 0x10]);
        assert_eq!((a.kind, a.size, a.len), (AccessKind::Store { gpr: 8, high8: false }, 2, 5));
        // writel of an immediate: mov dword [rax+0x50], 0
        let a = access(&[0xC7, 0x40, 0x50, 0, 0, 0, 0]);
        assert_eq!((a.kind, a.size, a.len), (AccessKind::StoreImm(0), 4, 7));
        // mov byte [rax], 0x80 and mov word [rax], 0x1234
        assert_eq!(access(&[0xC6, 0x00, 0x80]).kind, AccessKind::StoreImm(0x80));
        let a = access(&[0x66, 0xC7, 0x00, 0x34, 0x12]);
        assert_eq!((a.kind, a.size, a.len), (AccessKind::StoreImm(0x1234), 2, 5));
        // movzx eax, byte [rdi]; movzx r9, word [rsp+rbx*2+0x1000] (REX.WR, SIB, disp32)
        let a = access(&[0x0F, 0xB6, 0x07]);
        assert_eq!(a.loaded(u64::MAX, 0x80), 0x80);
        let a = access(&[0x4C, 0x0F, 0xB7, 0x8C, 0x5C, 0, 0x10, 0, 0]);
        assert_eq!((a.size, a.len, a.kind), (2, 9, AccessKind::Load { gpr: 9, high8: false, zero_extend: true }));
        // mov al, [moffs64]
        assert_eq!(access(&[0xA0, 0, 0, 0, 0xD0, 0, 0, 0, 0]).size, 1);
    }

    #[test]
    fn general_decoder_refuses_what_it_cannot_emulate() {
        for code in [
            &[0x48, 0x8B, 0x00][..],   // 64-bit load
            &[0x48, 0x89, 0x00],       // 64-bit store
            &[0x8A, 0xC0],             // register operand
            &[0xC6, 0x08, 0],          // C6 /1
            &[0x66, 0xC7, 0x00, 0x34], // truncated imm16
            &[0x0F, 0xB6],             // truncated ModRM
            &[0x0F, 0xBE, 0x00],       // MOVSX
            &[0xF3, 0xA4],             // REP MOVSB
            &[0x66],
            &[],
        ] {
            assert_eq!(decode_access(code, true), None, "{code:02x?}");
        }
        assert_eq!(decode(&[0x66, 0x8B, 0x00], true), None, "the xAPIC decoder stays 32-bit");
        assert_eq!(decode(&[0x0F, 0xB7, 0x00], true), None);
    }
}
