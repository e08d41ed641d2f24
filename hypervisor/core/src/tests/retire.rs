//! AMs retiring the objects they destroy (`Effect::Retire`): the null-Kernel deletes the
//! AM's root capability with its subtree once the step is over, on one kernel and across
//! kernels.

use super::*;
use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicU64, Ordering};
use nk_am::{ArgSpec, Checked, KindSpec, ObjId, ObjKind, OpSpec, Outcome as AmOutcome, PLAIN_ARGS};
use nk_protocol::MESSAGE_WORDS;

/// An AM of cells: `create(f: factory)` makes one (each VM is granted a factory), `destroy(c: cell/use)` kills it and retires it.
#[derive(Default)]
struct Cells {
    kind: Option<ObjKind>,
    factory: Option<ObjKind>,
    next: u64,
    /// Live cells and the AM's root capability to each.
    live: BTreeMap<u64, CapName>,
    /// Capabilities to dead cells the AM heard of.
    deaths: Arc<AtomicU64>,
}

impl AbstractMachine for Cells {
    fn name(&self) -> &'static str {
        "cells"
    }

    fn register(&mut self, r: &mut Registrar<'_>) -> Result<(), RegisterError> {
        let kind = r.kind(KindSpec { name: "cell", rights: &["use"] })?;
        let use_ = r.rights(kind, &["use"]).ok_or(RegisterError::UnknownKind)?;
        self.kind = Some(kind);
        let factory = r.kind(KindSpec { name: "factory", rights: &["create"] })?;
        self.factory = Some(factory);
        r.operation(OpSpec { name: "create", args: &[ArgSpec::new(factory, Rights::from_bits(1))] })?;
        r.operation(OpSpec { name: "destroy", args: &[ArgSpec::new(kind, use_)] })?;
        Ok(())
    }

    fn invoke(
        &mut self,
        checked: &Checked,
        _args: &[u64; PLAIN_ARGS],
        kernel: &mut dyn Kernel,
    ) -> Result<AmOutcome, AmError> {
        let kind = self.kind.ok_or(AmError::NotPermitted)?;
        match checked.op().index() {
            0 => {
                self.next += 1;
                let object = Object::new(checked.am(), kind, ObjId::new(self.next));
                let (root, name) =
                    kernel.grant_new_root(object, Rights::from_bits(1), checked.caller(), Binding::Bound)?;
                self.live.insert(self.next, root);
                Ok(AmOutcome { name: Some(name), results: [0; 4] })
            }
            _ => {
                let object = checked.args()[0].object();
                let root = self.live.remove(&object.id.raw()).ok_or(AmError::NotPermitted)?;
                kernel.emit(Effect::Retire { am: object.am, root });
                Ok(AmOutcome::default())
            }
        }
    }

    fn grant_initial(&mut self, vm: VmId, kernel: &mut dyn Kernel) -> Result<Vec<CapName>, AmError> {
        let factory = self.factory.ok_or(AmError::NotPermitted)?;
        let object = Object::new(AmId::new(CELLS), factory, ObjId::new(0));
        Ok(alloc::vec![kernel.grant_new(object, Rights::from_bits(1), Principal::Vm(vm), Binding::Bound)?])
    }

    fn revoked(&mut self, _dead: &DeadCap, _effects: &mut dyn Effects) {
        self.deaths.fetch_add(1, Ordering::Relaxed);
    }
}

const CELLS: u16 = FIRST_AM_ID;

fn call(nk: &mut NullKernel, vm: VmId, op: u32, caps: &[NameWords], args: &[u64], out: &mut dyn Outbox) -> Dispatched {
    let am = if op >= 0x100 { NULL_KERNEL_AM } else { CELLS };
    let mut call = Call { selector: Selector::new(am, op & 0xFF).encode(), ..Call::default() };
    call.caps[..caps.len()].copy_from_slice(caps);
    call.args[..args.len()].copy_from_slice(args);
    let dispatched = nk.dispatch(vm, &call, out);
    // As the hypervisor does after each step (this is where roots are retired).
    nk.apply_effects(out, |effect| panic!("cells emit no effect for the hypervisor: {effect:?}"));
    dispatched
}

/// `vm`'s factory capability.
fn factory(nk: &NullKernel, vm: VmId) -> NameWords {
    words_of(nk.initial_caps(vm)[0].1)
}

/// A null-Kernel operation number for `call`.
fn null_op(op: u32) -> u32 {
    0x100 | op
}

fn am_charged(nk: &NullKernel) -> u32 {
    nk.table().usage(Principal::Am(AmId::new(CELLS))).unwrap().charged
}

#[test]
fn destroying_objects_in_a_loop_gives_the_ams_quota_back() {
    let mut nk = NullKernel::new(KernelId::new(0), 1, 256, &mut FixedSeed::from_u64(3)).unwrap();
    let deaths = Arc::new(AtomicU64::new(0));
    let cells = shared_am(Box::new(Cells { deaths: deaths.clone(), ..Cells::default() }));
    // A quota of 4 roots besides the factories: without retiring, the fifth create fails.
    nk.add_shared_am(cells, 6).unwrap();
    for vm in [VM1, VM2] {
        nk.add_vm(vm, 16).unwrap();
    }
    let out = &mut Vec::new();
    for round in 0..5000 {
        let f = factory(&nk, VM1);
        let made = local(call(&mut nk, VM1, 0, &[f], &[], out));
        assert!(made.status().is_ok(), "round {round}: {}", made.status());
        let lent = local(call(&mut nk, VM1, null_op(nk_op::DELEGATE), &[made.name], &[u64::MAX, 2, 0], out));
        assert!(lent.status().is_ok(), "round {round}: {}", lent.status());
        let gone = local(call(&mut nk, VM1, 1, &[made.name], &[], out));
        assert!(gone.status().is_ok(), "round {round}: {}", gone.status());
        // Both capabilities died with the root; using them again is refused.
        assert_eq!(local(call(&mut nk, VM1, 1, &[made.name], &[], out)).status(), status(Status::REVOKED, Some(0)));
        assert_eq!(am_charged(&nk), 2, "round {round}: the factories' roots only");
        // Holders delete their revoked capabilities (they stay charged to them until then).
        assert!(local(call(&mut nk, VM2, null_op(nk_op::DELETE), &[lent.name], &[], out)).status().is_ok());
        assert!(local(call(&mut nk, VM1, null_op(nk_op::DELETE), &[made.name], &[], out)).status().is_ok());
    }
    assert!(out.is_empty());
    assert_eq!(deaths.load(Ordering::Relaxed), 3 * 5000, "the AM heard of the root and both copies each round");
    nk.table().check_consistency().unwrap();
    assert!(nk.protocol().is_idle());
}

/// Collects one kernel's outgoing messages with their sender.
struct Wire<'a>(KernelId, &'a mut VecDeque<(KernelId, KernelId, [u64; MESSAGE_WORDS])>);

impl Outbox for Wire<'_> {
    fn send(&mut self, to: KernelId, message: Message) {
        self.1.push_back((self.0, to, message.encode()));
    }
}

#[test]
fn retiring_an_object_with_a_remote_copy_waits_for_the_other_kernel_and_replies_to_no_one() {
    let cells = shared_am(Box::new(Cells::default()));
    let mut kernels: Vec<NullKernel> = (0..2u16)
        .map(|k| {
            let mut nk = NullKernel::new(KernelId::new(k), 2, 256, &mut FixedSeed::from_u64(k.into())).unwrap();
            nk.add_shared_am(cells.clone(), 6).unwrap();
            nk.set_caller_ring(|| 0);
            nk
        })
        .collect();
    kernels[0].add_vm(VM1, 16).unwrap();
    kernels[0].place(VM2, KernelId::new(1), 16).unwrap();
    kernels[1].add_vm(VM2, 16).unwrap();
    kernels[1].place(VM1, KernelId::new(0), 16).unwrap();
    let mut wire = VecDeque::new();
    let settle = |kernels: &mut Vec<NullKernel>, wire: &mut VecDeque<(KernelId, KernelId, [u64; MESSAGE_WORDS])>| {
        while let Some((from, to, words)) = wire.pop_front() {
            let message = Message::decode(&words).unwrap();
            let nk = &mut kernels[usize::from(to.raw())];
            nk.handle(from, message, &mut Wire(to, wire));
            nk.apply_effects(&mut Wire(to, wire), |effect| panic!("{effect:?}"));
        }
    };
    for round in 0..20 {
        let id0 = kernels[0].id();
        let f = factory(&kernels[0], VM1);
        let made = local(call(&mut kernels[0], VM1, 0, &[f], &[], &mut Wire(id0, &mut wire)));
        assert!(made.status().is_ok(), "round {round}: {}", made.status());
        let args = [u64::MAX, 2, 0];
        let Dispatched::Pending(op) =
            call(&mut kernels[0], VM1, null_op(nk_op::DELEGATE), &[made.name], &args, &mut Wire(id0, &mut wire))
        else {
            panic!("a delegation to another kernel waits");
        };
        settle(&mut kernels, &mut wire);
        let lent = kernels[0].poll().unwrap();
        assert_eq!(lent.op, op);
        // Destroying replies at once; the root's deletion waits for kernel 1.
        let gone = local(call(&mut kernels[0], VM1, 1, &[made.name], &[], &mut Wire(id0, &mut wire)));
        assert!(gone.status().is_ok(), "round {round}: {}", gone.status());
        assert!(!wire.is_empty(), "the remote copy is revoked through the protocol");
        settle(&mut kernels, &mut wire);
        assert_eq!(kernels[0].poll(), None, "the root's deletion is nobody's reply");
        let id1 = kernels[1].id();
        let used = local(call(&mut kernels[1], VM2, 1, &[lent.reply.name], &[], &mut Wire(id1, &mut wire)));
        assert_eq!(used.status(), status(Status::REVOKED, Some(0)));
        assert_eq!(am_charged(&kernels[0]), 1, "round {round}: VM1's factory's root only");
        for (k, vm, name) in [(1, VM2, lent.reply.name), (0, VM1, made.name)] {
            let id = kernels[k].id();
            let reply = call(&mut kernels[k], vm, null_op(nk_op::DELETE), &[name], &[], &mut Wire(id, &mut wire));
            assert!(matches!(reply, Dispatched::Reply(r) if r.status().is_ok()), "{reply:?}");
            settle(&mut kernels, &mut wire);
        }
    }
    for nk in &kernels {
        assert!(nk.protocol().is_idle());
        nk.table().check_consistency().unwrap();
    }
}
