//! A library OS on the exo AM (issue 10): a bare-metal guest that is its own operating
//! system over the machine's memory as capabilities.
//!
//! * Its heap (Rust's global allocator) starts empty at [`HEAP_BASE`] and grows by
//!   allocating exo frames and mapping them at its end.
//! * It keeps a key-value map (a `BTreeMap` on that heap) and snapshots it incrementally:
//!   the snapshot is a copy of the heap at [`SNAPSHOT_BASE`], and each snapshot copies only
//!   the pages the EPT dirty bits say were written since the last one: the first three by
//!   an A/D scan (the exo AM's `dirty`), the last three from the Page-Modification Log
//!   (`pml-enable`, `pml-drain`); after each it checks that the copy equals the live
//!   heap (so the map in it) byte for byte.
//! * `share PEER` lends a page to guest PEER through a delegated frame capability, waits
//!   for PEER's answer written into it, then revokes; `peer` maps what it received, checks
//!   the lender's message, answers, and reads on until the revoke stops it.
//!
//! Each check prints `GTEST ok <name>` or `GTEST FAILED <name>: why`.
#![no_std]
#![no_main]

extern crate alloc;

mod exo;
mod heap;
mod snapshot;

use alloc::collections::BTreeMap;

use nk_guest::println;

/// Where the heap begins (guest-physical = linear: the guest's page tables identity-map
/// the first GiB).
pub const HEAP_BASE: u64 = 0x2000_0000;
/// Where the snapshot copy of the heap begins.
pub const SNAPSHOT_BASE: u64 = 0x3000_0000;

fn report(name: &str, result: Result<(), exo::Why>) {
    match result {
        Ok(()) => println!("GTEST ok {name}"),
        Err(why) => println!("GTEST FAILED {name}: {}", why.0),
    }
}

/// A small deterministic generator (xorshift) for keys and values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key_value_snapshots() -> Result<(), exo::Why> {
    let exo = exo::Exo::find()?;
    heap::init(exo);
    let mut map: BTreeMap<u64, u64> = BTreeMap::new();
    let mut rng = Rng(0x1b0_5eed);
    let mut snap = snapshot::Snapshot::new(exo)?;
    for round in 0..6u64 {
        // Inserts grow the heap (and the map); updates only dirty the pages they touch.
        let inserts = if round < 3 { 2000 } else { 20 };
        for _ in 0..inserts {
            let key = rng.next() % 100_000;
            map.insert(key, rng.next());
        }
        for _ in 0..50 {
            let key = rng.next() % 100_000;
            if let Some(value) = map.get_mut(&key) {
                *value = value.wrapping_add(1);
            }
        }
        let (copied, total) = snap.take()?;
        if !snap.equals_live() {
            return Err(exo::why(format_args!("round {round}: the snapshot differs from the live heap")));
        }
        println!(
            "libos: snapshot {round} ({}): copied {copied} of {total} heap pages; {} keys; heap {} KiB",
            snap.method(),
            map.len(),
            heap::mapped() / 1024
        );
        if round == 2 {
            // The last three snapshots find their pages through Page-Modification Logging.
            snap.switch_to_pml()?;
        }
        if round > 0 && copied >= total && total > 8 {
            return Err(exo::why(format_args!("round {round}: every page was copied: not incremental")));
        }
    }
    // Nothing written since the last snapshot: nothing to copy.
    let (copied, _) = snap.take()?;
    if copied != 0 {
        return Err(exo::why(format_args!("{copied} pages copied with nothing written")));
    }
    Ok(())
}

#[unsafe(no_mangle)]
fn nk_guest_main(boot: &nk_guest::BootArgs) {
    println!("libos on vm{}: {} KiB of initial memory, args '{}'", boot.vm, boot.memory / 1024, boot.args);
    let mut words = boot.args.split_ascii_whitespace();
    match words.next() {
        None | Some("kv") => report("libos_kv_snapshots", key_value_snapshots()),
        Some("share") => {
            let peer = words.next().and_then(|n| n.parse().ok()).unwrap_or(2);
            report("libos_share_revoke", exo::share(peer));
        }
        Some("peer") => report("libos_peer", exo::peer(boot.vm)),
        Some(other) => println!("GTEST FAILED args: unknown mode '{other}' (kv, share PEER, peer)"),
    }
    println!("GTEST done");
}
