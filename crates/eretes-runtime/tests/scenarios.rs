//! Deterministic failure scenarios: paused tokio time on the embedded store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{
    ClaimBasis, ClaimOutcome, Coordinator, GroupName, Namespace, NodeCommand, NodeName, Outcome,
    TaskId, TaskSpec,
};
use eretes_runtime::balancer::{min_moves, DumbBalancer, FairBalancer};
use eretes_runtime::NodeStats;
use eretes_store::counting::CountingStore;
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
async fn freeze_unfreeze_stop_task_and_drain_through_the_store() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    let a = NodeName::new("a").unwrap();
    let coordinator = cluster.coordinator.clone();
    let send = |command: NodeCommand| {
        let coordinator = coordinator.clone();
        let a = a.clone();
        async move { coordinator.send_node_command(&a, &command).await.unwrap() }
    };
    send(NodeCommand::Freeze).await;
    let mut status = cluster.node("a").status();
    eventually("a is frozen", Duration::from_secs(5), || {
        status.borrow_and_update().frozen
    })
    .await;
    cluster.submit_idle(4).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(
        cluster.observer.running_tasks(),
        0,
        "a frozen node claims nothing"
    );
    send(NodeCommand::Unfreeze).await;
    eventually("a claims after unfreeze", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 4
    })
    .await;

    cluster.start_dumb("b").await;
    send(NodeCommand::StopTask(TaskId::new("t0000").unwrap())).await;
    eventually("t0000 moved to b", Duration::from_secs(10), || {
        cluster
            .observer
            .runs()
            .iter()
            .any(|r| r.task == "t0000" && r.node == "b" && r.ended.is_none())
    })
    .await;

    send(NodeCommand::Drain).await;
    eventually("everything runs on b", Duration::from_secs(10), || {
        cluster.observer.running_per_node().get("b") == Some(&4)
    })
    .await;
    assert!(
        status.borrow_and_update().frozen,
        "a drained node stays frozen"
    );
    assert_eq!(cluster.observer.overlaps(), 0);
    // Commands are consumed: the queue is empty.
    assert_eq!(
        keys_under(cluster.store.as_ref(), "test/node-commands/").await,
        0
    );
    assert_eq!(
        NodeStats::get(&cluster.node("a").stats().commands_applied),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn commands_apply_in_order_and_garbage_commands_are_discarded() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    let a = NodeName::new("a").unwrap();
    cluster
        .store
        .put(PutRequest::new(
            "test/node-commands/a/zz-garbage",
            "{\"command\":\"explode\"}",
        ))
        .await
        .unwrap();
    cluster
        .store
        .put(PutRequest::new(
            "test/node-commands/a/aa-garbage",
            "not json",
        ))
        .await
        .unwrap();
    for command in [
        NodeCommand::Freeze,
        NodeCommand::Unfreeze,
        NodeCommand::Freeze,
    ] {
        cluster
            .coordinator
            .send_node_command(&a, &command)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = cluster.node("a").stats();
    assert_eq!(NodeStats::get(&stats.commands_rejected), 2);
    assert_eq!(NodeStats::get(&stats.commands_applied), 3);
    assert!(
        cluster.node("a").status().borrow().frozen,
        "the last command wins because order is kept"
    );
    assert!(!cluster.node("a").is_stopped());
}

#[tokio::test(start_paused = true)]
async fn fair_balancing_spreads_an_uneven_cluster_with_minimal_moves() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_fair("a").await;
    cluster.submit_idle(30).await;
    eventually("a runs all 30", Duration::from_secs(5), || {
        cluster.observer.running_per_node().get("a") == Some(&30)
    })
    .await;
    let joined_at = Instant::now();
    cluster.start_fair("b").await;
    cluster.start_fair("c").await;
    eventually("balanced", Duration::from_secs(60), || {
        cluster.observer.running_tasks() == 30 && spread(&cluster.observer, &["a", "b", "c"]) <= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(spread(&cluster.observer, &["a", "b", "c"]) <= 1);
    assert_eq!(
        cluster.observer.moves_since(joined_at),
        20,
        "30 on one node of three: 20 must move"
    );
    assert_eq!(cluster.observer.overlaps(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_joining_a_loaded_cluster_takes_its_share_with_minimal_moves() {
    let mut cluster = Cluster::new(embedded());
    for name in ["a", "b", "c"] {
        cluster.start_fair(name).await;
    }
    cluster.submit_idle(30).await;
    eventually("balanced at 10 each", Duration::from_secs(30), || {
        cluster.observer.running_tasks() == 30 && spread(&cluster.observer, &["a", "b", "c"]) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut load = eretes_runtime::balancer::GroupLoad::default();
    for (node, count) in cluster.observer.running_per_node() {
        let node = NodeName::new(node).unwrap();
        load.serving.insert(node.clone());
        load.owned.insert(node, count);
    }
    load.serving.insert(NodeName::new("d").unwrap());
    let expected = min_moves(&load);
    assert_eq!(expected, 7, "targets 8/8/7/7 from 10/10/10/0");
    let joined_at = Instant::now();
    cluster.start_fair("d").await;
    eventually("balanced over four", Duration::from_secs(60), || {
        cluster.observer.running_tasks() == 30
            && spread(&cluster.observer, &["a", "b", "c", "d"]) <= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(spread(&cluster.observer, &["a", "b", "c", "d"]) <= 1);
    assert_eq!(cluster.observer.moves_since(joined_at), expected);
    assert_eq!(cluster.observer.overlaps(), 0);
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
async fn shutdown_releases_tasks_at_once_and_deregisters() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    cluster.submit_idle(5).await;
    eventually("a runs 5", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 5
    })
    .await;
    cluster.start_dumb("b").await;
    let a = cluster.nodes.remove("a").unwrap();
    let started = Instant::now();
    a.shutdown().await;
    assert!(cluster
        .store
        .get_key("test/nodes/a")
        .await
        .unwrap()
        .is_none());
    eventually("b runs 5", Duration::from_secs(5), || {
        cluster.observer.running_per_node().get("b") == Some(&5)
    })
    .await;
    assert!(
        Instant::now() - started < TTL,
        "moved by release, not by lease expiry"
    );
    assert_eq!(cluster.observer.overlaps(), 0);
}

#[tokio::test(start_paused = true)]
async fn slots_limit_tasks_per_group_and_a_second_name_is_refused() {
    let mut cluster = Cluster::new(embedded());
    let mut config = cluster.config("a");
    config.slots = 2;
    cluster
        .start_with(
            cluster.store.clone(),
            config,
            Box::new(eretes_runtime::balancer::DumbBalancer),
        )
        .await;
    cluster.submit_idle(5).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(cluster.observer.running_tasks(), 2);
    let duplicate = eretes_runtime::Node::start(
        cluster.store.clone(),
        cluster.config("a"),
        Arc::new(ScriptedHandler {
            observer: cluster.observer.clone(),
            kill_requests: None,
        }),
        Box::new(eretes_runtime::balancer::DumbBalancer),
    )
    .await
    .unwrap_err();
    assert!(
        duplicate.to_string().contains("already taken"),
        "{duplicate}"
    );
}

/// One node serving groups a and b under `max_running`, with three tasks of
/// each group whose handlers behave as `properties` say.
async fn two_groups_under_max_running(
    max_running: usize,
    properties: serde_json::Value,
) -> Cluster {
    let mut cluster = Cluster::new(embedded());
    let mut config = cluster.config("a");
    let groups = [GroupName::new("a").unwrap(), GroupName::new("b").unwrap()];
    config.groups = groups.to_vec();
    config.max_running = max_running;
    cluster
        .start_with(
            cluster.store.clone(),
            config,
            Box::new(eretes_runtime::balancer::DumbBalancer),
        )
        .await;
    for group in &groups {
        for n in 0..3 {
            let id = TaskId::new(format!("{group}-{n}")).unwrap();
            let spec = TaskSpec::new(group.clone(), properties.clone());
            cluster.coordinator.submit(&id, &spec).await.unwrap();
        }
    }
    cluster
}

#[tokio::test(start_paused = true)]
async fn max_running_shares_the_node_among_groups_with_long_tasks() {
    // Tasks that never end, two places: one goes to each group, not both to
    // whichever comes first.
    let cluster = two_groups_under_max_running(2, json!({"mode": "idle"})).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut running = cluster.observer.running_on("a");
    running.sort();
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(
        running[0].starts_with("a-") && running[1].starts_with("b-"),
        "{running:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn max_running_limits_a_node_across_its_groups_and_serves_each() {
    // mawex's pod rule: one task at a time on this node, whatever group.
    let cluster = two_groups_under_max_running(1, json!({"mode": "work", "ms": 1000})).await;
    let mut most = 0;
    for _ in 0..200 {
        most = most.max(cluster.observer.running_tasks());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(most, 1, "never two at once");
    let runs = cluster.observer.runs();
    assert_eq!(runs.len(), 6, "every task ran: {runs:?}");
    // Both groups were served from the start, not one after the other.
    let first_two: Vec<&str> = runs.iter().take(2).map(|run| &run.task[..1]).collect();
    assert!(
        first_two.contains(&"a") && first_two.contains(&"b"),
        "{first_two:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_counts_what_others_run_in_groups_it_does_not_serve() {
    // `small` serves a and b and runs one task at a time; `big` serves only
    // a, so it keeps nothing per task of b but must still count what
    // `small` runs there: that is what leaves `small` no room for a.
    let mut cluster = Cluster::new(embedded());
    let (a, b) = (GroupName::new("a").unwrap(), GroupName::new("b").unwrap());
    let mut small = cluster.config("small");
    small.groups = vec![a.clone(), b.clone()];
    small.max_running = 1;
    cluster
        .start_with(
            cluster.store.clone(),
            small,
            Box::new(FairBalancer::default()),
        )
        .await;
    let coordinator = cluster.coordinator.clone();
    let submit = |id: &str, group: &GroupName| {
        let (coordinator, id) = (coordinator.clone(), TaskId::new(id).unwrap());
        let spec = TaskSpec::new(group.clone(), json!({"mode": "idle"}));
        async move { coordinator.submit(&id, &spec).await.unwrap() }
    };
    submit("b-0", &b).await;
    eventually("small runs b-0", Duration::from_secs(10), || {
        cluster.observer.running_on("small") == ["b-0"]
    })
    .await;
    let mut big = cluster.config("big");
    big.groups = vec![a.clone()];
    big.balance_interval = Duration::from_secs(5);
    // No resync in the test's time: the counts must follow the watch alone.
    big.resync_interval = Duration::from_secs(3600);
    cluster
        .start_with(
            cluster.store.clone(),
            big,
            Box::new(FairBalancer::default()),
        )
        .await;
    for n in 0..4 {
        submit(&format!("a-{n}"), &a).await;
    }
    // `small` has no room, so `big` runs all four.
    eventually("big runs the four of a", Duration::from_secs(60), || {
        cluster.observer.running_on("big").len() == 4
    })
    .await;
    // b-0 goes: `big` learns it from the owner record the delete removed,
    // counts `small`'s room again, and leaves it its share of a.
    cluster
        .coordinator
        .delete(&TaskId::new("b-0").unwrap())
        .await
        .unwrap();
    eventually("small runs one of a", Duration::from_secs(120), || {
        let small = cluster.observer.running_on("small");
        small.len() == 1 && small[0].starts_with("a-")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(cluster.observer.running_on("big").len(), 3);
    assert_eq!(cluster.observer.running_tasks(), 4);
}

#[tokio::test(start_paused = true)]
async fn fair_shares_count_with_nodes_limits_so_no_task_waits_beside_room() {
    // A small node (one task at a time, over both groups) and a big one,
    // both fair: the big one takes what the small one has no room for.
    let mut cluster = Cluster::new(embedded());
    let groups = [GroupName::new("a").unwrap(), GroupName::new("b").unwrap()];
    let mut small = cluster.config("small");
    small.groups = groups.to_vec();
    small.max_running = 1;
    let mut big = cluster.config("big");
    big.groups = groups.to_vec();
    big.group_slots.insert(groups[1].clone(), 4);
    for config in [small, big] {
        let store = cluster.store.clone();
        cluster
            .start_with(store, config, Box::new(FairBalancer::default()))
            .await;
    }
    for group in &groups {
        for n in 0..6 {
            let id = TaskId::new(format!("{group}-{n}")).unwrap();
            let spec = TaskSpec::new(group.clone(), json!({"mode": "idle"}));
            cluster.coordinator.submit(&id, &spec).await.unwrap();
        }
    }
    // a: 6 tasks, the small node has room for 1 over both groups; b: the
    // big node runs at most 4 of it. So all of a runs, 4 of b on the big
    // one, and the small node's place goes to a or b: 10 or 11 run, and 2
    // or 1 of b wait.
    let of = |tasks: &[String], group: &str| tasks.iter().filter(|t| t.starts_with(group)).count();
    let every_place_used = || {
        let small = cluster.observer.running_on("small");
        let big = cluster.observer.running_on("big");
        small.len() == 1 && of(&big, "b-") == 4 && of(&big, "a-") + of(&small, "a-") == 6
    };
    eventually(
        "every place is used",
        Duration::from_secs(60),
        every_place_used,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let small = cluster.observer.running_on("small");
    let big = cluster.observer.running_on("big");
    assert!(every_place_used(), "{big:?} {small:?}");
    assert_eq!(cluster.observer.overlaps(), 0);
}

/// Submit a task whose handler ignores cancellation, and wait until it runs.
async fn run_stubborn_task(cluster: &Cluster) {
    cluster
        .submit("stubborn", json!({"mode": "stubborn"}))
        .await;
    eventually("it runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 1
    })
    .await;
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

#[tokio::test(start_paused = true)]
async fn claims_that_land_during_a_drain_are_given_back() {
    let mut cluster = Cluster::new(embedded());
    cluster.start_dumb("a").await;
    cluster.submit_idle(200).await;
    // Drain while the first claims are still in flight.
    cluster.node("a").command(NodeCommand::Drain);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        cluster.observer.running_tasks(),
        0,
        "a drained node runs nothing"
    );
    assert_eq!(keys_under(cluster.store.as_ref(), "test/owners/").await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_handler_that_ignores_cancellation_is_aborted_after_its_grace_and_released() {
    let mut cluster = Cluster::new(embedded());
    let mut config = cluster.config("a");
    config.handler_grace = Duration::from_secs(4);
    let store = cluster.store.clone();
    cluster
        .start_with(
            store,
            config,
            Box::new(eretes_runtime::balancer::DumbBalancer),
        )
        .await;
    run_stubborn_task(&cluster).await;
    let asked = tokio::time::Instant::now();
    cluster
        .node("a")
        .command(NodeCommand::StopTask(TaskId::new("stubborn").unwrap()));
    eventually("the handler is aborted", Duration::from_secs(10), || {
        cluster.observer.running_tasks() == 0
    })
    .await;
    let ended = cluster.observer.runs()[0].ended.expect("the run ended");
    let waited = ended - asked;
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(5),
        "aborted {waited:?} after the stop; the grace is 4 s"
    );
    // Aborted is given back, not failed: the owner record goes, the task stays.
    eventually("the task is released", Duration::from_secs(5), || {
        NodeStats::get(&cluster.node("a").stats().releases) == 1
    })
    .await;
    assert!(cluster
        .store
        .get_key("test/tasks/stubborn")
        .await
        .unwrap()
        .is_some());
    assert_eq!(NodeStats::get(&cluster.node("a").stats().failures), 0);
}

#[tokio::test(start_paused = true)]
async fn nodes_claiming_together_take_their_own_shares_and_rarely_collide() {
    // A round trip per transaction, as on etcd, so that the three nodes'
    // claims overlap in time; without shares they would all go for the same
    // oldest tasks and most batches would lose a compare.
    let faulty = FaultyStore::new(EmbeddedStore::new());
    faulty.set_txn_latency(Duration::from_millis(5));
    let counting = Arc::new(CountingStore::new(faulty.clone()));
    let mut cluster = Cluster::new(faulty.clone());
    cluster.submit_idle(3000).await;
    let before = counting.counts();
    for name in ["a", "b", "c"] {
        let mut config = cluster.config(name);
        config.max_claims_in_flight = 64;
        cluster
            .start_with(counting.clone(), config, Box::new(DumbBalancer))
            .await;
    }
    eventually("all 3000 tasks run", Duration::from_secs(60), || {
        cluster.observer.running_tasks() == 3000
    })
    .await;
    let total = |counter: fn(&NodeStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        ["a", "b", "c"]
            .iter()
            .map(|name| NodeStats::get(counter(cluster.node(name).stats())))
            .sum()
    };
    let claims = total(|s| &s.claims);
    let conflicts = total(|s| &s.claim_conflicts);
    assert_eq!(claims, 3000);
    let txns = counting.counts().since(&before).txn;
    // Without shares, 2,880 of the 3,000 claims collided. What is left
    // costs a batch one more transaction (a lost batch goes again without
    // its lost tasks): 3,000 claims take 94 transactions of 32 at best
    // (106 measured).
    assert!(
        conflicts * 10 <= claims,
        "{conflicts} claim conflicts for {claims} claims (more than 10%)"
    );
    assert!(txns <= 150, "{txns} transactions for {claims} claims");
    assert_eq!(cluster.observer.overlaps(), 0);
}
