//! How a node paces its writes by the store's answers: fewer claims, and
//! fewer run ends, in flight while transactions are slow (as etcd's are
//! behind a long apply queue), more when they are quick. Paused tokio time
//! on the embedded store, behind a store wrapper that delays transactions.

mod common;

use std::time::Duration;

use common::*;
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::NodeStats;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;

#[tokio::test(start_paused = true)]
async fn slow_claim_transactions_shrink_the_claims_in_flight_and_quick_ones_grow_them() {
    // A store that takes longer to answer a claim than a twentieth of the
    // TTL (2 s here: 100 ms), as etcd does behind a long apply queue.
    let faulty = FaultyStore::new(EmbeddedStore::new());
    faulty.set_txn_latency(Duration::from_millis(300));
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(2000).await;
    let mut config = cluster.config("a").with_lease_ttl(Duration::from_secs(2));
    config.max_claims_in_flight = 128;
    config.claim_batch = 16;
    cluster
        .start_with(faulty.clone(), config, Box::new(DumbBalancer))
        .await;
    let window = |cluster: &Cluster| NodeStats::get(&cluster.node("a").stats().claim_window);
    eventually(
        "the window shrinks to one batch",
        Duration::from_secs(30),
        || window(&cluster) == 16,
    )
    .await;
    // Quick again: the window grows back to the most.
    faulty.set_txn_latency(Duration::from_millis(5));
    eventually("the window grows back", Duration::from_secs(60), || {
        window(&cluster) == 128 || cluster.observer.running_tasks() == 2000
    })
    .await;
    eventually("all 2000 tasks run", Duration::from_secs(120), || {
        cluster.observer.running_tasks() == 2000
    })
    .await;
    assert!(
        window(&cluster) > 16,
        "the window stayed at {}",
        window(&cluster)
    );
    assert_eq!(cluster.observer.overlaps(), 0);
}
