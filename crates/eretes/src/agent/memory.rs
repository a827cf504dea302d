//! Giving freed memory back to the system.
//!
//! The agent uses the system allocator (glibc's malloc): with it a running
//! process task costs the agent about half, and its supervisor a third, of
//! what they cost under mimalloc (BENCHMARKS.md). glibc keeps what is freed
//! in its arenas for reuse, so after a burst of tasks ends the agent asks it
//! to return the free pages (`malloc_trim`): three times, 5, 10 and 15 s
//! after the node's runs last started or ended, and once 5 s after each
//! listing of the namespace (the periodic resync, every 30 s by default,
//! rebuilds the node's cache: with 2,000 running tasks that left about
//! 1 MB of freed pages resident). An idle agent does no other periodic
//! work for it than one look at three counters every 5 s.

use std::sync::Arc;
use std::time::Duration;

use eretes_runtime::{NodeStats, NodeStatus};
use tokio::sync::watch;

/// How often the node's activity is looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Quiet looks after activity that each trim the heap: what a burst frees
/// settles over several seconds (supervisors reaped, runs' records
/// written), so the heap is trimmed 5, 10 and 15 s after the node's runs
/// last moved.
const SETTLE_TRIMS: u32 = 3;

/// Trim the heap on the first [`SETTLE_TRIMS`] looks, [`TRIM_EVERY`]
/// apart, after the node's runs (`stats`, and how many run now: a deleted
/// task's run ends without a count of its own) last moved. Runs until the
/// agent exits.
pub async fn return_freed_memory(stats: Arc<NodeStats>, status: watch::Receiver<NodeStatus>) {
    let activity = || (counted_runs(&stats), status.borrow().running);
    let listings = || NodeStats::get(&stats.listings);
    let mut seen = activity();
    let mut seen_listings = listings();
    // No trim before the first activity.
    let mut quiet_looks = SETTLE_TRIMS;
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let now = activity();
        if now != seen {
            seen = now;
            quiet_looks = 0;
            continue;
        }
        // A listing since the last look: one more trim (now, the listing
        // being over), unless trims are still due anyway.
        let now_listings = listings();
        if now_listings != seen_listings {
            seen_listings = now_listings;
            quiet_looks = quiet_looks.min(SETTLE_TRIMS - 1);
        }
        if quiet_looks >= SETTLE_TRIMS {
            continue;
        }
        quiet_looks += 1;
        tracing::debug!("returning freed memory to the system");
        // It walks the heap: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim takes a plain integer and only touches the
            // allocator's own free lists, under its own locks.
            unsafe { libc::malloc_trim(0) }
        })
        .await;
    }
}

/// Runs started and ended so far, as the node counts them.
fn counted_runs(stats: &NodeStats) -> u64 {
    let snapshot = stats.snapshot();
    snapshot.claims
        + snapshot.takeovers
        + snapshot.releases
        + snapshot.completions
        + snapshot.failures
        + snapshot.parked
        + snapshot.fences
}
