//! Balancers: the local policy that decides whether this node may claim a task
//! now, and which of its tasks it should give back.
//!
//! eretes is masterless: every node runs its own balancer over the same shared
//! counts (which node owns how many tasks of each group, and how many wait
//! unowned), kept current by the runtime from the store's watch. Decisions are
//! local; hysteresis and pacing keep them from fighting each other.
//!
//! * [`DumbBalancer`] — always claim, never release.
//! * [`FairBalancer`] — per group, converge to within one task of the fair
//!   share with the fewest moves.
//! * [`ResourceBalancer`] — stop claiming and shed tasks while the machine's
//!   memory or CPU use is above a limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use eretes_protocol::{GroupName, NodeName, TaskId};
use tokio::time::Instant;

mod dumb;
mod fair;
mod resource;

pub use dumb::DumbBalancer;
pub use fair::{
    fair_target_of, fair_targets, fair_targets_in, min_moves, newest_first, FairBalancer,
    FairConfig,
};
pub use resource::{
    ProcSampler, ResourceBalancer, ResourceConfig, ResourceSample, ResourceSampler,
};

/// The load of one group across the cluster, as this node currently sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupLoad {
    /// Live nodes that serve this group (including this node, if it does).
    pub serving: BTreeSet<NodeName>,
    /// Tasks of this group owned by each node. A node may appear here without
    /// being in `serving` for a moment (its record vanished first); nodes in
    /// `serving` that own nothing may be absent (count 0).
    pub owned: BTreeMap<NodeName, usize>,
    /// Tasks of this group that exist and have no owner.
    pub unowned: usize,
    /// The most tasks of this group a serving node runs at once, for nodes
    /// with such a limit (`--slots`); absent means unlimited.
    pub limit: BTreeMap<NodeName, usize>,
}

impl GroupLoad {
    /// Tasks owned by `node`.
    pub fn owned_by(&self, node: &NodeName) -> usize {
        self.owned.get(node).copied().unwrap_or(0)
    }

    /// Every task of the group, owned or not.
    pub fn total(&self) -> usize {
        self.owned.values().sum::<usize>() + self.unowned
    }
}

/// One task this node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTask {
    /// Its group.
    pub group: GroupName,
    /// Its fencing epoch (the claim's store revision; larger = claimed later).
    pub epoch: i64,
    /// When this node claimed it (tokio clock).
    pub claimed_at: Instant,
}

/// What a balancer sees: this node, the per-group loads, and this node's tasks.
/// The runtime maintains it incrementally; balancers only read it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This node.
    pub me: NodeName,
    /// Load per group (only groups with tasks or serving nodes appear).
    pub groups: HashMap<GroupName, GroupLoad>,
    /// The tasks this node runs now.
    pub running: HashMap<TaskId, RunningTask>,
    /// The most tasks a node runs at once over all its groups, for nodes
    /// with such a limit (`--max-running`); absent means unlimited.
    pub max_running: HashMap<NodeName, usize>,
}

impl ClusterView {
    /// An empty view for node `me`.
    pub fn new(me: NodeName) -> Self {
        ClusterView {
            me,
            groups: HashMap::new(),
            running: HashMap::new(),
            max_running: HashMap::new(),
        }
    }

    /// How many tasks of `group` `node` can run at most, given its limits:
    /// its slots for the group, and its `max_running` less what it runs of
    /// other groups. Every node computes the same from the same counts.
    pub fn room_for(&self, node: &NodeName, group: &GroupName) -> usize {
        let load = self.groups.get(group);
        let slots = load
            .and_then(|load| load.limit.get(node).copied())
            .unwrap_or(usize::MAX);
        let Some(&most) = self.max_running.get(node) else {
            return slots;
        };
        let elsewhere: usize = self
            .groups
            .iter()
            .filter(|(other, _)| *other != group)
            .map(|(_, load)| load.owned_by(node))
            .sum();
        slots.min(most.saturating_sub(elsewhere))
    }

    /// The load of `group` (empty if unknown).
    pub fn group(&self, group: &GroupName) -> GroupLoad {
        self.groups.get(group).cloned().unwrap_or_default()
    }
}

/// A balancer's answer to "may I claim this task now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimDecision {
    /// Claim it.
    Claim,
    /// Claim nothing of this group now: ask again after this long, or
    /// sooner when the group's counts change in a way that may let this
    /// node claim (an owner record of the group went, a claim was lost, a
    /// task of the group appeared, a node joined or left). For a decision about the group or the node (its share,
    /// its resources), not this task.
    RetryAfter(Duration),
    /// Not this task for now (ask again after this long), but go on with
    /// the group's others: for a decision about one task, not the group
    /// (e.g. a task that another node should take over first).
    Skip(Duration),
}

/// A claim and release policy. Called only from the node's main loop, never
/// concurrently; must not block.
pub trait Balancer: Send + 'static {
    /// Whether this node may claim `task` (of `group`) now.
    fn can_claim(&mut self, task: &TaskId, group: &GroupName, view: &ClusterView) -> ClaimDecision;

    /// Tasks this node should release now (the runtime stops their handlers
    /// and releases them). Called every balance interval and on demand.
    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId>;

    /// Tasks of `group` that a claim pass asks [`Balancer::can_claim`]
    /// about before any other candidate, in this order, and even while the
    /// group waits after a [`ClaimDecision::RetryAfter`]: tasks this node
    /// has a reason of its own to take (a hot standby of them, say). Those
    /// that are not unowned candidates now (owned, held back, being
    /// claimed) are passed over. Without this, a wait that another task's
    /// answer brought (this node is at its fair share) kept such a task
    /// from being asked at all. Called only while the group has unowned
    /// candidates. None by default.
    fn claim_first(&mut self, group: &GroupName, view: &ClusterView) -> Vec<TaskId> {
        let _ = (group, view);
        Vec::new()
    }
}
