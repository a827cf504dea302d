//! Node configuration with documented defaults.

use std::collections::HashMap;
use std::time::Duration;

use eretes_protocol::{GroupName, Namespace, NodeName, DEFAULT_TAKEOVER_LIMIT, MAX_CLAIM_BATCH};

/// How one node behaves. Build it with [`NodeConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name, unique among live nodes.
    pub name: NodeName,
    /// The namespace the cluster lives in.
    pub namespace: Namespace,
    /// The groups this node serves. Default: `["default"]`.
    pub groups: Vec<GroupName>,
    /// Most tasks of one group this node runs at once. Default: unlimited.
    pub slots: usize,
    /// Per-group overrides of `slots`.
    pub group_slots: HashMap<GroupName, usize>,
    /// Most tasks this node runs at once over all its groups (mawex's pod
    /// rule: a small machine used fully, never overloaded). Default:
    /// unlimited.
    pub max_running: usize,
    /// TTL of the node's lease. A dead node's tasks move after at most this
    /// long. Default 10 s.
    pub lease_ttl: Duration,
    /// How long before the lease could expire the node fences itself when it
    /// cannot renew. Default: a quarter of the TTL.
    pub fence_margin: Duration,
    /// How often the lease is renewed. Default: a third of the TTL.
    pub keepalive_interval: Duration,
    /// How often the node re-lists everything and retries missed claims. Default 30 s;
    /// each wait is spread by a quarter either way, so that nodes started
    /// together do not re-list together, and stretched when listings are slow
    /// or the cluster has more than 10 live nodes (by nodes / 10, up to 10 ×).
    pub resync_interval: Duration,
    /// How often the balancer runs. Default 30 s.
    pub balance_interval: Duration,
    /// How soon after a node joins or leaves the balancer runs. Default 2 s.
    pub membership_balance_delay: Duration,
    /// How long a cancelled handler may take to return before it is dropped
    /// and its task released. Default 10 s.
    pub handler_grace: Duration,
    /// Upper bound on a graceful shutdown. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Most tasks being claimed at once, over every claim transaction in
    /// flight. Default 128. The node lets fewer be in flight while claim
    /// transactions are slow (see `NodeStats::claim_window`).
    pub max_claims_in_flight: usize,
    /// Most tasks one claim transaction carries when several are claimable
    /// at once; 1 claims them one by one. Default and upper bound:
    /// [`MAX_CLAIM_BATCH`] (32).
    pub claim_batch: usize,
    /// After releasing a task, this node does not claim it again for this
    /// long, so another node gets it. Default 5 s.
    pub release_ignore: Duration,
    /// Takeovers after which a task is parked as failed. Default 5.
    pub takeover_limit: u32,
    /// Where the lease keepalive runs. Default `None`: on the node's own
    /// runtime, as a task of its own. A handle to another runtime (a thread
    /// of its own) keeps renewals on time when the node's runtime is
    /// saturated: many nodes in one process, or handlers that hog their
    /// worker threads. It protects the whole renewal only with a store
    /// whose client does its I/O in the calling task (the embedded store);
    /// etcd's client sends through a connection task on the runtime that
    /// created it. Under paused tokio time it must stay `None`: another
    /// runtime's clock is not paused.
    pub keepalive_runtime: Option<tokio::runtime::Handle>,
}

impl NodeConfig {
    /// A configuration with the defaults above.
    pub fn new(name: NodeName, namespace: Namespace) -> Self {
        let lease_ttl = Duration::from_secs(10);
        NodeConfig {
            name,
            namespace,
            groups: vec![GroupName::default_group()],
            slots: usize::MAX,
            group_slots: HashMap::new(),
            max_running: usize::MAX,
            lease_ttl,
            fence_margin: lease_ttl / 4,
            keepalive_interval: lease_ttl / 3,
            resync_interval: Duration::from_secs(30),
            balance_interval: Duration::from_secs(30),
            membership_balance_delay: Duration::from_secs(2),
            handler_grace: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_claims_in_flight: 128,
            claim_batch: MAX_CLAIM_BATCH,
            release_ignore: Duration::from_secs(5),
            takeover_limit: DEFAULT_TAKEOVER_LIMIT,
            keepalive_runtime: None,
        }
    }

    /// Set the lease TTL and derive the fence margin and keepalive interval from it.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self.fence_margin = ttl / 4;
        self.keepalive_interval = ttl / 3;
        self
    }

    /// The slot limit of `group`.
    pub fn slots_for(&self, group: &GroupName) -> usize {
        self.group_slots.get(group).copied().unwrap_or(self.slots)
    }

    /// Check the settings fit together; names the first that does not.
    pub fn validate(&self) -> Result<(), String> {
        if self.groups.is_empty() {
            return Err("a node must serve at least one group".into());
        }
        if self.lease_ttl < Duration::from_millis(100) {
            return Err(format!("lease_ttl {:?} is below 100 ms", self.lease_ttl));
        }
        if self.fence_margin.is_zero() || self.fence_margin >= self.lease_ttl {
            return Err(format!(
                "fence_margin {:?} must be positive and below lease_ttl {:?}",
                self.fence_margin, self.lease_ttl
            ));
        }
        if self.keepalive_interval.is_zero()
            || self.keepalive_interval >= self.lease_ttl - self.fence_margin
        {
            return Err(format!(
                "keepalive_interval {:?} must be positive and below lease_ttl - fence_margin",
                self.keepalive_interval
            ));
        }
        if self.max_running == 0 {
            return Err("max_running must be at least 1".into());
        }
        if self.max_claims_in_flight == 0 {
            return Err("max_claims_in_flight must be at least 1".into());
        }
        if !(1..=MAX_CLAIM_BATCH).contains(&self.claim_batch) {
            return Err(format!(
                "claim_batch {} must be between 1 and {MAX_CLAIM_BATCH}",
                self.claim_batch
            ));
        }
        for (name, value) in [
            ("resync_interval", self.resync_interval),
            ("balance_interval", self.balance_interval),
        ] {
            if value.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}
