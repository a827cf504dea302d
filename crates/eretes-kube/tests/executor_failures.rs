//! The Kubernetes executor when the API fails or races it: expired
//! watches, an unreachable or throttling server, a create whose answer was
//! lost, Jobs deleted or made by others, stale owners' late Jobs, and the
//! reaper after an outage; against the fake API server of
//! `eretes_kube::testing`, on nodes of the embedded store. Never a second
//! Job for one epoch.

use std::time::Duration;

use eretes_kube::names::job_name;
use eretes_kube::testing::fake_api::PodScript;
use eretes_kube::Reaper;
use eretes_protocol::{Outcome, TaskId, TaskState};
use k8s_openapi::api::batch::v1::Job;

mod common;

use common::cluster::*;

#[tokio::test]
async fn an_expired_watch_is_resumed_without_a_second_job() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| PodScript {
        run_for: Duration::from_secs(2),
        ..exits(0, &["one", "two"])
    });
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("watched", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    cluster.api.expire_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.api.expire_watches();
    let result = cluster.result("watched").await;
    assert_eq!(result.result["exit_code"], 0);
    let name = job_name(&namespace(), &TaskId::new("watched").unwrap(), result.epoch);
    assert_eq!(cluster.created(&name), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_api_server_is_waited_out_without_a_second_job() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| PodScript {
        run_for: Duration::from_secs(2),
        ..exits(0, &["done"])
    });
    let (relay, node) = cluster.relayed_node("n1").await;
    // Cut before the task arrives: the run waits, the task stays running.
    relay.cut();
    cluster.submit("patient", &spec()).await;
    cluster.wait_state("patient", TaskState::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cluster.api.job_history().is_empty());
    assert_eq!(cluster.state("patient").await, TaskState::Running);
    relay.restore();
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    // Cut while the Job runs: it ends meanwhile, and is seen when the
    // watches resume.
    relay.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.restore();
    let result = cluster.result("patient").await;
    assert_eq!(result.result["exit_code"], 0, "{:?}", result);
    let name = job_name(&namespace(), &TaskId::new("patient").unwrap(), result.epoch);
    assert_eq!(cluster.created(&name), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_without_a_second_job() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| exits(0, &["fine"]));
    let jobs_path = "/apis/batch/v1/namespaces/default/jobs";
    // 429, 503 and 504 the kube client retries itself; 500 and 502 are
    // this executor's to retry.
    cluster.api.fail_next(Some("POST"), jobs_path, 429, 1);
    cluster.api.fail_next(Some("POST"), jobs_path, 500, 2);
    cluster.api.fail_next(Some("POST"), jobs_path, 502, 1);
    cluster.api.fail_next(Some("GET"), jobs_path, 500, 3);
    cluster.api.fail_next(Some("DELETE"), jobs_path, 500, 2);
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("throttled", &spec()).await;
    let result = cluster.result("throttled").await;
    assert_eq!(result.result["exit_code"], 0);
    let name = job_name(
        &namespace(),
        &TaskId::new("throttled").unwrap(),
        result.epoch,
    );
    assert_eq!(cluster.created(&name), 1);
    let statuses: Vec<(String, String)> = cluster.api.requests();
    assert!(
        statuses
            .iter()
            .filter(|(method, _)| method == "POST")
            .count()
            >= 4
    );
    cluster
        .wait_jobs("the Job is gone", |jobs| jobs.is_empty())
        .await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_job_deleted_from_outside_fails_the_task_with_that_reason() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("victim", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    let name = cluster.api.jobs("default")[0]
        .metadata
        .name
        .clone()
        .unwrap();
    cluster.api.delete_job_externally("default", &name);
    let result = cluster.result("victim").await;
    assert_eq!(result.outcome, Outcome::Failed);
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("deleted by someone else"), "{error}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_adopted_not_made_twice() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| exits(0, &["once"]));
    // The first create happens, but the executor is told 500.
    cluster.api.lose_next_answers(
        Some("POST"),
        "/apis/batch/v1/namespaces/default/jobs",
        500,
        1,
    );
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("lost", &spec()).await;
    let result = cluster.result("lost").await;
    assert_eq!(result.result["exit_code"], 0, "{result:?}");
    let name = job_name(&namespace(), &TaskId::new("lost").unwrap(), result.epoch);
    assert_eq!(cluster.created(&name), 1);
    let posts = cluster
        .api
        .requests()
        .iter()
        .filter(|(m, _)| m == "POST")
        .count();
    assert!(posts >= 2, "the create was tried again: {posts}");
    node.shutdown().await;
}

/// A Job of `job`'s task with its labels but `epoch`, as a stale or newer
/// owner would have made it.
fn twin(job: &Job, epoch: i64) -> Job {
    let mut twin = job.clone();
    let mut labels = job.metadata.labels.clone().unwrap();
    labels.insert("eretes.io/epoch".into(), epoch.to_string());
    twin.metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(format!("twin-{epoch}")),
        namespace: job.metadata.namespace.clone(),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let job_spec = twin.spec.as_mut().unwrap();
    // As the API made them for the original: set again for the twin.
    job_spec.selector = None;
    job_spec.manual_selector = None;
    job_spec.template.metadata.as_mut().unwrap().labels = Some(labels);
    twin.status = None;
    twin
}

#[tokio::test]
async fn a_stale_owners_late_job_is_deleted_and_a_newer_one_stops_the_run() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let node = cluster.node("n1", Duration::from_secs(10)).await;
    cluster.submit("contested", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    let mine = cluster.api.jobs("default")[0].clone();
    let epoch = epoch_of(&mine);
    let jobs: kube::Api<Job> = kube::Api::namespaced(cluster.api.client(), "default");
    // An owner that was frozen wakes up and creates its (older) Job late:
    // the current run deletes it.
    jobs.create(&Default::default(), &twin(&mine, epoch - 1))
        .await
        .unwrap();
    let older = format!("twin-{}", epoch - 1);
    cluster
        .wait_jobs("the stale Job is deleted", |jobs| {
            jobs.len() == 1 && jobs[0].metadata.name.as_deref() != Some(older.as_str())
        })
        .await;
    assert_eq!(
        cluster.api.jobs("default")[0].metadata.name,
        mine.metadata.name
    );
    // A newer epoch's Job: this run is the stale one, and stops (its Job
    // goes, the newer one stays).
    jobs.create(&Default::default(), &twin(&mine, epoch + 1))
        .await
        .unwrap();
    let newer = format!("twin-{}", epoch + 1);
    cluster
        .wait_jobs("the stale run's Job is deleted", |jobs| {
            jobs.len() == 1 && jobs[0].metadata.name.as_deref() == Some(newer.as_str())
        })
        .await;
    node.kill();
}

#[tokio::test]
async fn pods_orphaned_by_someone_elses_delete_go_before_the_next_job() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let first = cluster.node("n1", Duration::from_secs(1)).await;
    cluster.submit("orphans", &spec()).await;
    cluster
        .wait_jobs("the first Job runs", |jobs| jobs.len() == 1)
        .await;
    let old = cluster.api.jobs("default")[0].clone();
    first.kill();
    // Someone deletes the dead owner's Job but orphans its pod.
    let jobs: kube::Api<Job> = kube::Api::namespaced(cluster.api.client(), "default");
    jobs.delete(
        old.metadata.name.as_deref().unwrap(),
        &kube::api::DeleteParams::orphan(),
    )
    .await
    .unwrap();
    cluster
        .wait_jobs("the old Job is gone", |jobs| jobs.is_empty())
        .await;
    assert_eq!(
        cluster.api.pods("default").len(),
        1,
        "the orphaned pod runs on"
    );
    let second = cluster.node("n2", Duration::from_secs(1)).await;
    cluster
        .wait_jobs("the new Job runs", |jobs| jobs.len() == 1)
        .await;
    let new = cluster.api.jobs("default")[0].clone();
    let uid = new.metadata.uid.clone().unwrap();
    // The orphan was deleted before the new Job was made: every pod now is
    // the new Job's.
    for pod in cluster.api.pods("default") {
        let owner = pod.metadata.owner_references.unwrap_or_default();
        assert!(
            owner.iter().any(|o| o.uid == uid),
            "{:?}",
            pod.metadata.name
        );
    }
    second.shutdown().await;
}

#[tokio::test]
async fn the_reaper_deletes_the_job_of_a_task_removed_while_the_api_was_down() {
    let cluster = Cluster::start().await;
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let (relay, node) = cluster.relayed_node("n1").await;
    cluster.submit("abandoned", &spec()).await;
    cluster
        .wait_jobs("the Job runs", |jobs| jobs.len() == 1)
        .await;
    // The API goes away, and the task is removed: its run cannot delete
    // the Job.
    relay.cut();
    cluster
        .coordinator
        .delete(&TaskId::new("abandoned").unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.restore();
    node.kill();
    assert_eq!(cluster.api.jobs("default").len(), 1);
    // A sweep sees the task gone and deletes its Job; a running task's Job
    // is left alone.
    cluster.api.set_kubelet(|_: &Job| runs_for_ever());
    let keeper = cluster.node("n2", Duration::from_secs(10)).await;
    cluster.submit("alive", &spec()).await;
    cluster
        .wait_jobs("both Jobs exist", |jobs| jobs.len() == 2)
        .await;
    let reaper = Reaper::new(&cluster.config());
    assert_eq!(reaper.sweep(&cluster.coordinator).await, 1);
    cluster
        .wait_jobs("only the live task's Job is left", |jobs| jobs.len() == 1)
        .await;
    let left = &cluster.api.jobs("default")[0];
    assert_eq!(
        left.metadata.annotations.as_ref().unwrap()["eretes.io/task-id"],
        "alive"
    );
    assert_eq!(reaper.sweep(&cluster.coordinator).await, 0);
    keeper.shutdown().await;
}
