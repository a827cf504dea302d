//! Review tests of group commit: the committer of writes that queued behind
//! a lone writer, when there is no tokio runtime (the store documents use
//! without one) or when the runtime has shut down; and a reopen right after
//! every write was answered.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::{PutRequest, Store};

const THREADS: usize = 8;
const WRITES_EACH: usize = 50;

/// Concurrent writers on plain threads, each driving its writes with
/// `drive`; `Err` says whether one panicked or one hangs (30 s).
fn concurrent_writes_finish(
    store: &Arc<EmbeddedStore>,
    drive: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>)
        + Send
        + Sync
        + Clone
        + 'static,
) -> Result<(), &'static str> {
    let (done, finished) = mpsc::channel();
    for thread in 0..THREADS {
        let (store, done, drive) = (store.clone(), done.clone(), drive.clone());
        std::thread::spawn(move || {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for n in 0..WRITES_EACH {
                    let store = store.clone();
                    drive(Box::pin(async move {
                        store
                            .put(PutRequest::new(format!("k/{thread}/{n}"), "v"))
                            .await
                            .unwrap();
                    }));
                }
            }))
            .is_ok();
            let _ = done.send(ok);
        });
    }
    drop(done);
    for _ in 0..THREADS {
        match finished.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => return Err("a writer panicked"),
            Err(_) => return Err("a writer hangs"),
        }
    }
    Ok(())
}

#[test]
fn concurrent_writes_without_a_tokio_runtime_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_durable(&dir.path().join("s.redb"), EmbeddedOptions::default())
        .unwrap();
    let outcome = concurrent_writes_finish(&store, |f| futures::executor::block_on(f));
    // And afterwards, one more write (alone) is answered.
    let (done, answered) = mpsc::channel();
    let later = store.clone();
    std::thread::spawn(move || {
        let put = futures::executor::block_on(later.put(PutRequest::new("later", "v")));
        let _ = done.send(put.is_ok());
    });
    let later = answered.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        (outcome, later),
        (Ok(()), Ok(true)),
        "(concurrent writes, a later lone write)"
    );
}

#[test]
fn concurrent_writes_after_the_runtime_shut_down_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_durable(&dir.path().join("s.redb"), EmbeddedOptions::default())
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handle = runtime.handle().clone();
    drop(runtime);
    concurrent_writes_finish(&store, move |f| handle.block_on(f)).unwrap();
}

#[test]
fn the_file_reopens_at_once_after_every_write_was_answered() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    for round in 0..200 {
        let store = EmbeddedStore::open_durable(&path, EmbeddedOptions::default())
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        runtime.block_on(async {
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..8 {
                let store = store.clone();
                writers.spawn(async move {
                    store
                        .put(PutRequest::new(format!("k/{w}"), "v"))
                        .await
                        .unwrap();
                });
            }
            while let Some(done) = writers.join_next().await {
                done.unwrap();
            }
        });
        drop(store);
    }
}
