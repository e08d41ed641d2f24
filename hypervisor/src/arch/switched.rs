//! Registers a guest can write that VMX does not switch (SDM Vol. 3 §27.3, §28.5 list what
//! VM entry and exit load): CR2, DR0-DR3, DR6 and IA32_KERNEL_GS_BASE. Guests change them
//! without exits (a page fault, MOV to DRn at CPL0, SWAPGS), so a guest sharing a CPU
//! would see the previous guest's values. They are switched at slice boundaries, not at
//! every exit: the hypervisor itself uses none of them (it takes no page faults, its DR7
//! is 0x400 after every exit so DR0-DR3 are inert, and it never runs SWAPGS), so the
//! guest's values may stay loaded while its exits are handled.
//!
//! DR7 and IA32_DEBUGCTL are in the VMCS (the load/save debug-controls controls).

use core::arch::asm;

const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
/// DR6's architectural reset value (SDM Vol. 3 §18.2.3).
const DR6_RESET: u64 = 0xFFFF_0FF0;

/// One guest's copy of the registers VMX does not switch.
#[derive(Debug, Clone, Copy)]
pub struct UnswitchedRegs {
    cr2: u64,
    dr: [u64; 4],
    dr6: u64,
    kernel_gs_base: u64,
}

impl Default for UnswitchedRegs {
    /// Returns the reset values: zero, and DR6's fixed ones.
    fn default() -> Self {
        Self { cr2: 0, dr: [0; 4], dr6: DR6_RESET, kernel_gs_base: 0 }
    }
}

impl UnswitchedRegs {
    /// Loads the guest's values onto this CPU before its slice.
    pub fn load(&self) {
        // SAFETY: CPL0. The values are the guest's own as `save` read them from the CPU
        // (or the reset values), so each write is one the CPU accepts (DR6's upper half
        // is zero, IA32_KERNEL_GS_BASE canonical). The hypervisor does not use these
        // registers while the guest's values are loaded (see the module docs).
        unsafe {
            asm!("mov cr2, {}", in(reg) self.cr2, options(nomem, nostack, preserves_flags));
            asm!("mov dr0, {}", in(reg) self.dr[0], options(nomem, nostack, preserves_flags));
            asm!("mov dr1, {}", in(reg) self.dr[1], options(nomem, nostack, preserves_flags));
            asm!("mov dr2, {}", in(reg) self.dr[2], options(nomem, nostack, preserves_flags));
            asm!("mov dr3, {}", in(reg) self.dr[3], options(nomem, nostack, preserves_flags));
            asm!("mov dr6, {}", in(reg) self.dr6, options(nomem, nostack, preserves_flags));
            x86::msr::wrmsr(IA32_KERNEL_GS_BASE, self.kernel_gs_base);
        }
    }

    /// Reads the guest's values back after its slice.
    pub fn save(&mut self) {
        // SAFETY: reading control, debug registers and an architectural MSR at CPL0 has
        // no side effects.
        unsafe {
            asm!("mov {}, cr2", out(reg) self.cr2, options(nomem, nostack, preserves_flags));
            asm!("mov {}, dr0", out(reg) self.dr[0], options(nomem, nostack, preserves_flags));
            asm!("mov {}, dr1", out(reg) self.dr[1], options(nomem, nostack, preserves_flags));
            asm!("mov {}, dr2", out(reg) self.dr[2], options(nomem, nostack, preserves_flags));
            asm!("mov {}, dr3", out(reg) self.dr[3], options(nomem, nostack, preserves_flags));
            asm!("mov {}, dr6", out(reg) self.dr6, options(nomem, nostack, preserves_flags));
            self.kernel_gs_base = x86::msr::rdmsr(IA32_KERNEL_GS_BASE);
        }
    }
}

/// Ends the blocking of NMIs that a VM exit caused by an NMI leaves in effect ("an NMI
/// causes subsequent NMIs to be blocked, but only after the VM exit completes", SDM Vol. 3
/// §28.1): IRET to the next instruction, as the end of an NMI handler would (§6.7.1).
pub fn unblock_nmis() {
    // SAFETY: builds an IRET frame for the next instruction on the current stack (same
    // SS, RSP, RFLAGS and CS) and executes IRETQ, whose only lasting effect is to end NMI
    // blocking.
    unsafe {
        asm!(
            "mov {tmp}, rsp",
            "push {ss}",
            "push {tmp}",
            "pushfq",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            tmp = out(reg) _,
            ss = in(reg) u64::from(super::gdt::KERNEL_DATA),
            cs = in(reg) u64::from(super::gdt::KERNEL_CODE),
        );
    }
}
