//! Reads: single keys, prefixes, spans, limits and counts.

use super::*;

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
