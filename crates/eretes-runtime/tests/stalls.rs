//! Real-time scenarios: a node whose main loop stalls while its keepalive,
//! a task of its own, goes on renewing on another worker thread. Paused time
//! cannot show this (a stalled thread stops the virtual clock too), so these
//! run on a real clock with generous bounds, and are few.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{GroupName, TaskId};
use eretes_runtime::balancer::{Balancer, ClaimDecision, ClusterView, DumbBalancer};
use eretes_runtime::NodeStats;
use eretes_store::embedded::EmbeddedStore;
use serde_json::json;

/// Claims like [`DumbBalancer`], but blocks its thread for `stall` on the
/// first claim decision after `armed` is set: the node's main loop, which
/// asks it, stalls for that long.
struct StallingBalancer {
    inner: DumbBalancer,
    armed: Arc<AtomicBool>,
    stall: Duration,
}

impl Balancer for StallingBalancer {
    fn can_claim(&mut self, task: &TaskId, group: &GroupName, view: &ClusterView) -> ClaimDecision {
        if self.armed.swap(false, Ordering::SeqCst) {
            std::thread::sleep(self.stall);
        }
        self.inner.can_claim(task, group, view)
    }

    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId> {
        self.inner.balance(view)
    }
}

/// A renewal that came in while the main loop was stalled past its fence
/// deadline keeps the node from fencing: the loop looks at its timers before
/// its channels, and before this was handled, 100 nodes in one process on 2
/// cores fenced hundreds of times without a single lease expiring, and the
/// takeovers that followed parked healthy tasks as poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_main_loop_does_not_fence_while_its_keepalive_renews() {
    let (cluster, fences) = stall_a_running_node(None).await;
    assert_eq!(
        fences, 0,
        "renewals sent during the stall kept the lease, so the node did not fence"
    );
    eventually("the second task runs", Duration::from_secs(20), || {
        cluster.observer.running_tasks() == 2
    })
    .await;
    let runs = cluster.observer.runs();
    assert_eq!(runs.len(), 2, "no task was stopped and run again: {runs:?}");
    assert!(runs.iter().all(|run| run.ended.is_none()));
}

/// With `keepalive_runtime`, renewals go on while the node's own runtime is
/// blocked outright: here a single-threaded runtime whose only thread the
/// balancer holds for twice the TTL. Without it, that keepalive could not
/// run, and the node would fence (the next test shows it does).
#[tokio::test(flavor = "current_thread")]
async fn a_keepalive_on_its_own_runtime_renews_while_the_nodes_runtime_is_blocked() {
    let keepalives = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(
        stall_a_running_node(Some(keepalives.handle().clone()))
            .await
            .1,
        0,
        "the keepalive renewed on its own thread, so the node did not fence"
    );
    keepalives.shutdown_background();
}

#[tokio::test(flavor = "current_thread")]
async fn a_keepalive_on_the_nodes_blocked_runtime_cannot_renew_and_the_node_fences() {
    assert!(
        stall_a_running_node(None).await.1 >= 1,
        "the keepalive shares the blocked thread, so the node fenced"
    );
}

/// The lease TTL of the stalled node.
const STALL_TTL: Duration = Duration::from_millis(1200);

/// Start a node running one task, then block its main loop (and the thread
/// under it) for twice the TTL: far past the fence deadline (TTL − TTL/4),
/// and long enough for several renewals (one every TTL/3). Returns the
/// cluster and the node's fences a moment after the stall.
async fn stall_a_running_node(keepalive_runtime: Option<tokio::runtime::Handle>) -> (Cluster, u64) {
    let mut cluster = Cluster::new(EmbeddedStore::new());
    let mut config = cluster.config("a").with_lease_ttl(STALL_TTL);
    config.balance_interval = Duration::from_secs(3600);
    config.keepalive_runtime = keepalive_runtime;
    let armed = Arc::new(AtomicBool::new(false));
    let balancer = StallingBalancer {
        inner: DumbBalancer,
        armed: armed.clone(),
        stall: STALL_TTL * 2,
    };
    cluster
        .start_with(cluster.store.clone(), config, Box::new(balancer))
        .await;
    cluster.submit("before", json!({})).await;
    eventually("the first task runs", Duration::from_secs(10), || {
        cluster.observer.running_tasks() == 1
    })
    .await;
    armed.store(true, Ordering::SeqCst);
    cluster.submit("stalls", json!({})).await;
    eventually("the balancer stalled", Duration::from_secs(20), || {
        !armed.load(Ordering::SeqCst)
    })
    .await;
    // The loop has woken past its deadline by now; give it a moment to act.
    tokio::time::sleep(STALL_TTL).await;
    let fences = NodeStats::get(&cluster.node("a").stats().fences);
    (cluster, fences)
}
