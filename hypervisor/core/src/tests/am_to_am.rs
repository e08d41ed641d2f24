//! AM-to-AM calls (`Kernel::call_am`, seed §5.2.1 hierarchical capabilities): an AM, as a
//! principal of its own, holds capabilities a VM lent it (`take_cap`) and invokes another
//! AM's operations with them through the same check as a hypercall's.

use super::*;
use nk_am::{ArgSpec, KindSpec, OpSpec, Outcome, PLAIN_ARGS};

/// A test AM layered on others: a VM lends it capabilities, and it calls operations with
/// them (or with its own objects) on the VM's behalf.
#[derive(Default)]
struct RelayAm {
    kind: Option<nk_caps::ObjKind>,
    am: Option<AmId>,
    /// Capabilities it holds, by index.
    held: Vec<CapName>,
    /// Calls other AMs made into it.
    pinged: u64,
    /// Its registered name ("relay", or another for a second one).
    label: &'static str,
}

mod relay_op {
    /// `lend(c: relay, name high, name low, which)`: takes a child of the caller's
    /// capability with the right `read` (which 0), `increment` (1), `create` (2) or
    /// `use` (3).
    pub const LEND: u32 = 0;
    /// `call(c: relay, am, op, held index, arg)`: calls `am`'s operation `op` with held
    /// capability `index` and plain argument `arg`; results: the callee's.
    pub const CALL: u32 = 1;
    /// `drop(c: relay, held index)`.
    pub const DROP: u32 = 2;
    /// `ping(c: relay)`: only for AM callers; counts.
    pub const PING: u32 = 3;
    /// `ping-self(c: relay, own name high, own name low)`: calls its own `ping`.
    pub const PING_SELF: u32 = 4;
}

impl AbstractMachine for RelayAm {
    fn name(&self) -> &'static str {
        if self.label.is_empty() {
            "relay"
        } else {
            self.label
        }
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "relay", rights: &["use"] })?;
        self.kind = Some(kind);
        self.am = Some(r.am());
        for name in ["lend", "call", "drop", "ping", "ping-self"] {
            r.operation(OpSpec { name, args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        }
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<nk_am::Outcome, AmError> {
        let Principal::Vm(vm) = checked.caller() else { return Err(AmError::NotPermitted) };
        match u32::from(checked.op().index()) {
            relay_op::LEND => {
                let right = ["read", "increment", "create", "use"].get(args[2] as usize).ok_or(AmError::BadArgument)?;
                let (name, _) = kernel.take_cap(vm, CapName::from_words(args[0], args[1]), &[right])?;
                self.held.push(name);
                Ok(Outcome::value(self.held.len() as u64 - 1))
            }
            relay_op::CALL => {
                let held = *self.held.get(args[2] as usize).ok_or(AmError::BadArgument)?;
                let op = OpId::new(AmId::new(args[0] as u16), args[1] as u16);
                let outcome = kernel.call_am(op, &[held], &[args[3], 0, 0, 0, 0], &mut [])?;
                if let Some(name) = outcome.name {
                    self.held.push(name);
                }
                Ok(outcome)
            }
            relay_op::DROP => {
                let held = *self.held.get(args[0] as usize).ok_or(AmError::BadArgument)?;
                Ok(Outcome::value(u64::from(kernel.drop_cap(held))))
            }
            relay_op::PING_SELF => {
                let op = OpId::new(self.am.ok_or(AmError::NotPermitted)?, relay_op::PING as u16);
                kernel.call_am(op, &[CapName::from_words(args[0], args[1])], &[0; PLAIN_ARGS], &mut [])
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    fn invoke_by_am(
        &mut self,
        checked: &Checked,
        _args: &[u64; PLAIN_ARGS],
        data: &mut [u8],
        _kernel: &mut dyn Kernel,
    ) -> Result<nk_am::Outcome, AmError> {
        if u32::from(checked.op().index()) != relay_op::PING {
            return Err(AmError::NotPermitted);
        }
        self.pinged += 1;
        data.fill(0xA5);
        Ok(Outcome::value(self.pinged))
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let object =
            Object::new(self.am.ok_or(AmError::NotPermitted)?, self.kind.ok_or(AmError::NotPermitted)?, ObjId::new(0));
        Ok(alloc::vec![kernel.grant_new(object, Rights::from_bits(1), Principal::Vm(vm), Binding::Bound)?])
    }

    fn revoked(&mut self, _dead: &DeadCap, _effects: &mut dyn Effects) {}
}

struct Layers {
    world: World,
    relay: u16,
}

/// A counter AM (id 1) under a relay AM (id 2); VM1-3 hold a counter factory and a relay.
fn layers() -> Layers {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 4096, &mut FixedSeed::from_u64(7)).unwrap();
    let counter_am = nk.add_am(Box::new(CounterAm::new()), 1024).unwrap().raw();
    let relay = nk.add_am(Box::new(RelayAm::default()), 1024).unwrap().raw();
    nk.set_caller_ring(|| 0);
    for vm in [VM1, VM2, VM3] {
        assert!(nk.add_vm(vm, 256).unwrap().is_empty());
    }
    Layers { world: World { nk, counter_am }, relay }
}

impl Layers {
    fn relay_cap(&mut self, vm: VmId) -> NameWords {
        let reply = self.world.nk_op(vm, nk_op::INITIAL, NameWords::default(), &[1]);
        assert!(reply.status().is_ok());
        assert_eq!(reply.results[0], u64::from(self.relay));
        reply.name
    }

    fn relay(&mut self, vm: VmId, op: u32, args: &[u64]) -> Reply {
        let cap = self.relay_cap(vm);
        self.world.call(vm, self.relay, op, &[cap], args)
    }

    fn lend(&mut self, vm: VmId, cap: NameWords, which: u64) -> Result<u64, Status> {
        let reply = self.relay(vm, relay_op::LEND, &[cap.high, cap.low, which]);
        if reply.status().is_ok() {
            Ok(reply.results[0])
        } else {
            Err(reply.status())
        }
    }

    fn relay_call(&mut self, vm: VmId, am: u16, op: u32, index: u64, arg: u64) -> Reply {
        self.relay(vm, relay_op::CALL, &[u64::from(am), u64::from(op), index, arg])
    }

    fn usage(&self, principal: Principal) -> u32 {
        self.world.nk.table().usage(principal).unwrap().charged
    }
}

#[test]
fn an_am_invokes_a_lower_am_with_a_lent_capability() {
    let mut l = layers();
    let counter = l.world.create_counter(VM1);
    let am = l.world.counter_am;
    let index = l.lend(VM1, counter, 1).unwrap();
    let reply = l.relay_call(VM1, am, op::ADD.into(), index, 5);
    assert!(reply.status().is_ok(), "{}", reply.status());
    assert_eq!(reply.results[0], 5);
    assert_eq!(l.world.read(VM1, counter), Ok((5, 0)));
    // The lent child has only `increment`: the counter AM's `read` needs `read`, and the
    // null-Kernel's check refuses it for the AM as it would for a VM.
    let reply = l.relay_call(VM1, am, op::READ.into(), index, 0);
    assert_eq!(reply.status().code(), Status::NOT_PERMITTED);
}

#[test]
fn a_call_through_a_revoked_capability_is_refused() {
    let mut l = layers();
    let counter = l.world.create_counter(VM1);
    let am = l.world.counter_am;
    // VM1 lends a copy (derived with every right), so it can take it back alone.
    let copy = l.world.nk_op(VM1, nk_op::DERIVE, counter, &[3]);
    assert!(copy.status().is_ok());
    let index = l.lend(VM1, copy.name, 1).unwrap();
    assert!(l.relay_call(VM1, am, op::ADD.into(), index, 1).status().is_ok());
    // The lender takes back what it lent: revoking the copy kills the child it lent.
    assert!(l.world.nk_op(VM1, nk_op::REVOKE, copy.name, &[]).status().is_ok());
    let reply = l.relay_call(VM1, am, op::ADD.into(), index, 1);
    assert_eq!(reply.status().code(), Status::REVOKED);
    // The lender's own capability is unharmed, the counter unchanged, and the counter AM
    // heard of both deaths (the copy and the child the relay held).
    assert_eq!(l.world.read(VM1, counter), Ok((1, 2)));
    // A VM cannot lend what it does not hold.
    let other = l.world.create_counter(VM2);
    assert_eq!(l.lend(VM1, other, 0).unwrap_err().code(), Status::WRONG_HOLDER);
    // Nor a right it lacks.
    let derived = l.world.nk_op(VM1, nk_op::DERIVE, counter, &[1]);
    assert!(derived.status().is_ok());
    assert_eq!(l.lend(VM1, derived.name, 1).unwrap_err().code(), Status::NOT_PERMITTED);
}

#[test]
fn quotas_charge_the_lender_and_the_am_for_what_each_causes() {
    let mut l = layers();
    let relay = Principal::Am(AmId::new(l.relay));
    let factory = l.world.factory(VM1);
    let (vm_before, am_before) = (l.usage(Principal::Vm(VM1)), l.usage(relay));
    // The lent child is charged to the lender, not to the AM that holds it.
    let index = l.lend(VM1, factory, 2).unwrap();
    assert_eq!(l.usage(Principal::Vm(VM1)), vm_before + 1);
    assert_eq!(l.usage(relay), am_before);
    // A counter the relay creates for itself (the counter AM grants it to its caller) is
    // charged to the relay AM, which asked for it.
    let reply = l.relay_call(VM1, l.world.counter_am, op::CREATE.into(), index, 0);
    assert!(reply.status().is_ok(), "{}", reply.status());
    assert_eq!(l.usage(Principal::Vm(VM1)), vm_before + 1);
    assert_eq!(l.usage(relay), am_before + 1);
    // Dropping the lent capability gives the lender's charge back.
    assert_eq!(l.relay(VM1, relay_op::DROP, &[index]).results[0], 1);
    assert_eq!(l.usage(Principal::Vm(VM1)), vm_before);
    // A dropped (or never held) capability cannot be dropped twice.
    assert_eq!(l.relay(VM1, relay_op::DROP, &[index]).results[0], 0);
}

#[test]
fn calls_go_down_only_so_an_am_never_waits_for_itself() {
    let mut l = layers();
    let own = l.relay_cap(VM1);
    // The relay AM's own operation: its lock is held by the call, so a re-entrant call
    // would spin forever; it is refused instead (the test would hang otherwise).
    let reply = l.relay(VM1, relay_op::PING_SELF, &[own.high, own.low]);
    assert_eq!(reply.status().code(), Status::NOT_PERMITTED);
    // Lending the relay capability to the relay and calling relay's ping: the same.
    let index = l.lend(VM1, own, 0);
    assert!(index.is_err(), "an AM takes only capabilities of lower AMs");
    // Unknown AM ids or ones above are refused too.
    let counter = l.world.create_counter(VM1);
    let index = l.lend(VM1, counter, 0).unwrap();
    for am in [0, l.relay, l.relay + 1, u16::MAX] {
        let reply = l.relay_call(VM1, am, 0, index, 0);
        assert_eq!(reply.status().code(), Status::NOT_PERMITTED, "AM {am}");
    }
    // The lower AM still works for everyone afterwards (no lock left taken).
    assert_eq!(l.world.read(VM1, counter), Ok((0, 0)));
    assert!(l.relay_call(VM1, l.world.counter_am, op::READ.into(), index, 0).status().is_ok());
}

#[test]
fn an_upper_am_calls_a_lower_one_of_the_same_kind() {
    // Two relays: relay 3 calls relay 2's `ping` with a capability VM 4 lent it.
    let mut l = layers();
    let upper = l.world.nk.add_am(Box::new(RelayAm { label: "upper", ..RelayAm::default() }), 1024).unwrap().raw();
    let vm = VmId::new(4);
    assert!(l.world.nk.add_vm(vm, 256).unwrap().is_empty());
    let lower_cap = l.relay_cap(vm);
    let reply = l.world.nk_op(vm, nk_op::INITIAL, NameWords::default(), &[2]);
    assert_eq!(reply.results[0], u64::from(upper));
    let upper_cap = reply.name;
    let reply = l.world.call(vm, upper, relay_op::LEND, &[upper_cap], &[lower_cap.high, lower_cap.low, 3]);
    assert!(reply.status().is_ok(), "{}", reply.status());
    let index = reply.results[0];
    for expected in 1..=2 {
        let args = [u64::from(l.relay), u64::from(relay_op::PING), index, 0];
        let reply = l.world.call(vm, upper, relay_op::CALL, &[upper_cap], &args);
        assert!(reply.status().is_ok(), "{}", reply.status());
        assert_eq!(reply.results[0], expected);
    }
    // A VM cannot reach `ping` itself (it is for AMs): the lower relay refuses.
    assert_eq!(l.relay(vm, relay_op::PING, &[]).status().code(), Status::NOT_PERMITTED);
    // The lower relay cannot call the upper one, though it would pass the check.
    let reply = l.relay(vm, relay_op::LEND, &[upper_cap.high, upper_cap.low, 3]);
    assert_eq!(reply.status().code(), Status::NOT_PERMITTED);
}
