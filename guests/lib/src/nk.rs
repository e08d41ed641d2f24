//! Typed wrappers of the null-Kernel's own operations and of AM calls.

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status, NULL_KERNEL_AM};

/// A capability name held by this guest.
pub type Cap = NameWords;

/// Calls operation `op` of AM `am` with capability and plain arguments. Inlined, so a call
/// with constant argument counts loads its registers directly instead of building and
/// copying a whole [`Call`] on the stack.
#[inline(always)]
pub fn call(am: u16, op: u32, caps: &[Cap], args: &[u64]) -> Reply {
    let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
    for (slot, cap) in call.caps.iter_mut().zip(caps) {
        *slot = *cap;
    }
    for (slot, arg) in call.args.iter_mut().zip(args) {
        *slot = *arg;
    }
    nk_abi::hypercall(&call)
}

fn named(reply: Reply) -> Result<Cap, Status> {
    if reply.status().is_ok() {
        Ok(reply.name)
    } else {
        Err(reply.status())
    }
}

fn counted(reply: Reply) -> Result<u64, Status> {
    if reply.status().is_ok() {
        Ok(reply.results[0])
    } else {
        Err(reply.status())
    }
}

/// The empty round trip.
pub fn null() -> Status {
    call(NULL_KERNEL_AM, nk_op::NULL, &[], &[]).status()
}

/// Returns this guest's `index`-th initial capability and the AM it belongs to.
pub fn initial(index: u64) -> Result<(Cap, u16), Status> {
    let reply = call(NULL_KERNEL_AM, nk_op::INITIAL, &[], &[index]);
    named(reply).map(|cap| (cap, reply.results[0] as u16))
}

/// One entry of this guest's inbox (`RECEIVED`, ABI revision 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The capability.
    pub cap: Cap,
    /// The AM of its object.
    pub am: u16,
    /// How many entries the inbox holds now.
    pub count: u64,
    /// The VM that delegated it, or None if an AM did.
    pub sender: Option<u32>,
}

/// Returns the `index`-th capability another principal delegated to this guest (its
/// inbox, in arrival order; an entry leaves it when its capability dies, so later ones
/// move up). Only ring 0 may ask unless the VM's module line says `ring3-caps`.
pub fn received(index: u64) -> Result<Received, Status> {
    let reply = call(NULL_KERNEL_AM, nk_op::RECEIVED, &[], &[index]);
    let sender = reply.results[2];
    named(reply).map(|cap| Received {
        cap,
        am: reply.results[0] as u16,
        count: reply.results[1],
        sender: (sender >> 63 == 0).then_some((sender >> 1) as u32),
    })
}

/// Waits (polling) until the inbox holds an `index`-th capability, and returns it.
pub fn wait_received(index: u64) -> Cap {
    loop {
        if let Ok(got) = received(index) {
            return got.cap;
        }
        for _ in 0..200 {
            core::hint::spin_loop();
        }
    }
}

/// Derives a capability with `mask` applied to `cap`'s rights.
pub fn derive(cap: Cap, mask: u64) -> Result<Cap, Status> {
    named(call(NULL_KERNEL_AM, nk_op::DERIVE, &[cap], &[mask]))
}

/// Delegates `cap` (masked) to VM `target`, bound to it or as a bearer capability.
pub fn delegate(cap: Cap, target: u32, mask: u64, bearer: bool) -> Result<Cap, Status> {
    named(call(NULL_KERNEL_AM, nk_op::DELEGATE, &[cap], &[mask, u64::from(target), u64::from(bearer)]))
}

/// Revokes `cap` and everything derived from it; returns how many died.
pub fn revoke(cap: Cap) -> Result<u64, Status> {
    counted(call(NULL_KERNEL_AM, nk_op::REVOKE, &[cap], &[]))
}

/// Deletes `cap`.
pub fn delete(cap: Cap) -> Result<u64, Status> {
    counted(call(NULL_KERNEL_AM, nk_op::DELETE, &[cap], &[]))
}

/// Binds `cap` to the page-table root this call is made with (`nk_op::BIND`); returns
/// the root.
pub fn bind(cap: Cap) -> Result<u64, Status> {
    counted(call(NULL_KERNEL_AM, nk_op::BIND, &[cap], &[]))
}

/// Returns (AM << 32 | kind, object id, rights, holder << 1 | bearer) of `cap`.
pub fn inspect(cap: Cap) -> Result<[u64; 4], Status> {
    let reply = call(NULL_KERNEL_AM, nk_op::INSPECT, &[cap], &[]);
    if reply.status().is_ok() {
        Ok(reply.results)
    } else {
        Err(reply.status())
    }
}

/// Reads the time-stamp counter (in Bochs: emulated instructions retired).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}
