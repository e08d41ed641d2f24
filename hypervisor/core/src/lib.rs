//! The null-Kernel's hypercall path, without hardware: one [`NullKernel`] per kernel
//! instance holds the capability table and the registered AMs, and [`NullKernel::dispatch`]
//! turns a hypercall's registers ([`nk_abi::Call`]) into a reply.
//!
//! Dispatch follows seL4's decode-then-invoke: the selector, the operation and *every*
//! capability argument are decoded and checked before anything changes; only then does
//! the AM's handler run, and it sees only checked references to its own objects. A call
//! that fails a check returns a status and leaves every capability and AM as it was.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status, ABI_VERSION, MAX_CAP_ARGS, NULL_KERNEL_AM};
use nk_am::{AbstractMachine, AmError, Effect, Effects, Kernel, Registrar};
use nk_caps::{
    AmId, ArgFault, Binding, CapError, CapName, CapTable, CheckError, DeadCap, EntropySource, KernelId, NewTableError,
    Object, OpId, Principal, PrincipalError, RegisterError, Rights, VmId,
};

/// The first id given to a registered AM (0 is the null-Kernel itself).
pub const FIRST_AM_ID: u16 = 1;

/// An AM that could not grant a new VM its initial capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFailure {
    pub am: AmId,
    pub error: AmError,
}

/// One kernel instance's capabilities and AMs.
pub struct NullKernel {
    table: CapTable,
    /// Indexed by `AmId::raw() - FIRST_AM_ID`.
    ams: Vec<Box<dyn AbstractMachine + Send>>,
    /// Each VM's initial capabilities (AM id, name), in AM order.
    initial: BTreeMap<VmId, Vec<(AmId, CapName)>>,
    /// Effects the AMs emitted that the hypervisor has not applied yet.
    effects: Vec<Effect>,
}

impl core::fmt::Debug for NullKernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NullKernel").field("kernel", &self.table.kernel()).field("ams", &self.ams.len()).finish()
    }
}

/// Collects effects into the kernel's pending list.
struct EffectList<'a>(&'a mut Vec<Effect>);

impl Effects for EffectList<'_> {
    fn emit(&mut self, effect: Effect) {
        self.0.push(effect);
    }
}

/// Routes each dead capability to the AM that implements its object.
struct AmHook<'a> {
    ams: &'a mut [Box<dyn AbstractMachine + Send>],
    effects: &'a mut Vec<Effect>,
}

impl nk_caps::RevocationHook for AmHook<'_> {
    fn revoked(&mut self, dead: &DeadCap) {
        let index = usize::from(dead.object.am.raw()).wrapping_sub(usize::from(FIRST_AM_ID));
        if let Some(am) = self.ams.get_mut(index) {
            am.revoked(dead, &mut EffectList(self.effects));
        }
    }
}

/// The null-Kernel services one AM gets while it handles a call.
struct AmServices<'a> {
    am: AmId,
    table: &'a mut CapTable,
    effects: &'a mut Vec<Effect>,
}

impl Effects for AmServices<'_> {
    fn emit(&mut self, effect: Effect) {
        self.effects.push(effect);
    }
}

impl Kernel for AmServices<'_> {
    fn grant_new(
        &mut self,
        object: Object,
        rights: Rights,
        to: Principal,
        binding: Binding,
    ) -> Result<CapName, CapError> {
        let me = Principal::Am(self.am);
        let root = self.table.mint(me, object, rights)?;
        match self.table.delegate(me, root, to, Rights::ALL, binding) {
            Ok(child) => Ok(child),
            Err(error) => {
                // Undo the mint so a failed grant leaves nothing behind; nothing was
                // enabled yet, so no AM needs to hear of it.
                let _ = self.table.delete(me, root, &mut |_: &DeadCap| {});
                Err(error)
            }
        }
    }
}

fn name_of(words: NameWords) -> CapName {
    CapName::from_words(words.high, words.low)
}

fn words_of(name: CapName) -> NameWords {
    let (high, low) = name.words();
    NameWords { low, high }
}

fn arg_status(index: u8, fault: ArgFault) -> Status {
    let code = match fault {
        ArgFault::UnknownName => Status::UNKNOWN_NAME,
        ArgFault::WrongHolder => Status::WRONG_HOLDER,
        ArgFault::Revoked => Status::REVOKED,
        ArgFault::WrongKind => Status::WRONG_KIND,
        ArgFault::MissingRights => Status::MISSING_RIGHTS,
    };
    Status::new(code, Some(index))
}

/// Maps a capability-operation error on argument 0 to a status.
fn cap_status(error: CapError) -> Status {
    let (code, arg) = match error {
        CapError::UnknownName => (Status::UNKNOWN_NAME, Some(0)),
        CapError::WrongHolder => (Status::WRONG_HOLDER, Some(0)),
        CapError::Revoked => (Status::REVOKED, Some(0)),
        CapError::UnknownPrincipal => (Status::BAD_ARGUMENT, None),
        CapError::QuotaExceeded | CapError::TableFull => (Status::QUOTA_EXCEEDED, None),
        CapError::NotImplementer => (Status::NOT_PERMITTED, None),
        CapError::UndefinedRights | CapError::UnknownKind | CapError::UnknownAm => (Status::BAD_ARGUMENT, None),
    };
    Status::new(code, arg)
}

fn am_status(error: AmError) -> Status {
    match error {
        AmError::BadArgument => Status::new(Status::BAD_ARGUMENT, None),
        AmError::NoMemory => Status::new(Status::NO_MEMORY, None),
        AmError::NotPermitted => Status::new(Status::NOT_PERMITTED, None),
        AmError::Capability(e) => cap_status(e),
    }
}

fn failure(status: Status) -> Reply {
    Reply { status: status.0, ..Reply::default() }
}

fn success(name: Option<CapName>, results: [u64; 4]) -> Reply {
    Reply { status: 0, name: name.map(words_of).unwrap_or_default(), results }
}

impl NullKernel {
    /// Creates kernel instance `kernel` with room for `capacity` capabilities.
    pub fn new(kernel: KernelId, capacity: u32, entropy: &mut dyn EntropySource) -> Result<Self, NewTableError> {
        Ok(Self {
            table: CapTable::new(kernel, capacity, entropy)?,
            ams: Vec::new(),
            initial: BTreeMap::new(),
            effects: Vec::new(),
        })
    }

    /// Returns the capability table (for inspection and tests).
    pub fn table(&self) -> &CapTable {
        &self.table
    }

    /// Returns the capability table for setup by the hypervisor (minting boot-time roots).
    pub fn table_mut(&mut self) -> &mut CapTable {
        &mut self.table
    }

    /// Registers an AM with a quota of capabilities it may hold; returns its id.
    pub fn add_am(&mut self, mut am: Box<dyn AbstractMachine + Send>, quota: u32) -> Result<AmId, RegisterError> {
        let raw = u16::try_from(self.ams.len()).ok().and_then(|n| n.checked_add(FIRST_AM_ID));
        let id = AmId::new(raw.ok_or(RegisterError::AmIdTaken)?);
        self.table.register_am(id, am.name(), quota)?;
        am.register(&mut Registrar::new(id, &mut self.table))?;
        self.ams.push(am);
        Ok(id)
    }

    /// Registers a VM with a capability quota, and lets every AM grant it its initial
    /// capabilities. An AM that fails to grant is skipped and listed in the result.
    pub fn add_vm(&mut self, vm: VmId, quota: u32) -> Result<Vec<GrantFailure>, PrincipalError> {
        self.table.add_vm(vm, quota)?;
        let mut granted = Vec::new();
        let mut report = Vec::new();
        for (slot, am) in self.ams.iter_mut().enumerate() {
            let id = AmId::new(FIRST_AM_ID + slot as u16);
            let mut services = AmServices { am: id, table: &mut self.table, effects: &mut self.effects };
            match am.grant_initial(vm, &mut services) {
                Ok(names) => granted.extend(names.into_iter().map(|name| (id, name))),
                Err(error) => report.push(GrantFailure { am: id, error }),
            }
        }
        self.initial.insert(vm, granted);
        Ok(report)
    }

    /// Takes the effects the AMs emitted since the last call, for the hypervisor to apply
    /// (in order) before the operation that caused them returns to its caller.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        core::mem::take(&mut self.effects)
    }

    /// Tells whether effects are waiting to be applied.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// Returns the initial capabilities of `vm` (AM id, name).
    pub fn initial_caps(&self, vm: VmId) -> &[(AmId, CapName)] {
        self.initial.get(&vm).map_or(&[], Vec::as_slice)
    }

    /// Removes a VM (it ended or crashed): every capability it held dies, and derived ones
    /// with them; the AMs undo their effects. Returns how many died.
    pub fn remove_vm(&mut self, vm: VmId) -> Result<usize, PrincipalError> {
        self.initial.remove(&vm);
        self.table.remove_vm(vm, &mut AmHook { ams: &mut self.ams, effects: &mut self.effects })
    }

    /// Handles one hypercall from `caller`.
    pub fn dispatch(&mut self, caller: VmId, call: &Call) -> Reply {
        let selector = Selector::decode(call.selector);
        if selector.version != ABI_VERSION {
            return failure(Status::new(Status::BAD_VERSION, None));
        }
        let caller = Principal::Vm(caller);
        if selector.am == NULL_KERNEL_AM {
            return self.null_kernel_op(caller, selector.op, call);
        }
        let am = AmId::new(selector.am);
        if !self.table.registry().has_am(am) {
            return failure(Status::new(Status::UNKNOWN_AM, None));
        }
        let Ok(index) = u16::try_from(selector.op) else {
            return failure(Status::new(Status::UNKNOWN_OPERATION, None));
        };
        let op = OpId::new(am, index);
        let Some(arg_count) = self.table.registry().op_args(op).map(<[_]>::len) else {
            return failure(Status::new(Status::UNKNOWN_OPERATION, None));
        };
        let mut names = [CapName::from_words(0, 0); MAX_CAP_ARGS];
        for i in 0..arg_count.min(MAX_CAP_ARGS) {
            names[i] = name_of(call.caps[i]);
        }
        let checked = match self.table.check(caller, op, &names[..arg_count]) {
            Ok(checked) => checked,
            Err(CheckError::Arg { index, fault }) => return failure(arg_status(index, fault)),
            Err(CheckError::UnknownOperation) => return failure(Status::new(Status::UNKNOWN_OPERATION, None)),
            Err(CheckError::WrongArgCount { .. }) => return failure(Status::new(Status::BAD_ARGUMENT, None)),
        };
        let slot = usize::from(am.raw() - FIRST_AM_ID);
        let Some(handler) = self.ams.get_mut(slot) else {
            return failure(Status::new(Status::UNKNOWN_AM, None));
        };
        let mut services = AmServices { am, table: &mut self.table, effects: &mut self.effects };
        match handler.invoke(&checked, &call.args, &mut services) {
            Ok(outcome) => success(outcome.name, outcome.results),
            Err(error) => failure(am_status(error)),
        }
    }

    /// The null-Kernel's own operations on capabilities.
    fn null_kernel_op(&mut self, caller: Principal, op: u32, call: &Call) -> Reply {
        let c = name_of(call.caps[0]);
        let result = match op {
            nk_op::NULL => Ok(success(None, [0; 4])),
            nk_op::DERIVE => {
                self.table.derive(caller, c, Rights::from_bits(call.args[0])).map(|n| success(Some(n), [0; 4]))
            }
            nk_op::DELEGATE => {
                let Ok(target) = u32::try_from(call.args[1]) else {
                    return failure(Status::new(Status::BAD_ARGUMENT, None));
                };
                let binding = match call.args[2] {
                    0 => Binding::Bound,
                    1 => Binding::Bearer,
                    _ => return failure(Status::new(Status::BAD_ARGUMENT, None)),
                };
                let to = Principal::Vm(VmId::new(target));
                self.table
                    .delegate(caller, c, to, Rights::from_bits(call.args[0]), binding)
                    .map(|n| success(Some(n), [0; 4]))
            }
            nk_op::REVOKE => {
                let hook = &mut AmHook { ams: &mut self.ams, effects: &mut self.effects };
                self.table.revoke(caller, c, hook).map(|count| success(None, [count as u64, 0, 0, 0]))
            }
            nk_op::DELETE => {
                let hook = &mut AmHook { ams: &mut self.ams, effects: &mut self.effects };
                self.table.delete(caller, c, hook).map(|count| success(None, [count as u64, 0, 0, 0]))
            }
            nk_op::INSPECT => self.table.inspect(caller, c).map(|info| {
                let holder = match info.holder {
                    Principal::Vm(vm) => u64::from(vm.raw()) << 1,
                    Principal::Am(am) => (u64::from(am.raw()) << 1) | (1 << 63),
                };
                let bearer = u64::from(info.binding == Binding::Bearer);
                let object = (u64::from(info.object.am.raw()) << 32) | u64::from(info.object.kind.raw());
                success(None, [object, info.object.id.raw(), info.rights.bits(), holder | bearer])
            }),
            nk_op::INITIAL => {
                let Principal::Vm(vm) = caller else {
                    return failure(Status::new(Status::NOT_PERMITTED, None));
                };
                let index = usize::try_from(call.args[0]).unwrap_or(usize::MAX);
                return match self.initial_caps(vm).get(index) {
                    Some(&(am, name)) => success(Some(name), [u64::from(am.raw()), 0, 0, 0]),
                    None => failure(Status::new(Status::BAD_ARGUMENT, None)),
                };
            }
            _ => return failure(Status::new(Status::UNKNOWN_OPERATION, None)),
        };
        result.unwrap_or_else(|error| failure(cap_status(error)))
    }
}

#[cfg(test)]
mod tests;
