//! Watches: live and replayed events, ranges, several watchers, compaction.

use super::*;

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
