//! The distributed protocol's primitives on two tables wired by hand (nk-protocol tests
//! them end to end under its simulator): proxies on both sides of a cross-kernel link, the
//! mark-and-wait walk, reservations, and the single-kernel methods on tables with proxies.

use super::*;

/// One kernel's table with the exo AM's frames and a "map" operation.
struct Side {
    table: CapTable,
    frame: ObjKind,
    map: OpId,
}

impl Side {
    fn frame_root(&mut self, id: u64) -> CapName {
        self.table.mint(am(EXO), Object::new(EXO, self.frame, ObjId::new(id)), RWX).unwrap()
    }

    fn give(&mut self, cap: CapName, to: VmId, mask: Rights) -> CapName {
        self.table.grant(am(EXO), cap, vm(to), mask, Binding::Bound).unwrap()
    }
}

/// Two tables, of kernels 1 and 2, with the same AM, and VM1 on kernel 1, VM2 on kernel 2.
fn pair() -> (Side, Side) {
    let build = |kernel: u16, vm: VmId| {
        let mut table = CapTable::new(KernelId::new(kernel), 64, &mut FixedSeed::from_u64(kernel.into())).unwrap();
        table.register_am(EXO, "exo", 64).unwrap();
        let frame = table.register_kind(EXO, KindSpec { name: "frame", rights: &["read", "write", "exec"] }).unwrap();
        let map = table.register_op(EXO, OpSpec { name: "map", args: &[ArgSpec::new(frame, READ)] }).unwrap();
        table.add_vm(vm, 8).unwrap();
        Side { table, frame, map }
    };
    (build(1, VM1), build(2, VM2))
}

/// Delegates `parent` (on `a`) to VM2 on `b`, as the protocol's handshake does.
fn link(a: &mut Side, b: &mut Side, caller: Principal, parent: CapName) -> CapName {
    let grant = a.table.delegate_remote(caller, parent, b.table.kernel(), RWX, Binding::Bound).unwrap();
    b.table.accept_remote(grant, parent, vm(VM2), caller).unwrap();
    grant.child
}

fn state(f: &Side, name: CapName) -> Option<NodeState> {
    f.table.node(name).map(|view| view.state)
}

#[test]
fn a_cross_kernel_link_has_a_proxy_on_each_side() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let child = link(&mut a, &mut b, am(EXO), root);
    assert_eq!(child.kernel(), KernelId::new(2));
    assert_eq!(state(&a, child), Some(NodeState::Remote));
    assert_eq!(a.table.node(child).unwrap().parent, Some(root));
    assert_eq!(state(&b, root), Some(NodeState::Remote), "the parent's proxy on the child's kernel");
    let view = b.table.node(child).unwrap();
    assert_eq!((view.state, view.parent), (NodeState::Live, Some(root)));
    assert_eq!(view.cap.unwrap().holder, vm(VM2));
    assert_eq!(b.table.usage(vm(VM2)).unwrap().held, 1, "charged to its holder");
    // A proxy is never reached by a guest's lookup: its name carries another kernel's id.
    assert_eq!(a.table.inspect(am(EXO), child), Err(CapError::UnknownName));
    assert_eq!(b.table.inspect(vm(VM2), root), Err(CapError::UnknownName));
    assert!(b.table.check(vm(VM2), b.map, &[child]).is_ok());
    a.table.audit();
    b.table.audit();
}

#[test]
fn the_walk_marks_waits_and_finalizes_on_gone() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let local = a.give(root, VM1, READ);
    let child = link(&mut a, &mut b, am(EXO), root);
    let mut hook = Recorder::default();
    let mut links = Vec::new();
    let walk = a.table.revoke_walk(root, &mut hook, &mut links).unwrap();
    assert_eq!(walk, Walk { killed: 2, finished: false });
    assert_eq!(links, vec![LinkEvent::RevokeRemote { child, parent: Some(root) }]);
    assert_eq!(hook.dead.iter().map(|d| d.name).collect::<Vec<_>>(), vec![local, root], "descendants first");
    assert_eq!(state(&a, root), Some(NodeState::Revoking));
    assert_eq!(state(&a, local), Some(NodeState::Revoked), "a local leaf is finalized at once");
    assert_eq!(state(&a, child), Some(NodeState::RemoteRevoking));
    assert_eq!(a.table.inspect(am(EXO), root), Err(CapError::Revoked), "unusable while it waits");
    a.table.audit();

    // Kernel 2 revokes the child (it is finalized at once: nothing of it is remote).
    let mut b_links = Vec::new();
    let incoming = b.table.revoke_incoming(child, &mut ignore, &mut b_links);
    assert_eq!(incoming, IncomingRevoke::Walked(Walk { killed: 1, finished: true }));
    assert_eq!(b_links, vec![LinkEvent::Finalized { name: child, remote_parent: Some(root) }]);
    assert_eq!(state(&b, root), None, "the unused proxy of the parent is freed");
    assert_eq!(b.table.revoke_incoming(child, &mut ignore, &mut b_links), IncomingRevoke::Dead);
    b.table.audit();

    // Its Gone finalizes the root.
    links.clear();
    assert_eq!(a.table.remote_gone(child, &mut links), Some(true));
    assert_eq!(links, vec![LinkEvent::Finalized { name: root, remote_parent: None }]);
    assert_eq!(state(&a, root), Some(NodeState::Revoked));
    assert_eq!(state(&a, child), None);
    assert_eq!(a.table.remote_gone(child, &mut links), None, "a repeated Gone changes nothing");
    a.table.audit();
}

#[test]
fn a_zigzag_walk_reaches_local_grandchildren_through_a_proxy() {
    // Kernel 1: root -> (proxy of c on kernel 2) -> d. Kernel 2: (proxy root) -> c -> (proxy d).
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let c = link(&mut a, &mut b, am(EXO), root);
    let grant = b.table.delegate_remote(vm(VM2), c, KernelId::new(1), RWX, Binding::Bound).unwrap();
    a.table.accept_remote(grant, c, vm(VM1), vm(VM2)).unwrap();
    let d = grant.child;
    assert_eq!(a.table.node(d).unwrap().parent, Some(c), "d hangs below the proxy of c");
    assert_eq!(state(&a, c), Some(NodeState::Remote), "one proxy: child of root, parent of d");
    a.table.audit();
    b.table.audit();

    let mut hook = Recorder::default();
    let mut links = Vec::new();
    let walk = a.table.revoke_walk(root, &mut hook, &mut links).unwrap();
    assert_eq!(walk.killed, 2, "root and d, d first");
    assert_eq!(hook.dead[0].name, d);
    assert_eq!(
        links,
        vec![
            LinkEvent::Finalized { name: d, remote_parent: Some(c) },
            LinkEvent::RevokeRemote { child: c, parent: Some(root) },
        ]
    );
    a.table.audit();
}

#[test]
fn reservations_resolve_as_unknown_until_granted() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let bearer = a.table.delegate(am(EXO), root, vm(VM1), RWX, Binding::Bearer).unwrap();
    let reserved = b.table.reserve_remote(vm(VM2), vm(VM2), bearer).unwrap();
    assert_eq!(state(&b, reserved), Some(NodeState::Pending));
    assert_eq!(b.table.inspect(vm(VM2), reserved), Err(CapError::UnknownName));
    assert_eq!(b.table.usage(vm(VM2)).unwrap().held, 1, "the reservation is charged");
    b.table.audit();
    let grant = a.table.grant_remote(vm(VM2), bearer, reserved, READ, None).unwrap();
    assert_eq!((grant.rights, grant.binding), (READ, Binding::Bearer));
    b.table.activate_pending(reserved, grant.object, grant.rights, grant.binding).unwrap();
    assert_eq!(b.table.inspect(vm(VM2), reserved).unwrap().rights, READ);
    // A second reservation is cancelled; the parent's proxy stays for the first child.
    let second = b.table.reserve_remote(vm(VM2), vm(VM2), bearer).unwrap();
    assert!(b.table.cancel_pending(second));
    assert!(!b.table.cancel_pending(second));
    assert_eq!(state(&b, bearer), Some(NodeState::Remote));
    assert_eq!(b.table.usage(vm(VM2)).unwrap().held, 1);
    // A bound capability is refused to another principal; the revoked one to everyone.
    let bound = a.give(root, VM1, READ);
    let other = CapName::from_words(2 << 48, 99);
    assert_eq!(a.table.grant_remote(vm(VM2), bound, other, READ, None), Err(CapError::WrongHolder));
    a.table.audit();
    b.table.audit();
}

#[test]
fn a_closing_principal_receives_nothing_and_its_walks_are_collected() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let mine = a.give(root, VM1, RWX);
    let child = link(&mut a, &mut b, vm(VM1), mine);
    a.table.close_principal(vm(VM1)).unwrap();
    assert!(!a.table.is_open(vm(VM1)));
    assert_eq!(a.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bound), Err(CapError::UnknownPrincipal));
    let mut in_progress = Vec::new();
    let mut links = Vec::new();
    assert_eq!(a.table.revoke_held(vm(VM1), &mut ignore, &mut links, &mut in_progress), Ok(1));
    assert_eq!(in_progress, vec![mine]);
    assert_eq!(links, vec![LinkEvent::RevokeRemote { child, parent: Some(mine) }]);
    a.table.audit();
}

#[test]
fn the_single_kernel_methods_tear_down_proxies_locally() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let child = link(&mut a, &mut b, am(EXO), root);
    assert_eq!(a.table.revoke(am(EXO), root, &mut ignore), Ok(1));
    assert_eq!(state(&a, child), None, "the proxy is dropped without a message");
    a.table.audit();
    // On the other side, removing the holder frees the child and the parent's proxy.
    assert_eq!(b.table.remove_vm(VM2, &mut ignore), Ok(1));
    assert!(b.table.is_empty());
    b.table.audit();
}

#[test]
fn a_cross_kernel_delegation_is_charged_to_a_delegator_registered_there() {
    let (mut a, mut b) = pair();
    let root = a.frame_root(1);
    let mine = a.give(root, VM1, RWX);
    // VM1 is not registered on kernel 2: the holder pays there.
    let first = link(&mut a, &mut b, vm(VM1), mine);
    assert_eq!(b.table.usage(vm(VM2)).unwrap().charged, 1);
    // Registered there (as the hypervisor registers every VM on every kernel), VM1 pays,
    // up to its quota, and VM2's quota stays free.
    b.table.add_vm(VM1, 2).unwrap();
    for _ in 0..2 {
        link(&mut a, &mut b, vm(VM1), mine);
    }
    assert_eq!(b.table.usage(vm(VM1)).unwrap().charged, 2);
    assert_eq!(b.table.usage(vm(VM2)).unwrap().charged, 1);
    let grant = a.table.delegate_remote(vm(VM1), mine, b.table.kernel(), RWX, Binding::Bound).unwrap();
    assert_eq!(b.table.accept_remote(grant, mine, vm(VM2), vm(VM1)), Err(CapError::QuotaExceeded));
    // VM2 deleting what it got gives VM1 its quota back.
    let given = b.table.nodes().filter(|n| n.state == NodeState::Live && n.name != first).map(|n| n.name).last();
    let given = given.expect("a live child on kernel 2");
    b.table.delete(vm(VM2), given, &mut ignore).unwrap();
    assert_eq!(b.table.usage(vm(VM1)).unwrap().charged, 1);
    b.table.audit();
}
