//! VMCS field encodings (SDM Vol. 3 Appendix B), VMCS instructions with their status read
//! in the same asm block, and the VM-instruction error numbers (SDM Vol. 3 §31.4).

use core::arch::asm;
use core::fmt;

/// A VMCS field encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsField(pub u32);

// The encodings are the SDM's table, kept whole; not every field is used yet.
#[allow(missing_docs, dead_code)]
impl VmcsField {
    // 16-bit control, guest and host fields.
    pub const VPID: Self = Self(0x0000);
    pub const GUEST_ES_SELECTOR: Self = Self(0x0800);
    pub const GUEST_CS_SELECTOR: Self = Self(0x0802);
    pub const GUEST_SS_SELECTOR: Self = Self(0x0804);
    pub const GUEST_DS_SELECTOR: Self = Self(0x0806);
    pub const GUEST_FS_SELECTOR: Self = Self(0x0808);
    pub const GUEST_GS_SELECTOR: Self = Self(0x080A);
    pub const GUEST_LDTR_SELECTOR: Self = Self(0x080C);
    pub const GUEST_TR_SELECTOR: Self = Self(0x080E);
    pub const HOST_ES_SELECTOR: Self = Self(0x0C00);
    pub const HOST_CS_SELECTOR: Self = Self(0x0C02);
    pub const HOST_SS_SELECTOR: Self = Self(0x0C04);
    pub const HOST_DS_SELECTOR: Self = Self(0x0C06);
    pub const HOST_FS_SELECTOR: Self = Self(0x0C08);
    pub const HOST_GS_SELECTOR: Self = Self(0x0C0A);
    pub const HOST_TR_SELECTOR: Self = Self(0x0C0C);
    // 64-bit fields.
    pub const IO_BITMAP_A: Self = Self(0x2000);
    pub const IO_BITMAP_B: Self = Self(0x2002);
    pub const MSR_BITMAP: Self = Self(0x2004);
    pub const VIRTUAL_APIC_PAGE_ADDR: Self = Self(0x2012);
    pub const APIC_ACCESS_ADDR: Self = Self(0x2014);
    pub const EPT_POINTER: Self = Self(0x201A);
    /// The PML log's address and the guest PML index (SDM Vol. 3 §25.6.18, App. B).
    pub const PML_ADDRESS: Self = Self(0x200E);
    pub const GUEST_PML_INDEX: Self = Self(0x0812);
    pub const GUEST_PHYSICAL_ADDRESS: Self = Self(0x2400);
    pub const VMCS_LINK_POINTER: Self = Self(0x2800);
    pub const GUEST_IA32_DEBUGCTL: Self = Self(0x2802);
    pub const GUEST_IA32_PAT: Self = Self(0x2804);
    pub const GUEST_IA32_EFER: Self = Self(0x2806);
    pub const HOST_IA32_PAT: Self = Self(0x2C00);
    pub const HOST_IA32_EFER: Self = Self(0x2C02);
    // 32-bit fields.
    pub const PIN_BASED_CONTROLS: Self = Self(0x4000);
    pub const PRIMARY_PROCESSOR_CONTROLS: Self = Self(0x4002);
    pub const EXCEPTION_BITMAP: Self = Self(0x4004);
    pub const PAGE_FAULT_ERROR_CODE_MASK: Self = Self(0x4006);
    pub const PAGE_FAULT_ERROR_CODE_MATCH: Self = Self(0x4008);
    pub const CR3_TARGET_COUNT: Self = Self(0x400A);
    pub const EXIT_CONTROLS: Self = Self(0x400C);
    pub const EXIT_MSR_STORE_COUNT: Self = Self(0x400E);
    pub const EXIT_MSR_LOAD_COUNT: Self = Self(0x4010);
    pub const ENTRY_CONTROLS: Self = Self(0x4012);
    pub const ENTRY_MSR_LOAD_COUNT: Self = Self(0x4014);
    pub const ENTRY_INTERRUPTION_INFO: Self = Self(0x4016);
    pub const ENTRY_EXCEPTION_ERROR_CODE: Self = Self(0x4018);
    pub const ENTRY_INSTRUCTION_LENGTH: Self = Self(0x401A);
    pub const TPR_THRESHOLD: Self = Self(0x401C);
    pub const SECONDARY_PROCESSOR_CONTROLS: Self = Self(0x401E);
    pub const PLE_GAP: Self = Self(0x4020);
    pub const PLE_WINDOW: Self = Self(0x4022);
    pub const VM_INSTRUCTION_ERROR: Self = Self(0x4400);
    pub const EXIT_REASON: Self = Self(0x4402);
    pub const EXIT_INTERRUPTION_INFO: Self = Self(0x4404);
    pub const EXIT_INTERRUPTION_ERROR_CODE: Self = Self(0x4406);
    pub const IDT_VECTORING_INFO: Self = Self(0x4408);
    pub const IDT_VECTORING_ERROR_CODE: Self = Self(0x440A);
    pub const EXIT_INSTRUCTION_LENGTH: Self = Self(0x440C);
    pub const GUEST_ES_LIMIT: Self = Self(0x4800);
    pub const GUEST_CS_LIMIT: Self = Self(0x4802);
    pub const GUEST_SS_LIMIT: Self = Self(0x4804);
    pub const GUEST_DS_LIMIT: Self = Self(0x4806);
    pub const GUEST_FS_LIMIT: Self = Self(0x4808);
    pub const GUEST_GS_LIMIT: Self = Self(0x480A);
    pub const GUEST_LDTR_LIMIT: Self = Self(0x480C);
    pub const GUEST_TR_LIMIT: Self = Self(0x480E);
    pub const GUEST_GDTR_LIMIT: Self = Self(0x4810);
    pub const GUEST_IDTR_LIMIT: Self = Self(0x4812);
    pub const GUEST_ES_ACCESS_RIGHTS: Self = Self(0x4814);
    pub const GUEST_CS_ACCESS_RIGHTS: Self = Self(0x4816);
    pub const GUEST_SS_ACCESS_RIGHTS: Self = Self(0x4818);
    pub const GUEST_DS_ACCESS_RIGHTS: Self = Self(0x481A);
    pub const GUEST_FS_ACCESS_RIGHTS: Self = Self(0x481C);
    pub const GUEST_GS_ACCESS_RIGHTS: Self = Self(0x481E);
    pub const GUEST_LDTR_ACCESS_RIGHTS: Self = Self(0x4820);
    pub const GUEST_TR_ACCESS_RIGHTS: Self = Self(0x4822);
    pub const GUEST_INTERRUPTIBILITY: Self = Self(0x4824);
    pub const GUEST_ACTIVITY_STATE: Self = Self(0x4826);
    pub const GUEST_SYSENTER_CS: Self = Self(0x482A);
    pub const GUEST_PREEMPTION_TIMER: Self = Self(0x482E);
    pub const HOST_SYSENTER_CS: Self = Self(0x4C00);
    // Natural-width fields.
    pub const CR0_GUEST_HOST_MASK: Self = Self(0x6000);
    pub const CR4_GUEST_HOST_MASK: Self = Self(0x6002);
    pub const CR0_READ_SHADOW: Self = Self(0x6004);
    pub const CR4_READ_SHADOW: Self = Self(0x6006);
    pub const EXIT_QUALIFICATION: Self = Self(0x6400);
    pub const GUEST_CR0: Self = Self(0x6800);
    pub const GUEST_CR3: Self = Self(0x6802);
    pub const GUEST_CR4: Self = Self(0x6804);
    pub const GUEST_ES_BASE: Self = Self(0x6806);
    pub const GUEST_CS_BASE: Self = Self(0x6808);
    pub const GUEST_SS_BASE: Self = Self(0x680A);
    pub const GUEST_DS_BASE: Self = Self(0x680C);
    pub const GUEST_FS_BASE: Self = Self(0x680E);
    pub const GUEST_GS_BASE: Self = Self(0x6810);
    pub const GUEST_LDTR_BASE: Self = Self(0x6812);
    pub const GUEST_TR_BASE: Self = Self(0x6814);
    pub const GUEST_GDTR_BASE: Self = Self(0x6816);
    pub const GUEST_IDTR_BASE: Self = Self(0x6818);
    pub const GUEST_DR7: Self = Self(0x681A);
    pub const GUEST_RSP: Self = Self(0x681C);
    pub const GUEST_RIP: Self = Self(0x681E);
    pub const GUEST_RFLAGS: Self = Self(0x6820);
    pub const GUEST_PENDING_DEBUG: Self = Self(0x6822);
    pub const GUEST_SYSENTER_ESP: Self = Self(0x6824);
    pub const GUEST_SYSENTER_EIP: Self = Self(0x6826);
    pub const HOST_CR0: Self = Self(0x6C00);
    pub const HOST_CR3: Self = Self(0x6C02);
    pub const HOST_CR4: Self = Self(0x6C04);
    pub const HOST_FS_BASE: Self = Self(0x6C06);
    pub const HOST_GS_BASE: Self = Self(0x6C08);
    pub const HOST_TR_BASE: Self = Self(0x6C0A);
    pub const HOST_GDTR_BASE: Self = Self(0x6C0C);
    pub const HOST_IDTR_BASE: Self = Self(0x6C0E);
    pub const HOST_SYSENTER_ESP: Self = Self(0x6C10);
    pub const HOST_SYSENTER_EIP: Self = Self(0x6C12);
    pub const HOST_RSP: Self = Self(0x6C14);
    pub const HOST_RIP: Self = Self(0x6C16);
}

/// Basic exit reasons (SDM Vol. 3 Appendix C), bits 15:0 of the exit-reason field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitReason(pub u16);

// The SDM's exit reasons, kept whole; not every one is handled by name yet.
#[allow(missing_docs, dead_code)]
impl ExitReason {
    pub const EXCEPTION_OR_NMI: Self = Self(0);
    pub const EXTERNAL_INTERRUPT: Self = Self(1);
    pub const TRIPLE_FAULT: Self = Self(2);
    pub const INIT_SIGNAL: Self = Self(3);
    pub const INTERRUPT_WINDOW: Self = Self(7);
    pub const CPUID: Self = Self(10);
    pub const HLT: Self = Self(12);
    pub const VMCALL: Self = Self(18);
    pub const CR_ACCESS: Self = Self(28);
    pub const DR_ACCESS: Self = Self(29);
    pub const IO_INSTRUCTION: Self = Self(30);
    pub const RDMSR: Self = Self(31);
    pub const WRMSR: Self = Self(32);
    pub const ENTRY_FAILURE_GUEST_STATE: Self = Self(33);
    pub const ENTRY_FAILURE_MSR_LOADING: Self = Self(34);
    pub const MWAIT: Self = Self(36);
    pub const MONITOR: Self = Self(39);
    pub const PAUSE: Self = Self(40);
    pub const TPR_BELOW_THRESHOLD: Self = Self(43);
    pub const APIC_ACCESS: Self = Self(44);
    pub const EPT_VIOLATION: Self = Self(48);
    pub const PML_FULL: Self = Self(62);
    pub const EPT_MISCONFIGURATION: Self = Self(49);
    pub const PREEMPTION_TIMER: Self = Self(52);
    pub const XSETBV: Self = Self(55);
    pub const APIC_WRITE: Self = Self(56);
}

/// A VM-instruction error number (SDM Vol. 3 Table 31-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmInstructionError(pub u32);

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "Invalid operand to INVEPT/INVVPID",
            _ => "unknown VM-instruction error",
        };
        write!(f, "VM-instruction error {}: {}", self.0, text)
    }
}

/// How a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: no current VMCS (CF=1).
    Invalid,
    /// VMfailValid: the current VMCS holds the error number (ZF=1).
    Valid(VmInstructionError),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmFail::Invalid => write!(f, "VMfailInvalid (no current VMCS)"),
            VmFail::Valid(error) => write!(f, "VMfailValid, {error}"),
        }
    }
}

/// Turns the flags a VMX instruction left (read in its asm block) into its status.
pub(super) fn status(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid(VmInstructionError(read(VmcsField::VM_INSTRUCTION_ERROR).unwrap_or(0) as u32)))
    } else {
        Ok(())
    }
}

/// Reads a field of the current VMCS.
pub fn read(field: VmcsField) -> Result<u64, VmFail> {
    let (value, cf, zf): (u64, u8, u8);
    // SAFETY: VMREAD only reads the current VMCS (in VMX root, per crate assumptions);
    // the flags are captured in the same block.
    unsafe {
        asm!("vmread {v}, {f}", "setc {cf}", "setz {zf}",
             f = in(reg) u64::from(field.0), v = out(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    if cf != 0 {
        return Err(VmFail::Invalid);
    }
    if zf != 0 {
        // Reading the error field itself cannot fail once a VMCS is current.
        return Err(VmFail::Valid(VmInstructionError(12)));
    }
    Ok(value)
}

/// Writes a field of the current VMCS.
///
/// # Safety
/// The caller must be the owner of the current VMCS and write a value that cannot make a
/// later VM entry corrupt host state (host-state fields are written only by `vcpu`).
pub unsafe fn write(field: VmcsField, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMWRITE changes only the current VMCS; the caller vouches for the value.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}",
             f = in(reg) u64::from(field.0), v = in(reg) value, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    status(cf, zf)
}

/// Clears the VMCS at `paddr` (makes it inactive, not current, not launched).
///
/// # Safety
/// `paddr` must be a VMCS region owned by the caller, not the VMXON region.
pub unsafe fn clear(paddr: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: the caller guarantees `paddr` is its own VMCS region.
    unsafe {
        asm!("vmclear [{p}]", "setc {cf}", "setz {zf}",
             p = in(reg) &paddr, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    status(cf, zf)
}

/// Makes the VMCS at `paddr` current on this CPU.
///
/// # Safety
/// As for `clear`; the VMCS must not be current on another CPU.
pub unsafe fn load(paddr: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: the caller guarantees `paddr` is its own, cleared or already-loaded VMCS.
    unsafe {
        asm!("vmptrld [{p}]", "setc {cf}", "setz {zf}",
             p = in(reg) &paddr, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    status(cf, zf)
}
