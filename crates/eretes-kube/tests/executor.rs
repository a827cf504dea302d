//! The Kubernetes executor against the fake API server of
//! `eretes_kube::testing` (the real `kube` client over HTTP, with the API's
//! resource versions, watch events, 404/409/410 answers and deletion
//! propagation), on nodes of the embedded store.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eretes_etcd::testing::Relay;
use eretes_kube::names::job_name;
use eretes_kube::testing::fake_api::{FakeApiServer, JobEventKind, PodScript};
use eretes_kube::{AllowImages, KubeConfig, KubeHandler, KubeSpec, Reaper};
use eretes_protocol::{
    Coordinator, GroupName, Namespace, NodeName, Outcome, ResultRecord, TaskCommand, TaskId,
    TaskSpec, TaskState,
};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;
use k8s_openapi::api::batch::v1::Job;

const IMAGE: &str = "registry.test/jobs/worker:1";

fn namespace() -> Namespace {
    Namespace::new("kube").unwrap()
}

/// A store, and nodes running Kubernetes tasks against one fake API server.
struct Cluster {
    store: Arc<dyn Store>,
    coordinator: Coordinator,
    api: FakeApiServer,
    logs: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let store: Arc<dyn Store> = EmbeddedStore::new();
        Cluster {
            coordinator: Coordinator::new(store.clone(), namespace()),
            store,
            api: FakeApiServer::start().await,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self) -> KubeConfig {
        self.config_for(self.api.client())
    }

    fn config_for(&self, client: kube::Client) -> KubeConfig {
        KubeConfig {
            client,
            namespace: namespace(),
            default_namespace: "default".into(),
            allow_images: AllowImages::new(["registry.test/jobs/"]).unwrap(),
            allow_namespaces: Vec::new(),
            allow_service_accounts: Vec::new(),
            stop_grace: Duration::from_secs(1),
            logs_dir: self.logs.path().to_path_buf(),
            log_cap: 1 << 20,
            tail_bytes: 4096,
            retry_backoff: (Duration::from_millis(50), Duration::from_millis(200)),
        }
    }

    async fn node(&self, name: &str, lease_ttl: Duration) -> NodeHandle {
        self.node_with(name, lease_ttl, self.config()).await
    }

    async fn node_with(&self, name: &str, lease_ttl: Duration, kube: KubeConfig) -> NodeHandle {
        let handler = Arc::new(StateMachine::new(
            KubeHandler::new(kube),
            self.coordinator.clone(),
        ));
        let config =
            NodeConfig::new(NodeName::new(name).unwrap(), namespace()).with_lease_ttl(lease_ttl);
        Node::start(self.store.clone(), config, handler, Box::new(DumbBalancer))
            .await
            .unwrap()
    }

    /// A node whose API calls go through a relay the test can cut.
    async fn relayed_node(&self, name: &str) -> (Relay, NodeHandle) {
        let address = self
            .api
            .url()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let relay = Relay::start(address).await.unwrap();
        let mut config = kube::Config::new(relay.url().parse().unwrap());
        config.default_namespace = "default".into();
        let client = kube::Client::try_from(config).unwrap();
        let node = self
            .node_with(name, Duration::from_secs(10), self.config_for(client))
            .await;
        (relay, node)
    }

    async fn submit(&self, id: &str, spec: &KubeSpec) {
        self.coordinator
            .submit(
                &TaskId::new(id).unwrap(),
                &TaskSpec::new(GroupName::default(), spec.to_properties()),
            )
            .await
            .unwrap();
    }

    async fn result(&self, id: &str) -> ResultRecord {
        let id = TaskId::new(id).unwrap();
        for _ in 0..600 {
            if let Some(result) = self.coordinator.result(&id).await.unwrap() {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no result for {id} within 30 s");
    }

    async fn state(&self, id: &str) -> TaskState {
        self.coordinator
            .task_view(&TaskId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn wait_state(&self, id: &str, state: TaskState) {
        for _ in 0..600 {
            if self.state(id).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} did not become {state:?} within 30 s");
    }

    async fn command(&self, id: &str, command: TaskCommand) {
        self.coordinator
            .send_task_command(&TaskId::new(id).unwrap(), &command)
            .await
            .unwrap();
    }

    /// Wait up to 30 s until `done` holds of the fake's Jobs in `default`.
    async fn wait_jobs(&self, what: &str, done: impl Fn(&[Job]) -> bool) {
        for _ in 0..600 {
            if done(&self.api.jobs("default")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting until {what}: {:?}",
            names(&self.api.jobs("default"))
        );
    }

    /// Jobs created for `name`, in order.
    fn created(&self, name: &str) -> usize {
        self.api
            .job_history()
            .iter()
            .filter(|event| event.name == name && matches!(event.kind, JobEventKind::Created))
            .count()
    }

    /// Whether two Jobs ever existed at once (from the fake's record of
    /// creations and removals, by uid: every attempt of one epoch has the
    /// same name). A Job is removed only after its pods (foreground), so
    /// this covers the pods too.
    fn ever_two_at_once(&self) -> bool {
        let mut alive = BTreeSet::new();
        for event in self.api.job_history() {
            match event.kind {
                JobEventKind::Created => {
                    alive.insert(event.uid.clone());
                    if alive.len() > 1 {
                        return true;
                    }
                }
                JobEventKind::Removed => {
                    alive.remove(&event.uid);
                }
                _ => {}
            }
        }
        false
    }
}

fn names(jobs: &[Job]) -> Vec<String> {
    jobs.iter()
        .map(|job| job.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn spec() -> KubeSpec {
    let mut spec = KubeSpec::new(IMAGE);
    spec.command = vec!["work".into()];
    spec.args = vec!["--hard".into()];
    spec
}

fn runs_for_ever() -> PodScript {
    PodScript {
        pending_for: Duration::from_millis(50),
        log: vec!["started".into()],
        run_for: Duration::from_millis(100),
        exit_code: None,
        ignore_sigterm: false,
    }
}

fn exits(code: i32, lines: &[&str]) -> PodScript {
    PodScript {
        pending_for: Duration::from_millis(50),
        log: lines.iter().map(|line| line.to_string()).collect(),
        run_for: Duration::from_millis(300),
        exit_code: Some(code),
        ignore_sigterm: false,
    }
}

fn epoch_of(job: &Job) -> i64 {
    job.metadata.labels.as_ref().unwrap()["eretes.io/epoch"]
        .parse()
        .unwrap()
}

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
