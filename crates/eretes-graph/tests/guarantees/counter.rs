//! The job kind the backup tests share: a counter whose state is the list of
//! entries it applied. Each entry is the one after the last, so a state a
//! backup took over with shows at a glance whether an entry was lost,
//! repeated or reordered, and can be held against every `update` the
//! primary was told had succeeded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::proto::graph_client::GraphClient;
use eretes_graph::{
    graph_task_id, BackupRecord, GraphKeys, GraphTask, JobEpoch, JobName, TaskHandle,
};
use eretes_protocol::NodeName;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{GetRequest, KeyRange, Store};
use tokio::time::{sleep, Instant};

use crate::support::*;

/// What the counter tasks of one test saw.
#[derive(Default)]
pub(crate) struct Probe {
    /// (task, claim epoch of the run, entry, when) for every `update` that
    /// returned Ok.
    pub(crate) acked: Mutex<Vec<(u32, i64, u64, Instant)>>,
    /// (task, claim epoch of the new primary run, its state) at each
    /// `became_primary`.
    pub(crate) promoted: Mutex<Vec<(u32, i64, Vec<u64>)>>,
    /// (task, claim epoch) of each `init` (cold start).
    pub(crate) inits: Mutex<Vec<(u32, i64)>>,
    /// While set, `became_backup` hangs (an unresponsive candidate).
    pub(crate) hang_backups: AtomicBool,
    /// `became_backup` calls.
    pub(crate) backups: AtomicU64,
}

/// A task whose state is the list of entries it applied; it appends the
/// next number to its log for as long as its run lasts.
struct Counter {
    index: u32,
    state: Mutex<Vec<u64>>,
    probe: Arc<Probe>,
}

#[async_trait]
impl GraphTask for Counter {
    async fn init(&self, task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {
        lock(&self.probe.inits).push((self.index, task.claim_epoch()));
    }

    async fn enter_epoch(&self, task: &TaskHandle, _epoch: JobEpoch) {
        // Updates until the run ends (this callback holds the run's event
        // loop, which these tests do not need).
        for _ in 0..100_000 {
            let next = lock(&self.state).last().copied().unwrap_or(0) + 1;
            match task.update(&next.to_le_bytes()).await {
                Ok(()) => lock(&self.probe.acked).push((
                    self.index,
                    task.claim_epoch(),
                    next,
                    Instant::now(),
                )),
                Err(_) => return,
            }
            sleep(Duration::from_millis(2)).await;
        }
    }

    async fn backup_state(&self) -> Vec<u8> {
        serde_json::to_vec(&*lock(&self.state)).unwrap()
    }

    async fn became_backup(&self, state: Vec<u8>) {
        if self.probe.hang_backups.load(Ordering::SeqCst) {
            sleep(Duration::from_secs(60)).await;
        }
        *lock(&self.state) = serde_json::from_slice(&state).unwrap();
        self.probe.backups.fetch_add(1, Ordering::SeqCst);
    }

    async fn apply_update(&self, entry: &[u8]) {
        let entry = u64::from_le_bytes(entry.try_into().unwrap());
        lock(&self.state).push(entry);
    }

    async fn became_primary(&self, task: &TaskHandle) {
        let state = lock(&self.state).clone();
        lock(&self.probe.promoted).push((self.index, task.claim_epoch(), state));
    }
}

/// A cluster whose nodes run counters, and the probe they report to.
pub(crate) fn counters() -> (Arc<Probe>, Cluster) {
    counters_on(EmbeddedStore::new())
}

/// As [`counters`], on `store`: for a test that puts a faulty store between
/// some nodes and the one they share.
pub(crate) fn counters_on(store: Arc<dyn Store>) -> (Arc<Probe>, Cluster) {
    let probe = Arc::new(Probe::default());
    let for_kind = probe.clone();
    let cluster = Cluster::on(
        store,
        kind(move |index| {
            Arc::new(Counter {
                index,
                state: Mutex::new(Vec::new()),
                probe: for_kind.clone(),
            }) as Arc<dyn GraphTask>
        }),
    );
    (probe, cluster)
}

/// Start the counter job `name` of `tasks` tasks, each with `backups`
/// backups (the one setting [`Cluster::start_job`] leaves at 0).
pub(crate) async fn start_with_backups(
    cluster: &Cluster,
    name: &str,
    tasks: u32,
    backups: u32,
) -> JobName {
    let job = JobName::new(name).unwrap();
    let mut spec = spec(KIND, tasks);
    spec.backups = backups;
    cluster
        .jobs
        .start(&job, &spec)
        .await
        .expect("the job starts");
    job
}

/// [`counters`] with `nodes` one-slot nodes, then the job `name` on them
/// (see [`start_with_backups`]): one slot each keeps every run on a node of
/// its own, so a kill ends exactly one run and the other nodes are the
/// candidates to back it up or take it over. The probe, the cluster, its
/// nodes in the order they started, and the job.
pub(crate) async fn counter_job(
    nodes: usize,
    name: &str,
    tasks: u32,
    backups: u32,
) -> (Arc<Probe>, Cluster, Vec<NodeName>, JobName) {
    let (probe, mut cluster) = counters();
    let mut names = Vec::new();
    for _ in 0..nodes {
        names.push(cluster.add(1).await);
    }
    let job = start_with_backups(&cluster, name, tasks, backups).await;
    (probe, cluster, names, job)
}

/// The node of `nodes` that neither runs the task (on `primary`) nor backs
/// it up (on `backup`): the one a stray or stale request must not turn into
/// a backup.
pub(crate) fn spare(nodes: &[NodeName], primary: &NodeName, backup: &NodeName) -> NodeName {
    nodes
        .iter()
        .find(|node| *node != primary && *node != backup)
        .expect("a node left over")
        .clone()
}

/// The backup records of task `index` of `job` in the store: node → record.
/// The store, not a node's say, is what decides who may take over.
pub(crate) async fn records(
    cluster: &Cluster,
    job: &JobName,
    index: u32,
) -> Vec<(NodeName, BackupRecord)> {
    let prefix = GraphKeys::new(&cluster.ns).backups_of(job, index);
    let got = cluster
        .store
        .get(GetRequest::new(KeyRange::prefix(prefix.clone())))
        .await
        .unwrap();
    got.kvs
        .iter()
        .map(|kv| {
            let node = NodeName::new(&kv.key[prefix.len()..]).unwrap();
            (node, serde_json::from_slice(&kv.value).unwrap())
        })
        .collect()
}

/// The entries acknowledged to the run of claim `claim`: what a backup
/// taking that run over must hold.
pub(crate) fn acked_by(probe: &Probe, claim: i64) -> Vec<u64> {
    lock(&probe.acked)
        .iter()
        .filter(|(_, c, _, _)| *c == claim)
        .map(|(_, _, entry, _)| *entry)
        .collect()
}

/// Wait until task `index` of `job` runs, has exactly one backup recorded
/// for its run, and `update` returned for at least `entries` entries of
/// that run, so that a failover has something to lose: (primary's node,
/// backup's node, claim epoch).
pub(crate) async fn backed_up(
    cluster: &Cluster,
    probe: &Probe,
    job: &JobName,
    index: u32,
    entries: usize,
) -> (NodeName, NodeName, i64) {
    let task = graph_task_id(job, index);
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no backup came up");
        if let Some(primary) = cluster.runner(&task) {
            let last = lock(&probe.acked)
                .iter()
                .rev()
                .find(|(i, ..)| *i == index)
                .map(|(_, claim, ..)| *claim);
            if let Some(claim) = last {
                let of_run = acked_by(probe, claim).len();
                if let [(backup, record)] = records(cluster, job, index).await.as_slice() {
                    if record.primary_claim_epoch == claim && of_run >= entries {
                        assert_ne!(*backup, primary, "a backup on its primary's node");
                        return (primary, backup.clone(), claim);
                    }
                }
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// The first takeover of task `index` by a run with a claim epoch above
/// `after`, if one has happened: (its claim epoch, the state it took over
/// with).
fn takeover_seen(probe: &Probe, index: u32, after: i64) -> Option<(i64, Vec<u64>)> {
    lock(&probe.promoted)
        .iter()
        .find(|(i, claim, _)| *i == index && *claim > after)
        .map(|(_, claim, state)| (*claim, state.clone()))
}

/// Wait for the takeover of task `index` by a run other than `after`'s:
/// for a test where only a takeover is right, so anything else times out.
pub(crate) async fn takeover_after(probe: &Probe, index: u32, after: i64) -> (i64, Vec<u64>) {
    eventually("a backup taking over", || {
        takeover_seen(probe, index, after)
    })
    .await
}

/// Wait until task `index` has a run with a claim epoch above `after` that
/// reached `init` or `became_primary`: Ok(its claim, its state) if a backup
/// took over, Err(claim) if it started cold. For a test that must tell a
/// cold start apart (to fail on it with its own message, or to accept it).
pub(crate) async fn next_run(
    probe: &Probe,
    index: u32,
    after: i64,
) -> Result<(i64, Vec<u64>), i64> {
    eventually("the task running again", || {
        if let Some(run) = takeover_seen(probe, index, after) {
            return Some(Ok(run));
        }
        lock(&probe.inits)
            .iter()
            .find(|(i, claim)| *i == index && *claim > after)
            .map(|(_, claim)| Err(*claim))
    })
    .await
}

/// The state a backup took over with holds every acknowledged entry:
/// `state` is 1, 2, …, n with n at least the last entry of `acked`.
pub(crate) fn assert_no_update_lost(state: &[u64], acked: &[u64]) {
    let expected: Vec<u64> = (1..=state.len() as u64).collect();
    assert_eq!(state, expected, "the log applied in order, each entry once");
    let last = acked.last().copied().unwrap_or(0);
    assert!(
        state.len() as u64 >= last,
        "entry {last} was acknowledged but the backup took over at {}",
        state.len()
    );
}

/// A client of `node`'s graph endpoints of its own, so a test can send
/// them what no well-behaved peer would.
pub(crate) async fn client_of(
    cluster: &Cluster,
    node: &NodeName,
) -> GraphClient<tonic::transport::Channel> {
    let address = format!("http://{}", cluster.graph(node).address());
    GraphClient::connect(address).await.unwrap()
}
