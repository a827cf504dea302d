//! `Coordinator::submit_batch`: all of a batch is written at one revision,
//! or none of it, and a refused batch says which task or what was wrong.

use eretes_protocol::*;
use eretes_store::StoreExt;
use serde_json::json;

mod common;
use common::*;

fn batch(prefix: &str, count: usize) -> Vec<(TaskId, TaskSpec)> {
    (0..count)
        .map(|n| {
            let id = TaskId::new(format!("{prefix}-{n:02}")).unwrap();
            (id, spec(json!({ "n": n })))
        })
        .collect()
}

#[tokio::test]
async fn a_full_batch_is_written_at_one_revision_as_submit_writes_each_task() {
    let (store, coordinator) = setup();
    let tasks = batch("b", MAX_SUBMIT_BATCH);
    let revision = coordinator.submit_batch(&tasks).await.unwrap();
    let stored = store.get_prefix("p/tasks/").await.unwrap().kvs;
    assert_eq!(stored.len(), MAX_SUBMIT_BATCH);
    assert!(stored.iter().all(|kv| kv.mod_revision == revision));
    // Each record is the one `submit` writes: its spec reads back.
    let snapshot = coordinator.snapshot().await.unwrap();
    let (id, spec) = &tasks[7];
    let task = &snapshot.tasks[id];
    assert_eq!(task.group, spec.group);
    assert_eq!(task.properties.value(), json!({ "n": 7 }));
    // And each id is taken, for a single submit as for another batch.
    assert_eq!(
        coordinator.submit(id, spec).await.unwrap_err(),
        ProtocolError::AlreadyExists(id.to_string())
    );
}

#[tokio::test]
async fn a_batch_naming_a_pending_or_retired_task_writes_nothing_and_names_it() {
    let (store, coordinator) = setup();
    let pending = TaskId::new("b-03").unwrap();
    coordinator
        .submit(&pending, &spec(json!({"kept": true})))
        .await
        .unwrap();
    let before = store.get_key("p/tasks/b-03").await.unwrap().unwrap();
    let error = coordinator.submit_batch(&batch("b", 10)).await.unwrap_err();
    assert_eq!(error, ProtocolError::AlreadyExists("b-03".into()));
    let stored = store.get_prefix("p/tasks/").await.unwrap().kvs;
    assert_eq!(stored, vec![before], "nothing of the batch was written");

    // A retired task (its result kept, its task record gone) counts too.
    let retired = TaskId::new("c-05").unwrap();
    coordinator
        .submit(&retired, &spec(json!({})))
        .await
        .unwrap();
    let claim = claim(&coordinator, &store, &retired, "a").await;
    coordinator.complete(&claim, json!("done")).await.unwrap();
    let error = coordinator.submit_batch(&batch("c", 8)).await.unwrap_err();
    assert_eq!(error, ProtocolError::AlreadyExists("c-05".into()));
    assert!(store.get_prefix("p/tasks/c-").await.unwrap().kvs.is_empty());
}

#[tokio::test]
async fn an_empty_oversized_or_repeating_batch_is_refused_before_any_write() {
    let (store, coordinator) = setup();
    let mut repeating = batch("r", 3);
    repeating.push(repeating[1].clone());
    let oversized_spec = {
        let mut tasks = batch("s", 2);
        tasks[1].1 = spec(json!({ "blob": "x".repeat(MAX_SPEC_BYTES) }));
        tasks
    };
    for (tasks, expected) in [
        (Vec::new(), "0 tasks; a batch holds 1 to 64"),
        (
            batch("o", MAX_SUBMIT_BATCH + 1),
            "65 tasks; a batch holds 1 to 64",
        ),
        (repeating, "task r-01 appears twice"),
        (oversized_spec, "spec is"),
    ] {
        let message = coordinator
            .submit_batch(&tasks)
            .await
            .unwrap_err()
            .to_string();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    assert!(store.get_prefix("p/").await.unwrap().kvs.is_empty());
}
