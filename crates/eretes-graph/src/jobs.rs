//! The graph layer's transactions: start and remove a job, move its epoch
//! (compare-and-swap), flag meta under a run's claim.

use std::collections::BTreeMap;

use eretes_protocol::{
    decode, encode, Coordinator, NodeName, OwnerRecord, ProtocolError, ResultRecord, TaskId,
    TaskSpec, MAX_SPEC_BYTES,
};
use eretes_store::{
    Compare, DeleteRequest, GetRequest, KeyRange, PutRequest, Revision, Txn, TxnOp, TxnOpResponse,
};
use serde::Serialize;
use serde_json::json;

use crate::ids::{
    graph_task_id, parse_graph_task_id, valid_link, GraphKey, GraphKeys, JobEpoch, JobName,
};
use crate::model::{BackupRecord, EpochRecord, JobSpec, MetaRecord, MAX_META_BYTES};
use crate::GraphError;

/// The store side of jobs, for one namespace.
#[derive(Clone)]
pub struct Jobs {
    coordinator: Coordinator,
    keys: GraphKeys,
}

/// The jobs of a namespace: [`Jobs::list`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobList {
    /// Every job, by name.
    pub jobs: Vec<JobSummary>,
    /// Job or epoch records that did not decode, left out.
    pub malformed: u64,
}

/// A job as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    /// Its name.
    pub name: JobName,
    /// Its record as started.
    pub spec: JobSpec,
    /// Its epoch record (`None` only if it was lost, or is malformed).
    pub epoch: Option<EpochRecord>,
    /// Why its epoch record, which is there, could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch_malformed: Option<String>,
}

/// A job now: [`Jobs::status`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    /// Its name.
    pub name: JobName,
    /// Its record as started.
    pub spec: JobSpec,
    /// Its epoch record (`None` if it was lost, or is malformed).
    pub epoch: Option<EpochRecord>,
    /// Why its epoch record, which is there, could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch_malformed: Option<String>,
    /// Each task, by index.
    pub tasks: Vec<TaskStatus>,
}

/// One task of a job now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskStatus {
    /// Its index.
    pub index: u32,
    /// The node running it, if one does.
    pub node: Option<NodeName>,
    /// Whether it has ended (its result is recorded).
    pub ended: bool,
    /// The nodes holding a backup of its current run (of its last run,
    /// while no node runs it): a backup recorded for an earlier run, not
    /// yet cleaned up by the current one, cannot take over and is left out.
    pub backups: Vec<NodeName>,
}

/// The key-values of the `n`th get of a transaction.
fn got(responses: &[TxnOpResponse], n: usize) -> &[eretes_store::KeyValue] {
    match responses.get(n) {
        Some(TxnOpResponse::Get(get)) => &get.kvs,
        _ => &[],
    }
}

/// What [`Jobs::inc_epoch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochMove {
    /// This call moved the job to this epoch.
    Moved(JobEpoch),
    /// The job was no longer at the expected epoch (another task moved it,
    /// or it shut down): an ordinary answer, nothing was written.
    Lost(EpochRecord),
}

impl Jobs {
    /// Jobs of `coordinator`'s namespace.
    pub fn new(coordinator: Coordinator) -> Jobs {
        let keys = GraphKeys::new(coordinator.namespace());
        Jobs { coordinator, keys }
    }

    /// The key layout.
    pub fn keys(&self) -> &GraphKeys {
        &self.keys
    }

    /// The coordinator the jobs' tasks live in.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Start `job`: its record and epoch 0 in one transaction (refused if the
    /// job exists), then its tasks `<job>.0` … as eretes tasks of
    /// `spec.group`, which nodes serving that group claim.
    pub async fn start(&self, job: &JobName, spec: &JobSpec) -> Result<(), GraphError> {
        spec.check().map_err(GraphError::Invalid)?;
        let record = encode(spec);
        if record.len() > MAX_SPEC_BYTES {
            return Err(GraphError::Invalid(format!(
                "the job's record is {} bytes; the limit is {MAX_SPEC_BYTES}",
                record.len()
            )));
        }
        let epoch = EpochRecord {
            epoch: JobEpoch(0),
            shutdown: false,
        };
        let txn = Txn::new()
            .when(Compare::absent(self.keys.job(job)))
            .and_then(TxnOp::Put(PutRequest::new(self.keys.job(job), record)))
            .and_then(TxnOp::Put(PutRequest::new(
                self.keys.epoch(job),
                encode(&epoch),
            )));
        if !self.coordinator.store().txn(txn).await?.succeeded {
            return Err(GraphError::JobExists(job.to_string()));
        }
        for index in 0..spec.tasks {
            let properties = json!({ "graph": { "job": job.as_str(), "index": index } });
            let task = TaskSpec::new(spec.group.clone(), properties);
            self.coordinator
                .submit(&graph_task_id(job, index), &task)
                .await?;
        }
        Ok(())
    }

    /// Remove `job`: its tasks (stopped wherever they run), record, epoch
    /// and meta. [`GraphError::NoSuchJob`] if there is no record.
    pub async fn remove(&self, job: &JobName) -> Result<(), GraphError> {
        let tasks: Vec<TaskId> = match self.job(job).await {
            Ok(Some(spec)) => (0..spec.tasks).map(|i| graph_task_id(job, i)).collect(),
            Ok(None) => return Err(GraphError::NoSuchJob(job.to_string())),
            // A record out of a job's bounds (written by hand, say) still
            // goes, with the tasks the store holds under the job's name.
            Err(GraphError::Malformed(_)) => self.stored_tasks(job).await?,
            Err(error) => return Err(error),
        };
        for task in &tasks {
            match self.coordinator.delete(task).await {
                Ok(_) | Err(ProtocolError::NotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let txn = Txn::new()
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
                self.keys.job(job),
            ))))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
                self.keys.epoch(job),
            ))))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(
                self.keys.metas(job),
            ))))
            .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(
                self.keys.backups(job),
            ))));
        self.coordinator.store().txn(txn).await?;
        Ok(())
    }

    /// The ids of the tasks the store holds for `job`, in one read.
    async fn stored_tasks(&self, job: &JobName) -> Result<Vec<TaskId>, GraphError> {
        let prefix = self.coordinator.namespace().tasks_prefix();
        // Job names have no `.`, so `<job>.` is this job's tasks and no other's.
        let response = self
            .coordinator
            .store()
            .get(GetRequest::new(KeyRange::prefix(format!("{prefix}{job}."))))
            .await?;
        Ok(response
            .kvs
            .iter()
            .filter_map(|kv| TaskId::new(&kv.key[prefix.len()..]).ok())
            .filter(|id| parse_graph_task_id(id).is_some_and(|(of, _)| of == *job))
            .collect())
    }

    /// The record of `job`, if it exists.
    pub async fn job(&self, job: &JobName) -> Result<Option<JobSpec>, GraphError> {
        let key = self.keys.job(job);
        let response = self
            .coordinator
            .store()
            .get(GetRequest::new(KeyRange::key(key.clone())))
            .await?;
        response
            .kvs
            .first()
            .map(|kv| decode_job(&kv.key, &kv.value))
            .transpose()
    }

    /// The epoch record of `job`, if it exists.
    pub async fn epoch(&self, job: &JobName) -> Result<Option<EpochRecord>, GraphError> {
        self.read("job epoch", self.keys.epoch(job)).await
    }

    /// Every job of the namespace, by name, with its epoch, in one read. A
    /// record that does not decode is left out (and counted in
    /// [`JobList::malformed`]).
    pub async fn list(&self) -> Result<JobList, GraphError> {
        let root = self.keys.root();
        let txn = Txn::new()
            .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(format!(
                "{root}jobs/"
            )))))
            .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(format!(
                "{root}epochs/"
            )))));
        let response = self.coordinator.store().txn(txn).await?;
        let mut list = JobList::default();
        let mut epochs = BTreeMap::new();
        let mut malformed_epochs = BTreeMap::new();
        for kv in got(&response.responses, 1) {
            match (
                self.keys.parse(&kv.key),
                decode("job epoch", &kv.key, &kv.value),
            ) {
                (Some(GraphKey::Epoch(job)), Ok(record)) => {
                    epochs.insert(job, record);
                }
                (Some(GraphKey::Epoch(job)), Err(error)) => {
                    malformed_epochs.insert(job, error.to_string());
                    list.malformed += 1;
                }
                _ => list.malformed += 1,
            }
        }
        for kv in got(&response.responses, 0) {
            match (self.keys.parse(&kv.key), decode_job(&kv.key, &kv.value)) {
                (Some(GraphKey::Job(name)), Ok(spec)) => list.jobs.push(JobSummary {
                    epoch: epochs.remove(&name),
                    epoch_malformed: malformed_epochs.remove(&name),
                    name,
                    spec,
                }),
                _ => list.malformed += 1,
            }
        }
        Ok(list)
    }

    /// `job` now, if it exists: its record, its epoch, and each task's
    /// owner, end and backups, from one consistent read.
    pub async fn status(&self, job: &JobName) -> Result<Option<JobStatus>, GraphError> {
        let ns = self.coordinator.namespace();
        let get = |range| TxnOp::Get(GetRequest::new(range));
        // Job names have no `.`, so `<job>.` is this job's tasks and no other's.
        let txn = Txn::new()
            .and_then(get(KeyRange::key(self.keys.job(job))))
            .and_then(get(KeyRange::key(self.keys.epoch(job))))
            .and_then(get(KeyRange::prefix(format!(
                "{}{job}.",
                ns.owners_prefix()
            ))))
            .and_then(get(KeyRange::prefix(format!(
                "{}{job}.",
                ns.results_prefix()
            ))))
            .and_then(get(KeyRange::prefix(self.keys.backups(job))));
        let response = self.coordinator.store().txn(txn).await?;
        let Some(kv) = got(&response.responses, 0).first() else {
            return Ok(None);
        };
        let spec = decode_job(&kv.key, &kv.value)?;
        let (epoch, epoch_malformed) = match got(&response.responses, 1).first() {
            None => (None, None),
            Some(kv) => match decode::<EpochRecord>("job epoch", &kv.key, &kv.value) {
                Ok(record) => (Some(record), None),
                Err(error) => (None, Some(error.to_string())),
            },
        };
        let mut tasks: Vec<TaskStatus> = (0..spec.tasks)
            .map(|index| TaskStatus {
                index,
                node: None,
                ended: false,
                backups: Vec::new(),
            })
            .collect();
        let index_of = |key: &str| {
            let id = TaskId::new(key.rsplit('/').next()?).ok()?;
            let (of, index) = parse_graph_task_id(&id)?;
            (of == *job).then_some(index as usize)
        };
        // Each running task's claim epoch: its owner record's creation.
        let mut claim_epochs: Vec<Option<i64>> = vec![None; tasks.len()];
        for kv in got(&response.responses, 2) {
            let owner = decode::<OwnerRecord>("owner", &kv.key, &kv.value).ok();
            if let (Some(index), Some(owner)) = (index_of(&kv.key), owner) {
                if let Some(task) = tasks.get_mut(index) {
                    task.node = Some(owner.node);
                    claim_epochs[index] = Some(kv.create_revision);
                }
            }
        }
        for kv in got(&response.responses, 3) {
            if let Some(task) = index_of(&kv.key).and_then(|i| tasks.get_mut(i)) {
                task.ended = true;
            }
        }
        // Each task's backup records, with the claim epoch of the run each
        // backs up.
        let mut records: Vec<Vec<(NodeName, i64)>> = vec![Vec::new(); tasks.len()];
        for kv in got(&response.responses, 4) {
            let Some(GraphKey::Backup(_, index, node)) = self.keys.parse(&kv.key) else {
                continue;
            };
            let Ok(record) = decode::<BackupRecord>("backup", &kv.key, &kv.value) else {
                continue;
            };
            if let Some(held) = records.get_mut(index as usize) {
                held.push((node, record.primary_claim_epoch));
            }
        }
        for ((task, held), claim_epoch) in tasks.iter_mut().zip(records).zip(claim_epochs) {
            // The current run's, or while none runs, the last run's.
            let run = claim_epoch.or_else(|| held.iter().map(|(_, epoch)| *epoch).max());
            task.backups = held
                .into_iter()
                .filter(|(_, epoch)| Some(*epoch) == run)
                .map(|(node, _)| node)
                .collect();
        }
        Ok(Some(JobStatus {
            name: job.clone(),
            spec,
            epoch,
            epoch_malformed,
            tasks,
        }))
    }

    /// The result records of `job`'s tasks that have ended, in one read.
    /// (A record that does not decode is left out.)
    pub async fn results(&self, job: &JobName) -> Result<Vec<ResultRecord>, GraphError> {
        // Job names have no `.`, so `<job>.` is this job's tasks and no other's.
        let prefix = format!("{}{job}.", self.coordinator.namespace().results_prefix());
        let response = self
            .coordinator
            .store()
            .get(GetRequest::new(KeyRange::prefix(prefix)))
            .await?;
        Ok(response
            .kvs
            .iter()
            .filter_map(|kv| decode("result", &kv.key, &kv.value).ok())
            .collect())
    }

    /// The record at `key`, if there is one.
    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        kind: &'static str,
        key: String,
    ) -> Result<Option<T>, GraphError> {
        let response = self
            .coordinator
            .store()
            .get(GetRequest::new(KeyRange::key(key.clone())))
            .await?;
        match response.kvs.first() {
            Some(kv) => Ok(Some(decode(kind, &key, &kv.value).map_err(malformed)?)),
            None => Ok(None),
        }
    }

    /// Move `job` from epoch `from` to the next, by compare-and-swap.
    pub async fn inc_epoch(&self, job: &JobName, from: JobEpoch) -> Result<EpochMove, GraphError> {
        self.inc_epoch_fenced(job, from, None).await
    }

    /// [`Jobs::inc_epoch`], also refused as [`GraphError::Fenced`] unless the
    /// run of `fence.0` with claim epoch `fence.1` still owns its task.
    pub async fn inc_epoch_fenced(
        &self,
        job: &JobName,
        from: JobEpoch,
        fence: Option<(&TaskId, Revision)>,
    ) -> Result<EpochMove, GraphError> {
        let expected = EpochRecord {
            epoch: from,
            shutdown: false,
        };
        let next = EpochRecord {
            epoch: JobEpoch(from.0 + 1),
            shutdown: false,
        };
        self.swap_epoch(job, expected, next, fence).await
    }

    /// Shut `job` down (keeping its epoch), by compare-and-swap from `at`.
    pub async fn shutdown(&self, job: &JobName, at: JobEpoch) -> Result<EpochMove, GraphError> {
        self.shutdown_fenced(job, at, None).await
    }

    /// [`Jobs::shutdown`] under a run's claim, as [`Jobs::inc_epoch_fenced`].
    pub async fn shutdown_fenced(
        &self,
        job: &JobName,
        at: JobEpoch,
        fence: Option<(&TaskId, Revision)>,
    ) -> Result<EpochMove, GraphError> {
        let expected = EpochRecord {
            epoch: at,
            shutdown: false,
        };
        let next = EpochRecord {
            epoch: at,
            shutdown: true,
        };
        self.swap_epoch(job, expected, next, fence).await
    }

    async fn swap_epoch(
        &self,
        job: &JobName,
        expected: EpochRecord,
        next: EpochRecord,
        fence: Option<(&TaskId, Revision)>,
    ) -> Result<EpochMove, GraphError> {
        let key = self.keys.epoch(job);
        let mut txn = Txn::new();
        if let Some((id, claim_epoch)) = fence {
            txn = txn.when(self.coordinator.fence_epoch(id, claim_epoch));
        }
        let txn = txn
            .when(Compare::value_is(key.clone(), encode(&expected)))
            .and_then(TxnOp::Put(PutRequest::new(key.clone(), encode(&next))))
            .or_else(TxnOp::Get(GetRequest::new(KeyRange::key(key.clone()))));
        let response = self.coordinator.store().txn(txn).await?;
        if response.succeeded {
            return Ok(EpochMove::Moved(next.epoch));
        }
        if let Some((id, claim_epoch)) = fence {
            let owns = Txn::new().when(self.coordinator.fence_epoch(id, claim_epoch));
            if !self.coordinator.store().txn(owns).await?.succeeded {
                return Err(GraphError::Fenced(id.to_string()));
            }
        }
        let found = match response.responses.first() {
            Some(TxnOpResponse::Get(get)) => get.kvs.first().cloned(),
            _ => None,
        }
        .ok_or_else(|| GraphError::NoSuchJob(job.to_string()))?;
        Ok(EpochMove::Lost(
            decode("job epoch", &key, &found.value).map_err(malformed)?,
        ))
    }

    /// Flag `meta` on `link` for task `index` of `job`, in job epoch `epoch`,
    /// under the run's claim (`claim_epoch`): refused as fenced if the run no
    /// longer owns the task. (The run's handle skips flagging again what it
    /// flagged last, and receivers deliver each value once.)
    pub async fn flag_meta(
        &self,
        job: &JobName,
        index: u32,
        claim_epoch: Revision,
        link: &str,
        epoch: JobEpoch,
        meta: &str,
    ) -> Result<(), GraphError> {
        if !valid_link(link) {
            return Err(GraphError::Invalid(format!(
                "link {link:?}: 1-32 of a-z 0-9 _ - are allowed"
            )));
        }
        if meta.len() > MAX_META_BYTES {
            return Err(GraphError::Invalid(format!(
                "a meta of {} bytes; the limit is {MAX_META_BYTES}",
                meta.len()
            )));
        }
        let id: TaskId = graph_task_id(job, index);
        let value = encode(&MetaRecord {
            epoch,
            meta: meta.to_string(),
        });
        let txn = Txn::new()
            .when(self.coordinator.fence_epoch(&id, claim_epoch))
            .and_then(TxnOp::Put(PutRequest::new(
                self.keys.meta(job, index, link),
                value,
            )));
        if self.coordinator.store().txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(GraphError::Fenced(id.to_string()))
        }
    }
}

fn malformed(error: eretes_protocol::MalformedValue) -> GraphError {
    GraphError::Malformed(error.to_string())
}

/// A job's record as read from the store, decoded and within a job's
/// bounds ([`JobSpec::check`]), or an error naming its key.
fn decode_job(key: &str, value: &[u8]) -> Result<JobSpec, GraphError> {
    let spec: JobSpec = decode("job", key, value).map_err(malformed)?;
    spec.check()
        .map_err(|reason| GraphError::Malformed(format!("job record {key}: {reason}")))?;
    Ok(spec)
}
