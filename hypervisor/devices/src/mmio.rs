//! Decoding of the instructions a guest uses on memory-mapped device registers (the xAPIC
//! page): the MOV forms compilers emit for a 32-bit register access (SDM Vol. 2 "MOV"):
//! `8B /r` (load), `89 /r` (store a register), `C7 /0 id` (store an immediate) and
//! `A1`/`A3` (EAX from/to an absolute offset), with an optional REX prefix in 64-bit mode.
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
    let mut at = 0usize;
    let mut rex = 0u8;
    if long && code.first().is_some_and(|b| b & 0xF0 == 0x40) {
        rex = code[0];
        at = 1;
    }
    if rex & 8 != 0 {
        return None;
    }
    let opcode = *code.get(at)?;
    at += 1;
    match opcode {
        0xA1 | 0xA3 => {
            let len = at + if long { 8 } else { 4 };
            if code.len() < len {
                return None;
            }
            let op = if opcode == 0xA1 { MmioOp::Load { gpr: 0 } } else { MmioOp::Store { gpr: 0 } };
            Some(MmioInsn { op, len: len as u8 })
        }
        0x8B | 0x89 | 0xC7 => {
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
            let op = match opcode {
                0x8B => MmioOp::Load { gpr },
                0x89 => MmioOp::Store { gpr },
                _ if reg == 0 => {
                    let imm = code.get(at..at + 4)?;
                    at += 4;
                    MmioOp::StoreImm(u32::from_le_bytes([imm[0], imm[1], imm[2], imm[3]]))
                }
                _ => return None,
            };
            if code.len() < at {
                return None;
            }
            Some(MmioInsn { op, len: at as u8 })
        }
        _ => None,
    }
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
}
