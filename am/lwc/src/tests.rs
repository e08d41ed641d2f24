//! Host tests through the null-Kernel's dispatch: create, switch, per-lwC capability
//! checks, destroy by revocation.

use alloc::boxed::Box;

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status, NULL_KERNEL_AM};
use nk_am_counter::{op as counter_op, CounterAm};
use nk_caps::{FixedSeed, KernelId};
use nk_core::{Dispatched, NullKernel};

use super::*;

const VM: VmId = VmId::new(1);

struct World {
    nk: NullKernel,
    /// What the hypervisor saw (every effect but the null-Kernel's own).
    seen: Vec<Effect>,
}

fn world() -> World {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 4096, &mut FixedSeed::from_u64(9)).unwrap();
    assert_eq!(nk.add_am(Box::new(CounterAm::new()), 1024).unwrap().raw(), 1);
    assert_eq!(nk.add_am(Box::new(LwcAm::new()), 1024).unwrap().raw(), 2);
    nk.set_caller_ring(|| 0);
    assert!(nk.add_vm(VM, 256).unwrap().is_empty());
    World { nk, seen: Vec::new() }
}

impl World {
    fn call(&mut self, who: VmId, am: u16, op: u32, caps: &[NameWords], args: &[u64]) -> Reply {
        let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
        call.caps[..caps.len()].copy_from_slice(caps);
        call.args[..args.len()].copy_from_slice(args);
        let mut out = Vec::new();
        let reply = match self.nk.dispatch(who, &call, &mut out) {
            Dispatched::Reply(reply) => reply,
            Dispatched::Pending(_) => panic!("one kernel: nothing waits"),
        };
        let seen = &mut self.seen;
        self.nk.apply_effects(&mut out, |e| seen.push(e));
        reply
    }

    fn initial(&mut self, who: VmId, index: u64) -> Reply {
        self.call(who, NULL_KERNEL_AM, nk_op::INITIAL, &[NameWords::default()], &[index])
    }
}

#[test]
fn create_switch_restrict_and_destroy() {
    let mut w = world();
    let factory = w.initial(VM, 0).name;
    let me = w.initial(VM, 1).name;
    let counter = w.call(VM, 1, counter_op::CREATE.into(), &[factory], &[]);
    assert!(counter.status().is_ok());
    // The child gets only INITIAL 1 (the creator's lwC, to switch back).
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(created.status().is_ok(), "{}", created.status());
    assert_eq!(created.results[..2], [u64::from(FIRST_CHILD), NONE]);
    let child = VmId::new(FIRST_CHILD);
    assert_eq!(
        w.seen.last(),
        Some(&Effect::LwcCreate {
            parent: VM,
            child,
            mask: 0b10,
            received: 0,
            memory: LwcMemory::default(),
            systrap: None
        })
    );
    // The child's INITIAL list is the one copy; it cannot use the parent's counter or factory.
    let back = w.initial(child, 0);
    assert!(back.status().is_ok());
    assert_eq!(back.results[0], 2);
    assert_eq!(w.initial(child, 1).status().code(), Status::BAD_ARGUMENT);
    let read = w.call(child, 1, counter_op::READ.into(), &[counter.name], &[]);
    assert!(!read.status().is_ok());
    assert!(!w.call(child, 1, counter_op::CREATE.into(), &[factory], &[]).status().is_ok());
    // Switch there and back.
    let there = w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[7, 8]);
    assert!(there.status().is_ok(), "{}", there.status());
    assert_eq!(there.results, [1, 1, 7, 8]);
    assert_eq!(w.seen.last(), Some(&Effect::LwcSwitch { from: VM, to: child }));
    // A switch into the caller itself is refused (which lwC a vCPU runs is the hypervisor's
    // to know: a caller is the lwC its vCPU runs).
    assert_eq!(w.call(VM, 2, op::LW_SWITCH.into(), &[me], &[]).status().code(), Status::NOT_PERMITTED);
    let back_again = w.call(child, 2, op::LW_SWITCH.into(), &[back.name], &[9, 0]);
    assert!(back_again.status().is_ok(), "{}", back_again.status());
    assert_eq!(back_again.results, [NONE, u64::from(FIRST_CHILD), 9, 0]);
    // The child cannot create lwCs from the parent's lwC capability.
    assert_eq!(w.call(child, 2, op::LW_CREATE.into(), &[back.name], &[0, 0]).status().code(), Status::NOT_PERMITTED);
    // Revoke: the lwC dies with its principal; switching there is refused.
    let deleted = w.call(VM, NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
    assert!(deleted.status().is_ok(), "{}", deleted.status());
    assert!(w.seen.contains(&Effect::LwcDestroy { child, resume: Some(VM) }));
    assert!(!w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    assert!(w.nk.table().usage(Principal::Vm(child)).is_none());
    assert!(!w.initial(child, 0).status().is_ok());
    // Unimplemented calls and options are refused.
    assert_eq!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0, 2]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(w.call(VM, 2, op::LW_SYSCALL.into(), &[me], &[]).status().code(), Status::NOT_PERMITTED);
}

#[test]
fn per_vm_bound() {
    let mut w = world();
    let me = w.initial(VM, 1).name;
    for _ in 0..MAX_LWCS_PER_VM {
        assert!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0, 0]).status().is_ok());
    }
    assert_eq!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0, 0]).status().code(), Status::QUOTA_EXCEEDED);
}

#[test]
fn memory_spec_is_checked_and_passed_on() {
    let mut w = World { nk: world().nk, seen: Vec::new() };
    let me = w.initial(VM, 1).name;
    // COW everywhere but page 3, which is shared.
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 1, 3 * 4096, 4096]);
    assert!(created.status().is_ok(), "{}", created.status());
    let memory = LwcMemory { mode: LwcMemory::COW, range_mode: LwcMemory::SHARED, first_page: 3, pages: 1 };
    let child = VmId::new(FIRST_CHILD);
    assert_eq!(
        w.seen.last(),
        Some(&Effect::LwcCreate { parent: VM, child, mask: 0b10, received: 0, memory, systrap: None })
    );
    assert_eq!(memory.mode_of(2), LwcMemory::COW);
    assert_eq!(memory.mode_of(3), LwcMemory::SHARED);
    assert!(!memory.all_shared());
    // Bad modes, unaligned lengths and ranges past the memory change nothing.
    let before = w.seen.len();
    for args in [[0, 0, 3, 0, 0], [0, 0, 1, 4096 | 3, 4096], [0, 0, 1, 4096, 100], [0, 0, 1, MAX_MEMORY, 4096]] {
        assert_eq!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    assert_eq!(w.seen.len(), before);
    // The COW child cannot make views of its own (only the VM's own EPT is copied).
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    let back = w.initial(child, 0).name;
    assert_eq!(
        w.call(child, 2, op::LW_CREATE.into(), &[back], &[0, 0, 1, 0, 0]).status().code(),
        Status::NOT_PERMITTED
    );
}

#[test]
fn only_listed_vms_get_a_root_lwc() {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 4096, &mut FixedSeed::from_u64(9)).unwrap();
    nk.add_am(Box::new(LwcAm::for_vms([(VmId::new(2), 4 << 20)])), 1024).unwrap();
    assert!(nk.add_vm(VmId::new(1), 256).unwrap().is_empty());
    assert!(nk.add_vm(VmId::new(2), 256).unwrap().is_empty());
    assert!(nk.initial_caps(VmId::new(1)).is_empty());
    assert_eq!(nk.initial_caps(VmId::new(2)).len(), 1);
}

#[test]
fn a_running_lwc_destroyed_falls_back_to_its_creator() {
    let mut w = world();
    let me = w.initial(VM, 1).name;
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    let child = VmId::new(FIRST_CHILD);
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    // The root cannot call while the child runs; the revocation comes from elsewhere (here:
    // the same kernel, as the protocol's step would).
    assert!(w.call(VM, NULL_KERNEL_AM, nk_op::REVOKE, &[created.name], &[]).status().is_ok());
    assert!(w.seen.contains(&Effect::LwcDestroy { child, resume: Some(VM) }), "{:?}", w.seen);
    // The root runs again: it may create and switch.
    let again = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(again.status().is_ok(), "{}", again.status());
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[again.name], &[]).status().is_ok());
}

#[test]
fn overlay_within_access_and_restrict() {
    let mut w = world();
    let me = w.initial(VM, 1).name;
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 1, 0, 0]);
    assert!(created.status().is_ok());
    let child = VmId::new(FIRST_CHILD);
    // The root copies a page of the child's view.
    let page = 5 * 4096;
    assert!(w.call(VM, 2, op::LW_OVERLAY.into(), &[created.name], &[page | 1, 4096]).status().is_ok());
    assert_eq!(
        w.seen.last(),
        Some(&Effect::LwcOverlay { from: child, to: VM, first_page: 5, pages: 1, mode: LwcMemory::COW })
    );
    // The VM's own EPT takes copies only; bad ranges are refused.
    for (args, code) in [
        ([page, 4096], Status::NOT_PERMITTED),
        ([page | 2, 4096], Status::NOT_PERMITTED),
        ([page | 3, 4096], Status::BAD_ARGUMENT),
        ([page | 1, 100], Status::BAD_ARGUMENT),
        ([MAX_MEMORY | 1, 4096], Status::BAD_ARGUMENT),
    ] {
        let got = w.call(VM, 2, op::LW_OVERLAY.into(), &[created.name], &[args[0], args[1]]);
        assert_eq!(got.status().code(), code, "{args:?}");
    }
    // Restrict to pages 0-3: page 5 is refused now, page 2 still copies; no access at all refuses everything.
    assert!(w.call(VM, 2, op::LW_RESTRICT.into(), &[created.name], &[0, 4 * 4096]).status().is_ok());
    let before = w.seen.len();
    assert_eq!(
        w.call(VM, 2, op::LW_OVERLAY.into(), &[created.name], &[page | 1, 4096]).status().code(),
        Status::NOT_PERMITTED
    );
    assert_eq!(w.seen.len(), before);
    assert!(w.call(VM, 2, op::LW_OVERLAY.into(), &[created.name], &[(2 * 4096) | 1, 4096]).status().is_ok());
    // A wider restriction cannot widen it again.
    assert!(w.call(VM, 2, op::LW_RESTRICT.into(), &[created.name], &[0, 0]).status().is_ok());
    assert!(w.call(VM, 2, op::LW_RESTRICT.into(), &[created.name], &[0, 64 * 4096]).status().is_ok());
    assert_eq!(
        w.call(VM, 2, op::LW_OVERLAY.into(), &[created.name], &[(2 * 4096) | 1, 4096]).status().code(),
        Status::NOT_PERMITTED
    );
    // The child shares and unmaps a page of the root (the VM's frames) in its view.
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    let root = w.initial(child, 0).name;
    assert!(w.call(child, 2, op::LW_OVERLAY.into(), &[root], &[page, 4096]).status().is_ok());
    assert_eq!(
        w.seen.last(),
        Some(&Effect::LwcOverlay { from: VM, to: child, first_page: 5, pages: 1, mode: LwcMemory::SHARED })
    );
    assert!(w.call(child, 2, op::LW_OVERLAY.into(), &[root], &[page | 2, 4096]).status().is_ok());
}

#[test]
fn systrap_traps_to_the_creator_and_syscall_needs_a_trapped_child() {
    let mut w = world();
    let me = w.initial(VM, 1).name;
    let plain = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0, 0, 0, 0, 0]);
    let sandboxed = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 1, 0, 0, 0]);
    assert!(sandboxed.status().is_ok());
    let child = VmId::new(FIRST_CHILD + 1);
    assert!(matches!(w.seen.last(), Some(Effect::LwcCreate { child: c, systrap: Some(_), .. }) if *c == child));
    // lwSyscall on a plain child, or the root calling lwTrap: refused.
    assert_eq!(w.call(VM, 2, op::LW_SYSCALL.into(), &[plain.name], &[0]).status().code(), Status::NOT_PERMITTED);
    assert_eq!(w.call(VM, 2, op::LW_TRAP.into(), &[me], &[1, 2]).status().code(), Status::NOT_PERMITTED);
    // The sandboxed child runs and traps: the reply (for its creator) says what it tried.
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[sandboxed.name], &[]).status().is_ok());
    let back = w.initial(child, 0).name;
    let trapped = w.call(child, 2, op::LW_TRAP.into(), &[back], &[0x55, 7]);
    assert!(trapped.status().is_ok(), "{}", trapped.status());
    assert_eq!(trapped.results, [nk_abi::lwc_op::TRAPPED, u64::from(child.raw()), 0x55, 7]);
    assert_eq!(w.seen.last(), Some(&Effect::LwcSwitch { from: child, to: VM }));
    // The creator runs again: it may lwSyscall for the child.
    assert!(w.call(VM, 2, op::LW_SYSCALL.into(), &[sandboxed.name], &[1]).status().is_ok());
    assert_eq!(w.seen.last(), Some(&Effect::LwcSyscall { by: VM, target: child, mask: 1 }));
    // The root cannot trap with the sandboxed child's capability (it is not sandboxed).
    assert_eq!(w.call(VM, 2, op::LW_TRAP.into(), &[sandboxed.name], &[0, 0]).status().code(), Status::NOT_PERMITTED);
}

#[test]
fn overlay_imports_capabilities_within_what_restrict_left() {
    let mut w = world();
    let factory = w.initial(VM, 0).name;
    let me = w.initial(VM, 1).name;
    // The child gets only a copy of the root's lwC capability.
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(created.status().is_ok());
    let child = VmId::new(FIRST_CHILD);
    let back = w.initial(child, 0).name;
    assert!(!w.call(child, 1, counter_op::CREATE.into(), &[factory], &[]).status().is_ok());
    // It imports the root's factory (INITIAL 0): a copy of its own, at its INITIAL 1.
    let imported = w.call(child, 2, op::LW_OVERLAY.into(), &[back], &[0, 0, 0b01]);
    assert!(imported.status().is_ok(), "{}", imported.status());
    assert_eq!(w.seen.last(), Some(&Effect::LwcImport { from: VM, to: child, mask: 0b01 }));
    let copy = w.initial(child, 1);
    assert!(copy.status().is_ok(), "{}", copy.status());
    assert_eq!(copy.results[0], 1, "a counter factory");
    assert!(w.call(child, 1, counter_op::CREATE.into(), &[copy.name], &[]).status().is_ok());
    // The root takes importing away (any holder may narrow): refused, nothing emitted.
    assert!(w.call(VM, 2, op::LW_RESTRICT.into(), &[me], &[0, MAX_MEMORY, 0b10]).status().is_ok());
    let before = w.seen.len();
    let code = w.call(child, 2, op::LW_OVERLAY.into(), &[back], &[0, 0, 0b01]).status().code();
    assert_eq!(code, Status::NOT_PERMITTED);
    assert_eq!(w.seen.len(), before);
    // Revoking the root's factory takes the imported copy too.
    assert!(w.call(VM, NULL_KERNEL_AM, nk_op::REVOKE, &[factory], &[]).status().is_ok());
    assert!(!w.call(child, 1, counter_op::CREATE.into(), &[copy.name], &[]).status().is_ok());
}

/// Two vCPUs of one VM (docs/multi-vcpu.md): both start in the root lwC, each creates and
/// switches into a child of its own while the other is elsewhere; a running child cannot
/// be entered from the other vCPU, the root can, and a destroyed child whose creator runs
/// on the other vCPU falls back to the root.
#[test]
fn root_lwc_is_every_vcpus_home() {
    let mut w = world();
    let me = w.initial(VM, 1).name;
    let a = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    let b = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(a.status().is_ok() && b.status().is_ok());
    let (child_a, child_b) = (VmId::new(a.results[0] as u32), VmId::new(b.results[0] as u32));
    // vCPU 0 goes into A; vCPU 1, still in the root, creates and switches too.
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[a.name], &[]).status().is_ok());
    let c = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(c.status().is_ok(), "{}", c.status());
    // Which vCPU runs A is the hypervisor's to know (guest.rs `switch_lwc` refuses vCPU 1
    // a switch into A while vCPU 0 runs it); the AM allows the switch.
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[b.name], &[]).status().is_ok());
    // Both children go home to the root (each vCPU to its own root registers).
    let root_in_a = w.initial(child_a, 0).name;
    let root_in_b = w.initial(child_b, 0).name;
    assert!(w.call(child_a, 2, op::LW_SWITCH.into(), &[root_in_a], &[]).status().is_ok());
    assert!(w.call(child_b, 2, op::LW_SWITCH.into(), &[root_in_b], &[]).status().is_ok());
    assert_eq!(w.seen.last(), Some(&Effect::LwcSwitch { from: child_b, to: VM }));
}

#[test]
fn a_copy_with_the_destroy_right_destroys_the_lwc_when_it_dies() {
    let mut w = world();
    let other = VmId::new(2);
    assert!(w.nk.add_vm(other, 256).unwrap().is_empty());
    let me = w.initial(VM, 1).name;
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    let child = VmId::new(FIRST_CHILD);
    // A copy without the right: its death leaves the lwC alive.
    let switch_only = w.call(VM, NULL_KERNEL_AM, nk_op::DELEGATE, &[created.name], &[rights::SWITCH, 2, 0]);
    assert!(switch_only.status().is_ok(), "{}", switch_only.status());
    assert!(w.call(other, NULL_KERNEL_AM, nk_op::REVOKE, &[switch_only.name], &[]).status().is_ok());
    assert!(w.seen.contains(&Effect::LwcCapGone { lwc: child }), "{:?}", w.seen);
    assert!(!w.seen.iter().any(|e| matches!(e, Effect::LwcDestroy { .. })), "{:?}", w.seen);
    assert!(w.nk.table().usage(Principal::Vm(child)).is_some());
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    // A copy with it, handed to another VM: its revocation there destroys the lwC.
    let lent = w.call(VM, NULL_KERNEL_AM, nk_op::DELEGATE, &[created.name], &[u64::MAX, 2, 0]);
    assert!(lent.status().is_ok(), "{}", lent.status());
    assert!(w.call(other, NULL_KERNEL_AM, nk_op::REVOKE, &[lent.name], &[]).status().is_ok());
    assert!(w.seen.contains(&Effect::LwcDestroy { child, resume: Some(VM) }), "{:?}", w.seen);
    assert!(w.nk.table().usage(Principal::Vm(child)).is_none(), "the principal is gone");
    let refused = w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status();
    assert!(matches!(refused.code(), Status::REVOKED | Status::UNKNOWN_NAME), "{refused}");
    // The creator is unchanged: it creates and switches again.
    let again = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0, 0, 0, 0]);
    assert!(again.status().is_ok(), "{}", again.status());
    assert!(w.call(VM, 2, op::LW_SWITCH.into(), &[again.name], &[]).status().is_ok());
    w.nk.table().check_consistency().unwrap();
}

/// Two kernel instances sharing one lwC AM, with their messages carried in order.
struct Two {
    kernels: [NullKernel; 2],
    wire: alloc::collections::VecDeque<(KernelId, KernelId, nk_core::Message)>,
    /// Effects each kernel handed the hypervisor.
    seen: [Vec<Effect>; 2],
}

struct Wire<'a>(KernelId, &'a mut alloc::collections::VecDeque<(KernelId, KernelId, nk_core::Message)>);

impl nk_core::Outbox for Wire<'_> {
    fn send(&mut self, to: KernelId, message: nk_core::Message) {
        self.1.push_back((self.0, to, message));
    }
}

impl Two {
    fn new() -> Self {
        let am = nk_core::shared_am(Box::new(LwcAm::for_vms([(VM, 4 << 20)])));
        let kernels = [0u16, 1].map(|k| {
            let mut nk = NullKernel::new(KernelId::new(k), 2, 4096, &mut FixedSeed::from_u64(k.into())).unwrap();
            nk.add_shared_am(am.clone(), 1024).unwrap();
            nk.set_caller_ring(|| 0);
            nk
        });
        let mut two = Two { kernels, wire: Default::default(), seen: [Vec::new(), Vec::new()] };
        assert_eq!(two.kernels[0].add_vm(VM, 256).unwrap().len(), 0);
        two.kernels[0].place(VmId::new(2), KernelId::new(1), 256).unwrap();
        assert_eq!(two.kernels[1].add_vm(VmId::new(2), 256).unwrap().len(), 0);
        two.kernels[1].place(VM, KernelId::new(0), 256).unwrap();
        two
    }

    /// Applies kernel `k`'s effects as the hypervisor does: a retirement handed on goes to
    /// the kernel that holds the root (hypervisor/src/mesh.rs, `forward_retire`).
    fn settle_kernel(&mut self, k: usize) {
        let mut forwarded = Vec::new();
        let seen = &mut self.seen[k];
        self.kernels[k].apply_effects(&mut Wire(KernelId::new(k as u16), &mut self.wire), |e| {
            if let Effect::Retire { am, root } = e {
                forwarded.push((am, root));
            }
            seen.push(e);
        });
        for (am, root) in forwarded {
            let to = usize::from(root.kernel().raw());
            self.kernels[to].retire_forwarded(am, root, &mut Wire(KernelId::new(to as u16), &mut self.wire));
            self.settle_kernel(to);
        }
    }

    fn settle(&mut self) {
        while let Some((from, to, message)) = self.wire.pop_front() {
            let k = usize::from(to.raw());
            self.kernels[k].handle(from, message, &mut Wire(to, &mut self.wire));
            self.settle_kernel(k);
        }
    }

    fn call(&mut self, k: usize, who: VmId, am: u16, op: u32, caps: &[NameWords], args: &[u64]) -> Dispatched {
        let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
        call.caps[..caps.len()].copy_from_slice(caps);
        call.args[..args.len()].copy_from_slice(args);
        let dispatched = self.kernels[k].dispatch(who, &call, &mut Wire(KernelId::new(k as u16), &mut self.wire));
        self.settle_kernel(k);
        dispatched
    }
}

#[test]
fn a_copy_revoked_on_another_kernel_destroys_the_lwc_on_its_creators() {
    let mut two = Two::new();
    let other = VmId::new(2);
    let me = nk_core::words_of(two.kernels[0].initial_caps(VM)[0].1);
    let Dispatched::Reply(created) = two.call(0, VM, 1, op::LW_CREATE.into(), &[me], &[1, 0, 0, 0, 0]) else {
        panic!("lwCreate replies at once");
    };
    assert!(created.status().is_ok(), "{}", created.status());
    let child = VmId::new(FIRST_CHILD);
    let Dispatched::Pending(_) = two.call(0, VM, NULL_KERNEL_AM, nk_op::DELEGATE, &[created.name], &[u64::MAX, 2, 0])
    else {
        panic!("a delegation to another kernel waits");
    };
    two.settle();
    assert!(two.kernels[0].poll().is_some(), "the delegation finished");
    let Dispatched::Reply(received) = two.call(1, other, NULL_KERNEL_AM, nk_op::RECEIVED, &[], &[0]) else {
        panic!("received replies at once");
    };
    assert!(received.status().is_ok(), "{}", received.status());
    let lent = received.name;
    let Dispatched::Reply(switched) = two.call(0, VM, 1, op::LW_SWITCH.into(), &[created.name], &[]) else {
        panic!("a switch replies at once");
    };
    assert!(switched.status().is_ok(), "{}", switched.status());
    // The running child lends the other VM its copy of the root's lwC capability: its
    // removal will wait for kernel 1.
    let back = nk_core::words_of(two.kernels[0].initial_caps(child)[0].1);
    let Dispatched::Pending(_) = two.call(0, child, NULL_KERNEL_AM, nk_op::DELEGATE, &[back], &[u64::MAX, 2, 0]) else {
        panic!("a delegation to another kernel waits");
    };
    two.settle();
    assert!(two.kernels[0].poll().is_some(), "the child's delegation finished");
    // The other VM revokes its copy on its own kernel: kernel 1 hears the death, hands the
    // retirement of the lwC's root on kernel 0 on, and kernel 0 destroys the lwC.
    let revoked = two.call(1, other, NULL_KERNEL_AM, nk_op::REVOKE, &[lent], &[]);
    assert!(matches!(revoked, Dispatched::Reply(r) if r.status().is_ok()), "{revoked:?}");
    two.settle();
    assert!(two.seen[0].contains(&Effect::LwcDestroy { child, resume: Some(VM) }), "{:?}", two.seen);
    assert!(two.kernels[0].table().usage(Principal::Vm(child)).is_none(), "the principal is gone");
    let Dispatched::Reply(refused) = two.call(0, VM, 1, op::LW_SWITCH.into(), &[created.name], &[]) else {
        panic!("a switch replies at once");
    };
    assert!(matches!(refused.status().code(), Status::REVOKED | Status::UNKNOWN_NAME), "{}", refused.status());
    for nk in &mut two.kernels {
        assert_eq!(nk.poll(), None, "the lwC's removal and its root's retirement are nobody's reply");
        assert!(nk.protocol().is_idle());
        nk.table().check_consistency().unwrap();
    }
}

/// Guest memory for `LWC_RANGES` lists: VM 1's 4 MiB at host-physical `GUEST_BASE`, of
/// which the first 64 KiB are backed here (a read elsewhere fails, as the hypervisor's
/// would outside memory it maps).
const GUEST_BASE: u64 = 0x100_0000;

struct FakeGuest(std::sync::Mutex<[u8; 65536]>);

impl nk_am::HostMemory for FakeGuest {
    fn read(&self, hpa: u64, buf: &mut [u8]) -> bool {
        let Some(at) = hpa.checked_sub(GUEST_BASE).filter(|&at| at + buf.len() as u64 <= 65536) else {
            return false;
        };
        buf.copy_from_slice(&self.0.lock().unwrap()[at as usize..at as usize + buf.len()]);
        true
    }

    fn write(&self, _hpa: u64, _data: &[u8]) -> bool {
        false
    }
}

static GUEST: FakeGuest = FakeGuest(std::sync::Mutex::new([0; 65536]));

/// Writes `ranges` (address | mode, bytes) as a list at guest-physical `at`.
fn write_list(at: u64, ranges: &[(u64, u64)]) {
    let mut memory = GUEST.0.lock().unwrap();
    for (i, &(range, bytes)) in ranges.iter().enumerate() {
        let p = at as usize + 16 * i;
        memory[p..p + 8].copy_from_slice(&range.to_le_bytes());
        memory[p + 8..p + 16].copy_from_slice(&bytes.to_le_bytes());
    }
}

#[test]
fn several_exception_ranges_are_read_from_guest_memory_and_checked_first() {
    use nk_abi::lwc_op::{LWC_COW, LWC_RANGES, LWC_SHARED, LWC_UNMAP, MAX_RANGES};
    let mut nk = NullKernel::new(KernelId::new(0), 1, 4096, &mut FixedSeed::from_u64(9)).unwrap();
    nk.add_am(Box::new(LwcAm::for_vms([(VM, 4 << 20)])), 1024).unwrap();
    nk.set_caller_ring(|| 0);
    nk.set_guest_memory(|vm| (vm == VM).then_some((GUEST_BASE, 4 << 20)));
    nk.set_host_memory(&GUEST);
    assert!(nk.add_vm(VM, 256).unwrap().is_empty());
    let mut w = World { nk, seen: Vec::new() };
    let me = w.initial(VM, 0).name;
    let create = |w: &mut World, at: u64, count: u64| {
        w.call(VM, 1, op::LW_CREATE.into(), &[me], &[0, LWC_RANGES, LWC_COW, at, count])
    };
    let page = 4096u64;
    // Malformed lists: refused before anything changes (no principal, no effect).
    let list = 0x2000;
    write_list(list, &[(0x10000 | LWC_SHARED, page), (0x20000 | 3, page), (0x30000, 100), (4 << 20, page)]);
    let bad = [
        (list, 0),              // no range
        (list, MAX_RANGES + 1), // too many
        (list + 4, 1),          // an unaligned list
        ((4 << 20) - 8, 1),     // a list past the VM's memory
        (u64::MAX - 8, 1),      // an absurd address
        (list, 2),              // the second range's mode is 3
        (list + 16, 1),         // the same range alone
        (0x20000, 1),           // a list the hypervisor cannot read
    ];
    for (at, count) in bad {
        assert_eq!(create(&mut w, at, count).status().code(), Status::BAD_ARGUMENT, "list at {at:#x}, {count}");
    }
    write_list(list, &[(0x10000, page), (0x30000, 100)]);
    assert_eq!(create(&mut w, list, 2).status().code(), Status::BAD_ARGUMENT, "a length of 100 bytes");
    write_list(list, &[(0x10000, page), ((4 << 20) - page, 2 * page)]);
    assert_eq!(create(&mut w, list, 2).status().code(), Status::BAD_ARGUMENT, "a range past memory");
    assert!(w.seen.is_empty(), "{:?}", w.seen);
    // A good list of three: the first range rides with LwcCreate, the others follow in order.
    write_list(list, &[(0x10000 | LWC_SHARED, 4 * page), (0x12000 | LWC_COW, page), (0x40000 | LWC_UNMAP, 2 * page)]);
    let created = create(&mut w, list, 3);
    assert!(created.status().is_ok(), "{}", created.status());
    let child = VmId::new(FIRST_CHILD);
    assert_eq!(created.results[0], u64::from(child.raw()), "the refused lists created nothing");
    let memory = LwcMemory { mode: LwcMemory::COW, range_mode: LwcMemory::SHARED, first_page: 0x10, pages: 4 };
    assert!(
        matches!(w.seen[0], Effect::LwcCreate { child: c, memory: m, .. } if c == child && m == memory),
        "{:?}",
        w.seen
    );
    assert_eq!(
        w.seen[1..],
        [
            Effect::LwcRange { child, first_page: 0x12, pages: 1, mode: LwcMemory::COW },
            Effect::LwcRange { child, first_page: 0x40, pages: 2, mode: LwcMemory::UNMAP },
        ]
    );
    // Every range shared (a child without a view of its own).
    write_list(list, &[(0x10000, page), (0x20000, page)]);
    let shared = w.call(VM, 1, op::LW_CREATE.into(), &[me], &[0, LWC_RANGES, LWC_SHARED, list, 2]);
    assert!(shared.status().is_ok(), "{}", shared.status());
}

#[test]
fn received_capabilities_are_named_by_the_mask_with_lwc_received() {
    use nk_abi::lwc_op::LWC_RECEIVED;
    let mut w = world();
    let other = VmId::new(2);
    assert!(w.nk.add_vm(other, 256).unwrap().is_empty());
    assert!(core::mem::size_of::<Effect>() <= 40, "an effect stays as small");
    // VM 2 lends VM 1 a counter: VM 1's RECEIVED 0.
    let factory = w.initial(other, 0).name;
    let counter = w.call(other, 1, counter_op::CREATE.into(), &[factory], &[]).name;
    assert!(w.call(other, 1, counter_op::ADD.into(), &[counter], &[7]).status().is_ok());
    assert!(w.call(other, NULL_KERNEL_AM, nk_op::DELEGATE, &[counter], &[u64::MAX, 1, 0]).status().is_ok());
    let me = w.initial(VM, 1).name;
    // Bits 0-31: INITIAL (1: the lwC capability); bits 32-63: RECEIVED (0: the counter,
    // 5: nothing there, skipped as a missing INITIAL index is).
    let mask = 0b10 | 1 << 32 | 1 << 37;
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[mask, LWC_RECEIVED, 0, 0, 0]);
    assert!(created.status().is_ok(), "{}", created.status());
    let child = VmId::new(FIRST_CHILD);
    assert!(matches!(w.seen.last(), Some(Effect::LwcCreate { mask: 0b10, received: 0b10_0001, .. })), "{:?}", w.seen);
    let list: Vec<u16> = w.nk.initial_caps(child).iter().map(|(am, _)| am.raw()).collect();
    assert_eq!(list, [2, 1], "its lwC copy, then the received counter's");
    let copy = w.initial(child, 1).name;
    let read = w.call(child, 1, counter_op::READ.into(), &[copy], &[]);
    assert!(read.status().is_ok() && read.results[0] == 7, "{} {:?}", read.status(), read.results);
    // The same rules: a copy of a copy, so the lender's revocation takes it.
    assert!(w.call(other, NULL_KERNEL_AM, nk_op::REVOKE, &[counter], &[]).status().is_ok());
    assert!(!w.call(child, 1, counter_op::READ.into(), &[copy], &[]).status().is_ok());
    // Without the option, bit 32 is INITIAL 32: nothing.
    let plain = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10 | 1 << 32, 0, 0, 0, 0]);
    assert!(plain.status().is_ok(), "{}", plain.status());
    assert_eq!(w.nk.initial_caps(VmId::new(FIRST_CHILD + 1)).len(), 1);
    // An unknown option bit is still refused.
    assert_eq!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 8, 0, 0, 0]).status().code(), Status::BAD_ARGUMENT);
}
