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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eretes_graph::proto::BackupRequest;
use eretes_graph::{graph_task_id, JobName, TAKEOVER_GRACE, UPDATE_PATIENCE};
use eretes_protocol::NodeName;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::Store;
use tokio::time::{sleep, Instant};

use crate::counter::*;
use crate::support::*;

// ---------------------------------------------------------------------------
// 1. A backup whose node has no free slot never takes over.
// ---------------------------------------------------------------------------

/// Two tasks on two one-slot nodes: each task's only possible backup is the
/// node that runs the other task. A spare joins, then task 0's primary
/// dies. The backup (on a full node) never claims; after `TAKEOVER_GRACE`
/// the spare claims task 0 cold, and every acknowledged update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_a_full_node_takes_over_instead_of_a_cold_start() {
    let (probe, mut cluster, _, job) = counter_job(2, "full", 2, 1).await;
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
    // Each node reaches the store through a wrapper of its own, so that
    // one node's transactions (its claims and backup records) can be made
    // to land late.
    let mut slow: HashMap<NodeName, Arc<FaultyStore<dyn Store>>> = HashMap::new();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let store = FaultyStore::new(inner.clone());
        let name = cluster.add_on(store.clone(), 1).await;
        slow.insert(name.clone(), store);
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
    slow[&holder].set_txn_latency(Duration::from_millis(600));
    let killed = Instant::now();
    cluster.kill(&now_primary);
    let outcome = next_run(&probe, 0, second).await;
    let after = killed.elapsed();
    let task = graph_task_id(&job, 0);
    match outcome {
        Ok((_, state)) => {
            assert_no_update_lost(&state, &acked_by(&probe, second));
            // The others left it to the backup's node (slowed as it is)
            // for the grace, again: it runs there. A run is listed once its
            // `became_primary` has returned, just after the probe heard of
            // it: on a busy machine the two can be apart.
            let runner = eventually("the takeover's run listed", || cluster.runner(&task)).await;
            assert_eq!(runner, holder, "claimed {after:?} after the kill");
        }
        Err(claim) => {
            let runner = cluster.runner(&task);
            panic!(
            "task 0 started cold on {runner:?} (claim {claim}) {after:?} after the kill (lease \
             {TTL:?}, grace {TAKEOVER_GRACE:?}), while {holder} held a current backup: a stale \
             `leaving` entry skipped the takeover grace"
            )
        }
    }
}

// ---------------------------------------------------------------------------
// 3. The Backup endpoint plants stale backups.
// ---------------------------------------------------------------------------

/// Send `node` a Backup request for task 0 of `job` naming the run of
/// `claim` on `primary`, with an empty state at `sequence`: what a reply of
/// a real transfer lost on the way, or a transfer repeated, looks like to
/// the endpoint. Its refusal, empty if it accepted.
async fn transfer_nothing(
    cluster: &Cluster,
    node: &NodeName,
    job: &JobName,
    primary: &NodeName,
    claim: i64,
    sequence: u64,
) -> String {
    client_of(cluster, node)
        .await
        .backup(BackupRequest {
            job: job.to_string(),
            task: 0,
            primary_claim_epoch: claim,
            primary_node: primary.to_string(),
            sequence,
            state: b"[]".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .refused
}

/// After the run of `claim` of task 0 died: a backup that took over did so
/// with every update acknowledged to that run. A cold start passes: what
/// these tests catch is a stale backup taking over, not whether one does.
async fn assert_a_takeover_lost_nothing(probe: &Probe, claim: i64) {
    if let Ok((_, state)) = next_run(probe, 0, claim).await {
        assert_no_update_lost(&state, &acked_by(probe, claim));
    }
}

/// A Backup request naming the current claim, sent to a node that is not
/// one of the primary's backups (as a lost reply of a real transfer would
/// leave it): its record, of the current claim, is never cleaned up by the
/// primary, and it misses every later update. The primary and its real
/// backup die together: the planted one takes over with an empty state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_the_primary_does_not_know_never_takes_over() {
    let (probe, mut cluster, nodes, job) = counter_job(3, "planted", 1, 1).await;
    let (primary, backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    let spare = spare(&nodes, &primary, &backup);
    let refused = transfer_nothing(&cluster, &spare, &job, &primary, claim, 0).await;
    eprintln!("planted backup request: refused={refused:?}");
    // Time for the primary's keeper to notice and end a backup it did not
    // bring up.
    sleep(Duration::from_millis(2500)).await;
    cluster.kill(&primary);
    cluster.kill(&backup);
    assert_a_takeover_lost_nothing(&probe, claim).await;
}

/// A Backup request naming the current claim, sent to the live backup, with
/// a state of nothing and a far sequence: the backup's state is replaced,
/// its record stays, and the primary's later entries are answered "already
/// applied", so `update` goes on returning Ok. The primary dies: the backup
/// takes over with none of the acknowledged updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_transfer_cannot_rewind_a_live_backup() {
    let (probe, mut cluster, _, job) = counter_job(3, "rewound", 1, 1).await;
    let (primary, backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    let refused = transfer_nothing(&cluster, &backup, &job, &primary, claim, 1 << 40).await;
    eprintln!("repeated transfer: refused={refused:?}");
    let before = acked_by(&probe, claim).len();
    sleep(Duration::from_millis(1000)).await;
    eprintln!(
        "updates acknowledged after it: {}",
        acked_by(&probe, claim).len() - before
    );
    cluster.kill(&primary);
    assert_a_takeover_lost_nothing(&probe, claim).await;
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
    let (probe, mut cluster, _, job) = counter_job(3, "hung", 1, 1).await;
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
