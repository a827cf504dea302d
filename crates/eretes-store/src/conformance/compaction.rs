//! Compaction of the history.

use super::*;

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
