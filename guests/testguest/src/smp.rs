//! `smp-counter` and `smp-lwc`: a bare-metal VM with several vCPUs (module `vcpus=<n>`,
//! docs/multi-vcpu.md). Every vCPU enters `nk_guest_main` (its index in `BootArgs::vcpu`);
//! the first reports, the others halt when done (the VM ends with the last).
//!
//! - `smp-counter ROUNDS`: each vCPU adds 1 to a shared atomic ROUNDS times; the first
//!   checks the sum, that every index came once, that the stacks differ, and that the vCPUs
//!   interleaved (one saw the other's adds between two of its own: preemptive slices).
//! - `smp-lwc ROUNDS`: the first vCPU makes a counter; each vCPU, concurrently, ROUNDS
//!   times creates a child lwC (every other round copy-on-write, else sharing memory) that
//!   holds only a copy of the root's lwC capability, switches into it and back, and deletes
//!   it. The child checks its switch arguments and registers are its own across preemption,
//!   that its `INITIAL` list has one entry and that the root's counter is refused by name,
//!   while the root lwC on another vCPU reads the same counter (counted as overlaps); a
//!   copy-on-write child writes its tag into one page all children write and reads it
//!   back (each view has its own copy); both vCPUs' roots write one shared page while the
//!   views exist (copy-on-write faults from two vCPUs on one page).
//! - `smp-revoke`: vCPU 0 deletes the child lwC vCPU 1 runs; vCPU 1 comes back to its
//!   root lwC with `REVOKED` (the hypervisor resumes a vCPU other than the caller).
//! - `smp-fault GPA`: the first vCPU spins, the last reads `GPA` outside the VM's memory:
//!   the VM stops (every vCPU), with a line naming the vCPU.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nk_guest::abi::counter_op::{CREATE as COUNTER_CREATE, READ as COUNTER_READ};
use nk_guest::abi::lwc_op::{LWC_COW, LW_SWITCH, NONE};
use nk_guest::abi::{nk_op, NameWords, Reply, Status, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

use crate::lwc_cow::my_lwc;

const COUNTER_AM: u16 = 1;
const MAX: usize = 4;
/// The child's verdict when every check passed.
const GOOD: u64 = 0x600D;

static PRINT: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);
static DONE: AtomicU64 = AtomicU64::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);
static INTERLEAVED: AtomicU64 = AtomicU64::new(0);
static STACKS: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
static FAILURES: AtomicU64 = AtomicU64::new(0);
/// The lwC AM's id and the root's counter (its name), published by vCPU 0.
static LWC_AM: AtomicU64 = AtomicU64::new(0);
static COUNTER: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// A child of vCPU i runs now (set by the child, in shared memory: sharing rounds only).
static CHILD_RUNS: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
/// A root read the counter while another vCPU's child lwC (refused it) ran.
static OVERLAPS: AtomicU64 = AtomicU64::new(0);
static ROUNDS_OK: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
/// The page every copy-on-write child writes its tag into (each view has its own copy).
#[repr(C, align(4096))]
struct Page([AtomicU64; 512]);
static SCRATCH: Page = Page([const { AtomicU64::new(0) }; 512]);
/// The page both roots write while views exist.
static ROOT_PAGE: Page = Page([const { AtomicU64::new(0) }; 512]);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut CHILD_STACKS: [Stack; MAX] = [const { Stack([0; 16384]) }; MAX];

/// Prints one line under a lock, so lines of two vCPUs never mix.
macro_rules! say {
    ($($arg:tt)*) => {{
        while PRINT.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        println!($($arg)*);
        PRINT.store(false, Ordering::Release);
    }};
}

fn fail(what: core::fmt::Arguments<'_>) {
    FAILURES.fetch_add(1, Ordering::SeqCst);
    say!("GTEST FAILED smp: {what}");
}

/// Halts this vCPU for good (not the first: the VM ends with the last vCPU).
fn halt() -> ! {
    loop {
        // SAFETY: HLT exits to the hypervisor, which ends this vCPU.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

/// Runs `mode` on vCPU `vcpu` of `vcpus`; returns only on the first vCPU.
pub fn run(mode: &str, vm: u64, vcpu: u64, vcpus: u64, rounds: u64) {
    if !(2..=MAX as u64).contains(&vcpus) {
        say!("GTEST FAILED smp: {vcpus} vCPU(s); the module line needs vcpus=2..4");
        return;
    }
    let index = vcpu as usize;
    SEEN.fetch_or(1 << index, Ordering::SeqCst);
    let marker = 0u64;
    STACKS[index].store(core::ptr::addr_of!(marker) as u64, Ordering::SeqCst);
    match mode {
        "smp-counter" => counter(vcpus, rounds),
        "smp-fault" => fault(vcpu, rounds),
        "smp-revoke" => revoke(vcpu),
        _ => lwcs(vm, vcpu, rounds),
    }
    DONE.fetch_add(1, Ordering::SeqCst);
    if vcpu != 0 {
        halt();
    }
    while DONE.load(Ordering::SeqCst) < vcpus {
        core::hint::spin_loop();
    }
    let all = (1u64 << vcpus) - 1;
    let stacks: [u64; MAX] = core::array::from_fn(|i| STACKS[i].load(Ordering::SeqCst));
    let distinct = (0..vcpus as usize).all(|i| (0..i).all(|j| stacks[i].abs_diff(stacks[j]) >= 16 * 1024));
    if SEEN.load(Ordering::SeqCst) != all || !distinct {
        fail(format_args!("vCPUs seen {:#b}, stacks {stacks:x?}", SEEN.load(Ordering::SeqCst)));
    }
    match mode {
        "smp-counter" => {
            let (sum, interleaved) = (SUM.load(Ordering::SeqCst), INTERLEAVED.load(Ordering::SeqCst));
            if sum == vcpus * rounds && interleaved > 0 && FAILURES.load(Ordering::SeqCst) == 0 {
                say!("GTEST ok smp_counter: {vcpus} vCPUs added {rounds} each, sum {sum}; they interleaved {interleaved} times, each on its own stack");
            } else {
                fail(format_args!("sum {sum} (wanted {}), interleaved {interleaved}", vcpus * rounds));
            }
        }
        "smp-revoke" => {
            let (status, who) = (REVOKED_STATUS.load(Ordering::SeqCst), REVOKED_CHILD.load(Ordering::SeqCst));
            if Status(status).code() == Status::REVOKED && who != 0 && FAILURES.load(Ordering::SeqCst) == 0 {
                say!("GTEST ok smp_revoke: vCPU 0's switch into the lwC {who:#x} vCPU 1 ran was refused; vCPU 0 deleted it");
                say!("smp: vCPU 1's lwSwitch returned {} in its root lwC, which works", Status(status));
            } else {
                fail(format_args!("vCPU 1's switch returned {:#x}, lwC {who:#x}", status));
            }
        }
        _ => {
            let ok: [u64; MAX] = core::array::from_fn(|i| ROUNDS_OK[i].load(Ordering::SeqCst));
            let overlaps = OVERLAPS.load(Ordering::SeqCst);
            let every = ok[..vcpus as usize].iter().all(|&n| n == rounds);
            if every && overlaps > 0 && FAILURES.load(Ordering::SeqCst) == 0 {
                say!("GTEST ok smp_lwc: {vcpus} vCPUs each switched {rounds} lwCs (half COW) concurrently, registers and caps their own");
                say!("smp: {overlaps} times a root read the counter while another vCPU's child (refused it) ran");
            } else {
                fail(format_args!("rounds ok {ok:?} of {rounds}, overlaps {overlaps}"));
            }
        }
    }
}

fn counter(vcpus: u64, rounds: u64) {
    let half = rounds / 2;
    let mut last = SUM.load(Ordering::SeqCst);
    for k in 0..rounds {
        if k == half {
            // Halfway, wait for every vCPU's first half without PAUSE (which would give
            // the slice up): only the preemption timer lets the others run meanwhile.
            while SUM.load(Ordering::SeqCst) < vcpus * half {
                core::hint::black_box(k);
            }
        }
        let before = SUM.fetch_add(1, Ordering::SeqCst);
        // Another vCPU added between two of ours: the slices interleave.
        if k > 0 && before > last + 1 {
            INTERLEAVED.fetch_add(1, Ordering::Relaxed);
        }
        last = before;
        // Some work between the adds, so a slice ends mid-loop.
        for _ in 0..20 {
            core::hint::black_box(last);
        }
    }
}

/// `smp-fault GPA`: the last vCPU reads guest-physical `GPA` (outside the VM's memory)
/// once the others run; the hypervisor stops the whole VM, naming that vCPU.
fn fault(vcpu: u64, gpa: u64) {
    SUM.fetch_add(1, Ordering::SeqCst);
    if vcpu == 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    while SUM.load(Ordering::SeqCst) < 2 {
        core::hint::spin_loop();
    }
    // SAFETY: a read the hypervisor refuses (EPT violation): the VM is stopped.
    let value = unsafe { (gpa as *const u64).read_volatile() };
    fail(format_args!("vCPU {vcpu} read {value:#x} at {gpa:#x} outside its memory"));
}

/// What vCPU 1's switch into the lwC vCPU 0 deletes returned (`smp-revoke`).
static REVOKED_STATUS: AtomicU64 = AtomicU64::new(0);
static REVOKED_CHILD: AtomicU64 = AtomicU64::new(0);
/// The name of the lwC capability vCPU 1 made (held by the root lwC, so vCPU 0 too).
static VICTIM: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

/// `smp-revoke`: vCPU 1 creates a child lwC (sharing memory) and switches into it; the
/// child spins for good. vCPU 0, in the root lwC (which holds the child's capability),
/// deletes it once the child runs: the hypervisor must send vCPU 1, which is not the one
/// that made the call, back to its root registers with `REVOKED`.
fn revoke(vcpu: u64) {
    let Some((am, me, index)) = my_lwc() else {
        fail(format_args!("no lwC capability (module option lwc?)"));
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    if vcpu == 0 {
        while CHILD_RUNS[1].load(Ordering::SeqCst) == 0 {
            core::hint::spin_loop();
        }
        let name = NameWords { low: VICTIM[0].load(Ordering::SeqCst), high: VICTIM[1].load(Ordering::SeqCst) };
        // vCPU 1 runs that child: its register file is live there, so vCPU 0 (in the
        // root, which holds the child's capability too) may not switch into it.
        let into = nk::call(am, LW_SWITCH, &[name], &[0, 0]);
        if into.status().code() != Status::NOT_PERMITTED {
            fail(format_args!("vCPU 0 switched into the lwC vCPU 1 runs: {}", into.status()));
        }
        let deleted = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[name], &[]);
        if !deleted.status().is_ok() {
            fail(format_args!("vCPU 0 could not delete vCPU 1's running lwC: {}", deleted.status()));
        }
        while REVOKED_STATUS.load(Ordering::SeqCst) == 0 {
            core::hint::spin_loop();
        }
        return;
    }
    if vcpu != 1 {
        return;
    }
    // SAFETY: vCPU 1 alone uses CHILD_STACKS[1].
    let stack = unsafe { core::ptr::addr_of!(CHILD_STACKS[1]) as u64 } + 16384;
    let created = lw_create(am, me, 1 << index, [0, 0, 0], stack);
    if !created.status().is_ok() {
        fail(format_args!("vCPU 1: lwCreate {}", created.status()));
        REVOKED_STATUS.store(u64::MAX, Ordering::SeqCst);
        return;
    }
    VICTIM[0].store(created.name.low, Ordering::SeqCst);
    VICTIM[1].store(created.name.high, Ordering::SeqCst);
    // Tag 1 << 32 | 0xFFFF: the child spins for good (vCPU 1, round "forever").
    let canary = [0x7777u64, nk::rdtsc() | 1];
    let back = nk::call(am, LW_SWITCH, &[created.name], &[(1 << 32) | FOREVER, 1]);
    // Back in the root: it still holds its capabilities (INITIAL works, the lwC's too).
    let root_ok = my_lwc().is_some_and(|(a, _, i)| a == am && i == index);
    if back.results[0] != created.results[0] || !root_ok || canary[0] != 0x7777 || canary[1] & 1 != 1 {
        fail(format_args!("vCPU 1 after the delete: {} {:x?}, root ok {root_ok}", back.status(), back.results));
    }
    REVOKED_CHILD.store(back.results[0], Ordering::SeqCst);
    REVOKED_STATUS.store(back.status, Ordering::SeqCst);
}

/// A child's round number that means: spin for good (`smp-revoke`).
const FOREVER: u64 = 0xFFFF;

fn counter_name() -> NameWords {
    NameWords { low: COUNTER[0].load(Ordering::SeqCst), high: COUNTER[1].load(Ordering::SeqCst) }
}

fn lwcs(vm: u64, vcpu: u64, rounds: u64) {
    let Some((am, me, index)) = my_lwc() else {
        fail(format_args!("no lwC capability (module option lwc?)"));
        return;
    };
    if vcpu == 0 {
        let factory = (0..16).find_map(|i| nk::initial(i).ok().filter(|(_, a)| *a == COUNTER_AM));
        let Some((factory, _)) = factory else {
            fail(format_args!("no counter factory"));
            READY.store(true, Ordering::SeqCst);
            return;
        };
        let counter = nk::call(COUNTER_AM, COUNTER_CREATE, &[factory], &[]);
        if !counter.status().is_ok() {
            fail(format_args!("counter create: {}", counter.status()));
        }
        COUNTER[0].store(counter.name.low, Ordering::SeqCst);
        COUNTER[1].store(counter.name.high, Ordering::SeqCst);
        LWC_AM.store(u64::from(am), Ordering::SeqCst);
        READY.store(true, Ordering::SeqCst);
    }
    while !READY.load(Ordering::SeqCst) {
        core::hint::spin_loop();
    }
    let i = vcpu as usize;
    // SAFETY: vCPU i alone uses CHILD_STACKS[i] (and its children, one at a time).
    let stack = unsafe { core::ptr::addr_of!(CHILD_STACKS[i]) as u64 } + 16384;
    for round in 0..rounds {
        // The root holds the counter: the read succeeds, whatever the other vCPUs run.
        let read = nk::call(COUNTER_AM, COUNTER_READ, &[counter_name()], &[]);
        if !read.status().is_ok() {
            fail(format_args!("vCPU {vcpu} round {round}: the root's counter read: {}", read.status()));
            return;
        }
        if (0..MAX).any(|j| j != i && CHILD_RUNS[j].load(Ordering::SeqCst) != 0) {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        ROOT_PAGE.0[i].fetch_add(1, Ordering::SeqCst);
        let cow = round % 2 == 1;
        let spec = if cow { [LWC_COW, 0, 0] } else { [0, 0, 0] };
        let created = lw_create(am, me, 1 << index, spec, stack);
        if !created.status().is_ok() || created.results[1] != NONE {
            fail(format_args!("vCPU {vcpu} round {round}: lwCreate {} {:x?}", created.status(), created.results));
            return;
        }
        let child_id = created.results[0];
        let tag = (vcpu << 32) | round;
        let spin = u64::from(round % 4 < 2);
        let canary = [tag ^ 0x5A5A, nk::rdtsc() | 1];
        let back = nk::call(am, LW_SWITCH, &[created.name], &[tag, spin]);
        let verdict = back.results[2];
        if !back.status().is_ok() || back.results[1] != child_id || verdict != GOOD || back.results[3] != tag {
            fail(format_args!(
                "vCPU {vcpu} round {round} (cow {cow}): switch back {} {:x?}, verdict {verdict:#x}",
                back.status(),
                back.results
            ));
            return;
        }
        if canary[0] != tag ^ 0x5A5A || canary[1] & 1 != 1 {
            fail(format_args!("vCPU {vcpu} round {round}: the root's stack changed: {canary:x?}"));
            return;
        }
        ROOT_PAGE.0[8 + i].fetch_add(1, Ordering::SeqCst);
        let deleted = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
        let again = nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
        if !deleted.status().is_ok() || again.status().is_ok() {
            fail(format_args!(
                "vCPU {vcpu} round {round}: delete {}, switch after {}",
                deleted.status(),
                again.status()
            ));
            return;
        }
        ROUNDS_OK[i].fetch_add(1, Ordering::SeqCst);
    }
    let _ = vm;
}

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc::child_entry`).
pub const CHILD: usize = 8;

/// `lwCreate(me; mask, 0, spec)` with the child on `stack`: returns in the creator; the
/// child's first entry calls [`child`] with the switch's `(a0, caller, creator, _, a1)`.
fn lw_create(am: u16, me: NameWords, mask: u64, spec: [u64; 3], stack: u64) -> Reply {
    crate::lwc::lw_create_spec(am, me, mask, spec, stack, CHILD)
}

/// A child lwC: entered by its creator's switch with `a0` = its tag (vCPU << 32 | round)
/// and `a1` = whether to spin across slices; switches back with its verdict and the tag.
pub(crate) fn child(tag: u64, caller: u64, _creator: u64, _rcx: u64, spin: u64) -> ! {
    let vcpu = (tag >> 32) as usize;
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let mut verdict = GOOD;
    // In a sharing child this is the VM's memory: the roots see that the child runs.
    if let Some(flag) = CHILD_RUNS.get(vcpu) {
        flag.store(1, Ordering::SeqCst);
    }
    if caller == NONE || vcpu >= MAX {
        verdict |= 1 << 16;
    }
    let back = match nk::initial(0) {
        Ok((cap, got)) if u64::from(got) == u64::from(am) => cap,
        _ => {
            verdict |= 1 << 17;
            NameWords::default()
        }
    };
    if nk::initial(1).is_ok() {
        verdict |= 1 << 18;
    }
    // Its tag in the page every copy-on-write child writes (its own copy in its view).
    SCRATCH.0[0].store(tag, Ordering::SeqCst);
    // Registers of its own across slices: R12-R15 hold the tag while it spins (other
    // vCPUs, and their lwCs, run meanwhile).
    let deadline = match tag & 0xFFFF {
        FOREVER => u64::MAX,
        _ => nk::rdtsc() + spin * (3 << 18),
    };
    let (r12, r13, r14, r15): (u64, u64, u64, u64);
    // SAFETY: reads the TSC in a loop; the named registers are declared.
    unsafe {
        core::arch::asm!(
            "2:",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "cmp rax, {deadline}",
            "jb 2b",
            deadline = in(reg) deadline,
            out("rax") _,
            out("rdx") _,
            inout("r12") tag => r12,
            inout("r13") !tag => r13,
            inout("r14") tag.rotate_left(7) => r14,
            inout("r15") tag ^ 0xC0FFEE => r15,
            options(nostack),
        );
    }
    if (r12, r13, r14, r15) != (tag, !tag, tag.rotate_left(7), tag ^ 0xC0FFEE) {
        verdict |= 1 << 19;
    }
    // The root's counter, by its name: refused (this lwC holds no capability to it).
    let name = NameWords { low: COUNTER[0].load(Ordering::SeqCst), high: COUNTER[1].load(Ordering::SeqCst) };
    let read = nk::call(COUNTER_AM, COUNTER_READ, &[name], &[]).status();
    if !matches!(read.code(), Status::UNKNOWN_NAME | Status::WRONG_HOLDER) {
        verdict |= 1 << 20;
    }
    let cow_copy_ok = SCRATCH.0[0].load(Ordering::SeqCst) == tag;
    // A sharing child shares SCRATCH with the other vCPUs' sharing children: only a
    // copy-on-write child's (odd rounds) must read back its own tag.
    if tag & 1 == 1 && !cow_copy_ok {
        verdict |= 1 << 21;
    }
    if let Some(flag) = CHILD_RUNS.get(vcpu) {
        flag.store(0, Ordering::SeqCst);
    }
    loop {
        nk::call(am, LW_SWITCH, &[back], &[verdict, tag]);
        // Only a refused switch comes back: the creator deletes this lwC instead.
        verdict |= 1 << 22;
    }
}
