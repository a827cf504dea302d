//! Job epochs: compare-and-swap races, and a late callback that loses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::{graph_task_id, EpochMove, EpochRecord, GraphTask, JobEpoch, Jobs, TaskHandle};
use tokio::time::{sleep, Instant};

use crate::support::*;

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
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        lock(&self.log)
            .entered
            .entry(task.task_id())
            .or_default()
            .push(epoch.0);
        if epoch.0 != 0 {
            return;
        }
        // Task 0 moves on only once task 1 is in epoch 0 too (else task 1's
        // first epoch could be 1); task 1 moves once task 0 has.
        let ready = match task.task_id() {
            0 => {
                wait_for(|| {
                    lock(&self.log)
                        .entered
                        .get(&1)
                        .is_some_and(|e| e.contains(&0))
                })
                .await
            }
            _ => wait_for(|| lock(&self.log).moves.iter().any(|m| m.0 == 0)).await,
        };
        if !ready {
            return;
        }
        let at = task.epoch().0;
        let answer = task.inc_epoch().await.map_err(|e| e.to_string());
        lock(&self.log)
            .moves
            .push((task.task_id(), epoch.0, at, answer));
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
