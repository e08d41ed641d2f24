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
    let created = w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0b10, 0]);
    assert!(created.status().is_ok(), "{}", created.status());
    assert_eq!(created.results[..2], [u64::from(FIRST_CHILD), NONE]);
    let child = VmId::new(FIRST_CHILD);
    assert_eq!(w.seen.last(), Some(&Effect::LwcCreate { parent: VM, child, mask: 0b10 }));
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
    // The parent is not running now: it cannot switch again; the child's switch into itself is refused.
    assert_eq!(w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().code(), Status::NOT_PERMITTED);
    let back_again = w.call(child, 2, op::LW_SWITCH.into(), &[back.name], &[9, 0]);
    assert!(back_again.status().is_ok(), "{}", back_again.status());
    assert_eq!(back_again.results, [NONE, u64::from(FIRST_CHILD), 9, 0]);
    // The child cannot create lwCs from the parent's lwC capability.
    assert_eq!(w.call(child, 2, op::LW_CREATE.into(), &[back.name], &[0, 0]).status().code(), Status::NOT_PERMITTED);
    // Revoke: the lwC dies with its principal; switching there is refused.
    let deleted = w.call(VM, NULL_KERNEL_AM, nk_op::DELETE, &[created.name], &[]);
    assert!(deleted.status().is_ok(), "{}", deleted.status());
    assert!(w.seen.contains(&Effect::LwcDestroy { child }));
    assert!(!w.call(VM, 2, op::LW_SWITCH.into(), &[created.name], &[]).status().is_ok());
    assert!(w.nk.table().usage(Principal::Vm(child)).is_none());
    assert!(!w.initial(child, 0).status().is_ok());
    // Unimplemented calls and options are refused.
    assert_eq!(w.call(VM, 2, op::LW_CREATE.into(), &[me], &[0, 1]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(w.call(VM, 2, op::LW_RESTRICT.into(), &[me], &[]).status().code(), Status::NOT_PERMITTED);
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
