//! The protocol's transactions on the embedded store: validation, no
//! overwrites, fencing by epoch, takeover counting, namespace isolation.

use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::*;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{PutRequest, Store, StoreExt};
use serde_json::json;

fn setup() -> (Arc<dyn Store>, Coordinator) {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let coordinator = Coordinator::new(store.clone(), Namespace::new("p").unwrap());
    (store, coordinator)
}

fn spec(properties: serde_json::Value) -> TaskSpec {
    TaskSpec::new(GroupName::default(), properties)
}

async fn claim(
    coordinator: &Coordinator,
    store: &Arc<dyn Store>,
    id: &TaskId,
    node: &str,
) -> Claim {
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let kv = store
        .get_key(&coordinator.namespace().task(id))
        .await
        .unwrap()
        .unwrap();
    let run = store
        .get_key(&coordinator.namespace().run(id))
        .await
        .unwrap();
    let basis = ClaimBasis {
        task: Arc::new(decode("task", &kv.key, &kv.value).unwrap()),
        task_revision: kv.mod_revision,
        run_revision: run.as_ref().map_or(0, |r| r.mod_revision),
        run: run
            .map(|r| decode("run", &r.key, &r.value).unwrap())
            .unwrap_or_default(),
    };
    match coordinator
        .claim(&NodeName::new(node).unwrap(), lease, id, &basis)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(claim) => claim,
        other => panic!("expected a claim, got {other:?}"),
    }
}

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
async fn node_names_are_unique_among_live_nodes() {
    let (store, coordinator) = setup();
    let name = NodeName::new("n").unwrap();
    let record = NodeRecord {
        groups: vec![GroupName::default()],
        started_at_ms: 0,
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
