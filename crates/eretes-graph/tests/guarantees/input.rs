//! Bad input.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eretes_graph::{
    graph_task_id, EpochMove, EpochRecord, GraphError, GraphTask, JobEpoch, JobName, TaskHandle,
    MAX_JOB_TASKS, MAX_META_BYTES,
};
use tokio::time::Instant;

use crate::support::*;

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

/// A job record in the store out of a job's bounds (written by hand, or by
/// a bad build) is reported as malformed, naming its key, wherever it is
/// read: it is never obeyed. `remove` still takes it away, with the tasks
/// stored under the job's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_record_out_of_bounds_is_malformed_and_can_still_be_removed() {
    let cluster = Cluster::new(kind(|_| {
        Arc::new(BadTask {
            log: Arc::new(Mutex::new(BadLog::default())),
        })
    }));
    let jobs = cluster.jobs.clone();
    let name = JobName::new("huge").unwrap();
    jobs.start(&name, &spec(KIND, 2)).await.unwrap();
    let key = jobs.keys().job(&name);
    let store = jobs.coordinator().store().clone();
    for record in [
        r#"{"kind":"k","tasks":4294967295,"group":"graph","properties":null,"backups":0}"#,
        r#"{"kind":"k","tasks":0,"group":"graph","properties":null,"backups":0}"#,
        r#"{"kind":"k","tasks":2,"group":"graph","properties":null,"backups":9}"#,
    ] {
        store
            .put(eretes_store::PutRequest::new(
                key.clone(),
                record.as_bytes().to_vec(),
            ))
            .await
            .unwrap();
        for (what, answer) in [
            ("job", jobs.job(&name).await.map(|_| ())),
            ("status", jobs.status(&name).await.map(|_| ())),
        ] {
            match answer {
                Err(GraphError::Malformed(message)) => {
                    assert!(message.contains(&key), "{what}: {message}")
                }
                other => panic!("{what} of {record}: expected Malformed, got {other:?}"),
            }
        }
        let listed = jobs.list().await.unwrap();
        assert!(listed.jobs.is_empty(), "{record}");
        assert_eq!(listed.malformed, 1, "{record}");
    }
    jobs.remove(&name).await.unwrap();
    assert_eq!(jobs.job(&name).await.unwrap(), None);
    for index in 0..2 {
        assert!(
            jobs.coordinator()
                .task_view(&graph_task_id(&name, index))
                .await
                .unwrap()
                .is_none(),
            "task {index} removed with the job"
        );
    }
}
