//! The runs the dashboard shows for a task: the claims and ends this agent's
//! watch saw, kept in one ring for all tasks ([`RUN_EVENTS`] entries), so
//! that the history costs a bounded amount of memory however many tasks
//! come and go. A task's history is what of it the ring still holds: the
//! runs since this agent started, up to the ring's size (on a busy cluster,
//! the last minutes), and it goes when the task is deleted. The store
//! itself keeps only each task's counts (`runs/<id>`: claims, takeovers),
//! which the task's page shows beside it.

use std::collections::VecDeque;
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
    events: Mutex<VecDeque<RunEvent>>,
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
        let mut events = self.events.lock().expect("not poisoned");
        if before.is_some() && after.is_none() {
            // Deleted: its history goes with it (a task submitted again
            // under the id starts with none).
            events.retain(|event| &event.task != task);
            return;
        }
        if was == is {
            let state = |position: Option<&TaskPosition>| position.map(|p| p.state);
            if let (Some((node, epoch)), Some(now)) = (is, state(after)) {
                if state(before) != Some(now) && !now.is_terminal() {
                    events.push_back(RunEvent {
                        task: task.clone(),
                        kind: now.name(),
                        node,
                        epoch,
                        at_ms,
                    });
                    trim(&mut events);
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
            events.push_back(RunEvent {
                task: task.clone(),
                kind,
                node,
                epoch,
                at_ms,
            });
        }
        if let Some((node, epoch)) = is {
            events.push_back(RunEvent {
                task: task.clone(),
                kind: "started",
                node,
                epoch,
                at_ms,
            });
        }
        trim(&mut events);
    }

    /// The events of `task` the ring still holds, oldest first.
    pub fn of(&self, task: &TaskId) -> Vec<RunEvent> {
        let events = self.events.lock().expect("not poisoned");
        events.iter().filter(|e| &e.task == task).cloned().collect()
    }
}

fn trim(events: &mut VecDeque<RunEvent>) {
    while events.len() > RUN_EVENTS {
        events.pop_front();
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
}
