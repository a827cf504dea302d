//! The fake Kubernetes API server, exercised through the real `kube` client
//! and `kube::runtime::watcher`: if these pass, the executor's tests against
//! the fake test it against the API's semantics, not against our guesses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eretes_kube::testing::{FakeApiServer, JobEventKind, PodScript, Propagation};
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;

/// A generous bound for anything the fake does "soon".
const PATIENCE: Duration = Duration::from_secs(10);

/// A Job as the executor would write it: one container, never restarted.
fn job(name: &str, labels: &[(&str, &str)]) -> Job {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_string()),
                    containers: vec![Container {
                        name: "main".to_string(),
                        image: Some("busybox:1.36".to_string()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// A script that runs until the pod is deleted.
fn forever(ignore_sigterm: bool) -> PodScript {
    PodScript {
        exit_code: None,
        ignore_sigterm,
        ..PodScript::default()
    }
}

/// Polls `check` until it yields, within [`PATIENCE`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The API error a kube call failed with.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn condition<'a>(
    job: &'a Job,
    kind: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds
        .into_iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == "True")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The only pod of a namespace once there is one in `want` phase.
async fn pod_in_phase(fake: &FakeApiServer, want: &str) -> Pod {
    eventually(&format!("a {want} pod"), || {
        fake.pods("default").into_iter().find(|p| phase(p) == want)
    })
    .await
}

#[tokio::test]
async fn create_get_list_and_errors() {
    let fake = FakeApiServer::start().await;
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let created = jobs
        .create(&PostParams::default(), &job("a", &[("app", "x")]))
        .await
        .unwrap();
    let meta = &created.metadata;
    let uid = meta.uid.clone().unwrap();
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(meta.generation, Some(1));
    assert!(meta.creation_timestamp.is_some());
    assert!(meta
        .resource_version
        .as_deref()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    let template_labels = created
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(
        template_labels.get("job-name").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        template_labels.get("batch.kubernetes.io/controller-uid"),
        Some(&uid)
    );

    assert_eq!(jobs.get("a").await.unwrap().metadata.uid, Some(uid.clone()));
    let listed = jobs
        .list(&ListParams::default().labels("app=x"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(listed.metadata.resource_version.is_some());
    assert!(jobs
        .list(&ListParams::default().labels("app in (y,z)"))
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(
        jobs.list(&ListParams::default().fields("metadata.name=a"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let cluster_wide: Api<Job> = Api::all(fake.client());
    assert_eq!(
        cluster_wide
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let missing = api_error(jobs.get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    let clash = api_error(jobs.create(&PostParams::default(), &job("a", &[])).await);
    assert_eq!((clash.code, clash.reason.as_str()), (409, "AlreadyExists"));
    let bad_field = api_error(
        jobs.list(&ListParams::default().fields("spec.nope=1"))
            .await,
    );
    assert_eq!(bad_field.code, 400);

    // The Job controller made its pod, labelled and owned as in a cluster.
    let pods: Api<Pod> = Api::default_namespaced(fake.client());
    let pod = eventually("the Job's pod", || fake.pods("default").into_iter().next()).await;
    let name = pod.metadata.name.clone().unwrap();
    assert!(
        name.starts_with("a-") && name.len() == "a-".len() + 5,
        "{name}"
    );
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(
        labels
            .get("batch.kubernetes.io/job-name")
            .map(String::as_str),
        Some("a")
    );
    assert_eq!(labels.get("controller-uid"), Some(&uid));
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Job", uid.as_str(), Some(true))
    );
    assert_eq!(
        pods.list(&ListParams::default().labels("job-name=a"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        pods.get(&name).await.unwrap().metadata.uid,
        pod.metadata.uid
    );
}

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

/// Waits for the DELETED event of `name` on a raw watch and returns its
/// resourceVersion.
async fn deleted_rv<K>(
    events: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
    name: &str,
) -> u64
where
    K: kube::Resource,
{
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.try_next().await.unwrap() {
            if let WatchEvent::Deleted(obj) = event {
                if obj.meta().name.as_deref() == Some(name) {
                    return obj
                        .meta()
                        .resource_version
                        .clone()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap();
                }
            }
        }
        panic!("the watch ended before {name} was deleted");
    });
    found.await.unwrap()
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
async fn injected_faults_are_answered_then_cleared() {
    let fake = FakeApiServer::start().await;
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    jobs.create(&PostParams::default(), &job("r", &[]))
        .await
        .unwrap();
    let path = "/apis/batch/v1/namespaces/default/jobs/r";

    fake.fail_next(Some("GET"), path, 500, 1);
    let fault = api_error(jobs.get("r").await);
    assert_eq!((fault.code, fault.reason.as_str()), (500, "InternalError"));
    assert!(jobs.get("r").await.is_ok(), "the fault was used up");

    // A client without kube's default retry sees the 429 itself.
    let mut config = fake.config();
    config.default_retry = false;
    let plain: Api<Job> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    fake.fail_next(None, path, 429, 1);
    let busy = api_error(plain.get("r").await);
    assert_eq!((busy.code, busy.reason.as_str()), (429, "TooManyRequests"));
    assert!(plain.get("r").await.is_ok());

    // kube's default client retries 429 after Retry-After: one more request.
    fake.fail_next(Some("GET"), path, 429, 1);
    let before = fake.requests().len();
    assert!(jobs.get("r").await.is_ok());
    let after = fake.requests();
    assert_eq!(after.len() - before, 2);
    assert!(after.iter().all(|(_, p)| !p.is_empty()));
    // A fault for another method or path does not fire.
    fake.fail_next(Some("DELETE"), path, 503, 1);
    assert!(jobs.get("r").await.is_ok());
}

#[tokio::test]
async fn expired_watches_make_the_watcher_relist_and_resume() {
    let fake = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(fake.client());
    let cm = |name: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..Default::default()
    };
    maps.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    // The watcher only acts when polled: a task drives it, so its watch is
    // open when the history is forgotten.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn({
        let mut stream = watcher(maps.clone(), watcher::Config::default()).boxed();
        async move {
            while let Some(e) = stream.next().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    let mut next = async || {
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .unwrap()
            .unwrap()
    };
    // Init, InitApply(first), InitDone.
    for _ in 0..3 {
        next().await.unwrap();
    }
    let lists = |fake: &FakeApiServer| {
        fake.requests()
            .iter()
            .filter(|(m, p)| {
                m == "GET"
                    && p.starts_with("/api/v1/namespaces/default/configmaps?")
                    && !p.contains("watch=true")
            })
            .count()
    };
    assert_eq!(lists(&fake), 1);
    eventually("the watch to open", || {
        (fake.open_watches() == 1).then_some(())
    })
    .await;
    fake.expire_watches();
    match next().await {
        Err(watcher::Error::WatchError(status)) => assert_eq!(status.code, 410),
        other => panic!("expected the 410, got {other:?}"),
    }
    maps.create(&PostParams::default(), &cm("second"))
        .await
        .unwrap();
    let mut names = Vec::new();
    // After the 410: Init, InitApply(first), InitDone, then Apply(second)
    // (or InitApply(second), had the create won the race with the re-list).
    while !names.contains(&"second".to_string()) {
        match next().await.unwrap() {
            watcher::Event::InitApply(c) | watcher::Event::Apply(c) => {
                names.push(c.metadata.name.unwrap())
            }
            _ => {}
        }
    }
    assert!(
        names.contains(&"first".to_string()),
        "the re-list saw the old object: {names:?}"
    );
    assert_eq!(lists(&fake), 2, "the watcher re-listed after the 410");
    driver.abort();

    // A raw watch from before the expiry gets the 410 as an ERROR event.
    let old = maps
        .watch(&WatchParams::default(), "1000")
        .await
        .unwrap()
        .boxed();
    let first: Vec<_> = tokio::time::timeout(PATIENCE, old.collect::<Vec<_>>())
        .await
        .unwrap();
    match first.as_slice() {
        [Ok(WatchEvent::Error(status))] => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected one 410 ERROR event, got {other:?}"),
    }
    // ConfigMaps delete at once, answered with a success Status.
    assert!(maps
        .delete("first", &DeleteParams::default())
        .await
        .unwrap()
        .is_right());
    assert_eq!(fake.config_maps("default").len(), 1);
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

#[tokio::test]
async fn invalid_jobs_are_refused_with_422() {
    let fake = FakeApiServer::start().await;
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let bad_label = api_error(
        jobs.create(
            &PostParams::default(),
            &job("v", &[("task", "-not valid-")]),
        )
        .await,
    );
    assert_eq!(
        (bad_label.code, bad_label.reason.as_str()),
        (422, "Invalid")
    );
    assert!(
        bad_label.message.contains("metadata.labels"),
        "{}",
        bad_label.message
    );
    let long_value = "x".repeat(64);
    assert_eq!(
        api_error(
            jobs.create(&PostParams::default(), &job("v", &[("task", &long_value)]))
                .await
        )
        .code,
        422
    );
    // A Job name becomes the pods' job-name label: at most 63 characters.
    let long_name = "j".repeat(64);
    let too_long = api_error(
        jobs.create(&PostParams::default(), &job(&long_name, &[]))
            .await,
    );
    assert!(
        too_long.message.contains("spec.template.labels"),
        "{}",
        too_long.message
    );
    assert!(jobs
        .create(&PostParams::default(), &job(&"j".repeat(63), &[]))
        .await
        .is_ok());
    let mut always = job("v", &[]);
    always
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .restart_policy = None;
    let restart = api_error(jobs.create(&PostParams::default(), &always).await);
    assert!(
        restart
            .message
            .contains("spec.template.spec.restartPolicy: Unsupported value: \"Always\""),
        "{}",
        restart.message
    );
    let mut empty = job("v", &[]);
    empty
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers
        .clear();
    assert_eq!(
        api_error(jobs.create(&PostParams::default(), &empty).await).code,
        422
    );
    assert!(
        fake.jobs("default").len() == 1,
        "nothing invalid was stored"
    );
}

#[tokio::test]
async fn kubeconfig_streaming_lists_and_watch_timeouts() {
    let fake = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");
    let jobs: Api<Job> = Api::default_namespaced(client);
    jobs.create(&PostParams::default(), &job("s", &[]))
        .await
        .unwrap();

    // A streaming list: the current objects, then the initial-events-end
    // bookmark.
    let mut streamed = watcher(jobs.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut got = Vec::new();
    let init = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = streamed.try_next().await.unwrap() {
            match e {
                watcher::Event::InitApply(j) => got.push(j.metadata.name.unwrap()),
                watcher::Event::InitDone => return,
                _ => {}
            }
        }
    });
    init.await.unwrap();
    assert_eq!(got, ["s"]);

    // A watch ends by itself at timeoutSeconds.
    let started = Instant::now();
    let rv = fake.resource_version();
    let raw = jobs
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap();
    let events: Vec<_> = tokio::time::timeout(PATIENCE, raw.collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(events
        .iter()
        .all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)) | Ok(WatchEvent::Modified(_)))));
}

#[tokio::test]
async fn lists_page_and_watches_filter_and_replay() {
    let fake = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(fake.client());
    let cm = |name: &str, tier: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([("tier".to_string(), tier.to_string())])),
            ..Default::default()
        },
        ..Default::default()
    };
    let first = maps
        .create(&PostParams::default(), &cm("a", "web"))
        .await
        .unwrap();
    let from = first.metadata.resource_version.unwrap();
    maps.create(&PostParams::default(), &cm("b", "db"))
        .await
        .unwrap();
    maps.create(&PostParams::default(), &cm("c", "web"))
        .await
        .unwrap();

    // limit/continue pages through everything, in name order.
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    for _ in 0..3 {
        let page = maps.list(&params).await.unwrap();
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c"]);

    // A watch from the first object's resourceVersion replays what came
    // after it, filtered by the selector, then follows.
    let selected = WatchParams::default().labels("tier=web");
    let mut events = maps.watch(&selected, &from).await.unwrap().boxed();
    maps.create(&PostParams::default(), &cm("d", "db"))
        .await
        .unwrap();
    maps.create(&PostParams::default(), &cm("e", "web"))
        .await
        .unwrap();
    let mut added = Vec::new();
    while added.len() < 2 {
        let event = tokio::time::timeout(PATIENCE, events.try_next())
            .await
            .unwrap()
            .unwrap();
        if let Some(WatchEvent::Added(c)) = event {
            added.push(c.metadata.name.unwrap());
        }
    }
    assert_eq!(added, ["c", "e"]);

    // An Exact list from before the history was forgotten is 410 Expired.
    fake.expire_watches();
    let exact = ListParams::default()
        .at(&from)
        .matching(kube::api::VersionMatch::Exact);
    let gone = api_error(maps.list(&exact).await);
    assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn preconditions_dry_runs_and_ttl() {
    let fake = FakeApiServer::start().await;
    let jobs: Api<Job> = Api::default_namespaced(fake.client());
    let mut spec = job("t", &[]);
    spec.spec.as_mut().unwrap().ttl_seconds_after_finished = Some(0);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    jobs.create(&dry, &spec).await.unwrap();
    assert!(fake.jobs("default").is_empty(), "a dry run stores nothing");
    let created = jobs.create(&PostParams::default(), &spec).await.unwrap();

    // A deletion whose uid precondition names another Job is refused.
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("someone-else".to_string()),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let conflict = api_error(jobs.delete("t", &stale).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

    // ttlSecondsAfterFinished: 0 deletes the finished Job (in the
    // foreground) as soon as it completes.
    eventually("the TTL controller to delete the Job", || {
        fake.jobs("default").is_empty().then_some(())
    })
    .await;
    let history = fake.job_history();
    let kinds: Vec<JobEventKind> = history.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            JobEventKind::Created,
            JobEventKind::Deleted(Propagation::Foreground),
            JobEventKind::Removed
        ]
    );
    assert!(history
        .iter()
        .all(|e| Some(&e.uid) == created.metadata.uid.as_ref()));
    assert!(fake.pods("default").is_empty());
}
