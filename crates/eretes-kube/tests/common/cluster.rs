//! The executor tests' harness: a store, and nodes running Kubernetes
//! tasks against one fake API server; a spec, pod scripts, and waits.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use eretes_etcd::testing::Relay;
use eretes_kube::testing::fake_api::{FakeApiServer, JobEventKind, PodScript};
use eretes_kube::{AllowImages, KubeConfig, KubeHandler, KubeSpec};
use eretes_protocol::{
    Coordinator, GroupName, Namespace, NodeName, ResultRecord, TaskCommand, TaskId, TaskSpec,
    TaskState,
};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;
use k8s_openapi::api::batch::v1::Job;

pub const IMAGE: &str = "registry.test/jobs/worker:1";

pub fn namespace() -> Namespace {
    Namespace::new("kube").unwrap()
}

/// A store, and nodes running Kubernetes tasks against one fake API server.
pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub coordinator: Coordinator,
    pub api: FakeApiServer,
    pub logs: tempfile::TempDir,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let store: Arc<dyn Store> = EmbeddedStore::new();
        Cluster {
            coordinator: Coordinator::new(store.clone(), namespace()),
            store,
            api: FakeApiServer::start().await,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    pub fn config(&self) -> KubeConfig {
        self.config_for(self.api.client())
    }

    pub fn config_for(&self, client: kube::Client) -> KubeConfig {
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

    pub async fn node(&self, name: &str, lease_ttl: Duration) -> NodeHandle {
        self.node_with(name, lease_ttl, self.config()).await
    }

    pub async fn node_with(&self, name: &str, lease_ttl: Duration, kube: KubeConfig) -> NodeHandle {
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
    pub async fn relayed_node(&self, name: &str) -> (Relay, NodeHandle) {
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

    pub async fn submit(&self, id: &str, spec: &KubeSpec) {
        self.coordinator
            .submit(
                &TaskId::new(id).unwrap(),
                &TaskSpec::new(GroupName::default(), spec.to_properties()),
            )
            .await
            .unwrap();
    }

    pub async fn result(&self, id: &str) -> ResultRecord {
        let id = TaskId::new(id).unwrap();
        for _ in 0..600 {
            if let Some(result) = self.coordinator.result(&id).await.unwrap() {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no result for {id} within 30 s");
    }

    pub async fn state(&self, id: &str) -> TaskState {
        self.coordinator
            .task_view(&TaskId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    pub async fn wait_state(&self, id: &str, state: TaskState) {
        for _ in 0..600 {
            if self.state(id).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} did not become {state:?} within 30 s");
    }

    pub async fn command(&self, id: &str, command: TaskCommand) {
        self.coordinator
            .send_task_command(&TaskId::new(id).unwrap(), &command)
            .await
            .unwrap();
    }

    /// Wait up to 30 s until `done` holds of the fake's Jobs in `default`.
    pub async fn wait_jobs(&self, what: &str, done: impl Fn(&[Job]) -> bool) {
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
    pub fn created(&self, name: &str) -> usize {
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
    pub fn ever_two_at_once(&self) -> bool {
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

pub fn names(jobs: &[Job]) -> Vec<String> {
    jobs.iter()
        .map(|job| job.metadata.name.clone().unwrap_or_default())
        .collect()
}

pub fn spec() -> KubeSpec {
    let mut spec = KubeSpec::new(IMAGE);
    spec.command = vec!["work".into()];
    spec.args = vec!["--hard".into()];
    spec
}

pub fn runs_for_ever() -> PodScript {
    PodScript {
        pending_for: Duration::from_millis(50),
        log: vec!["started".into()],
        run_for: Duration::from_millis(100),
        exit_code: None,
        ignore_sigterm: false,
    }
}

pub fn exits(code: i32, lines: &[&str]) -> PodScript {
    PodScript {
        pending_for: Duration::from_millis(50),
        log: lines.iter().map(|line| line.to_string()).collect(),
        run_for: Duration::from_millis(300),
        exit_code: Some(code),
        ignore_sigterm: false,
    }
}

pub fn epoch_of(job: &Job) -> i64 {
    job.metadata.labels.as_ref().unwrap()["eretes.io/epoch"]
        .parse()
        .unwrap()
}
