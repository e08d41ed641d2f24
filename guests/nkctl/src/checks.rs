//! Isolation checks from Linux processes (issue 13's tests, `/bin/nkctl-isolation`):
//! `nkctl probe GPA` (what a process without a mapping finds through `/dev/mem`),
//! `nkctl stress KEY GPA ROUNDS` (a process committing its own region in a loop, run twice
//! at once) and `nkctl foreign VM` (a name bound to another VM is refused and changes
//! nothing).

use nk::{Obj, Status};

const PAGE: usize = 4096;
/// The stress region: 4 pages.
const STRESS_BYTES: u64 = 4 * PAGE as u64;

fn load(bytes: &[u8], at: usize) -> u64 {
    let slot = &bytes[at..at + 8];
    // SAFETY: a volatile 8-byte load inside `bytes` (checked by the slice index).
    unsafe { std::ptr::read_volatile(slot.as_ptr().cast::<u64>()) }
}

fn store(bytes: &mut [u8], at: usize, value: u64) {
    let slot = &mut bytes[at..at + 8];
    // SAFETY: a volatile 8-byte store inside `bytes` (checked by the slice index).
    unsafe { std::ptr::write_volatile(slot.as_mut_ptr().cast::<u64>(), value) }
}

/// Reads the 32-bit word at `gpa` through `/dev/mem` with one 32-bit load (the access the
/// hypervisor answers as an open bus where nothing is mapped: all ones).
pub fn probe(gpa: u64) -> Result<(), String> {
    let page = nk::map_phys(gpa & !(PAGE as u64 - 1), PAGE)?;
    let at = (gpa as usize) & (PAGE - 4);
    // SAFETY: a volatile 4-byte load inside the mapped page (aligned: `at` is a multiple of 4).
    let word = unsafe { std::ptr::read_volatile(page[at..at + 4].as_ptr().cast::<u32>()) };
    let what = if word == u32::MAX { "nothing mapped (all ones)" } else { "memory" };
    println!("probe {gpa:#x}: {word:#010x}: {what}");
    Ok(())
}

fn factory() -> Result<Obj, String> {
    crate::label_obj("nvram/nvram-factory")
}

/// Allocates (or finds again) region `key` of 4 pages, maps it at `gpa` and commits
/// `rounds` times, each after storing into one page (round r writes page r % 4): every
/// commit must report exactly that one dirty page (the EPT dirty bits of this region's
/// mapping only, whatever another process commits meanwhile) and the next sequence number.
/// On a region restored from an earlier boot, first checks that each page holds this
/// key's records. Unmaps at the end.
pub fn stress(key: u64, gpa: u64, rounds: u64) -> Result<(), String> {
    let region = nk::nvram::allocate(factory()?, STRESS_BYTES, key).map_err(|e| e.to_string())?;
    let obj = region.region;
    nk::nvram::map(obj, gpa, true).map_err(|e| e.to_string())?;
    let memory = nk::map_phys(gpa, STRESS_BYTES as usize)?;
    if !region.created {
        for page in 0..STRESS_BYTES as usize / PAGE {
            let (k, round) = (load(memory, page * PAGE), load(memory, page * PAGE + 8));
            if (k, round) != (0, 0) && (k != key || round % 4 != page as u64) {
                return Err(format!("restored page {page} holds key {k} round {round}"));
            }
        }
    }
    let first = region.seq + 1;
    for round in 1..=rounds {
        let at = (round % 4) as usize * PAGE;
        store(memory, at, key);
        store(memory, at + 8, round);
        for word in 2..64 {
            store(memory, at + word * 8, key ^ round.wrapping_mul(word as u64));
        }
        let committed = nk::nvram::commit(obj).map_err(|e| e.to_string())?;
        let want = region.seq + round;
        if committed.dirty_pages != 1 || committed.seq != want {
            return Err(format!(
                "round {round}: commit says seq {} and {} dirty pages, expected seq {want} and 1",
                committed.seq, committed.dirty_pages
            ));
        }
        std::thread::yield_now();
    }
    for page in 0..4usize {
        let last = (1..=rounds).rev().find(|r| (r % 4) as usize == page);
        if let Some(round) = last {
            if load(memory, page * PAGE) != key || load(memory, page * PAGE + 8) != round {
                return Err(format!("page {page} lost round {round}"));
            }
        }
    }
    nk::nvram::unmap(obj, gpa).map_err(|e| e.to_string())?;
    println!(
        "stress {key}: {} region, {rounds} commits (seq {first}..{}), each of exactly its one dirty page; unmapped",
        if region.created { "created its" } else { "restored its" },
        region.seq + rounds
    );
    Ok(())
}

/// Allocates region `key` (16 KiB), delegates a child of it to VM `other` and presents that
/// child's name, bound to the other VM: seq, map and commit are refused with `WRONG_HOLDER`
/// (or `UNKNOWN_NAME` where the other VM's kernel instance is another CPU's), and the
/// region's sequence number stays as it was, with no transaction opened.
pub fn foreign(other: u32, key: u64) -> Result<(), String> {
    let region = nk::nvram::allocate(factory()?, STRESS_BYTES, key).map_err(|e| e.to_string())?;
    let own = region.region;
    let (seq, _, _) = nk::nvram::seq(own).map_err(|e| e.to_string())?;
    let child = nk::delegate(own.cap, other, u64::MAX, false).map_err(|e| e.to_string())?;
    let alien = Obj { cap: child, am: own.am };
    let tries: [(&str, Result<(), nk::Error>); 3] = [
        ("seq", nk::nvram::seq(alien).map(|_| ())),
        ("map", nk::nvram::map(alien, 0x4030_0000, true)),
        ("commit", nk::nvram::commit(alien).map(|_| ())),
    ];
    for (what, result) in tries {
        match result {
            // Held by the other VM on this kernel instance: WRONG_HOLDER; when the other
            // VM runs on another CPU, the name lives only in that CPU's kernel instance,
            // and this one does not know it: UNKNOWN_NAME.
            Err(error)
                if error.status().is_some_and(|s| matches!(s.code(), Status::WRONG_HOLDER | Status::UNKNOWN_NAME)) =>
            {
                println!("foreign: {what} with vm{other}'s name: {}", error.reason())
            }
            other => return Err(format!("{what} with a name bound to another VM: {other:?}")),
        }
    }
    let (after, _, open) = nk::nvram::seq(own).map_err(|e| e.to_string())?;
    if after != seq || open {
        return Err(format!("the region changed: seq {seq} -> {after}, transaction open {open}"));
    }
    println!("foreign: nothing changed (seq {after}, no transaction)");
    Ok(())
}
