//! `lwc`: light-weight contexts (issue 15, am/lwc, docs/lwc.md). The guest (its root lwC)
//! creates a counter, then a child lwC that holds only a copy of the root's lwC capability
//! (mask bit of its `INITIAL` index), on a stack of its own (every lwC of a VM shares its
//! memory for now, so a child must not run on its creator's stack). It switches there;
//! the child finds one `INITIAL` capability, cannot read the root's counter or create
//! with the root's factory even by their names, and switches back with a verdict. The root
//! checks its registers and stack survived, its own capabilities still work, deletes the
//! child's capability (destroying the lwC and its principal) and finds a switch into it
//! refused.

use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};

use nk_guest::abi::{nk_op, NameWords, Reply, Selector, Status, NULL_KERNEL_AM};
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use nk_guest::abi::counter_op::{ADD as COUNTER_ADD, CREATE as COUNTER_CREATE, READ as COUNTER_READ};
use nk_guest::abi::lwc_op::{LW_CREATE, LW_SWITCH, NONE};

/// The child's verdict when every check passed.
const GOOD: u64 = 0x600D;

const COUNTER_AM: u16 = 1;

/// What the root shares with its child through memory (shared by every lwC of the VM).
static LWC_AM: AtomicU16 = AtomicU16::new(0);
/// The child only switches back, at once and forever (`lwcbench`).
static BENCH: AtomicBool = AtomicBool::new(false);
static SECRET: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut CHILD_STACK: Stack = Stack([0; 16384]);

/// `lwCreate(me; mask, 0)` on `stack`, every page shared: see [`lw_create_spec`].
fn lw_create(am: u16, me: Cap, mask: u64, stack: u64) -> Reply {
    lw_create_spec(am, me, mask, [0, 0, 0], stack, 0)
}

/// `lwCreate(me; mask, 0, spec)` on `stack` (`spec`: the memory mode, a range with its mode
/// in the low bits, the range's bytes): returns in the creator (`caller == NONE`); the
/// child's first entry (the same instruction, its own registers) calls child entry number
/// `child` (0: [`child_main`], others: `lwc_cow::child`) with `(a0, caller)` on `stack`.
pub(crate) fn lw_create_spec(am: u16, me: Cap, mask: u64, spec: [u64; 3], stack: u64, child: usize) -> Reply {
    lw_create_options(am, me, mask, 0, spec, stack, child)
}

/// [`lw_create_spec`] with `options` (`LWC_SYSTRAP`).
pub(crate) fn lw_create_options(
    am: u16,
    me: Cap,
    mask: u64,
    options: u64,
    spec: [u64; 3],
    stack: u64,
    child: usize,
) -> Reply {
    CHILD_ENTRY.store(child, Ordering::SeqCst);
    let (status, low, high, r0, r1, r2, r3): (u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: as nk_abi::hypercall, plus: R10 keeps the creator's RSP while RSP points at
    // the child's stack (R9) for the VMCALL (nothing is pushed there in the creator; R9
    // and R10 are the unused fourth capability argument); the child starts with the
    // creator's registers at the VMCALL and only calls `child`, which never returns, on
    // its own 16-byte aligned stack.
    unsafe {
        core::arch::asm!(
            "xchg rbx, {b}",
            "mov r10, rsp",
            "mov rsp, r9",
            "vmcall",
            // A refused call (status not 0) returns in the creator too.
            "test rax, rax",
            "jnz 4f",
            "cmp rsi, -1",
            "jne 2f",
            "4:",
            "mov rsp, r10",
            "xchg rbx, {b}",
            "jmp 3f",
            "2:",
            "and rsp, -16",
            "call {child}",
            "ud2",
            "3:",
            b = inout(reg) me.low => low,
            child = sym child_entry,
            inout("rax") Selector::new(am, LW_CREATE).encode() => status,
            inout("rcx") me.high => high,
            inout("rdx") 0u64 => r0,
            inout("rsi") 0u64 => r1,
            inout("rdi") 0u64 => r2,
            inout("r8") 0u64 => r3,
            in("r9") stack,
            inout("r10") 0u64 => _,
            in("r11") mask,
            in("r12") options,
            in("r13") spec[0],
            in("r14") spec[1],
            in("r15") spec[2],
        );
    }
    Reply { status, name: NameWords { low, high }, results: [r0, r1, r2, r3] }
}

/// The child entry [`lw_create_spec`] was last given (a copy-on-write child sees the
/// value of its creation).
static CHILD_ENTRY: AtomicUsize = AtomicUsize::new(0);

/// Calls the child entry of the last `lw_create_spec` with the reply's
/// `(a0, caller, creator, _, a1)` (RDI, RSI, RDX, RCX, R8 at the child's first entry).
extern "C" fn child_entry(a0: u64, caller: u64, creator: u64, rcx: u64, a1: u64) -> ! {
    match CHILD_ENTRY.load(Ordering::SeqCst) {
        0 => child_main(a0, caller),
        crate::smp::CHILD => crate::smp::child(a0, caller, creator, rcx, a1),
        entry => crate::lwc_cow::child(entry, a0, caller),
    }
}

/// The child lwC: entered by the root's first switch, `(a0, caller)` of the reply.
extern "C" fn child_main(a0: u64, caller: u64) -> ! {
    let am = LWC_AM.load(Ordering::SeqCst);
    if BENCH.load(Ordering::SeqCst) {
        let back = nk::initial(0).map(|(cap, _)| cap).unwrap_or_default();
        loop {
            nk::call(am, LW_SWITCH, &[back], &[0, 0]);
        }
    }
    let name =
        |i: usize| NameWords { low: SECRET[i].load(Ordering::SeqCst), high: SECRET[i + 1].load(Ordering::SeqCst) };
    let (counter, factory) = (name(0), name(2));
    let mut verdict = GOOD;
    let mut fail = |what: core::fmt::Arguments<'_>| {
        println!("GTEST FAILED lwc_child: {what}");
        verdict = 0xBAD;
    };
    if a0 != 41 {
        fail(format_args!("first switch passed {a0}, not 41"));
    }
    // Its INITIAL list is the one capability the mask chose: the root's lwC, to switch back.
    let back = match nk::initial(0) {
        Ok((cap, got)) if got == am => cap,
        other => {
            fail(format_args!("INITIAL 0 is {other:?}, not a capability of the lwC AM {am}"));
            NameWords::default()
        }
    };
    if nk::initial(1).is_ok() {
        fail(format_args!("a second INITIAL capability"));
    }
    let read = nk::call(COUNTER_AM, COUNTER_READ, &[counter], &[]).status();
    let create = nk::call(COUNTER_AM, COUNTER_CREATE, &[factory], &[]).status();
    let refused = |s: Status| matches!(s.code(), Status::UNKNOWN_NAME | Status::WRONG_HOLDER);
    if refused(read) && refused(create) {
        println!("GTEST ok lwc_child_confined: the root's counter ({read}) and factory ({create}) refused by name");
    } else {
        fail(format_args!("the root's counter read {read}, its factory create {create}"));
    }
    if caller == NONE {
        fail(format_args!("entered with caller NONE"));
    }
    loop {
        let reply = nk::call(am, LW_SWITCH, &[back], &[verdict, 0]);
        // Only a refused switch comes back here: the root destroys this lwC instead.
        println!("GTEST FAILED lwc_child: switched back into, or switch refused: {}", reply.status());
        verdict = 0xBAD;
    }
}

/// The root lwC's side.
pub fn run() {
    let mut initial = initial_list();
    let Some(&(factory, _)) = initial.iter().find(|(_, am)| *am == COUNTER_AM) else {
        println!("GTEST FAILED lwc: no counter factory");
        return;
    };
    let Some((index, &(me, am))) = initial.iter().enumerate().max_by_key(|(_, (_, am))| *am) else {
        println!("GTEST FAILED lwc: no initial capabilities");
        return;
    };
    initial.clear();
    let counter = nk::call(COUNTER_AM, COUNTER_CREATE, &[factory], &[]);
    let added = nk::call(COUNTER_AM, COUNTER_ADD, &[counter.name], &[5]);
    if !counter.status().is_ok() || !added.status().is_ok() {
        println!("GTEST FAILED lwc: counter: {} {}", counter.status(), added.status());
        return;
    }
    LWC_AM.store(am, Ordering::SeqCst);
    for (i, word) in [counter.name.low, counter.name.high, factory.low, factory.high].into_iter().enumerate() {
        SECRET[i].store(word, Ordering::SeqCst);
    }
    let stack = core::ptr::addr_of!(CHILD_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let created = lw_create(am, me, 1 << index, stack);
    if !created.status().is_ok() || created.results[1] != NONE {
        println!("GTEST FAILED lwc: lwCreate: {} {:?}", created.status(), created.results);
        return;
    }
    let (child, child_id) = (created.name, created.results[0]);
    println!("GTEST ok lwc_create: child lwC {child_id:#x} (AM {am}, INITIAL mask {:#x})", 1u64 << index);
    // Locals that must survive the child's run (registers and stack).
    let canary = [0x1111u64, 0x2222, 0x3333, nk::rdtsc() | 1];
    let back = nk::call(am, LW_SWITCH, &[child], &[41, 0]);
    if back.status().is_ok() && back.results[1] == child_id && back.results[2] == GOOD && back.results[0] == NONE {
        println!("GTEST ok lwc_switch_back: the child switched back with its verdict {:#x}", back.results[2]);
    } else {
        println!("GTEST FAILED lwc: switch back: {} {:x?}", back.status(), back.results);
    }
    let read = nk::call(COUNTER_AM, COUNTER_READ, &[counter.name], &[]);
    if canary[..3] == [0x1111, 0x2222, 0x3333] && canary[3] & 1 == 1 && read.status().is_ok() && read.results[0] == 5 {
        println!("GTEST ok lwc_root_intact: registers, stack and capabilities of the root survived");
    } else {
        println!("GTEST FAILED lwc: the root's state: {canary:x?}, counter {} {}", read.status(), read.results[0]);
    }
    let deleted = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[child], &[]).status();
    let again = nk::call(am, LW_SWITCH, &[child], &[0, 0]).status();
    if deleted.is_ok() && !again.is_ok() {
        println!(
            "GTEST ok lwc_destroy: deleting its capability destroyed the lwC; switching there is refused ({again})"
        );
    } else {
        println!("GTEST FAILED lwc: delete {deleted}, then switch {again}");
    }
}

/// Returns the guest's INITIAL list.
fn initial_list() -> heapless_list::List {
    let mut list = heapless_list::List::new();
    let mut index = 0;
    while let Ok(entry) = nk::initial(index) {
        list.push(entry);
        index += 1;
    }
    list
}

mod heapless_list {
    use nk_guest::nk::Cap;

    /// Up to 16 (capability, AM) pairs, without a heap.
    pub struct List {
        items: [(Cap, u16); 16],
        len: usize,
    }

    impl List {
        pub fn new() -> Self {
            Self { items: [(Cap::default(), 0); 16], len: 0 }
        }
        pub fn push(&mut self, item: (Cap, u16)) {
            if self.len < self.items.len() {
                self.items[self.len] = item;
                self.len += 1;
            }
        }
        pub fn iter(&self) -> core::slice::Iter<'_, (Cap, u16)> {
            self.items[..self.len].iter()
        }
        pub fn clear(&mut self) {
            self.len = 0;
        }
    }
}

/// `lwcbench`: `GBENCH lwswitch_instructions` (a switch into a child that switches straight
/// back: two `lwSwitch` calls) and `GBENCH lwc_cycle_0_pages_instructions` (create, switch
/// in and back, delete; the new child's one `INITIAL` call included).
pub fn bench(memory: u64) {
    let initial = initial_list();
    let Some((index, &(me, am))) = initial.iter().enumerate().max_by_key(|(_, (_, am))| *am) else {
        println!("GBENCH error: no initial capabilities");
        return;
    };
    LWC_AM.store(am, Ordering::SeqCst);
    BENCH.store(true, Ordering::SeqCst);
    let stack = core::ptr::addr_of!(CHILD_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    let empty = crate::measure(|| {});
    let created = lw_create(am, me, 1 << index, stack);
    if !created.status().is_ok() {
        println!("GBENCH error: lwCreate: {}", created.status());
        return;
    }
    let child = created.name;
    nk::call(am, LW_SWITCH, &[child], &[0, 0]);
    let switch = crate::measure(|| {
        nk::call(am, LW_SWITCH, &[child], &[0, 0]);
    });
    println!("GBENCH lwswitch_instructions {}", switch.saturating_sub(empty));
    let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[child], &[]);
    let cycle = crate::measure(|| {
        let created = lw_create(am, me, 1 << index, stack);
        nk::call(am, LW_SWITCH, &[created.name], &[0, 0]);
        let _ = nk::call(NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
    });
    println!("GBENCH lwc_cycle_0_pages_instructions {}", cycle.saturating_sub(empty));
    crate::lwc_bench::cycles(am, me, index, memory);
}
