//! Several kernel instances, one per simulated CPU, sharing the counter AM and exchanging
//! protocol messages through FIFO queues (encoded to words and back, as the hypervisor's
//! rings carry them).

use super::*;
use alloc::collections::VecDeque;
use nk_protocol::MESSAGE_WORDS;

struct Machine {
    kernels: Vec<NullKernel>,
    /// Messages on the way: (from, to, words).
    wire: VecDeque<(KernelId, KernelId, [u64; MESSAGE_WORDS])>,
    counter_am: u16,
    delivered: usize,
}

/// Collects one kernel's outgoing messages with their sender.
struct Wire<'a>(KernelId, &'a mut VecDeque<(KernelId, KernelId, [u64; MESSAGE_WORDS])>);

impl Outbox for Wire<'_> {
    fn send(&mut self, to: KernelId, message: Message) {
        self.1.push_back((self.0, to, message.encode()));
    }
}

/// VM `n` runs on kernel `n - 1`.
fn machine(count: u16) -> Machine {
    let counter = shared_am(Box::new(CounterAm::new()));
    let mut kernels: Vec<NullKernel> = (0..count)
        .map(|k| {
            let mut nk = NullKernel::new(KernelId::new(k), count, 4096, &mut FixedSeed::from_u64(k.into())).unwrap();
            nk.add_shared_am(counter.clone(), 1024).unwrap();
            nk.set_caller_ring(|| 0);
            nk
        })
        .collect();
    for k in 0..count {
        let vm = VmId::new(u32::from(k) + 1);
        for (other, nk) in kernels.iter_mut().enumerate() {
            if other == usize::from(k) {
                assert!(nk.add_vm(vm, 512).unwrap().is_empty());
            } else {
                nk.place(vm, KernelId::new(k), 512).unwrap();
            }
        }
    }
    Machine { kernels, wire: VecDeque::new(), counter_am: FIRST_AM_ID, delivered: 0 }
}

fn kernel_of(vm: VmId) -> usize {
    vm.raw() as usize - 1
}

impl Machine {
    /// Starts a call of `vm` on its kernel.
    fn start(&mut self, vm: VmId, am: u16, op: u32, caps: &[NameWords], args: &[u64]) -> Dispatched {
        let mut call = Call { selector: Selector::new(am, op).encode(), ..Call::default() };
        call.caps[..caps.len()].copy_from_slice(caps);
        call.args[..args.len()].copy_from_slice(args);
        let k = kernel_of(vm);
        let id = self.kernels[k].id();
        self.kernels[k].dispatch(vm, &call, &mut Wire(id, &mut self.wire))
    }

    /// Delivers messages until none is left.
    fn settle(&mut self) {
        while let Some((from, to, words)) = self.wire.pop_front() {
            let message = Message::decode(&words).expect("kernels send well-formed messages");
            let nk = &mut self.kernels[usize::from(to.raw())];
            nk.handle(from, message, &mut Wire(to, &mut self.wire));
            self.delivered += 1;
        }
    }

    /// Runs a call to its end, delivering messages while it waits.
    fn call(&mut self, vm: VmId, am: u16, op: u32, caps: &[NameWords], args: &[u64]) -> Reply {
        match self.start(vm, am, op, caps, args) {
            Dispatched::Reply(reply) => reply,
            Dispatched::Pending(id) => {
                self.settle();
                let finished = self.kernels[kernel_of(vm)].poll().expect("the call finished once messages settled");
                assert_eq!(finished.op, id);
                finished.reply
            }
        }
    }

    fn nk_op(&mut self, vm: VmId, op: u32, cap: NameWords, args: &[u64]) -> Reply {
        self.call(vm, NULL_KERNEL_AM, op, &[cap], args)
    }

    fn counter(&mut self, vm: VmId) -> NameWords {
        let factory = self.nk_op(vm, nk_op::INITIAL, NameWords::default(), &[0]).name;
        let reply = self.call(vm, self.counter_am, op::CREATE.into(), &[factory], &[]);
        assert!(reply.status().is_ok(), "create: {}", reply.status());
        reply.name
    }

    fn delegate(&mut self, from: VmId, cap: NameWords, to: VmId) -> NameWords {
        let reply = self.nk_op(from, nk_op::DELEGATE, cap, &[u64::MAX, to.raw().into(), 0]);
        assert!(reply.status().is_ok(), "delegate vm{} -> vm{}: {}", from.raw(), to.raw(), reply.status());
        reply.name
    }

    fn received(&mut self, vm: VmId, index: u64) -> NameWords {
        let reply = self.nk_op(vm, nk_op::RECEIVED, NameWords::default(), &[index]);
        assert!(reply.status().is_ok(), "received({index}) of vm{}: {}", vm.raw(), reply.status());
        reply.name
    }

    fn read(&mut self, vm: VmId, cap: NameWords) -> Status {
        self.call(vm, self.counter_am, op::READ.into(), &[cap], &[]).status()
    }

    fn assert_quiet(&self) {
        assert!(self.wire.is_empty());
        for nk in &self.kernels {
            assert!(nk.protocol().is_idle(), "kernel {} still waits", nk.id().raw());
            nk.table().check_consistency().unwrap();
        }
    }
}

const VM4: VmId = VmId::new(4);

#[test]
fn a_delegation_across_kernels_parks_then_lands_in_the_inbox() {
    let mut m = machine(2);
    let c = m.counter(VM1);
    let Dispatched::Pending(id) = m.start(VM1, NULL_KERNEL_AM, nk_op::DELEGATE, &[c], &[u64::MAX, 2, 0]) else {
        panic!("a delegation to another kernel's VM must wait for its acknowledgement");
    };
    assert_eq!(m.kernels[0].poll(), None, "nothing finishes before the messages are delivered");
    m.settle();
    let finished = m.kernels[0].poll().unwrap();
    assert_eq!(finished.op, id);
    let child = finished.reply.name;
    assert_eq!(CapName::from_words(child.high, child.low).kernel(), KernelId::new(1), "the child lives with VM2");
    assert_eq!(m.received(VM2, 0), child);
    // The shared counter AM serves the object on both kernels.
    let added = m.call(VM2, m.counter_am, op::ADD.into(), &[child], &[5]);
    assert!(added.status().is_ok(), "{}", added.status());
    let read = m.call(VM1, m.counter_am, op::READ.into(), &[c], &[]);
    assert_eq!(read.results[0], 5);
    // A capability is used on its holder's kernel: VM1's kernel does not know the name.
    assert_eq!(m.read(VM1, child), status(Status::UNKNOWN_NAME, Some(0)));
    m.assert_quiet();
}

#[test]
fn revoking_a_tree_that_spans_four_kernels_kills_every_copy() {
    let mut m = machine(4);
    let root = m.counter(VM1);
    let top = m.nk_op(VM1, nk_op::DERIVE, root, &[u64::MAX]).name;
    // VM1 -> VM2 -> VM3 -> VM4 -> VM1: the tree zigzags over all four kernels.
    let mut holders = vec![(VM1, top)];
    let mut cap = top;
    for (from, to) in [(VM1, VM2), (VM2, VM3), (VM3, VM4), (VM4, VM1)] {
        let local = m.nk_op(from, nk_op::DERIVE, cap, &[u64::MAX]).name;
        holders.push((from, local));
        cap = m.delegate(from, local, to);
        assert_eq!(m.received(to, 0), cap);
        holders.push((to, cap));
    }
    for &(vm, name) in &holders {
        assert!(m.read(vm, name).is_ok());
    }
    let messages_before = m.delivered;
    let revoked = m.nk_op(VM1, nk_op::REVOKE, top, &[]);
    assert_eq!((revoked.status(), revoked.results[0]), (status(Status::OK, None), holders.len() as u64));
    assert!(m.delivered - messages_before >= 8, "four remote children: a revoke and a gone each");
    for &(vm, name) in &holders {
        assert_eq!(m.read(vm, name), status(Status::REVOKED, Some(0)), "vm{} still uses its copy", vm.raw());
    }
    assert!(m.read(VM1, root).is_ok(), "the root above the revoked capability survives");
    m.assert_quiet();
}

#[test]
fn removing_a_vm_waits_for_the_kernels_holding_its_delegations() {
    let mut m = machine(3);
    let c = m.counter(VM1);
    let to2 = m.delegate(VM1, c, VM2);
    let to3 = m.delegate(VM1, c, VM3);
    let k0 = m.kernels[0].id();
    let removal = m.kernels[0].remove_vm(VM1, &mut Wire(k0, &mut m.wire)).unwrap();
    let Dispatched::Pending(id) = removal else { panic!("the removal must wait for kernels 1 and 2") };
    m.settle();
    let finished = m.kernels[0].poll().unwrap();
    assert_eq!((finished.op, finished.reply.results[0]), (id, 4), "the counter cap, the factory, two children");
    assert_eq!(m.read(VM2, to2), status(Status::REVOKED, Some(0)));
    assert_eq!(m.read(VM3, to3), status(Status::REVOKED, Some(0)));
    let after = m.nk_op(VM2, nk_op::DELEGATE, to2, &[u64::MAX, 1, 0]).status();
    assert_eq!(after, status(Status::REVOKED, Some(0)));
    m.assert_quiet();
}

#[test]
fn a_delegation_to_a_vm_no_kernel_knows_changes_nothing() {
    let mut m = machine(2);
    let c = m.counter(VM1);
    let before: Vec<u32> = m.kernels.iter().map(|k| k.table().len()).collect();
    let reply = m.nk_op(VM1, nk_op::DELEGATE, c, &[u64::MAX, 9, 0]);
    assert_eq!(reply.status(), status(Status::BAD_ARGUMENT, None));
    let after: Vec<u32> = m.kernels.iter().map(|k| k.table().len()).collect();
    assert_eq!(before, after);
    m.assert_quiet();
}

#[test]
fn a_delegation_flood_across_kernels_is_paid_by_the_delegator_there() {
    let mut m = machine(2);
    let factory = {
        let call = m.nk_op(VM1, nk_op::INITIAL, NameWords::default(), &[0]);
        call.name
    };
    let mut given = 0u32;
    let refusal = loop {
        let reply = m.nk_op(VM1, nk_op::DELEGATE, factory, &[u64::MAX, 2, 0]);
        if !reply.status().is_ok() {
            break reply.status();
        }
        given += 1;
        assert!(given <= 512, "the flood must end at VM1's quota on kernel 1");
    };
    assert_eq!(refusal, status(Status::QUOTA_EXCEEDED, None));
    assert_eq!(given, 512);
    let on_k1 = m.kernels[1].table();
    assert_eq!(on_k1.usage(Principal::Vm(VM1)).unwrap().charged, 512);
    assert_eq!(on_k1.usage(Principal::Vm(VM2)).unwrap().charged, 1, "VM2 pays only for its factory");
    let got = m.nk_op(VM2, nk_op::RECEIVED, NameWords::default(), &[0]);
    assert_eq!(got.results[2], u64::from(VM1.raw()) << 1, "the inbox names the sender across kernels");
    // VM2 still makes capabilities of its own.
    let mine = m.counter(VM2);
    assert!(m.read(VM2, mine).is_ok());
    m.assert_quiet();
}
