//! Benchmarks of task graphs (`eretes-graph`), on the embedded store with
//! real gRPC between in-process nodes:
//! - `graph-data`: data requests per second from a task on one node to a
//!   task on another, over the pooled connection and, in the same run, with
//!   a new connection per request;
//! - `graph-failover`: a task's node killed, until its peer's data request
//!   is answered by the task's next run: taken over by its backup (a job
//!   with one backup per task) and restarted cold from its checkpoint (no
//!   backups), in alternating rounds of one run;
//! - `graph-epochs`: milliseconds per job epoch of the regression at 15 and
//!   127 tasks (no kills).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use eretes_graph::driver::{run_regression, RegressionOptions};
use eretes_graph::{
    GraphKeys, GraphNode, GraphTask, JobEpoch, JobKind, JobName, JobSpec, TaskHandle, Topology,
};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{GetRequest, KeyRange, Store};
use serde_json::json;
use tokio::time::Instant;

use super::{wait_until, wait_until_async, BenchArgs};

/// Two tasks, each the other's peer.
struct Pair;

impl Topology for Pair {
    fn links(&self) -> Vec<String> {
        vec!["peer".into()]
    }
    fn neighbours(&self, _link: &str, task: u32, _epoch: JobEpoch) -> Vec<u32> {
        vec![1 - task.min(1)]
    }
}

/// Task 0 hands its handle to the benchmark; task 1 answers every request
/// with its input.
struct PingKind {
    handle: Arc<Mutex<Option<TaskHandle>>>,
}

struct PingTask {
    handle: Option<Arc<Mutex<Option<TaskHandle>>>>,
    /// What a failover must bring back: from the checkpoint (cold) or
    /// held by the backup.
    state: Mutex<Vec<u8>>,
}

impl JobKind for PingKind {
    fn topology(&self, _job: &JobSpec) -> Arc<dyn Topology> {
        Arc::new(Pair)
    }
    fn build(&self, _job: &JobSpec, index: u32) -> Arc<dyn GraphTask> {
        Arc::new(PingTask {
            handle: (index == 0).then(|| self.handle.clone()),
            state: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl GraphTask for PingTask {
    async fn init(&self, task: &TaskHandle, checkpoint: Option<Vec<u8>>) {
        if let Some(slot) = &self.handle {
            *slot.lock().expect("not poisoned") = Some(task.clone());
        }
        let state = match checkpoint {
            Some(saved) => saved,
            None => {
                let fresh = vec![7u8; STATE_BYTES];
                // A store failure leaves the next run to start afresh.
                let _ = task.checkpoint(&fresh).await;
                fresh
            }
        };
        *self.state.lock().expect("not poisoned") = state;
    }
    async fn backup_state(&self) -> Vec<u8> {
        self.state.lock().expect("not poisoned").clone()
    }
    async fn became_backup(&self, state: Vec<u8>) {
        *self.state.lock().expect("not poisoned") = state;
    }
    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Ok(input)
    }
}

/// The lease TTL of the data benchmark's nodes: a killed node's task moves
/// after it.
const FAILOVER_TTL: Duration = Duration::from_secs(1);

/// Start a node of group `graph` running one task at most.
async fn one_slot_node(
    store: &Arc<dyn Store>,
    ns: &Namespace,
    name: &str,
    kinds: HashMap<String, Arc<dyn JobKind>>,
) -> Result<(NodeHandle, GraphNode)> {
    let name = NodeName::new(name)?;
    let graph = GraphNode::start(
        Coordinator::new(store.clone(), ns.clone()),
        name.clone(),
        kinds,
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut config = NodeConfig::new(name, ns.clone()).with_lease_ttl(FAILOVER_TTL);
    config.groups = vec![GroupName::new("graph")?];
    config.slots = 1;
    let node = Node::start(
        store.clone(),
        config,
        graph.handler(),
        graph.balancer(Box::new(FairBalancer::default())),
    )
    .await?;
    graph.publish_address(node.status());
    Ok((node, graph))
}

/// The ping kind, whose task 0 leaves its handle in `slot`.
fn ping_kinds(slot: &Arc<Mutex<Option<TaskHandle>>>) -> HashMap<String, Arc<dyn JobKind>> {
    let kind = PingKind {
        handle: slot.clone(),
    };
    [("ping".to_string(), Arc::new(kind) as Arc<dyn JobKind>)].into()
}

/// A ping job of two tasks with `backups` per task.
fn ping_spec(backups: u32) -> Result<JobSpec> {
    Ok(JobSpec {
        kind: "ping".into(),
        tasks: 2,
        group: GroupName::new("graph")?,
        properties: json!(null),
        backups,
    })
}

/// The handle task 0 left in `slot`.
fn handle_of(slot: &Mutex<Option<TaskHandle>>) -> Result<TaskHandle> {
    let handle = slot.lock().expect("not poisoned").clone();
    handle.context("task 0's handle")
}

/// `requests` data requests of 64 bytes, `concurrency` at a time; per second.
async fn request_rate(handle: &TaskHandle, requests: usize, concurrency: usize) -> Result<f64> {
    let started = Instant::now();
    let per_worker = requests / concurrency;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let handle = handle.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                handle.data_request(1, "echo", vec![7; 64]).await?;
            }
            Ok::<_, eretes_graph::GraphError>(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok((per_worker * concurrency) as f64 / started.elapsed().as_secs_f64())
}

/// Data requests per second between two nodes, pooled and unpooled.
pub(super) async fn data(args: &BenchArgs) -> Result<serde_json::Value> {
    let requests = args.tasks.unwrap_or(20_000) as usize;
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("bench-graph")?;
    let slot = Arc::new(Mutex::new(None));
    let kinds = ping_kinds(&slot);
    let nodes = [
        one_slot_node(&store, &ns, "a", kinds.clone()).await?,
        one_slot_node(&store, &ns, "b", kinds.clone()).await?,
    ];
    let spec = ping_spec(0)?;
    nodes[0]
        .1
        .jobs()
        .start(&JobName::new("ping")?, &spec)
        .await?;
    wait_until("task 0 runs", || {
        slot.lock().expect("not poisoned").is_some()
    })
    .await?;
    let handle = handle_of(&slot)?;
    // Warm up (and make sure task 1 runs on the other node).
    request_rate(&handle, 200, 4).await?;
    let runs = |task: &str| {
        nodes
            .iter()
            .position(|(_, graph)| graph.runs().iter().any(|(id, _)| id.as_str() == task))
    };
    let (Some(requesting), Some(serving)) = (runs("ping.0"), runs("ping.1")) else {
        bail!("the two tasks do not both run");
    };
    if requesting == serving {
        bail!("the two tasks run on one node");
    }
    let requester = &nodes[requesting].1;
    let mut report = json!({ "scenario": "graph-data", "requests": requests });
    for concurrency in [1usize, 8] {
        requester.set_connection_per_request(false);
        let pooled = request_rate(&handle, requests, concurrency).await?;
        requester.set_connection_per_request(true);
        let unpooled = request_rate(&handle, requests / 10, concurrency).await?;
        requester.set_connection_per_request(false);
        println!(
            "data requests, {concurrency} at a time: pooled {pooled:.0}/s, a connection per request {unpooled:.0}/s ({:.1}×)",
            pooled / unpooled
        );
        report[format!("pooled_per_s_c{concurrency}")] = json!(pooled);
        report[format!("unpooled_per_s_c{concurrency}")] = json!(unpooled);
    }
    Ok(report)
}

/// The state of the failover benchmark's served task: what a cold restart
/// reads back from its checkpoint, and a backup holds already.
const STATE_BYTES: usize = 64 * 1024;

/// Rounds of each kind in `graph-failover`.
const FAILOVER_ROUNDS: usize = 5;

/// A task's failover as its peer sees it, with a backup and cold, in
/// alternating rounds: medians, and their ratio.
pub(super) async fn failover(_args: &BenchArgs) -> Result<serde_json::Value> {
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..FAILOVER_ROUNDS * 2 {
        let backups = (round % 2) as u32;
        let (ms, promoted) = failover_round(backups).await?;
        if promoted != (backups > 0) {
            bail!("round {round}: a backup took over: {promoted}, with {backups} backups");
        }
        println!(
            "round {round}: {} answered again after {ms:.0} ms",
            if promoted {
                "taken over by its backup,"
            } else {
                "restarted cold,"
            }
        );
        times[backups as usize].push(ms);
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let [cold, standby] = times.clone().map(median);
    println!(
        "median: with a backup {standby:.0} ms, cold {cold:.0} ms ({:.2}×; lease TTL {FAILOVER_TTL:?})",
        standby / cold
    );
    Ok(json!({
        "scenario": "graph-failover",
        "lease_ttl_ms": FAILOVER_TTL.as_millis() as u64,
        "state_bytes": STATE_BYTES,
        "rounds": FAILOVER_ROUNDS,
        "standby_ms": times[1],
        "cold_ms": times[0],
        "standby_median_ms": standby,
        "cold_median_ms": cold,
        "standby_over_cold": standby / cold,
    }))
}

/// One round: three one-slot nodes, a pair of tasks; kill the node of the
/// task that serves, time until it answers again. (ms, whether a backup
/// took over.)
async fn failover_round(backups: u32) -> Result<(f64, bool)> {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("bench-failover")?;
    let slot = Arc::new(Mutex::new(None));
    let kinds = ping_kinds(&slot);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(one_slot_node(&store, &ns, name, kinds.clone()).await?);
    }
    let spec = ping_spec(backups)?;
    nodes[0]
        .1
        .jobs()
        .start(&JobName::new("ping")?, &spec)
        .await?;
    let runs = |task: &str| {
        nodes
            .iter()
            .position(|(_, graph)| graph.runs().iter().any(|(id, _)| id.as_str() == task))
    };
    wait_until("both tasks run", || {
        slot.lock().expect("not poisoned").is_some()
            && runs("ping.0").is_some()
            && runs("ping.1").is_some()
    })
    .await?;
    // Backed up: the served task's backup is recorded (by its primary).
    let job = JobName::new("ping")?;
    let keys = GraphKeys::new(&ns);
    wait_until_async("task 1 backed up", || {
        let prefix = keys.backups_of(&job, 1);
        let store = store.clone();
        async move {
            let records = store.get(GetRequest::new(KeyRange::prefix(prefix))).await;
            records.is_ok_and(|records| records.kvs.len() >= backups as usize)
        }
    })
    .await?;
    let handle = handle_of(&slot)?;
    handle.data_request(1, "echo", vec![1]).await?;
    let serving = runs("ping.1").context("task 1 runs")?;
    let takeovers = |nodes: &[(NodeHandle, GraphNode)]| -> u64 {
        nodes
            .iter()
            .map(|(_, graph)| graph.stats().takeovers.load(Ordering::Relaxed))
            .sum()
    };
    let before = takeovers(&nodes);
    nodes[serving].0.kill();
    nodes[serving].1.stop();
    let killed = Instant::now();
    handle.data_request(1, "echo", vec![1]).await?;
    let ms = killed.elapsed().as_secs_f64() * 1000.0;
    let promoted = takeovers(&nodes) > before;
    for (node, graph) in nodes {
        node.kill();
        graph.stop();
    }
    Ok((ms, promoted))
}

/// Milliseconds per job epoch of the regression at 15 and 127 tasks.
pub(super) async fn epochs(args: &BenchArgs) -> Result<serde_json::Value> {
    let epochs = args.tasks.map_or(50, u64::from);
    let mut report = json!({ "scenario": "graph-epochs", "epochs": epochs });
    for tasks in [15u32, 127] {
        let store: Arc<dyn Store> = EmbeddedStore::new();
        let outcome = run_regression(
            store,
            Namespace::new("bench-epochs")?,
            RegressionOptions {
                tasks,
                epochs,
                ..RegressionOptions::default()
            },
        )
        .await?;
        if !outcome.passed() {
            bail!("the regression failed: {outcome:?}");
        }
        let per_epoch = outcome.elapsed_ms as f64 / epochs as f64;
        println!("{tasks} tasks: {per_epoch:.1} ms per job epoch ({epochs} epochs)");
        report[format!("ms_per_epoch_{tasks}")] = json!(per_epoch);
    }
    Ok(report)
}
