//! What an application writes: a [`JobKind`] that builds each task of a job
//! and the job's [`Topology`], and the [`GraphTask`] callbacks; and the
//! records a job keeps in the store.

use std::sync::Arc;

use async_trait::async_trait;
use eretes_protocol::GroupName;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::handle::TaskHandle;
use crate::ids::JobEpoch;

/// A job as started (`graph/jobs/<job>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The registered [`JobKind`] that builds its tasks and topology.
    pub kind: String,
    /// How many tasks: ids 0..tasks.
    pub tasks: u32,
    /// The eretes group its tasks are claimed in.
    pub group: GroupName,
    /// Anything the kind needs (JSON).
    #[serde(default)]
    pub properties: Value,
    /// Hot standbys per task (0..=[`MAX_BACKUPS`]): each task's primary
    /// keeps this many backups on other nodes current with its update log,
    /// and one of them takes over when the primary is lost.
    #[serde(default)]
    pub backups: u32,
}

impl JobSpec {
    /// Whether the spec is within the bounds a job may have: 1 to
    /// [`MAX_JOB_TASKS`] tasks, at most [`MAX_BACKUPS`] backups, a kind
    /// of 1–64 bytes. Checked when a job starts, and whenever a job's
    /// record is read from the store: a record written by hand with four
    /// billion tasks made `graph show` allocate for each of them and
    /// `graph rm` delete them one by one.
    pub fn check(&self) -> Result<(), String> {
        if self.tasks == 0 || self.tasks > MAX_JOB_TASKS {
            return Err(format!(
                "a job has 1-{MAX_JOB_TASKS} tasks, not {}",
                self.tasks
            ));
        }
        if self.backups > MAX_BACKUPS {
            return Err(format!(
                "a job has 0-{MAX_BACKUPS} backups per task, not {}",
                self.backups
            ));
        }
        if self.kind.is_empty() || self.kind.len() > 64 {
            return Err("a job's kind is 1-64 bytes".into());
        }
        Ok(())
    }
}

/// Most tasks a job may have.
pub const MAX_JOB_TASKS: u32 = 10_000;

/// Most backups a task may have.
pub const MAX_BACKUPS: u32 = 3;

/// A backup of a task (`graph/backups/<job>/<task>/<node>`), written by
/// the backup's node under its own lease when the primary handed it its
/// state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// The claim (fencing) epoch of the primary run it backs up: only a
    /// backup of the last primary may take over from it.
    pub primary_claim_epoch: i64,
}

/// A job's epoch record (`graph/epochs/<job>`), moved by compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The job epoch.
    pub epoch: JobEpoch,
    /// Set by `shutdown_job`: every task exits and the job's tasks end.
    #[serde(default)]
    pub shutdown: bool,
}

/// The meta a task last flagged on a link (`graph/meta/<job>/<task>/<link>`),
/// written under the sender's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRecord {
    /// The job epoch it was flagged in.
    pub epoch: JobEpoch,
    /// The value (small: at most [`MAX_META_BYTES`]).
    pub meta: String,
}

/// Largest meta value.
pub const MAX_META_BYTES: usize = 4096;

/// A job's wiring: for each link type, a task's neighbours in a job epoch.
/// The same on every node (it is code, chosen by the job's kind).
pub trait Topology: Send + Sync + 'static {
    /// The link types, e.g. `parent`, `children`.
    fn links(&self) -> Vec<String>;
    /// The neighbours of `task` over `link` in `epoch`.
    fn neighbours(&self, link: &str, task: u32, epoch: JobEpoch) -> Vec<u32>;
}

/// Builds the tasks and topology of jobs of one kind; registered on every
/// node under the kind's name.
pub trait JobKind: Send + Sync + 'static {
    /// The job's topology.
    fn topology(&self, job: &JobSpec) -> Arc<dyn Topology>;
    /// The implementation of task `index`.
    fn build(&self, job: &JobSpec, index: u32) -> Arc<dyn GraphTask>;
}

/// One task of a job. The framework calls `init`, then `enter_epoch` for the
/// job's current epoch, then delivers events one at a time, in order:
/// `enter_epoch` for each later epoch, `meta_ready`, neighbour events; and
/// `exit` when the job shuts down. `serve_data` is called concurrently with
/// them (a data request of a neighbour must not wait for this task's
/// callbacks), so keep state behind a lock.
#[async_trait]
pub trait GraphTask: Send + Sync + 'static {
    /// Bring the task up, from scratch or after a failover (with the last
    /// checkpoint it saved). Does nothing unless implemented.
    async fn init(&self, _task: &TaskHandle, _checkpoint: Option<Vec<u8>>) {}
    /// The job entered `epoch`; the handle's calls act in it. Does nothing
    /// unless implemented.
    async fn enter_epoch(&self, _task: &TaskHandle, _epoch: JobEpoch) {}
    /// Neighbour `from` flagged `meta` on `link` in the current epoch. Each
    /// (sender, link, epoch, meta) comes once per run. Does nothing unless
    /// implemented.
    async fn meta_ready(&self, _task: &TaskHandle, _from: u32, _link: &str, _meta: &str) {}
    /// Answer neighbour `from`'s data request; `Err` is a final refusal.
    /// Refuses every request unless implemented.
    async fn serve_data(
        &self,
        _task: &TaskHandle,
        from: u32,
        method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err(format!("this task serves no data ({method:?} from {from})"))
    }
    /// The run of neighbour `id` (over `link`) was lost.
    async fn neighbour_failed(&self, _task: &TaskHandle, _link: &str, _id: u32) {}
    /// Neighbour `id` (over `link`) runs again.
    async fn neighbour_restarted(&self, _task: &TaskHandle, _link: &str, _id: u32) {}
    /// The job shuts down.
    async fn exit(&self, _task: &TaskHandle) {}
    /// After `exit`: this task's result, kept in its eretes result record
    /// (`<ns>/results/<job>.<index>`).
    async fn result(&self, _task: &TaskHandle) -> Value {
        Value::Null
    }

    // ----- primary/backup (jobs with `backups` > 0) -------------------------
    //
    // The task's state is a state machine driven by its update log: the
    // primary changes it only through `TaskHandle::update(entry)`, which
    // calls `apply_update(entry)` here and on every live backup. A backup
    // is a second instance of the task (built by the same `JobKind`) on
    // another node, that receives `became_backup` with the primary's
    // state, then every entry; when the primary is lost it becomes the
    // primary (`became_primary`, instead of `init`).

    /// This task's state, for a new backup (`became_backup` there). Called
    /// on the primary between updates, never during one. Empty unless
    /// implemented.
    async fn backup_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// On a backup: start from the primary's `state` (from
    /// `backup_state`). Does nothing unless implemented.
    async fn became_backup(&self, _state: Vec<u8>) {}
    /// Apply one entry of the update log: on the primary (in
    /// `TaskHandle::update`) and on each backup, in the same order. Does
    /// nothing unless implemented.
    async fn apply_update(&self, _entry: &[u8]) {}
    /// This backup became the primary: the primary was lost, and this
    /// instance, with every update the primary's `update` returned for,
    /// runs the task now. Called instead of `init`; then the run goes on
    /// as any other (`enter_epoch` for the current job epoch, ...). Does
    /// nothing unless implemented.
    async fn became_primary(&self, _task: &TaskHandle) {}
}
