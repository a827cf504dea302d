//! Helpers shared by the protocol's test files.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::*;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{Store, StoreExt};
use serde_json::json;

/// An empty embedded store and a coordinator of namespace `p` on it.
pub fn setup() -> (Arc<dyn Store>, Coordinator) {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let coordinator = Coordinator::new(store.clone(), Namespace::new("p").unwrap());
    (store, coordinator)
}

/// A spec of the default group with `properties`.
pub fn spec(properties: serde_json::Value) -> TaskSpec {
    TaskSpec::new(GroupName::default(), properties)
}

/// What a claimant would see of `id` right now.
pub async fn basis(coordinator: &Coordinator, store: &Arc<dyn Store>, id: &TaskId) -> ClaimBasis {
    let kv = store
        .get_key(&coordinator.namespace().task(id))
        .await
        .unwrap()
        .unwrap();
    let run = store
        .get_key(&coordinator.namespace().run(id))
        .await
        .unwrap();
    ClaimBasis {
        group: decode::<TaskRecord>("task", &kv.key, &kv.value)
            .unwrap()
            .spec
            .group,
        task_revision: kv.mod_revision,
        run_revision: run.as_ref().map_or(0, |r| r.mod_revision),
        run: run
            .map(|r| decode("run", &r.key, &r.value).unwrap())
            .unwrap_or_default(),
    }
}

/// Claim `id` for `node` under a new lease; panics unless claimed.
pub async fn claim(
    coordinator: &Coordinator,
    store: &Arc<dyn Store>,
    id: &TaskId,
    node: &str,
) -> Claim {
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap().id;
    let basis = basis(coordinator, store, id).await;
    match coordinator
        .claim(&NodeName::new(node).unwrap(), lease, id, &basis)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(claim) => claim,
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// Submit `count` tasks `<prefix>-NNN`, each with what a claimant sees
/// of it.
pub async fn submitted(
    coordinator: &Coordinator,
    store: &Arc<dyn Store>,
    prefix: &str,
    count: usize,
) -> Vec<(TaskId, ClaimBasis)> {
    let mut tasks = Vec::new();
    for n in 0..count {
        let id = TaskId::new(format!("{prefix}-{n:03}")).unwrap();
        coordinator.submit(&id, &spec(json!(n))).await.unwrap();
        tasks.push(id);
    }
    let mut with_basis = Vec::new();
    for id in tasks {
        let basis = basis(coordinator, store, &id).await;
        with_basis.push((id, basis));
    }
    with_basis
}

/// The claim of `outcome`; panics unless it is one.
pub fn claimed(outcome: &Result<ClaimOutcome, ProtocolError>) -> &Claim {
    match outcome {
        Ok(ClaimOutcome::Claimed(claim)) => claim,
        other => panic!("expected a claim, got {other:?}"),
    }
}
