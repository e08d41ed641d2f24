//! `lwc-traps`: two `LWC_SYSTRAP` children with trapped calls waiting at once (docs/lwc.md;
//! the hypervisor keeps one per lwC, not one per VM, so a root that leaves one trap
//! unanswered while it runs another child, or a vCPU of a VM with several, loses none).
//! The root enters child A, whose read of the root's counter by name traps; without
//! answering, it enters child B, whose add of 3 traps too. It then performs A's read
//! (5, before the add) and B's add (8) with `lwSyscall`, and answers each: both children
//! check their call's result and switch back with a verdict.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::counter_op::{ADD, CREATE, READ};
use nk_guest::abi::lwc_op::{LWC_SYSTRAP, LW_SWITCH, LW_SYSCALL, TRAPPED};
use nk_guest::abi::{NameWords, Selector};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const CHILD: usize = 11;
const COUNTER_AM: u16 = 1;
const GOOD: u64 = 0x600D;

static LWC_AM: AtomicU64 = AtomicU64::new(0);
/// What the child entered next does: 0 reads, 1 adds 3.
static ROLE: AtomicU64 = AtomicU64::new(0);
static COUNTER: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut STACKS: [Stack; 2] = [Stack([0; 16384]), Stack([0; 16384])];

/// A child: its one call by the root's name traps; it reports whether the root's answer
/// is the one expected.
pub fn child(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let counter = NameWords { low: COUNTER[0].load(Ordering::SeqCst), high: COUNTER[1].load(Ordering::SeqCst) };
    let (role, reply) = match ROLE.load(Ordering::SeqCst) {
        0 => ("read", nk::call(COUNTER_AM, READ, &[counter], &[])),
        _ => ("add", nk::call(COUNTER_AM, ADD, &[counter], &[3])),
    };
    let want = if role == "read" { 5 } else { 8 };
    let verdict = if reply.status().is_ok() && reply.results[0] == want {
        GOOD
    } else {
        println!("GTEST FAILED lwc_traps: the child's {role} returned {} {:?}", reply.status(), reply.results);
        0xBAD
    };
    loop {
        nk::call(am, LW_SWITCH, &[back], &[verdict, 0]);
    }
}

/// The root lwC's side.
pub fn run() {
    let list = (0..16u64).map_while(|i| nk::initial(i).ok().map(|(cap, am)| (i, cap, am)));
    let (mut mine, mut factory) = (None, None);
    for (i, cap, am) in list {
        if am == COUNTER_AM && factory.is_none() {
            factory = Some(cap);
        }
        mine = Some((i, cap, am));
    }
    let (Some((index, me, am)), Some(factory)) = (mine, factory) else {
        println!("GTEST FAILED lwc_traps: no lwC capability or counter factory (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let counter = nk::call(COUNTER_AM, CREATE, &[factory], &[]);
    let added = nk::call(COUNTER_AM, ADD, &[counter.name], &[5]);
    if !counter.status().is_ok() || !added.status().is_ok() {
        println!("GTEST FAILED lwc_traps: counter {} {}", counter.status(), added.status());
        return;
    }
    COUNTER[0].store(counter.name.low, Ordering::SeqCst);
    COUNTER[1].store(counter.name.high, Ordering::SeqCst);
    let stack = |i: usize| core::ptr::addr_of!(STACKS) as u64 + (i as u64 + 1) * core::mem::size_of::<Stack>() as u64;
    let make = |i| crate::lwc::lw_create_options(am, me, 1 << index, LWC_SYSTRAP, [0, 0, 0], stack(i), CHILD);
    let (a, b) = (make(0), make(1));
    if !a.status().is_ok() || !b.status().is_ok() {
        println!("GTEST FAILED lwc_traps: lwCreate {} {}", a.status(), b.status());
        return;
    }
    let trapped = |reply: nk_guest::abi::Reply, id: u64, op: u32| {
        reply.status().is_ok() && reply.results[..3] == [TRAPPED, id, Selector::new(COUNTER_AM, op).encode()]
    };
    ROLE.store(0, Ordering::SeqCst);
    let ta = nk::call(am, LW_SWITCH, &[a.name], &[0, 0]);
    ROLE.store(1, Ordering::SeqCst);
    let tb = nk::call(am, LW_SWITCH, &[b.name], &[0, 0]);
    if !trapped(ta, a.results[0], READ) || !trapped(tb, b.results[0], ADD) || tb.results[3] != 3 {
        println!(
            "GTEST FAILED lwc_traps: the traps: A {} {:x?}, B {} {:x?}",
            ta.status(),
            ta.results,
            tb.status(),
            tb.results
        );
        return;
    }
    // Both wait; A's is the older.
    let sa = nk::call(am, LW_SYSCALL, &[a.name], &[1]);
    let sb = nk::call(am, LW_SYSCALL, &[b.name], &[1]);
    let va = nk::call(am, LW_SWITCH, &[a.name], &[sa.status, sa.results[0]]);
    let vb = nk::call(am, LW_SWITCH, &[b.name], &[sb.status, sb.results[0]]);
    let now = nk::call(COUNTER_AM, READ, &[counter.name], &[]);
    let ok = sa.status().is_ok() && sa.results[0] == 5 && sb.status().is_ok() && sb.results[0] == 8;
    if ok && va.results[2] == GOOD && vb.results[2] == GOOD && now.results[0] == 8 {
        println!("GTEST ok lwc_traps: two trapped calls waited at once; lwSyscall performed each (read 5, add to 8) and each child got its answer");
    } else {
        println!(
            "GTEST FAILED lwc_traps: lwSyscall A {} {:?}, B {} {:?}; verdicts {:#x} {:#x}; counter {}",
            sa.status(),
            sa.results,
            sb.status(),
            sb.results,
            va.results[2],
            vb.results[2],
            now.results[0]
        );
    }
    for child in [a.name, b.name] {
        let _ = nk::call(nk_guest::abi::NULL_KERNEL_AM, nk_guest::abi::nk_op::DELETE, &[child], &[]);
    }
}
