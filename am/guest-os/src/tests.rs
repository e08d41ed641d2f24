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

/// `create` against a real exo AM on the same kernel instance.
mod create {
    use super::*;
    use core::sync::atomic::{AtomicU64, Ordering};
    use nk_am::FrameSource;
    use nk_am_exo::{ExoAm, VmAssignment, VmMemory};

    const MIB: u64 = 0x10_0000;
    /// The boot VMs: VM 1 creates, VM 2 is another guest; created VMs start at VM 3.
    const OTHER: VmId = VmId::new(2);
    const FIRST_CREATED: VmId = VmId::new(3);
    /// The hypervisor's boot principal: it builds OTHER, a boot VM, from image 1.
    const BOOT: VmId = VmId::new(0);
    const EXO_ALLOC: u16 = 3;
    const EXO_FREE: u16 = 8;

    struct Bump(AtomicU64);

    impl FrameSource for Bump {
        fn allocate(&self, bytes: u64, align: u64) -> Option<u64> {
            let mut base = 0;
            self.0
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                    base = next.next_multiple_of(align);
                    Some(base + bytes)
                })
                .ok()?;
            Some(base)
        }
    }

    static FRAMES: Bump = Bump(AtomicU64::new(0x8000_0000));

    struct Setup {
        nk: NullKernel,
        exo: u16,
        os: u16,
        aspace: NameWords,
        image: NameWords,
        board: Arc<VmBoard>,
    }

    fn setup() -> Setup {
        let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(9)).unwrap();
        let memory = Some(VmMemory {
            gpa_base: 0,
            gpa_limit: 1 << 30,
            frame_quota: 8 * MIB,
            initial_bytes: 0,
            initial_hpa: None,
        });
        let assignments = alloc::vec![
            VmAssignment { vm: Some(CONTROL), memory, ..VmAssignment::default() },
            // OTHER, a boot VM, has initial memory whose place the lent frames decide.
            VmAssignment {
                vm: Some(OTHER),
                memory: memory.map(|m| VmMemory { initial_bytes: 2 * MIB, ..m }),
                ..VmAssignment::default()
            },
            VmAssignment { vm: Some(BOOT), memory, ..VmAssignment::default() },
        ];
        let exo = nk.add_am(alloc::boxed::Box::new(ExoAm::new(assignments)), 4096).unwrap().raw();
        let board = Arc::new(VmBoard::new(alloc::vec![
            VmRecord::new(CONTROL, "control", image::BARE_METAL, 4 << 20, 0),
            VmRecord::new(OTHER, "other", image::BARE_METAL, 4 << 20, 0),
        ]));
        let images = Images {
            images: alloc::vec![
                Image { name: String::from("mb1"), kind: image::MULTIBOOT },
                Image { name: String::from("other"), kind: image::LINUX },
            ],
            grants: alloc::vec![ImageGrant { holder: CONTROL, image: 0 }, ImageGrant { holder: BOOT, image: 1 }],
            online_cpus: 0b11,
            // Each image needs 2 MiB.
            fits: |image, bytes| image < 2 && bytes >= 2 * MIB,
            boot: alloc::vec![BootVm { vm: OTHER, image: 1 }],
            boot_principal: Some(BOOT),
        };
        let am = GuestOsAm::new(board.clone(), Vec::new()).with_images(images);
        let os = nk.add_am(alloc::boxed::Box::new(am), 64).unwrap().raw();
        nk.set_caller_ring(|| 0);
        nk.set_frame_source(&FRAMES);
        nk.add_vm(CONTROL, 256).unwrap();
        nk.add_vm(OTHER, 256).unwrap();
        nk.add_vm(BOOT, 256).unwrap();
        let aspace = initial(&mut nk, CONTROL, 0);
        assert!(aspace.status().is_ok(), "{}", aspace.status());
        let image = initial(&mut nk, CONTROL, 1);
        assert!(image.status().is_ok(), "{}", image.status());
        assert_eq!(image.results[0], u64::from(os));
        assert_eq!(initial(&mut nk, OTHER, 2).status().code(), Status::BAD_ARGUMENT, "no image for the other");
        Setup { nk, exo, os, aspace: aspace.name, image: image.name, board }
    }

    impl Setup {
        fn alloc(&mut self, vm: VmId, pages: u64) -> NameWords {
            let aspace = if vm == CONTROL { self.aspace } else { initial(&mut self.nk, vm, 0).name };
            let r = call(&mut self.nk, vm, self.exo, EXO_ALLOC, aspace, &[pages, 0]);
            assert!(r.status().is_ok(), "{}", r.status());
            r.name
        }

        fn create(&mut self, image: NameWords, frames: NameWords, cpu: u64) -> Reply {
            call(&mut self.nk, CONTROL, self.os, op::CREATE, image, &[frames.low, frames.high, cpu])
        }
    }

    #[test]
    fn create_lends_the_frames_and_grants_a_vm_capability() {
        let mut s = setup();
        let frames = s.alloc(CONTROL, 512);
        let r = s.create(s.image, frames, 1);
        assert!(r.status().is_ok(), "{}", r.status());
        assert_eq!(r.results[..2], [u64::from(FIRST_CREATED.raw()), 2 * MIB]);
        let effects = s.nk.take_effects();
        let [Effect::CreateVm { vm, image: 0, cpu: 1, hpa, bytes, by, caps: 0 }] = effects[..] else {
            panic!("{effects:?}")
        };
        assert_eq!((vm, bytes, by), (FIRST_CREATED, 2 * MIB, CONTROL));
        assert!(hpa >= 0x8000_0000);
        let info = call(&mut s.nk, CONTROL, s.os, op::INSPECT, r.name, &[]);
        assert_eq!(info.results, [u64::from(image::MULTIBOOT) << 8 | 1 << 16, 2 * MIB, 0, 3]);
        assert_eq!(s.board.get(FIRST_CREATED).unwrap().name(), "mb1");
        assert!(call(&mut s.nk, CONTROL, s.os, op::START, r.name, &[]).status().is_ok());
        assert_eq!(
            s.nk.take_effects(),
            [Effect::VmControl { vm: FIRST_CREATED, action: VmAction::Start, by: CONTROL }]
        );
        // The same frames cannot back a second VM.
        assert_eq!(s.create(s.image, frames, 1).status().code(), Status::NOT_PERMITTED);
        assert!(s.nk.take_effects().is_empty());
    }

    #[test]
    fn bad_creates_are_refused_and_change_nothing() {
        let mut s = setup();
        let frames = s.alloc(CONTROL, 512);
        let small = s.alloc(CONTROL, 256);
        let copy = call(&mut s.nk, CONTROL, 0, nk_op::DERIVE as u16, frames, &[u64::MAX]).name;
        let others = s.alloc(OTHER, 512);
        let no_create = call(&mut s.nk, CONTROL, 0, nk_op::DERIVE as u16, s.image, &[0]).name;
        let forged = NameWords { low: frames.low ^ 1, high: frames.high };
        for (image, frames_arg, cpu, code) in [
            (s.image, frames, 2, Status::BAD_ARGUMENT),
            (s.image, frames, 64, Status::BAD_ARGUMENT),
            (s.image, small, 0, Status::BAD_ARGUMENT),
            (s.image, forged, 0, Status::UNKNOWN_NAME),
            (s.image, others, 0, Status::WRONG_HOLDER),
            (s.image, copy, 0, Status::NOT_PERMITTED),
            (s.image, s.aspace, 0, Status::NOT_PERMITTED),
            (s.image, s.image, 0, Status::NOT_PERMITTED),
            (no_create, frames, 0, Status::MISSING_RIGHTS),
        ] {
            let r = s.create(image, frames_arg, cpu);
            assert_eq!(r.status().code(), code, "cpu {cpu}: {}", r.status());
            assert!(s.nk.take_effects().is_empty());
            assert!(s.board.get(FIRST_CREATED).is_none(), "no VM was published");
        }
        let r = s.create(s.image, frames, 0);
        assert!(r.status().is_ok(), "{}", r.status());
        assert_eq!(r.results[0], u64::from(FIRST_CREATED.raw()), "the refusals used no slot");
    }

    #[test]
    fn the_frames_dying_unmap_them_and_the_capability_dying_destroys_the_vm() {
        let mut s = setup();
        let frames = s.alloc(CONTROL, 512);
        let vm_cap = s.create(s.image, frames, 0).name;
        s.nk.take_effects();
        // Freeing the frames unmaps them from the created VM before they go back (and the
        // exo AM retires the set's root).
        assert!(call(&mut s.nk, CONTROL, s.exo, EXO_FREE, frames, &[]).status().is_ok());
        // As the hypervisor does: the null-Kernel handles its own (the exo AM's Retire of
        // the set's root) and hands on the rest.
        let mut effects = Vec::new();
        s.nk.apply_effects(&mut Vec::new(), |effect| effects.push(effect));
        assert!(
            matches!(
                effects[..],
                [Effect::UnmapFrames { vm: FIRST_CREATED, gpa: 0, bytes }, Effect::FreeFrames { .. }] if bytes == 2 * MIB
            ),
            "{effects:?}"
        );
        // Deleting the vm capability destroys the VM.
        assert!(call(&mut s.nk, CONTROL, 0, nk_op::DELETE as u16, vm_cap, &[]).status().is_ok());
        assert_eq!(
            s.nk.take_effects(),
            [Effect::VmControl { vm: FIRST_CREATED, action: VmAction::Destroy, by: CONTROL }]
        );
    }

    #[test]
    fn only_the_boot_principal_creates_a_boot_vm_from_its_own_image_once() {
        let mut s = setup();
        let boot_os = initial(&mut s.nk, BOOT, 1);
        assert_eq!(boot_os.results[0], u64::from(s.os), "the boot principal holds the boot VM's image");
        let frames = s.alloc(BOOT, 512);
        let other = u64::from(OTHER.raw());
        // Not the boot principal; not a boot VM; not the VM's own image; a reserved argument.
        let mine = s.alloc(CONTROL, 512);
        let r = call(&mut s.nk, CONTROL, s.os, op::CREATE, s.image, &[mine.low, mine.high, 1, other]);
        assert_eq!(r.status().code(), Status::NOT_PERMITTED);
        for (vm, fifth, code) in [
            (u64::from(CONTROL.raw()), 0, Status::NOT_PERMITTED),
            (u64::from(FIRST_CREATED.raw()), 0, Status::NOT_PERMITTED),
            (other, 1, Status::BAD_ARGUMENT),
        ] {
            let r = call(&mut s.nk, BOOT, s.os, op::CREATE, boot_os.name, &[frames.low, frames.high, 1, vm, fifth]);
            assert_eq!(r.status().code(), code, "vm {vm}: {}", r.status());
        }
        assert!(s.nk.take_effects().is_empty());
        let r = call(&mut s.nk, BOOT, s.os, op::CREATE, boot_os.name, &[frames.low, frames.high, 1, other]);
        assert!(r.status().is_ok(), "{}", r.status());
        assert_eq!(r.results[..2], [other, 2 * MIB]);
        let effects = s.nk.take_effects();
        let [Effect::CreateVm { vm: OTHER, image: 1, cpu: 1, by: BOOT, .. }] = effects[..] else {
            panic!("{effects:?}")
        };
        assert_eq!(s.board.get(OTHER).unwrap().cpu(), 1, "the boot VM keeps its record, on its CPU");
        assert!(s.board.get(FIRST_CREATED).is_none(), "no created-VM slot was used");
        // Only once.
        let again = s.alloc(BOOT, 512);
        let r = call(&mut s.nk, BOOT, s.os, op::CREATE, boot_os.name, &[again.low, again.high, 1, other]);
        assert_eq!(r.status().code(), Status::NOT_PERMITTED);
        // Run-time creates still number from the first created VM.
        let r = s.create(s.image, mine, 0);
        assert_eq!(r.results[0], u64::from(FIRST_CREATED.raw()), "{}", r.status());
    }

    #[test]
    fn create_hands_copies_of_the_creators_capabilities_that_die_with_their_parents() {
        let mut s = setup();
        let frames = s.alloc(CONTROL, 512);
        // CONTROL runs on CPU 0: a mask for a VM on CPU 1 is refused, and changes nothing.
        let image_bit = 1 << 1;
        let r = call(&mut s.nk, CONTROL, s.os, op::CREATE, s.image, &[frames.low, frames.high, 1, 0, image_bit]);
        assert_eq!(r.status().code(), Status::BAD_ARGUMENT);
        let r = call(&mut s.nk, CONTROL, s.os, op::CREATE, s.image, &[frames.low, frames.high, 0, 0, 1 << 32]);
        assert_eq!(r.status().code(), Status::BAD_ARGUMENT, "indices above 31");
        assert!(s.nk.take_effects().is_empty());
        let r = call(&mut s.nk, CONTROL, s.os, op::CREATE, s.image, &[frames.low, frames.high, 0, 0, image_bit]);
        assert!(r.status().is_ok(), "{}", r.status());
        let effects = s.nk.take_effects();
        let [Effect::CreateVm { vm: FIRST_CREATED, cpu: 0, by: CONTROL, caps: 0b10, .. }] = effects[..] else {
            panic!("{effects:?}")
        };
        // As the hypervisor does when the VM's CPU adopts it (bit 5: no such capability).
        s.nk.add_vm_with_copies(FIRST_CREATED, 64, CONTROL, 0b10_0010, &mut Vec::new()).unwrap();
        let copy = initial(&mut s.nk, FIRST_CREATED, 0);
        assert!(copy.status().is_ok(), "{}", copy.status());
        assert_eq!(copy.results[0], u64::from(s.os), "the image capability, as the creator's INITIAL 1");
        assert_eq!(initial(&mut s.nk, FIRST_CREATED, 1).status().code(), Status::BAD_ARGUMENT, "one copy");
        let handed = s.nk.handed_caps(FIRST_CREATED);
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].label(), "guest-os/image");
        let info = call(&mut s.nk, FIRST_CREATED, 0, nk_op::INSPECT as u16, copy.name, &[]);
        assert!(info.status().is_ok(), "the VM uses its copy: {}", info.status());
        // The creator revokes its capability: the VM's copy dies with it.
        assert!(call(&mut s.nk, CONTROL, 0, nk_op::REVOKE as u16, s.image, &[]).status().is_ok());
        let info = call(&mut s.nk, FIRST_CREATED, 0, nk_op::INSPECT as u16, copy.name, &[]);
        assert!(!info.status().is_ok(), "the copy outlived its parent");
        assert!(s.nk.handed_caps(FIRST_CREATED).is_empty());
    }

    #[test]
    fn at_most_created_vms_max_are_created() {
        let mut s = setup();
        for i in 0..CREATED_VMS_MAX {
            let frames = s.alloc(CONTROL, 512);
            let r = s.create(s.image, frames, 0);
            assert!(r.status().is_ok(), "{i}: {}", r.status());
            // Freed again at once, so the frame quota is not what runs out.
            assert!(call(&mut s.nk, CONTROL, s.exo, EXO_FREE, frames, &[]).status().is_ok());
        }
        let frames = s.alloc(CONTROL, 512);
        assert_eq!(s.create(s.image, frames, 0).status().code(), Status::QUOTA_EXCEEDED);
    }
}

/// The operation names this AM registers have exactly the numbers the shared ABI crate
/// gives guests (`nk_abi::guest_os_op`), and there are no others.
#[test]
fn registered_op_numbers_are_the_shared_abis() {
    use nk_am::AbstractMachine as _;
    let mut table =
        nk_caps::CapTable::new(nk_caps::KernelId::new(0), 64, &mut nk_caps::FixedSeed::from_u64(1)).unwrap();
    let id = nk_caps::AmId::new(1);
    let mut am = GuestOsAm::new(Arc::new(VmBoard::new(alloc::vec![])), alloc::vec![]);
    table.register_am(id, am.name(), 16).unwrap();
    am.register(&mut nk_am::Registrar::new(id, &mut table)).unwrap();
    let ops = [
        ("inspect", nk_abi::guest_os_op::INSPECT),
        ("stop", nk_abi::guest_os_op::STOP),
        ("start", nk_abi::guest_os_op::START),
        ("destroy", nk_abi::guest_os_op::DESTROY),
        ("create", nk_abi::guest_os_op::CREATE),
        ("yield_to", nk_abi::guest_os_op::YIELD_TO),
    ];
    for (name, number) in ops {
        let found = table.registry().find_op(id, name).map(|op| u32::from(op.index()));
        assert_eq!(found, Some(number), "operation {name}");
    }
    let past = u16::try_from(ops.len()).unwrap();
    assert_eq!(table.registry().op_name(nk_caps::OpId::new(id, past)), None, "an operation nk-abi lacks");
}

#[test]
fn yield_to_only_a_running_vm_of_the_callers_cpu() {
    let (a, b, c) = (VmId::new(1), VmId::new(2), VmId::new(3));
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(7)).unwrap();
    let board = Arc::new(VmBoard::new(alloc::vec![
        VmRecord::new(a, "ping", image::BARE_METAL, 4 << 20, 0),
        VmRecord::new(b, "pong", image::BARE_METAL, 4 << 20, 0),
        VmRecord::new(c, "far", image::BARE_METAL, 4 << 20, 1),
    ]));
    let grants = alloc::vec![VmGrant { holder: a, target: b }, VmGrant { holder: a, target: c }];
    let am = nk.add_am(alloc::boxed::Box::new(GuestOsAm::new(board.clone(), grants)), 64).unwrap().raw();
    nk.set_caller_ring(|| 0);
    for vm in [a, b, c] {
        nk.add_vm(vm, 64).unwrap();
    }
    let (pong, far) = (initial(&mut nk, a, 0).name, initial(&mut nk, a, 1).name);
    let yield_to = |nk: &mut NullKernel, cap| call(nk, a, am, op::YIELD_TO, cap, &[]).status().code();
    // Not running yet: refused.
    assert_eq!(yield_to(&mut nk, pong), Status::NOT_PERMITTED);
    for vm in [a, b, c] {
        board.get(vm).unwrap().set_state(state::RUNNING);
    }
    assert_eq!(yield_to(&mut nk, pong), Status::OK);
    assert_eq!(nk.take_effects(), [Effect::VmControl { vm: b, action: VmAction::YieldTo, by: a }]);
    // Another CPU's VM: refused, nothing emitted.
    assert_eq!(yield_to(&mut nk, far), Status::NOT_PERMITTED);
    assert!(nk.take_effects().is_empty());
    // Without the start right: refused by the null-Kernel.
    let inspect_only = call(&mut nk, a, 0, nk_op::DERIVE as u16, pong, &[rights::INSPECT]).name;
    assert_eq!(yield_to(&mut nk, inspect_only), Status::MISSING_RIGHTS);
}
