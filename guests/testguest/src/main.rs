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

/// Counter AM operation numbers (nk-abi).
use nk_guest::abi::counter_op as counter;

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
/// Ring 3 may not enumerate (by default), so the checks there use the one ring 0 looked
/// up, as a process would get it from its kernel.
fn factory() -> Result<(u16, Cap), Why> {
    use core::sync::atomic::Ordering::Relaxed;
    if current_ring() != 0 {
        let am = HANDED_FACTORY[2].load(Relaxed);
        ensure!(am != 0, "ring 0 handed down no factory");
        let cap = Cap { low: HANDED_FACTORY[0].load(Relaxed), high: HANDED_FACTORY[1].load(Relaxed) };
        return Ok((am as u16 - 1, cap));
    }
    let (cap, am) = nk::initial(0).map_err(|s| why(format_args!("initial(0): {s}")))?;
    HANDED_FACTORY[0].store(cap.low, Relaxed);
    HANDED_FACTORY[1].store(cap.high, Relaxed);
    HANDED_FACTORY[2].store(u64::from(am) + 1, Relaxed);
    Ok((am, cap))
}

/// The factory ring 0 found (name low, high, AM id + 1), for the checks in ring 3.
static HANDED_FACTORY: [core::sync::atomic::AtomicU64; 3] = [const { core::sync::atomic::AtomicU64::new(0) }; 3];

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

type Check = (&'static str, fn() -> CheckResult);

const CHECKS: [Check; 6] = [
    ("null_hypercall", check_null),
    ("bad_version", check_bad_version),
    ("unknown_selectors", check_unknown_selectors),
    ("counter_ops", check_counter_ops),
    ("malformed_calls_change_nothing", check_malformed_calls_change_nothing),
    ("derive_revoke_delete", check_derive_revoke_delete),
];

/// The VM to delegate to in `check_other_vms_bound_capability` (0: none running).
static PEER_VM: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A capability bound to another VM is refused when this VM presents its name (the
/// name is known here: delegate returned it); a bearer one is usable by anyone. When the
/// peer runs on another CPU, its capabilities live in that CPU's kernel instance (the
/// name's bits 127..112 say which): this kernel does not know the bound name at all, and
/// the bearer one is obtained (derived across kernels) before it is used.
fn check_other_vms_bound_capability() -> CheckResult {
    let peer = PEER_VM.load(core::sync::atomic::Ordering::Relaxed);
    ensure!(peer != 0, "no peer VM given (run with 'checks <peer vm id>')");
    let (am, c) = create_counter()?;
    let bound = nk::delegate(c, peer, u64::MAX, false).map_err(|s| why(format_args!("delegate bound: {s}")))?;
    let remote = kernel_of(bound) != kernel_of(c);
    let refusal = if remote { Status::UNKNOWN_NAME } else { Status::WRONG_HOLDER };
    expect_status(read(am, bound).err().unwrap_or(Status(0)), refusal, Some(0), "peer's bound cap")?;
    let bearer = nk::delegate(c, peer, 0b01, true).map_err(|s| why(format_args!("delegate bearer: {s}")))?;
    let usable = match remote {
        true => nk::derive(bearer, u64::MAX).map_err(|s| why(format_args!("obtain of the peer's bearer cap: {s}")))?,
        false => bearer,
    };
    ensure!(kernel_of(usable) == kernel_of(c), "the obtained capability lives on another kernel");
    ensure!(read(am, usable).is_ok(), "a bearer capability was refused to its presenter");
    let info = nk::inspect(bound);
    expect_status(info.err().unwrap_or(Status(0)), refusal, Some(0), "inspect of peer's bound cap")?;
    Ok(())
}

/// The kernel instance (CPU) a capability lives on: bits 127..112 of its name.
fn kernel_of(cap: Cap) -> u64 {
    cap.high >> 48
}

fn run_checks() {
    let ring = current_ring();
    if PEER_VM.load(core::sync::atomic::Ordering::Relaxed) != 0 {
        match check_other_vms_bound_capability() {
            Ok(()) => println!("GTEST ok ring{ring}/other_vms_bound_capability"),
            Err(Why(line)) => println!("GTEST FAILED ring{ring}/other_vms_bound_capability: {}", line.as_str()),
        }
    }
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
    cpuid_controls::check();
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

/// Misbehaves as `mode` says; the hypervisor must stop this guest and nothing else.
fn misbehave(mode: &str) {
    println!("misbehaving: {mode}");
    match mode {
        // Past the guest's memory: an EPT violation.
        "badmem" => {
            // SAFETY: deliberately touches guest-physical memory the VM was not given.
            let value = unsafe { core::ptr::read_volatile(0x80_0000 as *const u64) };
            println!("GTEST FAILED badmem: read {value:#x} outside guest memory");
        }
        // A port it was not granted.
        "badport" => {
            // SAFETY: deliberately touches a port the VM was not granted.
            unsafe { core::arch::asm!("out 0x80, al", in("al") 0u8) };
            println!("GTEST FAILED badport: port write was allowed");
        }
        // Setting CR4.VMXE: VMX is hidden, so the guest takes #GP; its handler reports.
        "vmxe" => {
            // SAFETY: deliberately tries to enable VMX; the fault handler halts the guest.
            unsafe {
                core::arch::asm!("mov {t}, cr4", "or {t}, {bit}", "mov cr4, {t}", t = out(reg) _, bit = in(reg) 1u64 << 13);
            }
            println!("GTEST FAILED vmxe: setting CR4.VMXE did not fault");
        }
        // No IDT, then a fault: a triple fault.
        "triple" => {
            // SAFETY: deliberately destroys this guest's IDT and faults.
            unsafe {
                let empty = [0u8; 10];
                core::arch::asm!("lidt [{}]", "ud2", in(reg) empty.as_ptr());
            }
        }
        _ => println!("GTEST FAILED misbehave: unknown mode '{mode}'"),
    }
}

/// Does `rounds` rounds of counter work (each with hypercalls), long enough to span many
/// time slices, and checks the result.
fn survive(rounds: u64) {
    let Ok((am, c)) = create_counter() else {
        println!("GTEST FAILED survivor: no counter");
        return;
    };
    for round in 1..=rounds {
        nk::call(am, counter::ADD, &[c], &[1]);
        if round % (rounds / 4).max(1) == 0 {
            println!("survivor: round {round} of {rounds}");
        }
    }
    match read(am, c) {
        Ok((value, _)) if value == rounds => println!("GTEST ok survivor"),
        other => println!("GTEST FAILED survivor: counter {:?}, expected {rounds}", other.ok()),
    }
}

/// Fills XMM0-15 (YMM0-15 with AVX) with a pattern, lets many time slices pass (other
/// guests on this CPU do the same with their own patterns), and checks every register:
/// the hypervisor must switch the XSAVE state of guests that share a CPU.
fn check_extended_state(seed: u64, rounds: u64) {
    let avx = core::arch::x86_64::__cpuid(1).ecx & (1 << 28) != 0;
    let xcr0: u64 = if avx { 0b111 } else { 0b11 };
    // SAFETY: enables SSE/XSAVE in this guest's own CR4 and XCR0 (XSETBV exits to the
    // hypervisor, which checks the value); nothing else in this guest uses SIMD state.
    unsafe {
        core::arch::asm!(
            "mov {t}, cr4", "or {t}, {bits}", "mov cr4, {t}",
            "xsetbv",
            t = out(reg) _, bits = in(reg) (1u64 << 9) | (1 << 18),
            in("ecx") 0, in("eax") xcr0 as u32, in("edx") 0,
        );
    }
    let mut pattern = [0u64; 64];
    for (i, word) in pattern.iter_mut().enumerate() {
        *word = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64);
    }
    let mut back = [0u64; 64];
    macro_rules! sixteen {
        ($insn:literal, $reg:literal, $stride:literal, $ptr:expr) => {
            // SAFETY: reads or writes 16 SIMD registers from or to `$ptr`, a 512-byte
            // buffer; the compiler never uses SIMD registers in this soft-float guest.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " ", $reg, "0, [{p}]"), concat!($insn, " ", $reg, "1, [{p} + ", $stride, "*1]"),
                    concat!($insn, " ", $reg, "2, [{p} + ", $stride, "*2]"), concat!($insn, " ", $reg, "3, [{p} + ", $stride, "*3]"),
                    concat!($insn, " ", $reg, "4, [{p} + ", $stride, "*4]"), concat!($insn, " ", $reg, "5, [{p} + ", $stride, "*5]"),
                    concat!($insn, " ", $reg, "6, [{p} + ", $stride, "*6]"), concat!($insn, " ", $reg, "7, [{p} + ", $stride, "*7]"),
                    concat!($insn, " ", $reg, "8, [{p} + ", $stride, "*8]"), concat!($insn, " ", $reg, "9, [{p} + ", $stride, "*9]"),
                    concat!($insn, " ", $reg, "10, [{p} + ", $stride, "*10]"), concat!($insn, " ", $reg, "11, [{p} + ", $stride, "*11]"),
                    concat!($insn, " ", $reg, "12, [{p} + ", $stride, "*12]"), concat!($insn, " ", $reg, "13, [{p} + ", $stride, "*13]"),
                    concat!($insn, " ", $reg, "14, [{p} + ", $stride, "*14]"), concat!($insn, " ", $reg, "15, [{p} + ", $stride, "*15]"),
                    p = in(reg) $ptr,
                );
            }
        };
    }
    macro_rules! sixteen_store {
        ($insn:literal, $reg:literal, $stride:literal, $ptr:expr) => {
            // SAFETY: as for `sixteen`.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " [{p}], ", $reg, "0"), concat!($insn, " [{p} + ", $stride, "*1], ", $reg, "1"),
                    concat!($insn, " [{p} + ", $stride, "*2], ", $reg, "2"), concat!($insn, " [{p} + ", $stride, "*3], ", $reg, "3"),
                    concat!($insn, " [{p} + ", $stride, "*4], ", $reg, "4"), concat!($insn, " [{p} + ", $stride, "*5], ", $reg, "5"),
                    concat!($insn, " [{p} + ", $stride, "*6], ", $reg, "6"), concat!($insn, " [{p} + ", $stride, "*7], ", $reg, "7"),
                    concat!($insn, " [{p} + ", $stride, "*8], ", $reg, "8"), concat!($insn, " [{p} + ", $stride, "*9], ", $reg, "9"),
                    concat!($insn, " [{p} + ", $stride, "*10], ", $reg, "10"), concat!($insn, " [{p} + ", $stride, "*11], ", $reg, "11"),
                    concat!($insn, " [{p} + ", $stride, "*12], ", $reg, "12"), concat!($insn, " [{p} + ", $stride, "*13], ", $reg, "13"),
                    concat!($insn, " [{p} + ", $stride, "*14], ", $reg, "14"), concat!($insn, " [{p} + ", $stride, "*15], ", $reg, "15"),
                    p = in(reg) $ptr,
                );
            }
        };
    }
    if avx {
        sixteen!("vmovdqu", "ymm", "32", pattern.as_ptr());
    } else {
        sixteen!("movdqu", "xmm", "16", pattern.as_ptr());
    }
    let mut spins = 0u64;
    for _ in 0..rounds {
        nk::null();
        for _ in 0..200 {
            spins = core::hint::black_box(spins + 1);
        }
    }
    let words = if avx {
        sixteen_store!("vmovdqu", "ymm", "32", back.as_mut_ptr());
        64
    } else {
        sixteen_store!("movdqu", "xmm", "16", back.as_mut_ptr());
        32
    };
    let kind = if avx { "ymm" } else { "xmm" };
    match (0..words).find(|&i| back[i] != pattern[i]) {
        None => println!("GTEST ok extended_state ({kind}0-15 kept over {rounds} rounds)"),
        Some(i) => {
            println!("GTEST FAILED extended_state: {kind} word {i} is {:#x}, expected {:#x}", back[i], pattern[i])
        }
    }
}

/// Exo AM operation numbers (nk-abi).
use nk_guest::abi::exo_op as exo;

const IA32_FS_BASE: u32 = 0xC000_0100;

fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reads an MSR; an MSR this VM was not granted faults (#GP) into its handler.
    unsafe { core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high) };
    (u64::from(high) << 32) | u64::from(low)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: writes IA32_FS_BASE only (this guest does not use FS); see rdmsr.
    unsafe { core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32) };
}

/// Opens IA32_FS_BASE with the exo AM capability this VM got at creation (its initial
/// capability 1, from `msrs=0xc0000100`), writes and reads it back without the hypervisor
/// refusing, then revokes the capability and reads it again: the guest must take #GP.
fn check_msr_grants() {
    let result = (|| -> CheckResult {
        let (cap, am) = nk::initial(1).map_err(|s| why(format_args!("initial(1): {s} (run with msrs=)")))?;
        let read_only = nk::derive(cap, 0b01).map_err(|s| why(format_args!("derive: {s}")))?;
        let denied = nk::call(am, exo::OPEN_MSR, &[read_only], &[2]).status();
        expect_status(denied, Status::NOT_PERMITTED, None, "write through a read-only capability")?;
        let opened = nk::call(am, exo::OPEN_MSR, &[cap], &[3]).status();
        ensure!(opened.is_ok(), "open-msr: {opened}");
        wrmsr(IA32_FS_BASE, 0x1234_5000);
        let value = rdmsr(IA32_FS_BASE);
        ensure!(value == 0x1234_5000, "IA32_FS_BASE reads {value:#x} after writing 0x12345000");
        Ok(())
    })();
    match result {
        Ok(()) => println!("GTEST ok msr_open"),
        Err(Why(line)) => {
            println!("GTEST FAILED msr_open: {}", line.as_str());
            return;
        }
    }
    let Ok((cap, _)) = nk::initial(1) else { return };
    match nk::revoke(cap) {
        Ok(died) => println!("revoked the MSR capability ({died} died); reading the MSR again"),
        Err(s) => println!("GTEST FAILED msr_revoke: {s}"),
    }
    let value = rdmsr(IA32_FS_BASE);
    println!("GTEST FAILED msr_revoke: the MSR stayed readable after revocation ({value:#x})");
}

/// Opens `port` with the exo AM capability this VM got at creation (its initial
/// capability 1), writes it, then revokes the capability and writes it again: the
/// hypervisor must stop the guest at that second write.
fn check_port_grants(port: u16) {
    let result = (|| -> CheckResult {
        let (cap, am) = nk::initial(1).map_err(|s| why(format_args!("initial(1): {s} (run with ports=)")))?;
        let in_only = nk::derive(cap, 0b01).map_err(|s| why(format_args!("derive: {s}")))?;
        let denied = nk::call(am, exo::OPEN, &[in_only], &[u64::from(port), 1, 2]).status();
        expect_status(denied, Status::NOT_PERMITTED, None, "out through an in-only capability")?;
        let outside = nk::call(am, exo::OPEN, &[cap], &[u64::from(port), 2, 3]).status();
        expect_status(outside, Status::BAD_ARGUMENT, None, "ports beyond the capability's range")?;
        let opened = nk::call(am, exo::OPEN, &[cap], &[u64::from(port), 1, 3]).status();
        ensure!(opened.is_ok(), "open: {opened}");
        for value in 0..3u8 {
            // SAFETY: the port was just opened for this VM through the exo AM.
            unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value) };
        }
        Ok(())
    })();
    match result {
        Ok(()) => println!("GTEST ok ports_open"),
        Err(Why(line)) => {
            println!("GTEST FAILED ports_open: {}", line.as_str());
            return;
        }
    }
    let Ok((cap, _)) = nk::initial(1) else { return };
    match nk::revoke(cap) {
        Ok(died) => println!("revoked the port capability ({died} died); writing the port again"),
        Err(s) => println!("GTEST FAILED ports_revoke: {s}"),
    }
    // SAFETY: deliberately writes a port whose capability was revoked.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") 0u8) };
    println!("GTEST FAILED ports_revoke: the port stayed open after revocation");
}

mod attacks_caps;
mod attacks_vcpu;
mod bypass_keeper;
mod control;
mod cpuid_controls;
mod debuggee;
mod exo_churn;
mod exo_memory;
mod fuzz;
mod lwc;
mod lwc_bench;
mod lwc_cache;
mod lwc_cow;
mod lwc_import;
mod lwc_ranges;
mod lwc_remote;
mod lwc_traps;
mod new_am;
mod null_fast;
mod nvram;
mod nvram_layers;
mod process_bind;
mod protocol;
mod smp;
mod vm_create;
mod vm_create_caps;
mod vm_switch;

/// Reads the VM ids that follow in a mode's arguments.
fn vm_list<'a>(words: impl Iterator<Item = &'a str>) -> ([u32; 8], usize) {
    let mut vms = [0u32; 8];
    let mut count = 0;
    for vm in words.filter_map(|w| w.parse().ok()).take(vms.len()) {
        vms[count] = vm;
        count += 1;
    }
    (vms, count)
}

#[unsafe(no_mangle)]
fn nk_guest_main(boot: &nk_guest::BootArgs) {
    println!(
        "test guest on vm{}: {} KiB of memory, ring {}, args '{}'",
        boot.vm,
        boot.memory / 1024,
        current_ring(),
        boot.args
    );
    let mut words = boot.args.split_ascii_whitespace();
    match words.next() {
        None | Some("checks") => {
            if let Some(peer) = words.next().and_then(|n| n.parse().ok()) {
                PEER_VM.store(peer, core::sync::atomic::Ordering::Relaxed);
            }
            run_checks();
            check_cpuid();
            // Two page-table roots, switched in ring 0 (ring 3 cannot load CR3).
            match process_bind::check() {
                Ok(()) => println!("GTEST ok ring0/process_bound_capability"),
                Err(Why(line)) => println!("GTEST FAILED ring0/process_bound_capability: {}", line.as_str()),
            }
            // Ring 3 runs the same checks with what ring 0 hands it, and must be refused
            // INITIAL and RECEIVED (the module line does not say ring3-caps).
            run_in_ring3(run_checks);
            run_in_ring3(|| attacks_caps::ring3_enumeration(false));
        }
        Some("bench") => benchmarks(),
        Some("msr") => check_msr_grants(),
        Some("ports") => {
            let port = words.next().and_then(|p| u16::from_str_radix(p.trim_start_matches("0x"), 16).ok());
            check_port_grants(port.unwrap_or(0x80));
        }
        Some("survivor") => survive(words.next().and_then(|n| n.parse().ok()).unwrap_or(2000)),
        Some("misbehave") => misbehave(words.next().unwrap_or("")),
        Some("xstate") => {
            let seed = words.next().and_then(|n| n.parse().ok()).unwrap_or(boot.vm);
            check_extended_state(seed, words.next().and_then(|n| n.parse().ok()).unwrap_or(3000));
        }
        Some("tree") => {
            let next = words.next().and_then(|n| n.parse().ok()).unwrap_or(2);
            let (relays, count) = vm_list(words);
            protocol::tree(next, &relays[..count]);
        }
        Some("relay") => protocol::relay(words.next().and_then(|n| n.parse().ok()).unwrap_or(1)),
        Some("storm") => {
            let next = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            let rounds = words.next().and_then(|n| n.parse().ok()).unwrap_or(10);
            let guests = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            let (peers, count) = vm_list(words);
            protocol::storm(next, rounds, guests, &peers[..count]);
        }
        Some("hold") => protocol::hold(),
        Some("debuggee") => debuggee::run(),
        Some("control") => control::run(words.next()),
        Some("newam") => new_am::run(),
        Some("bypasskeep") => bypass_keeper::run(words),
        Some("lwc") => lwc::run(),
        Some("lwcbench") => lwc::bench(boot.memory),
        Some("vmbench") => vm_switch::run(words.next()),
        Some("lwc-cache") => lwc_cache::run(),
        Some("lwc-import") => lwc_import::run(boot.memory),
        Some("lwc-remote") => match words.next().and_then(|w| w.parse().ok()) {
            Some(peer) => lwc_remote::holder(peer),
            None => println!("GTEST FAILED args: lwc-remote PEER"),
        },
        Some("lwc-revoker") => match words.next().and_then(|w| w.parse().ok()) {
            Some(holder) => lwc_remote::revoker(holder),
            None => println!("GTEST FAILED args: lwc-revoker HOLDER"),
        },
        Some("lwc-ranges") => lwc_ranges::run(boot.memory),
        Some("lwc-traps") => lwc_traps::run(),
        Some("nullfast") => {
            let rounds = words.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
            null_fast::run(rounds, words.next() == Some("shared"))
        }
        Some(mode @ ("lwc-cow" | "lwc-key" | "lwc-monitor" | "lwc-demos" | "lwc-cow-quota")) => lwc_cow::run_mode(mode, boot.memory),
        Some(mode @ ("smp-counter" | "smp-lwc" | "smp-fault" | "smp-revoke")) => {
            let default = match mode {
                "smp-lwc" => 24,
                "smp-fault" => 0x3000_0000,
                _ => 20_000,
            };
            let rounds = words.next().and_then(|n| n.parse().ok()).unwrap_or(default);
            smp::run(mode, boot.vm, boot.vcpu, boot.vcpus, rounds)
        }
        Some("vmcreate") => vm_create::run(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
        Some("vmcreate-linux") => {
            let cpu = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            vm_create::run_linux(cpu, words.next().and_then(|n| n.parse().ok()).unwrap_or(128))
        }
        Some("vmcreate-caps") => vm_create_caps::run(words),
        Some("fuzz") => {
            let seed = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            let calls = words.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
            let (peers, count) = vm_list(words);
            fuzz::fuzz(boot.vm, seed, calls, &peers[..count]);
        }
        Some(mode @ ("openloop" | "ring3caps" | "flood" | "victim")) => attacks_caps::run(mode, words),
        Some(mode @ ("exomem" | "exolend" | "exoborrow" | "exobench")) => exo_memory::run(mode, words, boot.memory, boot.vm),
        Some(mode @ ("exochurn" | "exochurnafter")) => exo_churn::run(mode, words),
        Some(mode @ ("nvram" | "nvramseq" | "nvrambench")) => nvram::run(mode, words),
        Some(mode @ ("nvramexo" | "nvramshare" | "nvramborrow")) => nvram_layers::run(mode),
        Some("pbench") => {
            let (peers, count) = vm_list(words);
            protocol::bench(&peers[..count], boot.vm as u32);
        }
        Some(mode @ ("xcr0" | "xmmleak" | "tpr" | "leakprobe")) => {
            let mut number = |default: u64| words.next().and_then(|n| n.parse().ok()).unwrap_or(default);
            match mode {
                "xcr0" => attacks_vcpu::xcr0_games(number(300)),
                "xmmleak" => attacks_vcpu::xmm_leak(number(boot.vm), number(300)),
                "tpr" => attacks_vcpu::tpr_park(number(2) as u32, number(20)),
                _ => attacks_vcpu::leak_probe(number(boot.vm), number(300)),
            }
        }
        Some(other) => println!(
            "GTEST FAILED args: unknown mode '{other}' (checks [PEER_VM], bench, ports [HEXPORT], msr, survivor N, misbehave MODE, xstate SEED ROUNDS, tree NEXT RELAYS.., relay NEXT, storm NEXT ROUNDS GUESTS [PEERS..], hold, pbench PEERS.., fuzz SEED CALLS [PEERS..], xcr0 ROUNDS, xmmleak SEED ROUNDS, tpr PEER ROUNDS, leakprobe SEED ROUNDS, openloop, ring3caps, flood VICTIM, victim ATTACKER, exomem, exolend [free] [bench] BORROWERS.., exoborrow, exobench, control [orphan|busy|linux], vmcreate CPU, vmcreate-linux CPU MIB, vmcreate-caps CPU MIB, newam, exochurn ROUNDS PEER, exochurnafter CHURN, nvram, nvramseq COUNT [small], nvrambench, debuggee, lwc, lwcbench, nullfast ROUNDS [shared], bypasskeep [KEY] [BYTES], lwc-cow, lwc-key, lwc-monitor, lwc-demos, lwc-cow-quota, nvramexo, nvramshare, nvramborrow, smp-counter [ROUNDS], smp-lwc [ROUNDS], smp-fault [GPA], smp-revoke, lwc-cache, lwc-import, lwc-remote PEER, lwc-revoker HOLDER, lwc-ranges, lwc-traps, vmbench ping|pong)"
        ),
    }
    println!("GTEST done");
}
