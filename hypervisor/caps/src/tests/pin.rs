//! Process binding (`table/pin.rs`): a capability bound to one page-table root is refused
//! to every other root of its VM, as another principal's would be, and nothing changes.

use super::*;
use std::cell::Cell;

std::thread_local! {
    /// The root "the current call" was made with (each test thread its own).
    static ROOT: Cell<u64> = const { Cell::new(NO_ROOT) };
}

fn current_root() -> u64 {
    ROOT.with(Cell::get)
}

/// Makes the next calls come from root `root` (process A: 0x1000_0000, B: 0x2000_0000).
fn on(root: u64) {
    ROOT.with(|r| r.set(root));
}

const A: u64 = 0x1000_0000;
const B: u64 = 0x2000_0000;

/// A fixture whose VM1 holds a frame capability (all rights), bound to root A.
fn bound_fixture() -> (Fixture, CapName, CapName) {
    let mut f = Fixture::new(64, 64);
    f.table.set_root_reader(current_root);
    let root = f.frame_root(1);
    let cap = f.give(root, VM1, RWX);
    on(A);
    assert_eq!(f.table.bind_process(vm(VM1), cap), Ok(A));
    (f, root, cap)
}

fn arg0(fault: ArgFault) -> CheckError {
    CheckError::Arg { index: 0, fault }
}

#[test]
fn a_bound_capability_serves_its_root_only() {
    let (mut f, _, cap) = bound_fixture();
    assert!(f.table.check(vm(VM1), f.map, &[cap]).is_ok());
    assert_eq!(f.table.inspect(vm(VM1), cap).unwrap().binding, Binding::Process);
    on(B);
    assert_eq!(f.table.check(vm(VM1), f.map, &[cap]).unwrap_err(), arg0(ArgFault::WrongHolder));
    assert_eq!(f.table.inspect(vm(VM1), cap), Err(CapError::WrongHolder));
    assert_eq!(f.table.derive(vm(VM1), cap, READ), Err(CapError::WrongHolder));
    assert_eq!(f.table.delegate(vm(VM1), cap, vm(VM2), READ, Binding::Bound), Err(CapError::WrongHolder));
    assert_eq!(f.table.revoke(vm(VM1), cap, &mut ignore), Err(CapError::WrongHolder));
    assert_eq!(f.table.delete(vm(VM1), cap, &mut ignore), Err(CapError::WrongHolder));
    // Nor can B rebind it to itself.
    assert_eq!(f.table.bind_process(vm(VM1), cap), Err(CapError::WrongHolder));
    // An unknown root (the reader failed) matches nothing.
    on(NO_ROOT);
    assert_eq!(f.table.check(vm(VM1), f.map, &[cap]).unwrap_err(), arg0(ArgFault::WrongHolder));
    // Another VM with A's root is still another principal.
    on(A);
    assert_eq!(f.table.check(vm(VM2), f.map, &[cap]).unwrap_err(), arg0(ArgFault::WrongHolder));
    // Nothing changed: A still uses it, the table is consistent, one capability below the root.
    assert!(f.table.check(vm(VM1), f.map, &[cap]).is_ok());
    assert_eq!(f.table.len(), 2);
    f.table.check_consistency().unwrap();
}

#[test]
fn binding_is_one_way_and_needs_a_bound_capability() {
    let (mut f, root, cap) = bound_fixture();
    // Again from A: no change.
    assert_eq!(f.table.bind_process(vm(VM1), cap), Ok(A));
    assert!(f.table.check(vm(VM1), f.map, &[cap]).is_ok());
    // A bearer capability, or a call whose root is unknown, is not bindable.
    let bearer = f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bearer).unwrap();
    assert_eq!(f.table.bind_process(vm(VM1), bearer), Err(CapError::NotBindable));
    let plain = f.give(root, VM1, READ);
    on(NO_ROOT);
    assert_eq!(f.table.bind_process(vm(VM1), plain), Err(CapError::NotBindable));
    // A capability of another VM is not the caller's to bind.
    on(A);
    let theirs = f.give(root, VM2, READ);
    assert_eq!(f.table.bind_process(vm(VM1), theirs), Err(CapError::WrongHolder));
    assert_eq!(f.table.inspect(vm(VM1), bearer).unwrap().binding, Binding::Bearer);
    assert_eq!(f.table.inspect(vm(VM1), plain).unwrap().binding, Binding::Bound);
    f.table.check_consistency().unwrap();
}

#[test]
fn derived_copies_stay_bound_and_delegations_are_the_process_s_choice() {
    let (mut f, _, cap) = bound_fixture();
    let copy = f.table.derive(vm(VM1), cap, READ).unwrap();
    assert_eq!(f.table.inspect(vm(VM1), copy).unwrap().binding, Binding::Process);
    assert!(f.table.check(vm(VM1), f.map, &[copy]).is_ok());
    let given = f.table.delegate(vm(VM1), cap, vm(VM2), READ, Binding::Bound).unwrap();
    on(B);
    assert_eq!(f.table.check(vm(VM1), f.map, &[copy]).unwrap_err(), arg0(ArgFault::WrongHolder));
    // VM2's copy is VM2's, bound to it (whatever its root).
    assert!(f.table.check(vm(VM2), f.map, &[given]).is_ok());
    f.table.check_consistency().unwrap();
}

#[test]
fn the_parent_s_holder_still_revokes_and_deaths_free_the_pins() {
    let (mut f, root, cap) = bound_fixture();
    let copy = f.table.derive(vm(VM1), cap, READ).unwrap();
    on(B);
    // The exo AM holds the parent: it takes its capability back from any root.
    assert_eq!(f.table.revoke(am(EXO), cap, &mut ignore), Ok(2));
    // B does not learn that it died.
    assert_eq!(f.table.check(vm(VM1), f.map, &[cap]).unwrap_err(), arg0(ArgFault::WrongHolder));
    on(A);
    assert_eq!(f.table.check(vm(VM1), f.map, &[cap]).unwrap_err(), arg0(ArgFault::Revoked));
    f.table.check_consistency().unwrap();
    assert_eq!(f.table.delete(vm(VM1), copy, &mut ignore), Ok(0));
    assert_eq!(f.table.delete(vm(VM1), cap, &mut ignore), Ok(0));
    f.table.check_consistency().unwrap();
    // The slots are reused by plain capabilities, which any root of VM1 uses.
    let fresh = f.give(root, VM1, READ);
    on(B);
    assert!(f.table.check(vm(VM1), f.map, &[fresh]).is_ok());
    // A VM's removal frees its bound capabilities and their pins.
    on(A);
    let again = f.give(root, VM1, READ);
    f.table.bind_process(vm(VM1), again).unwrap();
    f.table.remove_vm(VM1, &mut ignore).unwrap();
    f.table.check_consistency().unwrap();
}

#[test]
fn an_unbound_check_never_reads_the_root() {
    // The reader panics: bound and bearer capabilities must not ask it.
    fn no_reading() -> u64 {
        panic!("the root was read for a capability that is not process-bound")
    }
    let mut f = Fixture::new(64, 64);
    f.table.set_root_reader(no_reading);
    let root = f.frame_root(1);
    let cap = f.give(root, VM1, RWX);
    let bearer = f.table.delegate(am(EXO), root, vm(VM1), READ, Binding::Bearer).unwrap();
    assert!(f.table.check(vm(VM1), f.map, &[cap]).is_ok());
    assert!(f.table.check(vm(VM2), f.map, &[bearer]).is_ok());
    assert_eq!(f.table.check(vm(VM2), f.map, &[cap]).unwrap_err(), arg0(ArgFault::WrongHolder));
    f.table.derive(vm(VM1), cap, READ).unwrap();
}

#[test]
fn the_slot_check_starts_again_for_a_bound_argument() {
    let (mut f, root, cap) = bound_fixture();
    let plain = f.give(root, VM1, RWX);
    let mut checked = Checked::blank();
    // A: both arguments pass, in order.
    f.table.check_slots_into(vm(VM1), f.copy, [plain, cap], &mut checked).unwrap();
    assert_eq!(checked.args().iter().map(CheckedCap::name).collect::<Vec<_>>(), [plain, cap]);
    f.table.check_slots_into(vm(VM1), f.copy, [cap, plain, cap], &mut checked).unwrap();
    // A one-argument operation's own path starts again the same way (issue 14).
    f.table.check_slots_into(vm(VM1), f.map, [cap], &mut checked).unwrap();
    assert_eq!(checked.args().iter().map(CheckedCap::name).collect::<Vec<_>>(), [cap]);
    assert_eq!(
        f.table.check_slots_into(vm(VM1), f.map, [], &mut checked),
        Err(CheckError::WrongArgCount { expected: 1, presented: 0 })
    );
    // Too few slots is still a wrong count, bound argument or not.
    assert_eq!(
        f.table.check_slots_into(vm(VM1), f.copy, [cap], &mut checked),
        Err(CheckError::WrongArgCount { expected: 2, presented: 1 })
    );
    // B: refused at the bound argument's index, and `checked` is left blank.
    on(B);
    assert_eq!(f.table.check_slots_into(vm(VM1), f.copy, [plain, cap], &mut checked), Err(arg1(ArgFault::WrongHolder)));
    assert!(checked.args().is_empty());
    assert_eq!(f.table.check_slots_into(vm(VM1), f.map, [cap], &mut checked), Err(arg0(ArgFault::WrongHolder)));
    assert!(checked.args().is_empty());
    assert_eq!(f.table.check(vm(VM1), f.copy, &[plain, cap]).unwrap_err(), arg1(ArgFault::WrongHolder));
    // A revoked bound capability is "revoked" to A only.
    on(A);
    f.table.revoke(am(EXO), cap, &mut ignore).unwrap();
    assert_eq!(f.table.check(vm(VM1), f.copy, &[plain, cap]).unwrap_err(), arg1(ArgFault::Revoked));
}

fn arg1(fault: ArgFault) -> CheckError {
    CheckError::Arg { index: 1, fault }
}
