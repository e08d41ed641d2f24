use super::*;
use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status};
use nk_caps::{FixedSeed, KernelId};
use nk_core::NullKernel;

const VM1: VmId = VmId::new(1);
const VM2: VmId = VmId::new(2);

fn kernel() -> (NullKernel, u16) {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(3)).unwrap();
    let ports = PortRange::new(0x80, 4).unwrap();
    let assignment = VmAssignment { vm: Some(VM1), ports: Some(ports), msrs: alloc::vec![0xC000_0100], memory: None };
    let exo = nk.add_am(alloc::boxed::Box::new(ExoAm::new(alloc::vec![assignment])), 64).unwrap().raw();
    nk.set_caller_ring(|| 0);
    nk.add_vm(VM1, 64).unwrap();
    nk.add_vm(VM2, 64).unwrap();
    (nk, exo)
}

fn call(nk: &mut NullKernel, vm: VmId, am: u16, op: u16, cap: NameWords, args: &[u64]) -> Reply {
    let mut call = Call { selector: Selector::new(am, op.into()).encode(), ..Call::default() };
    call.caps[0] = cap;
    call.args[..args.len()].copy_from_slice(args);
    nk.dispatch(vm, &call, &mut Vec::new()).reply().expect("one kernel instance finishes every call at once")
}

fn initial(nk: &mut NullKernel, vm: VmId) -> Reply {
    call(nk, vm, 0, nk_op::INITIAL as u16, NameWords::default(), &[0])
}

#[test]
fn only_the_assigned_vm_gets_ports() {
    let (mut nk, exo) = kernel();
    let reply = initial(&mut nk, VM1);
    assert!(reply.status().is_ok());
    assert_eq!(reply.results[0], u64::from(exo));
    assert_eq!(initial(&mut nk, VM2).status().code(), Status::BAD_ARGUMENT);
}

#[test]
fn open_emits_the_grant_and_revoke_takes_it_back() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    let opened = call(&mut nk, VM1, exo, op::OPEN, cap, &[0x81, 2, 3]);
    assert!(opened.status().is_ok(), "{}", opened.status());
    let allow = Effect::IoPorts { vm: VM1, first: 0x81, count: 2, access: 3, allow: true };
    assert_eq!(nk.take_effects(), [allow]);
    let revoked = call(&mut nk, VM1, 0, nk_op::REVOKE as u16, cap, &[]);
    assert!(revoked.status().is_ok());
    assert_eq!(nk.take_effects(), [Effect::IoPorts { vm: VM1, first: 0x81, count: 2, access: 3, allow: false }]);
}

#[test]
fn a_derived_capability_opens_only_what_its_rights_allow_and_dies_with_its_parent() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    let in_only = call(&mut nk, VM1, 0, nk_op::DERIVE as u16, cap, &[0b01]).name;
    let out = call(&mut nk, VM1, exo, op::OPEN, in_only, &[0x80, 1, u64::from(port_access::OUT)]);
    assert_eq!(out.status().code(), Status::NOT_PERMITTED);
    assert!(call(&mut nk, VM1, exo, op::OPEN, in_only, &[0x80, 1, u64::from(port_access::IN)]).status().is_ok());
    nk.take_effects();
    assert!(call(&mut nk, VM1, 0, nk_op::REVOKE as u16, cap, &[]).status().is_ok());
    assert_eq!(nk.take_effects().len(), 1, "the child's opening is closed when the parent is revoked");
}

#[test]
fn bad_ranges_and_access_change_nothing() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    for args in [[0x7F, 1, 3], [0x80, 5, 3], [0x80, 0, 3], [0x80, 1, 0], [0x80, 1, 4], [0x1_0000, 1, 3]] {
        assert_eq!(call(&mut nk, VM1, exo, op::OPEN, cap, &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    assert!(!nk.has_effects());
    let stolen = call(&mut nk, VM2, exo, op::OPEN, cap, &[0x80, 1, 3]);
    assert_eq!(stolen.status().code(), Status::WRONG_HOLDER);
    assert!(!nk.has_effects());
}

#[test]
fn close_and_vm_removal_take_access_back() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    call(&mut nk, VM1, exo, op::OPEN, cap, &[0x80, 2, 3]);
    call(&mut nk, VM1, exo, op::OPEN, cap, &[0x82, 2, 1]);
    nk.take_effects();
    let closed = call(&mut nk, VM1, exo, op::CLOSE, cap, &[0x80, 2]);
    assert_eq!(closed.results[0], 1);
    assert_eq!(nk.take_effects().len(), 1);
    nk.remove_vm(VM1, &mut Vec::new()).unwrap();
    assert_eq!(nk.take_effects(), [Effect::IoPorts { vm: VM1, first: 0x82, count: 2, access: 1, allow: false }]);
}

#[test]
fn msr_grants_follow_rights_and_die_with_the_capability() {
    let (mut nk, exo) = kernel();
    let msr = call(&mut nk, VM1, 0, nk_op::INITIAL as u16, NameWords::default(), &[1]);
    assert!(msr.status().is_ok(), "{}", msr.status());
    let read_only = call(&mut nk, VM1, 0, nk_op::DERIVE as u16, msr.name, &[0b01]).name;
    let write = call(&mut nk, VM1, exo, op::OPEN_MSR, read_only, &[u64::from(msr_access::WRITE)]);
    assert_eq!(write.status().code(), Status::NOT_PERMITTED);
    assert_eq!(call(&mut nk, VM1, exo, op::OPEN_MSR, msr.name, &[4]).status().code(), Status::BAD_ARGUMENT);
    assert!(!nk.has_effects());
    assert!(call(&mut nk, VM1, exo, op::OPEN_MSR, msr.name, &[3]).status().is_ok());
    assert_eq!(nk.take_effects(), [Effect::Msr { vm: VM1, msr: 0xC000_0100, access: 3, allow: true }]);
    assert!(call(&mut nk, VM1, 0, nk_op::REVOKE as u16, msr.name, &[]).status().is_ok());
    assert_eq!(nk.take_effects(), [Effect::Msr { vm: VM1, msr: 0xC000_0100, access: 3, allow: false }]);
}

#[test]
fn opening_the_same_thing_again_adds_nothing() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    for _ in 0..1000 {
        assert!(call(&mut nk, VM1, exo, op::OPEN, cap, &[0x80, 1, 3]).status().is_ok());
    }
    assert_eq!(nk.take_effects().len(), 1, "one opening, one effect");
    let msr = call(&mut nk, VM1, 0, nk_op::INITIAL as u16, NameWords::default(), &[1]).name;
    for _ in 0..1000 {
        assert!(call(&mut nk, VM1, exo, op::OPEN_MSR, msr, &[3]).status().is_ok());
    }
    assert_eq!(nk.take_effects().len(), 1);
    let closed = call(&mut nk, VM1, exo, op::CLOSE, cap, &[0x80, 1]);
    assert_eq!(closed.results[0], 1);
}

#[test]
fn a_vm_runs_out_of_openings_with_a_quota_status() {
    let (mut nk, exo) = kernel();
    let cap = initial(&mut nk, VM1).name;
    // Distinct openings: every (first, count, access) within the four ports.
    let mut opened = 0;
    let mut refused = None;
    'all: for first in 0x80..0x84u64 {
        for count in 1..=(0x84 - first) {
            for access in 1..=3 {
                let status = call(&mut nk, VM1, exo, op::OPEN, cap, &[first, count, access]).status();
                if !status.is_ok() {
                    refused = Some(status);
                    break 'all;
                }
                opened += 1;
            }
        }
    }
    // Four ports give only 30 distinct openings; derived capabilities make more.
    assert_eq!((opened, refused), (30, None));
    let mut children = Vec::new();
    let status = loop {
        let child = call(&mut nk, VM1, 0, nk_op::DERIVE as u16, cap, &[u64::MAX]).name;
        children.push(child);
        let status = call(&mut nk, VM1, exo, op::OPEN, child, &[0x80, 4, 3]).status();
        if !status.is_ok() {
            break status;
        }
        opened += 1;
    };
    assert_eq!(status.code(), Status::QUOTA_EXCEEDED);
    assert_eq!(opened, OPENED_PER_VM);
    // Giving one back makes room again.
    let closed = call(&mut nk, VM1, exo, op::CLOSE, cap, &[0x80, 1]);
    assert!(closed.results[0] >= 1);
    let last = *children.last().unwrap();
    assert!(call(&mut nk, VM1, exo, op::OPEN, last, &[0x80, 4, 3]).status().is_ok());
}

/// The operation names this AM registers have exactly the numbers the shared ABI crate
/// gives guests (`nk_abi::exo_op`), and there are no others.
#[test]
fn registered_op_numbers_are_the_shared_abis() {
    use nk_am::AbstractMachine as _;
    let mut table =
        nk_caps::CapTable::new(nk_caps::KernelId::new(0), 64, &mut nk_caps::FixedSeed::from_u64(1)).unwrap();
    let id = nk_caps::AmId::new(1);
    let mut am = ExoAm::new(alloc::vec![]);
    table.register_am(id, am.name(), 16).unwrap();
    am.register(&mut nk_am::Registrar::new(id, &mut table)).unwrap();
    let ops = [
        ("open", nk_abi::exo_op::OPEN),
        ("close", nk_abi::exo_op::CLOSE),
        ("open-msr", nk_abi::exo_op::OPEN_MSR),
        ("alloc", nk_abi::exo_op::ALLOC),
        ("split", nk_abi::exo_op::SPLIT),
        ("map", nk_abi::exo_op::MAP),
        ("unmap", nk_abi::exo_op::UNMAP),
        ("protect", nk_abi::exo_op::PROTECT),
        ("free", nk_abi::exo_op::FREE),
        ("dirty", nk_abi::exo_op::DIRTY),
        ("pml-enable", nk_abi::exo_op::PML_ENABLE),
        ("pml-drain", nk_abi::exo_op::PML_DRAIN),
        ("dirty-read", nk_abi::exo_op::DIRTY_READ),
    ];
    for (name, number) in ops {
        let found = table.registry().find_op(id, name).map(|op| u32::from(op.index()));
        assert_eq!(found, Some(number), "operation {name}");
    }
    let past = u16::try_from(ops.len()).unwrap();
    assert_eq!(table.registry().op_name(nk_caps::OpId::new(id, past)), None, "an operation nk-abi lacks");
}
