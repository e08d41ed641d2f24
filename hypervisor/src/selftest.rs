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

const CASES: &[Case] = &[
    Case {
        name: "heap_roundtrip",
        run: heap_roundtrip,
        explicit: false,
    },
    Case {
        name: "frames_exclude_reserved",
        run: frames_exclude_reserved,
        explicit: false,
    },
    Case {
        name: "vmx_root_on_every_cpu",
        run: vmx_root_on_every_cpu,
        explicit: false,
    },
    Case {
        name: "madt_cpus_online",
        run: madt_cpus_online,
        explicit: false,
    },
    Case {
        name: "vmx_capabilities",
        run: vmx_capabilities,
        explicit: false,
    },
    Case {
        name: "breakpoint_resumes",
        run: breakpoint_resumes,
        explicit: false,
    },
    Case {
        name: "exception",
        run: exception_stops_machine,
        explicit: true,
    },
];

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
        check(numbers.iter().sum::<u64>() == 4_999_950_000, || {
            "vector contents corrupted".into()
        })?;
        check(
            map.get(&999).map(String::as_str) == Some("value 999"),
            || "map contents corrupted".into(),
        )?;
    }
    let (after, _) = memory::heap_usage();
    check(after == before, || {
        format!("heap usage {before} bytes before, {after} after")
    })
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
            if let Some(range) = context
                .boot
                .reserved()
                .find(|r| frame < r.end && r.start < end)
            {
                return Err(format!(
                    "frame {frame:#x} lies in reserved {} [{:#x}, {:#x})",
                    range.label, range.start, range.end
                ));
            }
            check(context.boot.is_available(frame, end), || {
                format!("frame {frame:#x} is not available RAM")
            })?;
        }
        let count = frames.len();
        frames.sort_unstable();
        frames.dedup();
        check(frames.len() == count, || {
            format!("{} frames handed out twice", count - frames.len())
        })
    })();
    for &frame in &frames {
        memory::free_frame(
            memory::HostPhysAddr::new(frame).expect("allocated frames are valid addresses"),
        );
    }
    result
}

/// Every CPU that was started is in VMX root operation with its own VMXON region.
fn vmx_root_on_every_cpu(context: &Context<'_>) -> CaseResult {
    let online: Vec<_> = percpu::all().filter(|cpu| cpu.is_online()).collect();
    check(online.len() == context.cpus_attempted, || {
        format!(
            "{} CPUs online, {} started",
            online.len(),
            context.cpus_attempted
        )
    })?;
    let mut regions = Vec::new();
    for cpu in &online {
        let region = cpu
            .vmxon_region()
            .ok_or_else(|| format!("cpu {} is not in VMX root", cpu.index()))?;
        check(region % PAGE_SIZE == 0, || {
            format!(
                "cpu {} VMXON region {region:#x} not page aligned",
                cpu.index()
            )
        })?;
        regions.push(region);
    }
    regions.sort_unstable();
    regions.dedup();
    check(regions.len() == online.len(), || {
        "two CPUs share a VMXON region".into()
    })
}

/// The online CPUs are exactly the first MADT processors, by APIC id.
fn madt_cpus_online(context: &Context<'_>) -> CaseResult {
    let mut madt: Vec<u32> = context.platform.cpus().map(|c| c.apic_id).collect();
    check(madt.len() >= context.cpus_attempted, || {
        format!(
            "MADT lists {} CPUs but {} were started",
            madt.len(),
            context.cpus_attempted
        )
    })?;
    let mut online: Vec<u32> = percpu::all()
        .filter(|c| c.is_online())
        .map(|c| c.apic_id())
        .collect();
    online.sort_unstable();
    for id in &online {
        check(madt.contains(id), || {
            format!("online APIC id {id} is not in the MADT")
        })?;
    }
    madt.truncate(context.cpus_attempted);
    madt.sort_unstable();
    check(madt == online, || {
        format!("MADT APIC ids {madt:?}, online {online:?}")
    })
}

/// The VMX capabilities the hypervisor relies on are reported.
fn vmx_capabilities(_: &Context<'_>) -> CaseResult {
    let caps = crate::vmx::capabilities();
    check(caps.vmcs_revision != 0, || "VMCS revision 0".into())?;
    check((1..=4096).contains(&caps.vmcs_size), || {
        format!("VMCS size {}", caps.vmcs_size)
    })?;
    check(caps.ept && caps.ept_4level, || "no 4-level EPT".into())?;
    check(caps.vpid, || "no VPID".into())
}

/// A breakpoint in hypervisor code is handled and execution resumes after it.
fn breakpoint_resumes(_: &Context<'_>) -> CaseResult {
    let before = idt::BREAKPOINTS.load(Ordering::SeqCst);
    // SAFETY: int3 traps into the #BP handler, which returns to the next instruction.
    unsafe { core::arch::asm!("int3") };
    let after = idt::BREAKPOINTS.load(Ordering::SeqCst);
    check(after == before + 1, || {
        format!("breakpoint count {before} -> {after}")
    })
}

/// Executes an undefined instruction: the exception path prints the register dump and
/// stops the machine, so this case never reports.
fn exception_stops_machine(_: &Context<'_>) -> CaseResult {
    log::info!(target: "selftest", "executing ud2: expect a register dump and the machine to stop");
    // SAFETY: ud2 raises #UD, whose handler never returns here.
    unsafe { core::arch::asm!("ud2") };
    Err("execution continued after ud2".into())
}
