//! Property tests of the invariants of DESIGN.md §2 on the real table: random scripts of
//! operations by random principals, each property checked after every step.
//!
//! The scripts are interpreted against a record of every name issued (its parent, object,
//! rights, holder and binding at creation, which never change) and of which principals
//! know which names, so that callers mostly present names they could really have.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

/// The principals of every script: the two AMs and three VMs.
const PRINCIPALS: [Principal; 5] =
    [Principal::Am(EXO), Principal::Am(NVRAM), Principal::Vm(VM1), Principal::Vm(VM2), Principal::Vm(VM3)];

/// The colluding group of the collusion property.
fn colluder(p: Principal) -> bool {
    matches!(p, Principal::Vm(vm) if vm == VM1 || vm == VM2)
}

#[derive(Clone, Debug)]
enum Action {
    /// The AM `am` (or, rarely, another principal `who`) mints a root for object `object`.
    Mint {
        who: Option<Index>,
        am: bool,
        object: u8,
        rights: u64,
    },
    /// `who` derives from a name it knows (or, if `stray`, any name issued).
    Derive {
        who: Index,
        cap: Index,
        stray: bool,
        mask: u64,
    },
    Delegate {
        who: Index,
        cap: Index,
        stray: bool,
        target: Index,
        mask: u64,
        bearer: bool,
    },
    Revoke {
        who: Index,
        cap: Index,
        stray: bool,
    },
    Delete {
        who: Index,
        cap: Index,
        stray: bool,
    },
    /// `who` tells a name it knows to `to` (names travel through memory, files, sockets).
    Tell {
        who: Index,
        cap: Index,
        to: Index,
    },
    /// `who` invokes operation `op` with names it knows, as many as the operation takes
    /// or, rarely, `count`.
    Invoke {
        who: Index,
        op: Index,
        caps: [(Index, bool); 4],
        count: Option<usize>,
        /// Whether each name is picked among those of the kind its argument needs.
        fitting: [bool; 4],
    },
    /// `who` presents a made-up name, or a real one with one bit flipped.
    Forge {
        who: Index,
        random: u128,
        flip_of: Option<(Index, u8)>,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let idx = any::<Index>;
    prop_oneof![
        3 => (prop::option::weighted(0.15, idx()), any::<bool>(), 0u8..4, any::<u64>())
            .prop_map(|(who, am, object, rights)| Action::Mint { who, am, object, rights }),
        3 => (idx(), idx(), prop::bool::weighted(0.1), any::<u64>())
            .prop_map(|(who, cap, stray, mask)| Action::Derive { who, cap, stray, mask }),
        4 => (idx(), idx(), prop::bool::weighted(0.1), idx(), any::<u64>(), any::<bool>())
            .prop_map(|(who, cap, stray, target, mask, bearer)| {
                Action::Delegate { who, cap, stray, target, mask, bearer }
            }),
        1 => (idx(), idx(), prop::bool::weighted(0.2))
            .prop_map(|(who, cap, stray)| Action::Revoke { who, cap, stray }),
        1 => (idx(), idx(), prop::bool::weighted(0.2))
            .prop_map(|(who, cap, stray)| Action::Delete { who, cap, stray }),
        1 => (idx(), idx(), idx()).prop_map(|(who, cap, to)| Action::Tell { who, cap, to }),
        5 => (
            idx(),
            idx(),
            [0; 4].map(|_| (idx(), prop::bool::weighted(0.1))),
            prop::option::weighted(0.1, 0usize..=4),
            [0; 4].map(|_| prop::bool::weighted(0.8)),
        )
            .prop_map(|(who, op, caps, count, fitting)| Action::Invoke { who, op, caps, count, fitting }),
        1 => (idx(), any::<u128>(), prop::option::of((idx(), any::<u8>())))
            .prop_map(|(who, random, flip_of)| Action::Forge { who, random, flip_of }),
    ]
}

fn script() -> impl Strategy<Value = Vec<Action>> {
    prop::collection::vec(action(), 1..80)
}

/// A name as issued.
#[derive(Clone, Copy, Debug)]
struct Issued {
    name: CapName,
    parent: Option<CapName>,
    object: Object,
    rights: Rights,
    holder: Principal,
    binding: Binding,
}

/// What one step did, for the properties to judge.
#[derive(Debug)]
enum Event {
    Created {
        caller: Principal,
        issued: Issued,
        mask: Option<Rights>,
    },
    Killed {
        target: CapName,
        live_before: BTreeSet<CapName>,
        dead: Vec<DeadCap>,
        count: usize,
        deleted: bool,
    },
    Checked {
        caller: Principal,
        op: OpId,
        names: Vec<CapName>,
        result: Result<Vec<(CapName, Object, Rights)>, CheckError>,
    },
    Forged {
        caller: Principal,
        name: CapName,
    },
    Told {
        from: Principal,
        to: Principal,
        name: CapName,
    },
    Other,
}

struct Harness {
    f: Fixture,
    issued: Vec<Issued>,
    by_name: BTreeMap<CapName, usize>,
    knows: BTreeMap<Principal, BTreeSet<CapName>>,
    deleted: BTreeSet<CapName>,
    /// Principals that only ever present names they know: a stray pick stands for guessing
    /// a name, which the collusion property must not grant its colluders.
    honest: fn(Principal) -> bool,
}

impl Harness {
    fn new() -> Self {
        Self {
            // Small enough that quotas and the capacity run out in some scripts.
            f: Fixture::new(48, 16),
            issued: Vec::new(),
            by_name: BTreeMap::new(),
            knows: PRINCIPALS.iter().map(|&p| (p, BTreeSet::new())).collect(),
            deleted: BTreeSet::new(),
            honest: |_| false,
        }
    }

    fn principal(index: &Index) -> Principal {
        *index.get(&PRINCIPALS)
    }

    /// Picks a caller among the principals that know some name (any, if none does), so
    /// that most steps reach past the name checks.
    fn caller(&self, index: &Index) -> Principal {
        let knowing: Vec<Principal> = PRINCIPALS.into_iter().filter(|p| !self.knows[p].is_empty()).collect();
        if knowing.is_empty() {
            Self::principal(index)
        } else {
            *index.get(&knowing)
        }
    }

    /// Picks a name `who` knows, or with `stray` any name ever issued.
    fn pick(&self, who: Principal, cap: &Index, stray: bool) -> Option<CapName> {
        if stray && !(self.honest)(who) {
            (!self.issued.is_empty()).then(|| cap.get(&self.issued).name)
        } else {
            let known: Vec<CapName> = self.knows[&who].iter().copied().collect();
            (!known.is_empty()).then(|| *cap.get(&known))
        }
    }

    fn record(&mut self, issued: Issued, knowers: &[Principal]) {
        self.by_name.insert(issued.name, self.issued.len());
        self.issued.push(issued);
        for p in knowers {
            self.knows.get_mut(p).expect("principal").insert(issued.name);
        }
    }

    fn descendants(&self, root: CapName) -> BTreeSet<CapName> {
        let mut found = BTreeSet::from([root]);
        // Children are always issued after their parents: one pass in issue order suffices.
        for cap in &self.issued {
            if cap.parent.is_some_and(|p| found.contains(&p)) {
                found.insert(cap.name);
            }
        }
        found
    }

    fn live(&self, name: CapName) -> bool {
        self.f.table.peek(name).is_some_and(|p| p.live)
    }

    fn step(&mut self, action: &Action) -> Event {
        let f = &self.f;
        // The one-argument operations twice: they pass more often.
        let ops = [f.map, f.map, f.copy, f.wire, f.commit, f.commit];
        match action {
            Action::Mint { who, am, object, rights } => {
                let (am, kind, defined) = if *am {
                    (NVRAM, self.f.region, RWX)
                } else if object % 2 == 0 {
                    (EXO, self.f.frame, RWX)
                } else {
                    (EXO, self.f.port, IN | OUT)
                };
                let caller = who.as_ref().map_or(Principal::Am(am), Self::principal);
                let object = Object::new(am, kind, ObjId::new(u64::from(*object)));
                let rights = Rights::from_bits(*rights) & defined;
                match self.f.table.mint(caller, object, rights) {
                    Ok(name) => {
                        assert_eq!(caller, Principal::Am(am), "only the implementer mints");
                        let issued =
                            Issued { name, parent: None, object, rights, holder: caller, binding: Binding::Bound };
                        self.record(issued, &[caller]);
                        Event::Created { caller, issued, mask: None }
                    }
                    Err(e) => {
                        assert!(
                            caller != Principal::Am(am) || e == CapError::QuotaExceeded || e == CapError::TableFull,
                            "{e:?}"
                        );
                        Event::Other
                    }
                }
            }
            Action::Derive { who, cap, stray, mask } => {
                let caller = self.caller(who);
                let Some(parent) = self.pick(caller, cap, *stray) else { return Event::Other };
                let mask = Rights::from_bits(*mask);
                match self.f.table.derive(caller, parent, mask) {
                    Ok(name) => {
                        let p = self.f.table.peek(name).expect("new name resolves");
                        let issued = Issued {
                            name,
                            parent: Some(parent),
                            object: p.object,
                            rights: p.rights,
                            holder: p.holder,
                            binding: p.binding,
                        };
                        self.record(issued, &[caller]);
                        Event::Created { caller, issued, mask: Some(mask) }
                    }
                    Err(_) => Event::Other,
                }
            }
            Action::Delegate { who, cap, stray, target, mask, bearer } => {
                let caller = self.caller(who);
                let target = Self::principal(target);
                let Some(parent) = self.pick(caller, cap, *stray) else { return Event::Other };
                let mask = Rights::from_bits(*mask);
                let binding = if *bearer { Binding::Bearer } else { Binding::Bound };
                match self.f.table.delegate(caller, parent, target, mask, binding) {
                    Ok(name) => {
                        let p = self.f.table.peek(name).expect("new name resolves");
                        assert_eq!((p.holder, p.binding), (target, binding));
                        let issued = Issued {
                            name,
                            parent: Some(parent),
                            object: p.object,
                            rights: p.rights,
                            holder: p.holder,
                            binding: p.binding,
                        };
                        self.record(issued, &[caller, target]);
                        Event::Created { caller, issued, mask: Some(mask) }
                    }
                    Err(_) => Event::Other,
                }
            }
            Action::Revoke { who, cap, stray } | Action::Delete { who, cap, stray } => {
                let deleted = matches!(action, Action::Delete { .. });
                let caller = self.caller(who);
                let Some(target) = self.pick(caller, cap, *stray) else { return Event::Other };
                let live_before: BTreeSet<CapName> =
                    self.descendants(target).into_iter().filter(|&n| self.live(n)).collect();
                let mut hook = Recorder::default();
                let result = if deleted {
                    self.f.table.delete(caller, target, &mut hook)
                } else {
                    self.f.table.revoke(caller, target, &mut hook)
                };
                match result {
                    Ok(count) => {
                        if deleted {
                            self.deleted.insert(target);
                        }
                        Event::Killed { target, live_before, dead: hook.dead, count, deleted }
                    }
                    Err(_) => {
                        assert!(hook.dead.is_empty(), "a refused operation kills nothing");
                        Event::Other
                    }
                }
            }
            Action::Tell { who, cap, to } => {
                let from = self.caller(who);
                let to = Self::principal(to);
                let Some(name) = self.pick(from, cap, false) else { return Event::Other };
                self.knows.get_mut(&to).expect("principal").insert(name);
                Event::Told { from, to, name }
            }
            Action::Invoke { who, op, caps, count, fitting } => {
                let caller = self.caller(who);
                let op = *op.get(&ops);
                let specs = self.f.table.registry().op_args(op).expect("registered op").to_vec();
                let names: Vec<CapName> = caps[..count.unwrap_or(specs.len())]
                    .iter()
                    .enumerate()
                    .map(|(i, (cap, stray))| {
                        // A fitting name is live, usable by the caller and of the argument's kind.
                        let fits = |name: &&CapName| {
                            let cap = self.issued[self.by_name[*name]];
                            let usable = cap.binding == Binding::Bearer || cap.holder == caller;
                            let kind = specs.get(i).is_some_and(|spec| spec.kind == cap.object.kind);
                            usable && kind && cap.object.am == op.am() && self.live(**name)
                        };
                        let known: Vec<CapName> = self.knows[&caller].iter().filter(fits).copied().collect();
                        match fitting[i] && !*stray && !known.is_empty() {
                            true => *cap.get(&known),
                            false => self.pick(caller, cap, *stray).unwrap_or(CapName::from_u128(1)),
                        }
                    })
                    .collect();
                let result = self
                    .f
                    .table
                    .check(caller, op, &names)
                    .map(|checked| checked.args().iter().map(|a| (a.name(), a.object(), a.rights())).collect());
                Event::Checked { caller, op, names, result }
            }
            Action::Forge { who, random, flip_of } => {
                let caller = Self::principal(who);
                let name = match flip_of {
                    Some((cap, bit)) if !self.issued.is_empty() => {
                        let real = cap.get(&self.issued).name.to_u128();
                        CapName::from_u128(real ^ (1u128 << (bit % 128)))
                    }
                    _ => CapName::from_u128(*random),
                };
                Event::Forged { caller, name }
            }
        }
    }

    /// Runs `actions`, auditing the table and calling `property` after every step.
    fn run(actions: &[Action], property: impl FnMut(&Harness, &Event)) {
        Self::run_with(actions, |_| false, property);
    }

    /// Runs `actions` as [`Harness::run`] does, with the principals `honest` picks never
    /// presenting names they do not know.
    fn run_with(actions: &[Action], honest: fn(Principal) -> bool, mut property: impl FnMut(&Harness, &Event)) {
        let mut harness = Harness { honest, ..Harness::new() };
        for action in actions {
            let event = harness.step(action);
            harness.f.table.audit();
            property(&harness, &event);
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// Invariant 1: a child's rights are its parent's masked, never more, on the same
    /// object; and this holds of every live capability at every step.
    #[test]
    fn no_amplification(actions in script()) {
        Harness::run(&actions, |h, event| {
            if let Event::Created { issued, mask: Some(mask), .. } = event {
                let parent = h.issued[h.by_name[&issued.parent.expect("derived")]];
                assert_eq!(issued.rights, parent.rights & *mask);
                assert_eq!(issued.object, parent.object);
            }
            for cap in &h.issued {
                if let (Some(now), Some(parent)) = (h.f.table.peek(cap.name), cap.parent) {
                    let parent = h.issued[h.by_name[&parent]];
                    assert!(parent.rights.contains(now.rights));
                    assert_eq!(now.rights, cap.rights, "rights never change");
                }
            }
        });
    }

    /// Invariant 2: revoke (and delete) kill exactly the live part of the subtree, all of
    /// it, tell the hook of each, and leave everything else alive.
    #[test]
    fn revocation_is_complete_and_transitive(actions in script()) {
        let mut live_before_step = BTreeSet::new();
        Harness::run(&actions, |h, event| {
            let live_now: BTreeSet<CapName> =
                h.issued.iter().map(|c| c.name).filter(|&n| h.live(n)).collect();
            if let Event::Killed { target, live_before, dead, count, deleted, .. } = event {
                let reported: BTreeSet<CapName> = dead.iter().map(|d| d.name).collect();
                assert_eq!(reported.len(), dead.len(), "each death is reported once");
                assert_eq!(&reported, live_before);
                assert_eq!(*count, dead.len());
                for d in dead {
                    let cap = h.issued[h.by_name[&d.name]];
                    assert_eq!((d.object, d.rights, d.holder), (cap.object, cap.rights, cap.holder));
                }
                assert!(live_now.is_disjoint(live_before));
                let expected: BTreeSet<CapName> =
                    live_before_step.difference(live_before).copied().collect();
                assert_eq!(live_now, expected, "nothing outside the subtree died");
                if *deleted {
                    assert!(h.f.table.peek(*target).is_none());
                }
            } else {
                assert!(live_before_step.is_subset(&live_now), "only revoke and delete kill");
            }
            live_before_step = live_now;
        });
    }

    /// Invariant 3: made-up, mutated, revoked and deleted names never work.
    #[test]
    fn names_are_unforgeable(actions in script()) {
        Harness::run(&actions, |h, event| {
            let t = &h.f.table;
            if let Event::Forged { caller, name } = event {
                if !h.by_name.contains_key(name) {
                    let unknown = CheckError::Arg { index: 0, fault: ArgFault::UnknownName };
                    assert_eq!(t.check(*caller, h.f.map, &[*name]).unwrap_err(), unknown);
                    assert_eq!(t.inspect(*caller, *name), Err(CapError::UnknownName));
                }
            }
            if let Event::Checked { names, result: Ok(_), .. } = event {
                assert!(names.iter().all(|n| h.by_name.contains_key(n)), "only issued names pass");
            }
            for cap in &h.issued {
                let name = cap.name;
                if h.deleted.contains(&name) {
                    for p in PRINCIPALS {
                        assert_eq!(t.inspect(p, name), Err(CapError::UnknownName));
                    }
                } else if !h.live(name) {
                    assert_eq!(t.inspect(cap.holder, name), Err(CapError::Revoked));
                    let revoked = CheckError::Arg { index: 0, fault: ArgFault::Revoked };
                    let op = if cap.object.am == EXO { h.f.map } else { h.f.commit };
                    assert_eq!(t.check(cap.holder, op, &[name]).unwrap_err(), revoked);
                }
            }
        });
    }

    /// Invariant 3: a bound name is useless to every principal but its holder.
    #[test]
    fn bound_names_reject_other_principals(actions in script()) {
        Harness::run(&actions, |h, event| {
            if let Event::Checked { caller, names, result: Ok(_), .. } = event {
                for name in names {
                    let cap = h.issued[h.by_name[name]];
                    assert!(cap.binding == Binding::Bearer || cap.holder == *caller);
                }
            }
            let t = &h.f.table;
            for cap in h.issued.iter().filter(|c| c.binding == Binding::Bound && !h.deleted.contains(&c.name)) {
                let op = if cap.object.am == EXO { h.f.map } else { h.f.commit };
                for other in PRINCIPALS.into_iter().filter(|&p| p != cap.holder) {
                    assert_eq!(t.inspect(other, cap.name), Err(CapError::WrongHolder));
                    assert_eq!(
                        t.check(other, op, &[cap.name]).unwrap_err(),
                        CheckError::Arg { index: 0, fault: ArgFault::WrongHolder }
                    );
                }
            }
        });
    }

    /// Invariant 4: VM1 and VM2, pooling every name they learn, never reach rights on an
    /// object beyond the union of what outsiders granted them (delegated to them, or told
    /// them as bearer names).
    #[test]
    fn colluders_stay_within_their_grants(actions in script()) {
        let mut granted: BTreeMap<Object, Rights> = BTreeMap::new();
        let mut pooled: BTreeSet<CapName> = BTreeSet::new();
        Harness::run_with(&actions, colluder, |h, event| {
            let mut grant = |cap: &Issued| {
                let rights = granted.entry(cap.object).or_default();
                *rights = *rights | cap.rights;
            };
            match event {
                Event::Created { caller, issued, .. } if !colluder(*caller) && colluder(issued.holder) => {
                    grant(issued);
                }
                Event::Told { from, to, name } if !colluder(*from) && colluder(*to) => {
                    let told = h.issued[h.by_name[name]];
                    if told.binding == Binding::Bearer {
                        grant(&told);
                    }
                }
                _ => {}
            }
            for p in PRINCIPALS.into_iter().filter(|&p| colluder(p)) {
                pooled.extend(h.knows[&p].iter().copied());
            }
            let within = |object: &Object, rights: Rights| {
                granted.get(object).copied().unwrap_or_default().contains(rights)
            };
            for cap in &h.issued {
                let usable = colluder(cap.holder)
                    || (cap.binding == Binding::Bearer && pooled.contains(&cap.name));
                if usable && h.live(cap.name) {
                    assert!(within(&cap.object, cap.rights), "{cap:?} exceeds {granted:?}");
                }
            }
            if let Event::Checked { caller, result: Ok(args), .. } = event {
                if colluder(*caller) {
                    for (_, object, rights) in args {
                        assert!(within(object, *rights));
                    }
                }
            }
        });
    }

    /// Invariant 5: a handler is only ever given checked references to objects of its own
    /// AM, of the declared kinds, with the declared rights, exactly as presented.
    #[test]
    fn handlers_only_see_their_own_objects(actions in script()) {
        Harness::run(&actions, |h, event| {
            if let Event::Checked { caller, op, names, result: Ok(args) } = event {
                let specs = h.f.table.registry().op_args(*op).expect("registered op");
                assert_eq!(args.len(), specs.len());
                assert_eq!(names.len(), specs.len());
                for ((arg, spec), name) in args.iter().zip(specs).zip(names) {
                    let (checked_name, object, rights) = *arg;
                    assert_eq!(checked_name, *name);
                    assert_eq!(object.am, op.am());
                    assert_eq!(object.kind, spec.kind);
                    assert!(rights.contains(spec.rights));
                    let cap = h.issued[h.by_name[name]];
                    assert_eq!((object, rights), (cap.object, cap.rights));
                    assert!(h.live(*name));
                    assert!(cap.binding == Binding::Bearer || cap.holder == *caller);
                }
            }
        });
    }
}
