//! What every guarantee test shares: a cluster of in-process nodes, bounded
//! waits, and a job kind built from a closure.
#![allow(dead_code)] // each test module uses its own part

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eretes_graph::{
    graph_task_id, GraphError, GraphNode, GraphTask, JobEpoch, JobKind, JobName, JobSpec, Jobs,
    Topology,
};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;
use tokio::time::{sleep, Instant};

/// The nodes' lease TTL: a killed node's tasks move after about this long.
pub(crate) const TTL: Duration = Duration::from_secs(1);
/// Longest any wait of a test (or of a task's callback) lasts.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);
/// How long a test watches for something that must not happen (a second
/// delivery) after what must happen has.
pub(crate) const QUIET: Duration = Duration::from_millis(500);
/// The job kind every node registers (each test registers its own).
pub(crate) const KIND: &str = "probe";
/// The one link of [`Peers`].
pub(crate) const PEER: &str = "peer";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Every task is a neighbour of every other over the link `peer`.
pub(crate) struct Peers {
    pub(crate) tasks: u32,
}

impl Topology for Peers {
    fn links(&self) -> Vec<String> {
        vec![PEER.into()]
    }

    fn neighbours(&self, link: &str, task: u32, _epoch: JobEpoch) -> Vec<u32> {
        if link != PEER {
            return Vec::new();
        }
        (0..self.tasks).filter(|&t| t != task).collect()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("not poisoned")
}

/// Inside a callback: poll `ready` until it holds; false after [`DEADLINE`]
/// (a panic there would only end the run, so callbacks record instead).
pub(crate) async fn wait_for(mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(5)).await;
    }
    true
}

/// In a test: poll `probe` until it gives a value; fail after [`DEADLINE`].
pub(crate) async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) struct Member {
    pub(crate) name: NodeName,
    pub(crate) node: NodeHandle,
    pub(crate) graph: GraphNode,
}

/// In-process nodes of one store, all registering the test's job kind.
pub(crate) struct Cluster {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) ns: Namespace,
    pub(crate) kind: Arc<dyn JobKind>,
    pub(crate) jobs: Jobs,
    pub(crate) members: Vec<Member>,
    pub(crate) started: usize,
}

impl Cluster {
    pub(crate) fn new(kind: Arc<dyn JobKind>) -> Cluster {
        Cluster::on(EmbeddedStore::new(), kind)
    }

    pub(crate) fn on(store: Arc<dyn Store>, kind: Arc<dyn JobKind>) -> Cluster {
        let ns = Namespace::new("guarantees").unwrap();
        let jobs = Jobs::new(Coordinator::new(store.clone(), ns.clone()));
        Cluster {
            store,
            ns,
            kind,
            jobs,
            members: Vec::new(),
            started: 0,
        }
    }

    /// Start a node with `slots` places in group `graph`.
    pub(crate) async fn add(&mut self, slots: usize) -> NodeName {
        let store = self.store.clone();
        self.add_on(store, slots).await
    }

    /// Start a node that reaches the store through `store` (for faults).
    pub(crate) async fn add_on(&mut self, store: Arc<dyn Store>, slots: usize) -> NodeName {
        self.started += 1;
        let name = NodeName::new(format!("n{}", self.started)).unwrap();
        let coordinator = Coordinator::new(store.clone(), self.ns.clone());
        let kinds: HashMap<String, Arc<dyn JobKind>> =
            [(KIND.to_string(), self.kind.clone())].into();
        let graph = GraphNode::start(
            coordinator,
            name.clone(),
            kinds,
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let mut config = NodeConfig::new(name.clone(), self.ns.clone()).with_lease_ttl(TTL);
        config.groups = vec![GroupName::new("graph").unwrap()];
        config.slots = slots;
        config.takeover_limit = u32::MAX;
        let node = Node::start(
            store,
            config,
            graph.handler(),
            graph.balancer(Box::new(FairBalancer::default())),
        )
        .await
        .unwrap();
        graph.publish_address(node.status());
        self.members.push(Member {
            name: name.clone(),
            node,
            graph,
        });
        name
    }

    pub(crate) fn graph(&self, name: &NodeName) -> &GraphNode {
        &self
            .members
            .iter()
            .find(|m| &m.name == name)
            .expect("a live node")
            .graph
    }

    pub(crate) async fn start_job(&self, name: &str, tasks: u32) -> JobName {
        let job = JobName::new(name).unwrap();
        self.jobs
            .start(&job, &spec(KIND, tasks))
            .await
            .expect("the job starts");
        job
    }

    /// The live node whose graph layer runs `task` now.
    pub(crate) fn runner(&self, task: &TaskId) -> Option<NodeName> {
        self.members
            .iter()
            .find(|m| m.graph.runs().iter().any(|(id, _)| id == task))
            .map(|m| m.name.clone())
    }

    /// Wait until every task of `job` runs, each on its own node.
    pub(crate) async fn wait_spread(&self, job: &JobName, tasks: u32) -> Vec<NodeName> {
        eventually("every task running on its own node", || {
            let runners: Vec<NodeName> = (0..tasks)
                .map(|i| self.runner(&graph_task_id(job, i)))
                .collect::<Option<_>>()?;
            let mut distinct = runners.clone();
            distinct.sort();
            distinct.dedup();
            (distinct.len() == runners.len()).then_some(runners)
        })
        .await
    }

    /// Kill `name` as if its process died.
    pub(crate) fn kill(&mut self, name: &NodeName) {
        let at = self
            .members
            .iter()
            .position(|m| &m.name == name)
            .expect("a live node");
        let member = self.members.remove(at);
        member.node.kill();
        member.graph.stop();
    }

    pub(crate) fn meta_repeats_suppressed(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.members
            .iter()
            .map(|m| m.graph.stats().meta_repeats_suppressed.load(Relaxed))
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in self.members.drain(..) {
            member.node.kill();
            member.graph.stop();
        }
    }
}

pub(crate) fn spec(kind: &str, tasks: u32) -> JobSpec {
    JobSpec {
        kind: kind.into(),
        tasks,
        group: GroupName::new("graph").unwrap(),
        properties: serde_json::Value::Null,
        backups: 0,
    }
}

/// A kind whose every task is `build(index)` over [`Peers`].
pub(crate) struct Kind<F>(F);

impl<F> JobKind for Kind<F>
where
    F: Fn(u32) -> Arc<dyn GraphTask> + Send + Sync + 'static,
{
    fn topology(&self, job: &JobSpec) -> Arc<dyn Topology> {
        Arc::new(Peers { tasks: job.tasks })
    }

    fn build(&self, _job: &JobSpec, index: u32) -> Arc<dyn GraphTask> {
        (self.0)(index)
    }
}

pub(crate) fn kind<F>(build: F) -> Arc<dyn JobKind>
where
    F: Fn(u32) -> Arc<dyn GraphTask> + Send + Sync + 'static,
{
    Arc::new(Kind(build))
}

/// One meta a receiver got: (its run's claim epoch, sender, link, the job
/// epoch the receiver's callbacks were in, meta).
pub(crate) type Received = (i64, u32, String, u64, String);

pub(crate) fn show(result: &Result<impl std::fmt::Debug, GraphError>) -> String {
    format!("{result:?}")
}
