//! Meta notifications: once per run, and the current meta after a failover.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eretes_graph::{graph_task_id, EpochMove, GraphTask, JobEpoch, TaskHandle};
use tokio::time::{sleep, Instant};

use crate::support::*;

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
