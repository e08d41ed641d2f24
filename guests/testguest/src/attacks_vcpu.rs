//! Attacks on the vCPU state a guest controls (issue 9): each mode does what a hostile
//! guest would and reports `GTEST ok <check>` only if the hypervisor kept it (and every
//! other guest) safe.
//!
//! - `xcr0 ROUNDS`: XCR0 games. Enables SSE in XCR0, uses XMM0, lets time slices pass,
//!   drops SSE from XCR0 again (the old hypervisor's XRSTOR then took #GP and stopped the
//!   machine), lets slices pass, then tries XCR0 values XSETBV must refuse; each must be a
//!   #GP to this guest and leave XCR0 unchanged.
//! - `xmmleak SEED ROUNDS`: XMM0 and MXCSR with CR4.OSFXSR set and XCR0 = 1 (x87 only):
//!   two guests on one CPU each check over many slices that theirs survive.
//! - `tpr PEER ROUNDS`: raises CR8 to 15, then delegates to VM PEER on another CPU (the
//!   vCPU parks until that kernel answers through a doorbell the physical TPR would mask),
//!   many times; checks CR8 reads back 15; runs MONITOR/MWAIT and a long PAUSE loop.
//! - `leakprobe SEED ROUNDS`: CR2, DR0-DR3, DR6 and IA32_KERNEL_GS_BASE (through
//!   WRGSBASE and SWAPGS) set to values of its own; two guests on one CPU each check over
//!   many slices that theirs survive.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::nk;
use nk_guest::println;

use super::{create_counter, why, CheckResult, Why};

fn report(name: &str, result: CheckResult) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(Why(line)) => println!("GTEST FAILED {name}: {}", line.as_str()),
    }
}

/// Hypercalls per round of the leak checks: enough that their rounds span many slices.
const ROUND: u64 = 4;

/// Lets time pass: `rounds` hypercalls with a short spin after each.
fn pass_time(rounds: u64) {
    let mut spins = 0u64;
    for _ in 0..rounds {
        nk::null();
        for _ in 0..200 {
            spins = core::hint::black_box(spins + 1);
        }
    }
}

fn read_cr4() -> u64 {
    let cr4: u64;
    // SAFETY: reading CR4 at CPL0 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack)) };
    cr4
}

fn set_cr4_bits(bits: u64) {
    // SAFETY: sets feature-enable bits in this guest's own CR4 (the caller checked CPUID).
    unsafe { asm!("mov cr4, {}", in(reg) read_cr4() | bits, options(nomem, nostack)) };
}

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;

// The #GP handler the `xcr0` mode installs: counts the fault and resumes after the
// 3-byte XSETBV (0F 01 D1) that caused it.
global_asm!(
    r#"
.section .text.nk_attack_gp, "ax"
.global nk_attack_gp_handler
nk_attack_gp_handler:
    add rsp, 8
    add qword ptr [rsp], 3
    lock inc qword ptr [rip + {count}]
    iretq
"#,
    count = sym GP_COUNT,
);

static GP_COUNT: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    fn nk_attack_gp_handler();
}

/// Returns this guest's IDT gate for vector 13 and a pointer to it.
fn gp_gate() -> *mut [u64; 2] {
    #[repr(C, packed(2))]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let mut idtr = Pointer { limit: 0, base: 0 };
    // SAFETY: SIDT stores 10 bytes into `idtr`.
    unsafe { asm!("sidt [{}]", in(reg) &mut idtr, options(nostack)) };
    (idtr.base + 13 * 16) as *mut [u64; 2]
}

/// Runs `f` with the counting #GP handler installed; returns how many #GPs it took.
fn counting_gp(f: impl FnOnce()) -> u64 {
    let slot = gp_gate();
    let handler = nk_attack_gp_handler as *const () as usize as u64;
    let gate = [(handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48), handler >> 32];
    // SAFETY: the IDT is this guest's own (the guest library's tables, identity-mapped);
    // the original gate is put back before returning. One vCPU, so nothing else runs.
    let saved = unsafe { slot.read_volatile() };
    // SAFETY: as above.
    unsafe { slot.write_volatile(gate) };
    let before = GP_COUNT.load(Ordering::SeqCst);
    f();
    let after = GP_COUNT.load(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { slot.write_volatile(saved) };
    after - before
}

fn xsetbv(ecx: u32, value: u64) {
    // SAFETY: XSETBV exits to the hypervisor, which checks the value; a refusal is a #GP
    // that the caller's handler counts and skips.
    unsafe { asm!("xsetbv", in("ecx") ecx, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack)) };
}

fn xgetbv() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set only reads.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

fn load_xmm0(pattern: &[u64; 2]) {
    // SAFETY: writes XMM0 from a 16-byte buffer; this soft-float guest never uses SIMD
    // registers otherwise.
    unsafe { asm!("movdqu xmm0, [{}]", in(reg) pattern.as_ptr(), options(nostack)) };
}

fn store_xmm0() -> [u64; 2] {
    let mut back = [0u64; 2];
    // SAFETY: stores XMM0 into a 16-byte buffer.
    unsafe { asm!("movdqu [{}], xmm0", in(reg) back.as_mut_ptr(), options(nostack)) };
    back
}

/// `xcr0 ROUNDS`.
pub fn xcr0_games(rounds: u64) {
    report("xcr0_games", xcr0_games_check(rounds));
}

fn xcr0_games_check(rounds: u64) -> CheckResult {
    ensure!(core::arch::x86_64::__cpuid(1).ecx & (1 << 26) != 0, "no XSAVE in CPUID");
    set_cr4_bits(CR4_OSFXSR | CR4_OSXSAVE);
    let refused = counting_gp(|| xsetbv(0, 0b11));
    ensure!(refused == 0 && xgetbv() == 0b11, "XSETBV 3 refused ({refused} #GP), XCR0 {:#x}", xgetbv());
    let pattern = [0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210];
    load_xmm0(&pattern);
    pass_time(rounds);
    ensure!(store_xmm0() == pattern, "XMM0 changed while XCR0 held SSE");
    let refused = counting_gp(|| xsetbv(0, 0b1));
    ensure!(refused == 0 && xgetbv() == 1, "XSETBV 1 refused ({refused} #GP), XCR0 {:#x}", xgetbv());
    println!("dropped SSE from XCR0 after using it; letting slices pass");
    pass_time(rounds);
    // Values XSETBV refuses (SDM Vol. 1 §13.3): x87 clear, AVX without SSE, one MPX bit
    // of two, part of AVX-512, AVX-512 without AVX, one AMX bit of two, reserved bits.
    let invalid: [u64; 9] = [0, 0b10, 0b101, 0b1001, 0b1_0001, 0b10_0111, 0b1110_0011, 0x2_0001, 1 << 63 | 1];
    for value in invalid {
        let faults = counting_gp(|| xsetbv(0, value));
        ensure!(faults == 1, "XSETBV {value:#x} took {faults} #GP, expected 1");
        ensure!(xgetbv() == 1, "XSETBV {value:#x} changed XCR0 to {:#x}", xgetbv());
    }
    let faults = counting_gp(|| xsetbv(1, 1));
    ensure!(faults == 1, "XSETBV of XCR1 took {faults} #GP, expected 1");
    println!("{} invalid XCR0 values refused with #GP; XCR0 still 1", invalid.len() + 1);
    Ok(())
}

/// `xmmleak SEED ROUNDS`.
pub fn xmm_leak(seed: u64, rounds: u64) {
    report("xmm_leak", xmm_leak_check(seed, rounds));
}

fn xmm_leak_check(seed: u64, rounds: u64) -> CheckResult {
    // SSE through CR4.OSFXSR only: XCR0 stays 1 (x87), which the guest never changes.
    set_cr4_bits(CR4_OSFXSR);
    let pattern = [seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), !seed];
    // Rounding control (bits 14:13) differs per seed; all exceptions stay masked.
    let mxcsr: u32 = 0x1F80 | ((seed as u32 & 3) << 13);
    load_xmm0(&pattern);
    // SAFETY: loads MXCSR with a valid value (reserved bits clear).
    unsafe { asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack)) };
    let mut wrong = 0u64;
    let mut first = None;
    for _ in 0..rounds {
        pass_time(ROUND);
        let back = store_xmm0();
        let mut now: u32 = 0;
        // SAFETY: stores MXCSR into a 4-byte variable.
        unsafe { asm!("stmxcsr [{}]", in(reg) &mut now, options(nostack)) };
        if back != pattern || now != mxcsr {
            wrong += 1;
            first.get_or_insert((back[0], now));
            load_xmm0(&pattern);
            // SAFETY: as above.
            unsafe { asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack)) };
        }
    }
    if let Some((xmm, csr)) = first {
        ensure!(false, "XMM0/MXCSR changed in {wrong} of {rounds} rounds (first saw {xmm:#x}/{csr:#x})");
    }
    println!("XMM0 and MXCSR kept over {rounds} rounds with XCR0 = 1");
    Ok(())
}

fn read_cr8() -> u64 {
    let cr8: u64;
    // SAFETY: reading CR8 at CPL0 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) cr8, options(nomem, nostack)) };
    cr8
}

fn write_cr8(value: u64) {
    // SAFETY: CR8 is this guest's task priority; it has no interrupts of its own to mask.
    unsafe { asm!("mov cr8, {}", in(reg) value, options(nomem, nostack)) };
}

/// `tpr PEER ROUNDS`.
pub fn tpr_park(peer: u32, rounds: u64) {
    report("tpr_park", tpr_park_check(peer, rounds));
    write_cr8(0);
}

fn tpr_park_check(peer: u32, rounds: u64) -> CheckResult {
    let (_, counter) = create_counter()?;
    write_cr8(15);
    ensure!(read_cr8() == 15, "CR8 reads {} after writing 15", read_cr8());
    // The first delegation is the peer's lifeline (it holds until it dies); the others
    // come later, when this CPU's other guests may have ended and it sleeps while parked.
    let lifeline = nk::derive(counter, u64::MAX).map_err(|s| why(format_args!("derive: {s}")))?;
    nk::delegate(lifeline, peer, u64::MAX, false).map_err(|s| why(format_args!("delegate to vm{peer}: {s}")))?;
    for round in 0..rounds {
        pass_time(50);
        nk::delegate(counter, peer, 0b01, false).map_err(|s| why(format_args!("delegate {round} to vm{peer}: {s}")))?;
    }
    ensure!(read_cr8() == 15, "CR8 reads {} after parking", read_cr8());
    println!("CR8 = 15 kept over {} cross-kernel delegations", rounds + 1);
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 3) != 0 {
        let line = [0u64; 8];
        for _ in 0..100 {
            // SAFETY: MONITOR arms a line of this guest's own memory; MWAIT with no hints.
            unsafe {
                asm!("monitor", in("rax") line.as_ptr(), in("ecx") 0, in("edx") 0, options(nostack));
                asm!("mwait", in("eax") 0, in("ecx") 0, options(nostack));
            }
        }
        println!("MONITOR/MWAIT x100 returned");
    }
    for _ in 0..20_000 {
        core::hint::spin_loop();
    }
    nk::revoke(lifeline).map_err(|s| why(format_args!("revoke of the lifeline: {s}")))?;
    Ok(())
}

/// `leakprobe SEED ROUNDS`.
pub fn leak_probe(seed: u64, rounds: u64) {
    report("leak_probe", leak_probe_check(seed, rounds));
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
struct Probe {
    cr2: u64,
    dr: [u64; 4],
    dr6: u64,
    kernel_gs_base: Option<u64>,
}

fn read_probe(with_gs: bool) -> Probe {
    let (cr2, dr0, dr1, dr2, dr3, dr6): (u64, u64, u64, u64, u64, u64);
    // SAFETY: reads this guest's own control and debug registers at CPL0.
    unsafe {
        asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack));
        asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack));
        asm!("mov {}, dr1", out(reg) dr1, options(nomem, nostack));
        asm!("mov {}, dr2", out(reg) dr2, options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) dr3, options(nomem, nostack));
        asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack));
    }
    let kernel_gs_base = with_gs.then(|| {
        let value: u64;
        // SAFETY: SWAPGS twice around RDGSBASE reads IA32_KERNEL_GS_BASE and leaves both
        // GS bases as they were; this guest does not use GS.
        unsafe { asm!("swapgs", "rdgsbase {}", "swapgs", out(reg) value, options(nomem, nostack)) };
        value
    });
    Probe { cr2, dr: [dr0, dr1, dr2, dr3], dr6, kernel_gs_base }
}

fn leak_probe_check(seed: u64, rounds: u64) -> CheckResult {
    let with_gs = core::arch::x86_64::__cpuid_count(7, 0).ebx & 1 != 0;
    if with_gs {
        set_cr4_bits(CR4_FSGSBASE);
    }
    let base = 0x10_0000_0000 * (seed + 1);
    let mine = Probe {
        cr2: base + 0xC2,
        dr: [base + 0x100, base + 0x200, base + 0x300, base + 0x400],
        // B0-B3 (bits 3:0) differ per seed; the other bits read as DR6's fixed ones.
        dr6: 0xFFFF_0FF0 | (1 << (seed % 4)),
        kernel_gs_base: with_gs.then_some(base + 0x6500),
    };
    // SAFETY: writes this guest's own CR2 and debug registers (DR7 stays 0x400, so no
    // breakpoint is armed) and, with FSGSBASE, puts a value into IA32_KERNEL_GS_BASE
    // through GS (WRGSBASE, SWAPGS); this guest does not use GS.
    unsafe {
        asm!("mov cr2, {}", in(reg) mine.cr2, options(nomem, nostack));
        asm!("mov dr0, {}", in(reg) mine.dr[0], options(nomem, nostack));
        asm!("mov dr1, {}", in(reg) mine.dr[1], options(nomem, nostack));
        asm!("mov dr2, {}", in(reg) mine.dr[2], options(nomem, nostack));
        asm!("mov dr3, {}", in(reg) mine.dr[3], options(nomem, nostack));
        asm!("mov dr6, {}", in(reg) mine.dr6, options(nomem, nostack));
        if let Some(value) = mine.kernel_gs_base {
            asm!("swapgs", "wrgsbase {}", "swapgs", in(reg) value, options(nomem, nostack));
        }
    }
    let first = read_probe(with_gs);
    ensure!(first == mine, "read back {:#x?} right after writing", first.cr2);
    for round in 0..rounds {
        pass_time(ROUND);
        let now = read_probe(with_gs);
        ensure!(
            now == mine,
            "round {round}: cr2 {:#x} dr0 {:#x} dr6 {:#x} kgs {:#x}, expected {:#x} {:#x} {:#x} {:#x}",
            now.cr2,
            now.dr[0],
            now.dr6,
            now.kernel_gs_base.unwrap_or(0),
            mine.cr2,
            mine.dr[0],
            mine.dr6,
            mine.kernel_gs_base.unwrap_or(0)
        );
    }
    let gs = if with_gs { ", IA32_KERNEL_GS_BASE" } else { " (no FSGSBASE: IA32_KERNEL_GS_BASE not probed)" };
    println!("CR2, DR0-DR3, DR6{gs} kept over {rounds} rounds");
    Ok(())
}
