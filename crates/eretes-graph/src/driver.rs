//! The regression driver: runs [`crate::regression`] as a job on in-process
//! nodes of one store, kills nodes while it runs (restarting replacements
//! under new names), and counts what happened. `eretes graph regression`
//! and the tests use it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::NodeStats;
use eretes_runtime::{Node, NodeConfig, NodeHandle};
use eretes_store::Store;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::ids::{graph_task_id, JobName};
use crate::model::{JobKind, JobSpec};
use crate::node::GraphNode;
use crate::regression::Regression;
use crate::GraphError;

/// How to run the regression.
#[derive(Debug, Clone)]
pub struct RegressionOptions {
    /// Tasks in the tree.
    pub tasks: u32,
    /// Job epochs to run (0..epochs).
    pub epochs: u64,
    /// Nodes running at a time.
    pub nodes: usize,
    /// At each new job epoch, each task's node is killed with this
    /// probability.
    pub kill_rate: f64,
    /// Kill a random node this often.
    pub kill_every: Option<Duration>,
    /// Kill the node running the root once, when the job reaches this epoch.
    pub kill_at_epoch: Option<u64>,
    /// The nodes' lease TTL (a killed node's tasks move after it).
    pub lease_ttl: Duration,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for RegressionOptions {
    fn default() -> Self {
        RegressionOptions {
            tasks: 15,
            epochs: 10,
            nodes: 4,
            kill_rate: 0.0,
            kill_every: None,
            kill_at_epoch: None,
            lease_ttl: Duration::from_secs(1),
            timeout: Duration::from_secs(300),
        }
    }
}

/// What a regression run did, counted.
#[derive(Debug, Clone, Serialize)]
pub struct RegressionReport {
    /// Tasks in the tree.
    pub tasks: u32,
    /// Job epochs asked for.
    pub epochs: u64,
    /// Nodes running at a time.
    pub nodes: usize,
    /// Nodes killed.
    pub kills: u64,
    /// Claims that took a task over from an owner that never released it.
    pub failovers: u64,
    /// Epochs whose root sum was checked and right.
    pub epochs_verified: u64,
    /// Root sums that were wrong.
    pub wrong_sums: u64,
    /// `meta_ready` calls.
    pub meta_delivered: u64,
    /// Meta a task got twice in one run.
    pub meta_duplicates: u64,
    /// Data requests made.
    pub data_requests: u64,
    /// Attempts retried (refused, or the node unreachable).
    pub data_retries: u64,
    /// Answers dropped because their epoch had ended.
    pub stale_answers_dropped: u64,
    /// Connections opened between nodes.
    pub connections: u64,
    /// From the start of the job until every task ended.
    pub elapsed_ms: u64,
}

impl RegressionReport {
    /// Whether every epoch was verified and no sum was wrong.
    pub fn passed(&self) -> bool {
        self.wrong_sums == 0 && self.epochs_verified == self.epochs && self.meta_duplicates == 0
    }
}

struct Member {
    node: NodeHandle,
    graph: GraphNode,
}

/// The nodes of a run, and the counters of every node that ever ran.
struct Fleet {
    store: Arc<dyn Store>,
    ns: Namespace,
    kinds: HashMap<String, Arc<dyn JobKind>>,
    options: RegressionOptions,
    live: Vec<(NodeName, Member)>,
    node_stats: Vec<Arc<NodeStats>>,
    graphs: Vec<GraphNode>,
    started: usize,
    kills: u64,
}

impl Fleet {
    async fn add(&mut self) -> Result<(), GraphError> {
        self.started += 1;
        let name = NodeName::new(format!("graph-{}", self.started))?;
        let coordinator = Coordinator::new(self.store.clone(), self.ns.clone());
        let graph = GraphNode::start(
            coordinator,
            name.clone(),
            self.kinds.clone(),
            "127.0.0.1:0".parse().expect("an address"),
        )
        .await?;
        let mut config =
            NodeConfig::new(name.clone(), self.ns.clone()).with_lease_ttl(self.options.lease_ttl);
        config.groups = vec![GroupName::new("graph")?];
        // The run kills nodes on purpose, many times over: a task taken over
        // that often is no poison task to park.
        config.takeover_limit = u32::MAX;
        let node = Node::start(
            self.store.clone(),
            config,
            graph.handler(),
            Box::new(FairBalancer::default()),
        )
        .await
        .map_err(|error| GraphError::Transport(format!("starting node {name}: {error}")))?;
        graph.publish_address(node.status());
        self.node_stats.push(node.stats().clone());
        self.graphs.push(graph.clone());
        self.live.push((name, Member { node, graph }));
        Ok(())
    }

    /// Kill node `name` as if its process died, and start a replacement.
    async fn kill(&mut self, name: &NodeName) -> Result<(), GraphError> {
        let Some(at) = self.live.iter().position(|(n, _)| n == name) else {
            return Ok(());
        };
        let (_, member) = self.live.remove(at);
        member.node.kill();
        member.graph.stop();
        self.kills += 1;
        self.add().await
    }
}

/// Run the regression on `store` in namespace `ns` (which should be empty).
pub async fn run_regression(
    store: Arc<dyn Store>,
    ns: Namespace,
    options: RegressionOptions,
) -> Result<RegressionReport, GraphError> {
    if options.tasks == 0 || options.epochs == 0 || options.nodes == 0 {
        return Err(GraphError::Invalid(
            "tasks, epochs and nodes must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&options.kill_rate) {
        return Err(GraphError::Invalid(
            "the kill rate is between 0 and 1".into(),
        ));
    }
    let regression = Arc::new(Regression::new(options.epochs));
    let mut fleet = Fleet {
        store: store.clone(),
        ns: ns.clone(),
        kinds: [(
            "regression".to_string(),
            regression.clone() as Arc<dyn JobKind>,
        )]
        .into(),
        options: options.clone(),
        live: Vec::new(),
        node_stats: Vec::new(),
        graphs: Vec::new(),
        started: 0,
        kills: 0,
    };
    for _ in 0..options.nodes {
        fleet.add().await?;
    }
    let coordinator = Coordinator::new(store, ns);
    let job = JobName::new("regression")?;
    let spec = JobSpec {
        kind: "regression".into(),
        tasks: options.tasks,
        group: GroupName::new("graph")?,
        properties: serde_json::Value::Null,
    };
    let started = Instant::now();
    fleet.graphs[0].jobs().start(&job, &spec).await?;
    let jobs = fleet.graphs[0].jobs().clone();
    let mut seen_epoch = 0;
    let mut killed_at_epoch = false;
    let mut next_kill = options.kill_every.map(|every| Instant::now() + every);
    loop {
        if started.elapsed() > options.timeout {
            for (name, member) in &fleet.live {
                tracing::warn!(node = %name, runs = ?member.graph.runs(), "the regression timed out");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let record = jobs.epoch(&job).await?;
        if record.is_some_and(|record| record.shutdown) {
            let mut ended = 0;
            for index in 0..options.tasks {
                if coordinator
                    .result(&graph_task_id(&job, index))
                    .await?
                    .is_some()
                {
                    ended += 1;
                }
            }
            if ended == options.tasks {
                break;
            }
        }
        let epoch = record.map_or(0, |record| record.epoch.0);
        if epoch > seen_epoch {
            seen_epoch = epoch;
            // The driver may see the job only after it moved past the epoch.
            if options.kill_at_epoch.is_some_and(|at| epoch >= at) && !killed_at_epoch {
                killed_at_epoch = true;
                if let Some(owner) = owner_of(&coordinator, &job, 0).await? {
                    fleet.kill(&owner).await?;
                }
            }
            if options.kill_rate > 0.0 {
                let mut victims = Vec::new();
                for index in 0..options.tasks {
                    if rand::thread_rng().gen_bool(options.kill_rate) {
                        if let Some(owner) = owner_of(&coordinator, &job, index).await? {
                            if !victims.contains(&owner) {
                                victims.push(owner);
                            }
                        }
                    }
                }
                for victim in victims {
                    fleet.kill(&victim).await?;
                }
            }
        }
        if let (Some(at), Some(every)) = (next_kill, options.kill_every) {
            if Instant::now() >= at {
                let victim = fleet.live[rand::thread_rng().gen_range(0..fleet.live.len())]
                    .0
                    .clone();
                fleet.kill(&victim).await?;
                next_kill = Some(Instant::now() + every);
            }
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let sum = |f: fn(&GraphNode) -> u64| fleet.graphs.iter().map(f).sum::<u64>();
    let report = RegressionReport {
        tasks: options.tasks,
        epochs: options.epochs,
        nodes: options.nodes,
        kills: fleet.kills,
        failovers: fleet
            .node_stats
            .iter()
            .map(|s| NodeStats::get(&s.takeovers))
            .sum(),
        epochs_verified: regression
            .stats
            .verified
            .lock()
            .expect("not poisoned")
            .len() as u64,
        wrong_sums: regression.stats.wrong_sums.load(Ordering::Relaxed),
        meta_delivered: sum(|g| g.stats().meta_delivered.load(Ordering::Relaxed)),
        meta_duplicates: regression.stats.meta_duplicates.load(Ordering::Relaxed),
        data_requests: sum(|g| g.stats().data_requests.load(Ordering::Relaxed)),
        data_retries: sum(|g| g.stats().data_retries.load(Ordering::Relaxed)),
        stale_answers_dropped: sum(|g| g.stats().stale_answers_dropped.load(Ordering::Relaxed)),
        connections: sum(|g| g.stats().connections.load(Ordering::Relaxed)),
        elapsed_ms,
    };
    for (_, member) in fleet.live.drain(..) {
        member.node.shutdown().await;
        member.graph.stop();
    }
    Ok(report)
}

async fn owner_of(
    coordinator: &Coordinator,
    job: &JobName,
    index: u32,
) -> Result<Option<NodeName>, GraphError> {
    Ok(coordinator
        .task_view(&graph_task_id(job, index))
        .await?
        .and_then(|view| view.node.filter(|_| !view.state.is_terminal())))
}
