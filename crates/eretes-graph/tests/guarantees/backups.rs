//! Primary/backup hot standby: a backup takes over with every update the
//! primary's `update` returned for, a new backup is brought up after each
//! takeover, a backup that stops applying is given up before `update`
//! returns (so it can never take over), and the backup endpoints refuse
//! what they must.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::proto::graph_client::GraphClient;
use eretes_graph::proto::{BackupRequest, UpdateRequest};
use eretes_graph::{
    graph_task_id, BackupRecord, GraphError, GraphKeys, GraphTask, JobEpoch, JobName, TaskHandle,
    UPDATE_PATIENCE,
};
use eretes_protocol::NodeName;
use eretes_store::{GetRequest, KeyRange};

use super::support::*;

/// What the counter tasks of one test saw.
#[derive(Default)]
struct Probe {
    /// (claim epoch of the primary run, entry) for every `update` that
    /// returned Ok.
    acked: Mutex<Vec<(i64, u64)>>,
    /// (claim epoch of the new primary run, its state) at each
    /// `became_primary`.
    promoted: Mutex<Vec<(i64, Vec<u64>)>>,
    /// `init` calls (cold starts).
    inits: AtomicU64,
    /// `became_backup` calls.
    backups: AtomicU64,
}

/// A task whose state is the list of entries it applied; it appends the
/// next number to its log for as long as its run lasts.
struct Counter {
    state: Mutex<Vec<u64>>,
    probe: Arc<Probe>,
}

#[async_trait]
impl GraphTask for Counter {
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {
        self.probe.inits.fetch_add(1, Ordering::SeqCst);
    }

    async fn enter_epoch(&self, task: &TaskHandle, _epoch: JobEpoch) {
        // Updates until the run ends (this callback holds the run's event
        // loop, which this test does not need).
        for _ in 0..100_000 {
            let next = lock(&self.state).last().copied().unwrap_or(0) + 1;
            match task.update(&next.to_le_bytes()).await {
                Ok(()) => lock(&self.probe.acked).push((task.claim_epoch(), next)),
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn backup_state(&self) -> Vec<u8> {
        serde_json::to_vec(&*lock(&self.state)).unwrap()
    }

    async fn became_backup(&self, state: Vec<u8>) {
        *lock(&self.state) = serde_json::from_slice(&state).unwrap();
        self.probe.backups.fetch_add(1, Ordering::SeqCst);
    }

    async fn apply_update(&self, entry: &[u8]) {
        let entry = u64::from_le_bytes(entry.try_into().unwrap());
        lock(&self.state).push(entry);
    }

    async fn became_primary(&self, task: &TaskHandle) {
        let state = lock(&self.state).clone();
        lock(&self.probe.promoted).push((task.claim_epoch(), state));
    }
}

fn counters() -> (Arc<Probe>, Cluster) {
    let probe = Arc::new(Probe::default());
    let for_kind = probe.clone();
    let cluster = Cluster::new(kind(move |_| {
        Arc::new(Counter {
            state: Mutex::new(Vec::new()),
            probe: for_kind.clone(),
        }) as Arc<dyn GraphTask>
    }));
    (probe, cluster)
}

async fn start_with_backups(cluster: &Cluster, name: &str, backups: u32) -> JobName {
    let job = JobName::new(name).unwrap();
    let mut spec = spec(KIND, 1);
    spec.backups = backups;
    cluster
        .jobs
        .start(&job, &spec)
        .await
        .expect("the job starts");
    job
}

/// The backup records of task 0 of `job` in the store: node → record.
async fn records(cluster: &Cluster, job: &JobName) -> Vec<(NodeName, BackupRecord)> {
    let prefix = GraphKeys::new(&cluster.ns).backups_of(job, 0);
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

/// Wait until task 0 of `job` runs, has one backup recorded for its run,
/// and `update` returned for at least `entries` entries of that run; the
/// primary's node, the backup's node and the run's claim epoch.
async fn backed_up(
    cluster: &Cluster,
    probe: &Probe,
    job: &JobName,
    entries: usize,
) -> (NodeName, NodeName, i64) {
    let task = graph_task_id(job, 0);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no backup came up");
        if let Some(primary) = cluster.runner(&task) {
            let acked = lock(&probe.acked).clone();
            if let Some(&(claim, _)) = acked.last() {
                let of_run = acked.iter().filter(|(c, _)| *c == claim).count();
                let records = records(cluster, job).await;
                if let [(backup, record)] = records.as_slice() {
                    if record.primary_claim_epoch == claim && of_run >= entries {
                        assert_ne!(*backup, primary, "a backup on its primary's node");
                        return (primary, backup.clone(), claim);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The entries acknowledged to the run of claim `claim`.
fn acked_by(probe: &Probe, claim: i64) -> Vec<u64> {
    lock(&probe.acked)
        .iter()
        .filter(|(c, _)| *c == claim)
        .map(|(_, entry)| *entry)
        .collect()
}

/// Wait for the takeover by a run other than `after`'s: its claim epoch
/// and the state it took over with.
async fn takeover_after(probe: &Probe, after: i64) -> (i64, Vec<u64>) {
    eventually("a backup taking over", || {
        lock(&probe.promoted)
            .iter()
            .find(|(claim, _)| *claim > after)
            .cloned()
    })
    .await
}

/// `state` is 1, 2, …, n with n at least the last acknowledged entry.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_over_with_every_acknowledged_update_and_a_new_one_comes_up() {
    let (probe, mut cluster) = counters();
    for _ in 0..3 {
        cluster.add(1).await;
    }
    let job = start_with_backups(&cluster, "standby", 1).await;
    let (primary, backup, first) = backed_up(&cluster, &probe, &job, 50).await;
    cluster.kill(&primary);
    let (second, state) = takeover_after(&probe, first).await;
    assert_no_update_lost(&state, &acked_by(&probe, first));
    assert_eq!(
        cluster.runner(&graph_task_id(&job, 0)),
        Some(backup.clone()),
        "the node holding the backup took the task over"
    );
    assert_eq!(probe.inits.load(Ordering::SeqCst), 1, "no cold start");

    // The new primary brings up a new backup on the third node (the only
    // one left), with its state, and goes on updating.
    let (now_primary, new_backup, claim) = backed_up(&cluster, &probe, &job, 50).await;
    assert_eq!((now_primary.clone(), claim), (backup, second));
    assert!(probe.backups.load(Ordering::SeqCst) >= 2);

    // And takes over in turn, with every update of the second run.
    cluster.kill(&now_primary);
    let (_, state) = takeover_after(&probe, second).await;
    assert_no_update_lost(&state, &acked_by(&probe, second));
    assert_eq!(cluster.runner(&graph_task_id(&job, 0)), Some(new_backup));
    assert_eq!(probe.inits.load(Ordering::SeqCst), 1, "no cold start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_stops_applying_is_given_up_before_update_returns() {
    let (probe, mut cluster) = counters();
    for _ in 0..4 {
        cluster.add(1).await;
    }
    let job = start_with_backups(&cluster, "stuck", 1).await;
    let (primary, stuck, claim) = backed_up(&cluster, &probe, &job, 20).await;
    // The backup's graph layer stops answering; its node (and lease, and so
    // its record) lives on.
    cluster.graph(&stuck).stop();
    let acked_before = acked_by(&probe, claim).len();
    // The primary's next update waits for it, gives it up, and returns;
    // then a new backup comes up elsewhere.
    let started = tokio::time::Instant::now();
    let (same, replacement, same_claim) =
        backed_up(&cluster, &probe, &job, acked_before + 10).await;
    assert_eq!((same, same_claim), (primary.clone(), claim));
    assert_ne!(replacement, stuck);
    assert!(
        started.elapsed() >= UPDATE_PATIENCE / 2,
        "updates waited for the stuck backup before giving it up"
    );
    assert!(
        records(&cluster, &job)
            .await
            .iter()
            .all(|(node, _)| *node != stuck),
        "the stuck backup's record is gone, so it can never take over"
    );
    // The primary dies: the replacement, not the stuck one, takes over
    // with every acknowledged update.
    cluster.kill(&stuck);
    cluster.kill(&primary);
    let (_, state) = takeover_after(&probe, claim).await;
    assert_no_update_lost(&state, &acked_by(&probe, claim));
    assert_eq!(cluster.runner(&graph_task_id(&job, 0)), Some(replacement));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_backups_update_applies_locally_and_a_failover_starts_cold() {
    let (probe, mut cluster) = counters();
    for _ in 0..2 {
        cluster.add(1).await;
    }
    let job = start_with_backups(&cluster, "alone", 0).await;
    let task = graph_task_id(&job, 0);
    let primary = eventually("task 0 running and updating", || {
        let runner = cluster.runner(&task)?;
        (lock(&probe.acked).len() >= 10).then_some(runner)
    })
    .await;
    assert!(records(&cluster, &job).await.is_empty());
    cluster.kill(&primary);
    eventually("a cold restart", || {
        (probe.inits.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    assert!(lock(&probe.promoted).is_empty());
    assert_eq!(probe.backups.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_endpoints_refuse_bad_and_stale_requests() {
    let (probe, mut cluster) = counters();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(cluster.add(1).await);
    }
    let job = start_with_backups(&cluster, "hostile", 1).await;
    let task = graph_task_id(&job, 0);
    let (running, backup, claim) = backed_up(&cluster, &probe, &job, 5).await;
    let spare = nodes
        .iter()
        .find(|node| **node != running && **node != backup)
        .unwrap()
        .clone();
    let client_of = |node: &NodeName| {
        let address = format!("http://{}", cluster.graph(node).address());
        async move { GraphClient::connect(address).await.unwrap() }
    };
    let backup_request = |job: &str, task: u32, claim: i64| BackupRequest {
        job: job.into(),
        task,
        primary_claim_epoch: claim,
        primary_node: running.to_string(),
        sequence: 0,
        state: b"[]".to_vec(),
    };
    let cases = [
        (&spare, backup_request("no/such", 0, claim), "invalid"),
        (&spare, backup_request("nosuchjob", 0, claim), "no job"),
        (&spare, backup_request(job.as_str(), 7, claim), "no backups"),
        // A primary whose claim is not the task's current one (fenced).
        (
            &spare,
            backup_request(job.as_str(), 0, claim - 1),
            "not current",
        ),
        // Nor may it replace the current primary's backup.
        (
            &backup,
            backup_request(job.as_str(), 0, claim - 1),
            "later primary",
        ),
        // The node running the task does not back it up itself.
        (&running, backup_request(job.as_str(), 0, claim), "runs"),
    ];
    for (node, request, expected) in cases {
        let reply = client_of(node).await.backup(request.clone()).await;
        let refused = reply.unwrap().into_inner().refused;
        assert!(
            refused.contains(expected),
            "{request:?} to {node}: {refused:?} does not say {expected:?}"
        );
    }
    let update = |task: u32, claim: i64, sequence: u64| UpdateRequest {
        job: job.to_string(),
        task,
        primary_claim_epoch: claim,
        sequence,
        entry: 1u64.to_le_bytes().to_vec(),
    };
    let cases = [
        (update(3, claim, 1), "holds no backup"),
        (update(0, claim + 1, 1), "not"),
        (update(0, claim, u64::MAX), "missing"),
    ];
    let mut client = client_of(&backup).await;
    for (request, expected) in cases {
        let refused = client
            .update(request.clone())
            .await
            .unwrap()
            .into_inner()
            .refused;
        assert!(
            refused.contains(expected),
            "{request:?}: {refused:?} does not say {expected:?}"
        );
    }
    // None of it disturbed the real backup: it is still the only one
    // recorded, for the same run, and takes over with every acknowledged
    // update.
    assert_eq!(
        records(&cluster, &job).await,
        vec![(
            backup.clone(),
            BackupRecord {
                primary_claim_epoch: claim
            }
        )]
    );
    cluster.kill(&running);
    let (_, state) = takeover_after(&probe, claim).await;
    assert_no_update_lost(&state, &acked_by(&probe, claim));
    assert_eq!(cluster.runner(&task), Some(backup));
}

#[tokio::test]
async fn jobs_with_more_backups_than_allowed_are_refused() {
    let (_, cluster) = counters();
    let mut spec = spec(KIND, 1);
    spec.backups = eretes_graph::MAX_BACKUPS + 1;
    let refused = cluster
        .jobs
        .start(&JobName::new("greedy").unwrap(), &spec)
        .await;
    assert!(
        matches!(&refused, Err(GraphError::Invalid(message)) if message.contains("backups")),
        "{}",
        show(&refused)
    );
    assert!(cluster
        .jobs
        .job(&JobName::new("greedy").unwrap())
        .await
        .unwrap()
        .is_none());
}
