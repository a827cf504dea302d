//! The fake Kubernetes API server's Jobs and pods over their life, through
//! the real `kube` client: runs, logs, deletion with each propagation,
//! deadlines, the backoff limit and a deleted pod.

use std::time::{Duration, Instant};

use eretes_kube::testing::{FakeApiServer, JobEventKind, PodScript, Propagation};
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;

mod common;
use common::*;

#[tokio::test]
async fn watcher_sees_a_job_run_and_complete() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| PodScript {
        pending_for: Duration::from_millis(150),
        run_for: Duration::from_millis(300),
        ..PodScript::default()
    });
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let mut events = watcher(
        jobs.clone(),
        watcher::Config::default().fields("metadata.name=w"),
    )
    .boxed();
    let init = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = events.try_next().await.unwrap() {
            if matches!(e, watcher::Event::InitDone) {
                return;
            }
        }
    });
    init.await.unwrap();
    jobs.create(&PostParams::default(), &job("w", &[]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let done = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = events.try_next().await.unwrap() {
            if let watcher::Event::Apply(j) = e {
                let status = j.status.clone().unwrap_or_default();
                let stage = if condition(&j, "Complete").is_some() {
                    "complete"
                } else if status.ready == Some(1) {
                    "running"
                } else {
                    "created"
                };
                if seen.last() != Some(&stage) {
                    seen.push(stage);
                }
                if stage == "complete" {
                    assert_eq!(status.succeeded, Some(1));
                    assert!(status.completion_time.is_some() && status.start_time.is_some());
                    return;
                }
            }
        }
    });
    done.await.unwrap();
    assert_eq!(seen, ["created", "running", "complete"]);
}

#[tokio::test]
async fn pod_log_waits_tails_and_follows() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| PodScript {
        // Long enough that the requests below land in the phase they test,
        // even on a loaded machine.
        pending_for: Duration::from_millis(800),
        log: ["one", "two", "three", "four"].map(String::from).to_vec(),
        run_for: Duration::from_millis(1600),
        exit_code: Some(0),
        ignore_sigterm: false,
    });
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let pods: Api<Pod> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("l", &[]))
        .await
        .unwrap();
    let pending = pod_in_phase(&fake, "Pending").await;
    let name = pending.metadata.name.clone().unwrap();
    let waiting = api_error(pods.logs(&name, &LogParams::default()).await);
    assert_eq!(waiting.code, 400);
    assert_eq!(
        waiting.message,
        format!("container \"main\" in pod \"{name}\" is waiting to start: ContainerCreating")
    );
    let wrong = api_error(
        pods.logs(
            &name,
            &LogParams {
                container: Some("x".into()),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(wrong.code, 400);

    pod_in_phase(&fake, "Running").await;
    let so_far = pods.logs(&name, &LogParams::default()).await.unwrap();
    assert!(
        so_far.lines().count() < 4,
        "the follow below must see later lines: {so_far:?}"
    );
    let follow = LogParams {
        follow: true,
        ..Default::default()
    };
    let stream = pods.log_stream(&name, &follow).await.unwrap();
    let lines: Vec<String> = tokio::time::timeout(PATIENCE, stream.lines().try_collect())
        .await
        .unwrap()
        .unwrap();
    // The stream ended by itself when the container terminated.
    assert_eq!(lines, ["one", "two", "three", "four"]);
    assert_eq!(phase(&pods.get(&name).await.unwrap()), "Succeeded");

    let tail = LogParams {
        tail_lines: Some(2),
        ..Default::default()
    };
    assert_eq!(pods.logs(&name, &tail).await.unwrap(), "three\nfour\n");
    let limited = LogParams {
        limit_bytes: Some(6),
        ..Default::default()
    };
    assert_eq!(pods.logs(&name, &limited).await.unwrap(), "one\ntw");
    let stamped = LogParams {
        timestamps: true,
        tail_lines: Some(1),
        ..Default::default()
    };
    let line = pods.logs(&name, &stamped).await.unwrap();
    let (ts, text) = line.trim_end().split_once(' ').unwrap();
    assert!(
        ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok() && text == "four",
        "{line:?}"
    );
    assert_eq!(
        api_error(pods.logs("missing", &LogParams::default()).await).code,
        404
    );
}

#[tokio::test]
async fn foreground_deletion_removes_the_pods_before_the_job() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(true));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let pods: Api<Pod> = Api::default_namespaced(fake.client());
    let mut spec = job("f", &[("task", "t1")]);
    let template = spec.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    template.termination_grace_period_seconds = Some(1);
    jobs.create(&PostParams::default(), &spec).await.unwrap();
    let pod = pod_in_phase(&fake, "Running").await;
    let pod_name = pod.metadata.name.clone().unwrap();

    let rv = fake.resource_version();
    let mut job_events = jobs
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut pod_events = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let asked = Instant::now();
    let answer = jobs.delete("f", &DeleteParams::foreground()).await.unwrap();
    let marked = answer
        .left()
        .expect("a foreground deletion answers with the Job, still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(marked
        .metadata
        .finalizers
        .unwrap()
        .contains(&"foregroundDeletion".to_string()));

    // The pod ignores SIGTERM: it lingers, terminating, for its 1 s grace,
    // and the Job waits for it.
    let terminating = eventually("the pod to be terminating", || {
        fake.pods("default")
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(1));
    assert_eq!(fake.jobs("default").len(), 1, "the Job waits for its pod");
    let pod_gone = deleted_rv(&mut pod_events, &pod_name).await;
    let job_gone = deleted_rv(&mut job_events, "f").await;
    assert!(
        pod_gone < job_gone,
        "pod removed at {pod_gone}, Job at {job_gone}"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "the grace period was honoured"
    );
    assert!(fake.pods("default").is_empty() && fake.jobs("default").is_empty());
    let kinds: Vec<JobEventKind> = fake.job_history().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            JobEventKind::Created,
            JobEventKind::Deleted(Propagation::Foreground),
            JobEventKind::Removed
        ]
    );
    assert_eq!(
        fake.job_history()[0].labels.get("task").map(String::as_str),
        Some("t1")
    );
}

#[tokio::test]
async fn background_deletion_removes_the_job_then_its_pods() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(false));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("b", &[]))
        .await
        .unwrap();
    let pod_name = pod_in_phase(&fake, "Running").await.metadata.name.unwrap();
    let rv = fake.resource_version();
    let pods: Api<Pod> = Api::default_namespaced(fake.client());
    let mut job_events = jobs
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut pod_events = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let answer = jobs.delete("b", &DeleteParams::background()).await.unwrap();
    let status = answer
        .right()
        .expect("a Job removed at once answers with a Status");
    assert!(status.is_success());
    assert!(api_error(jobs.get("b").await).is_not_found());
    // The garbage collector deletes the pod after the Job is gone.
    let job_gone = deleted_rv(&mut job_events, "b").await;
    let pod_marked = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = pod_events.try_next().await.unwrap() {
            if let WatchEvent::Modified(p) = event {
                if p.metadata.deletion_timestamp.is_some() {
                    return p.metadata.resource_version.unwrap().parse::<u64>().unwrap();
                }
            }
        }
        panic!("the pod watch ended");
    });
    let pod_marked = pod_marked.await.unwrap();
    assert!(
        job_gone < pod_marked,
        "Job removed at {job_gone}, pod marked at {pod_marked}"
    );
    let pod_gone = deleted_rv(&mut pod_events, &pod_name).await;
    assert!(pod_marked < pod_gone);
    assert!(api_error(jobs.delete("b", &DeleteParams::background()).await).is_not_found());
}

#[tokio::test]
async fn default_deletion_orphans_the_pods() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(false));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("o", &[]))
        .await
        .unwrap();
    pod_in_phase(&fake, "Running").await;
    let marked = jobs
        .delete("o", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(marked.metadata.finalizers, Some(vec!["orphan".to_string()]));
    eventually("the Job to go", || {
        fake.jobs("default").is_empty().then_some(())
    })
    .await;
    let pods = fake.pods("default");
    assert_eq!(pods.len(), 1);
    assert_eq!(phase(&pods[0]), "Running");
    assert!(pods[0].metadata.owner_references.is_none());
    assert!(pods[0]
        .metadata
        .labels
        .as_ref()
        .unwrap()
        .contains_key("job-name"));
}

#[tokio::test]
async fn external_deletion_is_background() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(false));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("x", &[]))
        .await
        .unwrap();
    pod_in_phase(&fake, "Running").await;
    assert!(fake.delete_job_externally("default", "x"));
    assert!(!fake.delete_job_externally("default", "x"));
    assert!(api_error(jobs.get("x").await).is_not_found());
    eventually("the pod to go", || {
        fake.pods("default").is_empty().then_some(())
    })
    .await;
    let kinds: Vec<JobEventKind> = fake.job_history().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            JobEventKind::Created,
            JobEventKind::Deleted(Propagation::Background),
            JobEventKind::Removed
        ]
    );
}

#[tokio::test]
async fn active_deadline_fails_the_job_and_kills_its_pod() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(false));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let mut spec = job("d", &[]);
    spec.spec.as_mut().unwrap().active_deadline_seconds = Some(1);
    jobs.create(&PostParams::default(), &spec).await.unwrap();
    pod_in_phase(&fake, "Running").await;
    let failed = eventually("the deadline", || {
        fake.jobs("default")
            .into_iter()
            .find(|j| condition(j, "Failed").is_some())
    })
    .await;
    let cond = condition(&failed, "Failed").unwrap();
    assert_eq!(cond.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(condition(&failed, "FailureTarget").is_some());
    let status = failed.status.unwrap();
    assert_eq!((status.failed, status.active), (Some(1), None));
    assert!(fake
        .pods("default")
        .iter()
        .all(|p| phase(p) == "Failed" || p.metadata.deletion_timestamp.is_some()));
    eventually("the killed pod to go", || {
        fake.pods("default").is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn failures_respect_the_backoff_limit() {
    let fake = FakeApiServer::start().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    fake.set_kubelet(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        PodScript {
            exit_code: Some(3),
            ..PodScript::default()
        }
    });
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let mut spec = job("once", &[]);
    spec.spec.as_mut().unwrap().backoff_limit = Some(1);
    jobs.create(&PostParams::default(), &spec).await.unwrap();
    let failed = eventually("the Job to fail", || {
        fake.jobs("default")
            .into_iter()
            .find(|j| condition(j, "Failed").is_some())
    })
    .await;
    assert_eq!(
        condition(&failed, "Failed").unwrap().reason.as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(failed.status.unwrap().failed, Some(2));
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one retry, then no more"
    );
    let pods = fake.pods("default");
    assert_eq!(pods.len(), 2);
    for pod in pods {
        assert_eq!(phase(&pod), "Failed");
        let state = pod.status.unwrap().container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap();
        let terminated = state.terminated.unwrap();
        assert_eq!(
            (terminated.exit_code, terminated.reason.as_deref()),
            (3, Some("Error"))
        );
    }
}

#[tokio::test]
async fn deleting_a_pod_fails_its_job() {
    let fake = FakeApiServer::start().await;
    fake.set_kubelet(|_| forever(true));
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let pods: Api<Pod> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("p", &[]))
        .await
        .unwrap();
    let pod = pod_in_phase(&fake, "Running").await;
    let name = pod.metadata.name.unwrap();
    // Grace 0 removes the pod at once (a forced deletion).
    let gone = pods
        .delete(
            &name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(gone.left().is_some(), "pods answer with the deleted object");
    assert!(api_error(pods.get(&name).await).is_not_found());
    let failed = eventually("the Job to fail", || {
        fake.jobs("default")
            .into_iter()
            .find(|j| condition(j, "Failed").is_some())
    })
    .await;
    assert_eq!(
        condition(&failed, "Failed").unwrap().reason.as_deref(),
        Some("BackoffLimitExceeded")
    );
}
