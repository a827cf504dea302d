//! The backup's side: becoming a backup (checked), applying entries in
//! order, handing the state over to a new primary, and dropping backups
//! that are over.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use eretes_protocol::{decode, GroupName, NodeName, OwnerRecord, TaskId};
use eretes_store::GetRequest;
use tokio::time::Instant;

use super::{Replica, UNRECORDED_KEPT};
use crate::ids::{graph_task_id, parse_graph_task_id, JobName};
use crate::model::BackupRecord;
use crate::node::NodeShared;
use crate::proto::{BackupReply, BackupRequest, HandoverReply, HandoverRequest, UpdateRequest};

impl NodeShared {
    /// Become a backup of a task, as its primary asks; the reply carries
    /// this node's lease, which the primary records the backup under.
    pub(crate) async fn take_backup(&self, request: BackupRequest) -> BackupReply {
        match self.try_take_backup(request).await {
            Ok(lease) => BackupReply {
                refused: String::new(),
                lease,
            },
            Err(refused) => BackupReply { refused, lease: 0 },
        }
    }

    async fn try_take_backup(&self, request: BackupRequest) -> Result<i64, String> {
        let (job, id) = parse_target(&request.job, request.task)?;
        let spec = self
            .jobs
            .job(&job)
            .await
            .map_err(|error| error.to_string())?
            .ok_or_else(|| format!("no job {job}"))?;
        if spec.backups == 0 || request.task >= spec.tasks {
            return Err(format!("{id} has no backups"));
        }
        if self.view.epoch(&job).is_some_and(|record| record.shutdown) {
            return Err(format!("job {job} has shut down"));
        }
        let kind = self
            .kinds
            .get(&spec.kind)
            .ok_or_else(|| format!("job kind {:?} is not known on {}", spec.kind, self.name))?;
        if self.runs.lock().expect("not poisoned").contains_key(&id) {
            return Err(format!("{} runs {id} itself", self.name));
        }
        if !self.serves(&spec.group) {
            return Err(format!("{} does not serve group {}", self.name, spec.group));
        }
        let lease = self
            .lease
            .lock()
            .expect("not poisoned")
            .ok_or_else(|| format!("{} is not registered", self.name))?;
        if let Some(held) = self.replica(&id) {
            if held.primary_claim_epoch > request.primary_claim_epoch {
                return Err("a later primary's backup is held here".into());
            }
            // The same primary's backup, recorded: another transfer would
            // take it back to an older state under a record that says it
            // has every entry.
            if held.primary_claim_epoch == request.primary_claim_epoch
                && held.recorded_at.load(Ordering::Acquire) != 0
            {
                return Err(format!(
                    "{} backs {id} up for that primary already",
                    self.name
                ));
            }
        }
        let primary = NodeName::new(request.primary_node.clone())
            .map_err(|_| format!("primary node {:?} is invalid", request.primary_node))?;
        self.check_owner(&id, request.primary_claim_epoch, &primary)
            .await?;
        let task = kind.build(&spec, request.task);
        task.became_backup(request.state).await;
        let replica = Replica {
            task,
            primary_claim_epoch: request.primary_claim_epoch,
            recorded_at: AtomicI64::new(0),
            built: Instant::now(),
            applied: tokio::sync::Mutex::new((request.sequence, false)),
        };
        self.replicas
            .lock()
            .expect("not poisoned")
            .insert(id, Arc::new(replica));
        self.stats.backups_taken.fetch_add(1, Ordering::Relaxed);
        Ok(lease)
    }

    /// Whether `node` owns task `id` under claim `claim_epoch` now, as the
    /// store says: a fenced or made-up primary is refused.
    async fn check_owner(
        &self,
        id: &TaskId,
        claim_epoch: i64,
        node: &NodeName,
    ) -> Result<(), String> {
        let coordinator = self.jobs.coordinator();
        let key = coordinator.namespace().owner(id);
        let got = coordinator
            .store()
            .get(GetRequest::new(eretes_store::KeyRange::key(key)))
            .await
            .map_err(|error| error.to_string())?;
        let current = got.kvs.first().is_some_and(|kv| {
            kv.create_revision == claim_epoch
                && decode::<OwnerRecord>("owner", &kv.key, &kv.value)
                    .is_ok_and(|owner| owner.node == *node)
        });
        if current {
            Ok(())
        } else {
            Err(format!(
                "the claim {claim_epoch} of {id} by {node} is not current"
            ))
        }
    }

    /// Apply a primary's next log entry to the backup held here.
    pub(crate) async fn apply_entry(&self, request: UpdateRequest) -> BackupReply {
        let refused = |refused: String| BackupReply { refused, lease: 0 };
        let (_, id) = match parse_target(&request.job, request.task) {
            Ok(target) => target,
            Err(error) => return refused(error),
        };
        let Some(replica) = self.replica(&id) else {
            return refused(format!("{} holds no backup of {id}", self.name));
        };
        let mut held = replica.applied.lock().await;
        let (applied, ended) = &mut *held;
        if *ended {
            return refused(format!("the backup of {id} here has ended"));
        }
        if replica.primary_claim_epoch != request.primary_claim_epoch {
            return refused(format!(
                "the backup here is of claim {}, not {}",
                replica.primary_claim_epoch, request.primary_claim_epoch
            ));
        }
        if request.sequence <= *applied {
            // A retry of an entry that arrived: applied once.
            return refused(String::new());
        }
        if request.sequence != *applied + 1 {
            return refused(format!(
                "entry {} after {}: entries are missing",
                request.sequence, *applied
            ));
        }
        replica.task.apply_update(&request.entry).await;
        *applied = request.sequence;
        self.stats.updates_applied.fetch_add(1, Ordering::Relaxed);
        refused(String::new())
    }

    /// Hand the state of the backup held here to a new primary run of its
    /// task (whose claim is current), ending the backup.
    pub(crate) async fn hand_over(&self, request: HandoverRequest) -> HandoverReply {
        match self.try_hand_over(request).await {
            Ok(state) => HandoverReply {
                refused: String::new(),
                state,
            },
            Err(refused) => HandoverReply {
                refused,
                state: Vec::new(),
            },
        }
    }

    async fn try_hand_over(&self, request: HandoverRequest) -> Result<Vec<u8>, String> {
        let (_, id) = parse_target(&request.job, request.task)?;
        let replica = self
            .replica(&id)
            .ok_or_else(|| format!("{} holds no backup of {id}", self.name))?;
        if replica.primary_claim_epoch != request.primary_claim_epoch
            || request.claim_epoch <= replica.primary_claim_epoch
        {
            return Err(format!(
                "the backup here is of claim {}",
                replica.primary_claim_epoch
            ));
        }
        let primary = NodeName::new(request.new_primary_node.clone())
            .map_err(|_| format!("node {:?} is invalid", request.new_primary_node))?;
        self.check_owner(&id, request.claim_epoch, &primary).await?;
        let mut held = replica.applied.lock().await;
        if held.1 {
            return Err(format!("the backup of {id} here has ended"));
        }
        held.1 = true;
        let state = replica.task.backup_state().await;
        drop(held);
        let mut replicas = self.replicas.lock().expect("not poisoned");
        if replicas.get(&id).is_some_and(|r| Arc::ptr_eq(r, &replica)) {
            replicas.remove(&id);
        }
        Ok(state)
    }

    pub(crate) fn replica(&self, id: &TaskId) -> Option<Arc<Replica>> {
        self.replicas.lock().expect("not poisoned").get(id).cloned()
    }

    /// This node's record of a backup of `id` was written (`record`) or
    /// deleted (`None`) at `revision`: the backup held here is recorded, or
    /// over.
    pub(crate) fn backup_record_changed(
        &self,
        id: &TaskId,
        record: Option<BackupRecord>,
        revision: i64,
    ) {
        let mut replicas = self.replicas.lock().expect("not poisoned");
        let Some(replica) = replicas.get(id) else {
            return;
        };
        let recorded_at = &replica.recorded_at;
        match record {
            Some(record) if record.primary_claim_epoch == replica.primary_claim_epoch => {
                recorded_at.fetch_max(revision, Ordering::AcqRel);
            }
            Some(_) => {}
            None => {
                let recorded = recorded_at.load(Ordering::Acquire);
                if recorded != 0 && recorded < revision {
                    replicas.remove(id);
                }
            }
        }
    }

    /// After the view was read again (events may have been missed): drop
    /// the backups held here whose record is gone, and those whose record
    /// never appeared (their primary could not write it): they can never
    /// take over, and no primary sends them entries.
    pub(crate) fn reconcile_backups(&self) {
        let seen = self.view.revision();
        let mut replicas = self.replicas.lock().expect("not poisoned");
        replicas.retain(|id, replica| {
            let recorded = replica.recorded_at.load(Ordering::Acquire);
            if recorded == 0 {
                return replica.built.elapsed() < UNRECORDED_KEPT;
            }
            let record = self.view.backups(id).get(&self.name).copied();
            match record {
                Some(record) => record.primary_claim_epoch == replica.primary_claim_epoch,
                None => seen < recorded,
            }
        });
    }

    /// Drop the backups held here of `job`'s tasks (it shut down).
    pub(crate) fn drop_backups_of(&self, job: &JobName) {
        self.replicas
            .lock()
            .expect("not poisoned")
            .retain(|id, _| parse_graph_task_id(id).is_none_or(|(of, _)| of != *job));
    }

    /// Whether this node serves `group` (as its record says).
    fn serves(&self, group: &GroupName) -> bool {
        self.view
            .serving(group)
            .iter()
            .any(|(name, _)| *name == self.name)
    }
}

/// The job and task a request names.
fn parse_target(job: &str, task: u32) -> Result<(JobName, TaskId), String> {
    let job = JobName::new(job).map_err(|_| format!("job name {job:?} is invalid"))?;
    let id = graph_task_id(&job, task);
    Ok((job, id))
}
