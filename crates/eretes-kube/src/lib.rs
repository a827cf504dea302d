//! # eretes-kube — the Kubernetes Job executor
//!
//! Layer 4 of eretes beside `eretes-exec`: where a task's work runs when it
//! needs its own image, resources or nodes. [`KubeHandler`] is the
//! [`eretes_runtime::StatefulHandler`] that runs a task whose properties
//! hold a [`KubeSpec`] (`{"kubernetes": {"image": ..., ...}}`) as a
//! Kubernetes Job, inside the task state machine
//! ([`eretes_runtime::StateMachine`]), so ownership, fencing, retries,
//! commands and results are eretes' as for any task. `eretes agent
//! --kubernetes --allow-images REGISTRY/` runs it beside the process
//! executor.
//!
//! **One owner.** A Job's name is derived from the task id and the claim
//! epoch ([`names::job_name`]: a DNS-1123 label of at most 63 characters
//! whatever the id, with a hash), and it carries labels for the eretes
//! namespace, the task and the epoch. A run deletes every Job of its task
//! from an older epoch, pods first, and waits until they are gone before it
//! creates its own; so a dead or frozen agent's Job is cleaned by the next
//! owner, and at most one epoch's Job of a task runs at a time. A run that
//! is stopped or fenced deletes its Job.
//!
//! **Faults.** The API server's 409, 410, 429 and 5xx answers and broken
//! connections are tried again or resumed (watches re-list after a 410),
//! never a crash and never a second Job for an epoch. A Job deleted by
//! someone else fails its task with that reason.
//!
//! **Not here.** Jobs do not checkpoint: each run of a task starts from its
//! image.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use eretes_kube::{AllowImages, KubeConfig, KubeHandler, KubeSpec};
//! use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec};
//! use eretes_runtime::{balancer::FairBalancer, Node, NodeConfig, StateMachine};
//! use eretes_store::{embedded::EmbeddedStore, Store};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store: Arc<dyn Store> = EmbeddedStore::new();
//! let ns = Namespace::new("example").unwrap();
//! let config = KubeConfig {
//!     client: kube::Client::try_default().await.unwrap(),
//!     namespace: ns.clone(),
//!     default_namespace: "batch".into(),
//!     allow_images: AllowImages::new(["registry.example.com/jobs/"]).unwrap(),
//!     allow_namespaces: Vec::new(),
//!     allow_service_accounts: Vec::new(),
//!     stop_grace: Duration::from_secs(10),
//!     logs_dir: "/var/lib/eretes/logs".into(),
//!     log_cap: 64 << 20,
//!     tail_bytes: 4096,
//!     retry_backoff: (Duration::from_secs(1), Duration::from_secs(600)),
//! };
//! let coordinator = Coordinator::new(store.clone(), ns.clone());
//! let handler = Arc::new(StateMachine::new(KubeHandler::new(config), coordinator));
//! let node_config = NodeConfig::new(NodeName::new("n1").unwrap(), ns.clone());
//! let node = Node::start(store.clone(), node_config, handler, Box::new(FairBalancer::default()))
//!     .await
//!     .unwrap();
//! let mut spec = KubeSpec::new("registry.example.com/jobs/report:1.4");
//! spec.args = vec!["--month".into(), "2026-11".into()];
//! Coordinator::new(store, ns)
//!     .submit(&TaskId::new("report").unwrap(), &TaskSpec::new(GroupName::default(), spec.to_properties()))
//!     .await
//!     .unwrap();
//! # node.shutdown().await;
//! # });
//! ```

mod handler;
mod images;
mod job;
mod logs;
pub mod names;
mod objects;
mod reaper;
mod retry;
mod run;
mod spec;
#[cfg(feature = "testing")]
pub mod testing;

pub use handler::{KubeConfig, KubeHandler};
pub use images::{AllowImages, AllowImagesError};
pub use job::{build_job, JobIdentity, CONTAINER, FINISHED_JOB_TTL_SECONDS};
pub use reaper::{Reaper, REAP_INTERVAL};
pub use spec::{
    images, KubeSpec, SpecError, DEFAULT_ATTEMPTS, MAX_ATTEMPTS, MAX_DEADLINE_SECONDS,
    MAX_SPEC_BYTES, PROPERTIES_KEY,
};
