//! Deterministic scenarios of ownership: one winner per claim, failover
//! after a lease expires and not before, fencing, takeover limits, bad
//! records and handler outcomes. Paused tokio time on the embedded store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{
    ClaimBasis, ClaimOutcome, Coordinator, GroupName, Namespace, NodeName, Outcome, TaskId,
    TaskSpec,
};
use eretes_runtime::NodeStats;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::{PutRequest, Store, StoreExt};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use tokio::time::Instant;

fn embedded() -> Arc<dyn Store> {
    EmbeddedStore::new()
}

#[tokio::test(start_paused = true)]
async fn ten_nodes_race_for_one_task_and_exactly_one_wins() {
    for seed in 0..20u64 {
        let mut cluster = Cluster::new(embedded());
        cluster.submit("contested", json!({})).await;
        let mut names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        names.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        for name in &names {
            cluster.start_dumb(name).await;
        }
        eventually("one node runs the task", Duration::from_secs(5), || {
            cluster.observer.running_tasks() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let runs = cluster.observer.runs();
        assert_eq!(runs.len(), 1, "seed {seed}: exactly one run, got {runs:?}");
        let claims: u64 = cluster
            .nodes
            .values()
            .map(|n| NodeStats::get(&n.stats().claims))
            .sum();
        assert_eq!(claims, 1, "seed {seed}: exactly one successful claim");
    }
}

/// Submit task `id` and return the revision of the submission with what a
/// claimant who saw it would claim against.
async fn submit_with_basis(coordinator: &Coordinator, id: &TaskId) -> (i64, ClaimBasis) {
    let spec = TaskSpec::new(GroupName::default(), json!({}));
    let revision = coordinator.submit(id, &spec).await.unwrap();
    let basis = ClaimBasis {
        group: spec.group,
        task_revision: revision,
        run_revision: 0,
        run: Default::default(),
    };
    (revision, basis)
}

#[tokio::test(start_paused = true)]
async fn concurrent_claim_transactions_have_one_winner() {
    let store = embedded();
    let ns = Namespace::new("race").unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let id = TaskId::new("t").unwrap();
    let (revision, basis) = submit_with_basis(&coordinator, &id).await;
    let mut attempts = Vec::new();
    for i in 0..10 {
        let lease = store.lease_grant(TTL).await.unwrap().id;
        let (coordinator, basis, id) = (coordinator.clone(), basis.clone(), id.clone());
        attempts.push(tokio::spawn(async move {
            let node = NodeName::new(format!("n{i}")).unwrap();
            coordinator.claim(&node, lease, &id, &basis).await.unwrap()
        }));
    }
    let mut winners = 0;
    for attempt in attempts {
        if let ClaimOutcome::Claimed(claim) = attempt.await.unwrap() {
            winners += 1;
            assert!(claim.epoch > revision, "the epoch is the claim's revision");
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test(start_paused = true)]
async fn a_late_claim_does_not_resurrect_a_deleted_task() {
    let store = embedded();
    let coordinator = Coordinator::new(store.clone(), Namespace::new("late").unwrap());
    let id = TaskId::new("t").unwrap();
    let (_, basis) = submit_with_basis(&coordinator, &id).await;
    coordinator.delete(&id).await.unwrap();
    let lease = store.lease_grant(TTL).await.unwrap().id;
    let node = NodeName::new("late").unwrap();
    let outcome = coordinator.claim(&node, lease, &id, &basis).await.unwrap();
    assert!(
        matches!(outcome, ClaimOutcome::Lost(ref keys) if keys.task.is_none()),
        "{outcome:?}"
    );
    let left = store.get_prefix("late/").await.unwrap();
    assert!(left.kvs.is_empty(), "nothing written: {:?}", left.kvs);
}

#[tokio::test(start_paused = true)]
async fn deleting_a_running_task_stops_it_everywhere() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    cluster.submit("doomed", json!({})).await;
    eventually("the task runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 1
    })
    .await;
    cluster
        .coordinator
        .delete(&TaskId::new("doomed").unwrap())
        .await
        .unwrap();
    eventually("the handler stopped", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(cluster.observer.runs().len(), 1, "never started again");
    assert_eq!(keys_under(cluster.store.as_ref(), "test/owners/").await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dead_nodes_tasks_move_after_its_lease_expires_and_not_before() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    cluster.submit_idle(20).await;
    eventually("a runs all 20", Duration::from_secs(5), || {
        cluster.observer.running_per_node().get("a") == Some(&20)
    })
    .await;
    cluster.start_dumb("b").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // a's node record shares its lease: its deletion is the moment of expiry.
    let mut nodes = cluster
        .store
        .watch(eretes_store::KeyRange::key("test/nodes/a"), 0)
        .await
        .unwrap();
    let killed_at = Instant::now();
    cluster.node("a").kill();
    let expired_at = next_delete(&mut nodes).await;
    assert!(
        expired_at <= killed_at + TTL,
        "the lease expired within one TTL of the kill"
    );
    eventually("b runs all 20", TTL * 2, || {
        cluster.observer.running_per_node().get("b") == Some(&20)
    })
    .await;
    let b_starts: Vec<Instant> = cluster
        .observer
        .runs()
        .iter()
        .filter(|r| r.node == "b")
        .map(|r| r.started)
        .collect();
    assert!(
        b_starts.iter().all(|started| *started >= expired_at),
        "no task moved before a's lease expired"
    );
    let failover = *b_starts.iter().max().unwrap() - killed_at;
    assert!(
        failover <= TTL + Duration::from_secs(1),
        "failover took {failover:?}"
    );
    assert_eq!(cluster.observer.overlaps(), 0);
    // b kept only a count of what a ran; it read each orphan once, then
    // claimed it, without a lost claim.
    let b = cluster.node("b").stats();
    assert_eq!(NodeStats::get(&b.task_reads), 20);
    assert_eq!(NodeStats::get(&b.claims), 20);
    assert_eq!(NodeStats::get(&b.claim_conflicts), 0);
}

/// A cluster on an embedded store whose node `a` reaches the store through a
/// fault injector (so its renewals or every call can be made to fail).
async fn cluster_with_faulty_node_a(
) -> (Arc<EmbeddedStore>, Arc<FaultyStore<EmbeddedStore>>, Cluster) {
    let inner = EmbeddedStore::new();
    let faulty = FaultyStore::new(inner.clone());
    let mut cluster = Cluster::new(inner.clone());
    let config = cluster.config("a");
    cluster
        .start_with(
            faulty.clone(),
            config,
            Box::new(eretes_runtime::balancer::DumbBalancer),
        )
        .await;
    (inner, faulty, cluster)
}

/// Wait for the next delete event on `stream` and return when it came.
async fn next_delete(stream: &mut eretes_store::WatchStream) -> Instant {
    use futures::StreamExt;
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a delete within 30 s")
            .unwrap()
            .unwrap();
        if batch
            .iter()
            .any(|e| e.kind == eretes_store::EventKind::Delete)
        {
            return Instant::now();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_renew_fences_itself_before_its_lease_expires() {
    let (inner, faulty, mut cluster) = cluster_with_faulty_node_a().await;
    cluster.submit_idle(10).await;
    eventually("a runs all 10", Duration::from_secs(5), || {
        cluster.observer.running_per_node().get("a") == Some(&10)
    })
    .await;
    cluster.start_dumb("b").await;
    // Watch a's node record: its deletion is the moment the lease expired.
    let mut nodes = inner
        .watch(eretes_store::KeyRange::key("test/nodes/a"), 0)
        .await
        .unwrap();
    faulty.block_keepalives(true);
    let blocked_at = Instant::now();
    // The record goes when the lease expires, or earlier when the fenced
    // node revokes it, which it may do only after its handlers stopped.
    let released_at = next_delete(&mut nodes).await;
    assert!(
        released_at <= blocked_at + TTL,
        "the lease ended within one TTL"
    );
    eventually("every task runs again", TTL * 2, || {
        cluster.observer.running_tasks() == 10
            && cluster
                .observer
                .runs()
                .iter()
                .filter(|r| r.started >= released_at)
                .count()
                == 10
    })
    .await;
    let runs = cluster.observer.runs();
    for run in runs
        .iter()
        .filter(|r| r.node == "a" && r.started < blocked_at)
    {
        let ended = run.ended.expect("a's handlers were cancelled");
        {
            assert!(
                ended <= released_at,
                "a's handler for {} ended at {ended:?}, after its lease ended at {released_at:?}",
                run.task
            );
        }
    }
    assert_eq!(cluster.observer.overlaps(), 0);
    assert!(NodeStats::get(&cluster.node("a").stats().fences) >= 1);
    // Once renewals work again the node registers again and takes work.
    faulty.block_keepalives(false);
    let mut status = cluster.node("a").status();
    eventually("a registered again", Duration::from_secs(30), || {
        status.borrow_and_update().registered
    })
    .await;
    cluster.submit("after", json!({})).await;
    eventually("the new task runs", Duration::from_secs(10), || {
        cluster.observer.runs().iter().any(|r| r.task == "after")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_longer_than_the_ttl_loses_nothing() {
    let (inner, faulty, cluster) = cluster_with_faulty_node_a().await;
    cluster.submit_idle(10).await;
    eventually("a runs all 10", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 10
    })
    .await;
    faulty.set_outage(true);
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(
        cluster.observer.running_tasks(),
        0,
        "fenced during the outage"
    );
    faulty.set_outage(false);
    eventually("every task runs again", Duration::from_secs(30), || {
        cluster.observer.running_tasks() == 10
    })
    .await;
    assert_eq!(cluster.observer.overlaps(), 0);
    assert_eq!(keys_under(inner.as_ref(), "test/tasks/").await, 10);
    assert_eq!(keys_under(inner.as_ref(), "test/results/").await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_poison_task_is_parked_after_the_takeover_limit() {
    let mut cluster = Cluster::new(embedded());
    let (tx, mut kill_requests) = tokio::sync::mpsc::unbounded_channel();
    cluster.kill_requests = Some(tx);
    cluster.submit("poison", json!({"mode": "kill-me"})).await;
    let mut generation = 0;
    cluster.start_dumb(&format!("n{generation}")).await;
    let result = loop {
        let result = cluster
            .coordinator
            .result(&TaskId::new("poison").unwrap())
            .await
            .unwrap();
        if let Some(result) = result {
            break result;
        }
        assert!(generation <= 10, "the task was never parked");
        let victim = tokio::time::timeout(Duration::from_secs(30), kill_requests.recv())
            .await
            .expect("the poison task starts again")
            .unwrap();
        cluster.node(&victim).kill();
        generation += 1;
        cluster.start_dumb(&format!("n{generation}")).await;
        tokio::time::sleep(TTL * 2).await;
    };
    assert_eq!(result.outcome, Outcome::Failed);
    assert!(
        result.error.as_deref().unwrap().contains("parked"),
        "{:?}",
        result.error
    );
    assert_eq!(result.runs.takeovers, 6);
    assert_eq!(
        cluster.observer.runs().len(),
        6,
        "one first run and five takeovers"
    );
    assert!(cluster
        .store
        .get_key("test/tasks/poison")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn malformed_entries_are_skipped_and_counted_and_the_node_keeps_working() {
    let mut cluster = Cluster::new(embedded());
    let garbage = [
        ("test/tasks/x", "{not json"),
        ("test/owners/y", "[]"),
        ("test/nodes/z", "{}"),
        // A kind nobody knows, among those a node watches.
        ("test/queue/what", "1"),
        // Outside what a node watches: neither read nor counted.
        ("test/unknown/what", "1"),
    ];
    for (key, value) in &garbage[..2] {
        cluster
            .store
            .put(PutRequest::new(*key, *value))
            .await
            .unwrap();
    }
    cluster.start_dumb("a").await;
    // A listing reads only the kinds a node keeps; what it does not read
    // but watches (an unknown kind here) is seen, and counted, once the
    // watch is on.
    eventually("the node has listed", Duration::from_secs(5), || {
        NodeStats::get(&cluster.node("a").stats().listings) > 0
    })
    .await;
    for (key, value) in &garbage[2..] {
        cluster
            .store
            .put(PutRequest::new(*key, *value))
            .await
            .unwrap();
    }
    // A checkpoint over the limit: counted when nodes watched the whole
    // namespace; a node's watch no longer carries checkpoints.
    let huge = "x".repeat(eretes_protocol::machine::MAX_CHECKPOINT_BYTES + 1);
    cluster
        .store
        .put(PutRequest::new("test/checkpoints/huge", huge))
        .await
        .unwrap();
    cluster
        .store
        .put(PutRequest::new(
            "test/tasks/bad id",
            "{\"group\":\"default\"}",
        ))
        .await
        .unwrap();
    cluster.submit("good", json!({"mode": "done"})).await;
    eventually("the good task completes", Duration::from_secs(5), || {
        !cluster.observer.runs().is_empty()
    })
    .await;
    // Several resyncs later the count has not grown: each entry counts once.
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(
        NodeStats::get(&cluster.node("a").stats().malformed_skipped),
        5
    );
    assert!(!cluster.node("a").is_stopped());
    // Nothing stored was lost or rewritten.
    let x = cluster
        .store
        .get_key("test/tasks/x")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(x.value, b"{not json");
}

#[tokio::test(start_paused = true)]
async fn handler_outcomes_become_results() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    cluster.submit("ok", json!({"mode": "done"})).await;
    cluster.submit("bad", json!({"mode": "fail"})).await;
    cluster.submit("boom", json!({"mode": "panic"})).await;
    cluster
        .submit("slow", json!({"mode": "work", "ms": 5000}))
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let result = |id: &str| {
        let coordinator = cluster.coordinator.clone();
        let id = TaskId::new(id).unwrap();
        async move { coordinator.result(&id).await.unwrap().expect("a result") }
    };
    let ok = result("ok").await;
    assert_eq!(ok.outcome, Outcome::Done);
    assert_eq!(ok.result["node"], "a");
    assert!(ok.epoch > 0);
    let bad = result("bad").await;
    assert_eq!(
        (bad.outcome, bad.error.as_deref()),
        (Outcome::Failed, Some("scripted failure"))
    );
    let boom = result("boom").await;
    assert!(boom
        .error
        .unwrap()
        .contains("handler panicked: scripted panic"));
    assert_eq!(result("slow").await.result, json!("worked"));
    assert_eq!(keys_under(cluster.store.as_ref(), "test/tasks/").await, 0);
    // A result keeps its id taken: resubmitting is refused and overwrites nothing.
    let again = cluster
        .coordinator
        .submit(
            &TaskId::new("ok").unwrap(),
            &TaskSpec::new(GroupName::default(), json!({})),
        )
        .await;
    assert!(again.is_err());
    assert_eq!(result("ok").await.result, ok.result);
}

#[tokio::test(start_paused = true)]
async fn a_fenced_handler_that_ignores_cancellation_is_aborted_before_the_lease_expires() {
    let (inner, faulty, cluster) = cluster_with_faulty_node_a().await;
    run_stubborn_task(&cluster).await;
    let mut nodes = inner
        .watch(eretes_store::KeyRange::key("test/nodes/a"), 0)
        .await
        .unwrap();
    faulty.block_keepalives(true);
    let released_at = next_delete(&mut nodes).await;
    let run = &cluster.observer.runs()[0];
    let ended = run.ended.expect("the stubborn handler was aborted");
    assert!(
        ended <= released_at,
        "aborted at {ended:?}, lease ended at {released_at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_garbage_owner_record_blocks_its_task_without_a_claim_storm() {
    let mut cluster = Cluster::new(embedded());
    cluster.submit("x", json!({})).await;
    cluster
        .store
        .put(PutRequest::new("test/owners/x", "garbage"))
        .await
        .unwrap();
    cluster.start_dumb("a").await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let conflicts = NodeStats::get(&cluster.node("a").stats().claim_conflicts);
    assert!(conflicts <= 12, "{conflicts} claim attempts in 30 s");
    assert_eq!(cluster.observer.runs().len(), 0, "an owned task is not run");
    assert!(!cluster.node("a").is_stopped());
}

/// A node whose registration is overwritten with something that is not
/// one fences itself, says it is not registered, and registers again once
/// the key is free: before, it went on as a registered node that every
/// other reader (and its own next listing) did not see, and claimed
/// nothing more.
#[tokio::test(start_paused = true)]
async fn a_node_whose_registration_is_overwritten_registers_again_and_claims() {
    let mut cluster = Cluster::new(EmbeddedStore::new());
    cluster.submit_idle(5).await;
    cluster.start_dumb("a").await;
    eventually("a runs 5", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 5
    })
    .await;
    cluster
        .store
        .put(eretes_store::PutRequest::new(
            "test/nodes/a",
            b"not a node record".to_vec(),
        ))
        .await
        .unwrap();
    let stats = cluster.node("a").stats();
    eventually("a fences itself", Duration::from_secs(10), || {
        NodeStats::get(&stats.fences) == 1
    })
    .await;
    for i in 5..10 {
        cluster.submit(&format!("t{i:04}"), json!({})).await;
    }
    // The value was put without a lease: it holds the name until an
    // operator deletes it, as any record without a lease does.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!cluster.node("a").status().borrow().registered);
    assert_eq!(cluster.observer.running_tasks(), 0);
    cluster
        .store
        .delete(eretes_store::DeleteRequest::new(
            eretes_store::KeyRange::key("test/nodes/a"),
        ))
        .await
        .unwrap();
    eventually("a runs all 10", Duration::from_secs(30), || {
        cluster.observer.running_tasks() == 10
    })
    .await;
    let record = cluster.store.get_key("test/nodes/a").await.unwrap();
    let record = record.expect("registered again");
    serde_json::from_slice::<eretes_protocol::NodeRecord>(&record.value)
        .expect("a node record again");
    assert_eq!(cluster.observer.overlaps(), 0);
}
