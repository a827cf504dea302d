//! Neighbour events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::{graph_task_id, GraphTask, JobEpoch, TaskHandle};
use tokio::time::{sleep, Instant};

use crate::support::*;

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
