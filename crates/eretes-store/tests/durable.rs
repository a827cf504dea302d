//! The durable embedded store (`EmbeddedStore::open_durable`): the whole
//! conformance suite on it, then what only durability adds — a reopened
//! store has the keys and revision it had, leases do not survive, older
//! history reads as compacted, a file is open in one store at a time, and
//! every write a writer process was told about survives its `kill -9`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::*;
use futures::StreamExt;

/// A durable store on a file nobody else can see: the file is unlinked once
/// open (the store keeps its descriptor), so tests leave nothing behind.
fn durable() -> Arc<EmbeddedStore> {
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open_durable(&dir.path().join("store.redb"), EmbeddedOptions::default()).unwrap()
}

fn open(path: &Path) -> Arc<EmbeddedStore> {
    EmbeddedStore::open_durable(path, EmbeddedOptions::default()).unwrap()
}

eretes_store::conformance_tests! {
    store: durable(),
    attr: #[tokio::test(start_paused = true)]
}

#[tokio::test]
async fn a_reopened_store_has_its_keys_revisions_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = open(&path);
    store.put(PutRequest::new("a/1", "one")).await.unwrap();
    store.put(PutRequest::new("a/1", "uno")).await.unwrap();
    store.put(PutRequest::new("a/2", "two")).await.unwrap();
    store.put(PutRequest::new("a/3", "three")).await.unwrap();
    store
        .delete(DeleteRequest::new(KeyRange::key("a/3")))
        .await
        .unwrap();
    let txn = Txn::new()
        .when(Compare::absent("a/4"))
        .and_then(TxnOp::Put(PutRequest::new("a/4", "four")))
        .and_then(TxnOp::Put(PutRequest::new("a/5", vec![0u8, 255, 7])));
    assert!(store.txn(txn).await.unwrap().succeeded);
    let before = store.get_prefix("a/").await.unwrap();
    drop(store);

    let store = open(&path);
    let after = store.get_prefix("a/").await.unwrap();
    assert_eq!(
        after.kvs, before.kvs,
        "keys, values, revisions and versions"
    );
    assert_eq!(after.revision, before.revision);
    let put = store.put(PutRequest::new("a/6", "six")).await.unwrap();
    assert_eq!(put.revision, before.revision + 1, "revisions go on");
}

#[tokio::test]
async fn leased_keys_do_not_survive_a_reopen_and_go_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = open(&path);
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
    for key in ["owners/1", "owners/2", "nodes/n1"] {
        store
            .put(PutRequest::new(key, "x").with_lease(lease))
            .await
            .unwrap();
    }
    store.put(PutRequest::new("tasks/1", "t")).await.unwrap();
    let revision = store.current_revision().await.unwrap();
    drop(store);

    let store = open(&path);
    assert_eq!(store.current_revision().await.unwrap(), revision + 1);
    let all = store.get_prefix("").await.unwrap();
    let keys: Vec<&str> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["tasks/1"]);
    // The clean-up is the first revision a watch can start from, and it is
    // one revision with every deletion.
    let mut watch = store
        .watch(KeyRange::prefix(""), revision + 1)
        .await
        .unwrap();
    let batch = watch.next().await.unwrap().unwrap();
    assert_eq!(batch.len(), 3);
    assert!(batch
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == revision + 1));
    // A lease granted now is a new one.
    let fresh = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    assert!(
        fresh > lease,
        "lease ids are not reused: {fresh} after {lease}"
    );
}

#[tokio::test]
async fn a_new_file_keeps_its_whole_history_watchable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store.redb"));
    store.put(PutRequest::new("k", "1")).await.unwrap();
    let mut watch = store.watch(KeyRange::key("k"), 1).await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap()[0].kv.value, b"1");
}

#[tokio::test]
async fn history_from_before_a_reopen_reads_as_compacted_and_live_watches_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = open(&path);
    store.put(PutRequest::new("k", "1")).await.unwrap();
    let revision = store.current_revision().await.unwrap();
    drop(store);

    let store = open(&path);
    match store.watch(KeyRange::key("k"), revision).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            assert_eq!(requested, revision);
            assert_eq!(compact_revision, revision + 1);
        }
        other => panic!("expected Compacted, got {:?}", other.map(|_| "a stream")),
    }
    let mut watch = store.watch(KeyRange::key("k"), 0).await.unwrap();
    store.put(PutRequest::new("k", "2")).await.unwrap();
    let batch = watch.next().await.unwrap().unwrap();
    assert_eq!(batch[0].kv.value, b"2");
    assert_eq!(batch[0].prev_kv.as_ref().unwrap().value, b"1");
}

#[tokio::test]
async fn a_file_is_open_in_one_store_at_a_time_and_garbage_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _store = open(&path);
    let second = EmbeddedStore::open_durable(&path, EmbeddedOptions::default());
    match second {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains(&path.display().to_string()), "{why}");
            assert!(why.contains("already open"), "{why}");
        }
        other => panic!("a second open succeeded: {:?}", other.map(|_| "store")),
    }

    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
    match EmbeddedStore::open_durable(&garbage, EmbeddedOptions::default()) {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains("garbage.redb"), "{why}");
        }
        other => panic!("a garbage file opened: {:?}", other.map(|_| "store")),
    }
    assert_eq!(
        std::fs::read(&garbage).unwrap(),
        vec![b'x'; 8192],
        "the refused file is left as it was"
    );
}

/// The environment variable that turns [`writer_process`] on.
const WRITER_FILE: &str = "ERETES_DURABLE_WRITER_FILE";

/// Not a test on its own: the child process of the kill test. It writes
/// keys one by one and prints each one's number once its put returned.
#[tokio::test]
#[ignore = "the kill test's child process"]
async fn writer_process() {
    let Ok(path) = std::env::var(WRITER_FILE) else {
        return;
    };
    let store = open(Path::new(&path));
    for n in 0..100_000u32 {
        store
            .put(PutRequest::new(format!("k/{n:06}"), n.to_string()))
            .await
            .unwrap();
        println!("acked {n}");
    }
}

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9_of_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_process", "--ignored", "--nocapture"])
        .env(WRITER_FILE, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            let n: u32 = n.parse().unwrap();
            acked = Some(n);
            if n >= 200 {
                child.kill().unwrap(); // SIGKILL, mid-stream
                break;
            }
        }
    }
    child.wait().unwrap();
    let acked = acked.expect("the writer acknowledged writes");

    let store = open(&path);
    let keys = store.get_prefix("k/").await.unwrap();
    assert!(
        keys.kvs.len() as u32 > acked,
        "{} keys survived, but {} were acknowledged",
        keys.kvs.len(),
        acked + 1
    );
    for (n, kv) in keys.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("k/{n:06}"), "no gap");
        assert_eq!(kv.value, n.to_string().into_bytes());
    }
}
