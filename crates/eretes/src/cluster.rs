//! An in-process cluster on one store, shared by the demo and the benchmarks.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec};
use eretes_runtime::balancer::{Balancer, DumbBalancer, FairBalancer};
use eretes_runtime::observer::Observer;
use eretes_runtime::{Handler, HandlerOutcome, Node, NodeConfig, NodeHandle, TaskContext};
use eretes_store::Store;

/// What the cluster's handlers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Run until cancelled, reporting start and stop to the observer.
    Observed,
    /// Complete at once with no result (throughput benchmarks).
    Noop,
    /// Run until cancelled, recording nothing (memory benchmark).
    Idle,
}

/// Runs until cancelled, reporting start and stop to the observer.
struct ObservedHandler {
    observer: Arc<Observer>,
}

#[async_trait::async_trait]
impl Handler for ObservedHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        let _run = self
            .observer
            .start(ctx.id.as_str(), ctx.node.as_str(), ctx.epoch);
        ctx.cancel.cancelled().await;
        HandlerOutcome::Release
    }
}

/// Completes at once.
struct NoopHandler;

#[async_trait::async_trait]
impl Handler for NoopHandler {
    async fn run(&self, _ctx: TaskContext) -> HandlerOutcome {
        HandlerOutcome::Done(serde_json::Value::Null)
    }
}

/// Runs until cancelled and records nothing: the smallest running task, so
/// the memory benchmark measures the runtime's cost rather than a handler's.
struct IdleHandler;

#[async_trait::async_trait]
impl Handler for IdleHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        ctx.cancel.cancelled().await;
        HandlerOutcome::Release
    }
}

/// Nodes on one store, all running the handler of one [`Work`] with the fair balancer.
pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub ns: Namespace,
    pub coordinator: Coordinator,
    pub observer: Arc<Observer>,
    pub nodes: HashMap<String, NodeHandle>,
    handler: Arc<dyn Handler>,
    lease_ttl: Duration,
    /// Nodes started from now on rebalance (fair) or keep what they claim (dumb).
    pub rebalance: bool,
}

/// The runtime every in-process node's lease keepalive runs on: one thread
/// of its own for the process. The nodes stand for machines that each have
/// their own CPU; sharing one process's workers, a hundred nodes' listings
/// and claims would hold their renewals back past the fence deadline, and
/// the fences (each one freeing a node's tasks for takeovers) would measure
/// the simulation rather than the protocol.
fn keepalive_runtime() -> Result<tokio::runtime::Handle> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    thread_runtime(&RUNTIME, "eretes-keepalive")
}

/// The runtime in `slot`, started on first use: one worker thread named
/// `name`, for work that must not wait behind the process's other tasks.
pub(crate) fn thread_runtime(
    slot: &'static OnceLock<tokio::runtime::Runtime>,
    name: &str,
) -> Result<tokio::runtime::Handle> {
    if let Some(runtime) = slot.get() {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("starting the {name} thread"))?;
    // Two callers at once may both build one; the loser's is dropped off the
    // async context, on a thread of its own.
    if let Err(spare) = slot.set(runtime) {
        std::thread::spawn(move || drop(spare));
    }
    Ok(slot.get().expect("set above").handle().clone())
}

/// How many tasks a cluster node claims at once, at most.
pub const CLAIMS_IN_FLIGHT: usize = 64;

/// The configuration of the demo's and the benchmarks' nodes (and of the
/// multi-process tests' witness nodes): the runtime's defaults, except that
/// they react quickly, balancing soon after membership changes and keeping
/// released tasks away from their old node only briefly.
pub fn quick_node_config(name: NodeName, ns: Namespace, lease_ttl: Duration) -> NodeConfig {
    let mut config = NodeConfig::new(name, ns).with_lease_ttl(lease_ttl);
    config.balance_interval = Duration::from_secs(5);
    config.membership_balance_delay = Duration::from_millis(300);
    config.release_ignore = Duration::from_secs(3);
    config.max_claims_in_flight = CLAIMS_IN_FLIGHT;
    config
}

impl Cluster {
    /// An empty cluster in namespace `ns` whose nodes use `lease_ttl`.
    pub fn new(store: Arc<dyn Store>, ns: &str, work: Work, lease_ttl: Duration) -> Result<Self> {
        let ns = Namespace::new(ns)?;
        let observer = Observer::new();
        Ok(Cluster {
            coordinator: Coordinator::new(store.clone(), ns.clone()),
            handler: match work {
                Work::Observed => Arc::new(ObservedHandler {
                    observer: observer.clone(),
                }),
                Work::Noop => Arc::new(NoopHandler),
                Work::Idle => Arc::new(IdleHandler),
            },
            store,
            ns,
            observer,
            nodes: HashMap::new(),
            lease_ttl,
            rebalance: true,
        })
    }

    /// Start node `name`.
    pub async fn add_node(&mut self, name: &str) -> Result<()> {
        self.add_node_with(name, |_| {}).await
    }

    /// Start node `name`, its configuration changed by `configure` first.
    pub async fn add_node_with(
        &mut self,
        name: &str,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        let mut config = quick_node_config(NodeName::new(name)?, self.ns.clone(), self.lease_ttl);
        config.keepalive_runtime = Some(keepalive_runtime()?);
        configure(&mut config);
        let balancer: Box<dyn Balancer> = if self.rebalance {
            Box::new(FairBalancer::default())
        } else {
            Box::new(DumbBalancer::new())
        };
        let node = Node::start(self.store.clone(), config, self.handler.clone(), balancer)
            .await
            .with_context(|| format!("starting node {name}"))?;
        self.nodes.insert(name.to_string(), node);
        Ok(())
    }

    /// Submit `count` tasks named `<prefix>-<n>`, a few submitters at a time.
    pub async fn submit(&self, prefix: &str, count: usize) -> Result<()> {
        const SUBMITTERS: usize = 8;
        let mut submitters = tokio::task::JoinSet::new();
        for submitter in 0..SUBMITTERS {
            let coordinator = self.coordinator.clone();
            let prefix = prefix.to_string();
            submitters.spawn(async move {
                let spec = TaskSpec::new(GroupName::default(), serde_json::Value::Null);
                for n in (submitter..count).step_by(SUBMITTERS) {
                    let id = TaskId::new(format!("{prefix}-{n:07}"))?;
                    coordinator.submit(&id, &spec).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(result) = submitters.join_next().await {
            result??;
        }
        Ok(())
    }

    /// Stop every node gracefully.
    pub async fn shutdown(self) {
        for (_, node) in self.nodes {
            if !node.is_stopped() {
                node.shutdown().await;
            }
        }
    }
}
