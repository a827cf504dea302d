//! Test harness: an observer that records every handler run, a handler whose
//! behaviour each task's properties choose, and a small cluster builder on
//! the embedded store.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec};
use eretes_runtime::balancer::{Balancer, DumbBalancer, FairBalancer};
use eretes_runtime::{Handler, HandlerOutcome, Node, NodeConfig, NodeHandle, TaskContext};
use eretes_store::Store;
use serde_json::json;
use tokio::time::Instant;

pub use eretes_runtime::observer::Observer;

/// A handler steered by the task's `mode` property:
/// `idle` (default) waits for cancellation and releases; `done` returns a
/// result; `fail` fails; `panic` panics; `work` completes after `ms`;
/// `stubborn` never returns; `kill-me` asks the test to kill its node.
pub struct ScriptedHandler {
    pub observer: Arc<Observer>,
    /// Receives the node name whenever a `kill-me` task starts.
    pub kill_requests: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

#[async_trait::async_trait]
impl Handler for ScriptedHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        let _run = self
            .observer
            .start(ctx.id.as_str(), ctx.node.as_str(), ctx.epoch);
        let props = &ctx.task.spec.properties.value();
        match props.get("mode").and_then(|m| m.as_str()).unwrap_or("idle") {
            "done" => HandlerOutcome::Done(json!({"node": ctx.node.as_str(), "epoch": ctx.epoch})),
            "fail" => HandlerOutcome::Failed("scripted failure".into()),
            "panic" => panic!("scripted panic"),
            "work" => {
                let ms = props.get("ms").and_then(|m| m.as_u64()).unwrap_or(100);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => HandlerOutcome::Done(json!("worked")),
                    _ = ctx.cancel.cancelled() => HandlerOutcome::Release,
                }
            }
            "stubborn" => loop {
                // Ignores cancellation entirely.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            },
            "kill-me" => {
                if let Some(tx) = &self.kill_requests {
                    let _ = tx.send(ctx.node.to_string());
                }
                ctx.cancel.cancelled().await;
                HandlerOutcome::Release
            }
            _ => {
                ctx.cancel.cancelled().await;
                HandlerOutcome::Release
            }
        }
    }
}

pub const TTL: Duration = Duration::from_secs(2);

/// A test cluster on one store.
pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub ns: Namespace,
    pub coordinator: Coordinator,
    pub observer: Arc<Observer>,
    pub nodes: HashMap<String, NodeHandle>,
    pub kill_requests: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Cluster {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let ns = Namespace::new("test").unwrap();
        Cluster {
            coordinator: Coordinator::new(store.clone(), ns.clone()),
            store,
            ns,
            observer: Observer::new(),
            nodes: HashMap::new(),
            kill_requests: None,
        }
    }

    pub fn config(&self, name: &str) -> NodeConfig {
        let mut config =
            NodeConfig::new(NodeName::new(name).unwrap(), self.ns.clone()).with_lease_ttl(TTL);
        config.balance_interval = Duration::from_secs(5);
        config.membership_balance_delay = Duration::from_millis(500);
        config.release_ignore = Duration::from_secs(3);
        config
    }

    pub async fn start_with(
        &mut self,
        store: Arc<dyn Store>,
        config: NodeConfig,
        balancer: Box<dyn Balancer>,
    ) {
        let handler = Arc::new(ScriptedHandler {
            observer: self.observer.clone(),
            kill_requests: self.kill_requests.clone(),
        });
        let name = config.name.to_string();
        let node = Node::start(store, config, handler, balancer).await.unwrap();
        self.nodes.insert(name, node);
    }

    pub async fn start_fair(&mut self, name: &str) {
        let config = self.config(name);
        self.start_with(
            self.store.clone(),
            config,
            Box::new(FairBalancer::default()),
        )
        .await;
    }

    pub async fn start_dumb(&mut self, name: &str) {
        let config = self.config(name);
        self.start_with(self.store.clone(), config, Box::new(DumbBalancer))
            .await;
    }

    pub async fn submit(&self, id: &str, properties: serde_json::Value) {
        self.coordinator
            .submit(
                &TaskId::new(id).unwrap(),
                &TaskSpec::new(GroupName::default(), properties),
            )
            .await
            .unwrap();
    }

    pub async fn submit_idle(&self, count: usize) {
        for i in 0..count {
            self.submit(&format!("t{i:04}"), json!({})).await;
        }
    }

    pub fn node(&self, name: &str) -> &NodeHandle {
        &self.nodes[name]
    }
}

/// Let (virtual) time pass until `condition` holds; panic naming `what` after
/// `limit` of virtual time.
pub async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many keys the store holds under `prefix`.
pub async fn keys_under(store: &dyn Store, prefix: &str) -> usize {
    eretes_store::StoreExt::get_prefix(store, prefix)
        .await
        .unwrap()
        .kvs
        .len()
}

/// Spread (max − min) of running tasks over `nodes`.
pub fn spread(observer: &Observer, nodes: &[&str]) -> usize {
    let per_node = observer.running_per_node();
    let counts: Vec<usize> = nodes
        .iter()
        .map(|n| per_node.get(*n).copied().unwrap_or(0))
        .collect();
    counts.iter().max().unwrap() - counts.iter().min().unwrap()
}

/// Submit a task whose handler ignores cancellation, and wait until it runs.
pub async fn run_stubborn_task(cluster: &Cluster) {
    cluster
        .submit("stubborn", json!({"mode": "stubborn"}))
        .await;
    eventually("it runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 1
    })
    .await;
}

/// Start `count` nodes named `n00`, `n01`, … with the fair balancer, and
/// wait until each sees them all; returns their names.
pub async fn start_fair_nodes(cluster: &mut Cluster, count: usize) -> Vec<String> {
    let names: Vec<String> = (0..count).map(|n| format!("n{n:02}")).collect();
    for name in &names {
        cluster.start_fair(name).await;
    }
    eventually(
        "every node sees the others",
        Duration::from_secs(30),
        || {
            cluster
                .nodes
                .values()
                .all(|node| node.status().borrow().live_nodes == count)
        },
    )
    .await;
    names
}
