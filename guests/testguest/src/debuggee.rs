//! `debuggee`: the guest the guest-debugger scenario (gdb-session) drives with gdb over
//! COM2. Its module line says `gdb`, so it starts stopped; the gdb script breaks at
//! [`nk_gdb_target`], sets RDI to 41 there, steps, reads [`NK_GDB_MARK`], lets it run into
//! its wait for [`NK_GDB_WORD`], interrupts it (Ctrl-C), writes the word and detaches. The
//! guest then prints what it saw: `result 124` (3 * 41 + 1, where it passed 1: the
//! register write reached it) and `word 0x1234` (the memory write did). Without a
//! debugger it prints `result 4` and, after its bounded wait, `word 0x0`.

use core::sync::atomic::{AtomicU64, Ordering};

use nk_guest::println;

/// Bytes the debugger reads (`x/8c &NK_GDB_MARK`).
#[unsafe(no_mangle)]
pub static NK_GDB_MARK: [u8; 8] = *b"nk-gdb!\0";

/// How long the guest waits for the debugger's word (PAUSEs; a bound, not a timeout).
const WAIT_ROUNDS: u64 = 50_000_000;

/// A word the debugger writes.
#[unsafe(no_mangle)]
pub static NK_GDB_WORD: AtomicU64 = AtomicU64::new(0);

/// Where the debugger breaks: 3 * `x` + 1.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn nk_gdb_target(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

pub fn run() {
    let result = nk_gdb_target(core::hint::black_box(1));
    let mark = core::hint::black_box(&NK_GDB_MARK);
    let mut rounds = 0;
    while NK_GDB_WORD.load(Ordering::Relaxed) == 0 && rounds < WAIT_ROUNDS {
        core::hint::spin_loop();
        rounds += 1;
    }
    println!(
        "debuggee: result {result}, word {:#x}, mark {}",
        NK_GDB_WORD.load(Ordering::Relaxed),
        core::str::from_utf8(&mark[..7]).unwrap_or("?")
    );
    println!("GTEST ok debuggee");
}
