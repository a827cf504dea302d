//! An index of every task and live node of a namespace, built from one read
//! of the store and kept current by applying watch events, so that a page of
//! the task list costs O(page) rather than a read of the whole namespace.
//!
//! [`Coordinator::snapshot`] builds one from a single read; the agent keeps
//! one current with its own watch and serves `eretes ls` from it. Both decode
//! the five record kinds a task's view is made of (tasks, owners, results,
//! states, nodes) here, and an entry that does not decode is counted by its
//! key until it is overwritten or deleted.
//!
//! Records are kept as their stored bytes plus the little a filter needs
//! (group, state); a page decodes only the tasks it returns, which keeps the
//! index near the size of the store's own values.
//!
//! ```
//! use eretes_protocol::{Namespace, TaskIndex, TaskQuery};
//!
//! let index = TaskIndex::new(Namespace::new("demo").unwrap(), 1);
//! let (tasks, next) = index.page(&TaskQuery::new(100));
//! assert!(tasks.is_empty() && next.is_none());
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use eretes_store::{EventKind, KeyValue, Revision, WatchEvent};

use crate::ids::{GroupName, NodeName, TaskId};
use crate::keys::{KeyKind, Namespace};
use crate::machine::{MachineState, StateRecord};
use crate::records::{decode, decode_node, decode_task, NodeRecord, Outcome, OwnerRecord};
use crate::records::{ResultRecord, TaskRecord};
use crate::views::{NodeView, Snapshot, TaskState, TaskView};

/// Which tasks a page holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQuery {
    /// Only tasks whose id sorts after this one (the previous page's last).
    pub after: Option<TaskId>,
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks of this group.
    pub group: Option<String>,
    /// At most this many tasks.
    pub limit: usize,
    /// And only as many as fit in about this many bytes of JSON (at least
    /// one): a page of a thousand tasks whose properties are large would
    /// otherwise be built whole in memory for each request.
    pub max_bytes: usize,
}

impl TaskQuery {
    /// The first `limit` tasks, unfiltered.
    pub fn new(limit: usize) -> TaskQuery {
        TaskQuery {
            after: None,
            state: None,
            group: None,
            limit,
            max_bytes: usize::MAX,
        }
    }
}

/// Where one task stands in the index ([`TaskIndex::position`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPosition {
    /// Its state.
    pub state: TaskState,
    /// The node that owns it and the claim's epoch, while one does.
    pub owner: Option<(NodeName, Revision)>,
}

/// Every task and live node of a namespace at one revision.
#[derive(Debug, Clone)]
pub struct TaskIndex {
    ns: Namespace,
    revision: Revision,
    tasks: BTreeMap<TaskId, Entry>,
    nodes: BTreeMap<NodeName, NodeRecord>,
    /// Tasks each node runs, kept as entries change so that the node list
    /// does not scan every task.
    running: HashMap<NodeName, BTreeMap<GroupName, usize>>,
    /// Tasks per group and state, kept as entries change so that counting
    /// (metrics, the dashboard) does not scan every task.
    counts: BTreeMap<(GroupName, TaskState), usize>,
    /// Keys whose value (or whose key) does not fit the layout.
    malformed: BTreeSet<String>,
}

/// What the store holds of one task id.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// `tasks/<id>`: its group and the record.
    spec: Option<(GroupName, Arc<[u8]>)>,
    /// `owners/<id>`: the owner and the claim's revision (the epoch).
    owner: Option<(NodeName, Revision)>,
    /// `results/<id>`: its final state, group and the record.
    result: Option<(TaskState, GroupName, Arc<[u8]>)>,
    /// `states/<id>`: the machine's state and the record.
    machine: Option<(MachineState, Arc<[u8]>)>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.spec.is_none()
            && self.owner.is_none()
            && self.result.is_none()
            && self.machine.is_none()
    }

    /// Its state, if it is a task at all (a task record or a result).
    fn state(&self) -> Option<TaskState> {
        if let Some((state, _, _)) = &self.result {
            return Some(*state);
        }
        self.spec.as_ref()?;
        let machine = self.machine.as_ref().map(|(state, _)| state);
        Some(TaskState::of_live(machine, self.owner.is_some()))
    }

    fn group(&self) -> Option<&GroupName> {
        match (&self.result, &self.spec) {
            (Some((_, group, _)), _) | (None, Some((group, _))) => Some(group),
            (None, None) => None,
        }
    }

    /// The node this entry counts as running on, and its group: a live
    /// task with an owner.
    fn running_on(&self) -> Option<(&NodeName, &GroupName)> {
        match (&self.spec, &self.result, &self.owner) {
            (Some((group, _)), None, Some((node, _))) => Some((node, group)),
            _ => None,
        }
    }

    /// Its view; `None` if it is no task or (which the index prevents) a
    /// record no longer decodes.
    fn view(&self, id: &TaskId) -> Option<TaskView> {
        if let Some((_, _, raw)) = &self.result {
            let result: ResultRecord = serde_json::from_slice(raw).ok()?;
            return Some(ended(id.clone(), result));
        }
        let (_, raw) = self.spec.as_ref()?;
        let record: TaskRecord = serde_json::from_slice(raw).ok()?;
        let machine = self
            .machine
            .as_ref()
            .and_then(|(_, raw)| serde_json::from_slice::<StateRecord>(raw).ok());
        let view = TaskView {
            id: id.clone(),
            group: record.spec.group,
            state: TaskState::Pending,
            properties: record.spec.properties,
            node: self.owner.as_ref().map(|(node, _)| node.clone()),
            epoch: self.owner.as_ref().map(|(_, epoch)| *epoch),
            result: None,
            error: None,
            sleeping_until_ms: None,
            errors: Vec::new(),
            submitted_at_ms: (record.submitted_at_ms > 0).then_some(record.submitted_at_ms),
            finished_at_ms: None,
        };
        Some(view.with_machine(machine))
    }
}

/// Which part of an entry a key holds.
enum Part {
    Spec,
    Owner,
    Result,
    Machine,
}

impl TaskIndex {
    /// An empty index of `ns` at `revision`.
    pub fn new(ns: Namespace, revision: Revision) -> TaskIndex {
        TaskIndex {
            ns,
            revision,
            tasks: BTreeMap::new(),
            nodes: BTreeMap::new(),
            running: HashMap::new(),
            counts: BTreeMap::new(),
            malformed: BTreeSet::new(),
        }
    }

    /// The index of what a read at `revision` returned. Keys outside the
    /// indexed record kinds are ignored, so `kvs` may be the whole namespace.
    pub fn from_read<'a>(
        ns: Namespace,
        revision: Revision,
        kvs: impl IntoIterator<Item = &'a KeyValue>,
    ) -> TaskIndex {
        let mut index = TaskIndex::new(ns, revision);
        for kv in kvs {
            index.put(kv);
        }
        index
    }

    /// The revision the index is at: its read's, or the last event's.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// How many entries are skipped as malformed.
    pub fn malformed(&self) -> usize {
        self.malformed.len()
    }

    /// The keys of the first `most` entries skipped as malformed, in key
    /// order.
    pub fn malformed_keys(&self, most: usize) -> Vec<String> {
        self.malformed.iter().take(most).cloned().collect()
    }

    /// How many tasks there are, in every state.
    pub fn task_count(&self) -> usize {
        self.counts.values().sum()
    }

    /// How many tasks each group has in each state (kept as the index
    /// changes: O(groups × states), not O(tasks)).
    pub fn counts(&self) -> BTreeMap<(GroupName, TaskState), usize> {
        self.counts.clone()
    }

    /// Apply one watch event of this namespace.
    pub fn apply(&mut self, event: &WatchEvent) {
        match event.kind {
            EventKind::Put => self.put(&event.kv),
            EventKind::Delete => self.remove(&event.kv.key),
        }
        self.revision = self.revision.max(event.kv.mod_revision);
    }

    /// The page of tasks `query` asks for, in id order, and the id to pass
    /// as `after` for the next page (`None` on the last). Costs O(tasks
    /// looked at): the page itself when unfiltered.
    pub fn page(&self, query: &TaskQuery) -> (Vec<TaskView>, Option<TaskId>) {
        let start = match &query.after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let matching = self
            .tasks
            .range::<TaskId, _>((start, Bound::Unbounded))
            .filter(|(_, entry)| {
                let Some(state) = entry.state() else {
                    return false;
                };
                query.state.is_none_or(|wanted| state == wanted)
                    && query
                        .group
                        .as_deref()
                        .is_none_or(|g| entry.group().is_some_and(|own| own.as_str() == g))
            })
            .filter_map(|(id, entry)| entry.view(id));
        let mut tasks: Vec<TaskView> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for view in matching {
            let weight = view.weight();
            let full = tasks.len() == query.limit
                || (!tasks.is_empty() && bytes.saturating_add(weight) > query.max_bytes);
            if full {
                more = true;
                break;
            }
            bytes = bytes.saturating_add(weight);
            tasks.push(view);
        }
        let next = more
            .then(|| tasks.last().map(|task| task.id.clone()))
            .flatten();
        (tasks, next)
    }

    /// Where task `id` stands: its state and, while a node owns it (a live
    /// task), that node and the claim's epoch. `None` if the index holds no such task.
    /// The agent diffs it around each watch batch to tell runs that start
    /// and end.
    pub fn position(&self, id: &TaskId) -> Option<TaskPosition> {
        let entry = self.tasks.get(id)?;
        let state = entry.state()?;
        // An ended task's leftover owner key is no run.
        let owner = entry.running_on().and(entry.owner.clone());
        Some(TaskPosition { state, owner })
    }

    /// Every live node, by name, with how many tasks each runs.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.nodes
            .iter()
            .map(|(name, record)| NodeView {
                name: name.clone(),
                groups: record.groups.clone(),
                started_at_ms: record.started_at_ms,
                running: self
                    .running
                    .get(name)
                    .map_or(0, |groups| groups.values().sum()),
                running_by_group: self.running.get(name).cloned().unwrap_or_default(),
                max_running: record.max_running,
            })
            .collect()
    }

    /// Every task's view and every node: the whole index, decoded.
    pub fn to_snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            tasks: self
                .tasks
                .iter()
                .filter_map(|(id, entry)| Some((id.clone(), entry.view(id)?)))
                .collect(),
            nodes: self
                .nodes()
                .into_iter()
                .map(|node| (node.name.clone(), node))
                .collect(),
            malformed: self.malformed(),
        }
    }

    /// Whether a key belongs to a record kind the index keeps; a key under
    /// those prefixes that does not parse is malformed.
    fn indexed(&self, key: &str) -> Option<Result<KeyKind, ()>> {
        match self.ns.parse(key) {
            Ok(
                kind @ (KeyKind::Task(_)
                | KeyKind::Owner(_)
                | KeyKind::Result(_)
                | KeyKind::State(_)
                | KeyKind::Node(_)),
            ) => Some(Ok(kind)),
            Ok(_) => None,
            Err(_) => {
                let ns = &self.ns;
                let prefixes = [
                    ns.tasks_prefix(),
                    ns.owners_prefix(),
                    ns.results_prefix(),
                    ns.states_prefix(),
                    ns.nodes_prefix(),
                ];
                prefixes
                    .iter()
                    .any(|prefix| key.starts_with(prefix.as_str()))
                    .then_some(Err(()))
            }
        }
    }

    fn put(&mut self, kv: &KeyValue) {
        let kind = match self.indexed(&kv.key) {
            None => return,
            Some(Err(())) => {
                self.malformed.insert(kv.key.clone());
                return;
            }
            Some(Ok(kind)) => kind,
        };
        let raw = || Arc::<[u8]>::from(kv.value.as_slice());
        // A value that does not decode replaces the part it would have set:
        // the store no longer holds the old one.
        let decoded = match kind {
            KeyKind::Node(name) => {
                match decode_node(&kv.key, &kv.value, kv.lease) {
                    Ok(record) => {
                        self.nodes.insert(name, record);
                    }
                    Err(_) => {
                        self.nodes.remove(&name);
                        self.malformed.insert(kv.key.clone());
                        return;
                    }
                }
                true
            }
            KeyKind::Task(id) => {
                let spec = decode_task(&kv.key, &kv.value)
                    .ok()
                    .map(|record| (record.spec.group, raw()));
                let ok = spec.is_some();
                self.update(id, |entry| entry.spec = spec);
                ok
            }
            KeyKind::Owner(id) => {
                let owner = decode::<OwnerRecord>("owner", &kv.key, &kv.value)
                    .ok()
                    .map(|owner| (owner.node, kv.mod_revision));
                let ok = owner.is_some();
                self.update(id, |entry| entry.owner = owner);
                ok
            }
            KeyKind::Result(id) => {
                let result = decode::<ResultRecord>("result", &kv.key, &kv.value)
                    .ok()
                    .map(|record| (final_state(record.outcome), record.spec.group, raw()));
                let ok = result.is_some();
                self.update(id, |entry| entry.result = result);
                ok
            }
            KeyKind::State(id) => {
                let machine = decode::<StateRecord>("state", &kv.key, &kv.value)
                    .ok()
                    .map(|record| (record.state, raw()));
                let ok = machine.is_some();
                self.update(id, |entry| entry.machine = machine);
                ok
            }
            _ => return,
        };
        if decoded {
            self.malformed.remove(&kv.key);
        } else {
            self.malformed.insert(kv.key.clone());
        }
    }

    fn remove(&mut self, key: &str) {
        self.malformed.remove(key);
        let (id, part) = match self.indexed(key) {
            Some(Ok(KeyKind::Node(name))) => {
                self.nodes.remove(&name);
                return;
            }
            Some(Ok(KeyKind::Task(id))) => (id, Part::Spec),
            Some(Ok(KeyKind::Owner(id))) => (id, Part::Owner),
            Some(Ok(KeyKind::Result(id))) => (id, Part::Result),
            Some(Ok(KeyKind::State(id))) => (id, Part::Machine),
            _ => return,
        };
        self.update(id, |entry| match part {
            Part::Spec => entry.spec = None,
            Part::Owner => entry.owner = None,
            Part::Result => entry.result = None,
            Part::Machine => entry.machine = None,
        });
    }

    /// Change one entry, keeping the per-node running counts and dropping
    /// the entry once nothing of it is left.
    fn update(&mut self, id: TaskId, change: impl FnOnce(&mut Entry)) {
        let entry = self.tasks.entry(id.clone()).or_default();
        let owned = |(node, group): (&NodeName, &GroupName)| (node.clone(), group.clone());
        let counted = |entry: &Entry| Some((entry.group()?.clone(), entry.state()?));
        let before = entry.running_on().map(owned);
        let was = counted(entry);
        change(entry);
        let after = entry.running_on().map(owned);
        let is = counted(entry);
        if entry.is_empty() {
            self.tasks.remove(&id);
        }
        if was != is {
            if let Some(key) = was {
                if let Some(count) = self.counts.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        self.counts.remove(&key);
                    }
                }
            }
            if let Some(key) = is {
                *self.counts.entry(key).or_default() += 1;
            }
        }
        if before != after {
            if let Some((node, group)) = before {
                if let Some(groups) = self.running.get_mut(&node) {
                    if let Some(count) = groups.get_mut(&group) {
                        *count -= 1;
                        if *count == 0 {
                            groups.remove(&group);
                        }
                    }
                    if groups.is_empty() {
                        self.running.remove(&node);
                    }
                }
            }
            if let Some((node, group)) = after {
                *self
                    .running
                    .entry(node)
                    .or_default()
                    .entry(group)
                    .or_default() += 1;
            }
        }
    }
}

/// The state a task ended in.
fn final_state(outcome: Outcome) -> TaskState {
    match outcome {
        Outcome::Done => TaskState::Done,
        Outcome::Failed => TaskState::Failed,
        Outcome::Killed => TaskState::Killed,
    }
}

/// The view of a task that ended with `result`.
pub(crate) fn ended(id: TaskId, result: ResultRecord) -> TaskView {
    let state = final_state(result.outcome);
    TaskView {
        id,
        group: result.spec.group,
        state,
        properties: result.spec.properties,
        node: Some(result.node),
        epoch: Some(result.epoch),
        result: (state == TaskState::Done).then_some(result.result),
        error: result.error,
        sleeping_until_ms: None,
        errors: Vec::new(),
        submitted_at_ms: None,
        finished_at_ms: (result.finished_at_ms > 0).then_some(result.finished_at_ms),
    }
}
