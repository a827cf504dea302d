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
    let mut cluster = Cluster::new(EmbeddedStore::new());
    let ttl = Duration::from_millis(1200);
    let mut config = cluster.config("a").with_lease_ttl(ttl);
    config.balance_interval = Duration::from_secs(3600);
    let armed = Arc::new(AtomicBool::new(false));
    let balancer = StallingBalancer {
        inner: DumbBalancer,
        armed: armed.clone(),
        // Twice the TTL: far past the fence deadline (TTL − TTL/4), and
        // long enough for several renewals (one every TTL/3).
        stall: ttl * 2,
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
    eventually("the second task runs", Duration::from_secs(20), || {
        cluster.observer.running_tasks() == 2
    })
    .await;
    assert!(!armed.load(Ordering::SeqCst), "the balancer stalled");
    let stats = cluster.node("a").stats();
    assert_eq!(
        NodeStats::get(&stats.fences),
        0,
        "renewals sent during the stall kept the lease, so the node did not fence"
    );
    let runs = cluster.observer.runs();
    assert_eq!(runs.len(), 2, "no task was stopped and run again: {runs:?}");
    assert!(runs.iter().all(|run| run.ended.is_none()));
}
