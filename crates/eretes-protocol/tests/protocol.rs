//! The protocol's transactions on the embedded store: validation, no
//! overwrites, fencing by epoch, takeover counting, namespace isolation.

use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::*;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{PutRequest, Store, StoreExt};
use serde_json::json;

mod common;
use common::*;

#[tokio::test]
async fn an_oversized_spec_is_refused_with_its_size_and_nothing_is_written() {
    let (store, coordinator) = setup();
    let id = TaskId::new("big").unwrap();
    let error = coordinator
        .submit(&id, &spec(json!({ "blob": "x".repeat(MAX_SPEC_BYTES) })))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("spec is") && message.contains("65536"),
        "{message}"
    );
    assert!(store.get_prefix("p/").await.unwrap().kvs.is_empty());
    // Just under the limit is fine.
    let fits = json!({ "blob": "x".repeat(MAX_SPEC_BYTES - 200) });
    coordinator.submit(&id, &spec(fits)).await.unwrap();
}

#[tokio::test]
async fn resubmitting_an_id_fails_and_overwrites_nothing() {
    let (store, coordinator) = setup();
    let id = TaskId::new("once").unwrap();
    coordinator
        .submit(&id, &spec(json!({"v": 1})))
        .await
        .unwrap();
    let before = store.get_key("p/tasks/once").await.unwrap().unwrap();
    let error = coordinator
        .submit(&id, &spec(json!({"v": 2})))
        .await
        .unwrap_err();
    assert_eq!(error, ProtocolError::AlreadyExists("once".into()));
    assert_eq!(
        store.get_key("p/tasks/once").await.unwrap().unwrap(),
        before
    );
}

#[tokio::test]
async fn a_stale_owner_cannot_complete_release_or_overwrite() {
    let (store, coordinator) = setup();
    let id = TaskId::new("t").unwrap();
    coordinator.submit(&id, &spec(json!({}))).await.unwrap();
    let first = claim(&coordinator, &store, &id, "a").await;
    // a dies: its lease goes; b takes over at a higher epoch.
    store
        .lease_revoke(store.get_key("p/owners/t").await.unwrap().unwrap().lease)
        .await
        .unwrap();
    let second = claim(&coordinator, &store, &id, "b").await;
    assert!(second.epoch > first.epoch);
    assert_eq!(second.run.takeovers, 1, "a never released: a takeover");
    for error in [
        coordinator
            .complete(&first, json!("stale"))
            .await
            .unwrap_err(),
        coordinator.release(&first).await.unwrap_err(),
        coordinator.fail(&first, "stale".into()).await.unwrap_err(),
    ] {
        assert!(matches!(error, ProtocolError::NotOwner { .. }), "{error}");
    }
    assert!(coordinator.result(&id).await.unwrap().is_none());
    coordinator.complete(&second, json!("fresh")).await.unwrap();
    let result = coordinator.result(&id).await.unwrap().unwrap();
    assert_eq!(
        (result.outcome, result.result, result.epoch),
        (Outcome::Done, json!("fresh"), second.epoch)
    );
    assert!(
        store.get_key("p/tasks/t").await.unwrap().is_none(),
        "retired with its result"
    );
}

#[tokio::test]
async fn a_clean_release_is_not_a_takeover() {
    let (store, coordinator) = setup();
    let id = TaskId::new("t").unwrap();
    coordinator.submit(&id, &spec(json!({}))).await.unwrap();
    let first = claim(&coordinator, &store, &id, "a").await;
    coordinator.release(&first).await.unwrap();
    let second = claim(&coordinator, &store, &id, "b").await;
    assert_eq!((second.run.claims, second.run.takeovers), (2, 0));
}

#[tokio::test]
async fn delete_stays_inside_its_task_and_namespace() {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let p = Coordinator::new(store.clone(), Namespace::new("p").unwrap());
    let pq = Coordinator::new(store.clone(), Namespace::new("pq").unwrap());
    for id in ["a", "ab"] {
        p.submit(&TaskId::new(id).unwrap(), &spec(json!({})))
            .await
            .unwrap();
        pq.submit(&TaskId::new(id).unwrap(), &spec(json!({})))
            .await
            .unwrap();
    }
    store.put(PutRequest::new("p-other", "keep")).await.unwrap();
    p.delete(&TaskId::new("a").unwrap()).await.unwrap();
    let keys: Vec<String> = store
        .get(eretes_store::GetRequest::new(
            eretes_store::KeyRange::prefix(""),
        ))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["p-other", "p/tasks/ab", "pq/tasks/a", "pq/tasks/ab"]);
    let missing = p.delete(&TaskId::new("a").unwrap()).await.unwrap_err();
    assert_eq!(missing, ProtocolError::NotFound("a".into()));
}

#[tokio::test]
async fn a_name_held_by_a_record_without_a_lease_says_so_and_is_no_live_node() {
    let (store, coordinator) = setup();
    let name = NodeName::new("ghost").unwrap();
    let record = NodeRecord {
        groups: vec![GroupName::default()],
        started_at_ms: 1,
        max_running: None,
        slots: Default::default(),
    };
    store
        .put(eretes_store::PutRequest::new(
            "p/nodes/ghost",
            eretes_protocol::encode(&record),
        ))
        .await
        .unwrap();
    assert!(!coordinator.node_is_live(&name).await.unwrap());
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let error = coordinator
        .register_node(&name, &record, lease)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ProtocolError::NameHeldByGhost { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("without a lease"), "{error}");
    assert!(coordinator.snapshot().await.unwrap().nodes.is_empty());
}

#[tokio::test]
async fn node_names_are_unique_among_live_nodes() {
    let (store, coordinator) = setup();
    let name = NodeName::new("n").unwrap();
    let record = NodeRecord {
        groups: vec![GroupName::default()],
        started_at_ms: 0,
        max_running: None,
        slots: Default::default(),
    };
    let first = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    coordinator
        .register_node(&name, &record, first)
        .await
        .unwrap();
    let second = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let error = coordinator
        .register_node(&name, &record, second)
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ProtocolError::NameTaken {
            name: "n".into(),
            lease: first
        }
    );
    assert!(error.to_string().contains("already taken"));
    store.lease_revoke(first).await.unwrap();
    coordinator
        .register_node(&name, &record, second)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_oversized_result_retires_the_task_as_failed_with_the_reason() {
    let (store, coordinator) = setup();
    let id = TaskId::new("t").unwrap();
    coordinator.submit(&id, &spec(json!({}))).await.unwrap();
    let claim = claim(&coordinator, &store, &id, "a").await;
    coordinator
        .complete(&claim, json!("x".repeat(MAX_RESULT_BYTES)))
        .await
        .unwrap();
    let result = coordinator.result(&id).await.unwrap().unwrap();
    assert_eq!(result.outcome, Outcome::Failed);
    assert!(result.error.unwrap().contains("the limit is 65536 bytes"));
}

#[tokio::test]
async fn a_garbage_result_is_reported_as_malformed() {
    let (store, coordinator) = setup();
    store
        .put(PutRequest::new("p/results/g", "nope"))
        .await
        .unwrap();
    let error = coordinator
        .result(&TaskId::new("g").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(error, ProtocolError::Malformed(_)), "{error}");
    assert!(error.to_string().contains("p/results/g"), "{error}");
}

/// Submit `count` tasks named `<prefix>-<n>` and return their ids with what a
/// claimant sees of them.
#[tokio::test]
async fn a_batch_claims_every_task_in_one_revision_and_splits_past_the_limit() {
    let (store, coordinator) = setup();
    let tasks = submitted(&coordinator, &store, "b", MAX_CLAIM_BATCH + 3).await;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let node = NodeName::new("a").unwrap();
    let before = store.current_revision().await.unwrap();
    let outcomes = coordinator.claim_batch(&node, lease, &tasks).await;
    assert_eq!(outcomes.len(), tasks.len());
    // One transaction for the first MAX_CLAIM_BATCH, one for the rest.
    let first = claimed(&outcomes[0]).epoch;
    let last = claimed(&outcomes[MAX_CLAIM_BATCH]).epoch;
    assert_eq!((first, last), (before + 1, before + 2));
    for (n, ((id, _), outcome)) in tasks.iter().zip(&outcomes).enumerate() {
        let claim = claimed(outcome);
        assert_eq!(&claim.task, id, "outcomes are in input order");
        assert_eq!(claim.epoch, if n < MAX_CLAIM_BATCH { first } else { last });
        // The basis holds no record: the claim read each task's own.
        assert_eq!(claim.record.spec.properties, json!(n), "task {id}");
        let owner = store
            .get_key(&coordinator.namespace().owner(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((owner.create_revision, owner.lease), (claim.epoch, lease));
    }
}

#[tokio::test]
async fn a_contested_task_in_a_batch_does_not_cost_the_others_their_claim() {
    let (store, coordinator) = setup();
    let tasks = submitted(&coordinator, &store, "c", 5).await;
    // Node b claims the third task first.
    let theirs = claim(&coordinator, &store, &tasks[2].0, "b").await;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let outcomes = coordinator
        .claim_batch(&NodeName::new("a").unwrap(), lease, &tasks)
        .await;
    for (n, outcome) in outcomes.iter().enumerate() {
        if n == 2 {
            match outcome {
                Ok(ClaimOutcome::Lost(keys)) => {
                    let owner = keys.owner.as_ref().expect("the owner record is read back");
                    assert_eq!(owner.create_revision, theirs.epoch);
                }
                other => panic!("the contested task must be lost, got {other:?}"),
            }
        } else {
            assert_eq!(claimed(outcome).node.as_str(), "a");
        }
    }
    // The failed transaction read every task back, and the four still
    // claimable went again together: one epoch (one per task before).
    let epochs: std::collections::BTreeSet<_> = [0, 1, 3, 4]
        .iter()
        .map(|&n| claimed(&outcomes[n]).epoch)
        .collect();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
}

#[tokio::test]
async fn a_batch_with_a_task_past_the_takeover_limit_parks_it_and_claims_the_rest() {
    let (store, coordinator) = setup();
    let coordinator = coordinator.with_takeover_limit(0);
    let tasks = submitted(&coordinator, &store, "p", 3).await;
    // Task 0 was running when its owner died: the next claim is a takeover.
    let doomed = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let first = coordinator
        .claim(
            &NodeName::new("x").unwrap(),
            doomed,
            &tasks[0].0,
            &tasks[0].1,
        )
        .await
        .unwrap();
    assert!(matches!(first, ClaimOutcome::Claimed(_)));
    store.lease_revoke(doomed).await.unwrap();
    let fresh = basis(&coordinator, &store, &tasks[0].0).await;
    let mut batch = tasks.clone();
    batch[0].1 = fresh;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let outcomes = coordinator
        .claim_batch(&NodeName::new("a").unwrap(), lease, &batch)
        .await;
    assert_eq!(
        outcomes[0],
        Ok(ClaimOutcome::Parked { takeovers: 1 }),
        "over the limit of 0"
    );
    claimed(&outcomes[1]);
    claimed(&outcomes[2]);
    let result = coordinator.result(&tasks[0].0).await.unwrap().unwrap();
    assert_eq!(result.outcome, Outcome::Failed);
    // Its result keeps the spec, read by the claim that parked it.
    assert_eq!(result.spec.properties, json!(0));
    assert_eq!(claimed(&outcomes[2]).record.spec.properties, json!(2));
}

#[tokio::test]
async fn a_claim_whose_record_cannot_be_read_is_undone_and_says_why() {
    let (store, coordinator) = setup();
    let id = TaskId::new("garbled").unwrap();
    let key = coordinator.namespace().task(&id);
    // Garbage under a task key (written around the protocol), and a basis
    // made by hand that does not know it.
    let put = store
        .put(PutRequest::new(key.clone(), "{not json"))
        .await
        .unwrap();
    let basis = ClaimBasis {
        group: GroupName::default(),
        task_revision: put.revision,
        run_revision: 0,
        run: Default::default(),
    };
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let node = NodeName::new("a").unwrap();
    let outcome = coordinator.claim(&node, lease, &id, &basis).await;
    match outcome {
        Err(ProtocolError::Malformed(value)) => assert_eq!(value.key, key),
        other => panic!("expected the record named as malformed, got {other:?}"),
    }
    // No owner or run record is left behind, and the garbage is untouched.
    let ns = coordinator.namespace();
    assert!(store.get_key(&ns.owner(&id)).await.unwrap().is_none());
    assert!(store.get_key(&ns.run(&id)).await.unwrap().is_none());
    let kv = store.get_key(&key).await.unwrap().unwrap();
    assert_eq!(kv.value, b"{not json");
}

#[tokio::test]
async fn ending_runs_in_a_batch_fences_each_run_by_its_own_epoch() {
    let (store, coordinator) = setup();
    let tasks = submitted(&coordinator, &store, "e", 4).await;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let node = NodeName::new("a").unwrap();
    let claims: Vec<Claim> = coordinator
        .claim_batch(&node, lease, &tasks)
        .await
        .iter()
        .map(|outcome| claimed(outcome).clone())
        .collect();
    // Task 1 is deleted and resubmitted: this node's claim on it is stale.
    coordinator.delete(&tasks[1].0).await.unwrap();
    coordinator
        .submit(&tasks[1].0, &spec(json!("again")))
        .await
        .unwrap();
    let ends = vec![
        (claims[0].clone(), RunEnd::Done(json!("zero"))),
        (claims[1].clone(), RunEnd::Done(json!("stale"))),
        (claims[2].clone(), RunEnd::Failed("broke".into())),
        (claims[3].clone(), RunEnd::Released),
    ];
    let results = coordinator.end_runs(&ends).await;
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(ProtocolError::NotOwner { .. })));
    assert_eq!((results[2].clone(), results[3].clone()), (Ok(()), Ok(())));
    let done = coordinator.result(&tasks[0].0).await.unwrap().unwrap();
    assert_eq!((done.outcome, done.result), (Outcome::Done, json!("zero")));
    let failed = coordinator.result(&tasks[2].0).await.unwrap().unwrap();
    assert_eq!(failed.error.as_deref(), Some("broke"));
    // The stale run wrote nothing: the resubmitted task is untouched.
    assert_eq!(coordinator.result(&tasks[1].0).await.unwrap(), None);
    let ns = coordinator.namespace();
    assert!(store
        .get_key(&ns.task(&tasks[1].0))
        .await
        .unwrap()
        .is_some());
    // The released task is pending again, with no owner.
    assert!(store
        .get_key(&ns.task(&tasks[3].0))
        .await
        .unwrap()
        .is_some());
    assert!(store
        .get_key(&ns.owner(&tasks[3].0))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_batch_end_with_fenced_runs_costs_one_more_transaction_not_one_per_run() {
    let inner: Arc<dyn Store> = EmbeddedStore::new();
    let counting = Arc::new(eretes_store::counting::CountingStore::new(inner));
    let store: Arc<dyn Store> = counting.clone();
    let coordinator = Coordinator::new(store.clone(), Namespace::new("p").unwrap());
    let tasks = submitted(&coordinator, &store, "f", MAX_FINISH_BATCH).await;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let claims: Vec<Claim> = coordinator
        .claim_batch(&NodeName::new("a").unwrap(), lease, &tasks)
        .await
        .iter()
        .map(|outcome| claimed(outcome).clone())
        .collect();
    // Every third run is fenced: its task was deleted under it.
    let fenced: Vec<usize> = (0..MAX_FINISH_BATCH).step_by(3).collect();
    for &n in &fenced {
        coordinator.delete(&tasks[n].0).await.unwrap();
    }
    let ends: Vec<(Claim, RunEnd)> = claims
        .into_iter()
        .map(|claim| (claim, RunEnd::Done(json!("ok"))))
        .collect();
    let (txns, revision) = (
        counting.counts().txn,
        store.current_revision().await.unwrap(),
    );
    let results = coordinator.end_runs(&ends).await;
    for (n, result) in results.iter().enumerate() {
        match fenced.contains(&n) {
            true => assert!(matches!(result, Err(ProtocolError::NotOwner { .. }))),
            false => assert_eq!(result, &Ok(()), "run {n}"),
        }
    }
    // The batch, then the runs still owned together: two transactions
    // (before the failure branch read the owners: 1 + one per run, 17),
    // and one revision for all of them.
    assert_eq!(counting.counts().txn - txns, 2);
    assert_eq!(store.current_revision().await.unwrap(), revision + 1);
    let results = store.get_prefix("p/results/").await.unwrap().kvs;
    assert_eq!(results.len(), MAX_FINISH_BATCH - fenced.len());
}

#[tokio::test]
async fn a_successful_batch_end_is_one_revision() {
    let (store, coordinator) = setup();
    let tasks = submitted(&coordinator, &store, "r", 6).await;
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let ends: Vec<(Claim, RunEnd)> = coordinator
        .claim_batch(&NodeName::new("a").unwrap(), lease, &tasks)
        .await
        .iter()
        .map(|outcome| (claimed(outcome).clone(), RunEnd::Done(json!(null))))
        .collect();
    let before = store.current_revision().await.unwrap();
    assert!(coordinator.end_runs(&ends).await.iter().all(Result::is_ok));
    assert_eq!(store.current_revision().await.unwrap(), before + 1);
    assert_eq!(store.get_prefix("p/tasks/").await.unwrap().kvs.len(), 0);
    assert_eq!(store.get_prefix("p/results/").await.unwrap().kvs.len(), 6);
}

#[tokio::test]
async fn snapshots_and_task_views_tell_each_tasks_state() {
    let (store, coordinator) = setup();
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let record = NodeRecord {
        groups: vec![GroupName::default()],
        started_at_ms: 7,
        max_running: None,
        slots: Default::default(),
    };
    coordinator
        .register_node(&NodeName::new("n1").unwrap(), &record, lease)
        .await
        .unwrap();
    let ids: Vec<TaskId> = ["waiting", "working", "finished", "broken"]
        .iter()
        .map(|id| TaskId::new(*id).unwrap())
        .collect();
    for id in &ids {
        coordinator
            .submit(id, &spec(json!({"n": id.as_str()})))
            .await
            .unwrap();
    }
    let working = claim(&coordinator, &store, &ids[1], "n1").await;
    let finished = claim(&coordinator, &store, &ids[2], "n1").await;
    coordinator.complete(&finished, json!("ok")).await.unwrap();
    let broken = claim(&coordinator, &store, &ids[3], "n1").await;
    coordinator.fail(&broken, "no disk".into()).await.unwrap();
    store
        .put(PutRequest::new("p/tasks/garbage", "{"))
        .await
        .unwrap();

    let snapshot = coordinator.snapshot().await.unwrap();
    let states: Vec<(&str, TaskState)> = snapshot
        .tasks
        .values()
        .map(|t| (t.id.as_str(), t.state))
        .collect();
    assert_eq!(
        states,
        [
            ("broken", TaskState::Failed),
            ("finished", TaskState::Done),
            ("waiting", TaskState::Pending),
            ("working", TaskState::Running),
        ]
    );
    assert_eq!(snapshot.malformed, 1);
    let running = &snapshot.tasks[&ids[1]];
    assert_eq!(running.node.as_ref().unwrap().as_str(), "n1");
    assert_eq!(running.epoch, Some(working.epoch));
    assert_eq!(running.properties, json!({"n": "working"}));
    assert_eq!(snapshot.tasks[&ids[2]].result, Some(json!("ok")));
    assert_eq!(snapshot.tasks[&ids[3]].error.as_deref(), Some("no disk"));
    let node = &snapshot.nodes[&NodeName::new("n1").unwrap()];
    assert_eq!((node.running, node.started_at_ms), (1, 7));

    for id in &ids {
        let view = coordinator.task_view(id).await.unwrap().unwrap();
        assert_eq!(&view, &snapshot.tasks[id], "{id}");
    }
    assert!(coordinator
        .task_view(&TaskId::new("nobody").unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn task_commands_need_a_live_task_and_queue_in_order() {
    let (store, coordinator) = setup();
    let id = TaskId::new("t").unwrap();
    let missing = coordinator
        .send_task_command(&id, &TaskCommand::Pause)
        .await;
    assert_eq!(missing, Err(ProtocolError::NotFound("t".into())));
    coordinator.submit(&id, &spec(json!({}))).await.unwrap();
    let first = coordinator
        .send_task_command(&id, &TaskCommand::Sleep { until_ms: 9 })
        .await
        .unwrap();
    let second = coordinator
        .send_task_command(&id, &TaskCommand::Kill)
        .await
        .unwrap();
    assert!(second > first);
    let queued = coordinator.task_commands(&id).await.unwrap();
    let commands: Vec<_> = queued.iter().map(|q| q.command.clone().unwrap()).collect();
    assert_eq!(
        commands,
        vec![TaskCommand::Sleep { until_ms: 9 }, TaskCommand::Kill]
    );
    // Ending the task takes its queue, state and checkpoint with it.
    let claim = claim(&coordinator, &store, &id, "n1").await;
    coordinator
        .write_state(&id, claim.epoch, &StateRecord::default(), None)
        .await
        .unwrap();
    coordinator
        .save_checkpoint(&id, claim.epoch, b"cp")
        .await
        .unwrap();
    coordinator.complete(&claim, json!(1)).await.unwrap();
    let ns = coordinator.namespace();
    for prefix in [ns.state(&id), ns.checkpoint(&id), ns.task_commands(&id)] {
        assert!(
            store.get_prefix(&prefix).await.unwrap().kvs.is_empty(),
            "{prefix}"
        );
    }
    let ended = coordinator
        .send_task_command(&id, &TaskCommand::Resume)
        .await;
    assert_eq!(ended, Err(ProtocolError::TaskEnded("t".into())));
    assert!(coordinator.task_commands(&id).await.unwrap().is_empty());
}

#[tokio::test]
async fn state_and_checkpoint_writes_are_fenced_and_checkpoints_are_size_limited() {
    let (store, coordinator) = setup();
    let id = TaskId::new("t").unwrap();
    coordinator.submit(&id, &spec(json!({}))).await.unwrap();
    coordinator
        .send_task_command(&id, &TaskCommand::Pause)
        .await
        .unwrap();
    let claim = claim(&coordinator, &store, &id, "n1").await;
    let paused = StateRecord {
        state: MachineState::Paused,
        ..StateRecord::default()
    };
    let command = coordinator.task_commands(&id).await.unwrap().remove(0);
    // A stale epoch changes nothing, and leaves the command queued.
    let stale = coordinator
        .write_state(&id, claim.epoch - 1, &paused, Some(&command.key))
        .await;
    assert!(matches!(stale, Err(ProtocolError::NotOwner { .. })));
    assert_eq!(coordinator.task_commands(&id).await.unwrap().len(), 1);
    // The owner's write takes the command in the same transaction.
    coordinator
        .write_state(&id, claim.epoch, &paused, Some(&command.key))
        .await
        .unwrap();
    let load = coordinator.load_machine(&id).await.unwrap();
    assert_eq!(load.state.unwrap().state, MachineState::Paused);
    assert!(load.commands.is_empty());

    let limit = eretes_protocol::machine::MAX_CHECKPOINT_BYTES;
    let too_big = coordinator
        .save_checkpoint(&id, claim.epoch, &vec![0; limit + 1])
        .await;
    assert_eq!(
        too_big,
        Err(ProtocolError::CheckpointTooLarge {
            size: limit + 1,
            limit
        })
    );
    coordinator
        .save_checkpoint(&id, claim.epoch, &vec![7; limit])
        .await
        .unwrap();
    let stale = coordinator
        .save_checkpoint(&id, claim.epoch + 1, b"x")
        .await;
    assert!(matches!(stale, Err(ProtocolError::NotOwner { .. })));
    assert_eq!(
        coordinator.checkpoint(&id).await.unwrap().unwrap().len(),
        limit
    );
    // Deleting the task removes its machine too.
    coordinator.delete(&id).await.unwrap();
    let load = coordinator.load_machine(&id).await.unwrap();
    assert_eq!(load.state.unwrap(), StateRecord::default());
    assert!(load.checkpoint.is_none() && load.commands.is_empty());
}

#[tokio::test]
async fn deleting_a_task_leaves_a_similarly_named_tasks_commands_alone() {
    let (_store, coordinator) = setup();
    let (t, t1) = (TaskId::new("t").unwrap(), TaskId::new("t1").unwrap());
    for id in [&t, &t1] {
        coordinator.submit(id, &spec(json!({}))).await.unwrap();
        coordinator
            .send_task_command(id, &TaskCommand::Pause)
            .await
            .unwrap();
    }
    coordinator.delete(&t).await.unwrap();
    assert!(coordinator.task_commands(&t).await.unwrap().is_empty());
    assert_eq!(coordinator.task_commands(&t1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_full_batch_of_run_ends_fits_the_stores_operation_limit() {
    // The embedded store enforces etcd's default of 128 operations per
    // transaction; a full batch of completions and kills must fit in one.
    let (store, coordinator) = setup();
    let mut runs = Vec::new();
    for n in 0..=MAX_FINISH_BATCH {
        let id = TaskId::new(format!("t{n}")).unwrap();
        coordinator.submit(&id, &spec(json!({}))).await.unwrap();
        let claim = claim(&coordinator, &store, &id, "n1").await;
        let end = if n % 2 == 0 {
            RunEnd::Done(json!(n))
        } else {
            RunEnd::Killed
        };
        runs.push((claim, end));
    }
    let before = store.get_prefix("p/").await.unwrap().revision;
    let results = coordinator.end_runs(&runs).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let after = store.get_prefix("p/").await.unwrap().revision;
    // One full batch and one run on its own: two revisions.
    assert_eq!(after - before, 2);
    let killed = coordinator
        .result(&TaskId::new("t1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(killed.outcome, Outcome::Killed);
}

#[tokio::test]
async fn properties_are_stored_and_read_back_as_the_json_value_submitted() {
    let (store, coordinator) = setup();
    let submitted =
        json!({"process": {"program": "sleep", "args": ["3600"]}, "n": 1.5, "t": [true, null]});
    let id = TaskId::new("props").unwrap();
    coordinator
        .submit(&id, &spec(submitted.clone()))
        .await
        .unwrap();
    // The stored value is the JSON object itself, not a string holding it.
    let kv = store
        .get_key(&coordinator.namespace().task(&id))
        .await
        .unwrap()
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(stored["properties"], submitted);
    // Read back through the flattened record: the same value, held as text.
    let record: TaskRecord = decode("task", &kv.key, &kv.value).unwrap();
    assert_eq!(record.spec.properties.value(), submitted);
    assert_eq!(record.spec.properties, submitted);
    assert_eq!(record.spec.properties.json(), submitted.to_string());
    let args: serde_json::Value = record.spec.properties.parse().unwrap();
    assert_eq!(args["process"]["args"][0], "3600");
    // Absent properties are null, and null is not stored as text.
    let bare: TaskRecord = serde_json::from_str(r#"{"submitted_at_ms": 1}"#).unwrap();
    assert!(bare.spec.properties.is_null());
    assert_eq!(bare.spec.properties.json(), "null");
    assert_eq!(
        serde_json::to_value(&bare.spec).unwrap()["properties"],
        serde_json::Value::Null
    );
    // Equal values are equal properties whichever way they were written.
    let reordered: Properties = serde_json::from_str(r#"{ "b": 2, "a": 1 }"#).unwrap();
    assert_eq!(reordered, Properties::new(&json!({"a": 1, "b": 2})));
    // Floats survive any number of trips through the text, to the last bit.
    let float =
        json!({"x": 1.5777777777770001_f64, "y": 5e-324_f64, "z": 1.7976931348623157e308_f64});
    let mut properties = Properties::new(&float);
    for _ in 0..5 {
        properties = serde_json::from_str(&serde_json::to_string(&properties).unwrap()).unwrap();
    }
    assert_eq!(properties.value(), float);
    assert_eq!(properties.value()["x"].as_f64(), Some(1.5777777777770001));
}
