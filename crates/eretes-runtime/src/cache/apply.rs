//! The cache kept current: what each key put or delete (from a listing
//! or the watch) and each read-back of a task's keys does to the entries,
//! the unowned index and the counts.

use eretes_protocol::machine::{StateRecord, TaskCommand, MAX_CHECKPOINT_BYTES};
use eretes_protocol::{
    decode, decode_node, decode_task, GroupName, KeyKind, NodeName, OwnerRecord, ResultRecord,
    RunRecord, TaskId, TaskKeys,
};
use eretes_store::{KeyValue, Revision};

use super::{Cache, CachedOwner, CachedRun, CachedTask, Change, UNREAD};

impl Cache {
    /// Apply the keys of `id` as read outside the watch (what a lost
    /// claim's transaction read back, or the read of an unread task), unless
    /// the cache knows of a change since the read; `None` then. The cache
    /// must hold `id` as a task: if it does not, the watch has moved past
    /// the read (the task was claimed by another node, or went).
    ///
    /// A read is older than what the cache holds when it is older than the
    /// listing the cache was built from, than the task the cache holds (a
    /// task deleted and submitted again under the same id), or, for an
    /// unread task, than the delete of the owner record that freed it (the
    /// read still shows that record). Another node's owner record in a
    /// read that is not older takes the task out of the cache without
    /// counting it: the watch brings that same put, before or after, and
    /// counts it then. A run record is applied only if the cache holds none
    /// newer.
    pub fn apply_read_back(&mut self, id: &TaskId, keys: &TaskKeys) -> Option<Vec<Change>> {
        if keys.revision < self.listed_through {
            return None;
        }
        let entry = self.entries.get(id)?;
        if entry.owner().is_some_and(|owner| owner.node != self.me) {
            // Kept with another node's owner record (see `apply_listed`),
            // which the watch will take away: no candidate.
            return None;
        }
        let task = entry.task.as_ref()?;
        if !task.is_unread() && task.order > keys.revision {
            return None;
        }
        let others = keys.owner.as_ref().and_then(|kv| {
            decode::<OwnerRecord>("owner", &kv.key, &kv.value)
                .ok()
                .filter(|record| record.node != self.me)
                .map(|_| kv.create_revision)
        });
        if let Some(claimed_at) = others {
            if task.is_unread() && claimed_at <= task.order {
                return None;
            }
            self.forget_taken(id);
            return Some(Vec::new());
        }
        let cached_run = entry.run().revision;
        let run_is_newer = |kv: Option<&KeyValue>| match kv {
            Some(kv) => kv.mod_revision >= cached_run,
            None => cached_run <= keys.revision,
        };
        let apply_run = run_is_newer(keys.run.as_ref());
        let ns = &self.ns;
        let mut updates = vec![
            (ns.task(id), keys.task.as_ref()),
            (ns.owner(id), keys.owner.as_ref()),
        ];
        if apply_run {
            updates.push((ns.run(id), keys.run.as_ref()));
        }
        Some(
            updates
                .into_iter()
                .map(|(key, kv)| match kv {
                    Some(kv) => self.apply_put(kv),
                    None => self.apply_delete(&key, UNREAD, None),
                })
                .collect(),
        )
    }

    /// Apply a put of `kv`, as the watch or a listing brings it.
    pub fn apply_put(&mut self, kv: &KeyValue) -> Change {
        let kind = match self.ns.parse(&kv.key) {
            Ok(kind) => kind,
            Err(malformed) => return Change::Malformed(malformed.to_string()),
        };
        match kind {
            KeyKind::Task(id) => match decode_task(&kv.key, &kv.value) {
                Ok(record) if !self.serves.contains(&record.spec.group) => {
                    // Another group's: nothing of it is kept (a run record
                    // cached before its task was known goes).
                    if let Some(entry) = self.entries.get_mut(&id) {
                        entry.set_run(CachedRun::default());
                    }
                    self.remove_task(&id);
                    Change::None
                }
                Ok(record) => {
                    let id = self.shared_task_id(id);
                    let group = self.shared_group(record.spec.group);
                    let added =
                        (self.task(&id).is_none() && !self.is_spilled(&id)).then(|| group.clone());
                    self.put_task(
                        id,
                        CachedTask {
                            group,
                            revision: kv.mod_revision,
                            order: kv.create_revision,
                        },
                    );
                    added.map_or(Change::None, Change::TaskAdded)
                }
                Err(e) => {
                    // Garbage over a task key makes it unclaimable, not fatal.
                    self.remove_task(&id);
                    Change::Malformed(e.to_string())
                }
            },
            KeyKind::Owner(id) => match decode::<OwnerRecord>("owner", &kv.key, &kv.value) {
                Ok(record) => self.put_owner(id, record, kv),
                Err(e) => Change::Malformed(e.to_string()),
            },
            // A run record is written by claims and run ends, after its
            // task: one whose task is not kept is another group's.
            KeyKind::Run(id) if !self.entries.contains_key(&id) => Change::None,
            KeyKind::Run(id) => {
                let id = self.shared_task_id(id);
                match decode::<RunRecord>("run", &kv.key, &kv.value) {
                    Ok(record) => {
                        self.entry(&id)
                            .set_run(CachedRun::new(kv.mod_revision, &record));
                        Change::None
                    }
                    Err(e) => {
                        // Claims compare the run record's revision, so keep
                        // it even when the value is garbage: the claim then
                        // starts from zero.
                        self.entry(&id)
                            .set_run(CachedRun::new(kv.mod_revision, &RunRecord::default()));
                        Change::Malformed(e.to_string())
                    }
                }
            }
            // Moved to `claims/` before each listing, and never read where
            // it was (see `Coordinator::move_legacy_run_records`).
            KeyKind::LegacyRun(_) => Change::None,
            // What nodes do not act on is still checked, so that garbage
            // anywhere in the layout is counted and logged, not ignored.
            KeyKind::Result(_) => match decode::<ResultRecord>("result", &kv.key, &kv.value) {
                Ok(_) => Change::None,
                Err(e) => Change::Malformed(e.to_string()),
            },
            KeyKind::Node(name) => match decode_node(&kv.key, &kv.value, kv.lease) {
                Ok(record) => {
                    let joined = self.put_node(name.clone(), record);
                    if joined {
                        Change::Membership { node: name, joined }
                    } else {
                        Change::None
                    }
                }
                // This node's own registration overwritten with something
                // that is not one: as good as gone. Kept as it was, the
                // node went on as registered while every other reader (and
                // its own next listing) saw no such node, and it claimed
                // nothing more.
                Err(_) if name == self.me => {
                    self.remove_node(&name);
                    Change::Membership {
                        node: name,
                        joined: false,
                    }
                }
                Err(e) => Change::Malformed(e.to_string()),
            },
            KeyKind::NodeCommand(name) if name == self.me => Change::Command {
                key: kv.key.clone(),
                revision: kv.mod_revision,
                present: true,
            },
            KeyKind::NodeCommand(_) => Change::None,
            KeyKind::TaskCommand(id) => match TaskCommand::decode(&kv.value) {
                Ok(_) => Change::TaskCommand(id),
                // The owner takes it without effect with the next command.
                Err(e) => Change::Malformed(format!("task command at {:?}: {e}", kv.key)),
            },
            // Read by the task's state machine when it needs them.
            KeyKind::State(_) => match decode::<StateRecord>("state", &kv.key, &kv.value) {
                Ok(_) => Change::None,
                Err(e) => Change::Malformed(e.to_string()),
            },
            KeyKind::Checkpoint(_) if kv.value.len() > MAX_CHECKPOINT_BYTES => {
                Change::Malformed(format!(
                    "checkpoint at {:?}: {} bytes; the limit is {MAX_CHECKPOINT_BYTES}",
                    kv.key,
                    kv.value.len()
                ))
            }
            KeyKind::Checkpoint(_) | KeyKind::Graph => Change::None,
        }
    }

    /// The copy of `id` the cache already holds, if any. A task's id, group
    /// and node names arrive in several keys and values; sharing one
    /// allocation of each keeps a running task's cache entries small.
    fn shared_task_id(&self, id: TaskId) -> TaskId {
        // A task's own key arrives first, so one lookup finds nearly every
        // copy worth sharing; this runs on the main loop for every event.
        match self.entries.get_key_value(id.as_str()) {
            Some((known, _)) => known.clone(),
            None => id,
        }
    }

    /// The copy of node name `name` the cache already holds, if any.
    fn shared_node(&self, name: NodeName) -> NodeName {
        if name == self.me {
            return self.me.clone();
        }
        match self.nodes.get_key_value(name.as_str()) {
            Some((known, _)) => known.clone(),
            None => name,
        }
    }

    /// The copy of group name `group` the cache already holds, if any.
    fn shared_group(&self, group: GroupName) -> GroupName {
        let known = self
            .unowned
            .get_key_value(group.as_str())
            .map(|(known, _)| known)
            .or_else(|| {
                self.view
                    .groups
                    .get_key_value(group.as_str())
                    .map(|(known, _)| known)
            });
        known.cloned().unwrap_or(group)
    }

    /// Apply a delete of `key`; `previous` is the value it removed, when
    /// the store said (a watch's `prev_kv`): the owner record of a group
    /// this node counts but does not keep says whose count drops.
    pub fn apply_delete(
        &mut self,
        key: &str,
        revision: Revision,
        previous: Option<&KeyValue>,
    ) -> Change {
        let Ok(kind) = self.ns.parse(key) else {
            return Change::None; // deleting garbage is no news
        };
        match kind {
            KeyKind::Task(id) => {
                if self.task(&id).is_none() && revision != UNREAD {
                    self.last_uncached_delete = Some((id.clone(), revision));
                }
                // Every delete of a task deletes its run record in the same
                // transaction, and the watch does not carry run records.
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.set_run(CachedRun::default());
                }
                self.remove_task(&id);
                Change::TaskGone(id)
            }
            KeyKind::Owner(id) => {
                let mut freed = self.owner(&id).map(|owner| owner.group.clone());
                let task_went = self.last_uncached_delete.as_ref() == Some(&(id.clone(), revision));
                let removed = previous.and_then(|kv| {
                    decode::<OwnerRecord>("owner", &kv.key, &kv.value)
                        .ok()
                        .map(|record| (record, kv.create_revision))
                });
                if let Some(group) = freed.clone() {
                    let epoch = self.owner(&id).map_or(UNREAD, |owner| owner.epoch);
                    self.set_owner(&id, None);
                    if self.task(&id).is_some() {
                        // Unowned again, and its run record was rewritten
                        // with this delete (a release), or is still open (an
                        // expired lease): the watch does not carry run
                        // records, so the task is read again before a claim.
                        let task = CachedTask {
                            group,
                            revision: UNREAD,
                            order: epoch,
                        };
                        let id = self.shared_task_id(id.clone());
                        self.put_task(id, task);
                    }
                } else if removed.is_none() && revision != UNREAD && !task_went {
                    // The watch did not say whose record went (no
                    // `prev_kv`, or garbage): a task may be unowned that
                    // the cache does not hold, and a count is off.
                    return Change::OwnerGoneUnseen(id);
                } else if let Some((record, claimed_at)) =
                    removed.filter(|(record, _)| record.node != self.me)
                {
                    // Another node's claim, counted and not kept.
                    let group = self.shared_group(record.group);
                    self.adjust_owned(&group, &record.node, false);
                    if self.serves.contains(&group) && !task_went && self.task(&id).is_none() {
                        // Unowned again (released, or its owner's lease
                        // expired): a claim candidate, to be read first.
                        let task = CachedTask {
                            group: group.clone(),
                            revision: UNREAD,
                            order: claimed_at,
                        };
                        let id = self.shared_task_id(id.clone());
                        self.put_task(id, task);
                    }
                    freed = Some(group);
                }
                Change::OwnerChanged {
                    task: id,
                    owner: None,
                    freed,
                }
            }
            KeyKind::Run(id) => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.set_run(CachedRun::default());
                    self.forget_if_empty(&id);
                }
                Change::None
            }
            KeyKind::LegacyRun(_) | KeyKind::Result(_) => Change::None,
            KeyKind::Node(name) => match self.remove_node(&name) {
                true => Change::Membership {
                    node: name,
                    joined: false,
                },
                false => Change::None,
            },
            KeyKind::NodeCommand(name) if name == self.me => Change::Command {
                key: key.to_string(),
                revision,
                present: false,
            },
            KeyKind::NodeCommand(_) => Change::None,
            KeyKind::State(_)
            | KeyKind::Checkpoint(_)
            | KeyKind::TaskCommand(_)
            | KeyKind::Graph => Change::None,
        }
    }

    /// Apply the owner record `record` of `id`, put as `kv`: this node's is
    /// kept; another node's is counted, not kept, and the task, if cached
    /// (unowned, or claimed by this node in vain), leaves the cache. An
    /// owner record is created, never rewritten; should one be, the count
    /// stays as it was (the same owner, most likely).
    pub(super) fn put_owner(&mut self, id: TaskId, record: OwnerRecord, kv: &KeyValue) -> Change {
        if record.node == self.me {
            return self.keep_owner(id, record, kv);
        }
        let cached = self.entries.contains_key(&id);
        // A spilled task is counted as unowned, not kept as an entry: its
        // new owner is counted as a kept task's is, and nothing else needs
        // telling.
        let spilled = self.forget_taken(&id) && !cached;
        let group = self.shared_group(record.group);
        let node = self.shared_node(record.node);
        // A cached task's count went with it: count it again.
        if kv.version == 1 || cached || spilled {
            self.adjust_owned(&group, &node, true);
        }
        if !cached {
            return Change::None;
        }
        Change::OwnerChanged {
            task: id,
            owner: Some(CachedOwner {
                node,
                group,
                epoch: kv.create_revision,
            }),
            freed: None,
        }
    }

    /// Keep the owner record `record` (put as `kv`) of `id` in its entry.
    pub(super) fn keep_owner(&mut self, id: TaskId, record: OwnerRecord, kv: &KeyValue) -> Change {
        let id = self.shared_task_id(id);
        let owner = CachedOwner {
            node: self.shared_node(record.node),
            group: self.shared_group(record.group),
            epoch: kv.create_revision,
        };
        self.set_owner(&id, Some(owner.clone()));
        Change::OwnerChanged {
            task: id,
            owner: Some(owner),
            freed: None,
        }
    }
}
