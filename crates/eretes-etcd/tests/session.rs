//! The session layer against an etcd of the test's own, which it kills and
//! restarts on the same data directory: watches resume without losing or
//! repeating an event, and leases that outlive the outage keep renewing.

use std::time::Duration;

use eretes_etcd::testing::LocalEtcd;
use eretes_etcd::{EtcdOptions, EtcdStore};
use eretes_store::{KeyRange, PutRequest, Store, StoreError, WatchEvent};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(20);

async fn next_events(stream: &mut eretes_store::WatchStream, what: &str) -> Vec<WatchEvent> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("{what}: expected a batch, got {other:?}"),
    }
}

/// Retry `call` while etcd is still coming back (`Unavailable`), for up to
/// 10 s; any other error fails the test.
async fn once_available<T, F>(what: &str, mut call: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    for _ in 0..50 {
        match call().await {
            Ok(value) => return value,
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: etcd still unavailable after 10 s")
}

async fn connect(etcd: &LocalEtcd) -> EtcdStore {
    let options = EtcdOptions::from_urls(&etcd.url())
        .unwrap()
        .with_request_timeout(Duration::from_secs(2));
    EtcdStore::connect(options).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_an_etcd_restart_without_loss_or_repeats() {
    let mut etcd = LocalEtcd::start().await;
    let store = connect(&etcd).await;
    let mut watch = store.watch(KeyRange::prefix("w/"), 0).await.expect("watch");
    let first = store.put(PutRequest::new("w/1", "a")).await.unwrap();
    let seen = next_events(&mut watch, "before the restart").await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].kv.mod_revision, first.revision);

    etcd.stop();
    // Calls during the outage fail within the request timeout, as
    // Unavailable, rather than hanging.
    let during = store.put(PutRequest::new("w/lost", "x")).await;
    assert!(
        matches!(during, Err(StoreError::Unavailable(_))),
        "a put while etcd is down: {during:?}"
    );
    etcd.resume().await;

    // The same store (and the same watch stream) carry on.
    let second = once_available("put after the restart", || {
        store.put(PutRequest::new("w/2", "b"))
    })
    .await;
    let seen = next_events(&mut watch, "after the restart").await;
    let revisions: Vec<_> = seen.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(
        revisions,
        vec![second.revision],
        "exactly the write made after the restart, once"
    );
    assert_eq!(seen[0].kv.key, "w/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_renewing_across_a_short_outage_and_ttl_zero_is_lease_loss() {
    let mut etcd = LocalEtcd::start().await;
    let store = connect(&etcd).await;
    let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
    assert!(store.lease_keepalive(lease.id).await.unwrap() > Duration::ZERO);

    etcd.stop();
    let during = store.lease_keepalive(lease.id).await;
    assert!(
        matches!(during, Err(StoreError::Unavailable(_))),
        "a keepalive while etcd is down: {during:?}"
    );
    etcd.resume().await;
    let renewed = once_available("keepalive after the restart", || {
        store.lease_keepalive(lease.id)
    })
    .await;
    assert!(
        renewed > Duration::ZERO,
        "the broken keepalive stream was reopened"
    );

    store.lease_revoke(lease.id).await.unwrap();
    // etcd answers a keepalive of a revoked lease with TTL 0: lease loss.
    assert_eq!(
        store.lease_keepalive(lease.id).await,
        Err(StoreError::LeaseNotFound(lease.id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_fails_connect_with_the_address() {
    let port = eretes_etcd::testing::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let options = EtcdOptions::from_urls(&url)
        .unwrap()
        .with_request_timeout(Duration::from_secs(1));
    let error = EtcdStore::connect(options).await.unwrap_err().to_string();
    assert!(error.contains(&url), "{error}");
}

/// A listing larger than gRPC's default 4 MiB message limit (what ~13,000
/// tasks or a few huge values written with etcdctl reach) still arrives, and
/// so does a watch batch that large: a node that cannot list its namespace
/// could never claim again.
#[tokio::test]
async fn listings_and_watch_batches_past_four_mib_arrive_whole() {
    let store = eretes_etcd::testing::connect_test_etcd().await;
    let prefix = format!("big-{:08x}/", rand::random::<u32>());
    let revision = eretes_store::StoreExt::current_revision(&store)
        .await
        .unwrap();
    let value = vec![b'x'; 1 << 20];
    for n in 0..6 {
        store
            .put(PutRequest::new(format!("{prefix}{n}"), value.clone()))
            .await
            .unwrap();
    }
    let listing = eretes_store::StoreExt::get_prefix(&store, &prefix)
        .await
        .unwrap();
    assert_eq!(listing.kvs.len(), 6);
    assert!(listing.kvs.iter().all(|kv| kv.value.len() == 1 << 20));
    // Replayed from before the puts, the history arrives as large batches.
    let mut watch = store
        .watch(KeyRange::prefix(prefix.clone()), revision + 1)
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch delivers within 10 s")
            .expect("the watch stream stays open")
            .unwrap();
        seen += batch.len();
    }
    assert_eq!(seen, 6);
    store
        .delete(eretes_store::DeleteRequest::new(KeyRange::prefix(prefix)))
        .await
        .unwrap();
}
