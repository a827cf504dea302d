//! One gate per task: a run of a task starts on this agent only once its
//! previous run here is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use eretes_protocol::TaskId;
use tokio::sync::OwnedMutexGuard;

/// One gate per task id: a run of a task starts only once its previous
/// run on this agent is over: its supervisor reported the whole tree gone
/// and came back for another run, or exited.
#[derive(Debug, Default)]
pub(crate) struct RunGates {
    gates: Arc<Mutex<Gates>>,
}

#[derive(Debug, Default)]
struct Gates {
    /// By the task's id, which shares the id's text (a `String` key would
    /// be one more allocation per running task). An entry leaves with the
    /// last run that holds or waits for its gate, so the table holds the
    /// tasks running here, not every task that ever ran.
    by_task: HashMap<TaskId, Weak<tokio::sync::Mutex<()>>>,
    /// Past this many entries, forget gates nobody holds: a run cancelled
    /// while it waited for a gate that was then let go leaves its entry.
    prune_at: usize,
}

/// A run's hold on its task's gate: later runs of the task wait until it is
/// dropped, and the last one to go takes the gate out of the table.
#[derive(Debug)]
pub(crate) struct RunGate {
    guard: Option<OwnedMutexGuard<()>>,
    task: TaskId,
    gates: Arc<Mutex<Gates>>,
}

impl Drop for RunGate {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        // Under the table's lock, so that no run takes the gate between
        // the count and the removal.
        let mut gates = self.gates.lock().expect("not poisoned");
        let gate = OwnedMutexGuard::mutex(&guard).clone();
        drop(guard);
        // Only `gate` left: nobody holds or waits for it.
        if Arc::strong_count(&gate) == 1 {
            let ours = gates
                .by_task
                .get(&self.task)
                .is_some_and(|entry| std::ptr::eq(entry.as_ptr(), Arc::as_ptr(&gate)));
            if ours {
                gates.by_task.remove(&self.task);
                eretes_runtime::sparse::Sparse::shrink_if_sparse(&mut gates.by_task);
            }
        }
    }
}

impl RunGates {
    /// Wait until no earlier run of `task` is alive here; the gate keeps
    /// later runs waiting until it is dropped.
    pub(crate) async fn enter(&self, task: &TaskId) -> RunGate {
        let gate = {
            let mut gates = self.gates.lock().expect("not poisoned");
            match gates.by_task.get(task).and_then(Weak::upgrade) {
                Some(gate) => gate,
                None => {
                    let gate = Arc::new(tokio::sync::Mutex::new(()));
                    gates.by_task.insert(task.clone(), Arc::downgrade(&gate));
                    if gates.by_task.len() > gates.prune_at {
                        gates.by_task.retain(|_, gate| gate.strong_count() > 0);
                        gates.prune_at = (gates.by_task.len() * 2).max(64);
                    }
                    gate
                }
            }
        };
        // A run cancelled while it waits drops its Arc here. Should the
        // holder have gone first, its entry stays until the task's next
        // run replaces it or the prune above forgets it.
        RunGate {
            guard: Some(gate.lock_owned().await),
            task: task.clone(),
            gates: self.gates.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_run_waits_for_the_previous_run_of_its_task_only() {
        let gates = RunGates::default();
        let id = |name: &str| TaskId::new(name).unwrap();
        let first = gates.enter(&id("a")).await;
        let other = tokio::time::timeout(Duration::from_secs(5), gates.enter(&id("b"))).await;
        assert!(other.is_ok(), "another task does not wait");
        let blocked = tokio::time::timeout(Duration::from_millis(50), gates.enter(&id("a"))).await;
        assert!(blocked.is_err(), "the same task waits");
        drop(first);
        let next = tokio::time::timeout(Duration::from_secs(5), gates.enter(&id("a"))).await;
        assert!(next.is_ok(), "and goes on once the first is gone");
    }

    #[tokio::test]
    async fn gates_nobody_holds_are_forgotten() {
        let gates = RunGates::default();
        let mut held = Vec::new();
        for n in 0..1000 {
            held.push(gates.enter(&TaskId::new(format!("t{n}")).unwrap()).await);
        }
        assert_eq!(gates.gates.lock().unwrap().by_task.len(), 1000);
        drop(held);
        let table = &gates.gates.lock().unwrap().by_task;
        assert!(table.is_empty());
        assert!(table.capacity() <= 64, "{} left", table.capacity());
    }

    #[tokio::test]
    async fn a_gate_someone_waits_for_stays_until_the_last_run_goes() {
        let gates = Arc::new(RunGates::default());
        let id = TaskId::new("a").unwrap();
        let first = gates.enter(&id).await;
        let waiting = tokio::spawn({
            let (gates, id) = (gates.clone(), id.clone());
            async move { gates.enter(&id).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!(gates.gates.lock().unwrap().by_task.len(), 1);
        // A third run still waits for the second: the entry was not lost.
        let third = tokio::time::timeout(Duration::from_millis(50), gates.enter(&id)).await;
        assert!(third.is_err(), "the third run waits for the second");
        drop(second);
        assert!(gates.gates.lock().unwrap().by_task.is_empty());
    }
}
