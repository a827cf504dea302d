//! The one error type every store backend reports.

use crate::types::{LeaseId, Revision};

/// Everything a store operation can fail with. Backends map their own errors
/// onto these variants so that the layers above never see backend details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is older than the store's compaction point; the
    /// caller must re-list and watch again from the new revision.
    #[error("revision {requested} has been compacted (compacted up to {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision the store still has history for.
        compact_revision: Revision,
    },
    /// The requested revision is in the future.
    #[error("revision {requested} is newer than the store's current revision {current}")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's revision.
        current: Revision,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:#x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The request itself is malformed (for example a transaction writing the
    /// same key twice, or an empty key).
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
    /// The store could not be reached or did not answer in time; the operation
    /// may or may not have been applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the credentials, or the user lacks a permission
    /// (etcd auth). Retrying does not help.
    #[error("store refused access: {0}")]
    Denied(String),
    /// The store has been closed.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;
