//! # eretes-protocol — the coordination protocol
//!
//! Layer 2 of eretes: the key layout of a namespace and every coordination
//! operation, each a single transaction written once against the
//! [`eretes_store::Store`] interface, so the embedded store and etcd behave
//! identically.
//!
//! * **Submit** validates the id (1–128 of `[A-Za-z0-9._:-]`) and the spec
//!   (≤ 64 KiB) and never overwrites: an existing id is
//!   [`ProtocolError::AlreadyExists`].
//! * **Claim** is one transaction — the task exists as seen, has no owner, its
//!   run record is as seen — that writes the owner record under the node's
//!   lease. The claim's store revision is the task's **fencing epoch**.
//! * **Release**, **complete** and **fail** are transactions guarded by the
//!   epoch ([`Coordinator::fence`]): a stale owner cannot change anything.
//! * **Batches**: [`Coordinator::claim_batch`] and [`Coordinator::end_runs`]
//!   put up to 32 claims or 16 run ends into one transaction, and fall back to
//!   one transaction per task when any of them would fail, so each task gets
//!   exactly the answer its own transaction would have given.
//! * **Takeovers** (claims after an owner that never released) are counted per
//!   task; past the limit the task is parked as failed.
//! * **Node commands** are queued per node and each applied once.
//! * **Expiry** ([`Coordinator::ended_before`], [`Coordinator::delete_ended`]):
//!   ended tasks whose result is older than a retention are deleted, each
//!   only if its result is still the one read.
//! * **The task state machine** ([`machine`]): states, messages and the
//!   transition table; task commands queued per task and applied in order,
//!   each once, by the owner, in the fenced transaction that writes the
//!   state they lead to; checkpoints saved with a fenced write.
//!
//! ```
//! use std::sync::Arc;
//! use eretes_protocol::*;
//! use eretes_store::{embedded::EmbeddedStore, Store};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store: Arc<dyn Store> = EmbeddedStore::new();
//! let coordinator = Coordinator::new(store, Namespace::new("demo").unwrap());
//! let id = TaskId::new("resize-42").unwrap();
//! let spec = TaskSpec::new(GroupName::default(), serde_json::json!({"size": 42}));
//! coordinator.submit(&id, &spec).await.unwrap();
//! let again = coordinator.submit(&id, &spec).await.unwrap_err();
//! assert!(matches!(again, ProtocolError::AlreadyExists(_)));
//! # });
//! ```

mod commands;
mod coordinator;
mod error;
mod expiry;
mod ids;
mod keys;
mod listing;
pub mod machine;
mod records;
mod task_index;
mod task_state;
mod views;

pub use commands::NodeCommand;
pub use coordinator::{
    Claim, ClaimBasis, ClaimOutcome, Coordinator, RunEnd, TaskKeys, DEFAULT_TAKEOVER_LIMIT,
    MAX_CLAIM_BATCH, MAX_FINISH_BATCH, MAX_SUBMIT_BATCH,
};
pub use error::ProtocolError;
pub use expiry::{Expired, ExpiredPage, EXPIRY_PAGE};
pub use ids::{GroupName, NodeName, TaskId, MAX_ID_LEN};
pub use keys::{KeyKind, MalformedKey, Namespace};
pub use listing::NodeListing;
pub use machine::{MachineState, Message, StateRecord, TaskCommand};
pub use records::{
    decode, decode_node, decode_task, encode, encode_task, now_ms, MalformedValue, NodeRecord,
    Outcome, OwnerRecord, Properties, ResultRecord, RunRecord, TaskRecord, TaskSpec,
    MAX_RESULT_BYTES, MAX_SPEC_BYTES,
};
pub use task_index::{TaskIndex, TaskPosition, TaskQuery};
pub use task_state::{MachineLoad, QueuedCommand};
pub use views::{NodeView, Snapshot, TaskState, TaskView};
