//! How a node paces its writes by the store's answers: fewer claims, and
//! fewer run ends, in flight while transactions are slow (as etcd's are
//! behind a long apply queue), more when they are quick. Paused tokio time
//! on the embedded store, behind a store wrapper that delays transactions.

mod common;

use std::time::Duration;

use common::*;
use eretes_protocol::NodeCommand;
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::NodeStats;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use tokio::time::Instant;

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

/// How many tasks have an owner record, read past the injected latency.
async fn owned(store: &FaultyStore<EmbeddedStore>) -> usize {
    keys_under(store.inner().as_ref(), "test/owners/").await
}

/// Wait until no task has an owner record: every run end was written.
async fn until_every_end_is_written(store: &FaultyStore<EmbeddedStore>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while owned(store).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{} tasks still owned after {limit:?}",
            owned(store).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_run_ends_goes_out_a_window_at_a_time_and_slow_ones_shrink_it() {
    let faulty = FaultyStore::new(EmbeddedStore::new());
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(2000).await;
    let config = cluster.config("a").with_lease_ttl(Duration::from_secs(2));
    cluster
        .start_with(faulty.clone(), config, Box::new(DumbBalancer))
        .await;
    eventually("all 2000 tasks run", Duration::from_secs(60), || {
        cluster.observer.running_tasks() == 2000
    })
    .await;
    let window = |cluster: &Cluster| NodeStats::get(&cluster.node("a").stats().end_window);
    assert_eq!(window(&cluster), 8);

    // Every task released at once (a drain, as a rebalance does with a
    // share of them), while the store takes 300 ms to answer a
    // transaction: more than a twentieth of the 2 s TTL.
    faulty.set_txn_latency(Duration::from_millis(300));
    faulty.reset_most_txns_in_flight();
    cluster.node("a").command(NodeCommand::Drain);
    until_every_end_is_written(&faulty, Duration::from_secs(600)).await;
    // 125 transactions of 16 ends; sent all at once before.
    let most = faulty.most_txns_in_flight();
    assert!(
        most <= 8,
        "{most} run-end transactions were in flight at once"
    );
    assert_eq!(window(&cluster), 1, "slow ends shrink the window to one");
    assert_eq!(NodeStats::get(&cluster.node("a").stats().releases), 2000);

    // Quick again: the tasks are claimed back and released once more, and
    // the window grows back to the most.
    faulty.set_txn_latency(Duration::from_millis(5));
    cluster.node("a").command(NodeCommand::Unfreeze);
    eventually("all 2000 tasks run again", Duration::from_secs(120), || {
        cluster.observer.running_tasks() == 2000
    })
    .await;
    cluster.node("a").command(NodeCommand::Drain);
    until_every_end_is_written(&faulty, Duration::from_secs(120)).await;
    assert_eq!(window(&cluster), 8, "quick ends grow the window back");
    assert_eq!(cluster.observer.overlaps(), 0);
}

#[tokio::test(start_paused = true)]
async fn releases_still_being_written_are_not_released_again_by_the_next_balance() {
    let faulty = FaultyStore::new(EmbeddedStore::new());
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(1000).await;
    cluster.start_fair("a").await;
    eventually("all 1000 tasks run on a", Duration::from_secs(60), || {
        cluster.observer.running_tasks() == 1000
    })
    .await;
    // From here every transaction takes 400 ms: a's 500 run ends take
    // many 5 s balance passes to write (the end window shrinks to one
    // transaction of 16), and a's owner records stay until they are.
    faulty.set_txn_latency(Duration::from_millis(400));
    cluster.start_fair("b").await;
    let runs = |cluster: &Cluster, node: &str| {
        cluster
            .observer
            .running_per_node()
            .get(node)
            .copied()
            .unwrap_or(0)
    };
    eventually("each node runs 500", Duration::from_secs(300), || {
        runs(&cluster, "a") == 500 && runs(&cluster, "b") == 500
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!((runs(&cluster, "a"), runs(&cluster, "b")), (500, 500));
    // The least that balances 1000/0: 500 moves, all a's.
    let releases = |node: &str| NodeStats::get(&cluster.node(node).stats().releases);
    assert_eq!(releases("a"), 500, "a released more than its excess");
    assert_eq!(releases("b"), 0);
    assert_eq!(cluster.observer.overlaps(), 0);
}

#[tokio::test(start_paused = true)]
async fn ends_the_store_keeps_refusing_do_not_hold_back_the_others() {
    let faulty = FaultyStore::new(EmbeddedStore::new());
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(200).await;
    let config = cluster.config("a");
    cluster
        .start_with(faulty.clone(), config, Box::new(DumbBalancer))
        .await;
    eventually("all 200 tasks run", Duration::from_secs(30), || {
        cluster.observer.running_tasks() == 200
    })
    .await;
    // The store refuses, for good, every transaction that ends one of half
    // the tasks (t0000 to t0099), and with it every batch that holds one.
    // The other half must still be written, each on its own after its
    // batch failed, and the refused ones kept trying.
    faulty.fail_txns_comparing(Some("test/owners/t00"));
    cluster.node("a").command(NodeCommand::Drain);
    let deadline = Instant::now() + Duration::from_secs(600);
    while owned(&faulty).await > 100 {
        assert!(
            Instant::now() < deadline,
            "{} tasks still owned: refused ends held back the others",
            owned(&faulty).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still_owned = keys_under(faulty.inner().as_ref(), "test/owners/t00").await;
    assert_eq!(still_owned, 100, "only the refused ends are left");
    // (How failed and slow ends shrink the window is the burst test's
    // subject: here the accepted ends that follow each failure grow it
    // again, by as many as come in a row, so its value at this point
    // depends on their order, which failed CI twice.)
    let stats = cluster.node("a").stats();
    // Once the store takes them, they are written too.
    faulty.fail_txns_comparing(None);
    until_every_end_is_written(&faulty, Duration::from_secs(60)).await;
    assert_eq!(NodeStats::get(&stats.releases), 200);
    assert_eq!(NodeStats::get(&stats.fences), 0);
    assert_eq!(cluster.observer.overlaps(), 0);
}
