//! The regression driver: runs [`crate::regression`] as a job on in-process
//! nodes of one store, kills nodes while it runs (restarting replacements
//! under new names), and counts what happened. `eretes graph regression`
//! and the tests use it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle};
use eretes_store::{KeyRange, Store};
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::ids::{graph_task_id, JobName};
use crate::jobs::Jobs;
use crate::model::{JobKind, JobSpec};
use crate::node::{GraphNode, RunStart};
use crate::regression::{Findings, Regression};
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
    /// At each new job epoch the driver sees (it watches the epoch), each
    /// task's node is killed with this probability.
    pub kill_rate: f64,
    /// Kill a random node this often.
    pub kill_every: Option<Duration>,
    /// Kill the node running the root once, when the job reaches this epoch.
    pub kill_at_epoch: Option<u64>,
    /// The nodes' lease TTL (a killed node's tasks move after it).
    pub lease_ttl: Duration,
    /// Hot standbys per task (0 = none: a lost task restarts cold).
    pub backups: u32,
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
            backups: 0,
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
    /// Tasks that ended (all of them, unless the run timed out).
    pub tasks_ended: u32,
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
    /// Hot standbys per task.
    pub backups: u32,
    /// Tasks of killed nodes that a backup took over (`became_primary`).
    pub primary_takeovers: u64,
    /// Median time from a node's kill until a backup of one of its tasks
    /// ran as the primary (none without takeovers).
    pub primary_takeover_ms: Option<u64>,
    /// Tasks of killed nodes that started again cold (`init`).
    pub cold_restarts: u64,
    /// Of `cold_restarts`, those of tasks that had a backup of their
    /// current run on a node that outlived the kill, when their node was
    /// killed: each is a takeover that should have happened. (A task that
    /// had none, say one that had just moved, or whose kill stopped waiting
    /// for its backups, restarts cold by design.)
    pub cold_restarts_of_backed_tasks: u64,
    /// Tasks of killed nodes that had no such backup when their node was
    /// killed (with backups asked for; 0 without).
    pub tasks_unbacked_at_kill: u64,
    /// Median time from a node's kill until one of its tasks ran again
    /// after a cold start (none without cold restarts).
    pub cold_restart_ms: Option<u64>,
    /// From the start of the job until every task ended.
    pub elapsed_ms: u64,
}

impl RegressionReport {
    /// Whether every epoch was verified and no sum was wrong.
    pub fn passed(&self) -> bool {
        self.wrong_sums == 0
            && self.epochs_verified == self.epochs
            && self.meta_duplicates == 0
            && self.tasks_ended == self.tasks
    }
}

/// Framework counters of a graph node, summable over nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphCounters {
    /// `meta_ready` calls.
    pub meta_delivered: u64,
    /// Data requests made.
    pub data_requests: u64,
    /// Attempts retried.
    pub data_retries: u64,
    /// Answers dropped because their epoch had ended.
    pub stale_answers_dropped: u64,
    /// Connections opened to other nodes.
    pub connections: u64,
}

impl GraphCounters {
    /// The counters of `graph` now.
    pub fn of(graph: &GraphNode) -> GraphCounters {
        let stats = graph.stats();
        GraphCounters {
            meta_delivered: stats.meta_delivered.load(Ordering::Relaxed),
            data_requests: stats.data_requests.load(Ordering::Relaxed),
            data_retries: stats.data_retries.load(Ordering::Relaxed),
            stale_answers_dropped: stats.stale_answers_dropped.load(Ordering::Relaxed),
            connections: stats.connections.load(Ordering::Relaxed),
        }
    }

    /// The sum of `self` and `other`.
    pub fn plus(self, other: GraphCounters) -> GraphCounters {
        GraphCounters {
            meta_delivered: self.meta_delivered + other.meta_delivered,
            data_requests: self.data_requests + other.data_requests,
            data_retries: self.data_retries + other.data_retries,
            stale_answers_dropped: self.stale_answers_dropped + other.stale_answers_dropped,
            connections: self.connections + other.connections,
        }
    }
}

/// What one node reports to the driver: its counters and run starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its counters.
    #[serde(flatten)]
    pub counters: GraphCounters,
    /// Its runs' starts.
    #[serde(default)]
    pub run_starts: Vec<RunStart>,
}

impl NodeReport {
    /// The report of `graph` now.
    pub fn of(graph: &GraphNode) -> NodeReport {
        NodeReport {
            counters: GraphCounters::of(graph),
            run_starts: graph.run_starts(),
        }
    }
}

/// The nodes a regression runs on: in this process ([`InProcess`]) or as
/// processes of their own (the `eretes` binary's `--processes`).
#[async_trait]
pub trait Fleet: Send {
    /// Start one more node serving group `graph` of the run's namespace,
    /// with the regression kind registered; its name.
    async fn start_node(&mut self) -> Result<NodeName, GraphError>;
    /// Kill node `name` as if its process died (nothing released).
    async fn kill(&mut self, name: &NodeName) -> Result<(), GraphError>;
    /// The nodes alive now.
    fn live(&self) -> Vec<NodeName>;
    /// Framework counters summed over every node that ran, as far as known.
    fn counters(&self) -> GraphCounters;
    /// The run starts of every node that ran, as far as known.
    fn run_starts(&self) -> Vec<RunStart>;
    /// Stop the nodes still running (they drain).
    async fn stop(&mut self);
}

/// Nodes running in this process, each a node runtime and a graph node.
pub struct InProcess {
    store: Arc<dyn Store>,
    ns: Namespace,
    lease_ttl: Duration,
    regression: Arc<Regression>,
    kinds: HashMap<String, Arc<dyn JobKind>>,
    live: Vec<(NodeName, NodeHandle, GraphNode)>,
    graphs: Vec<GraphNode>,
    started: usize,
}

impl InProcess {
    /// No nodes yet, on `store` in namespace `ns`.
    pub fn new(store: Arc<dyn Store>, ns: Namespace, lease_ttl: Duration) -> InProcess {
        let regression = Arc::new(Regression::new());
        let kinds = regression_kinds(regression.clone());
        InProcess {
            regression,
            ..InProcess::with_kinds(store, ns, lease_ttl, kinds)
        }
    }

    /// No nodes yet; the nodes it starts run jobs of `kinds`.
    pub fn with_kinds(
        store: Arc<dyn Store>,
        ns: Namespace,
        lease_ttl: Duration,
        kinds: HashMap<String, Arc<dyn JobKind>>,
    ) -> InProcess {
        InProcess {
            store,
            ns,
            lease_ttl,
            regression: Arc::new(Regression::new()),
            kinds,
            live: Vec::new(),
            graphs: Vec::new(),
            started: 0,
        }
    }
}

/// The configuration of a regression node: group `graph`, no takeover
/// limit (the run kills nodes on purpose, many times over: a task taken
/// over that often is no poison task to park).
pub fn regression_node_config(
    name: NodeName,
    ns: Namespace,
    lease_ttl: Duration,
) -> Result<NodeConfig, GraphError> {
    let mut config = NodeConfig::new(name, ns).with_lease_ttl(lease_ttl);
    config.groups = vec![GroupName::new("graph")?];
    config.takeover_limit = u32::MAX;
    Ok(config)
}

/// The job kinds a regression node knows.
pub fn regression_kinds(regression: Arc<Regression>) -> HashMap<String, Arc<dyn JobKind>> {
    [("regression".to_string(), regression as Arc<dyn JobKind>)].into()
}

#[async_trait]
impl Fleet for InProcess {
    async fn start_node(&mut self) -> Result<NodeName, GraphError> {
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
        let config = regression_node_config(name.clone(), self.ns.clone(), self.lease_ttl)?;
        let node = Node::start(
            self.store.clone(),
            config,
            graph.handler(),
            graph.balancer(Box::new(FairBalancer::default())),
        )
        .await
        .map_err(|error| GraphError::Transport(format!("starting node {name}: {error}")))?;
        graph.publish_address(node.status());
        self.graphs.push(graph.clone());
        self.live.push((name.clone(), node, graph));
        Ok(name)
    }

    async fn kill(&mut self, name: &NodeName) -> Result<(), GraphError> {
        if let Some(at) = self.live.iter().position(|(n, _, _)| n == name) {
            let (_, node, graph) = self.live.remove(at);
            node.kill();
            graph.stop();
        }
        Ok(())
    }

    fn live(&self) -> Vec<NodeName> {
        self.live.iter().map(|(name, _, _)| name.clone()).collect()
    }

    fn counters(&self) -> GraphCounters {
        self.graphs
            .iter()
            .map(GraphCounters::of)
            .fold(GraphCounters::default(), GraphCounters::plus)
    }

    fn run_starts(&self) -> Vec<RunStart> {
        self.graphs.iter().flat_map(GraphNode::run_starts).collect()
    }

    async fn stop(&mut self) {
        for (_, node, graph) in self.live.drain(..) {
            node.shutdown().await;
            graph.stop();
        }
    }
}

/// Run the regression on in-process nodes of `store`, in namespace `ns`
/// (which should be empty).
pub async fn run_regression(
    store: Arc<dyn Store>,
    ns: Namespace,
    options: RegressionOptions,
) -> Result<RegressionReport, GraphError> {
    let mut fleet = InProcess::new(store.clone(), ns.clone(), options.lease_ttl);
    let in_process = fleet.regression.stats.clone();
    let mut report = run_regression_on(&mut fleet, store, ns, options).await?;
    // Here the runs that were killed counted too.
    report.meta_duplicates = report
        .meta_duplicates
        .max(in_process.meta_duplicates.load(Ordering::Relaxed));
    Ok(report)
}

/// Run the regression on `fleet`'s nodes: start the job, kill nodes as the
/// options say (starting a replacement for each), wait until every task
/// ended, and count. What the tasks found comes from their results in the
/// store (the root's checkpointed verifications), so it holds for node
/// processes too.
pub async fn run_regression_on(
    fleet: &mut dyn Fleet,
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
    for _ in 0..options.nodes {
        fleet.start_node().await?;
    }
    let outcome = drive_job(fleet, store, ns, &options).await;
    fleet.stop().await;
    outcome
}

async fn drive_job(
    fleet: &mut dyn Fleet,
    store: Arc<dyn Store>,
    ns: Namespace,
    options: &RegressionOptions,
) -> Result<RegressionReport, GraphError> {
    let coordinator = Coordinator::new(store, ns);
    let jobs = Jobs::new(coordinator.clone());
    let job = JobName::new("regression")?;
    let spec = JobSpec {
        kind: "regression".into(),
        tasks: options.tasks,
        group: GroupName::new("graph")?,
        properties: Regression::properties(options.epochs),
        backups: options.backups,
    };
    let started = Instant::now();
    let mut epoch_moves = coordinator
        .store()
        .watch(KeyRange::key(jobs.keys().epoch(&job)), 0)
        .await?;
    let mut watching = true;
    jobs.start(&job, &spec).await?;
    let mut kills = 0;
    let mut seen_epoch = 0;
    let mut killed_at_epoch = false;
    // When the kill at an epoch became due, if it waits for backups.
    let mut kill_due: Option<Instant> = None;
    let mut next_kill = options.kill_every.map(|every| Instant::now() + every);
    let mut results = Vec::new();
    // When each node was killed, and the tasks it owned then, each with
    // whether it had a backup on another live node.
    let mut kill_log: Vec<KilledNode> = Vec::new();
    loop {
        if started.elapsed() > options.timeout {
            let mut waiting = Vec::new();
            for index in 0..options.tasks {
                if coordinator
                    .result(&graph_task_id(&job, index))
                    .await?
                    .is_none()
                {
                    let view = coordinator.task_view(&graph_task_id(&job, index)).await?;
                    waiting.push((index, view.map(|v| (v.state, v.node))));
                }
            }
            tracing::warn!(live = ?fleet.live(), ?waiting, "the regression timed out");
            break;
        }
        // Woken by every move of the job's epoch (so that a kill at an
        // epoch lands while it runs, however fast epochs go), or every 20 ms.
        tokio::select! {
            moved = epoch_moves.next(), if watching => {
                // A broken watch leaves the 20 ms polls.
                watching = matches!(moved, Some(Ok(_)));
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let record = jobs.epoch(&job).await?;
        if record.is_some_and(|record| record.shutdown) {
            results = jobs.results(&job).await?;
            if results.len() == options.tasks as usize {
                break;
            }
        }
        let mut victims: Vec<NodeName> = Vec::new();
        let epoch = record.map_or(0, |record| record.epoch.0);
        if epoch > seen_epoch {
            seen_epoch = epoch;
            // The driver may see the job only after it moved past the epoch.
            if options.kill_at_epoch.is_some_and(|at| epoch >= at) && kill_due.is_none() {
                kill_due = Some(Instant::now());
            }
            if options.kill_rate > 0.0 {
                for index in 0..options.tasks {
                    if rand::thread_rng().gen_bool(options.kill_rate) {
                        victims.extend(owner_of(&coordinator, &job, index).await?);
                    }
                }
            }
        }
        if let Some(due) = kill_due.filter(|_| !killed_at_epoch) {
            // With backups, the kill at an epoch waits (a bounded while)
            // until every task of the root's node has a backup on another
            // live node: what it measures is a takeover by backups, and a
            // task that just moved has none until its new primary brings
            // one up. It never waits past the job's last epochs: the job
            // goes on meanwhile, and a kill after its end measures nothing.
            if let Some(victim) = owner_of(&coordinator, &job, 0).await? {
                let ready = options.backups == 0
                    || due.elapsed() > BACKUP_WAIT
                    || seen_epoch + LAST_EPOCHS >= options.epochs
                    || backed_up(&jobs, &job, &victim, &fleet.live()).await?;
                if ready {
                    killed_at_epoch = true;
                    victims.push(victim);
                }
            }
        }
        if let (Some(at), Some(every)) = (next_kill, options.kill_every) {
            if Instant::now() >= at {
                let live = fleet.live();
                victims.push(live[rand::thread_rng().gen_range(0..live.len())].clone());
                next_kill = Some(Instant::now() + every);
            }
        }
        victims.sort();
        victims.dedup();
        // A backup on a node killed in the same turn takes nothing over.
        let survivors: Vec<NodeName> = fleet
            .live()
            .into_iter()
            .filter(|node| !victims.contains(node))
            .collect();
        for victim in victims {
            if fleet.live().contains(&victim) {
                kill_log.push(KilledNode {
                    at_ms: eretes_protocol::now_ms(),
                    tasks: tasks_of(&jobs, &job, &victim, &survivors).await?,
                });
                fleet.kill(&victim).await?;
                kills += 1;
                fleet.start_node().await?;
            }
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if results.len() < options.tasks as usize {
        // Timed out: count what did end (the root's findings, if it did).
        results = jobs.results(&job).await?;
    }
    let findings_of = |result: &eretes_protocol::ResultRecord| -> Findings {
        serde_json::from_value(result.result.clone()).unwrap_or_default()
    };
    let findings: Vec<Findings> = results.iter().map(findings_of).collect();
    // A result record keeps its task's spec, whose properties name its index.
    let root = results
        .iter()
        .find(|result| result.spec.properties.value()["graph"]["index"] == 0)
        .map(findings_of)
        .unwrap_or_default();
    let counters = fleet.counters();
    let restarts = restarts_after_kills(&kill_log, &fleet.run_starts());
    let median_of = |promoted: bool| {
        let mut times: Vec<u64> = restarts
            .iter()
            .filter(|restart| restart.promoted == promoted)
            .map(|restart| restart.after_ms)
            .collect();
        times.sort_unstable();
        (times.len() as u64, times.get(times.len() / 2).copied())
    };
    let (primary_takeovers, primary_takeover_ms) = median_of(true);
    let (cold_restarts, cold_restart_ms) = median_of(false);
    Ok(RegressionReport {
        tasks: options.tasks,
        epochs: options.epochs,
        nodes: options.nodes,
        tasks_ended: results.len() as u32,
        kills,
        failovers: results.iter().map(|r| u64::from(r.runs.takeovers)).sum(),
        epochs_verified: root.verified.len() as u64,
        wrong_sums: root.wrong_sums,
        meta_delivered: counters.meta_delivered,
        meta_duplicates: findings.iter().map(|f| f.meta_duplicates).sum(),
        data_requests: counters.data_requests,
        data_retries: counters.data_retries,
        stale_answers_dropped: counters.stale_answers_dropped,
        connections: counters.connections,
        backups: options.backups,
        primary_takeovers,
        primary_takeover_ms,
        cold_restarts,
        cold_restarts_of_backed_tasks: restarts
            .iter()
            .filter(|restart| !restart.promoted && restart.backed)
            .count() as u64,
        tasks_unbacked_at_kill: if options.backups > 0 {
            kill_log
                .iter()
                .flat_map(|killed| &killed.tasks)
                .filter(|(_, backed)| !backed)
                .count() as u64
        } else {
            0
        },
        cold_restart_ms,
        elapsed_ms,
    })
}

/// A node the driver killed: when, and the tasks it owned then, each with
/// whether another live node held a backup of it.
struct KilledNode {
    at_ms: u64,
    tasks: Vec<(eretes_protocol::TaskId, bool)>,
}

/// A killed node's task running again.
struct Restart {
    /// From the kill to the next run's start.
    after_ms: u64,
    /// Whether a backup took over.
    promoted: bool,
    /// Whether another live node held a backup of it at the kill.
    backed: bool,
}

/// For each task of each killed node, its next run's start after the kill.
fn restarts_after_kills(kills: &[KilledNode], starts: &[RunStart]) -> Vec<Restart> {
    let mut restarts = Vec::new();
    for killed in kills {
        for (task, backed) in &killed.tasks {
            let next = starts
                .iter()
                .filter(|start| start.task == *task && start.at_ms >= killed.at_ms)
                .min_by_key(|start| start.at_ms);
            if let Some(start) = next {
                restarts.push(Restart {
                    after_ms: start.at_ms - killed.at_ms,
                    promoted: start.promoted,
                    backed: *backed,
                });
            }
        }
    }
    restarts
}

/// The longest a kill at an epoch waits for the victim's tasks' backups.
const BACKUP_WAIT: Duration = Duration::from_secs(10);

/// A kill at an epoch that waits for backups is made anyway once the job
/// has this few epochs left.
const LAST_EPOCHS: u64 = 5;

/// Whether every unfinished task of `job` that `victim` runs has a backup
/// on another node of `live`.
async fn backed_up(
    jobs: &Jobs,
    job: &JobName,
    victim: &NodeName,
    live: &[NodeName],
) -> Result<bool, GraphError> {
    let tasks = tasks_of(jobs, job, victim, live).await?;
    Ok(tasks.iter().all(|(_, backed)| *backed))
}

/// The unfinished tasks of `job` that `victim` runs now, each with whether
/// a node of `live` other than `victim` holds a backup of its run: one
/// consistent read, so that a task that just moved is judged by its new
/// run's backups.
async fn tasks_of(
    jobs: &Jobs,
    job: &JobName,
    victim: &NodeName,
    live: &[NodeName],
) -> Result<Vec<(eretes_protocol::TaskId, bool)>, GraphError> {
    let Some(status) = jobs.status(job).await? else {
        return Ok(Vec::new());
    };
    Ok(status
        .tasks
        .iter()
        .filter(|task| !task.ended && task.node.as_ref() == Some(victim))
        .map(|task| {
            (
                graph_task_id(job, task.index),
                has_live_backup(task, victim, live),
            )
        })
        .collect())
}

/// Whether a node of `live` other than `victim` holds a backup of `task`.
fn has_live_backup(task: &crate::jobs::TaskStatus, victim: &NodeName, live: &[NodeName]) -> bool {
    task.backups
        .iter()
        .any(|holder| holder != victim && live.contains(holder))
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

#[cfg(test)]
mod tests {
    use super::*;
    use eretes_protocol::TaskId;

    #[test]
    fn each_killed_task_counts_its_next_run_after_the_kill() {
        let id = |name: &str| TaskId::new(name).unwrap();
        let start = |task: &str, at_ms: u64, promoted: bool| RunStart {
            task: id(task),
            at_ms,
            promoted,
        };
        let kills = [KilledNode {
            at_ms: 1_000,
            tasks: vec![(id("j.0"), true), (id("j.1"), true), (id("j.2"), false)],
        }];
        let starts = [
            // Before the kill: not a restart.
            start("j.0", 500, false),
            start("j.0", 1_400, true),
            // Only the first run after the kill counts.
            start("j.1", 1_900, false),
            start("j.1", 2_500, true),
            start("j.2", 1_200, false),
        ];
        let restarts = restarts_after_kills(&kills, &starts);
        let seen: Vec<(u64, bool, bool)> = restarts
            .iter()
            .map(|r| (r.after_ms, r.promoted, r.backed))
            .collect();
        assert_eq!(
            seen,
            [(400, true, true), (900, false, true), (200, false, false)]
        );
    }
}
