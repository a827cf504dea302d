//! A group's spilled backlog: the unowned tasks beyond the cache's window,
//! held as their ids and submission revisions only.
//!
//! **Why.** Every node of a group must know each of the group's unowned
//! tasks, since any of them may be the next it claims. Held as cache
//! entries (an id map slot, the id's own allocation, the entry, a key in
//! the ordered candidate index) a waiting task cost a node about 129 bytes;
//! a backlog of a million tasks, 129 MB on each node of its group. Only the
//! oldest few thousand can be claimed soon, so the cache keeps those as
//! entries (its *window*) and the rest here, in submission order:
//!
//! ```text
//! text   "t-1000t-1001t-1002…"        the ids, back to back
//! tasks  [(order, start, len, state)]  16 bytes each, oldest first
//! index  {hash(id) → position}         4 bytes a slot, for the watch's lookups
//! ```
//!
//! some 35 bytes per task with ids of a dozen characters when they fit
//! exactly, up to some 50 as the string and the array grow by doubling. The watch's events still find a
//! spilled task by its id (another node claims it, it is deleted, its record
//! is rewritten), and the cache takes tasks back into its window, oldest
//! first, as claims drain it.
//!
//! A task leaves by being marked dead where it lies; the dead and the
//! already taken are dropped when they are more than half of what is held
//! (a compaction, O(1) amortized per task).

use std::hash::BuildHasher;

use eretes_store::Revision;
use hashbrown::HashTable;

/// A spilled task: where its id lies in the text, and its submission.
#[derive(Debug, Clone, Copy)]
struct Spilled {
    /// The task record's `create_revision` (and `mod_revision`, unless
    /// `state` is [`State::Revised`]).
    order: Revision,
    /// Where its id starts in the text.
    start: u32,
    /// The id's length (ids are at most 128 bytes).
    len: u8,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Unowned, and its record is the one submitted.
    Live,
    /// Unowned, and its record was rewritten since it was submitted: its
    /// revision is not known, so it is read before a claim.
    Revised,
    /// Gone (claimed by another node, or deleted); dropped at the next
    /// compaction.
    Dead,
}

/// A task taken back from the backlog ([`Backlog::pop_oldest`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TakenBack {
    /// Its id.
    pub id: String,
    /// Its submission's revision.
    pub order: Revision,
    /// Whether its record changed since: its revision must be read first.
    pub revised: bool,
}

/// The unowned tasks of one group beyond the cache's window, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    text: String,
    tasks: Vec<Spilled>,
    /// Tasks before this position were taken back.
    head: usize,
    /// The position in `tasks` of each task that is not dead.
    index: HashTable<u32>,
    hasher: std::hash::RandomState,
    /// Tasks not dead (live or revised) at or after `head`.
    held: usize,
}

impl Backlog {
    /// How many tasks it holds.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Whether it holds no task.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The newest submission it holds, or ever held since it was last empty.
    fn newest(&self) -> Option<Revision> {
        self.tasks.last().map(|task| task.order)
    }

    /// Add `id`, submitted at `order`, as the newest task (a batch's tasks
    /// share one revision). Refused (false) when it is older than a task
    /// held, which would break the oldest-first order, or when the text
    /// would outgrow its 4 GiB of positions: the cache then keeps the task
    /// in its window. (An emptied backlog was cleared by the removal that
    /// emptied it, so it takes any revision again.)
    pub fn push(&mut self, id: &str, order: Revision) -> bool {
        if self.newest().is_some_and(|newest| newest > order) {
            return false;
        }
        let (Ok(start), Ok(len), Ok(position)) = (
            u32::try_from(self.text.len()),
            u8::try_from(id.len()),
            u32::try_from(self.tasks.len()),
        ) else {
            return false;
        };
        if start.checked_add(u32::from(len)).is_none() || self.find(id).is_some() {
            return false;
        }
        self.text.push_str(id);
        self.tasks.push(Spilled {
            order,
            start,
            len,
            state: State::Live,
        });
        let Backlog {
            index,
            hasher,
            text,
            tasks,
            ..
        } = self;
        index.insert_unique(hasher.hash_one(id), position, |&at| {
            hasher.hash_one(id_at(text, &tasks[at as usize]))
        });
        self.held += 1;
        true
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// The position of `id`, if held.
    fn find(&self, id: &str) -> Option<usize> {
        if self.held == 0 {
            return None; // no hashing for a group with nothing spilled
        }
        self.index
            .find(self.hasher.hash_one(id), |&at| {
                id_at(&self.text, &self.tasks[at as usize]) == id
            })
            .map(|&at| at as usize)
    }

    /// Drop `id` (claimed by another node, or gone); false if not held.
    pub fn remove(&mut self, id: &str) -> bool {
        let hash = self.hasher.hash_one(id);
        let Backlog {
            index, text, tasks, ..
        } = self;
        let Ok(found) = index.find_entry(hash, |&at| id_at(text, &tasks[at as usize]) == id) else {
            return false;
        };
        let (at, _) = found.remove();
        self.tasks[at as usize].state = State::Dead;
        self.held -= 1;
        self.compact_if_sparse();
        true
    }

    /// Take `id` out of the backlog, out of its turn.
    pub fn take(&mut self, id: &str) -> Option<TakenBack> {
        let task = self.tasks[self.find(id)?];
        self.remove(id);
        Some(TakenBack {
            id: id.to_string(),
            order: task.order,
            revised: task.state == State::Revised,
        })
    }

    /// Note that `id`'s record was rewritten; false if not held.
    pub fn mark_revised(&mut self, id: &str) -> bool {
        match self.find(id) {
            Some(at) => {
                self.tasks[at].state = State::Revised;
                true
            }
            None => false,
        }
    }

    /// Take back the oldest task held.
    pub fn pop_oldest(&mut self) -> Option<TakenBack> {
        while let Some(&task) = self.tasks.get(self.head) {
            self.head += 1;
            if task.state == State::Dead {
                continue;
            }
            let id = id_at(&self.text, &task).to_string();
            let hash = self.hasher.hash_one(&id);
            let position = self.head - 1;
            if let Ok(found) = self.index.find_entry(hash, |&at| at as usize == position) {
                found.remove();
            }
            self.held -= 1;
            let taken = TakenBack {
                id,
                order: task.order,
                revised: task.state == State::Revised,
            };
            self.compact_if_sparse();
            return Some(taken);
        }
        None
    }

    /// Rebuild without the dead and the taken once they are more than half
    /// of what is kept, and give the memory back.
    fn compact_if_sparse(&mut self) {
        if self.held == 0 {
            self.clear();
            return;
        }
        if self.tasks.len() < 64 || self.held * 2 > self.tasks.len() {
            return;
        }
        let mut text = String::with_capacity(
            self.tasks[self.head..]
                .iter()
                .filter(|task| task.state != State::Dead)
                .map(|task| usize::from(task.len))
                .sum(),
        );
        let mut tasks = Vec::with_capacity(self.held);
        for task in &self.tasks[self.head..] {
            if task.state == State::Dead {
                continue;
            }
            let start = text.len() as u32; // within the old text's bounds
            text.push_str(id_at(&self.text, task));
            tasks.push(Spilled { start, ..*task });
        }
        let mut index = HashTable::with_capacity(tasks.len());
        for (position, task) in tasks.iter().enumerate() {
            let id = id_at(&text, task);
            index.insert_unique(self.hasher.hash_one(id), position as u32, |&at| {
                self.hasher.hash_one(id_at(&text, &tasks[at as usize]))
            });
        }
        self.text = text;
        self.tasks = tasks;
        self.index = index;
        self.head = 0;
    }

    fn clear(&mut self) {
        if !self.tasks.is_empty() || self.text.capacity() > 0 {
            *self = Backlog {
                hasher: std::mem::take(&mut self.hasher),
                ..Backlog::default()
            };
        }
    }

    /// The ids held, oldest first (for tests).
    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<String> {
        self.tasks[self.head..]
            .iter()
            .filter(|task| task.state != State::Dead)
            .map(|task| id_at(&self.text, task).to_string())
            .collect()
    }

    /// Bytes held on the heap, for tests of its size: the table has a
    /// power of two of buckets, filled to at most seven eighths, each a
    /// position and a control byte (and 16 control bytes more).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let buckets = (self.index.capacity() * 8).div_ceil(7).next_power_of_two();
        self.text.capacity()
            + self.tasks.capacity() * std::mem::size_of::<Spilled>()
            + buckets * (std::mem::size_of::<u32>() + 1)
            + 16
    }
}

fn id_at<'a>(text: &'a str, task: &Spilled) -> &'a str {
    let start = task.start as usize;
    &text[start..start + usize::from(task.len)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(backlog: &mut Backlog) -> Vec<(String, Revision, bool)> {
        std::iter::from_fn(|| backlog.pop_oldest())
            .map(|taken| (taken.id, taken.order, taken.revised))
            .collect()
    }

    #[test]
    fn tasks_come_back_oldest_first_without_the_removed() {
        let mut backlog = Backlog::default();
        for n in 1..=5i64 {
            assert!(backlog.push(&format!("t-{n}"), n * 10));
        }
        assert_eq!(backlog.len(), 5);
        assert!(backlog.remove("t-2"));
        assert!(!backlog.remove("t-2"), "already gone");
        assert!(backlog.mark_revised("t-4"));
        assert!(!backlog.contains("t-2") && backlog.contains("t-3"));
        assert_eq!(backlog.len(), 4);
        assert_eq!(
            ids(&mut backlog),
            vec![
                ("t-1".into(), 10, false),
                ("t-3".into(), 30, false),
                ("t-4".into(), 40, true),
                ("t-5".into(), 50, false),
            ]
        );
        assert!(backlog.is_empty() && !backlog.contains("t-5"));
    }

    #[test]
    fn a_task_taken_out_of_turn_keeps_what_is_known_of_it() {
        let mut backlog = Backlog::default();
        assert!(backlog.push("a", 1) && backlog.push("b", 2) && backlog.push("c", 3));
        assert!(backlog.mark_revised("b"));
        let taken = backlog.take("b").expect("held");
        assert_eq!(
            (taken.id.as_str(), taken.order, taken.revised),
            ("b", 2, true)
        );
        assert!(backlog.take("b").is_none());
        assert_eq!(
            ids(&mut backlog),
            vec![("a".into(), 1, false), ("c".into(), 3, false)]
        );
    }

    #[test]
    fn only_tasks_as_new_as_the_newest_and_new_ids_are_taken() {
        let mut backlog = Backlog::default();
        assert!(backlog.push("a", 5));
        assert!(backlog.push("b", 5), "submitted in the same batch");
        assert!(!backlog.push("c", 4), "older");
        assert!(!backlog.push("a", 6), "held already");
        assert!(!backlog.push(&"x".repeat(300), 7), "longer than an id");
        assert!(backlog.push("c", 6));
        assert_eq!(backlog.len(), 3);
        // Emptied, it takes any revision again.
        assert!(backlog.remove("a") && backlog.remove("b") && backlog.remove("c"));
        assert!(backlog.push("d", 1));
    }

    #[test]
    fn compaction_keeps_what_is_held_and_gives_memory_back() {
        let mut backlog = Backlog::default();
        for n in 0..10_000i64 {
            assert!(backlog.push(&format!("task-{n:06}"), n + 1));
        }
        let full = backlog.heap_bytes();
        // Every task but each tenth goes (claimed elsewhere), then the
        // oldest thousand are taken back.
        for n in (0..10_000i64).filter(|n| n % 10 != 0) {
            assert!(backlog.remove(&format!("task-{n:06}")));
        }
        for _ in 0..100 {
            backlog.pop_oldest().expect("held");
        }
        assert_eq!(backlog.len(), 900);
        assert!(
            backlog.heap_bytes() * 3 < full,
            "{} of {full}",
            backlog.heap_bytes()
        );
        for n in (1_000..10_000i64).step_by(10) {
            assert!(backlog.contains(&format!("task-{n:06}")), "task-{n:06}");
        }
        let rest = ids(&mut backlog);
        assert_eq!(rest.len(), 900);
        assert_eq!(rest[0], ("task-001000".into(), 1_001, false));
        assert!(rest.windows(2).all(|pair| pair[0].1 < pair[1].1));
    }

    #[test]
    fn a_task_costs_well_under_sixty_four_bytes() {
        let mut backlog = Backlog::default();
        let count = 100_000i64;
        for n in 0..count {
            assert!(backlog.push(&format!("scale-{n}"), n + 1));
        }
        let per_task = backlog.heap_bytes() as f64 / count as f64;
        // Exact fit would be 12 + 16 + some 6 B; the string and the array
        // grow by doubling.
        assert!(per_task < 56.0, "{per_task:.1} bytes per task");
    }
}
