//! An observer of handler runs: who ran which task, at which epoch, from when
//! to when. The demo, the benchmarks and the tests use it to measure what the
//! cluster really did (overlaps, failover time, moves) instead of deriving
//! figures from parameters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// One handler run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRun {
    /// The task.
    pub task: String,
    /// The node that ran it.
    pub node: String,
    /// The run's fencing epoch.
    pub epoch: i64,
    /// When the handler started.
    pub started: Instant,
    /// When it ended (`None` while it runs).
    pub ended: Option<Instant>,
}

/// Records runs and counts overlaps: a start of a task while another instance
/// of the same task is still running.
#[derive(Debug, Default)]
pub struct Observer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    runs: Vec<ObservedRun>,
    live: HashMap<String, usize>,
    overlaps: usize,
}

impl Observer {
    /// A shared, empty observer.
    pub fn new() -> Arc<Self> {
        Arc::new(Observer::default())
    }

    /// Record the start of a run; the returned guard records its end when
    /// dropped, so a handler that is aborted is recorded as ended too.
    pub fn start(self: &Arc<Self>, task: &str, node: &str, epoch: i64) -> RunGuard {
        let mut state = self.state.lock().unwrap();
        let live = state.live.entry(task.to_string()).or_default();
        *live += 1;
        if *live > 1 {
            state.overlaps += 1;
        }
        state.runs.push(ObservedRun {
            task: task.into(),
            node: node.into(),
            epoch,
            started: Instant::now(),
            ended: None,
        });
        RunGuard {
            observer: self.clone(),
            run: state.runs.len() - 1,
        }
    }

    fn end(&self, run: usize) {
        let mut state = self.state.lock().unwrap();
        state.runs[run].ended = Some(Instant::now());
        let task = state.runs[run].task.clone();
        if let Some(live) = state.live.get_mut(&task) {
            *live -= 1;
        }
    }

    /// Every run so far, in start order.
    pub fn runs(&self) -> Vec<ObservedRun> {
        self.state.lock().unwrap().runs.clone()
    }

    /// How many starts found another instance of the same task running.
    pub fn overlaps(&self) -> usize {
        self.state.lock().unwrap().overlaps
    }

    /// Distinct tasks running now.
    pub fn running_tasks(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.live.values().filter(|n| **n > 0).count()
    }

    /// Runs in progress now, per node.
    pub fn running_per_node(&self) -> HashMap<String, usize> {
        let state = self.state.lock().unwrap();
        let mut per_node = HashMap::new();
        for run in state.runs.iter().filter(|r| r.ended.is_none()) {
            *per_node.entry(run.node.clone()).or_default() += 1;
        }
        per_node
    }

    /// Tasks running now on `node`.
    pub fn running_on(&self, node: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .runs
            .iter()
            .filter(|r| r.ended.is_none() && r.node == node)
            .map(|r| r.task.clone())
            .collect()
    }

    /// Starts at or after `since` of tasks whose previous run was on another node.
    pub fn moves_since(&self, since: Instant) -> usize {
        let state = self.state.lock().unwrap();
        let mut last_node: HashMap<&str, &str> = HashMap::new();
        let mut moves = 0;
        for run in &state.runs {
            if let Some(previous) = last_node.insert(&run.task, &run.node) {
                if run.started >= since && previous != run.node {
                    moves += 1;
                }
            }
        }
        moves
    }

    /// The latest start at or after `since` of any of `tasks`.
    pub fn last_restart(&self, tasks: &[String], since: Instant) -> Option<Instant> {
        let state = self.state.lock().unwrap();
        let wanted: std::collections::HashSet<&str> = tasks.iter().map(String::as_str).collect();
        state
            .runs
            .iter()
            .filter(|r| r.started >= since && wanted.contains(r.task.as_str()))
            .map(|r| r.started)
            .max()
    }

    /// When the most recent run started, if any.
    pub fn last_start(&self) -> Option<Instant> {
        self.state.lock().unwrap().runs.last().map(|r| r.started)
    }
}

/// Ends a run in the [`Observer`] when dropped.
#[derive(Debug)]
pub struct RunGuard {
    observer: Arc<Observer>,
    run: usize,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.observer.end(self.run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_overlaps_and_moves() {
        let observer = Observer::new();
        let since = Instant::now();
        let first = observer.start("t", "a", 1);
        let second = observer.start("t", "b", 2);
        assert_eq!(observer.overlaps(), 1);
        drop(first);
        drop(second);
        let _third = observer.start("t", "b", 3);
        assert_eq!(observer.overlaps(), 1, "sequential runs do not overlap");
        assert_eq!(
            observer.moves_since(since),
            1,
            "a → b once; b → b is no move"
        );
        assert_eq!(observer.running_on("b"), vec!["t".to_string()]);
    }
}
