//! `nkctl demo`: the layer-bypass demo of `cargo xtask run --linux` (issue 13).
//!
//! Another VM, the *keeper* (the test guest's `bypasskeep` mode), holds an NVRAM region
//! (its parent capability) and delegates this VM a child of it and a doorbell (a counter)
//! at run time; the process finds both in the VM's inbox (`RECEIVED`, which ring 3 may
//! list where the module line says `ring3-caps`). The process maps the region at 1 GiB
//! and works on a linked list of records in it with plain loads and stores through
//! `/dev/mem`: on a region that holds a list (committed by an earlier run on the same
//! NVRAM disk) it walks and verifies every record first, then appends one run's records,
//! reads the region's EPT dirty bits through the exo AM (without clearing them: they are
//! the NVRAM AM's write set) and commits by `VMCALL` from ring 3. Then it rings the
//! doorbell and polls the region until the keeper has revoked its capability: the next
//! calls fail with `REVOKED`, its next load from the region finds nothing (all ones: the
//! hypervisor answers an unmapped address above the VM's RAM as an open bus), and Linux
//! goes on.

use std::time::{Duration, Instant};

use nk::{Error, Obj, Status};

/// Where the region is mapped: the NVRAM AM's window starts at 1 GiB, above Linux's RAM.
pub const GPA: u64 = 0x4000_0000;
const PAGE: usize = 4096;
/// The list's header at offset 0: magic, runs, records, head offset, checksum.
const MAGIC: u64 = u64::from_le_bytes(*b"NKDEMO01");
/// Each run appends this many records, of [`RECORD`] bytes, filling one page.
const PER_RUN: u64 = 8;
const RECORD: usize = PAGE / PER_RUN as usize;

/// The value record `index` of run `run` must hold.
fn value_of(run: u64, index: u64) -> u64 {
    (run.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)).rotate_left(17)
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let slot = &bytes[at..at + 8];
    // SAFETY: a volatile 8-byte load inside `bytes` (checked by the slice index), so each
    // access really reaches the region's memory.
    unsafe { std::ptr::read_volatile(slot.as_ptr().cast::<u64>()) }
}

fn set_word(bytes: &mut [u8], at: usize, value: u64) {
    let slot = &mut bytes[at..at + 8];
    // SAFETY: a volatile 8-byte store inside `bytes` (checked by the slice index).
    unsafe { std::ptr::write_volatile(slot.as_mut_ptr().cast::<u64>(), value) }
}

/// What [`verify`] found: (runs, records, first run still in the list, checksum).
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    pub runs: u64,
    pub records: u64,
    pub oldest_run: u64,
    pub checksum: u64,
}

/// Walks the list from its head and checks every record (its value and text) against the
/// header's count and checksum. Ok(None): the region holds no list (no magic).
pub fn verify(region: &[u8]) -> Result<Option<Found>, String> {
    if word(region, 0) != MAGIC {
        return Ok(None);
    }
    let (runs, records, head, checksum) = (word(region, 8), word(region, 16), word(region, 24), word(region, 32));
    let (mut at, mut seen, mut sum, mut oldest) = (head as usize, 0u64, 0u64, runs);
    while at != 0 {
        if at % RECORD != 0 || at < PAGE || at + RECORD > region.len() || seen >= records {
            return Err(format!("record {seen}: bad link {at:#x} (the list has {records})"));
        }
        let (next, run, index, value) =
            (word(region, at), word(region, at + 8), word(region, at + 16), word(region, at + 24));
        let text = format!("run {run} item {index}");
        if value != value_of(run, index) || &region[at + 32..at + 32 + text.len()] != text.as_bytes() {
            return Err(format!("record {seen} at {at:#x} (run {run} item {index}) is damaged"));
        }
        sum = sum.wrapping_add(value);
        oldest = oldest.min(run);
        seen += 1;
        at = next as usize;
    }
    if seen != records || sum != checksum {
        return Err(format!("walked {seen} records (checksum {sum:#x}), the header says {records} ({checksum:#x})"));
    }
    Ok(Some(Found { runs, records, oldest_run: oldest, checksum }))
}

/// Appends run `runs + 1`'s records in the page after the header that its number picks
/// (a region of P pages keeps the last P - 1 runs: the oldest run's page is cut from the
/// list before it is reused). Returns the run and the pages written.
pub fn append(region: &mut [u8]) -> (u64, [usize; 2]) {
    let slots = (region.len() / PAGE - 1) as u64;
    let fresh = word(region, 0) != MAGIC;
    let (mut runs, mut records, mut head, mut checksum) =
        if fresh { (0, 0, 0, 0) } else { (word(region, 8), word(region, 16), word(region, 24), word(region, 32)) };
    runs += 1;
    let page = 1 + ((runs - 1) % slots) as usize;
    let (start, end) = (page * PAGE, (page + 1) * PAGE);
    if runs > slots {
        // Cut what the page held (the oldest run, the list's tail) out of the list.
        let mut at = head as usize;
        let mut previous: Option<usize> = None;
        while at != 0 {
            let next = word(region, at) as usize;
            if (start..end).contains(&at) {
                records -= 1;
                checksum = checksum.wrapping_sub(word(region, at + 24));
                match previous {
                    Some(p) => set_word(region, p, next as u64),
                    None => head = next as u64,
                }
            } else {
                previous = Some(at);
            }
            at = next;
        }
    }
    for index in 0..PER_RUN {
        let at = start + index as usize * RECORD;
        region[at..at + RECORD].fill(0);
        set_word(region, at, head);
        set_word(region, at + 8, runs);
        set_word(region, at + 16, index);
        set_word(region, at + 24, value_of(runs, index));
        let text = format!("run {runs} item {index}");
        region[at + 32..at + 32 + text.len()].copy_from_slice(text.as_bytes());
        head = at as u64;
        records += 1;
        checksum = checksum.wrapping_add(value_of(runs, index));
    }
    for (slot, value) in [MAGIC, runs, records, head, checksum].into_iter().enumerate() {
        set_word(region, slot * 8, value);
    }
    (runs, [0, page])
}

/// The capabilities the keeper delegated: (region, doorbell, keeper's VM id).
fn delegated(counter_am: u16, wait: Duration) -> Result<(Obj, Obj, u64), String> {
    let start = Instant::now();
    loop {
        let (_, received) = nk::all_caps().map_err(|e| e.to_string())?;
        let doorbell = received.iter().find(|r| r.am == counter_am);
        let region = received.iter().find(|r| r.am != counter_am);
        if let (Some(region), Some(doorbell)) = (region, doorbell) {
            let keeper = region.sender.unwrap_or(0);
            return Ok((Obj { cap: region.cap, am: region.am }, Obj { cap: doorbell.cap, am: doorbell.am }, keeper));
        }
        if start.elapsed() > wait {
            return Err(format!(
                "no region and doorbell in this VM's inbox after {} s (is a keeper guest running `bypasskeep` with manages= this VM?)",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The AM id of a label in the NKCP table.
fn handed_am(label: &str) -> Result<u16, String> {
    nk::handed_caps()?
        .iter()
        .find(|h| h.label == label)
        .map(|h| h.am)
        .ok_or_else(|| format!("no {label} was handed over in the NKCP table"))
}

/// Reads the EPT dirty bits of `pages` pages of the region through the exo AM without
/// clearing them (the NVRAM AM's commit still needs them): with `exo/aspace`, a one-page
/// bitmap frame set mapped just below 1 GiB.
fn dirty_pages(pages: u64) -> Result<Vec<u64>, String> {
    let aspace = crate::label_obj("exo/aspace")?;
    let bitmap = nk::exo::alloc(aspace, 1, false).map_err(|e| e.to_string())?;
    let result = (|| {
        nk::exo::map(bitmap, aspace, crate::BITMAP_GPA, 3).map_err(|e| e.to_string())?;
        let read = (|| {
            nk::exo::dirty_keep(aspace, bitmap, GPA, pages, 0).map_err(|e| e.to_string())?;
            let bytes = nk::map_phys(crate::BITMAP_GPA, PAGE)?;
            Ok(nk::exo::dirty_pages(bytes, pages))
        })();
        let _ = nk::exo::unmap(aspace, crate::BITMAP_GPA);
        read
    })();
    let _ = nk::exo::free(bitmap);
    result
}

fn list(pages: &[u64]) -> String {
    pages.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Runs the demo (see the module docs); `wait` bounds the waits for the keeper.
pub fn run(wait: Duration) -> Result<(), String> {
    let counter_am = handed_am("counter/factory")?;
    let (region, doorbell, keeper) = delegated(counter_am, wait)?;
    let (seq, bytes, _) = nk::nvram::seq(region).map_err(|e| e.to_string())?;
    println!("nkctl demo: vm{keeper} delegated a region of {bytes} bytes (committed seq {seq}) and a doorbell");
    nk::nvram::map(region, GPA, true).map_err(|e| e.to_string())?;
    let memory = nk::map_phys(GPA, bytes as usize)?;
    match verify(memory)? {
        None => println!("nkctl demo: the region holds no list yet: building one"),
        Some(found) => println!(
            "nkctl demo: restored a list of {} records from runs {}..{}: every record verified, checksum {:#x}",
            found.records, found.oldest_run, found.runs, found.checksum
        ),
    }
    let (run, pages) = append(memory);
    println!("nkctl demo: run {run}: appended {PER_RUN} records (pages {} and {})", pages[0], pages[1]);
    let dirty = dirty_pages(bytes / PAGE as u64)?;
    println!("nkctl demo: EPT dirty bits through the exo AM: pages [{}]", list(&dirty));
    let committed = nk::nvram::commit(region).map_err(|e| e.to_string())?;
    println!(
        "nkctl demo: committed seq {}: {} dirty pages, {} blocks",
        committed.seq, committed.dirty_pages, committed.blocks
    );
    let found = verify(memory)?.ok_or("the list vanished after the commit")?;
    println!("nkctl demo: the list holds {} records of runs {}..{}", found.records, found.oldest_run, found.runs);
    nk::counter::add(doorbell, 1).map_err(|e| e.to_string())?;
    println!("nkctl demo: rang vm{keeper}'s doorbell; waiting for the revocation");
    // The mapping goes with the capability: from here on the process touches only calls.
    let start = Instant::now();
    let mut polls = 0u64;
    let refused = loop {
        polls += 1;
        match nk::nvram::seq(region) {
            Ok(_) if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => return Err(format!("the capability still works after {} s", wait.as_secs())),
            Err(error) => break error,
        }
    };
    println!("nkctl demo: revoked from outside (after {polls} polls): {refused}");
    expect_revoked(refused)?;
    let commit = nk::nvram::commit(region).map(|_| ()).unwrap_err_or("commit after the revocation worked")?;
    println!("nkctl demo: next call: {commit}");
    expect_revoked(commit)?;
    // SAFETY: a volatile 4-byte load at the start of the process's mapping of the region
    // (still in its page tables; the VM's EPT no longer maps the range, so the hypervisor
    // answers it as an open bus).
    let first = unsafe { std::ptr::read_volatile(memory.as_ptr().cast::<u32>()) };
    println!(
        "nkctl demo: its next access: the list's first word reads {first:#010x} (the mapping went with the capability)"
    );
    if first != u32::MAX {
        return Err(format!("the region is still reachable after the revocation ({first:#x})"));
    }
    println!("nkctl demo: done; Linux goes on");
    Ok(())
}

fn expect_revoked(error: Error) -> Result<(), String> {
    match error.status() {
        Some(status) if status.code() == Status::REVOKED => Ok(()),
        _ => Err(format!("expected 'capability revoked', got '{error}'")),
    }
}

trait UnwrapErrOr {
    fn unwrap_err_or(self, what: &str) -> Result<Error, String>;
}

impl UnwrapErrOr for Result<(), Error> {
    fn unwrap_err_or(self, what: &str) -> Result<Error, String> {
        match self {
            Ok(()) => Err(what.to_string()),
            Err(error) => Ok(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_survives_appends_and_wraps() {
        let mut region = vec![0u8; 4 * PAGE];
        assert_eq!(verify(&region), Ok(None));
        for run in 1..=7u64 {
            let (got, pages) = append(&mut region);
            assert_eq!(got, run);
            assert_eq!(pages, [0, 1 + ((run - 1) % 3) as usize]);
            let found = verify(&region).unwrap().unwrap();
            assert_eq!(found.runs, run);
            assert_eq!(found.records, PER_RUN * run.min(3));
            assert_eq!(found.oldest_run, run.saturating_sub(2).max(1));
        }
    }

    #[test]
    fn a_damaged_record_is_found() {
        let mut region = vec![0u8; 4 * PAGE];
        append(&mut region);
        append(&mut region);
        region[PAGE + RECORD + 24] ^= 1;
        assert!(verify(&region).unwrap_err().contains("damaged"));
        let mut region = vec![0u8; 4 * PAGE];
        append(&mut region);
        set_word(&mut region, 16, 9);
        assert!(verify(&region).unwrap_err().contains("the header says 9"));
    }
}
