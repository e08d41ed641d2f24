//! What starting an operation returns and what a finished one reports.

use nk_caps::CapName;

use crate::error::ProtoError;

/// Identifies an operation that waits for other kernels, on the kernel that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(u64);

impl OpId {
    /// Wraps a raw operation number (as carried in a message).
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// Returns the raw operation number.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// Carries what a successful operation produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new capability's name (derive, delegate).
    Name(CapName),
    /// How many capabilities died (revoke, delete, crash), counted once across all kernels
    /// and all concurrent revocations.
    Count(u64),
}

impl Outcome {
    /// Returns the name, if the outcome is one.
    pub fn name(self) -> Option<CapName> {
        match self {
            Outcome::Name(name) => Some(name),
            Outcome::Count(_) => None,
        }
    }

    /// Returns the count, if the outcome is one.
    pub fn count(self) -> Option<u64> {
        match self {
            Outcome::Count(count) => Some(count),
            Outcome::Name(_) => None,
        }
    }
}

/// Tells what starting an operation did: finished it at once, or left it waiting for
/// other kernels (its [`Completion`] comes from [`Kernel::poll`](crate::Kernel::poll)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// The operation finished on this kernel alone.
    Done(Result<Outcome, ProtoError>),
    /// The operation waits for messages; its completion will carry this id.
    Pending(OpId),
}

impl Started {
    /// Returns the id of a pending operation.
    pub fn pending(self) -> Option<OpId> {
        match self {
            Started::Pending(op) => Some(op),
            Started::Done(_) => None,
        }
    }

    /// Returns the result of an operation that finished at once.
    pub fn done(self) -> Option<Result<Outcome, ProtoError>> {
        match self {
            Started::Done(result) => Some(result),
            Started::Pending(_) => None,
        }
    }
}

/// Reports a finished operation that had to wait for other kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The id [`Started::Pending`] returned.
    pub op: OpId,
    /// The result.
    pub result: Result<Outcome, ProtoError>,
}
