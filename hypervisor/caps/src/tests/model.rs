//! Model-based test: random sequences of operations run on the real table and on a small
//! reference model (a `Vec` of capabilities with parent indices, recursion allowed, every
//! count recomputed by scanning), and their results and full observable states compared
//! after every step.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::table::Peek;

const GHOST_AM: AmId = AmId::new(9);

/// The principals the script draws from: registered ones, an unregistered AM, and VMs 4
/// and 5, which start unregistered and may be added.
const PRINCIPALS: [Principal; 8] = [
    Principal::Am(EXO),
    Principal::Am(NVRAM),
    Principal::Am(GHOST_AM),
    Principal::Vm(VM1),
    Principal::Vm(VM2),
    Principal::Vm(VM3),
    Principal::Vm(VmId::new(4)),
    Principal::Vm(VmId::new(5)),
];

/// The operations the script invokes: the fixture's four (the one-argument ones twice, as
/// they pass more often), and two that do not exist.
const OPS: [OpId; 8] = [
    OpId::new(EXO, 0),
    OpId::new(EXO, 0),
    OpId::new(EXO, 1),
    OpId::new(EXO, 2),
    OpId::new(NVRAM, 0),
    OpId::new(NVRAM, 0),
    OpId::new(EXO, 7),
    OpId::new(GHOST_AM, 0),
];

// ---------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MState {
    Live,
    Revoked,
    Deleted,
}

#[derive(Clone, Copy, Debug)]
struct MCap {
    name: CapName,
    parent: Option<usize>,
    object: Object,
    rights: Rights,
    holder: Principal,
    /// Whose quota it is charged to (the delegator for a delegation); None once that
    /// principal is removed.
    payer: Option<Principal>,
    binding: Binding,
    state: MState,
}

struct Model {
    caps: Vec<MCap>,
    quotas: BTreeMap<Principal, u32>,
    capacity: u32,
}

/// Every right a kind names, or `None` for a kind that is not registered.
fn defined_rights(am: AmId, kind: ObjKind) -> Option<Rights> {
    match (am, kind.raw()) {
        (EXO, 0) => Some(RWX),
        (EXO, 1) => Some(IN | OUT),
        (NVRAM, 0) => Some(RWX),
        _ => None,
    }
}

/// The arguments each operation takes, or `None` for one that is not registered.
fn op_args(op: OpId) -> Option<Vec<(ObjKind, Rights)>> {
    let (frame, port, region) = (ObjKind::new(0), ObjKind::new(1), ObjKind::new(0));
    match (op.am(), op.index()) {
        (EXO, 0) => Some(vec![(frame, READ)]),
        (EXO, 1) => Some(vec![(frame, READ), (frame, WRITE)]),
        (EXO, 2) => Some(vec![(frame, READ), (frame, WRITE), (port, IN), (port, OUT)]),
        (NVRAM, 0) => Some(vec![(region, WRITE | COMMIT)]),
        _ => None,
    }
}

impl Model {
    fn new(capacity: u32, quota: u32) -> Self {
        let quotas = [Principal::Am(EXO), Principal::Am(NVRAM), vm(VM1), vm(VM2), vm(VM3)]
            .into_iter()
            .map(|p| (p, quota))
            .collect();
        Self { caps: Vec::new(), quotas, capacity }
    }

    fn find(&self, name: CapName) -> Option<usize> {
        self.caps.iter().position(|c| c.name == name && c.state != MState::Deleted)
    }

    fn held(&self, p: Principal) -> u32 {
        self.caps.iter().filter(|c| c.holder == p && c.state != MState::Deleted).count() as u32
    }

    fn charged(&self, p: Principal) -> u32 {
        self.caps.iter().filter(|c| c.payer == Some(p) && c.state != MState::Deleted).count() as u32
    }

    fn in_use(&self) -> u32 {
        self.caps.iter().filter(|c| c.state != MState::Deleted).count() as u32
    }

    fn resolve(&self, caller: Principal, name: CapName) -> Result<usize, CapError> {
        let i = self.find(name).ok_or(CapError::UnknownName)?;
        let cap = &self.caps[i];
        if cap.binding == Binding::Bound && cap.holder != caller {
            return Err(CapError::WrongHolder);
        }
        if cap.state == MState::Revoked {
            return Err(CapError::Revoked);
        }
        Ok(i)
    }

    /// Says whether a capability may be created for `holder`, paid by `payer`.
    fn may_create(&self, holder: Principal, payer: Principal) -> Result<(), CapError> {
        self.quotas.get(&holder).ok_or(CapError::UnknownPrincipal)?;
        let quota = *self.quotas.get(&payer).ok_or(CapError::UnknownPrincipal)?;
        if self.charged(payer) >= quota {
            return Err(CapError::QuotaExceeded);
        }
        if self.in_use() >= self.capacity {
            return Err(CapError::TableFull);
        }
        Ok(())
    }

    fn mint(&self, caller: Principal, object: Object, rights: Rights) -> Result<MCap, CapError> {
        if caller != Principal::Am(object.am) {
            return Err(CapError::NotImplementer);
        }
        if object.am != EXO && object.am != NVRAM {
            return Err(CapError::UnknownAm);
        }
        let defined = defined_rights(object.am, object.kind).ok_or(CapError::UnknownKind)?;
        if !defined.contains(rights) {
            return Err(CapError::UndefinedRights);
        }
        self.may_create(caller, caller)?;
        Ok(MCap {
            name: CapName::from_u128(0),
            parent: None,
            object,
            rights,
            holder: caller,
            payer: Some(caller),
            binding: Binding::Bound,
            state: MState::Live,
        })
    }

    fn child(
        &self,
        caller: Principal,
        name: CapName,
        holder: Option<Principal>,
        mask: Rights,
        binding: Option<Binding>,
    ) -> Result<MCap, CapError> {
        let parent = self.resolve(caller, name)?;
        let holder = holder.unwrap_or(caller);
        // The caller pays, for a derive and a delegation alike.
        self.may_create(holder, caller)?;
        let p = &self.caps[parent];
        Ok(MCap {
            name: CapName::from_u128(0),
            parent: Some(parent),
            object: p.object,
            rights: p.rights & mask,
            holder,
            payer: Some(caller),
            binding: binding.unwrap_or(p.binding),
            state: MState::Live,
        })
    }

    /// Revokes a live capability and, recursively, its live children; returns the dead.
    fn kill(&mut self, i: usize, dead: &mut Vec<CapName>) {
        self.caps[i].state = MState::Revoked;
        dead.push(self.caps[i].name);
        let children: Vec<usize> = (0..self.caps.len())
            .filter(|&c| self.caps[c].parent == Some(i) && self.caps[c].state == MState::Live)
            .collect();
        for c in children {
            self.kill(c, dead);
        }
    }

    fn revoke(&mut self, caller: Principal, name: CapName) -> Result<Vec<CapName>, CapError> {
        let i = self.find(name).ok_or(CapError::UnknownName)?;
        let cap = self.caps[i];
        let may_use = cap.binding == Binding::Bearer || cap.holder == caller;
        let holds_parent = cap.state == MState::Live && cap.parent.is_some_and(|p| self.caps[p].holder == caller);
        if !may_use && !holds_parent {
            return Err(CapError::WrongHolder);
        }
        if cap.state == MState::Revoked {
            return Err(CapError::Revoked);
        }
        let mut dead = Vec::new();
        self.kill(i, &mut dead);
        Ok(dead)
    }

    fn delete(&mut self, caller: Principal, name: CapName) -> Result<Vec<CapName>, CapError> {
        let i = self.find(name).ok_or(CapError::UnknownName)?;
        if self.caps[i].holder != caller {
            return Err(CapError::WrongHolder);
        }
        let mut dead = Vec::new();
        if self.caps[i].state == MState::Live {
            self.kill(i, &mut dead);
        }
        self.caps[i].state = MState::Deleted;
        Ok(dead)
    }

    fn check(&self, caller: Principal, op: OpId, names: &[CapName]) -> Result<(), CheckError> {
        let args = op_args(op).ok_or(CheckError::UnknownOperation)?;
        if args.len() != names.len() {
            return Err(CheckError::WrongArgCount {
                expected: args.len() as u8,
                presented: names.len().min(255) as u8,
            });
        }
        for (index, (&name, &(kind, rights))) in names.iter().zip(&args).enumerate() {
            let fail = |fault| CheckError::Arg { index: index as u8, fault };
            let i = self.resolve(caller, name).map_err(|e| {
                fail(match e {
                    CapError::UnknownName => ArgFault::UnknownName,
                    CapError::WrongHolder => ArgFault::WrongHolder,
                    _ => ArgFault::Revoked,
                })
            })?;
            let cap = &self.caps[i];
            if cap.object.am != op.am() || cap.object.kind != kind {
                return Err(fail(ArgFault::WrongKind));
            }
            if !cap.rights.contains(rights) {
                return Err(fail(ArgFault::MissingRights));
            }
        }
        Ok(())
    }

    fn remove_vm(&mut self, vm: VmId) -> Result<Vec<CapName>, PrincipalError> {
        let p = Principal::Vm(vm);
        self.quotas.remove(&p).ok_or(PrincipalError::UnknownPrincipal)?;
        let mut dead = Vec::new();
        for i in 0..self.caps.len() {
            if self.caps[i].holder == p && self.caps[i].state == MState::Live {
                self.kill(i, &mut dead);
            }
        }
        for cap in self.caps.iter_mut().filter(|c| c.holder == p) {
            cap.state = MState::Deleted;
        }
        for cap in self.caps.iter_mut().filter(|c| c.payer == Some(p)) {
            cap.payer = None;
        }
        Ok(dead)
    }

    /// What `peek` should say of capability `i`.
    fn peek(&self, i: usize) -> Option<Peek> {
        let cap = &self.caps[i];
        (cap.state != MState::Deleted).then(|| Peek {
            live: cap.state == MState::Live,
            object: cap.object,
            rights: cap.rights,
            holder: cap.holder,
            binding: cap.binding,
            parent: match cap.state {
                MState::Live => cap.parent.map(|p| self.caps[p].name),
                _ => None,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// The script.
// ---------------------------------------------------------------------------------------

/// Picks a name: usually a live one, often any ever issued (revoked, deleted), sometimes a
/// made-up one.
#[derive(Clone, Debug)]
enum Pick {
    Live(Index),
    Issued(Index),
    Made(u128),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => any::<Index>().prop_map(Pick::Live),
        3 => any::<Index>().prop_map(Pick::Issued),
        1 => any::<u128>().prop_map(Pick::Made),
    ]
}

/// Picks the caller: usually the holder of the (first) name it presents, so that most
/// operations get past the holder check and reach the deeper ones.
#[derive(Clone, Debug)]
enum Caller {
    Holder,
    Any(Index),
}

fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![3 => Just(Caller::Holder), 2 => any::<Index>().prop_map(Caller::Any)]
}

#[derive(Clone, Debug)]
enum Step {
    /// The AM `am` (or, rarely, another principal `who`) mints a root.
    Mint {
        who: Option<Index>,
        am: Index,
        kind: u16,
        id: u8,
        rights: u64,
    },
    Derive {
        who: Caller,
        cap: Pick,
        mask: u64,
    },
    Delegate {
        who: Caller,
        cap: Pick,
        target: Index,
        mask: u64,
        bearer: bool,
    },
    Revoke {
        who: Caller,
        cap: Pick,
    },
    Delete {
        who: Caller,
        cap: Pick,
    },
    Inspect {
        who: Caller,
        cap: Pick,
    },
    /// Invokes an operation with as many names as it takes, or rarely with `count` names.
    Check {
        who: Caller,
        op: Index,
        caps: [Pick; 5],
        count: Option<usize>,
    },
    AddVm {
        vm: Index,
        quota: u32,
    },
    RemoveVm {
        vm: Index,
    },
    SetQuota {
        who: Index,
        quota: u32,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let idx = any::<Index>;
    prop_oneof![
        6 => (
            prop::option::weighted(0.15, idx()),
            idx(),
            prop_oneof![9 => 0u16..2, 1 => 2u16..4],
            0u8..3,
            prop_oneof![9 => 0u64..8, 1 => 8u64..16],
        )
            .prop_map(|(who, am, kind, id, rights)| Step::Mint { who, am, kind, id, rights }),
        4 => (caller(), pick(), 0u64..8).prop_map(|(who, cap, mask)| Step::Derive { who, cap, mask }),
        5 => (caller(), pick(), idx(), 0u64..8, any::<bool>())
            .prop_map(|(who, cap, target, mask, bearer)| Step::Delegate { who, cap, target, mask, bearer }),
        2 => (caller(), pick()).prop_map(|(who, cap)| Step::Revoke { who, cap }),
        2 => (caller(), pick()).prop_map(|(who, cap)| Step::Delete { who, cap }),
        2 => (caller(), pick()).prop_map(|(who, cap)| Step::Inspect { who, cap }),
        6 => (caller(), idx(), [pick(), pick(), pick(), pick(), pick()], prop::option::weighted(0.1, 0usize..=5))
            .prop_map(|(who, op, caps, count)| Step::Check { who, op, caps, count }),
        1 => (idx(), 0u32..12).prop_map(|(vm, quota)| Step::AddVm { vm, quota }),
        1 => idx().prop_map(|vm| Step::RemoveVm { vm }),
        1 => (idx(), 0u32..12).prop_map(|(who, quota)| Step::SetQuota { who, quota }),
    ]
}

struct Run {
    real: CapTable,
    model: Model,
}

impl Run {
    fn name(&self, pick: &Pick) -> CapName {
        let live: Vec<CapName> = self.model.caps.iter().filter(|c| c.state == MState::Live).map(|c| c.name).collect();
        match pick {
            Pick::Live(i) if !live.is_empty() => *i.get(&live),
            Pick::Issued(i) if !self.model.caps.is_empty() => i.get(&self.model.caps).name,
            Pick::Made(bits) => CapName::from_u128(*bits),
            _ => CapName::from_u128(1),
        }
    }

    /// Resolves who calls with `name` as the name presented (first).
    fn caller(&self, who: &Caller, name: CapName) -> Principal {
        match who {
            Caller::Any(index) => *index.get(&PRINCIPALS),
            Caller::Holder => self.model.caps.iter().find(|c| c.name == name).map_or(PRINCIPALS[0], |c| c.holder),
        }
    }

    fn vm(index: &Index) -> VmId {
        *index.get(&[VM1, VM2, VM3, VmId::new(4), VmId::new(5)])
    }

    /// Records a capability the real table created, after checking the model agreed.
    fn created(&mut self, real: Result<CapName, CapError>, model: Result<MCap, CapError>) {
        match (real, model) {
            (Ok(name), Ok(mut cap)) => {
                assert!(self.model.caps.iter().all(|c| c.name != name), "names are fresh");
                cap.name = name;
                self.model.caps.push(cap);
            }
            (real, model) => assert_eq!(real.err(), model.err()),
        }
    }

    fn deaths<E: core::fmt::Debug + PartialEq>(real: Result<usize, E>, hook: Recorder, model: Result<Vec<CapName>, E>) {
        match (real, model) {
            (Ok(count), Ok(mut expected)) => {
                let mut dead: Vec<CapName> = hook.dead.iter().map(|d| d.name).collect();
                dead.sort();
                expected.sort();
                assert_eq!(dead, expected);
                assert_eq!(count, expected.len());
            }
            (real, model) => {
                assert_eq!(real.err(), model.err());
                assert!(hook.dead.is_empty());
            }
        }
    }

    fn apply(&mut self, step: &Step) {
        match step {
            Step::Mint { who, am, kind, id, rights } => {
                let am = *am.get(&[EXO, EXO, NVRAM, NVRAM, GHOST_AM]);
                let caller = who.as_ref().map_or(Principal::Am(am), |who| *who.get(&PRINCIPALS));
                let object = Object::new(am, ObjKind::new(*kind), ObjId::new(u64::from(*id)));
                let rights = Rights::from_bits(*rights);
                let real = self.real.mint(caller, object, rights);
                let model = self.model.mint(caller, object, rights);
                self.created(real, model);
            }
            Step::Derive { who, cap, mask } => {
                let (name, mask) = (self.name(cap), Rights::from_bits(*mask));
                let caller = self.caller(who, name);
                let real = self.real.derive(caller, name, mask);
                let model = self.model.child(caller, name, None, mask, None);
                self.created(real, model);
            }
            Step::Delegate { who, cap, target, mask, bearer } => {
                let (name, mask) = (self.name(cap), Rights::from_bits(*mask));
                let caller = self.caller(who, name);
                let target = *target.get(&PRINCIPALS);
                let binding = if *bearer { Binding::Bearer } else { Binding::Bound };
                let real = self.real.delegate(caller, name, target, mask, binding);
                let model = self.model.child(caller, name, Some(target), mask, Some(binding));
                self.created(real, model);
            }
            Step::Revoke { who, cap } => {
                let name = self.name(cap);
                let caller = self.caller(who, name);
                let mut hook = Recorder::default();
                let real = self.real.revoke(caller, name, &mut hook);
                Self::deaths(real, hook, self.model.revoke(caller, name));
            }
            Step::Delete { who, cap } => {
                let name = self.name(cap);
                let caller = self.caller(who, name);
                let mut hook = Recorder::default();
                let real = self.real.delete(caller, name, &mut hook);
                Self::deaths(real, hook, self.model.delete(caller, name));
            }
            Step::Inspect { who, cap } => {
                let name = self.name(cap);
                let caller = self.caller(who, name);
                let model = self.model.resolve(caller, name).map(|i| {
                    let c = &self.model.caps[i];
                    CapInfo { object: c.object, rights: c.rights, holder: c.holder, binding: c.binding }
                });
                assert_eq!(self.real.inspect(caller, name), model);
            }
            Step::Check { who, op, caps, count } => {
                let op = *op.get(&OPS);
                let arity = op_args(op).map_or(1, |args| args.len());
                let names: Vec<CapName> = caps[..count.unwrap_or(arity)].iter().map(|p| self.name(p)).collect();
                let caller = self.caller(who, names.first().copied().unwrap_or(CapName::from_u128(0)));
                let real = self.real.check(caller, op, &names);
                assert_eq!(real.as_ref().err().copied(), self.model.check(caller, op, &names).err());
                if let Ok(checked) = real {
                    let seen: Vec<CapName> = checked.args().iter().map(CheckedCap::name).collect();
                    assert_eq!(seen, names);
                }
            }
            Step::AddVm { vm, quota } => {
                let vm = Self::vm(vm);
                let model = match self.model.quotas.entry(Principal::Vm(vm)) {
                    Entry::Occupied(_) => Err(PrincipalError::AlreadyRegistered),
                    Entry::Vacant(slot) => {
                        slot.insert(*quota);
                        Ok(())
                    }
                };
                assert_eq!(self.real.add_vm(vm, *quota), model);
            }
            Step::RemoveVm { vm } => {
                let vm = Self::vm(vm);
                let mut hook = Recorder::default();
                let real = self.real.remove_vm(vm, &mut hook);
                Self::deaths(real, hook, self.model.remove_vm(vm));
            }
            Step::SetQuota { who, quota } => {
                let p = *who.get(&PRINCIPALS);
                let model = match self.model.quotas.get_mut(&p) {
                    Some(q) => {
                        *q = *quota;
                        Ok(())
                    }
                    None => Err(PrincipalError::UnknownPrincipal),
                };
                assert_eq!(self.real.set_quota(p, *quota), model);
            }
        }
    }

    /// Compares everything observable, then audits the real table's internals.
    fn compare(&self) {
        for (i, cap) in self.model.caps.iter().enumerate() {
            assert_eq!(self.real.peek(cap.name), self.model.peek(i), "{cap:?}");
        }
        for p in PRINCIPALS {
            let model = self.model.quotas.get(&p).map(|&quota| Usage {
                held: self.model.held(p),
                charged: self.model.charged(p),
                quota,
            });
            assert_eq!(self.real.usage(p), model, "{p:?}");
        }
        assert_eq!(self.real.len(), self.model.in_use());
        self.real.audit();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    /// The real table and the reference model agree on every result and every state.
    #[test]
    fn table_matches_reference_model(steps in prop::collection::vec(step(), 1..120)) {
        // Small enough that quotas and the capacity run out in most scripts.
        let (capacity, quota) = (16, 6);
        let mut run = Run { real: Fixture::new(capacity, quota).table, model: Model::new(capacity, quota) };
        for step in &steps {
            run.apply(step);
            run.compare();
        }
    }
}
