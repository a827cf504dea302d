//! Group commit of the durable embedded store, when the journal refuses a
//! group (RLIMIT_FSIZE: the file cannot grow): every write of the group is
//! undone and answered with the error, none is visible, and what was
//! written before stays. The limit is the whole process's: this file is its
//! own test binary and holds one test.

use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::{GetRequest, KeyRange, PutRequest, Store, StoreError};

const WRITERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_the_journal_refuses_is_undone_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open_durable(&path, EmbeddedOptions::default()).unwrap();
    store.put(PutRequest::new("kept", "1")).await.unwrap();
    // The file may not grow: every write of the group fails.
    // The file may not grow any more: fill it until a write fails.
    let limit = std::fs::metadata(&path).unwrap().len();
    let big = vec![b'x'; 8192];
    let (revision, outcomes) = with_file_size_limit(limit, || async {
        let mut filled = 0;
        while store
            .put(PutRequest::new(format!("fill/{filled:05}"), big.clone()))
            .await
            .is_ok()
        {
            filled += 1;
            assert!(
                filled < 20_000,
                "20000 writes of 8 KiB did not grow the file"
            );
        }
        // Now a group of concurrent writers, while writes fail.
        let revision = store.revision();
        let mut writers = tokio::task::JoinSet::new();
        for n in 0..WRITERS {
            let (store, big) = (store.clone(), big.clone());
            writers.spawn(async move { store.put(PutRequest::new(format!("big/{n}"), big)).await });
        }
        let mut outcomes = Vec::new();
        while let Some(done) = writers.join_next().await {
            outcomes.push(done.unwrap());
        }
        (revision, outcomes)
    })
    .await;
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(message)) if message.contains("not applied")),
            "{outcome:?}"
        );
    }
    assert_eq!(store.revision(), revision, "no revision was made");
    // (The fill writes before the failure stand, as acknowledged.)
    let got = store
        .get(GetRequest::new(KeyRange::prefix("big/")))
        .await
        .unwrap();
    assert!(got.kvs.is_empty(), "nothing of the group is visible");
    let kept = store
        .get(GetRequest::new(KeyRange::key("kept")))
        .await
        .unwrap();
    assert_eq!(kept.kvs[0].value, b"1");
}

/// Run `body` with RLIMIT_FSIZE at `limit` bytes (SIGXFSZ ignored, so a
/// write past it fails with EFBIG instead of killing the test), then lift
/// it again.
async fn with_file_size_limit<F, Fut, T>(limit: u64, body: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    // SAFETY: plain syscalls on this process's own limits and signal
    // disposition.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::getrlimit(libc::RLIMIT_FSIZE, &mut old);
        let new = libc::rlimit {
            rlim_cur: limit,
            rlim_max: old.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_FSIZE, &new);
    }
    let outcome = body().await;
    unsafe {
        libc::setrlimit(libc::RLIMIT_FSIZE, &old);
    }
    outcome
}
