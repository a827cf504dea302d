//! Primary/backup hot standby, probed adversarially (review of the backup
//! feature). Each test states the promise it checks; each failed on the
//! code as first reviewed, and holds since the fixes (the primary writes
//! backup records itself, handovers, the grace counted per failover,
//! bounded transfers).
//!
//! * A backup on a node with no free slot never takes over: after
//!   `TAKEOVER_GRACE` another node claims the task cold and every
//!   acknowledged update is lost.
//! * `BackupBalancer::leaving` keeps a task's entry after a backup took it
//!   over: at the next failover of that task, that node skips the grace and
//!   claims it cold, racing the node that holds the backup.
//! * The `Backup` endpoint accepts any request naming the current claim
//!   epoch: a record of the current epoch that is not one of the primary's
//!   members is never cleaned up, and a request to a live backup replaces
//!   its state and its sequence (so the primary's later entries are taken
//!   as "already applied"). Either way a stale backup takes over.
//! * One unresponsive backup candidate holds the run's log for the whole
//!   transfer timeout on every placement pass, stalling `update` far longer
//!   than `UPDATE_PATIENCE`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::proto::graph_client::GraphClient;
use eretes_graph::proto::BackupRequest;
use eretes_graph::{
    graph_task_id, BackupRecord, GraphKeys, GraphTask, JobEpoch, JobName, TaskHandle,
    TAKEOVER_GRACE, UPDATE_PATIENCE,
};
use eretes_protocol::NodeName;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::*;
use tokio::time::{sleep, Instant};

use crate::support::*;

/// What the counter tasks of one test saw.
#[derive(Default)]
struct Probe {
    /// (task, claim epoch of the run, entry, when) for every `update` that
    /// returned Ok.
    acked: Mutex<Vec<(u32, i64, u64, Instant)>>,
    /// (task, claim epoch of the new primary run, its state) at each
    /// `became_primary`.
    promoted: Mutex<Vec<(u32, i64, Vec<u64>)>>,
    /// (task, claim epoch) of each `init` (cold start).
    inits: Mutex<Vec<(u32, i64)>>,
    /// While set, `became_backup` hangs (an unresponsive candidate).
    hang_backups: AtomicBool,
    backups: AtomicU64,
}

/// A task whose state is the list of entries it applied; it appends the
/// next number for as long as its run lasts.
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

fn counters() -> (Arc<Probe>, Cluster) {
    counters_on(EmbeddedStore::new())
}

fn counters_on(store: Arc<dyn Store>) -> (Arc<Probe>, Cluster) {
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

async fn start_with_backups(cluster: &Cluster, name: &str, tasks: u32, backups: u32) -> JobName {
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

/// The backup records of task `index` of `job` in the store.
async fn records(cluster: &Cluster, job: &JobName, index: u32) -> Vec<(NodeName, BackupRecord)> {
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

fn acked_by(probe: &Probe, claim: i64) -> Vec<u64> {
    lock(&probe.acked)
        .iter()
        .filter(|(_, c, _, _)| *c == claim)
        .map(|(_, _, entry, _)| *entry)
        .collect()
}

/// Wait until task `index` runs, has exactly one backup recorded for its
/// run, and `update` returned for at least `entries` entries of that run:
/// (primary's node, backup's node, claim epoch).
async fn backed_up(
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
                        assert_ne!(*backup, primary);
                        return (primary, backup.clone(), claim);
                    }
                }
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until task `index` of `job` has a run with a claim epoch above
/// `after` that reached `init` or `became_primary`: Ok(its state) if a
/// backup took over, Err(claim) if it started cold.
async fn next_run(probe: &Probe, index: u32, after: i64) -> Result<(i64, Vec<u64>), i64> {
    eventually("the task running again", || {
        if let Some((_, claim, state)) = lock(&probe.promoted)
            .iter()
            .find(|(i, claim, _)| *i == index && *claim > after)
        {
            return Some(Ok((*claim, state.clone())));
        }
        lock(&probe.inits)
            .iter()
            .find(|(i, claim)| *i == index && *claim > after)
            .map(|(_, claim)| Err(*claim))
    })
    .await
}

/// The state a backup took over with holds every acknowledged entry.
fn assert_no_update_lost(state: &[u64], acked: &[u64]) {
    let expected: Vec<u64> = (1..=state.len() as u64).collect();
    assert_eq!(state, expected, "the log applied in order, each entry once");
    let last = acked.last().copied().unwrap_or(0);
    assert!(
        state.len() as u64 >= last,
        "entry {last} was acknowledged but the backup took over at {}",
        state.len()
    );
}

// ---------------------------------------------------------------------------
// 1. A backup whose node has no free slot never takes over.
// ---------------------------------------------------------------------------

/// Two tasks on two one-slot nodes: each task's only possible backup is the
/// node that runs the other task. A spare joins, then task 0's primary
/// dies. The backup (on a full node) never claims; after `TAKEOVER_GRACE`
/// the spare claims task 0 cold, and every acknowledged update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_a_full_node_takes_over_instead_of_a_cold_start() {
    let (probe, mut cluster) = counters();
    cluster.add(1).await;
    cluster.add(1).await;
    let job = start_with_backups(&cluster, "full", 2, 1).await;
    cluster.wait_spread(&job, 2).await;
    let (primary, _backup, first) = backed_up(&cluster, &probe, &job, 0, 50).await;
    cluster.add(1).await; // a spare, with a free slot
    sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    cluster.kill(&primary);
    match next_run(&probe, 0, first).await {
        Ok((_, state)) => assert_no_update_lost(&state, &acked_by(&probe, first)),
        Err(claim) => panic!(
            "task 0 started cold (claim {claim}, {:?} after the kill) although a live backup \
             held all {} acknowledged updates: they are lost",
            killed.elapsed(),
            acked_by(&probe, first).len()
        ),
    }
}

// ---------------------------------------------------------------------------
// 2. A stale `leaving` entry skips the grace at the task's next failover.
// ---------------------------------------------------------------------------

/// A store that delays a node's transactions by `delay_ms` (its claims and
/// backup records land late).
struct SlowTxns {
    inner: Arc<dyn Store>,
    delay_ms: Arc<AtomicU64>,
}

#[async_trait]
impl Store for SlowTxns {
    async fn get(&self, r: GetRequest) -> StoreResult<GetResponse> {
        self.inner.get(r).await
    }
    async fn put(&self, r: PutRequest) -> StoreResult<PutResponse> {
        self.inner.put(r).await
    }
    async fn delete(&self, r: DeleteRequest) -> StoreResult<DeleteResponse> {
        self.inner.delete(r).await
    }
    async fn txn(&self, t: Txn) -> StoreResult<TxnResponse> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            sleep(Duration::from_millis(delay)).await;
        }
        self.inner.txn(t).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, l: LeaseId) -> StoreResult<Duration> {
        self.inner.lease_keepalive(l).await
    }
    async fn lease_revoke(&self, l: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(l).await
    }
    async fn compact(&self, r: Revision) -> StoreResult<()> {
        self.inner.compact(r).await
    }
    async fn watch(&self, range: KeyRange, rev: Revision) -> StoreResult<WatchStream> {
        self.inner.watch(range, rev).await
    }
}

/// First failover: the spares leave the task to the backup (each records
/// when, in `BackupBalancer::leaving`), and the backup takes over; those
/// entries stay. Second failover, long after: a spare finds its old entry
/// past the grace and claims the task cold at once, although a live node
/// holds a current backup. (Made deterministic: the fair balancer lets only
/// the lower-named of two idle nodes claim, so the lower-named spare is kept
/// from becoming the new backup, and the new backup's claim is slowed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failover_leaves_the_task_to_its_backup_for_the_grace() {
    let inner: Arc<dyn Store> = EmbeddedStore::new();
    let (probe, mut cluster) = counters_on(inner.clone());
    let mut slow: HashMap<NodeName, Arc<AtomicU64>> = HashMap::new();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let flag = Arc::new(AtomicU64::new(0));
        let store: Arc<dyn Store> = Arc::new(SlowTxns {
            inner: inner.clone(),
            delay_ms: flag.clone(),
        });
        let name = cluster.add_on(store, 1).await;
        slow.insert(name.clone(), flag);
        nodes.push(name);
    }
    let job = start_with_backups(&cluster, "twice", 1, 1).await;
    let (primary, backup, first) = backed_up(&cluster, &probe, &job, 0, 30).await;
    cluster.kill(&primary);
    let (second, state) = next_run(&probe, 0, first)
        .await
        .expect("the first failover is a takeover");
    assert_no_update_lost(&state, &acked_by(&probe, first));
    // Both other nodes left the task to its backup's node (and kept a note
    // of when they began to); one of them is the new backup.
    let (now_primary, holder, claim) = backed_up(&cluster, &probe, &job, 0, 30).await;
    assert_eq!((&now_primary, claim), (&backup, second));
    assert!(nodes.contains(&holder) && holder != primary && holder != backup);
    // Well past the grace of the first failover.
    sleep(TAKEOVER_GRACE + Duration::from_secs(1)).await;
    slow[&holder].store(600, Ordering::SeqCst);
    let killed = Instant::now();
    cluster.kill(&now_primary);
    let outcome = next_run(&probe, 0, second).await;
    let after = killed.elapsed();
    let runner = cluster.runner(&graph_task_id(&job, 0));
    match outcome {
        Ok((_, state)) => {
            assert_no_update_lost(&state, &acked_by(&probe, second));
            // The others left it to the backup's node (slowed as it is)
            // for the grace, again: it runs there.
            assert_eq!(
                runner,
                Some(holder.clone()),
                "claimed {after:?} after the kill"
            );
        }
        Err(claim) => panic!(
            "task 0 started cold on {runner:?} (claim {claim}) {after:?} after the kill (lease \
             {TTL:?}, grace {TAKEOVER_GRACE:?}), while {holder} held a current backup: a stale \
             `leaving` entry skipped the takeover grace"
        ),
    }
}

// ---------------------------------------------------------------------------
// 3. The Backup endpoint plants stale backups.
// ---------------------------------------------------------------------------

async fn client_of(cluster: &Cluster, node: &NodeName) -> GraphClient<tonic::transport::Channel> {
    let address = format!("http://{}", cluster.graph(node).address());
    GraphClient::connect(address).await.unwrap()
}

/// A Backup request naming the current claim, sent to a node that is not
/// one of the primary's backups (as a lost reply of a real transfer would
/// leave it): its record, of the current claim, is never cleaned up by the
/// primary, and it misses every later update. The primary and its real
/// backup die together: the planted one takes over with an empty state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_the_primary_does_not_know_never_takes_over() {
    let (probe, mut cluster) = counters();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(cluster.add(1).await);
    }
    let job = start_with_backups(&cluster, "planted", 1, 1).await;
    let (primary, backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    let spare = nodes
        .iter()
        .find(|n| **n != primary && **n != backup)
        .unwrap()
        .clone();
    let reply = client_of(&cluster, &spare)
        .await
        .backup(BackupRequest {
            job: job.to_string(),
            task: 0,
            primary_claim_epoch: claim,
            primary_node: primary.to_string(),
            sequence: 0,
            state: b"[]".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!("planted backup request: refused={:?}", reply.refused);
    // Time for the primary's keeper to notice and end a backup it did not
    // bring up.
    sleep(Duration::from_millis(2500)).await;
    cluster.kill(&primary);
    cluster.kill(&backup);
    if let Ok((_, state)) = next_run(&probe, 0, claim).await {
        assert_no_update_lost(&state, &acked_by(&probe, claim));
    }
}

/// A Backup request naming the current claim, sent to the live backup, with
/// a state of nothing and a far sequence: the backup's state is replaced,
/// its record stays, and the primary's later entries are answered "already
/// applied", so `update` goes on returning Ok. The primary dies: the backup
/// takes over with none of the acknowledged updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_transfer_cannot_rewind_a_live_backup() {
    let (probe, mut cluster) = counters();
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = start_with_backups(&cluster, "rewound", 1, 1).await;
    let (primary, backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    let reply = client_of(&cluster, &backup)
        .await
        .backup(BackupRequest {
            job: job.to_string(),
            task: 0,
            primary_claim_epoch: claim,
            primary_node: primary.to_string(),
            sequence: 1 << 40,
            state: b"[]".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!("repeated transfer: refused={:?}", reply.refused);
    let before = acked_by(&probe, claim).len();
    sleep(Duration::from_millis(1000)).await;
    eprintln!(
        "updates acknowledged after it: {}",
        acked_by(&probe, claim).len() - before
    );
    cluster.kill(&primary);
    if let Ok((_, state)) = next_run(&probe, 0, claim).await {
        assert_no_update_lost(&state, &acked_by(&probe, claim));
    }
}

// ---------------------------------------------------------------------------
// 4. An unresponsive candidate stalls updates.
// ---------------------------------------------------------------------------

/// The backup dies; the only candidate left accepts the transfer but never
/// finishes `became_backup`. Each placement pass holds the run's log for
/// the whole transfer timeout (10 s) and starts again a second later, so
/// `update` waits about 10 s out of every 11 — far more than
/// `UPDATE_PATIENCE`, the most one unresponsive backup should cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_candidate_does_not_stall_updates() {
    let (probe, mut cluster) = counters();
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = start_with_backups(&cluster, "hung", 1, 1).await;
    let (_primary, backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    probe.hang_backups.store(true, Ordering::SeqCst);
    let from = Instant::now();
    cluster.kill(&backup);
    sleep(Duration::from_secs(16)).await;
    let mut times: Vec<Instant> = lock(&probe.acked)
        .iter()
        .filter(|(i, c, _, at)| *i == 0 && *c == claim && *at >= from)
        .map(|(.., at)| *at)
        .collect();
    times.insert(0, from);
    times.push(Instant::now());
    let longest = times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap();
    let bound = UPDATE_PATIENCE + Duration::from_secs(1);
    assert!(
        longest <= bound,
        "update stalled for {longest:?} (more than {bound:?}) while a candidate hung \
         ({} updates in 16 s)",
        times.len() - 2
    );
}
