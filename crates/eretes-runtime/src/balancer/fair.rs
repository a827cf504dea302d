//! Fair share per group, reached with the fewest moves and without flapping.
//!
//! Every node runs the same arithmetic over the same shared counts, so they all
//! agree on each node's share without talking to each other:
//!
//! * a group with `T` tasks (owned or not) served by `N` live nodes gives every
//!   serving node `T / N` tasks, and `T % N` of them one more;
//! * the "one more" goes to the nodes that already hold the most (ties broken
//!   by name), so the nodes that must move the fewest tasks keep them, and the
//!   shares always add up to `T`;
//! * a node claims only while it is below its share, so an idle node wins the
//!   race for a free task against a busy one simply because the busy one
//!   defers;
//! * a node above its share releases the excess, newest first, but only when
//!   the group is unbalanced by two or more (hysteresis) and not while earlier
//!   releases are still waiting for a new owner (pacing).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use eretes_protocol::{GroupName, NodeName, TaskId};
use tokio::time::Instant;

use super::{Balancer, ClaimDecision, ClusterView, GroupLoad, RunningTask};

/// Settings of a [`FairBalancer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FairConfig {
    /// How long the group waits after this node declined a task because it
    /// already holds its fair share ([`ClaimDecision::RetryAfter`]), unless
    /// its counts change first. Default: 250 ms. Short, so a share that
    /// grows in a way the runtime does not see as a change is noticed
    /// quickly.
    pub claim_retry: Duration,
    /// While a group still has unowned tasks, this node releases more tasks of
    /// that group only if at least this long has passed since its own last
    /// release there; this lets the other nodes pick up what was released
    /// before it judges the balance again. Default: 10 s. Zero disables pacing.
    pub pace: Duration,
    /// At most this many tasks of one group are released per call to
    /// [`Balancer::balance`]. Default: `usize::MAX` (no limit: release the whole
    /// excess at once, which is the fewest rounds). Zero never releases.
    pub max_release_per_round: usize,
}

impl Default for FairConfig {
    fn default() -> Self {
        FairConfig {
            claim_retry: Duration::from_millis(250),
            pace: Duration::from_secs(10),
            max_release_per_round: usize::MAX,
        }
    }
}

/// Converges every group to within one task of its fair share, per node,
/// moving no more tasks than necessary.
///
/// Every node computes the same shares from the same counts
/// ([`fair_targets`]), so no coordination is needed:
///
/// * **claim** only while this node owns fewer tasks of the group than its
///   share; at its share it defers, so a less loaded node takes the task;
/// * **release** the excess over its share, the most recently claimed tasks
///   first (they have done the least work); the excess of the tasks it still
///   runs, so that tasks it is already giving back (their owner records
///   stay until their ends are written) are not counted twice; but only when the serving nodes'
///   counts differ by two or more (hysteresis: within one is balanced), and,
///   while the group has unowned tasks, only after [`FairConfig::pace`] since
///   this node's last release of that group (pacing: let the released tasks
///   find owners before judging again).
///
/// With every node of a cluster running it, a group ends with each serving
/// node at its share, and the number of tasks released equals [`min_moves`] of
/// the starting load.
#[derive(Debug, Clone, Default)]
pub struct FairBalancer {
    config: FairConfig,
    /// When this balancer last released tasks of each group (for pacing).
    last_release: HashMap<GroupName, Instant>,
}

impl FairBalancer {
    /// A fair balancer with the given settings.
    pub fn new(config: FairConfig) -> Self {
        FairBalancer {
            config,
            last_release: HashMap::new(),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &FairConfig {
        &self.config
    }

    /// How many tasks of `group` (with load `load`) this balancer releases
    /// now, before capping by the tasks it actually runs.
    fn releasable(
        &self,
        view: &ClusterView,
        group: &GroupName,
        load: &GroupLoad,
        now: Instant,
    ) -> usize {
        let me = &view.me;
        let Some(target) = fair_target_of(view, group, me) else {
            return 0;
        };
        // What this node still runs, not what the store says it owns: a
        // task it released keeps its owner record until the end of its run
        // is written, and counting it again released it twice. (When a node
        // rejoined 100,000 tasks on a slow etcd, each balance pass of the
        // nine others released their whole excess again while the last
        // pass's ends still waited, 3,222 tasks for an excess of 1,111.)
        let running_here = view
            .running
            .values()
            .filter(|task| task.group == *group)
            .count();
        let excess = load.owned_by(me).min(running_here).saturating_sub(target);
        if excess == 0 {
            return 0;
        }
        // Hysteresis: a group within one task is as balanced as integers allow
        // for some choice of who gets the +1; moving anything would only shuffle.
        if serving_spread(load) < 2 {
            return 0;
        }
        // Pacing: unowned tasks may be the ones released last time, not yet
        // picked up; the counts will change once they are, so wait for that
        // (or for `pace`) instead of acting on a picture that is still moving.
        if load.unowned > 0 {
            if let Some(last) = self.last_release.get(group) {
                if now.saturating_duration_since(*last) < self.config.pace {
                    return 0;
                }
            }
        }
        excess.min(self.config.max_release_per_round)
    }
}

impl Balancer for FairBalancer {
    fn can_claim(
        &mut self,
        _task: &TaskId,
        group: &GroupName,
        view: &ClusterView,
    ) -> ClaimDecision {
        let below_share = view.groups.get(group).is_some_and(|load| {
            fair_target_of(view, group, &view.me)
                .is_some_and(|target| load.owned_by(&view.me) < target)
        });
        if below_share {
            ClaimDecision::Claim
        } else {
            // At (or above) the share, not serving the group, or nobody serves
            // it: defer, so that a node below its share gets the task.
            ClaimDecision::RetryAfter(self.config.claim_retry)
        }
    }

    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId> {
        let now = Instant::now();
        // Forget groups that are gone, so the pacing map cannot grow forever.
        self.last_release
            .retain(|group, _| view.groups.contains_key(group));

        // Sorted for a deterministic order of the result.
        let mut groups: Vec<(&GroupName, &GroupLoad)> = view
            .groups
            .iter()
            .filter(|(_, load)| load.serving.contains(&view.me))
            .collect();
        groups.sort_by(|a, b| a.0.cmp(b.0));

        let mut released = Vec::new();
        for (group, load) in groups {
            let count = self.releasable(view, group, load, now);
            if count == 0 {
                continue;
            }
            let picked: Vec<TaskId> = newest_first(view, |task| task.group == *group)
                .into_iter()
                .take(count)
                .collect();
            if picked.is_empty() {
                continue;
            }
            tracing::debug!(
                group = %group,
                owned = load.owned_by(&view.me),
                releasing = picked.len(),
                "fair balancer: above fair share, releasing the newest tasks"
            );
            self.last_release.insert(group.clone(), now);
            released.extend(picked);
        }
        released
    }
}

/// The fair share of every node serving the group described by `load`,
/// counting each node's slots for the group (`load.limit`).
///
/// With `T = load.total()` tasks and `N = load.serving.len()` serving nodes,
/// each serving node gets `T / N`, and the first `T % N` of them, ranked by
/// tasks owned now (most first) and then by name, get one more. A node whose
/// limit is below that gets its limit, and what it cannot take is shared the
/// same way among the others (water-filling), so tasks beyond a small node's
/// room are not left pending beside nodes with room. The targets add up to
/// `T` when the nodes have room for all (else to their room), differ by at
/// most one among nodes below their limits, and are the same on every node
/// that sees the same counts. Owners that no longer serve the group get no
/// target, but their tasks count in `T`: they will come free. Empty when
/// nobody serves the group.
pub fn fair_targets(load: &GroupLoad) -> BTreeMap<NodeName, usize> {
    capped_targets(load, |node| {
        load.limit.get(node).copied().unwrap_or(usize::MAX)
    })
}

/// [`fair_targets`] with each node's room from the whole view: its slots
/// for `group` and what its `max_running` leaves after its other groups.
pub fn fair_targets_in(view: &ClusterView, group: &GroupName) -> BTreeMap<NodeName, usize> {
    match view.groups.get(group) {
        Some(load) => capped_targets(load, |node| view.room_for(node, group)),
        None => BTreeMap::new(),
    }
}

/// What water-filling leaves: the nodes capped at their room, and the even
/// share of the rest among the others (`base` each, one more for the
/// `extra` of them that own the most).
struct Shares<'a> {
    capped: Vec<(&'a NodeName, usize)>,
    open: Vec<&'a NodeName>,
    base: usize,
    extra: usize,
}

/// Water-filling: nodes whose room is below the even share of what is left
/// get their room; the rest is split evenly among the others.
fn water_fill<'a>(load: &'a GroupLoad, room: impl Fn(&NodeName) -> usize) -> Shares<'a> {
    let mut capped = Vec::new();
    let mut open: Vec<(&NodeName, usize)> =
        load.serving.iter().map(|node| (node, room(node))).collect();
    let mut left = load.total();
    while !open.is_empty() {
        let level = left.div_ceil(open.len());
        let (full, rest): (Vec<_>, Vec<_>) = open.into_iter().partition(|(_, room)| *room < level);
        open = rest;
        if full.is_empty() {
            break;
        }
        for (node, room) in full {
            capped.push((node, room));
            left -= room;
        }
    }
    let (base, extra) = match open.len() {
        0 => (0, 0),
        n => (left / n, left % n),
    };
    Shares {
        capped,
        open: open.into_iter().map(|(node, _)| node).collect(),
        base,
        extra,
    }
}

/// The order in which open nodes get the one more: those that own the most
/// first, then by name.
fn rank_key<'a>(load: &GroupLoad, node: &'a NodeName) -> (Reverse<usize>, &'a NodeName) {
    (Reverse(load.owned_by(node)), node)
}

/// Every serving node's target (see [`fair_targets`]).
fn capped_targets(
    load: &GroupLoad,
    room: impl Fn(&NodeName) -> usize,
) -> BTreeMap<NodeName, usize> {
    let shares = water_fill(load, room);
    let mut targets: BTreeMap<NodeName, usize> = shares
        .capped
        .iter()
        .map(|(node, room)| ((*node).clone(), *room))
        .collect();
    let mut ranked = shares.open;
    ranked.sort_by_key(|node| rank_key(load, node));
    for (rank, node) in ranked.into_iter().enumerate() {
        targets.insert(node.clone(), shares.base + usize::from(rank < shares.extra));
    }
    targets
}

/// `node`'s entry of [`fair_targets_in`] alone, in one pass over the
/// serving nodes: no sort and no map of every node's target. A claim asks
/// the balancer about one node, itself, once per task it claims; at a
/// thousand serving nodes, building every target for it cost a sort and a
/// thousand map entries per claim.
pub fn fair_target_of(view: &ClusterView, group: &GroupName, node: &NodeName) -> Option<usize> {
    let load = view.groups.get(group)?;
    let shares = water_fill(load, |n| view.room_for(n, group));
    if let Some((_, room)) = shares.capped.iter().find(|(n, _)| *n == node) {
        return Some(*room);
    }
    let mine = shares.open.iter().find(|n| **n == node)?;
    let key = rank_key(load, mine);
    let rank = shares
        .open
        .iter()
        .filter(|other| rank_key(load, other) < key)
        .count();
    Some(shares.base + usize::from(rank < shares.extra))
}

/// The fewest tasks that serving nodes must release to bring the group to its
/// [`fair_targets`]: the sum over serving nodes of what each owns above its
/// target. No other assignment within one task of fair needs fewer, because
/// the targets give the extra tasks to the nodes that hold the most.
///
/// Tasks held by owners that no longer serve the group are not counted: they
/// come free when those owners go, without anyone releasing them.
pub fn min_moves(load: &GroupLoad) -> usize {
    fair_targets(load)
        .iter()
        .map(|(node, &target)| load.owned_by(node).saturating_sub(target))
        .sum()
}

/// Largest minus smallest count among serving nodes (absent ones own 0).
fn serving_spread(load: &GroupLoad) -> usize {
    let counts = load.serving.iter().map(|node| load.owned_by(node));
    match (counts.clone().max(), counts.min()) {
        (Some(max), Some(min)) => max - min,
        _ => 0,
    }
}

/// This node's tasks that match `keep`, the most recently claimed first (ties:
/// larger epoch, then larger id). Releasing from the front disturbs the least
/// work: those tasks have run the shortest time.
pub fn newest_first(view: &ClusterView, keep: impl Fn(&RunningTask) -> bool) -> Vec<TaskId> {
    let mut tasks: Vec<(&TaskId, &RunningTask)> =
        view.running.iter().filter(|(_, task)| keep(task)).collect();
    tasks.sort_by(|(a_id, a), (b_id, b)| {
        (b.claimed_at, b.epoch, *b_id).cmp(&(a.claimed_at, a.epoch, *a_id))
    });
    tasks.into_iter().map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn group(name: &str) -> GroupName {
        GroupName::new(name).unwrap()
    }

    fn task(name: &str) -> TaskId {
        TaskId::new(name).unwrap()
    }

    /// A load where every listed node serves and owns the given count.
    fn load(counts: &[(&str, usize)], unowned: usize) -> GroupLoad {
        GroupLoad {
            serving: counts.iter().map(|(n, _)| node(n)).collect(),
            owned: counts
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|(n, c)| (node(n), *c))
                .collect(),
            unowned,
            limit: BTreeMap::new(),
        }
    }

    fn targets(load: &GroupLoad) -> Vec<(String, usize)> {
        fair_targets(load)
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect()
    }

    /// A view for `me` with one group "g" and `running` tasks of it claimed at
    /// increasing times (t0 oldest).
    fn view(me: &str, load: GroupLoad, running: usize) -> ClusterView {
        let mut view = ClusterView::new(node(me));
        view.groups.insert(group("g"), load);
        let start = Instant::now();
        for i in 0..running {
            view.running.insert(
                task(&format!("t{i}")),
                RunningTask {
                    group: group("g"),
                    epoch: i as i64,
                    claimed_at: start + Duration::from_secs(i as u64),
                },
            );
        }
        view
    }

    fn retry() -> ClaimDecision {
        ClaimDecision::RetryAfter(FairConfig::default().claim_retry)
    }

    #[test]
    fn defaults_are_documented_values() {
        let config = FairConfig::default();
        assert_eq!(config.claim_retry, Duration::from_millis(250));
        assert_eq!(config.pace, Duration::from_secs(10));
        assert_eq!(config.max_release_per_round, usize::MAX);
    }

    #[test]
    fn a_node_with_less_room_than_its_share_gets_its_room_and_the_rest_is_shared() {
        // 10 tasks over a (slots 1), b and c: a gets 1, b and c 9 between them.
        let mut l = load(&[("a", 0), ("b", 0), ("c", 0)], 10);
        l.limit.insert(node("a"), 1);
        assert_eq!(
            targets(&l),
            vec![("a".into(), 1), ("b".into(), 5), ("c".into(), 4)]
        );
        // Room for fewer than there are tasks: every node at its room.
        l.limit.insert(node("b"), 2);
        l.limit.insert(node("c"), 3);
        assert_eq!(
            targets(&l),
            vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]
        );
        // A limit above the even share changes nothing.
        let mut l = load(&[("a", 0), ("b", 0)], 6);
        l.limit.insert(node("a"), 3);
        assert_eq!(targets(&l), vec![("a".into(), 3), ("b".into(), 3)]);
    }

    #[test]
    fn max_running_counts_what_a_node_runs_of_its_other_groups() {
        // "small" may run 1 task in all and runs one of group h: it has no
        // room for g, whose 4 tasks all go to "big"; without the h task it
        // would get 1 of g.
        let mut v = view("big", load(&[("big", 0), ("small", 0)], 4), 0);
        v.max_running.insert(node("small"), 1);
        let mut other = load(&[("big", 0), ("small", 1)], 0);
        other.serving.insert(node("small"));
        v.groups.insert(group("h"), other);
        let targets: Vec<(String, usize)> = fair_targets_in(&v, &group("g"))
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
        assert_eq!(targets, vec![("big".into(), 4), ("small".into(), 0)]);
        assert_eq!(
            FairBalancer::default().can_claim(&task("x"), &group("g"), &v),
            ClaimDecision::Claim
        );
        v.groups.remove(&group("h"));
        assert_eq!(fair_targets_in(&v, &group("g"))[&node("small")], 1);
    }

    #[test]
    fn targets_give_the_extra_to_the_fullest_nodes() {
        // T = 7 over 3 nodes: base 2, one extra, to the node owning most.
        let l = load(&[("a", 1), ("b", 5), ("c", 1)], 0);
        assert_eq!(
            targets(&l),
            vec![("a".into(), 2), ("b".into(), 3), ("c".into(), 2)]
        );
        // Ties on count go by name.
        let l = load(&[("a", 0), ("b", 0), ("c", 0)], 5);
        assert_eq!(
            targets(&l),
            vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 1)]
        );
        let l = load(&[("a", 2), ("b", 3), ("c", 3)], 0);
        assert_eq!(
            targets(&l),
            vec![("a".into(), 2), ("b".into(), 3), ("c".into(), 3)]
        );
    }

    #[test]
    fn targets_edge_cases() {
        // Nobody serves: no targets, nothing to move.
        let mut l = load(&[], 4);
        l.owned.insert(node("gone"), 3);
        assert!(fair_targets(&l).is_empty());
        assert_eq!(min_moves(&l), 0);
        // No tasks: everyone gets zero.
        let l = load(&[("a", 0), ("b", 0)], 0);
        assert_eq!(targets(&l), vec![("a".into(), 0), ("b".into(), 0)]);
        // A departed owner's tasks count in T and come back to the servers.
        let mut l = load(&[("a", 1), ("b", 1)], 0);
        l.owned.insert(node("gone"), 4);
        assert_eq!(targets(&l), vec![("a".into(), 3), ("b".into(), 3)]);
        assert_eq!(min_moves(&l), 0);
    }

    #[test]
    fn min_moves_counts_only_the_excess() {
        assert_eq!(min_moves(&load(&[("a", 6), ("b", 0), ("c", 0)], 0)), 4);
        assert_eq!(min_moves(&load(&[("a", 4), ("b", 3), ("c", 0)], 0)), 2);
        assert_eq!(min_moves(&load(&[("a", 3), ("b", 2)], 0)), 0);
        // Unowned tasks raise the targets, so fewer moves are needed.
        assert_eq!(min_moves(&load(&[("a", 4), ("b", 0)], 4)), 0);
    }

    #[test]
    fn claims_only_below_the_share() {
        let mut b = FairBalancer::default();
        let t = task("new");
        let g = group("g");
        // T = 4 over 2: each gets 2.
        let v = view("a", load(&[("a", 1), ("b", 2)], 1), 1);
        assert_eq!(b.can_claim(&t, &g, &v), ClaimDecision::Claim);
        let v = view("b", load(&[("a", 1), ("b", 2)], 1), 2);
        assert_eq!(b.can_claim(&t, &g, &v), retry());
        // The +1 goes to the fuller node, so "b" at 2 of T = 3 defers and "a"
        // takes the task.
        let v = view("b", load(&[("a", 0), ("b", 2)], 1), 2);
        assert_eq!(b.can_claim(&t, &g, &v), retry());
        let v = view("a", load(&[("a", 0), ("b", 2)], 1), 0);
        assert_eq!(b.can_claim(&t, &g, &v), ClaimDecision::Claim);
    }

    #[test]
    fn never_claims_when_not_serving_or_nobody_serves() {
        let mut b = FairBalancer::new(FairConfig {
            claim_retry: Duration::from_millis(250),
            ..FairConfig::default()
        });
        let t = task("new");
        let g = group("g");
        let wait = ClaimDecision::RetryAfter(Duration::from_millis(250));
        // "me" is not among the serving nodes.
        let v = view("me", load(&[("a", 0)], 3), 0);
        assert_eq!(b.can_claim(&t, &g, &v), wait);
        // N = 0.
        let v = view("me", load(&[], 3), 0);
        assert_eq!(b.can_claim(&t, &g, &v), wait);
        // Unknown group.
        assert_eq!(b.can_claim(&t, &group("other"), &v), wait);
        // T = 0 cannot happen when offered a task, but must not claim either.
        let v = view("a", load(&[("a", 0)], 0), 0);
        assert_eq!(b.can_claim(&t, &g, &v), wait);
    }

    #[test]
    fn releases_the_excess_newest_first() {
        let mut b = FairBalancer::default();
        // T = 6 over 3: "a" holds 4, two above its share.
        let v = view("a", load(&[("a", 4), ("b", 1), ("c", 1)], 0), 4);
        assert_eq!(b.balance(&v), vec![task("t3"), task("t2")]);
        // The others are at or below their share.
        let v = view("b", load(&[("a", 4), ("b", 1), ("c", 1)], 0), 1);
        assert!(b.balance(&v).is_empty());
    }

    #[test]
    fn release_order_breaks_ties_by_epoch_then_id() {
        let mut v = view("a", load(&[("a", 3), ("b", 0)], 0), 0);
        let at = Instant::now();
        for (id, epoch) in [("x", 5), ("y", 9), ("z", 5)] {
            v.running.insert(
                task(id),
                RunningTask {
                    group: group("g"),
                    epoch,
                    claimed_at: at,
                },
            );
        }
        // An older task of another group must never be picked for "g".
        v.running.insert(
            task("other"),
            RunningTask {
                group: group("h"),
                epoch: 100,
                claimed_at: at + Duration::from_secs(5),
            },
        );
        assert_eq!(
            newest_first(&v, |t| t.group == group("g")),
            vec![task("y"), task("z"), task("x")]
        );
        // T = 3 over 2: "a" keeps 2, releases the newest one.
        assert_eq!(FairBalancer::default().balance(&v), vec![task("y")]);
    }

    #[test]
    fn hysteresis_spread_of_one_never_releases() {
        let mut b = FairBalancer::default();
        // 3/2/2 is within one: nothing moves, whoever runs the balancer.
        for me in ["a", "b", "c"] {
            let v = view(me, load(&[("a", 3), ("b", 2), ("c", 2)], 0), 3);
            assert!(b.balance(&v).is_empty(), "{me} released");
        }
        // Spread 1 even though a departed owner's tasks inflate T.
        let mut l = load(&[("a", 2), ("b", 1)], 0);
        l.owned.insert(node("gone"), 5);
        assert!(b.balance(&view("a", l, 2)).is_empty());
    }

    #[test]
    fn a_node_absent_from_owned_counts_as_zero() {
        let mut b = FairBalancer::default();
        // "b" serves and owns nothing (absent from `owned`): spread 2.
        let mut l = load(&[("a", 2)], 0);
        l.serving.insert(node("b"));
        assert_eq!(b.balance(&view("a", l, 2)), vec![task("t1")]);
    }

    #[test]
    fn ignores_groups_it_does_not_serve() {
        let mut b = FairBalancer::default();
        let mut l = load(&[("b", 0), ("c", 0)], 0);
        l.owned.insert(node("a"), 4);
        assert!(b.balance(&view("a", l, 4)).is_empty());
    }

    #[test]
    fn caps_releases_per_round() {
        let mut b = FairBalancer::new(FairConfig {
            max_release_per_round: 1,
            ..FairConfig::default()
        });
        let v = view("a", load(&[("a", 6), ("b", 0)], 0), 6);
        assert_eq!(b.balance(&v), vec![task("t5")]);
        let mut b = FairBalancer::new(FairConfig {
            max_release_per_round: 0,
            ..FairConfig::default()
        });
        assert!(b.balance(&v).is_empty());
    }

    #[test]
    fn never_releases_more_than_it_runs() {
        // The counts say 5 but the node runs only one task of the group: the
        // other four are on their way out (ends not written yet), and what
        // it runs is below its share of 3.
        let mut b = FairBalancer::default();
        let v = view("a", load(&[("a", 5), ("b", 0)], 0), 1);
        assert!(b.balance(&v).is_empty());
        // Runs 4 of the 5 it owns: one above its share.
        let v = view("a", load(&[("a", 5), ("b", 0)], 0), 4);
        assert_eq!(b.balance(&v), vec![task("t3")]);
    }

    #[test]
    fn tasks_whose_release_is_still_being_written_are_not_released_again() {
        // 13 over 2 nodes: share 7 (+1 to "a"). "a" released 5 of its 12;
        // their owner records stay until the ends are written, so the
        // counts still say 12 while it runs 7. The next pass (no unowned
        // task yet, so no pacing) must release nothing more.
        let mut b = FairBalancer::default();
        let first = view("a", load(&[("a", 12), ("b", 1)], 0), 12);
        assert_eq!(b.balance(&first).len(), 5);
        let pending = view("a", load(&[("a", 12), ("b", 1)], 0), 7);
        assert!(b.balance(&pending).is_empty(), "released twice");
    }

    #[tokio::test(start_paused = true)]
    async fn paces_releases_while_earlier_ones_are_unclaimed() {
        let mut b = FairBalancer::default();
        // 8/0/0: share 3 (+1 to "a"), so 5 go.
        let v = view("a", load(&[("a", 8), ("b", 0), ("c", 0)], 0), 8);
        assert_eq!(b.balance(&v).len(), 5);

        // Nobody picked them up yet and the counts now (wrongly) still say
        // "a" is over: no new release until the pace has elapsed.
        let stale = view("a", load(&[("a", 6), ("b", 0), ("c", 0)], 2), 6);
        assert!(b.balance(&stale).is_empty());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(b.balance(&stale).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.balance(&stale).len(), 3);

        // Once nothing is unowned, no waiting is needed.
        let settled = view("a", load(&[("a", 5), ("b", 1), ("c", 0)], 0), 5);
        assert_eq!(b.balance(&settled).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_is_per_group_and_first_release_is_not_delayed() {
        let mut b = FairBalancer::default();
        let mut v = view("a", load(&[("a", 4), ("b", 0)], 2), 4);
        // Never released before: unowned tasks do not hold the first release.
        assert_eq!(b.balance(&v).len(), 1);
        // A second group released independently of the first's pacing.
        v.groups.insert(group("h"), load(&[("a", 4), ("b", 0)], 0));
        for i in 0..4 {
            v.running.insert(
                task(&format!("h{i}")),
                RunningTask {
                    group: group("h"),
                    epoch: 100 + i,
                    claimed_at: Instant::now(),
                },
            );
        }
        assert_eq!(b.balance(&v), vec![task("h3"), task("h2")]);
    }
}
