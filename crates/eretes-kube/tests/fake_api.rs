//! The fake Kubernetes API server, exercised through the real `kube` client
//! and `kube::runtime::watcher`: if these pass, the executor's tests against
//! the fake test it against the API's semantics, not against our guesses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eretes_kube::testing::{FakeApiServer, JobEventKind, Propagation};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;

mod common;
use common::*;

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
