//! Why a protocol operation failed.

use nk_caps::CapError;

/// Says why an operation was refused or failed. A refused operation changes nothing; one
/// that failed after messages were exchanged left no live capability behind (the crate
/// docs, "Interference", say which cell of SemperOS's table ends how).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// The capability table of the kernel that ran the step refused it: an unknown or
    /// revoked name, a wrong holder, a quota or capacity exhausted, and so on. `Revoked`
    /// also reports a delegation or obtain whose parent's revocation overtook it.
    Cap(CapError),
    /// A kernel id outside the machine's kernels (as a target of a delegation).
    UnknownKernel,
}

impl From<CapError> for ProtoError {
    fn from(error: CapError) -> Self {
        ProtoError::Cap(error)
    }
}
