//! `lwc-cow` and `lwc-cow-quota`: copy-on-write lwCs (issue 15, docs/lwc.md).
//!
//! `lwc-cow` runs the seed's snapshot and rollback (Alg. 4) on copy-on-write children: the
//! root lwC builds a state (pages of a pattern), then serves each request in a fresh
//! child created with `LWC_COW` (one page shared with `LWC_SHARED` to carry the answer).
//! The child dirties the whole state, answers, and switches back; the root deletes it and
//! checks its state is pristine byte for byte, that the answer came through the shared
//! page, and that its own write right after the create did not reach the child's
//! snapshot. Bad specs are refused.
//!
//! `lwc-key`: the seed's sensitive-data compartment (Alg. 6). The root holds a key,
//! creates a copy-on-write child (which keeps the key), erases its own copy and shows
//! `lwOverlay` can still copy the child's key page back; it erases it again and
//! `lwRestrict`s the child to no access. From then on the root cannot read the key: its own
//! page stays zero and every overlay of the child's memory is refused. It asks the child
//! to sign a buffer: the child overlays the root's buffer page `LWC_SHARED`, writes a MAC
//! keyed with the key, and `LWC_UNMAP`s it again; the signature verifies (by the child),
//! a tampered buffer does not, and the root's MAC with its erased key differs.
//!
//! `lwc-monitor`: the seed's reference monitor (Alg. 7). The root creates a counter and a
//! child with `LWC_SYSTRAP` that holds only a copy of the root's lwC capability. Every
//! call the child makes with a capability it does not hold traps to the root: the root
//! allows reading the counter (`lwSyscall` with its own capabilities), refuses adding to
//! it and every other call, and switches back with the answer. The child sees the read's
//! value and the refusals; the counter is unchanged; the child cannot reach the counter
//! any other way.
//!
//! `lwc-cow-quota`: a child writes more pages than the VM's frame quota (`frames=2M`
//! gives 512 frames); the VM is stopped with a line that names the quota, and a survivor
//! on the same CPU finishes.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::abi::lwc_op::{LWC_COW, LWC_SHARED, LWC_UNMAP, LW_SWITCH, NONE};
use nk_guest::abi::NameWords;
use nk_guest::nk;
use nk_guest::println;

/// Pages of state the request handler dirties.
const STATE_PAGES: usize = 16;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// The state a request dirties (COW in the child).
static mut STATE: [Page; STATE_PAGES] = [const { Page([0; 4096]) }; STATE_PAGES];
/// The answer page (shared with every child).
static mut ANSWER: Page = Page([0; 4096]);
/// Where the quota test's child writes its 600 pages: the upper half of the VM's memory
/// (`mem=8M`: 4 MiB to 6.4 MiB, below the stack at the top).
static BIG: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut CHILD_STACK: Stack = Stack([0; 16384]);

/// Set by the root before each request (COW: the child sees the value of its creation).
static REQUEST: AtomicU64 = AtomicU64::new(0);
/// Written by the root right after lwCreate: the child must still see the old value.
static AFTER_CREATE: AtomicU64 = AtomicU64::new(0);
/// Which child body runs (1: a request, 2: the quota hog).
static LWC_AM: AtomicU64 = AtomicU64::new(0);

fn pattern(page: usize, byte: usize) -> u8 {
    (page * 31 + byte * 7 + 1) as u8
}

fn state_ptr() -> *mut u8 {
    core::ptr::addr_of_mut!(STATE).cast()
}

fn answer_ptr() -> *mut u64 {
    core::ptr::addr_of_mut!(ANSWER).cast()
}

/// Child entries of `lwc::lw_create_spec` (numbers from 1).
pub fn child(entry: usize, a0: u64, caller: u64) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst) as u16;
    let back = nk::initial(0).map(|(cap, _)| cap).unwrap_or_default();
    match entry {
        1 => request_child(am, back, a0, caller),
        3 => key_child(am, back, a0),
        4 => monitored_child(am, back),
        crate::lwc_bench::WRITER => crate::lwc_bench::writer(back),
        crate::lwc_cache::CHILD => crate::lwc_cache::child(back),
        crate::lwc_import::CHILD => crate::lwc_import::child(back),
        crate::lwc_remote::CHILD => crate::lwc_remote::child(back),
        crate::lwc_ranges::CHILD => crate::lwc_ranges::child(back),
        crate::lwc_traps::CHILD => crate::lwc_traps::child(back),
        _ => quota_child(am, back),
    }
}

fn request_child(am: u16, back: NameWords, a0: u64, caller: u64) -> ! {
    let request = REQUEST.load(Ordering::SeqCst);
    let mut sum = 0u64;
    // Read the state, then dirty every byte of it.
    for i in 0..STATE_PAGES * 4096 {
        // SAFETY: inside STATE; this lwC's copy-on-write view of it.
        unsafe {
            let p = state_ptr().add(i);
            sum = sum.wrapping_add(u64::from(p.read_volatile()));
            p.write_volatile(0xEE);
        }
    }
    let seen_after = AFTER_CREATE.load(Ordering::SeqCst);
    // SAFETY: the shared answer page (LWC_SHARED): the root reads it after the switch.
    unsafe {
        answer_ptr().write_volatile(request);
        answer_ptr().add(1).write_volatile(sum);
        answer_ptr().add(2).write_volatile(seen_after);
        answer_ptr().add(3).write_volatile(a0);
        answer_ptr().add(4).write_volatile(caller);
    }
    loop {
        nk::call(am, LW_SWITCH, &[back], &[request, 0]);
    }
}

fn quota_child(am: u16, back: NameWords) -> ! {
    for i in 0..600 {
        // SAFETY: inside the VM's memory, above the image and below the stack (checked by
        // `quota`); nothing else uses it. Each write takes a copy-on-write frame.
        unsafe { (BIG.load(Ordering::SeqCst) as *mut u8).add(i * 4096).write_volatile(1) };
    }
    println!("GTEST FAILED lwc_cow_quota: 600 pages copied past a 512-frame quota");
    loop {
        nk::call(am, LW_SWITCH, &[back], &[0, 0]);
    }
}

/// Finds (lwC AM, own lwC capability, its INITIAL index): the last initial capability.
pub(crate) fn my_lwc() -> Option<(u16, NameWords, u64)> {
    let mut last = None;
    for i in 0..64u64 {
        match nk::initial(i) {
            Ok((cap, am)) => last = Some((am, cap, i)),
            Err(_) => break,
        }
    }
    last
}

fn stack_top() -> u64 {
    core::ptr::addr_of_mut!(CHILD_STACK) as u64 + 16384
}

/// Runs mode `lwc-cow`, `lwc-key`, `lwc-monitor`, `lwc-demos` (the first three in a row,
/// among `cargo xtask run`'s defaults) or `lwc-cow-quota`.
pub fn run_mode(mode: &str, memory: u64) {
    match mode {
        "lwc-cow-quota" => quota(memory),
        "lwc-key" => key(),
        "lwc-monitor" => monitor(),
        "lwc-demos" => {
            run();
            key();
            monitor();
        }
        _ => run(),
    }
}

/// `lwc-cow`: snapshot and rollback.
fn run() {
    let Some((am, me, index)) = my_lwc() else {
        println!("GTEST FAILED lwc_cow: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    for page in 0..STATE_PAGES {
        for byte in 0..4096 {
            // SAFETY: inside STATE; only this lwC runs.
            unsafe { state_ptr().add(page * 4096 + byte).write_volatile(pattern(page, byte)) };
        }
    }
    let expected_sum: u64 = (0..STATE_PAGES).flat_map(|p| (0..4096).map(move |b| u64::from(pattern(p, b)))).sum();
    let answer = answer_ptr() as u64;
    // Everything copy-on-write, the answer page shared, the page after it unmapped.
    let spec = [LWC_COW, answer | LWC_SHARED, 4096];
    let mut pristine = true;
    for request in 1..=3u64 {
        REQUEST.store(request, Ordering::SeqCst);
        AFTER_CREATE.store(0, Ordering::SeqCst);
        let created = crate::lwc::lw_create_spec(am, me, 1 << index, spec, stack_top(), 1);
        if !created.status().is_ok() || created.results[1] != NONE {
            println!("GTEST FAILED lwc_cow: lwCreate: {} {:?}", created.status(), created.results);
            return;
        }
        // The root writes after the snapshot: the child must not see it.
        AFTER_CREATE.store(0xAF7E, Ordering::SeqCst);
        let reply = nk::call(am, LW_SWITCH, &[created.name], &[100 + request, 0]);
        // SAFETY: the shared answer page.
        let got: [u64; 5] = core::array::from_fn(|i| unsafe { answer_ptr().add(i).read_volatile() });
        if !reply.status().is_ok() || reply.results[2] != request {
            println!("GTEST FAILED lwc_cow: switch for request {request}: {} {:?}", reply.status(), reply.results);
            return;
        }
        if got[0] != request || got[1] != expected_sum || got[2] != 0 || got[3] != 100 + request {
            println!("GTEST FAILED lwc_cow: request {request}: the child answered {got:?} (sum wanted {expected_sum})");
            pristine = false;
        }
        let deleted = nk::call(nk_guest::abi::NULL_KERNEL_AM, nk_guest::abi::nk_op::DELETE, &[created.name], &[]);
        if !deleted.status().is_ok() {
            println!("GTEST FAILED lwc_cow: delete: {}", deleted.status());
            return;
        }
        for page in 0..STATE_PAGES {
            for byte in 0..4096 {
                // SAFETY: inside STATE.
                let b = unsafe { state_ptr().add(page * 4096 + byte).read_volatile() };
                if b != pattern(page, byte) {
                    println!("GTEST FAILED lwc_cow: after request {request} state byte {page}:{byte} is {b:#x}");
                    return;
                }
            }
        }
    }
    if pristine {
        println!("GTEST ok lwc_cow_snapshot: 3 requests each dirtied {STATE_PAGES} pages in a copy-on-write child; the root's state is pristine after each, the child saw the snapshot (not the root's later write) and answered through the shared page");
    }
    // A child cannot create a view of its own; a bad spec is refused and changes nothing.
    let bad = crate::lwc::lw_create_spec(am, me, 1 << index, [7, 0, 0], stack_top(), 1);
    let odd = crate::lwc::lw_create_spec(am, me, 1 << index, [LWC_COW, answer | LWC_UNMAP, 100], stack_top(), 1);
    if bad.status().code() == nk_guest::abi::Status::BAD_ARGUMENT
        && odd.status().code() == nk_guest::abi::Status::BAD_ARGUMENT
    {
        println!("GTEST ok lwc_cow_bad_spec: a bad mode and an unaligned range are refused ({})", bad.status());
    } else {
        println!("GTEST FAILED lwc_cow_bad_spec: {} {}", bad.status(), odd.status());
    }
    println!("GTEST ok lwc_cow_done");
}

/// `lwc-cow-quota`: a child that writes past the frame quota stops the VM.
fn quota(memory: u64) {
    if memory < 8 << 20 {
        println!("GTEST FAILED lwc_cow_quota: needs mem=8M");
        return;
    }
    BIG.store(memory / 2, Ordering::SeqCst);
    let Some((am, me, index)) = my_lwc() else {
        println!("GTEST FAILED lwc_cow_quota: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let created = crate::lwc::lw_create_spec(am, me, 1 << index, [LWC_COW, 0, 0], stack_top(), 2);
    if !created.status().is_ok() {
        println!("GTEST FAILED lwc_cow_quota: lwCreate: {}", created.status());
        return;
    }
    println!("GTEST ok lwc_cow_quota_start: a copy-on-write child writes 600 pages");
    let reply = nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
    println!("GTEST FAILED lwc_cow_quota: the child came back ({})", reply.status());
}

/// The key's page (copy-on-write: after the root erases its copy only the child has it).
static mut KEY: Page = Page([0; 4096]);
/// The buffer the child signs: 8 bytes of message, then 8 of signature.
static mut BUF: Page = Page([0; 4096]);
const SIGN: u64 = 1;
const VERIFY: u64 = 2;
const SECRET: u64 = 0x5EC2_E7C0_FFEE_1234;

fn key_ptr() -> *mut u64 {
    core::ptr::addr_of_mut!(KEY).cast()
}

fn buf_ptr() -> *mut u64 {
    core::ptr::addr_of_mut!(BUF).cast()
}

/// A keyed hash of `message` (FNV-1a over the key's four words and the message).
fn mac(message: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..5 {
        // SAFETY: inside KEY (words 0-3); the message last.
        let word = if i < 4 { unsafe { key_ptr().add(i).read_volatile() } } else { message };
        for byte in word.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn overlay(am: u16, l: NameWords, at: u64, mode: u64) -> nk_guest::abi::Status {
    nk::call(am, nk_guest::abi::lwc_op::LW_OVERLAY, &[l], &[at | mode, 4096]).status()
}

/// The key compartment: signs or verifies the root's buffer, overlaid for the call only.
fn key_child(am: u16, back: NameWords, mut op: u64) -> ! {
    let buf = buf_ptr() as u64;
    loop {
        let mut result = 0;
        if (op == SIGN || op == VERIFY) && overlay(am, back, buf, LWC_SHARED).is_ok() {
            // SAFETY: the root's buffer page, shared into this view for the call.
            unsafe {
                let sig = mac(buf_ptr().read_volatile());
                if op == SIGN {
                    buf_ptr().add(1).write_volatile(sig);
                    result = 1;
                } else {
                    result = u64::from(buf_ptr().add(1).read_volatile() == sig);
                }
            }
            if !overlay(am, back, buf, LWC_UNMAP).is_ok() {
                result = 0xBAD;
            }
        }
        op = nk::call(am, LW_SWITCH, &[back], &[result, 0]).results[2];
    }
}

fn erase_key() {
    for i in 0..4 {
        // SAFETY: inside KEY.
        unsafe { key_ptr().add(i).write_volatile(0) };
    }
}

fn key_words() -> [u64; 4] {
    // SAFETY: inside KEY.
    core::array::from_fn(|i| unsafe { key_ptr().add(i).read_volatile() })
}

/// `lwc-key`: the sensitive-data compartment.
fn key() {
    let Some((am, me, index)) = my_lwc() else {
        println!("GTEST FAILED lwc_key: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    for i in 0..4 {
        // SAFETY: inside KEY.
        unsafe { key_ptr().add(i).write_volatile(SECRET ^ i as u64) };
    }
    let created = crate::lwc::lw_create_spec(am, me, 1 << index, [LWC_COW, 0, 0], stack_top(), 3);
    if !created.status().is_ok() {
        println!("GTEST FAILED lwc_key: lwCreate: {}", created.status());
        return;
    }
    let k = created.name;
    let key_page = key_ptr() as u64;
    erase_key();
    // Before lwRestrict the root may still overlay the child's memory: its key comes back.
    let before = overlay(am, k, key_page, LWC_COW);
    if before.is_ok() && key_words()[0] == SECRET {
        println!("GTEST ok lwc_key_overlay_before_restrict: lwOverlay copied the child's key page into the root");
    } else {
        println!("GTEST FAILED lwc_key: overlay before restrict: {before}, key word {:#x}", key_words()[0]);
    }
    erase_key();
    let restricted = nk::call(am, nk_guest::abi::lwc_op::LW_RESTRICT, &[k], &[0, 0]).status();
    let after = overlay(am, k, key_page, LWC_COW);
    let other = overlay(am, k, 0, LWC_COW);
    let syscall = nk::call(am, nk_guest::abi::lwc_op::LW_SYSCALL, &[k], &[0, 0]).status();
    let denied = |s: nk_guest::abi::Status| s.code() == nk_guest::abi::Status::NOT_PERMITTED;
    if restricted.is_ok() && denied(after) && denied(other) && denied(syscall) && key_words() == [0; 4] {
        println!("GTEST ok lwc_key_restricted: after lwRestrict every overlay of the child is refused ({after}), lwSyscall too, and the root's key page reads zero");
    } else {
        println!(
            "GTEST FAILED lwc_key: restrict {restricted}, overlay {after} / {other}, syscall {syscall}, key {:x?}",
            key_words()
        );
    }
    // Sign and verify through the compartment.
    // SAFETY: the root's own buffer page.
    unsafe { buf_ptr().write_volatile(0x4d45_5353_4147_4521) };
    let signed = nk::call(am, LW_SWITCH, &[k], &[SIGN, 0]);
    // SAFETY: as above.
    let sig = unsafe { buf_ptr().add(1).read_volatile() };
    let verified = nk::call(am, LW_SWITCH, &[k], &[VERIFY, 0]).results[2];
    // SAFETY: as above.
    unsafe { buf_ptr().write_volatile(0x4d45_5353_4147_4520) };
    let tampered = nk::call(am, LW_SWITCH, &[k], &[VERIFY, 0]).results[2];
    let forged = mac(0x4d45_5353_4147_4521);
    if signed.results[2] == 1 && sig != 0 && verified == 1 && tampered == 0 && forged != sig && key_words() == [0; 4] {
        println!("GTEST ok lwc_key_signs: the child signed the overlaid buffer ({sig:#x}); it verifies, a tampered buffer does not, the root's MAC without the key differs and its key page still reads zero");
    } else {
        println!(
            "GTEST FAILED lwc_key: sign {:?} sig {sig:#x} verify {verified} tampered {tampered} forged {forged:#x}",
            signed.results
        );
    }
    let deleted = nk::call(nk_guest::abi::NULL_KERNEL_AM, nk_guest::abi::nk_op::DELETE, &[k], &[]).status();
    if deleted.is_ok() {
        println!("GTEST ok lwc_key_done");
    } else {
        println!("GTEST FAILED lwc_key: delete {deleted}");
    }
}

/// The counter the monitored child tries to use (its name, set by the root before the
/// child is created; memory is shared).
static COUNTER: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
const COUNTER_AM: u16 = 1;
const GOOD: u64 = 0x600D;

/// The sandboxed child: three calls through the monitor, then its verdict.
fn monitored_child(am: u16, _back: NameWords) -> ! {
    use nk_guest::abi::counter_op::{ADD, CREATE, READ};
    use nk_guest::abi::Status;
    let counter = NameWords { low: COUNTER[0].load(Ordering::SeqCst), high: COUNTER[1].load(Ordering::SeqCst) };
    let read = nk::call(COUNTER_AM, READ, &[counter], &[]);
    let add = nk::call(COUNTER_AM, ADD, &[counter], &[1]);
    let create = nk::call(COUNTER_AM, CREATE, &[counter], &[]);
    let mut verdict = GOOD;
    if !read.status().is_ok() || read.results[0] != 5 {
        println!("GTEST FAILED lwc_monitor: the allowed read gave {} {:?}", read.status(), read.results);
        verdict = 0xBAD;
    }
    if add.status().code() != Status::NOT_PERMITTED || create.status().code() != Status::NOT_PERMITTED {
        println!(
            "GTEST FAILED lwc_monitor: add {} and create {} were not refused by the monitor",
            add.status(),
            create.status()
        );
        verdict = 0xBAD;
    }
    // "Done": a switch with a name it does not hold traps too, carrying the verdict.
    let guess = NameWords { low: 0x1234_5678, high: 0x9abc_def0 };
    loop {
        nk::call(am, LW_SWITCH, &[guess], &[verdict, 0]);
    }
}

/// `lwc-monitor`: the reference monitor.
fn monitor() {
    use nk_guest::abi::counter_op::{ADD, CREATE, READ};
    use nk_guest::abi::lwc_op::{LWC_SYSTRAP, LW_SYSCALL, TRAPPED};
    use nk_guest::abi::{Selector, Status};
    let Some((am, me, index)) = my_lwc() else {
        println!("GTEST FAILED lwc_monitor: no lwC capability (module option lwc?)");
        return;
    };
    LWC_AM.store(u64::from(am), Ordering::SeqCst);
    let Ok((factory, _)) = nk::initial(0) else {
        println!("GTEST FAILED lwc_monitor: no counter factory");
        return;
    };
    let counter = nk::call(COUNTER_AM, CREATE, &[factory], &[]);
    let added = nk::call(COUNTER_AM, ADD, &[counter.name], &[5]);
    if !counter.status().is_ok() || !added.status().is_ok() {
        println!("GTEST FAILED lwc_monitor: counter {} {}", counter.status(), added.status());
        return;
    }
    COUNTER[0].store(counter.name.low, Ordering::SeqCst);
    COUNTER[1].store(counter.name.high, Ordering::SeqCst);
    // Memory shared (the child's stack is its own); options LWC_SYSTRAP.
    let created = lw_create_with_options(am, me, 1 << index, LWC_SYSTRAP, 4);
    if !created.status().is_ok() {
        println!("GTEST FAILED lwc_monitor: lwCreate: {}", created.status());
        return;
    }
    let child = created.name;
    let read = Selector::new(COUNTER_AM, READ).encode();
    let (mut allowed, mut denied, mut verdict) = (0, 0, 0);
    let mut reply = nk::call(am, LW_SWITCH, &[child], &[0, 0]);
    for _ in 0..8 {
        if !reply.status().is_ok() || reply.results[0] != TRAPPED {
            println!(
                "GTEST FAILED lwc_monitor: the child came back without a trap: {} {:?}",
                reply.status(),
                reply.results
            );
            return;
        }
        let selector = reply.results[2];
        if selector == Selector::new(am, LW_SWITCH).encode() {
            verdict = reply.results[3];
            break;
        }
        let (status, value) = if selector == read {
            allowed += 1;
            let done = nk::call(am, LW_SYSCALL, &[child], &[1]);
            (done.status, done.results[0])
        } else {
            denied += 1;
            (Status::new(Status::NOT_PERMITTED, None).0, 0)
        };
        reply = nk::call(am, LW_SWITCH, &[child], &[status, value]);
    }
    let now = nk::call(COUNTER_AM, READ, &[counter.name], &[]);
    if verdict == GOOD && allowed == 1 && denied == 2 && now.results[0] == 5 {
        println!("GTEST ok lwc_monitor: the sandboxed child's 3 calls trapped to the root, which allowed the read through lwSyscall (value 5) and refused add and create; the counter is unchanged");
    } else {
        println!(
            "GTEST FAILED lwc_monitor: verdict {verdict:#x}, allowed {allowed}, denied {denied}, counter {:?}",
            now.results
        );
    }
    let deleted = nk::call(nk_guest::abi::NULL_KERNEL_AM, nk_guest::abi::nk_op::DELETE, &[child], &[]).status();
    let after = nk::call(am, LW_SYSCALL, &[child], &[1]).status();
    if deleted.is_ok() && !after.is_ok() {
        println!("GTEST ok lwc_monitor_done: the sandbox deleted, lwSyscall on it refused ({after})");
    } else {
        println!("GTEST FAILED lwc_monitor: delete {deleted}, lwSyscall after {after}");
    }
}

/// `lwCreate` with `options`, every page shared, on the child stack.
fn lw_create_with_options(am: u16, me: NameWords, mask: u64, options: u64, entry: usize) -> nk_guest::abi::Reply {
    crate::lwc::lw_create_options(am, me, mask, options, [0, 0, 0], stack_top(), entry)
}
