//! The supervisors ready for a run: one started ahead of the next run, and
//! those whose run ended and that take another.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tracing::warn;

use super::handle::Warm;
use super::spawner::Spawner;
use crate::ExecConfig;

/// Supervisors kept for later runs at most, once theirs ended: enough for
/// the runs that start while as many end (each one kept saves a fork, an
/// exit and a reap), few enough to cost little (some 50 KiB each,
/// `BENCHMARKS.md`).
const MAX_IDLE: usize = 16;

/// How long a supervisor kept for a later run waits for one; past this,
/// all but one are let go (a burst's supervisors do not outlive it).
const IDLE_KEEP: Duration = Duration::from_secs(30);

/// Supervisors ready for a run: one started ahead of the next run, and
/// those whose run ended and that take another ([`MAX_IDLE`] at most, for
/// [`IDLE_KEEP`]).
#[derive(Default)]
pub(crate) struct WarmPool {
    idle: Arc<Mutex<Idle>>,
    spawner: Spawner,
}

/// The supervisors a pool holds.
#[derive(Default)]
struct Idle {
    /// The one ready longest first.
    ready: Vec<(Warm, Instant)>,
    /// A task lets go of those idle too long.
    pruning: bool,
}

impl WarmPool {
    /// The supervisor ready last (its pages are the likeliest still in
    /// memory), or a new one.
    pub(crate) fn take(&self, config: &ExecConfig) -> std::io::Result<Warm> {
        loop {
            let ready = self.idle.lock().expect("not poisoned").ready.pop();
            let Some((mut warm, _)) = ready else {
                return Warm::spawn(&self.spawner, config);
            };
            // One that died meanwhile (killed while idle) is not handed out
            // (and is reaped by the look); nor is one stopped meanwhile (a
            // task running as the agent's user can SIGSTOP it): its run
            // would wait the whole start timeout.
            if warm.child.has_exited() {
                continue;
            }
            if warm.child.is_stopped() {
                let_go(warm);
                continue;
            }
            return Ok(warm);
        }
    }

    /// Start the next one, unless one is ready. (Not under the pool's
    /// lock: a stuck fork server may take seconds to fail, and the runs
    /// that end meanwhile give theirs back.)
    pub(crate) fn refill(&self, config: &ExecConfig) {
        if !self.idle.lock().expect("not poisoned").ready.is_empty() {
            return;
        }
        match Warm::spawn(&self.spawner, config) {
            Ok(warm) => self.give_back(warm),
            Err(error) => warn!(%error, "cannot start a supervisor ahead of its run"),
        }
    }

    /// Keep `warm` (a new one, or one whose run ended) for a later run, or
    /// let it go if enough are kept: its socket closing ends it.
    pub(crate) fn give_back(&self, warm: Warm) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.ready.len() >= MAX_IDLE {
            drop(idle);
            let_go(warm);
            return;
        }
        idle.ready.push((warm, Instant::now()));
        if idle.ready.len() > 1 && !idle.pruning {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idle.pruning = true;
                runtime.spawn(prune(Arc::downgrade(&self.idle)));
            }
        }
    }
}

impl Drop for WarmPool {
    /// The idle supervisors go with the pool (the prune task holds it
    /// weakly), ended as any it lets go: one stopped would outlive it.
    fn drop(&mut self) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = std::mem::take(&mut idle.ready);
        drop(idle);
        ready.into_iter().for_each(|(warm, _)| let_go(warm));
    }
}

/// Every [`IDLE_KEEP`], let go of the supervisors idle for longer, but the
/// last one ready; ends once one or none is left (or the pool is gone).
async fn prune(idle: Weak<Mutex<Idle>>) {
    loop {
        tokio::time::sleep(IDLE_KEEP).await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        let (gone, last) = {
            let mut idle = idle.lock().expect("not poisoned");
            let gone = idle_too_long(&mut idle.ready, IDLE_KEEP, Instant::now());
            let last = idle.ready.len() <= 1;
            if last {
                idle.ready.shrink_to_fit();
                idle.pruning = false;
            }
            (gone, last)
        };
        gone.into_iter().for_each(|(warm, _)| let_go(warm));
        if last {
            return;
        }
    }
}

/// Take out what was idle (ready since the instant beside it) for `keep`
/// or longer at `now`, but the last one, which was ready last.
fn idle_too_long<T>(
    ready: &mut Vec<(T, Instant)>,
    keep: Duration,
    now: Instant,
) -> Vec<(T, Instant)> {
    let newest = ready.len().saturating_sub(1);
    let mut index = 0;
    ready
        .extract_if(.., |(_, since)| {
            index += 1;
            index <= newest && now.saturating_duration_since(*since) >= keep
        })
        .collect()
}

/// End an idle supervisor: SIGKILL, since one that was stopped (see
/// [`WarmPool::take`]) would never read its socket's close; it has no run,
/// so nothing of a task's is lost. Dropping it reaps it in the background.
fn let_go(warm: Warm) {
    warm.child.kill();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_supervisors_go_once_idle_too_long_but_the_last_ready() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let keep = Duration::from_secs(30);
        let mut ready = vec![(1, at(0)), (2, at(10)), (3, at(20))];
        assert!(idle_too_long(&mut ready, keep, at(25)).is_empty());
        assert_eq!(
            ready,
            [(1, at(0)), (2, at(10)), (3, at(20))],
            "none too old"
        );
        assert_eq!(idle_too_long(&mut ready, keep, at(35)), [(1, at(0))]);
        assert_eq!(ready, [(2, at(10)), (3, at(20))]);
        assert_eq!(idle_too_long(&mut ready, keep, at(100)), [(2, at(10))]);
        assert_eq!(ready, [(3, at(20))], "the last one ready stays");
        assert!(idle_too_long(&mut ready, keep, at(1000)).is_empty());
        assert_eq!(ready, [(3, at(20))]);
        let mut none: Vec<(u8, Instant)> = Vec::new();
        assert!(idle_too_long(&mut none, keep, at(1000)).is_empty());
        assert!(none.is_empty());
    }
}
