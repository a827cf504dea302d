//! The store conformance suite: the semantics every [`Store`] backend must
//! have, written only against the [`Store`] trait.
//!
//! Every case is a `pub async fn case(store: Arc<dyn Store>, prefix: &str)`
//! that touches only keys under `prefix` and panics with a clear message on
//! failure. The suite runs unchanged against the embedded store (paused tokio
//! time, so lease waits are instant) and against a real, shared etcd server
//! (real time, other tests running concurrently, global compaction). Hence:
//!
//! * revisions are only compared relatively (other writers may advance the
//!   revision between two of ours), and watch checks only look at events
//!   under the case's own prefix;
//! * "nothing happened" is checked by writing a marker key afterwards and
//!   asserting that the marker is the next event, never by waiting;
//! * live watches start from revision 0 (never compacted); the backend must
//!   have registered the watch when `watch` returns (etcd-client waits for the
//!   "created" response, so the etcd backend does);
//! * cases that replay history retry when a concurrent compaction (from
//!   another test on the same etcd) removed it;
//! * leases use a 2 s TTL (etcd's minimum is about that, and etcd may round
//!   a TTL up) and every wait is bounded by [`WAIT`].
//!
//! Use [`conformance_tests!`](crate::conformance_tests) to get one named
//! `#[test]` per case.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{
    Compare, CompareOp, CompareTarget, DeleteRequest, EventKind, GetRequest, GetResponse, KeyRange,
    KeyValue, LeaseId, PutRequest, PutResponse, Revision, Store, StoreError, StoreExt, Txn, TxnOp,
    TxnOpResponse, WatchEvent, WatchStream,
};

/// The longest any single wait of the suite may take (a watch item, a lease
/// expiry). Generous for a loaded etcd; instant under paused time.
pub const WAIT: Duration = Duration::from_secs(10);

/// The lease TTL the suite grants: etcd's practical minimum.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// How often a case that replays history retries after a concurrent
/// compaction removed that history (only happens on a shared etcd).
const COMPACTION_RETRIES: usize = 5;

/// The names of every case, in the order [`conformance_tests!`](crate::conformance_tests)
/// generates them.
pub const CASES: &[&str] = &[
    "get_single_key",
    "get_prefix_limit_count_more",
    "prefix_boundaries",
    "span_boundaries",
    "put_prev_kv_and_revisions",
    "empty_key_rejected",
    "delete_key_and_prefix",
    "delete_missing_key_writes_nothing",
    "txn_branches",
    "txn_compare_value",
    "txn_compare_version",
    "txn_compare_create_revision",
    "txn_compare_mod_revision",
    "txn_compare_lease",
    "txn_compare_missing_key",
    "txn_all_compares_must_hold",
    "txn_failure_writes_nothing",
    "txn_unknown_lease_writes_nothing",
    "txn_gets_see_earlier_writes",
    "txn_duplicate_keys_rejected",
    "txn_writes_share_one_revision",
    "lease_grant_keepalive_revoke",
    "lease_ids_unique",
    "put_unknown_lease_rejected",
    "lease_keepalive_prevents_expiry",
    "lease_expiry_deletes_keys_in_one_revision",
    "put_detaches_lease",
    "watch_live_from_now",
    "watch_replays_history",
    "watch_from_middle_revision",
    "watch_prefix_boundary",
    "watch_single_key",
    "watch_delete_event_shape",
    "watch_multiple_watchers",
    "watch_compacted",
    "compact_future_revision_rejected",
];

/// A fresh prefix for one run of `case`: `conf/<case>/<random>/`, so that
/// runs sharing one etcd never see each other's keys.
pub fn unique_prefix(case: &str) -> String {
    format!("conf/{case}/{:016x}/", rand::random::<u64>())
}

/// Generates one test per conformance case, in a module (default name
/// `conformance`, so tests are reported as `conformance::watch_compacted`).
///
/// * `mod:` (optional) names the module, for several invocations in one file;
/// * `store:` is an expression evaluated inside each (async) test body — it
///   may `.await` and may use anything in scope where the macro is invoked —
///   and must yield something that coerces to `Arc<dyn eretes_store::Store>`;
/// * `attr:` is the attribute(s) put on each generated `async fn`.
///
/// Needs only `eretes-store` and `tokio` in the calling crate.
///
/// ```ignore
/// eretes_store::conformance_tests! {
///     store: eretes_store::embedded::EmbeddedStore::new(),
///     attr: #[tokio::test(start_paused = true)]
/// }
/// // against etcd, e.g.:
/// eretes_store::conformance_tests! {
///     mod: etcd_conformance,
///     store: connect_test_etcd().await,
///     attr: #[tokio::test(flavor = "multi_thread")] #[ignore = "needs etcd"]
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (store: $store:expr, attr: $(#[$attr:meta])+ $(,)?) => {
        $crate::conformance_tests!(mod: conformance, store: $store, attr: $(#[$attr])+);
    };
    (mod: $module:ident, store: $store:expr, attr: $(#[$attr:meta])+ $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::__conformance_cases!([$(#[$attr])+] ($store)
            get_single_key
            get_prefix_limit_count_more
            prefix_boundaries
            span_boundaries
            put_prev_kv_and_revisions
            empty_key_rejected
            delete_key_and_prefix
            delete_missing_key_writes_nothing
            txn_branches
            txn_compare_value
            txn_compare_version
            txn_compare_create_revision
            txn_compare_mod_revision
            txn_compare_lease
            txn_compare_missing_key
            txn_all_compares_must_hold
            txn_failure_writes_nothing
            txn_unknown_lease_writes_nothing
            txn_gets_see_earlier_writes
            txn_duplicate_keys_rejected
            txn_writes_share_one_revision
            lease_grant_keepalive_revoke
            lease_ids_unique
            put_unknown_lease_rejected
            lease_keepalive_prevents_expiry
            lease_expiry_deletes_keys_in_one_revision
            put_detaches_lease
            watch_live_from_now
            watch_replays_history
            watch_from_middle_revision
            watch_prefix_boundary
            watch_single_key
            watch_delete_event_shape
            watch_multiple_watchers
            watch_compacted
            compact_future_revision_rejected
            );
        }
    };
}

/// Implementation detail of [`conformance_tests!`]: emits one test per case
/// name, recursing so that the attribute list (a repetition of its own) can be
/// repeated for each case.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ([$($attr:tt)*] ($store:expr)) => {};
    ([$($attr:tt)*] ($store:expr) $case:ident $($rest:ident)*) => {
        $($attr)*
        async fn $case() {
            let store: ::std::sync::Arc<dyn $crate::Store> = $store;
            let prefix = $crate::conformance::unique_prefix(::std::stringify!($case));
            $crate::conformance::$case(store, &prefix).await;
        }
        $crate::__conformance_cases!([$($attr)*] ($store) $($rest)*);
    };
}

// ---------------------------------------------------------------------------
// Helpers

fn k(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not finish within {WAIT:?}"),
    }
}

async fn put(store: &dyn Store, key: &str, value: &str) -> PutResponse {
    bounded("put", store.put(PutRequest::new(key, value)))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

async fn put_leased(store: &dyn Store, key: &str, value: &str, lease: LeaseId) -> PutResponse {
    bounded(
        "put",
        store.put(PutRequest::new(key, value).with_lease(lease)),
    )
    .await
    .unwrap_or_else(|e| panic!("put {key} with lease {lease:#x}: {e}"))
}

async fn get_key(store: &dyn Store, key: &str) -> Option<KeyValue> {
    bounded("get", store.get_key(key))
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
}

async fn get(store: &dyn Store, request: GetRequest) -> GetResponse {
    let what = format!("get {request:?}");
    bounded(&what, store.get(request))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn txn(store: &dyn Store, txn: Txn) -> crate::TxnResponse {
    let what = format!("txn {txn:?}");
    bounded(&what, store.txn(txn))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn grant(store: &dyn Store) -> LeaseId {
    let grant = bounded("lease grant", store.lease_grant(LEASE_TTL))
        .await
        .unwrap_or_else(|e| panic!("lease grant: {e}"));
    assert_ne!(grant.id, 0, "a granted lease id must be non-zero");
    assert!(
        grant.ttl >= LEASE_TTL,
        "granted TTL {:?} is shorter than the {LEASE_TTL:?} asked for",
        grant.ttl
    );
    grant.id
}

async fn revoke(store: &dyn Store, lease: LeaseId) {
    bounded("lease revoke", store.lease_revoke(lease))
        .await
        .unwrap_or_else(|e| panic!("revoke lease {lease:#x}: {e}"));
}

/// A lease id that certainly does not exist: granted, then revoked.
async fn dead_lease(store: &dyn Store) -> LeaseId {
    let lease = grant(store).await;
    revoke(store, lease).await;
    lease
}

async fn watch(store: &dyn Store, range: KeyRange, start: Revision) -> WatchStream {
    let what = format!("watch {range:?} from {start}");
    bounded(&what, store.watch(range, start))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Watch from an old revision; `None` if that history was compacted (either
/// reported by `watch` or as the stream's first item).
async fn watch_history(
    store: &dyn Store,
    range: KeyRange,
    start: Revision,
) -> Option<(WatchStream, Vec<WatchEvent>)> {
    let what = format!("watch {range:?} from {start}");
    let mut stream = match bounded(&what, store.watch(range, start)).await {
        Ok(stream) => stream,
        Err(StoreError::Compacted { .. }) => return None,
        Err(e) => panic!("{what}: {e}"),
    };
    match bounded(&what, stream.next()).await {
        Some(Ok(batch)) => Some((stream, batch)),
        Some(Err(StoreError::Compacted { .. })) => None,
        Some(Err(e)) => panic!("{what}: first item failed: {e}"),
        None => panic!("{what}: stream ended before the first item"),
    }
}

/// Read until at least `n` events arrived (more may come in the last batch).
async fn events(
    stream: &mut WatchStream,
    mut got: Vec<WatchEvent>,
    n: usize,
    what: &str,
) -> Vec<WatchEvent> {
    while got.len() < n {
        match bounded(what, stream.next()).await {
            Some(Ok(batch)) => {
                assert!(!batch.is_empty(), "{what}: watch yielded an empty batch");
                got.extend(batch);
            }
            Some(Err(e)) => panic!("{what}: watch failed after {} events: {e}", got.len()),
            None => panic!("{what}: watch ended after {} of {n} events", got.len()),
        }
    }
    got
}

/// Read until the put of `marker`; return the events before it.
async fn events_until(stream: &mut WatchStream, marker: &str, what: &str) -> Vec<WatchEvent> {
    let mut got = Vec::new();
    loop {
        match bounded(what, stream.next()).await {
            Some(Ok(batch)) => {
                for event in batch {
                    if event.kv.key == marker {
                        return got;
                    }
                    got.push(event);
                }
            }
            Some(Err(e)) => panic!("{what}: watch failed: {e}"),
            None => panic!("{what}: watch ended before the marker {marker}"),
        }
    }
}

/// A compact description of events for readable assertion failures.
fn shape(events: &[WatchEvent]) -> Vec<(EventKind, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.kind,
                e.kv.key.clone(),
                String::from_utf8_lossy(&e.kv.value).into_owned(),
            )
        })
        .collect()
}

fn expect(events: &[(EventKind, &str, &str)]) -> Vec<(EventKind, String, String)> {
    events
        .iter()
        .map(|(kind, key, value)| (*kind, key.to_string(), value.to_string()))
        .collect()
}

fn assert_revisions_increase(events: &[WatchEvent], what: &str) {
    for pair in events.windows(2) {
        assert!(
            pair[0].kv.mod_revision < pair[1].kv.mod_revision,
            "{what}: events out of revision order: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

async fn check_compare(store: &dyn Store, compare: Compare, expected: bool) {
    let what = format!("{compare:?}");
    let response = txn(store, Txn::new().when(compare)).await;
    assert_eq!(
        response.succeeded, expected,
        "compare {what} should be {expected}"
    );
}

/// Check all four operators of `target(operand)` against the stored field
/// value `stored` (operands below, at and above it).
async fn check_ordered_compares(
    store: &dyn Store,
    key: &str,
    stored: i64,
    target: impl Fn(i64) -> CompareTarget,
) {
    use CompareOp::*;
    for (op, operand, expected) in [
        (Equal, stored, true),
        (Equal, stored + 1, false),
        (Equal, stored - 1, false),
        (NotEqual, stored, false),
        (NotEqual, stored + 1, true),
        (Less, stored + 1, true),
        (Less, stored, false),
        (Less, stored - 1, false),
        (Greater, stored - 1, true),
        (Greater, stored, false),
        (Greater, stored + 1, false),
    ] {
        check_compare(store, Compare::new(key, op, target(operand)), expected).await;
    }
}

fn put_op(key: &str, value: &str) -> TxnOp {
    TxnOp::Put(PutRequest::new(key, value))
}

fn expect_invalid<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::InvalidArgument(_)) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

fn expect_lease_not_found<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    lease: LeaseId,
    what: &str,
) {
    match result {
        Err(StoreError::LeaseNotFound(id)) => {
            assert_eq!(id, lease, "{what}: wrong lease in the error")
        }
        other => panic!("{what}: expected LeaseNotFound({lease:#x}), got {other:?}"),
    }
}

async fn assert_absent(store: &dyn Store, key: &str, why: &str) {
    if let Some(kv) = get_key(store, key).await {
        panic!("{why}: {key} should not exist, found {kv:?}");
    }
}

// ---------------------------------------------------------------------------
// Reads

/// A single-key get returns exactly that key with etcd's metadata.
pub async fn get_single_key(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "k");
    let written = put(store, &key, "v").await;
    put(store, &k(prefix, "kx"), "other").await; // `key` is a prefix of this key

    let got = get(store, GetRequest::new(KeyRange::key(&key))).await;
    assert_eq!(got.count, 1, "count of a single-key get");
    assert!(!got.more, "more on a single-key get");
    assert!(
        got.revision >= written.revision,
        "get revision {} is before the put {}",
        got.revision,
        written.revision
    );
    assert_eq!(
        got.kvs,
        vec![KeyValue {
            key: key.clone(),
            value: b"v".to_vec(),
            create_revision: written.revision,
            mod_revision: written.revision,
            version: 1,
            lease: 0,
        }],
        "a fresh key"
    );

    let missing = get(store, GetRequest::new(KeyRange::key(k(prefix, "missing")))).await;
    assert!(missing.kvs.is_empty(), "a missing key returns no kvs");
    assert_eq!(missing.count, 0, "count of a missing key");
    assert!(!missing.more, "more of a missing key");
    assert!(
        missing.revision >= written.revision,
        "a get reports the current revision"
    );
}

/// Prefix gets are in key order; `limit`, `count`, `more` and `count_only`
/// behave as in etcd.
pub async fn get_prefix_limit_count_more(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let list = k(prefix, "list/");
    for name in ["c", "a", "sub/d", "b"] {
        put(store, &k(&list, name), name).await;
    }
    put(store, &k(prefix, "list"), "outside").await;
    let all = get(store, GetRequest::new(KeyRange::prefix(&list))).await;
    let expected: Vec<String> = ["a", "b", "c", "sub/d"]
        .iter()
        .map(|n| k(&list, n))
        .collect();
    assert_eq!(keys(&all.kvs), expected, "prefix get in key order");
    assert_eq!(all.count, 4);
    assert!(!all.more);

    let limited = get(
        store,
        GetRequest::new(KeyRange::prefix(&list)).with_limit(2),
    )
    .await;
    assert_eq!(
        keys(&limited.kvs),
        expected[..2].to_vec(),
        "limit 2 returns the first two keys"
    );
    assert_eq!(limited.count, 4, "count ignores limit");
    assert!(limited.more, "more when the limit cut the result");

    for limit in [4, 10] {
        let exact = get(
            store,
            GetRequest::new(KeyRange::prefix(&list)).with_limit(limit),
        )
        .await;
        assert_eq!(exact.kvs.len(), 4, "limit {limit}");
        assert!(!exact.more, "no more with limit {limit} >= count");
    }

    let counted = get(store, GetRequest::new(KeyRange::prefix(&list)).count_only()).await;
    assert!(counted.kvs.is_empty(), "count_only returns no kvs");
    assert_eq!(counted.count, 4, "count_only count");
    assert!(!counted.more, "count_only never reports more");

    let counted = get(
        store,
        GetRequest::new(KeyRange::prefix(&list))
            .with_limit(1)
            .count_only(),
    )
    .await;
    assert_eq!(counted.count, 4, "count_only ignores limit");

    let empty = get(
        store,
        GetRequest::new(KeyRange::prefix(k(prefix, "nothing/"))),
    )
    .await;
    assert!(
        empty.kvs.is_empty() && empty.count == 0 && !empty.more,
        "empty prefix: {empty:?}"
    );
}

/// A prefix `a/` matches neither `a`, `a0` nor `ab/...`, for get and delete.
pub async fn prefix_boundaries(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    for name in ["a", "a/x", "a/y", "ab/x", "a0"] {
        put(store, &k(prefix, name), name).await;
    }
    let a = k(prefix, "a/");
    let got = get(store, GetRequest::new(KeyRange::prefix(&a))).await;
    assert_eq!(
        keys(&got.kvs),
        vec![k(prefix, "a/x"), k(prefix, "a/y")],
        "get of prefix a/"
    );

    let deleted = store
        .delete(DeleteRequest::new(KeyRange::prefix(&a)).with_prev_kv())
        .await
        .expect("delete prefix a/");
    assert_eq!(
        deleted.deleted, 2,
        "delete of prefix a/ deletes a/x and a/y only"
    );
    assert_eq!(
        keys(&deleted.prev_kvs),
        vec![k(prefix, "a/x"), k(prefix, "a/y")]
    );
    let rest = get(store, GetRequest::new(KeyRange::prefix(prefix))).await;
    assert_eq!(
        keys(&rest.kvs),
        vec![k(prefix, "a"), k(prefix, "a0"), k(prefix, "ab/x")],
        "keys outside a/ survive its deletion"
    );
}

/// A span holds the keys from its start up to, not including, its end:
/// reads, limits, watches, deletes and a transaction's put-inside-delete
/// check all see the same keys; an empty span is refused.
pub async fn span_boundaries(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let names = ["a", "a/x", "b", "b/x", "b/y", "c/x", "c0", "d"];
    for name in names {
        put(store, &k(prefix, name), "1").await;
    }
    let end = String::from_utf8(crate::prefix_end(&k(prefix, "c/"))).expect("ASCII");
    assert_eq!(end, k(prefix, "c0"), "the end of prefix c/");
    let span = || KeyRange::span(k(prefix, "b/"), end.clone());
    let inside = vec![k(prefix, "b/x"), k(prefix, "b/y"), k(prefix, "c/x")];

    let got = get(store, GetRequest::new(span())).await;
    assert_eq!(keys(&got.kvs), inside, "get of the span");
    assert_eq!((got.count, got.more), (3, false));
    let limited = get(store, GetRequest::new(span()).with_limit(2)).await;
    assert_eq!(keys(&limited.kvs), &inside[..2], "get of the span, limit 2");
    assert_eq!((limited.count, limited.more), (3, true));

    let mut stream = watch(store, span(), 0).await;
    for name in names {
        put(store, &k(prefix, name), "2").await;
    }
    let marker = k(prefix, "c/zz-marker");
    put(store, &marker, "m").await;
    let seen = events_until(&mut stream, &marker, "span watch").await;
    let wanted: Vec<(EventKind, &str, &str)> = inside
        .iter()
        .map(|key| (EventKind::Put, key.as_str(), "2"))
        .collect();
    assert_eq!(shape(&seen), expect(&wanted), "only keys in the span");

    // A put inside the span and a delete of it in one transaction: refused.
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(put_op(&k(prefix, "b/new"), "1"))
                    .and_then(TxnOp::Delete(DeleteRequest::new(span()))),
            )
            .await,
        "put inside a deleted span",
    );
    // A put at its end is outside it.
    txn(
        store,
        Txn::new()
            .and_then(put_op(&k(prefix, "c0"), "3"))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(k(
                prefix, "d",
            ))))),
    )
    .await;

    let deleted = store
        .delete(DeleteRequest::new(span()).with_prev_kv())
        .await
        .expect("delete of the span");
    assert_eq!(deleted.deleted, 4, "the span's three keys and the marker");
    let rest = get(store, GetRequest::new(KeyRange::prefix(prefix))).await;
    assert_eq!(
        keys(&rest.kvs),
        vec![
            k(prefix, "a"),
            k(prefix, "a/x"),
            k(prefix, "b"),
            k(prefix, "c0")
        ],
        "keys outside the span survive its deletion"
    );

    let empty = KeyRange::span(k(prefix, "b/"), k(prefix, "b/"));
    expect_invalid(
        store.get(GetRequest::new(empty.clone())).await,
        "an empty span",
    );
    expect_invalid(
        store.watch(empty, 0).await.map(|_| ()),
        "a watch of an empty span",
    );
}

// ---------------------------------------------------------------------------
// Puts and deletes

/// Puts report the previous value on request and move version, create and
/// mod revision exactly as etcd; deletion resets a key's life.
pub async fn put_prev_kv_and_revisions(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "k");
    let first = store
        .put(PutRequest::new(&key, "v1").with_prev_kv())
        .await
        .expect("put v1");
    assert_eq!(first.prev_kv, None, "no prev_kv for a new key");

    let second = store
        .put(PutRequest::new(&key, "v2").with_prev_kv())
        .await
        .expect("put v2");
    assert!(second.revision > first.revision, "revisions increase");
    assert_eq!(
        second.prev_kv,
        Some(KeyValue {
            key: key.clone(),
            value: b"v1".to_vec(),
            create_revision: first.revision,
            mod_revision: first.revision,
            version: 1,
            lease: 0,
        }),
        "prev_kv is the key as it was"
    );
    let kv = get_key(store, &key).await.expect("key exists");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (first.revision, second.revision, 2)
    );

    let third = put(store, &key, "v2").await;
    assert_eq!(third.prev_kv, None, "prev_kv only when asked for");
    assert!(
        third.revision > second.revision,
        "an unchanged value is still a new revision"
    );
    let kv = get_key(store, &key).await.expect("key exists");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (first.revision, third.revision, 3)
    );

    let deleted = store
        .delete(DeleteRequest::new(KeyRange::key(&key)))
        .await
        .expect("delete");
    assert!(deleted.revision > third.revision);
    let again = store
        .put(PutRequest::new(&key, "v4").with_prev_kv())
        .await
        .expect("put v4");
    assert_eq!(again.prev_kv, None, "no prev_kv after the key was deleted");
    assert!(again.revision > deleted.revision);
    let kv = get_key(store, &key).await.expect("key exists");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (again.revision, again.revision, 1),
        "a re-created key starts a new life"
    );
}

/// Empty keys are rejected by every operation.
pub async fn empty_key_rejected(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    expect_invalid(
        store.put(PutRequest::new("", "v")).await,
        "put of an empty key",
    );
    expect_invalid(
        store.get(GetRequest::new(KeyRange::key(""))).await,
        "get of an empty key",
    );
    expect_invalid(
        store.delete(DeleteRequest::new(KeyRange::key(""))).await,
        "delete of an empty key",
    );
    let marker = k(prefix, "m");
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(put_op(&marker, "x"))
                    .and_then(put_op("", "v")),
            )
            .await,
        "txn putting an empty key",
    );
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .when(Compare::absent(""))
                    .and_then(put_op(&marker, "x")),
            )
            .await,
        "txn comparing an empty key",
    );
    assert_absent(store, &marker, "a rejected txn writes nothing").await;
}

/// Deletes of a key or a prefix report counts, prev_kvs and a new revision.
pub async fn delete_key_and_prefix(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "k");
    let dir = k(prefix, "d/");
    let last = {
        let mut last = put(store, &key, "v").await;
        for name in ["1", "2", "3"] {
            last = put(store, &k(&dir, name), name).await;
        }
        last
    };

    let one = store
        .delete(DeleteRequest::new(KeyRange::key(&key)).with_prev_kv())
        .await
        .expect("delete key");
    assert_eq!(one.deleted, 1);
    assert!(one.revision > last.revision, "a delete is a new revision");
    assert_eq!(keys(&one.prev_kvs), vec![key.as_str()]);
    assert_eq!(one.prev_kvs[0].value, b"v");
    assert_absent(store, &key, "deleted key").await;

    let many = store
        .delete(DeleteRequest::new(KeyRange::prefix(&dir)))
        .await
        .expect("delete prefix");
    assert_eq!(many.deleted, 3, "prefix delete count");
    assert!(many.prev_kvs.is_empty(), "prev_kvs only when asked for");
    assert!(many.revision > one.revision);
    let left = get(store, GetRequest::new(KeyRange::prefix(&dir))).await;
    assert_eq!(left.count, 0, "prefix emptied");

    let none = store
        .delete(DeleteRequest::new(KeyRange::prefix(&dir)).with_prev_kv())
        .await
        .expect("delete empty prefix");
    assert_eq!((none.deleted, none.prev_kvs.len()), (0, 0));
    let none = store
        .delete(DeleteRequest::new(KeyRange::key(k(prefix, "missing"))).with_prev_kv())
        .await
        .expect("delete missing key");
    assert_eq!((none.deleted, none.prev_kvs.len()), (0, 0));
}

/// Deleting nothing creates no revision and no watch event.
pub async fn delete_missing_key_writes_nothing(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    let none = store
        .delete(DeleteRequest::new(KeyRange::key(k(prefix, "missing"))))
        .await
        .expect("delete missing key");
    assert_eq!(none.deleted, 0);
    let none = store
        .delete(DeleteRequest::new(KeyRange::prefix(k(prefix, "nothing/"))))
        .await
        .expect("delete empty prefix");
    assert_eq!(none.deleted, 0);
    let read_only = txn(
        store,
        Txn::new().and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(k(
            prefix, "gone",
        ))))),
    )
    .await;
    assert!(read_only.succeeded);
    let marker = k(prefix, "marker");
    let written = put(store, &marker, "m").await;
    assert!(
        none.revision < written.revision,
        "delete of nothing reported a revision not before the next write"
    );
    let seen = events_until(&mut stream, &marker, "watch during deletes of nothing").await;
    assert!(
        seen.is_empty(),
        "deleting nothing produced events: {:?}",
        shape(&seen)
    );
}

// ---------------------------------------------------------------------------
// Transactions

/// The success branch runs when every compare holds, the failure branch
/// otherwise; responses follow the branch's operations.
pub async fn txn_branches(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "t");
    let (s, f) = (k(prefix, "s"), k(prefix, "f"));
    put(store, &key, "1").await;

    let won = txn(
        store,
        Txn::new()
            .when(Compare::value_is(&key, "1"))
            .and_then(put_op(&key, "2"))
            .and_then(TxnOp::Get(GetRequest::new(KeyRange::key(&key))))
            .or_else(put_op(&f, "x")),
    )
    .await;
    assert!(won.succeeded, "compare on the current value holds");
    assert_eq!(won.responses.len(), 2, "one response per success op");
    match &won.responses[..] {
        [TxnOpResponse::Put(p), TxnOpResponse::Get(g)] => {
            assert_eq!(
                p.revision, won.revision,
                "put inside the txn has the txn's revision"
            );
            assert_eq!(g.kvs[0].value, b"2", "the get sees the put before it");
        }
        other => panic!("unexpected responses {other:?}"),
    }
    assert_absent(store, &f, "the failure branch did not run").await;

    let lost = txn(
        store,
        Txn::new()
            .when(Compare::value_is(&key, "1"))
            .and_then(put_op(&s, "x"))
            .or_else(put_op(&f, "y"))
            .or_else(TxnOp::Get(GetRequest::new(KeyRange::key(&f)))),
    )
    .await;
    assert!(!lost.succeeded, "compare on a stale value fails");
    assert_eq!(lost.responses.len(), 2, "one response per failure op");
    match &lost.responses[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs[0].value, b"y"),
        other => panic!("unexpected response {other:?}"),
    }
    assert_absent(store, &s, "the success branch did not run").await;
    assert_eq!(get_key(store, &f).await.expect("f written").value, b"y");

    let unconditional = txn(store, Txn::new().and_then(put_op(&s, "z"))).await;
    assert!(
        unconditional.succeeded,
        "no compares: the success branch runs"
    );
    let empty = txn(store, Txn::new()).await;
    assert!(
        empty.succeeded && empty.responses.is_empty(),
        "an empty txn succeeds: {empty:?}"
    );
}

/// Value compares are lexicographic on bytes, with every operator.
pub async fn txn_compare_value(store: Arc<dyn Store>, prefix: &str) {
    use CompareOp::*;
    let store = &*store;
    let key = k(prefix, "v");
    put(store, &key, "m").await;
    for (op, operand, expected) in [
        (Equal, "m", true),
        (Equal, "n", false),
        (Equal, "", false),
        (NotEqual, "n", true),
        (NotEqual, "m", false),
        (Less, "n", true),
        (Less, "ma", true),
        (Less, "m", false),
        (Less, "l", false),
        (Greater, "l", true),
        (Greater, "", true),
        (Greater, "m", false),
        (Greater, "n", false),
    ] {
        check_compare(
            store,
            Compare::new(&key, op, CompareTarget::Value(operand.into())),
            expected,
        )
        .await;
    }
}

/// Version compares, with every operator.
pub async fn txn_compare_version(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "v");
    put(store, &key, "1").await;
    put(store, &key, "2").await;
    check_ordered_compares(store, &key, 2, CompareTarget::Version).await;
}

/// Create-revision compares, with every operator.
pub async fn txn_compare_create_revision(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "v");
    let created = put(store, &key, "1").await.revision;
    put(store, &key, "2").await;
    check_ordered_compares(store, &key, created, CompareTarget::CreateRevision).await;
}

/// Mod-revision compares, with every operator.
pub async fn txn_compare_mod_revision(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "v");
    put(store, &key, "1").await;
    let modified = put(store, &key, "2").await.revision;
    check_ordered_compares(store, &key, modified, CompareTarget::ModRevision).await;
    check_compare(store, Compare::mod_revision_is(&key, modified), true).await;
}

/// Lease compares, with every operator; a key without lease has lease 0.
pub async fn txn_compare_lease(store: Arc<dyn Store>, prefix: &str) {
    use CompareOp::*;
    let store = &*store;
    let lease = grant(store).await;
    let leased = k(prefix, "leased");
    let plain = k(prefix, "plain");
    put_leased(store, &leased, "1", lease).await;
    put(store, &plain, "1").await;
    for (op, operand, expected) in [
        (Equal, lease, true),
        (Equal, 0, false),
        (NotEqual, 0, true),
        (NotEqual, lease, false),
        (Greater, 0, true),
        (Greater, lease, false),
        (Less, lease, false),
        (Less, 0, false),
    ] {
        check_compare(
            store,
            Compare::new(&leased, op, CompareTarget::Lease(operand)),
            expected,
        )
        .await;
    }
    check_compare(
        store,
        Compare::new(&plain, Equal, CompareTarget::Lease(0)),
        true,
    )
    .await;
    check_compare(
        store,
        Compare::new(&plain, Less, CompareTarget::Lease(lease)),
        true,
    )
    .await;
    revoke(store, lease).await;
}

/// On a missing key, version/create/mod revision and lease compare as 0 and
/// every value compare is false.
pub async fn txn_compare_missing_key(store: Arc<dyn Store>, prefix: &str) {
    use CompareOp::*;
    let store = &*store;
    let key = k(prefix, "missing");
    let numeric: [fn(i64) -> CompareTarget; 4] = [
        CompareTarget::Version,
        CompareTarget::CreateRevision,
        CompareTarget::ModRevision,
        CompareTarget::Lease,
    ];
    for target in numeric {
        for (op, operand, expected) in [
            (Equal, 0, true),
            (NotEqual, 0, false),
            (Greater, 0, false),
            (Less, 1, true),
            (Less, 0, false),
            (Equal, 1, false),
            (NotEqual, 1, true),
            (Greater, -1, true),
        ] {
            check_compare(store, Compare::new(&key, op, target(operand)), expected).await;
        }
    }
    for op in [Equal, NotEqual, Less, Greater] {
        for operand in ["", "x", "\u{7f}"] {
            check_compare(
                store,
                Compare::new(&key, op, CompareTarget::Value(operand.into())),
                false,
            )
            .await;
        }
    }
    check_compare(store, Compare::absent(&key), true).await;
    check_compare(store, Compare::present(&key), false).await;
}

/// Every compare must hold for the success branch.
pub async fn txn_all_compares_must_hold(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    put(store, &a, "1").await;
    put(store, &b, "2").await;
    let both = Txn::new()
        .when(Compare::value_is(&a, "1"))
        .when(Compare::value_is(&b, "2"));
    assert!(txn(store, both).await.succeeded, "both compares hold");
    let one = Txn::new()
        .when(Compare::value_is(&a, "1"))
        .when(Compare::value_is(&b, "3"));
    assert!(!txn(store, one).await.succeeded, "one compare fails");
    let other = Txn::new()
        .when(Compare::value_is(&a, "0"))
        .when(Compare::value_is(&b, "2"));
    assert!(
        !txn(store, other).await.succeeded,
        "the other compare fails"
    );
}

/// A txn whose compares fail and whose failure branch is empty writes nothing.
pub async fn txn_failure_writes_nothing(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    let response = txn(
        store,
        Txn::new()
            .when(Compare::present(&a))
            .and_then(put_op(&a, "1"))
            .and_then(put_op(&b, "1")),
    )
    .await;
    assert!(!response.succeeded);
    assert!(
        response.responses.is_empty(),
        "no failure ops, no responses"
    );
    assert_absent(store, &a, "failed txn").await;
    assert_absent(store, &b, "failed txn").await;
    let marker = k(prefix, "marker");
    put(store, &marker, "m").await;
    let seen = events_until(&mut stream, &marker, "watch during a failed txn").await;
    assert!(
        seen.is_empty(),
        "a failed txn produced events: {:?}",
        shape(&seen)
    );
}

/// A txn whose chosen branch puts with an unknown lease fails as a whole;
/// an unknown lease in the branch that does not run is not an error (etcd
/// checks the chosen branch only).
pub async fn txn_unknown_lease_writes_nothing(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let dead = dead_lease(store).await;
    let (a, b, c) = (k(prefix, "a"), k(prefix, "b"), k(prefix, "c"));
    put(store, &c, "old").await;
    let result = store
        .txn(
            Txn::new()
                .and_then(put_op(&a, "1"))
                .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(&c))))
                .and_then(TxnOp::Put(PutRequest::new(&b, "1").with_lease(dead))),
        )
        .await;
    // Not checking the id: etcd's txn error does not name the lease.
    assert!(
        matches!(result, Err(StoreError::LeaseNotFound(_))),
        "txn with a revoked lease: expected LeaseNotFound, got {result:?}"
    );
    assert_absent(store, &a, "nothing of a failed txn is applied").await;
    assert_absent(store, &b, "nothing of a failed txn is applied").await;
    assert!(
        get_key(store, &c).await.is_some(),
        "the txn's delete was not applied"
    );

    let response = txn(
        store,
        Txn::new()
            .and_then(put_op(&a, "2"))
            .or_else(TxnOp::Put(PutRequest::new(&b, "1").with_lease(dead))),
    )
    .await;
    assert!(response.succeeded);
    assert_eq!(get_key(store, &a).await.expect("a written").value, b"2");
}

/// Gets inside a txn see the writes made earlier in the same branch.
pub async fn txn_gets_see_earlier_writes(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (x, y, z) = (k(prefix, "x"), k(prefix, "y"), k(prefix, "z"));
    put(store, &x, "old").await;
    put(store, &y, "here").await;
    let get_op = |key: &str| TxnOp::Get(GetRequest::new(KeyRange::key(key)));
    let response = txn(
        store,
        Txn::new()
            .and_then(get_op(&x))
            .and_then(put_op(&x, "new"))
            .and_then(get_op(&x))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(&y))))
            .and_then(get_op(&y))
            .and_then(put_op(&z, "fresh"))
            .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(prefix)))),
    )
    .await;
    let gets: Vec<&GetResponse> = response
        .responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(gets.len(), 4);
    assert_eq!(
        gets[0].kvs[0].value, b"old",
        "a get before the put sees the old value"
    );
    let new = &gets[1].kvs[0];
    assert_eq!(new.value, b"new", "a get after the put sees it");
    assert_eq!((new.version, new.mod_revision), (2, response.revision));
    assert!(
        gets[2].kvs.is_empty() && gets[2].count == 0,
        "a get after the delete sees nothing"
    );
    assert_eq!(
        keys(&gets[3].kvs),
        vec![x.as_str(), z.as_str()],
        "a prefix get sees all earlier writes"
    );
}

/// One branch may not write a key twice (put+put, or put inside a delete's
/// range), in either branch; overlapping deletes are fine.
pub async fn txn_duplicate_keys_rejected(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    let dir = k(prefix, "d/");
    let del_key = |key: &str| TxnOp::Delete(DeleteRequest::new(KeyRange::key(key)));
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(put_op(&b, "0"))
                    .and_then(put_op(&a, "1"))
                    .and_then(put_op(&a, "2")),
            )
            .await,
        "put of the same key twice",
    );
    expect_invalid(
        store
            .txn(Txn::new().and_then(put_op(&a, "1")).and_then(del_key(&a)))
            .await,
        "put and delete of the same key",
    );
    expect_invalid(
        store
            .txn(Txn::new().and_then(del_key(&a)).and_then(put_op(&a, "1")))
            .await,
        "delete and put of the same key",
    );
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(&dir))))
                    .and_then(put_op(&k(&dir, "x"), "1")),
            )
            .await,
        "put inside a deleted prefix",
    );
    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(put_op(&b, "1"))
                    .or_else(put_op(&a, "1"))
                    .or_else(put_op(&a, "2")),
            )
            .await,
        "duplicate in the failure branch, even when the success branch runs",
    );
    assert_absent(store, &a, "rejected txns write nothing").await;
    assert_absent(store, &b, "rejected txns write nothing").await;

    expect_invalid(
        store
            .txn(
                Txn::new()
                    .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(prefix))))
                    .and_then(put_op(&k(&dir, "y"), "1")),
            )
            .await,
        "put inside an enclosing deleted prefix",
    );

    put(store, &a, "1").await;
    let fine = txn(
        store,
        Txn::new()
            .and_then(del_key(&a))
            .and_then(del_key(&a))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(&dir))))
            .and_then(put_op(&b, "1")),
    )
    .await;
    assert!(
        fine.succeeded,
        "overlapping deletes and a put outside them are allowed"
    );
    match &fine.responses[..2] {
        [TxnOpResponse::Delete(first), TxnOpResponse::Delete(second)] => {
            assert_eq!(
                (first.deleted, second.deleted),
                (1, 0),
                "the second delete finds nothing"
            );
        }
        other => panic!("unexpected responses {other:?}"),
    }
}

/// All writes of one txn share one revision, delivered in op order; a txn
/// without writes produces no events.
pub async fn txn_writes_share_one_revision(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (a, b, c) = (k(prefix, "a"), k(prefix, "b"), k(prefix, "c"));
    put(store, &c, "old").await;
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    let read_only = txn(
        store,
        Txn::new().and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(prefix)))),
    )
    .await;
    let response = txn(
        store,
        Txn::new()
            .when(Compare::present(&c))
            .and_then(put_op(&b, "1"))
            .and_then(put_op(&a, "1"))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(&c)))),
    )
    .await;
    assert!(response.succeeded);
    assert!(response.revision > read_only.revision);
    let seen = events(&mut stream, Vec::new(), 3, "watch of a txn").await;
    assert_eq!(
        shape(&seen),
        expect(&[
            (EventKind::Put, &b, "1"),
            (EventKind::Put, &a, "1"),
            (EventKind::Delete, &c, "")
        ]),
        "txn events in op order (the read-only txn produced none)"
    );
    for event in &seen {
        assert_eq!(
            event.kv.mod_revision, response.revision,
            "every event has the txn's revision: {event:?}"
        );
    }
    for key in [&a, &b] {
        let kv = get_key(store, key).await.expect("written");
        assert_eq!(
            (kv.create_revision, kv.mod_revision),
            (response.revision, response.revision)
        );
    }
}

// ---------------------------------------------------------------------------
// Leases

/// Grant, attach, keepalive and revoke; a revoked lease is gone for good.
pub async fn lease_grant_keepalive_revoke(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let lease = grant(store).await;
    let (a, b, c) = (k(prefix, "a"), k(prefix, "b"), k(prefix, "c"));
    let written = put_leased(store, &a, "1", lease).await;
    put_leased(store, &b, "1", lease).await;
    put(store, &c, "1").await;
    assert_eq!(
        get_key(store, &a).await.expect("a").lease,
        lease,
        "the key carries its lease"
    );
    assert!(written.revision > 0);

    let remaining = bounded("keepalive", store.lease_keepalive(lease))
        .await
        .unwrap_or_else(|e| panic!("keepalive of a live lease: {e}"));
    assert!(
        remaining > Duration::ZERO && remaining <= LEASE_TTL + Duration::from_secs(1),
        "keepalive reports the remaining TTL, got {remaining:?}"
    );

    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    revoke(store, lease).await;
    let seen = events(&mut stream, Vec::new(), 2, "watch of a revoke").await;
    assert_eq!(
        shape(&seen),
        expect(&[(EventKind::Delete, &a, ""), (EventKind::Delete, &b, "")]),
        "revoke deletes the lease's keys in key order"
    );
    assert_eq!(
        seen[0].kv.mod_revision, seen[1].kv.mod_revision,
        "revoke deletes all keys in one revision"
    );
    assert_absent(store, &a, "revoked lease's key").await;
    assert_absent(store, &b, "revoked lease's key").await;
    assert!(
        get_key(store, &c).await.is_some(),
        "a key without lease survives"
    );

    expect_lease_not_found(
        store.lease_keepalive(lease).await,
        lease,
        "keepalive of a revoked lease",
    );
    expect_lease_not_found(
        store.lease_revoke(lease).await,
        lease,
        "revoke of a revoked lease",
    );
}

/// Lease ids are non-zero and distinct.
pub async fn lease_ids_unique(store: Arc<dyn Store>, _prefix: &str) {
    let store = &*store;
    let mut ids = BTreeSet::new();
    for _ in 0..5 {
        let id = grant(store).await;
        assert!(ids.insert(id), "lease id {id:#x} granted twice");
    }
    for id in ids {
        revoke(store, id).await;
    }
}

/// A put with an unknown lease fails and writes nothing.
pub async fn put_unknown_lease_rejected(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let dead = dead_lease(store).await;
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    expect_lease_not_found(
        store.put(PutRequest::new(&a, "1").with_lease(dead)).await,
        dead,
        "put with a revoked lease",
    );
    assert_absent(store, &a, "a put with an unknown lease").await;
    put(store, &b, "old").await;
    expect_lease_not_found(
        store.put(PutRequest::new(&b, "new").with_lease(dead)).await,
        dead,
        "overwrite with a revoked lease",
    );
    let kv = get_key(store, &b).await.expect("b still exists");
    assert_eq!(
        (kv.value.as_slice(), kv.version),
        (&b"old"[..], 1),
        "the old value is untouched"
    );
}

/// Keepalives keep a lease (and its keys) alive past its TTL.
pub async fn lease_keepalive_prevents_expiry(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let lease = grant(store).await;
    let key = k(prefix, "k");
    put_leased(store, &key, "1", lease).await;
    for round in 0..4 {
        tokio::time::sleep(LEASE_TTL / 2).await;
        bounded("keepalive", store.lease_keepalive(lease))
            .await
            .unwrap_or_else(|e| panic!("keepalive round {round}: {e}"));
    }
    assert!(
        get_key(store, &key).await.is_some(),
        "a renewed lease keeps its key past the TTL"
    );
    revoke(store, lease).await;
}

/// Without keepalive a lease expires and all its keys go in one revision,
/// delivered to watchers as delete events.
pub async fn lease_expiry_deletes_keys_in_one_revision(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let lease = grant(store).await;
    let names = ["c", "a", "b"];
    for name in names {
        put_leased(store, &k(prefix, name), name, lease).await;
    }
    let plain = k(prefix, "plain");
    put(store, &plain, "1").await;
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    assert!(
        get_key(store, &k(prefix, "a")).await.is_some(),
        "leased keys exist before the TTL"
    );

    let seen = events(&mut stream, Vec::new(), 3, "waiting for lease expiry").await;
    assert_eq!(seen.len(), 3, "expiry events: {:?}", shape(&seen));
    let (a, b, c) = (k(prefix, "a"), k(prefix, "b"), k(prefix, "c"));
    assert_eq!(
        shape(&seen),
        expect(&[
            (EventKind::Delete, &a, ""),
            (EventKind::Delete, &b, ""),
            (EventKind::Delete, &c, "")
        ]),
        "expiry deletes the lease's keys in key order"
    );
    for event in &seen {
        assert_eq!(
            event.kv.mod_revision, seen[0].kv.mod_revision,
            "one revision for the whole lease"
        );
        let prev = event.prev_kv.as_ref().expect("expiry events carry prev_kv");
        assert_eq!(prev.lease, lease);
    }
    for key in [&a, &b, &c] {
        assert_absent(store, key, "expired lease's key").await;
    }
    assert!(
        get_key(store, &plain).await.is_some(),
        "a key without lease survives"
    );
    expect_lease_not_found(
        store.lease_keepalive(lease).await,
        lease,
        "keepalive of an expired lease",
    );
    expect_lease_not_found(
        store
            .put(PutRequest::new(&a, "again").with_lease(lease))
            .await,
        lease,
        "put with an expired lease",
    );
}

/// Re-putting a key with another lease (or none) detaches it from the old one.
pub async fn put_detaches_lease(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let first = grant(store).await;
    let second = grant(store).await;
    let (one, two) = (k(prefix, "one"), k(prefix, "two"));
    put_leased(store, &one, "1", first).await;
    put(store, &one, "2").await;
    assert_eq!(
        get_key(store, &one).await.expect("one").lease,
        0,
        "a put without lease clears it"
    );
    put_leased(store, &two, "1", first).await;
    put_leased(store, &two, "2", second).await;
    assert_eq!(get_key(store, &two).await.expect("two").lease, second);
    revoke(store, first).await;
    assert!(
        get_key(store, &one).await.is_some(),
        "detached key survives the old lease"
    );
    assert!(
        get_key(store, &two).await.is_some(),
        "moved key survives the old lease"
    );
    revoke(store, second).await;
    assert_absent(store, &two, "the new lease took its key").await;
    assert!(get_key(store, &one).await.is_some());
}

// ---------------------------------------------------------------------------
// Watches

/// A watch from now sees every later change in order, with prev_kv.
pub async fn watch_live_from_now(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    put(store, &a, "before").await;
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    let r1 = put(store, &a, "1").await.revision;
    let r2 = put(store, &b, "1").await.revision;
    let r3 = store
        .delete(DeleteRequest::new(KeyRange::key(&a)))
        .await
        .expect("delete")
        .revision;
    let r4 = put(store, &a, "2").await.revision;
    let seen = events(&mut stream, Vec::new(), 4, "live watch").await;
    assert_eq!(
        shape(&seen),
        expect(&[
            (EventKind::Put, &a, "1"),
            (EventKind::Put, &b, "1"),
            (EventKind::Delete, &a, ""),
            (EventKind::Put, &a, "2"),
        ]),
        "live events (the write before the watch is not replayed)"
    );
    let revisions: Vec<Revision> = seen.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(
        revisions,
        vec![r1, r2, r3, r4],
        "event revisions are the write revisions"
    );
    assert_eq!(
        seen[0].prev_kv.as_ref().map(|p| p.value.as_slice()),
        Some(&b"before"[..])
    );
    assert_eq!(seen[1].prev_kv, None, "a created key has no prev_kv");
    assert_eq!(
        seen[2].prev_kv.as_ref().map(|p| p.value.as_slice()),
        Some(&b"1"[..])
    );
    assert_eq!(seen[3].prev_kv, None, "a re-created key has no prev_kv");
    assert_eq!((seen[3].kv.version, seen[3].kv.create_revision), (1, r4));
}

/// Four writes under `prefix` for the history cases; returns their revisions.
async fn write_history(store: &dyn Store, prefix: &str) -> [Revision; 4] {
    let (a, b) = (k(prefix, "a"), k(prefix, "b"));
    let r1 = put(store, &a, "1").await.revision;
    let r2 = put(store, &a, "2").await.revision;
    let r3 = store
        .delete(DeleteRequest::new(KeyRange::key(&a)))
        .await
        .expect("delete")
        .revision;
    let r4 = put(store, &b, "1").await.revision;
    [r1, r2, r3, r4]
}

/// A watch from an old revision replays history in order with prev_kv, then
/// continues live with neither gap nor duplicate.
pub async fn watch_replays_history(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    for attempt in 0..COMPACTION_RETRIES {
        let prefix = format!("{prefix}{attempt}/");
        let (a, b, c) = (k(&prefix, "a"), k(&prefix, "b"), k(&prefix, "c"));
        let revisions = write_history(store, &prefix).await;
        let Some((mut stream, first)) =
            watch_history(store, KeyRange::prefix(&prefix), revisions[0]).await
        else {
            continue; // compacted by a concurrent test: write fresh history
        };
        let seen = events(&mut stream, first, 4, "history replay").await;
        assert_eq!(
            shape(&seen[..4]),
            expect(&[
                (EventKind::Put, &a, "1"),
                (EventKind::Put, &a, "2"),
                (EventKind::Delete, &a, ""),
                (EventKind::Put, &b, "1"),
            ]),
            "replayed history"
        );
        let seen_revisions: Vec<Revision> = seen[..4].iter().map(|e| e.kv.mod_revision).collect();
        assert_eq!(seen_revisions, revisions.to_vec(), "replayed revisions");
        assert_eq!(seen[0].prev_kv, None);
        assert_eq!(
            seen[1].prev_kv.as_ref().map(|p| p.value.as_slice()),
            Some(&b"1"[..])
        );
        assert_eq!(
            seen[2]
                .prev_kv
                .as_ref()
                .map(|p| (p.value.as_slice(), p.version)),
            Some((&b"2"[..], 2))
        );
        let live = put(store, &c, "live").await.revision;
        let seen = events(&mut stream, seen, 5, "live after replay").await;
        assert_eq!(
            seen.len(),
            5,
            "no duplicate after the replay: {:?}",
            shape(&seen)
        );
        assert_eq!(
            (seen[4].kv.key.as_str(), seen[4].kv.mod_revision),
            (c.as_str(), live),
            "the first live event follows the replay"
        );
        assert_revisions_increase(&seen, "replay then live");
        return;
    }
    panic!("history was compacted concurrently {COMPACTION_RETRIES} times in a row");
}

/// A watch from a revision in the middle of the history starts exactly there.
pub async fn watch_from_middle_revision(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    for attempt in 0..COMPACTION_RETRIES {
        let prefix = format!("{prefix}{attempt}/");
        let (a, b) = (k(&prefix, "a"), k(&prefix, "b"));
        let revisions = write_history(store, &prefix).await;
        let Some((mut stream, first)) =
            watch_history(store, KeyRange::prefix(&prefix), revisions[1]).await
        else {
            continue;
        };
        let seen = events(&mut stream, first, 3, "replay from the middle").await;
        assert_eq!(
            shape(&seen),
            expect(&[
                (EventKind::Put, &a, "2"),
                (EventKind::Delete, &a, ""),
                (EventKind::Put, &b, "1")
            ]),
            "replay starts at the requested revision, inclusive"
        );
        assert_eq!(seen[0].kv.mod_revision, revisions[1]);
        assert_eq!(
            seen[0].prev_kv.as_ref().map(|p| p.value.as_slice()),
            Some(&b"1"[..]),
            "prev_kv from before the start revision"
        );
        return;
    }
    panic!("history was compacted concurrently {COMPACTION_RETRIES} times in a row");
}

/// A watch of prefix `a/` sees neither `a`, `a0` nor `ab/...`.
pub async fn watch_prefix_boundary(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let dir = k(prefix, "a/");
    let mut stream = watch(store, KeyRange::prefix(&dir), 0).await;
    for name in ["ab/x", "a", "a/x", "a0", "ab"] {
        put(store, &k(prefix, name), "1").await;
    }
    let marker = k(&dir, "zz-marker");
    put(store, &marker, "m").await;
    let seen = events_until(&mut stream, &marker, "prefix watch").await;
    assert_eq!(
        shape(&seen),
        expect(&[(EventKind::Put, &k(prefix, "a/x"), "1")]),
        "only keys under a/"
    );
}

/// A single-key watch sees only that key, not keys it is a prefix of.
pub async fn watch_single_key(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let key = k(prefix, "k");
    let mut stream = watch(store, KeyRange::key(&key), 0).await;
    put(store, &k(prefix, "kx"), "1").await;
    put(store, &key, "1").await;
    put(store, &k(prefix, "k/x"), "1").await;
    store
        .delete(DeleteRequest::new(KeyRange::key(&key)))
        .await
        .expect("delete");
    store
        .delete(DeleteRequest::new(KeyRange::key(&key)))
        .await
        .expect("delete again");
    put(store, &k(prefix, "j"), "1").await;
    put(store, &key, "2").await;
    let seen = events(&mut stream, Vec::new(), 3, "single-key watch").await;
    assert_eq!(
        shape(&seen),
        expect(&[
            (EventKind::Put, &key, "1"),
            (EventKind::Delete, &key, ""),
            (EventKind::Put, &key, "2")
        ]),
        "single-key watch"
    );
}

/// A delete event carries the key with an empty value, the delete's revision,
/// zero create revision, version and lease, and the previous key-value.
pub async fn watch_delete_event_shape(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let lease = grant(store).await;
    let key = k(prefix, "k");
    put_leased(store, &key, "1", lease).await;
    let last = put_leased(store, &key, "2", lease).await;
    let before = get_key(store, &key).await.expect("key");
    let mut stream = watch(store, KeyRange::prefix(prefix), 0).await;
    let deleted = store
        .delete(DeleteRequest::new(KeyRange::key(&key)))
        .await
        .expect("delete");
    let seen = events(&mut stream, Vec::new(), 1, "delete event").await;
    assert_eq!(
        seen[0],
        WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.clone(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: deleted.revision,
                version: 0,
                lease: 0,
            },
            prev_kv: Some(before.clone()),
        },
        "delete event shape"
    );
    assert_eq!(
        (before.mod_revision, before.version, before.lease),
        (last.revision, 2, lease)
    );
    revoke(store, lease).await;
}

/// Several watchers of overlapping ranges each get their own events.
pub async fn watch_multiple_watchers(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let sub = k(prefix, "sub/");
    let mut all = watch(store, KeyRange::prefix(prefix), 0).await;
    let mut all_too = watch(store, KeyRange::prefix(prefix), 0).await;
    let mut only_sub = watch(store, KeyRange::prefix(&sub), 0).await;
    let (x, y) = (k(prefix, "x"), k(&sub, "y"));
    put(store, &x, "1").await;
    put(store, &y, "1").await;
    put(store, &x, "2").await;
    let marker = k(&sub, "marker");
    put(store, &marker, "m").await;
    let expected = expect(&[
        (EventKind::Put, &x, "1"),
        (EventKind::Put, &y, "1"),
        (EventKind::Put, &x, "2"),
    ]);
    assert_eq!(
        shape(&events_until(&mut all, &marker, "first watcher").await),
        expected
    );
    assert_eq!(
        shape(&events_until(&mut all_too, &marker, "second watcher").await),
        expected
    );
    assert_eq!(
        shape(&events_until(&mut only_sub, &marker, "sub watcher").await),
        expect(&[(EventKind::Put, &y, "1")])
    );
}

// ---------------------------------------------------------------------------
// Compaction

fn is_compacted<T>(result: &Result<T, StoreError>, at_least: Revision) -> bool {
    matches!(result, Err(StoreError::Compacted { compact_revision, .. }) if *compact_revision >= at_least)
}

/// After compacting to `r`, watches from before `r` fail with `Compacted`
/// (from `watch` or as the first item), watches from `r` on replay, and
/// compacting to an older revision fails.
pub async fn watch_compacted(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    for attempt in 0..COMPACTION_RETRIES {
        let prefix = format!("{prefix}{attempt}/");
        let key = k(&prefix, "k");
        let r1 = put(store, &key, "1").await.revision;
        let r2 = put(store, &key, "2").await.revision;
        let r3 = put(store, &key, "3").await.revision;
        match bounded("compact", store.compact(r2)).await {
            Ok(()) => {}
            // On a shared etcd someone may already have compacted past r2.
            Err(StoreError::Compacted { .. }) => {}
            Err(e) => panic!("compact to {r2}: {e}"),
        }

        let what = format!("watch from compacted revision {r1}");
        match bounded(&what, store.watch(KeyRange::prefix(&prefix), r1)).await {
            Err(StoreError::Compacted {
                requested,
                compact_revision,
            }) => {
                assert_eq!(requested, r1, "{what}: requested revision in the error");
                assert!(
                    compact_revision >= r2,
                    "{what}: compact revision {compact_revision} < {r2}"
                );
            }
            Ok(mut stream) => {
                let first = bounded(&what, stream.next()).await;
                match first {
                    Some(result) => assert!(
                        is_compacted(&result, r2),
                        "{what}: expected Compacted, got {result:?}"
                    ),
                    None => panic!("{what}: stream ended without an error"),
                }
            }
            Err(e) => panic!("{what}: expected Compacted, got {e}"),
        }

        let older = bounded("compact", store.compact(r1)).await;
        assert!(
            matches!(older, Err(StoreError::Compacted { .. })),
            "compacting below the compaction point must fail with Compacted, got {older:?}"
        );

        let Some((mut stream, first)) = watch_history(store, KeyRange::prefix(&prefix), r2).await
        else {
            continue; // compacted further by a concurrent test
        };
        let seen = events(&mut stream, first, 2, "watch from the compaction point").await;
        assert_eq!(
            seen.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
            vec![r2, r3],
            "a watch from the compaction point replays from there"
        );
        // No assertion on seen[0].prev_kv: etcd reads it at r2 - 1, which is
        // compacted, and so omits it; the embedded store still has it.
        return;
    }
    panic!("history was compacted concurrently {COMPACTION_RETRIES} times in a row");
}

/// Compacting to a future revision fails with `FutureRevision`.
pub async fn compact_future_revision_rejected(store: Arc<dyn Store>, prefix: &str) {
    let store = &*store;
    let current = put(store, &k(prefix, "k"), "1").await.revision;
    let future = current + 1_000_000;
    match bounded("compact", store.compact(future)).await {
        Err(StoreError::FutureRevision {
            requested,
            current: now,
        }) => {
            assert_eq!(requested, future);
            assert!(
                now >= current && now < future,
                "reported current revision {now}"
            );
        }
        other => panic!("compact to a future revision: expected FutureRevision, got {other:?}"),
    }
}
