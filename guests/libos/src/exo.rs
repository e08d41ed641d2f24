//! The exo AM as this library OS uses it: its address space, frame sets, mappings, dirty
//! bits, and a page shared with another guest.

use alloc::string::String;
use core::fmt::Write;

use nk_guest::abi::Status;
use nk_guest::nk::{self, Cap};
use nk_guest::println;

use nk_guest::abi::exo_op::{ALLOC, DIRTY, MAP, PML_DRAIN, PML_ENABLE, UNMAP};
/// `frame_access` bits: read and write.
pub const RW: u64 = 3;
pub const PAGE: u64 = 0x1000;

/// Why a check failed.
pub struct Why(pub String);

pub fn why(args: core::fmt::Arguments<'_>) -> Why {
    let mut line = String::new();
    let _ = line.write_fmt(args);
    Why(line)
}

/// This guest's exo capabilities.
#[derive(Clone, Copy)]
pub struct Exo {
    pub am: u16,
    pub aspace: Cap,
}

impl Exo {
    /// Finds the address-space capability among the initial ones: the exo capability whose
    /// `unmap` where no mapping starts is a bad argument, not a wrong kind.
    pub fn find() -> Result<Exo, Why> {
        for index in 0..16 {
            let Ok((cap, am)) = nk::initial(index) else { break };
            if nk::call(am, UNMAP, &[cap], &[PAGE]).status().code() == Status::BAD_ARGUMENT {
                return Ok(Exo { am, aspace: cap });
            }
        }
        Err(why(format_args!("no address-space capability")))
    }

    /// Allocates `pages` zeroed 4 KiB frames and maps them read-write at `gpa`.
    pub fn alloc_map(&self, pages: u64, gpa: u64) -> Result<Cap, Status> {
        let reply = nk::call(self.am, ALLOC, &[self.aspace], &[pages, 0]);
        if !reply.status().is_ok() {
            return Err(reply.status());
        }
        let status = nk::call(self.am, MAP, &[reply.name, self.aspace], &[gpa, RW]).status();
        if !status.is_ok() {
            let _ = nk::delete(reply.name);
            return Err(status);
        }
        Ok(reply.name)
    }

    /// Reads and clears the dirty bits of `pages` pages from `gpa` into the bitmap frame
    /// set `bitmap`.
    pub fn dirty(&self, bitmap: Cap, gpa: u64, pages: u64) -> Result<(), Status> {
        let status = nk::call(self.am, DIRTY, &[self.aspace, bitmap], &[gpa, pages, 0]).status();
        if status.is_ok() {
            Ok(())
        } else {
            Err(status)
        }
    }

    /// Turns on Page-Modification Logging for `pages` pages from `gpa`.
    pub fn pml_enable(&self, gpa: u64, pages: u64) -> Result<(), Status> {
        let status = nk::call(self.am, PML_ENABLE, &[self.aspace], &[gpa, pages]).status();
        if status.is_ok() {
            Ok(())
        } else {
            Err(status)
        }
    }

    /// Writes the pages logged since the last drain into the bitmap frame set `bitmap`.
    pub fn pml_drain(&self, bitmap: Cap) -> Result<(), Status> {
        let status = nk::call(self.am, PML_DRAIN, &[self.aspace, bitmap], &[0]).status();
        if status.is_ok() {
            Ok(())
        } else {
            Err(status)
        }
    }

    fn map(&self, set: Cap, gpa: u64) -> Result<(), Status> {
        let status = nk::call(self.am, MAP, &[set, self.aspace], &[gpa, RW]).status();
        if status.is_ok() {
            Ok(())
        } else {
            Err(status)
        }
    }
}

/// Where the shared page is mapped in both guests.
const SHARED: u64 = 0x3c00_0000;
const MESSAGE: u64 = 0x11b0_5000_0000_0001;
const REPLY: u64 = 0x11b0_5000_0000_0002;

fn peek(gpa: u64) -> u64 {
    // SAFETY: `gpa` lies in the identity-mapped first GiB, where this guest mapped frames
    // (or, after a revoke, expects the hypervisor to stop it).
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

fn poke(gpa: u64, value: u64) {
    // SAFETY: as for `peek`; the page is mapped read-write.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

/// Lends a page to `peer`, waits for its reply in the page, then revokes the loan.
pub fn share(peer: u32) -> Result<(), Why> {
    let exo = Exo::find()?;
    let page = exo.alloc_map(1, SHARED).map_err(|s| why(format_args!("alloc and map: {s}")))?;
    poke(SHARED, MESSAGE);
    let lent = nk::delegate(page, peer, u64::MAX, false).map_err(|s| why(format_args!("delegate: {s}")))?;
    let mut spins = 0u64;
    while peek(SHARED + 8) != REPLY {
        spins += 1;
        if spins > 100_000_000 {
            return Err(why(format_args!("no reply from vm{peer}")));
        }
        core::hint::spin_loop();
    }
    println!("libos: vm{peer} wrote its reply into the shared page");
    nk::revoke(lent).map_err(|s| why(format_args!("revoke: {s}")))?;
    println!("libos: revoked vm{peer}'s frame capability; the page is mine alone again");
    if peek(SHARED) != MESSAGE {
        return Err(why(format_args!("the lender lost its own view")));
    }
    Ok(())
}

/// Maps the page another guest lent, answers, and reads on until the revoke stops it.
pub fn peer(_vm: u64) -> Result<(), Why> {
    let exo = Exo::find()?;
    let page = nk::wait_received(0);
    exo.map(page, SHARED).map_err(|s| why(format_args!("map the lent page: {s}")))?;
    if peek(SHARED) != MESSAGE {
        return Err(why(format_args!("the lender's message: {:#x}", peek(SHARED))));
    }
    poke(SHARED + 8, REPLY);
    println!("libos: read the lender's message, wrote a reply; reading until the loan is revoked");
    loop {
        if peek(SHARED) != MESSAGE {
            return Err(why(format_args!("the shared page changed")));
        }
        core::hint::spin_loop();
    }
}
