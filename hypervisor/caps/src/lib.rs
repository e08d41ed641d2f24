//! The null-Kernel's extensible capability core.
//!
//! The null-Kernel guards every operation of every *abstract machine* (AM) with
//! capabilities, and attaches no meaning to them itself: AMs define their objects, the
//! rights on them and which capabilities each of their operations needs (Litton's
//! dissertation §5.2.1, "Extensibility"; DESIGN.md §2). This crate is that core: one
//! [`CapTable`] per kernel instance, with no hardware and no `unsafe`, so the same code runs
//! inside the hypervisor (`x86_64-unknown-none`) and under host tests.
//!
//! # The model
//!
//! * An **object** is `(AmId, ObjKind, ObjId)` ([`Object`]): the AM that implements it, a
//!   kind that AM registered, and an id the AM chose.
//! * **Rights** ([`Rights`]) are a 64-bit set; each kind names its bits when it is
//!   registered ([`KindSpec`]).
//! * A **capability** is an object and rights, a **holder** ([`Principal`]: a VM or an AM),
//!   a [`Binding`] (*bound*: usable only by its holder; *bearer*: usable by whoever
//!   presents its name) and a place in a **derivation tree**.
//! * A capability is named by a sparse, unguessable 128-bit [`CapName`] from a ChaCha20
//!   CSPRNG seeded through an [`EntropySource`] (RDSEED in the hypervisor, [`FixedSeed`] in
//!   tests), seed §5.5.
//!
//! # Name layout
//!
//! Bits 127..112 hold the id of the kernel that owns the capability ([`CapName::kernel`]);
//! bits 111..0 are random. A hypercall carries a name as two 64-bit words
//! ([`CapName::from_words`]). The all-zero random part is never issued.
//!
//! # Operations
//!
//! * [`CapTable::mint`]: the AM that implements an object creates a root capability to it
//!   (nobody else can).
//! * [`CapTable::derive`]`(c, mask)`: a child of `c` for the caller, with `c`'s rights
//!   masked.
//! * [`CapTable::delegate`]`(c, target, mask, bound|bearer)`: a child of `c` held by
//!   `target`.
//! * [`CapTable::revoke`]`(c)`: `c` and, transitively, everything derived from it die
//!   before the call returns; a [`RevocationHook`] tells the owning AMs each `(object,
//!   rights)` that died (with its name and holder) so they undo its effects. The caller
//!   must be able to use `c` or hold `c`'s parent.
//! * [`CapTable::delete`]`(c)`: the holder gives `c` up; a live `c` is revoked first with its
//!   subtree. Revoked capabilities stay known (presenting them says
//!   [`ArgFault::Revoked`]) and count against their payer's quota until deleted.
//! * [`CapTable::inspect`]`(c)`: the object, rights, holder and binding of `c`.
//! * [`CapTable::check`]: the decode step of an AM operation (below).
//! * [`CapTable::remove_vm`]: a destroyed or crashed VM's capabilities are revoked, with
//!   their subtrees, and freed.
//!
//! # Quotas
//!
//! Every capability is charged to one principal's quota, its *payer*, from its creation
//! until it is freed (deleted, or its holder removed); the table also has a global
//! capacity. The payer is the principal that caused the capability: the caller of
//! [`CapTable::mint`] and [`CapTable::derive`], and the **delegator** of
//! [`CapTable::delegate`] (not its target), so no principal can fill another's quota, or
//! through it the table, by giving it capabilities: what it delegates stays charged to it,
//! revoked or not, until the receiver deletes it. An AM that hands a principal a
//! capability that principal asked for (a counter it created, its initial capabilities)
//! uses [`CapTable::grant`], which charges the receiver. Across kernels the same holds when
//! the delegator is registered on the receiver's kernel too (the hypervisor registers every
//! VM on every kernel instance); [`CapTable::accept_remote`] charges the holder otherwise.
//!
//! # How an AM uses it
//!
//! ```
//! use nk_caps::*;
//!
//! let mut table = CapTable::new(KernelId::new(0), 1024, &mut FixedSeed::from_u64(7)).unwrap();
//!
//! // At registration: the AM, its kinds with their rights, its operations.
//! let exo = AmId::new(1);
//! table.register_am(exo, "exo", 256).unwrap();
//! let frame = table
//!     .register_kind(exo, KindSpec { name: "frame", rights: &["read", "write"] })
//!     .unwrap();
//! let write = table.registry().find_right(exo, frame, "write").unwrap();
//! let map_rw = table
//!     .register_op(exo, OpSpec { name: "map-rw", args: &[ArgSpec::new(frame, write)] })
//!     .unwrap();
//!
//! // The AM mints a root for a frame it owns and delegates it to a guest.
//! let vm = VmId::new(3);
//! table.add_vm(vm, 64).unwrap();
//! let all = table.registry().kind_rights(exo, frame).unwrap();
//! let root = table
//!     .mint(Principal::Am(exo), Object::new(exo, frame, ObjId::new(0x42)), all)
//!     .unwrap();
//! let guest_cap = table
//!     .delegate(Principal::Am(exo), root, Principal::Vm(vm), Rights::ALL, Binding::Bound)
//!     .unwrap();
//!
//! // A hypercall arrives: the core checks every argument before the handler runs, and the
//! // handler sees only checked references to its own objects.
//! let checked = table.check(Principal::Vm(vm), map_rw, &[guest_cap]).unwrap();
//! assert_eq!(checked.args()[0].id(), ObjId::new(0x42));
//!
//! // The AM takes the frame back; its hook undoes the mapping.
//! let mut unmapped = Vec::new();
//! let mut unmap = |dead: &DeadCap| unmapped.push(dead.object);
//! table.revoke(Principal::Am(exo), guest_cap, &mut unmap).unwrap();
//! assert_eq!(unmapped.len(), 1);
//! assert_eq!(
//!     table.check(Principal::Vm(vm), map_rw, &[guest_cap]).unwrap_err(),
//!     CheckError::Arg { index: 0, fault: ArgFault::Revoked },
//! );
//! ```
//!
//! # Invariants (DESIGN.md §2)
//!
//! 1. *No amplification*: a child's rights are a subset of its parent's (derive and
//!    delegate only mask), and it refers to the same object.
//! 2. *Complete, transitive revocation*: revoking `c` kills its whole subtree before
//!    returning and reports every death to the hook. (Across kernels: nk-protocol, with
//!    the walk below.)
//! 3. *Unforgeable names*: only names this table issued resolve; revoked names fail with
//!    `Revoked`, deleted and unissued ones with `UnknownName`; a bound name presented by
//!    another principal fails with `WrongHolder` (before its state is revealed).
//! 4. *Collusion bound*: capabilities are only minted by an object's AM or derived from a
//!    usable capability, so principals together never hold more than the union of what
//!    they were granted (seed §5.2.1).
//! 5. *Handlers see only their own objects*: an operation's arguments can only name kinds
//!    of the AM that exports it, and a [`Checked`] that names an operation, like every
//!    [`CheckedCap`], can only be made by [`CapTable::check`] or [`CapTable::check_into`]
//!    ([`Checked::blank`] names no AM's operation and has no arguments).
//! 6. *No corruption under concurrency*: a table is one kernel's, used by one CPU at a
//!    time (`&mut self`); the distributed protocol will keep tables consistent by
//!    messages, never by sharing a table.
//!
//! # Data structures
//!
//! Capabilities live in a slab of fixed-size nodes (72 bytes) reserved in full when the
//! table is built. The derivation tree is intrusive: each node links to its parent, its
//! first child and its two siblings by 32-bit slab index, and to its neighbours in its
//! holder's list. Names are found through a fixed open-addressing index of 8-byte entries
//! (slot and hash tag), at most half full, hashed by a keyed fold of the (random) name: a
//! lookup touches one index entry and one node, and deletion leaves no tombstones, so the
//! index never grows or rehashes. Nothing allocates after [`CapTable::new`] except the
//! registration of AMs and principals. Revocation walks a subtree iteratively in constant
//! memory, so a 100,000-deep chain revokes like a 100,000-wide fan, in time linear in the
//! subtree (which the quotas of the principals that built it bound). Each principal has a
//! quota and the table a capacity; exhausting either is an error, not a panic.
//!
//! # The distributed protocol's interface
//!
//! Each kernel owns one table ([`CapTable::new`] takes its [`KernelId`]), and every name
//! says which kernel owns it, so a request for a name owned elsewhere is routed there by
//! nk-protocol (a name owned elsewhere is simply unknown to this table's single-kernel
//! methods). When a capability tree crosses kernels, each side records the link with a
//! *proxy* node named after the capability on the other side ([`NodeState::Remote`]): the
//! parent's table holds a proxy of the remote child in the parent's child list, and the
//! child's table hangs the child below a proxy of the remote parent. Links are slab indices
//! and proxies are ordinary nodes, so the traversal, quota and index code keeps its shape.
//!
//! The protocol's steps are methods of the table that report what must be sent through a
//! [`LinkSink`] and never send anything themselves: [`CapTable::revoke_walk`] marks a
//! subtree (a capability whose subtree still reaches another kernel stays
//! [`NodeState::Revoking`], unusable, until [`CapTable::remote_gone`] reports the last remote
//! part dead), [`CapTable::delegate_remote`] / [`CapTable::accept_remote`] are the two ends
//! of a cross-kernel delegation, [`CapTable::reserve_remote`] / [`CapTable::grant_remote`] /
//! [`CapTable::activate_pending`] those of an obtain, and [`CapTable::close_principal`] /
//! [`CapTable::revoke_held`] start a crashed principal's removal. The table module
//! `remote.rs` explains the walk; nk-protocol is the state machine around it.
//!
//! The single-kernel methods ([`CapTable::revoke`], [`CapTable::delete`],
//! [`CapTable::remove_vm`]) stay purely local: on a table with remote relations they tear
//! the local part down and drop the proxies without telling anyone, so a kernel that takes
//! part in the protocol revokes through nk-protocol.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod ids;
mod name;
mod registry;
mod table;

#[cfg(test)]
mod tests;

pub use ids::{AmId, Binding, KernelId, ObjId, ObjKind, Object, OpId, Principal, Rights, VmId};
pub use name::{CapName, EntropySource, EntropyUnavailable, FixedSeed};
pub use registry::{ArgSpec, KindSpec, OpSpec, RegisterError, Registry, MAX_CAP_ARGS, MAX_NAME_LEN};
pub use table::{
    ArgFault, AuditFailure, BelowWalk, CapError, CapInfo, CapTable, CheckError, Checked, CheckedCap, DeadCap,
    Footprint, IncomingRevoke, LinkEvent, LinkSink, NewTableError, NodeState, NodeView, PrincipalError, RemoteGrant,
    RevocationHook, RevokeStart, Usage, Walk, NO_ROOT,
};
