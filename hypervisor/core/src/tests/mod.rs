use super::*;
use nk_abi::{Call, NameWords};
use nk_am_counter::{op, CounterAm};
use nk_caps::FixedSeed;
use proptest::prelude::*;

const VM1: VmId = VmId::new(1);
const VM2: VmId = VmId::new(2);
const VM3: VmId = VmId::new(3);

struct World {
    nk: NullKernel,
    counter_am: u16,
}

fn world() -> World {
    world_of(4096)
}

fn world_of(capacity: u32) -> World {
    let mut nk = NullKernel::new(KernelId::new(0), 1, capacity, &mut FixedSeed::from_u64(42)).unwrap();
    let counter_am = nk.add_am(Box::new(CounterAm::new()), 1024).unwrap().raw();
    nk.set_caller_ring(|| 0);
    for vm in [VM1, VM2, VM3] {
        assert!(nk.add_vm(vm, 256).unwrap().is_empty());
    }
    World { nk, counter_am }
}

impl World {
    fn call(&mut self, vm: VmId, am: u16, op: u32, caps: &[NameWords], args: &[u64]) -> Reply {
        let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
        call.caps[..caps.len()].copy_from_slice(caps);
        call.args[..args.len()].copy_from_slice(args);
        local(self.nk.dispatch(vm, &call, &mut Vec::new()))
    }

    fn nk_op(&mut self, vm: VmId, op: u32, cap: NameWords, args: &[u64]) -> Reply {
        self.call(vm, NULL_KERNEL_AM, op, &[cap], args)
    }

    fn factory(&mut self, vm: VmId) -> NameWords {
        let reply = self.nk_op(vm, nk_op::INITIAL, NameWords::default(), &[0]);
        assert!(reply.status().is_ok(), "{}", reply.status());
        assert_eq!(reply.results[0], u64::from(self.counter_am));
        reply.name
    }

    fn create_counter(&mut self, vm: VmId) -> NameWords {
        let factory = self.factory(vm);
        let reply = self.call(vm, self.counter_am, op::CREATE.into(), &[factory], &[]);
        assert!(reply.status().is_ok(), "create: {}", reply.status());
        reply.name
    }

    fn read(&mut self, vm: VmId, cap: NameWords) -> Result<(u64, u64), Status> {
        let reply = self.call(vm, self.counter_am, op::READ.into(), &[cap], &[]);
        if reply.status().is_ok() {
            Ok((reply.results[0], reply.results[1]))
        } else {
            Err(reply.status())
        }
    }

    fn add(&mut self, vm: VmId, cap: NameWords, amount: u64) -> Status {
        self.call(vm, self.counter_am, op::ADD.into(), &[cap], &[amount]).status()
    }
}

/// The reply of a call on a single kernel instance, which never waits.
fn local(dispatched: Dispatched) -> Reply {
    dispatched.reply().expect("a single kernel instance finishes every call at once")
}

fn status(code: u16, arg: Option<u8>) -> Status {
    Status::new(code, arg)
}

#[test]
fn null_call_and_malformed_selectors() {
    let mut w = world();
    assert!(w.nk_op(VM1, nk_op::NULL, NameWords::default(), &[]).status().is_ok());
    let bad_version = Call { selector: Selector { version: 9, am: 0, op: 0 }.encode(), ..Call::default() };
    assert_eq!(local(w.nk.dispatch(VM1, &bad_version, &mut Vec::new())).status(), status(Status::BAD_VERSION, None));
    assert_eq!(w.call(VM1, 99, 0, &[], &[]).status(), status(Status::UNKNOWN_AM, None));
    assert_eq!(w.call(VM1, w.counter_am, 77, &[], &[]).status(), status(Status::UNKNOWN_OPERATION, None));
    assert_eq!(w.call(VM1, w.counter_am, 1 << 20, &[], &[]).status(), status(Status::UNKNOWN_OPERATION, None));
    assert_eq!(w.nk_op(VM1, 1000, NameWords::default(), &[]).status(), status(Status::UNKNOWN_OPERATION, None));
    assert_eq!(w.nk_op(VM1, nk_op::INITIAL, NameWords::default(), &[5]).status(), status(Status::BAD_ARGUMENT, None));
}

#[test]
fn counter_operations_through_checked_capabilities() {
    let mut w = world();
    let c = w.create_counter(VM1);
    assert!(w.add(VM1, c, 5).is_ok());
    assert_eq!(w.read(VM1, c), Ok((5, 0)));
    let sum = w.call(VM1, w.counter_am, op::SUM4.into(), &[c, c, c, c], &[]);
    assert_eq!((sum.status(), sum.results[0]), (status(Status::OK, None), 20));
    assert_eq!(w.add(VM1, c, u64::MAX).code(), Status::BAD_ARGUMENT);
    assert_eq!(w.read(VM1, c), Ok((5, 0)), "a failed add changed the counter");
}

#[test]
fn every_argument_fault_names_its_argument_and_changes_nothing() {
    let mut w = world();
    let c = w.create_counter(VM1);
    let factory = w.factory(VM1);
    let garbage = NameWords { low: 0x1234, high: 0x5678 };
    let before = w.nk.table().len();
    let sum = |w: &mut World, caps: &[NameWords]| w.call(VM1, w.counter_am, op::SUM4.into(), caps, &[]).status();
    assert_eq!(sum(&mut w, &[c, c, garbage, c]), status(Status::UNKNOWN_NAME, Some(2)));
    assert_eq!(sum(&mut w, &[c, factory, c, c]), status(Status::WRONG_KIND, Some(1)));
    assert_eq!(w.read(VM2, c), Err(status(Status::WRONG_HOLDER, Some(0))));
    let read_only = w.nk_op(VM1, nk_op::DERIVE, c, &[1]).name;
    assert_eq!(w.add(VM1, read_only, 1), status(Status::MISSING_RIGHTS, Some(0)));
    assert_eq!(w.nk.table().len(), before + 1, "only the derive added a capability");
    assert_eq!(w.read(VM1, c), Ok((0, 0)));
}

#[test]
fn derive_delegate_revoke_and_the_revocation_hook() {
    let mut w = world();
    let c = w.create_counter(VM1);
    // Derivation only removes rights.
    let derived = w.nk_op(VM1, nk_op::DERIVE, c, &[u64::MAX]).name;
    let info = w.nk_op(VM1, nk_op::INSPECT, derived, &[]);
    assert_eq!(info.results[2], 0b11);
    // Bound delegation: VM2 may use it, VM3 may not.
    let bound = w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 2, 0]);
    assert!(bound.status().is_ok());
    assert_eq!(w.read(VM2, bound.name), Ok((0, 0)));
    assert_eq!(w.read(VM3, bound.name), Err(status(Status::WRONG_HOLDER, Some(0))));
    assert_eq!(w.add(VM2, bound.name, 1), status(Status::MISSING_RIGHTS, Some(0)));
    // Bearer delegation: anyone presenting the name may use it.
    let bearer = w.nk_op(VM1, nk_op::DELEGATE, c, &[3, 2, 1]).name;
    assert!(w.add(VM3, bearer, 7).is_ok());
    // Revoke the root's subtree: every copy dies, the AM hears of each.
    let revoked = w.nk_op(VM1, nk_op::REVOKE, c, &[]);
    assert_eq!((revoked.status(), revoked.results[0]), (status(Status::OK, None), 4));
    for (vm, name) in [(VM1, c), (VM1, derived), (VM2, bound.name), (VM3, bearer)] {
        assert_eq!(w.read(vm, name), Err(status(Status::REVOKED, Some(0))));
    }
    let fresh = w.create_counter(VM1);
    assert_eq!(w.read(VM1, fresh), Ok((0, 0)));
}

#[test]
fn delegate_refuses_bad_targets_and_bindings() {
    let mut w = world();
    let c = w.create_counter(VM1);
    assert_eq!(w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 2, 7]).status(), status(Status::BAD_ARGUMENT, None));
    assert_eq!(w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 1 << 40, 0]).status(), status(Status::BAD_ARGUMENT, None));
    assert_eq!(w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 99, 0]).status(), status(Status::BAD_ARGUMENT, None));
}

#[test]
fn removing_a_vm_kills_what_it_held() {
    let mut w = world();
    let c = w.create_counter(VM1);
    let shared = w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 2, 1]).name;
    let removed = local(w.nk.remove_vm(VM1, &mut Vec::new()).unwrap());
    assert!(removed.results[0] >= 2);
    assert_eq!(w.nk.remove_vm(VM1, &mut Vec::new()), Err(PrincipalError::UnknownPrincipal));
    assert_eq!(w.read(VM2, shared), Err(status(Status::REVOKED, Some(0))));
}

#[test]
fn delegated_capabilities_reach_the_inbox() {
    let mut w = world();
    let c = w.create_counter(VM1);
    let received = |w: &mut World, vm, index| w.nk_op(vm, nk_op::RECEIVED, NameWords::default(), &[index]);
    assert_eq!(received(&mut w, VM2, 0).status(), status(Status::BAD_ARGUMENT, None));
    let given = w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 2, 0]).name;
    let own = w.nk_op(VM1, nk_op::DELEGATE, c, &[1, 1, 0]).name;
    let got = received(&mut w, VM2, 0);
    assert_eq!((got.name, got.results[0], got.results[1]), (given, u64::from(w.counter_am), 1));
    assert_eq!(received(&mut w, VM1, 0).status(), status(Status::BAD_ARGUMENT, None), "{own:?} is not news");
    assert_eq!(received(&mut w, VM2, u64::MAX).status(), status(Status::BAD_ARGUMENT, None));
}

#[test]
fn the_inbox_names_the_sender_and_forgets_dead_capabilities() {
    let mut w = world();
    let c = w.create_counter(VM1);
    let received = |w: &mut World, vm, index| w.nk_op(vm, nk_op::RECEIVED, NameWords::default(), &[index]);
    let first = w.nk_op(VM1, nk_op::DELEGATE, c, &[u64::MAX, 2, 0]).name;
    let second = w.nk_op(VM1, nk_op::DELEGATE, c, &[u64::MAX, 2, 0]).name;
    let got = received(&mut w, VM2, 1);
    assert_eq!((got.name, got.results[1], got.results[2]), (second, 2, u64::from(VM1.raw()) << 1));
    // VM1 takes the first back: it leaves VM2's inbox at once.
    assert!(w.nk_op(VM1, nk_op::REVOKE, first, &[]).status().is_ok());
    let got = received(&mut w, VM2, 0);
    assert_eq!((got.name, got.results[1]), (second, 1));
    // VM2 deletes the second: the inbox is empty again.
    assert!(w.nk_op(VM2, nk_op::DELETE, second, &[]).status().is_ok());
    assert_eq!(received(&mut w, VM2, 0).status(), status(Status::BAD_ARGUMENT, None));
    assert_eq!(w.nk.inbox(VM2), &[]);
    w.nk.table().check_consistency().unwrap();
}

#[test]
fn bind_ties_a_capability_to_the_calling_process() {
    // The "current call's" root: process A's, B's, or unknown (the VMREAD failed).
    static ROOT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let on = |root: u64| ROOT.store(nk_abi::process_root(root), core::sync::atomic::Ordering::Relaxed);
    let mut w = world();
    w.nk.set_caller_root(|| ROOT.load(core::sync::atomic::Ordering::Relaxed));
    let c = w.create_counter(VM1);
    assert_eq!(w.add(VM1, c, 5), Status(0));
    // A binds from its user root (PTI: kernel root | 0x1000, with PCID bits).
    on(0x0123_6000 | 0x1000 | 0x805);
    let bound = w.nk_op(VM1, nk_op::BIND, c, &[]);
    assert!(bound.status().is_ok(), "{}", bound.status());
    assert_eq!(bound.results[0], 0x0123_6000);
    let inspected = w.nk_op(VM1, nk_op::INSPECT, c, &[]);
    assert_eq!(inspected.results[3], (1 << 1) | (1 << 62), "held by vm1, process-bound");
    // A's kernel root is the same process.
    on(0x0123_6000 | 0x003);
    assert_eq!(w.read(VM1, c).map(|r| r.0), Ok(5));
    // B (another root of the same VM) is refused everything, and nothing changes.
    on(0x0456_8000 | 0x1000);
    assert_eq!(w.add(VM1, c, 1), status(Status::WRONG_HOLDER, Some(0)));
    for op in [nk_op::INSPECT, nk_op::DERIVE, nk_op::REVOKE, nk_op::DELETE, nk_op::BIND] {
        let reply = w.nk_op(VM1, op, c, &[u64::MAX]);
        assert_eq!(reply.status(), status(Status::WRONG_HOLDER, Some(0)), "op {op}");
    }
    on(0x0123_7000);
    assert_eq!(w.read(VM1, c).map(|r| r.0), Ok(5));
    // A bearer capability is not bindable.
    let bearer = w.nk_op(VM1, nk_op::DELEGATE, c, &[u64::MAX, 1, 1]).name;
    assert_eq!(w.nk_op(VM1, nk_op::BIND, bearer, &[]).status(), status(Status::NOT_PERMITTED, None));
    // A received capability bound by one process stays in the inbox when another process
    // lists it after a death pruned the inbox.
    let d = w.create_counter(VM1);
    let kept = w.nk_op(VM1, nk_op::DELEGATE, d, &[u64::MAX, 2, 0]).name;
    let dropped = w.nk_op(VM1, nk_op::DELEGATE, d, &[u64::MAX, 2, 0]).name;
    assert!(w.nk_op(VM2, nk_op::BIND, kept, &[]).status().is_ok());
    assert!(w.nk_op(VM1, nk_op::REVOKE, dropped, &[]).status().is_ok());
    w.nk.allow_all_rings(VM2);
    on(0x0456_8000);
    let listed = w.nk_op(VM2, nk_op::RECEIVED, NameWords::default(), &[0]);
    assert_eq!((listed.name, listed.results[1]), (kept, 1), "{}", listed.status());
    w.nk.table().check_consistency().unwrap();
}

#[test]
fn only_ring_0_enumerates_unless_the_vm_allows_every_ring() {
    let mut w = world();
    let c = w.create_counter(VM1);
    w.nk_op(VM1, nk_op::DELEGATE, c, &[u64::MAX, 2, 0]);
    static RING: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
    static ASKED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    w.nk.set_caller_ring(|| {
        ASKED.store(true, core::sync::atomic::Ordering::Relaxed);
        RING.load(core::sync::atomic::Ordering::Relaxed)
    });
    let enumerate = |w: &mut World, vm: VmId, op: u32, ring: u8| {
        RING.store(ring, core::sync::atomic::Ordering::Relaxed);
        let call = Call { selector: Selector::new(NULL_KERNEL_AM, op).encode(), ..Call::default() };
        local(w.nk.dispatch(vm, &call, &mut Vec::new())).status()
    };
    for op in [nk_op::INITIAL, nk_op::RECEIVED] {
        assert!(enumerate(&mut w, VM2, op, 0).is_ok());
        for ring in 1..=3 {
            assert_eq!(enumerate(&mut w, VM2, op, ring), status(Status::NOT_PERMITTED, None));
        }
    }
    // Other operations do not ask (they are guarded by the capabilities they name).
    ASKED.store(false, core::sync::atomic::Ordering::Relaxed);
    let null = Call { selector: Selector::new(NULL_KERNEL_AM, nk_op::NULL).encode(), ..Call::default() };
    let reply = local(w.nk.dispatch(VM2, &null, &mut Vec::new()));
    assert!(reply.status().is_ok() && !ASKED.load(core::sync::atomic::Ordering::Relaxed));
    // Until a reader is set, every caller counts as ring 3.
    let mut fresh = NullKernel::new(KernelId::new(0), 1, 64, &mut FixedSeed::from_u64(1)).unwrap();
    fresh.add_vm(VM1, 8).unwrap();
    let initial = Call { selector: Selector::new(NULL_KERNEL_AM, nk_op::INITIAL).encode(), ..Call::default() };
    assert_eq!(local(fresh.dispatch(VM1, &initial, &mut Vec::new())).status(), status(Status::NOT_PERMITTED, None));
    w.nk.allow_all_rings(VM2);
    for op in [nk_op::INITIAL, nk_op::RECEIVED] {
        assert!(enumerate(&mut w, VM2, op, 3).is_ok());
    }
    assert_eq!(enumerate(&mut w, VM1, nk_op::INITIAL, 3), status(Status::NOT_PERMITTED, None));
}

#[test]
fn a_delegation_flood_is_paid_by_the_delegator() {
    let mut w = world();
    let factory = w.factory(VM1);
    let table_before = w.nk.table().len();
    let mut given = 0u32;
    let refusal = loop {
        let reply = w.nk_op(VM1, nk_op::DELEGATE, factory, &[u64::MAX, 2, 0]);
        if !reply.status().is_ok() {
            break reply.status();
        }
        given += 1;
        assert!(given <= 256, "the flood must end at VM1's quota");
    };
    assert_eq!(refusal, status(Status::QUOTA_EXCEEDED, None));
    assert_eq!(given, 256 - 1, "VM1's quota of 256 holds its factory and what it gave");
    let victim = w.nk.table().usage(Principal::Vm(VM2)).unwrap();
    assert_eq!(victim.charged, 1, "VM2 pays only for its own factory");
    assert_eq!(w.nk.table().len() - table_before, given, "the table grew by VM1's quota, no more");
    // The victim still creates capabilities of its own, and VM3 is untouched.
    let mine = w.create_counter(VM2);
    assert!(w.read(VM2, mine).is_ok());
    w.create_counter(VM3);
    w.nk.table().check_consistency().unwrap();
}

#[test]
fn a_delegation_to_a_full_inbox_is_refused() {
    let mut w = world_of(3 * INBOX_MAX as u32);
    for vm in [VM1, VM3] {
        w.nk.table_mut().set_quota(Principal::Vm(vm), INBOX_MAX as u32).unwrap();
    }
    let f1 = w.factory(VM1);
    let f3 = w.factory(VM3);
    let half = INBOX_MAX / 2;
    for (from, factory) in [(VM1, f1), (VM3, f3)] {
        for _ in 0..half {
            assert!(w.nk_op(from, nk_op::DELEGATE, factory, &[u64::MAX, 2, 0]).status().is_ok());
        }
    }
    assert_eq!(w.nk.inbox(VM2).len(), INBOX_MAX);
    let refused = w.nk_op(VM1, nk_op::DELEGATE, f1, &[u64::MAX, 2, 0]).status();
    assert_eq!(refused, status(Status::QUOTA_EXCEEDED, None));
}

#[test]
fn counters_are_bounded_per_vm() {
    let mut w = world();
    w.nk.table_mut().set_quota(Principal::Vm(VM1), 1024).unwrap();
    let factory = w.factory(VM1);
    let mut made = 0;
    let refusal = loop {
        let reply = w.call(VM1, w.counter_am, op::CREATE.into(), &[factory], &[]);
        if !reply.status().is_ok() {
            break reply.status();
        }
        made += 1;
        assert!(made <= nk_am_counter::MAX_COUNTERS_PER_VM, "VM1 made more counters than its share");
    };
    assert_eq!(refusal, status(Status::NO_MEMORY, None));
    assert_eq!(made, nk_am_counter::MAX_COUNTERS_PER_VM);
    // Another VM still gets counters.
    w.create_counter(VM2);
}

proptest! {
    /// Random selectors, names and arguments never panic, and a failed call never changes
    /// the table.
    #[test]
    fn garbage_calls_change_nothing(calls in proptest::collection::vec(
        (any::<u64>(), any::<[u64; 8]>(), any::<[u64; 5]>(), 1u32..4), 1..40)) {
        let mut w = world();
        let _ = w.create_counter(VM1);
        for (selector, caps, args, vm) in calls {
            let before = w.nk.table().len();
            let mut call = Call { selector, args, ..Call::default() };
            for (i, pair) in caps.chunks(2).enumerate() {
                call.caps[i] = NameWords { low: pair[0], high: pair[1] };
            }
            let reply = local(w.nk.dispatch(VmId::new(vm), &call, &mut Vec::new()));
            if !reply.status().is_ok() {
                prop_assert_eq!(w.nk.table().len(), before);
            }
        }
    }
}

mod am_to_am;
mod distributed;
mod retire;

/// The NKCP table lists a VM's live initial capabilities with `<am>/<kind>` labels, in
/// INITIAL order; one that was revoked is left out.
#[test]
fn handed_caps_label_the_initial_capabilities() {
    let mut w = world();
    let factory = w.factory(VM1);
    let handed = w.nk.handed_caps(VM1);
    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0].name, factory);
    assert_eq!(handed[0].am, w.counter_am);
    assert_eq!(handed[0].label(), "counter/factory");
    let revoked = w.nk_op(VM1, nk_op::REVOKE, factory, &[]);
    assert!(revoked.status().is_ok(), "{}", revoked.status());
    assert!(w.nk.handed_caps(VM1).is_empty());
    assert_eq!(w.nk.handed_caps(VM2).len(), 1);
}

/// The hypercall path answers a derive of a local capability itself (`local_derive`):
/// its replies, the name's rights and every refusal (with its argument), must be those
/// of the protocol's derive, and a refusal must change nothing.
#[test]
fn local_derive_replies_as_the_protocol_does() {
    let mut w = world();
    let c = w.create_counter(VM1);
    let child = w.nk_op(VM1, nk_op::DERIVE, c, &[0b01]);
    assert_eq!((child.status(), child.results), (status(Status::OK, None), [0; 4]));
    assert_eq!(w.nk_op(VM1, nk_op::INSPECT, child.name, &[]).results[2], 0b01, "the mask applies");
    let before = w.nk.table().len();
    let unknown = NameWords { low: 0x1234, high: c.high };
    assert_eq!(w.nk_op(VM1, nk_op::DERIVE, unknown, &[1]).status(), status(Status::UNKNOWN_NAME, Some(0)));
    assert_eq!(w.nk_op(VM2, nk_op::DERIVE, c, &[1]).status(), status(Status::WRONG_HOLDER, Some(0)));
    assert!(w.nk_op(VM1, nk_op::REVOKE, child.name, &[]).status().is_ok());
    assert_eq!(w.nk_op(VM1, nk_op::DERIVE, child.name, &[1]).status(), status(Status::REVOKED, Some(0)));
    assert_eq!(w.nk.table().len(), before, "a refused derive added a capability");
    // Each reply is the protocol's own.
    for (vm, cap) in [(VM1, c), (VM1, unknown), (VM2, c), (VM1, child.name)] {
        let through_protocol =
            started(w.nk.proto.derive(Principal::Vm(vm), name_of(cap), Rights::from_bits(1), &mut Vec::new()));
        let reply = w.nk_op(vm, nk_op::DERIVE, cap, &[1]);
        let expected = through_protocol.reply().expect("local");
        assert_eq!(reply.status, expected.status, "derive of {cap:?} by {vm:?}");
        assert_eq!(reply.results, expected.results);
    }
}
