//! Guests: bare-metal 64-bit ELF images (Multiboot2 modules) run as VMs, each in its own
//! EPT over memory from the hypervisor's frames, and the handling of every VM exit.
//!
//! Guest-physical layout: page tables at 0x1000-0x3FFF (an identity map of the first GiB
//! with 2 MiB user-accessible pages, so addresses past the guest's memory reach the EPT and
//! fault there), the image at 1 MiB or above, the stack at the top of guest memory.
//!
//! A guest that misbehaves (touches memory or ports it was not given, triple-faults, or
//! causes an exit the hypervisor does not handle) is stopped and reported; the hypervisor
//! and other guests go on.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use nk_abi::{Call, NameWords, Reply};
use nk_caps::VmId;
use nk_core::{Dispatched, PendingOp};
use nk_paging::{EptBuilder, EptPerms};

use crate::arch::xsave::{self, ExtendedState};
use crate::ioports::{self, IoBitmaps};
use crate::memory::{self, HostPhysAddr, PAGE_SIZE};
use crate::vmx;
use crate::vmx::ept::FrameTables;
use crate::vmx::vcpu::{Exit, GuestRegs, GuestStart, Vcpu, VcpuError};
use crate::vmx::vmcs::ExitReason;

/// Guest memory when the module's command line names none.
pub const DEFAULT_GUEST_MEMORY: u64 = 4 << 20;
/// The most memory a guest gets.
pub const MAX_GUEST_MEMORY: u64 = 1 << 30;
const PAGE_TABLES_GPA: u64 = 0x1000;
/// Where the guest finds the words after `--` on its module command line.
const ARGS_GPA: u64 = 0x4000;
const ARGS_MAX: usize = 256;
const IMAGE_MIN_GPA: u64 = 0x10_0000;
const CONSOLE_PORT: u16 = 0xE9;
/// VMCALL is `0F 01 C1` in every mode.
const VMCALL_LENGTH: u64 = 3;
const CONSOLE_LINE_MAX: usize = 160;

/// Why a guest could not be created.
#[derive(Debug)]
pub enum GuestError {
    Image(nk_loader::LoadError),
    Memory(&'static str),
    Ept(nk_paging::EptError),
    Vcpu(VcpuError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Image(e) => write!(f, "bad image: {e}"),
            GuestError::Memory(e) => write!(f, "{e}"),
            GuestError::Ept(e) => write!(f, "EPT: {e}"),
            GuestError::Vcpu(e) => write!(f, "vCPU: {e}"),
        }
    }
}

/// How a guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// It halted: a bare-metal guest's way of finishing.
    Halted,
    /// It was stopped for misbehaving.
    Stopped(String),
}

/// Returns the CPL of the guest whose VMCS is current (the one whose VMCALL is being
/// dispatched): the DPL of SS (SDM Vol. 3 §5.5; access-rights bits 6:5, §25.4.1). Says
/// ring 3 if the VMREAD fails, so a failure never grants more. The null-Kernel calls it
/// only for INITIAL and RECEIVED (nk-core, "Who may enumerate").
pub fn guest_ring() -> u8 {
    vmx::vmcs::read(vmx::vmcs::VmcsField::GUEST_SS_ACCESS_RIGHTS).map_or(3, |ar| ((ar >> 5) & 3) as u8)
}

/// Where hypercalls go: the null-Kernel's dispatch for this guest's kernel instance.
pub trait HypercallSink {
    /// Handles one call from `vm`: its reply, or the operation the vCPU waits for.
    fn hypercall(&mut self, vm: VmId, call: &Call) -> Dispatched;

    /// Runs after the host took an interrupt that ended a guest's run (a doorbell, most
    /// likely): the place to receive the protocol's messages.
    fn interrupted(&mut self);
}

/// How a guest's time slice ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    /// The slice ran out; the guest runs again at its next turn.
    Expired,
    /// The guest waits for a capability operation that involves other kernels; it runs
    /// again once [`Guest::resume`] hands it the reply.
    Parked(PendingOp),
    /// The guest ended.
    Ended(GuestEnd),
}

/// What handling one exit leads to.
enum Flow {
    Continue,
    Park(PendingOp),
    End(GuestEnd),
}

/// A VM running a bare-metal guest.
pub struct Guest {
    vm: VmId,
    name: String,
    memory: HostPhysAddr,
    memory_size: u64,
    ept: Option<EptBuilder>,
    vcpu: Option<Vcpu>,
    console: String,
    exits: u64,
    /// None where the CPU has no XSAVE (then only x87/SSE-free guests are safe to share).
    xstate: Option<ExtendedState>,
    io: IoBitmaps,
    /// The reply of a parked hypercall, written to the registers at the next entry.
    reply: Option<Reply>,
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest").field("vm", &self.vm).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Guest {
    /// Loads `image` into fresh guest memory of `memory_size` bytes and prepares its vCPU
    /// on this CPU. Nothing is left allocated on failure.
    pub fn create(vm: VmId, spec: &GuestSpec) -> Result<Self, GuestError> {
        let (name, image, memory_size) = (spec.name.as_str(), spec.image, spec.memory);
        let parsed = nk_loader::parse(image, IMAGE_MIN_GPA, memory_size).map_err(GuestError::Image)?;
        let io = IoBitmaps::new(vm).ok_or(GuestError::Memory("no memory for the I/O bitmaps"))?;
        let xstate = match xsave::supported() {
            true => Some(ExtendedState::new().ok_or(GuestError::Memory("no memory for the XSAVE area"))?),
            false => None,
        };
        let pages = (memory_size / PAGE_SIZE) as usize;
        let memory = memory::alloc_frames(pages).ok_or(GuestError::Memory("not enough free memory for the guest"))?;
        let mut guest = Guest {
            vm,
            name: String::from(name),
            memory,
            memory_size,
            ept: None,
            vcpu: None,
            console: String::new(),
            exits: 0,
            xstate,
            io,
            reply: None,
        };
        // SAFETY: the frames were just allocated for this guest and are identity-mapped.
        unsafe { core::ptr::write_bytes(memory.as_u64() as *mut u8, 0, memory_size as usize) };
        for segment in parsed.segments() {
            let bytes = &image[segment.file_offset..segment.file_offset + segment.file_size];
            guest.write(segment.gpa, bytes);
        }
        let args = &spec.args.as_bytes()[..spec.args.len().min(ARGS_MAX)];
        guest.write(ARGS_GPA, args);
        guest.write_u64(PAGE_TABLES_GPA, (PAGE_TABLES_GPA + 0x1000) | 0x7);
        guest.write_u64(PAGE_TABLES_GPA + 0x1000, (PAGE_TABLES_GPA + 0x2000) | 0x7);
        for i in 0..512u64 {
            guest.write_u64(PAGE_TABLES_GPA + 0x2000 + i * 8, (i << 21) | 0x87);
        }

        let caps = vmx::capabilities();
        let tables = &mut FrameTables;
        let mut ept = EptBuilder::new(tables, caps.ept_2m, caps.ept_1g).map_err(GuestError::Ept)?;
        let mapped = ept.map_range(tables, 0, memory.as_u64(), memory_size, EptPerms::RWX);
        let eptp = ept.eptp(caps.ept_ad);
        guest.ept = Some(ept);
        mapped.map_err(GuestError::Ept)?;
        let start = GuestStart {
            eptp,
            vpid: vm.raw() as u16,
            cr3: PAGE_TABLES_GPA,
            rip: parsed.entry,
            rsp: memory_size,
            io_bitmaps: guest.io.address(),
            msr_bitmap: guest.io.msr_bitmap(),
        };
        let mut vcpu = Vcpu::new(&caps, &start).map_err(GuestError::Vcpu)?;
        vcpu.regs = GuestRegs {
            rdi: u64::from(vm.raw()),
            rsi: memory_size,
            rdx: ARGS_GPA,
            rcx: args.len() as u64,
            ..GuestRegs::default()
        };
        guest.vcpu = Some(vcpu);
        Ok(guest)
    }

    /// Returns the guest's VM id.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Returns how many exits the guest took.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        let end = gpa.checked_add(bytes.len() as u64).expect("guest writes are bounded by the loader");
        assert!(end <= self.memory_size, "guest write past its memory");
        // SAFETY: the range lies in this guest's memory (checked above), which it owns,
        // and the guest is not running.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.memory.as_u64() + gpa) as *mut u8, bytes.len()) };
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }

    /// Returns the guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands a parked guest the reply of the hypercall it waits for; it goes on past its
    /// VMCALL at its next slice.
    pub fn resume(&mut self, reply: Reply) {
        self.reply = Some(reply);
    }

    /// Runs the guest for one time slice of `ticks` TSC ticks, sending its hypercalls to
    /// `sink`. Returns how the slice ended.
    pub fn run_slice(&mut self, sink: &mut dyn HypercallSink, ticks: u64, timer_rate: u8) -> Slice {
        let stopped = |why: String| Slice::Ended(GuestEnd::Stopped(why));
        let Some(vcpu) = self.vcpu.as_mut() else {
            return stopped(String::from("no vCPU"));
        };
        if let Err(e) = vcpu.activate().and_then(|()| vcpu.set_time_slice(ticks, timer_rate)) {
            return stopped(alloc::format!("cannot schedule its vCPU: {e}"));
        }
        if let Some(reply) = self.reply.take() {
            write_reply(&mut vcpu.regs, &reply);
            if let Err(e) = vcpu.skip_bytes(VMCALL_LENGTH) {
                return stopped(alloc::format!("cannot resume after its hypercall: {e}"));
            }
        }
        if let Some(xstate) = &self.xstate {
            xstate.restore();
        }
        // The timer is re-armed with the whole slice at every entry; the TSC bounds the
        // slice of a guest that exits often.
        let slice_start = crate::arch::rdtsc();
        let end = loop {
            if crate::arch::rdtsc().wrapping_sub(slice_start) >= ticks {
                break Slice::Expired;
            }
            let vcpu = self.vcpu.as_mut().expect("checked above");
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) => break stopped(alloc::format!("VM entry failed: {e}")),
            };
            self.exits += 1;
            if exit.reason == ExitReason::PREEMPTION_TIMER {
                break Slice::Expired;
            }
            match self.handle_exit(&exit, sink) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Park(op)) => break Slice::Parked(op),
                Ok(Flow::End(end)) => break Slice::Ended(end),
                Err(e) => break stopped(alloc::format!("exit handling failed: {e}")),
            }
        };
        if let Some(xstate) = &mut self.xstate {
            xstate.save();
            // SAFETY: XCR0_RESET (x87 only) is always valid, and OSXSAVE is on.
            unsafe { xsave::set_xcr0(xsave::XCR0_RESET) };
        }
        end
    }

    /// Handles one exit; says whether the guest goes on, waits, or ended.
    fn handle_exit(&mut self, exit: &Exit, sink: &mut dyn HypercallSink) -> Result<Flow, VcpuError> {
        let vm = self.vm;
        let vcpu = self.vcpu.as_mut().expect("run checked the vCPU");
        let stop = |why: String| Ok(Flow::End(GuestEnd::Stopped(why)));
        match exit.reason {
            ExitReason::VMCALL => {
                let r = &vcpu.regs;
                let call = Call {
                    selector: r.rax,
                    caps: [
                        NameWords { low: r.rbx, high: r.rcx },
                        NameWords { low: r.rdx, high: r.rsi },
                        NameWords { low: r.rdi, high: r.r8 },
                        NameWords { low: r.r9, high: r.r10 },
                    ],
                    args: [r.r11, r.r12, r.r13, r.r14, r.r15],
                };
                match sink.hypercall(vm, &call) {
                    Dispatched::Reply(reply) => {
                        write_reply(&mut vcpu.regs, &reply);
                        vcpu.skip_bytes(VMCALL_LENGTH)?;
                    }
                    // The guest stays at its VMCALL until the reply comes.
                    Dispatched::Pending(op) => return Ok(Flow::Park(op)),
                }
            }
            ExitReason::IO_INSTRUCTION => {
                let q = vcpu.exit_qualification()?;
                let (size, is_in, string, port) = ((q & 7) + 1, q & 8 != 0, q & 16 != 0, (q >> 16) as u16);
                if port == CONSOLE_PORT && size == 1 && !is_in && !string {
                    let byte = vcpu.regs.rax as u8;
                    vcpu.skip_instruction()?;
                    self.console_byte(byte);
                    return Ok(Flow::Continue);
                }
                // A port granted in one direction only exits; the hypervisor performs it.
                let emulated = if string { None } else { ioports::emulate(vm, port, size as u8, is_in, vcpu.regs.rax) };
                let Some(value) = emulated else {
                    return stop(alloc::format!(
                        "touched I/O port {port:#x} ({}, {size} byte(s)) it was not granted",
                        if is_in { "in" } else { "out" }
                    ));
                };
                if is_in {
                    let mask = if size == 4 { 0xFFFF_FFFF } else { (1u64 << (size * 8)) - 1 };
                    // A 32-bit `in` zero-extends into RAX; smaller ones keep the upper bits.
                    vcpu.regs.rax = if size == 4 { value } else { (vcpu.regs.rax & !mask) | (value & mask) };
                }
                vcpu.skip_instruction()?;
            }
            ExitReason::CPUID => {
                let osxsave = vcpu.guest_cr4()? & (1 << 18) != 0;
                emulate_cpuid(&mut vcpu.regs, osxsave);
                vcpu.skip_instruction()?;
            }
            ExitReason::XSETBV => {
                let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xFFFF_FFFF);
                if let (0, true, Some(xstate)) = (vcpu.regs.rcx as u32, xsave::valid_xcr0(value), &mut self.xstate) {
                    xstate.set_guest_xcr0(value);
                    vcpu.skip_instruction()?;
                } else {
                    vcpu.inject_exception(13, Some(0))?;
                }
            }
            ExitReason::CR_ACCESS => {
                // Only CR4.VMXE is owned by the hypervisor (CR4 guest/host mask), so the
                // exit is a MOV to CR4 that sets it: VMX is hidden from guests, so the
                // write faults as on a CPU without VMX (SDM Vol. 3 §2.5).
                let q = vcpu.exit_qualification()?;
                let (cr, access) = (q & 0xF, (q >> 4) & 3);
                if cr != 4 || access != 0 {
                    return stop(alloc::format!("unexpected control-register access (CR{cr}, type {access})"));
                }
                vcpu.inject_exception(13, Some(0))?;
            }
            ExitReason::RDMSR | ExitReason::WRMSR => {
                // MSRs are denied by default: the guest sees #GP(0), as on a CPU without
                // the MSR (grants will come from capabilities).
                vcpu.inject_exception(13, Some(0))?;
            }
            ExitReason::HLT => {
                self.flush_console();
                return Ok(Flow::End(GuestEnd::Halted));
            }
            ExitReason::EPT_VIOLATION => {
                let q = vcpu.exit_qualification()?;
                let access = if q & 4 != 0 {
                    "execute"
                } else if q & 2 != 0 {
                    "write"
                } else {
                    "read"
                };
                let gpa = vcpu.guest_physical()?;
                self.flush_console();
                return stop(alloc::format!("{access} of guest-physical {gpa:#x} outside its memory (EPT violation)"));
            }
            ExitReason::TRIPLE_FAULT => {
                let rip = vcpu.rip().unwrap_or(0);
                self.flush_console();
                return stop(alloc::format!("triple fault (rip {rip:#x})"));
            }
            ExitReason::EXTERNAL_INTERRUPT => {
                // The interrupt is still pending in the local APIC: let the host take it
                // (its handler acknowledges it), then go back to the guest.
                // SAFETY: the host IDT handles every vector the APIC can deliver here.
                unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
                sink.interrupted();
            }
            other => {
                self.flush_console();
                return stop(alloc::format!("unhandled VM exit, reason {}", other.0));
            }
        }
        Ok(Flow::Continue)
    }

    fn console_byte(&mut self, byte: u8) {
        match byte {
            b'\n' => self.flush_console(),
            b'\r' => {}
            _ => {
                let printable = if byte.is_ascii_graphic() || byte == b' ' { byte as char } else { '?' };
                self.console.push(printable);
                if self.console.len() >= CONSOLE_LINE_MAX {
                    self.flush_console();
                }
            }
        }
    }

    fn flush_console(&mut self) {
        if !self.console.is_empty() {
            log::info!(target: "guest", "vm{}/{}: {}", self.vm.raw(), self.name, self.console);
            self.console.clear();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vcpu = None;
        if let Some(ept) = self.ept.take() {
            ept.destroy(&mut FrameTables);
        }
        memory::free_frames(self.memory, (self.memory_size / PAGE_SIZE) as usize);
    }
}

/// Puts a hypercall's reply in the guest's registers (the ABI in `nk-abi`).
fn write_reply(r: &mut GuestRegs, reply: &Reply) {
    (r.rax, r.rbx, r.rcx) = (reply.status, reply.name.low, reply.name.high);
    (r.rdx, r.rsi, r.rdi, r.r8) = (reply.results[0], reply.results[1], reply.results[2], reply.results[3]);
}

/// The hypervisor's CPUID leaf range signature (leaf 0x40000000, EBX:ECX:EDX).
const HYPERVISOR_SIGNATURE: &[u8; 12] = b"NullKernelHV";

/// Answers CPUID for a guest: the host's values with VMX hidden and the hypervisor bit set
/// in leaf 1, and the hypervisor's own leaf 0x40000000.
fn emulate_cpuid(regs: &mut GuestRegs, guest_osxsave: bool) {
    let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
    let (eax, ebx, ecx, edx) = if leaf == 0x4000_0000 {
        let word = |i: usize| u32::from_le_bytes(HYPERVISOR_SIGNATURE[i..i + 4].try_into().expect("4 bytes"));
        (0x4000_0000, word(0), word(4), word(8))
    } else if (0x4000_0001..0x5000_0000).contains(&leaf) {
        (0, 0, 0, 0)
    } else {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        let ecx = if leaf == 1 {
            let osxsave = if guest_osxsave { 1 << 27 } else { 0 };
            (r.ecx & !(1 << 5) & !(1 << 27)) | (1 << 31) | osxsave
        } else {
            r.ecx
        };
        (r.eax, r.ebx, ecx, r.edx)
    };
    (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (u64::from(eax), u64::from(ebx), u64::from(ecx), u64::from(edx));
}

/// A guest image and how to run it, from a boot module and its command line
/// (`<name> [mem=<size>] [cpu=<index>] [-- <guest arguments>]`).
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub image: &'static [u8],
    pub memory: u64,
    /// The CPU to run on (None: the hypervisor chooses).
    pub cpu: Option<usize>,
    /// The I/O ports the VM may open with the exo AM (`ports=<first>[-<last>]`).
    pub ports: Option<(u16, u32)>,
    /// The MSRs the VM may open with the exo AM (`msrs=<msr>[,<msr>...]`).
    pub msrs: Vec<u32>,
    /// Every ring of the guest, not only ring 0, may enumerate its capabilities with
    /// `INITIAL` and `RECEIVED` (`ring3-caps`; nk-core, "Who may enumerate").
    pub ring3_caps: bool,
    /// The words after `--`, handed to the guest.
    pub args: String,
}

impl GuestSpec {
    /// Reads a module command line: the first word names the guest; `mem=` sizes its
    /// memory (a multiple of 2 MiB, at most 1 GiB), `cpu=` places it, `ports=` names the
    /// I/O ports it may open through the exo AM, and everything after `--` goes to the
    /// guest.
    pub fn from_cmdline(cmdline: &str, image: &'static [u8]) -> Result<Self, String> {
        let (options, args) = match cmdline.split_once(" -- ") {
            Some((options, args)) => (options, args.trim()),
            None => (cmdline.strip_suffix(" --").unwrap_or(cmdline), ""),
        };
        let mut words = options.split_ascii_whitespace();
        let name = words.next().map(|path| path.rsplit('/').next().unwrap_or(path)).unwrap_or("guest");
        let mut spec = GuestSpec {
            name: String::from(name),
            image,
            memory: DEFAULT_GUEST_MEMORY,
            cpu: None,
            ports: None,
            msrs: Vec::new(),
            ring3_caps: false,
            args: String::from(args),
        };
        for word in words {
            if let Some(value) = word.strip_prefix("mem=") {
                spec.memory = parse_size(value)?;
            } else if let Some(value) = word.strip_prefix("cpu=") {
                let cpu = value
                    .parse::<usize>()
                    .map_err(|_| alloc::format!("bad value '{value}' for cpu=: write a CPU index, e.g. cpu=1"))?;
                spec.cpu = Some(cpu);
            } else if let Some(value) = word.strip_prefix("ports=") {
                spec.ports = Some(parse_ports(value)?);
            } else if let Some(value) = word.strip_prefix("msrs=") {
                spec.msrs = parse_msrs(value)?;
            } else if word == "ring3-caps" {
                // Issue 9 (capability level): lets ring 3 call INITIAL and RECEIVED.
                spec.ring3_caps = true;
            } else {
                return Err(alloc::format!(
                    "unknown module option '{word}' (known: mem=<size>, cpu=<index>, ports=<first>[-<last>], msrs=<msr>[,<msr>], ring3-caps, -- <guest args>)"
                ));
            }
        }
        Ok(spec)
    }
}

/// Reads `<msr>[,<msr>...]` (hexadecimal with 0x), each one the VMCS switches per guest.
fn parse_msrs(value: &str) -> Result<Vec<u32>, String> {
    value
        .split(',')
        .map(|text| {
            let msr = text.strip_prefix("0x").and_then(|hex| u32::from_str_radix(hex, 16).ok());
            match msr {
                Some(msr) if ioports::MSR_ASSIGNABLE.contains(&msr) => Ok(msr),
                Some(msr) => Err(alloc::format!(
                    "MSR {msr:#x} in msrs= cannot be given to a guest: only those the VMCS switches per guest may \
                     (0x174, 0x175, 0x176, 0xc0000100, 0xc0000101)"
                )),
                None => Err(alloc::format!(
                    "bad value '{text}' in msrs=: write hexadecimal MSR numbers, e.g. msrs=0xc0000100"
                )),
            }
        })
        .collect()
}

/// Reads `<first>[-<last>]` (hexadecimal with 0x, or decimal) as (first, count).
fn parse_ports(value: &str) -> Result<(u16, u32), String> {
    let number = |text: &str| match text.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => text.parse::<u16>().ok(),
    };
    let (first, last) = match value.split_once('-') {
        Some((first, last)) => (number(first), number(last)),
        None => (number(value), number(value)),
    };
    match (first, last) {
        (Some(first), Some(last)) if first <= last => Ok((first, u32::from(last - first) + 1)),
        _ => Err(alloc::format!(
            "bad value '{value}' for ports=: write a port or a range, e.g. ports=0x80 or ports=0x3f8-0x3ff"
        )),
    }
}

fn parse_size(value: &str) -> Result<u64, String> {
    let (digits, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let shift = match unit {
        "K" | "k" => 10,
        "M" | "m" | "" => 20,
        "G" | "g" => 30,
        _ => return Err(alloc::format!("bad size '{value}' for mem=: write e.g. mem=8M")),
    };
    match digits.parse::<u64>().ok().and_then(|n| n.checked_shl(shift)).filter(|&n| n >> shift != 0) {
        Some(n) if n % (2 << 20) == 0 && n <= MAX_GUEST_MEMORY => Ok(n),
        _ => Err(alloc::format!("bad size '{value}' for mem=: a multiple of 2M up to 1G, e.g. mem=8M")),
    }
}
