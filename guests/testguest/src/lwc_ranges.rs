//! `lwc-ranges`: several exception ranges in one `lwCreate` resource spec (`LWC_RANGES`,
//! docs/lwc.md). The root refuses malformed lists first (none of them creates anything:
//! the next child's id is the one after the last good one), then creates a child whose
//! memory is copy-on-write but for a list of three ranges: four pages `LWC_SHARED`, the
//! third of them `LWC_COW` again (a later range over an earlier one), and a page elsewhere
//! `LWC_UNMAP`. The child writes its tag into the four pages and switches back: the root
//! sees it in pages 0, 1 and 3 and its own value in page 2.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::lwc_op::{LWC_COW, LWC_RANGES, LWC_SHARED, LWC_UNMAP, LW_SWITCH, MAX_RANGES, NONE};
use nk_guest::abi::{nk_op, NameWords, Status, NULL_KERNEL_AM};
use nk_guest::nk;
use nk_guest::println;

/// Child entry number (`lwc::lw_create_spec`, dispatched by `lwc_cow::child`).
pub const CHILD: usize = 10;
const PAGE: u64 = 4096;
const ROOT_TAG: u64 = 0x1111;
const CHILD_TAG: u64 = 0xC41D;

static LWC_AM: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(4096))]
struct Pages([AtomicU64; 5 * 512]);
/// Four pages the child writes, and a fifth it never touches (unmapped in it).
static PAGES: Pages = Pages([const { AtomicU64::new(0) }; 5 * 512]);

/// The exception-range list (two words a range), read by the lwC AM at `lwCreate`.
#[repr(C, align(8))]
struct List([AtomicU64; 2 * MAX_RANGES as usize + 2]);
static LIST: List = List([const { AtomicU64::new(0) }; 2 * MAX_RANGES as usize + 2]);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut STACK: Stack = Stack([0; 16384]);

fn page(i: u64) -> &'static AtomicU64 {
    &PAGES.0[(i * 512) as usize]
}

fn pages_gpa() -> u64 {
    core::ptr::addr_of!(PAGES) as u64
}

/// Fills the list with `ranges` (address | mode, bytes) and returns its guest-physical
/// address.
fn list(ranges: &[(u64, u64)]) -> u64 {
    for (i, &(at, bytes)) in ranges.iter().enumerate() {
        LIST.0[2 * i].store(at, Ordering::SeqCst);
        LIST.0[2 * i + 1].store(bytes, Ordering::SeqCst);
    }
    core::ptr::addr_of!(LIST) as u64
}

/// The child: writes its tag into the four pages, switches back (a0: 1), forever.
pub fn child(back: NameWords) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    for i in 0..4 {
        page(i).store(CHILD_TAG, Ordering::SeqCst);
    }
    loop {
        nk::call(am, LW_SWITCH, &[back], &[1, 0]);
    }
}

/// The root lwC's side.
pub fn run(memory: u64) {
    let last = (0..16u64).map_while(|i| nk::initial(i).ok().map(|(cap, am)| (i, cap, am))).last();
    let Some((index, me, am)) = last else {
        println!("GTEST FAILED lwc_ranges: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let stack = core::ptr::addr_of!(STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let create = |at: u64, count: u64| {
        crate::lwc::lw_create_options(am, me, 1 << index, LWC_RANGES, [LWC_COW, at, count], stack, CHILD)
    };
    // A first good child, to know the ids.
    let base = pages_gpa();
    let first = create(list(&[(base | LWC_SHARED, PAGE)]), 1);
    if !first.status().is_ok() || first.results[1] != NONE {
        println!("GTEST FAILED lwc_ranges: a one-range list: {}", first.status());
        return;
    }
    let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[first.name], &[]);
    let good = list(&[(base | LWC_SHARED, PAGE)]);
    let bad: [(&str, u64, u64, &[(u64, u64)]); 8] = [
        ("no range", good, 0, &[]),
        ("too many ranges", good, MAX_RANGES + 1, &[]),
        ("an unaligned list", good + 4, 1, &[]),
        ("a list past memory", memory - 8, 1, &[]),
        ("a list at an absurd address", u64::MAX - 8, 1, &[]),
        ("a second range with mode 3", good, 2, &[(base | LWC_SHARED, PAGE), (base | 3, PAGE)]),
        ("a second range of 100 bytes", good, 2, &[(base, PAGE), (base, 100)]),
        ("a third range past memory", good, 3, &[(base, PAGE), (base, PAGE), (memory - PAGE, 2 * PAGE)]),
    ];
    for (what, at, count, ranges) in bad {
        if !ranges.is_empty() {
            list(ranges);
        }
        let refused = create(at, count).status();
        if refused.code() != Status::BAD_ARGUMENT {
            println!("GTEST FAILED lwc_ranges: {what}: {refused}, not BAD_ARGUMENT");
            return;
        }
    }
    for i in 0..5 {
        page(i).store(ROOT_TAG, Ordering::SeqCst);
    }
    let at = list(&[
        (base | LWC_SHARED, 4 * PAGE),
        ((base + 2 * PAGE) | LWC_COW, PAGE),
        ((base + 4 * PAGE) | LWC_UNMAP, PAGE),
    ]);
    let created = create(at, 3);
    if !created.status().is_ok() || created.results[0] != first.results[0] + 1 {
        println!(
            "GTEST FAILED lwc_ranges: three ranges: {} {:x?} (the refused lists created something?)",
            created.status(),
            created.results
        );
        return;
    }
    println!("GTEST ok lwc_ranges_refused: 8 malformed range lists refused with BAD_ARGUMENT, nothing created");
    let back = nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
    let seen: [u64; 5] = core::array::from_fn(|i| page(i as u64).load(Ordering::SeqCst));
    let want = [CHILD_TAG, CHILD_TAG, ROOT_TAG, CHILD_TAG, ROOT_TAG];
    if back.status().is_ok() && back.results[2] == 1 && seen == want {
        println!(
            "GTEST ok lwc_ranges: the child's writes reached the shared pages 0, 1 and 3, not page 2 (COW over SHARED)"
        );
    } else {
        println!(
            "GTEST FAILED lwc_ranges: switch {} {:x?}, pages {seen:x?}, not {want:x?}",
            back.status(),
            back.results
        );
    }
    let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
}
