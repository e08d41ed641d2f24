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
use nk_paging::EptPerms;

use crate::arch::switched::UnswitchedRegs;
use crate::arch::xsave::{self, ExtendedState};
use crate::ioports::{self, IoBitmaps};
use crate::memory::{self, HostPhysAddr, PAGE_SIZE};
use crate::vmx;
use crate::vmx::ept::GuestEpt;
use crate::vmx::vcpu::{Exit, GuestRegs, GuestStart, StartMode, Vcpu, VcpuError};
use crate::vmx::vmcs::ExitReason;

mod vcpus;

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
    /// A guest OS image refused by its loader.
    Os(String),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Image(e) => write!(f, "bad image: {e}"),
            GuestError::Memory(e) => write!(f, "{e}"),
            GuestError::Ept(e) => write!(f, "EPT: {e}"),
            GuestError::Vcpu(e) => write!(f, "vCPU: {e}"),
            GuestError::Os(e) => write!(f, "bad image: {e}"),
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
    /// A guest OS ended itself (power-off, reset, halt with interrupts off).
    Finished(String),
}

impl GuestEnd {
    /// Returns whether the guest ended on its own terms (not stopped by the hypervisor).
    pub fn is_clean(&self) -> bool {
        !matches!(self, GuestEnd::Stopped(_))
    }
}

/// Returns the CPL of the guest whose VMCS is current (the one whose VMCALL is being
/// dispatched): the DPL of SS (SDM Vol. 3 §5.5; access-rights bits 6:5, §25.4.1). Says
/// ring 3 if the VMREAD fails, so a failure never grants more. The null-Kernel calls it
/// only for INITIAL and RECEIVED (nk-core, "Who may enumerate").
pub fn guest_ring() -> u8 {
    vmx::vmcs::read(vmx::vmcs::VmcsField::GUEST_SS_ACCESS_RIGHTS).map_or(3, |ar| ((ar >> 5) & 3) as u8)
}

/// Returns the page-table root of the guest whose VMCS is current (the one whose VMCALL
/// is being dispatched): its CR3 as [`nk_abi::process_root`] reduces it, or
/// [`nk_caps::NO_ROOT`] if the VMREAD fails, which matches no binding. The null-Kernel
/// calls it only for `BIND` and when a process-bound capability is presented (nk-caps
/// `pin.rs`), so no other call pays for the VMREAD.
pub fn guest_root() -> u64 {
    vmx::vmcs::read(vmx::vmcs::VmcsField::GUEST_CR3).map_or(nk_caps::NO_ROOT, nk_abi::process_root)
}

/// Where hypercalls go: the null-Kernel's dispatch for this guest's kernel instance.
pub trait HypercallSink {
    /// Handles one call from `vm`: its reply, or the operation the vCPU waits for.
    fn hypercall(&mut self, vm: VmId, call: &Call) -> Dispatched;

    /// Handles the call in a guest's saved registers from `vm` as
    /// [`hypercall`](Self::hypercall) does, writing a finished call's reply over them; or
    /// returns the operation the vCPU waits for. The VMCALL exit's path.
    fn hypercall_in_place(&mut self, vm: VmId, regs: &mut GuestRegs) -> Option<PendingOp>;

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
    /// The guest gives up the rest of its slice (a PAUSE loop).
    Yield,
    Park(PendingOp),
    End(GuestEnd),
}

/// Says how handling an exit ends the slice, if it does.
fn slice_ending(flow: Result<Flow, VcpuError>) -> Option<Slice> {
    match flow {
        Ok(Flow::Continue) => None,
        Ok(Flow::Yield) => Some(Slice::Expired),
        Ok(Flow::Park(op)) => Some(Slice::Parked(op)),
        Ok(Flow::End(end)) => Some(Slice::Ended(end)),
        Err(e) => Some(Slice::Ended(GuestEnd::Stopped(alloc::format!("exit handling failed: {e}")))),
    }
}

/// A VM running a bare-metal guest.
pub struct Guest {
    vm: VmId,
    name: String,
    /// `vm<id>/<name>`, the prefix of a guest OS's console and exit lines (made once).
    label: String,
    memory: HostPhysAddr,
    memory_size: u64,
    vcpu: Option<Vcpu>,
    console: String,
    exits: u64,
    /// None where the CPU has no XSAVE (then only x87/SSE-free guests are safe to share).
    xstate: Option<ExtendedState>,
    /// CR2, DR0-DR3, DR6 and IA32_KERNEL_GS_BASE, switched at slice boundaries.
    unswitched: UnswitchedRegs,
    /// Whether a refused XSETBV was already logged (one line per guest, not a flood).
    xsetbv_refusal_logged: bool,
    io: IoBitmaps,
    /// The reply of a parked hypercall, written to the registers at the next entry.
    reply: Option<Reply>,
    /// The virtual PC of a guest OS (None: a bare-metal guest).
    os: Option<alloc::boxed::Box<crate::osvm::OsVm>>,
    /// The memory is the hypervisor's, freed with the guest (false: frames the exo AM lent
    /// a VM created at run time; they go back when the exo AM frees them).
    owns_memory: bool,
    /// Served by the guest debugger (`gdb` on its module line; gdb.rs).
    debugged: bool,
    /// The principal whose capabilities the vCPU's hypercalls are checked against: the
    /// VM's own, or that of the light-weight context it runs (lwc.rs).
    principal: VmId,
    /// The saved register files of this VM's lwCs that do not run (lwc.rs).
    lwcs: Vec<crate::lwc::Saved>,
    /// The copy-on-write views of its lwCs' memory (lwc.rs), made at the first such child.
    views: Option<alloc::boxed::Box<crate::lwc::Views>>,
    /// Its frame quota in bytes (`frames=`), which the views' copies are charged to.
    frame_quota: u64,
    /// Its `LWC_SYSTRAP` lwCs and their trapped call (lwc.rs).
    sandbox: crate::lwc::Sandbox,
    /// Its other vCPUs (`vcpus=`; guest/vcpus.rs): None for a VM with one vCPU. The fields
    /// above that are per vCPU (`vcpu`, `principal`, `xstate`, `unswitched`, `reply`,
    /// `sandbox.current`) hold the state of the one that runs or ran last.
    siblings: Option<alloc::boxed::Box<vcpus::Siblings>>,
    /// Its module says `lwc`: its slices take the lwC instance of the slice loop, which
    /// applies lwC effects in the exit that caused them (lwc.rs).
    lwc: bool,
    /// The `lwSwitch` calls its vCPU made lately, repeated at the exit without the
    /// null-Kernel's dispatch while no capability to an lwC died (lwc.rs).
    switches: crate::lwc::SwitchCache,
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest").field("vm", &self.vm).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Guest {
    /// Loads a bare-metal ELF `image` into fresh guest memory of `memory_size` bytes and
    /// prepares its vCPU on this CPU (a guest OS is built with [`Guest::create_lent`]).
    /// Nothing is left allocated on failure.
    pub fn create(vm: VmId, spec: &GuestSpec) -> Result<Self, GuestError> {
        let (name, image, memory_size) = (spec.name.as_str(), spec.image, spec.memory);
        let kind = nk_loader::image::ImageKind::detect(image);
        let parsed = match kind {
            nk_loader::image::ImageKind::Elf64 => {
                Some(nk_loader::parse(image, IMAGE_MIN_GPA, memory_size).map_err(GuestError::Image)?)
            }
            nk_loader::image::ImageKind::Unknown => {
                return Err(GuestError::Os(String::from("not a 64-bit ELF, a Linux bzImage or a Multiboot kernel")))
            }
            _ => None,
        };
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
            label: alloc::format!("vm{}/{name}", vm.raw()),
            memory,
            memory_size,
            vcpu: None,
            console: String::new(),
            exits: 0,
            xstate,
            unswitched: UnswitchedRegs::default(),
            xsetbv_refusal_logged: false,
            io,
            reply: None,
            os: None,
            owns_memory: true,
            debugged: false,
            principal: vm,
            lwcs: Vec::new(),
            views: None,
            frame_quota: spec.frames.unwrap_or(crate::ams::EXO_FRAME_QUOTA),
            sandbox: crate::lwc::Sandbox::default(),
            siblings: None,
            lwc: spec.lwc,
            switches: crate::lwc::SwitchCache::default(),
        };
        // SAFETY: the frames were just allocated for this guest and are identity-mapped.
        unsafe { core::ptr::write_bytes(memory.as_u64() as *mut u8, 0, memory_size as usize) };
        let image_end = parsed.as_ref().map_or(0, |p| p.end());
        let (mode, rip, rsp, cr3, regs) = match parsed {
            Some(parsed) => {
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
                // R8 and R9: the vCPU's index and how many there are (nk-abi `vcpu`).
                let regs = GuestRegs {
                    rdi: u64::from(vm.raw()),
                    rsi: memory_size,
                    rdx: ARGS_GPA,
                    rcx: args.len() as u64,
                    r8: 0,
                    r9: u64::from(spec.vcpus),
                    ..GuestRegs::default()
                };
                (StartMode::Bare64, parsed.entry, memory_size, PAGE_TABLES_GPA, regs)
            }
            // A guest OS comes into being through the guest-OS AM (bootvm.rs, `create_lent`).
            None => return Err(GuestError::Os(String::from("a guest OS is built through the guest-OS AM"))),
        };

        let caps = vmx::capabilities();
        let mut ept = GuestEpt::new(&caps).map_err(GuestError::Ept)?;
        let mapped = ept.map_range(0, memory.as_u64(), memory_size, EptPerms::RWX);
        let eptp = ept.eptp();
        crate::exomem::register(vm, ept, crate::percpu::current_index() as usize, (memory.as_u64(), memory_size));
        mapped.map_err(GuestError::Ept)?;
        let start =
            GuestStart { mode, eptp, cr3, rip, rsp, io_bitmaps: guest.io.address(), msr_bitmap: guest.io.msr_bitmap() };
        if spec.vcpus > 1 {
            guest.siblings = Some(vcpus::Siblings::create(vm, &start, &regs, spec.vcpus, image_end)?);
        }
        guest.attach_vcpu(&start, regs)?;
        if spec.gdb {
            guest.debugged = guest.attach_debugger()?;
        }
        Ok(guest)
    }

    /// Makes a guest OS VM (the guest-OS AM's `create`, at run time or at boot) on this CPU:
    /// its RAM `[hpa, hpa + bytes)` (frames the exo AM lent) is already loaded with the
    /// image (`start` says how it starts) and mapped by the EPT `vmctl::create` registered
    /// for it. The guest never frees that RAM. Nothing is left allocated on failure but the
    /// EPT, which the caller takes back.
    pub fn create_lent(
        vm: VmId,
        spec: &GuestSpec,
        start: &crate::osvm::OsStart,
        ram: (u64, u64),
    ) -> Result<Self, GuestError> {
        let (hpa, bytes) = ram;
        let memory = HostPhysAddr::new(hpa).ok_or(GuestError::Memory("lent memory at an impossible address"))?;
        let eptp = crate::exomem::eptp(vm).ok_or(GuestError::Memory("no EPT registered for the created VM"))?;
        let io = IoBitmaps::new(vm).ok_or(GuestError::Memory("no memory for the I/O bitmaps"))?;
        let xstate = match xsave::supported() {
            true => Some(ExtendedState::new().ok_or(GuestError::Memory("no memory for the XSAVE area"))?),
            false => None,
        };
        let kind = nk_loader::image::ImageKind::detect(spec.image);
        let mut os = crate::osvm::OsVm::new(kind);
        if let Some(input) = spec.input {
            os.set_console_input(input);
        }
        if let Some(bytes) = spec.disk {
            os.attach_disk(vm, bytes);
        }
        let mut guest = Guest {
            vm,
            name: spec.name.clone(),
            label: alloc::format!("vm{}/{}", vm.raw(), spec.name),
            memory,
            memory_size: bytes,
            vcpu: None,
            console: String::new(),
            exits: 0,
            xstate,
            unswitched: UnswitchedRegs::default(),
            xsetbv_refusal_logged: false,
            io,
            reply: None,
            os: Some(alloc::boxed::Box::new(os)),
            owns_memory: false,
            debugged: false,
            principal: vm,
            lwcs: Vec::new(),
            views: None,
            frame_quota: spec.frames.unwrap_or(crate::ams::EXO_FRAME_QUOTA),
            sandbox: crate::lwc::Sandbox::default(),
            siblings: None,
            lwc: false,
            switches: crate::lwc::SwitchCache::default(),
        };
        let entry = GuestStart {
            mode: start.mode,
            eptp,
            cr3: start.cr3,
            rip: start.rip,
            rsp: start.rsp,
            io_bitmaps: guest.io.address(),
            msr_bitmap: guest.io.msr_bitmap(),
        };
        guest.attach_vcpu(&entry, start.regs.clone())?;
        if spec.gdb {
            guest.debugged = guest.attach_debugger()?;
        }
        Ok(guest)
    }

    /// Makes the guest's vCPU on this CPU with `regs`; a guest OS also gets its xAPIC page
    /// (the APIC-access page, osvm.rs) and its RAM's place for instruction fetches.
    fn attach_vcpu(&mut self, start: &GuestStart, regs: GuestRegs) -> Result<(), GuestError> {
        let caps = vmx::capabilities();
        let mut vcpu = Vcpu::new(&caps, start).map_err(GuestError::Vcpu)?;
        vcpu.regs = regs;
        if let (Some(os), Some((page, _))) = (self.os.as_mut(), vcpu.apic_access_page()) {
            crate::exomem::map_device_page(self.vm, nk_devices::lapic::DEFAULT_BASE, page, EptPerms::RW)
                .map_err(GuestError::Ept)?;
            os.set_ram(self.memory.as_u64(), self.memory_size);
        }
        self.vcpu = Some(vcpu);
        Ok(())
    }

    /// Hands the guest to the debugger (gdb.rs); a guest OS is not debugged (yet).
    #[cold]
    fn attach_debugger(&mut self) -> Result<bool, GuestError> {
        if self.os.is_some() {
            log::warn!(target: "gdb", "{}: not debugged: only bare-metal ELF guests can be (a guest OS's exits take another path)", self.label);
            return Ok(false);
        }
        let Some(vcpu) = self.vcpu.as_mut() else { return Ok(false) };
        crate::gdb::attach(self.vm, &self.label, vcpu, (self.memory.as_u64(), self.memory_size))
            .map_err(GuestError::Vcpu)
    }

    /// Returns whether the guest debugger serves this guest.
    pub fn is_debugged(&self) -> bool {
        self.debugged
    }

    /// Returns the vCPU, for the guest debugger between slices (gdb.rs).
    pub fn debug_vcpu(&mut self) -> Option<&mut Vcpu> {
        self.vcpu.as_mut()
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
    /// `sink`. Returns how the slice ended. A VM with several vCPUs runs one of them per
    /// slice (guest/vcpus.rs; [`Guest::takes_next_turn`] says whether another follows).
    pub fn run_slice(&mut self, sink: &mut impl HypercallSink, ticks: u64, timer_rate: u8) -> Slice {
        let slice = self.run_vcpu_slice(sink, ticks, timer_rate);
        match self.siblings.is_some() {
            false => slice,
            true => self.after_sibling_slice(slice, sink),
        }
    }

    /// Runs the vCPU whose state is in the guest's fields for one time slice. Kept out of
    /// line: its hypercall loop is compiled as it was before VMs had several vCPUs (the
    /// wrapper's code around it once cost the loop a register: one instruction per exit).
    #[inline(never)]
    fn run_vcpu_slice(&mut self, sink: &mut impl HypercallSink, ticks: u64, timer_rate: u8) -> Slice {
        if self.os.is_some() {
            return self.run_os_slice(sink, ticks, timer_rate);
        }
        let stopped = |why: String| Slice::Ended(GuestEnd::Stopped(why));
        if let Err(why) = self.enter_slice(Some((ticks, timer_rate))) {
            return stopped(why);
        }
        // lwC effects left by a hypercall that parked, or a destruction decided on another
        // CPU, are applied here, before the guest runs on.
        if self.lwc && crate::lwc::pending() {
            if let Some(end) = self.lwc_exit(sink) {
                self.leave_slice();
                return end;
            }
        }
        // The timer is re-armed with the whole slice at every entry; the TSC bounds the
        // slice of a guest that exits often.
        let slice_start = crate::arch::rdtsc();
        // The exit stub answers null hypercalls itself within the slice (the loops do
        // nothing else for them: `Vcpu::serve_null_until`).
        if let Some(vcpu) = self.vcpu.as_mut() {
            vcpu.serve_null_until(slice_start.saturating_add(ticks));
        }
        // A guest with lwCs takes its own instance of the loop: the plain one has no test
        // for lwC effects on its hypercall path.
        let end = match self.lwc {
            false => self.bare_slice::<false>(sink, ticks, slice_start),
            true => self.bare_slice::<true>(sink, ticks, slice_start),
        };
        self.leave_slice();
        end
    }

    /// Runs a bare-metal guest until its slice ends. `LWC`: the guest may have lwCs, so
    /// after every exit the lwC effects it caused (a switch, a create, ...) or that reached
    /// it from another CPU (a destruction) are applied at once, before the next entry
    /// (lwc.rs), and a sandboxed lwC's hypercalls take the sandboxed path; the other
    /// instance's hypercall path is the plain one.
    #[inline(always)]
    fn bare_slice<const LWC: bool>(&mut self, sink: &mut impl HypercallSink, ticks: u64, slice_start: u64) -> Slice {
        let stopped = |why: String| Slice::Ended(GuestEnd::Stopped(why));
        loop {
            if crate::arch::rdtsc().wrapping_sub(slice_start) >= ticks {
                return Slice::Expired;
            }
            let vcpu = self.vcpu.as_mut().expect("checked by enter_slice");
            // The plain loop lets the exit stub hand its VMCALLs to the sink and resume the
            // guest at once (`StubHypercalls`); a call that parks comes back here.
            let mut parked = None;
            let exit = match LWC {
                true => vcpu.run(),
                false => {
                    let mut calls = StubHypercalls { vm: self.principal, sink: &mut *sink, parked: None };
                    let exit = vcpu.run_serving(&mut calls);
                    parked = calls.parked;
                    exit
                }
            };
            self.exits += vcpu.take_null_exits();
            let exit = match exit {
                Ok(exit) => exit,
                Err(e) => return stopped(alloc::format!("VM entry failed: {e}")),
            };
            self.exits += 1;
            if exit.reason == ExitReason::PREEMPTION_TIMER {
                // The timer may have cut short an event's delivery: it goes on next slice.
                if let Err(e) = vcpu.reinject_interrupted_event() {
                    return stopped(alloc::format!("cannot keep its interrupted event: {e}"));
                }
                return Slice::Expired;
            }
            let flow = match exit.reason {
                // The stub's handler dispatched it and the guest waits at its VMCALL.
                ExitReason::VMCALL if !LWC && parked.is_some() => Ok(Flow::Park(parked.take().expect("tested"))),
                ExitReason::VMCALL if !LWC => handle_hypercall(self.principal, vcpu, sink),
                // A repeated allowed lwSwitch goes straight back to the entry: it takes no
                // lwC effect, and a queued one (a destruction from another CPU) bumped the
                // epoch, so the next switch takes the full path and applies it.
                ExitReason::VMCALL if !self.sandbox.current => match self.repeat_switch() {
                    Some(Ok(())) => continue,
                    Some(Err(why)) => return stopped(alloc::format!("cannot switch lwCs: {why}")),
                    None => self.lwc_hypercall(sink),
                },
                ExitReason::VMCALL => self.sandboxed_hypercall(sink),
                _ => self.handle_exit(&exit, sink),
            };
            // The exit's lwC effects, before the guest runs again.
            if LWC && crate::lwc::pending() {
                if let Some(end) = self.lwc_exit(sink) {
                    return end;
                }
            }
            // The common case straight back to the entry (no Option<Slice> built).
            if let Ok(Flow::Continue) = flow {
                continue;
            }
            if let Some(end) = slice_ending(flow) {
                return end;
            }
        }
    }

    /// Repeats an `lwSwitch` the null-Kernel allowed lately with the same capability, if no
    /// capability to an lwC died since (lwc.rs, `SwitchCache`), right at the exit: the
    /// reply the dispatch gave, then the switch, as [`Guest::switch_lwc`] makes it but
    /// without its checks of what cannot fail here (RIP, RSP and RFLAGS exchanged in one
    /// block of three VMREADs and three VMWRITEs, RIP moved past the VMCALL on the way; the
    /// EPTP written only where the VM has views). None: not such a call, or its target's
    /// register file is not here (another vCPU runs it): nothing was changed and the call
    /// takes the full path, which refuses that switch. Some(Err): the view could not be
    /// loaded.
    #[inline(always)]
    fn repeat_switch(&mut self) -> Option<Result<(), String>> {
        let from = self.principal;
        let vcpu = self.vcpu.as_mut()?;
        let call = vcpu.regs.call();
        let (to, status, creator) = self.switches.find(from.raw(), call)?;
        let slot = vcpus::saved_slot(&self.lwcs, to, &self.siblings)?;
        let index = vcpus::active_index(&self.siblings);
        let saved = self.lwcs.get_mut(slot)?;
        let (a0, a1) = (call.args[0], call.args[1]);
        vcpu.exchange_flow(&mut saved.flow, VMCALL_LENGTH);
        // The reply's registers, then the kept ones swapped (the arguments were read).
        let reply = vcpu.regs.reply_mut();
        reply.status = status;
        reply.name = NameWords::default();
        reply.results = [creator, u64::from(from.raw()), a0, a1];
        crate::lwc::swap_kept(&mut vcpu.regs, &mut saved.regs);
        saved.principal = from.raw();
        saved.vcpu = index;
        if !self.sandbox.is_empty() {
            enter_sandboxed(&mut self.sandbox, &mut vcpu.regs, to);
        }
        self.principal = VmId::new(to);
        if self.views.is_some() {
            return Some(self.load_view(self.principal));
        }
        Some(Ok(()))
    }

    /// Handles a hypercall of an lwC that is not sandboxed and not a repeated switch
    /// ([`Guest::repeat_switch`]): it is dispatched, and an allowed `lwSwitch` remembered
    /// (lwc.rs, `SwitchCache`).
    #[inline(always)]
    fn lwc_hypercall(&mut self, sink: &mut impl HypercallSink) -> Result<Flow, VcpuError> {
        let from = self.principal;
        let vcpu = self.vcpu.as_mut().expect("checked by enter_slice");
        let call = vcpu.regs.call();
        let (epoch, selector, caps) = (crate::lwc::epoch(), call.selector, call.caps);
        let flow = handle_hypercall(from, vcpu, sink);
        if let Some((by, to)) = crate::lwc::switch_made() {
            // Only lwSwitch makes a switch for an lwC that is not sandboxed.
            let reply = *vcpu.regs.reply_mut();
            if by == from && nk_abi::Status(reply.status).is_ok() && reply.results[1] == u64::from(from.raw()) {
                self.switches.remember(epoch, (selector, caps), from.raw(), to.raw(), (reply.status, reply.results[0]));
            }
        }
        flow
    }

    /// Applies the lwC effects waiting for this guest; Some(end) when it cannot go on. Out
    /// of line: the hypercall loop stays small.
    #[cold]
    #[inline(never)]
    fn lwc_exit(&mut self, sink: &mut impl HypercallSink) -> Option<Slice> {
        let ended = self.apply_lwc(sink);
        ended.err().map(|e| Slice::Ended(GuestEnd::Stopped(alloc::format!("cannot switch lwCs: {e}"))))
    }

    /// Handles a hypercall of a sandboxed lwC (`LWC_SYSTRAP`, seed §4.2.6): a call refused
    /// for a capability it does not hold becomes the lwC AM's `lwTrap` (named by the copy
    /// of its creator's lwC capability it holds), which switches to its creator; the call
    /// is kept for `lwSyscall`. Without such a capability the refusal stands.
    #[cold]
    #[inline(never)]
    fn sandboxed_hypercall(&mut self, sink: &mut impl HypercallSink) -> Result<Flow, VcpuError> {
        let principal = self.principal;
        let vcpu = self.vcpu.as_mut().expect("checked by enter_slice");
        let call = *vcpu.regs.call();
        let reply = match sink.hypercall(principal, &call) {
            Dispatched::Reply(reply) => reply,
            Dispatched::Pending(op) => return Ok(Flow::Park(op)),
        };
        let code = nk_abi::Status(reply.status).code();
        let refused = matches!(code, nk_abi::Status::UNKNOWN_NAME | nk_abi::Status::WRONG_HOLDER);
        let trap = match (refused, self.sandbox.am_of(principal.raw())) {
            (true, Some(am)) => {
                let cpu = crate::percpu::current_index() as usize;
                let kernel = crate::mesh::mesh().instance(cpu).kernel.lock();
                let back = kernel.initial_caps(principal).iter().find(|(a, _)| *a == am).map(|&(_, name)| name.words());
                drop(kernel);
                back.map(|(high, low)| Call {
                    selector: nk_abi::Selector::new(am.raw(), nk_abi::lwc_op::LW_TRAP).encode(),
                    caps: [NameWords { low, high }, NameWords::default(), NameWords::default(), NameWords::default()],
                    args: [call.selector, call.args[0], 0, 0, 0],
                })
            }
            _ => None,
        };
        let reply = match trap.map(|trap| sink.hypercall(principal, &trap)) {
            Some(Dispatched::Reply(trapped)) if nk_abi::Status(trapped.status).is_ok() => {
                self.sandbox.trap(principal.raw(), call);
                trapped
            }
            _ => reply,
        };
        let vcpu = self.vcpu.as_mut().expect("checked by enter_slice");
        write_reply(&mut vcpu.regs, &reply);
        vcpu.skip_bytes(VMCALL_LENGTH)?;
        Ok(Flow::Continue)
    }

    /// Makes the guest's vCPU current for a slice: arms the preemption timer with the
    /// slice (`time_slice`: ticks and timer rate; a guest OS arms it itself), hands a parked
    /// guest its hypercall's reply and moves it past its VMCALL, and loads its extended
    /// state and the registers VMX does not switch. Says why the vCPU cannot run.
    fn enter_slice(&mut self, time_slice: Option<(u64, u8)>) -> Result<(), String> {
        let vcpu = self.vcpu.as_mut().ok_or_else(|| String::from("no vCPU"))?;
        let scheduled = match time_slice {
            Some((ticks, rate)) => vcpu.activate().and_then(|()| vcpu.set_time_slice(ticks, rate)),
            None => vcpu.activate(),
        };
        scheduled.map_err(|e| alloc::format!("cannot schedule its vCPU: {e}"))?;
        if let Some(reply) = self.reply.take() {
            write_reply(&mut vcpu.regs, &reply);
            vcpu.skip_bytes(VMCALL_LENGTH).map_err(|e| alloc::format!("cannot resume after its hypercall: {e}"))?;
        }
        if let Some(xstate) = &self.xstate {
            xstate.restore();
        }
        self.unswitched.load();
        Ok(())
    }

    /// Saves what `enter_slice` loaded: the registers VMX does not switch and the extended
    /// state.
    fn leave_slice(&mut self) {
        if let Some(vcpu) = self.vcpu.as_mut() {
            vcpu.serve_null_until(0);
        }
        self.unswitched.save();
        if let Some(xstate) = &mut self.xstate {
            xstate.save();
        }
    }

    /// Runs a guest OS for one time slice: before each entry its virtual PC injects the
    /// pending interrupt (or asks for an interrupt window) and the preemption timer is
    /// armed for the earlier of the slice's end and the virtual APIC timer; a halted vCPU
    /// gives its slice back until an interrupt is pending.
    fn run_os_slice(&mut self, sink: &mut impl HypercallSink, ticks: u64, timer_rate: u8) -> Slice {
        let stopped = |why: String| Slice::Ended(GuestEnd::Stopped(why));
        if !self.os.as_mut().expect("checked by run_slice").poll() {
            return Slice::Expired;
        }
        if let Err(why) = self.enter_slice(None) {
            return stopped(why);
        }
        self.os.as_ref().expect("checked").load_switched();
        let slice_end = crate::arch::rdtsc().saturating_add(ticks);
        let end = loop {
            if crate::arch::rdtsc() >= slice_end {
                break Slice::Expired;
            }
            let (Some(vcpu), Some(os)) = (self.vcpu.as_mut(), self.os.as_mut()) else {
                break stopped(String::from("no vCPU"));
            };
            if let Err(e) = os.before_entry(vcpu, slice_end, timer_rate) {
                break stopped(alloc::format!("cannot prepare its VM entry: {e}"));
            }
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) => break stopped(alloc::format!("VM entry failed: {e}")),
            };
            self.exits += 1;
            os.count_exit(exit.reason);
            let flow = match exit.reason {
                ExitReason::PREEMPTION_TIMER => match vcpu.reinject_interrupted_event() {
                    Ok(()) => Ok(Flow::Continue),
                    Err(e) => Err(e),
                },
                ExitReason::VMCALL => handle_hypercall(self.vm, vcpu, sink),
                ExitReason::IO_INSTRUCTION
                | ExitReason::CPUID
                | ExitReason::RDMSR
                | ExitReason::WRMSR
                | ExitReason::HLT
                | ExitReason::INTERRUPT_WINDOW
                | ExitReason::TRIPLE_FAULT
                | ExitReason::INIT_SIGNAL
                | ExitReason::APIC_ACCESS
                | ExitReason::TPR_BELOW_THRESHOLD
                | ExitReason::APIC_WRITE
                | ExitReason::EPT_VIOLATION => match os.handle_exit(exit.reason, vcpu, &self.label) {
                    Ok(crate::osvm::OsFlow::Continue) => Ok(Flow::Continue),
                    Ok(crate::osvm::OsFlow::Idle) => Ok(Flow::Yield),
                    Ok(crate::osvm::OsFlow::Ended(how)) => Ok(Flow::End(GuestEnd::Finished(how))),
                    Ok(crate::osvm::OsFlow::Stopped(why)) => Ok(Flow::End(GuestEnd::Stopped(why))),
                    Err(e) => Err(e),
                },
                _ => self.handle_exit(&exit, sink),
            };
            if let Some(end) = slice_ending(flow) {
                break end;
            }
        };
        if let Slice::Ended(_) = &end {
            if let Some(os) = self.os.as_mut() {
                os.flush_console(&self.label);
                log::info!(target: "guest", "{}: {}", self.label, os.summary());
                if let Some(disk) = os.disk_summary() {
                    log::info!(target: "guest", "{}: {disk}", self.label);
                }
            }
        }
        self.leave_slice();
        end
    }

    /// Applies the lwC AM's effects of the exit just handled (lwc.rs; before the next entry,
    /// so no guest instruction ran since): this CPU's switch first, then the VM's queue. A create saves
    /// the caller's registers (RIP past its VMCALL, the reply in place) as the child's; a
    /// switch saves the caller's, loads the target's with the reply in them, and makes the
    /// target's principal the one every later hypercall is checked against.
    #[cold]
    #[inline(never)]
    fn apply_lwc(&mut self, sink: &mut impl HypercallSink) -> Result<(), String> {
        if self.vcpu.is_none() {
            return Ok(());
        }
        let fail = |e: VcpuError| alloc::format!("{e}");
        // This CPU's switch first: a queued effect (a destruction from another CPU) came
        // after it, or the switch would have been refused.
        if let Some((from, to)) = crate::lwc::take_switch() {
            self.switch_lwc(from, to)?;
        }
        let effects = crate::lwc::take(self.vm);
        let mut next = 0;
        while let Some(&effect) = effects.get(next) {
            next += 1;
            match effect {
                nk_am::Effect::LwcCreate { parent, child, memory, systrap, .. } => {
                    if let Some(am) = systrap {
                        self.sandbox.add(child.raw(), am);
                    }
                    // The exception ranges past the first follow it (`LWC_RANGES`).
                    let more: Vec<(u32, u32, u8)> = effects[next..]
                        .iter()
                        .map_while(|e| match *e {
                            nk_am::Effect::LwcRange { child: c, first_page, pages, mode } if c == child => {
                                Some((first_page, pages, mode))
                            }
                            _ => None,
                        })
                        .collect();
                    next += more.len();
                    let spec = crate::lwc::Spec { memory, more: &more };
                    if !spec.all_shared() || self.views.is_some() {
                        let views = self.views.get_or_insert_with(|| {
                            alloc::boxed::Box::new(crate::lwc::Views::new(
                                (self.memory.as_u64(), self.memory_size),
                                self.frame_quota,
                            ))
                        });
                        views.create(self.vm, parent.raw(), child.raw(), &spec).map_err(String::from)?;
                    }
                    let vcpu = self.vcpu.as_mut().expect("checked above");
                    let flow = vcpu.flow_registers().map_err(fail)?;
                    let index = vcpus::active_index(&self.siblings);
                    self.lwcs.push(crate::lwc::Saved { principal: child.raw(), vcpu: index, regs: vcpu.regs, flow });
                }
                nk_am::Effect::LwcSwitch { from, to } => self.switch_lwc(from, to)?,
                nk_am::Effect::LwcOverlay { from, to, first_page, pages, mode } => {
                    let (memory, quota) = ((self.memory.as_u64(), self.memory_size), self.frame_quota);
                    let views =
                        self.views.get_or_insert_with(|| alloc::boxed::Box::new(crate::lwc::Views::new(memory, quota)));
                    views
                        .overlay(self.vm, from.raw(), to.raw(), u64::from(first_page), u64::from(pages), mode)
                        .map_err(String::from)?;
                }
                nk_am::Effect::LwcSyscall { by, target, mask } => {
                    // The caller's lwSyscall reply becomes the trapped call's (seed §4.2.6).
                    let refusal = |code| Reply { status: nk_abi::Status::new(code, None).0, ..Reply::default() };
                    let reply = match self.sandbox.trapped_call(target.raw()) {
                        Some(call) if nk_abi::Selector::decode(call.selector).am != nk_abi::NULL_KERNEL_AM => {
                            match sink.hypercall(if mask != 0 { by } else { target }, &call) {
                                Dispatched::Reply(reply) => reply,
                                Dispatched::Pending(_) => refusal(nk_abi::Status::AM_FAILED),
                            }
                        }
                        _ => refusal(nk_abi::Status::NOT_PERMITTED),
                    };
                    let vcpu = self.vcpu.as_mut().expect("checked above");
                    write_reply(&mut vcpu.regs, &reply);
                }
                nk_am::Effect::LwcDestroy { child, resume } => {
                    self.lwcs.retain(|l| l.principal != child.raw());
                    // The running lwC died: its vCPU goes back to the lwC the AM names,
                    // whose lwSwitch returns REVOKED.
                    if self.principal == child {
                        let index = vcpus::active_index(&self.siblings);
                        if let Some(to) = resume {
                            if let Some((to, slot)) = vcpus::resume_slot(&self.lwcs, to, self.vm, index) {
                                let vcpu = self.vcpu.as_mut().expect("checked above");
                                let target = self.lwcs.swap_remove(slot);
                                vcpu.regs = target.regs;
                                let reply = Reply {
                                    status: nk_abi::Status::new(nk_abi::Status::REVOKED, None).0,
                                    results: [u64::from(child.raw()), 0, 0, 0],
                                    ..Reply::default()
                                };
                                write_reply(&mut vcpu.regs, &reply);
                                vcpu.set_flow_registers(target.flow).map_err(fail)?;
                                self.principal = to;
                                log::info!(target: "lwc", "{}: running lwC {:#x} destroyed; back in lwC {:#x}", self.label, child.raw(), to.raw());
                            }
                        }
                    }
                    // Another vCPU of the VM that ran it goes back the same way.
                    if self.principal != child && self.siblings.is_some() {
                        self.resume_sibling(child, resume)?;
                    }
                    self.sandbox.remove(child.raw());
                    self.sandbox.entered(self.principal.raw());
                    if let Some(views) = self.views.as_mut() {
                        views.destroy(child.raw());
                    }
                    if self.principal.raw() != child.raw() {
                        self.load_view(self.principal)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Switches the vCPU from lwC `from` to lwC `to` (`lwSwitch`, or a trap): saves the
    /// caller's register file (RIP past its VMCALL, the reply in place), loads the
    /// target's with the reply in its result registers, and makes the target's principal
    /// the one every later hypercall is checked against and its view the EPT. This is the
    /// one place that sets the running lwC by a switch.
    #[inline(always)]
    fn switch_lwc(&mut self, from: VmId, to: VmId) -> Result<(), String> {
        let fail = |e: VcpuError| alloc::format!("{e}");
        let Some(slot) = vcpus::saved_slot(&self.lwcs, to.raw(), &self.siblings) else {
            // No saved register file: another vCPU of the VM runs that child now (its one
            // file is live there; guest/vcpus.rs), so this switch is refused.
            return self.refuse_switch(to);
        };
        let index = vcpus::active_index(&self.siblings);
        let vcpu = self.vcpu.as_mut().ok_or_else(|| String::from("no vCPU"))?;
        let saved = &mut self.lwcs[slot];
        let flow = vcpu.flow_registers().map_err(fail)?;
        // The reply's registers stay: the target's own were overwritten by the reply that
        // ends its lwSwitch (or lwCreate) anyway, and the caller's are by the next.
        crate::lwc::swap_kept(&mut vcpu.regs, &mut saved.regs);
        saved.principal = from.raw();
        saved.vcpu = index;
        let target_flow = core::mem::replace(&mut saved.flow, flow);
        vcpu.set_flow_registers(target_flow).map_err(fail)?;
        if !self.sandbox.is_empty() {
            enter_sandboxed(&mut self.sandbox, &mut vcpu.regs, to.raw());
        }
        self.principal = to;
        self.load_view(to)
    }

    /// Answers a switch into lwC `to` that cannot be made here with `NOT_PERMITTED` in
    /// place of the reply the lwC AM gave: the target runs on another vCPU of the VM (its
    /// register file is live there), or has no register file at all. Which vCPU runs which
    /// lwC is the hypervisor's to know, not the AM's (the switch fast path bypasses it).
    #[cold]
    #[inline(never)]
    fn refuse_switch(&mut self, to: VmId) -> Result<(), String> {
        if self.siblings.is_none() {
            log::error!(target: "lwc", "{}: no saved registers for lwC {:#x}; switch refused", self.label, to.raw());
        }
        let vcpu = self.vcpu.as_mut().ok_or_else(|| String::from("no vCPU"))?;
        let reply = Reply { status: nk_abi::Status::new(nk_abi::Status::NOT_PERMITTED, None).0, ..Reply::default() };
        write_reply(&mut vcpu.regs, &reply);
        Ok(())
    }

    /// Points the vCPU at the EPT lwC `principal` runs on (its view, or the VM's own).
    fn load_view(&mut self, principal: VmId) -> Result<(), String> {
        let Some(views) = self.views.as_ref() else { return Ok(()) };
        let eptp = match views.eptp_of(principal.raw()) {
            Some(eptp) => eptp,
            None => crate::exomem::eptp(self.vm).ok_or_else(|| String::from("the VM has no EPT"))?,
        };
        match self.vcpu.as_mut() {
            Some(vcpu) => vcpu.set_eptp(eptp).map_err(|e| alloc::format!("{e}")),
            None => Ok(()),
        }
    }

    /// Handles every exit but VMCALL's; says whether the guest goes on, waits, or ended.
    /// Kept out of line so the hypercall loop stays small.
    #[inline(never)]
    fn handle_exit(&mut self, exit: &Exit, sink: &mut impl HypercallSink) -> Result<Flow, VcpuError> {
        let vm = self.vm;
        let vcpu = self.vcpu.as_mut().expect("run checked the vCPU");
        let stop = |why: String| Ok(Flow::End(GuestEnd::Stopped(why)));
        match exit.reason {
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
                // Every check XSETBV itself makes (SDM Vol. 2 XSETBV, Vol. 1 §13.3): a
                // value the CPU would refuse is the guest's #GP, never the host's.
                let refusal = if vcpu.guest_cpl()? != 0 {
                    Some(String::from("CPL is not 0"))
                } else if vcpu.regs.rcx as u32 != 0 {
                    Some(alloc::format!("XCR{} does not exist", vcpu.regs.rcx as u32))
                } else {
                    match (&mut self.xstate, xsave::check_guest_xcr0(value)) {
                        (Some(xstate), Ok(())) => {
                            xstate.set_guest_xcr0(value);
                            None
                        }
                        (None, _) => Some(String::from("no XSAVE on this CPU")),
                        (Some(_), Err(e)) => Some(alloc::format!("{e:?}")),
                    }
                };
                match refusal {
                    None => vcpu.skip_instruction()?,
                    Some(why) => {
                        if !self.xsetbv_refusal_logged {
                            self.xsetbv_refusal_logged = true;
                            log::info!(target: "guest", "vm{}/{}: XSETBV of {value:#x} refused with #GP: {why} (further refusals are not logged)",
                                vm.raw(), self.name);
                        }
                        vcpu.inject_exception(13, Some(0))?;
                    }
                }
            }
            ExitReason::CR_ACCESS => {
                // The hypervisor owns CR4.VMXE (CR4 guest/host mask): VMX is hidden from
                // guests, so a MOV to CR4 that sets it faults as on a CPU without VMX
                // (SDM Vol. 3 §2.5). Without a TPR shadow, CR8 accesses exit too and are
                // emulated against the guest's own CR8.
                let q = vcpu.exit_qualification()?;
                let (cr, access, gpr) = (q & 0xF, (q >> 4) & 3, ((q >> 8) & 0xF) as u8);
                match (cr, access) {
                    (4, 0) => vcpu.inject_exception(13, Some(0))?,
                    (8, 0 | 1) if !vcpu.has_tpr_shadow() => vcpu.emulate_cr8(access == 0, gpr)?,
                    _ => return stop(alloc::format!("unexpected control-register access (CR{cr}, type {access})")),
                }
            }
            ExitReason::MWAIT | ExitReason::MONITOR => {
                // Emulated as no-ops: MWAIT may return for any reason (SDM Vol. 2 MWAIT),
                // so going on at once is a correct MWAIT, and the guest never puts the
                // physical CPU into a sleep state that could outlast its slice.
                vcpu.skip_instruction()?;
            }
            ExitReason::PAUSE => {
                // A PAUSE loop longer than the PLE window: the guest spins waiting for
                // something, so the rest of its slice goes to the CPU's other guests.
                vcpu.skip_instruction()?;
                return Ok(Flow::Yield);
            }
            ExitReason::TPR_BELOW_THRESHOLD => {
                // Trap-like (the guest is already past its CR8 write); the threshold is 0,
                // so this exit only follows a threshold some future code sets.
            }
            ExitReason::EXCEPTION_OR_NMI => {
                // An NMI that arrived while the guest ran is the platform's: the
                // hypervisor takes it and the guest goes on, with any event it cut short.
                if !vcpu.absorb_nmi_exit()? {
                    if self.debugged {
                        match crate::gdb::exception(vm, vcpu)? {
                            crate::gdb::Trapped::Stop => return Ok(Flow::Yield),
                            crate::gdb::Trapped::Reflected => return Ok(Flow::Continue),
                            crate::gdb::Trapped::Other => {}
                        }
                    }
                    let info = vcpu.exit_interruption_info()?;
                    self.flush_console();
                    return stop(alloc::format!("unexpected exception exit (interruption information {info:#x})"));
                }
                log::warn!(target: "guest", "vm{}/{}: an NMI arrived while it ran; taken by the hypervisor, the guest goes on",
                    vm.raw(), self.name);
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
                if let Some(views) = self.views.as_mut() {
                    match views.fault(vm, self.principal.raw(), gpa, q) {
                        crate::lwc::Fault::Copied => return Ok(Flow::Continue),
                        crate::lwc::Fault::NotOurs => {}
                        crate::lwc::Fault::Exhausted(why) => {
                            self.flush_console();
                            return stop(alloc::format!(
                                "lwC {:#x}: write of guest-physical {gpa:#x}: {why}",
                                self.principal.raw()
                            ));
                        }
                    }
                }
                self.flush_console();
                return stop(alloc::format!("{access} of guest-physical {gpa:#x} outside its memory (EPT violation)"));
            }
            ExitReason::PML_FULL => crate::exomem::pml_full(self.vm),
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
                vcpu.reinject_interrupted_event()?;
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
    /// Tears the VM down on its CPU: the VMCS is cleared and its VPID invalidated, the EPT
    /// invalidated (INVEPT) and freed, and only then its memory freed.
    fn drop(&mut self) {
        self.vcpu = None;
        self.siblings = None;
        self.views = None;
        if !self.lwcs.is_empty() {
            crate::lwc::forget(self.vm);
        }
        drop(crate::exomem::unregister(self.vm));
        if self.owns_memory {
            memory::free_frames(self.memory, (self.memory_size / PAGE_SIZE) as usize);
        }
    }
}

/// Notes in `sandbox` that the vCPU switched into lwC `to`, whose registers are `regs`
/// (the switch's reply in them): a trapped call of `to` returns with its creator's answer
/// (status a0, result a1).
#[cold]
#[inline(never)]
fn enter_sandboxed(sandbox: &mut crate::lwc::Sandbox, regs: &mut GuestRegs, to: u32) {
    if sandbox.take_trapped(to).is_some() {
        (regs.rax, regs.rdx) = (regs.rdi, regs.r8);
        (regs.rbx, regs.rcx, regs.rsi, regs.rdi, regs.r8) = (0, 0, 0, 0, 0);
    }
    sandbox.entered(to);
}

/// The exit stub's hypercall handler of the plain slice loop ([`Vcpu::run_serving`]): the
/// call goes to `sink` as [`handle_hypercall`] sends it; one that finished resumes the
/// guest from the stub, and one that waits for other kernels is kept in `parked` for the
/// loop, which parks the guest at its VMCALL.
struct StubHypercalls<'a, S: HypercallSink> {
    vm: VmId,
    sink: &'a mut S,
    parked: Option<PendingOp>,
}

impl<S: HypercallSink> vmx::vcpu::ExitHypercall for StubHypercalls<'_, S> {
    #[inline(always)]
    fn hypercall(&mut self, regs: &mut GuestRegs) -> bool {
        match self.sink.hypercall_in_place(self.vm, regs) {
            None => true,
            Some(op) => {
                self.parked = Some(op);
                false
            }
        }
    }
}

/// Handles a VMCALL exit, the hot path: the call goes to `sink`, which reads it in place
/// from the saved registers and writes its reply over them; or the guest waits for it.
#[inline(always)]
fn handle_hypercall(vm: VmId, vcpu: &mut Vcpu, sink: &mut impl HypercallSink) -> Result<Flow, VcpuError> {
    match sink.hypercall_in_place(vm, &mut vcpu.regs) {
        None => {
            vcpu.skip_bytes(VMCALL_LENGTH)?;
            Ok(Flow::Continue)
        }
        // The guest stays at its VMCALL until the reply comes.
        Some(op) => Ok(Flow::Park(op)),
    }
}

/// Puts a hypercall's reply in the guest's registers (the ABI in `nk-abi`).
#[inline(always)]
fn write_reply(r: &mut GuestRegs, reply: &Reply) {
    *r.reply_mut() = *reply;
}

/// Answers CPUID for a guest with [`nk_loader::cpuid::guest_cpuid`]: the host's values with
/// VMX hidden, the hypervisor leaves, and nothing the current VMCS's secondary controls
/// leave disabled (those instructions would #UD, SDM Vol. 3 §26.3).
fn emulate_cpuid(regs: &mut GuestRegs, guest_osxsave: bool) {
    let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
    let answer = cpuid_answer(leaf, subleaf, guest_osxsave);
    (regs.rax, regs.rbx, regs.rcx, regs.rdx) =
        (u64::from(answer.eax), u64::from(answer.ebx), u64::from(answer.ecx), u64::from(answer.edx));
}

/// Returns the CPUID answer a guest sees before any guest-OS adjustment: the host's with
/// [`nk_loader::cpuid::guest_cpuid`] applied under the current VMCS's secondary controls.
pub fn cpuid_answer(leaf: u32, subleaf: u32, guest_osxsave: bool) -> nk_loader::cpuid::CpuidRegs {
    use crate::vmx::vmcs::{self, VmcsField};
    const ACTIVATE_SECONDARY: u64 = 1 << 31;
    let primary = vmcs::read(VmcsField::PRIMARY_PROCESSOR_CONTROLS).unwrap_or(0);
    let secondary = match primary & ACTIVATE_SECONDARY {
        0 => 0,
        _ => vmcs::read(VmcsField::SECONDARY_PROCESSOR_CONTROLS).unwrap_or(0) as u32,
    };
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    let host = nk_loader::cpuid::CpuidRegs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx };
    nk_loader::cpuid::guest_cpuid(leaf, subleaf, host, guest_osxsave, secondary)
}

/// A guest image and how to run it, from a boot module and its command line (parsed by
/// [`nk_boot::module`]: `<name> [mem=<size>] [cpu=<index>] [ports=..] [msrs=..] [unsafe-ports] [ring3-caps] [manages=..] [vcpus=<n>] [nvram] [lwc] [-- <args>]`).
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
    /// The words after `--`, handed to the guest (for a Linux guest, its command line).
    pub args: String,
    /// The data modules named by `modules=`, resolved by name at boot.
    pub modules: Vec<(String, &'static [u8])>,
    /// The names `modules=` gave, before resolution.
    pub module_names: Vec<String>,
    /// `data`: a module that is not a guest.
    pub data: bool,
    /// The data module `input=` names (typed into a guest OS's serial port), and its bytes.
    pub input_name: Option<String>,
    pub input: Option<&'static [u8]>,
    /// The guests this VM starts with a `vm` capability to (`manages=`; the guest-OS AM).
    pub manages: Vec<String>,
    /// The exo AM frame quota in bytes (`frames=`; None: the default).
    pub frames: Option<u64>,
    /// `image`: not started at boot; the guest-OS AM creates VMs from it at run time.
    pub image_module: bool,
    /// The images this VM starts with an `image` capability to (`images=`).
    pub images: Vec<String>,
    /// `nvram`: the VM starts with an NVRAM factory (the NVRAM AM).
    pub nvram: bool,
    /// `lwc`: the VM starts with its root lwC's capability (the lwC AM).
    pub lwc: bool,
    /// `disk=`: the bytes of a guest OS's virtio block device (a block-AM range).
    pub disk: Option<u64>,
    /// Debugged over COM2 (`gdb`; gdb.rs).
    pub gdb: bool,
    /// How many vCPUs a bare-metal guest has (`vcpus=`; guest/vcpus.rs).
    pub vcpus: u8,
}

// The parser's list of assignable MSRs is the one the exo effects are checked against.
const _: () = {
    let (a, b) = (nk_boot::module::ASSIGNABLE_MSRS, ioports::MSR_ASSIGNABLE);
    assert!(a.len() == b.len());
    assert!(nk_boot::module::MAX_VCPUS as u64 == nk_abi::vcpu::MAX_VCPUS);
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == b[i]);
        i += 1;
    }
};

impl GuestSpec {
    /// Reads a module command line with [`nk_boot::module::parse`]; a refusal is one line
    /// naming the option and what to write instead. A reserved port given with
    /// `unsafe-ports` is accepted with a warning that names it.
    pub fn from_cmdline(cmdline: &str, image: &'static [u8]) -> Result<Self, String> {
        let spec = nk_boot::module::parse(cmdline).map_err(|e| alloc::format!("{e}"))?;
        if let Some((port, reserved)) = spec.reserved_port() {
            log::warn!(target: "boot", "module '{cmdline}': unsafe-ports gives the guest reserved port {port:#x} ({})",
                reserved.why);
        }
        Ok(GuestSpec {
            name: String::from(spec.name),
            image,
            memory: spec.memory,
            cpu: spec.cpu,
            ports: spec.ports,
            msrs: spec.msrs.to_vec(),
            ring3_caps: spec.ring3_caps,
            args: String::from(spec.args),
            modules: Vec::new(),
            module_names: spec.modules.as_slice().iter().map(|n| String::from(*n)).collect(),
            data: spec.data,
            input_name: spec.input.map(String::from),
            input: None,
            manages: spec.manages.as_slice().iter().map(|n| String::from(*n)).collect(),
            frames: spec.frames,
            image_module: spec.image,
            images: spec.images.as_slice().iter().map(|n| String::from(*n)).collect(),
            nvram: spec.nvram,
            lwc: spec.lwc,
            disk: spec.disk,
            gdb: spec.gdb,
            vcpus: spec.vcpus,
        })
    }
}
