//! One test per cell of SemperOS's interference table (slides, "Distributed Capabilities –
//! Interferences"; the crate docs give each cell's outcome). Each test explores every
//! interleaving of its two operations' steps and messages, checking the invariants after
//! every step and the cell's outcome at the end, and forces the interesting interleavings
//! one by one to show each outcome occurs. The numbers of interleavings are printed.

use nk_caps::{Binding, CapError, CapName, NodeState, Principal, Rights, VmId};

use super::sim::*;
use crate::{Outcome, ProtoError};

const REVOKED: Result<Outcome, ProtoError> = Err(ProtoError::Cap(CapError::Revoked));

fn delegate(kernel: u16, caller: Principal, cap: CapName, target: Principal, to: u16) -> Action {
    Action::Delegate { kernel, caller, cap, target, to, mask: Rights::ALL, binding: Binding::Bound }
}

fn vm_id(principal: Principal) -> VmId {
    match principal {
        Principal::Vm(vm) => vm,
        Principal::Am(_) => unreachable!("a VM"),
    }
}

/// Explores every interleaving (every order of every step) and prints how many there were,
/// and how many remain up to the commutation of steps on different kernels.
fn explore(cell: &str, build: impl Fn() -> Sim, mut verify: impl FnMut(&Sim)) -> usize {
    let runs = explore_every_order(&build, &mut verify, 200_000);
    let classes = explore_all(&build, &mut verify, 200_000);
    println!(
        "interference {cell}: {runs} interleavings ({classes} up to commutation), invariants checked after every step"
    );
    runs
}

/// The result of the `n`-th scripted (not setup) action.
fn result(sim: &Sim, n: usize) -> Result<Outcome, ProtoError> {
    sim.ended[sim.nth(n)].expect("ended").result
}

/// The step at which the `n`-th scripted action ended.
fn ended_at(sim: &Sim, n: usize) -> usize {
    sim.ended[sim.nth(n)].expect("ended").step
}

/// Starts the `n`-th scripted action.
fn start(sim: &Sim, n: usize) -> Choice {
    Choice::Start(sim.nth(n))
}

/// A starting state: on kernel 0 a root (exo AM) and `shared`, a bearer child of it held by
/// VM 1 of kernel 0; returns (sim, root, shared).
fn bearer_setup(kernels: u16) -> (Sim, CapName, CapName) {
    let mut sim = Sim::new(kernels, 1, 32);
    let root = sim.mint(0, 1);
    let shared = sim.setup_name(Action::Delegate {
        kernel: 0,
        caller: exo(),
        cap: root,
        target: Sim::vm_on(0, 0),
        to: 0,
        mask: Rights::ALL,
        binding: Binding::Bearer,
    });
    (sim, root, shared)
}

// -------------------------------------------------------------------------------------
// The "fine" cells: obtain and delegate together.
// -------------------------------------------------------------------------------------

#[test]
fn obtain_obtain() {
    let runs = explore(
        "obtain/obtain",
        || {
            let (mut sim, _, shared) = bearer_setup(3);
            sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: Rights::ALL });
            sim.script(Action::Derive { kernel: 2, caller: Sim::vm_on(2, 0), cap: shared, mask: Rights::ALL });
            sim
        },
        |sim| {
            let (a, b) = (result(sim, 0).unwrap().name().unwrap(), result(sim, 1).unwrap().name().unwrap());
            assert!(a != b && sim.live(a) && sim.live(b));
        },
    );
    assert!(runs > 1);
}

#[test]
fn obtain_delegate() {
    explore(
        "obtain/delegate",
        || {
            let (mut sim, _, shared) = bearer_setup(3);
            sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: R });
            sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(2, 0), 2));
            sim
        },
        |sim| {
            assert!(sim.live(result(sim, 0).unwrap().name().unwrap()));
            assert!(sim.live(result(sim, 1).unwrap().name().unwrap()));
        },
    );
}

#[test]
fn delegate_obtain() {
    // The delegation and the obtain land on the same kernel, for the same VM.
    explore(
        "delegate/obtain",
        || {
            let (mut sim, _, shared) = bearer_setup(2);
            sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
            sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: R });
            sim
        },
        |sim| {
            assert!(sim.live(result(sim, 0).unwrap().name().unwrap()));
            assert!(sim.live(result(sim, 1).unwrap().name().unwrap()));
        },
    );
}

#[test]
fn delegate_delegate() {
    explore(
        "delegate/delegate",
        || {
            let (mut sim, _, shared) = bearer_setup(3);
            sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
            sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(2, 0), 2));
            sim
        },
        |sim| {
            assert!(sim.live(result(sim, 0).unwrap().name().unwrap()));
            assert!(sim.live(result(sim, 1).unwrap().name().unwrap()));
        },
    );
}

// -------------------------------------------------------------------------------------
// Obtain or delegate racing a revoke or a crash ("!" and "⚡").
// -------------------------------------------------------------------------------------

/// Kernel 1 obtains `shared` (kernel 0) while kernel 0's exo AM revokes it.
fn obtain_revoke_scenario() -> Sim {
    let (mut sim, _, shared) = bearer_setup(2);
    sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: R });
    sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
    sim
}

#[test]
fn obtain_vs_revoke() {
    let (mut granted, mut refused) = (0, 0);
    explore("obtain/revoke", obtain_revoke_scenario, |sim| {
        let (obtain, revoke) = (result(sim, 0), result(sim, 1));
        match obtain {
            Ok(Outcome::Name(child)) => {
                // Granted before the revoke reached the parent: revoked with it.
                granted += 1;
                assert!(!sim.live(child));
                assert_eq!(revoke, Ok(Outcome::Count(2)));
                assert!(ended_at(sim, 1) >= ended_at(sim, 0), "the revoke ends last");
            }
            other => {
                refused += 1;
                assert_eq!(other, REVOKED);
                assert_eq!(revoke, Ok(Outcome::Count(1)));
            }
        }
    });
    assert!(granted > 0 && refused > 0, "both outcomes occur ({granted} granted, {refused} refused)");

    // Forced: the revoke first; the obtain reaches a revoked parent.
    let mut sim = obtain_revoke_scenario();
    sim.run(&[start(&sim, 1), start(&sim, 0), Choice::Deliver(1, 0), Choice::Deliver(0, 1)]);
    assert_eq!((result(&sim, 0), result(&sim, 1)), (REVOKED, Ok(Outcome::Count(1))));
    assert!(sim.kernels[1].table().nodes().all(|v| v.state != NodeState::Pending), "the reservation is freed");
    sim.check_final().unwrap();

    // Forced: the grant first; the revoke follows it on the same channel and waits for it.
    let mut sim = obtain_revoke_scenario();
    sim.run(&[start(&sim, 0), Choice::Deliver(1, 0), start(&sim, 1)]);
    assert!(sim.ended[sim.nth(1)].is_none(), "the revoke waits for the obtained child");
    sim.run(&[Choice::Deliver(0, 1)]);
    let child = result(&sim, 0).unwrap().name().unwrap();
    assert!(sim.live(child), "granted");
    sim.run(&[Choice::Deliver(0, 1)]);
    assert_eq!(sim.node(child).unwrap().state, NodeState::Revoked, "then revoked by the message behind the grant");
    sim.drain();
    assert_eq!(result(&sim, 1), Ok(Outcome::Count(2)));
    sim.check_final().unwrap();
}

#[test]
fn obtain_vs_crash() {
    // The obtaining VM crashes while its obtain is under way.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(2);
        sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: R });
        sim.script(Action::Crash { kernel: 1, vm: vm_id(Sim::vm_on(1, 0)), also_on: vec![] });
        sim
    };
    explore("obtain/crash of the obtainer", build, |sim| {
        match result(sim, 0) {
            Ok(Outcome::Name(child)) => assert!(sim.node(child).is_none(), "freed with the crashed VM"),
            other => assert!(
                other == REVOKED || other == Err(CapError::UnknownPrincipal.into()),
                "a cancelled obtain: {other:?}"
            ),
        }
        assert!(result(sim, 1).is_ok());
    });
    // Forced: the crash cancels the reservation; the grant comes back and is answered Gone.
    let mut sim = build();
    sim.run(&[start(&sim, 0), start(&sim, 1), Choice::Deliver(1, 0)]);
    assert_eq!(result(&sim, 1), Ok(Outcome::Count(0)));
    assert_eq!(sim.kernels[0].table().nodes().filter(|v| v.cap.is_none()).count(), 1, "a proxy of the obtained child");
    sim.run(&[Choice::Deliver(0, 1)]);
    assert_eq!(result(&sim, 0), REVOKED);
    sim.drain();
    assert!(sim.kernels[0].table().nodes().all(|v| v.cap.is_some()), "the Gone removed the proxy");
    sim.check_final().unwrap();

    // The holder of the parent crashes instead: the same as a revoke of its capabilities.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(2);
        sim.script(Action::Derive { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared, mask: R });
        sim.script(Action::Crash { kernel: 0, vm: vm_id(Sim::vm_on(0, 0)), also_on: vec![] });
        sim
    };
    explore("obtain/crash of the parent's holder", build, |sim| match result(sim, 0) {
        Ok(Outcome::Name(child)) => assert!(!sim.live(child)),
        // Revoked while the crash runs; unknown once it freed the parent.
        other => assert!(other == REVOKED || other == Err(CapError::UnknownName.into()), "{other:?}"),
    });
}

/// Kernel 0 delegates `shared` to VM 1 of kernel 1 while the exo AM revokes it.
fn delegate_revoke_scenario() -> Sim {
    let (mut sim, _, shared) = bearer_setup(2);
    sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
    sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
    sim
}

#[test]
fn delegate_vs_revoke() {
    let (mut handed, mut overtaken, mut refused) = (0, 0, 0);
    explore("delegate/revoke", delegate_revoke_scenario, |sim| {
        let (delegation, revoke) = (result(sim, 0), result(sim, 1));
        match delegation {
            Ok(Outcome::Name(child)) => {
                handed += 1;
                assert!(!sim.live(child));
                assert_eq!(revoke, Ok(Outcome::Count(2)));
            }
            _ if revoke == Ok(Outcome::Count(2)) => {
                // The revoke overtook the handshake: the child was created and revoked,
                // and its name never handed out.
                overtaken += 1;
                assert_eq!(delegation, REVOKED);
            }
            _ => {
                refused += 1;
                assert_eq!((delegation, revoke), (REVOKED, Ok(Outcome::Count(1))));
            }
        }
    });
    assert!(handed > 0 && overtaken > 0 && refused > 0, "{handed} handed, {overtaken} overtaken, {refused} refused");

    // Forced: the revoke overtakes the handshake. Revoke follows Delegate on the FIFO
    // channel 0 -> 1: the child is created, then revoked; the ack says it was created, but
    // its proxy is being revoked, so the delegation fails and the name stays unknown.
    let mut sim = delegate_revoke_scenario();
    sim.run(&[start(&sim, 0), start(&sim, 1)]);
    assert_eq!(sim.channels[&(0, 1)].len(), 2, "Delegate, then Revoke, on one FIFO channel");
    sim.run(&[Choice::Deliver(0, 1)]);
    let child = sim.kernels[1].table().nodes().find(|v| v.state == NodeState::Live).unwrap().name;
    sim.run(&[Choice::Deliver(0, 1)]);
    assert_eq!(sim.node(child).unwrap().state, NodeState::Revoked);
    sim.drain();
    assert_eq!((result(&sim, 0), result(&sim, 1)), (REVOKED, Ok(Outcome::Count(2))));
    sim.check_final().unwrap();
}

#[test]
fn delegate_vs_crash() {
    // The target VM crashes while the delegation is under way.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(2);
        sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
        sim.script(Action::Crash { kernel: 1, vm: vm_id(Sim::vm_on(1, 0)), also_on: vec![] });
        sim
    };
    let (mut created, mut refused) = (0, 0);
    explore("delegate/crash of the target", build, |sim| match result(sim, 0) {
        Ok(Outcome::Name(child)) => {
            created += 1;
            assert!(sim.node(child).is_none(), "freed with the crashed VM");
        }
        other => {
            refused += 1;
            assert_eq!(other, Err(CapError::UnknownPrincipal.into()));
        }
    });
    assert!(created > 0 && refused > 0);

    // The delegator's capability dies with its crashing holder.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(2);
        sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
        sim.script(Action::Crash { kernel: 0, vm: vm_id(Sim::vm_on(0, 0)), also_on: vec![] });
        sim
    };
    explore("delegate/crash of the delegator", build, |sim| match result(sim, 0) {
        Ok(Outcome::Name(child)) => assert!(!sim.live(child)),
        other => assert!(
            other == REVOKED
                || other == Err(CapError::WrongHolder.into())
                || other == Err(CapError::UnknownName.into())
        ),
    });
}

// -------------------------------------------------------------------------------------
// A revoke first, then an obtain or delegate ("!").
// -------------------------------------------------------------------------------------

/// `shared` has a child on kernel 1, so its revoke waits; returns (sim, shared).
fn revoking_setup() -> (Sim, CapName) {
    let (mut sim, _, shared) = bearer_setup(3);
    sim.setup_name(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
    (sim, shared)
}

#[test]
fn revoke_then_obtain() {
    let (mut sim, shared) = revoking_setup();
    let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
    let obtain = sim.script(Action::Derive { kernel: 2, caller: Sim::vm_on(2, 0), cap: shared, mask: R });
    sim.run(&[Choice::Start(revoke)]);
    assert_eq!(sim.node(shared).unwrap().state, NodeState::Revoking);
    sim.run(&[Choice::Start(obtain), Choice::Deliver(2, 0), Choice::Deliver(0, 2)]);
    assert_eq!(result(&sim, 1), REVOKED, "an obtain of a revoking capability fails");
    sim.drain();
    assert_eq!(result(&sim, 0), Ok(Outcome::Count(2)));
    sim.check_final().unwrap();
    explore(
        "revoke/obtain",
        || {
            let (mut sim, shared) = revoking_setup();
            sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
            sim.script(Action::Derive { kernel: 2, caller: Sim::vm_on(2, 0), cap: shared, mask: R });
            sim
        },
        |sim| {
            if let Ok(Outcome::Name(child)) = result(sim, 1) {
                assert!(!sim.live(child));
            }
        },
    );
}

#[test]
fn revoke_then_delegate() {
    let (mut sim, shared) = revoking_setup();
    let child = sim.kernels[1].table().nodes().find(|v| v.state == NodeState::Live).unwrap().name;
    let revoke = sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
    let direct = sim.script(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(2, 0), 2));
    // A delegation from the remote child, which the revoke has not reached yet.
    let below = sim.script(delegate(1, Sim::vm_on(1, 0), child, Sim::vm_on(2, 0), 2));
    sim.run(&[Choice::Start(revoke), Choice::Start(direct)]);
    assert_eq!(result(&sim, 1), REVOKED, "a delegation of a revoking capability fails at once");
    sim.run(&[Choice::Start(below)]);
    sim.drain();
    // Revoke follows the Delegate on channel 1 -> 2: created, then revoked, never handed out.
    assert_eq!(result(&sim, 2), REVOKED);
    assert_eq!(result(&sim, 0), Ok(Outcome::Count(3)));
    sim.check_final().unwrap();
    explore(
        "revoke/delegate",
        || {
            let (mut sim, shared) = revoking_setup();
            let child = sim.kernels[1].table().nodes().find(|v| v.state == NodeState::Live).unwrap().name;
            sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
            sim.script(delegate(1, Sim::vm_on(1, 0), child, Sim::vm_on(2, 0), 2));
            sim
        },
        |sim| {
            if let Ok(Outcome::Name(grandchild)) = result(sim, 1) {
                assert!(!sim.live(grandchild));
                assert_eq!(result(sim, 0), Ok(Outcome::Count(3)));
            }
        },
    );
}

// -------------------------------------------------------------------------------------
// Revoke racing revoke, revoke racing crash ("⚡").
// -------------------------------------------------------------------------------------

#[test]
fn revoke_revoke_same() {
    // The exo AM (holding the parent) and VM 1 of kernel 1 (presenting the bearer name,
    // routed to kernel 0) revoke the same capability, which has a child on kernel 2.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(3);
        sim.setup_name(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(2, 0), 2));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
        sim.script(Action::Revoke { kernel: 1, caller: Sim::vm_on(1, 0), cap: shared });
        sim
    };
    explore("revoke/revoke of the same capability", build, |sim| {
        let mut results = [result(sim, 0), result(sim, 1)];
        results.sort_by_key(|r| r.is_err());
        assert_eq!(results, [Ok(Outcome::Count(2)), REVOKED], "one revokes, the other reports it revoked");
    });
    // Forced: the second arrives while the first waits; it ends only with the first.
    let mut sim = build();
    sim.run(&[start(&sim, 0), start(&sim, 1), Choice::Deliver(1, 0)]);
    assert!(sim.ended[sim.nth(1)].is_none(), "the second revoke waits for the first");
    sim.drain();
    assert_eq!(ended_at(&sim, 0), ended_at(&sim, 1) - 1, "then ends right after it");
    sim.check_final().unwrap();
}

#[test]
fn revoke_revoke_nested() {
    // Kernel 0 revokes the root while kernel 1's VM revokes its child of it, which has a
    // child on kernel 2.
    let build = || {
        let (mut sim, root, _) = bearer_setup(3);
        let (v1, v2) = (Sim::vm_on(1, 0), Sim::vm_on(2, 0));
        let mid = sim.setup_name(delegate(0, exo(), root, v1, 1));
        sim.setup_name(delegate(1, v1, mid, v2, 2));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: root });
        sim.script(Action::Revoke { kernel: 1, caller: v1, cap: mid });
        sim
    };
    explore("revoke/revoke of ancestor and descendant", build, |sim| {
        let (outer, inner) = (result(sim, 0), result(sim, 1));
        let counted = outer.unwrap().count().unwrap() + inner.map_or(0, |o| o.count().unwrap());
        assert_eq!(counted, 4, "root, bearer child, mid, its child: each counted once");
    });
}

#[test]
fn revoke_revoke_zigzag() {
    // X (kernel 0) -> R (kernel 1) -> E (kernel 0) -> F (kernel 1): kernel 0 revokes X while
    // kernel 1 revokes R. Each waits only for what lies below it, so neither waits for the
    // other in a cycle.
    let build = || {
        let mut sim = Sim::new(2, 1, 32);
        let x = sim.mint(0, 1);
        let (v0, v1) = (Sim::vm_on(0, 0), Sim::vm_on(1, 0));
        let r = sim.setup_name(delegate(0, exo(), x, v1, 1));
        let e = sim.setup_name(delegate(1, v1, r, v0, 0));
        sim.setup_name(delegate(0, v0, e, v1, 1));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: x });
        sim.script(Action::Revoke { kernel: 1, caller: v1, cap: r });
        sim
    };
    explore("revoke/revoke of a zigzag tree", build, |sim| {
        let x = result(sim, 0).unwrap().count().unwrap();
        let r = result(sim, 1).map_or(0, |o| o.count().unwrap());
        assert_eq!(x + r, 4);
    });
}

#[test]
fn revoke_vs_crash() {
    // Kernel 0 revokes `shared` while VM 1 of kernel 1, holding a child of it (with a
    // grandchild on kernel 2), crashes.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(3);
        let (v1, v2) = (Sim::vm_on(1, 0), Sim::vm_on(2, 0));
        let mid = sim.setup_name(delegate(0, Sim::vm_on(0, 0), shared, v1, 1));
        sim.setup_name(delegate(1, v1, mid, v2, 2));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
        sim.script(Action::Crash { kernel: 1, vm: vm_id(v1), also_on: vec![] });
        sim
    };
    explore("revoke/crash", build, |sim| {
        let revoke = result(sim, 0).unwrap().count().unwrap();
        let crash = result(sim, 1).unwrap().count().unwrap();
        assert_eq!(revoke + crash, 3, "each death counted once");
        assert!(sim.kernels[1].table().usage(Sim::vm_on(1, 0)).is_none());
    });
    // The revoking capability's own holder crashes mid-revoke.
    let build = || {
        let (mut sim, _, shared) = bearer_setup(3);
        sim.setup_name(delegate(0, Sim::vm_on(0, 0), shared, Sim::vm_on(1, 0), 1));
        sim.script(Action::Revoke { kernel: 0, caller: exo(), cap: shared });
        sim.script(Action::Crash { kernel: 0, vm: vm_id(Sim::vm_on(0, 0)), also_on: vec![] });
        sim
    };
    explore("revoke/crash of the revoked capability's holder", build, |sim| {
        let revoke = result(sim, 0).map_or(0, |o| o.count().unwrap());
        let crash = result(sim, 1).unwrap().count().unwrap();
        assert_eq!(revoke + crash, 2);
    });
    // Two kernels crash the same VM at once (it runs on both).
    let build = || {
        let (mut sim, root, _) = bearer_setup(2);
        let v0 = Sim::vm_on(0, 0);
        sim.kernels[1].table_mut().add_vm(vm_id(v0), 32).unwrap();
        sim.setup_name(delegate(0, exo(), root, v0, 1));
        sim.script(Action::Crash { kernel: 0, vm: vm_id(v0), also_on: vec![1] });
        sim.script(Action::Crash { kernel: 1, vm: vm_id(v0), also_on: vec![0] });
        sim
    };
    explore("crash/crash of one VM from two kernels", build, |sim| {
        assert!(result(sim, 0).is_ok() && result(sim, 1).is_ok());
    });
}
