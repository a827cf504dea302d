//! Group commit of the durable embedded store: concurrent writers share
//! journal transactions, and every write still gets its own revision and is
//! on disk when answered. (A group the journal refuses: its own test
//! binary, `group_commit_failure.rs`, as it limits the process's file
//! sizes.)

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::{GetRequest, KeyRange, PutRequest, Store};

const WRITERS: usize = 16;
const WRITES_EACH: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs_and_all_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open_durable(&path, EmbeddedOptions::default()).unwrap();
    let commits_before = store.journal_commits();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.spawn(async move {
            let mut revisions = Vec::new();
            for n in 0..WRITES_EACH {
                let put = PutRequest::new(format!("k/{writer}/{n}"), format!("{writer}.{n}"));
                revisions.push(store.put(put).await.unwrap().revision);
            }
            revisions
        });
    }
    let mut revisions = Vec::new();
    while let Some(done) = writers.join_next().await {
        revisions.extend(done.unwrap());
    }
    let writes = WRITERS * WRITES_EACH;
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), writes, "each write has its own revision");
    assert_eq!(
        revisions.last().unwrap() - revisions.first().unwrap() + 1,
        writes as i64,
        "and they follow each other"
    );
    let commits = store.journal_commits() - commits_before;
    println!("{writes} writes by {WRITERS} writers: {commits} journal commits");
    assert!(
        commits < writes as u64,
        "{commits} journal commits for {writes} concurrent writes: none shared"
    );
    drop(store);
    let reopened = EmbeddedStore::open_durable(&path, EmbeddedOptions::default()).unwrap();
    let got = reopened
        .get(GetRequest::new(KeyRange::prefix("k/")))
        .await
        .unwrap();
    assert_eq!(got.kvs.len(), writes, "every answered write is on disk");
    for kv in &got.kvs {
        let (writer, n) = kv.key["k/".len()..].split_once('/').unwrap();
        assert_eq!(kv.value, format!("{writer}.{n}").into_bytes());
    }
}
