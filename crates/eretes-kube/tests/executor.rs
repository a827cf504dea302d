//! The Kubernetes executor against the fake API server of
//! `eretes_kube::testing` (the real `kube` client over HTTP, with the API's
//! resource versions, watch events, 404/409/410 answers and deletion
//! propagation), on nodes of the embedded store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eretes_kube::names::job_name;
use eretes_kube::testing::fake_api::{JobEventKind, PodScript};
use eretes_kube::KubeSpec;
use eretes_protocol::{Outcome, TaskCommand, TaskId, TaskState};
use k8s_openapi::api::batch::v1::Job;

mod common;

use common::cluster::*;

#[tokio::test]
async fn a_job_runs_to_success_with_its_exit_code_log_and_environment() {
    let cluster = Cluster::start().await;
    let seen_env = Arc::new(Mutex::new(Vec::new()));
    let env = seen_env.clone();
    cluster.api.set_kubelet(move |job: &Job| {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let main = pod.containers.iter().find(|c| c.name == "main").unwrap();
        *env.lock().unwrap() = main
            .env
            .iter()
            .flatten()
            .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
            .collect::<Vec<_>>();
        exits(0, &["hello", "world"])
    });
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("report", &spec()).await;
    let result = cluster.result("report").await;
    let value = &result.result;
    assert_eq!(value["exit_code"], 0, "{value}");
    assert!(
        value["log_tail"].as_str().unwrap().contains("world"),
        "{value}"
    );
    let name = job_name(&namespace(), &TaskId::new("report").unwrap(), result.epoch);
    assert_eq!(value["job"], name.as_str());

    let env = seen_env.lock().unwrap().clone();
    for (var, expected) in [("ERETES_TASK_ID", "report"), ("ERETES_NODE", "n1")] {
        assert!(
            env.contains(&(var.into(), expected.into())),
            "{var}: {env:?}"
        );
    }
    assert!(
        env.iter().any(|(name, _)| name == "ERETES_EPOCH"),
        "{env:?}"
    );
    // The log was followed into the task's log file.
    let log = std::fs::read_to_string(cluster.logs.path().join("report/stdout.log")).unwrap();
    assert_eq!(log, "hello\nworld\n");
    // Nothing is left behind: the finished Job and its pod are deleted.
    cluster
        .wait_jobs("the finished Job is gone", |jobs| jobs.is_empty())
        .await;
    assert!(cluster.api.pods("default").is_empty());
    assert_eq!(cluster.created(&name), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_failing_job_is_retried_by_the_state_machine_and_then_fails() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| exits(3, &["boom"]));
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    let mut spec = spec();
    spec.max_attempts = 2;
    cluster.submit("flaky", &spec).await;
    let result = cluster.result("flaky").await;
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("exit code 3"), "{error}");
    assert!(error.contains("boom"), "{error}");
    // Two attempts, each a Job of its own that was gone before the next.
    let name = job_name(&namespace(), &TaskId::new("flaky").unwrap(), result.epoch);
    assert_eq!(cluster.created(&name), 2);
    assert!(!cluster.ever_two_at_once());
    cluster
        .wait_jobs("the failed Job is gone", |jobs| jobs.is_empty())
        .await;
    node.shutdown().await;
}

#[tokio::test]
async fn long_and_odd_task_ids_get_valid_deterministic_names() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| exits(0, &[]));
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    let long = "Very.Long:Task_Id-".repeat(7);
    for id in ["Odd:ID.with_Caps", long.as_str(), "::"] {
        cluster.submit(id, &spec()).await;
        let result = cluster.result(id).await;
        let name = job_name(&namespace(), &TaskId::new(id).unwrap(), result.epoch);
        assert!(name.len() <= 63, "{name}");
        assert_eq!(cluster.created(&name), 1, "{id} → {name}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn after_a_failover_the_new_owner_deletes_the_old_epochs_job_before_creating_its_own() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| PodScript {
        ignore_sigterm: true,
        ..runs_for_ever()
    });
    let first = cluster.node("n1", Duration::from_secs(1)).await;
    cluster.submit("service", &spec()).await;
    cluster
        .wait_jobs("the first Job runs", |jobs| jobs.len() == 1)
        .await;
    let old = cluster.api.jobs("default")[0].clone();
    let old_name = old.metadata.name.clone().unwrap();
    // The node dies as a process would: its Job runs on, unowned.
    first.kill();
    let second = cluster.node("n2", Duration::from_secs(1)).await;
    cluster
        .wait_jobs("the new owner's Job runs", |jobs| {
            jobs.len() == 1 && jobs[0].metadata.name.as_deref() != Some(old_name.as_str())
        })
        .await;
    let new = cluster.api.jobs("default")[0].clone();
    assert!(epoch_of(&new) > epoch_of(&old));
    // The old Job was deleted, and gone (pods first), before the new one
    // was created.
    let history = cluster.api.job_history();
    let position = |name: &str, kind: fn(&JobEventKind) -> bool| {
        history
            .iter()
            .position(|event| event.name == name && kind(&event.kind))
            .unwrap_or_else(|| panic!("{name}: {history:?}"))
    };
    let old_deleted = position(&old_name, |k| matches!(k, JobEventKind::Deleted(_)));
    let old_removed = position(&old_name, |k| matches!(k, JobEventKind::Removed));
    let new_created = position(new.metadata.name.as_deref().unwrap(), |k| {
        matches!(k, JobEventKind::Created)
    });
    assert!(
        old_deleted < old_removed && old_removed < new_created,
        "{history:?}"
    );
    assert!(!cluster.ever_two_at_once());
    second.shutdown().await;
}

#[tokio::test]
async fn pause_resume_and_kill_delete_and_make_jobs() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("steered", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    let running = cluster.api.jobs("default")[0].clone();
    let name = job_name(
        &namespace(),
        &TaskId::new("steered").unwrap(),
        epoch_of(&running),
    );
    assert_eq!(running.metadata.name.as_deref(), Some(name.as_str()));

    cluster.command("steered", TaskCommand::Pause).await;
    cluster.wait_state("steered", TaskState::Paused).await;
    cluster
        .wait_jobs("the paused task's Job is gone", |jobs| jobs.is_empty())
        .await;
    assert!(cluster.api.pods("default").is_empty());

    cluster.command("steered", TaskCommand::Resume).await;
    cluster
        .wait_jobs("the resumed task's Job runs", |jobs| jobs.len() == 1)
        .await;
    assert_eq!(cluster.created(&name), 2);

    // A sleep deletes the Job; waking makes the next.
    let until_ms = eretes_protocol::now_ms() + 5_000;
    cluster
        .command("steered", TaskCommand::Sleep { until_ms })
        .await;
    cluster.wait_state("steered", TaskState::Sleeping).await;
    cluster
        .wait_jobs("the sleeping task's Job is gone", |jobs| jobs.is_empty())
        .await;
    cluster
        .wait_jobs("the woken task's Job runs", |jobs| jobs.len() == 1)
        .await;
    assert_eq!(cluster.created(&name), 3);

    cluster.command("steered", TaskCommand::Kill).await;
    let result = cluster.result("steered").await;
    assert_eq!(result.outcome, Outcome::Killed);
    cluster
        .wait_jobs("the killed task's Job is gone", |jobs| jobs.is_empty())
        .await;
    assert!(!cluster.ever_two_at_once());
    node.shutdown().await;
}

#[tokio::test]
async fn removing_a_task_deletes_its_job() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("doomed", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    cluster
        .coordinator
        .delete(&TaskId::new("doomed").unwrap())
        .await
        .unwrap();
    cluster
        .wait_jobs("the removed task's Job is gone", |jobs| jobs.is_empty())
        .await;
    assert!(cluster.api.pods("default").is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn the_active_deadline_fails_an_attempt_and_names_itself() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    let mut spec = spec();
    spec.active_deadline_seconds = Some(1);
    spec.max_attempts = 1;
    cluster.submit("slow", &spec).await;
    let result = cluster.result("slow").await;
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("active deadline of 1s"), "{error}");
    node.shutdown().await;
}

#[tokio::test]
async fn an_image_off_the_allow_list_fails_at_once_and_makes_no_job() {
    let cluster = Cluster::start().await;
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster
        .submit("intruder", &KubeSpec::new("evil.example.com/miner:1"))
        .await;
    let result = cluster.result("intruder").await;
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("--allow-images"), "{error}");
    assert!(cluster.api.job_history().is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn a_sidecar_image_off_the_allow_list_is_refused() {
    let cluster = Cluster::start().await;
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    let spec = KubeSpec::from_value(&serde_json::json!({
        "image": IMAGE,
        "pod_template": {"spec": {"containers": [{"name": "miner", "image": "evil.example.com/miner:1"}]}}
    }))
    .unwrap();
    cluster.submit("sneaky", &spec).await;
    let result = cluster.result("sneaky").await;
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("evil.example.com/miner:1"), "{error}");
    assert!(cluster.api.job_history().is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn a_pod_whose_image_cannot_be_pulled_fails_the_attempt() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| PodScript {
        pending_for: Duration::from_secs(600),
        ..runs_for_ever()
    });
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    let mut spec = spec();
    spec.max_attempts = 1;
    cluster.submit("typo", &spec).await;
    let mut pod = None;
    for _ in 0..600 {
        pod = cluster.api.pods("default").first().cloned();
        if pod.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pod = pod.expect("the Job's pod within 30 s");
    assert!(cluster.api.set_waiting(
        "default",
        pod.metadata.name.as_deref().unwrap(),
        "ImagePullBackOff",
        "Back-off pulling image"
    ));
    let result = cluster.result("typo").await;
    let error = result.error.clone().unwrap_or_default();
    assert!(
        error.contains("ImagePullBackOff: Back-off pulling image"),
        "{error}"
    );
    cluster
        .wait_jobs("the stuck Job is gone", |jobs| jobs.is_empty())
        .await;
    node.shutdown().await;
}
