//! The counter AM: objects are 64-bit counters with the rights `read` and `increment`.
//! It is the smallest AM that proves the hypercall path end to end: create hands the
//! caller a capability, read and add need the right rights, sum4 takes four capability
//! arguments, and revocation is visible (each counter counts the capabilities to it that
//! died, as a real AM would undo a mapping).
//!
//! Every operation is guarded: creating a counter needs a capability to the AM's factory
//! (each VM is granted one when it is created). The AM holds at most [`MAX_COUNTERS`]
//! counters and gives one principal at most [`MAX_COUNTERS_PER_VM`] of them (`create`
//! then fails with `NO_MEMORY`), so one VM cannot take them all; the capability `create`
//! hands out is charged to the caller's quota.
//!
//! Operations (ABI numbers): 0 `create(f: factory/create)` -> name; 1 `read(c: read)` ->
//! value, deaths; 2 `add(c: increment, amount)` -> new value; 3 `sum4(a, b, c, d: read)`
//! -> sum.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_am::{
    AbstractMachine, AmError, AmId, ArgSpec, Binding, CapName, Checked, DeadCap, Effects, Kernel, KindSpec, ObjId,
    ObjKind, Object, OpId, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights, VmId, PLAIN_ARGS,
};

/// The most counters one counter AM holds.
pub const MAX_COUNTERS: usize = 1024;
/// The most counters one principal may create (a quarter of the AM's).
pub const MAX_COUNTERS_PER_VM: usize = MAX_COUNTERS / 4;

/// ABI operation numbers, as the shared ABI crate defines them (`nk_abi::counter_op`).
pub mod op {
    pub const CREATE: u16 = nk_abi::counter_op::CREATE as u16;
    pub const READ: u16 = nk_abi::counter_op::READ as u16;
    pub const ADD: u16 = nk_abi::counter_op::ADD as u16;
    pub const SUM4: u16 = nk_abi::counter_op::SUM4 as u16;
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    value: u64,
    deaths: u64,
}

/// The counter AM.
#[derive(Debug, Default)]
pub struct CounterAm {
    am: Option<AmId>,
    kind: Option<ObjKind>,
    factory: Option<(ObjKind, Rights)>,
    all_rights: Rights,
    ops: Vec<OpId>,
    counters: Vec<Counter>,
    /// How many counters each principal created.
    created: BTreeMap<Principal, usize>,
}

impl CounterAm {
    /// Creates the AM with no counters.
    pub fn new() -> Self {
        Self::default()
    }

    fn counter(&mut self, object: Object) -> Result<&mut Counter, AmError> {
        self.counters.get_mut(object.id.raw() as usize).ok_or(AmError::BadArgument)
    }
}

impl AbstractMachine for CounterAm {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let factory = r.kind(KindSpec { name: "factory", rights: &["create"] })?;
        let create = r.rights(factory, &["create"]).ok_or(RegisterError::UnknownKind)?;
        self.factory = Some((factory, create));
        let kind = r.kind(KindSpec { name: "counter", rights: &["read", "increment"] })?;
        let read = r.rights(kind, &["read"]).ok_or(RegisterError::UnknownKind)?;
        let increment = r.rights(kind, &["increment"]).ok_or(RegisterError::UnknownKind)?;
        self.kind = Some(kind);
        self.am = Some(r.am());
        self.all_rights = Rights::from_bits(read.bits() | increment.bits());
        let read_arg = ArgSpec::new(kind, read);
        self.ops = alloc::vec![
            r.operation(OpSpec { name: "create", args: &[ArgSpec::new(factory, create)] })?,
            r.operation(OpSpec { name: "read", args: &[read_arg] })?,
            r.operation(OpSpec { name: "add", args: &[ArgSpec::new(kind, increment)] })?,
            r.operation(OpSpec { name: "sum4", args: &[read_arg; 4] })?,
        ];
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        match checked.op().index() {
            op::CREATE => {
                let kind = self.kind.ok_or(AmError::NotPermitted)?;
                let creator = checked.caller();
                let created = self.created.get(&creator).copied().unwrap_or(0);
                if self.counters.len() >= MAX_COUNTERS || created >= MAX_COUNTERS_PER_VM {
                    return Err(AmError::NoMemory);
                }
                let object = Object::new(checked.am(), kind, ObjId::new(self.counters.len() as u64));
                let name = kernel.grant_new(object, self.all_rights, creator, Binding::Bound)?;
                self.counters.push(Counter::default());
                self.created.insert(creator, created + 1);
                Ok(Outcome { name: Some(name), results: [object.id.raw(), 0, 0, 0] })
            }
            op::READ => {
                let counter = *self.counter(checked.args()[0].object())?;
                Ok(Outcome { name: None, results: [counter.value, counter.deaths, 0, 0] })
            }
            op::ADD => {
                let counter = self.counter(checked.args()[0].object())?;
                let value = counter.value.checked_add(args[0]).ok_or(AmError::BadArgument)?;
                counter.value = value;
                Ok(Outcome::value(value))
            }
            op::SUM4 => {
                let mut sum = 0u64;
                for arg in checked.args() {
                    sum = sum.wrapping_add(self.counter(arg.object())?.value);
                }
                Ok(Outcome::value(sum))
            }
            _ => Err(AmError::NotPermitted),
        }
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let (kind, create) = self.factory.ok_or(AmError::NotPermitted)?;
        // One factory object per VM, numbered by the VM id.
        let object = Object::new(self.am.ok_or(AmError::NotPermitted)?, kind, ObjId::new(u64::from(vm.raw())));
        Ok(alloc::vec![kernel.grant_new(object, create, Principal::Vm(vm), Binding::Bound)?])
    }

    fn revoked(&mut self, dead: &DeadCap, _effects: &mut dyn Effects) {
        if Some(dead.object.kind) != self.kind {
            return;
        }
        if let Ok(counter) = self.counter(dead.object) {
            counter.deaths += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operation names this AM registers have exactly the numbers the shared ABI crate
    /// gives guests (`nk_abi::counter_op`), and there are no others.
    #[test]
    fn registered_op_numbers_are_the_shared_abis() {
        use nk_am::AbstractMachine as _;
        let mut table =
            nk_caps::CapTable::new(nk_caps::KernelId::new(0), 64, &mut nk_caps::FixedSeed::from_u64(1)).unwrap();
        let id = nk_caps::AmId::new(1);
        let mut am = CounterAm::new();
        table.register_am(id, am.name(), 16).unwrap();
        am.register(&mut nk_am::Registrar::new(id, &mut table)).unwrap();
        let ops = [
            ("create", nk_abi::counter_op::CREATE),
            ("read", nk_abi::counter_op::READ),
            ("add", nk_abi::counter_op::ADD),
            ("sum4", nk_abi::counter_op::SUM4),
        ];
        for (name, number) in ops {
            let found = table.registry().find_op(id, name).map(|op| u32::from(op.index()));
            assert_eq!(found, Some(number), "operation {name}");
        }
        let past = u16::try_from(ops.len()).unwrap();
        assert_eq!(table.registry().op_name(nk_caps::OpId::new(id, past)), None, "an operation nk-abi lacks");
    }
}
