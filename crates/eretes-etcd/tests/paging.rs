//! A prefix read larger than one page (`READ_PAGE_KEYS`) is made in pages
//! on a real etcd, and still answers as one read at one revision: every
//! key of the range once, in order, none written after the snapshot, even
//! while the range is being written to; `limit`, `count` and `more` as a
//! single read gives them; nothing past the prefix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use eretes_etcd::testing::connect_test_etcd;
use eretes_etcd::READ_PAGE_KEYS;
use eretes_store::{DeleteRequest, GetRequest, KeyRange, PutRequest, Store, Txn, TxnOp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_prefix_read_is_one_snapshot_made_in_pages() {
    let store = connect_test_etcd().await;
    let prefix = format!("paging-{}/", std::process::id());
    let keys = READ_PAGE_KEYS * 2 + 500;
    let key = {
        let prefix = prefix.clone();
        move |n: usize| format!("{prefix}k{n:06}")
    };
    for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
        let mut txn = Txn::new();
        for &n in chunk {
            txn = txn.and_then(TxnOp::Put(PutRequest::new(key(n), "v0")));
        }
        store.txn(txn).await.unwrap();
    }
    // Just past the prefix's range: never part of the answer.
    let neighbour = format!("paging-{}0", std::process::id());
    store
        .put(PutRequest::new(neighbour.clone(), "x"))
        .await
        .unwrap();

    // Writers keep changing the range while it is read: a page read at a
    // later revision than the first would show their writes.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing) = (store.clone(), writing.clone());
        let key = key.clone();
        tokio::spawn(async move {
            let mut round = 0usize;
            while writing.load(Ordering::Relaxed) && round < 10_000 {
                let n = (round * 7919) % keys;
                let _ = store
                    .put(PutRequest::new(key(n), format!("v{round}")))
                    .await;
                round += 1;
            }
        })
    };
    for _ in 0..3 {
        let all = store
            .get(GetRequest::new(KeyRange::prefix(&prefix)))
            .await
            .unwrap();
        assert_eq!(all.kvs.len(), keys);
        assert_eq!(all.count, keys);
        assert!(!all.more);
        let expected: Vec<String> = (0..keys).map(&key).collect();
        let got: Vec<&str> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(got, expected, "every key once, in order");
        let newest = all.kvs.iter().map(|kv| kv.mod_revision).max().unwrap();
        assert!(
            newest <= all.revision,
            "a key written at {newest} is in a snapshot of revision {}",
            all.revision
        );
    }
    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();

    // A limit above one page: that many, and `more`.
    let limited = store
        .get(GetRequest::new(KeyRange::prefix(&prefix)).with_limit(READ_PAGE_KEYS + 1))
        .await
        .unwrap();
    assert_eq!(limited.kvs.len(), READ_PAGE_KEYS + 1);
    assert_eq!(limited.kvs.last().unwrap().key, key(READ_PAGE_KEYS));
    assert!(limited.more);
    assert_eq!(limited.count, keys);
    // A count alone is one request, and agrees.
    let counted = store
        .get(GetRequest::new(KeyRange::prefix(&prefix)).count_only())
        .await
        .unwrap();
    assert_eq!(counted.count, keys);

    store
        .delete(DeleteRequest::new(KeyRange::prefix(&prefix)))
        .await
        .unwrap();
    store
        .delete(DeleteRequest::new(KeyRange::key(neighbour)))
        .await
        .unwrap();
}
