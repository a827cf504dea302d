//! The node's view of its namespace, kept current from the store's watch.
//!
//! It answers the runtime's two hot questions cheaply: "which tasks of my
//! groups are unowned, oldest first?" and "how loaded is each group?" (the
//! [`ClusterView`] the balancer reads). Every update is O(log n).
//!
//! Only the groups the node serves are kept task by task, and of those only
//! the tasks a claim could be about: the unowned ones and this node's own.
//! Of every task another node owns, in any group, it keeps a count per node
//! and group (a node's `--max-running` counts its tasks of every group, and
//! every node must work out the same room for it), counted from owner
//! records as they come and go, with the record a delete removed (the
//! watch's `prev_kv`) saying whose count drops. A node that serves one
//! group of a hundred thus holds nothing per task of the other ninety-nine,
//! and of its own group's tasks nothing per task that another node runs.
//!
//! When another node's owner record of a task of a served group goes
//! without its task (a release, an expired lease), the task is unowned
//! again, and the node knows its id and group, but not what a claim checks
//! (the task's and run record's revisions, the run counts): the task is
//! cached *unread* (see [`CachedTask::is_unread`]), counted as unowned and a
//! claim candidate, and the node reads its keys
//! (`Coordinator::read_task_keys`) when it is about to claim it.
//!
//! Of a group's unowned tasks, only the oldest few thousand (the *window*)
//! are kept as entries; the rest are spilled to the group's [`Backlog`],
//! which holds their ids and submission revisions in 35–50 bytes a task
//! (against some 129 as an entry), and are taken back, oldest first, one
//! for each candidate that leaves the window (`spill.rs`). A spilled task
//! still counts as unowned, and the watch's events still find it.

use std::collections::{BTreeSet, HashMap, HashSet};

use eretes_protocol::{
    decode, ClaimBasis, GroupName, KeyKind, Namespace, NodeName, NodeRecord, OwnerRecord,
    RunRecord, TaskId,
};
use eretes_store::{KeyValue, Revision};

use tokio_util::time::delay_queue::Key as IgnoreKey;

use crate::balancer::ClusterView;
use crate::sparse::Sparse;

use backlog::Backlog;
use spill::MIN_WINDOW;

/// A pending or running task as cached: what a claim checks, not the
/// record. The record (properties and all) is read by the claim's own
/// transaction, so a node's view costs the same whatever tasks carry.
#[derive(Debug, Clone)]
pub(crate) struct CachedTask {
    /// Its group (one shared copy of each group's name).
    pub group: GroupName,
    /// `mod_revision` of `tasks/<id>`; the claim checks it is unchanged.
    /// [`UNREAD`] until the node has read the task.
    pub revision: Revision,
    /// `create_revision`: claims go oldest first. For an unread task, the
    /// `create_revision` of the owner record whose delete freed it: later
    /// than its task's, so it comes after the tasks that waited since
    /// before that claim, until its read puts it in its place. (Ranking
    /// unread tasks first instead put every task a node had read behind
    /// every unread one: the node's reads went past its look-ahead, and
    /// 10,000 orphans were read 4.5 times each.) A read that saw that owner
    /// record is older than its delete.
    pub order: Revision,
}

/// The revision of a task the node knows only from its owner record's
/// delete: no key has revision 0.
const UNREAD: Revision = 0;

impl CachedTask {
    /// Whether the node must read the task's keys before it can claim it.
    pub fn is_unread(&self) -> bool {
        self.revision == UNREAD
    }
}

/// An owner record as cached. `epoch == 0` marks this node's own claim still
/// in flight, counted as owned so the balancer does not overshoot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CachedOwner {
    /// The node the record names.
    pub node: NodeName,
    /// The group the record names (the task's, when it was claimed).
    pub group: GroupName,
    /// The claim's epoch: the record's `create_revision` (0: in flight).
    pub epoch: Revision,
}

/// A run record as cached: what the next claim checks and counts on, in
/// 16 bytes. Not the record (32 bytes with its `Option` and the last
/// claimant's name): every cached task has an entry, and most have a run
/// record, so the difference is paid once per task of the node's groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CachedRun {
    /// `mod_revision` of `claims/<id>`; 0 when there is none (a key's
    /// revision is never 0).
    revision: Revision,
    claims: u32,
    /// The takeovers, and in the top bit whether the last claim is still
    /// open.
    takeovers_open: u32,
}

impl CachedRun {
    const OPEN: u32 = 1 << 31;

    /// The counts of `record`, at `revision`. Takeovers beyond 2³¹ − 1
    /// (never reached: a task is parked after a handful) are held at that.
    fn new(revision: Revision, record: &RunRecord) -> Self {
        let takeovers = record.takeovers.min(Self::OPEN - 1);
        CachedRun {
            revision,
            claims: record.claims,
            takeovers_open: takeovers | if record.open { Self::OPEN } else { 0 },
        }
    }

    fn is_present(&self) -> bool {
        self.revision != 0
    }

    /// The record a claim starts from. The last claimant is not cached: a
    /// claim writes its own, and nothing else a claim writes reads it.
    fn record(&self) -> RunRecord {
        RunRecord {
            claims: self.claims,
            takeovers: self.takeovers_open & !Self::OPEN,
            open: self.takeovers_open & Self::OPEN != 0,
            node: None,
        }
    }
}

/// What claims left of a task: its owner record, when the cache keeps it,
/// and its run record's counts.
#[derive(Debug, Default)]
struct Claimed {
    owner: Option<CachedOwner>,
    /// The run record's counts and its `mod_revision`.
    run: CachedRun,
}

/// Everything cached about one task id. One entry per task (rather than one
/// map per key kind) keeps a running task's footprint small: the id is held
/// once and hashed once per event.
#[derive(Debug, Default)]
struct TaskEntry {
    task: Option<CachedTask>,
    /// The owner and run records, in one box, absent when there is neither.
    /// Most entries are a backlog's tasks, never claimed: kept in place the
    /// two took 32 bytes of every entry (24 with the owner alone boxed),
    /// against the box's 8; a task that has both (this node's own) pays one
    /// allocation for them, as it did for its boxed owner.
    claimed: Option<Box<Claimed>>,
}

// Every unowned task of a node's groups, and each of its own, has an
// entry: keep it small.
const _: () = assert!(std::mem::size_of::<TaskEntry>() <= 32);

impl TaskEntry {
    fn is_empty(&self) -> bool {
        self.task.is_none() && self.claimed.is_none()
    }

    /// The owner record kept with the task, if any.
    fn owner(&self) -> Option<&CachedOwner> {
        self.claimed.as_ref()?.owner.as_ref()
    }

    /// The run record's counts (absent: [`CachedRun::default`]).
    fn run(&self) -> CachedRun {
        self.claimed
            .as_ref()
            .map(|claimed| claimed.run)
            .unwrap_or_default()
    }

    /// Cache `run` as the run record (the default: none).
    fn set_run(&mut self, run: CachedRun) {
        match &mut self.claimed {
            Some(claimed) => claimed.run = run,
            None if run.is_present() => {
                self.claimed = Some(Box::new(Claimed { owner: None, run }));
            }
            None => {}
        }
        self.drop_claimed_if_empty();
    }

    /// Keep `owner` as the owner record; returns the one it replaces.
    fn replace_owner(&mut self, owner: Option<CachedOwner>) -> Option<CachedOwner> {
        let previous = match &mut self.claimed {
            Some(claimed) => std::mem::replace(&mut claimed.owner, owner),
            None => {
                if owner.is_some() {
                    self.claimed = Some(Box::new(Claimed {
                        owner,
                        run: CachedRun::default(),
                    }));
                }
                None
            }
        };
        self.drop_claimed_if_empty();
        previous
    }

    fn drop_claimed_if_empty(&mut self) {
        if self
            .claimed
            .as_ref()
            .is_some_and(|claimed| claimed.owner.is_none() && !claimed.run.is_present())
        {
            self.claimed = None;
        }
    }
}

/// What applying one key change did that the runtime must react to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing beyond the cache.
    None,
    /// A task of this group appeared (submitted, or first seen).
    TaskAdded(GroupName),
    /// A task disappeared (completed or deleted).
    TaskGone(TaskId),
    /// A task's owner record changed or vanished; `owner` is the new owner.
    OwnerChanged {
        task: TaskId,
        owner: Option<CachedOwner>,
        /// The group of the owner record that vanished, if one did: its
        /// node owns one task fewer there.
        freed: Option<GroupName>,
    },
    /// A node joined or left (or changed its groups).
    Membership { node: NodeName, joined: bool },
    /// A command for this node was queued or withdrawn.
    Command {
        key: String,
        revision: Revision,
        present: bool,
    },
    /// A command was queued for this task.
    TaskCommand(TaskId),
    /// An owner record of a task the cache does not hold went, and the
    /// store did not say whose it was (no `prev_kv`, or one that does not
    /// decode): only a listing can tell whether a task is unowned now and
    /// whose count drops.
    OwnerGoneUnseen(TaskId),
    /// The key or value was malformed and skipped.
    Malformed(String),
}

/// A hash of a task id that spreads tasks evenly over nodes: a node of rank
/// r among n claims first the tasks whose hash is r modulo n. Nodes built
/// with different Rust versions may disagree on it (std keeps the right to
/// change the algorithm); that only costs them more claim conflicts.
pub(crate) fn spread_hash(id: &TaskId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    id.as_str().hash(&mut hasher);
    hasher.finish()
}

/// The cached namespace.
#[derive(Debug)]
pub(crate) struct Cache {
    ns: Namespace,
    me: NodeName,
    /// The groups this node serves: the only ones kept task by task.
    serves: HashSet<GroupName>,
    /// While a listing is applied: the tasks it holds that this node does
    /// not keep (of groups it does not serve, or owned by another node), so
    /// that their run records are skipped too (a run record names neither
    /// its group nor its owner). Empty otherwise.
    skipped_in_listing: HashSet<TaskId>,
    /// The last task key deleted that had no cached task, and the revision
    /// of its delete. A task's end deletes its task and then its owner
    /// record in one revision; the owner record's delete then frees no
    /// task, and must not leave an unread one behind.
    last_uncached_delete: Option<(TaskId, Revision)>,
    /// The revision of the last read of the listing the cache was built
    /// from: a read of a task's keys older than it may be older than what
    /// the listing holds, and is not applied.
    listed_through: Revision,
    entries: HashMap<TaskId, TaskEntry>,
    nodes: HashMap<NodeName, NodeRecord>,
    /// Unowned tasks per group, oldest first, each with its [`spread_hash`]
    /// so that picking a node's share of them costs no hashing.
    unowned: HashMap<GroupName, BTreeSet<(Revision, u64, TaskId)>>,
    /// Unowned tasks per group that the node holds back from claiming for a
    /// while (its ignore list: skipped by the balancer, just released, a
    /// claim that failed). They still count as unowned in the view, but are
    /// no candidates, so a claim pass never walks past them: with every
    /// candidate search starting from the oldest task, each held task would
    /// cost every search a step, and a pass that skips many tasks would be
    /// quadratic in them.
    held: HashMap<GroupName, BTreeSet<(Revision, u64, TaskId)>>,
    /// The ids held back, whether their task is cached now or not (it may
    /// appear again, say after a resync, and must then be held back too),
    /// each with its entry in the node's queue of ignore deadlines: the
    /// node's ignore list is this map.
    held_ids: HashMap<TaskId, IgnoreKey>,
    /// Per group, the unowned tasks beyond the window (see the module's
    /// docs), counted as unowned in the view like the window's.
    spilled: HashMap<GroupName, Backlog>,
    /// At least this many unowned tasks per group are kept as entries
    /// ([`MIN_WINDOW`]; smaller in tests).
    min_window: usize,
    /// Whether tasks beyond the window are spilled now: not while a listing
    /// is applied, whose keys come in id order, not submission order (the
    /// excess is spilled at its end).
    spilling: bool,
    /// Whether a candidate that leaves the window now brings no spilled
    /// task back (see [`Cache::place_task`]).
    refill_paused: bool,
    /// The balancer's view: loads per group and this node's running tasks.
    pub view: ClusterView,
}

impl Cache {
    /// An empty cache for node `me`, which serves `groups`.
    pub fn new(ns: Namespace, me: NodeName, groups: &[GroupName]) -> Self {
        Cache {
            ns,
            view: ClusterView::new(me.clone()),
            me,
            serves: groups.iter().cloned().collect(),
            skipped_in_listing: HashSet::new(),
            last_uncached_delete: None,
            listed_through: 0,
            entries: HashMap::new(),
            nodes: HashMap::new(),
            unowned: HashMap::new(),
            held: HashMap::new(),
            held_ids: HashMap::new(),
            spilled: HashMap::new(),
            min_window: MIN_WINDOW,
            spilling: true,
            refill_paused: false,
        }
    }

    /// Rebuild from a full listing whose last read was at `listed_through`,
    /// keeping the running-task part of the view.
    pub fn rebuild(&self, kvs: &[KeyValue], listed_through: Revision) -> (Cache, Vec<Change>) {
        let mut fresh = Cache {
            serves: self.serves.clone(),
            listed_through,
            min_window: self.min_window,
            spilling: false,
            ..Cache::new(self.ns.clone(), self.me.clone(), &[])
        };
        fresh.view.running = self.view.running.clone();
        fresh.held_ids = self.held_ids.clone();
        let changes = kvs
            .iter()
            .map(|kv| match self.unchanged_task(kv) {
                // Unchanged since it was decoded and checked: not decoded
                // again.
                Some((id, task)) => {
                    fresh.put_task(id, task);
                    Change::None
                }
                None => fresh.apply_listed(kv),
            })
            .collect();
        fresh.skipped_in_listing = HashSet::new();
        fresh.spilling = true;
        fresh.spill_excess();
        fresh.pack_indexes();
        (fresh, changes)
    }

    /// Rebuild the candidate indexes with full nodes. Built one insert at a
    /// time, in the order tasks were submitted, a B-tree's nodes split in
    /// two and stay half full (6 of 11 keys); built from its sorted keys at
    /// once, they are full. The index is most of what a backlog costs a
    /// node after its entries (a key of 24 bytes per task), and every
    /// listing rebuilds it.
    fn pack_indexes(&mut self) {
        for index in [&mut self.unowned, &mut self.held] {
            for set in index.values_mut() {
                *set = std::mem::take(set).into_iter().collect();
            }
        }
    }

    /// Apply a key of a listing. Listings read tasks before runs, so a run
    /// record of a task listed in a group this node does not serve is known
    /// to be one and skipped. A run record of a task the listing did not
    /// hold (submitted after tasks were read) is kept, since its task may
    /// be served: the watch brings the task, but not this run record,
    /// which the listing already read.
    fn apply_listed(&mut self, kv: &KeyValue) -> Change {
        match self.ns.parse(&kv.key) {
            Ok(KeyKind::Task(id)) => {
                let change = self.apply_put(kv);
                if !self.entries.contains_key(&id) {
                    self.skipped_in_listing.insert(id);
                }
                change
            }
            Ok(KeyKind::Owner(id)) => {
                let record = match decode::<OwnerRecord>("owner", &kv.key, &kv.value) {
                    Ok(record) => record,
                    Err(e) => return Change::Malformed(e.to_string()),
                };
                let listed = self.entries.contains_key(&id);
                if !listed && self.serves.contains(&record.group) {
                    // A task submitted after tasks were read, and claimed
                    // before owners were: the watch brings its put, which
                    // must find it owned. Kept with its owner record, as
                    // the node's own are, until that record goes.
                    return self.keep_owner(id, record, kv);
                }
                // Tasks are listed before owners: another node's owner
                // record takes a listed task out of the cache, and its run
                // record is then skipped too.
                let change = self.put_owner(id.clone(), record, kv);
                if listed && !self.entries.contains_key(&id) {
                    self.skipped_in_listing.insert(id);
                }
                change
            }
            Ok(KeyKind::Run(id)) if self.skipped_in_listing.contains(&id) => Change::None,
            Ok(KeyKind::Run(id)) => {
                // Kept even when its task is not (yet) known: see above.
                self.entry(&id);
                self.apply_put(kv)
            }
            _ => self.apply_put(kv),
        }
    }

    /// The cached task (and its id) that `kv` puts again unchanged: a task
    /// key whose revisions are the ones cached.
    fn unchanged_task(&self, kv: &KeyValue) -> Option<(TaskId, CachedTask)> {
        let Ok(KeyKind::Task(id)) = self.ns.parse(&kv.key) else {
            return None;
        };
        let (id, entry) = self.entries.get_key_value(&id)?;
        let task = entry.task.as_ref()?;
        (task.revision == kv.mod_revision && task.order == kv.create_revision)
            .then(|| (id.clone(), task.clone()))
    }

    /// The cached task `id`, if it is one of this node's groups' tasks.
    pub fn task(&self, id: &TaskId) -> Option<&CachedTask> {
        self.entries.get(id)?.task.as_ref()
    }

    /// The cached owner of `id`, if it is kept (see [`Cache::apply_put`]).
    pub fn owner(&self, id: &TaskId) -> Option<&CachedOwner> {
        self.entries.get(id)?.owner()
    }

    /// The entry of `id`, created empty if absent.
    fn entry(&mut self, id: &TaskId) -> &mut TaskEntry {
        // `entry()` would take the key by value and clone `id` on every hit.
        if !self.entries.contains_key(id) {
            self.entries.insert(id.clone(), TaskEntry::default());
        }
        self.entries.get_mut(id).expect("just inserted")
    }

    /// Drop the entry of `id` once nothing is cached for it.
    fn forget_if_empty(&mut self, id: &TaskId) {
        if self.entries.get(id).is_some_and(TaskEntry::is_empty) {
            self.entries.remove(id);
            self.entries.shrink_if_sparse();
        }
    }

    /// The live nodes' names, sorted.
    pub fn node_names(&self) -> std::collections::BTreeSet<&NodeName> {
        self.nodes.keys().collect()
    }

    /// How many live nodes the cache knows (node records present).
    pub fn live_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// What a claim of `id` must check, if it looks claimable and has been
    /// read (see [`Cache::is_unread`]).
    pub fn claim_basis(&self, id: &TaskId) -> Option<ClaimBasis> {
        let entry = self.entries.get(id)?;
        let task = entry.task.as_ref()?;
        if entry.owner().is_some() || task.is_unread() {
            return None;
        }
        let run = entry.run();
        Some(ClaimBasis {
            group: task.group.clone(),
            task_revision: task.revision,
            run_revision: run.revision,
            run: run.record(),
        })
    }

    /// Whether `id` is an unowned task whose keys the node must read before
    /// it can claim it: one freed by another node's owner record's delete.
    pub fn is_unread(&self, id: &TaskId) -> bool {
        self.entries
            .get(id)
            .and_then(|entry| entry.task.as_ref())
            .is_some_and(CachedTask::is_unread)
    }

    /// Whether `group` has unowned tasks that are claim candidates.
    pub fn has_candidates(&self, group: &GroupName) -> bool {
        self.unowned.get(group).is_some_and(|set| !set.is_empty())
    }

    /// Whether `id` is an unowned task of `group` that is a claim candidate
    /// (not held back).
    pub fn is_candidate(&self, id: &TaskId, group: &GroupName) -> bool {
        self.entries.get(id).is_some_and(|entry| {
            entry.owner().is_none() && entry.task.as_ref().is_some_and(|task| task.group == *group)
        }) && !self.held_ids.contains_key(id)
    }

    /// The key of `id`'s ignore deadline, if it is held back.
    pub fn held_key(&self, id: &TaskId) -> Option<IgnoreKey> {
        self.held_ids.get(id).copied()
    }

    /// Keep `id` out of the claim candidates until [`Cache::end_hold`]
    /// (`deadline` is its entry in the node's ignore queue); it stays
    /// counted as unowned.
    pub fn hold_back(&mut self, id: &TaskId, deadline: IgnoreKey) {
        if self.held_ids.insert(id.clone(), deadline).is_none() {
            self.move_index_entry(id, true);
        }
    }

    /// Make `id` a claim candidate again, if it is an unowned task.
    pub fn end_hold(&mut self, id: &TaskId) {
        if self.held_ids.remove(id).is_some() {
            self.held_ids.shrink_if_sparse();
            self.move_index_entry(id, false);
        }
    }

    /// Move `id`'s entry to the held index (`held`) or back to the
    /// candidates, if it is an unowned task.
    fn move_index_entry(&mut self, id: &TaskId, held: bool) {
        let Some((group, key)) = self.unowned_key(id) else {
            return;
        };
        let (from, to) = if held {
            (&mut self.unowned, &mut self.held)
        } else {
            (&mut self.held, &mut self.unowned)
        };
        if from.get_mut(&group).is_some_and(|set| set.remove(&key)) {
            to.entry(group.clone()).or_default().insert(key);
            if held {
                self.refill(&group);
            }
        }
    }

    /// Tasks held back now, in every group (what [`Cache::hold_back`] keeps
    /// out of the candidates).
    #[cfg(test)]
    fn held_back(&self) -> usize {
        self.held.values().map(BTreeSet::len).sum()
    }

    /// The group and index key of `id` if it is a cached task without owner.
    fn unowned_key(&self, id: &TaskId) -> Option<(GroupName, (Revision, u64, TaskId))> {
        let entry = self.entries.get(id)?;
        let task = entry.task.as_ref()?;
        if entry.owner().is_some() {
            return None;
        }
        let group = task.group.clone();
        Some((group, (task.order, spread_hash(id), id.clone())))
    }

    /// Unowned tasks of `group` that are claim candidates (not held back),
    /// oldest first.
    pub fn unowned(&self, group: &GroupName) -> impl Iterator<Item = &TaskId> {
        self.unowned_spread(group).map(|(_, id)| id)
    }

    /// Unowned tasks of `group` that are claim candidates, oldest first, with
    /// their [`spread_hash`].
    pub fn unowned_spread(&self, group: &GroupName) -> impl Iterator<Item = (u64, &TaskId)> {
        self.unowned
            .get(group)
            .into_iter()
            .flat_map(|set| set.iter().map(|(_, spread, id)| (*spread, id)))
    }

    /// Record this node's claim of `id` as in flight (or, with an epoch, done).
    pub fn set_mine(&mut self, id: &TaskId, group: &GroupName, epoch: Revision) {
        self.set_owner(
            id,
            Some(CachedOwner {
                node: self.me.clone(),
                group: group.clone(),
                epoch,
            }),
        );
    }

    /// Drop this node's in-flight claim marker of `id`, if it is still there.
    pub fn clear_tentative(&mut self, id: &TaskId) {
        if self
            .owner(id)
            .is_some_and(|o| o.epoch == 0 && o.node == self.me)
        {
            self.set_owner(id, None);
        }
    }

    /// Take `id` out of the cache: another node claimed it. Whatever the
    /// entry counted (unowned, or this node's claim in flight) is uncounted;
    /// the new owner's count is the caller's. Returns whether the cache
    /// held it (an entry, or a spilled task).
    fn forget_taken(&mut self, id: &TaskId) -> bool {
        let Some(entry) = self.entries.remove(id) else {
            return self.drop_spilled(id);
        };
        match (entry.owner(), &entry.task) {
            (Some(owner), _) => self.adjust_owned(&owner.group, &owner.node, false),
            (None, Some(task)) => self.mark_unowned(&task.group, task.order, id, false),
            (None, None) => {}
        }
        self.entries.shrink_if_sparse();
        true
    }

    fn put_task(&mut self, id: TaskId, task: CachedTask) {
        if self.put_spilled(&id, &task) || self.spill(&id, &task) {
            return;
        }
        self.place_task(id, task);
    }

    /// Keep `task` as an entry (in the window, if unowned).
    fn place_task(&mut self, id: TaskId, task: CachedTask) {
        // A task put again (read back, rewritten) leaves the window only
        // to come back at once: no spilled task is taken back for it.
        let paused = std::mem::replace(&mut self.refill_paused, true);
        self.remove_task(&id);
        self.refill_paused = paused;
        let (group, order) = (task.group.clone(), task.order);
        let entry = self.entry(&id);
        entry.task = Some(task);
        if entry.owner().is_none() {
            self.mark_unowned(&group, order, &id, true);
        }
    }

    fn remove_task(&mut self, id: &TaskId) {
        let Some(entry) = self.entries.get_mut(id) else {
            self.drop_spilled(id);
            return;
        };
        let owned = entry.owner().is_some();
        if let Some(old) = entry.task.take() {
            if !owned {
                self.mark_unowned(&old.group, old.order, id, false);
            }
        }
        self.forget_if_empty(id);
    }

    fn set_owner(&mut self, id: &TaskId, owner: Option<CachedOwner>) {
        self.take_back(id);
        let entry = self.entry(id);
        let previous = entry.replace_owner(owner);
        let current = entry.owner().cloned();
        // The task moves between the unowned index and owned only when the
        // owner appears or disappears.
        let moved = match &entry.task {
            Some(task) if previous.is_some() != current.is_some() => {
                Some((task.group.clone(), task.order))
            }
            _ => None,
        };
        if let Some(previous) = &previous {
            self.adjust_owned(&previous.group, &previous.node, false);
        }
        if let Some(current) = &current {
            self.adjust_owned(&current.group, &current.node, true);
        }
        if let Some((group, order)) = moved {
            self.mark_unowned(&group, order, id, current.is_none());
        }
        self.forget_if_empty(id);
    }

    fn adjust_owned(&mut self, group: &GroupName, node: &NodeName, add: bool) {
        let load = self.view.groups.entry(group.clone()).or_default();
        if add {
            *load.owned.entry(node.clone()).or_default() += 1;
        } else if let Some(count) = load.owned.get_mut(node) {
            *count -= 1;
            if *count == 0 {
                load.owned.remove(node);
            }
        }
    }

    fn mark_unowned(&mut self, group: &GroupName, order: Revision, id: &TaskId, unowned: bool) {
        let entry = (order, spread_hash(id), id.clone());
        let changed = if unowned {
            let index = if self.held_ids.contains_key(id) {
                &mut self.held
            } else {
                &mut self.unowned
            };
            index.entry(group.clone()).or_default().insert(entry)
        } else {
            let mut removed = false;
            for index in [&mut self.unowned, &mut self.held] {
                removed |= index.get_mut(group).is_some_and(|set| set.remove(&entry));
            }
            removed
        };
        if changed {
            self.count_unowned(group, unowned);
            if !unowned {
                self.refill(group);
            }
        }
    }

    /// Count one unowned task of `group` more (or fewer).
    fn count_unowned(&mut self, group: &GroupName, more: bool) {
        let load = self.view.groups.entry(group.clone()).or_default();
        if more {
            load.unowned += 1;
        } else {
            load.unowned -= 1;
        }
    }

    /// Returns whether the node is new (or serves other groups now).
    fn put_node(&mut self, name: NodeName, record: NodeRecord) -> bool {
        let changed = self.nodes.get(&name) != Some(&record);
        if changed {
            self.remove_node(&name);
            for group in &record.groups {
                let load = self.view.groups.entry(group.clone()).or_default();
                load.serving.insert(name.clone());
                if let Some(&slots) = record.slots.get(group) {
                    load.limit.insert(name.clone(), saturating_usize(slots));
                }
            }
            if let Some(most) = record.max_running {
                self.view
                    .max_running
                    .insert(name.clone(), saturating_usize(most));
            }
            self.nodes.insert(name, record);
        }
        changed
    }

    fn remove_node(&mut self, name: &NodeName) -> bool {
        let Some(record) = self.nodes.remove(name) else {
            return false;
        };
        for group in &record.groups {
            if let Some(load) = self.view.groups.get_mut(group) {
                load.serving.remove(name);
                load.limit.remove(name);
            }
        }
        self.view.max_running.remove(name);
        true
    }
}

/// A limit from a node record, as a count (a limit beyond `usize` is none).
fn saturating_usize(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}

mod apply;
mod backlog;
mod spill;
#[cfg(test)]
mod spill_tests;
#[cfg(test)]
mod tests;
