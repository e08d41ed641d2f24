//! In-emulator test cases of the test build (feature `test-harness`), run on the real
//! (emulated) machine after bring-up. Each case prints one protocol line
//! (docs/emulator-protocol.md) that `cargo xtask test` parses.
//!
//! The `test=` command-line option selects cases: `all` (every case that is not
//! explicit-only), or a comma-separated list of names, each possibly ending in `*`.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use crate::acpi::Platform;
use crate::arch::idt;
use crate::boot::Boot;
use crate::console::print_line;
use crate::memory::{self, PAGE_SIZE};
use crate::percpu;
use crate::power::ExitStatus;

/// What the cases may inspect.
pub struct Context<'a> {
    pub boot: &'a Boot,
    pub platform: &'a Platform,
    pub cpus_attempted: usize,
}

type CaseResult = Result<(), String>;

struct Case {
    name: &'static str,
    run: fn(&Context<'_>) -> CaseResult,
    /// Runs only when named: it does not return (e.g. it stops the machine).
    explicit: bool,
}

const fn case(name: &'static str, run: fn(&Context<'_>) -> CaseResult) -> Case {
    Case { name, run, explicit: false }
}

const CASES: &[Case] = &[
    case("heap_roundtrip", heap_roundtrip),
    case("frames_exclude_reserved", frames_exclude_reserved),
    case("vmx_root_on_every_cpu", vmx_root_on_every_cpu),
    case("madt_cpus_online", madt_cpus_online),
    case("vmx_capabilities", vmx_capabilities),
    case("breakpoint_resumes", breakpoint_resumes),
    case("guest_vmcall_roundtrip", guest_vmcall_roundtrip),
    case("guest_ept_violation_stops_guest", guest_ept_violation_stops_guest),
    case("guest_triple_fault_stops_guest", guest_triple_fault_stops_guest),
    case("tlb_vpid_recycled_and_invalidated", tlb_vpid_recycled_and_invalidated),
    case("tlb_guests_in_a_row", tlb_guests_in_a_row),
    case("guest_skip_ends_interrupt_shadow", guest_skip_ends_interrupt_shadow),
    case("guest_nmi_exit_resumes", guest_nmi_exit_resumes),
    case("guest_interrupted_event_is_reinjected", guest_interrupted_event_is_reinjected),
    Case { name: "exception", run: exception_stops_machine, explicit: true },
    case("host_code_not_writable", host_code_not_writable),
    case("host_data_not_executable", host_data_not_executable),
    case("host_stack_guards_unmapped", host_stack_guards_unmapped),
    case("acpi_above_4g_skipped", acpi_above_4g_skipped),
    Case { name: "stack_overflow", run: stack_overflow_faults, explicit: true },
    Case { name: "write_code", run: write_to_code_faults, explicit: true },
    // The NVRAM device's cases write the disk, so they run only when named.
    Case { name: "nvram_write_units", run: |_| crate::storage::selftest::write_units(), explicit: true },
    Case { name: "nvram_check_units", run: |_| crate::storage::selftest::check_units(), explicit: true },
    Case { name: "nvram_absent", run: |_| crate::storage::selftest::absent(), explicit: true },
    Case { name: "pmem_versions", run: |_| crate::storage::pmem_selftest::versions(), explicit: true },
    Case { name: "pmem_cut_sweep", run: |_| crate::storage::pmem_selftest::cut_sweep(), explicit: true },
];

/// The cases that need no VT-x: the durable device's.
const NO_VMX_CASES: &[(&str, fn() -> CaseResult)] = &[
    ("nvram_write_units", crate::storage::selftest::write_units),
    ("nvram_check_units", crate::storage::selftest::check_units),
    ("pmem_versions", crate::storage::pmem_selftest::versions),
    ("pmem_cut_sweep", crate::storage::pmem_selftest::cut_sweep),
];

/// On a CPU without VMX (QEMU's TCG): runs the cases `test=` names among
/// [`NO_VMX_CASES`], with the usual protocol lines, and returns the run's status; `None`
/// when it names none of them (the hypervisor then stops for lack of VMX as always).
pub fn run_without_vmx(boot: &Boot) -> Option<ExitStatus> {
    let filter = boot.options.test?;
    let cases: Vec<_> = NO_VMX_CASES
        .iter()
        .filter(|(name, _)| selected(filter, &Case { name, run: |_| Ok(()), explicit: true }))
        .collect();
    if cases.is_empty() {
        return None;
    }
    log::warn!(target: "selftest", "no VMX on this CPU: running only the durable device's cases");
    print_line(format_args!("NKTEST start {}", cases.len()));
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in cases {
        match run() {
            Ok(()) => {
                passed += 1;
                print_line(format_args!("NKTEST ok {name}"));
            }
            Err(why) => {
                failed += 1;
                print_line(format_args!("NKTEST FAILED {name}: {why}"));
            }
        }
    }
    print_line(format_args!("NKTEST end {passed} passed, {failed} failed"));
    Some(if failed == 0 { ExitStatus::Success } else { ExitStatus::Failure })
}

fn selected(filter: &str, case: &Case) -> bool {
    filter.split(',').any(|pattern| match pattern {
        "all" => !case.explicit,
        _ => match pattern.strip_suffix('*') {
            Some(prefix) => case.name.starts_with(prefix),
            None => case.name == pattern,
        },
    })
}

/// Runs the selected cases and reports each; returns the run's exit status.
pub fn run(context: &Context<'_>) -> ExitStatus {
    let filter = context.boot.options.test.unwrap_or("all");
    let cases: Vec<&Case> = CASES.iter().filter(|case| selected(filter, case)).collect();
    print_line(format_args!("NKTEST start {}", cases.len()));
    if cases.is_empty() {
        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        print_line(format_args!(
            "NKTEST FAILED test-filter: no case matches '{}' (cases: all, {})",
            filter,
            names.join(", ")
        ));
        print_line(format_args!("NKTEST end 0 passed, 1 failed"));
        return ExitStatus::Failure;
    }
    let (mut passed, mut failed) = (0, 0);
    for case in cases {
        match (case.run)(context) {
            Ok(()) => {
                passed += 1;
                print_line(format_args!("NKTEST ok {}", case.name));
            }
            Err(why) => {
                failed += 1;
                print_line(format_args!("NKTEST FAILED {}: {}", case.name, why));
            }
        }
    }
    print_line(format_args!("NKTEST end {passed} passed, {failed} failed"));
    if failed == 0 {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    }
}

fn check(condition: bool, why: impl FnOnce() -> String) -> CaseResult {
    if condition {
        Ok(())
    } else {
        Err(why())
    }
}

/// Allocates and frees a mix of heap objects; the heap's usage returns to where it was.
fn heap_roundtrip(_: &Context<'_>) -> CaseResult {
    let (before, total) = memory::heap_usage();
    check(total > 0, || "the heap has no memory".into())?;
    {
        let numbers: Vec<u64> = (0..100_000).collect();
        let mut map = BTreeMap::new();
        for i in 0..1_000u64 {
            map.insert(i, format!("value {i}"));
        }
        check(numbers.iter().sum::<u64>() == 4_999_950_000, || "vector contents corrupted".into())?;
        check(map.get(&999).map(String::as_str) == Some("value 999"), || "map contents corrupted".into())?;
    }
    let (after, _) = memory::heap_usage();
    check(after == before, || format!("heap usage {before} bytes before, {after} after"))
}

/// Takes every free frame: none lies in a reserved range or outside available RAM, none
/// is handed out twice; then gives them all back.
fn frames_exclude_reserved(context: &Context<'_>) -> CaseResult {
    let mut frames = Vec::new();
    while let Some(frame) = memory::alloc_frame() {
        frames.push(frame.as_u64());
    }
    let result = (|| {
        check(!frames.is_empty(), || "no free frames at all".into())?;
        for &frame in &frames {
            let end = frame + PAGE_SIZE;
            if let Some(range) = context.boot.reserved().find(|r| frame < r.end && r.start < end) {
                return Err(format!(
                    "frame {frame:#x} lies in reserved {} [{:#x}, {:#x})",
                    range.label, range.start, range.end
                ));
            }
            check(context.boot.is_available(frame, end), || format!("frame {frame:#x} is not available RAM"))?;
            if let Some(pmem) = context.boot.pmem_emulation() {
                check(end <= pmem.start || pmem.end() <= frame, || {
                    format!(
                        "frame {frame:#x} lies in the memmap= persistent memory [{:#x}, {:#x})",
                        pmem.start,
                        pmem.end()
                    )
                })?;
            }
        }
        let count = frames.len();
        frames.sort_unstable();
        frames.dedup();
        check(frames.len() == count, || format!("{} frames handed out twice", count - frames.len()))
    })();
    for &frame in &frames {
        memory::free_frame(memory::HostPhysAddr::new(frame).expect("allocated frames are valid addresses"));
    }
    result
}

/// Every CPU that was started is in VMX root operation with its own VMXON region.
fn vmx_root_on_every_cpu(context: &Context<'_>) -> CaseResult {
    let online: Vec<_> = percpu::all().filter(|cpu| cpu.is_online()).collect();
    check(online.len() == context.cpus_attempted, || {
        format!("{} CPUs online, {} started", online.len(), context.cpus_attempted)
    })?;
    let mut regions = Vec::new();
    for cpu in &online {
        let region = cpu.vmxon_region().ok_or_else(|| format!("cpu {} is not in VMX root", cpu.index()))?;
        check(region % PAGE_SIZE == 0, || format!("cpu {} VMXON region {region:#x} not page aligned", cpu.index()))?;
        regions.push(region);
    }
    regions.sort_unstable();
    regions.dedup();
    check(regions.len() == online.len(), || "two CPUs share a VMXON region".into())
}

/// The online CPUs are exactly the first MADT processors, by APIC id.
fn madt_cpus_online(context: &Context<'_>) -> CaseResult {
    let mut madt: Vec<u32> = context.platform.cpus().map(|c| c.apic_id).collect();
    check(madt.len() >= context.cpus_attempted, || {
        format!("MADT lists {} CPUs but {} were started", madt.len(), context.cpus_attempted)
    })?;
    let mut online: Vec<u32> = percpu::all().filter(|c| c.is_online()).map(|c| c.apic_id()).collect();
    online.sort_unstable();
    for id in &online {
        check(madt.contains(id), || format!("online APIC id {id} is not in the MADT"))?;
    }
    madt.truncate(context.cpus_attempted);
    madt.sort_unstable();
    check(madt == online, || format!("MADT APIC ids {madt:?}, online {online:?}"))
}

/// The VMX capabilities the hypervisor relies on are reported.
fn vmx_capabilities(_: &Context<'_>) -> CaseResult {
    let caps = crate::vmx::capabilities();
    check(caps.vmcs_revision != 0, || "VMCS revision 0".into())?;
    check((1..=4096).contains(&caps.vmcs_size), || format!("VMCS size {}", caps.vmcs_size))?;
    check(caps.ept && caps.ept_4level, || "no 4-level EPT".into())?;
    check(caps.vpid, || "no VPID".into())
}

/// A breakpoint in hypervisor code is handled and execution resumes after it.
fn breakpoint_resumes(_: &Context<'_>) -> CaseResult {
    let before = idt::BREAKPOINTS.load(Ordering::SeqCst);
    // SAFETY: int3 traps into the #BP handler, which returns to the next instruction.
    unsafe { core::arch::asm!("int3") };
    let after = idt::BREAKPOINTS.load(Ordering::SeqCst);
    check(after == before + 1, || format!("breakpoint count {before} -> {after}"))
}

/// Executes an undefined instruction: the exception path prints the register dump and
/// stops the machine, so this case never reports.
fn exception_stops_machine(_: &Context<'_>) -> CaseResult {
    log::info!(target: "selftest", "executing ud2: expect a register dump and the machine to stop");
    // SAFETY: ud2 raises #UD, whose handler never returns here.
    unsafe { core::arch::asm!("ud2") };
    Err("execution continued after ud2".into())
}

/// A throw-away 64-bit guest: 4 MiB of RAM in its own EPT, identity-mapped by its own page
/// tables (1 GiB of 2 MiB pages, so guest-virtual addresses past its RAM reach the EPT),
/// running `code` at GPA 0x10000.
struct TestGuest {
    io: Option<crate::ioports::IoBitmaps>,
    ept: Option<crate::vmx::ept::GuestEpt>,
    ram: memory::HostPhysAddr,
    vcpu: Option<crate::vmx::vcpu::Vcpu>,
}

const TEST_GUEST_RAM: u64 = 4 << 20;
const TEST_GUEST_CODE: u64 = 0x10000;

impl TestGuest {
    fn new(code: &[u8]) -> Result<Self, String> {
        use crate::vmx::vcpu::{GuestStart, Vcpu};
        let caps = crate::vmx::capabilities();
        let ram = memory::alloc_frames((TEST_GUEST_RAM / PAGE_SIZE) as usize).ok_or("no memory for guest RAM")?;
        let mut guest = TestGuest { io: None, ept: None, ram, vcpu: None };
        // SAFETY: the frames were just allocated for this guest and are identity-mapped.
        unsafe { core::ptr::write_bytes(ram.as_u64() as *mut u8, 0, TEST_GUEST_RAM as usize) };
        let mut ept = crate::vmx::ept::GuestEpt::new(&caps).map_err(|e| format!("EPT: {e}"))?;
        let mapped = ept.map_range(0, ram.as_u64(), TEST_GUEST_RAM, nk_paging::EptPerms::RWX);
        guest.ept = Some(ept);
        mapped.map_err(|e| format!("EPT map: {e}"))?;
        guest.write_u64(0x1000, 0x2000 | 3);
        guest.write_u64(0x2000, 0x3000 | 3);
        for i in 0..512 {
            guest.write_u64(0x3000 + i * 8, (i << 21) | 0x83);
        }
        guest.write_bytes(TEST_GUEST_CODE, code);
        let eptp = guest.ept.as_ref().map(|e| e.eptp()).unwrap_or(0);
        let bitmaps = crate::ioports::IoBitmaps::new(nk_caps::VmId::new(0x7FFF)).ok_or("no memory for I/O bitmaps")?;
        let start = GuestStart {
            mode: crate::vmx::vcpu::StartMode::Bare64,
            eptp,
            cr3: 0x1000,
            rip: TEST_GUEST_CODE,
            rsp: 0x20_0000,
            io_bitmaps: bitmaps.address(),
            msr_bitmap: bitmaps.msr_bitmap(),
        };
        guest.io = Some(bitmaps);
        guest.vcpu = Some(Vcpu::new(&caps, &start).map_err(|e| format!("vCPU setup: {e}"))?);
        Ok(guest)
    }

    fn host_ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(gpa + len as u64 <= TEST_GUEST_RAM, "test guest access out of its RAM");
        (self.ram.as_u64() + gpa) as *mut u8
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write_bytes(gpa, &value.to_le_bytes());
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) {
        // SAFETY: `host_ptr` checked the range lies in this guest's RAM, which this
        // struct owns.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host_ptr(gpa, bytes.len()), bytes.len()) };
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as for `write_bytes`; the guest is not running.
        unsafe { (self.host_ptr(gpa, 8) as *const u64).read_unaligned() }
    }

    fn vcpu(&mut self) -> &mut crate::vmx::vcpu::Vcpu {
        self.vcpu.as_mut().expect("TestGuest::new made the vCPU")
    }

    fn run(&mut self) -> Result<crate::vmx::vcpu::Exit, String> {
        self.vcpu().run().map_err(|e| format!("VM entry failed: {e}"))
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        self.vcpu = None;
        self.ept = None;
        memory::free_frames(self.ram, (TEST_GUEST_RAM / PAGE_SIZE) as usize);
    }
}

/// A guest runs in its own EPT, its VMCALL exits with its registers, the hypervisor's
/// reply reaches it, and its store lands in its own memory.
fn guest_vmcall_roundtrip(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::ExitReason;
    let code = [
        0x48, 0xC7, 0xC0, 0x34, 0x12, 0x00, 0x00, // mov rax, 0x1234
        0x0F, 0x01, 0xC1, // vmcall
        0x48, 0x89, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // mov [0x5000], rax
        0xF4, // hlt
    ];
    let mut guest = TestGuest::new(&code)?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::VMCALL, || format!("first exit {:?}, expected VMCALL", exit.reason))?;
    check(guest.vcpu().regs.rax == 0x1234, || format!("guest rax {:#x} at VMCALL", guest.vcpu().regs.rax))?;
    guest.vcpu().regs.rax = 0x5678;
    guest.vcpu().skip_instruction().map_err(|e| format!("{e}"))?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::HLT, || format!("second exit {:?}, expected HLT", exit.reason))?;
    let stored = guest.read_u64(0x5000);
    check(stored == 0x5678, || format!("guest stored {stored:#x}, expected the reply 0x5678"))
}

/// A guest access outside its memory exits with an EPT violation at that address.
fn guest_ept_violation_stops_guest(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::ExitReason;
    let code = [0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x80, 0x00, 0xF4]; // mov rax, [0x800000]; hlt
    let mut guest = TestGuest::new(&code)?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::EPT_VIOLATION, || format!("exit {:?}, expected EPT violation", exit.reason))?;
    let vcpu = guest.vcpu();
    let (gpa, qualification) = (vcpu.guest_physical().unwrap_or(0), vcpu.exit_qualification().unwrap_or(0));
    check(gpa == 0x80_0000, || format!("violation at GPA {gpa:#x}"))?;
    check(qualification & 1 == 1, || format!("qualification {qualification:#x} is not a read"))
}

/// A guest that faults with no IDT triple-faults, which exits instead of resetting.
fn guest_triple_fault_stops_guest(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::ExitReason;
    let mut guest = TestGuest::new(&[0x0F, 0x0B])?; // ud2
    let exit = guest.run()?;
    check(exit.reason == ExitReason::TRIPLE_FAULT, || format!("exit {:?}, expected triple fault", exit.reason))
}

/// The hypervisor's code is mapped read-only and executable (W^X, `hostmap`).
fn host_code_not_writable(_: &Context<'_>) -> CaseResult {
    let code = host_code_not_writable as *const () as u64;
    let page = crate::hostmap::page_info(code);
    check(page.present && !page.writable && page.executable, || format!("code page {code:#x}: {page:?}"))
}

/// Data, `.bss`, read-only data, heap, frames and the stack are never executable; EFER.NXE
/// is on.
fn host_data_not_executable(_: &Context<'_>) -> CaseResult {
    static DATA: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);
    static BSS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    static RODATA: [u8; 8] = *b"readonly";
    check(crate::hostmap::nx_enabled(), || "EFER.NXE is off".into())?;
    let heap = alloc::boxed::Box::new(0u64);
    let frame = memory::alloc_frame().ok_or("no frame")?;
    let local = 0u64;
    let places = [
        ("data", &DATA as *const _ as u64, true),
        ("bss", &BSS as *const _ as u64, true),
        ("rodata", RODATA.as_ptr() as u64, false),
        ("heap", &*heap as *const u64 as u64, true),
        ("frame", frame.as_u64(), true),
        ("stack", &local as *const u64 as u64, true),
    ];
    let mut result = Ok(());
    for (what, address, writable) in places {
        let page = crate::hostmap::page_info(address);
        if !page.present || page.executable || page.writable != writable {
            result = Err(format!("{what} page {address:#x}: {page:?}"));
            break;
        }
    }
    memory::free_frame(frame);
    result
}

/// Every stack has an unmapped guard page: the boot stack, the BSP's IST stacks, and each
/// AP's stack and IST stacks (4 per CPU).
fn host_stack_guards_unmapped(_: &Context<'_>) -> CaseResult {
    let guards = crate::hostmap::guards();
    let cpus = percpu::all().filter(|cpu| cpu.is_online()).count();
    check(guards.len() == 4 * cpus, || format!("{} guard pages for {cpus} CPUs, expected {}", guards.len(), 4 * cpus))?;
    match guards.iter().find(|&&guard| crate::hostmap::page_info(guard).present) {
        Some(guard) => Err(format!("guard page {guard:#x} is mapped")),
        None => Ok(()),
    }
}

/// ACPI tables outside the identity map are not touched.
fn acpi_above_4g_skipped(_: &Context<'_>) -> CaseResult {
    check(!crate::acpi::identity_mapped(0x1_0000_0000, 36), || "a table at 4 GiB counts as mapped".into())?;
    check(!crate::acpi::identity_mapped(0xFFFF_FFF0, 36), || "a table across 4 GiB counts as mapped".into())?;
    check(!crate::acpi::identity_mapped(0, 36), || "address 0 counts as mapped".into())?;
    check(crate::acpi::identity_mapped(0xE_0000, 36), || "a BIOS-area table counts as unmapped".into())
}

/// Recurses until the stack runs into its guard page: the page fault cannot be pushed, the
/// double fault runs on its IST stack and prints the dump, and the machine stops.
fn stack_overflow_faults(_: &Context<'_>) -> CaseResult {
    #[inline(never)]
    fn deeper(depth: u64) -> u64 {
        let frame = core::hint::black_box([depth; 64]);
        if core::hint::black_box(depth) == u64::MAX {
            return 0;
        }
        frame[(depth % 64) as usize] + deeper(depth + 1)
    }
    log::info!(target: "selftest", "overflowing the boot stack: expect a double fault dump and the machine to stop");
    let depth = deeper(core::hint::black_box(0));
    Err(format!("recursion returned {depth}"))
}

/// Writes to the hypervisor's own code: the page fault prints the dump (CR2 = the code
/// address) and the machine stops.
fn write_to_code_faults(_: &Context<'_>) -> CaseResult {
    let code = write_to_code_faults as *const () as u64;
    log::info!(target: "selftest", "writing to code at {code:#x}: expect a page fault dump and the machine to stop");
    // SAFETY: deliberately invalid: the page is read-only, so the write faults and never
    // completes (on a W^X map).
    unsafe { core::ptr::write_volatile(code as *mut u8, 0xCC) };
    Err("the write to code succeeded".into())
}

/// Guest code that loads the word at GPA 0x5000 into RAX, exits with VMCALL, then halts.
const READ_MARKER_CODE: [u8; 12] = [
    0x48, 0x8B, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // mov rax, [0x5000]
    0x0F, 0x01, 0xC1, // vmcall
    0xF4, // hlt
];

/// Runs `guest` (making its VMCS current first) and returns RAX at its VMCALL.
fn marker_seen(guest: &mut TestGuest) -> Result<u64, String> {
    use crate::vmx::vmcs::ExitReason;
    guest.vcpu().activate().map_err(|e| format!("activate: {e}"))?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::VMCALL, || format!("exit {:?}, expected VMCALL", exit.reason))?;
    Ok(guest.vcpu().regs.rax)
}

/// Teardown invalidates a guest's VPID and EPT on its CPU (one INVVPID, one INVEPT), the
/// VPID goes back to the pool, and the next guest gets it again, invalidated once more
/// on reuse; two live guests never share a VPID and none runs with VPID 0 (SDM Vol. 3
/// §29.4.3).
fn tlb_vpid_recycled_and_invalidated(_: &Context<'_>) -> CaseResult {
    use crate::vmx::tlb;
    let caps = crate::vmx::capabilities();
    check(caps.invept_single || caps.invept_all, || "no INVEPT type".into())?;
    check(caps.invvpid_single || caps.invvpid_all, || "no INVVPID type".into())?;
    let before = tlb::stats();
    let mut first = TestGuest::new(&READ_MARKER_CODE)?;
    let mut second = TestGuest::new(&READ_MARKER_CODE)?;
    let (a, b) = (first.vcpu().vpid(), second.vcpu().vpid());
    let (Some(a), Some(b)) = (a, b) else { return Err(format!("a guest runs without a VPID ({a:?}, {b:?})")) };
    check(a != 0 && b != 0 && a != b, || format!("live guests got VPIDs {a} and {b}"))?;
    first.write_u64(0x5000, 0xAAAA);
    second.write_u64(0x5000, 0xBBBB);
    check(marker_seen(&mut first)? == 0xAAAA, || "the first guest read another's memory".into())?;
    check(marker_seen(&mut second)? == 0xBBBB, || "the second guest read another's memory".into())?;
    let running = tlb::stats();
    check(running.vpids_live == before.vpids_live + 2, || format!("{running:?} after two guests, {before:?} before"))?;
    drop(first);
    let dropped = tlb::stats();
    check(dropped.invvpids == running.invvpids + 1 && dropped.invepts == running.invepts + 1, || {
        format!(
            "teardown ran {} INVVPID and {} INVEPT",
            dropped.invvpids - running.invvpids,
            dropped.invepts - running.invepts
        )
    })?;
    let mut third = TestGuest::new(&READ_MARKER_CODE)?;
    let c = third.vcpu().vpid();
    check(c == Some(a), || format!("the next guest got VPID {c:?}, not the freed {a}"))?;
    let reused = tlb::stats();
    check(reused.vpids_recycled == dropped.vpids_recycled + 1 && reused.invvpids == dropped.invvpids + 1, || {
        format!("reuse of VPID {a}: {reused:?}, after teardown {dropped:?}")
    })?;
    third.write_u64(0x5000, 0xCCCC);
    check(marker_seen(&mut third)? == 0xCCCC, || "the guest with a recycled VPID read stale memory".into())?;
    drop(second);
    drop(third);
    let after = tlb::stats();
    check(after.vpids_live == before.vpids_live, || {
        format!("{} VPIDs live, {} before", after.vpids_live, before.vpids_live)
    })
}

/// Guests created, run and destroyed one after another on this CPU reuse the same VPID and
/// (most likely) the same EPT root frame while their memory moves: each must read its own
/// marker, never one a stale translation of an earlier guest would give.
fn tlb_guests_in_a_row(_: &Context<'_>) -> CaseResult {
    const GUESTS: u64 = 40;
    let before = crate::vmx::tlb::stats();
    let frames = (TEST_GUEST_RAM / PAGE_SIZE) as usize;
    let mut spacer = None;
    let mut vpids = Vec::new();
    let result = (|| {
        for i in 0..GUESTS {
            // Every other guest's memory moves by the frames a spacer holds back.
            match spacer.take() {
                Some(frame) => memory::free_frames(frame, frames),
                None => spacer = Some(memory::alloc_frames(frames).ok_or("no spacer memory")?),
            }
            let mut guest = TestGuest::new(&READ_MARKER_CODE)?;
            let marker = 0x5EED_0000 + i;
            guest.write_u64(0x5000, marker);
            let seen = marker_seen(&mut guest)?;
            check(seen == marker, || format!("guest {i} read {seen:#x}, its marker is {marker:#x}"))?;
            vpids.push(guest.vcpu().vpid().unwrap_or(0));
        }
        Ok::<(), String>(())
    })();
    if let Some(frame) = spacer {
        memory::free_frames(frame, frames);
    }
    result?;
    let after = crate::vmx::tlb::stats();
    check(vpids.iter().all(|&v| v != 0 && v == vpids[0]), || format!("VPIDs {vpids:?}: expected one recycled VPID"))?;
    check(after.invepts - before.invepts >= GUESTS && after.invvpids - before.invvpids >= 2 * GUESTS - 1, || {
        format!(
            "{GUESTS} guests: {} INVEPT, {} INVVPID",
            after.invepts - before.invepts,
            after.invvpids - before.invvpids
        )
    })
}
/// An emulated instruction that ran in the shadow of MOV SS or STI ends the shadow when the
/// hypervisor skips it (SDM Vol. 3 §25.4.2): the blocking is not carried over to the
/// guest's next instruction.
fn guest_skip_ends_interrupt_shadow(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::{self, ExitReason, VmcsField};
    let code = [
        0x31, 0xC0, // xor eax, eax
        0x8E, 0xD0, // mov ss, eax (a null SS is allowed at CPL0 in 64-bit mode; the
        // guest has no GDT)
        0x0F, 0xA2, // cpuid: exits in the MOV-SS shadow
        0xFB, // sti
        0x0F, 0xA2, // cpuid: exits in the STI shadow
        0xFA, // cli
        0xF4, // hlt
    ];
    let mut guest = TestGuest::new(&code)?;
    for (shadow, bit) in [("MOV SS", 2u64), ("STI", 1)] {
        let exit = guest.run()?;
        check(exit.reason == ExitReason::CPUID, || format!("exit {:?}, expected CPUID after {shadow}", exit.reason))?;
        let before = vmcs::read(VmcsField::GUEST_INTERRUPTIBILITY).map_err(|e| format!("{e}"))?;
        check(before & bit != 0, || format!("no blocking by {shadow} reported at the CPUID exit ({before:#x})"))?;
        guest.vcpu().skip_instruction().map_err(|e| format!("{e}"))?;
        let after = vmcs::read(VmcsField::GUEST_INTERRUPTIBILITY).map_err(|e| format!("{e}"))?;
        check(after & 3 == 0, || format!("blocking by {shadow} kept after the skip ({after:#x})"))?;
    }
    let exit = guest.run()?;
    check(exit.reason == ExitReason::HLT, || format!("last exit {:?}, expected HLT", exit.reason))
}

/// An NMI that arrives while a guest runs exits (NMI exiting) and is absorbed by the
/// hypervisor: the guest goes on where it was. The guest here is given this CPU's local
/// APIC page (only in this test) and sends itself the NMI through the ICR, as another CPU
/// or the platform would; the old exit handler stopped guests at this exit.
fn guest_nmi_exit_resumes(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::ExitReason;
    const APIC: u64 = 0xFEE0_0000;
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let apic_base = unsafe { x86::msr::rdmsr(0x1B) } & 0x000F_FFFF_FFFF_F000;
    check(apic_base == APIC, || format!("local APIC at {apic_base:#x}, this case expects {APIC:#x}"))?;
    let destination = crate::arch::apic::id() << 24;
    let mut code = alloc::vec![0x48, 0xB8]; // mov rax, APIC
    code.extend_from_slice(&APIC.to_le_bytes());
    code.extend_from_slice(&[0xC7, 0x80, 0x10, 0x03, 0x00, 0x00]); // mov dword [rax + 0x310], destination
    code.extend_from_slice(&destination.to_le_bytes());
    code.extend_from_slice(&[0xC7, 0x80, 0x00, 0x03, 0x00, 0x00]); // mov dword [rax + 0x300], NMI | assert
    code.extend_from_slice(&0x4400u32.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xC7, 0xC3, 0x2A, 0x00, 0x00, 0x00, 0xF4]); // mov rbx, 42; hlt
    let mut guest = TestGuest::new(&code)?;
    // Guest-virtual 3-4 GiB through a second page directory, and the APIC page in the EPT.
    guest.write_u64(0x2000 + 3 * 8, 0x4000 | 3);
    guest.write_u64(0x4000 + ((APIC >> 21) & 511) * 8, APIC | 0x83 | 1 << 4);
    let ept = guest.ept.as_mut().ok_or("no EPT")?;
    ept.map_range(APIC, APIC, PAGE_SIZE, nk_paging::EptPerms::RW)
        .map_err(|e| format!("EPT map of the APIC page: {e}"))?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::EXCEPTION_OR_NMI, || format!("exit {:?}, expected the NMI's", exit.reason))?;
    let absorbed = guest.vcpu().absorb_nmi_exit().map_err(|e| format!("{e}"))?;
    check(absorbed, || "the exit was not an NMI's".into())?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::HLT, || format!("exit {:?} after the NMI, expected HLT", exit.reason))?;
    let rbx = guest.vcpu().regs.rbx;
    check(rbx == 42, || format!("guest rbx {rbx}, expected 42: it did not go on where it was"))
}

/// An event whose delivery a VM exit cuts short is injected again at the next entry (SDM
/// Vol. 3 §28.2.4): the hypervisor injects #GP(0) (as for a refused XSETBV), the guest's
/// IDT is not mapped yet, so delivering the #GP exits with an EPT violation; once the IDT
/// page is mapped, the guest's handler must receive that #GP with its error code and
/// return address. Without re-injection the event is lost and the guest re-executes
/// its CPUID instead.
fn guest_interrupted_event_is_reinjected(_: &Context<'_>) -> CaseResult {
    use crate::vmx::vmcs::{self, ExitReason, VmcsField};
    const IDT: u64 = TEST_GUEST_RAM; // the first page past the guest's RAM
    const HANDLER: u64 = TEST_GUEST_CODE + 0x10;
    let mut code = [0u8; 0x11];
    code[..3].copy_from_slice(&[0x0F, 0xA2, 0xF4]); // cpuid; hlt
    code[0x10] = 0xF4; // the #GP handler: hlt
    let mut guest = TestGuest::new(&code)?;
    guest.write_u64(0x6008, 0x00AF_9A00_0000_FFFF); // GDT: 64-bit code at 0x08
                                                    // SAFETY: guest-state fields of this test guest's current VMCS.
    unsafe {
        for (field, value) in [
            (VmcsField::GUEST_GDTR_BASE, 0x6000),
            (VmcsField::GUEST_GDTR_LIMIT, 15),
            (VmcsField::GUEST_IDTR_BASE, IDT),
            (VmcsField::GUEST_IDTR_LIMIT, 0xFFF),
        ] {
            vmcs::write(field, value).map_err(|e| format!("{e}"))?;
        }
    }
    let exit = guest.run()?;
    check(exit.reason == ExitReason::CPUID, || format!("first exit {:?}, expected CPUID", exit.reason))?;
    guest.vcpu().inject_exception(13, Some(0)).map_err(|e| format!("{e}"))?;
    let exit = guest.run()?;
    check(exit.reason == ExitReason::EPT_VIOLATION, || {
        format!("exit {:?}, expected EPT violation at the IDT", exit.reason)
    })?;
    let vectoring = vmcs::read(VmcsField::IDT_VECTORING_INFO).map_err(|e| format!("{e}"))?;
    check(vectoring & 0x8000_07FF == 0x8000_030D, || {
        format!("IDT-vectoring information {vectoring:#x}, expected #GP")
    })?;
    guest.vcpu().reinject_interrupted_event().map_err(|e| format!("{e}"))?;
    let entry = vmcs::read(VmcsField::ENTRY_INTERRUPTION_INFO).map_err(|e| format!("{e}"))?;
    check(entry == 0x8000_0B0D, || format!("entry interruption information {entry:#x}, expected #GP with error code"))?;
    let page = memory::alloc_zeroed_frame().ok_or("no frame for the IDT")?;
    let gate = [(HANDLER & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((HANDLER >> 16 & 0xFFFF) << 48), HANDLER >> 32];
    // SAFETY: a fresh identity-mapped frame; gate 13 lies within it.
    unsafe { ((page.as_u64() + 13 * 16) as *mut [u64; 2]).write(gate) };
    let result = (|| {
        let ept = guest.ept.as_mut().ok_or("no EPT")?;
        ept.map_range(IDT, page.as_u64(), PAGE_SIZE, nk_paging::EptPerms::RW)
            .map_err(|e| format!("EPT map of the IDT: {e}"))?;
        let exit = guest.run()?;
        check(exit.reason == ExitReason::HLT, || {
            format!("exit {:?} after re-injection, expected the handler's HLT", exit.reason)
        })?;
        let rip = guest.vcpu().rip().unwrap_or(0);
        check(rip == HANDLER, || format!("guest halted at {rip:#x}, not in its #GP handler"))?;
        let (error_code, return_rip) = (guest.read_u64(0x20_0000 - 48), guest.read_u64(0x20_0000 - 40));
        check(error_code == 0 && return_rip == TEST_GUEST_CODE, || {
            format!("the handler got error code {error_code:#x} and return address {return_rip:#x}")
        })
    })();
    drop(guest);
    memory::free_frame(page);
    result
}
