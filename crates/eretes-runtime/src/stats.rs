//! Counters a node keeps about itself, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one node.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Successful claims.
    pub claims: AtomicU64,
    /// Claims lost to another node or a concurrent change.
    pub claim_conflicts: AtomicU64,
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
}

impl NodeStats {
    /// Add one to `counter`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Read `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
