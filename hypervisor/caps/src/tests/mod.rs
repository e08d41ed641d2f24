//! Host tests of the capability core: unit tests of every error, deep and wide trees,
//! property tests of the invariants of DESIGN.md §2, and a model-based test.

mod deep;
mod model;
mod pin;
mod props;
mod remote;
mod unit;

use crate::*;

pub(crate) const EXO: AmId = AmId::new(1);
pub(crate) const NVRAM: AmId = AmId::new(2);
pub(crate) const VM1: VmId = VmId::new(1);
pub(crate) const VM2: VmId = VmId::new(2);
pub(crate) const VM3: VmId = VmId::new(3);

/// The kinds and operations two small AMs register, as a hypervisor would at boot.
pub(crate) struct Fixture {
    pub(crate) table: CapTable,
    pub(crate) frame: ObjKind,
    pub(crate) port: ObjKind,
    pub(crate) region: ObjKind,
    /// exo: map(frame: read).
    pub(crate) map: OpId,
    /// exo: copy(frame: read, frame: write).
    pub(crate) copy: OpId,
    /// exo: wire(frame: read, frame: write, port: in, port: out).
    pub(crate) wire: OpId,
    /// nvram: commit(region: write|commit).
    pub(crate) commit: OpId,
}

pub(crate) const READ: Rights = Rights::from_bits(0b001);
pub(crate) const WRITE: Rights = Rights::from_bits(0b010);
pub(crate) const EXEC: Rights = Rights::from_bits(0b100);
pub(crate) const RWX: Rights = Rights::from_bits(0b111);
pub(crate) const IN: Rights = Rights::from_bits(0b01);
pub(crate) const OUT: Rights = Rights::from_bits(0b10);
pub(crate) const COMMIT: Rights = Rights::from_bits(0b100);

impl Fixture {
    /// Builds a table of `capacity` with the exo and NVRAM AMs and VMs 1 to 3, each
    /// principal with quota `quota`.
    pub(crate) fn new(capacity: u32, quota: u32) -> Self {
        let mut table = CapTable::new(KernelId::new(7), capacity, &mut FixedSeed::from_u64(42)).expect("table");
        table.register_am(EXO, "exo", quota).expect("exo");
        table.register_am(NVRAM, "nvram", quota).expect("nvram");
        let frame =
            table.register_kind(EXO, KindSpec { name: "frame", rights: &["read", "write", "exec"] }).expect("frame");
        let port = table.register_kind(EXO, KindSpec { name: "port", rights: &["in", "out"] }).expect("port");
        let region = table
            .register_kind(NVRAM, KindSpec { name: "region", rights: &["read", "write", "commit"] })
            .expect("region");
        let map = table.register_op(EXO, OpSpec { name: "map", args: &[ArgSpec::new(frame, READ)] }).expect("map");
        let copy = table
            .register_op(EXO, OpSpec { name: "copy", args: &[ArgSpec::new(frame, READ), ArgSpec::new(frame, WRITE)] })
            .expect("copy");
        let wire = table
            .register_op(
                EXO,
                OpSpec {
                    name: "wire",
                    args: &[
                        ArgSpec::new(frame, READ),
                        ArgSpec::new(frame, WRITE),
                        ArgSpec::new(port, IN),
                        ArgSpec::new(port, OUT),
                    ],
                },
            )
            .expect("wire");
        let commit = table
            .register_op(NVRAM, OpSpec { name: "commit", args: &[ArgSpec::new(region, WRITE | COMMIT)] })
            .expect("commit");
        for vm in [VM1, VM2, VM3] {
            table.add_vm(vm, quota).expect("vm");
        }
        Self { table, frame, port, region, map, copy, wire, commit }
    }

    /// Mints, as the exo AM, a root capability with all rights to frame `id`.
    pub(crate) fn frame_root(&mut self, id: u64) -> CapName {
        self.table.mint(Principal::Am(EXO), Object::new(EXO, self.frame, ObjId::new(id)), RWX).expect("mint frame")
    }

    /// Mints, as the exo AM, a root capability with all rights to port `id`.
    pub(crate) fn port_root(&mut self, id: u64) -> CapName {
        self.table.mint(Principal::Am(EXO), Object::new(EXO, self.port, ObjId::new(id)), IN | OUT).expect("mint port")
    }

    /// Mints, as the NVRAM AM, a root capability with all rights to region `id`.
    pub(crate) fn region_root(&mut self, id: u64) -> CapName {
        self.table
            .mint(Principal::Am(NVRAM), Object::new(NVRAM, self.region, ObjId::new(id)), RWX)
            .expect("mint region")
    }

    /// Delegates `cap` from the exo AM to `vm`, bound, with `mask`.
    pub(crate) fn give(&mut self, cap: CapName, vm: VmId, mask: Rights) -> CapName {
        self.table.grant(Principal::Am(EXO), cap, Principal::Vm(vm), mask, Binding::Bound).expect("grant")
    }
}

/// A revocation hook that records every death.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub(crate) dead: Vec<DeadCap>,
    pub(crate) finished: usize,
}

impl RevocationHook for Recorder {
    fn revoked(&mut self, dead: &DeadCap) {
        self.dead.push(*dead);
    }

    fn finished(&mut self) {
        self.finished += 1;
    }
}

/// A hook for tests that do not look at deaths.
pub(crate) fn ignore(_: &DeadCap) {}

pub(crate) fn vm(vm: VmId) -> Principal {
    Principal::Vm(vm)
}

pub(crate) fn am(am: AmId) -> Principal {
    Principal::Am(am)
}
