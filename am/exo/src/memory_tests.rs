//! Host tests of the exo AM's memory: frame sets, address spaces, mappings (issue 10).

use super::*;
use core::sync::atomic::{AtomicU64, Ordering};
use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status};
use nk_am::{frame_access, FrameSource};
use nk_caps::{FixedSeed, KernelId};
use nk_core::NullKernel;

const VM1: VmId = VmId::new(1);
const VM2: VmId = VmId::new(2);
const VM3: VmId = VmId::new(3);
const MIB: u64 = 0x10_0000;
const LIMIT: u64 = 64 * MIB;
/// Where `dirty` with KEEP may also read (the hypervisor passes the NVRAM window).
const KEEP_WINDOW: u64 = 1 << 30;
const RAM1: u64 = 0x4000_0000;

/// A bump allocator standing in for the hypervisor's (host addresses from 2 GiB up).
struct Bump(AtomicU64);

impl FrameSource for Bump {
    fn allocate(&self, bytes: u64, align: u64) -> Option<u64> {
        let mut base = 0;
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                base = next.next_multiple_of(align);
                (base + bytes <= 0x8000_0000 + 256 * MIB).then_some(base + bytes)
            })
            .ok()?;
        Some(base)
    }
}

static FRAMES: Bump = Bump(AtomicU64::new(0x8000_0000));

struct Setup {
    nk: NullKernel,
    exo: u16,
    /// Per VM: (aspace, initial frame set or a zero name).
    caps: [(NameWords, NameWords); 3],
}

fn memory(initial: Option<(u64, u64)>) -> Option<VmMemory> {
    let (initial_hpa, initial_bytes) = initial.map_or((None, 0), |(hpa, bytes)| (Some(hpa), bytes));
    Some(VmMemory { gpa_base: 0, gpa_limit: LIMIT, frame_quota: 8 * MIB, initial_bytes, initial_hpa })
}

fn setup() -> Setup {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(5)).unwrap();
    let assignments = alloc::vec![
        VmAssignment { vm: Some(VM1), memory: memory(Some((RAM1, 2 * MIB))), ..VmAssignment::default() },
        VmAssignment { vm: Some(VM2), memory: memory(None), ..VmAssignment::default() },
        VmAssignment { vm: Some(VM3), memory: memory(None), ..VmAssignment::default() },
    ];
    let exo = nk
        .add_am(
            alloc::boxed::Box::new(ExoAm::new(assignments).with_dirty_keep_window(KEEP_WINDOW, 2 * KEEP_WINDOW)),
            4096,
        )
        .unwrap()
        .raw();
    nk.set_caller_ring(|| 0);
    nk.set_frame_source(&FRAMES);
    let mut caps = [(NameWords::default(), NameWords::default()); 3];
    for (i, vm) in [VM1, VM2, VM3].into_iter().enumerate() {
        assert!(nk.add_vm(vm, 256).unwrap().is_empty());
        let aspace = initial(&mut nk, vm, 0);
        assert!(aspace.status().is_ok(), "{}", aspace.status());
        let frames = initial(&mut nk, vm, 1);
        caps[i] = (aspace.name, if frames.status().is_ok() { frames.name } else { NameWords::default() });
    }
    Setup { nk, exo, caps }
}

fn call2(nk: &mut NullKernel, vm: VmId, am: u16, op: u16, caps: &[NameWords], args: &[u64]) -> Reply {
    let mut call = Call { selector: Selector::new(am, op.into()).encode(), ..Call::default() };
    call.caps[..caps.len()].copy_from_slice(caps);
    call.args[..args.len()].copy_from_slice(args);
    let reply =
        nk.dispatch(vm, &call, &mut Vec::new()).reply().expect("one kernel instance finishes every call at once");
    settle(nk);
    reply
}

std::thread_local! {
    /// The effects applied after each step (as the hypervisor does), for the test to read.
    static SETTLED: core::cell::RefCell<Vec<Effect>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// Applies the step's effects as the hypervisor does (retiring roots on the way), keeping
/// the others for [`take`].
fn settle(nk: &mut NullKernel) {
    let mut out = Vec::new();
    nk.apply_effects(&mut out, |effect| SETTLED.with(|settled| settled.borrow_mut().push(effect)));
    assert!(out.is_empty(), "one kernel instance sends no messages");
}

/// Takes the effects applied since the last call.
fn take(nk: &mut NullKernel) -> Vec<Effect> {
    settle(nk);
    SETTLED.with(|settled| core::mem::take(&mut *settled.borrow_mut()))
}

fn initial(nk: &mut NullKernel, vm: VmId, index: u64) -> Reply {
    call2(nk, vm, 0, nk_op::INITIAL as u16, &[], &[index])
}

impl Setup {
    fn call(&mut self, vm: VmId, op: u16, caps: &[NameWords], args: &[u64]) -> Reply {
        call2(&mut self.nk, vm, self.exo, op, caps, args)
    }

    fn ok(&mut self, vm: VmId, op: u16, caps: &[NameWords], args: &[u64]) -> Reply {
        let reply = self.call(vm, op, caps, args);
        assert!(reply.status().is_ok(), "op {op} {args:?}: {}", reply.status());
        reply
    }

    fn null(&mut self, vm: VmId, op: u32, cap: NameWords, args: &[u64]) -> Reply {
        call2(&mut self.nk, vm, 0, op as u16, &[cap], args)
    }

    fn aspace(&self, vm: VmId) -> NameWords {
        self.caps[vm.raw() as usize - 1].0
    }

    fn alloc(&mut self, vm: VmId, pages: u64, large: u64) -> NameWords {
        let aspace = self.aspace(vm);
        self.ok(vm, op::ALLOC, &[aspace], &[pages, large]).name
    }

    fn effects(&mut self) -> Vec<Effect> {
        take(&mut self.nk)
    }
}

const RW: u64 = (frame_access::READ | frame_access::WRITE) as u64;

fn hpa_of(effects: &[Effect]) -> u64 {
    match effects {
        [Effect::MapFrames { hpa, .. }] => *hpa,
        other => panic!("expected one map, got {other:?}"),
    }
}

#[test]
fn a_vm_with_memory_gets_its_address_space_and_initial_frames() {
    let mut s = setup();
    assert_ne!(s.caps[0].1, NameWords::default(), "VM1 has initial memory");
    assert_eq!(s.caps[1].1, NameWords::default(), "VM2 has none");
    assert!(s.effects().is_empty(), "initial memory is mapped by the hypervisor already");
    // The initial memory occupies [0, 2 MiB): mapping over it is refused.
    let set = s.alloc(VM1, 1, 0);
    let aspace = s.aspace(VM1);
    assert_eq!(s.call(VM1, op::MAP, &[set, aspace], &[MIB, RW]).status().code(), Status::NOT_PERMITTED);
    s.ok(VM1, op::MAP, &[set, aspace], &[2 * MIB, RW]);
    let mapped = s.effects();
    assert!(matches!(
        mapped[..],
        [Effect::MapFrames { vm: VM1, gpa: 0x20_0000, bytes: 0x1000, large: false, access: 3, .. }]
    ));
}

#[test]
fn alloc_map_unmap_free() {
    let mut s = setup();
    let set = s.alloc(VM2, 4, 0);
    let aspace = s.aspace(VM2);
    s.ok(VM2, op::MAP, &[set, aspace], &[0x10_0000, u64::from(frame_access::ALL)]);
    let hpa = hpa_of(&s.effects());
    assert_eq!(hpa % PAGE_4K, 0);
    s.ok(VM2, op::PROTECT, &[aspace], &[0x10_0000, u64::from(frame_access::READ)]);
    assert_eq!(s.effects(), [Effect::ProtectFrames { vm: VM2, gpa: 0x10_0000, bytes: 0x4000, access: 1 }]);
    // Protect only drops rights.
    assert_eq!(s.call(VM2, op::PROTECT, &[aspace], &[0x10_0000, RW]).status().code(), Status::NOT_PERMITTED);
    let unmapped = s.ok(VM2, op::UNMAP, &[aspace], &[0x10_0000]);
    assert_eq!(unmapped.results[0], 0x4000);
    assert_eq!(s.effects(), [Effect::UnmapFrames { vm: VM2, gpa: 0x10_0000, bytes: 0x4000 }]);
    assert_eq!(s.call(VM2, op::UNMAP, &[aspace], &[0x10_0000]).status().code(), Status::BAD_ARGUMENT);
    s.ok(VM2, op::FREE, &[set], &[]);
    assert_eq!(s.effects(), [Effect::FreeFrames { hpa, bytes: 0x4000 }]);
    // The set is gone: the AM retired its root, so its capability is revoked.
    assert_eq!(s.call(VM2, op::MAP, &[set, aspace], &[0, RW]).status().code(), Status::REVOKED);
    assert!(s.effects().is_empty());
}

#[test]
fn large_sets_map_with_large_pages_where_aligned() {
    let mut s = setup();
    let set = s.alloc(VM2, 1, 1);
    let aspace = s.aspace(VM2);
    s.ok(VM2, op::MAP, &[set, aspace], &[4 * MIB, RW]);
    let effects = s.effects();
    assert!(matches!(effects[..], [Effect::MapFrames { large: true, bytes: PAGE_2M, hpa, .. }] if hpa % PAGE_2M == 0));
    let again = s.ok(VM2, op::SPLIT, &[set], &[0, PAGE_4K]).name;
    s.ok(VM2, op::MAP, &[again, aspace], &[PAGE_4K, RW]);
    assert!(matches!(s.effects()[..], [Effect::MapFrames { large: false, bytes: PAGE_4K, gpa: PAGE_4K, .. }]));
    // A large set at an address that is not 2 MiB-aligned maps with small pages.
    let other = s.alloc(VM2, 1, 1);
    s.ok(VM2, op::MAP, &[other, aspace], &[8 * MIB + PAGE_4K, RW]);
    assert!(matches!(s.effects()[..], [Effect::MapFrames { large: false, .. }]));
}

#[test]
fn refused_maps_change_nothing() {
    let mut s = setup();
    let set = s.alloc(VM2, 2, 0);
    let (a1, a2) = (s.aspace(VM1), s.aspace(VM2));
    let read_only = s.null(VM2, nk_op::DERIVE, set, &[0b1000 | 0b0001]).name; // map + read
    s.effects();
    let cases: [(&[NameWords], [u64; 2], u16); 8] = [
        // More rights than held.
        (&[read_only, a2], [0, RW], Status::NOT_PERMITTED),
        // Outside the VM's range, misaligned, bad access bits.
        (&[set, a2], [LIMIT - PAGE_4K, RW], Status::BAD_ARGUMENT),
        (&[set, a2], [!0xFFF, RW], Status::BAD_ARGUMENT),
        (&[set, a2], [0x800, RW], Status::BAD_ARGUMENT),
        (&[set, a2], [0, 8], Status::BAD_ARGUMENT),
        (&[set, a2], [0, 0], Status::BAD_ARGUMENT),
        (&[set, a2], [0, u64::from(frame_access::WRITE)], Status::BAD_ARGUMENT),
        // Into another VM without a capability to its address space: VM1's is not VM2's.
        (&[set, a1], [0x40_0000, RW], Status::WRONG_HOLDER),
    ];
    for (caps, args, code) in cases {
        assert_eq!(s.call(VM2, op::MAP, caps, &args).status().code(), code, "{args:?}");
        assert!(s.effects().is_empty(), "{args:?}");
    }
    s.ok(VM2, op::MAP, &[read_only, a2], &[0, u64::from(frame_access::READ)]);
    s.effects();
    // Over an existing mapping (partly).
    let other = s.alloc(VM2, 4, 0);
    assert_eq!(s.call(VM2, op::MAP, &[other, a2], &[0, RW]).status().code(), Status::NOT_PERMITTED);
    assert!(s.effects().is_empty());
    // A frame capability without `map` is refused by the null-Kernel's check.
    let no_map = s.null(VM2, nk_op::DERIVE, set, &[0b0011]).name;
    let status = s.call(VM2, op::MAP, &[no_map, a2], &[0x10_0000, RW]).status();
    assert_eq!(status.code(), Status::MISSING_RIGHTS);
    assert!(s.effects().is_empty());
}

#[test]
fn mapping_into_another_vm_takes_its_address_space_capability() {
    let mut s = setup();
    let set = s.alloc(VM2, 1, 0);
    let a3 = s.aspace(VM3);
    // VM3 gives VM2 a map-only capability to its address space.
    let given = s.null(VM3, nk_op::DELEGATE, a3, &[0b001, 2, 0]);
    assert!(given.status().is_ok(), "{}", given.status());
    let received = call2(&mut s.nk, VM2, 0, nk_op::RECEIVED as u16, &[], &[0]);
    assert!(received.status().is_ok(), "{}", received.status());
    s.ok(VM2, op::MAP, &[set, received.name], &[0, RW]);
    assert!(matches!(s.effects()[..], [Effect::MapFrames { vm: VM3, gpa: 0, .. }]));
    // It may not allocate with it (no `alloc` right).
    let status = s.call(VM2, op::ALLOC, &[received.name], &[1, 0]).status();
    assert_eq!(status.code(), Status::MISSING_RIGHTS);
    // VM3 revokes: the mapping made through its address space goes.
    assert!(s.null(VM3, nk_op::REVOKE, given.name, &[]).status().is_ok());
    assert_eq!(s.effects(), [Effect::UnmapFrames { vm: VM3, gpa: 0, bytes: PAGE_4K }]);
}

#[test]
fn revoking_a_shared_frame_set_unmaps_it_from_the_borrower_only() {
    let mut s = setup();
    let set = s.alloc(VM1, 1, 0);
    let (a1, a3) = (s.aspace(VM1), s.aspace(VM3));
    s.ok(VM1, op::MAP, &[set, a1], &[4 * MIB, RW]);
    let hpa = hpa_of(&s.effects());
    let lent = s.null(VM1, nk_op::DELEGATE, set, &[u64::MAX, 3, 0]);
    assert!(lent.status().is_ok());
    let borrowed = call2(&mut s.nk, VM3, 0, nk_op::RECEIVED as u16, &[], &[0]).name;
    s.ok(VM3, op::MAP, &[borrowed, a3], &[8 * MIB, RW]);
    assert_eq!(hpa_of(&s.effects()), hpa, "both see the same frame");
    // The borrower cannot free what it did not allocate.
    assert_eq!(s.call(VM3, op::FREE, &[borrowed], &[]).status().code(), Status::NOT_PERMITTED);
    assert!(s.null(VM1, nk_op::REVOKE, lent.name, &[]).status().is_ok());
    assert_eq!(s.effects(), [Effect::UnmapFrames { vm: VM3, gpa: 8 * MIB, bytes: PAGE_4K }]);
    // The lender's own mapping stays; freeing unmaps it and then gives the frame back.
    s.ok(VM1, op::FREE, &[set], &[]);
    assert_eq!(
        s.effects(),
        [Effect::UnmapFrames { vm: VM1, gpa: 4 * MIB, bytes: PAGE_4K }, Effect::FreeFrames { hpa, bytes: PAGE_4K }]
    );
}

#[test]
fn revoking_the_allocation_unmaps_everywhere_before_freeing() {
    let mut s = setup();
    let set = s.alloc(VM2, 2, 0);
    let (a2, a3) = (s.aspace(VM2), s.aspace(VM3));
    let half = s.ok(VM2, op::SPLIT, &[set], &[PAGE_4K, PAGE_4K]).name;
    s.ok(VM2, op::MAP, &[set, a2], &[0, RW]);
    let hpa = hpa_of(&s.effects());
    assert!(s.null(VM2, nk_op::DELEGATE, half, &[u64::MAX, 3, 0]).status().is_ok());
    let borrowed = call2(&mut s.nk, VM3, 0, nk_op::RECEIVED as u16, &[], &[0]).name;
    s.ok(VM3, op::MAP, &[borrowed, a3], &[0, RW]);
    assert_eq!(hpa_of(&s.effects()), hpa + PAGE_4K);
    // Deleting the allocation's capability (VM2's own) kills the set and what was split from it.
    assert!(s.null(VM2, nk_op::DELETE, set, &[]).status().is_ok());
    let effects = s.effects();
    let free = effects.iter().position(|e| matches!(e, Effect::FreeFrames { .. })).expect("freed");
    assert_eq!(free, effects.len() - 1, "the free comes after every unmap: {effects:?}");
    assert!(effects.contains(&Effect::UnmapFrames { vm: VM2, gpa: 0, bytes: 2 * PAGE_4K }));
    assert!(effects.contains(&Effect::UnmapFrames { vm: VM3, gpa: 0, bytes: PAGE_4K }));
    assert_eq!(effects[free], Effect::FreeFrames { hpa, bytes: 2 * PAGE_4K });
    assert_eq!(s.call(VM3, op::MAP, &[borrowed, a3], &[0, RW]).status().code(), Status::REVOKED);
}

#[test]
fn split_stays_inside_and_keeps_the_rights() {
    let mut s = setup();
    let set = s.alloc(VM2, 4, 0);
    let a2 = s.aspace(VM2);
    for args in [[0, 0], [0x800, PAGE_4K], [3 * PAGE_4K, 2 * PAGE_4K], [!0xFFF, 2 * PAGE_4K]] {
        assert_eq!(s.call(VM2, op::SPLIT, &[set], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    let no_split = s.null(VM2, nk_op::DERIVE, set, &[0b01111]).name;
    assert_eq!(s.call(VM2, op::SPLIT, &[no_split], &[0, PAGE_4K]).status().code(), Status::MISSING_RIGHTS);
    let read_map_split = s.null(VM2, nk_op::DERIVE, set, &[0b11001]).name;
    let piece = s.ok(VM2, op::SPLIT, &[read_map_split], &[PAGE_4K, PAGE_4K]).name;
    assert_eq!(s.call(VM2, op::MAP, &[piece, a2], &[0, RW]).status().code(), Status::NOT_PERMITTED);
    s.ok(VM2, op::MAP, &[piece, a2], &[0, u64::from(frame_access::READ)]);
    s.effects();
    // The piece dies with the capability it was split with.
    assert!(s.null(VM2, nk_op::REVOKE, read_map_split, &[]).status().is_ok());
    assert_eq!(s.effects(), [Effect::UnmapFrames { vm: VM2, gpa: 0, bytes: PAGE_4K }]);
    // The AM retired the piece's root: its capability is revoked too.
    let status = s.call(VM2, op::MAP, &[piece, a2], &[0, u64::from(frame_access::READ)]).status();
    assert_eq!(status.code(), Status::REVOKED);
}

#[test]
fn allocation_is_charged_to_the_caller_and_bounded() {
    let mut s = setup();
    let a2 = s.aspace(VM2);
    // 8 MiB quota: four 2 MiB pages fit, a fifth does not.
    let sets: Vec<_> = (0..4).map(|_| s.alloc(VM2, 1, 1)).collect();
    let status = s.call(VM2, op::ALLOC, &[a2], &[1, 0]).status();
    assert_eq!(status.code(), Status::QUOTA_EXCEEDED);
    for args in [[0, 0], [1, 2], [u64::MAX, 1]] {
        assert_eq!(s.call(VM2, op::ALLOC, &[a2], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    // Freeing gives the quota back.
    s.ok(VM2, op::FREE, &[sets[0]], &[]);
    s.alloc(VM2, 512, 0);
    // VM3's quota is its own.
    s.alloc(VM3, 2048, 0);
    assert!(s.effects().iter().all(|e| matches!(e, Effect::FreeFrames { .. })));
}

#[test]
fn a_map_unmap_revoke_loop_gives_every_frame_back() {
    let mut s = setup();
    let a2 = s.aspace(VM2);
    let a3 = s.aspace(VM3);
    let mut allocated = 0u64;
    let mut freed = 0u64;
    let am_usage = s.nk.table().usage(Principal::Am(AmId::new(s.exo)));
    for round in 0..300u64 {
        let reply = s.call(VM2, op::ALLOC, &[a2], &[1 + round % 3, 0]);
        assert!(reply.status().is_ok(), "round {round}: {}", reply.status());
        let set = reply.name;
        s.ok(VM2, op::MAP, &[set, a2], &[0, RW]);
        let lent = s.null(VM2, nk_op::DELEGATE, set, &[u64::MAX, 3, 0]);
        let borrowed = call2(&mut s.nk, VM3, 0, nk_op::RECEIVED as u16, &[], &[0]);
        assert!(
            lent.status().is_ok() && borrowed.status().is_ok(),
            "round {round}: {} {}",
            lent.status(),
            borrowed.status()
        );
        s.ok(VM3, op::MAP, &[borrowed.name, a3], &[0, RW]);
        s.ok(VM2, op::UNMAP, &[a2], &[0]);
        assert!(s.null(VM2, nk_op::REVOKE, lent.name, &[]).status().is_ok());
        // A revoked capability stays charged (to its delegator) until its holder deletes it.
        assert!(s.null(VM3, nk_op::DELETE, borrowed.name, &[]).status().is_ok());
        if round % 2 == 0 {
            s.ok(VM2, op::FREE, &[set], &[]);
            // The capability is revoked with the set's root; deleting it gives VM2's quota back.
            assert!(s.null(VM2, nk_op::DELETE, set, &[]).status().is_ok());
        } else {
            assert!(s.null(VM2, nk_op::DELETE, set, &[]).status().is_ok());
        }
        assert_eq!(
            s.nk.table().usage(Principal::Am(AmId::new(s.exo))),
            am_usage,
            "round {round}: the AM's roots are back"
        );
        let mut mapped = 0i64;
        for effect in s.effects() {
            match effect {
                Effect::MapFrames { bytes, .. } => {
                    allocated += if mapped == 0 { bytes } else { 0 };
                    mapped += 1;
                }
                Effect::UnmapFrames { .. } => mapped -= 1,
                Effect::FreeFrames { bytes, .. } => freed += bytes,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(mapped, 0, "round {round}: every mapping is undone");
    }
    assert_eq!(allocated, freed);
}

#[test]
fn mappings_and_sets_per_vm_are_bounded() {
    let mut s = setup();
    let a2 = s.aspace(VM2);
    let set = s.alloc(VM2, 1, 0);
    let mut made = 0;
    let status = loop {
        let reply = s.call(VM2, op::MAP, &[set, a2], &[made * PAGE_4K, RW]);
        if !reply.status().is_ok() {
            break reply.status();
        }
        made += 1;
    };
    assert_eq!((made as usize, status.code()), (MAPPINGS_PER_VM, Status::QUOTA_EXCEEDED));
    let mut pieces = 1;
    let status = loop {
        let reply = s.call(VM2, op::SPLIT, &[set], &[0, PAGE_4K]);
        if !reply.status().is_ok() {
            break reply.status();
        }
        pieces += 1;
    };
    assert_eq!(status.code(), Status::QUOTA_EXCEEDED);
    assert!(pieces <= FRAME_SETS_PER_VM);
}

#[test]
fn removing_a_vm_unmaps_and_frees_what_it_allocated() {
    let mut s = setup();
    let set = s.alloc(VM2, 1, 0);
    let (a2, a3) = (s.aspace(VM2), s.aspace(VM3));
    s.ok(VM2, op::MAP, &[set, a2], &[0, RW]);
    let hpa = hpa_of(&s.effects());
    assert!(s.null(VM2, nk_op::DELEGATE, set, &[u64::MAX, 3, 0]).status().is_ok());
    let borrowed = call2(&mut s.nk, VM3, 0, nk_op::RECEIVED as u16, &[], &[0]).name;
    s.ok(VM3, op::MAP, &[borrowed, a3], &[0, RW]);
    s.effects();
    s.nk.remove_vm(VM2, &mut Vec::new()).unwrap();
    let effects = s.effects();
    assert!(effects.contains(&Effect::UnmapFrames { vm: VM3, gpa: 0, bytes: PAGE_4K }), "{effects:?}");
    assert_eq!(effects.last(), Some(&Effect::FreeFrames { hpa, bytes: PAGE_4K }));
}

#[test]
fn dirty_reads_into_a_bitmap_the_caller_holds() {
    let mut s = setup();
    let (a2, a3) = (s.aspace(VM2), s.aspace(VM3));
    let data = s.alloc(VM2, 16, 0);
    let bitmap = s.alloc(VM2, 1, 0);
    s.ok(VM2, op::MAP, &[data, a2], &[0, RW]);
    s.ok(VM2, op::MAP, &[bitmap, a2], &[MIB, RW]);
    let effects = s.effects();
    let Effect::MapFrames { hpa: bitmap_hpa, .. } = effects[1] else { panic!("{effects:?}") };
    s.ok(VM2, op::DIRTY, &[a2, bitmap], &[0, 16, 8]);
    assert_eq!(
        s.effects(),
        [Effect::TakeDirty { vm: VM2, gpa: 0, pages: 16, bitmap_hpa: bitmap_hpa + 8, keep: false }]
    );
    // Refused, changing nothing: a bitmap past its set, too many pages, outside the range,
    // a bitmap without write, another VM's address space, without the `dirty` right.
    for args in [[0, 16, PAGE_4K - 1], [0, DIRTY_PAGES_MAX + 1, 0], [LIMIT, 1, 0], [0x800, 1, 0], [0, 0, 0]] {
        assert_eq!(s.call(VM2, op::DIRTY, &[a2, bitmap], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    let read_only = s.null(VM2, nk_op::DERIVE, bitmap, &[0b01001]).name;
    assert_eq!(s.call(VM2, op::DIRTY, &[a2, read_only], &[0, 16, 0]).status().code(), Status::MISSING_RIGHTS);
    assert_eq!(s.call(VM2, op::DIRTY, &[a3, bitmap], &[0, 16, 0]).status().code(), Status::WRONG_HOLDER);
    let map_only = s.null(VM2, nk_op::DERIVE, a2, &[0b001]).name;
    assert_eq!(s.call(VM2, op::DIRTY, &[map_only, bitmap], &[0, 16, 0]).status().code(), Status::MISSING_RIGHTS);
    assert!(s.effects().is_empty());
}

/// `dirty-read` from a VM: the bitmap comes back in the results (at most 256 pages); the
/// range may lie anywhere in the address space (here past the AM's limit, where other AMs
/// map); without dirty tracking lent (this test's kernel) every page reads dirty.
#[test]
fn dirty_read_returns_the_bitmap_in_the_results() {
    let mut s = setup();
    let (a2, a3) = (s.aspace(VM2), s.aspace(VM3));
    let reply = s.ok(VM2, op::DIRTY_READ, &[a2], &[LIMIT, 70]);
    assert_eq!(reply.results, [u64::MAX, 0x3F, 0, 0]);
    for args in [[0, 257], [0, 0], [0x800, 1], [!0xFFF, 2]] {
        assert_eq!(s.call(VM2, op::DIRTY_READ, &[a2], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    assert_eq!(s.call(VM2, op::DIRTY_READ, &[a3], &[0, 1]).status().code(), Status::WRONG_HOLDER);
    let map_only = s.null(VM2, nk_op::DERIVE, a2, &[0b001]).name;
    assert_eq!(s.call(VM2, op::DIRTY_READ, &[map_only], &[0, 1]).status().code(), Status::MISSING_RIGHTS);
    assert!(s.effects().is_empty());
}

#[test]
fn dirty_with_keep_reads_without_clearing_also_in_the_keep_window() {
    let keep = nk_abi::exo_dirty::KEEP;
    let mut s = setup();
    let a2 = s.aspace(VM2);
    let bitmap = s.alloc(VM2, 1, 0);
    s.ok(VM2, op::MAP, &[bitmap, a2], &[MIB, RW]);
    let effects = s.effects();
    let Effect::MapFrames { hpa: bitmap_hpa, .. } = effects[0] else { panic!("{effects:?}") };
    s.ok(VM2, op::DIRTY, &[a2, bitmap], &[0, 16, 0, keep]);
    assert_eq!(s.effects(), [Effect::TakeDirty { vm: VM2, gpa: 0, pages: 16, bitmap_hpa, keep: true }]);
    s.ok(VM2, op::DIRTY, &[a2, bitmap], &[KEEP_WINDOW, 16, 0, keep]);
    assert_eq!(s.effects(), [Effect::TakeDirty { vm: VM2, gpa: KEEP_WINDOW, pages: 16, bitmap_hpa, keep: true }]);
    // Clearing stays refused there (the flags are another AM's write set); KEEP does not
    // reach past the window, and unknown flags are refused.
    for args in [[KEEP_WINDOW, 16, 0, 0], [2 * KEEP_WINDOW - PAGE_4K, 2, 0, keep], [0, 16, 0, 2], [LIMIT, 1, 0, keep]] {
        assert_eq!(s.call(VM2, op::DIRTY, &[a2, bitmap], &args).status().code(), Status::BAD_ARGUMENT, "{args:?}");
    }
    assert!(s.effects().is_empty());
}

#[test]
fn initial_memory_is_a_frame_set_found_when_first_needed() {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(9)).unwrap();
    let unresolved =
        VmMemory { gpa_base: 0, gpa_limit: LIMIT, frame_quota: 0, initial_bytes: 4 * MIB, initial_hpa: None };
    let assignments = alloc::vec![
        VmAssignment { vm: Some(VM1), memory: Some(unresolved), ..VmAssignment::default() },
        VmAssignment { vm: Some(VM2), memory: memory(None), ..VmAssignment::default() },
    ];
    let exo = nk.add_am(alloc::boxed::Box::new(ExoAm::new(assignments)), 256).unwrap().raw();
    nk.set_caller_ring(|| 0);
    nk.add_vm(VM1, 64).unwrap();
    nk.add_vm(VM2, 64).unwrap();
    let aspace1 = initial(&mut nk, VM1, 0).name;
    let memory1 = initial(&mut nk, VM1, 1).name;
    // Its memory occupies [0, 4 MiB): nothing maps over it.
    let own = call2(&mut nk, VM1, exo, op::MAP, &[memory1, aspace1], &[8 * MIB, RW]);
    assert_eq!(own.status().code(), Status::NOT_PERMITTED, "the hypervisor has not said where it lies yet");
    let split = call2(&mut nk, VM1, exo, op::SPLIT, &[memory1], &[3 * MIB, PAGE_4K]);
    assert_eq!(split.status().code(), Status::NOT_PERMITTED);
    nk.set_guest_memory(|vm| (vm == VM1).then_some((RAM1, 4 * MIB)));
    let split = call2(&mut nk, VM1, exo, op::SPLIT, &[memory1], &[3 * MIB, PAGE_4K]);
    assert!(split.status().is_ok(), "{}", split.status());
    let lent = call2(&mut nk, VM1, 0, nk_op::DELEGATE as u16, &[split.name], &[u64::MAX, 2, 0]);
    assert!(lent.status().is_ok());
    let borrowed = call2(&mut nk, VM2, 0, nk_op::RECEIVED as u16, &[], &[0]).name;
    let aspace2 = initial(&mut nk, VM2, 0).name;
    assert!(call2(&mut nk, VM2, exo, op::MAP, &[borrowed, aspace2], &[0, RW]).status().is_ok());
    assert_eq!(
        take(&mut nk),
        [Effect::MapFrames { vm: VM2, gpa: 0, hpa: RAM1 + 3 * MIB, bytes: PAGE_4K, large: false, access: 3 }]
    );
    // VM1 ends: its memory's every mapping elsewhere goes; none of it is freed to the allocator.
    nk.remove_vm(VM1, &mut Vec::new()).unwrap();
    let effects = take(&mut nk);
    assert!(effects.contains(&Effect::UnmapFrames { vm: VM2, gpa: 0, bytes: PAGE_4K }), "{effects:?}");
    assert!(effects.iter().all(|e| !matches!(e, Effect::FreeFrames { .. })), "{effects:?}");
}

#[test]
fn pml_is_for_the_callers_own_address_space() {
    let mut s = setup();
    let (a2, a3) = (s.aspace(VM2), s.aspace(VM3));
    let bitmap = s.alloc(VM2, 1, 0);
    assert_eq!(s.call(VM2, op::PML_DRAIN, &[a2, bitmap], &[0]).status().code(), Status::NOT_PERMITTED, "not enabled");
    s.ok(VM2, op::PML_ENABLE, &[a2], &[MIB, 512]);
    assert_eq!(s.effects(), [Effect::PmlEnable { vm: VM2, gpa: MIB, pages: 512 }]);
    s.ok(VM2, op::PML_DRAIN, &[a2, bitmap], &[8]);
    assert!(matches!(s.effects()[..], [Effect::PmlDrain { vm: VM2, .. }]));
    assert_eq!(s.call(VM2, op::PML_DRAIN, &[a2, bitmap], &[PAGE_4K - 63]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(s.call(VM2, op::PML_ENABLE, &[a2], &[LIMIT, 1]).status().code(), Status::BAD_ARGUMENT);
    // Another VM's address space, even with a capability to it: refused.
    assert!(s.null(VM3, nk_op::DELEGATE, a3, &[u64::MAX, 2, 0]).status().is_ok());
    let given = call2(&mut s.nk, VM2, 0, nk_op::RECEIVED as u16, &[], &[0]).name;
    assert_eq!(s.call(VM2, op::PML_ENABLE, &[given], &[0, 1]).status().code(), Status::NOT_PERMITTED);
    assert!(s.effects().is_empty());
}

#[test]
fn frame_sets_that_die_give_the_ams_quota_back() {
    // Three times the AM's quota of roots, killed by free, revoke and delete in turn.
    let mut s = setup();
    let a2 = s.aspace(VM2);
    let am = Principal::Am(AmId::new(s.exo));
    let before = s.nk.table().usage(am).unwrap().charged;
    let vm_before = s.nk.table().usage(Principal::Vm(VM2)).unwrap().charged;
    for round in 0..6000u64 {
        let reply = s.call(VM2, op::ALLOC, &[a2], &[2, 0]);
        assert!(reply.status().is_ok(), "round {round}: {}", reply.status());
        let set = reply.name;
        let piece = s.ok(VM2, op::SPLIT, &[set], &[PAGE_4K, PAGE_4K]).name;
        s.ok(VM2, op::MAP, &[piece, a2], &[0, RW]);
        let killed = match round % 3 {
            0 => s.call(VM2, op::FREE, &[set], &[]).status(),
            1 => s.null(VM2, nk_op::REVOKE, set, &[]).status(),
            _ => s.null(VM2, nk_op::DELETE, set, &[]).status(),
        };
        assert!(killed.is_ok(), "round {round}: {killed}");
        let _ = s.null(VM2, nk_op::DELETE, piece, &[]);
        let _ = s.null(VM2, nk_op::DELETE, set, &[]);
        assert_eq!(s.nk.table().usage(am).unwrap().charged, before, "round {round}: the AM's roots are back");
    }
    assert_eq!(s.nk.table().usage(Principal::Vm(VM2)).unwrap().charged, vm_before, "and VM2's");
}

/// For profiling (`valgrind --tool=callgrind` on the test binary): map and unmap one page.
#[test]
#[ignore]
fn profile_map_unmap() {
    let mut s = setup();
    let a2 = s.aspace(VM2);
    let page = s.alloc(VM2, 1, 0);
    for _ in 0..10_000 {
        s.ok(VM2, op::MAP, &[page, a2], &[MIB, RW]);
        s.ok(VM2, op::UNMAP, &[a2], &[MIB]);
        SETTLED.with(|settled| settled.borrow_mut().clear());
    }
}
