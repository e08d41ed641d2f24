//! `lwcbench`'s copy-on-write cycles (issue 15): `GBENCH lwc_cycle_P_pages_instructions`
//! for P = 100 and 1,000, each an `lwCreate` of a child with a copy-on-write view of all
//! memory, a switch into it, its writes to P pages (one byte each, in the upper half of
//! the VM's memory, so each takes a copy: the seed's "pages written") and its switch
//! back, and the deletion of its capability (the view and its copies freed). The child's
//! stack is copy-on-write too, so one or two more pages are copied.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::lwc_op::{LWC_COW, LW_SWITCH};
use nk_guest::abi::{nk_op, NameWords, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number of the writer (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const WRITER: usize = 5;
static PAGES: AtomicU64 = AtomicU64::new(0);
static REGION: AtomicU64 = AtomicU64::new(0);
/// The lwC AM's id (the child's copy of `lwc_cow`'s is not set in this mode).
static LWC_AM: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut WRITER_STACK: Stack = Stack([0; 16384]);

/// The child: writes one byte of each of the pages, then switches back (`back`), forever.
pub fn writer(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let region = REGION.load(Ordering::SeqCst);
    for i in 0..PAGES.load(Ordering::SeqCst) {
        // SAFETY: inside the VM's memory (its upper half, checked by `cycles`), which
        // nothing else uses; this lwC's copy-on-write view of it.
        unsafe { ((region + i * 4096) as *mut u8).write_volatile(1) };
    }
    loop {
        nk::call(am, LW_SWITCH, &[back], &[0, 0]);
    }
}

/// Measures the cycles with the root lwC `me` (AM `am`, `INITIAL` index `index`) of a VM
/// of `memory` bytes.
pub fn cycles(am: u16, me: NameWords, index: usize, memory: u64) {
    let region = (memory / 2) & !0xFFF;
    if region + 1000 * 4096 > memory {
        println!("GBENCH error: lwc cycles need mem=16M");
        return;
    }
    REGION.store(region, Ordering::SeqCst);
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let stack = core::ptr::addr_of!(WRITER_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let empty = crate::measure(|| {});
    for pages in [100u64, 1000] {
        PAGES.store(pages, Ordering::SeqCst);
        let mut failed = None;
        let cycle = crate::measure(|| {
            let created = crate::lwc::lw_create_spec(am, me, 1 << index, [LWC_COW, 0, 0], stack, WRITER);
            if !created.status().is_ok() {
                failed = Some(created.status());
                return;
            }
            nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
            let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
        });
        match failed {
            Some(status) => println!("GBENCH error: lwCreate for {pages} pages: {status}"),
            None => println!("GBENCH lwc_cycle_{pages}_pages_instructions {}", cycle.saturating_sub(empty)),
        }
    }
}
