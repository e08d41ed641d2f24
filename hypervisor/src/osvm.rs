//! Guest OSes on the small virtual PC: a Linux bzImage entered through the 64-bit boot
//! protocol, or a Multiboot (v1/v2) kernel entered in 32-bit protected mode. The loaders,
//! the devices, the MSR policy and the CPUID answers are the host-tested crates
//! (`nk_loader::{bzimage, multiboot}`, `nk_devices`); this file only writes guest memory,
//! routes the exits of such a VM to them, and owns what needs the VMCS: interrupt
//! injection with interrupt-window exiting, the virtual APIC timer on the VMX preemption
//! timer, and the MSRs switched at slice boundaries.

use alloc::format;
use alloc::string::String;

use nk_devices::acpi::AcpiTables;
use nk_devices::lapic;
use nk_devices::mmio::{self, AccessKind, MmioOp};
use nk_devices::msr::{self, MsrFile, Route, VmcsMsr};
use nk_devices::pc::{PcEvent, VirtualPc};
use nk_devices::virtio_blk::{self, VirtioBlk, WriteEffect};
use nk_loader::image::{GuestMemory, ImageKind, OutOfGuest};
use nk_loader::{bzimage, multiboot};

use crate::guest::GuestSpec;
use crate::vmx::vcpu::{GuestRegs, StartMode, Vcpu, VcpuError};
use crate::vmx::vmcs::ExitReason;

/// Where the VM's ACPI tables go (in the BIOS area the E820 map reserves).
const ACPI_GPA: u64 = 0xE_0000;
/// Where the virtio-mmio block device's registers are (guest-physical, above the open
/// bus and below the xAPIC page: nothing else is mapped there) and its ISA interrupt
/// (free on the virtual PC: COM1 is 4, the SCI 9).
pub const VIRTIO_GPA: u64 = 0xD000_0000;
pub const VIRTIO_IRQ: u8 = 5;
/// The wall clock the virtual RTC starts from (2026-01-01 00:00:00 UTC).
const RTC_EPOCH: u64 = 1_767_225_600;

/// Guest memory as the loaders write it: the VM's frames, identity-mapped in the host.
pub struct GuestRam {
    pub base: u64,
    pub size: u64,
}

impl GuestMemory for GuestRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), OutOfGuest> {
        let err = OutOfGuest { gpa, len: bytes.len() as u64 };
        let end = gpa.checked_add(bytes.len() as u64).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        // SAFETY: [gpa, end) lies inside the VM's memory (checked above), which the VM
        // owns and which is identity-mapped; the VM is not running while it is loaded.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.base + gpa) as *mut u8, bytes.len()) };
        Ok(())
    }
}

/// Guest memory that only checks bounds: the loader run against it tells whether an image
/// fits in `size` bytes without writing anything (the guest-OS AM's `create`).
pub struct Bounds {
    pub size: u64,
}

impl GuestMemory for Bounds {
    fn size(&self) -> u64 {
        self.size
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), OutOfGuest> {
        let err = OutOfGuest { gpa, len: bytes.len() as u64 };
        let end = gpa.checked_add(bytes.len() as u64).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        Ok(())
    }
}

/// How a loaded guest OS starts.
pub struct OsStart {
    pub mode: StartMode,
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
    pub regs: GuestRegs,
}

/// Loads a guest OS of `kind` into `ram` (zeroed): the kernel, its modules, the ACPI
/// tables, and the boot data its protocol prescribes. A refusal is one line. `report`
/// logs what was loaded where (off for a dry run against [`Bounds`]).
///
/// The ACPI tables include the NKCP table (`nk_abi::nkcp`) listing `handed`: the VM's
/// initial capabilities with labels, which Linux shows to root only, as
/// /sys/firmware/acpi/tables/NKCP. That is how the VM's operator hands capabilities to
/// the processes it chooses. This function runs where the VM's kernel instance may be
/// locked (on the creator's CPU), so the VM's CPU writes the tables again with the real
/// list before the VM first runs ([`write_acpi`]): every table's place is independent of
/// the NKCP table's length, which comes last.
pub fn load(
    vm: nk_caps::VmId,
    kind: ImageKind,
    spec: &GuestSpec,
    ram: &mut dyn GuestMemory,
    report: bool,
    handed: &[nk_abi::nkcp::Entry],
) -> Result<OsStart, String> {
    let acpi = tables(spec, handed);
    ram.write(ACPI_GPA, &acpi.blob).map_err(|e| format!("ACPI tables: {e}"))?;
    let image = spec.image;
    match kind {
        ImageKind::BzImage => {
            let bz = bzimage::parse(image).map_err(|e| format!("{e}"))?;
            if spec.modules.len() > 1 {
                return Err(String::from("a Linux guest takes one module (its initramfs) in modules="));
            }
            let initrd = spec.modules.first().map(|(_, bytes)| *bytes);
            let e = bzimage::load(ram, image, &bz, &spec.args, initrd, Some(acpi.rsdp_addr()))
                .map_err(|e| format!("{e}"))?;
            if report {
                log::info!(target: "guest", "vm{}/{}: Linux boot protocol {}.{:02}, kernel at {:#x} (entry {:#x}), {} KiB initramfs{}, command line '{}'",
                vm.raw(), spec.name, bz.protocol >> 8, bz.protocol & 0xFF, bz.pref_address, e.rip,
                e.initrd.map_or(0, |(_, len)| len / 1024),
                e.initrd.map(|(at, _)| format!(" at {at:#x}")).unwrap_or_default(), spec.args);
            }
            Ok(OsStart {
                mode: StartMode::Os64 { gdt_base: e.gdt_base, gdt_limit: e.gdt_limit },
                rip: e.rip,
                rsp: 0,
                cr3: e.cr3,
                regs: GuestRegs { rsi: e.rsi, ..GuestRegs::default() },
            })
        }
        ImageKind::Multiboot1 { header } | ImageKind::Multiboot2 { header } => {
            let mut modules = [multiboot::Module { bytes: &[], cmdline: "" }; nk_boot::module::MAX_MODULES];
            for (slot, (name, bytes)) in modules.iter_mut().zip(&spec.modules) {
                *slot = multiboot::Module { bytes, cmdline: name };
            }
            let modules = &modules[..spec.modules.len()];
            let rsdp = &acpi.blob[..36];
            let e = match kind {
                ImageKind::Multiboot1 { .. } => multiboot::load_v1(ram, image, header, &spec.args, modules),
                _ => multiboot::load_v2(ram, image, header, &spec.args, modules, Some(rsdp)),
            }
            .map_err(|e| format!("{e}"))?;
            if report {
                log::info!(target: "guest", "vm{}/{}: {} entered at {:#x} in 32-bit protected mode, {} module(s), information at {:#x}",
                    vm.raw(), spec.name, kind.name(), e.eip, modules.len(), e.ebx);
            }
            Ok(OsStart {
                mode: StartMode::Os32 { gdt_base: e.gdt_base, gdt_limit: e.gdt_limit },
                rip: u64::from(e.eip),
                rsp: u64::from(e.esp),
                cr3: 0,
                regs: GuestRegs { rax: u64::from(e.eax), rbx: u64::from(e.ebx), ..GuestRegs::default() },
            })
        }
        ImageKind::Elf64 | ImageKind::Unknown => Err(String::from("not a guest OS image")),
    }
}

/// Writes the VM's ACPI tables again with `handed` in its NKCP table (the same tables
/// [`load`] wrote, at the same places: only the NKCP table, the last, changes length), and
/// logs how many capabilities it hands over. The tables must end below 1 MiB, in the BIOS
/// area the E820 map reserves.
pub fn write_acpi(
    vm: nk_caps::VmId,
    spec: &GuestSpec,
    ram: &mut dyn GuestMemory,
    handed: &[nk_abi::nkcp::Entry],
) -> Result<(), String> {
    let acpi = tables(spec, handed);
    if ACPI_GPA + acpi.blob.len() as u64 > 0x10_0000 {
        return Err(format!("{} bytes of ACPI tables do not fit below 1 MiB", acpi.blob.len()));
    }
    ram.write(ACPI_GPA, &acpi.blob).map_err(|e| format!("ACPI tables: {e}"))?;
    log::info!(target: "guest", "vm{}/{}: {} capabilities handed to its root processes in the NKCP ACPI table",
        vm.raw(), spec.name, handed.len());
    Ok(())
}

/// The VM's ACPI tables: the NKCP table listing `handed`, and in the DSDT the virtio-mmio
/// block device (`LNRO0005`) when the module says `disk=`.
fn tables(spec: &GuestSpec, handed: &[nk_abi::nkcp::Entry]) -> AcpiTables {
    let nkcp = nk_devices::acpi::nkcp_table(handed);
    let devices = match spec.disk {
        Some(_) => {
            nk_devices::acpi::virtio_mmio_device(0, VIRTIO_GPA as u32, virtio_blk::WINDOW as u32, u32::from(VIRTIO_IRQ))
        }
        None => alloc::vec::Vec::new(),
    };
    AcpiTables::build_with_devices(ACPI_GPA, 1, &[&nkcp], &devices)
}

/// The VM's RAM as the virtio device reaches it (host address, size): every access is
/// checked to lie inside it.
struct RamView {
    base: u64,
    size: u64,
}

impl RamView {
    fn range(&self, gpa: u64, len: usize) -> Option<u64> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.size).then_some(self.base + gpa)
    }
}

impl virtio_blk::GuestMemory for RamView {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(at) = self.range(gpa, buf.len()) else { return false };
        // SAFETY: [gpa, gpa + len) lies inside the VM's RAM (checked), identity-mapped in
        // the host; the VM's vCPU is not running while its exit is handled.
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(at) = self.range(gpa, data.len()) else { return false };
        // SAFETY: as in `read`; the VM owns these bytes, the hypervisor uses none of them.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), at as *mut u8, data.len()) };
        true
    }
}

/// The virtio device's blocks: the block AM's range the VM holds its initial capability
/// to, each access an operation on that capability (`NullKernel::call_for_vm`), checked
/// as the VM's own hypercall would be. Offsets past the range, or a capability the VM no
/// longer holds, fail the request.
///
/// The block AM's operations and the capability are looked up by name once per kernel
/// instance ([`BlockRoute`], kept by the device), not at every request; each request is
/// still checked in full (a capability revoked since fails it).
struct BlockAmBackend<'a> {
    vm: nk_caps::VmId,
    cpu: usize,
    route: &'a mut Option<BlockRoute>,
}

/// The block AM's `read`, `write` and `fence` and the VM's range capability, as resolved
/// on kernel instance `cpu`.
#[derive(Clone, Copy)]
struct BlockRoute {
    cpu: usize,
    route: nk_core::DeviceRoute<3>,
}

impl BlockAmBackend<'_> {
    fn call(&mut self, which: usize, offset: u64, data: &mut [u8]) -> bool {
        let mesh = crate::mesh::mesh();
        let route = match *self.route {
            Some(r) if r.cpu == self.cpu => r.route,
            _ => match mesh.device_route(self.cpu, self.vm, "block", ["read", "write", "fence"]) {
                Some(route) => self.route.insert(BlockRoute { cpu: self.cpu, route }).route,
                None => return false,
            },
        };
        let args = [offset, data.len() as u64, 0, 0, 0];
        mesh.device_call_routed(self.cpu, self.vm, route.ops[which], route.cap, &args, data).is_ok()
    }
}

impl virtio_blk::Backend for BlockAmBackend<'_> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> bool {
        self.call(0, offset, buf)
    }

    fn write(&mut self, offset: u64, data: &mut [u8]) -> bool {
        self.call(1, offset, data)
    }

    fn flush(&mut self) -> bool {
        self.call(2, 0, &mut [])
    }
}

/// A guest OS's virtio block device and whose capability serves it.
struct Disk {
    dev: VirtioBlk,
    vm: nk_caps::VmId,
    broken_logged: bool,
    /// The block AM's operations and the VM's capability, resolved at the first request.
    route: Option<BlockRoute>,
}

/// What an exit of a guest OS leads to.
pub enum OsFlow {
    Continue,
    /// The vCPU waits for an interrupt (HLT with interrupts on): the rest of the slice goes
    /// to the CPU's other guests.
    Idle,
    /// The guest ended itself (power-off, reset, halt with interrupts off).
    Ended(String),
    /// The guest did something the VM does not allow.
    Stopped(String),
}

/// The per-VM state of a guest OS.
pub struct OsVm {
    pub kind: ImageKind,
    pc: VirtualPc,
    msrs: MsrFile,
    /// The VM's values of [`msr::SWITCHED`] but KERNEL_GS_BASE (switched for every guest).
    switched: [u64; msr::SWITCHED.len()],
    halted: bool,
    tsc_hz: u64,
    /// Interrupts injected and timer expiries, for the VM's end line.
    pub injected: u64,
    pub timer_fires: u64,
    /// Exits by basic reason (the last slot counts reasons above 63).
    pub exits_by_reason: [u64; 65],
    /// The TSC when the VM was created (its power-on).
    power_on: u64,
    /// Whether the guest printed its `LINUX-OK` line yet.
    reached_linux_ok: bool,
    /// Bytes still to type into the UART (`input=`), fed as its receive FIFO drains.
    console_input: &'static [u8],
    /// The VM's RAM (host address, size) once its xAPIC page is the APIC-access page
    /// (`set_ram`); None keeps the xAPIC page an EPT violation.
    ram: Option<(u64, u64)>,
    /// The virtio block device (`disk=`).
    disk: Option<alloc::boxed::Box<Disk>>,
}

/// Where the open bus of a guest OS ends ([`OsVm::open_bus`]): the end of the NVRAM AM's
/// window, above the exo AM's range.
const OPEN_BUS_END: u64 = 2 << 30;

impl OsVm {
    /// Returns the VM's machine in its firmware state.
    pub fn new(kind: ImageKind) -> Self {
        let mut pc = VirtualPc::new();
        // The firmware hands over the APIC in x2APIC mode: with no IO-APIC in the MADT,
        // Linux keeps it ("x2apic enabled by BIOS") and only MSRs reach it.
        let base = pc.lapic.apic_base() | nk_devices::lapic::BASE_EXTD;
        let _ = pc.lapic.write_apic_base(base);
        Self {
            kind,
            pc,
            msrs: MsrFile::new(),
            switched: [0; msr::SWITCHED.len()],
            halted: false,
            tsc_hz: crate::arch::tsc_hz(),
            injected: 0,
            timer_fires: 0,
            exits_by_reason: [0; 65],
            power_on: crate::arch::rdtsc(),
            reached_linux_ok: false,
            console_input: &[],
            ram: None,
            disk: None,
        }
    }

    /// Gives the VM its virtio block device of `bytes` (`disk=`), served from the block
    /// AM range `vm` holds (granted at creation, ams.rs); the ACPI tables list it.
    pub fn attach_disk(&mut self, vm: nk_caps::VmId, bytes: u64) {
        self.disk =
            Some(alloc::boxed::Box::new(Disk { dev: VirtioBlk::new(bytes), vm, broken_logged: false, route: None }));
    }

    /// Emulates the `MOV` that touched the virtio device's registers at `gpa` (an EPT
    /// violation: nothing is mapped there): a load reads a register, a store writes one,
    /// and a `QueueNotify` serves the queue on the block AM before the guest goes on. The
    /// device's interrupt line goes to the 8259 as [`VIRTIO_IRQ`]. A malformed ring breaks
    /// the device (one log line), not the VM; an instruction the decoder does not know
    /// stops the VM with a line. Cold and out of line: the exit paths of other reasons
    /// (VMCALL above all) keep their code.
    #[cold]
    #[inline(never)]
    fn virtio_exit(&mut self, gpa: u64, vcpu: &mut Vcpu, prefix: &str) -> Result<OsFlow, VcpuError> {
        let q = vcpu.exit_qualification()?;
        if q & (1 << 2) != 0 {
            return Ok(OsFlow::Stopped(format!("instruction fetch from the virtio device's registers at {gpa:#x}")));
        }
        let long = vcpu.guest_msr(VmcsMsr::Efer)? & (1 << 10) != 0;
        let (code, n) = self.fetch_instruction(vcpu, long)?;
        let Some(access) = mmio::decode_access(&code[..n], long) else {
            return Ok(OsFlow::Stopped(format!(
                "virtio register access at {gpa:#x} by an instruction the VM does not emulate (bytes {:02x?}; an 8/16/32-bit MOV or MOVZX is)",
                &code[..n.min(8)]
            )));
        };
        let Some((base, size)) = self.ram else {
            return Ok(OsFlow::Stopped(String::from("virtio access before the VM's RAM is known")));
        };
        let Some(disk) = self.disk.as_mut() else { return Ok(OsFlow::Stopped(String::from("no virtio device"))) };
        let offset = gpa - VIRTIO_GPA;
        match access.kind {
            AccessKind::Load { gpr, .. } => {
                let value = disk.dev.read(offset, access.size);
                let old = vcpu.gpr(gpr)?;
                vcpu.set_gpr(gpr, access.loaded(old, value))?;
            }
            AccessKind::Store { gpr, .. } => {
                let value = access.stored(vcpu.gpr(gpr)?);
                disk.write(offset, access.size, value, RamView { base, size }, prefix);
            }
            AccessKind::StoreImm(_) => {
                let value = access.stored(0);
                disk.write(offset, access.size, value, RamView { base, size }, prefix);
            }
        }
        self.pc.pic.set_irq(VIRTIO_IRQ, disk.dev.irq_level());
        vcpu.skip_bytes(u64::from(access.len))?;
        Ok(OsFlow::Continue)
    }

    /// Returns the virtio device's counters line for the VM's end (None without a disk).
    pub fn disk_summary(&self) -> Option<String> {
        let disk = self.disk.as_ref()?;
        let c = disk.dev.counters;
        Some(format!(
            "virtio-blk: {} reads ({} KiB), {} writes ({} KiB), {} flushes, {} failed requests{}",
            c.reads,
            c.bytes_read / 1024,
            c.writes,
            c.bytes_written / 1024,
            c.flushes,
            c.failed,
            disk.dev.broken().map(|why| format!("; broken by {}", why.describe())).unwrap_or_default()
        ))
    }

    /// Tells the VM that its xAPIC page is the vCPU's APIC-access page (SDM Vol. 3 §30.4)
    /// and where its RAM is (host address, size), for fetching the instructions of
    /// APIC-access exits.
    pub fn set_ram(&mut self, base: u64, size: u64) {
        self.ram = Some((base, size));
    }

    /// Takes the guest's virtual TPR (CR8 under the TPR shadow, or an xAPIC TPR write
    /// that APIC-register virtualization completed without an exit) into the model.
    fn pull_tpr(&mut self, vcpu: &Vcpu) {
        if vcpu.has_tpr_shadow() {
            let tpr = vcpu.virtual_apic_read(lapic::reg::TPR) & 0xFF;
            self.pc.lapic.write(lapic::reg::TPR, tpr, 0);
        }
    }

    /// Makes the virtual-APIC page show the model: every register APIC-register
    /// virtualization reads from it in xAPIC mode (SDM Vol. 3 §30.4.2.1), else the TPR.
    fn push_page(&self, vcpu: &mut Vcpu) {
        let now = self.now();
        if self.ram.is_some() && !self.pc.lapic.x2apic() {
            for offset in lapic::LocalApic::page_offsets() {
                vcpu.virtual_apic_write(offset, self.pc.lapic.read(offset, now));
            }
        } else {
            vcpu.virtual_apic_write(lapic::reg::TPR, self.pc.lapic.read(lapic::reg::TPR, now));
        }
    }

    /// Returns the guest-physical address of linear address `linear` for an instruction
    /// fetch: paging off, or 4-level long-mode paging walked in the VM's RAM (SDM Vol. 3
    /// §4.5); None where the walk fails or the paging mode is another.
    fn translate(&self, linear: u64, cr0: u64, cr3: u64, long: bool) -> Option<u64> {
        if cr0 & (1 << 31) == 0 {
            return Some(linear & 0xFFFF_FFFF);
        }
        if !long {
            return None;
        }
        let mut table = cr3 & 0x000F_FFFF_FFFF_F000;
        for level in (0..4).rev() {
            let index = (linear >> (12 + 9 * level)) & 0x1FF;
            let entry = self.read_ram_u64(table + index * 8)?;
            if entry & 1 == 0 {
                return None;
            }
            let frame = entry & 0x000F_FFFF_FFFF_F000;
            if level == 0 {
                return Some(frame | (linear & 0xFFF));
            }
            if entry & 0x80 != 0 && level <= 2 {
                let size = 1u64 << (12 + 9 * level);
                return Some((frame & !(size - 1)) | (linear & (size - 1)));
            }
            table = frame;
        }
        None
    }

    fn read_ram_u64(&self, gpa: u64) -> Option<u64> {
        let (base, size) = self.ram?;
        if !gpa.is_multiple_of(8) || gpa.checked_add(8)? > size {
            return None;
        }
        // SAFETY: [gpa, gpa + 8) lies inside the VM's RAM (checked), identity-mapped in
        // the host and aligned; the guest is not running on this CPU while its exit is
        // handled (a racing write by another vCPU could only give a stale value).
        Some(unsafe { ((base + gpa) as *const u64).read_volatile() })
    }

    fn read_ram_u8(&self, gpa: u64) -> Option<u8> {
        let (base, size) = self.ram?;
        if gpa >= size {
            return None;
        }
        // SAFETY: as in `read_ram_u64`, one byte inside the VM's RAM.
        Some(unsafe { ((base + gpa) as *const u8).read_volatile() })
    }

    /// Fetches up to 15 bytes of the instruction at the guest's RIP (fewer where a page
    /// cannot be translated: the decoder then refuses the truncated form).
    fn fetch_instruction(&self, vcpu: &Vcpu, long: bool) -> Result<([u8; 15], usize), VcpuError> {
        let (cr0, cr3, cs_base) = vcpu.code_context()?;
        let rip = vcpu.rip()?;
        let start = if long { rip } else { cs_base.wrapping_add(rip) & 0xFFFF_FFFF };
        let mut bytes = [0u8; 15];
        let mut n = 0;
        for (i, byte) in bytes.iter_mut().enumerate() {
            let Some(b) =
                self.translate(start.wrapping_add(i as u64), cr0, cr3, long).and_then(|gpa| self.read_ram_u8(gpa))
            else {
                break;
            };
            *byte = b;
            n += 1;
        }
        Ok((bytes, n))
    }

    /// Handles an APIC-write exit (trap-like, the write already in the virtual-APIC
    /// page, SDM Vol. 3 §30.4.3.3) or an APIC-access exit (fault-like, SDM §30.4: the
    /// instruction is decoded and emulated).
    fn apic_exit(&mut self, reason: ExitReason, vcpu: &mut Vcpu) -> Result<OsFlow, VcpuError> {
        let q = vcpu.exit_qualification()?;
        let offset = (q & 0xFFF) as u32;
        let now = self.now();
        if reason == ExitReason::APIC_WRITE {
            let value = vcpu.virtual_apic_read(offset);
            return Ok(match self.pc.lapic.mmio_write(offset, value, now) {
                Ok(_) => OsFlow::Continue,
                Err(_) => OsFlow::Stopped(format!(
                    "wrote the xAPIC page at offset {offset:#x} while its APIC is {}",
                    if self.pc.lapic.x2apic() { "in x2APIC mode (use its MSRs)" } else { "disabled" }
                )),
            });
        }
        let kind = (q >> 12) & 0xF;
        if kind > 1 {
            return Ok(OsFlow::Stopped(format!(
                "APIC access of type {kind} at offset {offset:#x} (only data reads and writes of the xAPIC page are emulated)"
            )));
        }
        let long = vcpu.guest_msr(VmcsMsr::Efer)? & (1 << 10) != 0;
        let (code, n) = self.fetch_instruction(vcpu, long)?;
        if n == 0 {
            return Ok(OsFlow::Stopped(format!(
                "xAPIC access at offset {offset:#x}: its instruction could not be fetched (emulated for paging off and 4-level paging)"
            )));
        }
        let Some(insn) = mmio::decode(&code[..n], long) else {
            return Ok(OsFlow::Stopped(format!(
                "xAPIC access at offset {offset:#x} by an instruction the VM does not emulate (bytes {:02x?}; a 32-bit MOV is)",
                &code[..n.min(8)]
            )));
        };
        let result = match insn.op {
            MmioOp::Load { gpr } => match self.pc.lapic.mmio_read(offset, now) {
                Ok(value) => vcpu.set_gpr(gpr, u64::from(value)).map(|()| true)?,
                Err(_) => false,
            },
            MmioOp::Store { gpr } => {
                let value = vcpu.gpr(gpr)? as u32;
                self.pc.lapic.mmio_write(offset, value, now).is_ok()
            }
            MmioOp::StoreImm(value) => self.pc.lapic.mmio_write(offset, value, now).is_ok(),
        };
        if !result {
            return Ok(OsFlow::Stopped(format!(
                "xAPIC access at offset {offset:#x} refused (APIC in x2APIC mode or disabled, or not a whole register)"
            )));
        }
        vcpu.skip_bytes(u64::from(insn.len))?;
        Ok(OsFlow::Continue)
    }

    /// Emulates a `MOV` (8, 16 or 32 bits, `mmio::decode_access`) to guest-physical `gpa` where nothing is mapped, above the
    /// VM's RAM and below [`OPEN_BUS_END`] (where the exo and NVRAM AMs map frames on a
    /// caller's request, and a process reaches them through `/dev/mem`), as a PC's bus
    /// does with an unclaimed cycle: a load reads all ones, a store goes nowhere. So a
    /// process that looks where no capability mapped anything (before `map`, after an
    /// unmap or a revocation) finds nothing, and Linux goes on. Returns false (the VM is
    /// then stopped, as for any other EPT violation) for anything else: a page that is
    /// mapped (a write to a read-only mapping), an instruction fetch, another instruction.
    /// The exit qualification's bits 3-5 are the permissions of the translation, all 0
    /// when nothing is mapped (SDM Vol. 3C §28.2.3.2, Table 28-7).
    fn open_bus(&mut self, gpa: u64, vcpu: &mut Vcpu, prefix: &str) -> Result<bool, VcpuError> {
        let Some((_, ram)) = self.ram else { return Ok(false) };
        let q = vcpu.exit_qualification()?;
        let (fetch, mapped) = (q & (1 << 2) != 0, q & (0b111 << 3) != 0);
        if gpa < ram || gpa >= OPEN_BUS_END || fetch || mapped {
            return Ok(false);
        }
        let long = vcpu.guest_msr(VmcsMsr::Efer)? & (1 << 10) != 0;
        let (code, n) = self.fetch_instruction(vcpu, long)?;
        let Some(access) = mmio::decode_access(&code[..n], long) else { return Ok(false) };
        let what = match access.kind {
            AccessKind::Load { gpr, .. } => {
                let old = vcpu.gpr(gpr)?;
                vcpu.set_gpr(gpr, access.loaded(old, u32::MAX))?;
                "read all ones"
            }
            AccessKind::Store { .. } | AccessKind::StoreImm(_) => "write dropped",
        };
        vcpu.skip_bytes(u64::from(access.len))?;
        log::info!(target: "guest", "{prefix}: nothing mapped at guest-physical {gpa:#x}: {what} (open bus)");
        Ok(true)
    }

    /// Queues `bytes` to be typed into the VM's serial port.
    pub fn set_console_input(&mut self, bytes: &'static [u8]) {
        self.console_input = bytes;
    }

    /// Loads the VM's switched MSRs into the processor (at the start of its slice).
    pub fn load_switched(&self) {
        for (i, &m) in msr::SWITCHED.iter().enumerate() {
            if m != msr::index::KERNEL_GS_BASE && m != msr::index::TSC_AUX {
                // SAFETY: STAR/LSTAR/CSTAR/SFMASK/TSC_AUX exist on every x86-64 CPU with
                // RDTSCP; the host does not use them (no SYSCALL, no RDTSCP in the
                // hypervisor), and other guests cannot reach them.
                unsafe { x86::msr::wrmsr(m, self.switched[i]) };
            }
        }
    }

    fn now(&self) -> u64 {
        crate::arch::rdtsc()
    }

    fn unix_seconds(&self) -> u64 {
        RTC_EPOCH + self.now() / self.tsc_hz.max(1)
    }

    /// Advances the APIC timer to now; returns whether the vCPU has something to do
    /// (it is not halted, or an interrupt woke it).
    pub fn poll(&mut self) -> bool {
        if !self.console_input.is_empty() && self.pc.uart.listening() {
            let taken = self.pc.uart.feed(self.console_input);
            self.console_input = &self.console_input[taken..];
        }
        let now = self.now();
        if self.pc.lapic.next_timer_deadline().is_some_and(|d| d <= now) {
            self.timer_fires += 1;
            self.pc.lapic.tick(now);
        }
        self.pc.sync_irqs();
        if self.halted && self.pc.pending().is_some() {
            self.halted = false;
        }
        !self.halted
    }

    /// Prepares the next VM entry: injects the highest pending interrupt if the guest can
    /// take it, else asks for an interrupt-window exit; arms the preemption timer for the
    /// earlier of the slice's end and the APIC timer's deadline.
    pub fn before_entry(&mut self, vcpu: &mut Vcpu, slice_end: u64, rate: u8) -> Result<(), VcpuError> {
        self.pull_tpr(vcpu);
        self.poll();
        let pending = self.pc.pending().is_some();
        if pending && vcpu.interrupt_window_open()? {
            if let Some(vector) = self.pc.take_interrupt() {
                vcpu.inject_external_interrupt(vector)?;
                self.injected += 1;
            }
        }
        vcpu.set_interrupt_window(self.pc.pending().is_some())?;
        self.push_page(vcpu);
        // A request the TPR holds back: exit when the guest lowers its TPR (CR8 or an
        // xAPIC write that register virtualization completes) below its class, at most
        // the TPR's own class (the VM-entry check, SDM Vol. 3 §26.2.1.1).
        let tpr_class = (self.pc.lapic.read(lapic::reg::TPR, 0) >> 4) as u8;
        vcpu.set_tpr_threshold(self.pc.lapic.blocked_class().map_or(0, |c| c.min(tpr_class)))?;
        let now = self.now();
        let until = match self.pc.lapic.next_timer_deadline() {
            Some(deadline) => deadline.min(slice_end),
            None => slice_end,
        };
        vcpu.set_time_slice(until.saturating_sub(now).max(1), rate)
    }

    /// Counts an exit by its reason.
    pub fn count_exit(&mut self, reason: ExitReason) {
        self.exits_by_reason[usize::from(reason.0).min(64)] += 1;
    }

    /// Returns the VM's statistics as one line: exits by reason (most frequent first),
    /// interrupts injected, APIC timer expiries.
    pub fn summary(&self) -> String {
        let mut reasons: alloc::vec::Vec<(usize, u64)> =
            self.exits_by_reason.iter().copied().enumerate().filter(|&(_, n)| n > 0).collect();
        reasons.sort_by_key(|&(_, n)| core::cmp::Reverse(n));
        let mut text = alloc::format!("{}: exits by reason:", self.kind.name());
        for (reason, n) in reasons {
            text.push_str(&format!(" {}={n}", exit_name(reason)));
        }
        text.push_str(&format!("; {} interrupts injected, {} APIC timer expiries", self.injected, self.timer_fires));
        text
    }

    /// Hands the UART's unfinished output line to the log (at the VM's end).
    pub fn flush_console(&mut self, prefix: &str) {
        if self.pc.uart.has_partial_line() {
            self.pc.uart.flush(&mut |line| log_line(prefix, line));
        }
    }

    /// Handles one exit of the guest OS (all but the preemption timer's and external
    /// interrupts', which the slice loop handles).
    pub fn handle_exit(&mut self, reason: ExitReason, vcpu: &mut Vcpu, prefix: &str) -> Result<OsFlow, VcpuError> {
        self.pull_tpr(vcpu);
        let flow = self.handle_exit_inner(reason, vcpu, prefix);
        self.push_page(vcpu);
        flow
    }

    fn handle_exit_inner(&mut self, reason: ExitReason, vcpu: &mut Vcpu, prefix: &str) -> Result<OsFlow, VcpuError> {
        match reason {
            ExitReason::APIC_WRITE | ExitReason::APIC_ACCESS if self.ram.is_some() => {
                return self.apic_exit(reason, vcpu);
            }
            ExitReason::IO_INSTRUCTION => {
                let q = vcpu.exit_qualification()?;
                let (size, is_in, string, rep, port) =
                    ((q & 7) as u8 + 1, q & 8 != 0, q & 16 != 0, q & 32 != 0, (q >> 16) as u16);
                if string || rep {
                    return Ok(OsFlow::Stopped(format!(
                        "string I/O (INS/OUTS) on port {port:#x}, which the virtual PC does not emulate"
                    )));
                }
                let mask = match size {
                    1 => 0xFF,
                    2 => 0xFFFF,
                    _ => 0xFFFF_FFFF,
                };
                if is_in {
                    let value = u64::from(self.pc.io_in(port, size, self.unix_seconds())) & mask;
                    vcpu.regs.rax = if size == 4 { value } else { (vcpu.regs.rax & !mask) | value };
                    vcpu.skip_instruction()?;
                } else {
                    let value = (vcpu.regs.rax & mask) as u32;
                    let mut linux_ok = false;
                    let event = self.pc.io_out(port, size, value, &mut |line| {
                        log_line(prefix, line);
                        linux_ok |= line.starts_with(b"LINUX-OK");
                    });
                    if linux_ok && !self.reached_linux_ok {
                        // The benchmark's end point (`cargo xtask bench linux`).
                        self.reached_linux_ok = true;
                        log::info!(target: "guest", "{prefix}: LINUX-OK after {} instructions (TSC ticks) from the VM's power-on",
                            self.now().wrapping_sub(self.power_on));
                    }
                    vcpu.skip_instruction()?;
                    match event {
                        PcEvent::None => {}
                        PcEvent::PowerOff => return Ok(OsFlow::Ended(String::from("powered off (ACPI S5)"))),
                        PcEvent::Reset(how) => return Ok(OsFlow::Ended(format!("reset by the guest: {how}"))),
                    }
                }
            }
            ExitReason::CPUID => {
                let osxsave = vcpu.guest_cr4()? & (1 << 18) != 0;
                let (leaf, subleaf) = (vcpu.regs.rax as u32, vcpu.regs.rcx as u32);
                let answer = crate::guest::cpuid_answer(leaf, subleaf, osxsave);
                let r = nk_loader::cpuid::os_guest_cpuid(leaf, subleaf, answer, self.tsc_hz as u32, 0);
                (vcpu.regs.rax, vcpu.regs.rbx, vcpu.regs.rcx, vcpu.regs.rdx) =
                    (u64::from(r.eax), u64::from(r.ebx), u64::from(r.ecx), u64::from(r.edx));
                vcpu.skip_instruction()?;
            }
            ExitReason::RDMSR => {
                let index = vcpu.regs.rcx as u32;
                match self.read_msr(index, vcpu)? {
                    Some(value) => {
                        vcpu.regs.rax = value & 0xFFFF_FFFF;
                        vcpu.regs.rdx = value >> 32;
                        vcpu.skip_instruction()?;
                    }
                    None => vcpu.inject_exception(13, Some(0))?,
                }
            }
            ExitReason::WRMSR => {
                let index = vcpu.regs.rcx as u32;
                let value = (vcpu.regs.rdx << 32) | (vcpu.regs.rax & 0xFFFF_FFFF);
                if self.write_msr(index, value, vcpu)? {
                    vcpu.skip_instruction()?;
                } else {
                    vcpu.inject_exception(13, Some(0))?;
                }
            }
            ExitReason::HLT => {
                vcpu.skip_instruction()?;
                if !vcpu.interrupts_enabled()? {
                    return Ok(OsFlow::Ended(String::from("halted with interrupts off")));
                }
                self.pc.sync_irqs();
                if self.pc.pending().is_none() {
                    self.halted = true;
                    return Ok(OsFlow::Idle);
                }
            }
            // The new TPR is in the model (pull_tpr); before_entry injects what it allows.
            ExitReason::INTERRUPT_WINDOW | ExitReason::TPR_BELOW_THRESHOLD => {}
            ExitReason::TRIPLE_FAULT => {
                let rip = vcpu.rip().unwrap_or(0);
                return Ok(OsFlow::Ended(format!("reset by a triple fault (rip {rip:#x})")));
            }
            ExitReason::INIT_SIGNAL => return Ok(OsFlow::Ended(String::from("reset by an INIT signal"))),
            ExitReason::EPT_VIOLATION => {
                let gpa = vcpu.guest_physical()?;
                if self.disk.is_some() && (VIRTIO_GPA..VIRTIO_GPA + virtio_blk::WINDOW).contains(&gpa) {
                    return self.virtio_exit(gpa, vcpu, prefix);
                }
                if self.open_bus(gpa, vcpu, prefix)? {
                    return Ok(OsFlow::Continue);
                }
                let what = if (0xFEE0_0000..0xFEE0_1000).contains(&gpa) {
                    " (the xAPIC page: this CPU cannot virtualize APIC accesses, use the x2APIC MSRs)"
                } else {
                    ""
                };
                return Ok(OsFlow::Stopped(format!(
                    "access to guest-physical {gpa:#x} outside its memory (EPT violation){what}"
                )));
            }
            other => return Ok(OsFlow::Stopped(format!("unhandled VM exit, reason {}", other.0))),
        }
        Ok(OsFlow::Continue)
    }

    fn read_msr(&mut self, index: u32, vcpu: &mut Vcpu) -> Result<Option<u64>, VcpuError> {
        let now = self.now();
        Ok(match msr::route(index) {
            Route::Vmcs(which) => Some(vcpu.guest_msr(which)?),
            Route::Switched if index == msr::index::KERNEL_GS_BASE => {
                // SAFETY: IA32_KERNEL_GS_BASE holds this guest's value during its slice.
                Some(unsafe { x86::msr::rdmsr(index) })
            }
            Route::Switched => msr::SWITCHED.iter().position(|&m| m == index).map(|i| self.switched[i]),
            Route::ApicBase => Some(self.pc.lapic.apic_base()),
            Route::TscDeadline => Some(self.pc.lapic.tsc_deadline()),
            Route::X2apic => self.pc.lapic.read_msr(index, now).ok(),
            Route::Emulated => self.msrs.read(index, now),
            Route::Denied => None,
        })
    }

    fn write_msr(&mut self, index: u32, value: u64, vcpu: &mut Vcpu) -> Result<bool, VcpuError> {
        let now = self.now();
        let canonical = |v: u64| ((v << 16) as i64 >> 16) as u64 == v;
        Ok(match msr::route(index) {
            Route::Vmcs(VmcsMsr::Efer) => {
                if !msr::efer_valid(value) {
                    return Ok(false);
                }
                // LMA is the processor's: keep it.
                let lma = vcpu.guest_msr(VmcsMsr::Efer)? & (1 << 10);
                vcpu.set_guest_msr(VmcsMsr::Efer, (value & !(1 << 10)) | lma)?;
                true
            }
            Route::Vmcs(VmcsMsr::Pat) => msr::pat_valid(value) && vcpu.set_guest_msr(VmcsMsr::Pat, value).is_ok(),
            Route::Vmcs(VmcsMsr::DebugCtl) => value == 0 && vcpu.set_guest_msr(VmcsMsr::DebugCtl, 0).is_ok(),
            Route::Vmcs(which @ (VmcsMsr::FsBase | VmcsMsr::GsBase | VmcsMsr::SysenterEsp | VmcsMsr::SysenterEip)) => {
                canonical(value) && vcpu.set_guest_msr(which, value).is_ok()
            }
            Route::Vmcs(VmcsMsr::SysenterCs) => vcpu.set_guest_msr(VmcsMsr::SysenterCs, value & 0xFFFF_FFFF).is_ok(),
            Route::Switched => {
                let ok = match index {
                    msr::index::STAR => true,
                    msr::index::SFMASK => value >> 32 == 0,
                    msr::index::TSC_AUX => value >> 32 == 0,
                    _ => canonical(value),
                };
                if ok {
                    if let Some(i) = msr::SWITCHED.iter().position(|&m| m == index) {
                        self.switched[i] = value;
                    }
                    // TSC_AUX is only kept: RDTSCP/RDPID are hidden from guests.
                    if index != msr::index::TSC_AUX {
                        // SAFETY: the value passed the architectural checks that would make
                        // WRMSR fault (canonical address, reserved bits); the MSR holds this
                        // guest's value during its slice and is switched at slice boundaries.
                        unsafe { x86::msr::wrmsr(index, value) };
                    }
                }
                ok
            }
            Route::ApicBase => self.pc.lapic.write_apic_base(value).is_ok(),
            Route::TscDeadline => {
                self.pc.lapic.set_tsc_deadline(value);
                true
            }
            Route::X2apic => self.pc.lapic.write_msr(index, value, now).is_ok(),
            Route::Emulated => self.msrs.write(index, value),
            Route::Denied => false,
        })
    }
}

impl Disk {
    /// Writes a register of the device; logs the first time a malformed ring breaks it.
    fn write(&mut self, offset: u64, size: u8, value: u32, mut ram: RamView, prefix: &str) {
        let cpu = crate::percpu::current_index() as usize;
        let mut backend = BlockAmBackend { vm: self.vm, cpu, route: &mut self.route };
        if let WriteEffect::Broke(why) = self.dev.write(offset, size, value, &mut ram, &mut backend) {
            if !self.broken_logged {
                self.broken_logged = true;
                log::warn!(target: "guest", "{prefix}: virtio-blk: device broken by {} (DEVICE_NEEDS_RESET); the VM goes on without it until its driver resets it",
                    why.describe());
            }
        }
    }
}

/// Writes one line of a guest OS's serial output to the hypervisor's console (a tab as a
/// space, any other unprintable byte as `?`).
fn log_line(prefix: &str, line: &[u8]) {
    let printable = |b: u8| match b {
        b'\t' => ' ',
        b if b.is_ascii_graphic() || b == b' ' => b as char,
        _ => '?',
    };
    let text: String = line.iter().map(|&b| printable(b)).collect();
    log::info!(target: "guest", "{prefix}: {text}");
}

/// Names a basic exit reason (SDM Vol. 3 Appendix C) for the statistics line.
fn exit_name(reason: usize) -> String {
    let name = match reason {
        0 => "exception/NMI",
        1 => "external-interrupt",
        2 => "triple-fault",
        7 => "interrupt-window",
        10 => "CPUID",
        12 => "HLT",
        18 => "VMCALL",
        28 => "CR-access",
        30 => "I/O",
        31 => "RDMSR",
        32 => "WRMSR",
        40 => "PAUSE",
        43 => "TPR-below-threshold",
        48 => "EPT-violation",
        52 => "preemption-timer",
        44 => "APIC-access",
        55 => "XSETBV",
        56 => "APIC-write",
        _ => return format!("reason{reason}"),
    };
    String::from(name)
}
