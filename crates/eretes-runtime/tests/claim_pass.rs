//! What a claim pass asks the balancer, and what it costs, when the balancer
//! says "not this task" (skip) or "not now" (wait), and how many
//! transactions a pass sends while tasks keep arriving: paused tokio time on
//! the embedded store, plus one ignored release-mode measurement.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eretes_protocol::{GroupName, TaskId};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::balancer::{Balancer, ClaimDecision, ClusterView};
use eretes_runtime::NodeStats;
use eretes_store::counting::CountingStore;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::Store;
use serde_json::json;
use tokio::time::Instant;

/// How often the balancer was asked about each task.
type Asked = Arc<Mutex<HashMap<String, u32>>>;

/// A balancer that answers from the task's number (`t0042` is 42): odd
/// tasks get `odd`, even ones `even`. It never releases.
struct ByParity {
    odd: ClaimDecision,
    even: ClaimDecision,
    asked: Asked,
}

impl Balancer for ByParity {
    fn can_claim(&mut self, task: &TaskId, _: &GroupName, _: &ClusterView) -> ClaimDecision {
        *self
            .asked
            .lock()
            .unwrap()
            .entry(task.to_string())
            .or_default() += 1;
        let number: u64 = task.as_str()[1..]
            .parse()
            .expect("tasks are named t<number>");
        if number % 2 == 1 {
            self.odd
        } else {
            self.even
        }
    }

    fn balance(&mut self, _: &ClusterView) -> Vec<TaskId> {
        Vec::new()
    }
}

async fn node_with(cluster: &mut Cluster, odd: ClaimDecision, even: ClaimDecision) -> Asked {
    let asked = Asked::default();
    let config = cluster.config("a");
    let balancer = ByParity {
        odd,
        even,
        asked: asked.clone(),
    };
    cluster
        .start_with(cluster.store.clone(), config, Box::new(balancer))
        .await;
    asked
}

fn times_asked(asked: &Asked, filter: impl Fn(u64) -> bool) -> Vec<u32> {
    asked
        .lock()
        .unwrap()
        .iter()
        .filter(|(task, _)| filter(task[1..].parse().unwrap()))
        .map(|(_, count)| *count)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_skipped_task_is_asked_about_once_per_skip_while_the_others_are_claimed() {
    let mut cluster = Cluster::new(EmbeddedStore::new());
    cluster.submit_idle(1000).await;
    let asked = node_with(
        &mut cluster,
        ClaimDecision::Skip(Duration::from_secs(10)),
        ClaimDecision::Claim,
    )
    .await;
    eventually("the 500 even tasks run", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 500
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let odd = times_asked(&asked, |n| n % 2 == 1);
    assert_eq!(odd.len(), 500, "every skipped task was asked about");
    assert!(odd.iter().all(|&n| n == 1), "asked again within the skip");
    // Once the skip is over they are candidates again, and asked once more.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let odd = times_asked(&asked, |n| n % 2 == 1);
    assert!(
        odd.iter().all(|&n| n == 2),
        "after the skip each is asked once more: {:?}",
        odd.iter().fold(HashMap::<u32, usize>::new(), |mut m, n| {
            *m.entry(*n).or_default() += 1;
            m
        })
    );
    assert!(times_asked(&asked, |n| n % 2 == 0).iter().all(|&n| n == 1));
    assert_eq!(cluster.observer.running_tasks(), 500);
}

#[tokio::test(start_paused = true)]
async fn a_balancer_that_waits_is_asked_again_after_its_wait_not_on_every_event() {
    let mut cluster = Cluster::new(EmbeddedStore::new());
    let wait = Duration::from_secs(1);
    let asked = node_with(
        &mut cluster,
        ClaimDecision::RetryAfter(wait),
        ClaimDecision::RetryAfter(wait),
    )
    .await;
    // Every submission is an event the node's loop wakes for.
    let started = Instant::now();
    cluster.submit_idle(400).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waits = (started.elapsed().as_millis() / wait.as_millis()) as u32 + 1;
    let total: u32 = times_asked(&asked, |_| true).iter().sum();
    assert!(
        total <= waits,
        "asked {total} times in {:?}: more than once per wait of {wait:?}",
        started.elapsed()
    );
    assert!(total >= 1, "never asked");
    assert_eq!(cluster.observer.running_tasks(), 0);
}

/// A balancer that puts `first` first ([`Balancer::claim_first`]). Of
/// those, it skips each of `skip_once` for 100 ms the first time it is
/// asked, refuses `refused` (the group waits), and lets this node claim the
/// rest; for any other task the group waits.
struct PutsFirst {
    first: Vec<TaskId>,
    skip_once: Vec<TaskId>,
    refused: Vec<TaskId>,
    wait: Duration,
    asked: Asked,
}

impl Balancer for PutsFirst {
    fn can_claim(&mut self, task: &TaskId, _: &GroupName, _: &ClusterView) -> ClaimDecision {
        let times = {
            let mut asked = self.asked.lock().unwrap();
            let times = asked.entry(task.to_string()).or_default();
            *times += 1;
            *times
        };
        if !self.first.contains(task) || self.refused.contains(task) {
            ClaimDecision::RetryAfter(self.wait)
        } else if self.skip_once.contains(task) && times == 1 {
            ClaimDecision::Skip(Duration::from_millis(100))
        } else {
            ClaimDecision::Claim
        }
    }

    fn balance(&mut self, _: &ClusterView) -> Vec<TaskId> {
        Vec::new()
    }

    fn claim_first(&mut self, _: &GroupName, _: &ClusterView) -> Vec<TaskId> {
        self.first.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn tasks_a_balancer_puts_first_are_claimed_while_the_group_waits() {
    let mut cluster = Cluster::new(EmbeddedStore::new());
    cluster.submit_idle(100).await;
    let ids = |names: &[&str]| -> Vec<TaskId> {
        names.iter().map(|n| TaskId::new(*n).unwrap()).collect()
    };
    let asked = Asked::default();
    let wait = Duration::from_secs(60);
    let balancer = PutsFirst {
        // Two of them are submitted later, and one of those is refused;
        // t0090 is skipped the first time, and named twice.
        first: ids(&["t0150", "t0090", "t0120", "t0095", "t0090"]),
        skip_once: ids(&["t0090"]),
        refused: ids(&["t0120"]),
        wait,
        asked: asked.clone(),
    };
    let config = cluster.config("a");
    cluster
        .start_with(cluster.store.clone(), config, Box::new(balancer))
        .await;
    let count = |name: &str| asked.lock().unwrap().get(name).copied().unwrap_or(0);
    // The first pass claims t0095, skips t0090, and then the oldest task's
    // answer makes the group wait for a minute. When the skip ends, t0090
    // is asked again within that wait, and claimed.
    eventually("t0090 and t0095 run", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 2
    })
    .await;
    let mut running = cluster.observer.running_on("a");
    running.sort();
    assert_eq!(running, ["t0090", "t0095"]);
    assert_eq!(count("t0090"), 2, "skipped once, then claimed");
    assert_eq!(count("t0000"), 1, "the oldest task, asked once");
    let others: u32 = times_asked(&asked, |n| ![0, 90, 95].contains(&n))
        .iter()
        .sum();
    assert_eq!(others, 0, "no other task was asked");
    // New tasks end the wait; of them, the one put first and allowed is
    // claimed, and the refused one is asked.
    for i in 100..=150 {
        cluster.submit(&format!("t{i:04}"), json!({})).await;
    }
    eventually("t0150 runs", Duration::from_secs(5), || {
        cluster.observer.running_tasks() == 3
    })
    .await;
    assert_eq!(count("t0150"), 1);
    assert!(count("t0120") >= 1, "the refused task was asked");
    // While the group waits again, events that change no count (here,
    // task states written) bring passes that ask the refused task no more.
    let refused_asks = count("t0120");
    for i in 0..20 {
        let state = serde_json::to_vec(&json!({"state": "runnable"})).unwrap();
        cluster
            .store
            .put(eretes_store::PutRequest::new(
                cluster.ns.state(&TaskId::new(format!("t{i:04}")).unwrap()),
                state,
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count("t0120"), refused_asks, "asked again within its wait");
    assert_eq!(cluster.observer.running_tasks(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_fair_node_at_its_share_claims_again_as_soon_as_a_run_ends() {
    // Five slots, fifty tasks of 20 ms each. The watch trails the writes'
    // answers by 5 ms, as etcd's does: a slot frees when the write of a
    // run's end is answered, while the node still sees the run's owner
    // record, so it is at its share (its room) and the balancer says wait.
    // The wait must end when the owner record's deletion arrives, not
    // 250 ms later.
    let faulty = eretes_store::faults::FaultyStore::new(EmbeddedStore::new());
    faulty.set_watch_latency(Duration::from_millis(5));
    let mut cluster = Cluster::new(faulty.clone());
    for i in 0..50 {
        cluster
            .submit(
                &format!("w{i:02}"),
                serde_json::json!({"mode": "work", "ms": 20}),
            )
            .await;
    }
    let mut config = cluster.config("a");
    config.slots = 5;
    cluster
        .start_with(
            faulty.clone(),
            config,
            Box::new(eretes_runtime::balancer::FairBalancer::default()),
        )
        .await;
    let started = Instant::now();
    let done = || eretes_runtime::NodeStats::get(&cluster.node("a").stats().completions);
    // Ten rounds of 20 ms: with a wait of the fair balancer's 250 ms after
    // most runs it would take seconds.
    eventually("the 50 tasks complete", Duration::from_secs(10), || {
        done() == 50
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "50 runs of 20 ms in 5 slots took {:?}",
        started.elapsed()
    );
}

/// A node whose store takes `latency` to answer each transaction, counting
/// the requests it sends.
async fn start_counted(
    cluster: &mut Cluster,
    name: &str,
    latency: Duration,
) -> Arc<CountingStore<Arc<FaultyStore<dyn Store>>>> {
    let faulty = FaultyStore::new(cluster.store.clone());
    faulty.set_txn_latency(latency);
    let counting = Arc::new(CountingStore::new(faulty));
    let config = cluster.config(name);
    cluster
        .start_with(counting.clone(), config, Box::new(DumbBalancer))
        .await;
    counting
}

#[tokio::test(start_paused = true)]
async fn tasks_that_arrive_while_a_claim_is_in_flight_go_in_one_batch() {
    // A store that takes 50 ms per transaction, and a task submitted every
    // millisecond: each pass finds one new task. Sent at once, each would
    // be a transaction of its own (320); held while a claim is in flight,
    // the next pass sends what arrived meanwhile, 32 to a transaction.
    let mut cluster = Cluster::new(EmbeddedStore::new());
    let node = start_counted(&mut cluster, "a", Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = node.counts();
    for i in 0..320 {
        cluster
            .submit(&format!("t{i:04}"), serde_json::json!({}))
            .await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eventually("the 320 tasks run", Duration::from_secs(10), || {
        cluster.observer.running_tasks() == 320
    })
    .await;
    let txns = node.counts().since(&before).txn;
    assert!(
        (10..=40).contains(&txns),
        "{txns} transactions claimed 320 tasks"
    );
}

#[tokio::test(start_paused = true)]
async fn claims_lost_to_other_nodes_cost_a_batch_one_more_transaction_not_one_per_task() {
    // Four nodes, each store answer 20 ms late, 2,000 tasks submitted 20
    // to a millisecond. A node whose own share ran out goes for the
    // others', which they are claiming that moment, so batches lose
    // compares. A batch that lost one used to claim each of its tasks on
    // its own; now the tasks still claimable go again in one transaction.
    let mut cluster = Cluster::new(EmbeddedStore::new());
    let mut stores = Vec::new();
    for name in ["a", "b", "c", "d"] {
        stores.push(start_counted(&mut cluster, name, Duration::from_millis(20)).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<_> = stores.iter().map(|store| store.counts()).collect();
    for i in 0..2_000 {
        cluster
            .submit(&format!("t{i:04}"), serde_json::json!({}))
            .await;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eventually("the 2,000 tasks run", Duration::from_secs(30), || {
        cluster.observer.running_tasks() == 2_000
    })
    .await;
    let conflicts: u64 = ["a", "b", "c", "d"]
        .iter()
        .map(|name| NodeStats::get(&cluster.node(name).stats().claim_conflicts))
        .sum();
    let txns: u64 = stores
        .iter()
        .zip(&before)
        .map(|(store, before)| store.counts().since(before).txn)
        .sum();
    assert!(
        conflicts >= 100,
        "only {conflicts} claims lost: no contention"
    );
    assert!(
        txns <= 200,
        "{txns} transactions claimed 2,000 tasks ({conflicts} claims lost)"
    );
    assert_eq!(cluster.observer.overlaps(), 0);
}

/// Not a test: a measurement (`cargo test --release -p eretes-runtime --test
/// claim_pass -- --ignored --nocapture`). 20,000 tasks the balancer skips,
/// each older than one of 20,000 it lets this node claim: the time until all
/// of the latter run, in real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_claiming_past_skipped_tasks() {
    for _ in 0..3 {
        let mut cluster = Cluster::new(EmbeddedStore::new());
        cluster.submit_idle(40_000).await;
        let started = Instant::now();
        node_with(
            &mut cluster,
            ClaimDecision::Skip(Duration::from_secs(600)),
            ClaimDecision::Claim,
        )
        .await;
        let deadline = started + Duration::from_secs(600);
        while cluster.observer.running_tasks() < 20_000 {
            assert!(Instant::now() < deadline, "not claimed within 600 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "claimed 20,000 tasks past 20,000 skipped ones in {} ms",
            started.elapsed().as_millis()
        );
        for node in cluster.nodes.values() {
            node.kill();
        }
    }
}

/// Not a test: a measurement (`cargo test --release -p eretes-runtime --test
/// claim_pass -- --ignored --nocapture`). What the fair balancer's answer
/// to one claim costs with 1,000 nodes serving the group: this node's
/// target alone, against every node's targets (what it computed before),
/// in the same run.
#[test]
#[ignore]
fn measure_fair_decisions_at_a_thousand_nodes() {
    use eretes_protocol::NodeName;
    use eretes_runtime::balancer::{fair_target_of, fair_targets_in, FairBalancer, GroupLoad};
    let group = GroupName::default();
    let mut load = GroupLoad::default();
    for i in 0..1000 {
        let node = NodeName::new(format!("n{i:04}")).unwrap();
        load.serving.insert(node.clone());
        load.owned.insert(node, 100 + i % 7);
    }
    load.unowned = 5000;
    let me = NodeName::new("n0500").unwrap();
    let mut view = ClusterView::new(me.clone());
    view.groups.insert(group.clone(), load);
    let task = TaskId::new("t").unwrap();
    let calls = 20_000;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut balancer = FairBalancer::default();
        for _ in 0..calls {
            std::hint::black_box(balancer.can_claim(&task, &group, &view));
        }
        let decision = started.elapsed() / calls;
        let started = std::time::Instant::now();
        for _ in 0..calls {
            std::hint::black_box(fair_targets_in(&view, &group).get(&me).copied());
        }
        let every_target = started.elapsed() / calls;
        assert_eq!(
            fair_target_of(&view, &group, &me),
            fair_targets_in(&view, &group).get(&me).copied()
        );
        println!(
            "fair can_claim at 1,000 nodes: {decision:?} a decision; every node's targets: \
             {every_target:?}"
        );
    }
}
