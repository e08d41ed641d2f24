//! `lwc-remote PEER` and `lwc-revoker`: an lwC destroyed from another CPU while it runs
//! (issue 15; docs/lwc.md, the `destroy` right). The holder (an `lwc` guest) creates a
//! child lwC and delegates a copy of the child's capability, with every right, to the
//! revoker PEER (another VM, on another CPU and kernel instance), then switches into the
//! child. The child, once running, delegates its copy of the holder's counter factory to
//! PEER (the sign that it runs, after 10,000 spins) and spins on. The revoker revokes its copy of the child's
//! capability on seeing that sign: its kernel hears the death, the creator's kernel retires
//! the lwC, and the holder's vCPU comes back to its root from the child with `REVOKED`
//! (the child's id in the first result). The holder then checks that nothing else changed:
//! a switch into the dead child is refused, its counter still reads 5, and a new child
//! created and entered switches back. That child is also given (`LWC_RECEIVED`) a copy of
//! a counter the revoker lent the holder at its start (its `RECEIVED` 0), and reads it.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::counter_op::{ADD as COUNTER_ADD, CREATE as COUNTER_CREATE, READ as COUNTER_READ};
use nk_guest::abi::lwc_op::{LWC_RECEIVED, LW_SWITCH, NONE};
use nk_guest::abi::{nk_op, NameWords, Status, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const CHILD: usize = 9;
/// The second child switches back with this (and what it read).
const BACK: u64 = 0x77;
/// The value of the counter the revoker lends the holder.
const LENT_VALUE: u64 = 9;
const COUNTER_AM: u16 = 1;

static LWC_AM: AtomicU64 = AtomicU64::new(0);
static PEER: AtomicU64 = AtomicU64::new(0);
/// 0: the first child (signals the revoker, then spins); 1: the second (switches back).
static ROUND: AtomicU64 = AtomicU64::new(0);
/// The first child's spins: it ran.
static SPINS: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut STACK: Stack = Stack([0; 16384]);

/// The children: see the module docs (`back`: the copy of the root's lwC capability).
pub fn child(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    if ROUND.load(Ordering::SeqCst) == 1 {
        // Its INITIAL 1: the copy of the counter the revoker lent the root (LWC_RECEIVED).
        let value = match nk::initial(1) {
            Ok((lent, COUNTER_AM)) => nk::call(COUNTER_AM, COUNTER_READ, &[lent], &[]).results[0],
            _ => 0,
        };
        loop {
            nk::call(am, LW_SWITCH, &[back], &[BACK, value]);
        }
    }
    // It runs (SPINS counts) before it tells the revoker so.
    for _ in 0..10_000 {
        SPINS.fetch_add(1, Ordering::SeqCst);
    }
    let factory = (0..4u64).find_map(|i| nk::initial(i).ok().filter(|&(_, a)| a == COUNTER_AM).map(|(c, _)| c));
    let peer = PEER.load(Ordering::SeqCst) as u32;
    match factory.map(|f| nk::delegate(f, peer, u64::MAX, false)) {
        Some(Ok(_)) => {}
        other => println!("GTEST FAILED lwc_remote: the child's sign to vm{peer}: {other:?}"),
    }
    // Runs until the revoker's revocation destroys it.
    loop {
        SPINS.fetch_add(1, Ordering::SeqCst);
        core::hint::spin_loop();
    }
}

/// The holder's side (an `lwc` guest): `peer` is the revoker's VM id.
pub fn holder(peer: u32) {
    let list = (0..16u64).map_while(|i| nk::initial(i).ok().map(|(cap, am)| (i, cap, am)));
    let (mut mine, mut factory) = (None, None);
    for (i, cap, am) in list {
        if am == COUNTER_AM && factory.is_none() {
            factory = Some((i, cap));
        }
        mine = Some((i, cap, am));
    }
    let (Some((index, me, am)), Some((findex, factory))) = (mine, factory) else {
        println!("GTEST FAILED lwc_remote: no lwC capability or counter factory (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    PEER.store(u64::from(peer), Ordering::SeqCst);
    let counter = nk::call(COUNTER_AM, COUNTER_CREATE, &[factory], &[]);
    let added = nk::call(COUNTER_AM, COUNTER_ADD, &[counter.name], &[5]);
    if !counter.status().is_ok() || !added.status().is_ok() {
        println!("GTEST FAILED lwc_remote: counter: {} {}", counter.status(), added.status());
        return;
    }
    let stack = core::ptr::addr_of!(STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let created = crate::lwc::lw_create_spec(am, me, 1 << index | 1 << findex, [0, 0, 0], stack, CHILD);
    if !created.status().is_ok() || created.results[1] != NONE {
        println!("GTEST FAILED lwc_remote: lwCreate: {}", created.status());
        return;
    }
    let (child, child_id) = (created.name, created.results[0]);
    if let Err(status) = nk::delegate(child, peer, u64::MAX, false) {
        println!("GTEST FAILED lwc_remote: delegate the child's capability to vm{peer}: {status}");
        return;
    }
    println!("lwc-remote: child lwC {child_id:#x} lent to vm{peer}; switching into it");
    let back = nk::call(am, LW_SWITCH, &[child], &[0, 0]);
    let spins = SPINS.load(Ordering::SeqCst);
    if back.status().code() == Status::REVOKED && back.results[0] == child_id && spins >= 10_000 {
        println!(
            "GTEST ok lwc_remote_destroyed: the running lwC {child_id:#x} destroyed from another CPU \
             ({spins} spins); back in the root with {}",
            back.status()
        );
    } else {
        println!(
            "GTEST FAILED lwc_remote: the switch into the child returned {} {:x?} after {spins} spins",
            back.status(),
            back.results
        );
        return;
    }
    // Nothing else changed.
    let again = nk::call(am, LW_SWITCH, &[child], &[0, 0]).status();
    let read = nk::call(COUNTER_AM, COUNTER_READ, &[counter.name], &[]);
    ROUND.store(1, Ordering::SeqCst);
    // The second child also gets a copy of the counter the revoker lent (RECEIVED 0).
    let _lent = nk::wait_received(0);
    let mask = 1 << index | 1 << 32;
    let second = crate::lwc::lw_create_options(am, me, mask, LWC_RECEIVED, [0, 0, 0], stack, CHILD);
    let entered = nk::call(am, LW_SWITCH, &[second.name], &[0, 0]);
    let deleted = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[second.name], &[]).status();
    let refused = matches!(again.code(), Status::REVOKED | Status::UNKNOWN_NAME);
    let lent_value = entered.results[3];
    if refused && read.status().is_ok() && read.results[0] == 5 && entered.results[2] == BACK && deleted.is_ok() {
        println!(
            "GTEST ok lwc_remote_rest_intact: a switch into the dead lwC {again}; the counter reads 5; \
             a new child switched back"
        );
        if lent_value == LENT_VALUE {
            println!(
                "GTEST ok lwc_received: the new child read the counter the revoker lent (RECEIVED 0, LWC_RECEIVED)"
            );
        } else {
            println!("GTEST FAILED lwc_received: the new child read {lent_value}, not {LENT_VALUE}");
        }
    } else {
        println!(
            "GTEST FAILED lwc_remote: switch into the dead lwC {again}, counter {} {}, new child {} {} {:x?}, delete {deleted}",
            read.status(),
            read.results[0],
            second.status(),
            entered.status(),
            entered.results
        );
    }
    // Done: the revoker may end (and its counter with it).
    if let Err(status) = nk::delegate(counter.name, peer, u64::MAX, false) {
        println!("GTEST FAILED lwc_remote: tell vm{peer} it is done: {status}");
    }
}

/// The revoker's side: waits for the holder's copy of its child's capability and the
/// child's sign that it runs, then revokes the copy.
pub fn revoker(holder: u32) {
    // A counter for the holder first (its RECEIVED 0, which its second child is given).
    let factory = (0..8u64).find_map(|i| nk::initial(i).ok().filter(|&(_, a)| a == COUNTER_AM).map(|(c, _)| c));
    let counter = factory.map(|f| nk::call(COUNTER_AM, COUNTER_CREATE, &[f], &[]));
    let lent = counter.and_then(|c| {
        let added = nk::call(COUNTER_AM, COUNTER_ADD, &[c.name], &[LENT_VALUE]).status().is_ok();
        added.then(|| nk::delegate(c.name, holder, u64::MAX, false).ok()).flatten()
    });
    if lent.is_none() {
        println!("GTEST FAILED lwc_remote_revoke: lend a counter to vm{holder}");
    }
    let lent = nk::wait_received(0);
    let _sign = nk::wait_received(1);
    match nk::revoke(lent) {
        Ok(killed) if killed >= 1 => {
            println!("GTEST ok lwc_remote_revoke: revoked the running lwC's capability ({killed} capabilities)")
        }
        other => println!("GTEST FAILED lwc_remote_revoke: revoke: {other:?}"),
    }
    // Stays (and so does the counter it lent) until the holder says it is done: a
    // capability of its root lwC in this inbox.
    for _ in 0..200_000u64 {
        if (0..4).filter_map(|i| nk::received(i).ok()).any(|r| r.sender == Some(holder)) {
            return;
        }
        for _ in 0..200 {
            core::hint::spin_loop();
        }
    }
    println!("GTEST FAILED lwc_remote_revoke: vm{holder} never said it was done");
}
