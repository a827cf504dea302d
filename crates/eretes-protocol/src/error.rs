//! Errors of the coordination protocol.

use eretes_store::StoreError;

/// Everything a protocol call can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// An identifier failed validation.
    #[error("invalid {kind} {value:?}: {reason}")]
    InvalidId {
        /// "task id", "node name" or "group name".
        kind: &'static str,
        /// The offending value (truncated).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A task spec is malformed or too large.
    #[error("invalid task spec: {0}")]
    InvalidSpec(String),
    /// A batch of tasks to submit is empty, too large, or names an id twice.
    #[error("invalid batch of tasks: {0}")]
    InvalidBatch(String),
    /// A task with this id already exists (pending, running or retired with a result).
    #[error("task {0} already exists")]
    AlreadyExists(String),
    /// No task with this id.
    #[error("task {0} not found")]
    NotFound(String),
    /// The task has ended (done, failed or killed); it takes no more commands.
    #[error("task {0} has ended; it takes no more commands")]
    TaskEnded(String),
    /// A checkpoint over the size limit.
    #[error("checkpoint of {size} bytes is over the limit of {limit} bytes")]
    CheckpointTooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A record without a lease holds this node name (put by hand, say):
    /// no node is live under it, and none can register until it is gone.
    #[error("node name {name} is held by a record without a lease at {key:?}, which no node owns; delete that key or pick another --name")]
    NameHeldByGhost {
        /// The contested name.
        name: String,
        /// The key holding it.
        key: String,
    },
    /// Another live node already uses this name.
    #[error("node name {name} is already taken by a live node (lease {lease:#x}); pick another --name or wait for that node's lease to expire")]
    NameTaken {
        /// The contested name.
        name: String,
        /// The lease of the node holding it.
        lease: i64,
    },
    /// The caller is not (or no longer) the task's owner at this epoch: a newer
    /// claim exists, or the owner record is gone.
    #[error("task {task}: not the owner at epoch {epoch} (fenced)")]
    NotOwner {
        /// The task.
        task: String,
        /// The epoch the caller held.
        epoch: i64,
    },
    /// A command is malformed or unknown.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// A record read from the store could not be decoded.
    #[error(transparent)]
    Malformed(#[from] crate::records::MalformedValue),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
