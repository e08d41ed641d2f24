//! In-emulator cases for persistent memory (test build), which drive the NVRAM AM's
//! on-media format (its directory and PTx store, am/nvram) on the persistent-memory
//! device directly, without guests, so they also run where there is no VT-x (QEMU with
//! an NVDIMM under TCG; `selftest::run_without_vmx`).
//!
//! - `pmem_versions`: restores the test region (64 KiB), checks it is exactly the version
//!   it says it is, and commits the next version (every commit rewrites block 0, a few
//!   scattered blocks, and every other one 48 blocks: more than one blockset, a logged
//!   commit). Booted twice on one NVDIMM backing file, the second boot restores what the
//!   first committed: `pmem: restored version 1 ..., intact`.
//! - `pmem_cut_sweep`: the power-cut-and-rebuild check within one boot: for k = 0, 1, 2,
//!   ... it cuts the power (`PmemMedia::cut_after_stores`) after the k-th store of a
//!   logged commit, mounts the memory again (journal replay), restores the store and
//!   checks the region is the old or the new version, whole; it ends at the first k past
//!   the commit's last store.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use nk_am::Media;
use nk_am_nvram::directory::Directory;
use nk_am_nvram::ptx::{Store, BLOCK};

use super::pmem::with_device;
use crate::console::print_line;

/// The owner number of the test regions (no VM's: "PMEMTEST").
const OWNER: u64 = 0x504d_454d_5445_5354;
/// The region `pmem_versions` commits to, and its size.
const VERSIONS_KEY: u64 = 1;
const VERSIONS_BYTES: usize = 64 * 1024;
/// The region `pmem_cut_sweep` cuts, and its size.
const SWEEP_KEY: u64 = 2;
const SWEEP_BYTES: usize = 16 * 1024;
/// The most cut points the sweep tries.
const SWEEP_MAX: u64 = 4000;

/// Whether version `v` of a region rewrites block `b`: block 0 always (it names the
/// version); `dense` blocks every other version (or every version when `dense_always`);
/// and one block in five, shifting with `v`.
fn touches(v: u64, b: usize, dense_always: bool) -> bool {
    v > 0 && (b == 0 || ((v % 2 == 0 || dense_always) && b < 48) || (b as u64 * 7 + v).is_multiple_of(5))
}

/// Returns version `v` of a region of `bytes` (version 0 is all zero): each block holds
/// words derived from the last version that touched it; block 0 starts with `v`.
fn region_of(v: u64, bytes: usize, dense_always: bool) -> Vec<u8> {
    let mut region = vec![0u8; bytes];
    for (b, block) in region.chunks_exact_mut(BLOCK).enumerate() {
        let Some(last) = (1..=v).rev().find(|&u| touches(u, b, dense_always)) else { continue };
        for (w, word) in block.chunks_exact_mut(8).enumerate() {
            let value = if b == 0 && w == 0 {
                last
            } else {
                (last << 32 | (b as u64) << 12 | w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
            };
            word.copy_from_slice(&value.to_le_bytes());
        }
    }
    region
}

/// Finds (or creates) the test region `key` and restores it: `(store, region bytes)`.
fn restore(media: &mut dyn Media, key: u64, bytes: usize) -> Result<(Store, Vec<u8>), String> {
    let mut directory = Directory::mount(media).map_err(|why| format!("directory: {why:?}"))?;
    let store = match directory.find(OWNER, key) {
        Some(entry) => Store::open(media, entry.geometry).map_err(|why| format!("restore: {why:?}"))?.0,
        None => directory.create(media, OWNER, key, bytes as u64).map_err(|why| format!("create: {why:?}"))?.1,
    };
    let mut region = vec![0u8; bytes];
    store
        .read_committed(media, &mut |block, data| {
            let at = block as usize * BLOCK;
            if let Some(slot) = region.get_mut(at..at + BLOCK) {
                slot.copy_from_slice(data);
            }
        })
        .map_err(|why| format!("read: {why:?}"))?;
    Ok((store, region))
}

/// Returns the version `region` holds, if it is exactly that version.
fn version_of(region: &[u8], dense_always: bool) -> Option<u64> {
    let v = u64::from_le_bytes(region.get(..8)?.try_into().ok()?);
    (region == region_of(v, region.len(), dense_always).as_slice()).then_some(v)
}

/// Commits `new` over `old`: every changed block. Returns (seq, blocks).
fn commit(store: &mut Store, media: &mut dyn Media, old: &[u8], new: &[u8]) -> Result<(u64, usize), String> {
    let writes: Vec<u32> = (0..new.len() / BLOCK)
        .filter(|&b| old[b * BLOCK..(b + 1) * BLOCK] != new[b * BLOCK..(b + 1) * BLOCK])
        .map(|b| b as u32)
        .collect();
    let stats = store
        .commit(media, &writes, &mut |blocks, out| {
            for (&block, out) in blocks.iter().zip(out.chunks_exact_mut(BLOCK)) {
                out.copy_from_slice(&new[block as usize * BLOCK..(block as usize + 1) * BLOCK]);
            }
        })
        .map_err(|why| format!("commit: {why:?}"))?;
    Ok((stats.seq, writes.len()))
}

/// `pmem_versions` (module docs).
pub fn versions() -> Result<(), String> {
    with_device(|device| {
        let (mut store, region) = restore(device, VERSIONS_KEY, VERSIONS_BYTES)?;
        let v = version_of(&region, false)
            .ok_or_else(|| format!("the restored region is no whole version (block 0 says {:02x?})", &region[..8]))?;
        print_line(format_args!("pmem: restored version {v} (seq {}), intact", store.seq()));
        let next = region_of(v + 1, VERSIONS_BYTES, false);
        let before = device.media().stats();
        let started = crate::arch::rdtsc();
        let (seq, blocks) = commit(&mut store, device, &region, &next)?;
        let ticks = crate::arch::rdtsc().wrapping_sub(started);
        let after = device.media().stats();
        print_line(format_args!(
            "pmem: committed version {} (seq {seq}) in {ticks} TSC ticks: {blocks} blocks, {} device writes ({} units journaled), {} fences, {} SFENCEs",
            v + 1,
            after.writes - before.writes,
            after.units - before.units,
            after.fences - before.fences,
            after.sfences - before.sfences
        ));
        Ok(())
    })
    .unwrap_or_else(|| Err("no persistent-memory device".into()))
}

/// `pmem_cut_sweep` (module docs).
pub fn cut_sweep() -> Result<(), String> {
    with_device(|device| {
        let (mut old_seen, mut new_seen) = (0u64, 0u64);
        let mut k = 0;
        loop {
            if k > SWEEP_MAX {
                return Err(format!("no commit finished within {SWEEP_MAX} stores"));
            }
            let (mut store, region) = restore(device, SWEEP_KEY, SWEEP_BYTES)?;
            let v = version_of(&region, true).ok_or_else(|| format!("cut {k}: the region is no whole version"))?;
            let next = region_of(v + 1, SWEEP_BYTES, true);
            device.media().cut_after_stores(k);
            let committed = commit(&mut store, device, &region, &next);
            let cut = device.media().is_cut();
            if !cut {
                // The commit's stores all ran: the sweep has covered every one of them.
                committed?;
                print_line(format_args!(
                    "pmem: cut sweep: {k} cut points tried (every store of a logged commit), all recovered: \
                     {old_seen} to the old version, {new_seen} to the new"
                ));
                return Ok(());
            }
            device.remount()?;
            let (_, restored) = restore(device, SWEEP_KEY, SWEEP_BYTES)?;
            match version_of(&restored, true) {
                Some(r) if r == v => old_seen += 1,
                Some(r) if r == v + 1 => new_seen += 1,
                Some(r) => {
                    return Err(format!("cut after store {k}: restored version {r}, committing {} over {v}", v + 1))
                }
                None => {
                    return Err(format!("cut after store {k}: the region is torn (neither version {v} nor {})", v + 1))
                }
            }
            k += 1;
        }
    })
    .unwrap_or_else(|| Err("no persistent-memory device".into()))
}
