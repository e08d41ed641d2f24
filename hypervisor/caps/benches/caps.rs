//! Benchmarks the capability core on the host: checks of one and four arguments, mint,
//! derive, delegate, revocation of subtrees of 1, 1,000 and 100,000 capabilities, and the
//! memory one capability costs.
//!
//! Prints a table and writes `caps.json` (DESIGN.md §7) to `$NK_BENCH_DIR`, or else to
//! `<workspace>/target/bench/`. Every timed figure is the median over several rounds, each
//! round timing a whole batch of operations with one pair of `Instant` reads.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

#[path = "../../bench/report.rs"]
mod report;
use report::{cpu_model, json_string, output_dir};

use nk_caps::{
    AmId, ArgSpec, Binding, CapName, CapTable, DeadCap, FixedSeed, KernelId, KindSpec, ObjId, ObjKind, Object, OpId,
    OpSpec, Principal, Rights, VmId,
};

const EXO: AmId = AmId::new(1);
const VM1: VmId = VmId::new(1);
const VM2: VmId = VmId::new(2);
const READ: Rights = Rights::from_bits(0b01);
const WRITE: Rights = Rights::from_bits(0b10);
const RW: Rights = Rights::from_bits(0b11);

/// Capabilities in the table while checks are measured (each of `POPULATION` roots has one
/// child held by a VM): a table of a hypervisor with many guests.
const POPULATION: u32 = 100_000;
/// The names a warm check presents: a guest's hot capabilities, whose nodes and index
/// entries stay in the caches.
const WORKING_SET: usize = 1_024;
/// Checks per round.
const CHECKS: usize = 2_000_000;
/// Capabilities created per round of mint, derive and delegate.
const CREATES: u32 = 200_000;
const ROUNDS: usize = 7;
/// Roomy enough for every experiment; a power of two, as a hypervisor would likely pick.
const CAPACITY: u32 = 1 << 18;

/// A table with the exo AM (kind "frame", rights read and write; operations "map" with one
/// argument and "wire" with four) and two VMs, all with quotas as large as the table.
struct Bench {
    table: CapTable,
    frame: ObjKind,
    map: OpId,
    wire: OpId,
}

impl Bench {
    fn new(seed: u64) -> Self {
        let mut table = CapTable::new(KernelId::new(0), CAPACITY, &mut FixedSeed::from_u64(seed)).unwrap();
        table.register_am(EXO, "exo", CAPACITY).unwrap();
        let frame = table.register_kind(EXO, KindSpec { name: "frame", rights: &["read", "write"] }).unwrap();
        let map = table.register_op(EXO, OpSpec { name: "map", args: &[ArgSpec::new(frame, READ)] }).unwrap();
        let wire = table
            .register_op(
                EXO,
                OpSpec {
                    name: "wire",
                    args: &[
                        ArgSpec::new(frame, READ),
                        ArgSpec::new(frame, WRITE),
                        ArgSpec::new(frame, READ),
                        ArgSpec::new(frame, RW),
                    ],
                },
            )
            .unwrap();
        table.add_vm(VM1, CAPACITY).unwrap();
        table.add_vm(VM2, CAPACITY).unwrap();
        Self { table, frame, map, wire }
    }

    fn mint(&mut self, id: u64) -> CapName {
        let object = Object::new(EXO, self.frame, ObjId::new(id));
        self.table.mint(Principal::Am(EXO), object, RW).unwrap()
    }

    /// Mints `roots` frame roots and gives each to VM1, returning VM1's names.
    fn population(&mut self, roots: u32) -> Vec<CapName> {
        (0..u64::from(roots))
            .map(|id| {
                let root = self.mint(id);
                self.table.delegate(Principal::Am(EXO), root, Principal::Vm(VM1), RW, Binding::Bound).unwrap()
            })
            .collect()
    }

    /// Grows a random tree of `size` capabilities below `top` (each new capability is
    /// delegated from a uniformly chosen earlier one, alternating between the two VMs):
    /// the shape of a recursive random tree, of depth about ln(size).
    fn random_subtree(&mut self, top: CapName, size: u32, rng: &mut XorShift) -> CapName {
        let first = self.table.delegate(Principal::Am(EXO), top, Principal::Vm(VM1), RW, Binding::Bound).unwrap();
        let mut nodes = vec![(first, VM1)];
        for i in 1..size {
            let (parent, holder) = nodes[rng.below(nodes.len())];
            let target = if i % 2 == 0 { VM1 } else { VM2 };
            let child =
                self.table.delegate(Principal::Vm(holder), parent, Principal::Vm(target), RW, Binding::Bound).unwrap();
            nodes.push((child, target));
        }
        first
    }
}

/// A small deterministic generator for shuffles and tree shapes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn no_effects(dead: &DeadCap) {
    black_box(dead);
}

/// Runs `round` `ROUNDS` times; each returns (nanoseconds, operations). Returns the median
/// nanoseconds per operation.
fn median_ns(mut round: impl FnMut() -> (f64, usize)) -> f64 {
    let mut per_op: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let (ns, ops) = round();
            ns / ops as f64
        })
        .collect();
    per_op.sort_by(f64::total_cmp);
    per_op[ROUNDS / 2]
}

fn elapsed_ns(start: Instant) -> f64 {
    start.elapsed().as_nanos() as f64
}

/// Times checks of `arity` arguments presenting names drawn from the first `working_set`
/// of VM1's capabilities, in a fresh random order every round.
fn bench_check(arity: usize, working_set: usize) -> f64 {
    let mut b = Bench::new(1);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut population = b.population(POPULATION);
    rng.shuffle(&mut population);
    let mut names = population[..working_set].to_vec();
    let (op, caller) = (if arity == 1 { b.map } else { b.wire }, Principal::Vm(VM1));
    median_ns(|| {
        rng.shuffle(&mut names);
        let calls = CHECKS / arity;
        let mut at = 0;
        let start = Instant::now();
        for _ in 0..calls {
            let checked = b.table.check(caller, op, black_box(&names[at..at + arity]));
            black_box(checked.is_ok());
            at += arity;
            if at + arity > names.len() {
                at = 0;
            }
        }
        (elapsed_ns(start), calls)
    })
}

fn bench_mint() -> f64 {
    median_ns(|| {
        let mut b = Bench::new(2);
        let start = Instant::now();
        for id in 0..u64::from(CREATES) {
            black_box(b.mint(id));
        }
        (elapsed_ns(start), CREATES as usize)
    })
}

/// Times creating `CREATES` children spread over 1,000 parents, by derive (`target` None)
/// or by delegation to VM2.
fn bench_child(target: Option<VmId>) -> f64 {
    median_ns(|| {
        let mut b = Bench::new(3);
        let parents = b.population(1_000);
        let caller = Principal::Vm(VM1);
        let start = Instant::now();
        for i in 0..CREATES as usize {
            let parent = parents[i % parents.len()];
            let child = match target {
                None => b.table.derive(caller, parent, READ),
                Some(vm) => b.table.delegate(caller, parent, Principal::Vm(vm), READ, Binding::Bound),
            };
            black_box(child.unwrap());
        }
        (elapsed_ns(start), CREATES as usize)
    })
}

/// Times revoking subtrees of `size` capabilities, `count` of them per round; returns the
/// median time per capability revoked.
fn bench_revoke(size: u32, count: u32) -> f64 {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    median_ns(|| {
        let mut b = Bench::new(4);
        let root = b.mint(0);
        let tops: Vec<CapName> = (0..count).map(|_| b.random_subtree(root, size, &mut rng)).collect();
        let holder = Principal::Vm(VM1);
        let start = Instant::now();
        let mut revoked = 0;
        for &top in &tops {
            revoked += b.table.revoke(holder, top, &mut no_effects).unwrap();
        }
        let ns = elapsed_ns(start);
        assert_eq!(revoked, (size * count) as usize);
        (ns, revoked)
    })
}

struct Metric {
    name: &'static str,
    value: f64,
    unit: &'static str,
    what: String,
}

fn main() {
    let started = Instant::now();
    let footprint = Bench::new(0).table.footprint();
    let slab_per_cap = footprint.slab_bytes as f64 / f64::from(footprint.capacity);
    let index_per_cap = footprint.index_bytes as f64 / f64::from(footprint.capacity);
    let bytes_per_cap = slab_per_cap + index_per_cap;
    // The index has 8-byte entries (slot and hash tag), a power of two at least twice the
    // capacity, so it is at most half full.
    let index_load = f64::from(footprint.capacity) / (footprint.index_bytes / 8) as f64;

    let metrics = [
        Metric {
            name: "check_1cap_ns",
            value: bench_check(1, WORKING_SET),
            unit: "ns",
            what: format!("check 1 arg, warm: {WORKING_SET} hot names of {}", 2 * POPULATION),
        },
        Metric {
            name: "check_4cap_ns",
            value: bench_check(4, WORKING_SET),
            unit: "ns",
            what: format!("check 4 args, warm: {WORKING_SET} hot names of {}", 2 * POPULATION),
        },
        Metric {
            name: "check_1cap_cold_ns",
            value: bench_check(1, POPULATION as usize),
            unit: "ns",
            what: format!("check 1 arg, cold: any of {POPULATION} names (4 KiB pages)"),
        },
        Metric {
            name: "check_4cap_cold_ns",
            value: bench_check(4, POPULATION as usize),
            unit: "ns",
            what: format!("check 4 args, cold: any of {POPULATION} names (4 KiB pages)"),
        },
        Metric { name: "mint_ns", value: bench_mint(), unit: "ns", what: "mint a root".into() },
        Metric {
            name: "derive_ns",
            value: bench_child(None),
            unit: "ns",
            what: "derive a child (1,000 parents)".into(),
        },
        Metric {
            name: "delegate_ns",
            value: bench_child(Some(VM2)),
            unit: "ns",
            what: "delegate to another VM".into(),
        },
        Metric {
            name: "revoke_per_cap_1_ns",
            value: bench_revoke(1, 100_000),
            unit: "ns",
            what: "revoke subtrees of 1 (per cap)".into(),
        },
        Metric {
            name: "revoke_per_cap_1k_ns",
            value: bench_revoke(1_000, 100),
            unit: "ns",
            what: "revoke subtrees of 1,000 (per cap)".into(),
        },
        Metric {
            name: "revoke_per_cap_100k_ns",
            value: bench_revoke(100_000, 1),
            unit: "ns",
            what: "revoke a subtree of 100,000 (per cap)".into(),
        },
        Metric {
            name: "bytes_per_cap",
            value: bytes_per_cap,
            unit: "bytes",
            what: format!(
                "{} B node + {index_per_cap:.1} B index (8 B/entry at load {index_load:.2})",
                footprint.node_bytes
            ),
        },
    ];

    println!("nk-caps benchmark ({}, median of {ROUNDS} rounds)", cpu_model());
    println!("{:<24} {:>10} {:<6}  what", "metric", "value", "unit");
    println!("{}", "-".repeat(90));
    for m in &metrics {
        println!("{:<24} {:>10.1} {:<6}  {}", m.name, m.value, m.unit, m.what);
    }

    let mut json = String::from("{\n");
    for m in &metrics {
        writeln!(json, "  {}: {{\"value\": {:.2}, \"unit\": {}}},", json_string(m.name), m.value, json_string(m.unit))
            .unwrap();
    }
    let context = [
        ("cpu_model", json_string(&cpu_model())),
        ("logical_cpus", std::thread::available_parallelism().map_or(0, |n| n.get()).to_string()),
        ("profile", json_string(if cfg!(debug_assertions) { "debug" } else { "release" })),
        ("rounds", ROUNDS.to_string()),
        ("statistic", json_string("median over rounds of (round time / operations)")),
        ("check_population", (2 * POPULATION).to_string()),
        ("check_warm_working_set", WORKING_SET.to_string()),
        (
            "check_cold_note",
            json_string("cold checks miss the caches and the TLB: the host bench runs on 4 KiB pages, so each miss also walks the page tables; memory mapped with large pages avoids most of that"),
        ),
        ("checks_per_round", CHECKS.to_string()),
        ("creates_per_round", CREATES.to_string()),
        ("revoke_subtrees_per_round", json_string("100,000 of 1; 100 of 1,000; 1 of 100,000")),
        ("revoke_tree_shape", json_string("random recursive tree, holders alternating between two VMs, no-op hook")),
        ("table_capacity", footprint.capacity.to_string()),
        ("node_bytes", footprint.node_bytes.to_string()),
        ("slab_bytes", footprint.slab_bytes.to_string()),
        ("index_bytes", footprint.index_bytes.to_string()),
        ("index_load_at_capacity", format!("{index_load:.3}")),
        (
            "bytes_per_cap_formula",
            json_string("(slab bytes + index bytes) / capacity = node size + 8 B per index entry / load"),
        ),
        ("bench_seconds", format!("{:.1}", started.elapsed().as_secs_f64())),
    ];
    json.push_str("  \"context\": {\n");
    for (i, (key, value)) in context.iter().enumerate() {
        let comma = if i + 1 < context.len() { "," } else { "" };
        writeln!(json, "    {}: {value}{comma}", json_string(key)).unwrap();
    }
    json.push_str("  }\n}\n");

    let dir = output_dir(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(&dir).expect("create the bench output directory");
    let path = dir.join("caps.json");
    std::fs::write(&path, json).expect("write caps.json");
    println!("\nwrote {} in {:.1} s", path.display(), started.elapsed().as_secs_f64());
}
