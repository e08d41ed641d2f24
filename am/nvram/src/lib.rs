//! The NVRAM AM (issue 12): persistent regions that callers map and work on at DRAM speed
//! and commit atomically, after PTx (seed null-kernel-ptx-lwc-thesis.txt, chapter 3) and
//! the null-Kernel's NVRAM calls (§5.4). The seed gives the calls and the on-media design;
//! the rights, fences, hash and orderings below are this crate's choices.
//!
//! # Objects, rights and operations
//!
//! Kinds: `nvram-factory` (right `allocate`; object id = the owner number the hypervisor
//! gives a VM, [`NvramGrant`]) and `nvram-region` (rights `map-read`, `map-write`,
//! `commit`, `restore`, bits 0-3, [`rights`]). Operations ([`op`], ABI numbers):
//!
//! - 0 `allocate(c: nvram-factory[allocate], bytes, key)`: §5.4's
//!   `allocate-nvram-region(size)`, plus a key so the same owner finds its region after a
//!   restart. `bytes` is a multiple of 4 KiB up to [`REGION_MAX`]. If the device holds
//!   the owner's region `key` it is restored (its size must match), else it is created.
//!   Returns a region capability with every right and `[bytes, committed seq, 1 if created,
//!   region id]`. A region is loaded once: allocating a loaded one is `NOT_PERMITTED` (its
//!   holder shares it by delegation).
//! - 1 `map(c: region[map-read], gpa, access, aspace high, aspace low)`: §5.4's
//!   `map-region(region, aspace, offset)` into the caller's own address space: the whole
//!   region's working copy at `gpa`, `access` = `frame_access::READ`, plus `WRITE` with
//!   `map-write`; never execute. Overlapping another region's mapping is `NOT_PERMITTED`;
//!   outside the hypervisor's window for regions (`NvramAm::with_window`; 1-2 GiB)
//!   `BAD_ARGUMENT`. A writable mapping lends the AM an exo `aspace[dirty]` capability for
//!   its write set (below, "Write sets"): the one named by arguments 2-3 (a capability
//!   name's words; a name the caller cannot use, or without `dirty`, is refused with the
//!   capability's status), or with both 0 one the caller holds to its own address space.
//! - 2 `unmap(c: region[map-read], gpa)`.
//! - 3 `begin(c: region[commit])`: opens a transaction (one at a time); returns the seq.
//! - 4 `commit(c: region[commit], whole)`: makes every write since the last commit or
//!   restore durable, atomically; closes the transaction. Returns `[seq, blocks written,
//!   device bytes written, dirty pages]`. With `whole` = 1 it writes every block of the
//!   region, changed or not (the naive whole-region copy `cargo xtask bench nvram`
//!   measures beside the write-set commit), through the same PTx path.
//! - 5 `restore(c: region[restore])`: puts the working copy back to the last committed
//!   state (PTx's `restore`, used to abort) and closes the transaction; returns the seq.
//!   At start-up the restore is `allocate` itself.
//! - 6 `seq(c: region)`: `[committed seq, bytes, 1 if a transaction is open]`.
//!
//! Revocation: when a capability to a region dies, every mapping made through it is
//! removed (on every CPU, as the exo AM's unmaps are), and if it opened the open
//! transaction or could write through a mapping, that transaction is aborted (the working
//! copy is put back to the committed state). When the capability `allocate` granted dies,
//! the region is unloaded: unmapped everywhere, its frames given back; what was committed
//! stays on the device.
//!
//! Logical separation (§5.2.1): a region is found again only through the factory of its
//! owner, is loaded into one working copy at a time, and lives in its own extent of the
//! device (the directory never places two regions over each other), so two callers share
//! NVRAM only by sharing a capability.
//!
//! Bounds: a VM has at most [`REGIONS_PER_VM`] regions and [`BYTES_PER_VM`] bytes loaded
//! (each costs twice its size in host frames: working and committed copies), a region at
//! most [`MAPPINGS_PER_REGION`] mappings; past them `QUOTA_EXCEEDED`. All VMs together load
//! at most [`LOADED_BYTES_MAX`] (the AM's hypervisor heap use grows with loaded regions);
//! past it `NO_MEMORY`. On the device a region's extent is about 2.1 times its size
//! (twice the blocksets it fills, headers and log), and the directory takes 16 KiB.
//!
//! # Write sets
//!
//! The write set is not the caller's to give, and it comes from below through a
//! capability (seed §5.2.1, hierarchical capabilities): a writable `map` lends the AM a
//! child of the mapper's exo `aspace[dirty]` capability (`Kernel::take_cap`, charged to
//! the mapper's capability quota, given back at unmap). At commit the AM, as the
//! principal `Principal::Am(nvram)`, calls the exo AM's `dirty-read` with it
//! (`Kernel::call_am`: the null-Kernel checks it as any caller's), which reads and clears
//! the EPT dirty flags of the mapping; it keeps the bits of mappings removed since, and
//! diffs each dirty page against the committed copy in 256-byte blocks (§3.2.6), so only
//! changed blocks are written. A page rewritten with the same bytes costs nothing.
//!
//! When that capability dies (the mapper revokes what it lent, or its ancestor), the
//! write set is unknown: commit is refused with the status the check gave (`REVOKED`),
//! writing nothing, and keeps being refused while the mapping lasts; restore still aborts
//! (every page counts as dirty), and unmapping and mapping again lends a new capability.
//! Capabilities are per kernel instance: the lent one lives on the instance of the VM
//! that mapped, so a commit from a VM on another CPU (the region capability delegated
//! there) cannot name it and counts that mapping's every page as dirty (correct, slower).
//! A writable mapping made by a caller that holds no such capability, and names none,
//! counts every page as dirty (slower, same result), as does a hypervisor that lends no
//! dirty tracking to the exo AM. The committed copy is kept in host frames
//! (not read back from the device as PTx does) because the device may be a disk.
//!
//! # On the device
//!
//! The device ([`nk_am::Media`]) starts with a directory ([`directory`]): a superblock
//! and 63 region entries, one 256-byte unit each. Each region has its own extent holding a
//! PTx store ([`ptx`]): a circular log, then blocksets of 41 data blocks of 256 bytes and
//! a 256-byte header (magic, region id, sequence number, a `logged` flag, the 41 block
//! numbers or ⊥, the fresh-slot bitmap, hash). Writes are non-destructive; the map (from
//! block to blockset and slot, a word per block) and the free list live in memory and are rebuilt from the headers at
//! restore by walking blocksets in decreasing sequence order (Invariant 1).
//!
//! Placement (§3.2.5 step 2): new versions go into free slots (⊥, or superseded by a
//! committed transaction); a write set of at most 41 blocks into one blockset (best fit),
//! a larger one into as few as possible, emptiest first. A store has twice the blocksets
//! its region fills, plus two, so a commit of every block always fits; there is no
//! cleaning or compaction (as in PTx). PTx keeps a block's new version out of the blockset
//! of its previous one; this crate instead records in each header which slots the commit
//! that stamped it wrote (a 41-bit *fresh* bitmap). A commit spanning blocksets must keep
//! the versions it supersedes listed until all its headers are written (a roll-back needs
//! them), so two blocksets, or one, can carry the same stamp for two versions of a block;
//! restore takes the fresh one. (An earlier version kept new versions out of every
//! blockset holding a block of the write set: correct, but after scattered commits a
//! full-region commit found no room; `a_full_commit_always_fits` checks that. Without the
//! fresh bitmap the crash sweep fails.)
//!
//! # Commit order (Alg. 2's, not the prose's)
//!
//! The seed's prose writes the log entry's hash last (after the headers); its Alg. 2 and
//! Alg. 3 persist the hashed log entry before the headers. This crate follows Alg. 2:
//!
//! 1. data blocks into free slots; **fence**;
//! 2. only if the commit spans several blocksets: its log record (per blockset: id, slot
//!    bitmap, and the header's previous stamp and fresh bitmap), each unit sealed with its
//!    hash; **fence**;
//! 3. the header of each blockset that received blocks: new stamp, slots superseded by
//!    earlier commits set to ⊥, new slots set and marked fresh; **fence**. The commit is
//!    durable when the last header is.
//!
//! A commit that fits one blockset skips step 2 (§6.1.1): its single header write is
//! atomic and is the commit point. Restore matches: a log record with any unit missing
//! was never followed by a header write and is ignored; if the last complete record has a
//! listed header with an older stamp, the commit was cut during step 3 and is rolled back
//! (each listed header still carrying its stamp gets its previous stamp and fresh bitmap
//! back and ⊥ in the
//! slots it wrote; fence), which is idempotent, so a cut during the roll-back is harmless.
//! Sequence numbers are never reused: the next commit takes one above every stamp and
//! record seen.
//!
//! # Atomic units, not a header log
//!
//! `Media` guarantees that each 256-byte unit is written atomically (old or new after a
//! power cut), so headers are rewritten in place; the header log of §3.2.7 (for devices
//! without that guarantee) is not needed. Persistent memory is atomic only per aligned
//! 8 bytes, so the hypervisor's persistent-memory device gives unit atomicity itself with
//! a redo journal (`nk_storage::pmem`). A Media implementation that cannot promise unit
//! atomicity must not be lent to this AM as it is. Fences are the `Media::fence` calls
//! above (three per logged commit, two for a single-blockset one); the device decides
//! what a fence is (CLWB and SFENCE on persistent memory, a completed write on a disk).
//!
//! # Hash
//!
//! Every header, log unit and directory unit ends with a hash of its first 248 bytes:
//! FNV-1a 64 taken 8 bytes at a time, each step xoring a little-endian word into the
//! state, multiplying by the FNV prime and rotating left by 23 (31 steps a unit, where
//! byte-wise FNV-1a took 248; the word-wise form is the format since the bypass speed-up
//! of issue 13: a device sealed with the byte-wise hash reads as corrupt). The threat is a
//! torn or bit-rotted unit, not an adversary (guests never write the device), so a fast
//! non-cryptographic hash suffices; it also provably catches every change confined to one
//! 8-byte word, so every single-byte change (each step is a bijection of the state for a
//! given word), which the tests check for every byte of a header and a log unit. Because units
//! are atomic, a unit that is neither all zero (never written) nor intact can only be
//! corruption: restore reports it ([`ptx::Corruption`]) and restores nothing from that
//! store, never a silently wrong region. So does a header stamped by a logged commit newer
//! than every complete record (that record was durable before the header, so it was
//! destroyed later).
//!
//! # Testing
//!
//! [`testing::CrashMedia`] cuts power right after any chosen write, keeping any subset of
//! the unfenced units; `tests/crash.rs` sweeps every write of several commits (single- and
//! multi-blockset, with a log wrap) and checks that each restore yields exactly one
//! committed version, never older than the last commit that returned.
//! The same property is checked in the emulator on the durable device (tests/emulator.toml:
//! `nvram-seq-crash` cuts the power after each sector write of a boot of the test guest's
//! `nvramseq 10 small`, `nvram-seq-killed` kills Bochs at a random moment, and xtask's
//! `nvram-versions` check compares the next boot's restored version with the last commit
//! that returned; `nvram-corrupt-header` flips a header byte between boots).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod am;
pub mod directory;
pub mod ptx;
pub mod testing;

pub use am::{
    op, rights, NvramAm, NvramGrant, BYTES_PER_VM, LOADED_BYTES_MAX, MAPPINGS_PER_REGION, PAGE, REGIONS_PER_VM,
    REGION_MAX,
};

#[cfg(test)]
mod tests;
