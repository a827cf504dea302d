//! Primary/backup hot standby: a job with `backups: k` keeps, for each task,
//! k backups on other nodes, each a second instance of the task that the
//! primary's update log keeps current, and one of which takes over when
//! the primary is lost.
//!
//! * **Placement.** A primary's run brings its backups up itself: it picks
//!   live nodes that serve the job's group (not its own), hands each its
//!   state (`backup_state` → `became_backup`) over gRPC, and the backup's
//!   node records `backups/<job>/<task>/<node>` under its own lease, in a
//!   transaction fenced by the primary's claim. A backup whose node dies
//!   vanishes with its lease, and the primary brings up another.
//! * **The update log.** [`TaskHandle::update`] applies an entry to the
//!   primary's instance, then sends it to every backup, and returns once
//!   each has applied it. A backup that cannot be reached within
//!   [`UPDATE_PATIENCE`], or refuses, is given up: its record is deleted
//!   (fenced by the primary's claim) before `update` returns, so a backup
//!   that still has a record has every entry `update` returned for.
//! * **Takeover.** When the primary's claim goes (its lease expired), the
//!   backup's node claims the task first: [`BackupBalancer`] makes the
//!   other nodes leave it alone for [`TAKEOVER_GRACE`]. The run there finds
//!   its local backup and a record of it in the store for the primary's
//!   claim, and calls `became_primary` on that instance instead of `init`.
//!   Every new primary deletes the records of backups of earlier runs
//!   (fenced) before its task can update anything, so a backup of an older
//!   primary never takes over with a state that misses updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eretes_protocol::{decode, encode, GroupName, NodeName, TaskId};
use eretes_runtime::balancer::{Balancer, ClaimDecision, ClusterView};
use eretes_store::{DeleteRequest, GetRequest, KeyRange, PutRequest, Txn, TxnOp};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::handle::{RunShared, TaskHandle};
use crate::ids::{graph_task_id, parse_graph_task_id, JobName};
use crate::model::{BackupRecord, GraphTask};
use crate::node::NodeShared;
use crate::proto::{BackupReply, BackupRequest, UpdateRequest};
use crate::GraphError;

/// How long a backup may take to apply one entry (retrying) before the
/// primary gives it up.
pub const UPDATE_PATIENCE: Duration = Duration::from_secs(5);

/// How long other nodes leave a lost primary's task to a node holding a
/// backup of it before they may claim it cold.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(3);

/// How long one state transfer to a new backup may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// A primary run's update log: how many entries it applied, and the
/// backups that have all of them.
#[derive(Debug, Default)]
pub(crate) struct UpdateLog {
    /// The last entry applied.
    pub sequence: u64,
    /// The backups brought up by this run that are current: node → its
    /// address, and the store revision that recorded it there.
    pub members: BTreeMap<NodeName, (String, i64)>,
}

/// A backup held on this node: an instance of the task, kept current by its
/// primary's log.
pub(crate) struct Replica {
    /// The task instance (built by the job's kind).
    pub task: Arc<dyn GraphTask>,
    /// The claim epoch of the primary run it backs up.
    pub primary_claim_epoch: i64,
    /// The store revision that recorded it: a deletion of the record seen
    /// later than that ends it.
    pub recorded_at: i64,
    /// The last entry applied (held while one is applied, so entries apply
    /// one at a time, in order).
    pub applied: tokio::sync::Mutex<u64>,
}

/// The backups held on one node, by task.
pub(crate) type Replicas = Mutex<HashMap<TaskId, Arc<Replica>>>;

impl TaskHandle {
    /// Apply `entry` to this task (its `apply_update`) and to every live
    /// backup of it, in order with the entries before; returns once each
    /// backup has applied it. A backup that does not within
    /// [`UPDATE_PATIENCE`] is given up first (and replaced), so every
    /// backup left has every entry this call returned for, and one of them
    /// takes over with that state if the primary is lost.
    ///
    /// In a job without backups it only applies the entry here. Fails with
    /// [`GraphError::RunEnded`] when the run has ended (nothing applied),
    /// and [`GraphError::Fenced`] when another run owns the task now (the
    /// entry was applied here, and this run is over).
    pub async fn update(&self, entry: &[u8]) -> Result<(), GraphError> {
        let run = &self.run;
        let ended = || GraphError::RunEnded(run.id.to_string());
        if run.ended.is_cancelled() {
            return Err(ended());
        }
        let mut log = run.log.lock().await;
        if run.ended.is_cancelled() {
            return Err(ended());
        }
        run.task.apply_update(entry).await;
        log.sequence += 1;
        run.node.stats.updates.fetch_add(1, Ordering::Relaxed);
        if log.members.is_empty() {
            return Ok(());
        }
        let request = UpdateRequest {
            job: run.job.to_string(),
            task: run.index,
            primary_claim_epoch: run.claim_epoch,
            sequence: log.sequence,
            entry: entry.to_vec(),
        };
        let sends = log.members.iter().map(|(node, (address, _))| {
            let request = request.clone();
            async move { (node.clone(), send_update(run, node, address, request).await) }
        });
        let failed: Vec<NodeName> = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(|(node, applied)| (!applied).then_some(node))
            .collect();
        for node in failed {
            give_up(run, &node).await?;
            log.members.remove(&node);
        }
        Ok(())
    }
}

/// Send one entry to one backup, retrying until it applied it, refused it,
/// its record vanished, or [`UPDATE_PATIENCE`] ran out. Whether it applied.
async fn send_update(
    run: &RunShared,
    node: &NodeName,
    address: &str,
    request: UpdateRequest,
) -> bool {
    let give_up_at = Instant::now() + UPDATE_PATIENCE;
    let mut pause = Duration::from_millis(20);
    loop {
        let attempt = async {
            let mut client = run.node.client(address)?;
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(UPDATE_PATIENCE);
            client
                .update(call)
                .await
                .map(|reply| reply.into_inner().refused)
                .map_err(|status| status.to_string())
        };
        match tokio::time::timeout_at(give_up_at, attempt).await {
            Ok(Ok(refused)) if refused.is_empty() => return true,
            Ok(Ok(refused)) => {
                debug!(task = %run.id, %node, refused, "a backup refused an update; giving it up");
                return false;
            }
            Ok(Err(error)) => {
                debug!(task = %run.id, %node, error, "an update did not reach a backup; retrying")
            }
            Err(_) => return false,
        }
        let still_backup = run
            .node
            .view
            .backups(&run.id)
            .get(node)
            .is_some_and(|record| record.primary_claim_epoch == run.claim_epoch);
        if !still_backup || Instant::now() + pause >= give_up_at {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Delete backup `node`'s record of this run's task, fenced by the run's
/// claim, retrying store failures until the run ends: after this, that
/// backup can never take over.
async fn give_up(run: &RunShared, node: &NodeName) -> Result<(), GraphError> {
    let keys = run.node.jobs.keys();
    let coordinator = run.node.jobs.coordinator();
    let txn = Txn::new()
        .when(coordinator.fence_epoch(&run.id, run.claim_epoch))
        .and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
            keys.backup(&run.job, run.index, node),
        ))));
    let mut pause = Duration::from_millis(50);
    loop {
        match coordinator.store().txn(txn.clone()).await {
            Ok(response) if response.succeeded => {
                run.node
                    .stats
                    .backups_dropped
                    .fetch_add(1, Ordering::Relaxed);
                warn!(task = %run.id, %node, "gave a backup up: it did not apply an update");
                return Ok(());
            }
            Ok(_) => return Err(GraphError::Fenced(run.id.to_string())),
            Err(error) => debug!(%error, task = %run.id, "cannot give a backup up yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = run.ended.cancelled() => return Err(GraphError::RunEnded(run.id.to_string())),
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Keep `run`'s task backed up by its job's number of backups until the run
/// ends: bring up a new one whenever one is missing (at the start, after a
/// backup's node died, after one was given up).
pub(crate) async fn keep_backups(run: Arc<RunShared>) {
    let wanted = run.spec.backups as usize;
    let mut placement = run.node.view.placement();
    loop {
        if let Err(error) = place_backups(&run, wanted).await {
            debug!(%error, task = %run.id, "backups not complete yet");
        }
        tokio::select! {
            () = run.ended.cancelled() => return,
            changed = placement.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One pass of [`keep_backups`].
async fn place_backups(run: &Arc<RunShared>, wanted: usize) -> Result<(), GraphError> {
    let node = &run.node;
    let records = node.view.backups(&run.id);
    let mut log = run.log.lock().await;
    // A member whose record is gone (its node died, or it was given up) is
    // no backup any more. (One whose record the view has not seen yet is.)
    let seen = node.view.revision();
    log.members
        .retain(|member, (_, recorded_at)| records.contains_key(member) || seen < *recorded_at);
    if log.members.len() < wanted {
        let mut candidates: Vec<(NodeName, String)> = node
            .view
            .serving(&run.spec.group)
            .into_iter()
            .filter(|(name, _)| *name != node.name && !log.members.contains_key(name))
            .collect();
        // Spread: each task ranks the nodes its own way.
        candidates.sort_by_key(|(name, _)| rank(&run.id, name));
        for (candidate, address) in candidates {
            if log.members.len() >= wanted || run.ended.is_cancelled() {
                break;
            }
            match transfer(run, &log, &address).await {
                Ok(recorded_at) => {
                    debug!(task = %run.id, backup = %candidate, "backup up");
                    log.members.insert(candidate, (address, recorded_at));
                }
                Err(error) => {
                    debug!(task = %run.id, %candidate, error, "could not make it a backup")
                }
            }
        }
    }
    // Backups of earlier runs that were not brought up again: end them.
    let stale: Vec<NodeName> = node
        .view
        .backups(&run.id)
        .into_iter()
        .filter(|(name, record)| {
            record.primary_claim_epoch != run.claim_epoch && !log.members.contains_key(name)
        })
        .map(|(name, _)| name)
        .collect();
    if !stale.is_empty() {
        delete_records(run, &stale).await?;
    }
    Ok(())
}

/// A node's place in a task's order of backup candidates.
fn rank(task: &TaskId, node: &NodeName) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (task.as_str(), node.as_str()).hash(&mut hasher);
    hasher.finish()
}

/// Hand the task's state to the node at `address`, making it a backup at
/// the log's current entry. The log is held, so no update comes between.
/// The store revision that recorded the backup.
async fn transfer(run: &RunShared, log: &UpdateLog, address: &str) -> Result<i64, String> {
    let state = run.task.backup_state().await;
    let request = BackupRequest {
        job: run.job.to_string(),
        task: run.index,
        primary_claim_epoch: run.claim_epoch,
        primary_node: run.node.name.to_string(),
        sequence: log.sequence,
        state,
    };
    let mut client = run.node.client(address)?;
    let mut call = tonic::Request::new(request);
    call.set_timeout(TRANSFER_TIMEOUT);
    let reply = client
        .backup(call)
        .await
        .map_err(|status| status.to_string())?
        .into_inner();
    if reply.refused.is_empty() {
        Ok(reply.recorded_at)
    } else {
        Err(reply.refused)
    }
}

/// Delete the backup records of `nodes` for the run's task, fenced by its
/// claim.
async fn delete_records(run: &RunShared, nodes: &[NodeName]) -> Result<(), GraphError> {
    let keys = run.node.jobs.keys();
    let coordinator = run.node.jobs.coordinator();
    let mut txn = Txn::new().when(coordinator.fence_epoch(&run.id, run.claim_epoch));
    for name in nodes {
        txn = txn.and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
            keys.backup(&run.job, run.index, name),
        ))));
    }
    if coordinator.store().txn(txn).await?.succeeded {
        Ok(())
    } else {
        Err(GraphError::Fenced(run.id.to_string()))
    }
}

/// How a run of a task with backups begins.
pub(crate) struct Start {
    /// The backup held here that takes over, if this node has one that is
    /// current with the last primary.
    pub promoted: Option<Arc<dyn GraphTask>>,
}

impl NodeShared {
    /// At the start of a run (claim epoch `claim_epoch`) of task `id`:
    /// take this node's backup of it if it is current with the last primary
    /// (its record stands for the claim it was brought up by), then delete
    /// every backup record of earlier runs, fenced by the new claim, before
    /// the task can update anything.
    pub(crate) async fn begin_primary(
        &self,
        job: &JobName,
        index: u32,
        id: &TaskId,
        claim_epoch: i64,
    ) -> Result<Start, GraphError> {
        let replica = self.replicas.lock().expect("not poisoned").remove(id);
        let coordinator = self.jobs.coordinator();
        let prefix = self.jobs.keys().backups_of(job, index);
        let records = coordinator
            .store()
            .get(GetRequest::new(KeyRange::prefix(prefix)))
            .await?;
        let mine = self.jobs.keys().backup(job, index, &self.name);
        let mut promoted = None;
        if let Some(replica) = replica {
            // Waits for an entry being applied.
            let _applied = replica.applied.lock().await;
            let recorded = records
                .kvs
                .iter()
                .find(|kv| kv.key == mine)
                .and_then(|kv| decode::<BackupRecord>("backup", &kv.key, &kv.value).ok());
            if recorded
                .is_some_and(|record| record.primary_claim_epoch == replica.primary_claim_epoch)
            {
                promoted = Some(replica.task.clone());
            }
        }
        if !records.kvs.is_empty() {
            let mut txn = Txn::new().when(coordinator.fence_epoch(id, claim_epoch));
            for kv in &records.kvs {
                txn = txn.and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
                    kv.key.clone(),
                ))));
            }
            if !coordinator.store().txn(txn).await?.succeeded {
                return Err(GraphError::Fenced(id.to_string()));
            }
        }
        Ok(Start { promoted })
    }

    /// Become a backup of a task, as its primary asks.
    pub(crate) async fn take_backup(&self, request: BackupRequest) -> BackupReply {
        match self.try_take_backup(request).await {
            Ok(recorded_at) => BackupReply {
                refused: String::new(),
                recorded_at,
            },
            Err(refused) => BackupReply {
                refused,
                recorded_at: 0,
            },
        }
    }

    async fn try_take_backup(&self, request: BackupRequest) -> Result<i64, String> {
        let job = JobName::new(request.job.clone())
            .map_err(|_| format!("job name {:?} is invalid", request.job))?;
        let id = graph_task_id(&job, request.task);
        let spec = self
            .jobs
            .job(&job)
            .await
            .map_err(|error| error.to_string())?
            .ok_or_else(|| format!("no job {job}"))?;
        if spec.backups == 0 || request.task >= spec.tasks {
            return Err(format!("{id} has no backups"));
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
        }
        let task = kind.build(&spec, request.task);
        task.became_backup(request.state).await;
        // Recorded only while the primary's claim stands: a primary that
        // was fenced cannot make a backup that would later take over.
        let coordinator = self.jobs.coordinator();
        let record = BackupRecord {
            primary_claim_epoch: request.primary_claim_epoch,
        };
        let txn = Txn::new()
            .when(coordinator.fence_epoch(&id, request.primary_claim_epoch))
            .and_then(TxnOp::Put(
                PutRequest::new(
                    self.jobs.keys().backup(&job, request.task, &self.name),
                    encode(&record),
                )
                .with_lease(lease),
            ));
        let response = coordinator
            .store()
            .txn(txn)
            .await
            .map_err(|error| error.to_string())?;
        if !response.succeeded {
            return Err(format!(
                "the claim {} of {id} is not current",
                request.primary_claim_epoch
            ));
        }
        let replica = Replica {
            task,
            primary_claim_epoch: request.primary_claim_epoch,
            recorded_at: response.revision,
            applied: tokio::sync::Mutex::new(request.sequence),
        };
        self.replicas
            .lock()
            .expect("not poisoned")
            .insert(id, Arc::new(replica));
        self.stats.backups_taken.fetch_add(1, Ordering::Relaxed);
        Ok(response.revision)
    }

    /// Apply a primary's next log entry to the backup held here.
    pub(crate) async fn apply_entry(&self, request: UpdateRequest) -> BackupReply {
        let refused = |refused: String| BackupReply {
            refused,
            recorded_at: 0,
        };
        let Ok(job) = JobName::new(request.job.clone()) else {
            return refused(format!("job name {:?} is invalid", request.job));
        };
        let id = graph_task_id(&job, request.task);
        let Some(replica) = self.replica(&id) else {
            return refused(format!("{} holds no backup of {id}", self.name));
        };
        let mut applied = replica.applied.lock().await;
        if replica.primary_claim_epoch != request.primary_claim_epoch {
            return refused(format!(
                "the backup here is of claim {}, not {}",
                replica.primary_claim_epoch, request.primary_claim_epoch
            ));
        }
        if request.sequence <= *applied {
            // A retry of an entry that arrived: applied once.
            return BackupReply::default();
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
        BackupReply::default()
    }

    fn replica(&self, id: &TaskId) -> Option<Arc<Replica>> {
        self.replicas.lock().expect("not poisoned").get(id).cloned()
    }

    /// This node's record of a backup of `id` was deleted at `revision`:
    /// the backup it recorded is over.
    pub(crate) fn backup_record_deleted(&self, id: &TaskId, revision: i64) {
        let mut replicas = self.replicas.lock().expect("not poisoned");
        let over = replicas
            .get(id)
            .is_some_and(|replica| replica.recorded_at < revision);
        if over {
            replicas.remove(id);
        }
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

/// A balancer that lets a lost primary's task go to the node holding its
/// backup: that node claims it at once; other nodes leave it for
/// [`TAKEOVER_GRACE`] while a live node holds a backup of it. Everything
/// else is the wrapped balancer's decision.
pub struct BackupBalancer {
    inner: Box<dyn Balancer>,
    node: Weak<NodeShared>,
    /// When this node first left each task to a backup.
    leaving: HashMap<TaskId, Instant>,
}

impl BackupBalancer {
    pub(crate) fn new(inner: Box<dyn Balancer>, node: Weak<NodeShared>) -> BackupBalancer {
        BackupBalancer {
            inner,
            node,
            leaving: HashMap::new(),
        }
    }
}

impl Balancer for BackupBalancer {
    fn can_claim(&mut self, task: &TaskId, group: &GroupName, view: &ClusterView) -> ClaimDecision {
        let Some(node) = self.node.upgrade() else {
            return self.inner.can_claim(task, group, view);
        };
        if parse_graph_task_id(task).is_none() {
            return self.inner.can_claim(task, group, view);
        }
        let records = node.view.backups(task);
        if records.contains_key(&node.name) && node.replica(task).is_some() {
            self.leaving.remove(task);
            return ClaimDecision::Claim;
        }
        let held_elsewhere = records
            .keys()
            .any(|holder| *holder != node.name && node.view.address(holder).is_some());
        if held_elsewhere {
            if self.leaving.len() > 100_000 {
                self.leaving
                    .retain(|_, since| since.elapsed() < TAKEOVER_GRACE * 2);
            }
            let since = *self
                .leaving
                .entry(task.clone())
                .or_insert_with(Instant::now);
            let left = TAKEOVER_GRACE.saturating_sub(since.elapsed());
            if !left.is_zero() {
                return ClaimDecision::Skip(left);
            }
        }
        self.leaving.remove(task);
        self.inner.can_claim(task, group, view)
    }

    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId> {
        self.inner.balance(view)
    }
}
