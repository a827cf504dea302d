//! Giving freed memory back to the system.
//!
//! The agent uses the system allocator (glibc's malloc): with it a running
//! process task costs the agent about half, and its supervisor a third, of
//! what they cost under mimalloc (BENCHMARKS.md). glibc keeps what is freed
//! in its arenas for reuse, so after a burst of tasks ends the agent asks it
//! to return the free pages (the workers' malloc caches flushed, then
//! `malloc_trim`: how, and why both, in [`super::allocator`]): three times,
//! 5, 10 and 15 s after the node's runs last started or ended, and once 5 s
//! after each listing of the namespace (the periodic resync, every 30 s by
//! default, rebuilds the node's cache: with 2,000 running tasks that left
//! about 1 MB of freed pages resident). On the embedded store one more trim
//! follows once the store's watch history no longer holds what the burst
//! wrote ([`AGENT_HISTORY_AGE`] after the runs last moved): until then the
//! history keeps every value the burst wrote or deleted — for 2,000 removed
//! tasks, some 6,000 keys and values spread over every page the burst used,
//! which no trim can return while they live. The result retention's
//! deletions count as activity too. An idle agent does no other periodic
//! work for it than one look at a few counters every 5 s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eretes_runtime::{NodeStats, NodeStatus};
use eretes_store::embedded::EmbeddedStore;
use tokio::sync::watch;

use super::allocator;

/// How often the node's activity is looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Quiet looks after activity that each trim the heap: what a burst frees
/// settles over several seconds (supervisors reaped, runs' records
/// written), so the heap is trimmed 5, 10 and 15 s after the node's runs
/// last moved.
const SETTLE_TRIMS: u32 = 3;

/// How long the agent's embedded store keeps a revision in its watch
/// history (the store's default is a minute).
///
/// The history serves the agent's own readers (the node, the task list),
/// which start a watch from the revision of a read they have just made, as
/// soon as it returns (the task list before it decodes the read): reading
/// 100,000 tasks takes well under a second, so 20 s is a wide margin, and
/// a reader later than that reads again. Under load the store's
/// limit of 10,000 revisions is the tighter bound anyway (ten seconds at
/// 1,000 writes per second). What the age bounds is how long an agent
/// that has gone quiet keeps the values its last burst wrote: this is the
/// memory [`return_freed_memory`] can only give back once they are gone.
pub const AGENT_HISTORY_AGE: Duration = Duration::from_secs(20);

/// Trim the heap on the first [`SETTLE_TRIMS`] looks, [`TRIM_EVERY`]
/// apart, after the node's runs (`stats`, and how many run now: a deleted
/// task's run ends without a count of its own) last moved, or the result
/// retention last deleted ended tasks (`expired` counts them); and, with an
/// embedded `store`, once more on the first look after its watch history
/// has aged past that activity (the history expired first, so that what
/// it held is free). Runs until the agent exits.
pub async fn return_freed_memory(
    stats: Arc<NodeStats>,
    status: watch::Receiver<NodeStatus>,
    store: Option<Arc<EmbeddedStore>>,
    expired: Arc<AtomicU64>,
) {
    // Ended tasks the result retention deleted free memory as runs do.
    let activity = || {
        (
            counted_runs(&stats),
            status.borrow().running,
            expired.load(Ordering::Relaxed),
        )
    };
    let listings = || NodeStats::get(&stats.listings);
    let mut schedule = TrimSchedule::new(store.as_ref().map(|store| store.history_age()));
    let mut seen = activity();
    let mut seen_listings = listings();
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let (now, now_listings) = (activity(), listings());
        let trim = schedule.look(now != seen, now_listings != seen_listings);
        (seen, seen_listings) = (now, now_listings);
        match trim {
            Trim::None => continue,
            Trim::Heap => {}
            Trim::HistoryThenHeap => {
                if let Some(store) = &store {
                    store.expire_history();
                }
            }
        }
        tracing::debug!("returning freed memory to the system");
        allocator::return_free_pages().await;
    }
}

/// What one look decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trim {
    /// Nothing to give back.
    None,
    /// Trim the heap.
    Heap,
    /// Drop the store's aged watch history, then trim the heap.
    HistoryThenHeap,
}

/// When to trim, from what each look saw: the runs moved, or a listing
/// was made, since the look before.
#[derive(Debug)]
struct TrimSchedule {
    /// Looks since the runs last moved; `u32::MAX` before they ever did.
    since_activity: u32,
    /// Settling trims still due (after activity, or one after a listing).
    settle_left: u32,
    /// The look after activity at which the store's history no longer holds
    /// its writes: the history's age, and one look more for the writes that
    /// ended the activity. `None` without an embedded store.
    history_look: Option<u32>,
    /// Whether the history was expired since the runs last moved.
    history_expired: bool,
}

impl TrimSchedule {
    fn new(history_age: Option<Duration>) -> Self {
        TrimSchedule {
            since_activity: u32::MAX,
            settle_left: 0,
            history_look: history_age.map(|age| looks_within(age) + 1),
            history_expired: true,
        }
    }

    fn look(&mut self, runs_moved: bool, listed: bool) -> Trim {
        if runs_moved {
            self.since_activity = 0;
            self.settle_left = SETTLE_TRIMS;
            self.history_expired = false;
            return Trim::None;
        }
        self.since_activity = self.since_activity.saturating_add(1);
        // A listing since the last look: one more trim (now, the listing
        // being over), unless trims are still due anyway.
        if listed {
            self.settle_left = self.settle_left.max(1);
        }
        let settle = self.settle_left > 0;
        self.settle_left = self.settle_left.saturating_sub(1);
        let history_due = !self.history_expired
            && self
                .history_look
                .is_some_and(|look| self.since_activity >= look);
        if history_due {
            self.history_expired = true;
            Trim::HistoryThenHeap
        } else if settle {
            Trim::Heap
        } else {
            Trim::None
        }
    }
}

/// How many looks, [`TRIM_EVERY`] apart, it takes for `span` to pass.
fn looks_within(span: Duration) -> u32 {
    let looks = span.as_millis().div_ceil(TRIM_EVERY.as_millis());
    u32::try_from(looks).unwrap_or(u32::MAX - 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The decisions of `looks` quiet looks in a row.
    fn quiet(schedule: &mut TrimSchedule, looks: usize) -> Vec<Trim> {
        (0..looks).map(|_| schedule.look(false, false)).collect()
    }

    #[test]
    fn nothing_is_trimmed_before_the_runs_first_move() {
        let mut schedule = TrimSchedule::new(Some(AGENT_HISTORY_AGE));
        assert!(quiet(&mut schedule, 20).iter().all(|&t| t == Trim::None));
    }

    #[test]
    fn after_activity_three_trims_then_one_after_the_history_ages_out() {
        let mut schedule = TrimSchedule::new(Some(AGENT_HISTORY_AGE));
        assert_eq!(schedule.look(true, false), Trim::None);
        let looks = quiet(&mut schedule, 12);
        // 20 s of history is four looks, and one more for the last writes.
        use Trim::*;
        assert_eq!(
            looks,
            [
                Heap,
                Heap,
                Heap,
                None,
                HistoryThenHeap,
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        // New activity starts it over, history included.
        assert_eq!(schedule.look(true, false), Trim::None);
        assert_eq!(quiet(&mut schedule, 5)[4], HistoryThenHeap);
    }

    #[test]
    fn activity_during_the_wait_postpones_the_history_trim() {
        let mut schedule = TrimSchedule::new(Some(AGENT_HISTORY_AGE));
        schedule.look(true, false);
        quiet(&mut schedule, 3);
        schedule.look(true, false);
        let looks = quiet(&mut schedule, 5);
        assert_eq!(
            looks
                .iter()
                .filter(|&&t| t == Trim::HistoryThenHeap)
                .count(),
            1
        );
        assert_eq!(
            looks[4],
            Trim::HistoryThenHeap,
            "five looks after the last move"
        );
    }

    #[test]
    fn a_listing_adds_one_trim_but_never_repeats_the_history_trim() {
        let mut schedule = TrimSchedule::new(Some(AGENT_HISTORY_AGE));
        schedule.look(true, false);
        quiet(&mut schedule, 10);
        assert_eq!(schedule.look(false, true), Trim::Heap);
        assert!(quiet(&mut schedule, 10).iter().all(|&t| t == Trim::None));
    }

    #[test]
    fn a_listing_does_not_put_the_history_trim_off() {
        let mut schedule = TrimSchedule::new(Some(AGENT_HISTORY_AGE));
        schedule.look(true, false);
        quiet(&mut schedule, 3);
        assert_eq!(schedule.look(false, true), Trim::Heap, "the listing's trim");
        assert_eq!(schedule.look(false, true), Trim::HistoryThenHeap);
        assert_eq!(schedule.look(false, false), Trim::None);
    }

    #[test]
    fn without_an_embedded_store_only_the_settling_trims() {
        let mut schedule = TrimSchedule::new(None);
        schedule.look(true, false);
        let looks = quiet(&mut schedule, 8);
        assert_eq!(
            looks.iter().filter(|&&t| t == Trim::Heap).count(),
            SETTLE_TRIMS as usize
        );
        assert!(!looks.contains(&Trim::HistoryThenHeap));
    }
}
