//! The Job object made of a [`KubeSpec`] for one run of a task.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::spec::KubeSpec;

/// The name of the container that runs the task's image.
pub const CONTAINER: &str = "main";

/// A finished Job that nobody deleted (its owner died, and the task was
/// removed before another node ran it) is removed by Kubernetes after this
/// long. Every Job eretes sees end is deleted by eretes at once.
pub const FINISHED_JOB_TTL_SECONDS: i32 = 24 * 3600;

/// What one run adds to the spec: where, what it is called and labelled,
/// and the variables eretes sets.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    /// The Kubernetes namespace.
    pub namespace: String,
    /// The Job's name ([`crate::names::job_name`]).
    pub name: String,
    /// Labels of the Job and its pod.
    pub labels: BTreeMap<String, String>,
    /// Annotations of the Job and its pod.
    pub annotations: BTreeMap<String, String>,
    /// `ERETES_*` variables, after the spec's own.
    pub env: Vec<(String, String)>,
    /// The pod's `terminationGracePeriodSeconds` (a template's own is
    /// capped to it): a Job's delete does not pass its own grace on to its
    /// pods, so the agent's stop grace is set on the pod.
    pub termination_grace_seconds: i64,
}

/// The Job for `spec` as `identity` names it: one pod, never restarted by
/// Kubernetes (`backoffLimit: 0`, `restartPolicy: Never`), since retries
/// are the task state machine's, each in a Job of its own.
pub fn build_job(spec: &KubeSpec, identity: &JobIdentity) -> Job {
    let mut template = spec.pod_template.clone().unwrap_or_default();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(identity.labels.clone());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(identity.annotations.clone());
    let pod = template.spec.get_or_insert_with(PodSpec::default);
    pod.restart_policy = Some("Never".into());
    // At most the stop grace: a template's longer one would keep a killed
    // task's pod (and the next run, which waits for it) for that long.
    pod.termination_grace_period_seconds = Some(
        pod.termination_grace_period_seconds
            .map_or(identity.termination_grace_seconds, |own| {
                own.clamp(1, identity.termination_grace_seconds)
            }),
    );
    if let Some(account) = &spec.service_account {
        pod.service_account_name = Some(account.clone());
    }
    if !spec.node_selector.is_empty() {
        pod.node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(spec.node_selector.clone());
    }
    if !spec.tolerations.is_empty() {
        pod.tolerations
            .get_or_insert_with(Vec::new)
            .extend(spec.tolerations.iter().cloned());
    }
    let index = match pod.containers.iter().position(|c| c.name == CONTAINER) {
        Some(index) => index,
        None => {
            pod.containers.push(Container {
                name: CONTAINER.into(),
                ..Container::default()
            });
            pod.containers.len() - 1
        }
    };
    let container = &mut pod.containers[index];
    container.image = Some(spec.image.clone());
    if !spec.command.is_empty() {
        container.command = Some(spec.command.clone());
    }
    if !spec.args.is_empty() {
        container.args = Some(spec.args.clone());
    }
    if let Some(resources) = &spec.resources {
        container.resources = Some(resources.clone());
    }
    let env = container.env.get_or_insert_with(Vec::new);
    // The spec's variables and eretes' replace any of the same name that
    // the template set.
    let mut set = |name: &str, value: &str| {
        env.retain(|var| var.name != name);
        env.push(EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        });
    };
    for (name, value) in &spec.env {
        set(name, value);
    }
    for (name, value) in &identity.env {
        set(name, value);
    }
    Job {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            namespace: Some(identity.namespace.clone()),
            labels: Some(identity.labels.clone()),
            annotations: Some(identity.annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: spec.active_deadline_seconds,
            ttl_seconds_after_finished: Some(FINISHED_JOB_TTL_SECONDS),
            template: PodTemplateSpec { ..template },
            ..JobSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity() -> JobIdentity {
        JobIdentity {
            namespace: "batch".into(),
            name: "eretes-t-3-0123456789abcdef".into(),
            labels: BTreeMap::from([("eretes.io/epoch".into(), "3".into())]),
            annotations: BTreeMap::from([("eretes.io/task-id".into(), "t".into())]),
            env: vec![("ERETES_EPOCH".into(), "3".into())],
            termination_grace_seconds: 7,
        }
    }

    #[test]
    fn the_template_is_the_base_and_the_spec_lies_over_main() {
        let spec = KubeSpec::from_properties(&json!({"kubernetes": {
            "image": "busybox:1.36", "command": ["sh", "-c", "exit 0"],
            "env": {"MODE": "fast"}, "service_account": "runner",
            "node_selector": {"pool": "batch"},
            "pod_template": {
                "metadata": {"labels": {"team": "data"}},
                "spec": {"containers": [
                    {"name": "main", "image": "ignored", "env": [{"name": "MODE", "value": "slow"}, {"name": "KEEP", "value": "1"}]},
                    {"name": "sidecar", "image": "proxy:1"}
                ], "volumes": [{"name": "scratch", "emptyDir": {}}]}
            }
        }}))
        .unwrap();
        let job = build_job(&spec, &identity());
        let job_spec = job.spec.unwrap();
        assert_eq!(job_spec.backoff_limit, Some(0));
        let template = job_spec.template;
        let labels = template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["team"], "data");
        assert_eq!(labels["eretes.io/epoch"], "3");
        let pod = template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.termination_grace_period_seconds, Some(7));
        assert_eq!(pod.service_account_name.as_deref(), Some("runner"));
        assert_eq!(pod.volumes.unwrap().len(), 1);
        assert_eq!(pod.containers.len(), 2);
        let main = &pod.containers[0];
        assert_eq!(main.image.as_deref(), Some("busybox:1.36"));
        let env: Vec<(String, String)> = main
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.value.unwrap()))
            .collect();
        assert!(env.contains(&("MODE".into(), "fast".into())), "{env:?}");
        assert!(env.contains(&("KEEP".into(), "1".into())), "{env:?}");
        assert!(
            env.contains(&("ERETES_EPOCH".into(), "3".into())),
            "{env:?}"
        );
        assert_eq!(env.iter().filter(|(name, _)| name == "MODE").count(), 1);
    }

    #[test]
    fn without_a_template_main_is_the_only_container() {
        let job = build_job(&KubeSpec::new("busybox:1.36"), &identity());
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        assert_eq!(pod.containers[0].name, CONTAINER);
        assert_eq!(pod.containers[0].command, None);
    }
}
