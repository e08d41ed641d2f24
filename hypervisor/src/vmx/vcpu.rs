//! A virtual CPU: its VMCS, the entry/exit stub that switches all general-purpose
//! registers, and the control setup that honours the allowed-0/allowed-1 settings of the
//! (TRUE_) control MSRs (SDM Vol. 3 Appendix A.3-A.5, §26.2-§26.3).

use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use x86::msr::rdmsr;

use super::caps::{msr, VmxCaps};
use super::tlb::Vpid;
use super::vmcs::{self, ExitReason, VmFail, VmcsField as F};
use crate::arch::gdt::{KERNEL_CODE, KERNEL_DATA, TSS_SELECTOR};
use crate::memory::{self, HostPhysAddr};
use nk_abi::{Call, Reply};

/// The guest's general-purpose registers, saved and restored by the entry/exit stub. The
/// field order is the stub's layout: do not reorder. The first fourteen are the
/// hypercall's registers in the order of [`Call`]'s fields and the first seven those of
/// [`Reply`] (the ABI in `nk-abi`), so a VMCALL exit reads its call and writes its reply
/// in place ([`GuestRegs::call`], [`GuestRegs::reply_mut`]) instead of copying them.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rbp: u64,
}

// The layouts `GuestRegs::call` and `GuestRegs::reply_mut` rely on.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<Call>() == 14 * 8 && align_of::<Call>() == 8);
    assert!(offset_of!(Call, selector) == offset_of!(GuestRegs, rax));
    assert!(offset_of!(Call, caps) == offset_of!(GuestRegs, rbx));
    assert!(offset_of!(Call, args) == offset_of!(GuestRegs, r11));
    assert!(size_of::<Reply>() == 7 * 8 && align_of::<Reply>() == 8);
    assert!(offset_of!(Reply, status) == offset_of!(GuestRegs, rax));
    assert!(offset_of!(Reply, name) == offset_of!(GuestRegs, rbx));
    assert!(offset_of!(Reply, results) == offset_of!(GuestRegs, rdx));
    assert!(offset_of!(GuestRegs, r8) == offset_of!(GuestRegs, rdi) + 8);
};

impl GuestRegs {
    /// Returns the hypercall the guest laid out in its registers at a VMCALL exit (RAX the
    /// selector, RBX..R10 four capability names, R11..R15 five plain arguments).
    #[inline(always)]
    pub fn call(&self) -> &Call {
        // SAFETY: `Call` is `repr(C)`, 14 u64 words with no padding, and the assertions
        // above pin its fields to the first 14 registers of this `repr(C)` struct of u64s;
        // every bit pattern is a valid `Call`, and the borrow of `self` covers it.
        unsafe { &*(self as *const GuestRegs).cast::<Call>() }
    }

    /// Returns the registers a hypercall's reply goes to (RAX the status, RBX:RCX a name,
    /// RDX, RSI, RDI, R8 four results) as a [`Reply`].
    #[inline(always)]
    pub fn reply_mut(&mut self) -> &mut Reply {
        // SAFETY: `Reply` is `repr(C)`, 7 u64 words with no padding, pinned by the
        // assertions above to RAX..R8 of this `repr(C)` struct of u64s; every bit pattern
        // is valid for both, and the exclusive borrow of `self` covers it.
        unsafe { &mut *(self as *mut GuestRegs).cast::<Reply>() }
    }
}

impl nk_core::CallFrame for GuestRegs {
    #[inline(always)]
    fn call(&self) -> &Call {
        GuestRegs::call(self)
    }

    #[inline(always)]
    fn reply_mut(&mut self) -> &mut Reply {
        GuestRegs::reply_mut(self)
    }
}

/// What the exit stub needs to answer a null hypercall itself (ABI selector version 1, AM
/// 0, operation 0), without returning to Rust: until `deadline` (a TSC value; 0 turns it
/// off) a VMCALL exit with that selector gets the null reply (RAX, RBX, RCX, RDX, RSI, RDI
/// and R8 zeroed, as [`nk_core::stateless_reply`] answers it), RIP moves past the VMCALL
/// and the guest resumes at once; `served` counts those exits. Everything else, and a null
/// call after the deadline, takes the full path. The stub reads this through the pointer
/// `nk_vm_run` keeps on the host stack; the field order is its layout.
///
/// The same deadline bounds the stub's hypercall path: while `handler` is set (only for
/// the length of one [`Vcpu::run_serving`]), a VMCALL exit with any other selector saves
/// the register file and calls `handler(ctx, regs)` from the stub; a call it answered
/// (it returned 0) moves RIP past the VMCALL, counts in `served` and resumes the guest at
/// once, without returning through the slice loop (issue 14); anything else returns the
/// exit to Rust as before.
#[repr(C)]
#[derive(Debug)]
struct NullFastPath {
    deadline: u64,
    served: u64,
    handler: Option<unsafe extern "C" fn(*mut (), *mut GuestRegs) -> u64>,
    ctx: *mut (),
}

impl Default for NullFastPath {
    fn default() -> Self {
        NullFastPath { deadline: 0, served: 0, handler: None, ctx: core::ptr::null_mut() }
    }
}

/// What the exit stub's hypercall path calls at a VMCALL exit ([`Vcpu::run_serving`]).
pub trait ExitHypercall {
    /// Handles the hypercall in the guest's saved registers `regs`, writing its reply over
    /// them, and returns true; or returns false, leaving the call to the exit's caller
    /// (which then gets the VMCALL exit as usual), with nothing else done.
    fn hypercall(&mut self, regs: &mut GuestRegs) -> bool;
}

/// The exit stub's call into an [`ExitHypercall`] of type `C`: 0 when the call was
/// answered (the guest resumes past its VMCALL), 1 when the exit goes back to Rust.
///
/// # Safety
/// `ctx` points at a live `C` and `regs` at the vCPU's saved registers, neither borrowed
/// elsewhere for the call's length: `Vcpu::run_serving` passes them so.
unsafe extern "C" fn exit_hypercall<C: ExitHypercall>(ctx: *mut (), regs: *mut GuestRegs) -> u64 {
    // SAFETY: as the function's contract says: `run_serving` made `ctx` from a `&mut C`
    // it holds for the run, and `regs` is its vCPU's register file, which the stub hands
    // on from `nk_vm_run`'s argument and does not touch during the call.
    let (ctx, regs) = unsafe { (&mut *ctx.cast::<C>(), &mut *regs) };
    u64::from(!ctx.hypercall(regs))
}

/// The selector of the null hypercall, which the exit stub answers (`NullFastPath`).
const NULL_SELECTOR: u64 = (nk_abi::ABI_VERSION as u64) << 48;
const _: () = assert!(NULL_SELECTOR == nk_abi::Selector::new(nk_abi::NULL_KERNEL_AM, nk_abi::nk_op::NULL).encode());

// nk_vm_run(regs: *mut GuestRegs, launched: u64, fast: *mut NullFastPath) -> u64
//   the exit reason (SDM Vol. 3 §28.2.1, zero-extended): the guest ran and exited;
//   1 << 32: VMLAUNCH/VMRESUME failed with VMfailInvalid; 2 << 32: with VMfailValid.
// The host stack pointer at exit is HOST_RSP, written here before each entry, and points
// at the saved `regs` pointer, with the `fast` pointer above it and the callee-saved host
// registers above that.
//
// At a VM exit with the null selector in RAX, the stub saves only RDI, RAX and RDX and
// reads the exit reason: a VMCALL (basic reason 18, no other bit set) before
// `fast.deadline` is answered right there (RIP += 3, the VMCALL's length, SDM Vol. 2; the
// reply registers zeroed) and resumed. Every other exit saves the whole register file.
// Then a VMCALL before the deadline, while `fast.handler` is set, is offered to the
// handler (`handler(fast.ctx, regs)`, SysV ABI, on a 16-byte aligned stack): if it
// answered (0), RIP += 3, `served` counts it and the guest resumes with its registers
// reloaded; otherwise, and for every other exit, the stub returns the exit reason to Rust.
global_asm!(
    r#"
.section .text.nk_vm, "ax"
.global nk_vm_run
nk_vm_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdx
    push rdi
    mov rax, 0x6C14
    vmwrite rax, rsp
    test rsi, rsi
    mov rax, [rdi + 0x00]
    mov rbx, [rdi + 0x08]
    mov rcx, [rdi + 0x10]
    mov rdx, [rdi + 0x18]
    mov rsi, [rdi + 0x20]
    mov r8,  [rdi + 0x30]
    mov r9,  [rdi + 0x38]
    mov r10, [rdi + 0x40]
    mov r11, [rdi + 0x48]
    mov r12, [rdi + 0x50]
    mov r13, [rdi + 0x58]
    mov r14, [rdi + 0x60]
    mov r15, [rdi + 0x68]
    mov rbp, [rdi + 0x70]
    mov rdi, [rdi + 0x28]
    jnz 2f
    vmlaunch
    jmp 3f
2:  vmresume
3:  mov eax, 1
    mov ecx, 2
    cmovz eax, ecx
    shl rax, 32
    pop rdi
    pop rdx
    jmp 4f

.global nk_vm_exit
nk_vm_exit:
    push rdi
    mov rdi, {null_selector}
    cmp rax, rdi
    jne 5f
    push rax
    push rdx
    mov edi, 0x4402
    vmread rax, rdi
    cmp rax, 18
    jne 6f
    mov rdi, [rsp + 32]
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, [rdi]
    jae 6f
    add qword ptr [rdi + 8], 1
    mov edi, 0x681E
    vmread rax, rdi
    add rax, 3
    vmwrite rdi, rax
    add rsp, 24
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor r8d, r8d
    vmresume
    jmp 3b

6:  pop rdx
    pop rax
5:  mov rdi, [rsp + 8]
    mov [rdi + 0x00], rax
    mov [rdi + 0x08], rbx
    mov [rdi + 0x10], rcx
    mov [rdi + 0x18], rdx
    mov [rdi + 0x20], rsi
    mov [rdi + 0x30], r8
    mov [rdi + 0x38], r9
    mov [rdi + 0x40], r10
    mov [rdi + 0x48], r11
    mov [rdi + 0x50], r12
    mov [rdi + 0x58], r13
    mov [rdi + 0x60], r14
    mov [rdi + 0x68], r15
    mov [rdi + 0x70], rbp
    pop rax
    mov [rdi + 0x28], rax
    mov eax, 0x4402
    vmread rax, rax
    cmp rax, 18
    jne 7f
    mov rdx, [rsp + 8]
    cmp qword ptr [rdx + 16], 0
    je 7f
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdx, [rsp + 8]
    cmp rax, [rdx]
    jae 8f
    mov rdi, [rdx + 24]
    mov rsi, [rsp]
    sub rsp, 8
    call qword ptr [rdx + 16]
    add rsp, 8
    test rax, rax
    jnz 8f
    mov rdx, [rsp + 8]
    add qword ptr [rdx + 8], 1
    mov edi, 0x681E
    vmread rax, rdi
    add rax, 3
    vmwrite rdi, rax
    mov rdi, [rsp]
    mov rax, [rdi + 0x00]
    mov rbx, [rdi + 0x08]
    mov rcx, [rdi + 0x10]
    mov rdx, [rdi + 0x18]
    mov rsi, [rdi + 0x20]
    mov r8,  [rdi + 0x30]
    mov r9,  [rdi + 0x38]
    mov r10, [rdi + 0x40]
    mov r11, [rdi + 0x48]
    mov r12, [rdi + 0x50]
    mov r13, [rdi + 0x58]
    mov r14, [rdi + 0x60]
    mov r15, [rdi + 0x68]
    mov rbp, [rdi + 0x70]
    mov rdi, [rdi + 0x28]
    vmresume
    jmp 3b

8:  mov eax, 18
7:  pop rdi
    pop rdx
4:  pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#,
    null_selector = const NULL_SELECTOR,
);

unsafe extern "C" {
    fn nk_vm_run(regs: *mut GuestRegs, launched: u64, fast: *mut NullFastPath) -> u64;
    fn nk_vm_exit();
}

/// Says why VMLAUNCH or VMRESUME failed, from `nk_vm_run`'s status (not 0 in its high half).
#[cold]
#[inline(never)]
fn entry_failure(status: u64) -> VcpuError {
    if status >> 32 == 1 {
        return VcpuError::Vmx(VmFail::Invalid);
    }
    match vmcs::read(F::VM_INSTRUCTION_ERROR) {
        Ok(error) => VcpuError::Vmx(VmFail::Valid(vmcs::VmInstructionError(error as u32))),
        Err(fail) => VcpuError::Vmx(fail),
    }
}

/// Controls the hypervisor asks for (SDM Vol. 3 §25.6-§25.8).
mod want {
    pub const PIN_EXTERNAL_INTERRUPT: u32 = 1 << 0;
    pub const PIN_NMI: u32 = 1 << 3;
    pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
    pub const PROC_HLT: u32 = 1 << 7;
    pub const PROC_MWAIT: u32 = 1 << 10;
    pub const PROC_CR8_LOAD: u32 = 1 << 19;
    pub const PROC_CR8_STORE: u32 = 1 << 20;
    pub const PROC_TPR_SHADOW: u32 = 1 << 21;
    pub const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
    pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const PROC_MONITOR: u32 = 1 << 29;
    pub const PROC_SECONDARY: u32 = 1 << 31;
    pub const PROC2_VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    pub const PROC2_EPT: u32 = 1 << 1;
    pub const PROC2_APIC_REGISTER_VIRT: u32 = 1 << 8;
    pub const PROC2_VPID: u32 = 1 << 5;
    pub const PROC2_PAUSE_LOOP: u32 = 1 << 10;
    pub const PROC2_UNRESTRICTED: u32 = 1 << 7;
    pub const PROC_INTERRUPT_WINDOW: u32 = 1 << 2;
    pub const EXIT_SAVE_DEBUG: u32 = 1 << 2;
    pub const EXIT_HOST_64BIT: u32 = 1 << 9;
    pub const EXIT_SAVE_PAT: u32 = 1 << 18;
    pub const EXIT_LOAD_PAT: u32 = 1 << 19;
    pub const EXIT_SAVE_EFER: u32 = 1 << 20;
    pub const EXIT_LOAD_EFER: u32 = 1 << 21;
    pub const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
    pub const ENTRY_IA32E_GUEST: u32 = 1 << 9;
    pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
    pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
}

/// PAUSE-loop exiting: PAUSEs at most this many TSC ticks apart form one spin loop
/// (SDM Vol. 3 §25.6.13), and a loop longer than the window exits; the values are the
/// ones KVM starts from.
const PLE_GAP: u64 = 128;
const PLE_WINDOW: u64 = 4096;

/// Why a vCPU could not be set up or entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuError {
    /// A control the hypervisor needs is not allowed by this CPU.
    ControlUnsupported {
        field: u32,
        missing: u32,
    },
    /// A VMX instruction failed.
    Vmx(VmFail),
    OutOfMemory,
}

impl From<VmFail> for VcpuError {
    fn from(fail: VmFail) -> Self {
        VcpuError::Vmx(fail)
    }
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuError::ControlUnsupported { field, missing } => {
                write!(f, "VMCS control {field:#x}: bits {missing:#x} not allowed by this CPU")
            }
            VcpuError::Vmx(fail) => write!(f, "{fail}"),
            VcpuError::OutOfMemory => write!(f, "no frame for the VMCS or the virtual-APIC page"),
        }
    }
}

/// Returns the controls a capability MSR allows to be 1 (its high half).
fn allowed_one(capability_msr: u32) -> u32 {
    // SAFETY: the VMX capability MSRs exist on every CPU in VMX root operation.
    (unsafe { rdmsr(capability_msr) } >> 32) as u32
}

/// Forces `wanted` into the allowed range of a capability MSR: allowed-0 bits (low half)
/// are set, and any wanted bit outside allowed-1 (high half) is an error.
fn adjust(capability_msr: u32, field: F, wanted: u32) -> Result<u32, VcpuError> {
    // SAFETY: the VMX capability MSRs exist on every CPU in VMX root operation.
    let allowed = unsafe { rdmsr(capability_msr) };
    let (must_be_one, may_be_one) = (allowed as u32, (allowed >> 32) as u32);
    let missing = wanted & !may_be_one;
    if missing != 0 {
        return Err(VcpuError::ControlUnsupported { field: field.0, missing });
    }
    Ok(wanted | must_be_one)
}

/// A guest exit. Only the reason is read eagerly; handlers read the other exit fields
/// they need (`Vcpu::exit_qualification`, `Vcpu::guest_physical`), which keeps VMCS
/// reads off the hypercall path.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub reason: ExitReason,
}

/// A vCPU with its own VMCS, running a 64-bit guest in its own EPT.
#[derive(Debug)]
pub struct Vcpu {
    vmcs: HostPhysAddr,
    /// The virtual-APIC page: its VTPR byte (offset 0x80) is the guest's CR8 under the
    /// TPR shadow (SDM Vol. 3 §30.1.1). None where the CPU lacks the TPR shadow; then
    /// CR8 accesses exit and `cr8` holds the guest's value.
    virtual_apic: Option<HostPhysAddr>,
    /// The APIC-access page of a guest OS (SDM Vol. 3 §30.4): the caller maps it in the
    /// EPT at the guest's APIC base, so xAPIC accesses are virtualized or exit. None for
    /// bare-metal guests and where the CPU lacks "virtualize APIC accesses".
    apic_access: Option<HostPhysAddr>,
    /// Whether APIC-register virtualization is on (reads served from the virtual-APIC
    /// page, writes trap-like APIC-write exits, SDM Vol. 3 §30.4.2-§30.4.3).
    apic_register_virt: bool,
    /// The guest's CR8 without a TPR shadow (bits 3:0).
    cr8: u8,
    /// The TPR threshold in the VMCS.
    tpr_threshold: u8,
    pub regs: GuestRegs,
    launched: bool,
    /// The exit stub's null-hypercall fast path (off until [`Vcpu::serve_null_until`]).
    null_fast_path: NullFastPath,
    /// Its VPID from the pool (None: it runs without one). Dropped after the VMCS is
    /// cleared, which invalidates the VPID's translations (`tlb::Vpid`).
    vpid: Option<Vpid>,
}

/// The processor mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// One of our bare-metal guests: long mode, no GDT (selectors 0x08/0x10).
    Bare64,
    /// A guest OS entered in long mode on a boot GDT (Linux's 64-bit boot protocol:
    /// CS 0x10, DS 0x18, boot.rst "64-bit boot protocol").
    Os64 { gdt_base: u64, gdt_limit: u16 },
    /// A guest OS entered in 32-bit protected mode without paging (Multiboot §3.2: flat
    /// CS 0x20, DS 0x18), which needs "unrestricted guest" (SDM Vol. 3 §26.6).
    Os32 { gdt_base: u64, gdt_limit: u16 },
}

impl StartMode {
    fn is_os(self) -> bool {
        self != StartMode::Bare64
    }
}

/// The MSRs that live in the VMCS guest-state area (SDM Vol. 3 §25.4.1), as the virtual
/// PC's MSR policy names them.
pub use nk_devices::msr::VmcsMsr;

/// The initial state of a vCPU.
#[derive(Debug, Clone, Copy)]
pub struct GuestStart {
    pub mode: StartMode,
    pub eptp: u64,
    pub cr3: u64,
    pub rip: u64,
    pub rsp: u64,
    /// Address of the guest's I/O bitmap A; bitmap B is the next page.
    pub io_bitmaps: u64,
    /// Address of the guest's MSR bitmap.
    pub msr_bitmap: u64,
}

impl Vcpu {
    /// Allocates a VMCS, makes it current on this CPU and fills its controls, host state
    /// and a 64-bit guest state (long mode, paging on `start.cr3`, flat segments).
    pub fn new(caps: &VmxCaps, start: &GuestStart) -> Result<Self, VcpuError> {
        let vmcs = memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?;
        // SAFETY: a fresh, zeroed, identity-mapped frame owned by this vCPU; the first
        // dword is the revision identifier (SDM §25.2).
        unsafe { (vmcs.as_u64() as *mut u32).write_volatile(caps.vmcs_revision) };
        let mut vcpu = Self {
            vmcs,
            virtual_apic: None,
            apic_access: None,
            apic_register_virt: false,
            cr8: 0,
            tpr_threshold: 0,
            regs: GuestRegs::default(),
            launched: false,
            null_fast_path: NullFastPath::default(),
            vpid: Vpid::allocate(caps),
        };
        let (_, proc, _, _) = control_msrs(caps);
        if allowed_one(proc) & want::PROC_TPR_SHADOW != 0 {
            vcpu.virtual_apic = Some(memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?);
            // A guest OS's xAPIC page goes through the APIC-access page where the CPU
            // offers it (it needs the TPR shadow's virtual-APIC page, SDM §26.2.1.1).
            let proc2 = allowed_one(msr::IA32_VMX_PROCBASED_CTLS2);
            if start.mode.is_os() && proc2 & want::PROC2_VIRTUALIZE_APIC_ACCESSES != 0 {
                vcpu.apic_access = Some(memory::alloc_zeroed_frame().ok_or(VcpuError::OutOfMemory)?);
                vcpu.apic_register_virt = proc2 & want::PROC2_APIC_REGISTER_VIRT != 0;
            }
        }
        static DESCRIBED_OS: AtomicBool = AtomicBool::new(false);
        if start.mode.is_os() && !DESCRIBED_OS.swap(true, Ordering::Relaxed) {
            log::info!(target: "vmx", "guest-OS vCPUs: xAPIC page {}",
            match (vcpu.apic_access, vcpu.apic_register_virt) {
                (None, _) => "not virtualized (no APIC-access page on this CPU): x2APIC only",
                (Some(_), false) => "through the APIC-access page, every access an APIC-access exit (no APIC-register virtualization)",
                (Some(_), true) => "through the APIC-access page with APIC-register virtualization",
            });
        }
        // SAFETY: the frame is this vCPU's VMCS region and not current anywhere else.
        unsafe {
            vmcs::clear(vmcs.as_u64())?;
            vmcs::load(vmcs.as_u64())?;
        }
        vcpu.setup_controls(caps, start)?;
        vcpu.setup_host_state()?;
        vcpu.setup_guest_state(start)?;
        Ok(vcpu)
    }

    fn setup_controls(&self, caps: &VmxCaps, start: &GuestStart) -> Result<(), VcpuError> {
        let (pin, proc, exit, entry) = control_msrs(caps);
        let vpid = if self.vpid.is_some() { want::PROC2_VPID } else { 0 };
        // The guest's CR8 is its own: the TPR shadow keeps it in the virtual-APIC page,
        // else every CR8 access exits and is emulated; the physical TPR stays the host's,
        // so a guest cannot mask the hypervisor's doorbells (SDM Vol. 3 §30.1).
        let tpr = match self.virtual_apic {
            Some(_) => want::PROC_TPR_SHADOW,
            None => want::PROC_CR8_LOAD | want::PROC_CR8_STORE,
        };
        // MONITOR/MWAIT exit (emulated as no-ops) where the CPU lets them; PAUSE loops
        // end the guest's slice where it offers PAUSE-loop exiting.
        let idle = allowed_one(proc) & (want::PROC_MWAIT | want::PROC_MONITOR);
        let pause_loop = allowed_one(msr::IA32_VMX_PROCBASED_CTLS2) & want::PROC2_PAUSE_LOOP;
        // A guest OS may run with paging off (Multiboot's entry state) or in real mode.
        let unrestricted = if start.mode.is_os() { want::PROC2_UNRESTRICTED } else { 0 };
        let ia32e = if matches!(start.mode, StartMode::Os32 { .. }) { 0 } else { want::ENTRY_IA32E_GUEST };
        let apic = match (self.apic_access, self.apic_register_virt) {
            (None, _) => 0,
            (Some(_), false) => want::PROC2_VIRTUALIZE_APIC_ACCESSES,
            (Some(_), true) => want::PROC2_VIRTUALIZE_APIC_ACCESSES | want::PROC2_APIC_REGISTER_VIRT,
        };
        static DESCRIBED: AtomicBool = AtomicBool::new(false);
        if !DESCRIBED.swap(true, Ordering::Relaxed) {
            let (mask, bytes) = crate::arch::xsave::switching();
            log::info!(target: "vmx", "guest vCPUs: CR8 {}, MONITOR/MWAIT {}, PAUSE loops {}; XSAVE state switched under XCR0 {mask:#x} ({bytes}-byte areas)",
                if self.virtual_apic.is_some() { "in a TPR shadow" } else { "emulated at CR8 exits" },
                if idle == want::PROC_MWAIT | want::PROC_MONITOR { "exit (no-ops)" } else { "run natively (no exiting offered)" },
                if pause_loop != 0 { "end the slice (PAUSE-loop exiting)" } else { "run natively (no PAUSE-loop exiting)" });
        }
        let fields = [
            (
                F::PIN_BASED_CONTROLS,
                adjust(
                    pin,
                    F::PIN_BASED_CONTROLS,
                    want::PIN_EXTERNAL_INTERRUPT | want::PIN_NMI | want::PIN_PREEMPTION_TIMER,
                )?,
            ),
            (
                F::PRIMARY_PROCESSOR_CONTROLS,
                adjust(
                    proc,
                    F::PRIMARY_PROCESSOR_CONTROLS,
                    want::PROC_HLT
                        | want::PROC_USE_IO_BITMAPS
                        | want::PROC_USE_MSR_BITMAPS
                        | want::PROC_SECONDARY
                        | tpr
                        | idle,
                )?,
            ),
            (
                F::SECONDARY_PROCESSOR_CONTROLS,
                adjust(
                    msr::IA32_VMX_PROCBASED_CTLS2,
                    F::SECONDARY_PROCESSOR_CONTROLS,
                    want::PROC2_EPT | vpid | pause_loop | unrestricted | apic,
                )?,
            ),
            (
                F::EXIT_CONTROLS,
                adjust(
                    exit,
                    F::EXIT_CONTROLS,
                    want::EXIT_HOST_64BIT
                        | want::EXIT_SAVE_DEBUG
                        | want::EXIT_SAVE_PAT
                        | want::EXIT_LOAD_PAT
                        | want::EXIT_SAVE_EFER
                        | want::EXIT_LOAD_EFER,
                )?,
            ),
            (
                F::ENTRY_CONTROLS,
                adjust(
                    entry,
                    F::ENTRY_CONTROLS,
                    ia32e | want::ENTRY_LOAD_DEBUG | want::ENTRY_LOAD_PAT | want::ENTRY_LOAD_EFER,
                )?,
            ),
        ];
        // SAFETY: control values were forced into the CPU's allowed ranges above; the
        // EPT pointer names an EPT the caller built.
        unsafe {
            for (field, value) in fields {
                vmcs::write(field, u64::from(value))?;
            }
            vmcs::write(F::EXCEPTION_BITMAP, 0)?;
            vmcs::write(F::EPT_POINTER, start.eptp)?;
            vmcs::write(F::IO_BITMAP_A, start.io_bitmaps)?;
            vmcs::write(F::IO_BITMAP_B, start.io_bitmaps + 4096)?;
            vmcs::write(F::MSR_BITMAP, start.msr_bitmap)?;
            if let Some(vpid) = &self.vpid {
                vmcs::write(F::VPID, u64::from(vpid.raw()))?;
            }
            vmcs::write(F::VMCS_LINK_POINTER, u64::MAX)?;
            // The longest slice until a scheduler arms a shorter one.
            vmcs::write(F::GUEST_PREEMPTION_TIMER, u64::from(u32::MAX))?;
            // The guest sees CR4.VMXE clear; it may not change the bit. CR0 is the
            // guest's own (the VMX fixed bits still hold in VMX non-root operation).
            vmcs::write(F::CR4_GUEST_HOST_MASK, 1 << 13)?;
            vmcs::write(F::CR4_READ_SHADOW, 0)?;
            vmcs::write(F::CR0_GUEST_HOST_MASK, 0)?;
            vmcs::write(F::CR0_READ_SHADOW, 0)?;
            // Every field a control above relies on is written, none trusted to the
            // zeroed region: no CR3 targets, no MSR lists, no event to inject, #PF
            // exits only through the exception bitmap (mask = match = 0).
            vmcs::write(F::CR3_TARGET_COUNT, 0)?;
            vmcs::write(F::EXIT_MSR_STORE_COUNT, 0)?;
            vmcs::write(F::EXIT_MSR_LOAD_COUNT, 0)?;
            vmcs::write(F::ENTRY_MSR_LOAD_COUNT, 0)?;
            vmcs::write(F::PAGE_FAULT_ERROR_CODE_MASK, 0)?;
            vmcs::write(F::PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
            vmcs::write(F::ENTRY_INTERRUPTION_INFO, 0)?;
            vmcs::write(F::ENTRY_EXCEPTION_ERROR_CODE, 0)?;
            vmcs::write(F::ENTRY_INSTRUCTION_LENGTH, 0)?;
            if let Some(page) = self.virtual_apic {
                // Threshold 0: lowering the virtual TPR never exits.
                vmcs::write(F::VIRTUAL_APIC_PAGE_ADDR, page.as_u64())?;
                vmcs::write(F::TPR_THRESHOLD, 0)?;
            }
            if let Some(page) = self.apic_access {
                vmcs::write(F::APIC_ACCESS_ADDR, page.as_u64())?;
            }
            if pause_loop != 0 {
                vmcs::write(F::PLE_GAP, PLE_GAP)?;
                vmcs::write(F::PLE_WINDOW, PLE_WINDOW)?;
            }
        }
        Ok(())
    }

    fn setup_host_state(&self) -> Result<(), VcpuError> {
        let (cr0, cr3, cr4): (u64, u64, u64);
        let mut gdtr = [0u8; 10];
        let mut idtr = [0u8; 10];
        // SAFETY: reading control registers and descriptor-table registers at CPL0 has no
        // side effects; the buffers are 10 bytes as SGDT/SIDT store in 64-bit mode.
        unsafe {
            asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
            asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
            asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
            asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
            asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack));
        }
        let base = |bytes: [u8; 10]| u64::from_le_bytes(bytes[2..10].try_into().expect("8 bytes"));
        let gdt_base = base(gdtr);
        // The TSS base is spread over the TSS descriptor (two GDT slots at TSS_SELECTOR).
        // SAFETY: the GDT loaded on this CPU is this CPU's 'static GDT with a TSS
        // descriptor at TSS_SELECTOR.
        let (low, high) = unsafe {
            let slot = (gdt_base + u64::from(TSS_SELECTOR)) as *const u64;
            (slot.read(), slot.add(1).read())
        };
        let tr_base = ((low >> 16) & 0xFF_FFFF) | (((low >> 56) & 0xFF) << 24) | (high << 32);
        // SAFETY: these MSRs exist on every x86-64 CPU.
        let (efer, pat, gs_base) = unsafe { (rdmsr(0xC000_0080), rdmsr(0x277), rdmsr(0xC000_0101)) };
        let fields = [
            (F::HOST_CR0, cr0),
            (F::HOST_CR3, cr3),
            (F::HOST_CR4, cr4),
            (F::HOST_CS_SELECTOR, u64::from(KERNEL_CODE)),
            (F::HOST_SS_SELECTOR, u64::from(KERNEL_DATA)),
            (F::HOST_DS_SELECTOR, u64::from(KERNEL_DATA)),
            (F::HOST_ES_SELECTOR, u64::from(KERNEL_DATA)),
            (F::HOST_FS_SELECTOR, 0),
            (F::HOST_GS_SELECTOR, 0),
            (F::HOST_TR_SELECTOR, u64::from(TSS_SELECTOR)),
            (F::HOST_FS_BASE, 0),
            (F::HOST_GS_BASE, gs_base),
            (F::HOST_TR_BASE, tr_base),
            (F::HOST_GDTR_BASE, gdt_base),
            (F::HOST_IDTR_BASE, base(idtr)),
            (F::HOST_SYSENTER_CS, 0),
            (F::HOST_SYSENTER_ESP, 0),
            (F::HOST_SYSENTER_EIP, 0),
            (F::HOST_IA32_EFER, efer),
            (F::HOST_IA32_PAT, pat),
            (F::HOST_RIP, nk_vm_exit as *const () as usize as u64),
        ];
        for (field, value) in fields {
            // SAFETY: the host state is this CPU's own current state and exit stub.
            unsafe { vmcs::write(field, value)? };
        }
        Ok(())
    }

    fn setup_guest_state(&self, start: &GuestStart) -> Result<(), VcpuError> {
        let fixed = |value: u64, f0: u32, f1: u32| {
            // SAFETY: the VMX fixed-bit MSRs exist in VMX root operation.
            unsafe { (value | rdmsr(f0)) & rdmsr(f1) }
        };
        // PE, MP, ET, NE, WP, PG; PAE and VMXE (a fixed-1 bit in VMX operation). A 32-bit
        // OS entry has PE, ET and NE only: unrestricted guest lifts the PG fixed-1 bit.
        let (cr0_bits, cr4_bits) = match start.mode {
            StartMode::Os32 { .. } => (0x0000_0031, 1 << 13),
            _ => (0x8001_0033, (1 << 5) | (1 << 13)),
        };
        let mut cr0 = fixed(cr0_bits, msr::IA32_VMX_CR0_FIXED0, msr::IA32_VMX_CR0_FIXED1);
        if start.mode.is_os() {
            // Unrestricted guest: PE and PG need not be 1 (SDM Vol. 3 §26.3.1.1).
            cr0 = (cr0 & !0x8000_0001) | (cr0_bits & 0x8000_0001);
        }
        let cr4 = fixed(cr4_bits, msr::IA32_VMX_CR4_FIXED0, msr::IA32_VMX_CR4_FIXED1);
        const CODE64_AR: u64 = 0xA09B; // present, S, execute/read accessed, L, G
        const CODE32_AR: u64 = 0xC09B; // present, S, execute/read accessed, D, G
        const DATA_AR: u64 = 0xC093; // present, S, read/write accessed, D/B, G
        const TSS_AR: u64 = 0x8B; // present, busy 64-bit (or 32-bit) TSS
        const UNUSABLE: u64 = 1 << 16;
        let (cs, ds, cs_ar, gdt, efer) = match start.mode {
            StartMode::Bare64 => (0x08, 0x10, CODE64_AR, (0, 0), (1 << 8) | (1 << 10)),
            StartMode::Os64 { gdt_base, gdt_limit } => {
                (0x10, 0x18, CODE64_AR, (gdt_base, gdt_limit), (1 << 8) | (1 << 10))
            }
            StartMode::Os32 { gdt_base, gdt_limit } => (0x20, 0x18, CODE32_AR, (gdt_base, gdt_limit), 0),
        };
        let segments = [
            (F::GUEST_CS_SELECTOR, F::GUEST_CS_BASE, F::GUEST_CS_LIMIT, F::GUEST_CS_ACCESS_RIGHTS, cs, cs_ar),
            (F::GUEST_SS_SELECTOR, F::GUEST_SS_BASE, F::GUEST_SS_LIMIT, F::GUEST_SS_ACCESS_RIGHTS, ds, DATA_AR),
            (F::GUEST_DS_SELECTOR, F::GUEST_DS_BASE, F::GUEST_DS_LIMIT, F::GUEST_DS_ACCESS_RIGHTS, ds, DATA_AR),
            (F::GUEST_ES_SELECTOR, F::GUEST_ES_BASE, F::GUEST_ES_LIMIT, F::GUEST_ES_ACCESS_RIGHTS, ds, DATA_AR),
            (F::GUEST_FS_SELECTOR, F::GUEST_FS_BASE, F::GUEST_FS_LIMIT, F::GUEST_FS_ACCESS_RIGHTS, ds, DATA_AR),
            (F::GUEST_GS_SELECTOR, F::GUEST_GS_BASE, F::GUEST_GS_LIMIT, F::GUEST_GS_ACCESS_RIGHTS, ds, DATA_AR),
            (F::GUEST_LDTR_SELECTOR, F::GUEST_LDTR_BASE, F::GUEST_LDTR_LIMIT, F::GUEST_LDTR_ACCESS_RIGHTS, 0, UNUSABLE),
            (F::GUEST_TR_SELECTOR, F::GUEST_TR_BASE, F::GUEST_TR_LIMIT, F::GUEST_TR_ACCESS_RIGHTS, 0, TSS_AR),
        ];
        // SAFETY: guest-state fields only affect the guest; VM entry checks them all.
        unsafe {
            for (selector, base, limit, rights, value, ar) in segments {
                vmcs::write(selector, value)?;
                vmcs::write(base, 0)?;
                vmcs::write(limit, if ar == TSS_AR { 0x67 } else { 0xFFFF_FFFF })?;
                vmcs::write(rights, ar)?;
            }
            let fields = [
                (F::GUEST_CR0, cr0),
                (F::GUEST_CR3, start.cr3),
                (F::GUEST_CR4, cr4),
                (F::GUEST_GDTR_BASE, gdt.0),
                (F::GUEST_GDTR_LIMIT, u64::from(gdt.1)),
                (F::GUEST_IDTR_BASE, 0),
                (F::GUEST_IDTR_LIMIT, 0),
                (F::GUEST_DR7, 0x400),
                (F::GUEST_IA32_DEBUGCTL, 0),
                (F::GUEST_RSP, start.rsp),
                (F::GUEST_RIP, start.rip),
                (F::GUEST_RFLAGS, 0x2),
                (F::GUEST_PENDING_DEBUG, 0),
                (F::GUEST_SYSENTER_CS, 0),
                (F::GUEST_SYSENTER_ESP, 0),
                (F::GUEST_SYSENTER_EIP, 0),
                (F::GUEST_INTERRUPTIBILITY, 0),
                (F::GUEST_ACTIVITY_STATE, 0),
                (F::GUEST_IA32_EFER, efer), // LME | LMA in long mode
                (F::GUEST_IA32_PAT, 0x0007_0406_0007_0406),
            ];
            for (field, value) in fields {
                vmcs::write(field, value)?;
            }
            vmcs::write(F::CR0_READ_SHADOW, cr0)?;
        }
        Ok(())
    }

    /// Enters the guest and returns at its next exit. Inlined into the slice loops (an exit
    /// costs no call around the stub's); a failed entry is decoded out of line.
    #[inline(always)]
    pub fn run(&mut self) -> Result<Exit, VcpuError> {
        // SAFETY: this vCPU's VMCS is current on this CPU (made so in `new`, and vCPUs do
        // not migrate yet); the stub saves and restores every host register it changes.
        // The handler it may call is set only by `run_serving`, with a `ctx` that lives
        // and is borrowed by nothing else until this call returns (it clears both after).
        let status = unsafe { nk_vm_run(&mut self.regs, u64::from(self.launched), &mut self.null_fast_path) };
        if status >> 32 != 0 {
            return Err(entry_failure(status));
        }
        self.launched = true;
        // The stub read the exit reason (its low 16 bits are the basic reason).
        Ok(Exit { reason: ExitReason(status as u16) })
    }

    /// Enters the guest as [`run`](Self::run) does, with the exit stub's hypercall path
    /// on: until the slice's deadline ([`serve_null_until`](Self::serve_null_until)), a
    /// VMCALL exit calls `calls` from the stub, and each call it answers resumes the guest
    /// at once (counted as the null calls are, [`take_null_exits`](Self::take_null_exits));
    /// the exit returned is one it left, or any other.
    #[inline(always)]
    pub fn run_serving<C: ExitHypercall>(&mut self, calls: &mut C) -> Result<Exit, VcpuError> {
        self.null_fast_path.handler = Some(exit_hypercall::<C>);
        self.null_fast_path.ctx = (calls as *mut C).cast();
        let exit = self.run();
        // No pointer to `calls` outlives the borrow.
        (self.null_fast_path.handler, self.null_fast_path.ctx) = (None, core::ptr::null_mut());
        exit
    }

    /// Lets the exit stub answer this vCPU's null hypercalls itself until the TSC reaches
    /// `deadline` (0: never), so a guest's slice still ends on time (`NullFastPath`). Only a
    /// caller that does nothing else at a null hypercall's exit turns it on.
    pub fn serve_null_until(&mut self, deadline: u64) {
        self.null_fast_path.deadline = deadline;
    }

    /// Returns how many null hypercalls the exit stub answered since the last call, and
    /// starts counting again: exits the caller did not see.
    pub fn take_null_exits(&mut self) -> u64 {
        core::mem::take(&mut self.null_fast_path.served)
    }

    /// Returns the exit qualification of the last exit (SDM Vol. 3 §28.2.1).
    pub fn exit_qualification(&self) -> Result<u64, VcpuError> {
        Ok(vmcs::read(F::EXIT_QUALIFICATION)?)
    }

    /// Returns the guest-physical address of the last EPT exit.
    pub fn guest_physical(&self) -> Result<u64, VcpuError> {
        Ok(vmcs::read(F::GUEST_PHYSICAL_ADDRESS)?)
    }

    /// Moves the guest past the instruction that exited, as if it had executed: the
    /// blocking by STI or MOV SS that covered it ends with it (SDM Vol. 3 §25.4.2,
    /// Table 25-3), so a shadow is not carried over to the next instruction.
    pub fn skip_instruction(&mut self) -> Result<(), VcpuError> {
        let length = vmcs::read(F::EXIT_INSTRUCTION_LENGTH)?;
        self.skip_bytes(length)?;
        const STI_OR_MOV_SS: u64 = 0b11;
        let interruptibility = vmcs::read(F::GUEST_INTERRUPTIBILITY)?;
        if interruptibility & STI_OR_MOV_SS != 0 {
            // SAFETY: clearing the shadow bits leaves a consistent guest state (no event
            // is being injected that the bits would have to accompany).
            unsafe { vmcs::write(F::GUEST_INTERRUPTIBILITY, interruptibility & !STI_OR_MOV_SS)? };
        }
        Ok(())
    }

    /// Moves the guest past an exiting instruction whose length is fixed (VMCALL: 3 bytes,
    /// SDM Vol. 2), saving the read of the instruction-length field on the hot path.
    ///
    /// Unlike `skip_instruction` it leaves the interruptibility state alone: a VMCALL
    /// after STI or MOV SS keeps the shadow one instruction longer. That delays nothing the
    /// guest could miss: the hypervisor injects no interrupts or NMIs into guests, and the
    /// host's own interrupts still end the guest's run at the next instruction. So the
    /// hypercall path saves the VMREAD of the interruptibility state.
    #[inline(always)]
    pub fn skip_bytes(&mut self, length: u64) -> Result<(), VcpuError> {
        // SAFETY: this vCPU's VMCS is current (it just exited), so neither VMREAD nor
        // VMWRITE of GUEST_RIP, a field every VMCS has, can fail (SDM Vol. 3 §31.3, the
        // instructions' failure conditions), which is why the flags are not tested; and
        // advancing RIP by the exiting instruction's length is what the SDM prescribes for
        // emulated instructions (§28.2.5).
        unsafe {
            asm!("vmread {rip}, {field}", "add {rip}, {length}", "vmwrite {field}, {rip}",
                 field = in(reg) u64::from(F::GUEST_RIP.0), length = in(reg) length, rip = out(reg) _,
                 options(nostack));
        }
        Ok(())
    }

    /// Returns the guest's RIP, RSP and RFLAGS (an lwC's part of the register file that
    /// lives in the VMCS guest-state area, SDM Vol. 3 §25.4.1); the VMCS must be current.
    pub fn flow_registers(&self) -> Result<[u64; 3], VcpuError> {
        Ok([vmcs::read(F::GUEST_RIP)?, vmcs::read(F::GUEST_RSP)?, vmcs::read(F::GUEST_RFLAGS)?])
    }

    /// Loads RIP, RSP and RFLAGS saved by [`flow_registers`](Self::flow_registers) of this
    /// same vCPU (an lwC switch, SDM Vol. 3 §25.4.1).
    pub fn set_flow_registers(&mut self, [rip, rsp, rflags]: [u64; 3]) -> Result<(), VcpuError> {
        // SAFETY: the values were this vCPU's own at an earlier VM exit (valid guest state
        // then, and its control registers and segments are shared by every lwC of the VM).
        unsafe {
            vmcs::write(F::GUEST_RIP, rip)?;
            vmcs::write(F::GUEST_RSP, rsp)?;
            vmcs::write(F::GUEST_RFLAGS, rflags)?;
        }
        Ok(())
    }

    /// Exchanges the guest's RIP, RSP and RFLAGS with `flow` (saved by
    /// [`flow_registers`](Self::flow_registers) or this call, of this same vCPU), which
    /// gets the ones the guest had, RIP moved `skip` bytes on past the instruction that
    /// exited: the repeated lwC switch (lwc.rs, `SwitchCache`), three VMREADs and three
    /// VMWRITEs with the loads and stores of `flow` between them and nothing else. The
    /// VMCS must be current (the vCPU just exited).
    #[inline(always)]
    pub fn exchange_flow(&mut self, flow: &mut [u64; 3], skip: u64) {
        // SAFETY: this vCPU's VMCS is current (it just exited), so VMREAD and VMWRITE of
        // GUEST_RIP, GUEST_RSP and GUEST_RFLAGS, fields every VMCS has, cannot fail (SDM
        // Vol. 3 §31.3), which is why the flags are not tested; the values loaded were this
        // vCPU's own at an earlier VM exit (valid guest state then, and the control
        // registers and segments are shared by every lwC of the VM), as for
        // `set_flow_registers`; `flow` is three u64s the exclusive borrow covers.
        unsafe {
            asm!(
                "mov {field:e}, {rip}",
                "vmread {old}, {field}",
                "add {old}, {skip}",
                "mov {new}, [{flow}]",
                "mov [{flow}], {old}",
                "vmwrite {field}, {new}",
                "mov {field:e}, {rsp}",
                "vmread {old}, {field}",
                "mov {new}, [{flow} + 8]",
                "mov [{flow} + 8], {old}",
                "vmwrite {field}, {new}",
                "mov {field:e}, {rflags}",
                "vmread {old}, {field}",
                "mov {new}, [{flow} + 16]",
                "mov [{flow} + 16], {old}",
                "vmwrite {field}, {new}",
                rip = const F::GUEST_RIP.0,
                rsp = const F::GUEST_RSP.0,
                rflags = const F::GUEST_RFLAGS.0,
                flow = in(reg) flow.as_mut_ptr(),
                skip = in(reg) skip,
                field = out(reg) _,
                old = out(reg) _,
                new = out(reg) _,
                options(nostack),
            );
        }
    }

    /// Points the vCPU at another EPT of its VM (an lwC switch between views, lwc.rs):
    /// cached translations are tagged with the EPTP (SDM Vol. 3 §29.4.1), so none is
    /// invalidated. The VMCS must be current.
    pub fn set_eptp(&mut self, eptp: u64) -> Result<(), VcpuError> {
        // SAFETY: `eptp` is the pointer of a live EPT of this vCPU's VM, built like the one
        // the vCPU started with (same memory type and walk length).
        unsafe { vmcs::write(F::EPT_POINTER, eptp)? };
        Ok(())
    }

    /// Makes this vCPU's VMCS the current one on this CPU (before running it after another
    /// vCPU ran here).
    pub fn activate(&self) -> Result<(), VcpuError> {
        // SAFETY: the VMCS is this vCPU's, created on this CPU and never migrated.
        unsafe { vmcs::load(self.vmcs.as_u64())? };
        Ok(())
    }

    /// Arms the VMX-preemption timer: the guest exits after `ticks` TSC ticks (rounded
    /// to the timer's rate, SDM Vol. 3 §26.5.1).
    pub fn set_time_slice(&mut self, ticks: u64, rate: u8) -> Result<(), VcpuError> {
        let value = (ticks >> rate).clamp(1, u64::from(u32::MAX));
        // SAFETY: the timer value only bounds how long the guest runs.
        unsafe { vmcs::write(F::GUEST_PREEMPTION_TIMER, value)? };
        Ok(())
    }

    /// Returns the guest's CR4 (as the CPU holds it, not the read shadow).
    pub fn guest_cr4(&self) -> Result<u64, VcpuError> {
        Ok(vmcs::read(F::GUEST_CR4)?)
    }

    /// Makes the next VM entry deliver hardware exception `vector` with `error_code`
    /// (SDM Vol. 3 §27.6 event injection), e.g. #GP(0) for a denied MSR access.
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VcpuError> {
        const VALID: u64 = 1 << 31;
        const HARDWARE_EXCEPTION: u64 = 3 << 8;
        const DELIVER_ERROR_CODE: u64 = 1 << 11;
        let mut info = VALID | HARDWARE_EXCEPTION | u64::from(vector);
        // SAFETY: event injection only affects the guest; VM entry checks the fields.
        unsafe {
            if let Some(code) = error_code {
                info |= DELIVER_ERROR_CODE;
                vmcs::write(F::ENTRY_EXCEPTION_ERROR_CODE, u64::from(code))?;
            }
            vmcs::write(F::ENTRY_INTERRUPTION_INFO, info)?;
        }
        Ok(())
    }

    /// Returns the VPID this vCPU runs with, if any.
    #[cfg_attr(not(feature = "test-harness"), allow(dead_code))]
    pub fn vpid(&self) -> Option<u16> {
        self.vpid.as_ref().map(Vpid::raw)
    }

    /// Returns the guest's RIP.
    pub fn rip(&self) -> Result<u64, VcpuError> {
        Ok(vmcs::read(F::GUEST_RIP)?)
    }

    /// Returns the guest's current privilege level: the DPL of its SS, which equals CPL
    /// (SDM Vol. 3 §25.4.1).
    pub fn guest_cpl(&self) -> Result<u8, VcpuError> {
        Ok(((vmcs::read(F::GUEST_SS_ACCESS_RIGHTS)? >> 5) & 3) as u8)
    }

    /// Returns the VM-exit interruption information of the last exit (what exception or
    /// NMI caused it, SDM Vol. 3 §28.2.2).
    pub fn exit_interruption_info(&self) -> Result<u32, VcpuError> {
        Ok(vmcs::read(F::EXIT_INTERRUPTION_INFO)? as u32)
    }

    /// Handles an exit with basic reason 0 if an NMI caused it (NMI exiting: the NMI is
    /// the platform's, not the guest's): ends the NMI blocking the exit left in the host
    /// and keeps any event the NMI cut short for the next entry. Returns false, doing
    /// nothing, for an exception exit.
    pub fn absorb_nmi_exit(&mut self) -> Result<bool, VcpuError> {
        if !nk_cpustate::events::is_nmi(self.exit_interruption_info()?) {
            return Ok(false);
        }
        crate::arch::switched::unblock_nmis();
        self.reinject_interrupted_event()?;
        Ok(true)
    }

    /// Makes the next VM entry inject again an event whose delivery the last exit cut
    /// short (the IDT-vectoring information, SDM Vol. 3 §28.2.4), so the guest does not
    /// lose it. Only exits that are not caused by an instruction can interrupt a delivery;
    /// instruction exits (VMCALL, CPUID, ...) never call this.
    pub fn reinject_interrupted_event(&mut self) -> Result<(), VcpuError> {
        let vectoring = vmcs::read(F::IDT_VECTORING_INFO)? as u32;
        if vectoring & nk_cpustate::events::VALID == 0 {
            return Ok(());
        }
        let error_code = vmcs::read(F::IDT_VECTORING_ERROR_CODE)? as u32;
        let length = vmcs::read(F::EXIT_INSTRUCTION_LENGTH)? as u32;
        let Some(event) = nk_cpustate::events::reinjection(vectoring, error_code, length) else {
            return Ok(());
        };
        // SAFETY: the event is the guest's own, as the CPU reported it; VM entry checks
        // the fields.
        unsafe {
            if let Some(code) = event.error_code {
                vmcs::write(F::ENTRY_EXCEPTION_ERROR_CODE, u64::from(code))?;
            }
            if let Some(length) = event.instruction_length {
                vmcs::write(F::ENTRY_INSTRUCTION_LENGTH, u64::from(length))?;
            }
            vmcs::write(F::ENTRY_INTERRUPTION_INFO, u64::from(event.info))?;
        }
        Ok(())
    }

    /// Turns interrupt-window exiting on or off: with it on, the guest exits as soon as it
    /// can take an external interrupt (RFLAGS.IF = 1, no STI/MOV-SS blocking; SDM Vol. 3
    /// §26.7.5), which is when the virtual PC's pending interrupt is injected.
    pub fn set_interrupt_window(&mut self, on: bool) -> Result<(), VcpuError> {
        let controls = vmcs::read(F::PRIMARY_PROCESSOR_CONTROLS)?;
        let wanted = if on {
            controls | u64::from(want::PROC_INTERRUPT_WINDOW)
        } else {
            controls & !u64::from(want::PROC_INTERRUPT_WINDOW)
        };
        if wanted != controls {
            // SAFETY: interrupt-window exiting is allowed on every VMX CPU (SDM Vol. 3
            // Appendix A.3.2: its allowed-1 bit is always set); it only adds exits.
            unsafe { vmcs::write(F::PRIMARY_PROCESSOR_CONTROLS, wanted)? };
        }
        Ok(())
    }

    /// Returns whether the guest can take an external interrupt now: RFLAGS.IF set, no
    /// blocking by STI or MOV SS, and no event already queued for the next entry.
    pub fn interrupt_window_open(&self) -> Result<bool, VcpuError> {
        let rflags = vmcs::read(F::GUEST_RFLAGS)?;
        let blocking = vmcs::read(F::GUEST_INTERRUPTIBILITY)? & 0b11;
        let queued = vmcs::read(F::ENTRY_INTERRUPTION_INFO)? & (1 << 31);
        Ok(rflags & (1 << 9) != 0 && blocking == 0 && queued == 0)
    }

    /// Returns whether the guest's RFLAGS.IF is set.
    pub fn interrupts_enabled(&self) -> Result<bool, VcpuError> {
        Ok(vmcs::read(F::GUEST_RFLAGS)? & (1 << 9) != 0)
    }

    /// Makes the next VM entry deliver external interrupt `vector` (SDM Vol. 3 §27.6).
    pub fn inject_external_interrupt(&mut self, vector: u8) -> Result<(), VcpuError> {
        const VALID: u64 = 1 << 31;
        // SAFETY: event injection only affects the guest; the caller checked that the
        // guest can take it (interrupt_window_open).
        unsafe { vmcs::write(F::ENTRY_INTERRUPTION_INFO, VALID | u64::from(vector))? };
        Ok(())
    }

    /// Reads a guest MSR that lives in the VMCS guest-state area.
    pub fn guest_msr(&self, which: VmcsMsr) -> Result<u64, VcpuError> {
        Ok(vmcs::read(vmcs_msr_field(which))?)
    }

    /// Writes a guest MSR that lives in the VMCS guest-state area; the caller has checked
    /// the value (VM entry checks EFER, PAT and the bases again, SDM Vol. 3 §27.3.1).
    pub fn set_guest_msr(&mut self, which: VmcsMsr, value: u64) -> Result<(), VcpuError> {
        // SAFETY: guest-state fields only affect the guest.
        unsafe { vmcs::write(vmcs_msr_field(which), value)? };
        Ok(())
    }

    /// Returns the APIC-access page to map at the guest's xAPIC base (SDM Vol. 3
    /// §30.4), if xAPIC accesses are virtualized, and whether APIC-register
    /// virtualization is on (reads served from the virtual-APIC page, aligned writes
    /// trap-like APIC-write exits).
    pub fn apic_access_page(&self) -> Option<(u64, bool)> {
        self.apic_access.map(|page| (page.as_u64(), self.apic_register_virt))
    }

    /// Reads the 32-bit register at `offset` (16-byte aligned, below 0x1000) of the
    /// virtual-APIC page (SDM Vol. 3 §30.1); 0 without a TPR shadow.
    pub fn virtual_apic_read(&self, offset: u32) -> u32 {
        match self.virtual_apic {
            // SAFETY: the page is this vCPU's identity-mapped frame; the offset is masked
            // into it and 4-byte aligned; the guest is not running (volatile: the CPU
            // writes it while the guest runs).
            Some(page) => unsafe { ((page.as_u64() + u64::from(offset & 0xFF0)) as *const u32).read_volatile() },
            None => 0,
        }
    }

    /// Writes the 32-bit register at `offset` of the virtual-APIC page (ignored without a
    /// TPR shadow).
    pub fn virtual_apic_write(&mut self, offset: u32, value: u32) {
        if let Some(page) = self.virtual_apic {
            // SAFETY: as in `virtual_apic_read`; the page belongs to this vCPU only.
            unsafe { ((page.as_u64() + u64::from(offset & 0xFF0)) as *mut u32).write_volatile(value) };
        }
    }

    /// Sets the TPR threshold (bits 3:0, SDM Vol. 3 §25.6.8): lowering the virtual TPR's
    /// class below it exits (TPR below threshold, trap-like). A VMWRITE only when it
    /// changes; ignored without a TPR shadow.
    pub fn set_tpr_threshold(&mut self, threshold: u8) -> Result<(), VcpuError> {
        let threshold = threshold & 0xF;
        if self.virtual_apic.is_some() && threshold != self.tpr_threshold {
            // SAFETY: the caller keeps the threshold at or below VTPR[7:4], the VM-entry
            // check of SDM Vol. 3 §26.2.1.1 without virtual-interrupt delivery.
            unsafe { vmcs::write(F::TPR_THRESHOLD, u64::from(threshold))? };
            self.tpr_threshold = threshold;
        }
        Ok(())
    }

    /// Returns guest CR0, CR3 and the CS base, which a fetch of the instruction at RIP needs.
    pub fn code_context(&self) -> Result<(u64, u64, u64), VcpuError> {
        Ok((vmcs::read(F::GUEST_CR0)?, vmcs::read(F::GUEST_CR3)?, vmcs::read(F::GUEST_CS_BASE)?))
    }

    /// Returns the guest register with instruction encoding `n` (RSP from the VMCS).
    pub fn gpr(&self, n: u8) -> Result<u64, VcpuError> {
        Ok(match n & 0xF {
            4 => vmcs::read(F::GUEST_RSP)?,
            n => {
                let mut regs = self.regs;
                *regs.by_encoding(n)
            }
        })
    }

    /// Writes the guest register with instruction encoding `n` (RSP in the VMCS).
    pub fn set_gpr(&mut self, n: u8, value: u64) -> Result<(), VcpuError> {
        match n & 0xF {
            // SAFETY: only the guest's RSP changes.
            4 => unsafe { vmcs::write(F::GUEST_RSP, value)? },
            n => *self.regs.by_encoding(n) = value,
        }
        Ok(())
    }

    /// Tells whether the guest's CR8 lives in the virtual-APIC page (TPR shadow) rather
    /// than being emulated at CR8 exits.
    pub fn has_tpr_shadow(&self) -> bool {
        self.virtual_apic.is_some()
    }

    /// Emulates `mov cr8, reg` (`to_cr8`) or `mov reg, cr8` for general-purpose register
    /// `gpr` (its encoding, SDM Vol. 3 Table 28-3) where CR8 accesses exit; CR8 holds the
    /// task priority in bits 3:0 and the physical TPR is never touched.
    pub fn emulate_cr8(&mut self, to_cr8: bool, gpr: u8) -> Result<(), VcpuError> {
        if to_cr8 {
            let value = match gpr {
                4 => vmcs::read(F::GUEST_RSP)?,
                n => *self.regs.by_encoding(n),
            };
            // Bits 63:4 are reserved: a write that sets one faults (SDM Vol. 3 §2.5).
            if value >> 4 != 0 {
                return self.inject_exception(13, Some(0));
            }
            self.cr8 = value as u8;
        } else {
            let value = u64::from(self.cr8);
            match gpr {
                // SAFETY: only the guest's RSP changes.
                4 => unsafe { vmcs::write(F::GUEST_RSP, value)? },
                n => *self.regs.by_encoding(n) = value,
            }
        }
        self.skip_instruction()
    }
}

fn vmcs_msr_field(which: VmcsMsr) -> F {
    match which {
        VmcsMsr::Efer => F::GUEST_IA32_EFER,
        VmcsMsr::FsBase => F::GUEST_FS_BASE,
        VmcsMsr::GsBase => F::GUEST_GS_BASE,
        VmcsMsr::SysenterCs => F::GUEST_SYSENTER_CS,
        VmcsMsr::SysenterEsp => F::GUEST_SYSENTER_ESP,
        VmcsMsr::SysenterEip => F::GUEST_SYSENTER_EIP,
        VmcsMsr::Pat => F::GUEST_IA32_PAT,
        VmcsMsr::DebugCtl => F::GUEST_IA32_DEBUGCTL,
    }
}

/// The control capability MSRs for (pin, primary, exit, entry): the TRUE ones where the
/// CPU has them (SDM Vol. 3 Appendix A.3).
fn control_msrs(caps: &VmxCaps) -> (u32, u32, u32, u32) {
    if caps.true_controls {
        (0x48D, 0x48E, 0x48F, 0x490)
    } else {
        (0x481, 0x482, 0x483, 0x484)
    }
}

impl GuestRegs {
    /// Returns the register with instruction encoding `n` (0 RAX, 1 RCX, 2 RDX, 3 RBX,
    /// 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15; RSP, 4, lives in the VMCS and maps to RAX here,
    /// callers handle it first).
    fn by_encoding(&mut self, n: u8) -> &mut u64 {
        match n & 0xF {
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => &mut self.rax,
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // SAFETY: the VMCS is ours; clearing makes it inactive before the frame is freed.
        if unsafe { vmcs::clear(self.vmcs.as_u64()) }.is_ok() {
            memory::free_frame(self.vmcs);
            // The virtual-APIC page is referenced only by this (now inactive) VMCS.
            if let Some(page) = self.virtual_apic.take() {
                memory::free_frame(page);
            }
            if let Some(page) = self.apic_access.take() {
                memory::free_frame(page);
            }
        }
    }
}

/// Zeroes the VMX-preemption timer of the current VMCS, so its next VM entry exits before
/// any guest instruction runs (SDM Vol. 3 §26.7.4); the slice loop re-arms it.
pub fn expire_current_slice() {
    // SAFETY: the timer value only bounds how long the guest runs; without a current VMCS
    // the write fails and is ignored.
    let _ = unsafe { vmcs::write(F::GUEST_PREEMPTION_TIMER, 0) };
}
