//! A node's listing reads only the kinds of keys it keeps, kind by kind,
//! and the watch that continues it stays exact: paused tokio time on the
//! embedded store.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{decode, encode, NodeName, RunRecord, TaskId};
use eretes_runtime::balancer::FairBalancer;
use eretes_store::counting::CountingStore;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::{PutRequest, Store, StoreExt};
use serde_json::json;

/// Submit 10 idle tasks and start node `a`, whose requests go through
/// `store`; return once it runs all 10 (within `limit`).
async fn run_ten_tasks_on_node_a(cluster: &mut Cluster, store: Arc<dyn Store>, limit: Duration) {
    cluster.submit_idle(10).await;
    let config = cluster.config("a");
    cluster
        .start_with(store, config, Box::new(FairBalancer::default()))
        .await;
    eventually("the 10 tasks run", limit, || {
        cluster.observer.running_tasks() == 10
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_resync_reads_only_the_kinds_a_node_keeps() {
    let inner = EmbeddedStore::new();
    let counting = Arc::new(CountingStore::new(inner.clone()));
    let mut cluster = Cluster::new(inner.clone());
    // History a node does not act on: results, states, checkpoints and the
    // task graph's keys of 2,000 tasks that ran before.
    for i in 0..2000 {
        for kind in ["results", "states", "checkpoints", "graph/meta"] {
            let key = format!("test/{kind}/old{i:04}");
            inner.put(PutRequest::new(key, "{}")).await.unwrap();
        }
    }
    run_ten_tasks_on_node_a(&mut cluster, counting.clone(), Duration::from_secs(5)).await;
    let before = counting.counts();
    // One periodic resync (every 30 s, give or take a quarter).
    tokio::time::sleep(Duration::from_secs(40)).await;
    let read = counting.counts().since(&before).keys_read;
    let mut kept = 0;
    for prefix in cluster
        .coordinator
        .node_listing_prefixes(&NodeName::new("a").unwrap())
    {
        kept += inner.get_prefix(&prefix).await.unwrap().kvs.len() as u64;
    }
    // The node's record, and the task, owner and run record of each task.
    assert_eq!(kept, 31);
    assert_eq!(
        read, kept,
        "a resync read {read} keys; the node keeps {kept}"
    );
    assert_eq!(cluster.observer.running_tasks(), 10);
}

#[tokio::test(start_paused = true)]
async fn checkpoints_and_graph_keys_never_reach_a_nodes_watch() {
    let inner = EmbeddedStore::new();
    let counting = Arc::new(CountingStore::new(inner.clone()));
    let mut cluster = Cluster::new(inner.clone());
    run_ten_tasks_on_node_a(&mut cluster, counting.clone(), Duration::from_secs(5)).await;
    let before = counting.counts();
    // Each running task saves a checkpoint 100 times, and the graph layer
    // writes as much: 2,000 writes no node acts on.
    for round in 0..100 {
        for i in 0..10 {
            let checkpoint = format!("test/checkpoints/t{i:04}");
            inner
                .put(PutRequest::new(checkpoint, format!("{round}")))
                .await
                .unwrap();
            let graph = format!("test/graph/jobs/j{i}/epoch");
            inner
                .put(PutRequest::new(graph, format!("{round}")))
                .await
                .unwrap();
        }
    }
    // Then one change the node acts on: a task submitted.
    cluster.submit("after", json!({})).await;
    eventually("the new task runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 11
    })
    .await;
    let carried = counting.counts().since(&before).watch_events;
    // The new task's record and its owner record, and nothing of the 2,000
    // writes, nor the claim's run record.
    assert_eq!(carried, 2, "the node's watch carried {carried} events");
}

#[tokio::test(start_paused = true)]
async fn listings_that_span_writes_keep_the_cache_exact() {
    // Each read of a listing takes 100 ms, and nodes list every 250 ms: the
    // six reads of nearly every listing straddle the writes below, so each
    // kind is read at another revision and the watch delivers changes some
    // reads have seen already.
    let faulty = FaultyStore::new(EmbeddedStore::new());
    faulty.set_read_latency(Duration::from_millis(100));
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(100).await;
    for name in ["a", "b"] {
        let mut config = cluster.config(name);
        config.resync_interval = Duration::from_millis(250);
        cluster
            .start_with(faulty.clone(), config, Box::new(FairBalancer::default()))
            .await;
    }
    eventually("the 100 tasks run", Duration::from_secs(20), || {
        cluster.observer.running_tasks() == 100
    })
    .await;
    let running = || -> BTreeSet<String> {
        ["a", "b"]
            .iter()
            .flat_map(|node| cluster.observer.running_on(node))
            .collect()
    };
    // Churn: delete one task and submit another every 50 ms, for 5 s. Each
    // change reaches the nodes through the watch, whichever reads of a
    // listing saw it already: it takes effect at once, not at the next
    // listing (600 ms later).
    for i in 0..100 {
        let (old, new) = (format!("t{i:04}"), format!("n{i:04}"));
        cluster
            .coordinator
            .delete(&TaskId::new(old.clone()).unwrap())
            .await
            .unwrap();
        cluster.submit(&new, json!({})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = running();
        assert!(
            !now.contains(&old),
            "{old} still runs 50 ms after its deletion"
        );
        assert!(
            now.contains(&new),
            "{new} does not run 50 ms after its submission"
        );
    }
    let expected: BTreeSet<String> = (0..100).map(|i| format!("n{i:04}")).collect();
    assert_eq!(running(), expected);
    // And stay so, through many more listings.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(running(), expected);
    assert_eq!(cluster.observer.overlaps(), 0);
    assert_eq!(spread(&cluster.observer, &["a", "b"]), 0);
}

/// Listings over `window` of a node whose store answers every read after
/// `read_latency`, once it runs 10 tasks.
async fn listings_with_read_latency(read_latency: Duration, window: Duration) -> u64 {
    let inner = EmbeddedStore::new();
    let faulty = FaultyStore::new(inner.clone());
    let mut cluster = Cluster::new(inner.clone());
    faulty.set_read_latency(read_latency);
    run_ten_tasks_on_node_a(&mut cluster, faulty.clone(), Duration::from_secs(60)).await;
    let stats = cluster.node("a").stats().clone();
    let before = eretes_runtime::NodeStats::get(&stats.listings);
    tokio::time::sleep(window).await;
    assert_eq!(cluster.observer.running_tasks(), 10, "nothing stopped");
    eretes_runtime::NodeStats::get(&stats.listings) - before
}

/// The periodic resync (default every 30 s) re-reads everything a node
/// keeps. When a sync takes long (a slow store here; many tasks, or a busy
/// machine, elsewhere), the next one comes at least 100 times that later,
/// at most 10 intervals: the safety net stays a small share of the work.
#[tokio::test(start_paused = true)]
async fn slow_listings_space_the_periodic_resyncs() {
    let window = Duration::from_secs(600);
    // Quick reads: one resync about every 30 s.
    let quick = listings_with_read_latency(Duration::ZERO, window).await;
    assert!(
        (18..=21).contains(&quick),
        "{quick} listings in 600 s with quick reads"
    );
    // Each listing takes at least six reads of 1 s: resyncs every 300 s,
    // the most they are stretched to.
    let slow = listings_with_read_latency(Duration::from_secs(1), window).await;
    assert!(
        (1..=3).contains(&slow),
        "{slow} listings in 600 s with listings of 6 s or more"
    );
}

/// Every node's periodic resync reads every task: in a cluster of more
/// than 10 nodes each node resyncs that many times less often (25 nodes:
/// every third interval), at most every 10 intervals, so that the cluster's
/// resyncs stay about 10 listings of the namespace per interval.
#[tokio::test(start_paused = true)]
async fn a_large_cluster_spaces_each_nodes_periodic_resyncs() {
    let window = Duration::from_secs(900);
    let mut cluster = Cluster::new(EmbeddedStore::new());
    cluster.submit_idle(25).await;
    start_fair_nodes(&mut cluster, 25).await;
    let listings = || -> u64 {
        cluster
            .nodes
            .values()
            .map(|node| eretes_runtime::NodeStats::get(&node.stats().listings))
            .sum()
    };
    let before = listings();
    tokio::time::sleep(window).await;
    let per_node = (listings() - before) as f64 / 25.0;
    // 900 s at one resync every 90 s (±25 %), and the first after 30 s:
    // 10 each, where a node alone resyncs every 30 s (30 in 900 s).
    assert!(
        (8.0..=13.0).contains(&per_node),
        "{per_node} listings per node in 900 s"
    );
    assert_eq!(cluster.observer.running_tasks(), 25, "nothing stopped");
}

#[tokio::test(start_paused = true)]
async fn run_records_an_older_build_kept_under_runs_are_moved_and_still_count() {
    let inner = EmbeddedStore::new();
    let mut cluster = Cluster::new(inner.clone());
    cluster.submit("old", json!({})).await;
    // An older build's node claimed `old` three times, the last time taken
    // over from a dead node, and died running it: its run record is open.
    let legacy = RunRecord {
        claims: 3,
        takeovers: 1,
        open: true,
        node: Some(NodeName::new("gone").unwrap()),
    };
    inner
        .put(PutRequest::new("test/runs/old", encode(&legacy)))
        .await
        .unwrap();
    cluster.start_fair("a").await;
    eventually("the task runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 1
    })
    .await;
    assert_eq!(keys_under(&*inner, "test/runs/").await, 0);
    let id = TaskId::new("old").unwrap();
    let kv = inner
        .get_key(&cluster.coordinator.namespace().run(&id))
        .await
        .unwrap()
        .expect("the run record, moved and claimed");
    let run: RunRecord = decode("run", &kv.key, &kv.value).unwrap();
    // Claimed from the moved record: one claim more, and a takeover, since
    // the older build's run never ended.
    assert_eq!((run.claims, run.takeovers, run.open), (4, 2, true));
    assert_eq!(run.node.as_ref().map(NodeName::as_str), Some("a"));
}
