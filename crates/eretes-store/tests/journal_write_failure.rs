//! A durable store whose file cannot grow (RLIMIT_FSIZE, so its writes fail
//! with EFBIG as on a full disk): a write that fails is not applied and
//! nobody sees it, everything else goes on, and the store writes again by
//! itself once the file may grow, with exactly the acknowledged writes on
//! disk.
//!
//! The limit is the whole process's: this file is its own test binary and
//! holds one test, so no other test's files are limited.

use std::collections::BTreeMap;
use std::time::Duration;

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore, JOURNAL_REOPEN_INTERVAL};
use eretes_store::*;
use futures::StreamExt;

/// Set the soft file-size limit of this process.
fn limit_file_size(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a plain struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

/// The events of `watch` until one puts `last`, key by key.
async fn events_until(watch: &mut WatchStream, last: &str) -> Vec<(EventKind, String)> {
    let mut seen = Vec::new();
    while !seen.contains(&(EventKind::Put, last.to_string())) {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap_or_else(|_| panic!("no put of {last} within 10 s; saw {seen:?}"))
            .unwrap()
            .unwrap();
        seen.extend(batch.into_iter().map(|e| (e.kind, e.kv.key)));
    }
    seen
}

async fn everything(store: &EmbeddedStore) -> (Revision, BTreeMap<String, KeyValue>) {
    let all = store.get_prefix("").await.unwrap();
    let kvs = all.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    (all.revision, kvs)
}

#[tokio::test]
async fn a_failed_journal_write_is_dropped_and_the_store_recovers_by_itself() {
    // SAFETY: setting a signal's disposition to SIG_IGN is always sound.
    // Writes past the limit then fail with EFBIG instead of killing us.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open_durable(&path, EmbeddedOptions::default()).unwrap();
    for n in 1..=3 {
        store
            .put(PutRequest::new(format!("a/{n}"), format!("v{n}")))
            .await
            .unwrap();
    }
    let kept = store
        .lease_grant(Duration::from_secs(600))
        .await
        .unwrap()
        .id;
    store
        .put(PutRequest::new("leased/x", "x").with_lease(kept))
        .await
        .unwrap();
    let revoked = store
        .lease_grant(Duration::from_secs(600))
        .await
        .unwrap()
        .id;
    store
        .put(PutRequest::new("revoked/x", "x").with_lease(revoked))
        .await
        .unwrap();
    let mut everything_watch = store.watch(KeyRange::prefix(""), 0).await.unwrap();

    // The file may not grow any more: fill it until a write fails.
    limit_file_size(std::fs::metadata(&path).unwrap().len());
    let value = vec![b'f'; 8192];
    let mut acked = 0;
    let failure = loop {
        assert!(
            acked < 20_000,
            "20000 writes of 8 KiB did not grow the file"
        );
        match store
            .put(PutRequest::new(format!("fill/{acked:05}"), value.clone()))
            .await
        {
            Ok(_) => acked += 1,
            Err(error) => break error,
        }
    };
    let failed_key = format!("fill/{acked:05}");
    let revision = store.revision();
    match &failure {
        StoreError::Unavailable(why) => {
            assert!(why.contains(&path.display().to_string()), "{why}");
            assert!(why.contains("File too large"), "{why}");
            assert!(why.contains("not applied"), "{why}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let why = store.write_failure().expect("write_failure is set");
    assert!(why.contains("File too large"), "{why}");

    // Not applied: not there, no revision.
    assert_eq!(store.get_key(&failed_key).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), revision);
    // Every kind of write fails and is undone, lease bookkeeping included.
    let moved = store
        .put(PutRequest::new("a/2", "moved").with_lease(kept))
        .await;
    assert!(
        matches!(moved, Err(StoreError::Unavailable(_))),
        "{moved:?}"
    );
    let deleted = store
        .delete(DeleteRequest::new(KeyRange::key("leased/x")))
        .await;
    assert!(
        matches!(deleted, Err(StoreError::Unavailable(_))),
        "{deleted:?}"
    );
    let txn = Txn::new()
        .and_then(TxnOp::Put(PutRequest::new("a/4", "v4")))
        .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key("a/1"))));
    let txn = store.txn(txn).await;
    assert!(matches!(txn, Err(StoreError::Unavailable(_))), "{txn:?}");
    // Reads go on, and show none of it.
    let a = store.get_prefix("a/").await.unwrap();
    let a: Vec<(&str, &[u8], i64)> = a
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.lease))
        .collect();
    assert_eq!(
        a,
        [
            ("a/1", &b"v1"[..], 0),
            ("a/2", &b"v2"[..], 0),
            ("a/3", &b"v3"[..], 0)
        ]
    );
    assert_eq!(
        store.get_key("leased/x").await.unwrap().unwrap().lease,
        kept
    );
    assert_eq!(store.current_revision().await.unwrap(), revision);
    // So do watches and leases.
    let mut a_watch = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
    let fresh = store.lease_grant(Duration::from_secs(600)).await.unwrap();
    assert!(fresh.id > revoked);
    store.lease_keepalive(kept).await.unwrap();
    // A lease's deletions stand even though the file misses them.
    store.lease_revoke(revoked).await.unwrap();
    assert_eq!(store.get_key("revoked/x").await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), revision + 1);
    // After the reopen interval the store tries again, and fails again.
    tokio::time::sleep(JOURNAL_REOPEN_INTERVAL + Duration::from_millis(100)).await;
    let again = store.put(PutRequest::new(&failed_key, value.clone())).await;
    assert!(
        matches!(again, Err(StoreError::Unavailable(_))),
        "{again:?}"
    );
    assert!(store.write_failure().is_some());

    // Room again: the next write reopens the file and succeeds.
    limit_file_size(libc::RLIM_INFINITY);
    tokio::time::sleep(JOURNAL_REOPEN_INTERVAL + Duration::from_millis(100)).await;
    let put = store.put(PutRequest::new("a/5", "v5")).await.unwrap();
    assert_eq!(put.revision, revision + 2);
    assert_eq!(store.write_failure(), None);

    // Watches saw exactly what was applied.
    let seen = events_until(&mut everything_watch, "a/5").await;
    let mut expected: Vec<(EventKind, String)> = (0..acked)
        .map(|n| (EventKind::Put, format!("fill/{n:05}")))
        .collect();
    expected.push((EventKind::Delete, "revoked/x".to_string()));
    expected.push((EventKind::Put, "a/5".to_string()));
    assert_eq!(seen, expected);
    assert_eq!(
        events_until(&mut a_watch, "a/5").await,
        [(EventKind::Put, "a/5".to_string())]
    );
    // The failed move of a/2 left it off the lease: revoking the lease
    // deletes leased/x alone.
    store.lease_revoke(kept).await.unwrap();
    let (revision, before) = everything(&store).await;
    assert!(before.contains_key("a/2") && !before.contains_key("leased/x"));
    drop((everything_watch, a_watch));
    drop(store);

    // Reopened, the file holds exactly what was acknowledged, at the same
    // revision: no leased key was left in it for the reopen to delete (the
    // revoked lease's key went at the write that recovered).
    let store = EmbeddedStore::open_durable(&path, EmbeddedOptions::default()).unwrap();
    let (reopened_revision, after) = everything(&store).await;
    assert_eq!(reopened_revision, revision);
    assert_eq!(after, before);
    assert_eq!(after.len(), 3 + acked + 1, "a/1-3, the fill, a/5");
}
