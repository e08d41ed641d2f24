//! `nullfast ROUNDS [shared]`: null hypercalls answered by the hypervisor's exit stub
//! (issue 14, `Vcpu::serve_null_until`). Every call sets all fifteen general-purpose
//! registers to a pattern and checks the ABI's reply exactly: RAX (status), RBX, RCX, RDX,
//! RSI, RDI and R8 zero, R9-R15 and RBP unchanged, execution going on after the VMCALL;
//! selectors next to the null one (another ABI version, an unknown operation of AM 0) must
//! still be refused by the full path. With `shared` another guest runs on this CPU: the
//! stub must still end this guest's slices on time, so among the calls some must see a
//! gap of at least a slice's worth of the other guest's instructions (a stub that kept
//! answering past the slice would never let it run).

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::{nk_op, Selector, Status, ABI_VERSION, NULL_KERNEL_AM};
use nk_guest::{current_ring, println, run_in_ring3};

/// RAX, RBX, RCX, RDX, RSI, RDI, R8..R15, RBP: the layout `vmcall_with` loads and stores.
type Regs = [u64; 15];

/// TSC ticks between two calls that mean another guest ran in between (a time slice of
/// the hypervisor is 2^18 ticks; a call alone takes well under a thousand).
const DESCHEDULED_TICKS: u64 = 1 << 16;

/// Loads every general-purpose register from `regs`, executes VMCALL, and stores every
/// register back into `regs`.
fn vmcall_with(regs: &mut Regs) {
    // SAFETY: VMCALL traps to the null-Kernel, which answers a call by the ABI (nk-abi);
    // RBX and RBP, which cannot be named as operands, are saved and restored on the
    // stack, as is the buffer's pointer; every other register is declared clobbered.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "push rdi",
            "mov rax, [rdi]",
            "mov rbx, [rdi + 8]",
            "mov rcx, [rdi + 16]",
            "mov rdx, [rdi + 24]",
            "mov rsi, [rdi + 32]",
            "mov r8, [rdi + 48]",
            "mov r9, [rdi + 56]",
            "mov r10, [rdi + 64]",
            "mov r11, [rdi + 72]",
            "mov r12, [rdi + 80]",
            "mov r13, [rdi + 88]",
            "mov r14, [rdi + 96]",
            "mov r15, [rdi + 104]",
            "mov rbp, [rdi + 112]",
            "mov rdi, [rdi + 40]",
            "vmcall",
            "push rax",
            "mov rax, [rsp + 8]",
            "mov [rax + 8], rbx",
            "mov [rax + 16], rcx",
            "mov [rax + 24], rdx",
            "mov [rax + 32], rsi",
            "mov [rax + 40], rdi",
            "mov [rax + 48], r8",
            "mov [rax + 56], r9",
            "mov [rax + 64], r10",
            "mov [rax + 72], r11",
            "mov [rax + 80], r12",
            "mov [rax + 88], r13",
            "mov [rax + 96], r14",
            "mov [rax + 104], r15",
            "mov [rax + 112], rbp",
            "pop rcx",
            "mov [rax], rcx",
            "pop rdi",
            "pop rbp",
            "pop rbx",
            inout("rdi") regs.as_mut_ptr() => _,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("r8") _, out("r9") _,
            out("r10") _, out("r11") _, out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
}

/// Calls with `selector` and patterned registers; checks the status and that the reply
/// registers are zero and the others kept. Says what differed.
fn check_call(selector: u64, seed: u64, status: u64) -> Result<(), &'static str> {
    let mut regs: Regs =
        core::array::from_fn(|i| seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(i as u32 * 4) | 1);
    regs[0] = selector;
    let sent = regs;
    vmcall_with(&mut regs);
    if regs[0] != status {
        return Err("wrong status in RAX");
    }
    if regs[1..7].iter().any(|&r| r != 0) {
        return Err("a reply register (RBX, RCX, RDX, RSI, RDI, R8) is not zero");
    }
    if regs[7..] != sent[7..] {
        return Err("R9-R15 or RBP changed");
    }
    Ok(())
}

/// Runs the checks; `shared` says another guest shares this CPU.
fn check(rounds: u64, shared: bool) -> Result<(u64, u64), &'static str> {
    let null = Selector::new(NULL_KERNEL_AM, nk_op::NULL).encode();
    let other_version = (null & !(0xFFFF << 48)) | (u64::from(ABI_VERSION) + 1) << 48;
    let unknown_op = Selector::new(NULL_KERNEL_AM, 0x100).encode();
    check_call(other_version, 1, Status::new(Status::BAD_VERSION, None).0)
        .map_err(|_| "another ABI version was not refused")?;
    if check_call(unknown_op, 2, 0).is_ok() {
        return Err("an unknown operation of AM 0 was answered as the null call");
    }
    let (mut gaps, mut last) = (0, nk_guest::nk::rdtsc());
    for round in 0..rounds {
        check_call(null, round, 0)?;
        let now = nk_guest::nk::rdtsc();
        if now.wrapping_sub(last) >= DESCHEDULED_TICKS {
            gaps += 1;
        }
        last = now;
    }
    if shared && gaps == 0 {
        return Err("no other guest ran on this CPU during the calls: the slices did not end");
    }
    Ok((rounds, gaps))
}

/// The calls ring 3 makes (`run_in_ring3` takes a plain function).
static RING3_ROUNDS: AtomicU64 = AtomicU64::new(0);

fn report(result: Result<(u64, u64), &str>) {
    let ring = current_ring();
    match result {
        Ok((calls, gaps)) => println!("GTEST ok ring{ring}/nullfast: {calls} null calls, descheduled {gaps} times"),
        Err(why) => println!("GTEST FAILED ring{ring}/nullfast: {why}"),
    }
}

fn ring3_checks() {
    report(check(RING3_ROUNDS.load(Ordering::Relaxed), false));
}

/// The `nullfast` mode, in ring 0 and then (a quarter of the calls) in ring 3.
pub fn run(rounds: u64, shared: bool) {
    report(check(rounds, shared));
    RING3_ROUNDS.store(rounds / 4, Ordering::Relaxed);
    run_in_ring3(ring3_checks);
}
