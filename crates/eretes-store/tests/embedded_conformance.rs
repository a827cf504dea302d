//! The conformance suite on the embedded store (paused tokio time), plus what
//! only the embedded store can promise exactly: absolute revisions, lease
//! expiry to the millisecond, auto-compaction, watcher cleanup, and a seeded
//! random comparison against a simple model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::*;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest::new(key, value)
}

async fn next_batch(stream: &mut WatchStream) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch item in time")
        .expect("the stream goes on")
        .expect("no watch error")
}

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

#[derive(Default)]
struct Model {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, BTreeSet<String>>,
    dead_leases: Vec<LeaseId>,
    log: Vec<WatchEvent>,
}

impl Model {
    fn commit(&mut self, events: Vec<WatchEvent>) -> Revision {
        if !events.is_empty() {
            self.revision += 1;
            self.log.extend(events);
        }
        self.revision
    }

    fn get(&self, request: &GetRequest, revision: Revision) -> GetResponse {
        let all: Vec<KeyValue> = self
            .kvs
            .values()
            .filter(|kv| request.range.contains(&kv.key))
            .cloned()
            .collect();
        let count = all.len();
        if request.count_only {
            return GetResponse {
                kvs: vec![],
                count,
                more: false,
                revision,
            };
        }
        let limit = request.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let kvs: Vec<KeyValue> = all.into_iter().take(limit).collect();
        GetResponse {
            more: kvs.len() < count,
            kvs,
            count,
            revision,
        }
    }

    fn put(
        &mut self,
        request: &PutRequest,
        revision: Revision,
        events: &mut Vec<WatchEvent>,
    ) -> PutResponse {
        let prev = self.kvs.get(&request.key).cloned();
        if let Some(prev) = &prev {
            if let Some(keys) = self.leases.get_mut(&prev.lease) {
                keys.remove(&request.key);
            }
        }
        if request.lease != 0 {
            self.leases
                .get_mut(&request.lease)
                .unwrap()
                .insert(request.key.clone());
        }
        let kv = KeyValue {
            key: request.key.clone(),
            value: request.value.clone(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: request.lease,
        };
        self.kvs.insert(kv.key.clone(), kv.clone());
        events.push(WatchEvent {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        PutResponse {
            revision,
            prev_kv: if request.prev_kv { prev } else { None },
        }
    }

    fn delete(
        &mut self,
        request: &DeleteRequest,
        revision: Revision,
        events: &mut Vec<WatchEvent>,
    ) -> DeleteResponse {
        let keys: Vec<String> = self
            .kvs
            .keys()
            .filter(|k| request.range.contains(k))
            .cloned()
            .collect();
        let mut prev_kvs = vec![];
        for key in &keys {
            let prev = self.kvs.remove(key).unwrap();
            if let Some(keys) = self.leases.get_mut(&prev.lease) {
                keys.remove(key);
            }
            events.push(tombstone(prev.clone(), revision));
            prev_kvs.push(prev);
        }
        DeleteResponse {
            revision: if events.is_empty() {
                self.revision
            } else {
                revision
            },
            deleted: keys.len() as i64,
            prev_kvs: if request.prev_kv { prev_kvs } else { vec![] },
        }
    }

    fn revoke(&mut self, lease: LeaseId) -> StoreResult<()> {
        let keys = self
            .leases
            .remove(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        self.dead_leases.push(lease);
        let revision = self.revision + 1;
        let events = keys
            .into_iter()
            .map(|k| tombstone(self.kvs.remove(&k).unwrap(), revision))
            .collect();
        self.commit(events);
        Ok(())
    }

    fn compare(&self, compare: &Compare) -> bool {
        let kv = self.kvs.get(&compare.key);
        let ordering = match &compare.target {
            CompareTarget::Value(v) => match kv {
                None => return false,
                Some(kv) => kv.value.cmp(v),
            },
            CompareTarget::Version(n) => kv.map_or(0, |kv| kv.version).cmp(n),
            CompareTarget::CreateRevision(n) => kv.map_or(0, |kv| kv.create_revision).cmp(n),
            CompareTarget::ModRevision(n) => kv.map_or(0, |kv| kv.mod_revision).cmp(n),
            CompareTarget::Lease(n) => kv.map_or(0, |kv| kv.lease).cmp(n),
        };
        compare.op.holds(ordering)
    }

    fn has_duplicates(ops: &[TxnOp]) -> bool {
        let puts: Vec<&str> = ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Put(p) => Some(p.key.as_str()),
                _ => None,
            })
            .collect();
        ops.iter().any(|op| match op {
            TxnOp::Put(p) => puts.iter().filter(|k| **k == p.key).count() > 1,
            TxnOp::Delete(d) => puts.iter().any(|k| d.range.contains(k)),
            TxnOp::Get(_) => false,
        })
    }

    fn txn(&mut self, txn: &Txn) -> StoreResult<TxnResponse> {
        if Self::has_duplicates(&txn.success) || Self::has_duplicates(&txn.failure) {
            return Err(StoreError::InvalidArgument(String::new()));
        }
        let succeeded = txn.compares.iter().all(|c| self.compare(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        for op in ops {
            if let TxnOp::Put(p) = op {
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(StoreError::LeaseNotFound(p.lease));
                }
            }
        }
        let revision = self.revision + 1;
        let mut events = vec![];
        let mut responses = vec![];
        for op in ops {
            responses.push(match op {
                TxnOp::Get(g) => {
                    let seen = if events.is_empty() {
                        self.revision
                    } else {
                        revision
                    };
                    TxnOpResponse::Get(self.get(g, seen))
                }
                TxnOp::Put(p) => TxnOpResponse::Put(self.put(p, revision, &mut events)),
                TxnOp::Delete(d) => TxnOpResponse::Delete(self.delete(d, revision, &mut events)),
            });
        }
        let revision = self.commit(events);
        Ok(TxnResponse {
            succeeded,
            revision,
            responses,
        })
    }
}

fn tombstone(prev: KeyValue, revision: Revision) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: prev.key.clone(),
            value: vec![],
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: 0,
        },
        prev_kv: Some(prev),
    }
}

const KEYS: &[&str] = &["m/a", "m/b", "m/ab", "m/a/x", "m/a/y", "n/a", "m"];
const PREFIXES: &[&str] = &["m/", "m/a", "m/a/", "n/", ""];
const VALUES: &[&str] = &["", "0", "1", "2"];

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn random_range(rng: &mut StdRng) -> KeyRange {
    if rng.gen_bool(0.6) {
        KeyRange::key(pick(rng, KEYS))
    } else {
        KeyRange::prefix(pick(rng, PREFIXES))
    }
}

fn random_lease(rng: &mut StdRng, model: &Model) -> LeaseId {
    let live: Vec<LeaseId> = model.leases.keys().copied().collect();
    match rng.gen_range(0..10) {
        0..=5 => 0,
        6..=8 if !live.is_empty() => pick(rng, &live),
        _ if !model.dead_leases.is_empty() => pick(rng, &model.dead_leases),
        _ => 0,
    }
}

fn random_put(rng: &mut StdRng, model: &Model) -> PutRequest {
    let mut request = put(pick(rng, KEYS), pick(rng, VALUES)).with_lease(random_lease(rng, model));
    request.prev_kv = rng.gen_bool(0.5);
    request
}

fn random_get(rng: &mut StdRng) -> GetRequest {
    let mut request = GetRequest::new(random_range(rng));
    request.limit = [None, Some(0), Some(1), Some(2)][rng.gen_range(0..4)];
    request.count_only = rng.gen_bool(0.2);
    request
}

fn random_delete(rng: &mut StdRng) -> DeleteRequest {
    let mut request = DeleteRequest::new(random_range(rng));
    request.prev_kv = rng.gen_bool(0.5);
    request
}

fn random_ops(rng: &mut StdRng, model: &Model) -> Vec<TxnOp> {
    (0..rng.gen_range(0..4))
        .map(|_| match rng.gen_range(0..3) {
            0 => TxnOp::Get(random_get(rng)),
            1 => TxnOp::Put(random_put(rng, model)),
            _ => TxnOp::Delete(random_delete(rng)),
        })
        .collect()
}

fn random_compare(rng: &mut StdRng, model: &Model) -> Compare {
    let op = pick(
        rng,
        &[
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ],
    );
    let number = rng.gen_range(-1..=model.revision + 1);
    let target = match rng.gen_range(0..5) {
        0 => CompareTarget::Value(pick(rng, VALUES).into()),
        1 => CompareTarget::Version(rng.gen_range(-1..4)),
        2 => CompareTarget::CreateRevision(number),
        3 => CompareTarget::ModRevision(number),
        _ => CompareTarget::Lease(random_lease(rng, model)),
    };
    Compare::new(pick(rng, KEYS), op, target)
}

/// Errors compare by variant (and lease); messages are free-form.
fn same_outcome<T: PartialEq + std::fmt::Debug>(
    store: &StoreResult<T>,
    model: &StoreResult<T>,
) -> bool {
    match (store, model) {
        (Ok(a), Ok(b)) => a == b,
        (Err(StoreError::InvalidArgument(_)), Err(StoreError::InvalidArgument(_))) => true,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

#[tokio::test(start_paused = true)]
async fn random_operations_match_a_naive_model() {
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let store = EmbeddedStore::new();
        let mut model = Model {
            revision: 1,
            ..Model::default()
        };
        let mut watch_all = store.watch(KeyRange::prefix(""), 0).await.unwrap();
        for step in 0..600 {
            let what = format!("seed {seed} step {step}");
            match rng.gen_range(0..20) {
                0..=4 => {
                    let request = random_put(&mut rng, &model);
                    let got = store.put(request.clone()).await;
                    let want = match request.lease {
                        l if l != 0 && !model.leases.contains_key(&l) => {
                            Err(StoreError::LeaseNotFound(l))
                        }
                        _ => {
                            let revision = model.revision + 1;
                            let mut events = vec![];
                            let response = model.put(&request, revision, &mut events);
                            model.commit(events);
                            Ok(response)
                        }
                    };
                    assert!(
                        same_outcome(&got, &want),
                        "{what}: {request:?}\n store {got:?}\n model {want:?}"
                    );
                }
                5..=6 => {
                    let request = random_delete(&mut rng);
                    let got = store.delete(request.clone()).await;
                    let mut events = vec![];
                    let want = model.delete(&request, model.revision + 1, &mut events);
                    model.commit(events);
                    assert_eq!(got, Ok(want), "{what}: {request:?}");
                }
                7..=8 => {
                    let request = random_get(&mut rng);
                    let got = store.get(request.clone()).await;
                    assert_eq!(
                        got,
                        Ok(model.get(&request, model.revision)),
                        "{what}: {request:?}"
                    );
                }
                9..=15 => {
                    let mut txn = Txn::new();
                    for _ in 0..rng.gen_range(0..3) {
                        txn = txn.when(random_compare(&mut rng, &model));
                    }
                    txn.success = random_ops(&mut rng, &model);
                    txn.failure = random_ops(&mut rng, &model);
                    let got = store.txn(txn.clone()).await;
                    let want = model.txn(&txn);
                    assert!(
                        same_outcome(&got, &want),
                        "{what}: {txn:?}\n store {got:?}\n model {want:?}"
                    );
                }
                16 => {
                    let grant = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
                    model.leases.insert(grant.id, BTreeSet::new());
                }
                17 => {
                    let lease = random_lease(&mut rng, &model);
                    if lease != 0 {
                        let got = store.lease_revoke(lease).await;
                        assert_eq!(got, model.revoke(lease), "{what}: revoke {lease}");
                    }
                }
                _ => {
                    let lease = random_lease(&mut rng, &model);
                    if lease != 0 {
                        let got = store.lease_keepalive(lease).await;
                        let want = match model.leases.contains_key(&lease) {
                            true => Ok(Duration::from_secs(3600)),
                            false => Err(StoreError::LeaseNotFound(lease)),
                        };
                        assert_eq!(got, want, "{what}: keepalive {lease}");
                    }
                }
            }
            assert_eq!(store.revision(), model.revision, "{what}: revision");
        }

        // The live watch saw exactly the model's log, in order.
        let mut seen = vec![];
        while seen.len() < model.log.len() {
            seen.extend(next_batch(&mut watch_all).await);
        }
        assert_eq!(seen, model.log, "seed {seed}: live watch");
        // Replays from any revision, of any range, match the log too.
        for _ in 0..10 {
            let start = rng.gen_range(1..=model.revision);
            let range = random_range(&mut rng);
            let want: Vec<WatchEvent> = model
                .log
                .iter()
                .filter(|e| e.kv.mod_revision >= start && range.contains(&e.kv.key))
                .cloned()
                .collect();
            let mut stream = store.watch(range.clone(), start).await.unwrap();
            let mut got = vec![];
            while got.len() < want.len() {
                got.extend(next_batch(&mut stream).await);
            }
            assert_eq!(got, want, "seed {seed}: replay of {range:?} from {start}");
        }
    }
}

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
