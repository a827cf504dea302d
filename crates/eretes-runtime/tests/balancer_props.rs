//! Properties of the fair balancer: the targets are fair and add up, and a
//! cluster of nodes that each run their own `FairBalancer` over shared counts
//! converges to within one task per node, releasing exactly the minimum number
//! of tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use eretes_protocol::{GroupName, NodeName, TaskId};
use eretes_runtime::balancer::{
    fair_target_of, fair_targets, fair_targets_in, min_moves, Balancer, ClaimDecision, ClusterView,
    FairBalancer, FairConfig, GroupLoad, RunningTask,
};
use proptest::prelude::*;
use tokio::time::Instant;

fn node(i: usize) -> NodeName {
    NodeName::new(format!("n{i}")).unwrap()
}

fn group() -> GroupName {
    GroupName::new("g").unwrap()
}

/// A group load where nodes `n0..` serve and own `counts`; with `omit_zeros`,
/// nodes owning nothing are left out of `owned`, as the runtime may do.
fn load_of(counts: &[usize], unowned: usize, omit_zeros: bool) -> GroupLoad {
    GroupLoad {
        serving: (0..counts.len()).map(node).collect(),
        owned: counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| !(omit_zeros && c == 0))
            .map(|(i, &c)| (node(i), c))
            .collect(),
        unowned,
        limit: Default::default(),
    }
}

/// Largest minus smallest owned count among serving nodes.
fn spread(load: &GroupLoad) -> usize {
    let counts: Vec<usize> = load.serving.iter().map(|n| load.owned_by(n)).collect();
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// 1–8 nodes; small counts half the time, so ties and near-balance are common.
fn counts_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![0..=3usize, 0..=40usize], 1..=8)
}

proptest! {
    #[test]
    fn one_nodes_target_is_its_entry_of_every_nodes_targets(
        counts_and_limits in prop::collection::vec(
            (0..=12usize, prop_oneof![Just(None), (0..=12usize).prop_map(Some)]),
            1..=8,
        ),
        elsewhere in prop::collection::vec(0..=6usize, 8),
        max_running in prop::collection::vec(prop_oneof![Just(None), (0..=20usize).prop_map(Some)], 8),
        unowned in 0..=40usize,
    ) {
        let counts: Vec<usize> = counts_and_limits.iter().map(|(owned, _)| *owned).collect();
        let mut load = load_of(&counts, unowned, false);
        for (i, &(_, limit)) in counts_and_limits.iter().enumerate() {
            if let Some(limit) = limit {
                load.limit.insert(node(i), limit);
            }
        }
        // Another group's tasks count against each node's max_running.
        let mut other = GroupLoad::default();
        for (i, owned) in elsewhere.iter().take(counts.len()).enumerate() {
            other.serving.insert(node(i));
            other.owned.insert(node(i), *owned);
        }
        let mut view = ClusterView::new(node(0));
        view.groups.insert(group(), load);
        view.groups.insert(GroupName::new("other").unwrap(), other);
        for (i, most) in max_running.iter().take(counts.len()).enumerate() {
            if let Some(most) = most {
                view.max_running.insert(node(i), *most);
            }
        }
        let all = fair_targets_in(&view, &group());
        for i in 0..counts.len() + 1 {
            prop_assert_eq!(
                fair_target_of(&view, &group(), &node(i)),
                all.get(&node(i)).copied(),
                "node {}", i
            );
        }
    }

    #[test]
    fn targets_are_fair_and_add_up(
        counts in counts_strategy(),
        unowned in 0..=40usize,
        omit_zeros in any::<bool>(),
        departed in 0..=10usize,
    ) {
        let mut load = load_of(&counts, unowned, omit_zeros);
        if departed > 0 {
            // An owner that no longer serves: its tasks count, it gets no share.
            load.owned.insert(NodeName::new("departed").unwrap(), departed);
        }
        let total = load.total();
        let n = counts.len();
        let targets = fair_targets(&load);
        prop_assert_eq!(targets.keys().cloned().collect::<BTreeSet<_>>(), load.serving.clone());
        prop_assert_eq!(targets.values().sum::<usize>(), total);
        let (base, extra) = (total / n, total % n);
        prop_assert!(targets.values().all(|&t| t == base || t == base + 1));
        prop_assert_eq!(targets.values().filter(|&&t| t == base + 1).count(), extra);
        let max = *targets.values().max().unwrap();
        let min = *targets.values().min().unwrap();
        prop_assert!(max - min <= 1);
        // The extra tasks go to the nodes owning the most: no node with a
        // smaller target owns more than one with a larger target.
        for (a, ta) in &targets {
            for (b, tb) in &targets {
                if ta > tb {
                    prop_assert!(load.owned_by(a) >= load.owned_by(b));
                }
            }
        }
        // min_moves is the excess over those targets.
        let excess: usize = targets
            .iter()
            .map(|(node, &t)| load.owned_by(node).saturating_sub(t))
            .sum();
        prop_assert_eq!(min_moves(&load), excess);
    }

    #[test]
    fn targets_keep_within_each_nodes_room_and_leave_no_task_beside_room(
        counts_and_limits in prop::collection::vec(
            (0..=12usize, prop_oneof![Just(None), (0..=12usize).prop_map(Some)]),
            1..=8,
        ),
        unowned in 0..=40usize,
    ) {
        // Claims never take a node over its limit, so it owns at most that.
        let counts: Vec<usize> = counts_and_limits
            .iter()
            .map(|&(owned, limit)| limit.map_or(owned, |l| owned.min(l)))
            .collect();
        let mut load = load_of(&counts, unowned, false);
        for (i, &(_, limit)) in counts_and_limits.iter().enumerate() {
            if let Some(limit) = limit {
                load.limit.insert(node(i), limit);
            }
        }
        let room = |i: usize| load.limit.get(&node(i)).copied().unwrap_or(usize::MAX);
        let targets = fair_targets(&load);
        let total = load.total();
        let all_room = (0..counts.len()).map(room).fold(0usize, usize::saturating_add);
        prop_assert_eq!(targets.values().sum::<usize>(), total.min(all_room));
        for i in 0..counts.len() {
            prop_assert!(targets[&node(i)] <= room(i));
        }
        // Among nodes below their room the shares are even.
        let open: Vec<usize> = (0..counts.len())
            .filter(|&i| targets[&node(i)] < room(i))
            .map(|i| targets[&node(i)])
            .collect();
        if let (Some(max), Some(min)) = (open.iter().max(), open.iter().min()) {
            prop_assert!(max - min <= 1, "{:?}", targets);
            // And no full node got more than an open one could have.
            for i in 0..counts.len() {
                prop_assert!(targets[&node(i)] <= max + 1, "{:?}", targets);
            }
        }
        // While tasks wait and some node has room, some node may claim.
        if unowned > 0 && (0..counts.len()).any(|i| counts[i] < room(i)) {
            let task = TaskId::new("waiting").unwrap();
            let claimers = (0..counts.len())
                .filter(|&i| {
                    let mut view = ClusterView::new(node(i));
                    view.groups.insert(group(), load.clone());
                    FairBalancer::default().can_claim(&task, &group(), &view)
                        == ClaimDecision::Claim
                })
                .count();
            prop_assert!(claimers >= 1, "{:?}", targets);
        }
    }

    #[test]
    fn someone_claims_while_tasks_wait(
        counts in counts_strategy(),
        unowned in 1..=40usize,
        omit_zeros in any::<bool>(),
    ) {
        // With work waiting, some serving node must be below its share, or the
        // task would never be picked up.
        let load = load_of(&counts, unowned, omit_zeros);
        let task = TaskId::new("waiting").unwrap();
        let claimers = (0..counts.len())
            .filter(|&i| {
                let mut view = ClusterView::new(node(i));
                view.groups.insert(group(), load.clone());
                FairBalancer::default().can_claim(&task, &group(), &view) == ClaimDecision::Claim
            })
            .count();
        prop_assert!(claimers >= 1);
    }

    #[test]
    fn cluster_converges_with_the_fewest_moves(
        counts in counts_strategy(),
        unowned in 0..=40usize,
        sequential in any::<bool>(),
        cap in prop_oneof![Just(usize::MAX), 1..=3usize],
        paced in any::<bool>(),
        omit_zeros in any::<bool>(),
    ) {
        // With the default 10 s pace no virtual time needs to pass: every round
        // ends with all tasks owned, so pacing never holds a release back for
        // long. Pace zero covers the unpaced path.
        let config = FairConfig {
            pace: if paced { FairConfig::default().pace } else { Duration::ZERO },
            max_release_per_round: cap,
            ..FairConfig::default()
        };
        let outcome = simulate(&counts, unowned, config, sequential, omit_zeros);
        let expected = min_moves(&load_of(&counts, unowned, false));
        prop_assert!(outcome.converged, "did not converge: {:?}", outcome);
        prop_assert_eq!(outcome.releases, expected, "{:?}", outcome);
        if cap == usize::MAX {
            prop_assert!(outcome.rounds <= 3, "{:?}", outcome);
        }
    }
}

/// What a simulated cluster did.
#[derive(Debug)]
struct Outcome {
    converged: bool,
    releases: usize,
    rounds: usize,
    final_counts: Vec<usize>,
}

/// The shared state of a simulated one-group cluster.
struct Cluster {
    /// Tasks each node runs.
    running: Vec<HashMap<TaskId, RunningTask>>,
    unowned: Vec<TaskId>,
    next_epoch: i64,
    start: Instant,
    omit_zeros: bool,
}

impl Cluster {
    fn counts(&self) -> Vec<usize> {
        self.running.iter().map(HashMap::len).collect()
    }

    fn load(&self) -> GroupLoad {
        load_of(&self.counts(), self.unowned.len(), self.omit_zeros)
    }

    fn view(&self, i: usize) -> ClusterView {
        let mut view = ClusterView::new(node(i));
        view.groups.insert(group(), self.load());
        view.running = self.running[i].clone();
        view
    }

    fn claim(&mut self, i: usize, task: TaskId) {
        self.next_epoch += 1;
        let running = RunningTask {
            group: group(),
            epoch: self.next_epoch,
            // Later claims get later times, as in a real cluster.
            claimed_at: self.start + Duration::from_millis(self.next_epoch as u64),
        };
        self.running[i].insert(task, running);
    }

    fn release(&mut self, i: usize, tasks: Vec<TaskId>) -> usize {
        let count = tasks.len();
        for task in tasks {
            assert!(
                self.running[i].remove(&task).is_some(),
                "n{i} released {task}, which it does not run"
            );
            self.unowned.push(task);
        }
        count
    }
}

/// Runs rounds of "every node balances, then nodes take turns claiming" until
/// every task is owned and the spread is at most one. With `sequential`, each
/// node balances on the counts left by the previous one; otherwise all balance
/// on the same snapshot (as nodes acting at the same moment would).
fn simulate(
    counts: &[usize],
    unowned: usize,
    config: FairConfig,
    sequential: bool,
    omit_zeros: bool,
) -> Outcome {
    let n = counts.len();
    let mut cluster = Cluster {
        running: vec![HashMap::new(); n],
        unowned: Vec::new(),
        next_epoch: 0,
        start: Instant::now(),
        omit_zeros,
    };
    let mut next_task = 0;
    let mut new_task = || {
        next_task += 1;
        TaskId::new(format!("t{next_task}")).unwrap()
    };
    for (i, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            let task = new_task();
            cluster.claim(i, task);
        }
    }
    cluster.unowned = (0..unowned).map(|_| new_task()).collect();
    let total = cluster.load().total();

    let mut balancers: Vec<FairBalancer> =
        (0..n).map(|_| FairBalancer::new(config.clone())).collect();
    // Capped releases need more rounds, but every round with a node above its
    // share releases at least one task.
    let max_rounds = 20
        + if config.max_release_per_round == usize::MAX {
            0
        } else {
            min_moves(&cluster.load())
        };
    let mut releases = 0;
    let mut rounds = 0;
    let settled = |c: &Cluster| c.unowned.is_empty() && spread(&c.load()) <= 1;
    while !settled(&cluster) && rounds < max_rounds {
        // Rotate who goes first, so no node is always first to act.
        let order: Vec<usize> = (0..n).map(|k| (k + rounds) % n).collect();
        rounds += 1;

        if sequential {
            for &i in &order {
                let released = balancers[i].balance(&cluster.view(i));
                releases += cluster.release(i, released);
            }
        } else {
            let views: Vec<ClusterView> = (0..n).map(|i| cluster.view(i)).collect();
            let decided: Vec<Vec<TaskId>> = order
                .iter()
                .map(|&i| balancers[i].balance(&views[i]))
                .collect();
            for (&i, released) in order.iter().zip(decided) {
                releases += cluster.release(i, released);
            }
        }

        // Nodes take turns, one claim each per pass, while anyone accepts.
        loop {
            let mut claimed = false;
            for &i in &order {
                let Some(task) = cluster.unowned.last().cloned() else {
                    break;
                };
                if balancers[i].can_claim(&task, &group(), &cluster.view(i)) == ClaimDecision::Claim
                {
                    cluster.unowned.pop();
                    cluster.claim(i, task);
                    claimed = true;
                }
            }
            if !claimed {
                break;
            }
        }
        assert_eq!(
            cluster.load().total(),
            total,
            "tasks were lost or duplicated"
        );
    }

    let converged = settled(&cluster);
    if converged {
        // Settled means stable: a further balance on every node releases nothing.
        for (i, balancer) in balancers.iter_mut().enumerate() {
            assert!(
                balancer.balance(&cluster.view(i)).is_empty(),
                "n{i} released after convergence"
            );
        }
        let targets: BTreeMap<NodeName, usize> = fair_targets(&cluster.load());
        for (i, count) in cluster.counts().into_iter().enumerate() {
            assert_eq!(targets[&node(i)], count, "n{i} not at its share");
        }
    }
    Outcome {
        converged,
        releases,
        rounds,
        final_counts: cluster.counts(),
    }
}

#[test]
fn worked_example_one_loaded_node() {
    // 10 tasks on one of four nodes: targets 3,3,2,2 (the loaded node keeps an
    // extra), so 7 moves, all in one round.
    let outcome = simulate(&[10, 0, 0, 0], 0, FairConfig::default(), false, true);
    assert!(outcome.converged);
    assert_eq!(outcome.releases, 7);
    assert_eq!(outcome.final_counts.iter().sum::<usize>(), 10);
    assert_eq!(outcome.rounds, 1);
}

#[test]
fn worked_example_new_node_joins() {
    // Three nodes at 4, a new one at 0, and 2 new tasks: T = 14, targets
    // 4,4,3,3 (the extras to the fullest): one node gives 1, the new node
    // takes 3.
    let outcome = simulate(&[4, 4, 4, 0], 2, FairConfig::default(), true, true);
    assert!(outcome.converged);
    assert_eq!(outcome.releases, 1);
    let mut finals = outcome.final_counts.clone();
    finals.sort_unstable();
    assert_eq!(finals, vec![3, 3, 4, 4]);
}

#[test]
fn within_one_nothing_moves() {
    let outcome = simulate(&[3, 2, 3, 2], 0, FairConfig::default(), false, true);
    assert_eq!(
        (outcome.converged, outcome.releases, outcome.rounds),
        (true, 0, 0)
    );
}
