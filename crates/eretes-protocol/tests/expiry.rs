//! Expiry of ended tasks on the embedded store: results found page by page
//! by when they ended, and deleted only while they are what was read.

use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::*;
use eretes_store::{PutRequest, Store, StoreExt};
use serde_json::json;

mod common;
use common::*;

/// Results per page here: small, so that a few hundred tasks span pages.
const PAGE: usize = 100;

/// Submit, claim and end `count` tasks named `<prefix>-NNN` as done.
async fn ended(
    coordinator: &Coordinator,
    store: &Arc<dyn Store>,
    prefix: &str,
    count: usize,
) -> Vec<TaskId> {
    let tasks = submitted(coordinator, store, prefix, count).await;
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
    let ends: Vec<(Claim, RunEnd)> = coordinator
        .claim_batch(&NodeName::new("a").unwrap(), lease, &tasks)
        .await
        .iter()
        .map(|outcome| (claimed(outcome).clone(), RunEnd::Done(json!("ok"))))
        .collect();
    assert!(coordinator.end_runs(&ends).await.iter().all(Result::is_ok));
    tasks.into_iter().map(|(id, _)| id).collect()
}

/// Every page of results that ended before `cutoff_ms`, and how many
/// pages it took.
async fn all_expired(coordinator: &Coordinator, cutoff_ms: u64) -> (Vec<Expired>, usize) {
    let (mut expired, mut pages, mut after) = (Vec::new(), 0, None::<String>);
    loop {
        let page = coordinator
            .ended_before(cutoff_ms, after.as_deref(), PAGE)
            .await
            .unwrap();
        pages += 1;
        expired.extend(page.expired);
        match page.next {
            Some(next) => after = Some(next),
            None => return (expired, pages),
        }
        assert!(pages < 100, "the pages never end");
    }
}

#[tokio::test]
async fn ended_tasks_are_found_page_by_page_by_when_they_ended_and_deleted() {
    let (store, coordinator) = setup();
    let before = now_ms();
    let ids = ended(&coordinator, &store, "t", PAGE * 2 + 10).await;
    // A running task has no result: never a candidate.
    let running = submitted(&coordinator, &store, "live", 1).await;
    claim(&coordinator, &store, &running[0].0, "a").await;

    let (none, _) = all_expired(&coordinator, before).await;
    assert!(none.is_empty(), "nothing ended before the cutoff");
    let (expired, pages) = all_expired(&coordinator, now_ms() + 1).await;
    assert_eq!(pages, 3, "pages of {PAGE}");
    let found: Vec<&str> = expired.iter().map(|e| e.id.as_str()).collect();
    let mut in_key_order: Vec<&str> = ids.iter().map(TaskId::as_str).collect();
    in_key_order.sort_unstable();
    assert!(found == in_key_order, "each ended task once, in key order");

    for expired in &expired {
        assert!(coordinator.delete_ended(expired).await.unwrap());
    }
    assert!(store.get_prefix("p/results/").await.unwrap().kvs.is_empty());
    for id in &ids {
        assert!(coordinator.task_view(id).await.unwrap().is_none());
    }
    // The running task is untouched, and ids that expired are free again.
    assert!(coordinator
        .task_view(&running[0].0)
        .await
        .unwrap()
        .is_some());
    coordinator.submit(&ids[0], &spec(json!(1))).await.unwrap();
}

#[tokio::test]
async fn a_task_removed_and_submitted_again_meanwhile_is_not_deleted() {
    let (store, coordinator) = setup();
    let ids = ended(&coordinator, &store, "again", 2).await;
    let (expired, _) = all_expired(&coordinator, now_ms() + 1).await;
    assert_eq!(expired.len(), 2);

    // The first is removed and submitted again (a live task under the id).
    coordinator.delete(&ids[0]).await.unwrap();
    coordinator
        .submit(&ids[0], &spec(json!("new")))
        .await
        .unwrap();
    // The second is removed, submitted again and ends again: a new result.
    coordinator.delete(&ids[1]).await.unwrap();
    coordinator
        .submit(&ids[1], &spec(json!("new")))
        .await
        .unwrap();
    let claim = claim(&coordinator, &store, &ids[1], "a").await;
    let ends = [(claim, RunEnd::Done(json!("second")))];
    assert!(coordinator.end_runs(&ends).await.iter().all(Result::is_ok));

    for expired in &expired {
        assert!(!coordinator.delete_ended(expired).await.unwrap());
    }
    let first = coordinator.task_view(&ids[0]).await.unwrap().unwrap();
    assert_eq!(first.state, TaskState::Pending);
    let second = coordinator.task_view(&ids[1]).await.unwrap().unwrap();
    assert_eq!(second.result, Some(json!("second")));
}

#[tokio::test]
async fn a_result_that_cannot_be_read_or_says_no_end_time_is_never_expired() {
    let (store, coordinator) = setup();
    ended(&coordinator, &store, "ok", 1).await;
    for (id, value) in [
        ("garbled", "{not json"),
        ("timeless", r#"{"outcome":"done"}"#),
    ] {
        store
            .put(PutRequest::new(format!("p/results/{id}"), value))
            .await
            .unwrap();
    }
    let (expired, _) = all_expired(&coordinator, u64::MAX).await;
    let found: Vec<&str> = expired.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(found, ["ok-000"]);
}
