//! Deterministic scenarios of how nodes share tasks: fair balancing with
//! minimal moves, slots, `--max-running` across groups, and claims spread
//! by share. Paused tokio time on the embedded store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eretes_protocol::{GroupName, NodeName, TaskId, TaskSpec};
use eretes_runtime::balancer::{min_moves, DumbBalancer, FairBalancer};
use eretes_runtime::NodeStats;
use eretes_store::counting::CountingStore;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::Store;
use serde_json::json;
use tokio::time::Instant;

fn embedded() -> Arc<dyn Store> {
    EmbeddedStore::new()
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
    // The groups took the one slot in turn, from the start: never one
    // group twice in a row while the other had a task waiting.
    let groups: Vec<&str> = runs.iter().map(|run| &run.task[..1]).collect();
    assert!(
        groups.windows(2).all(|pair| pair[0] != pair[1]),
        "{groups:?}"
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

/// A tenth of 200 nodes die: their 200 tasks are orphans for 180
/// survivors, each about a task short of its share. A survivor whose own
/// share of the orphans is empty takes from the next rank's share, not the
/// oldest orphan of all, so each orphan is read by few of the survivors
/// (a survivor reads an orphan before it claims it): 3.7 reads per orphan,
/// 10.8 when they all went for the oldest (59 at 1,000 nodes).
#[tokio::test(start_paused = true)]
async fn orphans_are_read_by_few_of_many_survivors() {
    let mut cluster = Cluster::new(embedded());
    let names = start_fair_nodes(&mut cluster, 200).await;
    cluster.submit_idle(2_000).await;
    eventually("10 tasks run on each node", Duration::from_secs(60), || {
        let per_node = cluster.observer.running_per_node();
        per_node.len() == 200 && per_node.values().all(|&n| n == 10)
    })
    .await;
    let reads = |cluster: &Cluster| -> u64 {
        names[20..]
            .iter()
            .map(|name| NodeStats::get(&cluster.node(name).stats().task_reads))
            .sum()
    };
    let before = reads(&cluster);
    for name in &names[..20] {
        cluster.node(name).kill();
    }
    eventually(
        "the 200 orphans run on survivors",
        Duration::from_secs(60),
        || {
            let per_node = cluster.observer.running_per_node();
            names[20..]
                .iter()
                .map(|name| per_node.get(name).copied().unwrap_or(0))
                .sum::<usize>()
                == 2_000
        },
    )
    .await;
    let per_orphan = (reads(&cluster) - before) as f64 / 200.0;
    assert!(per_orphan <= 6.0, "{per_orphan} reads per orphan");
    assert_eq!(cluster.observer.overlaps(), 0);
}
