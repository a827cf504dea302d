//! # eretes-runtime — the node runtime
//!
//! Layer 3 of eretes: one [`Node`] per process (or several in one process for
//! tests and the demo). A node registers under its lease, lists and watches
//! its namespace, asks its [`balancer::Balancer`] before claiming, claims with
//! the protocol's transaction, runs [`Handler`]s, keeps its lease, fences
//! itself when it cannot, obeys node commands, rebalances and drains on
//! shutdown.
//!
//! ```
//! use std::sync::Arc;
//! use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec};
//! use eretes_runtime::{balancer::FairBalancer, Handler, HandlerOutcome, Node, NodeConfig, TaskContext};
//! use eretes_store::{embedded::EmbeddedStore, Store};
//!
//! struct Greet;
//!
//! #[async_trait::async_trait]
//! impl Handler for Greet {
//!     async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
//!         HandlerOutcome::Done(serde_json::json!(format!("hello from {} at epoch {}", ctx.node, ctx.epoch)))
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store: Arc<dyn Store> = EmbeddedStore::new();
//! let ns = Namespace::new("example").unwrap();
//! let config = NodeConfig::new(NodeName::new("n1").unwrap(), ns.clone());
//! let node = Node::start(store.clone(), config, Arc::new(Greet), Box::new(FairBalancer::default()))
//!     .await
//!     .unwrap();
//! let coordinator = Coordinator::new(store, ns);
//! let id = TaskId::new("t1").unwrap();
//! coordinator.submit(&id, &TaskSpec::new(GroupName::default(), serde_json::Value::Null)).await.unwrap();
//! let result = loop {
//!     if let Some(result) = coordinator.result(&id).await.unwrap() { break result; }
//!     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! };
//! assert!(result.result.as_str().unwrap().starts_with("hello from n1"));
//! node.shutdown().await;
//! # });
//! ```

pub mod admission;
pub mod balancer;
mod cache;
mod config;
mod handler;
mod lease;
mod node;
pub mod observer;
pub mod sparse;
pub mod statemachine;
mod stats;

pub use config::NodeConfig;
pub use handler::{
    boottime_ns, CommandSignals, CommandSubscription, Deadline, FenceDeadline, Handler,
    HandlerOutcome, TaskContext,
};
pub use node::{Node, NodeHandle, NodeStatus, StartError};
pub use statemachine::{
    Checkpointer, ErrorPolicy, StateContext, StateMachine, StatefulHandler, Step,
};
pub use stats::{NodeStats, NodeStatsSnapshot};
