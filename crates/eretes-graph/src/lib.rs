//! # eretes-graph — task graphs
//!
//! Layer 5 of eretes: taskgraph's model on eretes' coordination. A **job**
//! is N tasks (ids 0..N) wired by a [`Topology`] per link type; each task is
//! an ordinary eretes task (`<job>.<index>`), so it is claimed, balanced,
//! drained and fenced like any other, and runs under its claim's fencing
//! epoch. On top of that the framework gives each [`GraphTask`]:
//!
//! * **job epochs** ([`JobEpoch`]): any task moves the job on with a
//!   compare-and-swap (losing it is an ordinary answer); every task enters
//!   each epoch once, in order, and the old epoch's data requests end;
//! * **meta notifications**: [`TaskHandle::flag_meta`] writes a small value
//!   under the sender's claim; each (sender, link, epoch, meta) reaches each
//!   neighbour's run once, and a run that starts after a failover gets its
//!   neighbours' current meta once;
//! * **data requests**: [`TaskHandle::data_request`] reaches whichever node
//!   runs the target now, over gRPC with one pooled connection from each
//!   node to each peer it calls (requests to its own tasks skip the
//!   network), retried across failovers, answered once per run of the target,
//!   and never delivered into a later job epoch;
//! * **neighbour events**: a neighbour's run lost, and running again.
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use eretes_graph::{GraphNode, JobKind, JobName, JobSpec, regression::Regression};
//! use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName};
//! use eretes_runtime::{balancer::FairBalancer, Node, NodeConfig};
//! use eretes_store::{embedded::EmbeddedStore, Store};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store: Arc<dyn Store> = EmbeddedStore::new();
//! let ns = Namespace::new("graphs")?;
//! let coordinator = Coordinator::new(store.clone(), ns.clone());
//! let regression = Arc::new(Regression::new());
//! let kinds: HashMap<String, Arc<dyn JobKind>> =
//!     [("regression".to_string(), regression.clone() as Arc<dyn JobKind>)].into();
//! let name = NodeName::new("n1")?;
//! let graph = GraphNode::start(coordinator, name.clone(), kinds, "127.0.0.1:0".parse()?).await?;
//! let mut config = NodeConfig::new(name, ns);
//! config.groups = vec![GroupName::new("graph")?];
//! let node = Node::start(store, config, graph.handler(), Box::new(FairBalancer::default())).await?;
//! graph.publish_address(node.status());
//! let spec = JobSpec { kind: "regression".into(), tasks: 15, group: GroupName::new("graph")?, properties: Regression::properties(10), backups: 0 };
//! graph.jobs().start(&JobName::new("r1")?, &spec).await?;
//! # Ok(()) }
//! ```

mod backup;
mod dispatch;
pub mod driver;
pub mod frames;
mod handle;
mod ids;
mod incoming;
mod jobs;
mod model;
mod node;
pub mod regression;
mod rpc;
mod view;

/// The generated gRPC types of `proto/graph.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("eretes.graph");
}

pub use backup::{BackupBalancer, TAKEOVER_GRACE, UPDATE_PATIENCE};
pub use handle::TaskHandle;
pub use ids::{graph_task_id, parse_graph_task_id, GraphKey, GraphKeys, JobEpoch, JobName};
pub use jobs::{EpochMove, JobList, JobStatus, JobSummary, Jobs, TaskStatus};
pub use model::{
    BackupRecord, EpochRecord, GraphTask, JobKind, JobSpec, MetaRecord, Topology, MAX_BACKUPS,
    MAX_JOB_TASKS, MAX_META_BYTES,
};
pub use node::{GraphNode, GraphStats, RunStart, RUN_STARTS_KEPT};

/// What can go wrong in the graph layer.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Bad input, named.
    #[error("{0}")]
    Invalid(String),
    /// A job of that name exists.
    #[error("job {0} exists")]
    JobExists(String),
    /// No job of that name.
    #[error("no job {0}")]
    NoSuchJob(String),
    /// The run no longer owns its task (a later claim took it over).
    #[error("the run of {0} was fenced: another run owns the task now")]
    Fenced(String),
    /// A record in the store does not decode.
    #[error("{0}")]
    Malformed(String),
    /// The job epoch a data request belonged to ended before its answer.
    #[error("{requested} ended (the job is in {now})")]
    EpochEnded {
        /// The request's job epoch.
        requested: JobEpoch,
        /// The job's epoch now.
        now: JobEpoch,
    },
    /// The job shut down.
    #[error("job {0} has shut down")]
    JobEnded(String),
    /// The run the call was made from ended (its task was released, fenced
    /// or drained), before the job epoch did.
    #[error("the run of {0} has ended")]
    RunEnded(String),
    /// The target task's `serve_data` refused the request.
    #[error("the data request was refused: {0}")]
    DataFailed(String),
    /// A network or server failure.
    #[error("{0}")]
    Transport(String),
    /// From the store.
    #[error(transparent)]
    Store(#[from] eretes_store::StoreError),
    /// From the protocol.
    #[error(transparent)]
    Protocol(#[from] eretes_protocol::ProtocolError),
}
