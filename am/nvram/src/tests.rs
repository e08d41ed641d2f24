//! The NVRAM AM through the null-Kernel's dispatch, with fake host memory, a crash media
//! and dirty flags set by the test's "guest" writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status};
use nk_am::{frame_access, DirtySource, Effect, FrameSource, HostMemory, Media, MediaSource, VmId};
use nk_caps::{FixedSeed, KernelId};
use nk_core::NullKernel;

use crate::testing::{CrashMedia, CutPolicy};
use crate::{op, rights, NvramAm, NvramGrant};

const A: VmId = VmId::new(1);
const B: VmId = VmId::new(2);
const BASE: u64 = 0x100_0000;
const HOST_BYTES: usize = 8 << 20;
const MEDIA_BYTES: u64 = 4 << 20;
const REGION: u64 = 64 * 1024;
const GPA: u64 = 0x4000_0000;

/// Host memory, its frame allocator, the device and the dirty flags of one test machine.
struct Machine {
    memory: Mutex<Vec<u8>>,
    next: Mutex<u64>,
    media: Mutex<CrashMedia>,
    /// (vm, guest page) written since its flag was last read.
    dirty: Mutex<BTreeSet<(VmId, u64)>>,
}

impl HostMemory for Machine {
    fn read(&self, hpa: u64, buf: &mut [u8]) -> bool {
        let memory = self.memory.lock().unwrap();
        let at = (hpa - BASE) as usize;
        buf.copy_from_slice(&memory[at..at + buf.len()]);
        true
    }
    fn write(&self, hpa: u64, data: &[u8]) -> bool {
        let mut memory = self.memory.lock().unwrap();
        let at = (hpa - BASE) as usize;
        memory[at..at + data.len()].copy_from_slice(data);
        true
    }
}

impl FrameSource for Machine {
    fn allocate(&self, bytes: u64, _align: u64) -> Option<u64> {
        let mut next = self.next.lock().unwrap();
        let hpa = *next;
        (hpa + bytes <= BASE + HOST_BYTES as u64).then(|| {
            *next += bytes;
            hpa
        })
    }
}

impl MediaSource for Machine {
    fn with_media(&self, f: &mut dyn FnMut(&mut dyn Media)) -> bool {
        f(&mut *self.media.lock().unwrap());
        true
    }
}

impl DirtySource for Machine {
    fn take_dirty(&self, vm: VmId, gpa: u64, pages: u64, bitmap: &mut [u8]) -> bool {
        let mut dirty = self.dirty.lock().unwrap();
        for page in 0..pages {
            if dirty.remove(&(vm, gpa + page * 4096)) {
                bitmap[(page / 8) as usize] |= 1 << (page % 8);
            }
        }
        true
    }
}

struct Setup {
    nk: NullKernel,
    am: u16,
    exo: u16,
    machine: &'static Machine,
    /// What the EPTs map: (vm, gpa) -> (hpa, bytes, access).
    ept: BTreeMap<(VmId, u64), (u64, u64, u8)>,
}

fn boot(image: Option<Vec<u8>>) -> Setup {
    let machine: &'static Machine = Box::leak(Box::new(Machine {
        memory: Mutex::new(vec![0; HOST_BYTES]),
        next: Mutex::new(BASE),
        media: Mutex::new(image.map_or_else(|| CrashMedia::new(MEDIA_BYTES), CrashMedia::from_image)),
        dirty: Mutex::new(BTreeSet::new()),
    }));
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(3)).unwrap();
    nk.set_frame_source(machine);
    nk.set_host_memory(machine);
    nk.set_media(machine);
    nk.set_dirty_source(machine);
    // The exo AM first (a lower layer): each VM holds its address space's capability,
    // which it lends the NVRAM AM for dirty tracking when it maps a region.
    let memory =
        nk_am_exo::VmMemory { gpa_base: 0, gpa_limit: 1 << 30, frame_quota: 0, initial_bytes: 0, initial_hpa: None };
    let assignment = |vm| nk_am_exo::VmAssignment { vm: Some(vm), ports: None, msrs: Vec::new(), memory: Some(memory) };
    let exo = nk.add_am(Box::new(nk_am_exo::ExoAm::new(vec![assignment(A), assignment(B)])), 64).unwrap().raw();
    // The block AM under the NVRAM AM: its device comes through a block range capability.
    nk.add_am(Box::new(nk_am_block::BlockAm::new(Vec::new()).serving("nvram")), 64).unwrap();
    let grants = vec![NvramGrant { vm: A, owner: 0xA }, NvramGrant { vm: B, owner: 0xB }];
    let am = nk.add_am(Box::new(NvramAm::new(grants).with_window(GPA, GPA + (64 << 20))), 64).unwrap().raw();
    nk.set_caller_ring(|| 0);
    assert!(nk.connect_ams().is_empty());
    nk.add_vm(A, 64).unwrap();
    nk.add_vm(B, 64).unwrap();
    Setup { nk, am, exo, machine, ept: BTreeMap::new() }
}

impl Setup {
    fn call(&mut self, vm: VmId, am: u16, op: u16, cap: NameWords, args: &[u64]) -> Reply {
        let mut call = Call { selector: Selector::new(am, op.into()).encode(), ..Call::default() };
        call.caps[0] = cap;
        call.args[..args.len()].copy_from_slice(args);
        let reply = self.nk.dispatch(vm, &call, &mut Vec::new()).reply().unwrap();
        for effect in self.nk.take_effects() {
            match effect {
                Effect::MapFrames { vm, gpa, hpa, bytes, access, .. } => {
                    assert!(self.ept.insert((vm, gpa), (hpa, bytes, access)).is_none());
                }
                Effect::UnmapFrames { vm, gpa, .. } => {
                    assert!(self.ept.remove(&(vm, gpa)).is_some());
                }
                _ => {}
            }
        }
        reply
    }

    fn nvram(&mut self, vm: VmId, op: u16, cap: NameWords, args: &[u64]) -> Reply {
        self.call(vm, self.am, op, cap, args)
    }

    /// Returns `vm`'s first initial capability of AM `am`.
    fn initial_of(&mut self, vm: VmId, am: u16) -> NameWords {
        for index in 0.. {
            let reply = self.call(vm, 0, nk_op::INITIAL as u16, NameWords::default(), &[index]);
            assert!(reply.status().is_ok(), "no initial capability of AM {am}");
            if reply.results[0] == u64::from(am) {
                return reply.name;
            }
        }
        unreachable!()
    }

    fn factory(&mut self, vm: VmId) -> NameWords {
        self.initial_of(vm, self.am)
    }

    /// `vm`'s exo address-space capability (rights map, alloc, dirty).
    fn aspace(&mut self, vm: VmId) -> NameWords {
        self.initial_of(vm, self.exo)
    }

    fn allocate(&mut self, vm: VmId, key: u64) -> Reply {
        let factory = self.factory(vm);
        self.nvram(vm, op::ALLOCATE, factory, &[REGION, key])
    }

    /// A guest store through its EPT: sets the page's dirty flag as the CPU would.
    fn guest_write(&mut self, vm: VmId, gpa: u64, data: &[u8]) {
        let (&(_, base), &(hpa, bytes, access)) = self
            .ept
            .range(..=(vm, gpa))
            .next_back()
            .filter(|(&(v, g), &(_, b, _))| v == vm && gpa + data.len() as u64 <= g + b)
            .expect("mapped");
        assert!(access & frame_access::WRITE != 0, "mapped writable");
        let _ = bytes;
        self.machine.write(hpa + (gpa - base), data);
        let mut dirty = self.machine.dirty.lock().unwrap();
        for page in (gpa & !0xFFF..gpa + data.len() as u64).step_by(4096) {
            dirty.insert((vm, page));
        }
    }

    fn guest_read(&self, vm: VmId, gpa: u64, len: usize) -> Vec<u8> {
        let (&(_, base), &(hpa, _, _)) = self.ept.range(..=(vm, gpa)).next_back().expect("mapped");
        let mut out = vec![0; len];
        self.machine.read(hpa + (gpa - base), &mut out);
        out
    }

    fn image(&self) -> Vec<u8> {
        self.machine.media.lock().unwrap().durable_image()
    }
}

fn ok(reply: Reply) -> Reply {
    assert!(reply.status().is_ok(), "{}", reply.status());
    reply
}

#[test]
fn committed_data_survives_a_restart_and_uncommitted_does_not() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 7));
    assert_eq!(region.results[..3], [REGION, 0, 1], "a new region, sequence 0");
    ok(s.nvram(A, op::MAP, region.name, &[GPA, u64::from(frame_access::READ | frame_access::WRITE)]));
    ok(s.nvram(A, op::BEGIN, region.name, &[]));
    s.guest_write(A, GPA + 100, b"first version");
    s.guest_write(A, GPA + 5 * 4096, &[0xAB; 4096]);
    let commit = ok(s.nvram(A, op::COMMIT, region.name, &[]));
    assert_eq!(commit.results[0], 1, "sequence 1");
    assert_eq!(commit.results[1], 17, "one block of page 0, all 16 of page 5");
    assert_eq!(commit.results[3], 2, "two dirty pages");
    s.guest_write(A, GPA + 100, b"never committed");
    // Power goes: the next boot restores the last commit.
    let mut s = boot(Some(s.image()));
    let again = ok(s.allocate(A, 7));
    assert_eq!(again.results[..3], [REGION, 1, 0], "restored, sequence 1");
    ok(s.nvram(A, op::MAP, again.name, &[GPA, u64::from(frame_access::READ)]));
    assert_eq!(s.guest_read(A, GPA + 100, 13), b"first version");
    assert_eq!(s.guest_read(A, GPA + 5 * 4096, 4096), vec![0xAB; 4096]);
}

#[test]
fn commit_writes_only_changed_blocks_and_restore_aborts() {
    let mut s = boot(None);
    // The durable device comes through the block AM: the NVRAM AM holds a range of it.
    let nvram = nk_caps::Principal::Am(nk_caps::AmId::new(s.am));
    let held =
        s.nk.table().nodes().filter_map(|n| n.cap).filter(|c| c.holder == nvram && c.object.am.raw() == s.am - 1);
    assert_eq!(held.count(), 1, "one block range capability");
    let region = ok(s.allocate(A, 1));
    ok(s.nvram(A, op::MAP, region.name, &[GPA, 3]));
    s.guest_write(A, GPA + 8 * 4096 + 300, &[1; 8]);
    let commit = ok(s.nvram(A, op::COMMIT, region.name, &[]));
    assert_eq!(commit.results[1..3], [1, 512], "one block and its blockset header");
    // Rewriting the same value dirties the page but changes no block.
    s.guest_write(A, GPA + 8 * 4096 + 300, &[1; 8]);
    assert_eq!(ok(s.nvram(A, op::COMMIT, region.name, &[])).results[1], 0);
    ok(s.nvram(A, op::BEGIN, region.name, &[]));
    assert_eq!(
        s.nvram(A, op::BEGIN, region.name, &[]).status().code(),
        Status::NOT_PERMITTED,
        "one transaction at a time"
    );
    s.guest_write(A, GPA + 8 * 4096 + 300, &[2; 8]);
    assert_eq!(ok(s.nvram(A, op::RESTORE, region.name, &[])).results[0], 1);
    assert_eq!(s.guest_read(A, GPA + 8 * 4096 + 300, 8), [1; 8], "aborted");
    assert_eq!(ok(s.nvram(A, op::SEQ, region.name, &[])).results[..3], [1, REGION, 0]);
}

#[test]
fn rights_guard_every_operation() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 1)).name;
    let read_only = ok(s.call(A, 0, nk_op::DERIVE as u16, region, &[rights::MAP_READ])).name;
    assert_eq!(s.nvram(A, op::MAP, read_only, &[GPA, 3]).status().code(), Status::NOT_PERMITTED, "no map-write");
    ok(s.nvram(A, op::MAP, read_only, &[GPA, 1]));
    for op in [op::BEGIN, op::COMMIT, op::RESTORE] {
        assert_eq!(s.nvram(A, op, read_only, &[]).status().code(), Status::MISSING_RIGHTS);
    }
    assert_eq!(
        s.nvram(A, op::MAP, region, &[GPA + REGION, 7]).status().code(),
        Status::BAD_ARGUMENT,
        "never executable"
    );
    assert_eq!(s.nvram(A, op::MAP, region, &[GPA + 4096, 3]).status().code(), Status::NOT_PERMITTED, "overlap");
    assert_eq!(s.nvram(A, op::MAP, region, &[GPA - 4096, 3]).status().code(), Status::BAD_ARGUMENT, "below the window");
    // B holds no capability to A's region.
    assert_ne!(s.nvram(B, op::COMMIT, region, &[]).status().code(), Status::OK);
}

#[test]
fn regions_are_separate_per_owner_and_loaded_once() {
    let mut s = boot(None);
    let a = ok(s.allocate(A, 5));
    let b = ok(s.allocate(B, 5));
    assert_eq!(b.results[2], 1, "B's key 5 is a region of its own");
    assert_eq!(s.allocate(A, 5).status().code(), Status::NOT_PERMITTED, "loaded already: share by delegating");
    ok(s.nvram(A, op::MAP, a.name, &[GPA, 3]));
    ok(s.nvram(B, op::MAP, b.name, &[GPA, 3]));
    s.guest_write(A, GPA, b"A's");
    s.guest_write(B, GPA, b"B's");
    ok(s.nvram(A, op::COMMIT, a.name, &[]));
    ok(s.nvram(B, op::COMMIT, b.name, &[]));
    let mut s = boot(Some(s.image()));
    let b = ok(s.allocate(B, 5));
    ok(s.nvram(B, op::MAP, b.name, &[GPA, 1]));
    assert_eq!(s.guest_read(B, GPA, 3), b"B's");
    let a = ok(s.allocate(A, 5));
    ok(s.nvram(A, op::MAP, a.name, &[GPA, 1]));
    assert_eq!(s.guest_read(A, GPA, 3), b"A's");
}

#[test]
fn revocation_unmaps_everywhere_and_aborts_the_transaction() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 1)).name;
    ok(s.nvram(A, op::MAP, region, &[GPA, 3]));
    s.guest_write(A, GPA, b"committed");
    ok(s.nvram(A, op::COMMIT, region, &[]));
    let lent = ok(s.call(A, 0, nk_op::DELEGATE as u16, region, &[u64::MAX, u64::from(B.raw()), 0]));
    let borrowed = ok(s.call(B, 0, nk_op::RECEIVED as u16, NameWords::default(), &[0])).name;
    ok(s.nvram(B, op::MAP, borrowed, &[GPA, 3]));
    ok(s.nvram(B, op::BEGIN, borrowed, &[]));
    s.guest_write(B, GPA, b"half done");
    assert_eq!(s.guest_read(A, GPA, 9), b"half done", "one working copy");
    ok(s.call(A, 0, nk_op::REVOKE as u16, lent.name, &[]));
    assert!(!s.ept.contains_key(&(B, GPA)), "B's mapping is gone");
    assert_eq!(s.guest_read(A, GPA, 9), b"committed", "B's transaction was aborted");
    assert_eq!(ok(s.nvram(A, op::SEQ, region, &[])).results[2], 0, "no transaction open");
    // The region's own capability dying unloads it: unmapped, and loadable again.
    ok(s.call(A, 0, nk_op::DELETE as u16, region, &[]));
    assert!(s.ept.is_empty());
    let again = ok(s.allocate(A, 1));
    assert_eq!(again.results[1..3], [1, 0], "restored from the device");
}

/// A power cut after every device write of a commit made through the AM: the next boot
/// restores the old or the new version, whole.
#[test]
fn crash_during_an_am_commit_restores_one_version() {
    let prepare = || {
        let mut s = boot(None);
        let region = ok(s.allocate(A, 9)).name;
        ok(s.nvram(A, op::MAP, region, &[GPA, 3]));
        for page in 0..16 {
            s.guest_write(A, GPA + page * 4096, &[page as u8; 4096]);
        }
        ok(s.nvram(A, op::COMMIT, region, &[]));
        for page in 0..16 {
            s.guest_write(A, GPA + page * 4096 + 8, &[0xEE; 3000]);
        }
        (s, region)
    };
    let old: Vec<u8> = (0..16u8).flat_map(|p| vec![p; 4096]).collect();
    let mut new = old.clone();
    for page in 0..16 {
        new[page * 4096 + 8..page * 4096 + 3008].fill(0xEE);
    }
    let (mut s, region) = prepare();
    let before = s.machine.media.lock().unwrap().counts().0;
    ok(s.nvram(A, op::COMMIT, region, &[]));
    let writes = s.machine.media.lock().unwrap().counts().0 - before;
    let mut points = 0;
    for k in 1..=writes {
        for policy in [CutPolicy::DropAll, CutPolicy::KeepAll, CutPolicy::Random(k)] {
            let (mut s, region) = prepare();
            s.machine.media.lock().unwrap().crash_after(k, policy);
            let _ = s.nvram(A, op::COMMIT, region, &[]);
            let mut s = boot(Some(s.image()));
            let again = ok(s.allocate(A, 9));
            ok(s.nvram(A, op::MAP, again.name, &[GPA, 1]));
            let held = s.guest_read(A, GPA, 16 * 4096);
            assert!(held == old || held == new, "cut after write {k} ({policy:?}): a torn region");
            assert_eq!(again.results[1], if held == old { 1 } else { 2 });
            points += 1;
        }
    }
    assert!(points >= 9, "{points} crash points");
}

/// Corrupted metadata on the device (a blockset header, the region's directory entry) is
/// refused at restore: the region is not loaded, never loaded wrong, and no new region is
/// placed over one whose entry is unreadable.
#[test]
fn corrupt_metadata_is_refused_not_restored() {
    use crate::directory::DIRECTORY_BYTES;
    use crate::ptx::Geometry;
    let mut s = boot(None);
    let region = ok(s.allocate(A, 3)).name;
    ok(s.nvram(A, op::MAP, region, &[GPA, 3]));
    s.guest_write(A, GPA, b"data");
    ok(s.nvram(A, op::COMMIT, region, &[]));
    let image = s.image();
    let g = Geometry::for_region(DIRECTORY_BYTES, 1, REGION).unwrap();
    let first_header = DIRECTORY_BYTES + u64::from(g.log_units) * 256;
    for (offset, what) in [(first_header + 100, "a header"), (256 + 20, "the directory entry")] {
        let mut bad = image.clone();
        bad[offset as usize] ^= 0x40;
        let mut s = boot(Some(bad));
        if offset < DIRECTORY_BYTES {
            // Whose the entry was is unreadable: nothing is placed while it exists.
            assert_eq!(s.allocate(A, 3).status().code(), Status::NO_MEMORY, "{what}");
            assert_eq!(s.allocate(A, 4).status().code(), Status::NO_MEMORY, "{what}: nothing placed");
        } else {
            assert_eq!(s.allocate(A, 3).status().code(), Status::NOT_PERMITTED, "{what}");
        }
    }
    // Intact, it restores.
    let mut s = boot(Some(image));
    assert_eq!(ok(s.allocate(A, 3)).results[1], 1);
}

/// The operation names this AM registers have exactly the numbers the shared ABI crate
/// gives guests (`nk_abi::nvram_op`), and there are no others.
#[test]
fn registered_op_numbers_are_the_shared_abis() {
    use nk_am::AbstractMachine as _;
    let mut table =
        nk_caps::CapTable::new(nk_caps::KernelId::new(0), 64, &mut nk_caps::FixedSeed::from_u64(1)).unwrap();
    let id = nk_caps::AmId::new(1);
    let mut am = NvramAm::new(Vec::new());
    table.register_am(id, am.name(), 16).unwrap();
    am.register(&mut nk_am::Registrar::new(id, &mut table)).unwrap();
    let ops = [
        ("allocate", nk_abi::nvram_op::ALLOCATE),
        ("map", nk_abi::nvram_op::MAP),
        ("unmap", nk_abi::nvram_op::UNMAP),
        ("begin", nk_abi::nvram_op::BEGIN),
        ("commit", nk_abi::nvram_op::COMMIT),
        ("restore", nk_abi::nvram_op::RESTORE),
        ("seq", nk_abi::nvram_op::SEQ),
    ];
    for (name, number) in ops {
        let found = table.registry().find_op(id, name).map(|op| u32::from(op.index()));
        assert_eq!(found, Some(number), "operation {name}");
    }
    let past = u16::try_from(ops.len()).unwrap();
    assert_eq!(table.registry().op_name(nk_caps::OpId::new(id, past)), None, "an operation nk-abi lacks");
}

/// A guest's owner number is FNV-1a 64 of its name (what the hypervisor granted before
/// `NvramGrant::for_guest`, so regions on existing disks keep their owner).
#[test]
fn owner_number_is_fnv1a_of_the_guest_name() {
    let fnv1a = |name: &str| {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    for name in ["keeper", "linux", ""] {
        assert_eq!(NvramGrant::for_guest(A, name).owner, fnv1a(name), "{name}");
    }
}

/// The write set comes from below (seed §5.2.1): the AM reads it through an exo
/// `aspace[dirty]` capability the mapper lends at `map` (charged to the mapper); when the
/// mapper takes it back, commit is refused with `REVOKED` (nothing written, the machine
/// unharmed), restore still aborts, and a new mapping lends a new one.
#[test]
fn the_write_set_comes_through_a_lent_exo_capability() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 3)).name;
    let aspace = s.aspace(A);
    // A lends a copy of its address-space capability (derived, so it can revoke it alone).
    let lent = ok(s.call(A, 0, nk_op::DERIVE as u16, aspace, &[u64::MAX])).name;
    let charged = |s: &Setup| s.nk.table().usage(nk_caps::Principal::Vm(A)).unwrap().charged;
    let before = charged(&s);
    ok(s.nvram(A, op::MAP, region, &[GPA, 3, lent.high, lent.low]));
    assert_eq!(charged(&s), before + 1, "the AM's child of the lent capability is charged to A");
    s.guest_write(A, GPA + 4096, &[7; 8]);
    let commit = ok(s.nvram(A, op::COMMIT, region, &[]));
    assert_eq!(commit.results[3], 1, "one dirty page, read through the exo AM");
    // A takes the capability back: the AM's child dies with the copy.
    ok(s.call(A, 0, nk_op::REVOKE as u16, lent, &[]));
    s.guest_write(A, GPA + 2 * 4096, &[8; 8]);
    let refused = s.nvram(A, op::COMMIT, region, &[]);
    assert_eq!(refused.status().code(), Status::REVOKED, "commit refused, not guessed");
    assert_eq!(ok(s.nvram(A, op::SEQ, region, &[])).results[0], 1, "nothing committed");
    assert_eq!(s.nvram(A, op::COMMIT, region, &[]).status().code(), Status::REVOKED, "and again");
    // Restore still aborts (every page counts as dirty once the flags are out of reach).
    ok(s.nvram(A, op::RESTORE, region, &[]));
    assert_eq!(s.guest_read(A, GPA + 2 * 4096, 8), [0; 8]);
    assert_eq!(s.guest_read(A, GPA + 4096, 8), [7; 8]);
    // Unmapping gives the dead child back; a new mapping lends A's own capability (found
    // by the AM when A names none), and commits work again.
    ok(s.nvram(A, op::UNMAP, region, &[GPA]));
    assert_eq!(charged(&s), before, "the dead child is deleted at unmap");
    ok(s.nvram(A, op::MAP, region, &[GPA, 3]));
    s.guest_write(A, GPA + 3 * 4096, &[9; 8]);
    let commit = ok(s.nvram(A, op::COMMIT, region, &[]));
    // Every page: what A wrote between the restore and the unmap could not be read.
    assert_eq!((commit.results[0], commit.results[1], commit.results[3]), (2, 1, REGION / 4096));
    s.guest_write(A, GPA + 3 * 4096, &[10; 8]);
    let commit = ok(s.nvram(A, op::COMMIT, region, &[]));
    assert_eq!((commit.results[0], commit.results[3]), (3, 1), "and then exactly the written page");
    // A name A does not hold is refused at map (B's address space).
    let other = s.aspace(B);
    ok(s.nvram(A, op::UNMAP, region, &[GPA]));
    let refused = s.nvram(A, op::MAP, region, &[GPA, 3, other.high, other.low]);
    assert_eq!(refused.status().code(), Status::WRONG_HOLDER);
    // Read-only mappings need no dirty tracking and lend nothing.
    let before = charged(&s);
    ok(s.nvram(A, op::MAP, region, &[GPA, 1]));
    assert_eq!(charged(&s), before);
}

/// Without an exo capability (the mapper holds none), every page of a writable mapping
/// counts as dirty: slower, same result.
#[test]
fn without_an_exo_capability_every_page_counts_as_dirty() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 4)).name;
    let aspace = s.aspace(A);
    ok(s.call(A, 0, nk_op::REVOKE as u16, aspace, &[]));
    ok(s.nvram(A, op::MAP, region, &[GPA, 3]));
    s.guest_write(A, GPA, &[1; 8]);
    let commit = ok(s.nvram(A, op::COMMIT, region, &[]));
    assert_eq!(commit.results[3], REGION / 4096, "every page dirty");
    assert_eq!(commit.results[1], 1, "but only the changed block written");
}

/// `commit(c, whole = 1)` writes every block of the region (the naive whole-region copy
/// the bench compares against), and the region restores to it as to any commit.
#[test]
fn a_whole_commit_writes_every_block() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 5));
    ok(s.nvram(A, op::MAP, region.name, &[GPA, 3]));
    s.guest_write(A, GPA + 77, &[3; 8]);
    let whole = ok(s.nvram(A, op::COMMIT, region.name, &[1]));
    assert_eq!(whole.results[1], REGION / 256, "every block");
    assert!(whole.results[2] >= REGION, "the whole region went to the device");
    s.guest_write(A, GPA + 77, &[4; 8]);
    let sparse = ok(s.nvram(A, op::COMMIT, region.name, &[]));
    assert_eq!(sparse.results[1], 1, "then the write set again");
    let mut s = boot(Some(s.image()));
    let again = ok(s.allocate(A, 5));
    assert_eq!(again.results[1], 2);
    ok(s.nvram(A, op::MAP, again.name, &[GPA, 1]));
    assert_eq!(s.guest_read(A, GPA + 77, 8), [4; 8]);
}

/// §5.4's `map-region(region, aspace, offset)` into another VM: A, holding a region and a
/// capability to B's address space (B delegated it), maps the region into B; B's writes
/// are A's commit's write set (read through that capability); revoking the region
/// capability A mapped with unmaps it from B; B taking its address space back refuses
/// A's commits. Without `map` on the address-space capability the mapping is refused.
#[test]
fn a_region_maps_into_another_vms_address_space() {
    let mut s = boot(None);
    let region = ok(s.allocate(A, 6)).name;
    let b_aspace = s.aspace(B);
    // B lends A its address space (a copy with every right), and one with `dirty` only.
    let lent = ok(s.call(B, 0, nk_op::DELEGATE as u16, b_aspace, &[u64::MAX, u64::from(A.raw()), 0])).name;
    let weak = ok(s.call(B, 0, nk_op::DERIVE as u16, b_aspace, &[4])).name;
    let weak = ok(s.call(B, 0, nk_op::DELEGATE as u16, weak, &[u64::MAX, u64::from(A.raw()), 0])).name;
    let refused = s.nvram(A, op::MAP, region, &[GPA, 3, weak.high, weak.low]);
    assert_eq!(refused.status().code(), Status::NOT_PERMITTED, "no `map` right on B's address space");
    // A maps through a child region capability, so it can take that mapping back alone.
    let child = ok(s.call(A, 0, nk_op::DERIVE as u16, region, &[u64::MAX])).name;
    ok(s.nvram(A, op::MAP, child, &[GPA, 3, lent.high, lent.low]));
    assert!(s.ept.contains_key(&(B, GPA)) && !s.ept.contains_key(&(A, GPA)), "mapped in B, not in A");
    ok(s.nvram(A, op::MAP, region, &[GPA, 1]));
    s.guest_write(B, GPA + 2 * 4096, b"written by B");
    let commit = ok(s.nvram(A, op::COMMIT, region, &[]));
    assert_eq!(commit.results[3], 1, "B's write is the write set");
    assert_eq!(s.guest_read(A, GPA + 2 * 4096, 12), b"written by B", "A sees it");
    // Revoking the capability A mapped with unmaps the region from B (A keeps its own).
    ok(s.call(A, 0, nk_op::REVOKE as u16, child, &[]));
    assert!(!s.ept.contains_key(&(B, GPA)) && s.ept.contains_key(&(A, GPA)), "unmapped from B only");
    // Again, then B takes its address space back: A's commits are refused.
    ok(s.nvram(A, op::MAP, region, &[GPA, 3, lent.high, lent.low]));
    s.guest_write(B, GPA, b"more");
    ok(s.nvram(A, op::COMMIT, region, &[]));
    ok(s.call(B, 0, nk_op::REVOKE as u16, lent, &[]));
    assert_eq!(s.nvram(A, op::COMMIT, region, &[]).status().code(), Status::REVOKED);
    // A unmaps it from B by naming B; then commits work again.
    ok(s.nvram(A, op::UNMAP, region, &[GPA, u64::from(B.raw())]));
    assert!(!s.ept.contains_key(&(B, GPA)));
    ok(s.nvram(A, op::COMMIT, region, &[]));
}
