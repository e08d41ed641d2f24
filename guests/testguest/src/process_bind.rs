//! Process binding on bare metal (`nk_op::BIND`, issue 13): the guest plays two processes
//! by switching CR3 between its own page-table root and a copy of it (the same mappings,
//! another root). A counter bound under root A is refused under root B (`WRONG_HOLDER`,
//! and the counter is unchanged), and serves root A again after switching back.

use super::{counter, create_counter, read, why, CheckResult};
use nk_guest::abi::{process_root, Status};
use nk_guest::nk;

/// An 8 KiB-aligned page for the copied PML4: its root (CR3 without bits 12:0) differs
/// from the hypervisor-built one at 0x1000.
#[repr(C, align(8192))]
struct Pml4([u64; 512]);

static mut COPY: Pml4 = Pml4([0; 512]);

fn cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 in ring 0 has no side effect.
    unsafe { core::arch::asm!("mov {0}, cr3", out(reg) value, options(nomem, nostack)) };
    value
}

fn set_cr3(value: u64) {
    // SAFETY: `value` is this guest's own PML4 or the copy of it made below, which maps
    // exactly the same memory (same lower-level tables), so code, stack and data stay
    // where they are.
    unsafe { core::arch::asm!("mov cr3, {0}", in(reg) value, options(nostack)) };
}

/// Copies the current PML4 into [`COPY`] and returns the copy's CR3 value.
fn second_root() -> u64 {
    let own = cr3() & !0xfff;
    let copy = core::ptr::addr_of_mut!(COPY);
    for i in 0..512 {
        // SAFETY: `own` is the identity-mapped PML4 of this guest (readable at its
        // guest-physical address); COPY is this guest's own static, used only here, on
        // one vCPU.
        unsafe {
            let entry = core::ptr::read_volatile((own as *const u64).add(i));
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*copy).0[i]), entry);
        }
    }
    copy as u64
}

pub(crate) fn check() -> CheckResult {
    let (am, c) = create_counter()?;
    let a = cr3();
    let b = second_root();
    ensure!(process_root(a) != process_root(b), "the copy's root {b:#x} equals {a:#x}");
    let bound = nk::bind(c);
    ensure!(bound == Ok(process_root(a)), "bind under root A: {bound:?}");
    let add = |amount: u64| nk::call(am, counter::ADD, &[c], &[amount]).status();
    ensure!(add(1).is_ok(), "add under root A");
    set_cr3(b);
    let refused = [
        ("add", add(5)),
        ("read", read(am, c).err().unwrap_or(Status(0))),
        ("inspect", nk::inspect(c).err().unwrap_or(Status(0))),
        ("derive", nk::derive(c, u64::MAX).err().unwrap_or(Status(0))),
        ("bind", nk::bind(c).err().unwrap_or(Status(0))),
        ("revoke", nk::revoke(c).err().unwrap_or(Status(0))),
        ("delete", nk::delete(c).err().unwrap_or(Status(0))),
    ];
    set_cr3(a);
    for (what, status) in refused {
        ensure!(status.code() == Status::WRONG_HOLDER, "{what} under root B: {status}");
    }
    ensure!(read(am, c).map(|r| r.0) == Ok(1), "the counter changed under root B: {:?}", read(am, c));
    ensure!(add(1).is_ok(), "add under root A after B");
    let info = nk::inspect(c).map_err(|s| why(format_args!("inspect: {s}")))?;
    ensure!(info[3] >> 62 & 1 == 1, "inspect does not say process-bound: {:#x}", info[3]);
    ensure!(nk::delete(c).is_ok(), "delete under root A");
    Ok(())
}
