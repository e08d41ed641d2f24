//! `lwc-import`: the capability part of `lwOverlay` and `lwRestrict` (issue 15, seed
//! §4.2.4-§4.2.5). The root creates a child that holds only a copy of the root's lwC
//! capability (`back`); the child finds no second `INITIAL` capability, imports the root's
//! counter factory with `lwOverlay(back; 0, 0, caps)` and creates a counter with the copy
//! (its `INITIAL` 1). The root then restricts what holders of its lwC capability may
//! import to nothing (`lwRestrict`), and the child's next import is refused.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::counter_op::CREATE as COUNTER_CREATE;
use nk_guest::abi::lwc_op::{LW_OVERLAY, LW_RESTRICT, LW_SWITCH, NONE};
use nk_guest::abi::{nk_op, NameWords, Status, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const CHILD: usize = 7;
const COUNTER_AM: u16 = 1;
const GOOD: u64 = 0x600D;

static LWC_AM: AtomicU64 = AtomicU64::new(0);
/// The root's `INITIAL` index of its counter factory.
static FACTORY: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut STACK: Stack = Stack([0; 16384]);

/// The child: round 1 imports and uses the factory, round 2 finds the import refused.
pub fn child(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let mask = 1u64 << FACTORY.load(Ordering::SeqCst);
    let mut verdict = GOOD;
    if nk::initial(1).is_ok() {
        println!("GTEST FAILED lwc_import: a second INITIAL capability before the import");
        verdict = 0xBAD;
    }
    let imported = nk::call(am, LW_OVERLAY, &[back], &[0, 0, mask]).status();
    let counter = match nk::initial(1) {
        Ok((copy, COUNTER_AM)) => nk::call(COUNTER_AM, COUNTER_CREATE, &[copy], &[]).status(),
        other => {
            println!("GTEST FAILED lwc_import: import {imported}, then INITIAL 1 is {other:?}");
            Status(u64::MAX)
        }
    };
    if !imported.is_ok() || !counter.is_ok() {
        println!("GTEST FAILED lwc_import: import {imported}, counter create with the copy {counter}");
        verdict = 0xBAD;
    }
    nk::call(am, LW_SWITCH, &[back], &[1, verdict]);
    let again = nk::call(am, LW_OVERLAY, &[back], &[0, 0, mask]).status();
    let verdict = match again.code() {
        Status::NOT_PERMITTED => GOOD,
        _ => {
            println!("GTEST FAILED lwc_import: the import after lwRestrict: {again}");
            0xBAD
        }
    };
    loop {
        nk::call(am, LW_SWITCH, &[back], &[2, verdict]);
    }
}

/// The root lwC's side; `memory`: the VM's memory in bytes.
pub fn run(memory: u64) {
    let mut list = [(NameWords::default(), 0u16); 16];
    let mut len = 0;
    while let (true, Ok(entry)) = (len < list.len(), nk::initial(len as u64)) {
        list[len] = entry;
        len += 1;
    }
    let factory = list[..len].iter().position(|&(_, am)| am == COUNTER_AM);
    let (Some(factory), Some(&(me, am))) = (factory, list[..len].last()) else {
        println!("GTEST FAILED lwc_import: no counter factory or lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    FACTORY.store(factory as u64, Ordering::SeqCst);
    let stack = core::ptr::addr_of!(STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let created = crate::lwc::lw_create_spec(am, me, 1 << (len - 1), [0, 0, 0], stack, CHILD);
    if !created.status().is_ok() || created.results[1] != NONE {
        println!("GTEST FAILED lwc_import: lwCreate: {}", created.status());
        return;
    }
    let first = nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
    if first.results[2..] == [1, GOOD] {
        println!("GTEST ok lwc_import: the child imported the root's factory with lwOverlay and used its copy");
    } else {
        println!("GTEST FAILED lwc_import: round 1: {} {:x?}", first.status(), first.results);
    }
    // Holders of the root's lwC capability may import nothing now (memory unchanged).
    let restricted = nk::call(am, LW_RESTRICT, &[me], &[0, memory, 0]).status();
    let second = nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
    if restricted.is_ok() && second.results[2..] == [2, GOOD] {
        println!("GTEST ok lwc_import_restricted: after lwRestrict the child's import is refused");
    } else {
        println!("GTEST FAILED lwc_import: restrict {restricted}, round 2: {} {:x?}", second.status(), second.results);
    }
    let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
}
