//! The window and the spilled backlog: which unowned tasks the cache keeps
//! as entries, and how the rest go to their group's [`Backlog`] and come
//! back from it (see the module's docs of [`super`] and of `backlog.rs`).
//!
//! Only a task that a claim could take as it is goes to the backlog: one
//! read from its submission (its revision known, no run record, no owner,
//! not held back). An unread task (freed by another node's owner record),
//! one with a run record (claimed before) and one held back stay entries,
//! so the backlog needs to remember nothing about a task but its id and
//! its submission.
//!
//! **Order.** The window holds the oldest submissions, so claims still take
//! the oldest first, with one difference: a task that is unowned again (its
//! owner released it, or died) is a candidate at once, where a node that
//! kept every task would rank it behind every task submitted before its
//! claim. With a long backlog that is the better order anyway: such a task
//! ran before, and the time it waits is time without its run.

use std::collections::BTreeSet;

use eretes_protocol::{GroupName, TaskId};

use super::backlog::{Backlog, TakenBack};
use super::{Cache, CachedTask, UNREAD};

/// The fewest unowned tasks of a group kept as entries before the rest are
/// spilled to its backlog. Claims take the oldest first, a node's share of
/// them by its rank, so the window must hold far more than one claim pass
/// of every node takes: see [`WINDOW_PER_NODE`].
pub(super) const MIN_WINDOW: usize = 4096;

/// Unowned tasks kept as entries per node serving the group, when that is
/// more than [`MIN_WINDOW`]. Each node claims first from its own share of
/// the window (its rank's by the tasks' hashes), up to its claim window
/// (128 claims in flight by default) at a time; a window whose shares
/// held fewer would send the nodes after each other's tasks, and their
/// claims into each other's.
const WINDOW_PER_NODE: usize = 256;

impl Cache {
    /// The same, keeping at least `min_window` unowned tasks of a group
    /// as entries before spilling the rest (tests use a small one).
    #[cfg(test)]
    pub(crate) fn with_window(mut self, min_window: usize) -> Self {
        self.min_window = min_window;
        self
    }

    /// How many unowned tasks of `group` are kept as entries at least.
    fn window(&self, group: &GroupName) -> usize {
        let serving = self
            .view
            .groups
            .get(group)
            .map_or(0, |load| load.serving.len());
        self.min_window.max(serving.saturating_mul(WINDOW_PER_NODE))
    }

    /// The claim candidates of `group` in the window. Tasks held back are
    /// not counted: however many the node holds back, the window keeps its
    /// candidates (else a node whose balancer skipped a window's worth
    /// would see nothing to claim while its backlog waited).
    fn candidates(&self, group: &GroupName) -> usize {
        self.unowned.get(group).map_or(0, BTreeSet::len)
    }

    /// The group whose backlog holds `id`, if one does.
    fn spilled_group(&self, id: &TaskId) -> Option<GroupName> {
        self.spilled
            .iter()
            .find(|(_, backlog)| backlog.contains(id.as_str()))
            .map(|(group, _)| group.clone())
    }

    /// Whether `id` is an unowned task held in its group's backlog.
    pub(crate) fn is_spilled(&self, id: &TaskId) -> bool {
        self.spilled_group(id).is_some()
    }

    /// Spilled tasks, in every group.
    #[cfg(test)]
    pub(crate) fn spilled_count(&self) -> usize {
        self.spilled.values().map(Backlog::len).sum()
    }

    /// Every unowned task of `group`, in the window (held back or not) or
    /// spilled, sorted by id (for tests).
    #[cfg(test)]
    pub(crate) fn all_unowned(&self, group: &GroupName) -> Vec<String> {
        let mut ids: Vec<String> = [&self.unowned, &self.held]
            .into_iter()
            .filter_map(|index| index.get(group))
            .flatten()
            .map(|(_, _, id)| id.to_string())
            .chain(
                self.spilled
                    .get(group)
                    .map(Backlog::ids)
                    .unwrap_or_default(),
            )
            .collect();
        ids.sort();
        ids
    }

    /// Put `task` again if it is spilled: it stays there if it is the same
    /// task in the same group (its record rewritten, which the backlog
    /// notes, so that its revision is read before a claim); otherwise it
    /// leaves the backlog and false is returned, for the caller to keep it.
    pub(super) fn put_spilled(&mut self, id: &TaskId, task: &CachedTask) -> bool {
        let Some(group) = self.spilled_group(id) else {
            return false;
        };
        let backlog = self.spilled.get_mut(&group).expect("just found");
        if group == task.group && !task.is_unread() {
            if task.revision != task.order {
                backlog.mark_revised(id.as_str());
            }
            return true;
        }
        backlog.remove(id.as_str());
        self.count_unowned(&group, false);
        false
    }

    /// Spill `task` to its group's backlog, if it goes there: a task a claim
    /// could take as it is, newer than every task the backlog holds, and a
    /// window already full (or a backlog not empty, which keeps the oldest
    /// tasks in the window). Counted as unowned.
    pub(super) fn spill(&mut self, id: &TaskId, task: &CachedTask) -> bool {
        if !self.spilling
            || task.is_unread()
            || task.revision != task.order
            || self.entries.contains_key(id)
            || self.held_ids.contains_key(id)
        {
            return false;
        }
        let waiting = self.spilled.get(&task.group).map_or(0, Backlog::len);
        if waiting == 0 && self.candidates(&task.group) < self.window(&task.group) {
            return false;
        }
        let backlog = self.spilled.entry(task.group.clone()).or_default();
        if !backlog.push(id.as_str(), task.order) {
            return false;
        }
        self.count_unowned(&task.group, true);
        true
    }

    /// Drop `id` from its backlog (claimed by another node, or gone), and
    /// count it no more; false if it is not spilled.
    pub(super) fn drop_spilled(&mut self, id: &TaskId) -> bool {
        let Some(group) = self.spilled_group(id) else {
            return false;
        };
        self.spilled
            .get_mut(&group)
            .expect("just found")
            .remove(id.as_str());
        self.count_unowned(&group, false);
        true
    }

    /// Keep spilled task `id` as an entry again, say because this node is
    /// about to own it or a balancer asks for it first; false if it is not
    /// spilled.
    pub(crate) fn take_back(&mut self, id: &TaskId) -> bool {
        let Some(group) = self.spilled_group(id) else {
            return false;
        };
        let taken = self
            .spilled
            .get_mut(&group)
            .expect("just found")
            .take(id.as_str())
            .expect("just found");
        self.count_unowned(&group, false);
        self.place_taken(&group, id.clone(), &taken);
        true
    }

    /// Keep `taken`, back from `group`'s backlog, as an entry.
    fn place_taken(&mut self, group: &GroupName, id: TaskId, taken: &TakenBack) {
        let revision = if taken.revised { UNREAD } else { taken.order };
        self.place_task(
            id,
            CachedTask {
                group: group.clone(),
                revision,
                order: taken.order,
            },
        );
    }

    /// Take the oldest spilled tasks of `group` back into the window until
    /// it has its number of candidates again: one for each that left
    /// (claimed, held back, gone), so that a claim pass looks at as many
    /// candidates as when the node kept them all (its look-ahead, 2 × 128
    /// claims in flight per node, is [`WINDOW_PER_NODE`] per node). At most
    /// [`MIN_WINDOW`] in one call, so that a window grown at once (nodes
    /// joined: at 1,000 nodes it is 256,000 tasks) fills over the next
    /// events rather than stalling the node's loop in one.
    pub(super) fn refill(&mut self, group: &GroupName) {
        if self.refill_paused || self.spilled.get(group).is_none_or(Backlog::is_empty) {
            return;
        }
        let window = self.window(group);
        let mut room = MIN_WINDOW;
        while self.candidates(group) < window && room > 0 {
            room -= 1;
            let Some(taken) = self.spilled.get_mut(group).and_then(Backlog::pop_oldest) else {
                break;
            };
            self.count_unowned(group, false);
            // It was a task id when it was spilled.
            let Ok(id) = TaskId::new(taken.id.as_str()) else {
                continue;
            };
            self.place_taken(group, id, &taken);
        }
    }

    /// Spill what a listing put beyond each group's window: the newest of
    /// the tasks a claim could take as they are, in submission order.
    pub(super) fn spill_excess(&mut self) {
        let entries_before = self.entries.len();
        let groups: Vec<GroupName> = self.unowned.keys().cloned().collect();
        for group in groups {
            let window = self.window(&group);
            if self.candidates(&group) <= window {
                continue;
            }
            let excess: Vec<_> = self.unowned[&group]
                .iter()
                .skip(window)
                .filter(|(order, _, id)| {
                    let entry = &self.entries[id];
                    entry.claimed.is_none()
                        && entry
                            .task
                            .as_ref()
                            .is_some_and(|task| !task.is_unread() && task.revision == *order)
                })
                .cloned()
                .collect();
            let backlog = self.spilled.entry(group.clone()).or_default();
            let set = self.unowned.get_mut(&group).expect("listed above");
            for key in excess {
                // In submission order, each id once: the backlog takes each.
                if backlog.push(key.2.as_str(), key.0) {
                    set.remove(&key);
                    self.entries.remove(&key.2);
                }
            }
        }
        // The listing's table was sized for every task: most of its slots
        // (40 bytes each) would stay empty for good.
        if self.entries.len() < entries_before {
            self.entries.shrink_to_fit();
        }
    }
}
