//! The null-Kernel hypervisor: a type-1 VT-x hypervisor that guards every operation of
//! every abstract machine with extensible capabilities (DESIGN.md §1-§2).
//!
//! This crate is the trusted part of the project: the only place for `unsafe` code and
//! hardware access. Blanket assumptions every `unsafe` block here may rely on:
//! - the code runs at CPL0 in 64-bit mode, on the hypervisor's own GDT, IDT and page
//!   tables (the low 4 GiB identity-mapped, the top GiB uncached; W^X: `.text` is the only
//!   executable memory, stack guard pages unmapped, see `hostmap`);
//! - each CPU's GS base points at its own `percpu::PerCpu` slot;
//! - only the hypervisor runs on the machine's CPUs outside VMX non-root operation.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod ams;
mod arch;
mod boot;
mod bootvm;
mod console;
mod exomem;
mod gdb;
mod guest;
mod hostmap;
mod ioports;
mod lwc;
mod memory;
mod mesh;
mod nvram;
mod osvm;
mod percpu;
mod power;
mod sched;
#[cfg(feature = "test-harness")]
mod selftest;
mod smp;
mod storage;
mod vmctl;
mod vmx;

use core::arch::global_asm;
use core::panic::PanicInfo;

use power::ExitStatus;

global_asm!(include_str!("../../boot/src/entry.S"), options(att_syntax));

/// The hypervisor's version, printed at boot.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Entered from the 32-bit boot code (boot/src/entry.S) on the BSP, in long mode on the
/// boot stack, with the boot loader's magic and the physical address of its information.
#[unsafe(no_mangle)]
extern "C" fn nk_main(magic: u64, info_paddr: u64) -> ! {
    smp::init_bsp_early();
    console::init();

    let boot = match boot::load(magic, info_paddr) {
        Ok(boot) => boot,
        Err(why) => {
            log::error!(target: "boot", "cannot read the boot information: {why}");
            power::shutdown(ExitStatus::Failure, "bad boot information");
        }
    };
    console::set_level(boot.log_level());
    log::info!(target: "boot", "null-Kernel hypervisor {VERSION}, booted by {}, command line \"{}\"",
        boot.loader(), boot.cmdline());
    for diagnostic in boot.diagnostics() {
        log::warn!(target: "cmdline", "{diagnostic}");
    }

    boot.log_memory_map();
    match boot.check_pmem_emulation() {
        Ok(Some(range)) => {
            log::info!(target: "mem", "memmap: [{:#x}, {:#x}) set aside as emulated persistent memory (not RAM for the allocators)",
            range.start, range.end())
        }
        Ok(None) => {}
        Err(why) => log::warn!(target: "cmdline", "memmap: {why}; ignored"),
    }
    let stats = memory::init(boot.usable_ranges_without_pmem());
    log::info!(target: "mem", "heap {} KiB, {} frames ({} KiB) free for guests and tables{}",
        stats.heap_bytes / 1024, stats.frames_total, stats.frames_total * 4,
        if stats.ignored_above_4g > 0 { ", memory above 4 GiB not used yet" } else { "" });
    match hostmap::install(&smp::bsp_stack_guards()) {
        Ok(()) => {
            log::info!(target: "mem", "hypervisor mapped W^X (code read-only, data and stacks {}), guard pages under the boot and IST stacks",
            if hostmap::nx_enabled() { "non-executable" } else { "executable: this CPU has no execute-disable" })
        }
        Err(why) => {
            log::error!(target: "mem", "cannot build the hypervisor's page tables ({why}): running on the boot tables (RWX, no guard pages)")
        }
    }

    log::info!(target: "cpu", "{}", arch::cpu_summary());
    // The durable device is chosen before VT-x is needed, so a machine without VMX still
    // reports it (QEMU's IDE disk is checked that way).
    // Persistent memory, when there is some, is the device (storage/pmem.rs).
    if !storage::pmem::init(&boot) {
        storage::init(boot.options.nvram_crash_after);
    }
    #[cfg(feature = "test-harness")]
    if !vmx::cpu_has_vmx() {
        // The durable device's cases need no VT-x (QEMU without KVM runs them).
        if let Some(status) = selftest::run_without_vmx(&boot) {
            power::shutdown(status, "self-test without VMX");
        }
    }
    if !vmx::cpu_has_vmx() {
        log::error!(target: "vmx", "VT-x (VMX) is not available on this CPU: CPUID.1:ECX.VMX (bit 5) is clear \
            (QEMU without KVM hides it; use Bochs or QEMU with -enable-kvm -cpu host on an Intel host); stopping");
        power::shutdown(ExitStatus::Failure, "no VMX");
    }
    log::info!(target: "vmx", "{}", vmx::capabilities());

    let platform = match acpi::discover(boot.rsdp_paddr) {
        Ok(platform) => platform,
        Err(why) => {
            log::error!(target: "acpi", "ACPI discovery failed: {why}; stopping");
            power::shutdown(ExitStatus::Failure, "no ACPI");
        }
    };
    log::info!(target: "acpi", "MADT: {} CPUs{}, local APIC at {:#x}, {} I/O APIC(s){}",
        platform.cpu_count,
        if platform.cpus_ignored > 0 { " (more ignored)" } else { "" },
        platform.local_apic_address, platform.io_apic_count,
        platform.io_apic_address.map(|a| alloc::format!(" (first at {a:#x})")).unwrap_or_default());

    if let Err(why) = smp::init_bsp_vmx() {
        log::error!(target: "vmx", "cannot enter VMX root operation on the BSP: {why}; stopping");
        power::shutdown(ExitStatus::Failure, "VMXON failed");
    }
    let limit = boot.options.cpus.map_or(usize::MAX, |n| n as usize);
    let attempted = match boot.trampoline_conflict() {
        None => smp::start_aps(&platform, limit),
        Some(conflict) => {
            log::error!(target: "smp", "the AP trampoline page {:#x} holds {} [{:#x}, {:#x}): running on the BSP only",
                smp::AP_TRAMPOLINE_BASE, conflict.label, conflict.start, conflict.end);
            1
        }
    };
    let in_root = percpu::all().filter(|cpu| cpu.in_vmx_root()).count();
    log::info!(target: "nk", "boot complete, {in_root} of {attempted} CPUs online in VMX root");

    let tsc_hz = arch::calibrate_tsc();
    log::info!(target: "cpu", "TSC runs at {tsc_hz} Hz (measured against the PIT); guest OSes see it in CPUID 0x15/0x16");
    let (guests, images) = boot.guests();
    match null_kernel(&guests, images) {
        Ok(kernels) => mesh::install(kernels),
        Err(why) => {
            log::error!(target: "nk", "cannot start the null-Kernel: {why}; stopping");
            power::shutdown(ExitStatus::Failure, "no null-Kernel");
        }
    }

    #[cfg(feature = "test-harness")]
    let status = {
        let context = selftest::Context { boot: &boot, platform: &platform, cpus_attempted: attempted };
        selftest::run(&context)
    };
    #[cfg(not(feature = "test-harness"))]
    let status = ExitStatus::Success;

    let placements: alloc::vec::Vec<_> = boot.options.placements().collect();
    let (halted, stopped) = sched::run_guests(guests, &placements);
    log::info!(target: "nk", "guests finished: {halted} halted, {stopped} stopped");
    let tlb = vmx::tlb::stats();
    log::info!(target: "vmx", "TLB invalidations: {} INVEPT, {} INVVPID; {} VPIDs recycled, {} held",
        tlb.invepts, tlb.invvpids, tlb.vpids_recycled, tlb.vpids_live);
    if let Some(nvram) = storage::stats() {
        // What a crash sweep (`nvram-crash-after=<k>`) has to cover.
        log::info!(target: "nvram", "this boot wrote {} sectors to the device, {} fences, {} bytes",
            nvram.sector_writes, nvram.fences, nvram.bytes_written);
    }
    if let Some(pmem) = storage::pmem::with_device(|device| device.media().stats()) {
        log::info!(target: "nvram", "this boot wrote {} units in {} writes to persistent memory, {} fences, {} SFENCEs",
            pmem.units, pmem.writes, pmem.fences, pmem.sfences);
    }
    power::shutdown(status, "all guests finished")
}

/// Creates one kernel instance of the null-Kernel per CPU in VMX root (kernel id = CPU
/// index) and registers every AM of [`ams::AMS`] with each, shared (one AM object for the
/// machine). Returns each instance with its CPU's APIC id.
fn null_kernel(
    guests: &[guest::GuestSpec],
    images: alloc::vec::Vec<guest::GuestSpec>,
) -> Result<alloc::vec::Vec<(nk_core::NullKernel, u32)>, alloc::string::String> {
    /// Capability slots of all instances together (each gets a share, at least 4096).
    const TOTAL_CAPACITY: u32 = 32_768;
    let boot = ams::BootModules { guests, images: &images };
    let kernels = percpu::all().filter(|c| c.in_vmx_root()).map(|c| c.index() + 1).max().unwrap_or(1);
    let capacity = (TOTAL_CAPACITY / kernels).clamp(4096, 16_384);
    let shared: alloc::vec::Vec<_> = ams::AMS
        .iter()
        .filter(|line| (line.when)(&boot))
        .map(|line| (line, nk_core::shared_am((line.make)(&boot))))
        .collect();
    let mut instances = alloc::vec::Vec::new();
    for cpu in 0..kernels {
        let id = nk_caps::KernelId::new(cpu as u16);
        let mut kernel = nk_core::NullKernel::new(id, kernels as u16, capacity, &mut arch::HardwareEntropy)
            .map_err(|e| alloc::format!("kernel {cpu}: capability table: {e:?}"))?;
        kernel.set_caller_ring(guest::guest_ring);
        kernel.set_caller_root(guest::guest_root);
        kernel.set_frame_source(&exomem::FRAMES);
        kernel.set_guest_memory(exomem::guest_memory);
        kernel.set_host_memory(&nvram::HOST);
        kernel.set_media(&nvram::DEVICE);
        kernel.set_dirty_source(&nvram::DIRTY);
        let mut listed = alloc::string::String::new();
        for (line, am) in &shared {
            let id =
                kernel.add_shared_am(am.clone(), line.quota).map_err(|e| alloc::format!("{} AM: {e:?}", line.name))?;
            let separator = if listed.is_empty() { "" } else { ", " };
            listed.push_str(&alloc::format!("{separator}{} (id {})", line.name, id.raw()));
        }
        // Each AM grants the layers above it what they hold of it (the block AM: the NVRAM
        // AM's device range).
        for failure in kernel.connect_ams() {
            log::error!(target: "nk", "kernel {cpu}: AM {} could not grant the AMs above it: {:?}", failure.am.raw(), failure.error);
        }
        if cpu == 0 {
            log::info!(target: "nk", "{kernels} kernel instances (one per CPU), {capacity} capability slots each; AMs: {listed}");
        }
        instances.push((kernel, percpu::get(cpu as usize).map_or(0, |c| c.apic_id())));
    }
    Ok(instances)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    console::emergency_line(log::Level::Error, "panic", format_args!("{info}"));
    power::stop_machine("panic")
}
