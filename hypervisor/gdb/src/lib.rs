//! The guest debugger's protocol side: a [`gdbstub`] target over one stopped guest,
//! driven a byte at a time (gdbstub's state machine) so the hypervisor can poll its serial
//! port from the scheduler loop while the guest's neighbours run.
//!
//! The hypervisor owns the hardware half (`hypervisor/src/gdb.rs`): the COM2 port, the
//! VMCS and the vCPU. It hands this crate a [`Snapshot`] of the guest's registers when the
//! guest stops, a [`GuestMemory`] over the guest's memory (its EPT's backing, so the
//! debugger reaches nothing else), and each byte that arrives; it gets back [`Event`]s
//! (resume, step, interrupt, detach) and, at a resume, the registers the debugger changed.
//!
//! Addresses from gdb are the guest program's virtual addresses: they go through the
//! guest's own page tables ([`nk_paging::guest_walk`]) when it has paging on.
//! Breakpoints are INT3 bytes patched into guest memory (at most [`MAX_BREAKPOINTS`]);
//! reads show the original bytes. Nothing here panics on any input: a packet gdbstub
//! cannot handle ends the session (the guest runs on, detached) and a new connection
//! starts a new one (checked with proptest over random byte streams).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

use gdbstub::common::Signal;
use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{GdbStubBuilder, SingleThreadStopReason};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep, SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use nk_paging::guest_walk::{self, GuestPaging};

pub use gdbstub::conn::Connection as GdbConnection;

/// The most software breakpoints one session holds (each is a patched byte to undo).
pub const MAX_BREAKPOINTS: usize = 64;
/// The packet buffer: enough for gdb's largest register packet (`g`, 560 hex digits
/// for x86-64 with SSE) and memory reads it splits to fit (it asks `PacketSize`).
const PACKET_BUFFER: usize = 4096;
const INT3: u8 = 0xCC;
/// RFLAGS.TF (SDM Vol. 1 §3.4.3.3).
pub const RFLAGS_TF: u64 = 1 << 8;

/// The guest-physical memory the debugger may touch: the guest's own, nothing else.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `gpa`; false (and nothing read) outside the guest's memory.
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `gpa`; false (and nothing written) outside the guest's memory.
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool;
}

/// A stopped guest's registers as gdb sees them (gdb's x86-64 order for the 16 GPRs:
/// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15), and its paging state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// CS, SS, DS, ES, FS, GS selectors (read-only here: a write is ignored).
    pub segments: [u16; 6],
    pub fs_base: u64,
    pub gs_base: u64,
    pub paging: GuestPaging,
}

/// How the debugger lets the guest go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Continue,
    /// One instruction, then stop (the hypervisor sets RFLAGS.TF and hides it).
    Step,
}

/// Why the guest stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It reached one of the debugger's breakpoints (RIP at the INT3).
    Breakpoint,
    /// A single step finished.
    Step,
    /// The debugger interrupted it (Ctrl-C).
    Interrupted,
    /// An INT3 of the guest's own (SIGTRAP).
    Trap,
}

/// What the hypervisor must do after a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing changes: the guest stays as it is.
    None,
    /// The guest runs (or steps); its changed registers are in [`Session::take_changes`].
    Resume(Resume),
    /// The running guest must stop: call [`Session::stopped`] with
    /// [`StopReason::Interrupted`] once it did.
    Interrupt,
    /// The debugger left (or the session broke): the guest runs free, breakpoints removed.
    Detached,
}

#[derive(Debug, Clone, Copy)]
struct Breakpoint {
    addr: u64,
    gpa: u64,
    original: u8,
}

/// The gdbstub target: the snapshot, the memory and the breakpoints.
#[derive(Debug)]
pub struct Debuggee<M> {
    memory: M,
    snapshot: Snapshot,
    changed: bool,
    breakpoints: Vec<Breakpoint>,
    resume: Option<Resume>,
}

impl<M: GuestMemory> Debuggee<M> {
    fn translate(&mut self, gva: u64) -> Option<u64> {
        let memory = &mut self.memory;
        guest_walk::translate(self.snapshot.paging, gva, |gpa| {
            let mut entry = [0u8; 8];
            memory.read(gpa, &mut entry).then(|| u64::from_le_bytes(entry))
        })
        .ok()
    }

    /// Reads one byte at a guest-virtual address, as the guest program sees it (not the
    /// INT3 of a breakpoint).
    fn read_byte(&mut self, addr: u64) -> Option<u8> {
        if let Some(bp) = self.breakpoints.iter().find(|bp| bp.addr == addr) {
            return Some(bp.original);
        }
        let gpa = self.translate(addr)?;
        let mut byte = [0u8];
        self.memory.read(gpa, &mut byte).then_some(byte[0])
    }

    fn write_byte(&mut self, addr: u64, value: u8) -> bool {
        if let Some(bp) = self.breakpoints.iter_mut().find(|bp| bp.addr == addr) {
            bp.original = value;
            return true;
        }
        match self.translate(addr) {
            Some(gpa) => self.memory.write(gpa, &[value]),
            None => false,
        }
    }

    /// Puts every original byte back (at a detach).
    fn remove_all_breakpoints(&mut self) {
        for bp in core::mem::take(&mut self.breakpoints) {
            self.memory.write(bp.gpa, &[bp.original]);
        }
    }
}

impl<M: GuestMemory> Target for Debuggee<M> {
    type Arch = X86_64_SSE;
    type Error = ();

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory> SingleThreadBase for Debuggee<M> {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        let s = &self.snapshot;
        regs.regs = s.gprs;
        regs.rip = s.rip;
        regs.eflags = s.rflags as u32;
        regs.segments.cs = u32::from(s.segments[0]);
        regs.segments.ss = u32::from(s.segments[1]);
        regs.segments.ds = u32::from(s.segments[2]);
        regs.segments.es = u32::from(s.segments[3]);
        regs.segments.fs = u32::from(s.segments[4]);
        regs.segments.gs = u32::from(s.segments[5]);
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
        let s = &mut self.snapshot;
        s.gprs = regs.regs;
        s.rip = regs.rip;
        // The upper half of RFLAGS is reserved (zero); gdb's eflags is 32 bits.
        s.rflags = u64::from(regs.eflags);
        self.changed = true;
        Ok(())
    }

    fn read_addrs(&mut self, start_addr: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        for (i, slot) in data.iter_mut().enumerate() {
            match self.read_byte(start_addr.wrapping_add(i as u64)) {
                Some(byte) => *slot = byte,
                None if i == 0 => return Err(TargetError::Errno(14)),
                None => return Ok(i),
            }
        }
        Ok(data.len())
    }

    fn write_addrs(&mut self, start_addr: u64, data: &[u8]) -> TargetResult<(), Self> {
        for (i, byte) in data.iter().enumerate() {
            if !self.write_byte(start_addr.wrapping_add(i as u64), *byte) {
                return Err(TargetError::Errno(14));
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory> SingleThreadResume for Debuggee<M> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory> SingleThreadSingleStep for Debuggee<M> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl<M: GuestMemory> Breakpoints for Debuggee<M> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory> SwBreakpoint for Debuggee<M> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.iter().any(|bp| bp.addr == addr) {
            return Ok(true);
        }
        if self.breakpoints.len() >= MAX_BREAKPOINTS {
            return Ok(false);
        }
        let gpa = self.translate(addr).ok_or(TargetError::Errno(14))?;
        let mut original = [0u8];
        if !self.memory.read(gpa, &mut original) || !self.memory.write(gpa, &[INT3]) {
            return Err(TargetError::Errno(14));
        }
        self.breakpoints.push(Breakpoint { addr, gpa, original: original[0] });
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(index) = self.breakpoints.iter().position(|bp| bp.addr == addr) else { return Ok(false) };
        let bp = self.breakpoints.swap_remove(index);
        Ok(self.memory.write(bp.gpa, &[bp.original]))
    }
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The guest is stopped; the debugger talks to it.
    Stopped,
    /// The guest runs (or steps) until a stop.
    Running,
    /// No debugger: the guest runs free. A byte that arrives asks for a new session.
    Detached,
}

type Machine<M, C> = GdbStubStateMachine<'static, Debuggee<M>, C>;

/// One guest's debugging session over a connection `C` (cloned to start a new session
/// after a detach or a broken packet).
pub struct Session<M: GuestMemory, C: Connection + Clone> {
    machine: Option<Machine<M, C>>,
    target: Debuggee<M>,
    connection: C,
    state: State,
    /// The first byte of a new connection, kept until the guest stopped for it.
    pending: Option<u8>,
    /// Why the last session ended, for the hypervisor's log.
    last_error: Option<&'static str>,
}

impl<M: GuestMemory, C: Connection + Clone> core::fmt::Debug for Session<M, C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session").field("state", &self.state).finish_non_exhaustive()
    }
}

impl<M: GuestMemory, C: Connection + Clone> Session<M, C> {
    /// Starts a session with the guest stopped in `snapshot` (before its first
    /// instruction), waiting for the debugger.
    pub fn new(memory: M, connection: C, snapshot: Snapshot) -> Self {
        let target = Debuggee { memory, snapshot, changed: false, breakpoints: Vec::new(), resume: None };
        let mut session =
            Session { machine: None, target, connection, state: State::Stopped, pending: None, last_error: None };
        session.machine = session.fresh_machine();
        if session.machine.is_none() {
            session.state = State::Detached;
        }
        session
    }

    fn fresh_machine(&mut self) -> Option<Machine<M, C>> {
        let stub = GdbStubBuilder::new(self.connection.clone()).packet_buffer_size(PACKET_BUFFER).build().ok()?;
        stub.run_state_machine(&mut self.target).ok()
    }

    /// Returns where the session stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// Returns why the last session broke (a packet gdbstub refused), once.
    pub fn take_error(&mut self) -> Option<&'static str> {
        self.last_error.take()
    }

    /// Returns the registers the debugger changed while the guest was stopped, once.
    pub fn take_changes(&mut self) -> Option<&Snapshot> {
        core::mem::take(&mut self.target.changed).then_some(&self.target.snapshot)
    }

    /// Returns whether `rip` holds one of the debugger's breakpoints.
    pub fn is_breakpoint(&self, rip: u64) -> bool {
        self.target.breakpoints.iter().any(|bp| bp.addr == rip)
    }

    /// Returns the snapshot the debugger sees.
    pub fn snapshot(&self) -> &Snapshot {
        &self.target.snapshot
    }

    /// Ends the session for a broken packet: the guest runs free.
    fn broken(&mut self, why: &'static str) -> Event {
        self.last_error = Some(why);
        self.detach()
    }

    fn detach(&mut self) -> Event {
        self.machine = None;
        self.target.remove_all_breakpoints();
        self.target.resume = None;
        self.state = State::Detached;
        Event::Detached
    }

    /// Hands the stub one byte from the debugger.
    pub fn receive(&mut self, byte: u8) -> Event {
        if self.state == State::Detached {
            if self.pending.is_none() {
                self.pending = Some(byte);
                return Event::Interrupt;
            }
            // The guest has not stopped yet for the first byte: later ones wait in the
            // UART (the caller stops reading), so this is a caller's slip; drop it.
            return Event::None;
        }
        let Some(machine) = self.machine.take() else { return self.broken("no state machine") };
        let next = match machine {
            GdbStubStateMachine::Idle(inner) => inner.incoming_data(&mut self.target, byte),
            GdbStubStateMachine::Running(inner) => inner.incoming_data(&mut self.target, byte),
            GdbStubStateMachine::CtrlCInterrupt(inner) => {
                // Only while stopped (a running guest's Ctrl-C waits for `stopped`).
                inner.interrupt_handled(&mut self.target, None::<SingleThreadStopReason<u64>>)
            }
            GdbStubStateMachine::Disconnected(_) => return self.detach(),
        };
        let machine = match next {
            Ok(machine) => machine,
            Err(_) => return self.broken("a packet the stub could not handle"),
        };
        self.settle(machine)
    }

    /// Files the state machine after a step and says what the hypervisor must do.
    fn settle(&mut self, machine: Machine<M, C>) -> Event {
        match machine {
            GdbStubStateMachine::Idle(_) => {
                self.machine = Some(machine);
                Event::None
            }
            GdbStubStateMachine::Running(_) => {
                self.machine = Some(machine);
                if self.state == State::Running {
                    return Event::None;
                }
                self.state = State::Running;
                Event::Resume(self.target.resume.take().unwrap_or(Resume::Continue))
            }
            GdbStubStateMachine::CtrlCInterrupt(inner) => {
                if self.state == State::Running {
                    self.machine = Some(GdbStubStateMachine::CtrlCInterrupt(inner));
                    return Event::Interrupt;
                }
                // Ctrl-C while stopped: gdb gets its stop reply at once.
                let reason = SingleThreadStopReason::Signal(Signal::SIGINT);
                match inner.interrupt_handled(&mut self.target, Some(reason)) {
                    Ok(machine) => self.settle(machine),
                    Err(_) => self.broken("the stop reply could not be sent"),
                }
            }
            GdbStubStateMachine::Disconnected(_) => self.detach(),
        }
    }

    /// Tells the debugger the guest stopped (after a resume, a step or an [`Event::Interrupt`]),
    /// with its registers now. After a detach, starts the new session the pending byte
    /// asked for.
    pub fn stopped(&mut self, snapshot: Snapshot, reason: StopReason) -> Event {
        self.target.snapshot = snapshot;
        self.target.changed = false;
        match self.state {
            State::Stopped => Event::None,
            // A stop nobody asked for (a step that ran when the session broke): the
            // guest stays free.
            State::Detached if self.pending.is_none() => Event::None,
            State::Detached => {
                self.machine = self.fresh_machine();
                if self.machine.is_none() {
                    self.pending = None;
                    return self.broken("no state machine");
                }
                self.state = State::Stopped;
                let byte = self.pending.take().unwrap_or(b'+');
                self.receive(byte)
            }
            State::Running => {
                self.state = State::Stopped;
                let stop = match reason {
                    StopReason::Breakpoint => SingleThreadStopReason::SwBreak(()),
                    StopReason::Step => SingleThreadStopReason::DoneStep,
                    StopReason::Interrupted => SingleThreadStopReason::Signal(Signal::SIGINT),
                    StopReason::Trap => SingleThreadStopReason::Signal(Signal::SIGTRAP),
                };
                let result = match self.machine.take() {
                    Some(GdbStubStateMachine::Running(inner)) => inner.report_stop(&mut self.target, stop),
                    Some(GdbStubStateMachine::CtrlCInterrupt(inner)) => {
                        inner.interrupt_handled(&mut self.target, Some(stop))
                    }
                    Some(machine) => Ok(machine),
                    None => return self.broken("no state machine"),
                };
                match result {
                    Ok(machine) => self.settle(machine),
                    Err(_) => self.broken("the stop reply could not be sent"),
                }
            }
        }
    }

    /// Tells the debugger the guest ended (`W` packet with `code`); the session is over.
    pub fn exited(&mut self, code: u8) {
        if let Some(GdbStubStateMachine::Running(inner)) = self.machine.take() {
            let _ = inner.report_stop(&mut self.target, SingleThreadStopReason::Exited(code));
        }
        self.machine = None;
        self.target.breakpoints.clear();
        self.state = State::Detached;
    }
}

#[cfg(test)]
mod tests;
