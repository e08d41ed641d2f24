use super::*;
use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status};
use nk_caps::{FixedSeed, KernelId};
use nk_core::NullKernel;

const CONTROL: VmId = VmId::new(1);
const WORKER: VmId = VmId::new(2);
const VICTIM: VmId = VmId::new(3);

fn kernel() -> (NullKernel, u16, Arc<VmBoard>) {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(7)).unwrap();
    let board = Arc::new(VmBoard::new(alloc::vec![
        VmRecord::new(CONTROL, "control", image::BARE_METAL, 4 << 20, 0),
        VmRecord::new(WORKER, "worker", image::BARE_METAL, 8 << 20, 1),
        VmRecord::new(VICTIM, "victim", image::LINUX, 128 << 20, 1),
    ]));
    let grants = alloc::vec![
        VmGrant { holder: CONTROL, target: WORKER },
        VmGrant { holder: CONTROL, target: VICTIM },
        VmGrant { holder: WORKER, target: WORKER },
    ];
    let am = nk.add_am(alloc::boxed::Box::new(GuestOsAm::new(board.clone(), grants)), 64).unwrap().raw();
    nk.set_caller_ring(|| 0);
    for vm in [CONTROL, WORKER, VICTIM] {
        nk.add_vm(vm, 64).unwrap();
    }
    (nk, am, board)
}

fn call(nk: &mut NullKernel, vm: VmId, am: u16, op: u16, cap: NameWords, args: &[u64]) -> Reply {
    let mut call = Call { selector: Selector::new(am, op.into()).encode(), ..Call::default() };
    call.caps[0] = cap;
    call.args[..args.len()].copy_from_slice(args);
    nk.dispatch(vm, &call, &mut Vec::new()).reply().expect("one kernel instance finishes every call at once")
}

fn initial(nk: &mut NullKernel, vm: VmId, index: u64) -> Reply {
    call(nk, vm, 0, nk_op::INITIAL as u16, NameWords::default(), &[index])
}

#[test]
fn manages_grants_one_capability_per_named_vm_and_none_to_itself() {
    let (mut nk, am, _) = kernel();
    let worker = initial(&mut nk, CONTROL, 0);
    assert!(worker.status().is_ok());
    assert_eq!(worker.results[0], u64::from(am));
    assert!(initial(&mut nk, CONTROL, 1).status().is_ok());
    assert_eq!(initial(&mut nk, CONTROL, 2).status().code(), Status::BAD_ARGUMENT);
    // The worker named itself: refused at grant time, so it has nothing.
    assert_eq!(initial(&mut nk, WORKER, 0).status().code(), Status::BAD_ARGUMENT);
    let info = call(&mut nk, CONTROL, 0, nk_op::INSPECT as u16, worker.name, &[]);
    assert_eq!(info.results[1], u64::from(WORKER.raw()));
    assert_eq!(info.results[2], 0b1111);
}

#[test]
fn inspect_reads_what_the_hypervisor_published() {
    let (mut nk, am, board) = kernel();
    let cap = initial(&mut nk, CONTROL, 1).name;
    let record = board.get(VICTIM).unwrap();
    record.set_state(state::RUNNING);
    record.set_exits(1234);
    let info = call(&mut nk, CONTROL, am, op::INSPECT, cap, &[]);
    assert!(info.status().is_ok(), "{}", info.status());
    assert_eq!(info.results, [u64::from(state::RUNNING) | u64::from(image::LINUX) << 8 | 1 << 16, 128 << 20, 1234, 3]);
    assert!(nk.take_effects().is_empty(), "inspect changes nothing");
}

#[test]
fn stop_start_destroy_emit_control_effects() {
    let (mut nk, am, _) = kernel();
    let cap = initial(&mut nk, CONTROL, 0).name;
    for (op, action) in [(op::STOP, VmAction::Stop), (op::START, VmAction::Start), (op::DESTROY, VmAction::Destroy)] {
        assert!(call(&mut nk, CONTROL, am, op, cap, &[]).status().is_ok());
        assert_eq!(nk.take_effects(), [Effect::VmControl { vm: WORKER, action, by: CONTROL }]);
    }
}

#[test]
fn a_vm_without_the_capability_is_refused() {
    let (mut nk, am, _) = kernel();
    let cap = initial(&mut nk, CONTROL, 0).name;
    let stolen = call(&mut nk, VICTIM, am, op::STOP, cap, &[]);
    assert_eq!(stolen.status(), Status::new(Status::WRONG_HOLDER, Some(0)));
    let forged = call(&mut nk, VICTIM, am, op::STOP, NameWords { low: 0x1234, high: 0x5678 }, &[]);
    assert_eq!(forged.status(), Status::new(Status::UNKNOWN_NAME, Some(0)));
    assert!(nk.take_effects().is_empty());
}

#[test]
fn an_inspect_only_copy_cannot_stop_start_or_destroy() {
    let (mut nk, am, _) = kernel();
    let cap = initial(&mut nk, CONTROL, 0).name;
    let read_only = call(&mut nk, CONTROL, 0, nk_op::DERIVE as u16, cap, &[rights::INSPECT]);
    assert!(read_only.status().is_ok());
    assert!(call(&mut nk, CONTROL, am, op::INSPECT, read_only.name, &[]).status().is_ok());
    for op in [op::STOP, op::START, op::DESTROY] {
        let refused = call(&mut nk, CONTROL, am, op, read_only.name, &[]);
        assert_eq!(refused.status(), Status::new(Status::MISSING_RIGHTS, Some(0)));
    }
    assert!(nk.take_effects().is_empty());
    // Delegated to the worker, it lets the worker inspect only.
    let given = call(&mut nk, CONTROL, 0, nk_op::DELEGATE as u16, read_only.name, &[u64::MAX, 2, 0]);
    assert!(given.status().is_ok());
    assert!(call(&mut nk, WORKER, am, op::INSPECT, given.name, &[]).status().is_ok());
    assert_eq!(call(&mut nk, WORKER, am, op::STOP, given.name, &[]).status().code(), Status::MISSING_RIGHTS);
}

#[test]
fn an_ended_vm_can_only_be_inspected() {
    let (mut nk, am, board) = kernel();
    let cap = initial(&mut nk, CONTROL, 0).name;
    board.get(WORKER).unwrap().set_state(state::ENDED);
    board.get(WORKER).unwrap().set_state(state::RUNNING);
    let info = call(&mut nk, CONTROL, am, op::INSPECT, cap, &[]);
    assert_eq!(info.results[0] & 0xFF, u64::from(state::ENDED), "an ended VM stays ended");
    for op in [op::STOP, op::START, op::DESTROY] {
        assert_eq!(call(&mut nk, CONTROL, am, op, cap, &[]).status().code(), Status::NOT_PERMITTED);
    }
    assert!(nk.take_effects().is_empty());
}

#[test]
fn the_holders_end_kills_its_capabilities() {
    let (mut nk, am, _) = kernel();
    let cap = initial(&mut nk, CONTROL, 0).name;
    nk.remove_vm(CONTROL, &mut Vec::new()).unwrap();
    assert_eq!(call(&mut nk, CONTROL, am, op::INSPECT, cap, &[]).status().code(), Status::UNKNOWN_NAME);
}

#[test]
fn the_board_finds_vms_by_name() {
    let (_, _, board) = kernel();
    assert_eq!(board.find("victim"), Some(VICTIM));
    assert_eq!(board.find("nobody"), None);
}
