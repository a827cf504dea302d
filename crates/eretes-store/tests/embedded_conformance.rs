//! The conformance suite on the embedded store (paused tokio time), plus what
//! only the embedded store can promise exactly: absolute revisions, lease
//! expiry to the millisecond, auto-compaction and watcher cleanup. The
//! seeded random comparison against a simple model is in
//! `embedded_model.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::*;
use futures::StreamExt;

eretes_store::conformance_tests! {
    store: EmbeddedStore::new(),
    attr: #[tokio::test(start_paused = true)]
}

// The suite in real time on a multi-thread runtime, as it runs against etcd:
// catches cases that only pass thanks to paused time.
eretes_store::conformance_tests! {
    mod: real_time,
    store: EmbeddedStore::new(),
    attr: #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
}

#[test]
fn every_case_is_listed() {
    // The macro and `CASES` are two lists; keep them in step.
    let cases = eretes_store::conformance::CASES;
    let unique: BTreeSet<&str> = cases.iter().copied().collect();
    assert_eq!(unique.len(), cases.len(), "duplicate case names");
    let source = include_str!("../src/conformance/mod.rs");
    let definitions = [
        include_str!("../src/conformance/reads.rs"),
        include_str!("../src/conformance/writes.rs"),
        include_str!("../src/conformance/txn.rs"),
        include_str!("../src/conformance/leases.rs"),
        include_str!("../src/conformance/watches.rs"),
        include_str!("../src/conformance/compaction.rs"),
    ]
    .concat();
    for case in cases {
        assert!(
            definitions.contains(&format!("pub async fn {case}(")),
            "CASES lists {case}, which does not exist"
        );
        let in_macro = source
            .split("macro_rules! conformance_tests")
            .nth(1)
            .and_then(|rest| rest.split("macro_rules!").next())
            .expect("macro source");
        assert!(
            in_macro.lines().any(|line| line.trim() == *case),
            "the macro does not run {case}"
        );
    }
}

mod common;
use common::{next_batch, put};

#[tokio::test(start_paused = true)]
async fn revisions_start_at_one_and_advance_by_exactly_one() {
    let store = EmbeddedStore::new();
    assert_eq!(store.revision(), 1, "an empty store is at revision 1");
    assert_eq!(store.current_revision().await.unwrap(), 1);
    assert_eq!(store.put(put("a", "1")).await.unwrap().revision, 2);
    assert_eq!(store.put(put("b", "1")).await.unwrap().revision, 3);

    let none = store
        .delete(DeleteRequest::new(KeyRange::key("zz")))
        .await
        .unwrap();
    assert_eq!(
        (none.deleted, none.revision),
        (0, 3),
        "deleting nothing is no revision"
    );
    let one = store
        .delete(DeleteRequest::new(KeyRange::key("b")))
        .await
        .unwrap();
    assert_eq!((one.deleted, one.revision), (1, 4));

    let txn = Txn::new()
        .and_then(TxnOp::Put(put("x", "1")))
        .and_then(TxnOp::Put(put("y", "1")))
        .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key("a"))));
    assert_eq!(
        store.txn(txn).await.unwrap().revision,
        5,
        "one revision per txn"
    );
    for key in ["x", "y"] {
        assert_eq!(store.get_key(key).await.unwrap().unwrap().mod_revision, 5);
    }
    let read_only = Txn::new().and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(""))));
    assert_eq!(store.txn(read_only).await.unwrap().revision, 5);
    let deletes_nothing =
        Txn::new().and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix("q/"))));
    assert_eq!(store.txn(deletes_nothing).await.unwrap().revision, 5);
    let failure_writes = Txn::new()
        .when(Compare::present("nope"))
        .or_else(TxnOp::Put(put("f", "1")));
    let response = store.txn(failure_writes).await.unwrap();
    assert_eq!((response.succeeded, response.revision), (false, 6));

    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    assert_eq!(store.revision(), 6, "granting is no revision");
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(
        store.revision(),
        6,
        "revoking a lease without keys is no revision"
    );
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    store.put(put("l1", "1").with_lease(lease)).await.unwrap();
    store.put(put("l2", "1").with_lease(lease)).await.unwrap();
    assert_eq!(store.revision(), 8);
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(
        store.revision(),
        9,
        "revoking deletes all keys in one revision"
    );
    assert_eq!(store.key_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn txn_inner_responses_report_etcd_revisions() {
    let store = EmbeddedStore::new();
    store.put(put("a", "1")).await.unwrap(); // rev 2
    let response = store
        .txn(
            Txn::new()
                .and_then(TxnOp::Get(GetRequest::new(KeyRange::key("a"))))
                .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key("none"))))
                .and_then(TxnOp::Put(put("b", "1")))
                .and_then(TxnOp::Get(GetRequest::new(KeyRange::key("a"))))
                .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key("none")))),
        )
        .await
        .unwrap();
    let revisions: Vec<Revision> = response
        .responses
        .iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => g.revision,
            TxnOpResponse::Put(p) => p.revision,
            TxnOpResponse::Delete(d) => d.revision,
        })
        .collect();
    // As etcd: before the first write the old revision, from it on the new one.
    assert_eq!(revisions, vec![2, 2, 3, 3, 3]);
    assert_eq!(response.revision, 3);
}

#[tokio::test(start_paused = true)]
async fn txn_size_is_limited_like_etcd() {
    let store = EmbeddedStore::new();
    let ops = |n: usize| {
        (0..n)
            .map(|i| TxnOp::Put(put(&format!("k{i}"), "v")))
            .collect::<Vec<_>>()
    };
    let mut txn = Txn::new();
    txn.success = ops(128);
    assert!(
        store.txn(txn.clone()).await.unwrap().succeeded,
        "128 ops are fine"
    );
    txn.failure = ops(129);
    assert!(matches!(
        store.txn(txn).await,
        Err(StoreError::InvalidArgument(_))
    ));
    let compares = Txn {
        compares: (0..129)
            .map(|i| Compare::present(format!("k{i}")))
            .collect(),
        ..Txn::new()
    };
    assert!(matches!(
        store.txn(compares).await,
        Err(StoreError::InvalidArgument(_))
    ));
    let roomy = EmbeddedStore::with_options(EmbeddedOptions::default().with_max_txn_ops(1000));
    let mut txn = Txn::new();
    txn.success = ops(129);
    assert!(roomy.txn(txn).await.unwrap().succeeded);
}

#[tokio::test(start_paused = true)]
async fn lease_expires_exactly_at_its_ttl() {
    let store = EmbeddedStore::new();
    let ttl = Duration::from_secs(2);
    let lease = store.lease_grant(ttl).await.unwrap();
    assert_eq!(lease.ttl, ttl);
    store.put(put("k", "1").with_lease(lease.id)).await.unwrap();
    let before = store.revision();

    tokio::time::sleep(ttl - Duration::from_millis(1)).await;
    assert!(
        store.get_key("k").await.unwrap().is_some(),
        "alive 1 ms before the TTL"
    );
    assert_eq!(store.lease_count(), 1);
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(
        store.get_key("k").await.unwrap().is_none(),
        "gone 1 ms after the TTL"
    );
    assert_eq!(
        store.revision(),
        before + 1,
        "expiry is exactly one revision"
    );
    assert_eq!(store.lease_count(), 0);
    assert!(matches!(
        store.lease_keepalive(lease.id).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease.id
    ));
}

#[tokio::test(start_paused = true)]
async fn keepalive_restarts_the_ttl_from_the_renewal() {
    let store = EmbeddedStore::new();
    let ttl = Duration::from_secs(2);
    let lease = store.lease_grant(ttl).await.unwrap().id;
    store.put(put("k", "1").with_lease(lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        store.lease_keepalive(lease).await.unwrap(),
        ttl,
        "keepalive reports the full TTL"
    );
    tokio::time::sleep(ttl - Duration::from_millis(1)).await;
    assert!(
        store.get_key("k").await.unwrap().is_some(),
        "renewed 2 s ago minus 1 ms: alive"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        store.get_key("k").await.unwrap().is_none(),
        "at the deadline the lease is gone"
    );
}

#[tokio::test(start_paused = true)]
async fn expiry_is_delivered_without_any_other_operation() {
    // Only the background task can make this watch see the deletes.
    let store = EmbeddedStore::new();
    let first = store.lease_grant(Duration::from_secs(3)).await.unwrap().id;
    let second = store.lease_grant(Duration::from_secs(1)).await.unwrap().id; // earlier: must re-arm
    store.put(put("a", "1").with_lease(first)).await.unwrap();
    store.put(put("b", "1").with_lease(second)).await.unwrap();
    store.put(put("c", "1").with_lease(second)).await.unwrap();
    let mut stream = store.watch(KeyRange::prefix(""), 0).await.unwrap();
    let start = tokio::time::Instant::now();
    let batch = next_batch(&mut stream).await;
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let keys: Vec<&str> = batch.iter().map(|e| e.kv.key.as_str()).collect();
    assert_eq!(keys, ["b", "c"]);
    assert!(batch
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == 5));
    let batch = next_batch(&mut stream).await;
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(
        (
            batch.len(),
            batch[0].kv.key.as_str(),
            batch[0].kv.mod_revision
        ),
        (1, "a", 6)
    );
}

#[tokio::test(start_paused = true)]
async fn leases_expiring_together_take_one_revision_each() {
    let store = EmbeddedStore::new();
    let a = store.lease_grant(Duration::from_secs(2)).await.unwrap().id;
    let b = store.lease_grant(Duration::from_secs(2)).await.unwrap().id;
    store.put(put("a", "1").with_lease(a)).await.unwrap();
    store.put(put("b", "1").with_lease(b)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.revision(), 5, "two leases, two revisions");
    assert_eq!(store.key_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn history_limit_auto_compacts() {
    let store = EmbeddedStore::with_options(EmbeddedOptions::default().with_history_limit(10));
    for i in 0..25 {
        store.put(put("k", &i.to_string())).await.unwrap();
    }
    assert_eq!(store.revision(), 26);
    assert_eq!(
        store.compact_revision(),
        17,
        "the last 10 revisions are kept"
    );
    match store.watch(KeyRange::key("k"), 16).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => assert_eq!((requested, compact_revision), (16, 17)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("watch from auto-compacted history must fail"),
    }
    let mut stream = store.watch(KeyRange::key("k"), 17).await.unwrap();
    let batch = next_batch(&mut stream).await;
    let revisions: Vec<Revision> = batch.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(
        revisions,
        (17..=26).collect::<Vec<_>>(),
        "replay of the retained history, coalesced"
    );
    assert!(matches!(
        store.compact(16).await,
        Err(StoreError::Compacted { .. })
    ));
    store.compact(20).await.unwrap();
    assert_eq!(store.compact_revision(), 20);
}

#[tokio::test]
async fn history_older_than_its_age_is_compacted_at_the_next_write_or_renewal() {
    // Real time: the age is measured on the system's clock.
    let age = Duration::from_millis(200);
    let store = EmbeddedStore::with_options(EmbeddedOptions::default().with_history_age(age));
    store.put(put("k", "1")).await.unwrap(); // revision 2
    store.put(put("k", "2")).await.unwrap(); // revision 3
    assert_eq!(store.compact_revision(), 0, "young history is kept");
    std::thread::sleep(age * 2);
    // An idle store: the next lease renewal trims it, but the latest
    // revision stays.
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
    store.lease_keepalive(lease).await.unwrap();
    assert_eq!(store.compact_revision(), 3);
    assert!(matches!(
        store.watch(KeyRange::key("k"), 2).await,
        Err(StoreError::Compacted {
            requested: 2,
            compact_revision: 3
        })
    ));
    let mut stream = store.watch(KeyRange::key("k"), 3).await.unwrap();
    let batch = next_batch(&mut stream).await;
    assert_eq!(batch[0].kv.mod_revision, 3, "the latest revision replays");
    // A write trims as well.
    std::thread::sleep(age * 2);
    store.put(put("k", "3")).await.unwrap(); // revision 4
    assert_eq!(store.compact_revision(), 4);
}

#[tokio::test]
async fn expire_history_drops_aged_history_without_a_write_or_renewal() {
    // Real time: the age is measured on the system's clock.
    let age = Duration::from_millis(200);
    let store = EmbeddedStore::with_options(EmbeddedOptions::default().with_history_age(age));
    assert_eq!(store.history_age(), age);
    for value in ["1", "2", "3"] {
        store.put(put("k", value)).await.unwrap(); // revisions 2, 3, 4
    }
    store.expire_history();
    assert_eq!(store.compact_revision(), 0, "young history is kept");
    std::thread::sleep(age * 2);
    store.expire_history();
    assert_eq!(store.compact_revision(), 4, "all but the latest revision");
    assert_eq!(store.revision(), 4, "expiring writes nothing");
    let mut stream = store.watch(KeyRange::key("k"), 4).await.unwrap();
    assert_eq!(next_batch(&mut stream).await[0].kv.mod_revision, 4);
}

#[tokio::test(start_paused = true)]
async fn compact_errors_are_exact() {
    let store = EmbeddedStore::new();
    store
        .compact(1)
        .await
        .expect("a fresh store may be compacted to revision 1");
    for i in 0..4 {
        store.put(put("k", &i.to_string())).await.unwrap();
    }
    assert_eq!(
        store.compact(6).await,
        Err(StoreError::FutureRevision {
            requested: 6,
            current: 5
        })
    );
    store.compact(3).await.unwrap();
    assert_eq!(
        store.compact(3).await,
        Err(StoreError::Compacted {
            requested: 3,
            compact_revision: 3
        }),
        "as etcd, the compaction point itself cannot be compacted again"
    );
    assert_eq!(
        store.watch(KeyRange::key("k"), 2).await.err(),
        Some(StoreError::Compacted {
            requested: 2,
            compact_revision: 3
        })
    );
    store.compact(5).await.expect("up to the current revision");
    let mut stream = store.watch(KeyRange::key("k"), 5).await.unwrap();
    assert_eq!(next_batch(&mut stream).await[0].kv.mod_revision, 5);
}

#[tokio::test(start_paused = true)]
async fn dropped_watch_streams_are_unregistered() {
    let store = EmbeddedStore::new();
    let kept = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
    let dropped = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
    let idle = store
        .watch(KeyRange::prefix("elsewhere/"), 0)
        .await
        .unwrap();
    assert_eq!(store.watcher_count(), 3);
    drop(dropped);
    drop(idle);
    store.put(put("a/x", "1")).await.unwrap();
    assert_eq!(
        store.watcher_count(),
        1,
        "both dropped streams are noticed on the next write"
    );
    drop(kept);
    store.put(put("b", "1")).await.unwrap();
    assert_eq!(store.watcher_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn watch_from_a_future_revision_starts_there() {
    let store = EmbeddedStore::new();
    let mut stream = store.watch(KeyRange::prefix(""), 4).await.unwrap();
    for i in 0..4 {
        store.put(put("k", &i.to_string())).await.unwrap(); // revisions 2..=5
    }
    let batch = next_batch(&mut stream).await;
    let revisions: Vec<Revision> = batch.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(revisions, vec![4, 5]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_store_ends_watches_and_the_expiry_task() {
    let store = EmbeddedStore::new();
    store.lease_grant(Duration::from_secs(3600)).await.unwrap();
    let mut stream = store.watch(KeyRange::prefix(""), 0).await.unwrap();
    let weak = Arc::downgrade(&store);
    drop(store);
    assert!(
        weak.upgrade().is_none(),
        "the expiry task holds no strong reference"
    );
    let end = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .unwrap();
    assert!(matches!(end, Some(Err(StoreError::Closed))), "got {end:?}");
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );
    // Let the woken expiry task run and exit.
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        0
    );
}

#[tokio::test]
async fn works_on_a_multi_thread_runtime_too() {
    let store = EmbeddedStore::new();
    let lease = store
        .lease_grant(Duration::from_millis(50))
        .await
        .unwrap()
        .id;
    store.put(put("k", "1").with_lease(lease)).await.unwrap();
    let mut stream = store.watch(KeyRange::key("k"), 0).await.unwrap();
    let batch = next_batch(&mut stream).await;
    assert_eq!(batch[0].kind, EventKind::Delete);
}

#[test]
fn usable_without_a_runtime_with_lazy_expiry() {
    let store = EmbeddedStore::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lease = runtime
        .block_on(store.lease_grant(Duration::from_millis(1)))
        .unwrap()
        .id;
    drop(runtime); // the expiry task dies with its runtime
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.lease_keepalive(lease).await
    });
    assert_eq!(
        result,
        Err(StoreError::LeaseNotFound(lease)),
        "expired even though its task is gone"
    );
    let store_debug = format!("{store:?}");
    assert!(store_debug.contains("revision"), "{store_debug}");
}

// ---------------------------------------------------------------------------
// A seeded random comparison against a deliberately naive model.

/// Rough throughput of the protocol's hot path: per task a create-if-absent
/// submit, a leased claim and a fenced complete (3 txns), with 3 watchers
/// draining the namespace. Run with
/// `cargo test -p eretes-store --release --test embedded_conformance -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly in release mode"]
async fn throughput_of_the_task_hot_path_two_threads() {
    task_hot_path("2 worker threads").await;
}

/// The same on one thread: the store's cost without lock contention.
#[tokio::test]
#[ignore = "benchmark; run explicitly in release mode"]
async fn throughput_of_the_task_hot_path_one_thread() {
    task_hot_path("1 thread").await;
}

async fn task_hot_path(label: &str) {
    const TASKS: usize = 200_000;
    const SUBMITTERS: usize = 4;
    let store = EmbeddedStore::with_options(EmbeddedOptions::default());
    let lease = store
        .lease_grant(Duration::from_secs(3600))
        .await
        .unwrap()
        .id;
    let mut drains = vec![];
    for _ in 0..3 {
        let mut stream = store.watch(KeyRange::prefix("ns/"), 0).await.unwrap();
        drains.push(tokio::spawn(async move {
            let mut seen = 0usize;
            while seen < TASKS * 5 {
                seen += stream.next().await.unwrap().unwrap().len();
            }
        }));
    }
    let payload = vec![b'x'; 100];
    let started = std::time::Instant::now();
    let mut workers = vec![];
    for worker in 0..SUBMITTERS {
        let store = Arc::clone(&store);
        let payload = payload.clone();
        workers.push(tokio::spawn(async move {
            for i in (worker..TASKS).step_by(SUBMITTERS) {
                let task = format!("ns/tasks/g/{i:08}");
                let owner = format!("ns/owners/g/{i:08}");
                let submit = Txn::new()
                    .when(Compare::absent(&task))
                    .and_then(TxnOp::Put(PutRequest::new(&task, payload.clone())));
                assert!(store.txn(submit).await.unwrap().succeeded);
                let claim = Txn::new()
                    .when(Compare::present(&task))
                    .when(Compare::absent(&owner))
                    .and_then(TxnOp::Put(
                        PutRequest::new(&owner, "node-1").with_lease(lease),
                    ));
                let epoch = store.txn(claim).await.unwrap().revision;
                let complete = Txn::new()
                    .when(Compare::mod_revision_is(&owner, epoch))
                    .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(&task))))
                    .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(&owner))))
                    .and_then(TxnOp::Put(PutRequest::new(
                        format!("ns/results/g/{i:08}"),
                        "ok",
                    )));
                assert!(store.txn(complete).await.unwrap().succeeded);
                // The embedded store never suspends; yield as a real caller
                // (which awaits other things) would, so watchers keep up.
                tokio::task::yield_now().await;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let writes = started.elapsed();
    for drain in drains {
        drain.await.unwrap();
    }
    let all = started.elapsed();
    println!(
        "{label}: {TASKS} tasks: {:.0} tasks/s written, {:.0} tasks/s including watch delivery ({store:?})",
        TASKS as f64 / writes.as_secs_f64(),
        TASKS as f64 / all.as_secs_f64()
    );
}
