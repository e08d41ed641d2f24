//! The null-Kernel's distributed capability protocol (DESIGN.md §3).
//!
//! The hypervisor runs one kernel instance per CPU (Barrelfish's CPU drivers, SemperOS's
//! multi-kernel). Each owns a [`CapTable`](nk_caps::CapTable) with the capabilities of the
//! principals that run on its CPUs, and every capability name carries its kernel's id in
//! bits 127..112, so any kernel routes a request to the owner without a lookup (the role of
//! SemperOS's DDL key). A [`Kernel`] is one instance's state machine: it wraps the table,
//! starts operations for local callers, handles the messages other kernels send, and
//! reports operations that had to wait. It has no hardware, no threads and no clock, so the
//! same code runs in the hypervisor (one per CPU, messages over per-pair rings with an IPI
//! doorbell) and on the host under this crate's deterministic simulator.
//!
//! # Using it (per CPU)
//!
//! ```
//! use nk_caps::*;
//! use nk_protocol::{Kernel, Message, Outcome, Started};
//!
//! // Two kernel instances, each with its table (the same AMs registered on both).
//! let mut kernels: Vec<Kernel> = (0..2)
//!     .map(|id| {
//!         let mut table = CapTable::new(KernelId::new(id), 64, &mut FixedSeed::from_u64(id.into())).unwrap();
//!         table.register_am(AmId::new(1), "exo", 16).unwrap();
//!         table.register_kind(AmId::new(1), KindSpec { name: "frame", rights: &["read", "write"] }).unwrap();
//!         table.add_vm(VmId::new(u32::from(id)), 16).unwrap();
//!         Kernel::new(table, 2).unwrap()
//!     })
//!     .collect();
//! let exo = Principal::Am(AmId::new(1));
//! let frame = Object::new(AmId::new(1), ObjKind::new(0), ObjId::new(7));
//! let root = kernels[0].table_mut().mint(exo, frame, Rights::from_bits(0b11)).unwrap();
//!
//! // Kernel 0 delegates to VM 1, which runs on kernel 1: a handshake of two messages.
//! let mut wire: Vec<(KernelId, Message)> = Vec::new();
//! let vm1 = Principal::Vm(VmId::new(1));
//! let started = kernels[0].delegate(exo, root, vm1, KernelId::new(1), Rights::ALL, Binding::Bound, &mut wire);
//! let op = started.pending().unwrap();
//! let mut hook = |_: &DeadCap| {};
//! let mut from = KernelId::new(0);
//! while let Some((to, message)) = wire.pop() {
//!     let mut out = Vec::new();
//!     kernels[usize::from(to.raw())].handle(from, message, &mut hook, &mut out);
//!     from = to;
//!     wire.extend(out);
//! }
//! let done = kernels[0].poll().unwrap();
//! assert_eq!(done.op, op);
//! let child = done.result.unwrap().name().unwrap();
//! assert_eq!(child.kernel(), KernelId::new(1));
//! assert!(kernels[1].table().inspect(vm1, child).is_ok());
//!
//! // Revoking the root reaches kernel 1 and comes back with its acknowledgement.
//! let started = kernels[0].revoke(exo, root, &mut hook, &mut wire);
//! assert!(matches!(started, Started::Pending(_)));
//! let mut from = KernelId::new(0);
//! while let Some((to, message)) = wire.pop() {
//!     let mut out = Vec::new();
//!     kernels[usize::from(to.raw())].handle(from, message, &mut hook, &mut out);
//!     from = to;
//!     wire.extend(out);
//! }
//! assert_eq!(kernels[0].poll().unwrap().result, Ok(Outcome::Count(2)));
//! assert_eq!(kernels[1].table().inspect(vm1, child), Err(CapError::Revoked));
//! ```
//!
//! * **Construct**: [`Kernel::new`]`(table, kernels)` per CPU (or group of CPUs), after
//!   registering the AMs (identically on every kernel) and the kernel's VMs on its table.
//! * **Start an operation** for a principal of this kernel: [`Kernel::derive`] (an obtain
//!   when the name is another kernel's), [`Kernel::delegate`], [`Kernel::revoke`],
//!   [`Kernel::delete`], [`Kernel::crash`]. Each returns [`Started::Done`] when this kernel
//!   alone finished it, else [`Started::Pending`] with an [`OpId`] (the hypervisor parks
//!   the calling vCPU on it). AM operations check capabilities with
//!   [`CapTable::check`](nk_caps::CapTable::check) on [`Kernel::table`] as before: a
//!   capability is used on its holder's kernel, and a bearer name of another kernel is
//!   obtained first.
//! * **Handle a message**: [`Kernel::handle`]`(from, message, hook, out)` for each message
//!   the transport delivers; outgoing messages go to the [`Outbox`] (a `Vec` works).
//! * **Poll completions**: [`Kernel::poll`] returns each [`Completion`] once.
//!
//! Messages are `Copy` and fixed-size; [`Message::encode`] / [`Message::decode`] turn them
//! into [`MESSAGE_WORDS`] 64-bit words for a ring, and decoding rejects malformed words.
//!
//! # The protocol
//!
//! Channels are assumed FIFO per ordered pair of kernels and loss-free, Barrelfish's
//! assumption (thesis §4.1; the hypervisor's per-pair rings give it, and a transport that
//! drops and retries a message looks to the protocol like one that delays it and every
//! message behind it). Messages between different pairs are reordered and delayed
//! arbitrarily. Kernels are trusted code and not adversarial.
//!
//! * **Delegate** (A holds parent P, the child goes to a principal on B): A draws the
//!   child's name C with B's id, hangs a proxy of C below P and sends
//!   [`Message::Delegate`]; B creates C below its proxy of P (checking the holder and its
//!   quota) and answers [`Message::DelegateAck`]. The delegator learns C only from a
//!   successful acknowledgement whose proxy is still unrevoked, so no one can use a child
//!   that a racing revocation of P will kill.
//! * **Obtain** (a principal on B presents P of A): B reserves C (charged to the principal,
//!   unusable) below its proxy of P and sends [`Message::Obtain`]; A checks that the
//!   presenter may use P, hangs a proxy of C below P and answers with the grant; B makes C
//!   live.
//! * **Revoke**: the owner of the revoked capability marks its local subtree (every live
//!   capability dies and its AM undoes its effects at once), sends a revoke to exactly
//!   the kernels where proxies say children live (no broadcast, unlike Barrelfish's
//!   two-phase commit), and keeps the marked part ([`NodeState::Revoking`](nk_caps::NodeState))
//!   until each of them answers. The revoke is batched (issue 14): one
//!   [`Message::RevokeBelow`] per marked parent and kernel names the parent, and the
//!   receiver revokes every child of its proxy of that parent in one pass and answers one
//!   [`Message::GoneBelow`] with the count when all of them are finalized, so a revoke
//!   costs messages per kernel reached, not per capability. The receivers do the same
//!   recursively; acknowledgements travel back up the tree; each capability is finalized
//!   (deleted from the tree) when its whole subtree is dead, and the operation completes
//!   when its root is. A capability whose parent is remote and that no batch covers
//!   reports [`Message::Gone`] to the parent's kernel whenever it is finalized, however its
//!   revocation began, so no proxy dangles. A single child revoked by its parent's holder
//!   gets a [`Message::Revoke`] of its own and answers with its own `Gone`; a batch that
//!   arrives while that one runs leaves it out on both sides (the receiver by its record
//!   of the single revoke, the sender by its record of the single send, which FIFO
//!   channels keep in step). Every record is bounded by the table: one per proxy.
//! * **Crash** of a VM: it is closed (no new capability reaches it), its reservations are
//!   cancelled, everything it holds is revoked as above here and on the kernels named
//!   ([`Message::Crash`]), and its capabilities are freed when all of that is complete.
//! * **Routing**: a revoke or delegate of another kernel's capability that the caller may
//!   use (a bearer name) is carried out by the owner ([`Message::Routed`]).
//!
//! Waiting only ever follows the derivation tree downward: a capability waits for the
//! remote children below it, never for an ancestor or for another operation. The tree is
//! finite and acyclic, so every revocation terminates, whatever overlaps it.
//!
//! # Interference (SemperOS slides, "Distributed Capabilities – Interferences")
//!
//! Rows are the operation that starts first, columns the one that overlaps it; each cell
//! names the tests in `src/tests/interference.rs` that explore every interleaving of its
//! scenario (checking every invariant after every step) and force the interleavings that
//! lead to each outcome.
//!
//! | 1st \ 2nd | obtain | delegate | revoke / crash |
//! |---|---|---|---|
//! | **obtain** | fine: both succeed, independent children (`obtain_obtain`) | fine: both succeed (`obtain_delegate`) | "!": if the parent's revoke marks it before the `Obtain` arrives, the obtain fails `Revoked` and its reservation is freed; if the grant came first, the obtain succeeds and the revoke, which follows the grant on the same FIFO channel, kills the child and completes only after its `Gone`. The obtainer's crash frees the reservation, and the late grant is answered with `Gone` (the obtain fails `Revoked`); the crash of the parent's holder acts as a revoke, the obtain failing `Revoked` (or `UnknownName` once the crash has freed the parent) (`obtain_vs_revoke`, `obtain_vs_crash`) |
//! | **delegate** | fine: both succeed (`delegate_obtain`) | fine: both succeed (`delegate_delegate`) | "⚡": a revoke of the parent that starts while the handshake runs sends its `Revoke` after the `Delegate` on the same FIFO channel: the child is created, then revoked, and the delegation fails `Revoked` without ever revealing the child's name; the revoke completes after the child's `Gone`. A revoke that starts first makes the delegation fail `Revoked` at once. The target's crash: the delegation fails `UnknownPrincipal` if the crash came first, else it succeeds and the child dies (and is freed) with the crash; the delegator's crash acts as a revoke (`delegate_vs_revoke`, `delegate_vs_crash`) |
//! | **revoke** | "!": an obtain of a revoking or revoked capability fails `Revoked` (`revoke_then_obtain`) | "!": a delegation of a revoking capability fails `Revoked` at once; one from a descendant the revoke has not reached yet is the cell above (created, revoked, fails `Revoked`) (`revoke_then_delegate`) | "⚡": two revokes of one capability: the second waits for the first to complete and reports `Revoked`. An ancestor's and a descendant's, or the two ends of a zigzagging tree (A → B → A → B): both complete, every capability dies once (its hook runs once, it is counted in exactly one result). A revoke and a crash of a holder inside the subtree, or of the revoked capability's holder: both complete, each death counted once, and the crash frees the VM's capabilities only after their subtrees are dead everywhere. Two kernels crashing one VM at once: each answers the other when its own part is done, so both complete (`revoke_revoke_same`, `revoke_revoke_nested`, `revoke_revoke_zigzag`, `revoke_vs_crash`) |
//!
//! # The simulator (`src/tests/`, host only)
//!
//! N kernels exchange messages over per-pair FIFO channels; a scheduler picks at each step
//! which channel delivers its oldest message or which scripted operation starts, so
//! messages of different pairs are reordered and delayed arbitrarily. After every step it
//! checks each table's audit ([`CapTable::check_consistency`](nk_caps::CapTable::check_consistency):
//! DESIGN.md §2 invariants 1, 3, 5, 6 and the proxy shapes), that no link across kernels
//! dangles (every proxy's counterpart exists, or a message on the way will resolve it),
//! that no child has more rights than its remote parent, and that every capability's hook
//! runs at most once; when a revoke, delete or crash completes, that everything below it
//! is unusable on every kernel; at the end, that every operation completed, every kernel is
//! idle, nothing is left revoking or reserved, no live capability has a dead parent, and
//! the results' counts add up to the hooks that ran (everything revoked exactly once).
//! Small configurations are explored exhaustively (up to the commutation of steps on
//! different kernels, with sleep sets), large ones under seeded random schedules; a failing
//! seed is printed and `NK_SIM_SEED=<seed>` replays it with a trace.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod encode;
mod error;
mod handle;
mod kernel;
mod message;
mod op;
mod small_map;

pub use encode::{DecodeError, MESSAGE_WORDS};
pub use error::ProtoError;
pub use kernel::Kernel;
pub use message::{Message, Outbox, Routed};
pub use op::{Completion, OpId, Outcome, Started};
#[cfg(test)]
mod tests;
