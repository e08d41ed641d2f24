//! The test guest: runs the hypercall checks from ring 0 and again from ring 3 (the way a
//! process bypasses its OS), prints one line per check (`GTEST ok <ring>/<name>` or
//! `GTEST FAILED <ring>/<name>: <why>`), then measures the hypercall path
//! (`GBENCH <metric> <instructions>`; in Bochs the TSC counts instructions). The
//! hypervisor's log carries these lines to the host harness.
#![no_std]
#![no_main]

use core::fmt::Write;

use nk_guest::abi::{Call, NameWords, Selector, Status, ABI_VERSION, NULL_KERNEL_AM};
use nk_guest::nk::{self, Cap};
use nk_guest::{current_ring, println, run_in_ring3};

/// Counter AM operation numbers (am/counter).
mod counter {
    pub const CREATE: u32 = 0;
    pub const READ: u32 = 1;
    pub const ADD: u32 = 2;
    pub const SUM4: u32 = 3;
}

/// A check's failure, as text.
struct Why(heapless_line::Line);

mod heapless_line {
    /// A fixed 96-byte line buffer (the guest has no heap).
    pub struct Line {
        pub bytes: [u8; 96],
        pub len: usize,
    }
    impl core::fmt::Write for Line {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for &b in s.as_bytes() {
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = b;
                    self.len += 1;
                }
            }
            Ok(())
        }
    }
    impl Line {
        pub fn as_str(&self) -> &str {
            core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
        }
    }
}

fn why(args: core::fmt::Arguments<'_>) -> Why {
    let mut line = heapless_line::Line { bytes: [0; 96], len: 0 };
    let _ = line.write_fmt(args);
    Why(line)
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(why(format_args!($($arg)*)));
        }
    };
}

type CheckResult = Result<(), Why>;

fn expect_status(got: Status, code: u16, arg: Option<u8>, what: &str) -> CheckResult {
    ensure!(got == Status::new(code, arg), "{what}: got '{got}', expected '{}'", Status::new(code, arg));
    Ok(())
}

/// The counter AM's id and this guest's factory capability (its initial capability 0).
fn factory() -> Result<(u16, Cap), Why> {
    let (cap, am) = nk::initial(0).map_err(|s| why(format_args!("initial(0): {s}")))?;
    Ok((am, cap))
}

fn create_counter() -> Result<(u16, Cap), Why> {
    let (am, factory) = factory()?;
    let reply = nk::call(am, counter::CREATE, &[factory], &[]);
    ensure!(reply.status().is_ok(), "create: {}", reply.status());
    Ok((am, reply.name))
}

fn read(am: u16, cap: Cap) -> Result<(u64, u64), Status> {
    let reply = nk::call(am, counter::READ, &[cap], &[]);
    if reply.status().is_ok() {
        Ok((reply.results[0], reply.results[1]))
    } else {
        Err(reply.status())
    }
}

fn check_null() -> CheckResult {
    ensure!(nk::null().is_ok(), "null hypercall: {}", nk::null());
    Ok(())
}

fn check_bad_version() -> CheckResult {
    let selector = Selector { version: ABI_VERSION + 1, am: NULL_KERNEL_AM, op: 0 };
    let status = nk_guest::abi::hypercall(&Call { selector: selector.encode(), ..Call::default() }).status();
    expect_status(status, Status::BAD_VERSION, None, "wrong ABI version")
}

fn check_unknown_selectors() -> CheckResult {
    expect_status(nk::call(0x7777, 0, &[], &[]).status(), Status::UNKNOWN_AM, None, "unknown AM")?;
    expect_status(nk::call(NULL_KERNEL_AM, 0xFFFF, &[], &[]).status(), Status::UNKNOWN_OPERATION, None, "unknown op")?;
    let (am, _) = factory()?;
    expect_status(nk::call(am, 99, &[], &[]).status(), Status::UNKNOWN_OPERATION, None, "unknown AM op")
}

fn check_counter_ops() -> CheckResult {
    let (am, c) = create_counter()?;
    let added = nk::call(am, counter::ADD, &[c], &[5]);
    ensure!(added.status().is_ok() && added.results[0] == 5, "add: {} -> {}", added.status(), added.results[0]);
    let sum = nk::call(am, counter::SUM4, &[c, c, c, c], &[]);
    ensure!(sum.status().is_ok() && sum.results[0] == 20, "sum4: {} -> {}", sum.status(), sum.results[0]);
    let info = nk::inspect(c).map_err(|s| why(format_args!("inspect: {s}")))?;
    ensure!(
        info[0] >> 32 == u64::from(am) && info[2] == 0b11,
        "inspect: am/kind {:#x}, rights {:#x}",
        info[0],
        info[2]
    );
    Ok(())
}

fn check_malformed_calls_change_nothing() -> CheckResult {
    let (am, c) = create_counter()?;
    nk::call(am, counter::ADD, &[c], &[3]);
    let garbage = NameWords { low: 0xDEAD_BEEF, high: 0x1234_5678 };
    expect_status(read(am, garbage).err().unwrap_or(Status(0)), Status::UNKNOWN_NAME, Some(0), "garbage name")?;
    let sum = nk::call(am, counter::SUM4, &[c, c, garbage, c], &[]).status();
    expect_status(sum, Status::UNKNOWN_NAME, Some(2), "garbage third argument")?;
    let (_, factory) = factory()?;
    expect_status(read(am, factory).err().unwrap_or(Status(0)), Status::WRONG_KIND, Some(0), "factory as counter")?;
    let read_only = nk::derive(c, 0b01).map_err(|s| why(format_args!("derive: {s}")))?;
    let add = nk::call(am, counter::ADD, &[read_only], &[1]).status();
    expect_status(add, Status::MISSING_RIGHTS, Some(0), "add through read-only")?;
    let overflow = nk::call(am, counter::ADD, &[c], &[u64::MAX]).status();
    expect_status(overflow, Status::BAD_ARGUMENT, None, "overflowing add")?;
    let bad = nk::call(NULL_KERNEL_AM, nk_guest::abi::nk_op::DELEGATE, &[c], &[1, 1, 7]).status();
    expect_status(bad, Status::BAD_ARGUMENT, None, "delegate with binding 7")?;
    ensure!(read(am, c) == Ok((3, 0)), "counter changed by failed calls: {:?}", read(am, c).ok());
    Ok(())
}

fn check_derive_revoke_delete() -> CheckResult {
    let (am, root) = create_counter()?;
    let mut chain = root;
    for _ in 0..5 {
        chain = nk::derive(chain, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    }
    let bearer = nk::delegate(root, 1, 0b01, true).map_err(|s| why(format_args!("delegate: {s}")))?;
    ensure!(read(am, chain) == Ok((0, 0)), "read through a derived chain");
    let died = nk::revoke(root).map_err(|s| why(format_args!("revoke: {s}")))?;
    ensure!(died == 7, "revoke killed {died}, expected 7");
    for cap in [root, chain, bearer] {
        expect_status(read(am, cap).err().unwrap_or(Status(0)), Status::REVOKED, Some(0), "use after revoke")?;
    }
    let (_, other) = create_counter()?;
    let copy = nk::derive(other, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    nk::delete(copy).map_err(|s| why(format_args!("delete: {s}")))?;
    let after = read(am, copy).err().unwrap_or(Status(0));
    expect_status(after, Status::UNKNOWN_NAME, Some(0), "use after delete")?;
    let (_, deaths) = read(am, other).map_err(|s| why(format_args!("read: {s}")))?;
    ensure!(deaths == 1, "the AM heard of {deaths} deaths, expected 1");
    Ok(())
}

const CHECKS: [(&str, fn() -> CheckResult); 6] = [
    ("null_hypercall", check_null),
    ("bad_version", check_bad_version),
    ("unknown_selectors", check_unknown_selectors),
    ("counter_ops", check_counter_ops),
    ("malformed_calls_change_nothing", check_malformed_calls_change_nothing),
    ("derive_revoke_delete", check_derive_revoke_delete),
];

fn run_checks() {
    let ring = current_ring();
    for (name, check) in CHECKS {
        match check() {
            Ok(()) => println!("GTEST ok ring{ring}/{name}"),
            Err(Why(line)) => println!("GTEST FAILED ring{ring}/{name}: {}", line.as_str()),
        }
    }
}

fn check_cpuid() {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    let hv = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&hv.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    vendor[8..].copy_from_slice(&hv.edx.to_le_bytes());
    if leaf1.ecx & (1 << 5) == 0 && leaf1.ecx & (1 << 31) != 0 && &vendor == b"NullKernelHV" {
        println!("GTEST ok ring0/cpuid_hides_vmx");
    } else {
        println!("GTEST FAILED ring0/cpuid_hides_vmx: ecx {:#x}", leaf1.ecx);
    }
}

/// Returns the fewest TSC ticks `f` took over a few runs (Bochs is deterministic; on
/// hardware the minimum filters interruptions).
fn measure(mut f: impl FnMut()) -> u64 {
    (0..5)
        .map(|_| {
            let start = nk::rdtsc();
            f();
            nk::rdtsc() - start
        })
        .min()
        .unwrap_or(0)
}

fn benchmarks() {
    let empty = measure(|| {});
    let report = |metric: &str, ticks: u64| println!("GBENCH {metric} {}", ticks.saturating_sub(empty));
    report(
        "vmcall_null_instructions",
        measure(|| {
            nk::null();
        }),
    );
    let Ok((am, c)) = create_counter() else {
        println!("GBENCH error: no counter");
        return;
    };
    report(
        "am_call_1cap_instructions",
        measure(|| {
            nk::call(am, counter::READ, &[c], &[]);
        }),
    );
    report(
        "am_call_4cap_instructions",
        measure(|| {
            nk::call(am, counter::SUM4, &[c, c, c, c], &[]);
        }),
    );
    report(
        "derive_instructions",
        measure(|| {
            let _ = nk::derive(c, u64::MAX);
        }),
    );
    let revoke_10 = (0..5)
        .filter_map(|_| {
            let (_, root) = create_counter().ok()?;
            for _ in 0..9 {
                nk::derive(root, u64::MAX).ok()?;
            }
            let start = nk::rdtsc();
            nk::revoke(root).ok()?;
            Some(nk::rdtsc() - start)
        })
        .min()
        .unwrap_or(0);
    report("revoke_10_instructions", revoke_10);
}

#[unsafe(no_mangle)]
extern "C" fn nk_guest_main(vm: u64, memory: u64) {
    println!("test guest on vm{vm}: {} KiB of memory, ring {}", memory / 1024, current_ring());
    run_checks();
    check_cpuid();
    run_in_ring3(run_checks);
    benchmarks();
    println!("GTEST done");
}
