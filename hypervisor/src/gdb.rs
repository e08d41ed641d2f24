//! The guest debugger's hardware half (docs/gdb.md): the COM2 UART (0x2F8, polled, no
//! interrupts), the debugged guest's VMCS (registers, the exception bitmap, RFLAGS.TF) and
//! its memory; the protocol is `nk-gdb`'s, over `gdbstub`.
//!
//! One guest at a time is debugged: the first whose module line says `gdb`. It starts
//! stopped before its first instruction. The scheduler asks [`may_run`] before each of its
//! slices: that polls COM2, hands the bytes to the session and says whether the guest
//! runs; a stopped guest is skipped, so the other guests on its CPU keep their slices.
//! Breakpoints are INT3 bytes (`#BP` exits, exception bitmap bit 3, SDM Vol. 3 §26.2);
//! a single step sets RFLAGS.TF for one instruction and takes the `#DB` exit (bit 1): Bochs
//! has no monitor trap flag. The TF is the debugger's: it is cleared again at the `#DB`
//! exit, and the guest's own TF kept. Not hidden: a PUSHF in the stepped instruction
//! saves TF = 1, and a step over an instruction the hypervisor emulates (VMCALL, CPUID,
//! port I/O) stops one instruction later.
//!
//! Nothing here costs a guest that is not debugged anything: the hooks are one flag test
//! per slice and one in the (out-of-line) exception exit.

use alloc::string::String;

use nk_caps::VmId;
use nk_gdb::{Event, GdbConnection, GuestMemory, Resume, Session, Snapshot, State, StopReason, RFLAGS_TF};
use nk_paging::guest_walk::GuestPaging;
use spin::Mutex;

use crate::arch::port::{inb, outb};
use crate::guest::Guest;
use crate::vmx::vcpu::{Vcpu, VcpuError};
use crate::vmx::vmcs::{self, VmcsField as F};

const COM2: u16 = 0x2F8;
/// Line status: data ready (bit 0), transmitter holding register empty (bit 5).
const LSR_DATA_READY: u8 = 1;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// How long a byte waits for the transmitter before it is dropped (a missing UART).
const TRANSMIT_SPINS: u32 = 100_000;
/// The most bytes one poll takes, so the CPU's other guests are not starved.
const BYTES_PER_POLL: usize = 8192;
const DB_VECTOR: u32 = 1;
const BP_VECTOR: u32 = 3;
const EXCEPTION_BITS: u64 = (1 << DB_VECTOR) | (1 << BP_VECTOR);

/// COM2 as gdbstub's connection: a byte out, polled.
#[derive(Debug, Clone, Copy)]
struct Com2;

impl GdbConnection for Com2 {
    type Error = ();

    fn write(&mut self, byte: u8) -> Result<(), ()> {
        for _ in 0..TRANSMIT_SPINS {
            if inb(COM2 + 5) & LSR_THR_EMPTY != 0 {
                outb(COM2, byte);
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(())
    }

    fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

/// Sets COM2 up: 115200 baud 8N1, no FIFO (Bochs then takes a byte from its socket only
/// once the last was read, so none is lost), no interrupts. Returns false if no UART
/// answers (its scratch register does not keep a value; an absent port reads 0xFF, which
/// would look like an endless stream of bytes).
fn init_uart() -> bool {
    outb(COM2 + 7, 0x5A);
    if inb(COM2 + 7) != 0x5A {
        return false;
    }
    outb(COM2 + 1, 0x00);
    outb(COM2 + 3, 0x80);
    outb(COM2, 0x01);
    outb(COM2 + 1, 0x00);
    outb(COM2 + 3, 0x03);
    outb(COM2 + 2, 0x00);
    outb(COM2 + 4, 0x03);
    true
}

/// The debugged guest's memory: the frames its EPT maps (guest-physical 0 up to its size),
/// identity-mapped in the host.
#[derive(Debug, Clone, Copy)]
struct GuestRam {
    base: u64,
    size: u64,
}

impl GuestRam {
    fn host_address(&self, gpa: u64, len: usize) -> Option<u64> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.size).then_some(self.base + gpa)
    }
}

impl GuestMemory for GuestRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(host) = self.host_address(gpa, buf.len()) else { return false };
        // SAFETY: the range lies inside the guest's frames (checked above), which stay
        // allocated while the debugger holds them (`ended` drops it before the guest's
        // memory is freed); the guest is stopped on this CPU.
        unsafe { core::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(host) = self.host_address(gpa, data.len()) else { return false };
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), host as *mut u8, data.len()) };
        true
    }
}

struct Debugger {
    vm: VmId,
    label: String,
    session: Session<GuestRam, Com2>,
    /// While a step runs: the guest's own RFLAGS.TF, put back at the `#DB` exit.
    stepping: Option<bool>,
    /// A stop the guest reached during its slice, reported at the next poll.
    stop: Option<StopReason>,
}

static DEBUGGER: Mutex<Option<Debugger>> = Mutex::new(None);

/// Makes `vm` the debugged guest (its vCPU's VMCS current): sets COM2 up and intercepts
/// `#DB` and `#BP`. Returns false, with a log line, if another guest is already debugged.
pub fn attach(vm: VmId, label: &str, vcpu: &mut Vcpu, memory: (u64, u64)) -> Result<bool, VcpuError> {
    let mut debugger = DEBUGGER.lock();
    if let Some(other) = debugger.as_ref() {
        log::warn!(target: "gdb", "{label}: not debugged: {} already is (one guest at a time)", other.label);
        return Ok(false);
    }
    if !init_uart() {
        log::warn!(target: "gdb", "{label}: not debugged: no UART at COM2 (Bochs: com2 as a socket, see docs/gdb.md)");
        return Ok(false);
    }
    vcpu.activate()?;
    let bitmap = vmcs::read(F::EXCEPTION_BITMAP)?;
    // SAFETY: intercepting more exceptions only adds VM exits the handler expects.
    unsafe { vmcs::write(F::EXCEPTION_BITMAP, bitmap | EXCEPTION_BITS)? };
    let snapshot = snapshot(vcpu)?;
    let ram = GuestRam { base: memory.0, size: memory.1 };
    *debugger = Some(Debugger {
        vm,
        label: String::from(label),
        session: Session::new(ram, Com2, snapshot),
        stepping: None,
        stop: None,
    });
    log::info!(target: "gdb", "{label}: stopped before its first instruction, waiting for gdb on COM2");
    Ok(true)
}

/// What an exception exit of the debugged guest leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Trapped {
    /// The guest stopped for the debugger: its slice ends.
    Stop,
    /// The exception went back to the guest (its own `#DB`): it goes on.
    Reflected,
    /// Not the debugger's exception.
    Other,
}

/// Handles an exception exit of the debugged guest `vm` (its VMCS current).
pub fn exception(vm: VmId, vcpu: &mut Vcpu) -> Result<Trapped, VcpuError> {
    let mut guard = DEBUGGER.lock();
    let Some(debugger) = guard.as_mut().filter(|d| d.vm == vm) else { return Ok(Trapped::Other) };
    let info = vcpu.exit_interruption_info()?;
    match info & 0xFF {
        BP_VECTOR => {
            // A step that ran into an INT3 ends here too.
            end_step(debugger)?;
            let rip = vcpu.rip()?;
            if debugger.session.is_breakpoint(rip) && debugger.session.state() == State::Running {
                debugger.stop = Some(StopReason::Breakpoint);
            } else {
                // The guest's own INT3 (or a breakpoint after a detach): past it, as a
                // CPU would leave it, and the debugger (if any) sees SIGTRAP.
                vcpu.skip_instruction()?;
                if debugger.session.state() == State::Detached {
                    vcpu.inject_exception(BP_VECTOR as u8, None)?;
                    return Ok(Trapped::Reflected);
                }
                debugger.stop = Some(StopReason::Trap);
            }
            Ok(Trapped::Stop)
        }
        DB_VECTOR => match end_step(debugger)? {
            true => {
                debugger.stop = Some(StopReason::Step);
                Ok(Trapped::Stop)
            }
            false => {
                vcpu.inject_exception(DB_VECTOR as u8, None)?;
                Ok(Trapped::Reflected)
            }
        },
        _ => Ok(Trapped::Other),
    }
}

/// Ends a step, if one runs: RFLAGS.TF goes back to the guest's own value (the VMCS
/// current). Returns whether a step ran.
fn end_step(debugger: &mut Debugger) -> Result<bool, VcpuError> {
    let Some(own_tf) = debugger.stepping.take() else { return Ok(false) };
    let rflags = vmcs::read(F::GUEST_RFLAGS)?;
    let rflags = if own_tf { rflags | RFLAGS_TF } else { rflags & !RFLAGS_TF };
    // SAFETY: only TF changes, back to the guest's own value.
    unsafe { vmcs::write(F::GUEST_RFLAGS, rflags)? };
    Ok(true)
}

/// Polls the debugger for `guest` before its slice; returns whether it may run.
pub fn may_run(guest: &mut Guest) -> bool {
    let vm = guest.vm();
    let mut guard = DEBUGGER.lock();
    let Some(debugger) = guard.as_mut().filter(|d| d.vm == vm) else { return true };
    let Some(vcpu) = guest.debug_vcpu() else { return true };
    match poll(debugger, vcpu) {
        Ok(state) => state != State::Stopped,
        Err(e) => {
            log::warn!(target: "gdb", "{}: debugger detached: {e}", debugger.label);
            *guard = None;
            true
        }
    }
}

fn poll(debugger: &mut Debugger, vcpu: &mut Vcpu) -> Result<State, VcpuError> {
    vcpu.activate()?;
    if let Some(reason) = debugger.stop.take() {
        let event = debugger.session.stopped(snapshot(vcpu)?, reason);
        act(debugger, vcpu, event)?;
    }
    for _ in 0..BYTES_PER_POLL {
        if inb(COM2 + 5) & LSR_DATA_READY == 0 {
            break;
        }
        let event = debugger.session.receive(inb(COM2));
        act(debugger, vcpu, event)?;
    }
    Ok(debugger.session.state())
}

/// Carries out what the session asked for.
fn act(debugger: &mut Debugger, vcpu: &mut Vcpu, mut event: Event) -> Result<(), VcpuError> {
    // An interrupt's stop may start a new session whose first packet asks to resume: a
    // short chain, at most three events.
    for _ in 0..3 {
        event = match event {
            Event::None => return Ok(()),
            Event::Resume(how) => {
                if let Some(changed) = debugger.session.take_changes() {
                    restore(vcpu, changed)?;
                }
                if how == Resume::Step {
                    let rflags = vmcs::read(F::GUEST_RFLAGS)?;
                    debugger.stepping = Some(rflags & RFLAGS_TF != 0);
                    // SAFETY: TF only makes the guest take #DB after one instruction,
                    // which exits (exception bitmap bit 1).
                    unsafe { vmcs::write(F::GUEST_RFLAGS, rflags | RFLAGS_TF)? };
                }
                return Ok(());
            }
            Event::Interrupt => {
                // The guest is between slices: it stops where it is (a step it was in
                // ends).
                end_step(debugger)?;
                debugger.session.stopped(snapshot(vcpu)?, StopReason::Interrupted)
            }
            Event::Detached => {
                end_step(debugger)?;
                if let Some(why) = debugger.session.take_error() {
                    log::warn!(target: "gdb", "{}: gdb session ended: {why}; the guest runs on", debugger.label);
                } else {
                    log::info!(target: "gdb", "{}: gdb detached; the guest runs on", debugger.label);
                }
                return Ok(());
            }
        };
    }
    Ok(())
}

/// Reads the guest's registers (its VMCS current).
fn snapshot(vcpu: &Vcpu) -> Result<Snapshot, VcpuError> {
    let r = &vcpu.regs;
    let read = |field| vmcs::read(field).map_err(VcpuError::from);
    let selector = |field| read(field).map(|v| v as u16);
    Ok(Snapshot {
        gprs: [
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            read(F::GUEST_RSP)?,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
        ],
        rip: read(F::GUEST_RIP)?,
        rflags: read(F::GUEST_RFLAGS)?,
        segments: [
            selector(F::GUEST_CS_SELECTOR)?,
            selector(F::GUEST_SS_SELECTOR)?,
            selector(F::GUEST_DS_SELECTOR)?,
            selector(F::GUEST_ES_SELECTOR)?,
            selector(F::GUEST_FS_SELECTOR)?,
            selector(F::GUEST_GS_SELECTOR)?,
        ],
        fs_base: read(F::GUEST_FS_BASE)?,
        gs_base: read(F::GUEST_GS_BASE)?,
        paging: GuestPaging {
            cr0: read(F::GUEST_CR0)?,
            cr3: read(F::GUEST_CR3)?,
            cr4: read(F::GUEST_CR4)?,
            efer: read(F::GUEST_IA32_EFER)?,
        },
    })
}

/// Writes the registers the debugger changed back (its VMCS current). RFLAGS keeps its
/// reserved bits (bit 1 set; VM entry checks it, SDM Vol. 3 §27.3.1.4) and VM and RF are
/// the guest's own; RIP is taken as it is (a non-canonical one fails the entry, which stops
/// the guest with a log line).
fn restore(vcpu: &mut Vcpu, s: &Snapshot) -> Result<(), VcpuError> {
    let g = &s.gprs;
    let r = &mut vcpu.regs;
    (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6]);
    (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
    const WRITABLE: u64 = 0x0024_0FD5; // CF PF AF ZF SF TF IF DF OF AC ID
    let old = vmcs::read(F::GUEST_RFLAGS)?;
    let rflags = (old & !WRITABLE) | (s.rflags & WRITABLE) | 0x2;
    // SAFETY: guest state only; the guest's own registers, with RFLAGS's reserved bits
    // kept as VM entry requires.
    unsafe {
        vmcs::write(F::GUEST_RSP, g[7])?;
        vmcs::write(F::GUEST_RIP, s.rip)?;
        vmcs::write(F::GUEST_RFLAGS, rflags)?;
    }
    Ok(())
}

/// Tells gdb that `vm` ended (a `W` reply: status 0 if it halted, 1 if the hypervisor
/// stopped or destroyed it) and lets go of it, before its memory is freed.
pub fn ended(vm: VmId, clean: bool) {
    let mut guard = DEBUGGER.lock();
    if let Some(debugger) = guard.as_mut().filter(|d| d.vm == vm) {
        debugger.session.exited(u8::from(!clean));
        log::info!(target: "gdb", "{}: ended; the debugger let go of it", debugger.label);
        *guard = None;
    }
}
