//! What the fake API server's tests share: a Job as the executor writes
//! one, pod scripts, and bounded waits.

#![allow(dead_code)] // each test file uses its own part

pub mod cluster;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eretes_kube::testing::{FakeApiServer, PodScript};
use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::WatchEvent;

/// A generous bound for anything the fake does "soon".
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A Job as the executor would write it: one container, never restarted.
pub fn job(name: &str, labels: &[(&str, &str)]) -> Job {
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
pub fn forever(ignore_sigterm: bool) -> PodScript {
    PodScript {
        exit_code: None,
        ignore_sigterm,
        ..PodScript::default()
    }
}

/// Polls `check` until it yields, within [`PATIENCE`].
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
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
pub fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn condition<'a>(
    job: &'a Job,
    kind: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds
        .into_iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == "True")
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The only pod of a namespace once there is one in `want` phase.
pub async fn pod_in_phase(fake: &FakeApiServer, want: &str) -> Pod {
    eventually(&format!("a {want} pod"), || {
        fake.pods("default").into_iter().find(|p| phase(p) == want)
    })
    .await
}

/// Waits for the DELETED event of `name` on a raw watch and returns its
/// resourceVersion.
pub async fn deleted_rv<K>(
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
