//! The graph layer's promises, each checked by a small job kind written here
//! that records what its tasks observe, on in-process nodes of one embedded
//! store with real gRPC between them on loopback.
//!
//! Every wait has a deadline ([`DEADLINE`]); the lease TTL is 1 s, so a
//! killed node's tasks move within about a second. Kills are the driver's:
//! `node.kill(); graph.stop();` (the process died). Each test that kills
//! starts one more node than the job has tasks, each node with one slot, so
//! every task runs on its own node and the spare takes a killed task over.
//!
//! The last three tests were written against two bugs and one questionable
//! behaviour this suite found (a late callback's `inc_epoch` skipping an
//! epoch, an answer sent after its epoch ended, `neighbour_restarted` for a
//! neighbour's first run); they hold since the fixes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::proto::graph_client::GraphClient;
use eretes_graph::proto::{data_reply, DataRequest};
use eretes_graph::{
    graph_task_id, EpochMove, EpochRecord, GraphError, GraphNode, GraphTask, JobEpoch, JobKind,
    JobName, JobSpec, Jobs, TaskHandle, Topology, MAX_JOB_TASKS, MAX_META_BYTES,
};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::Store;
use tokio::time::{sleep, Instant};

/// The nodes' lease TTL: a killed node's tasks move after about this long.
const TTL: Duration = Duration::from_secs(1);
/// Longest any wait of a test (or of a task's callback) lasts.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a test watches for something that must not happen (a second
/// delivery) after what must happen has.
const QUIET: Duration = Duration::from_millis(500);
/// The job kind every node registers (each test registers its own).
const KIND: &str = "probe";
/// The one link of [`Peers`].
const PEER: &str = "peer";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Every task is a neighbour of every other over the link `peer`.
struct Peers {
    tasks: u32,
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("not poisoned")
}

/// Inside a callback: poll `ready` until it holds; false after [`DEADLINE`]
/// (a panic there would only end the run, so callbacks record instead).
async fn wait_for(mut ready: impl FnMut() -> bool) -> bool {
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
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
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

struct Member {
    name: NodeName,
    node: NodeHandle,
    graph: GraphNode,
}

/// In-process nodes of one store, all registering the test's job kind.
struct Cluster {
    store: Arc<dyn Store>,
    ns: Namespace,
    kind: Arc<dyn JobKind>,
    jobs: Jobs,
    members: Vec<Member>,
    started: usize,
}

impl Cluster {
    fn new(kind: Arc<dyn JobKind>) -> Cluster {
        Cluster::on(EmbeddedStore::new(), kind)
    }

    fn on(store: Arc<dyn Store>, kind: Arc<dyn JobKind>) -> Cluster {
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
    async fn add(&mut self, slots: usize) -> NodeName {
        let store = self.store.clone();
        self.add_on(store, slots).await
    }

    /// Start a node that reaches the store through `store` (for faults).
    async fn add_on(&mut self, store: Arc<dyn Store>, slots: usize) -> NodeName {
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
            Box::new(FairBalancer::default()),
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

    fn graph(&self, name: &NodeName) -> &GraphNode {
        &self
            .members
            .iter()
            .find(|m| &m.name == name)
            .expect("a live node")
            .graph
    }

    async fn start_job(&self, name: &str, tasks: u32) -> JobName {
        let job = JobName::new(name).unwrap();
        self.jobs
            .start(&job, &spec(KIND, tasks))
            .await
            .expect("the job starts");
        job
    }

    /// The live node whose graph layer runs `task` now.
    fn runner(&self, task: &TaskId) -> Option<NodeName> {
        self.members
            .iter()
            .find(|m| m.graph.runs().iter().any(|(id, _)| id == task))
            .map(|m| m.name.clone())
    }

    /// Wait until every task of `job` runs, each on its own node.
    async fn wait_spread(&self, job: &JobName, tasks: u32) -> Vec<NodeName> {
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
    fn kill(&mut self, name: &NodeName) {
        let at = self
            .members
            .iter()
            .position(|m| &m.name == name)
            .expect("a live node");
        let member = self.members.remove(at);
        member.node.kill();
        member.graph.stop();
    }

    fn meta_repeats_suppressed(&self) -> u64 {
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

fn spec(kind: &str, tasks: u32) -> JobSpec {
    JobSpec {
        kind: kind.into(),
        tasks,
        group: GroupName::new("graph").unwrap(),
        properties: serde_json::Value::Null,
    }
}

/// A kind whose every task is `build(index)` over [`Peers`].
struct Kind<F>(F);

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

fn kind<F>(build: F) -> Arc<dyn JobKind>
where
    F: Fn(u32) -> Arc<dyn GraphTask> + Send + Sync + 'static,
{
    Arc::new(Kind(build))
}

/// One meta a receiver got: (its run's claim epoch, sender, link, the job
/// epoch the receiver's callbacks were in, meta).
type Received = (i64, u32, String, u64, String);

fn show(result: &Result<impl std::fmt::Debug, GraphError>) -> String {
    format!("{result:?}")
}

// ---------------------------------------------------------------------------
// 1. Each (sender, link, epoch, meta) once per run
// ---------------------------------------------------------------------------

#[derive(Default)]
struct MetaOnceLog {
    receiver_entered: Vec<u64>,
    received: Vec<Received>,
    errors: Vec<String>,
    moved: Vec<EpochMove>,
}

/// Task 0 flags a, a, a, b, a, b on `peer` in epochs 0 and 1 (once task 1 is
/// in the epoch); task 1 records what arrives.
struct MetaOnceTask {
    log: Arc<Mutex<MetaOnceLog>>,
    entered: Mutex<Option<u64>>,
}

#[async_trait]
impl GraphTask for MetaOnceTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        *lock(&self.entered) = Some(epoch.0);
        if task.task_id() == 1 {
            lock(&self.log).receiver_entered.push(epoch.0);
            return;
        }
        let log = self.log.clone();
        if !wait_for(|| lock(&log).receiver_entered.contains(&epoch.0)).await {
            lock(&log)
                .errors
                .push(format!("task 1 never entered {epoch}"));
            return;
        }
        for meta in ["a", "a", "a", "b", "a", "b"] {
            if let Err(error) = task.flag_meta(PEER, meta).await {
                lock(&log).errors.push(format!("flag {meta}: {error}"));
            }
        }
        if epoch.0 == 0 {
            // Once both arrived, move on: the same values count again in 1.
            let both = || lock(&log).received.iter().filter(|r| r.3 == 0).count() >= 2;
            if !wait_for(both).await {
                lock(&log)
                    .errors
                    .push("epoch 0's meta never arrived".into());
                return;
            }
            match task.inc_epoch().await {
                Ok(moved) => lock(&log).moved.push(moved),
                Err(error) => lock(&log).errors.push(format!("inc_epoch: {error}")),
            }
        }
    }

    async fn meta_ready(&self, task: &TaskHandle, from: u32, link: &str, meta: &str) {
        let epoch = lock(&self.entered).unwrap_or(u64::MAX);
        lock(&self.log)
            .received
            .push((task.claim_epoch(), from, link.into(), epoch, meta.into()));
    }

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_is_delivered_once_per_run_even_when_flagged_again() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(MetaOnceLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(MetaOnceTask {
            log: shared.clone(),
            entered: Mutex::new(None),
        })
    }));
    cluster.add(1).await;
    cluster.add(1).await;
    cluster.start_job("once", 2).await;

    eventually("four distinct meta at task 1", || {
        (lock(&log).received.len() >= 4).then_some(())
    })
    .await;
    sleep(QUIET).await;

    let log = lock(&log);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert_eq!(log.moved, vec![EpochMove::Moved(JobEpoch(1))]);
    let runs: Vec<i64> = log.received.iter().map(|r| r.0).collect();
    assert!(
        runs.iter().all(|&run| run == runs[0]),
        "one run of task 1 received everything: {:?}",
        log.received
    );
    let mut got: Vec<(u32, &str, u64, &str)> = log
        .received
        .iter()
        .map(|(_, from, link, epoch, meta)| (*from, link.as_str(), *epoch, meta.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (0, PEER, 0, "a"),
            (0, PEER, 0, "b"),
            (0, PEER, 1, "a"),
            (0, PEER, 1, "b"),
        ],
        "each (sender, link, epoch, meta) exactly once: {:?}",
        log.received
    );
    println!(
        "meta once: {} repeats suppressed by receivers, {:?}",
        cluster.meta_repeats_suppressed(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. A run after a failover gets the current meta once
// ---------------------------------------------------------------------------

#[derive(Default)]
struct FailoverMetaLog {
    /// Claim epochs of task 1's runs, as they entered epoch 0.
    receiver_runs: Vec<i64>,
    received: Vec<Received>,
    errors: Vec<String>,
}

/// Task 0 flags m1 then m2 once task 1 runs; task 1 records.
struct FailoverMetaTask {
    log: Arc<Mutex<FailoverMetaLog>>,
    entered: Mutex<Option<u64>>,
}

#[async_trait]
impl GraphTask for FailoverMetaTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        *lock(&self.entered) = Some(epoch.0);
        if task.task_id() == 1 {
            lock(&self.log).receiver_runs.push(task.claim_epoch());
            return;
        }
        let log = self.log.clone();
        if !wait_for(|| !lock(&log).receiver_runs.is_empty()).await {
            lock(&log).errors.push("task 1 never ran".into());
            return;
        }
        for meta in ["m1", "m2"] {
            if let Err(error) = task.flag_meta(PEER, meta).await {
                lock(&log).errors.push(format!("flag {meta}: {error}"));
            }
        }
    }

    async fn meta_ready(&self, task: &TaskHandle, from: u32, link: &str, meta: &str) {
        let epoch = lock(&self.entered).unwrap_or(u64::MAX);
        lock(&self.log)
            .received
            .push((task.claim_epoch(), from, link.into(), epoch, meta.into()));
    }

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_after_failover_gets_its_neighbours_current_meta_once() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(FailoverMetaLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(FailoverMetaTask {
            log: shared.clone(),
            entered: Mutex::new(None),
        })
    }));
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = cluster.start_job("failover", 2).await;
    let runners = cluster.wait_spread(&job, 2).await;

    let first = eventually("task 1's first run got m1 and m2", || {
        let log = lock(&log);
        (log.received.len() >= 2).then(|| log.received[0].0)
    })
    .await;
    cluster.kill(&runners[1]);
    let killed_at = Instant::now();
    let second = eventually("task 1's new run got meta", || {
        let log = lock(&log);
        log.received.iter().find(|r| r.0 != first).map(|r| r.0)
    })
    .await;
    let took = killed_at.elapsed();
    sleep(QUIET).await;

    let log = lock(&log);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert_eq!(log.receiver_runs, vec![first, second], "two runs of task 1");
    assert!(second > first, "a later claim: {second} > {first}");
    let of = |run: i64| -> Vec<(u32, String, u64, String)> {
        let mut got: Vec<_> = log
            .received
            .iter()
            .filter(|r| r.0 == run)
            .map(|r| (r.1, r.2.clone(), r.3, r.4.clone()))
            .collect();
        got.sort();
        got
    };
    assert_eq!(
        of(first),
        vec![
            (0, PEER.into(), 0, "m1".into()),
            (0, PEER.into(), 0, "m2".into())
        ],
        "the first run got both, once each"
    );
    assert_eq!(
        of(second),
        vec![(0, PEER.into(), 0, "m2".into())],
        "the new run got the current meta, exactly once"
    );
    let now = cluster
        .runner(&graph_task_id(&job, 1))
        .expect("task 1 runs");
    assert_ne!(now, runners[1], "task 1 moved off the killed node");
    println!(
        "failover meta: new run's meta {took:?} after the kill, {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. Epoch compare-and-swap races
// ---------------------------------------------------------------------------

const RACERS: u32 = 20;
const LAST_EPOCH: u64 = 4;

type Outcome = Result<EpochMove, String>;

#[derive(Default)]
struct RaceLog {
    jobs: Option<Jobs>,
    arrived: BTreeMap<u64, u32>,
    /// Epochs each run entered, in order, by (task, claim epoch).
    sequences: BTreeMap<(u32, i64), Vec<u64>>,
    /// (the epoch the callback was in, task, answer) of every inc_epoch.
    moves: Vec<(u64, u32, Outcome)>,
    shutdowns: Vec<(u32, Outcome)>,
    exits: BTreeMap<(u32, i64), u32>,
    errors: Vec<String>,
}

/// In each epoch every task waits until all have entered it, then all move
/// the job on from it at once (after the last, all shut it down at once).
struct RaceTask {
    log: Arc<Mutex<RaceLog>>,
}

#[async_trait]
impl GraphTask for RaceTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        let me = task.task_id();
        let jobs = {
            let mut log = lock(&self.log);
            log.sequences
                .entry((me, task.claim_epoch()))
                .or_default()
                .push(epoch.0);
            *log.arrived.entry(epoch.0).or_default() += 1;
            log.jobs.clone().expect("set before the job starts")
        };
        let log = self.log.clone();
        if !wait_for(|| lock(&log).arrived[&epoch.0] >= RACERS).await {
            lock(&log)
                .errors
                .push(format!("task {me}: not all entered {epoch}"));
            return;
        }
        // From the epoch this callback is in, explicitly: see
        // `bug_inc_epoch_in_a_late_callback_skips_an_epoch` for why not
        // `TaskHandle::inc_epoch`.
        if epoch.0 < LAST_EPOCH {
            let answer = jobs.inc_epoch(task.job(), epoch).await;
            lock(&log)
                .moves
                .push((epoch.0, me, answer.map_err(|e| e.to_string())));
        } else {
            let answer = jobs.shutdown(task.job(), epoch).await;
            lock(&log)
                .shutdowns
                .push((me, answer.map_err(|e| e.to_string())));
        }
    }

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }

    async fn exit(&self, task: &TaskHandle) {
        *lock(&self.log)
            .exits
            .entry((task.task_id(), task.claim_epoch()))
            .or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_compare_and_swap_races_have_one_winner_per_epoch() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(RaceLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(RaceTask {
            log: shared.clone(),
        })
    }));
    lock(&log).jobs = Some(cluster.jobs.clone());
    cluster.add(RACERS as usize / 2).await;
    cluster.add(RACERS as usize / 2).await;
    let job = cluster.start_job("race", RACERS).await;

    let coordinator = cluster.jobs.coordinator().clone();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut ended = 0;
        for index in 0..RACERS {
            if coordinator
                .result(&graph_task_id(&job, index))
                .await
                .unwrap()
                .is_some()
            {
                ended += 1;
            }
        }
        if ended == RACERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ended} of {RACERS} tasks ended: {:?}",
            lock(&log).errors
        );
        sleep(Duration::from_millis(20)).await;
    }
    let last = cluster.jobs.epoch(&job).await.unwrap();

    let log = lock(&log);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    for epoch in 0..LAST_EPOCH {
        let answers: Vec<&Outcome> = log
            .moves
            .iter()
            .filter(|(from, _, _)| *from == epoch)
            .map(|(_, _, answer)| answer)
            .collect();
        assert_eq!(
            answers.len(),
            RACERS as usize,
            "every task raced in {epoch}"
        );
        let next = JobEpoch(epoch + 1);
        let won = answers
            .iter()
            .filter(|a| ***a == Ok(EpochMove::Moved(next)))
            .count();
        let lost = EpochMove::Lost(EpochRecord {
            epoch: next,
            shutdown: false,
        });
        let lost = answers.iter().filter(|a| ***a == Ok(lost)).count();
        assert_eq!(
            (won, lost),
            (1, RACERS as usize - 1),
            "one winner from {epoch}, the rest lost: {answers:?}"
        );
    }
    let won = log
        .shutdowns
        .iter()
        .filter(|(_, a)| *a == Ok(EpochMove::Moved(JobEpoch(LAST_EPOCH))))
        .count();
    let lost = EpochMove::Lost(EpochRecord {
        epoch: JobEpoch(LAST_EPOCH),
        shutdown: true,
    });
    let lost = log.shutdowns.iter().filter(|(_, a)| *a == Ok(lost)).count();
    assert_eq!(
        (won, lost),
        (1, RACERS as usize - 1),
        "one shutdown won: {:?}",
        log.shutdowns
    );
    assert_eq!(log.sequences.len(), RACERS as usize, "one run per task");
    let all: Vec<u64> = (0..=LAST_EPOCH).collect();
    for (run, sequence) in &log.sequences {
        assert_eq!(
            sequence, &all,
            "run {run:?} entered each epoch once, in order"
        );
        assert_eq!(log.exits.get(run), Some(&1), "run {run:?} exited once");
    }
    assert_eq!(
        last,
        Some(EpochRecord {
            epoch: JobEpoch(LAST_EPOCH),
            shutdown: true
        }),
        "never moved past the last epoch"
    );
    println!("epoch races: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 4. A data request follows its target to the new owner
// ---------------------------------------------------------------------------

#[derive(Default)]
struct FollowLog {
    /// Claim epochs of task 1's runs.
    server_runs: Vec<i64>,
    /// (server run's claim epoch, requester) of every serve_data call.
    serves: Vec<(i64, u32)>,
    /// (requester run's claim epoch, the answer: the serving run's claim).
    answers: Vec<(i64, Result<i64, String>)>,
}

/// Task 0 asks task 1 which run answers; task 1's first run never answers.
struct FollowTask {
    log: Arc<Mutex<FollowLog>>,
}

#[async_trait]
impl GraphTask for FollowTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, _epoch: JobEpoch) {
        if task.task_id() == 1 {
            lock(&self.log).server_runs.push(task.claim_epoch());
            return;
        }
        let log = self.log.clone();
        if !wait_for(|| !lock(&log).server_runs.is_empty()).await {
            return;
        }
        let answer = match task.data_request(1, "who", Vec::new()).await {
            Ok(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
                .map(i64::from_le_bytes)
                .map_err(|_| format!("{bytes:?} is not a claim epoch")),
            Err(error) => Err(error.to_string()),
        };
        lock(&log).answers.push((task.claim_epoch(), answer));
    }

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        task: &TaskHandle,
        from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let first = {
            let mut log = lock(&self.log);
            log.serves.push((task.claim_epoch(), from));
            log.server_runs.first() == Some(&task.claim_epoch())
        };
        if first {
            // Hang until the node dies.
            std::future::pending::<()>().await;
        }
        Ok(task.claim_epoch().to_le_bytes().to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_request_follows_its_target_to_the_new_owner() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(FollowLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(FollowTask {
            log: shared.clone(),
        })
    }));
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = cluster.start_job("follow", 2).await;
    let runners = cluster.wait_spread(&job, 2).await;
    let first = eventually("task 1's first run got the request", || {
        lock(&log).serves.first().map(|s| s.0)
    })
    .await;
    assert_eq!(lock(&log).server_runs, vec![first]);

    cluster.kill(&runners[1]);
    let killed_at = Instant::now();
    let (requester, answer) =
        eventually("the answer", || lock(&log).answers.first().cloned()).await;
    let took = killed_at.elapsed();
    sleep(QUIET).await;

    let log = lock(&log);
    let second = answer.expect("the request was answered");
    assert!(
        second > first,
        "answered by a later run of task 1: {second} > {first}"
    );
    assert_eq!(log.server_runs, vec![first, second]);
    assert_eq!(
        log.serves,
        vec![(first, 0), (second, 0)],
        "served once by each run, for task 0"
    );
    assert_eq!(log.answers.len(), 1, "one answer: {:?}", log.answers);
    drop(log);
    assert_eq!(
        cluster.runner(&graph_task_id(&job, 0)),
        Some(runners[0].clone()),
        "the requester kept its run"
    );
    assert!(requester > 0);
    println!(
        "data request followed its target: answered {took:?} after the kill, {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 5. An answer whose epoch has passed is never delivered
// ---------------------------------------------------------------------------

type Asked = (u64, &'static str, Result<Vec<u8>, GraphError>);

#[derive(Default)]
struct StaleLog {
    server_entered: Vec<u64>,
    slow_started: bool,
    release: bool,
    /// (the requester's callback epoch, method, answer) of each request.
    asked: Vec<Asked>,
}

/// In epoch 0 task 0 asks task 1 "slow" (answered only when the test
/// releases it); in epoch 1 it asks "fast".
struct StaleTask {
    log: Arc<Mutex<StaleLog>>,
}

#[async_trait]
impl GraphTask for StaleTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        if task.task_id() == 1 {
            lock(&self.log).server_entered.push(epoch.0);
            return;
        }
        let log = self.log.clone();
        if !wait_for(|| lock(&log).server_entered.contains(&epoch.0)).await {
            return;
        }
        let method = if epoch.0 == 0 { "slow" } else { "fast" };
        let answer = task.data_request(1, method, Vec::new()).await;
        lock(&log).asked.push((epoch.0, method, answer));
    }

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        if method == "fast" {
            return Ok(b"fresh".to_vec());
        }
        lock(&self.log).slow_started = true;
        let log = self.log.clone();
        wait_for(|| lock(&log).release).await;
        Ok(b"late".to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_epoch_has_passed_is_never_delivered() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(StaleLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(StaleTask {
            log: shared.clone(),
        })
    }));
    cluster.add(1).await;
    cluster.add(1).await;
    let job = cluster.start_job("stale", 2).await;
    cluster.wait_spread(&job, 2).await;
    eventually("task 1 serving the slow request", || {
        lock(&log).slow_started.then_some(())
    })
    .await;

    assert_eq!(
        cluster.jobs.inc_epoch(&job, JobEpoch(0)).await.unwrap(),
        EpochMove::Moved(JobEpoch(1))
    );
    let moved_at = Instant::now();
    eventually("the epoch-0 request to end", || {
        (!lock(&log).asked.is_empty()).then_some(())
    })
    .await;
    let ended_after = moved_at.elapsed();
    // Now let the slow answer go: it must not turn up anywhere.
    lock(&log).release = true;
    eventually("the epoch-1 request", || {
        (lock(&log).asked.len() >= 2).then_some(())
    })
    .await;
    sleep(QUIET).await;

    let log = lock(&log);
    assert_eq!(log.asked.len(), 2, "{:?}", log.asked);
    let (epoch, method, answer) = &log.asked[0];
    assert_eq!((*epoch, *method), (0, "slow"));
    assert!(
        matches!(
            answer,
            Err(GraphError::EpochEnded {
                requested: JobEpoch(0),
                now: JobEpoch(1)
            })
        ),
        "the epoch-0 request ended with its epoch: {}",
        show(answer)
    );
    assert!(
        ended_after < Duration::from_secs(5),
        "it ended when the epoch moved, not later: {ended_after:?}"
    );
    let (epoch, method, answer) = &log.asked[1];
    assert_eq!((*epoch, *method), (1, "fast"));
    assert_eq!(
        answer.as_ref().ok().map(Vec::as_slice),
        Some(&b"fresh"[..]),
        "epoch 1's request got epoch 1's answer: {}",
        show(answer)
    );
    println!(
        "stale answer: the request ended {ended_after:?} after the move, {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 6. Requests a node cannot answer are refused
// ---------------------------------------------------------------------------

#[derive(Default)]
struct DirectLog {
    /// (task, method) of every serve_data call.
    serves: Vec<(u32, String)>,
}

/// Answers `<task>:<claim epoch>:<job epoch>`.
struct DirectTask {
    log: Arc<Mutex<DirectLog>>,
}

#[async_trait]
impl GraphTask for DirectTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, _task: &TaskHandle, _epoch: JobEpoch) {}

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        task: &TaskHandle,
        _from: u32,
        method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        lock(&self.log)
            .serves
            .push((task.task_id(), method.to_string()));
        if method == "slowly" {
            sleep(Duration::from_millis(200)).await;
        }
        Ok(format!(
            "{}:{}:{}",
            task.task_id(),
            task.claim_epoch(),
            task.epoch().0
        )
        .into_bytes())
    }
}

fn direct_kind() -> (Arc<Mutex<DirectLog>>, Arc<dyn JobKind>) {
    let log = Arc::new(Mutex::new(DirectLog::default()));
    let shared = log.clone();
    let kind = kind(move |_| {
        Arc::new(DirectTask {
            log: shared.clone(),
        })
    });
    (log, kind)
}

fn request(job: &str, to: u32, job_epoch: u64, request_id: u64, method: &str) -> DataRequest {
    DataRequest {
        job: job.into(),
        from: 1,
        to,
        job_epoch,
        request_id,
        method: method.into(),
        input: Vec::new(),
    }
}

async fn ask(graph: &GraphNode, request: DataRequest) -> data_reply::Outcome {
    let mut client = GraphClient::connect(format!("http://{}", graph.address()))
        .await
        .expect("the node's data server is up");
    client
        .data(request)
        .await
        .expect("an answer")
        .into_inner()
        .outcome
        .expect("an outcome")
}

fn refused_at(outcome: &data_reply::Outcome) -> Option<u64> {
    match outcome {
        data_reply::Outcome::Refused(refusal) => Some(refusal.server_job_epoch),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_node_that_does_not_run_the_task_is_refused() {
    let started = Instant::now();
    let (log, kind) = direct_kind();
    let mut cluster = Cluster::new(kind);
    cluster.add(1).await;
    cluster.add(1).await;
    let job = cluster.start_job("direct", 2).await;
    let runners = cluster.wait_spread(&job, 2).await;
    let a = cluster.graph(&runners[0]).clone();

    // Control: the node answers for the task it runs, in its epoch.
    let answer = ask(&a, request("direct", 0, 0, 1, "m")).await;
    let data_reply::Outcome::Output(output) = &answer else {
        panic!("the task's own node answers: {answer:?}");
    };
    assert!(
        String::from_utf8_lossy(output).starts_with("0:"),
        "{answer:?}"
    );

    // A task of its job that runs elsewhere, one that does not exist, and a
    // job that does not exist: refused (retryable), never answered.
    for (what, req) in [
        ("a task another node runs", request("direct", 1, 0, 2, "m")),
        (
            "a task the job does not have",
            request("direct", 7, 0, 3, "m"),
        ),
        ("a job that does not exist", request("nojob", 0, 0, 4, "m")),
    ] {
        let answer = ask(&a, req).await;
        assert_eq!(refused_at(&answer), Some(0), "{what}: {answer:?}");
    }
    // The task it runs, in a job epoch it is not in: refused, with its own.
    for wrong in [1, 5, u64::MAX] {
        let answer = ask(&a, request("direct", 0, wrong, wrong.wrapping_add(10), "m")).await;
        assert_eq!(refused_at(&answer), Some(0), "epoch {wrong}: {answer:?}");
    }
    assert_eq!(
        lock(&log).serves,
        vec![(0, "m".to_string())],
        "only the control request reached serve_data"
    );

    // One request id, sent twice at once and once more later: served once
    // (the answer is shared); another id is served again.
    let (first, second) = tokio::join!(
        ask(&a, request("direct", 0, 0, 77, "slowly")),
        ask(&a, request("direct", 0, 0, 77, "slowly")),
    );
    let third = ask(&a, request("direct", 0, 0, 77, "slowly")).await;
    assert!(matches!(first, data_reply::Outcome::Output(_)), "{first:?}");
    assert_eq!(first, second);
    assert_eq!(first, third);
    let slowly = || {
        lock(&log)
            .serves
            .iter()
            .filter(|(_, m)| m == "slowly")
            .count()
    };
    assert_eq!(slowly(), 1, "one request id, served once");
    let other = ask(&a, request("direct", 0, 0, 78, "slowly")).await;
    assert!(matches!(other, data_reply::Outcome::Output(_)), "{other:?}");
    assert_eq!(slowly(), 2, "another request id is served");

    // After the job moves on, the old epoch's requests are refused.
    assert_eq!(
        cluster.jobs.inc_epoch(&job, JobEpoch(0)).await.unwrap(),
        EpochMove::Moved(JobEpoch(1))
    );
    let task = graph_task_id(&job, 0);
    eventually("task 0 in job epoch 1", || {
        a.runs()
            .contains(&(task.clone(), JobEpoch(1)))
            .then_some(())
    })
    .await;
    let answer = ask(&a, request("direct", 0, 0, 90, "m")).await;
    assert_eq!(refused_at(&answer), Some(1), "a past epoch: {answer:?}");
    let answer = ask(&a, request("direct", 0, 0, 77, "slowly")).await;
    assert_eq!(
        refused_at(&answer),
        Some(1),
        "a past epoch's answered request is not answered again: {answer:?}"
    );
    let answer = ask(&a, request("direct", 0, 1, 91, "m")).await;
    assert!(
        matches!(&answer, data_reply::Outcome::Output(o) if o.ends_with(b":1")),
        "the current epoch: {answer:?}"
    );
    println!("direct requests refused: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 6b. A partitioned old owner refuses once it has fenced itself
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_old_owner_refuses_once_it_has_fenced_itself() {
    let started = Instant::now();
    let (_log, kind) = direct_kind();
    let inner: Arc<dyn Store> = EmbeddedStore::new();
    let faulty = FaultyStore::new(inner.clone());
    let mut cluster = Cluster::on(inner, kind);
    // a reaches the store through `faulty`; b runs the other task.
    let a = cluster.add_on(faulty.clone(), 1).await;
    cluster.add(1).await;
    let job = cluster.start_job("partition", 2).await;
    let runners = cluster.wait_spread(&job, 2).await;
    let index = runners.iter().position(|r| r == &a).expect("a runs a task") as u32;
    let task = graph_task_id(&job, index);
    let spare = cluster.add(1).await;
    let graph_a = cluster.graph(&a).clone();

    let answer = ask(&graph_a, request("partition", index, 0, 1, "m")).await;
    let data_reply::Outcome::Output(output) = answer else {
        panic!("a answers while it owns the task: {answer:?}");
    };
    let first: i64 = String::from_utf8(output)
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();

    // a loses the store: it cannot renew its lease, fences itself, and the
    // spare takes the task over. a's data server is still up.
    faulty.set_outage(true);
    let cut_at = Instant::now();
    eventually("the spare runs a's task", || {
        (cluster.runner(&task) == Some(spare.clone())).then_some(())
    })
    .await;
    let took = cut_at.elapsed();
    assert!(
        !graph_a.runs().iter().any(|(id, _)| id == &task),
        "a no longer runs the task"
    );
    let answer = ask(&graph_a, request("partition", index, 0, 2, "m")).await;
    assert_eq!(
        refused_at(&answer),
        Some(0),
        "the partitioned old owner refuses: {answer:?}"
    );
    let answer = ask(
        cluster.graph(&spare),
        request("partition", index, 0, 3, "m"),
    )
    .await;
    let data_reply::Outcome::Output(output) = answer else {
        panic!("the new owner answers: {answer:?}");
    };
    let second: i64 = String::from_utf8(output)
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(second > first, "by a later claim: {second} > {first}");
    faulty.set_outage(false);
    println!(
        "partitioned owner: taken over {took:?} after the cut, {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 7. Neighbour events
// ---------------------------------------------------------------------------

/// (observer run's claim epoch, event, link, neighbour).
type NeighbourEvent = (i64, &'static str, String, u32);

#[derive(Default)]
struct NeighbourLog {
    /// Claim epochs of each task's runs.
    runs: BTreeMap<u32, Vec<i64>>,
    /// Task 1's neighbour events.
    events: Vec<NeighbourEvent>,
    /// (task, event, neighbour) of every task's neighbour events.
    all_events: Vec<(u32, &'static str, u32)>,
    /// (observer run, sender, meta) of meta task 1 got.
    received: Vec<(i64, u32, String)>,
    /// (sender run, answer) of each flag of task 0.
    flagged: Vec<(i64, String)>,
}

/// Task 0 flags `hello` in every run; every task records its neighbour
/// events, task 1 its meta.
struct NeighbourTask {
    log: Arc<Mutex<NeighbourLog>>,
}

#[async_trait]
impl GraphTask for NeighbourTask {
    async fn init(&self, task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {
        lock(&self.log)
            .runs
            .entry(task.task_id())
            .or_default()
            .push(task.claim_epoch());
    }

    async fn enter_epoch(&self, task: &TaskHandle, _epoch: JobEpoch) {
        if task.task_id() == 0 {
            let answer = task.flag_meta(PEER, "hello").await;
            lock(&self.log)
                .flagged
                .push((task.claim_epoch(), show(&answer)));
        }
    }

    async fn meta_ready(&self, task: &TaskHandle, from: u32, _link: &str, meta: &str) {
        lock(&self.log)
            .received
            .push((task.claim_epoch(), from, meta.into()));
    }

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }

    async fn neighbour_failed(&self, task: &TaskHandle, link: &str, id: u32) {
        let mut log = lock(&self.log);
        log.all_events.push((task.task_id(), "failed", id));
        if task.task_id() == 1 {
            log.events
                .push((task.claim_epoch(), "failed", link.into(), id));
        }
    }

    async fn neighbour_restarted(&self, task: &TaskHandle, link: &str, id: u32) {
        let mut log = lock(&self.log);
        log.all_events.push((task.task_id(), "restarted", id));
        if task.task_id() == 1 {
            log.events
                .push((task.claim_epoch(), "restarted", link.into(), id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_failed_and_restarted_are_told() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(NeighbourLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(NeighbourTask {
            log: shared.clone(),
        })
    }));
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = cluster.start_job("neighbours", 2).await;
    let runners = cluster.wait_spread(&job, 2).await;
    eventually("task 1 got hello", || {
        (!lock(&log).received.is_empty()).then_some(())
    })
    .await;
    // Events of the start-up (none is expected: a neighbour's first run is
    // no restart) come before `hello` in store order, so before the mark;
    // the pause only makes sure.
    sleep(Duration::from_millis(200)).await;
    let (mark, observer) = {
        let log = lock(&log);
        (log.events.len(), log.runs[&1][0])
    };

    cluster.kill(&runners[0]);
    let killed_at = Instant::now();
    eventually("task 1 told task 0 runs again", || {
        let log = lock(&log);
        let restarted = log.events[mark..].iter().any(|e| e.1 == "restarted");
        (restarted && log.flagged.len() >= 2).then_some(())
    })
    .await;
    let took = killed_at.elapsed();
    sleep(QUIET).await;

    let log = lock(&log);
    assert_eq!(
        log.events[mark..],
        [
            (observer, "failed", PEER.to_string(), 0),
            (observer, "restarted", PEER.to_string(), 0),
        ],
        "after the kill: failed, then restarted, once each (before: {:?})",
        &log.events[..mark]
    );
    assert_eq!(log.runs[&1], vec![observer], "task 1 kept its run");
    assert_eq!(log.runs[&0].len(), 2, "task 0 ran twice: {:?}", log.runs);
    assert!(log.runs[&0][1] > log.runs[&0][0]);
    assert!(
        log.flagged.iter().all(|(_, answer)| answer == "Ok(())"),
        "{:?}",
        log.flagged
    );
    assert_eq!(
        log.received,
        vec![(observer, 0, "hello".to_string())],
        "the new run of task 0 flagging the same meta again is not delivered again"
    );
    println!(
        "neighbour events: before the kill {:?}; restarted {took:?} after it, {:?}",
        &log.events[..mark],
        started.elapsed()
    );
}

/// A neighbour that had not run yet when a run started, and then runs for
/// the first time, is no restart: `neighbour_restarted` is told only after
/// `neighbour_failed` (found questionable: at a job's start the first claim
/// of a neighbour was told as a restart, depending on claim order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_restart_is_told_for_a_neighbours_first_run() {
    let log = Arc::new(Mutex::new(NeighbourLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(NeighbourTask {
            log: shared.clone(),
        })
    }));
    // One place: one task runs, the other waits for the second node.
    let first = cluster.add(1).await;
    let job = cluster.start_job("startup", 2).await;
    eventually("one task running", || {
        (0..2).find(|&i| cluster.runner(&graph_task_id(&job, i)) == Some(first.clone()))
    })
    .await;
    cluster.add(1).await;
    cluster.wait_spread(&job, 2).await;
    sleep(QUIET).await;
    let log = lock(&log);
    assert_eq!(
        log.all_events,
        Vec::new(),
        "no neighbour failed or restarted; every task ran once: {:?}",
        log.runs
    );
}

// ---------------------------------------------------------------------------
// 8. Bad input
// ---------------------------------------------------------------------------

#[derive(Default)]
struct BadLog {
    /// (what, answer) of each call the task made.
    answers: Vec<(&'static str, Result<(), GraphError>)>,
}

/// Makes bad calls on its handle once it runs, and records the answers.
struct BadTask {
    log: Arc<Mutex<BadLog>>,
}

#[async_trait]
impl GraphTask for BadTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        if epoch.0 != 0 {
            return;
        }
        let long_link = "l".repeat(33);
        let too_big = "m".repeat(MAX_META_BYTES + 1);
        let just_fits = "m".repeat(MAX_META_BYTES);
        let calls: Vec<(&'static str, &str, &str)> = vec![
            ("upper case and a space", "Bad Link", "x"),
            ("an empty link", "", "x"),
            ("a 33-byte link", &long_link, "x"),
            ("a slash in the link", "a/b", "x"),
            ("an oversize meta", PEER, &too_big),
            ("a meta of the largest size", PEER, &just_fits),
            (
                "a well-formed link the topology does not have",
                "nolink",
                "x",
            ),
        ];
        for (what, link, meta) in calls {
            let answer = task.flag_meta(link, meta).await;
            lock(&self.log).answers.push((what, answer));
        }
        let answer = task
            .data_request(task.tasks(), "m", Vec::new())
            .await
            .map(|_| ());
        lock(&self.log)
            .answers
            .push(("a data request to a task beyond the job", answer));
    }

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }
}

fn invalid<T: std::fmt::Debug>(what: &str, answer: &Result<T, GraphError>) {
    match answer {
        Err(GraphError::Invalid(message)) => {
            assert!(!message.is_empty(), "{what}: an empty message")
        }
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_as_invalid_and_overwrites_nothing() {
    let started = Instant::now();
    let log = Arc::new(Mutex::new(BadLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(BadTask {
            log: shared.clone(),
        })
    }));
    cluster.add(4).await;
    let jobs = cluster.jobs.clone();

    // Job names.
    for name in ["", "a.b", "with space", "slash/y", "é", &"x".repeat(65)] {
        invalid(&format!("job name {name:?}"), &JobName::new(name));
    }
    assert!(JobName::new("x".repeat(64)).is_ok());
    // Job specs.
    let name = JobName::new("bad").unwrap();
    for (what, bad) in [
        ("0 tasks", spec(KIND, 0)),
        ("too many tasks", spec(KIND, MAX_JOB_TASKS + 1)),
        ("an empty kind", spec("", 1)),
        ("a 65-byte kind", spec(&"k".repeat(65), 1)),
    ] {
        invalid(what, &jobs.start(&name, &bad).await);
    }
    assert_eq!(
        jobs.job(&name).await.unwrap(),
        None,
        "nothing written for a bad job"
    );
    assert!(
        jobs.coordinator()
            .task_view(&graph_task_id(&name, 0))
            .await
            .unwrap()
            .is_none(),
        "no task submitted for a bad job"
    );
    // Calls on a job that does not exist.
    assert!(matches!(
        jobs.inc_epoch(&name, JobEpoch(0)).await,
        Err(GraphError::NoSuchJob(_))
    ));
    assert!(matches!(
        jobs.remove(&name).await,
        Err(GraphError::NoSuchJob(_))
    ));

    // A job that exists is not overwritten, nor its epoch reset.
    let original = spec(KIND, 1);
    jobs.start(&name, &original).await.unwrap();
    assert_eq!(
        jobs.inc_epoch(&name, JobEpoch(0)).await.unwrap(),
        EpochMove::Moved(JobEpoch(1))
    );
    let again = jobs.start(&name, &spec("other", 3)).await;
    assert!(
        matches!(&again, Err(GraphError::JobExists(job)) if job == "bad"),
        "{again:?}"
    );
    assert_eq!(jobs.job(&name).await.unwrap(), Some(original));
    let at_one = EpochRecord {
        epoch: JobEpoch(1),
        shutdown: false,
    };
    assert_eq!(jobs.epoch(&name).await.unwrap(), Some(at_one));
    for index in 1..3 {
        assert!(
            jobs.coordinator()
                .task_view(&graph_task_id(&name, index))
                .await
                .unwrap()
                .is_none(),
            "no task {index} submitted by the refused start"
        );
    }
    // A stale compare-and-swap is an ordinary answer, not an error.
    assert_eq!(
        jobs.inc_epoch(&name, JobEpoch(0)).await.unwrap(),
        EpochMove::Lost(at_one)
    );

    // Bad calls on a task's handle (the job is in epoch 1 now: start a
    // second one for the task's calls, which it makes in epoch 0).
    cluster.start_job("calls", 1).await;
    eventually("the task's calls", || {
        (lock(&log).answers.len() >= 8).then_some(())
    })
    .await;
    let log = lock(&log);
    let mut unknown_link = None;
    for (what, answer) in &log.answers {
        match *what {
            "a meta of the largest size" => {
                assert!(answer.is_ok(), "{what}: {answer:?}")
            }
            "a well-formed link the topology does not have" => {
                unknown_link = Some(show(answer));
            }
            _ => invalid(what, answer),
        }
    }
    println!(
        "bad input: a link the topology does not have: {}; {:?}",
        unknown_link.unwrap_or_default(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Found as framework bugs by this suite; they hold since the fixes
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LateCallbackLog {
    /// (task, the epoch its callback was in, the handle's epoch, answer).
    moves: Vec<(u32, u64, u64, Outcome)>,
    entered: BTreeMap<u32, Vec<u64>>,
}

/// In its epoch-0 callback, task 0 moves the job on at once; task 1 is slow:
/// it moves it on only once task 0 has, still inside its epoch-0 callback.
struct LateCallbackTask {
    log: Arc<Mutex<LateCallbackLog>>,
}

#[async_trait]
impl GraphTask for LateCallbackTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        lock(&self.log)
            .entered
            .entry(task.task_id())
            .or_default()
            .push(epoch.0);
        if epoch.0 != 0 {
            return;
        }
        if task.task_id() == 1 && !wait_for(|| lock(&self.log).moves.iter().any(|m| m.0 == 0)).await
        {
            return;
        }
        let at = task.epoch().0;
        let answer = task.inc_epoch().await.map_err(|e| e.to_string());
        lock(&self.log)
            .moves
            .push((task.task_id(), epoch.0, at, answer));
    }

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err("no data here".into())
    }
}

/// A callback still handling epoch e that calls `inc_epoch` after another
/// task moved e → e+1 loses the race, as the compare-and-swap promises: its
/// handle's epoch is the one its callbacks were told, not the one the store
/// has moved to (found as a bug: it once moved the job from e+1 to e+2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_callback_loses_the_epoch_race_and_skips_no_epoch() {
    let log = Arc::new(Mutex::new(LateCallbackLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(LateCallbackTask {
            log: shared.clone(),
        })
    }));
    cluster.add(2).await;
    let job = cluster.start_job("late", 2).await;
    eventually("both tasks moved", || {
        (lock(&log).moves.len() >= 2).then_some(())
    })
    .await;
    sleep(QUIET).await;
    let now = cluster.jobs.epoch(&job).await.unwrap().map(|r| r.epoch);
    let log = lock(&log);
    println!("moves: {:?}; entered: {:?}", log.moves, log.entered);
    let slow = log.moves.iter().find(|m| m.0 == 1).expect("task 1 moved");
    assert_eq!(
        slow.3,
        Ok(EpochMove::Lost(EpochRecord {
            epoch: JobEpoch(1),
            shutdown: false
        })),
        "task 1's callback was in epoch 0, which task 0 had already ended: it must lose \
         (its handle said epoch {})",
        slow.2
    );
    assert_eq!(
        now,
        Some(JobEpoch(1)),
        "two tasks ended epoch 0; nobody ended epoch 1"
    );
}

#[derive(Default)]
struct RaceServeLog {
    /// Job epochs serve_data started in.
    started: Vec<u64>,
}

/// serve_data answers as soon as the job epoch it started in ends, with the
/// epoch the handle is in by then.
struct RaceServeTask {
    log: Arc<Mutex<RaceServeLog>>,
}

#[async_trait]
impl GraphTask for RaceServeTask {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}

    async fn enter_epoch(&self, _task: &TaskHandle, _epoch: JobEpoch) {}

    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}

    async fn serve_data(
        &self,
        task: &TaskHandle,
        _from: u32,
        _method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        lock(&self.log).started.push(task.epoch().0);
        task.epoch_ended().await;
        Ok(format!("computed in job epoch {}", task.epoch().0).into_bytes())
    }
}

/// The server never answers a request after its job epoch ended: the end
/// of the epoch wins a tie with `serve_data`'s answer and is looked at
/// again after it (found as a bug: an unbiased race answered about half of
/// such requests). proto/graph.proto promises "the server answers only in
/// the same [job epoch]"; a requester whose own view has not seen the move
/// yet would take a late answer as its epoch's. The direct client here
/// plays that requester.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_never_answers_a_request_after_its_epoch_ended() {
    const ROUNDS: u64 = 12;
    let log = Arc::new(Mutex::new(RaceServeLog::default()));
    let shared = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(RaceServeTask {
            log: shared.clone(),
        })
    }));
    let name = cluster.add(1).await;
    let job = cluster.start_job("late-answer", 1).await;
    let task = graph_task_id(&job, 0);
    let graph = cluster.graph(&name).clone();
    let mut answered = Vec::new();
    for epoch in 0..ROUNDS {
        eventually("the run in the epoch", || {
            graph
                .runs()
                .contains(&(task.clone(), JobEpoch(epoch)))
                .then_some(())
        })
        .await;
        let asking = tokio::spawn({
            let graph = graph.clone();
            async move { ask(&graph, request("late-answer", 0, epoch, epoch, "m")).await }
        });
        eventually("serve_data started", || {
            lock(&log).started.contains(&epoch).then_some(())
        })
        .await;
        assert_eq!(
            cluster.jobs.inc_epoch(&job, JobEpoch(epoch)).await.unwrap(),
            EpochMove::Moved(JobEpoch(epoch + 1))
        );
        let outcome = asking.await.unwrap();
        if let data_reply::Outcome::Output(output) = outcome {
            answered.push((epoch, String::from_utf8_lossy(&output).into_owned()));
        }
    }
    assert!(
        answered.is_empty(),
        "{} of {ROUNDS} requests were answered after their epoch ended: {answered:?}",
        answered.len()
    );
}
