//! Deterministic scenarios of node and task commands through the store:
//! freeze, unfreeze, stop, drain and shutdown. Paused tokio time on the
//! embedded store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{NodeCommand, NodeName, TaskId};
use eretes_runtime::NodeStats;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{PutRequest, Store, StoreExt};
use tokio::time::Instant;

fn embedded() -> Arc<dyn Store> {
    EmbeddedStore::new()
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
