//! Each exchange on its own, malformed requests, and the wire format.

use nk_caps::{Binding, CapError, CapName, KernelId, NodeState, ObjId, Object, RemoteGrant, Rights, VmId};

use super::sim::*;
use crate::{DecodeError, Message, OpId, Outcome, ProtoError, Routed, MESSAGE_WORDS};

fn delegate(kernel: u16, caller: nk_caps::Principal, cap: CapName, target: nk_caps::Principal, to: u16) -> Action {
    Action::Delegate { kernel, caller, cap, target, to, mask: Rights::ALL, binding: Binding::Bound }
}

fn count(n: u64) -> Result<Outcome, ProtoError> {
    Ok(Outcome::Count(n))
}

#[test]
fn delegation_across_kernels_links_both_sides() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let v1 = Sim::vm_on(1, 0);
    let child = sim.setup_name(delegate(0, exo(), root, v1, 1));
    assert_eq!(child.kernel(), k(1));
    let view = sim.node(child).unwrap();
    assert_eq!(view.state, NodeState::Live);
    assert_eq!(view.parent, Some(root), "the child hangs below the proxy named after its parent");
    assert_eq!(view.cap.unwrap().holder, v1);
    let proxy = sim.kernels[0].table().node(child).unwrap();
    assert_eq!((proxy.state, proxy.parent), (NodeState::Remote, Some(root)));
    // The child is usable on its kernel through the ordinary check path.
    assert!(sim.kernels[1].table().inspect(v1, child).is_ok());
    // And the child is derivable there like any capability.
    let grandchild = sim.setup_name(Action::Derive { kernel: 1, caller: v1, cap: child, mask: R });
    assert_eq!(sim.node(grandchild).unwrap().cap.unwrap().rights, R);
}

#[test]
fn revoke_reaches_remote_children_and_waits_for_their_acks() {
    let mut sim = Sim::new(3, 1, 64);
    let root = sim.mint(0, 1);
    let (v1, v2) = (Sim::vm_on(1, 0), Sim::vm_on(2, 0));
    let c1 = sim.setup_name(delegate(0, exo(), root, v1, 1));
    let c2 = sim.setup_name(delegate(1, v1, c1, v2, 2));
    let c3 = sim.setup_name(Action::Derive { kernel: 2, caller: v2, cap: c2, mask: R });
    let before = sim.delivered;
    let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
    sim.run(&[Choice::Start(revoke)]);
    assert!(sim.ended[revoke].is_none(), "the revoke waits for kernel 1");
    assert_eq!(sim.node(root).unwrap().state, NodeState::Revoking, "marked, kept until the ack");
    assert!(sim.live(c1) && sim.live(c3), "the remote parts are not reached yet");
    // Only kernel 1 holds a child of the root: one message, no broadcast.
    assert_eq!(sim.deliveries(), vec![Choice::Deliver(0, 1)]);
    sim.drain();
    assert_eq!(sim.ended[revoke].unwrap().result, count(4));
    for name in [root, c1, c2, c3] {
        assert_eq!(sim.node(name).unwrap().state, NodeState::Revoked);
    }
    assert_eq!(sim.delivered - before, 4, "revoke 0->1, revoke 1->2, gone 2->1, gone 1->0");
    sim.check_final().unwrap();
    // No proxy is left anywhere.
    for kernel in &sim.kernels {
        assert!(kernel.table().nodes().all(|v| v.cap.is_some()));
    }
}

#[test]
fn obtain_of_a_bearer_capability_reserves_then_activates() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let v0 = Sim::vm_on(0, 0);
    let bearer = sim.setup_name(Action::Delegate {
        kernel: 0,
        caller: exo(),
        cap: root,
        target: v0,
        to: 0,
        mask: RW,
        binding: Binding::Bearer,
    });
    let v1 = Sim::vm_on(1, 0);
    let obtain = sim.script(Action::Derive { kernel: 1, caller: v1, cap: bearer, mask: R });
    sim.run(&[Choice::Start(obtain)]);
    let reserved = sim.kernels[1].table().nodes().find(|v| v.state == NodeState::Pending).expect("a reservation");
    assert_eq!(reserved.parent, Some(bearer));
    sim.drain();
    let child = sim.ended[obtain].unwrap().result.unwrap().name().unwrap();
    assert_eq!(child, reserved.name);
    let info = sim.kernels[1].table().inspect(v1, child).unwrap();
    assert_eq!((info.rights, info.binding, info.holder), (R, Binding::Bearer, v1));
    // A bound capability of another kernel cannot be obtained by someone else.
    let bound = sim.setup_name(delegate(0, exo(), root, v0, 0));
    assert_eq!(
        sim.setup(Action::Derive { kernel: 1, caller: v1, cap: bound, mask: R }),
        Err(CapError::WrongHolder.into())
    );
    assert!(sim.kernels[1].table().nodes().all(|v| v.state != NodeState::Pending), "the reservation is gone");
    sim.check_final().unwrap();
}

#[test]
fn zigzag_trees_revoke_from_every_level() {
    for level in 0..4 {
        let mut sim = Sim::new(2, 1, 64);
        let root = sim.mint(0, 1);
        let (v0, v1) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0));
        let a = sim.setup_name(delegate(0, exo(), root, v1, 1));
        let b = sim.setup_name(delegate(1, v1, a, v0, 0));
        let c = sim.setup_name(delegate(0, v0, b, v1, 1));
        let chain = [root, a, b, c];
        let holders = [exo(), v1, v0, v1];
        let revoke = sim.setup(Action::Revoke {
            kernel: chain[level].kernel().raw(),
            caller: holders[level],
            cap: chain[level],
        });
        assert_eq!(revoke, count(4 - level as u64), "revoking level {level}");
        for (i, &name) in chain.iter().enumerate() {
            assert_eq!(sim.live(name), i < level, "level {level}, capability {i}");
        }
        sim.check_final().unwrap();
    }
}

#[test]
fn the_parent_holder_takes_back_a_remote_child() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let v1 = Sim::vm_on(1, 0);
    let child = sim.setup_name(delegate(0, exo(), root, v1, 1));
    let below = sim.setup_name(Action::Derive { kernel: 1, caller: v1, cap: child, mask: R });
    // Kernel 0 revokes by the child's (remote) name: its holder holds the parent here.
    assert_eq!(sim.setup(Action::Revoke { kernel: 0, caller: exo(), cap: child }), count(2));
    assert!(sim.live(root) && !sim.live(child) && !sim.live(below));
    assert!(sim.kernels[0].table().node(child).is_none(), "the proxy went with the ack");
    sim.check_final().unwrap();
}

#[test]
fn routed_revoke_and_delegate_of_bearer_capabilities() {
    let mut sim = Sim::new(3, 1, 64);
    let root = sim.mint(0, 1);
    let (v0, v1, v2) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0), Sim::vm_on(2, 0));
    let bearer = sim.setup_name(Action::Delegate {
        kernel: 0,
        caller: exo(),
        cap: root,
        target: v0,
        to: 0,
        mask: Rights::ALL,
        binding: Binding::Bearer,
    });
    // VM 1 (kernel 1) delegates the bearer capability of kernel 0 to VM 2 (kernel 2).
    let child = sim.setup_name(delegate(1, v1, bearer, v2, 2));
    assert_eq!(child.kernel(), k(2));
    assert_eq!(sim.node(child).unwrap().parent, Some(bearer));
    // VM 1 also delegates it to a VM of its own kernel: an obtain for that VM.
    let own = sim.setup_name(delegate(1, v1, bearer, v1, 1));
    assert_eq!(sim.node(own).unwrap().cap.unwrap().holder, v1);
    // VM 1 revokes the bearer capability: routed to kernel 0, which reaches kernels 1, 2.
    assert_eq!(sim.setup(Action::Revoke { kernel: 1, caller: v1, cap: bearer }), count(3));
    assert!(!sim.live(child) && !sim.live(own) && sim.live(root));
    sim.check_final().unwrap();
}

#[test]
fn delete_waits_for_the_remote_subtree_then_frees() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let (v0, v1) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0));
    let mine = sim.setup_name(delegate(0, exo(), root, v0, 0));
    let theirs = sim.setup_name(delegate(0, v0, mine, v1, 1));
    let delete = sim.script(Action::Delete { kernel: 0, caller: v0, cap: mine });
    sim.run(&[Choice::Start(delete)]);
    assert_eq!(sim.node(mine).unwrap().state, NodeState::Revoking);
    sim.drain();
    assert_eq!(sim.ended[delete].unwrap().result, count(2));
    assert!(sim.node(mine).is_none(), "freed");
    assert_eq!(sim.node(theirs).unwrap().state, NodeState::Revoked, "kept until its holder deletes it");
    assert_eq!(sim.setup(Action::Delete { kernel: 1, caller: v1, cap: theirs }), count(0));
    assert!(sim.node(theirs).is_none());
    sim.check_final().unwrap();
}

#[test]
fn a_crash_revokes_everywhere_then_frees() {
    let mut sim = Sim::new(3, 1, 64);
    let (v0, v1, v2) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0), Sim::vm_on(2, 0));
    let root0 = sim.mint(0, 1);
    let root1 = sim.mint(1, 2);
    // VM 0 also runs on kernel 1 (it spans both kernels' CPUs).
    let nk_caps::Principal::Vm(vm0) = v0 else { unreachable!() };
    sim.kernels[1].table_mut().add_vm(vm0, 64).unwrap();
    let held0 = sim.setup_name(delegate(0, exo(), root0, v0, 0));
    let held1 = sim.setup_name(delegate(1, exo(), root1, v0, 1));
    let given = sim.setup_name(delegate(0, v0, held0, v2, 2));
    let given1 = sim.setup_name(delegate(1, v0, held1, v1, 1));
    let crash = sim.setup(Action::Crash { kernel: 0, vm: vm0, also_on: vec![1] });
    assert_eq!(crash, count(4));
    assert!(!sim.live(given) && !sim.live(given1) && sim.live(root0) && sim.live(root1));
    assert!(sim.node(held0).is_none() && sim.node(held1).is_none(), "freed");
    for kernel in &sim.kernels[..2] {
        assert!(kernel.table().usage(v0).is_none(), "forgotten");
    }
    // Nothing can be delegated to it any more.
    assert_eq!(sim.setup(delegate(0, exo(), root0, v0, 0)), Err(CapError::UnknownPrincipal.into()));
    sim.check_final().unwrap();
}

#[test]
fn malformed_requests_are_refused_without_messages() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let v0 = Sim::vm_on(0, 0);
    let foreign = CapName::from_words(0xffff_0000_0000_0001, 5); // kernel 0xffff: no such kernel
    let before = sim.delivered;
    let cases = [
        (Action::Derive { kernel: 0, caller: v0, cap: foreign, mask: R }, Err(CapError::UnknownName.into())),
        (Action::Revoke { kernel: 0, caller: v0, cap: foreign }, Err(CapError::UnknownName.into())),
        (Action::Delete { kernel: 0, caller: v0, cap: foreign }, Err(CapError::UnknownName.into())),
        (delegate(0, exo(), foreign, v0, 1), Err(CapError::UnknownName.into())),
        (delegate(0, exo(), root, v0, 7), Err(ProtoError::UnknownKernel)),
        (delegate(0, v0, root, v0, 1), Err(CapError::WrongHolder.into())),
        (Action::Crash { kernel: 0, vm: VmId::new(99), also_on: vec![] }, Err(CapError::UnknownPrincipal.into())),
    ];
    for (action, expected) in cases {
        assert_eq!(sim.setup(action.clone()), expected, "{action:?}");
    }
    assert_eq!(sim.delivered, before, "nothing was sent");
    // Garbage names of an existing kernel travel there and come back refused.
    let garbage = CapName::from_words(1 << 48, 77);
    assert_eq!(
        sim.setup(Action::Derive { kernel: 0, caller: v0, cap: garbage, mask: R }),
        Err(CapError::UnknownName.into())
    );
    assert_eq!(sim.setup(Action::Revoke { kernel: 0, caller: v0, cap: garbage }), Err(CapError::UnknownName.into()));
    sim.check_final().unwrap();
}

#[test]
fn stale_messages_are_ignored() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let v1 = Sim::vm_on(1, 0);
    let child = sim.setup_name(delegate(0, exo(), root, v1, 1));
    let mut out = Vec::new();
    let mut hook = |_: &nk_caps::DeadCap| {};
    let stray = CapName::from_words(1 << 48, 1234);
    for message in [
        Message::Gone { child: stray, killed: 3 },
        Message::GoneBelow { parent: stray, killed: 3 },
        Message::DelegateAck { child: stray, result: Ok(()) },
        Message::ObtainAck { child: stray, result: Err(CapError::Revoked.into()) },
        Message::RoutedDone { op: OpId::new(77), result: Ok(Outcome::Count(1)) },
        Message::CrashDone { op: OpId::new(78), killed: 1 },
    ] {
        sim.kernels[0].handle(k(1), message, &mut hook, &mut out);
    }
    assert!(out.is_empty());
    assert!(sim.kernels[0].is_idle());
    assert!(sim.live(child));
    sim.check_final().unwrap();
}

#[test]
fn messages_survive_the_wire_format() {
    let name = CapName::from_words(0x0003_1234_5678_9abc, 0xdead_beef);
    let grant = RemoteGrant {
        child: name,
        object: Object::new(EXO, FRAME, ObjId::new(42)),
        rights: Rights::from_bits(0b101),
        binding: Binding::Bearer,
    };
    let messages = [
        Message::Delegate { grant, parent: CapName::from_words(1, 2), holder: vm(7), delegator: vm(3) },
        Message::Delegate { grant, parent: name, holder: exo(), delegator: vm(u32::MAX) },
        Message::Delegate { grant, parent: name, holder: vm(u32::MAX), delegator: exo() },
        Message::Delegate { grant, parent: name, holder: vm(0x1234_5678), delegator: vm(0x9abc_def0) },
        Message::DelegateAck { child: name, result: Ok(()) },
        Message::DelegateAck { child: name, result: Err(CapError::QuotaExceeded.into()) },
        Message::Obtain { child: name, parent: name, presenter: exo(), mask: RW, binding: None },
        Message::Obtain { child: name, parent: name, presenter: vm(3), mask: RW, binding: Some(Binding::Bound) },
        Message::ObtainAck { child: name, result: Ok(grant) },
        Message::ObtainAck { child: name, result: Err(ProtoError::UnknownKernel) },
        Message::Revoke { target: name },
        Message::Gone { child: name, killed: 99 },
        Message::RevokeBelow { parent: name },
        Message::GoneBelow { parent: name, killed: 1000 },
        Message::Routed { op: OpId::new(5), presenter: vm(1), request: Routed::Revoke { target: name } },
        Message::Routed {
            op: OpId::new(6),
            presenter: exo(),
            request: Routed::Delegate {
                parent: name,
                target: vm(2),
                kernel: KernelId::new(9),
                mask: R,
                binding: Binding::Bearer,
            },
        },
        Message::RoutedDone { op: OpId::new(7), result: Ok(Outcome::Name(name)) },
        Message::RoutedDone { op: OpId::new(8), result: Ok(Outcome::Count(3)) },
        Message::RoutedDone { op: OpId::new(9), result: Err(CapError::TableFull.into()) },
        Message::Crash { op: OpId::new(10), vm: VmId::new(4) },
        Message::CrashDone { op: OpId::new(11), killed: 12 },
    ];
    for message in messages {
        assert_eq!(Message::decode(&message.encode()), Ok(message));
    }
    assert!(core::mem::size_of::<Message>() <= 128, "a message fits two cache lines");
    // Garbage never panics; a bad tag or field is reported.
    assert_eq!(Message::decode(&[0; MESSAGE_WORDS]), Err(DecodeError::UnknownTag));
    assert_eq!(Message::decode(&[2 | (9 << 8), 0, 0, 0, 0, 0, 0, 0]), Err(DecodeError::BadField));
    let mut rng = Rng(5);
    for _ in 0..10_000 {
        let mut words = [0u64; MESSAGE_WORDS];
        words.iter_mut().for_each(|w| *w = rng.next());
        words[0] = (words[0] & !0xff) | (rng.next() % 14);
        let _ = Message::decode(&words);
    }
}

#[test]
fn a_delegation_across_kernels_is_charged_to_the_delegator_where_it_is_registered() {
    let mut sim = Sim::new(2, 1, 64);
    let root = sim.mint(0, 1);
    let (v0, v1) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0));
    let mine = sim.setup_name(delegate(0, exo(), root, v0, 0));
    // v0 is not known on kernel 1: the holder pays there.
    sim.setup_name(delegate(0, v0, mine, v1, 1));
    let usage = |sim: &Sim, p| sim.kernels[1].table().usage(p);
    assert_eq!(usage(&sim, v1).unwrap().charged, 1);
    // Registered on kernel 1 with a quota of 2, v0 pays for the next two, then is refused
    // with its own quota status; v1's quota is untouched.
    let nk_caps::Principal::Vm(id) = v0 else { unreachable!() };
    sim.kernels[1].table_mut().add_vm(id, 2).unwrap();
    for _ in 0..2 {
        sim.setup_name(delegate(0, v0, mine, v1, 1));
    }
    assert_eq!(usage(&sim, v0).unwrap().charged, 2);
    assert_eq!(usage(&sim, v1).unwrap().charged, 1);
    let refused = sim.setup(delegate(0, v0, mine, v1, 1));
    assert_eq!(refused, Err(ProtoError::Cap(CapError::QuotaExceeded)));
    // The refused child's proxy is gone again on kernel 0.
    sim.check_final().unwrap();
}
