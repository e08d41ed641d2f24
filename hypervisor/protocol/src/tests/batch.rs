//! Batched revocation: one `RevokeBelow` per parent and kernel, one `GoneBelow` back, the
//! receiver revoking its whole share in one pass; revocation stays transitive and exact
//! when single revokes of children and local revocations overlap a batch.

use std::collections::BTreeSet;

use nk_caps::{Binding, CapName, NodeState, Principal, Rights, VmId};
use proptest::prelude::*;

use super::sim::*;
use crate::{Message, Outcome, ProtoError};

fn delegate(kernel: u16, caller: Principal, cap: CapName, target: Principal, to: u16) -> Action {
    Action::Delegate { kernel, caller, cap, target, to, mask: Rights::ALL, binding: Binding::Bound }
}

fn count(n: u64) -> Result<Outcome, ProtoError> {
    Ok(Outcome::Count(n))
}

/// Counts the batched and single revokes and acknowledgements in a trace.
fn kinds(sim: &Sim, from_step: usize) -> (usize, usize, usize, usize) {
    let mut counts = (0, 0, 0, 0);
    // Deliveries only (each message is also traced when sent).
    for line in sim.trace[from_step..].iter().filter(|line| !line.contains(" sends to ")) {
        if line.contains("RevokeBelow") {
            counts.0 += 1;
        } else if line.contains("GoneBelow") {
            counts.1 += 1;
        } else if line.contains(": Revoke {") {
            counts.2 += 1;
        } else if line.contains(": Gone {") {
            counts.3 += 1;
        }
    }
    counts
}

/// A root on kernel 0 with 40 children on each of kernels 1, 2, 3 (the shape of
/// `revoke_1000_4k`): its revoke takes one message to each kernel and one back, whatever
/// the number of children.
#[test]
fn a_wide_tree_is_revoked_with_one_message_per_kernel_each_way() {
    let mut sim = Sim::new(4, 1, 256);
    let root = sim.mint(0, 1);
    let mut children = Vec::new();
    for kernel in 1..4 {
        for _ in 0..40 {
            children.push(sim.setup_name(delegate(0, exo(), root, Sim::vm_on(kernel, 0), kernel)));
        }
    }
    let (before, trace_at) = (sim.delivered, sim.trace.len());
    let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
    sim.run(&[Choice::Start(revoke)]);
    sim.drain();
    assert_eq!(sim.ended[revoke].unwrap().result, count(121));
    assert_eq!(sim.delivered - before, 6, "3 RevokeBelow out, 3 GoneBelow back");
    assert_eq!(kinds(&sim, trace_at), (3, 3, 0, 0));
    for name in children {
        assert_eq!(sim.node(name).unwrap().state, NodeState::Revoked);
    }
    sim.check_final().unwrap();
    for kernel in &sim.kernels {
        assert!(kernel.table().nodes().all(|view| view.cap.is_some()), "no proxy is left");
    }
}

/// A batch member with a remote subtree of its own: the batch waits for it, and the
/// grandchildren's batch is counted in the root's result.
#[test]
fn a_batch_waits_for_its_members_remote_subtrees() {
    let mut sim = Sim::new(3, 1, 64);
    let root = sim.mint(0, 1);
    let (v1, v2) = (Sim::vm_on(1, 0), Sim::vm_on(2, 0));
    let a = sim.setup_name(delegate(0, exo(), root, v1, 1));
    sim.setup_name(delegate(0, exo(), root, v1, 1));
    for _ in 0..5 {
        sim.setup_name(delegate(1, v1, a, v2, 2));
    }
    let trace_at = sim.trace.len();
    let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
    sim.run(&[Choice::Start(revoke), Choice::Deliver(0, 1)]);
    assert!(sim.ended[revoke].is_none());
    assert_eq!(sim.node(a).unwrap().state, NodeState::Revoking, "a waits for kernel 2");
    assert!(sim.kernels[1].below.contains_key(&root), "kernel 1 holds the batch open");
    sim.drain();
    assert_eq!(sim.ended[revoke].unwrap().result, count(8));
    assert_eq!(kinds(&sim, trace_at), (2, 2, 0, 0));
    sim.check_final().unwrap();
}

/// Every interleaving of a batch with a single revoke of one of its children by the
/// parent's holder (sent first, so that child reports with a `Gone` of its own) and a
/// local revoke of that child on its kernel: each death is counted once, all complete.
#[test]
fn all_interleavings_of_a_batch_with_single_and_local_revokes() {
    let build = || {
        let mut sim = Sim::new(3, 1, 64);
        let (v1, v2) = (Sim::vm_on(1, 0), Sim::vm_on(2, 0));
        let root = sim.mint(0, 1);
        let a = sim.setup_name(delegate(0, exo(), root, v1, 1));
        sim.setup_name(delegate(0, exo(), root, v1, 1));
        sim.setup_name(delegate(0, exo(), root, v2, 2));
        sim.setup_name(delegate(1, v1, a, v2, 2));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: a });
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
        sim.script(Action::Revoke { kernel: 1, caller: v1, cap: a });
        sim
    };
    let mut ends = BTreeSet::new();
    let runs = explore_all(
        build,
        |sim| {
            let results: Vec<_> = (0..3).map(|n| sim.ended[sim.nth(n)].unwrap().result).collect();
            let total: u64 = results.iter().filter_map(|r| r.ok().and_then(Outcome::count)).sum();
            assert_eq!(total, 5, "root, a, a's child, two more children: each counted once ({results:?})");
            ends.insert(format!("{results:?}"));
        },
        200_000,
    );
    assert!(runs > 100, "{runs} interleavings");
    assert!(ends.len() > 1, "the outcomes differ by interleaving: {ends:?}");
}

/// A VM's removal batches too: what it held with children on another kernel is revoked
/// there with one message per capability and kernel.
#[test]
fn a_crash_batches_per_held_capability_and_kernel() {
    let mut sim = Sim::new(2, 1, 128);
    let root = sim.mint(0, 1);
    let v0 = Sim::vm_on(0, 0);
    let v1 = Sim::vm_on(1, 0);
    let held = sim.setup_name(delegate(0, exo(), root, v0, 0));
    for _ in 0..30 {
        sim.setup_name(delegate(0, v0, held, v1, 1));
    }
    let trace_at = sim.trace.len();
    let crash = sim.script(Action::Crash { kernel: 0, vm: VmId::new(1), also_on: vec![] });
    sim.run(&[Choice::Start(crash)]);
    sim.drain();
    assert_eq!(sim.ended[crash].unwrap().result, count(31));
    assert_eq!(kinds(&sim, trace_at), (1, 1, 0, 0));
    sim.check_final().unwrap();
}

/// The messages of a wire trip: a `GoneBelow` for a parent never revoked, or from a kernel
/// that was not sent the batch, changes nothing; a `RevokeBelow` naming another kernel's
/// capability is refused.
#[test]
fn stray_batch_messages_change_nothing() {
    let mut sim = Sim::new(3, 1, 64);
    let root = sim.mint(0, 1);
    let child = sim.setup_name(delegate(0, exo(), root, Sim::vm_on(1, 0), 1));
    let mut out = Vec::new();
    let mut hook = |_: &nk_caps::DeadCap| {};
    sim.kernels[0].handle(k(1), Message::GoneBelow { parent: root, killed: 7 }, &mut hook, &mut out);
    sim.kernels[0].handle(k(2), Message::GoneBelow { parent: root, killed: 7 }, &mut hook, &mut out);
    // Kernel 2 may not revoke what hangs below kernel 0's root.
    sim.kernels[1].handle(k(2), Message::RevokeBelow { parent: root }, &mut hook, &mut out);
    assert!(out.is_empty());
    assert!(sim.live(child) && sim.live(root));
    assert_eq!(sim.kernels[0].table().node(child).unwrap().state, NodeState::Remote);
    sim.check_final().unwrap();
}

/// Builds a random tree: each new capability is delegated from a random live one to a VM
/// on a random kernel. Returns the root and the number of capabilities.
fn random_tree(sim: &mut Sim, kernels: u16, edges: &[(usize, u16)]) -> (CapName, u64) {
    let root = sim.mint(0, 1);
    let mut nodes: Vec<(CapName, u16, Principal)> = vec![(root, 0, exo())];
    for &(parent, to) in edges {
        let (cap, kernel, holder) = nodes[parent % nodes.len()];
        let to = to % kernels;
        let target = Sim::vm_on(to, 0);
        let child = sim.setup_name(delegate(kernel, holder, cap, target, to));
        nodes.push((child, to, target));
    }
    (root, nodes.len() as u64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Over random trees on 2-5 kernels and random schedules, revoking the root kills every
    /// capability exactly once, leaves no proxy, and sends one `RevokeBelow` and one
    /// `GoneBelow` per parent and child kernel (a message per capability only for the
    /// grandchildren of a zigzag, which the walk reaches through their parent's proxy).
    #[test]
    fn batched_revocation_of_random_trees(
        kernels in 2u16..6,
        edges in proptest::collection::vec((0usize..64, 0u16..8), 1..48),
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(kernels, 1, 256);
        let (root, size) = random_tree(&mut sim, kernels, &edges);
        // The parent and kernel pairs of the edges that cross kernels.
        let mut pairs = BTreeSet::new();
        for kernel in &sim.kernels {
            for view in kernel.table().nodes() {
                if let (Some(parent), true) = (view.parent, view.cap.is_some()) {
                    if parent.kernel() != view.name.kernel() {
                        pairs.insert((parent, view.name.kernel()));
                    }
                }
            }
        }
        let trace_at = sim.trace.len();
        let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
        let sim = run_random(sim, seed);
        prop_assert_eq!(sim.ended[revoke].unwrap().result, count(size));
        let (revokes_below, gones_below, revokes, gones) = kinds(&sim, trace_at);
        // A walk that descends through the proxy of a zigzag (a child whose grandparent
        // lives on its kernel) kills the grandchild first and reports it alone.
        let zigzags = sim
            .ghost
            .iter()
            .filter(|(name, parent)| {
                parent.and_then(|p| sim.ghost.get(&p).copied().flatten()).is_some_and(|g| {
                    g.kernel() == name.kernel() && parent.is_some_and(|p| p.kernel() != name.kernel())
                })
            })
            .count();
        prop_assert_eq!(revokes, 0);
        prop_assert!(gones <= zigzags, "{} single Gones, {} zigzags", gones, zigzags);
        // At most one per pair (a zigzag's grandchild may be gone before its turn).
        prop_assert!(revokes_below <= pairs.len());
        prop_assert!(revokes_below >= 1 || pairs.is_empty());
        prop_assert_eq!(gones_below, revokes_below);
        for kernel in &sim.kernels {
            prop_assert!(kernel.is_idle());
            prop_assert!(kernel.table().nodes().all(|view| view.cap.is_some()), "no proxy is left");
        }
    }
}
