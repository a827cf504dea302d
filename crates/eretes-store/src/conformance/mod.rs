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

mod compaction;
mod leases;
mod reads;
mod txn;
mod watches;
mod writes;
pub use compaction::*;
pub use leases::*;
pub use reads::*;
pub use txn::*;
pub use watches::*;
pub use writes::*;

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
