//! Puts and deletes: revisions, previous values, what a missing key costs.

use super::*;

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
