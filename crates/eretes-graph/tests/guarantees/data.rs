//! Data requests: following the target, never late, refused by non-owners and by a partitioned old owner, never answered after their epoch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::proto::graph_client::GraphClient;
use eretes_graph::proto::{data_reply, DataRequest};
use eretes_graph::{
    graph_task_id, EpochMove, GraphError, GraphNode, GraphTask, JobEpoch, JobKind, TaskHandle,
};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::Store;
use tokio::time::{sleep, Instant};

use crate::support::*;

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
async fn a_connection_gets_32_streams_and_requests_beyond_them_wait_their_turn() {
    let (_, kind) = direct_kind();
    let mut cluster = Cluster::new(kind);
    let node = cluster.add(1).await;
    let graph = cluster.graph(&node).clone();
    // What the server announces: without it, one peer could open hundreds
    // of streams, each buffering a message of almost 4 MB.
    let tcp = tokio::net::TcpStream::connect(graph.address())
        .await
        .unwrap();
    let (_send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // The connection is driven until its settings arrived (it never ends
    // on its own while the server is up).
    let _ = tokio::time::timeout(Duration::from_millis(500), &mut connection).await;
    assert_eq!(connection.max_concurrent_send_streams(), 32);
    // 200 requests at once on one connection: the ones past the cap wait,
    // and every one is answered (refused: no task runs).
    let client = GraphClient::connect(format!("http://{}", graph.address()))
        .await
        .unwrap();
    let answers = futures::future::join_all((0..200).map(|n| {
        let mut client = client.clone();
        async move { client.data(request("nojob", 0, 0, n, "m")).await }
    }))
    .await;
    for answer in answers {
        let outcome = answer.expect("answered").into_inner().outcome;
        assert!(
            matches!(outcome, Some(data_reply::Outcome::Refused(_))),
            "{outcome:?}"
        );
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
