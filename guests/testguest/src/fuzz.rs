//! `fuzz SEED CALLS [PEER...]`: a hypercall fuzzer. It makes CALLS hypercalls (half of
//! them from ring 3, in blocks that alternate with ring 0) with selectors, capability names
//! and plain arguments drawn from a splitmix64 generator seeded with SEED, and checks the
//! null-Kernel's answers as it goes:
//!
//! - every status is one the ABI documents (`nk_abi::Status`: a known code, a failing
//!   capability argument index the operation has, no other bits), a failed call returns
//!   no capability name and a successful derive, delegate or create a non-zero one;
//!   inspect answers only for the caller's own bound or bearer capabilities, and
//!   received(i) only below the inbox's length;
//! - answers that the selector alone decides are exact: a wrong ABI version is
//!   `BAD_VERSION`, an AM id no AM has is `UNKNOWN_AM`, an operation number the AM lacks is
//!   `UNKNOWN_OPERATION`, the null call succeeds;
//! - a name that cannot be the caller's never works where the operation uses it: names it
//!   deleted, names it revoked (except a delete or revoke of them that kills nothing: a
//!   revoked capability stays known until its holder deletes it), names it delegated bound
//!   to another VM (which may live on another kernel instance; only a revoke of them may
//!   work, the delegator holding the parent), random names, the zero name, its own names
//!   with one bit flipped, and its own names moved to another kernel's id bits;
//! - its sentinels keep their values: a counter with a fixed value whose read-only copies
//!   it throws into the mix, and a counter it adds to only through its own root, whose
//!   value it tracks.
//!
//! The names it uses come from what it made (counters, derivations, delegations to itself
//! and bearer delegations), what its peers (VM ids after CALLS) delegated to it (its inbox,
//! read with RECEIVED), and the generator. Most calls hit real AMs and operations; the rest
//! use random AM ids, operation numbers, versions or whole selectors. Every few thousand
//! calls it deletes what it derived and delegated (and so revokes what hangs below).
//!
//! The same SEED replays the same sequence of calls as long as the hypervisor answers
//! the same way (Bochs runs are deterministic): `cargo xtask test --filter fuzz --seed N`.
//! Output: `fuzz: seed N`, progress lines, one line per violation (call number, ring,
//! registers in and out), then `GTEST ok fuzz_*` or `GTEST FAILED fuzz_*: ...`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use nk_guest::abi::{nk_op, Call, NameWords, Reply, Selector, Status, ABI_VERSION, NULL_KERNEL_AM};
use nk_guest::nk::{self, Cap};
use nk_guest::{current_ring, println, run_in_ring3};

use super::counter;

/// Calls per block; blocks alternate between ring 0 and ring 3.
const BLOCK: u64 = 1000;
/// Calls between two checks of the sentinels.
const SENTINEL_EVERY: u64 = 250;
/// Calls between two resets (revoking every copy handed into the mix).
const EPOCH: u64 = 4000;
/// The fixed value of the sentinel counter.
const SENTINEL_VALUE: u64 = 0x05E1_71E1;
/// Counters it may create through fuzzed calls (every VM shares the counter AM's 1,024).
const CREATE_BUDGET: u32 = 40;
/// Violation lines printed at most.
const REPORT_MAX: u32 = 12;
/// Status codes the ABI defines (`Status::OK` ..= `Status::AM_FAILED`).
const CODES: usize = 14;
/// AM ids and operation numbers it probes at start.
const PROBE_AMS: u16 = 16;
const PROBE_OPS: u32 = 32;
/// Rights masks of the counter AM (`read`, `increment`).
const READ_ONLY: u64 = 0b01;

/// splitmix64 (Steele, Lea, Flood 2014): small, fast, every seed good.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Picks an index by weight.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut pick = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if pick < w {
                return i;
            }
            pick -= w;
        }
        weights.len() - 1
    }
}

/// A fixed-size set of names; once full, each new one overwrites the next slot in turn.
struct Names<const N: usize> {
    slots: [Cap; N],
    len: usize,
    next: usize,
}

impl<const N: usize> Names<N> {
    const fn new() -> Self {
        Self { slots: [NameWords { low: 0, high: 0 }; N], len: 0, next: 0 }
    }

    fn push(&mut self, cap: Cap) {
        if self.contains(cap) {
            return;
        }
        if self.len < N {
            self.slots[self.len] = cap;
            self.len += 1;
        } else {
            self.slots[self.next] = cap;
            self.next = (self.next + 1) % N;
        }
    }

    fn contains(&self, cap: Cap) -> bool {
        self.slots[..self.len].contains(&cap)
    }

    fn remove(&mut self, cap: Cap) {
        if let Some(i) = self.slots[..self.len].iter().position(|&c| c == cap) {
            self.len -= 1;
            self.slots[i] = self.slots[self.len];
            self.next = 0;
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<Cap> {
        (self.len > 0).then(|| self.slots[rng.below(self.len as u64) as usize])
    }

    fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }
}

/// Where a capability argument came from, which says what a success would mean.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Origin {
    /// Held by this VM as far as it knows (may have died through a revoke of an ancestor).
    Mine,
    /// Revoked by this VM: known until deleted, so only a delete (or a revoke) of it may
    /// succeed, and that kills nothing.
    Revoked,
    /// Deleted by this VM: must never work again.
    Deleted,
    /// Delegated bound to another VM: must never work for this VM, except a revoke (it
    /// holds the parent, and may take back what it delegated).
    Foreign,
    /// Made up (random, zero, bit-flipped, another kernel's id): must never work.
    Invented,
}

/// What a fuzzed call was, for the checks and the state update.
#[derive(Clone, Copy)]
struct Planned {
    call: Call,
    origins: [Origin; 4],
}

/// The fuzzer's state (the guest has no heap; it lives in a static, see `STATE`).
struct Fuzzer {
    rng: Rng,
    vm: u32,
    peers: [u32; 8],
    peer_count: usize,
    seed: u64,
    calls: u64,
    target: u64,
    counter_am: u16,
    /// Bit `am` set: the AM id exists (ids below `PROBE_AMS`).
    ams: u32,
    /// Per AM id, bit `op` set: the operation exists (numbers below `PROBE_OPS`).
    ops: [u32; PROBE_AMS as usize],
    factory: Cap,
    sentinel: Cap,
    tracked: Cap,
    tracked_value: u64,
    /// The factory copy of this epoch (None once the create budget is spent).
    factory_copy: Option<Cap>,
    /// Copies derived at each epoch from the factory, the counter roots and the exo AM
    /// capabilities; deleting them at the next epoch kills everything derived or
    /// delegated from them.
    epoch_copies: Names<12>,
    /// Counter roots it made, and its initial capabilities of other AMs (the exo AM's
    /// ports and MSRs, if its module line gives any).
    roots: Names<8>,
    mine: Names<48>,
    revoked: Names<32>,
    deleted: Names<32>,
    foreign: Names<32>,
    creates_left: u32,
    inbox_seen: u64,
    statuses: [u64; CODES],
    ring3_calls: u64,
    violations: u32,
    sentinel_failures: u32,
    stale_accepted: u32,
}

/// The fuzzer lives here so the ring-3 blocks (`run_in_ring3` takes a plain `fn()`) reach
/// it. One vCPU; `BUSY` makes a second borrow (which cannot happen) stop instead of alias.
struct Shared(UnsafeCell<Option<Fuzzer>>);

// SAFETY: the guest has one vCPU and no interrupt handler touches STATE; `with` hands out
// one `&mut` at a time, checked by BUSY.
unsafe impl Sync for Shared {}

static STATE: Shared = Shared(UnsafeCell::new(None));
static BUSY: AtomicBool = AtomicBool::new(false);

fn with<R>(f: impl FnOnce(&mut Fuzzer) -> R) -> Option<R> {
    if BUSY.swap(true, Ordering::Acquire) {
        println!("GTEST FAILED fuzz: the fuzzer state was borrowed twice");
        return None;
    }
    // SAFETY: BUSY guarantees this is the only reference to the state right now.
    let state = unsafe { &mut *STATE.0.get() };
    let result = state.as_mut().map(f);
    BUSY.store(false, Ordering::Release);
    result
}

fn kernel_of(cap: Cap) -> u64 {
    cap.high >> 48
}

/// Runs the fuzzer: `fuzz SEED CALLS [PEER...]`.
pub fn fuzz(vm: u64, seed: u64, calls: u64, peers: &[u32]) {
    println!(
        "fuzz: seed {seed}, {calls} calls, peers {peers:?} (the stream depends on the seed and the VM id, vm{vm})"
    );
    let fuzzer = match Fuzzer::new(vm as u32, seed, calls, peers) {
        Ok(fuzzer) => fuzzer,
        Err(why) => return println!("GTEST FAILED fuzz_setup: {why}"),
    };
    fuzzer.report_probe();
    // SAFETY: nothing else borrows STATE before the blocks start.
    unsafe { *STATE.0.get() = Some(fuzzer) };
    let blocks = calls.div_ceil(BLOCK);
    for block in 0..blocks {
        if block % 2 == 0 {
            run_block();
        } else {
            run_in_ring3(run_block);
        }
    }
    with(Fuzzer::finish);
}

fn run_block() {
    with(|f| {
        let end = (f.calls + BLOCK).min(f.target);
        while f.calls < end {
            f.step();
        }
    });
}

impl Fuzzer {
    fn new(vm: u32, seed: u64, target: u64, peer_list: &[u32]) -> Result<Self, &'static str> {
        let (factory, counter_am) = nk::initial(0).map_err(|_| "no initial capability 0 (the counter factory)")?;
        let mut peers = [0; 8];
        let peer_count = peer_list.len().min(8);
        peers[..peer_count].copy_from_slice(&peer_list[..peer_count]);
        let create = || {
            let reply = nk::call(counter_am, counter::CREATE, &[factory], &[]);
            reply.status().is_ok().then_some(reply.name).ok_or("cannot create a counter")
        };
        let sentinel = create()?;
        if !nk::call(counter_am, counter::ADD, &[sentinel], &[SENTINEL_VALUE]).status().is_ok() {
            return Err("cannot set the sentinel");
        }
        let tracked = create()?;
        let mut fuzzer = Fuzzer {
            rng: Rng(seed ^ u64::from(vm).wrapping_mul(0xD6E8_FEB8_6659_FD93)),
            vm,
            peers,
            peer_count,
            seed,
            calls: 0,
            target,
            counter_am,
            ams: 1,
            ops: [0; PROBE_AMS as usize],
            factory,
            sentinel,
            tracked,
            tracked_value: 0,
            factory_copy: None,
            epoch_copies: Names::new(),
            roots: Names::new(),
            mine: Names::new(),
            revoked: Names::new(),
            deleted: Names::new(),
            foreign: Names::new(),
            creates_left: CREATE_BUDGET,
            inbox_seen: 0,
            statuses: [0; CODES],
            ring3_calls: 0,
            violations: 0,
            sentinel_failures: 0,
            stale_accepted: 0,
        };
        for _ in 0..3 {
            fuzzer.roots.push(create()?);
        }
        for index in 1..4 {
            if let Ok((cap, am)) = nk::initial(index) {
                if am != counter_am {
                    fuzzer.roots.push(cap);
                }
            }
        }
        fuzzer.probe();
        fuzzer.new_epoch();
        Ok(fuzzer)
    }

    /// Learns which AM ids and operation numbers exist, from the statuses of calls with
    /// the zero name (which no capability has, so no operation runs).
    fn probe(&mut self) {
        for am in 1..PROBE_AMS {
            let status = nk::call(am, u32::MAX, &[], &[]).status();
            if status.code() != Status::UNKNOWN_OPERATION {
                continue;
            }
            self.ams |= 1 << am;
            for op in 0..PROBE_OPS {
                if nk::call(am, op, &[], &[]).status().code() != Status::UNKNOWN_OPERATION {
                    self.ops[usize::from(am)] |= 1 << op;
                }
            }
        }
        self.ops[0] = (1 << (nk_op::RECEIVED + 1)) - 1;
    }

    fn report_probe(&self) {
        println!(
            "fuzz: vm{} on kernel {}; AMs {:#b} (counter {}), their operations {:x?}; {} roots",
            self.vm,
            kernel_of(self.factory),
            self.ams,
            self.counter_am,
            &self.ops[1..4],
            self.roots.len
        );
    }

    /// Deletes every copy handed into the mix (which revokes whatever was derived or
    /// delegated from them) and every name it still knows, and derives fresh copies.
    fn new_epoch(&mut self) {
        for i in 0..self.epoch_copies.len {
            let copy = self.epoch_copies.slots[i];
            if nk::delete(copy).is_ok() {
                self.deleted.push(copy);
            }
        }
        for i in 0..self.mine.len {
            let cap = self.mine.slots[i];
            if !self.roots.contains(cap) && nk::delete(cap).is_ok() {
                self.deleted.push(cap);
            }
        }
        for i in 0..self.revoked.len {
            let cap = self.revoked.slots[i];
            if nk::delete(cap).is_ok() {
                self.deleted.push(cap);
            }
        }
        self.revoked.clear();
        self.epoch_copies.clear();
        self.mine.clear();
        let mut copies = Names::<12>::new();
        self.factory_copy = None;
        if self.creates_left > 0 {
            if let Ok(copy) = nk::derive(self.factory, u64::MAX) {
                copies.push(copy);
                self.factory_copy = Some(copy);
            }
        }
        for (source, mask) in [(self.sentinel, READ_ONLY), (self.tracked, READ_ONLY)] {
            if let Ok(copy) = nk::derive(source, mask) {
                copies.push(copy);
            }
        }
        for i in 0..self.roots.len {
            if let Ok(copy) = nk::derive(self.roots.slots[i], u64::MAX) {
                copies.push(copy);
            }
        }
        for i in 0..copies.len {
            self.epoch_copies.push(copies.slots[i]);
            self.mine.push(copies.slots[i]);
        }
    }

    fn peer(&mut self) -> u32 {
        match self.peer_count {
            0 => self.vm,
            n => self.peers[self.rng.below(n as u64) as usize],
        }
    }

    /// A capability argument and where it came from.
    fn cap(&mut self) -> (Cap, Origin) {
        let choice = self.rng.weighted(&[64, 5, 5, 6, 5, 5, 7, 3]);
        let invented = |cap: Cap| (cap, Origin::Invented);
        let fallback = NameWords { low: self.rng.next(), high: self.rng.next() };
        match choice {
            0 => self.mine.pick(&mut self.rng).map_or(invented(fallback), |c| (c, Origin::Mine)),
            1 => self.revoked.pick(&mut self.rng).map_or(invented(fallback), |c| (c, Origin::Revoked)),
            2 => self.deleted.pick(&mut self.rng).map_or(invented(fallback), |c| (c, Origin::Deleted)),
            3 => self.foreign.pick(&mut self.rng).map_or(invented(fallback), |c| (c, Origin::Foreign)),
            4 => {
                // One of its names with one bit flipped.
                let Some(mut cap) = self.mine.pick(&mut self.rng) else { return invented(fallback) };
                let bit = self.rng.below(128);
                if bit < 64 {
                    cap.low ^= 1 << bit;
                } else {
                    cap.high ^= 1 << (bit - 64);
                }
                invented(cap)
            }
            5 => {
                // One of its names with another kernel's id.
                let Some(mut cap) = self.mine.pick(&mut self.rng) else { return invented(fallback) };
                let kernel = (kernel_of(cap) + 1 + self.rng.below(4)) & 0xFFFF;
                cap.high = (cap.high & ((1 << 48) - 1)) | (kernel << 48);
                invented(cap)
            }
            6 => invented(fallback),
            _ => invented(NameWords::default()),
        }
    }

    /// A plain argument: mostly small numbers, rights masks and VM ids.
    fn plain(&mut self) -> u64 {
        match self.rng.weighted(&[40, 20, 15, 15, 10]) {
            0 => self.rng.below(8),
            1 => [0, 1, 2, 3, u64::MAX][self.rng.below(5) as usize],
            2 => match self.rng.below(4) {
                0 => u64::from(self.vm),
                1 => 0,
                2 => 1 + self.rng.below(16),
                _ => u64::from(self.peer()),
            },
            3 => self.rng.next(),
            _ => [u64::MAX, 1 << 63, 1 << 32, u64::from(u32::MAX), u64::from(u16::MAX) + 1][self.rng.below(5) as usize],
        }
    }

    /// Draws the next call.
    fn plan(&mut self) -> Planned {
        let mut call = Call::default();
        let mut origins = [Origin::Invented; 4];
        for (slot, origin) in call.caps.iter_mut().zip(origins.iter_mut()) {
            (*slot, *origin) = self.cap();
        }
        for arg in call.args.iter_mut() {
            *arg = self.plain();
        }
        let exo = (2..PROBE_AMS).find(|&am| self.ams & (1 << am) != 0 && am != self.counter_am).unwrap_or(2);
        let selector = match self.rng.weighted(&[38, 37, 8, 7, 5, 5]) {
            0 => {
                let op = match self.rng.weighted(&[10, 30, 30, 20, 5]) {
                    // Every VM shares the counter AM's 1,024 counters: stay in budget.
                    0 if self.creates_left == 0 => counter::READ,
                    0 => counter::CREATE,
                    1 => counter::READ,
                    2 => counter::ADD,
                    3 => counter::SUM4,
                    _ => self.rng.below(40) as u32,
                };
                if op == counter::ADD && self.rng.chance(10) {
                    call.args[0] = u64::MAX - self.rng.below(4);
                } else if op == counter::ADD {
                    call.args[0] = self.rng.below(1000);
                }
                Selector::new(self.counter_am, op).encode()
            }
            1 => {
                let op = match self.rng.weighted(&[4, 20, 20, 10, 8, 15, 5, 10, 8]) {
                    0 => nk_op::NULL,
                    1 => nk_op::DERIVE,
                    2 => nk_op::DELEGATE,
                    3 => nk_op::REVOKE,
                    4 => nk_op::DELETE,
                    5 => nk_op::INSPECT,
                    6 => nk_op::INITIAL,
                    7 => nk_op::RECEIVED,
                    _ => self.rng.next() as u32 >> self.rng.below(32),
                };
                match op {
                    nk_op::DELEGATE => {
                        call.args[1] = if self.rng.chance(85) { u64::from(self.peer()) } else { self.plain() };
                        call.args[2] = if self.rng.chance(90) { self.rng.below(2) } else { self.plain() };
                        if self.rng.chance(50) {
                            call.args[0] = READ_ONLY;
                        }
                    }
                    nk_op::RECEIVED => call.args[0] = self.rng.below(self.inbox_seen + 3),
                    nk_op::INITIAL => call.args[0] = self.rng.below(4),
                    _ => {}
                }
                Selector::new(NULL_KERNEL_AM, op).encode()
            }
            2 => {
                // Mostly port ranges and accesses near what a module line would give.
                if self.rng.chance(70) {
                    call.args[0] = 0x80 + self.rng.below(10);
                    call.args[1] = self.rng.below(10);
                    call.args[2] = self.rng.below(5);
                }
                if self.rng.chance(30) {
                    call.args[0] = self.rng.below(5);
                }
                Selector::new(exo, self.rng.below(5) as u32).encode()
            }
            3 => {
                let am = if self.rng.chance(50) { 1 + self.rng.below(12) as u16 } else { self.rng.next() as u16 };
                Selector::new(am, self.rng.below(6) as u32).encode()
            }
            4 => {
                let version = loop {
                    let v = self.rng.next() as u16;
                    if v != ABI_VERSION {
                        break v;
                    }
                };
                Selector { version, am: self.rng.below(3) as u16, op: self.rng.below(8) as u32 }.encode()
            }
            _ => self.rng.next(),
        };
        call.selector = selector;
        Planned { call, origins }
    }

    /// How many capability arguments the operation reads (0: none or unknown), and whether
    /// the AM and operation exist.
    fn shape(&self, selector: Selector) -> (usize, bool) {
        if selector.am == NULL_KERNEL_AM {
            return match selector.op {
                nk_op::DERIVE | nk_op::DELEGATE | nk_op::REVOKE | nk_op::DELETE | nk_op::INSPECT | nk_op::BIND => {
                    (1, true)
                }
                nk_op::NULL | nk_op::INITIAL | nk_op::RECEIVED => (0, true),
                _ => (0, false),
            };
        }
        let exists = selector.am < PROBE_AMS
            && selector.op < PROBE_OPS
            && self.ops[usize::from(selector.am)] & (1 << selector.op) != 0;
        // Every operation takes one capability but the counter AM's SUM4 (four) and the
        // exo AM's map, dirty and pml-drain (a frame set or address space, then the other).
        let exo = (2..PROBE_AMS).find(|&am| self.ams & (1 << am) != 0 && am != self.counter_am);
        let two = exo == Some(selector.am) && crate::exo_memory::TWO_CAPABILITY_OPS.contains(&selector.op);
        match (exists, selector.am == self.counter_am && selector.op == counter::SUM4, two) {
            (false, _, _) => (0, false),
            (true, true, _) => (4, true),
            (true, false, true) => (2, true),
            (true, false, false) => (1, true),
        }
    }

    /// Makes one fuzzed call and checks the answer.
    fn step(&mut self) {
        if self.calls.is_multiple_of(EPOCH) && self.calls > 0 {
            self.new_epoch();
        }
        if self.calls.is_multiple_of(SENTINEL_EVERY) {
            self.check_sentinels();
        }
        let planned = self.plan();
        let reply = nk_guest::abi::hypercall(&planned.call);
        self.calls += 1;
        if current_ring() == 3 {
            self.ring3_calls += 1;
        }
        self.check(&planned, &reply);
        self.learn(&planned, &reply);
        if self.calls.is_multiple_of(20_000) {
            println!("fuzz: {} calls, {} violations", self.calls, self.violations);
        }
    }

    fn violation(&mut self, planned: &Planned, reply: &Reply, what: &str) {
        self.violations += 1;
        if self.violations > REPORT_MAX {
            return;
        }
        let c = &planned.call;
        println!(
            "fuzz: VIOLATION call {} (seed {}, ring {}): {what}: rax {:#x} caps {:x}:{:x} {:x}:{:x} {:x}:{:x} {:x}:{:x} origins {:?} args {:x?} -> status {:#x} ({}) name {:x}:{:x} results {:x?}",
            self.calls,
            self.seed,
            current_ring(),
            c.selector,
            c.caps[0].high,
            c.caps[0].low,
            c.caps[1].high,
            c.caps[1].low,
            c.caps[2].high,
            c.caps[2].low,
            c.caps[3].high,
            c.caps[3].low,
            planned.origins,
            c.args,
            reply.status,
            reply.status(),
            reply.name.high,
            reply.name.low,
            reply.results
        );
    }

    fn check(&mut self, planned: &Planned, reply: &Reply) {
        let status = reply.status();
        let code = usize::from(status.code());
        if code >= CODES || reply.status >> 24 != 0 {
            return self.violation(planned, reply, "status outside the documented set");
        }
        self.statuses[code] += 1;

        let selector = Selector::decode(planned.call.selector);
        let (cap_args, exists) = self.shape(selector);
        if let Some(arg) = status.arg() {
            if usize::from(arg) >= cap_args {
                return self.violation(planned, reply, "status names a capability argument the operation has not");
            }
        }
        let known_am = selector.am == NULL_KERNEL_AM || (selector.am < PROBE_AMS && self.ams & (1 << selector.am) != 0);
        let expected = if selector.version != ABI_VERSION {
            Some(Status::BAD_VERSION)
        } else if !known_am {
            Some(Status::UNKNOWN_AM)
        } else if !exists {
            Some(Status::UNKNOWN_OPERATION)
        } else if selector.am == NULL_KERNEL_AM && selector.op == nk_op::NULL {
            Some(Status::OK)
        } else {
            None
        };
        if let Some(code) = expected {
            if status != Status::new(code, None) {
                return self.violation(planned, reply, Status::code_name(code));
            }
        }
        if !status.is_ok() {
            if reply.name != NameWords::default() {
                self.violation(planned, reply, "a failed call returned a capability name");
            }
            return;
        }
        let nk_op = (selector.am == NULL_KERNEL_AM).then_some(selector.op);
        let makes_name = matches!(nk_op, Some(nk_op::DERIVE | nk_op::DELEGATE))
            || (selector.am == self.counter_am && selector.op == counter::CREATE);
        if makes_name && reply.name == NameWords::default() {
            return self.violation(planned, reply, "a call that makes a capability returned the zero name");
        }
        // Inspect shows only what the caller may use: its own bound capabilities or
        // bearer ones (results[3] = holder << 1 | bearer, bit 62 set for a process-bound
        // one).
        let holder = reply.results[3] & !(1 << 62);
        if nk_op == Some(nk_op::INSPECT) && holder & 1 == 0 && holder >> 1 != u64::from(self.vm) {
            return self.violation(planned, reply, "inspect answered for another principal's bound capability");
        }
        if nk_op == Some(nk_op::RECEIVED) && reply.results[1] <= planned.call.args[0] {
            return self.violation(planned, reply, "received(i) answered past the inbox's length");
        }
        let deaths = reply.results[0];
        for origin in planned.origins.iter().take(cap_args) {
            let what = match (origin, nk_op) {
                (Origin::Mine, _) => continue,
                (Origin::Revoked, Some(nk_op::DELETE | nk_op::REVOKE)) if deaths == 0 => continue,
                (Origin::Foreign, Some(nk_op::REVOKE)) => continue,
                (Origin::Revoked, _) => "a revoked name worked",
                (Origin::Deleted, _) => "a deleted name worked",
                (Origin::Foreign, _) => "a name bound to another VM worked",
                (Origin::Invented, _) => "a made-up name worked",
            };
            self.stale_accepted += 1;
            return self.violation(planned, reply, what);
        }
    }

    /// Updates what it knows from a successful call.
    fn learn(&mut self, planned: &Planned, reply: &Reply) {
        if !reply.status().is_ok() {
            return;
        }
        let selector = Selector::decode(planned.call.selector);
        let c = planned.call.caps[0];
        if selector.am == NULL_KERNEL_AM {
            match selector.op {
                nk_op::DERIVE => self.mine.push(reply.name),
                nk_op::DELEGATE => {
                    let target = planned.call.args[1];
                    if target == u64::from(self.vm) || planned.call.args[2] == 1 {
                        self.mine.push(reply.name);
                    } else {
                        self.foreign.push(reply.name);
                    }
                }
                nk_op::REVOKE if !self.foreign.contains(c) && !self.deleted.contains(c) => {
                    self.mine.remove(c);
                    self.revoked.push(c);
                }
                nk_op::DELETE => {
                    self.mine.remove(c);
                    self.revoked.remove(c);
                    self.deleted.push(c);
                }
                nk_op::RECEIVED => {
                    self.inbox_seen = self.inbox_seen.max(reply.results[1]);
                    if reply.results[0] != 0 {
                        self.mine.push(reply.name);
                    }
                }
                nk_op::INITIAL if planned.call.args[0] == 0 && reply.name != self.factory => {
                    self.violation(planned, reply, "initial(0) changed");
                }
                _ => {}
            }
        } else if selector.am == self.counter_am && selector.op == counter::CREATE {
            self.creates_left = self.creates_left.saturating_sub(1);
            self.mine.push(reply.name);
            if self.creates_left == 0 {
                // The budget is spent: no factory copy stays in the mix.
                if let Some(copy) = self.factory_copy.take() {
                    if nk::delete(copy).is_ok() {
                        self.mine.remove(copy);
                        self.epoch_copies.remove(copy);
                        self.deleted.push(copy);
                    }
                }
            }
        }
    }

    /// The sentinel keeps its value; the tracked counter has exactly what it added.
    fn check_sentinels(&mut self) {
        let read = |cap: Cap| {
            let reply = nk::call(self.counter_am, counter::READ, &[cap], &[]);
            reply.status().is_ok().then_some(reply.results[0]).ok_or(reply.status())
        };
        let amount = self.rng.below(100);
        let added = nk::call(self.counter_am, counter::ADD, &[self.tracked], &[amount]);
        if added.status().is_ok() {
            self.tracked_value += amount;
        }
        let overflow = nk::call(self.counter_am, counter::ADD, &[self.tracked], &[u64::MAX]).status();
        let sentinel = read(self.sentinel);
        let tracked = read(self.tracked);
        let fine = added.status().is_ok()
            && overflow == Status::new(Status::BAD_ARGUMENT, None)
            && sentinel == Ok(SENTINEL_VALUE)
            && tracked == Ok(self.tracked_value);
        if !fine {
            self.sentinel_failures += 1;
            if self.sentinel_failures <= 4 {
                println!(
                    "fuzz: VIOLATION sentinels at call {} (seed {}): sentinel {sentinel:?} (expected {SENTINEL_VALUE}), tracked {tracked:?} (expected {}), add {}, overflowing add {overflow}",
                    self.calls,
                    self.seed,
                    self.tracked_value,
                    added.status()
                );
            }
        }
    }

    fn finish(&mut self) {
        self.check_sentinels();
        let s = &self.statuses;
        println!(
            "fuzz: {} calls ({} from ring 3), seed {}: ok {}, bad-version {}, unknown-am {}, unknown-op {}, unknown-name {}, wrong-holder {}, wrong-kind {}, missing-rights {}, revoked {}, bad-argument {}, quota {}, not-permitted {}, no-memory {}, am-failed {}",
            self.calls, self.ring3_calls, self.seed, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], s[12], s[13]
        );
        let report = |name: &str, failures: u32, what: &str| match failures {
            0 => println!("GTEST ok {name}"),
            n => println!("GTEST FAILED {name}: {n} {what} (seed {})", self.seed),
        };
        report(
            "fuzz_statuses",
            self.violations - self.stale_accepted,
            "answers outside the documented set or not the exact one",
        );
        report("fuzz_names_refused", self.stale_accepted, "stale, foreign or made-up names accepted");
        report("fuzz_sentinels", self.sentinel_failures, "sentinel checks failed");
        let enough = self.calls >= self.target && self.ring3_calls > 0;
        match enough {
            true => println!("GTEST ok fuzz"),
            false => println!("GTEST FAILED fuzz: {} calls, {} from ring 3", self.calls, self.ring3_calls),
        }
    }
}
