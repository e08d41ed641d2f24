//! Unit tests: every error of registration, checking, minting, the capability operations
//! and quotas, and the success paths they guard.

use super::*;

// -------------------------------------------------------------------------------------
// Building a table.
// -------------------------------------------------------------------------------------

#[test]
fn new_table_reports_missing_entropy() {
    struct NoEntropy;
    impl EntropySource for NoEntropy {
        fn fill_seed(&mut self, _: &mut [u8; 32]) -> Result<(), EntropyUnavailable> {
            Err(EntropyUnavailable)
        }
    }
    let table = CapTable::new(KernelId::new(0), 16, &mut NoEntropy);
    assert_eq!(table.unwrap_err(), NewTableError::EntropyUnavailable);
}

#[test]
fn new_table_is_empty_and_reserved() {
    let table = CapTable::new(KernelId::new(3), 1000, &mut FixedSeed::from_u64(0)).unwrap();
    assert!(table.is_empty());
    assert_eq!(table.len(), 0);
    assert_eq!(table.capacity(), 1000);
    assert_eq!(table.kernel(), KernelId::new(3));
    let footprint = table.footprint();
    assert_eq!(footprint.node_bytes, 72);
    assert!(footprint.slab_bytes >= 72 * 1000);
    assert!(footprint.index_bytes >= 5 * 1000);
}

#[test]
fn names_carry_the_kernel_id() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    assert_eq!(root.kernel(), KernelId::new(7));
    assert_eq!(root.to_u128() >> 112, 7);
}

// -------------------------------------------------------------------------------------
// Registration.
// -------------------------------------------------------------------------------------

#[test]
fn register_am_refuses_taken_ids_and_names() {
    let mut f = Fixture::new(16, 16);
    assert_eq!(f.table.register_am(EXO, "other", 1), Err(RegisterError::AmIdTaken));
    assert_eq!(f.table.register_am(AmId::new(9), "exo", 1), Err(RegisterError::DuplicateName));
    assert_eq!(f.table.register_am(AmId::new(9), "fresh", 1), Ok(()));
    assert_eq!(f.table.registry().am_name(AmId::new(9)), Some("fresh"));
}

#[test]
fn register_refuses_malformed_names() {
    let mut f = Fixture::new(16, 16);
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let longest = "y".repeat(MAX_NAME_LEN);
    for bad in ["", "two words", "tab\t", "caf\u{e9}", long.as_str()] {
        assert_eq!(f.table.register_am(AmId::new(20), bad, 1), Err(RegisterError::MalformedName), "{bad:?}");
        assert_eq!(f.table.register_kind(EXO, KindSpec { name: bad, rights: &[] }), Err(RegisterError::MalformedName));
        assert_eq!(
            f.table.register_kind(EXO, KindSpec { name: "k", rights: &["ok", bad] }),
            Err(RegisterError::MalformedName)
        );
        let args = [ArgSpec::new(f.frame, READ)];
        assert_eq!(f.table.register_op(EXO, OpSpec { name: bad, args: &args }), Err(RegisterError::MalformedName));
    }
    assert_eq!(f.table.register_am(AmId::new(20), &longest, 1), Ok(()));
    // Nothing half-registered: "k" was refused every time.
    assert_eq!(f.table.registry().find_kind(EXO, "k"), None);
}

#[test]
fn register_kind_refuses_bad_specs() {
    let mut f = Fixture::new(16, 16);
    let unknown = AmId::new(99);
    assert_eq!(f.table.register_kind(unknown, KindSpec { name: "k", rights: &[] }), Err(RegisterError::UnknownAm));
    assert_eq!(f.table.register_kind(EXO, KindSpec { name: "frame", rights: &[] }), Err(RegisterError::DuplicateName));
    assert_eq!(
        f.table.register_kind(EXO, KindSpec { name: "k", rights: &["a", "b", "a"] }),
        Err(RegisterError::DuplicateName)
    );
    let names: Vec<String> = (0..=Rights::MAX_NAMED).map(|i| format!("r{i}")).collect();
    let too_many: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        f.table.register_kind(EXO, KindSpec { name: "k", rights: &too_many }),
        Err(RegisterError::TooManyRights)
    );
    // 64 rights and no rights are both fine; a kind's name may repeat in another AM.
    let k64 = f.table.register_kind(EXO, KindSpec { name: "k64", rights: &too_many[..64] }).unwrap();
    assert_eq!(f.table.registry().kind_rights(EXO, k64), Some(Rights::ALL));
    let k0 = f.table.register_kind(EXO, KindSpec { name: "k0", rights: &[] }).unwrap();
    assert_eq!(f.table.registry().kind_rights(EXO, k0), Some(Rights::NONE));
    assert!(f.table.register_kind(NVRAM, KindSpec { name: "frame", rights: &[] }).is_ok());
}

#[test]
fn add_rights_extends_a_kind_at_run_time() {
    let mut f = Fixture::new(16, 16);
    let root = f.frame_root(1);
    assert_eq!(f.table.add_rights(AmId::new(99), f.frame, &["x"]), Err(RegisterError::UnknownAm));
    assert_eq!(f.table.add_rights(EXO, ObjKind::new(99), &["x"]), Err(RegisterError::UnknownKind));
    assert_eq!(f.table.add_rights(EXO, f.frame, &["write"]), Err(RegisterError::DuplicateName));
    let names: Vec<String> = (0..62).map(|i| format!("r{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(f.table.add_rights(EXO, f.frame, &names), Err(RegisterError::TooManyRights));
    let dirty = f.table.add_rights(EXO, f.frame, &["dirty-log"]).unwrap();
    assert_eq!(dirty, Rights::from_bits(0b1000));
    assert_eq!(f.table.registry().find_right(EXO, f.frame, "dirty-log"), Some(dirty));
    // Old capabilities keep their rights; new roots may carry the new one.
    assert_eq!(f.table.inspect(am(EXO), root).unwrap().rights, RWX);
    let object = Object::new(EXO, f.frame, ObjId::new(2));
    assert!(f.table.mint(am(EXO), object, RWX | dirty).is_ok());
}

#[test]
fn register_op_refuses_bad_specs() {
    let mut f = Fixture::new(16, 16);
    let read = [ArgSpec::new(f.frame, READ)];
    assert_eq!(f.table.register_op(AmId::new(99), OpSpec { name: "op", args: &read }), Err(RegisterError::UnknownAm));
    assert_eq!(f.table.register_op(EXO, OpSpec { name: "map", args: &read }), Err(RegisterError::DuplicateName));
    assert_eq!(f.table.register_op(EXO, OpSpec { name: "op", args: &[] }), Err(RegisterError::NoCapArgs));
    let five = [ArgSpec::new(f.frame, READ); MAX_CAP_ARGS + 1];
    assert_eq!(f.table.register_op(EXO, OpSpec { name: "op", args: &five }), Err(RegisterError::TooManyCapArgs));
    // The NVRAM AM has one kind: number 1 does not exist there, whatever the exo AM has.
    assert_eq!(
        f.table.register_op(NVRAM, OpSpec { name: "op", args: &[ArgSpec::new(ObjKind::new(1), READ)] }),
        Err(RegisterError::UnknownKind)
    );
    assert_eq!(
        f.table.register_op(EXO, OpSpec { name: "op", args: &[ArgSpec::new(f.port, Rights::from_bits(0b100))] }),
        Err(RegisterError::UndefinedRights)
    );
    // A refused operation takes no number: the next one gets the next index.
    let op = f.table.register_op(EXO, OpSpec { name: "op", args: &read }).unwrap();
    assert_eq!(op, OpId::new(EXO, 3));
    let four = [ArgSpec::new(f.frame, Rights::NONE); MAX_CAP_ARGS];
    assert!(f.table.register_op(EXO, OpSpec { name: "four", args: &four }).is_ok());
}

#[test]
fn registry_answers_name_lookups() {
    let f = Fixture::new(16, 16);
    let registry = f.table.registry();
    assert!(registry.has_am(EXO));
    assert!(!registry.has_am(AmId::new(50)));
    assert_eq!(registry.am_name(NVRAM), Some("nvram"));
    assert_eq!(registry.kind_name(EXO, f.port), Some("port"));
    assert_eq!(registry.kind_name(EXO, ObjKind::new(9)), None);
    assert_eq!(registry.find_kind(NVRAM, "region"), Some(f.region));
    assert_eq!(registry.find_kind(NVRAM, "frame"), None);
    assert_eq!(registry.find_right(EXO, f.frame, "exec"), Some(EXEC));
    assert_eq!(registry.find_right(EXO, f.frame, "commit"), None);
    let names: Vec<&str> = registry.right_names(EXO, f.frame, READ | EXEC | Rights::from_bits(1 << 40)).collect();
    assert_eq!(names, ["read", "exec"]);
    assert_eq!(registry.right_names(AmId::new(50), f.frame, RWX).count(), 0);
    assert_eq!(registry.find_op(EXO, "copy"), Some(f.copy));
    assert_eq!(registry.find_op(NVRAM, "copy"), None);
    assert_eq!(registry.op_name(f.commit), Some("commit"));
    assert_eq!(registry.op_args(f.copy), Some(&[ArgSpec::new(f.frame, READ), ArgSpec::new(f.frame, WRITE)][..]));
    assert_eq!(registry.op_args(OpId::new(EXO, 77)), None);
}

// -------------------------------------------------------------------------------------
// Checking.
// -------------------------------------------------------------------------------------

fn arg(index: u8, fault: ArgFault) -> CheckError {
    CheckError::Arg { index, fault }
}

#[test]
fn check_passes_valid_arguments() {
    let mut f = Fixture::new(64, 64);
    let (src, dst) = (f.frame_root(1), f.frame_root(2));
    let src = f.give(src, VM1, READ);
    let dst = f.give(dst, VM1, WRITE | EXEC);
    let checked = f.table.check(vm(VM1), f.copy, &[src, dst]).unwrap();
    assert_eq!(checked.op(), f.copy);
    assert_eq!(checked.am(), EXO);
    assert_eq!(checked.caller(), vm(VM1));
    let [a, b] = checked.args() else { panic!("two arguments") };
    assert_eq!((a.name(), a.id(), a.rights()), (src, ObjId::new(1), READ));
    assert_eq!((b.name(), b.id(), b.rights()), (dst, ObjId::new(2), WRITE | EXEC));
    assert_eq!(b.object(), Object::new(EXO, f.frame, ObjId::new(2)));
}

#[test]
fn check_refuses_unknown_operations_and_wrong_counts() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let caller = am(EXO);
    assert_eq!(f.table.check(caller, OpId::new(AmId::new(40), 0), &[root]).unwrap_err(), CheckError::UnknownOperation);
    assert_eq!(f.table.check(caller, OpId::new(EXO, 40), &[root]).unwrap_err(), CheckError::UnknownOperation);
    assert_eq!(
        f.table.check(caller, f.copy, &[root]).unwrap_err(),
        CheckError::WrongArgCount { expected: 2, presented: 1 }
    );
    assert_eq!(f.table.check(caller, f.map, &[]).unwrap_err(), CheckError::WrongArgCount { expected: 1, presented: 0 });
    assert_eq!(
        f.table.check(caller, f.map, &[root; 300]).unwrap_err(),
        CheckError::WrongArgCount { expected: 1, presented: 255 }
    );
}

#[test]
fn check_refuses_forged_names() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let (hi, lo) = root.words();
    let forged = [
        CapName::from_u128(0),
        CapName::from_words(hi, lo ^ 1),
        CapName::from_words(hi ^ (1 << 20), lo),
        // The same random bits owned by another kernel.
        CapName::from_words(hi ^ (1 << 60), lo),
        CapName::from_u128(0x0007_dead_beef_0000_0000_0000_0000_0001),
    ];
    for name in forged {
        assert_eq!(f.table.check(am(EXO), f.map, &[name]).unwrap_err(), arg(0, ArgFault::UnknownName), "{name:?}");
    }
}

#[test]
fn check_refuses_bound_names_of_others_before_saying_revoked() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let mine = f.give(root, VM1, READ);
    assert_eq!(f.table.check(vm(VM2), f.map, &[mine]).unwrap_err(), arg(0, ArgFault::WrongHolder));
    // Even the AM that delegated it cannot use a capability bound to VM1.
    assert_eq!(f.table.check(am(EXO), f.map, &[mine]).unwrap_err(), arg(0, ArgFault::WrongHolder));
    f.table.revoke(am(EXO), mine, &mut ignore).unwrap();
    assert_eq!(f.table.check(vm(VM1), f.map, &[mine]).unwrap_err(), arg(0, ArgFault::Revoked));
    assert_eq!(f.table.check(vm(VM2), f.map, &[mine]).unwrap_err(), arg(0, ArgFault::WrongHolder));
}

#[test]
fn check_accepts_bearer_names_from_anyone() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let token = f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bearer).unwrap();
    for caller in [vm(VM1), vm(VM2), vm(VmId::new(1000)), am(NVRAM)] {
        assert!(f.table.check(caller, f.map, &[token]).is_ok());
    }
}

#[test]
fn check_refuses_wrong_kinds_and_other_ams_objects() {
    let mut f = Fixture::new(64, 64);
    let port = f.port_root(0x60);
    // Region has kind number 0 in the NVRAM AM, like frame in the exo AM: still wrong.
    let region = f.region_root(5);
    assert_eq!(f.table.check(am(EXO), f.map, &[port]).unwrap_err(), arg(0, ArgFault::WrongKind));
    let region_for_exo = f.table.delegate(am(NVRAM), region, am(EXO), RWX, Binding::Bound).unwrap();
    assert_eq!(f.table.check(am(EXO), f.map, &[region_for_exo]).unwrap_err(), arg(0, ArgFault::WrongKind));
    let frame = f.frame_root(1);
    let frame_for_nvram = f.table.delegate(am(EXO), frame, am(NVRAM), RWX, Binding::Bound).unwrap();
    assert_eq!(f.table.check(am(NVRAM), f.commit, &[frame_for_nvram]).unwrap_err(), arg(0, ArgFault::WrongKind));
}

#[test]
fn check_refuses_missing_rights() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let exec_only = f.give(root, VM1, EXEC);
    assert_eq!(f.table.check(vm(VM1), f.map, &[exec_only]).unwrap_err(), arg(0, ArgFault::MissingRights));
    let region = f.region_root(1);
    let write_only = f.table.delegate(am(NVRAM), region, vm(VM1), WRITE, Binding::Bound).unwrap();
    assert_eq!(f.table.check(vm(VM1), f.commit, &[write_only]).unwrap_err(), arg(0, ArgFault::MissingRights));
}

#[test]
fn check_reports_the_first_failing_argument() {
    let mut f = Fixture::new(64, 64);
    let (r, w) = (f.frame_root(1), f.frame_root(2));
    let (i, o) = (f.port_root(1), f.port_root(2));
    let r = f.give(r, VM1, READ);
    let w = f.give(w, VM1, WRITE);
    let i = f.give(i, VM1, IN);
    let o = f.give(o, VM1, OUT);
    assert!(f.table.check(vm(VM1), f.wire, &[r, w, i, o]).is_ok());
    assert_eq!(f.table.check(vm(VM1), f.wire, &[r, w, o, i]).unwrap_err(), arg(2, ArgFault::MissingRights));
    assert_eq!(f.table.check(vm(VM1), f.wire, &[r, w, i, r]).unwrap_err(), arg(3, ArgFault::WrongKind));
    let bogus = CapName::from_u128(12345);
    assert_eq!(f.table.check(vm(VM1), f.wire, &[r, bogus, bogus, o]).unwrap_err(), arg(1, ArgFault::UnknownName));
    assert_eq!(f.table.check(vm(VM2), f.wire, &[r, w, i, o]).unwrap_err(), arg(0, ArgFault::WrongHolder));
}

#[test]
fn check_into_reuses_one_checked_and_leaves_it_blank_on_refusal() {
    let mut f = Fixture::new(64, 64);
    let (r, w) = (f.frame_root(1), f.frame_root(2));
    let (i, o) = (f.port_root(1), f.port_root(2));
    let r = f.give(r, VM1, READ);
    let w = f.give(w, VM1, WRITE);
    let i = f.give(i, VM1, IN);
    let o = f.give(o, VM1, OUT);
    let mut checked = Checked::blank();
    assert_eq!(checked.args().len(), 0);
    assert_eq!(checked.am(), AmId::new(0));
    // Four arguments, then one: the second call sees only its own argument.
    f.table.check_into(vm(VM1), f.wire, &[r, w, i, o], &mut checked).unwrap();
    assert_eq!((checked.op(), checked.caller(), checked.args().len()), (f.wire, vm(VM1), 4));
    f.table.check_into(vm(VM1), f.map, &[r], &mut checked).unwrap();
    assert_eq!(checked.op(), f.map);
    let [only] = checked.args() else { panic!("one argument") };
    assert_eq!((only.name(), only.id(), only.rights()), (r, ObjId::new(1), READ));
    // A refusal after a success, even one whose first arguments passed, leaves it blank:
    // it cannot pass for either check.
    assert_eq!(
        f.table.check_into(vm(VM1), f.wire, &[r, w, o, i], &mut checked).unwrap_err(),
        arg(2, ArgFault::MissingRights)
    );
    assert_eq!((checked.am(), checked.args().len()), (AmId::new(0), 0));
    f.table.check_into(vm(VM1), f.map, &[r], &mut checked).unwrap();
    assert_eq!(
        f.table.check_into(vm(VM1), f.copy, &[r], &mut checked).unwrap_err(),
        CheckError::WrongArgCount { expected: 2, presented: 1 }
    );
    assert_eq!((checked.am(), checked.args().len()), (AmId::new(0), 0));
}

// -------------------------------------------------------------------------------------
// Minting.
// -------------------------------------------------------------------------------------

#[test]
fn mint_is_reserved_to_the_implementing_am() {
    let mut f = Fixture::new(64, 64);
    let frame = Object::new(EXO, f.frame, ObjId::new(1));
    assert_eq!(f.table.mint(vm(VM1), frame, READ), Err(CapError::NotImplementer));
    assert_eq!(f.table.mint(am(NVRAM), frame, READ), Err(CapError::NotImplementer));
    let ghost = AmId::new(33);
    assert_eq!(
        f.table.mint(am(ghost), Object::new(ghost, ObjKind::new(0), ObjId::new(1)), READ),
        Err(CapError::UnknownAm)
    );
    assert_eq!(
        f.table.mint(am(EXO), Object::new(EXO, ObjKind::new(9), ObjId::new(1)), READ),
        Err(CapError::UnknownKind)
    );
    let port = Object::new(EXO, f.port, ObjId::new(1));
    assert_eq!(f.table.mint(am(EXO), port, EXEC), Err(CapError::UndefinedRights));
    assert!(f.table.is_empty());

    let root = f.table.mint(am(EXO), frame, READ | WRITE).unwrap();
    let info = f.table.inspect(am(EXO), root).unwrap();
    assert_eq!(info, CapInfo { object: frame, rights: READ | WRITE, holder: am(EXO), binding: Binding::Bound });
    // Two roots for one object are two capabilities.
    let again = f.table.mint(am(EXO), frame, READ).unwrap();
    assert_ne!(root, again);
    f.table.audit();
}

// -------------------------------------------------------------------------------------
// Quotas and capacity.
// -------------------------------------------------------------------------------------

#[test]
fn quotas_bound_each_principal() {
    let mut f = Fixture::new(64, 3);
    let root = f.frame_root(1);
    let a = f.give(root, VM1, READ);
    let _b = f.give(root, VM1, READ);
    let _c = f.table.derive(vm(VM1), a, READ).unwrap();
    assert_eq!(f.table.usage(vm(VM1)), Some(Usage { held: 3, charged: 3, quota: 3 }));
    assert_eq!(f.table.grant(am(EXO), root, vm(VM1), READ, Binding::Bound), Err(CapError::QuotaExceeded));
    assert_eq!(f.table.derive(vm(VM1), a, READ), Err(CapError::QuotaExceeded));
    // Other principals are not affected.
    assert!(f.table.grant(am(EXO), root, vm(VM2), READ, Binding::Bound).is_ok());
    // Revoked capabilities still count; deleting them gives the quota back.
    f.table.revoke(vm(VM1), a, &mut ignore).unwrap();
    assert_eq!(f.table.usage(vm(VM1)).unwrap().held, 3);
    assert_eq!(f.table.delete(vm(VM1), a, &mut ignore), Ok(0));
    assert_eq!(f.table.usage(vm(VM1)).unwrap().held, 2);
    assert!(f.table.grant(am(EXO), root, vm(VM1), READ, Binding::Bound).is_ok());
    f.table.audit();
}

#[test]
fn a_delegation_is_charged_to_the_delegator() {
    let mut f = Fixture::new(64, 4);
    let root = f.frame_root(1);
    let own = f.give(root, VM1, READ);
    // VM1 floods VM2: each delegation costs VM1, never VM2.
    let mut given = Vec::new();
    loop {
        match f.table.delegate(vm(VM1), own, vm(VM2), READ, Binding::Bound) {
            Ok(name) => given.push(name),
            Err(error) => {
                assert_eq!(error, CapError::QuotaExceeded);
                break;
            }
        }
    }
    assert_eq!(given.len(), 3, "VM1's quota of 4 holds its own capability and three it gave");
    assert_eq!(f.table.usage(vm(VM1)), Some(Usage { held: 1, charged: 4, quota: 4 }));
    assert_eq!(f.table.usage(vm(VM2)), Some(Usage { held: 3, charged: 0, quota: 4 }));
    // VM2 can still get capabilities of its own, up to its whole quota.
    let mine = f.give(root, VM2, READ);
    for _ in 0..3 {
        f.table.derive(vm(VM2), mine, READ).unwrap();
    }
    assert_eq!(f.table.derive(vm(VM2), mine, READ), Err(CapError::QuotaExceeded));
    // Revoking what it gave does not give VM1 its quota back; VM2 deleting does.
    f.table.revoke(vm(VM1), given[0], &mut ignore).unwrap();
    assert_eq!(f.table.usage(vm(VM1)).unwrap().charged, 4);
    f.table.delete(vm(VM2), given[0], &mut ignore).unwrap();
    assert_eq!(f.table.usage(vm(VM1)).unwrap().charged, 3);
    f.table.audit();
    // When the receiver goes, what it held is freed and the delegator paid back.
    f.table.remove_vm(VM2, &mut ignore).unwrap();
    assert_eq!(f.table.usage(vm(VM1)).unwrap().charged, 1);
    f.table.audit();
}

#[test]
fn a_removed_delegator_leaves_its_gifts_charged_to_no_one() {
    let mut f = Fixture::new(64, 4);
    let root = f.frame_root(1);
    let own = f.give(root, VM1, READ);
    let gift = f.table.delegate(vm(VM1), own, vm(VM2), READ, Binding::Bound).unwrap();
    f.table.remove_vm(VM1, &mut ignore).unwrap();
    assert_eq!(f.table.inspect(vm(VM2), gift), Err(CapError::Revoked));
    assert_eq!(f.table.usage(vm(VM2)), Some(Usage { held: 1, charged: 0, quota: 4 }));
    f.table.audit();
    // A VM that comes back under the same id is not charged for its predecessor's gifts.
    f.table.add_vm(VM1, 4).unwrap();
    f.table.delete(vm(VM2), gift, &mut ignore).unwrap();
    assert_eq!(f.table.usage(vm(VM1)), Some(Usage { held: 0, charged: 0, quota: 4 }));
    f.table.audit();
}

#[test]
fn quotas_bind_ams_too() {
    let mut f = Fixture::new(64, 1);
    f.frame_root(1);
    let object = Object::new(EXO, f.frame, ObjId::new(2));
    assert_eq!(f.table.mint(am(EXO), object, READ), Err(CapError::QuotaExceeded));
}

#[test]
fn set_quota_changes_the_limit_only() {
    let mut f = Fixture::new(64, 8);
    let root = f.frame_root(1);
    f.give(root, VM1, READ);
    f.give(root, VM1, READ);
    assert_eq!(f.table.set_quota(vm(VM1), 1), Ok(()));
    assert_eq!(f.table.usage(vm(VM1)), Some(Usage { held: 2, charged: 2, quota: 1 }));
    assert_eq!(f.table.grant(am(EXO), root, vm(VM1), READ, Binding::Bound), Err(CapError::QuotaExceeded));
    assert_eq!(f.table.set_quota(vm(VmId::new(77)), 1), Err(PrincipalError::UnknownPrincipal));
    assert_eq!(f.table.usage(vm(VmId::new(77))), None);
}

#[test]
fn capacity_bounds_the_table() {
    let mut f = Fixture::new(3, 100);
    let root = f.frame_root(1);
    f.give(root, VM1, READ);
    f.give(root, VM2, READ);
    assert_eq!(f.table.len(), 3);
    assert_eq!(f.table.delegate(am(EXO), root, vm(VM3), READ, Binding::Bound), Err(CapError::TableFull));
    let object = Object::new(EXO, f.frame, ObjId::new(2));
    assert_eq!(f.table.mint(am(EXO), object, READ), Err(CapError::TableFull));
    let mut empty = Fixture::new(0, 100);
    let object = Object::new(EXO, empty.frame, ObjId::new(2));
    assert_eq!(empty.table.mint(am(EXO), object, READ), Err(CapError::TableFull));
}

#[test]
fn new_holders_must_be_registered() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let stranger = vm(VmId::new(500));
    assert_eq!(f.table.delegate(am(EXO), root, stranger, READ, Binding::Bound), Err(CapError::UnknownPrincipal));
    // A stranger presenting a bearer name may use it, but not derive (it could hold nothing).
    let token = f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bearer).unwrap();
    assert!(f.table.check(stranger, f.map, &[token]).is_ok());
    assert_eq!(f.table.derive(stranger, token, READ), Err(CapError::UnknownPrincipal));
}

// -------------------------------------------------------------------------------------
// Derive, delegate, inspect.
// -------------------------------------------------------------------------------------

#[test]
fn derive_and_delegate_only_remove_rights() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let rw = f.give(root, VM1, READ | WRITE);
    let r = f.table.derive(vm(VM1), rw, READ | EXEC).unwrap();
    let info = f.table.inspect(vm(VM1), r).unwrap();
    assert_eq!(info.rights, READ);
    assert_eq!(info.holder, vm(VM1));
    assert_eq!(info.binding, Binding::Bound);
    let all = f.table.derive(vm(VM1), rw, Rights::ALL).unwrap();
    assert_eq!(f.table.inspect(vm(VM1), all).unwrap().rights, READ | WRITE);
    let none = f.table.derive(vm(VM1), rw, Rights::NONE).unwrap();
    assert_eq!(f.table.inspect(vm(VM1), none).unwrap().rights, Rights::NONE);
    let passed = f.table.delegate(vm(VM1), rw, vm(VM2), Rights::ALL, Binding::Bound).unwrap();
    assert_eq!(f.table.inspect(vm(VM2), passed).unwrap().rights, READ | WRITE);
    assert_eq!(f.table.peek(passed).unwrap().parent, Some(rw));
    f.table.audit();
}

#[test]
fn derive_of_a_bearer_name_gives_the_caller_a_bearer_child() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let token = f.table.delegate(am(EXO), root, vm(VM1), READ | WRITE, Binding::Bearer).unwrap();
    let child = f.table.derive(vm(VM2), token, READ).unwrap();
    let info = f.table.inspect(vm(VM3), child).unwrap();
    assert_eq!((info.holder, info.binding, info.rights), (vm(VM2), Binding::Bearer, READ));
}

#[test]
fn operations_on_unusable_names_fail() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let mine = f.give(root, VM1, READ);
    let bogus = CapName::from_u128(99);
    assert_eq!(f.table.derive(vm(VM1), bogus, READ), Err(CapError::UnknownName));
    assert_eq!(f.table.derive(vm(VM2), mine, READ), Err(CapError::WrongHolder));
    assert_eq!(f.table.delegate(vm(VM2), mine, vm(VM2), READ, Binding::Bearer), Err(CapError::WrongHolder));
    assert_eq!(f.table.inspect(vm(VM2), mine), Err(CapError::WrongHolder));
    assert_eq!(f.table.inspect(vm(VM1), bogus), Err(CapError::UnknownName));
    f.table.revoke(vm(VM1), mine, &mut ignore).unwrap();
    assert_eq!(f.table.derive(vm(VM1), mine, READ), Err(CapError::Revoked));
    assert_eq!(f.table.delegate(vm(VM1), mine, vm(VM2), READ, Binding::Bound), Err(CapError::Revoked));
    assert_eq!(f.table.inspect(vm(VM1), mine), Err(CapError::Revoked));
    assert_eq!(f.table.inspect(vm(VM2), mine), Err(CapError::WrongHolder));
}

// -------------------------------------------------------------------------------------
// Revoke and delete.
// -------------------------------------------------------------------------------------

#[test]
fn revoke_kills_the_subtree_and_tells_the_hook() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let a = f.give(root, VM1, READ | WRITE);
    let b = f.give(root, VM2, READ);
    let a1 = f.table.derive(vm(VM1), a, READ).unwrap();
    let a2 = f.table.delegate(vm(VM1), a, vm(VM3), WRITE, Binding::Bearer).unwrap();
    let a11 = f.table.delegate(vm(VM1), a1, vm(VM2), READ, Binding::Bound).unwrap();
    let mut hook = Recorder::default();
    assert_eq!(f.table.revoke(vm(VM1), a, &mut hook), Ok(4));
    assert_eq!(hook.finished, 1);
    let mut dead: Vec<CapName> = hook.dead.iter().map(|d| d.name).collect();
    dead.sort();
    let mut expected = vec![a, a1, a2, a11];
    expected.sort();
    assert_eq!(dead, expected);
    // Descendants die before their ancestors.
    let position = |name| hook.dead.iter().position(|d| d.name == name).unwrap();
    assert!(position(a11) < position(a1) && position(a1) < position(a));
    assert!(position(a2) < position(a));
    let a11_death = hook.dead[position(a11)];
    assert_eq!(
        a11_death,
        DeadCap { name: a11, object: Object::new(EXO, f.frame, ObjId::new(1)), rights: READ, holder: vm(VM2) }
    );
    for name in [a1, a2] {
        assert!(!f.table.peek(name).unwrap().live);
    }
    assert_eq!(f.table.inspect(vm(VM2), a11), Err(CapError::Revoked));
    assert!(f.table.inspect(vm(VM2), b).is_ok());
    assert!(f.table.inspect(am(EXO), root).is_ok());
    f.table.audit();
}

#[test]
fn revoke_authority() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let a = f.give(root, VM1, READ);
    let a1 = f.table.delegate(vm(VM1), a, vm(VM2), READ, Binding::Bound).unwrap();
    let a11 = f.table.delegate(vm(VM2), a1, vm(VM3), READ, Binding::Bound).unwrap();
    // Neither a stranger nor a grandparent's holder may revoke it directly.
    assert_eq!(f.table.revoke(vm(VM3), a1, &mut ignore), Err(CapError::WrongHolder));
    assert_eq!(f.table.revoke(vm(VM1), a11, &mut ignore), Err(CapError::WrongHolder));
    assert_eq!(f.table.revoke(am(EXO), a11, &mut ignore), Err(CapError::WrongHolder));
    assert_eq!(f.table.revoke(vm(VM1), CapName::from_u128(5), &mut ignore), Err(CapError::UnknownName));
    // The delegator may take back what it delegated.
    assert_eq!(f.table.revoke(vm(VM1), a1, &mut ignore), Ok(2));
    assert_eq!(f.table.revoke(vm(VM2), a1, &mut ignore), Err(CapError::Revoked));
    // A holder may revoke its own; a bearer name may be revoked by whoever presents it.
    let token = f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bearer).unwrap();
    assert_eq!(f.table.revoke(vm(VM3), token, &mut ignore), Ok(1));
    assert_eq!(f.table.revoke(am(EXO), root, &mut ignore), Ok(2));
    f.table.audit();
}

#[test]
fn delete_frees_the_slot_and_revokes_the_subtree() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let a = f.give(root, VM1, READ);
    let a1 = f.table.delegate(vm(VM1), a, vm(VM2), READ, Binding::Bearer).unwrap();
    assert_eq!(f.table.delete(vm(VM2), a, &mut ignore), Err(CapError::WrongHolder));
    // Bearer names are usable by anyone, but only their holder may delete them.
    assert_eq!(f.table.delete(vm(VM1), a1, &mut ignore), Err(CapError::WrongHolder));
    let mut hook = Recorder::default();
    assert_eq!(f.table.delete(vm(VM1), a, &mut hook), Ok(2));
    assert_eq!(hook.dead.len(), 2);
    assert_eq!(f.table.inspect(vm(VM1), a), Err(CapError::UnknownName));
    assert_eq!(f.table.inspect(vm(VM2), a1), Err(CapError::Revoked));
    assert_eq!(f.table.usage(vm(VM1)).unwrap().held, 0);
    assert_eq!(f.table.delete(vm(VM1), a, &mut ignore), Err(CapError::UnknownName));
    let mut hook = Recorder::default();
    assert_eq!(f.table.delete(vm(VM2), a1, &mut hook), Ok(0));
    assert!(hook.dead.is_empty());
    assert_eq!(f.table.len(), 1);
    f.table.audit();
}

#[test]
fn freed_slots_are_reused_under_new_names() {
    let mut f = Fixture::new(4, 64);
    let root = f.frame_root(1);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let a = f.give(root, VM1, READ);
        let b = f.give(root, VM2, READ);
        assert!(seen.insert(a) && seen.insert(b), "names are never reissued");
        f.table.delete(vm(VM1), a, &mut ignore).unwrap();
        f.table.revoke(vm(VM2), b, &mut ignore).unwrap();
        f.table.delete(vm(VM2), b, &mut ignore).unwrap();
        assert_eq!(f.table.inspect(vm(VM1), a), Err(CapError::UnknownName));
    }
    assert_eq!(f.table.len(), 1);
    f.table.audit();
}

// -------------------------------------------------------------------------------------
// Principals.
// -------------------------------------------------------------------------------------

#[test]
fn add_vm_refuses_duplicates() {
    let mut f = Fixture::new(8, 8);
    assert_eq!(f.table.add_vm(VM1, 3), Err(PrincipalError::AlreadyRegistered));
    assert_eq!(f.table.add_vm(VmId::new(10), 3), Ok(()));
    assert_eq!(f.table.usage(vm(VmId::new(10))), Some(Usage { held: 0, charged: 0, quota: 3 }));
}

#[test]
fn remove_vm_revokes_and_frees_everything_it_held() {
    let mut f = Fixture::new(64, 64);
    let root = f.frame_root(1);
    let a = f.give(root, VM1, READ | WRITE);
    let b = f.give(root, VM2, READ);
    let a1 = f.table.derive(vm(VM1), a, READ).unwrap();
    let a2 = f.table.delegate(vm(VM1), a, vm(VM3), READ, Binding::Bound).unwrap();
    let c = f.table.delegate(vm(VM2), b, vm(VM1), READ, Binding::Bound).unwrap();
    f.table.revoke(vm(VM1), a1, &mut ignore).unwrap();
    let mut hook = Recorder::default();
    // a, a2 (held by VM3, derived from a) and c die; a1 was dead already.
    assert_eq!(f.table.remove_vm(VM1, &mut hook), Ok(3));
    assert_eq!(hook.dead.len(), 3);
    assert_eq!(hook.finished, 1);
    for name in [a, a1, c] {
        assert_eq!(f.table.peek(name), None);
    }
    assert_eq!(f.table.inspect(vm(VM3), a2), Err(CapError::Revoked));
    assert!(f.table.inspect(vm(VM2), b).is_ok());
    assert_eq!(f.table.usage(vm(VM1)), None);
    assert_eq!(f.table.remove_vm(VM1, &mut ignore), Err(PrincipalError::UnknownPrincipal));
    assert_eq!(f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bound), Err(CapError::UnknownPrincipal));
    f.table.audit();
    // The VM may come back, with nothing.
    f.table.add_vm(VM1, 4).unwrap();
    assert_eq!(f.table.usage(vm(VM1)), Some(Usage { held: 0, charged: 0, quota: 4 }));
    f.table.audit();
}

// -------------------------------------------------------------------------------------
// The hypercall path's check and the principal hint (issue 14).
// -------------------------------------------------------------------------------------

#[test]
fn check_slots_into_agrees_with_check() {
    let mut f = Fixture::new(64, 64);
    let (frame, port) = (f.frame_root(1), f.port_root(2));
    let (r, w) = (f.give(frame, VM1, READ), f.give(frame, VM1, WRITE));
    let (i, o) = (f.give(port, VM1, IN), f.give(port, VM1, OUT));
    let other = f.give(frame, VM2, RWX);
    let unknown = CapName::from_u128(0x7_0000_0000_0000_0000_0000_0000_1234);
    // A name presented in several arguments is resolved once (issue 14): each argument
    // still gets its own kind and rights check, and every refusal names its argument.
    let cases: [(OpId, [CapName; MAX_CAP_ARGS]); 16] = [
        (f.wire, [r, w, i, o]),
        (f.copy, [r, w, unknown, unknown]),
        (f.copy, [w, r, i, o]),
        (f.wire, [r, w, o, i]),
        (f.map, [other, r, r, r]),
        (f.map, [unknown, r, r, r]),
        (f.wire, [r, r, i, o]),
        (f.wire, [w, w, i, o]),
        (f.wire, [r, w, i, i]),
        (f.wire, [r, w, r, o]),
        (f.copy, [r, w, w, w]),
        (f.wire, [frame, frame, i, o]),
        // One-argument operations take their own path (issue 14): a pass, a missing
        // right, a wrong kind, and a capability of another holder.
        (f.map, [r, unknown, unknown, unknown]),
        (f.map, [w, r, r, r]),
        (f.map, [i, r, r, r]),
        (f.map, [other, other, other, other]),
    ];
    for (op, slots) in cases {
        let arity = f.table.registry().op_args(op).unwrap().len();
        let expected = f.table.check(vm(VM1), op, &slots[..arity]);
        let mut checked = Checked::blank();
        let got = f.table.check_slots_into(vm(VM1), op, slots, &mut checked);
        match expected {
            Ok(want) => {
                assert_eq!(got, Ok(()));
                assert_eq!(checked.op(), want.op());
                assert_eq!(checked.args(), want.args());
            }
            Err(want) => {
                assert_eq!(got, Err(want));
                assert!(checked.args().is_empty(), "a refused check leaves the arguments blank");
            }
        }
    }
    // Fewer slots than the operation takes: refused, never read past them.
    let mut checked = Checked::blank();
    assert_eq!(
        f.table.check_slots_into(vm(VM1), f.wire, [r, w], &mut checked),
        Err(CheckError::WrongArgCount { expected: 4, presented: 2 })
    );
    assert!(checked.args().is_empty());
    assert_eq!(
        f.table.check_slots_into(vm(VM1), OpId::new(EXO, 99), [r], &mut checked),
        Err(CheckError::UnknownOperation)
    );
}

#[test]
fn a_stale_principal_hint_charges_the_right_principal() {
    let mut f = Fixture::new(64, 8);
    let frame = f.frame_root(1);
    let (c1, c2, c3) = (f.give(frame, VM1, RWX), f.give(frame, VM2, RWX), f.give(frame, VM3, RWX));
    // The hint now points at VM 3's entry; removing VM 1 moves every later entry down.
    f.table.derive(vm(VM3), c3, READ).unwrap();
    f.table.remove_vm(VM1, &mut ignore).unwrap();
    assert!(f.table.derive(vm(VM1), c1, READ).is_err());
    let before = (f.table.usage(vm(VM2)).unwrap(), f.table.usage(vm(VM3)).unwrap());
    f.table.derive(vm(VM2), c2, READ).unwrap();
    let after = (f.table.usage(vm(VM2)).unwrap(), f.table.usage(vm(VM3)).unwrap());
    assert_eq!(after.0.held, before.0.held + 1, "VM 2 holds its derived capability");
    assert_eq!(after.0.charged, before.0.charged + 1, "and pays for it");
    assert_eq!((after.1.held, after.1.charged), (before.1.held, before.1.charged), "VM 3 is not charged");
    // A principal registered again lands where the hint may point: still found exactly.
    f.table.add_vm(VM1, 8).unwrap();
    let (_, root) = (f.table.usage(vm(VM1)).unwrap(), f.frame_root(2));
    let mine = f.give(root, VM1, RWX);
    f.table.derive(vm(VM1), mine, READ).unwrap();
    assert_eq!(f.table.usage(vm(VM1)).unwrap().held, 2);
    assert_eq!(f.table.usage(vm(VM3)).unwrap().held, after.1.held);
}
