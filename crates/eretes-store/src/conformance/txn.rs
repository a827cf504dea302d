//! Transactions: every compare target and operator, both branches, atomicity.

use super::*;

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
