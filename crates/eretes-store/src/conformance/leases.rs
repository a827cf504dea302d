//! Leases: grant, keepalive, revoke, expiry, and keys attached to them.

use super::*;

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
