//! `lwc-cache`: the hypervisor repeats an `lwSwitch` the null-Kernel allowed lately
//! without asking it again (hypervisor/src/lwc.rs, `SwitchCache`); this mode checks that a
//! capability that died is not switched with. The root creates a child that holds a copy
//! of the root's lwC capability (`back`); the child derives `d` from it and switches back
//! with `d` twice (the second time the remembered switch), then deletes `d` and switches
//! with it a third time: that must be refused (the name is dead), and the child reports
//! the refusal through `back`. The root's own switches into the child repeat too.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::lwc_op::{LW_SWITCH, NONE};
use nk_guest::abi::{nk_op, NameWords, Status, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const CHILD: usize = 6;
/// The child's report when the switch with the dead name was refused.
const REFUSED: u64 = 0x600D;

static LWC_AM: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut STACK: Stack = Stack([0; 16384]);

/// The child: see the module docs. Its switches carry the round number in a0.
pub fn child(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let derived = nk::call(NULL_KERNEL_AM, nk_op::DERIVE, &[back], &[1]);
    if !derived.status().is_ok() {
        println!("GTEST FAILED lwc_cache: derive: {}", derived.status());
    }
    let d = derived.name;
    for round in 1..=2 {
        let reply = nk::call(am, LW_SWITCH, &[d], &[round, 0]);
        if !reply.status().is_ok() {
            println!("GTEST FAILED lwc_cache: round {round}: the child's switch back with d: {}", reply.status());
        }
    }
    let deleted = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[d], &[]).status();
    // Returns here only when refused; a switch would hand the root round 3.
    let dead = nk::call(am, LW_SWITCH, &[d], &[3, 0]).status();
    let verdict = match (deleted.is_ok(), dead.code()) {
        (true, Status::UNKNOWN_NAME | Status::REVOKED | Status::WRONG_HOLDER) => REFUSED,
        _ => {
            println!("GTEST FAILED lwc_cache: delete {deleted}, then the switch with the dead name {dead}");
            0xBAD
        }
    };
    loop {
        nk::call(am, LW_SWITCH, &[back], &[4, verdict]);
    }
}

/// The root lwC's side.
pub fn run() {
    let last = (0..16u64).map_while(|i| nk::initial(i).ok().map(|(cap, am)| (i, cap, am))).last();
    let Some((index, me, am)) = last else {
        println!("GTEST FAILED lwc_cache: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let stack = core::ptr::addr_of!(STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let created = crate::lwc::lw_create_spec(am, me, 1 << index, [0, 0, 0], stack, CHILD);
    if !created.status().is_ok() || created.results[1] != NONE {
        println!("GTEST FAILED lwc_cache: lwCreate: {}", created.status());
        return;
    }
    let child = created.name;
    // Three switches into the child: the second and third repeat the first. Each returns
    // with the child's (round, report).
    let rounds: [(u64, u64); 3] = core::array::from_fn(|_| {
        let reply = nk::call(am, LW_SWITCH, &[child], &[0, 0]);
        match reply.status().is_ok() {
            true => (reply.results[2], reply.results[3]),
            false => (0, 0),
        }
    });
    if rounds == [(1, 0), (2, 0), (4, REFUSED)] {
        println!("GTEST ok lwc_cache_dead_name: the child's repeated switch with a deleted capability was refused");
    } else {
        println!(
            "GTEST FAILED lwc_cache: the child's (round, report) {rounds:x?} (round 3: a dead capability switched)"
        );
    }
    let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[child], &[]);
}
