//! The messages kernels exchange (SemperOS slides: obtain, delegate, revoke with
//! acknowledgements, a principal's crash), the outbox a kernel sends them through, and
//! their encoding as fixed-size words for a shared-memory ring.

use alloc::vec::Vec;

use nk_caps::{Binding, CapName, KernelId, Principal, RemoteGrant, Rights, VmId};

use crate::error::ProtoError;
use crate::op::{OpId, Outcome};

/// Carries one step of the protocol from one kernel to another. The transport delivers it
/// with the sender's id; it is `Copy` and fixed-size, and [`Message::encode`] turns it into
/// words for a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Delegation, first half (parent's kernel to child's kernel): create `grant.child`,
    /// held by `holder`, below the proxy of `parent`.
    Delegate {
        /// The child's name (drawn by the sender with the receiver's id), object, rights
        /// and binding.
        grant: RemoteGrant,
        /// The parent's name (on the sender).
        parent: CapName,
        /// The principal that will hold the child (on the receiver).
        holder: Principal,
        /// The principal that delegated it (on the sender): the child is charged to its
        /// quota on the receiver where it is registered there (nk-caps, "Quotas").
        delegator: Principal,
    },
    /// Delegation, second half: the child was created, or why not.
    DelegateAck {
        /// The child's name.
        child: CapName,
        /// Whether the receiver created it.
        result: Result<(), ProtoError>,
    },
    /// Obtain, first half (child's kernel to parent's kernel): `presenter` asks for a child
    /// of `parent` with the rights in `mask`, to be named `child` (reserved on the sender).
    Obtain {
        /// The reserved child's name (on the sender).
        child: CapName,
        /// The capability to derive from (on the receiver).
        parent: CapName,
        /// The principal presenting `parent`'s name (it must be allowed to use it).
        presenter: Principal,
        /// The rights to keep.
        mask: Rights,
        /// The child's binding; `None` keeps the parent's (as a local derive does).
        binding: Option<Binding>,
    },
    /// Obtain, second half: the grant (the child's proxy now hangs below the parent), or
    /// why not.
    ObtainAck {
        /// The reserved child's name.
        child: CapName,
        /// The object, rights and binding granted.
        result: Result<RemoteGrant, ProtoError>,
    },
    /// Revoke `target` and its subtree (sent by the kernel holding `target`'s parent, to
    /// `target`'s kernel only: no broadcast).
    Revoke {
        /// The capability to revoke.
        target: CapName,
    },
    /// The acknowledgement that travels back up the tree: `child` and its whole subtree are
    /// dead on every kernel, so its proxy can go. `killed` counts the capabilities that the
    /// revoke of `child` killed (for the initiator's result).
    Gone {
        /// The child whose subtree is gone.
        child: CapName,
        /// The capabilities its revocation killed.
        killed: u64,
    },
    /// Revoke every child of `parent` (a capability of the sender) that lives on the
    /// receiver, with their subtrees: the batched form of [`Message::Revoke`] that a
    /// revocation walk sends, one per parent and kernel rather than one per child.
    RevokeBelow {
        /// The sender's capability whose children on the receiver die.
        parent: CapName,
    },
    /// The batched acknowledgement of a [`Message::RevokeBelow`]: every child of `parent`
    /// on the sender that the batch covered is dead with its whole subtree on every
    /// kernel (those for which a [`Message::Revoke`] of their own arrived first report
    /// with a [`Message::Gone`] of their own). `killed` counts what the batch killed.
    GoneBelow {
        /// The receiver's capability whose children on the sender are gone.
        parent: CapName,
        /// The capabilities the batch killed.
        killed: u64,
    },
    /// An operation on a capability of the receiver, requested for a principal of the
    /// sender (requests are routed by the kernel id in the capability's name).
    Routed {
        /// The operation on the sender that waits for the answer.
        op: OpId,
        /// The principal presenting the name.
        presenter: Principal,
        /// What it asks for.
        request: Routed,
    },
    /// The answer to a [`Message::Routed`].
    RoutedDone {
        /// The operation on the receiver that waits for it.
        op: OpId,
        /// The result.
        result: Result<Outcome, ProtoError>,
    },
    /// VM `vm` crashed: revoke everything it holds on the receiver.
    Crash {
        /// The operation on the sender that waits for the answer.
        op: OpId,
        /// The VM.
        vm: VmId,
    },
    /// The answer to a [`Message::Crash`]: everything the VM held there is revoked.
    CrashDone {
        /// The operation on the receiver that waits for it.
        op: OpId,
        /// The capabilities that died there.
        killed: u64,
    },
}

/// Names an operation routed to the kernel that owns its capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    /// Revoke `target`, which the presenter may use (a bearer capability).
    Revoke {
        /// The capability to revoke.
        target: CapName,
    },
    /// Delegate a child of `parent` to `target` on kernel `kernel`.
    Delegate {
        /// The capability to delegate from.
        parent: CapName,
        /// The principal that will hold the child.
        target: Principal,
        /// The kernel `target` lives on.
        kernel: KernelId,
        /// The rights to keep.
        mask: Rights,
        /// The child's binding.
        binding: Binding,
    },
}

/// Takes the messages a kernel sends. The hypervisor's implementation writes them to the
/// per-pair rings and rings the doorbell; the simulator queues them. A send cannot fail:
/// an implementation whose ring is full keeps the message until there is room, in order
/// (the protocol assumes FIFO, loss-free channels per pair, as Barrelfish's does, thesis
/// §4.1).
pub trait Outbox {
    /// Sends `message` to kernel `to`.
    fn send(&mut self, to: KernelId, message: Message);
}

impl Outbox for Vec<(KernelId, Message)> {
    fn send(&mut self, to: KernelId, message: Message) {
        self.push((to, message));
    }
}
