//! The runs the dashboard shows for a task: the claims and ends this agent's
//! watch saw, kept in one ring for all tasks ([`RUN_EVENTS`] entries), so
//! that the history costs a bounded amount of memory however many tasks
//! come and go. A task's history is what of it the ring still holds: the
//! runs since this agent started, up to the ring's size (on a busy cluster,
//! the last minutes), and it goes when the task is deleted. The store
//! itself keeps only each task's counts (`claims/<id>`: claims, takeovers),
//! which the task's page shows beside it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use eretes_protocol::{now_ms, NodeName, TaskId, TaskPosition, TaskState};
use serde::Serialize;

/// Run events kept, over all tasks.
pub const RUN_EVENTS: usize = 10_000;

/// One run starting or ending, as the watch saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunEvent {
    /// The task.
    pub task: TaskId,
    /// `started`; within a run, the state it moved to while its node kept
    /// it (`paused`, `sleeping`, `fault`, or `running` again); or how the
    /// run ended: `done`, `failed`, `killed` (the task's end), `released`
    /// (its node let it go: drained, balanced, stopped), `lost` (its
    /// node's lease expired: the next run is a takeover), or `taken_over`
    /// (another claim replaced it in the same transaction).
    pub kind: &'static str,
    /// The node of the run.
    pub node: NodeName,
    /// The run's fencing epoch.
    pub epoch: i64,
    /// When the watch saw it, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The ring of the latest run events.
#[derive(Debug, Default)]
pub struct RunHistory {
    ring: Mutex<Ring>,
}

/// The events, and how many of them each task has: a task with none (most
/// tasks of a large namespace, and every task never run) is deleted or
/// looked up without a pass over the ring, which the watch would otherwise
/// make for every deleted task while holding the lock.
#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<RunEvent>,
    per_task: HashMap<TaskId, u32>,
}

impl Ring {
    fn push(&mut self, event: RunEvent) {
        *self.per_task.entry(event.task.clone()).or_default() += 1;
        self.events.push_back(event);
        while self.events.len() > RUN_EVENTS {
            let Some(oldest) = self.events.pop_front() else {
                break;
            };
            if let Some(count) = self.per_task.get_mut(&oldest.task) {
                *count -= 1;
                if *count == 0 {
                    self.per_task.remove(&oldest.task);
                }
            }
        }
    }

    fn forget(&mut self, task: &TaskId) {
        if self.per_task.remove(task).is_some() {
            self.events.retain(|event| &event.task != task);
        }
    }
}

impl RunHistory {
    /// Record what changed for `task` between two positions of it in the
    /// index (before and after one transaction). `released`: the same
    /// transaction wrote the task's run record, as a node's release does
    /// and a lease's expiry does not.
    pub fn note(
        &self,
        task: &TaskId,
        before: Option<&TaskPosition>,
        after: Option<&TaskPosition>,
        released: bool,
    ) {
        let owner = |position: Option<&TaskPosition>| position.and_then(|p| p.owner.clone());
        let (was, is) = (owner(before), owner(after));
        let at_ms = now_ms();
        let mut ring = self.ring.lock().expect("not poisoned");
        if before.is_some() && after.is_none() {
            // Deleted: its history goes with it (a task submitted again
            // under the id starts with none).
            ring.forget(task);
            return;
        }
        if was == is {
            let state = |position: Option<&TaskPosition>| position.map(|p| p.state);
            if let (Some((node, epoch)), Some(now)) = (is, state(after)) {
                if state(before) != Some(now) && !now.is_terminal() {
                    ring.push(RunEvent {
                        task: task.clone(),
                        kind: now.name(),
                        node,
                        epoch,
                        at_ms,
                    });
                }
            }
            return;
        }
        if let Some((node, epoch)) = was {
            let kind = match (after.map(|p| p.state), &is) {
                (_, Some(_)) => "taken_over",
                (Some(state @ (TaskState::Done | TaskState::Failed | TaskState::Killed)), None) => {
                    state.name()
                }
                _ if released => "released",
                _ => "lost",
            };
            ring.push(RunEvent {
                task: task.clone(),
                kind,
                node,
                epoch,
                at_ms,
            });
        }
        if let Some((node, epoch)) = is {
            ring.push(RunEvent {
                task: task.clone(),
                kind: "started",
                node,
                epoch,
                at_ms,
            });
        }
    }

    /// The events of `task` the ring still holds, oldest first.
    pub fn of(&self, task: &TaskId) -> Vec<RunEvent> {
        let ring = self.ring.lock().expect("not poisoned");
        if !ring.per_task.contains_key(task) {
            return Vec::new();
        }
        ring.events
            .iter()
            .filter(|e| &e.task == task)
            .cloned()
            .collect()
    }

    /// How many tasks have events in the ring (the counts' map, which must
    /// not outgrow the ring).
    #[cfg(test)]
    fn tasks_held(&self) -> usize {
        self.ring.lock().expect("not poisoned").per_task.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(state: TaskState, owner: Option<(&str, i64)>) -> TaskPosition {
        TaskPosition {
            state,
            owner: owner.map(|(node, epoch)| (node.parse().unwrap(), epoch)),
        }
    }

    fn kinds(history: &RunHistory, task: &TaskId) -> Vec<(&'static str, String, i64)> {
        history
            .of(task)
            .into_iter()
            .map(|e| (e.kind, e.node.to_string(), e.epoch))
            .collect()
    }

    #[test]
    fn claims_releases_losses_and_ends_become_run_events() {
        let history = RunHistory::default();
        let task: TaskId = "t".parse().unwrap();
        let pending = at(TaskState::Pending, None);
        let on_a = at(TaskState::Running, Some(("a", 5)));
        let on_b = at(TaskState::Running, Some(("b", 9)));
        history.note(&task, None, Some(&pending), false);
        history.note(&task, Some(&pending), Some(&on_a), true);
        // A write that changes neither owner nor state is no run event; a
        // pause and a resume under the same owner are.
        history.note(&task, Some(&on_a), Some(&on_a), false);
        let paused_on_a = at(TaskState::Paused, Some(("a", 5)));
        history.note(&task, Some(&on_a), Some(&paused_on_a), false);
        history.note(&task, Some(&paused_on_a), Some(&on_a), false);
        // The owner's lease expired (no run record written with it)...
        history.note(&task, Some(&on_a), Some(&pending), false);
        // ...and b took it over.
        history.note(&task, Some(&pending), Some(&on_b), true);
        // Drained: released with its run record.
        history.note(&task, Some(&on_b), Some(&pending), true);
        history.note(
            &task,
            Some(&pending),
            Some(&at(TaskState::Running, Some(("a", 12)))),
            true,
        );
        history.note(
            &task,
            Some(&at(TaskState::Running, Some(("a", 12)))),
            Some(&at(TaskState::Done, None)),
            true,
        );
        assert_eq!(
            kinds(&history, &task),
            [
                ("started", "a".to_string(), 5),
                ("paused", "a".to_string(), 5),
                ("running", "a".to_string(), 5),
                ("lost", "a".to_string(), 5),
                ("started", "b".to_string(), 9),
                ("released", "b".to_string(), 9),
                ("started", "a".to_string(), 12),
                ("done", "a".to_string(), 12),
            ]
        );
        // Another task's events are not this one's.
        let other: TaskId = "u".parse().unwrap();
        history.note(&other, None, Some(&on_a), true);
        assert_eq!(history.of(&other).len(), 1);
        // A deleted task's history goes with it, and only its own.
        history.note(&task, Some(&at(TaskState::Done, None)), None, false);
        assert!(history.of(&task).is_empty());
        assert_eq!(history.of(&other).len(), 1);
    }

    #[test]
    fn the_ring_keeps_only_the_latest_events() {
        let history = RunHistory::default();
        let task: TaskId = "t".parse().unwrap();
        for epoch in 0..(RUN_EVENTS as i64) {
            let running = at(TaskState::Running, Some(("a", epoch)));
            history.note(&task, None, Some(&running), true);
        }
        let old: TaskId = "old".parse().unwrap();
        assert_eq!(history.of(&task).len(), RUN_EVENTS);
        history.note(
            &old,
            None,
            Some(&at(TaskState::Running, Some(("a", 1)))),
            true,
        );
        let kept = history.of(&task);
        assert_eq!(kept.len(), RUN_EVENTS - 1);
        assert_eq!(kept[0].epoch, 1, "the oldest event went first");
        assert_eq!(history.of(&old).len(), 1);
    }

    #[test]
    fn tasks_pushed_out_of_the_ring_or_deleted_leave_no_count_behind() {
        let history = RunHistory::default();
        let ids: Vec<TaskId> = (0..RUN_EVENTS * 2)
            .map(|n| format!("t{n}").parse().unwrap())
            .collect();
        let running = at(TaskState::Running, Some(("a", 1)));
        for id in &ids {
            history.note(id, None, Some(&running), true);
        }
        // Each task's one event: the first half were pushed out.
        assert_eq!(history.tasks_held(), RUN_EVENTS);
        assert!(history.of(&ids[0]).is_empty());
        assert_eq!(history.of(&ids[RUN_EVENTS]).len(), 1);
        // Deleting a task the ring no longer holds changes nothing.
        history.note(&ids[0], Some(&running), None, false);
        assert_eq!(history.tasks_held(), RUN_EVENTS);
        // Deleting one it holds drops its events and its count, only its.
        let last = &ids[RUN_EVENTS * 2 - 1];
        history.note(last, Some(&running), None, false);
        assert!(history.of(last).is_empty());
        assert_eq!(history.tasks_held(), RUN_EVENTS - 1);
        assert_eq!(history.of(&ids[RUN_EVENTS * 2 - 2]).len(), 1);
        // Submitted again under the same id, it starts a history of its own.
        history.note(last, None, Some(&running), true);
        assert_eq!(history.of(last).len(), 1);
        // A task with several events is counted once and forgotten whole.
        let busy: TaskId = "busy".parse().unwrap();
        for epoch in 0..5 {
            history.note(
                &busy,
                None,
                Some(&at(TaskState::Running, Some(("b", epoch)))),
                true,
            );
        }
        assert_eq!(history.of(&busy).len(), 5);
        history.note(&busy, Some(&running), None, false);
        assert!(history.of(&busy).is_empty());
        // What the ring holds and what it counts agree: it was full before
        // the busy task's five events went.
        let ring = history.ring.lock().unwrap();
        assert_eq!(ring.events.len(), RUN_EVENTS - 5);
        let mut counted: HashMap<TaskId, u32> = HashMap::new();
        for event in &ring.events {
            *counted.entry(event.task.clone()).or_default() += 1;
        }
        assert_eq!(counted, ring.per_task);
    }

    /// A measurement, not a check (`cargo test --release -p eretes --bin
    /// eretes deleting_tasks -- --ignored --nocapture`): with the ring
    /// full, the watch deletes 100,000 tasks that never ran, as a
    /// namespace's clean-up does.
    #[test]
    #[ignore]
    fn deleting_tasks_with_a_full_ring() {
        let history = RunHistory::default();
        let running = at(TaskState::Running, Some(("a", 1)));
        for n in 0..RUN_EVENTS {
            let id: TaskId = format!("ran-{n}").parse().unwrap();
            history.note(&id, None, Some(&running), true);
        }
        let pending = at(TaskState::Pending, None);
        let ids: Vec<TaskId> = (0..100_000)
            .map(|n| format!("pending-{n}").parse().unwrap())
            .collect();
        let started = std::time::Instant::now();
        for id in &ids {
            history.note(id, Some(&pending), None, false);
        }
        let elapsed = started.elapsed();
        println!(
            "100,000 deletes with {RUN_EVENTS} events in the ring: {:.1} ms ({:.2} µs each)",
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e6 / 100_000.0
        );
    }
}
