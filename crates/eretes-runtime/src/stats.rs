//! Counters a node keeps about itself, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one node.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Successful claims.
    pub claims: AtomicU64,
    /// Claims lost to another node or a concurrent change.
    pub claim_conflicts: AtomicU64,
    /// Claims that took a task over from an owner that died or lost its
    /// lease (failovers).
    pub takeovers: AtomicU64,
    /// Tasks released (balance, stop_task, drain, shutdown, handler's choice).
    pub releases: AtomicU64,
    /// Tasks completed with a result.
    pub completions: AtomicU64,
    /// Tasks retired as failed by a handler.
    pub failures: AtomicU64,
    /// Tasks parked after too many takeovers.
    pub parked: AtomicU64,
    /// Times this node fenced itself after failing to renew its lease.
    pub fences: AtomicU64,
    /// Node commands applied.
    pub commands_applied: AtomicU64,
    /// Node commands discarded as malformed or unknown.
    pub commands_rejected: AtomicU64,
    /// Keys or values in the namespace skipped as malformed.
    pub malformed_skipped: AtomicU64,
    /// Store calls that failed.
    pub store_errors: AtomicU64,
    /// Watch restarts (stream error, compaction) followed by a re-list.
    pub relists: AtomicU64,
    /// Claims this node lets be in flight now (a gauge): the configured
    /// most, halved whenever a claim transaction takes longer than a
    /// twentieth of the lease TTL, and grown back by a batch when one is
    /// quick.
    pub claim_window: AtomicU64,
    /// Run-end transactions this node lets be in flight now (a gauge): at
    /// most 8, halved whenever one fails or takes longer than a twentieth
    /// of the lease TTL, and grown back by one when one is quick. Not in
    /// [`NodeStatsSnapshot`].
    pub end_window: AtomicU64,
    /// Listings of the whole namespace applied (the first, each periodic
    /// resync and each re-list), each of which rebuilds the node's cache:
    /// a burst of allocation that an agent may want to return afterwards.
    /// Not in [`NodeStatsSnapshot`], whose JSON stays as it was.
    pub listings: AtomicU64,
    /// Tasks whose keys this node read before claiming them: tasks another
    /// node's owner record had held, which the node kept only a count of.
    /// Not in [`NodeStatsSnapshot`] either.
    pub task_reads: AtomicU64,
}

impl NodeStats {
    /// Add one to `counter`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Add `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every counter, read one after another (not one atomic moment), as
    /// plain numbers for reports and JSON.
    pub fn snapshot(&self) -> NodeStatsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NodeStatsSnapshot {
            claims: read(&self.claims),
            claim_conflicts: read(&self.claim_conflicts),
            takeovers: read(&self.takeovers),
            releases: read(&self.releases),
            completions: read(&self.completions),
            failures: read(&self.failures),
            parked: read(&self.parked),
            fences: read(&self.fences),
            commands_applied: read(&self.commands_applied),
            commands_rejected: read(&self.commands_rejected),
            malformed_skipped: read(&self.malformed_skipped),
            store_errors: read(&self.store_errors),
            relists: read(&self.relists),
            claim_window: read(&self.claim_window),
        }
    }
}

/// The counters of [`NodeStats`] at one moment; each field means the same as
/// the counter of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeStatsSnapshot {
    /// See [`NodeStats::claims`].
    pub claims: u64,
    /// See [`NodeStats::claim_conflicts`].
    pub claim_conflicts: u64,
    /// See [`NodeStats::takeovers`].
    pub takeovers: u64,
    /// See [`NodeStats::releases`].
    pub releases: u64,
    /// See [`NodeStats::completions`].
    pub completions: u64,
    /// See [`NodeStats::failures`].
    pub failures: u64,
    /// See [`NodeStats::parked`].
    pub parked: u64,
    /// See [`NodeStats::fences`].
    pub fences: u64,
    /// See [`NodeStats::commands_applied`].
    pub commands_applied: u64,
    /// See [`NodeStats::commands_rejected`].
    pub commands_rejected: u64,
    /// See [`NodeStats::malformed_skipped`].
    pub malformed_skipped: u64,
    /// See [`NodeStats::store_errors`].
    pub store_errors: u64,
    /// See [`NodeStats::relists`].
    pub relists: u64,
    /// See [`NodeStats::claim_window`].
    #[serde(default)]
    pub claim_window: u64,
}
