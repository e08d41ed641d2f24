//! The test guest: runs hypercall checks from ring 0 and ring 3 and prints one line per
//! check (`GTEST ok <name>` or `GTEST FAILED <name>: <why>`), which the hypervisor's log
//! carries to the host harness.
#![no_std]
#![no_main]

use nk_guest::abi::{hypercall, nk_op, Call, Selector, Status, ABI_VERSION, NULL_KERNEL_AM};
use nk_guest::{current_ring, println, run_in_ring3};

fn report(name: &str, result: Result<(), &str>) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(why) => println!("GTEST FAILED {name}: {why}"),
    }
}

fn call(am: u16, op: u32) -> Status {
    hypercall(&Call { selector: Selector::new(am, op).encode(), ..Call::default() }).status()
}

fn null_call() -> Result<(), &'static str> {
    match call(NULL_KERNEL_AM, nk_op::NULL) {
        s if s.is_ok() => Ok(()),
        _ => Err("null hypercall did not return ok"),
    }
}

fn bad_version() -> Result<(), &'static str> {
    let selector = Selector { version: ABI_VERSION + 1, am: NULL_KERNEL_AM, op: nk_op::NULL };
    let status = hypercall(&Call { selector: selector.encode(), ..Call::default() }).status();
    if status.code() == Status::BAD_VERSION {
        Ok(())
    } else {
        Err("wrong ABI version accepted")
    }
}

fn unknown_am() -> Result<(), &'static str> {
    if call(0x7777, 0).code() == Status::UNKNOWN_AM {
        Ok(())
    } else {
        Err("unknown AM not refused")
    }
}

fn unknown_operation() -> Result<(), &'static str> {
    if call(NULL_KERNEL_AM, 0xFFFF).code() == Status::UNKNOWN_OPERATION {
        Ok(())
    } else {
        Err("unknown op accepted")
    }
}

fn cpuid_hides_vmx() -> Result<(), &'static str> {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 5) != 0 {
        return Err("CPUID.1 shows VMX");
    }
    if leaf1.ecx & (1 << 31) == 0 {
        return Err("CPUID.1 hypervisor bit clear");
    }
    let hv = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&hv.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    vendor[8..].copy_from_slice(&hv.edx.to_le_bytes());
    if &vendor == b"NullKernelHV" {
        Ok(())
    } else {
        Err("leaf 0x40000000 vendor is not NullKernelHV")
    }
}

static mut RING3_RESULTS: [Option<Result<(), &'static str>>; 3] = [None; 3];

fn ring3_checks() {
    // SAFETY: one vCPU; written here in ring 3, read after run_in_ring3 returns.
    unsafe {
        RING3_RESULTS[0] = Some(if current_ring() == 3 { Ok(()) } else { Err("not in ring 3") });
        RING3_RESULTS[1] = Some(null_call());
        RING3_RESULTS[2] = Some(bad_version());
    }
}

#[unsafe(no_mangle)]
extern "C" fn nk_guest_main(vm: u64, memory: u64) {
    println!("test guest on VM {vm}, {} KiB of memory, ring {}", memory / 1024, current_ring());
    report("ring0_null_hypercall", null_call());
    report("ring0_bad_version", bad_version());
    report("ring0_unknown_am", unknown_am());
    report("ring0_unknown_operation", unknown_operation());
    report("cpuid_hides_vmx", cpuid_hides_vmx());
    run_in_ring3(ring3_checks);
    // SAFETY: ring 3 is done; one vCPU.
    let results = unsafe { RING3_RESULTS };
    let names = ["ring3_entered", "ring3_null_hypercall", "ring3_bad_version"];
    for (name, result) in names.iter().zip(results) {
        report(name, result.unwrap_or(Err("did not run")));
    }
    println!("GTEST done");
}
