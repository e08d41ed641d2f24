//! The block AM under an AM layered on it: a test AM holds a block-range capability a VM
//! lent it and runs the NVRAM AM's PTx store over it (`BlockMedia`: every device access an
//! AM-to-AM call checked by the null-Kernel), commits, restores; revoking the capability
//! makes the store's accesses fail cleanly. Plus the block AM's own checks from a VM.

use std::sync::Mutex;

use nk_abi::{nk_op, Call, NameWords, Reply, Selector, Status};
use nk_am::{
    AbstractMachine, AmError, ArgSpec, CapName, Checked, DeadCap, Effects, Kernel, KindSpec, Media, MediaError,
    MediaSource, ObjId, Object, OpSpec, Outcome, Principal, RegisterError, Registrar, Rights, VmId, PLAIN_ARGS,
};
use nk_am_block::{op, BlockAm, BlockGrant, BlockMedia};
use nk_am_nvram::ptx::{Geometry, Store, BLOCK};
use nk_caps::{FixedSeed, KernelId};
use nk_core::NullKernel;

const VM: VmId = VmId::new(1);
const DEVICE: u64 = 1 << 20;
const REGION: u64 = 64 * 1024;

/// RAM as the device the hypervisor lends.
struct Ram(Mutex<RamMedia>);
struct RamMedia(Vec<u8>, Vec<Event>);

/// What the device saw, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Write(u64, usize),
    Fence,
}

impl Media for RamMedia {
    fn describe(&self) -> &str {
        "test RAM"
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let at = offset as usize;
        buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or(MediaError::OutOfRange)?);
        Ok(())
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        let at = offset as usize;
        self.0.get_mut(at..at + data.len()).ok_or(MediaError::OutOfRange)?.copy_from_slice(data);
        self.1.push(Event::Write(offset, data.len()));
        Ok(())
    }
    fn fence(&mut self) -> Result<(), MediaError> {
        self.1.push(Event::Fence);
        Ok(())
    }
}

impl MediaSource for Ram {
    fn with_media(&self, f: &mut dyn FnMut(&mut dyn Media)) -> bool {
        f(&mut *self.0.lock().unwrap());
        true
    }
}

/// A PTx store on a lent block range: `lend(c, name high, name low)`, `commit(c, round)`
/// (blocks 0..4 of a 64 KiB region filled with `round`), `check(c)` (restores the store
/// from the range and returns its seq and block 0's first byte).
#[derive(Default)]
struct PtxUser {
    kind: Option<nk_caps::ObjKind>,
    am: Option<nk_caps::AmId>,
    held: Option<CapName>,
    store: Option<Store>,
}

impl AbstractMachine for PtxUser {
    fn name(&self) -> &'static str {
        "ptx-user"
    }
    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "user", rights: &["use"] })?;
        (self.kind, self.am) = (Some(kind), Some(r.am()));
        for name in ["lend", "commit", "check", "write-fenced"] {
            r.operation(OpSpec { name, args: &[ArgSpec::new(kind, Rights::NONE)] })?;
        }
        Ok(())
    }
    fn invoke(
        &mut self,
        checked: &Checked,
        args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<Outcome, AmError> {
        let Principal::Vm(vm) = checked.caller() else { return Err(AmError::NotPermitted) };
        let geometry = Geometry::for_region(0, 7, REGION).ok_or(AmError::BadArgument)?;
        match checked.op().index() {
            0 => {
                let (name, _) = kernel.take_cap(vm, CapName::from_words(args[0], args[1]), &["read", "write"])?;
                self.held = Some(name);
                Ok(Outcome::value(0))
            }
            1 => {
                let mut media = BlockMedia::open(kernel, self.held.ok_or(AmError::NotPermitted)?)?;
                if self.store.is_none() {
                    self.store = Some(Store::format(&mut media, geometry).map_err(|_| AmError::NotPermitted)?);
                }
                let store = self.store.as_mut().ok_or(AmError::NotPermitted)?;
                let round = args[0] as u8;
                let stats = store
                    .commit(&mut media, &[0, 1, 2, 3], &mut |_, out| out.fill(round))
                    .map_err(|_| AmError::NotPermitted)?;
                Ok(Outcome::value(stats.seq))
            }
            2 => {
                let mut media = BlockMedia::open(kernel, self.held.ok_or(AmError::NotPermitted)?)?;
                let (store, _) = Store::open(&mut media, geometry).map_err(|_| AmError::NotPermitted)?;
                let mut first = [0u8; BLOCK];
                store.read_block(&mut media, 0, &mut first).map_err(|_| AmError::NotPermitted)?;
                Ok(Outcome { name: None, results: [store.seq(), u64::from(first[0]), 0, 0] })
            }
            // write-fenced(c, flags): 512 bytes of 0x5A at 1024 through the block AM's
            // `write` with `flags`, by `Media::write_buf_fenced` when flags is 1.
            3 => {
                let held = self.held.ok_or(AmError::NotPermitted)?;
                let mut data = [0x5Au8; 512];
                if args[0] == nk_am_block::WRITE_FENCED {
                    let mut media = BlockMedia::open(kernel, held)?;
                    media.write_buf_fenced(1024, &mut data).map_err(|_| AmError::NotPermitted)?;
                    return Ok(Outcome::value(0));
                }
                let write = kernel.find_op("block", "write").ok_or(AmError::NotPermitted)?;
                if args[0] & nk_am_block::WRITE_PAIR != 0 {
                    // 512 bytes at 1024, then 256 bytes of 0xA5 at args[1].
                    let mut pair = [0x5Au8; 768];
                    pair[512..].fill(0xA5);
                    return kernel.call_am(write, &[held], &[1024, 512, args[0], args[1], 256], &mut pair);
                }
                kernel.call_am(write, &[held], &[1024, 512, args[0], 0, 0], &mut data)
            }
            _ => Err(AmError::NotPermitted),
        }
    }
    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let object = Object::new(self.am.unwrap(), self.kind.unwrap(), ObjId::new(0));
        Ok(vec![kernel.grant_new(object, Rights::from_bits(1), Principal::Vm(vm), nk_am::Binding::Bound)?])
    }
    fn revoked(&mut self, _: &DeadCap, _: &mut dyn Effects) {}
}

struct Setup {
    ram: &'static Ram,
    nk: NullKernel,
    block: u16,
    user: u16,
}

fn setup() -> Setup {
    let ram: &'static Ram = Box::leak(Box::new(Ram(Mutex::new(RamMedia(vec![0; DEVICE as usize], Vec::new())))));
    let mut nk = NullKernel::new(KernelId::new(0), 1, 1024, &mut FixedSeed::from_u64(5)).unwrap();
    nk.set_media(ram);
    nk.set_caller_ring(|| 0);
    let grants = vec![BlockGrant { vm: VM, first: 0, bytes: DEVICE }];
    let block = nk.add_am(Box::new(BlockAm::new(grants)), 64).unwrap().raw();
    let user = nk.add_am(Box::new(PtxUser::default()), 64).unwrap().raw();
    assert!(nk.add_vm(VM, 64).unwrap().is_empty());
    Setup { ram, nk, block, user }
}

impl Setup {
    fn call(&mut self, am: u16, op: u16, cap: NameWords, args: &[u64]) -> Reply {
        let mut call = Call { selector: Selector::new(am, op.into()).encode(), ..Call::default() };
        call.caps[0] = cap;
        call.args[..args.len()].copy_from_slice(args);
        let reply = self.nk.dispatch(VM, &call, &mut Vec::new()).reply().unwrap();
        self.nk.apply_effects(&mut Vec::new(), |_| {});
        reply
    }
    fn initial(&mut self, index: u64) -> NameWords {
        let reply = self.call(0, nk_op::INITIAL as u16, NameWords::default(), &[index]);
        assert!(reply.status().is_ok());
        reply.name
    }
}

fn ok(reply: Reply) -> Reply {
    assert!(reply.status().is_ok(), "{}", reply.status());
    reply
}

#[test]
fn a_ptx_store_runs_on_block_capabilities_and_stops_when_they_die() {
    let mut s = setup();
    let (range, user) = (s.initial(0), s.initial(1));
    // The VM lends a copy of its range (so it can take it back alone).
    let copy = ok(s.call(0, nk_op::DERIVE as u16, range, &[u64::MAX])).name;
    let user_am = s.user;
    ok(s.call(user_am, 0, user, &[copy.high, copy.low]));
    for round in 1..=3 {
        assert_eq!(ok(s.call(user_am, 1, user, &[round])).results[0], round);
    }
    assert_eq!(ok(s.call(user_am, 2, user, &[])).results[..2], [3, 3], "restored from the block range");
    // The VM sees the same bytes through its own capability (at most 32 bytes a read).
    let block = s.block;
    let size = ok(s.call(block, op::SIZE, range, &[]));
    assert_eq!(size.results[..2], [DEVICE, 0]);
    // The VM cannot write (no buffer) nor read past its range or more than 32 bytes.
    assert_eq!(s.call(block, op::WRITE, range, &[0, 256]).status().code(), Status::NOT_PERMITTED);
    assert_eq!(s.call(block, op::READ, range, &[DEVICE, 8]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(s.call(block, op::READ, range, &[0, 33]).status().code(), Status::BAD_ARGUMENT);
    // A split range reads inside its parent; past its end is refused.
    let part = ok(s.call(block, op::SPLIT, range, &[4096, 512]));
    assert_eq!(part.results[..2], [512, 4096]);
    assert_eq!(s.call(block, op::READ, part.name, &[512, 8]).status().code(), Status::BAD_ARGUMENT);
    ok(s.call(block, op::READ, part.name, &[256, 8]));
    // The VM takes the range back: the store's accesses fail, cleanly.
    ok(s.call(0, nk_op::REVOKE as u16, copy, &[]));
    assert_eq!(s.call(user_am, 1, user, &[4]).status().code(), Status::REVOKED);
    assert_eq!(s.call(user_am, 2, user, &[]).status().code(), Status::REVOKED);
    // Revoking what the VM was granted kills the range and the one split from it.
    let derived = ok(s.call(0, nk_op::DERIVE as u16, range, &[u64::MAX])).name;
    ok(s.call(0, nk_op::REVOKE as u16, range, &[]));
    let _ = derived;
    assert_ne!(s.call(block, op::SIZE, part.name, &[]).status().code(), Status::OK);
}

#[test]
fn a_fenced_write_is_the_write_then_the_fence_in_one_call() {
    let mut s = setup();
    let (range, user) = (s.initial(0), s.initial(1));
    let user_am = s.user;
    ok(s.call(user_am, 0, user, &[range.high, range.low]));
    let events = |s: &Setup| core::mem::take(&mut s.ram.0.lock().unwrap().1);
    ok(s.call(user_am, 3, user, &[nk_am_block::WRITE_FENCED]));
    assert_eq!(events(&s), [Event::Write(1024, 512), Event::Fence]);
    assert_eq!(s.ram.0.lock().unwrap().0[1024..1536], [0x5A; 512]);
    // Without the flag: the write alone.
    ok(s.call(user_am, 3, user, &[0]));
    assert_eq!(events(&s), [Event::Write(1024, 512)]);
    // An unknown flag: refused, nothing written.
    assert_eq!(s.call(user_am, 3, user, &[4]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(events(&s), []);
    // A pair: write, fence, write, fence; a pair without the fence flag, or whose second
    // range is outside the range, is refused with nothing written.
    use nk_am_block::{WRITE_FENCED, WRITE_PAIR};
    assert_eq!(ok(s.call(user_am, 3, user, &[WRITE_FENCED | WRITE_PAIR, 4096])).results[0], 768);
    assert_eq!(events(&s), [Event::Write(1024, 512), Event::Fence, Event::Write(4096, 256), Event::Fence]);
    assert_eq!(s.ram.0.lock().unwrap().0[4096..4352], [0xA5; 256]);
    assert_eq!(s.call(user_am, 3, user, &[WRITE_PAIR, 4096]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(s.call(user_am, 3, user, &[WRITE_FENCED | WRITE_PAIR, DEVICE]).status().code(), Status::BAD_ARGUMENT);
    assert_eq!(events(&s), []);
    // A commit: data then fence, header then fence, in that order (each write carrying
    // its fence).
    ok(s.call(user_am, 1, user, &[1]));
    events(&s);
    ok(s.call(user_am, 1, user, &[2]));
    let seen = events(&s);
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(matches!(seen[..], [Event::Write(_, 1024), Event::Fence, Event::Write(_, 256), Event::Fence]), "{seen:?}");
}
