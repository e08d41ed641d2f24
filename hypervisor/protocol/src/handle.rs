//! The receiving side: what a kernel does with each message (SemperOS slides,
//! "Distributed Capabilities – Revocation" and "– Delegation").

use nk_caps::{CapError, IncomingRevoke, KernelId, NodeState, RevocationHook};

use crate::error::ProtoError;
use crate::kernel::{Kernel, Op, OpState, Origin, Tally};
use crate::message::{Message, Outbox, Routed};
use crate::op::{Outcome, Started};

impl Kernel {
    /// Handles `message` from kernel `from`: runs this kernel's step of the protocol, tells
    /// `hook` of the capabilities that die here, sends what follows through `out`, and
    /// queues the completions of local operations that end (see [`Kernel::poll`]).
    ///
    /// Messages come from other kernels, which are trusted code (as Barrelfish's monitors
    /// are, thesis §4.1); still, one that does not fit this kernel's state (a repeated
    /// acknowledgement, an unknown operation) is ignored rather than trusted blindly.
    pub fn handle<H, O>(&mut self, from: KernelId, message: Message, hook: &mut H, out: &mut O)
    where
        H: RevocationHook + ?Sized,
        O: Outbox + ?Sized,
    {
        match message {
            Message::Delegate { grant, parent, holder, delegator } => {
                let result = self.table.accept_remote(grant, parent, holder, delegator).map_err(ProtoError::from);
                out.send(from, Message::DelegateAck { child: grant.child, result });
            }
            Message::DelegateAck { child, result } => {
                let op = self.delegations.remove(&child);
                let outcome = match result {
                    // The child is only handed out if its proxy is still unrevoked: a
                    // revocation of the parent that overtook the handshake has sent (or
                    // will send) it a revoke, and the child's name is never revealed.
                    Ok(()) => match self.table.node_state(child) {
                        Some(NodeState::Remote) => Ok(Outcome::Name(child)),
                        _ => Err(CapError::Revoked.into()),
                    },
                    Err(error) => {
                        // The child was never created: its proxy goes as if it were gone.
                        self.child_gone(child, 0, out);
                        Err(error)
                    }
                };
                if let Some(op) = op {
                    self.finish(op, outcome, out);
                }
            }
            Message::Obtain { child, parent, presenter, mask, binding } => {
                let result = if child.kernel() == from {
                    self.table.grant_remote(presenter, parent, child, mask, binding)
                } else {
                    Err(CapError::UnknownName)
                };
                out.send(from, Message::ObtainAck { child, result: result.map_err(ProtoError::from) });
            }
            Message::ObtainAck { child, result } => {
                let op = self.obtains.remove(&child);
                let outcome = match result {
                    Ok(grant) => match self.table.activate_pending(child, grant.object, grant.rights, grant.binding) {
                        Ok(()) => Ok(Outcome::Name(child)),
                        Err(error) => {
                            // The reservation was cancelled (its holder crashed, or a
                            // revocation through its parent's proxy took it): the parent's
                            // kernel linked a child that will never exist.
                            self.table.cancel_pending(child);
                            out.send(from, Message::Gone { child, killed: 0 });
                            Err(match error {
                                CapError::UnknownName => CapError::Revoked,
                                other => other,
                            }
                            .into())
                        }
                    },
                    Err(error) => {
                        self.table.cancel_pending(child);
                        Err(error)
                    }
                };
                if let Some(op) = op {
                    self.finish(op, outcome, out);
                }
            }
            Message::Revoke { target } => match self.table.revoke_incoming(target, hook, &mut self.events) {
                IncomingRevoke::Walked(walk) => {
                    // The root's finalization (now, or when its remote parts are gone)
                    // sends the Gone, with this count and what the sub-revokes add.
                    self.requests.insert(target, walk.killed as u64);
                    self.process_events(Some(Tally::Request(target)), out);
                }
                // The revocation under way sends the Gone when it ends; recorded, so a
                // batched revoke of its parent leaves it to that Gone.
                IncomingRevoke::InProgress => {
                    self.requests.entry(target).or_insert(0);
                }
                IncomingRevoke::Dead => out.send(from, Message::Gone { child: target, killed: 0 }),
            },
            Message::Gone { child, killed } => self.child_gone(child, killed, out),
            Message::RevokeBelow { parent } => self.revoke_below(from, parent, hook, out),
            Message::GoneBelow { parent, killed } => self.children_gone(from, parent, killed, out),
            Message::Routed { op, presenter, request } => {
                let origin = Origin::Remote(from, op);
                let started = match request {
                    Routed::Revoke { target } => self.start_revoke(origin, presenter, target, false, hook, out),
                    Routed::Delegate { parent, target, kernel, mask, binding } => {
                        self.start_delegate(origin, presenter, parent, target, kernel, mask, binding, out)
                    }
                };
                if let Started::Done(result) = started {
                    out.send(from, Message::RoutedDone { op, result });
                }
            }
            Message::RoutedDone { op, result } => {
                if matches!(self.ops.get(&op), Some(Op { state: OpState::Routed, .. })) {
                    self.finish(op, result, out);
                }
            }
            Message::Crash { op, vm } => {
                if let Started::Done(result) = self.start_crash(Origin::Remote(from, op), vm, &[], hook, out) {
                    let killed = result.ok().and_then(Outcome::count).unwrap_or(0);
                    out.send(from, Message::CrashDone { op, killed });
                }
            }
            Message::CrashDone { op, killed } => {
                if let Some(Op { state: OpState::Crash { kernels, killed: total, .. }, .. }) = self.ops.get_mut(&op) {
                    *kernels = kernels.saturating_sub(1);
                    *total += killed;
                    if self.crash_ready(op) {
                        self.complete(op, out);
                    }
                }
            }
        }
    }
}
