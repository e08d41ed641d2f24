//! `nkctl bench`: the figures of `cargo xtask bench bypass`, measured in this process with
//! RDTSC (in Bochs: emulated instructions; Linux's TSC runs at the rate the hypervisor
//! reports, one tick per instruction). Each figure is the minimum of [`ROUNDS`] deltas,
//! RDTSC's own cost subtracted, printed as `nk-bench: <metric> <value>`.
//!
//! - `ring3_null_call_instructions`: one null hypercall by `VMCALL` from ring 3.
//! - `bypass_commit_4k_instructions`: a 4 KiB update persisted through the NVRAM AM: the
//!   stores of one whole page of a region mapped through `/dev/mem`, then `commit`.
//! - `linux_fsync_4k_instructions`, with `--fsync PATH`: `pwrite` of the same 4 KiB to a
//!   file at PATH, then `fsync`.

/// How many times each operation is measured.
const ROUNDS: u64 = 9;
/// Where the bench maps its region (above the demo's and the isolation checks').
const GPA: u64 = 0x4040_0000;
const PAGE: usize = 4096;

fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter (CR4.TSD is clear under Linux).
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn min_of(mut measure: impl FnMut(u64) -> Result<u64, String>) -> Result<u64, String> {
    let mut best = u64::MAX;
    for round in 0..ROUNDS {
        best = best.min(measure(round)?);
    }
    Ok(best)
}

/// Runs the measurements; `fsync` names a file on a block device for the Linux path.
pub fn run(fsync: Option<&str>) -> Result<(), String> {
    let overhead = min_of(|_| {
        let start = tsc();
        Ok(tsc() - start)
    })?;
    nk::null().map_err(|e| e.to_string())?;
    let null = min_of(|_| {
        let start = tsc();
        nk::null().map_err(|e| e.to_string())?;
        Ok(tsc() - start)
    })?;
    println!("nk-bench: ring3_null_call_instructions {}", null.saturating_sub(overhead));

    let factory = crate::label_obj("nvram/nvram-factory")?;
    let region = nk::nvram::allocate(factory, PAGE as u64 * 4, 31).map_err(|e| e.to_string())?.region;
    nk::nvram::map(region, GPA, true).map_err(|e| e.to_string())?;
    let memory = nk::map_phys(GPA, PAGE * 4)?;
    let page = &mut memory[..PAGE];
    let commit = min_of(|round| {
        let fill = (round as u8).wrapping_add(0x5A);
        let start = tsc();
        for word in page.chunks_exact_mut(8) {
            // SAFETY: a volatile 8-byte store into the mapped page (chunks of 8 bytes).
            unsafe {
                std::ptr::write_volatile(word.as_mut_ptr().cast::<u64>(), u64::from(fill) * 0x0101_0101_0101_0101)
            };
        }
        let done = nk::nvram::commit(region).map_err(|e| e.to_string())?;
        let ticks = tsc() - start;
        if done.dirty_pages != 1 {
            return Err(format!("the commit wrote {} dirty pages, not 1", done.dirty_pages));
        }
        Ok(ticks)
    })?;
    println!("nk-bench: bypass_commit_4k_instructions {}", commit.saturating_sub(overhead));
    let _ = nk::nvram::unmap(region, GPA);

    if let Some(path) = fsync {
        use std::io::Write as _;
        use std::os::unix::fs::FileExt as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        file.write_all(&[0u8; PAGE]).map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        let fsync = min_of(|round| {
            let data = [(round as u8).wrapping_add(0xA5); PAGE];
            let start = tsc();
            file.write_all_at(&data, 0).map_err(|e| e.to_string())?;
            file.sync_all().map_err(|e| e.to_string())?;
            Ok(tsc() - start)
        })?;
        println!("nk-bench: linux_fsync_4k_instructions {}", fsync.saturating_sub(overhead));
    }
    Ok(())
}
