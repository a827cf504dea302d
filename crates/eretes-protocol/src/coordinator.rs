//! The protocol operations, each one store transaction written once against
//! [`Store`], so every backend gets the same guarantees.

mod claims;
mod legacy;

use std::sync::Arc;

use eretes_store::{
    Compare, DeleteRequest, GetRequest, GetResponse, KeyRange, KeyValue, LeaseId, PutRequest,
    Revision, Store, StoreError, StoreExt, Txn, TxnOp, TxnOpResponse, WatchStream,
};
use serde_json::Value;

use crate::commands::NodeCommand;
use crate::error::ProtocolError;
use crate::ids::{GroupName, NodeName, TaskId};
use crate::keys::Namespace;
use crate::records::{
    decode, decode_node, decode_task, encode, encode_task, now_ms, MalformedValue, NodeRecord,
    Outcome, OwnerRecord, ResultRecord, RunRecord, TaskRecord, TaskSpec, MAX_RESULT_BYTES,
};

/// How many takeovers (claims after an owner that never released) a task
/// survives before it is parked as failed.
pub const DEFAULT_TAKEOVER_LIMIT: u32 = 5;

/// What a claimant saw of a task when it decided to claim it. The claim
/// transaction checks that nothing changed since.
///
/// It holds no task record: the claim reads the record in its own
/// transaction, at the revision it checks. So a node need not keep every
/// task's record (properties and all) in its view of the cluster, only what
/// a claim checks.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimBasis {
    /// The task's group (from its record as seen).
    pub group: GroupName,
    /// `mod_revision` of `tasks/<id>`.
    pub task_revision: Revision,
    /// `claims/<id>` (the run record) as seen: its mod revision (0 = absent) and value.
    pub run_revision: Revision,
    /// The run record seen (default when absent).
    pub run: RunRecord,
}

/// The most tasks one claim transaction carries. Each task adds three
/// compares, two writes and the read of its record, so a full batch stays
/// within etcd's default limit of 128 compares and 128 operations per
/// transaction.
pub const MAX_CLAIM_BATCH: usize = 32;

/// The most tasks [`Coordinator::submit_batch`] writes in one transaction.
/// Each task adds two compares (its task and its result absent), one write
/// and, for the failure branch, two reads: 64 stay within etcd's default
/// limit of 128 compares and 128 operations per branch.
pub const MAX_SUBMIT_BATCH: usize = 64;

/// The most runs one transaction ends. A completion adds one compare and
/// seven writes, so a full batch stays within etcd's default limit of 128.
pub const MAX_FINISH_BATCH: usize = 16;

/// How many transactions [`Coordinator::end_runs`] tries for one batch,
/// each without the runs the one before found fenced, before the runs left
/// are ended one by one.
const END_ATTEMPTS: usize = 3;

/// How a run ends, as [`Coordinator::end_run`] records it.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// The task is done with this result (retired; a result over
    /// [`MAX_RESULT_BYTES`] retires it as failed instead).
    Done(Value),
    /// The task failed for this reason (retired).
    Failed(String),
    /// The task was ended by a kill command (retired).
    Killed,
    /// The task goes back to the pool for any node to claim.
    Released,
}

/// One claim's checks and writes (and, for a claim that runs the task, the
/// read of its record, last).
struct ClaimPlan {
    compares: Vec<Compare>,
    writes: Vec<TxnOp>,
    /// The run record the claim writes.
    run: RunRecord,
    /// `Some(takeovers)` when the claim parks the task instead of running it.
    parked: Option<u32>,
}

fn not_owner(claim: &Claim) -> ProtocolError {
    ProtocolError::NotOwner {
        task: claim.task.to_string(),
        epoch: claim.epoch,
    }
}

/// A successful claim: this node owns the task at `epoch`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The task.
    pub task: TaskId,
    /// The fencing epoch: the store revision of the claim. Strictly larger than
    /// every earlier claim of this task; tasks claimed in one batch share it.
    pub epoch: Revision,
    /// The owner.
    pub node: NodeName,
    /// The task record.
    pub record: Arc<TaskRecord>,
    /// The run record written by the claim.
    pub run: RunRecord,
    /// Whether the claim took the task over from an owner that never
    /// released it (it died or lost its lease): a failover.
    pub takeover: bool,
}

/// The current state of a task's keys, read back when a claim lost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskKeys {
    /// `tasks/<id>`, if present.
    pub task: Option<KeyValue>,
    /// `owners/<id>`, if present.
    pub owner: Option<KeyValue>,
    /// `claims/<id>` (the run record), if present.
    pub run: Option<KeyValue>,
    /// The store's revision when the keys were read: a cache that has
    /// seen a change of them after it knows the read is older.
    pub revision: Revision,
}

/// What a claim attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// This node owns the task now.
    Claimed(Claim),
    /// The task had been taken over too often; it was retired as failed instead.
    Parked {
        /// The takeover count that crossed the limit.
        takeovers: u32,
    },
    /// Someone else changed the task first (claimed, deleted, resubmitted, or
    /// its run record moved on); here is what the keys hold now.
    Lost(TaskKeys),
}

/// The protocol bound to one store and namespace.
#[derive(Clone)]
pub struct Coordinator {
    store: Arc<dyn Store>,
    ns: Namespace,
    takeover_limit: u32,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("namespace", &self.ns.root())
            .field("takeover_limit", &self.takeover_limit)
            .finish()
    }
}

fn put(key: String, value: Vec<u8>) -> TxnOp {
    TxnOp::Put(PutRequest::new(key, value))
}

fn delete(key: String) -> TxnOp {
    TxnOp::Delete(DeleteRequest::new(KeyRange::Key(key)))
}

fn delete_prefix(prefix: String) -> TxnOp {
    TxnOp::Delete(DeleteRequest::new(KeyRange::prefix(prefix)))
}

pub(crate) fn get(key: String) -> TxnOp {
    TxnOp::Get(GetRequest::new(KeyRange::Key(key)))
}

/// The key-values of a Get response in a transaction (none for any other).
pub(crate) fn got_all(response: Option<&TxnOpResponse>) -> &[KeyValue] {
    match response {
        Some(TxnOpResponse::Get(get)) => get.kvs.as_slice(),
        _ => &[],
    }
}

/// The single key-value of a Get response in a transaction, if any.
fn got(response: Option<&TxnOpResponse>) -> Option<KeyValue> {
    got_all(response).first().cloned()
}

impl Coordinator {
    /// Bind the protocol to `store` under `ns`.
    pub fn new(store: Arc<dyn Store>, ns: Namespace) -> Self {
        Coordinator {
            store,
            ns,
            takeover_limit: DEFAULT_TAKEOVER_LIMIT,
        }
    }

    /// Park tasks after `limit` takeovers instead of [`DEFAULT_TAKEOVER_LIMIT`].
    pub fn with_takeover_limit(mut self, limit: u32) -> Self {
        self.takeover_limit = limit;
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Submit a task. Fails with [`ProtocolError::AlreadyExists`] if the id is
    /// pending, running or retired with a result, and then writes nothing.
    /// Returns the revision of the submission.
    pub async fn submit(&self, id: &TaskId, spec: &TaskSpec) -> Result<Revision, ProtocolError> {
        let value = encode_task(id, spec)?;
        let task_key = self.ns.task(id);
        let txn = Txn::new()
            .when(Compare::absent(task_key.clone()))
            .when(Compare::absent(self.ns.result(id)))
            .and_then(put(task_key, value));
        let response = self.store.txn(txn).await?;
        if response.succeeded {
            Ok(response.revision)
        } else {
            Err(ProtocolError::AlreadyExists(id.to_string()))
        }
    }

    /// Submit several tasks in one transaction: every one of them is
    /// written, at one revision, or none is. Fails with
    /// [`ProtocolError::InvalidBatch`] for an empty batch, one of more than
    /// [`MAX_SUBMIT_BATCH`] tasks or one that names an id twice, and with
    /// [`ProtocolError::AlreadyExists`] naming the first task of the batch
    /// that is pending, running or retired with a result; nothing is
    /// written then. Returns the revision of the submission.
    ///
    /// What it writes and checks per task is what [`Coordinator::submit`]
    /// does; a node sees the batch's tasks in one watch response, and can
    /// claim them together.
    pub async fn submit_batch(
        &self,
        tasks: &[(TaskId, TaskSpec)],
    ) -> Result<Revision, ProtocolError> {
        if tasks.is_empty() || tasks.len() > MAX_SUBMIT_BATCH {
            return Err(ProtocolError::InvalidBatch(format!(
                "{} tasks; a batch holds 1 to {MAX_SUBMIT_BATCH}",
                tasks.len()
            )));
        }
        let mut ids = std::collections::HashSet::with_capacity(tasks.len());
        if let Some((id, _)) = tasks.iter().find(|(id, _)| !ids.insert(id)) {
            return Err(ProtocolError::InvalidBatch(format!(
                "task {id} appears twice"
            )));
        }
        let mut txn = Txn::new();
        for (id, spec) in tasks {
            let value = encode_task(id, spec)?;
            let (task_key, result_key) = (self.ns.task(id), self.ns.result(id));
            txn = txn
                .when(Compare::absent(task_key.clone()))
                .when(Compare::absent(result_key.clone()))
                .and_then(put(task_key.clone(), value))
                // Read back only when a compare failed: which task it was.
                .or_else(get(task_key))
                .or_else(get(result_key));
        }
        let response = self.store.txn(txn).await?;
        if response.succeeded {
            return Ok(response.revision);
        }
        let mut reads = response.responses.iter();
        let taken = tasks.iter().find(|_| {
            let task = got(reads.next());
            let result = got(reads.next());
            task.is_some() || result.is_some()
        });
        // None found: the one that existed went between the compare and the
        // read, which one transaction does not allow; named as the batch.
        let id = taken.map_or_else(|| tasks[0].0.to_string(), |(id, _)| id.to_string());
        Err(ProtocolError::AlreadyExists(id))
    }

    /// Delete a task in whatever state it is, with its owner record, run
    /// record and result, in one revision. The owner's runtime sees the delete
    /// and stops the running instance. [`ProtocolError::NotFound`] if there was
    /// nothing to delete. Returns the revision of the delete.
    pub async fn delete(&self, id: &TaskId) -> Result<Revision, ProtocolError> {
        let response = self
            .store
            .txn(self.delete_every_key(Txn::new(), id))
            .await?;
        let deleted: i64 = response
            .responses
            .iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted,
                _ => 0,
            })
            .sum();
        if deleted == 0 {
            return Err(ProtocolError::NotFound(id.to_string()));
        }
        Ok(response.revision)
    }

    /// After a crash: if `name` is still registered under `lease` (the
    /// lease the crashed node held, as its embedding program recorded it),
    /// revoke that lease, which deletes the registration and every owner
    /// record under it at once, so the node's tasks move now and its name is
    /// free, instead of after the TTL. Only the caller knows the old node is
    /// dead (an agent knows it from its data directory's lock). True if a
    /// lease was revoked; a name held under another lease is left alone.
    pub async fn revoke_previous_registration(
        &self,
        name: &NodeName,
        lease: LeaseId,
    ) -> Result<bool, ProtocolError> {
        let registered = self.store.get_key(&self.ns.node(name)).await?;
        if lease == 0 || registered.is_none_or(|kv| kv.lease != lease) {
            return Ok(false);
        }
        match self.store.lease_revoke(lease).await {
            Ok(()) => Ok(true),
            Err(StoreError::LeaseNotFound(_)) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Register a live node under `lease`. A second live node with the same
    /// name is refused with [`ProtocolError::NameTaken`].
    pub async fn register_node(
        &self,
        name: &NodeName,
        record: &NodeRecord,
        lease: LeaseId,
    ) -> Result<(), ProtocolError> {
        let key = self.ns.node(name);
        let txn = Txn::new()
            .when(Compare::absent(key.clone()))
            .and_then(TxnOp::Put(
                PutRequest::new(key.clone(), encode(record)).with_lease(lease),
            ))
            .or_else(get(key.clone()));
        let response = self.store.txn(txn).await?;
        if response.succeeded {
            return Ok(());
        }
        let holder = got(response.responses.first());
        match holder.map(|kv| kv.lease) {
            Some(0) => Err(ProtocolError::NameHeldByGhost {
                name: name.to_string(),
                key,
            }),
            lease => Err(ProtocolError::NameTaken {
                name: name.to_string(),
                lease: lease.unwrap_or(0),
            }),
        }
    }

    /// `txn` with the deletes of every key kept under `id`: its task,
    /// owner, run and result records and its state machine. Shared by
    /// delete and by the expiry of ended tasks.
    pub(crate) fn delete_every_key(&self, txn: Txn, id: &TaskId) -> Txn {
        let txn = txn
            .and_then(delete(self.ns.task(id)))
            .and_then(delete(self.ns.owner(id)))
            .and_then(delete(self.ns.run(id)))
            .and_then(delete(self.ns.result(id)));
        self.forget_machine(id)
            .into_iter()
            .fold(txn, |txn, op| txn.and_then(op))
    }

    /// The deletes that remove a task's state machine: its state, its
    /// checkpoint and its queued commands. Part of every retirement and
    /// delete. The command queue's prefix ends with `/` and ids cannot hold
    /// `/`, so it reaches no other task's keys.
    pub(crate) fn forget_machine(&self, id: &TaskId) -> [TxnOp; 3] {
        [
            delete(self.ns.state(id)),
            delete(self.ns.checkpoint(id)),
            delete_prefix(self.ns.task_commands(id)),
        ]
    }

    /// The compare every fenced write uses: the owner record is the one this
    /// claim created. A stale owner (its lease expired, the task re-claimed or
    /// deleted) fails it.
    pub fn fence(&self, claim: &Claim) -> Compare {
        self.fence_epoch(&claim.task, claim.epoch)
    }

    /// [`Coordinator::fence`] for a task and epoch: the owner record of `id`
    /// was created at `epoch`.
    pub fn fence_epoch(&self, id: &TaskId, epoch: Revision) -> Compare {
        Compare::create_revision_is(self.ns.owner(id), epoch)
    }

    /// Give a task back cleanly so any node may claim it.
    pub async fn release(&self, claim: &Claim) -> Result<(), ProtocolError> {
        self.end_run(claim, RunEnd::Released).await
    }

    /// Retire a task: write its result and remove it, in one transaction
    /// fenced by the claim's epoch.
    /// A result larger than [`MAX_RESULT_BYTES`] retires the task as failed
    /// with a reason naming the size, since no store would accept it.
    pub async fn complete(&self, claim: &Claim, result: Value) -> Result<(), ProtocolError> {
        self.end_run(claim, RunEnd::Done(result)).await
    }

    /// Retire a task as failed with `reason`, fenced by the claim's epoch.
    pub async fn fail(&self, claim: &Claim, reason: String) -> Result<(), ProtocolError> {
        self.end_run(claim, RunEnd::Failed(reason)).await
    }

    /// Record how a run ended, in one transaction fenced by the claim's epoch.
    pub async fn end_run(&self, claim: &Claim, end: RunEnd) -> Result<(), ProtocolError> {
        let txn = Txn {
            compares: vec![self.fence(claim)],
            success: self.end_writes(claim, &end),
            failure: Vec::new(),
        };
        let response = self.store.txn(txn).await?;
        if response.succeeded {
            Ok(())
        } else {
            Err(not_owner(claim))
        }
    }

    /// End several runs in one transaction, every write fenced by its own
    /// claim's epoch. If any one of them is no longer owned, the
    /// transaction's failure branch has read every run's owner record: the
    /// runs found fenced fail with [`ProtocolError::NotOwner`] and the
    /// others go again together (at most [`END_ATTEMPTS`] transactions),
    /// then on their own, so a stale claim never blocks the others and
    /// costs the batch one more transaction, not one per run. At most
    /// [`MAX_FINISH_BATCH`] runs go into one transaction; larger batches are
    /// split. Results are in input order.
    pub async fn end_runs(&self, runs: &[(Claim, RunEnd)]) -> Vec<Result<(), ProtocolError>> {
        let mut results = Vec::with_capacity(runs.len());
        for chunk in runs.chunks(MAX_FINISH_BATCH) {
            results.extend(self.end_chunk(chunk).await);
        }
        results
    }

    async fn end_chunk(&self, runs: &[(Claim, RunEnd)]) -> Vec<Result<(), ProtocolError>> {
        let mut results: Vec<Option<Result<(), ProtocolError>>> = vec![None; runs.len()];
        let mut left: Vec<usize> = (0..runs.len()).collect();
        for _ in 0..END_ATTEMPTS {
            if left.len() < 2 {
                break;
            }
            let mut txn = Txn::new();
            for &index in &left {
                let (claim, end) = &runs[index];
                txn.compares.push(self.fence(claim));
                txn.success.extend(self.end_writes(claim, end));
                txn.failure.push(get(self.ns.owner(&claim.task)));
            }
            let outcome = match self.store.txn(txn).await {
                Ok(response) if response.succeeded => Ok(()),
                Ok(response) => {
                    let mut owners = response.responses.iter();
                    let before = left.len();
                    left.retain(|&index| {
                        let claim = &runs[index].0;
                        let owned = got(owners.next())
                            .is_some_and(|owner| owner.create_revision == claim.epoch);
                        if !owned {
                            results[index] = Some(Err(not_owner(claim)));
                        }
                        owned
                    });
                    if left.len() == before {
                        // Every fence held when read, yet one failed: not
                        // within one transaction; each run alone settles it.
                        break;
                    }
                    continue;
                }
                Err(error) => Err(ProtocolError::Store(error)),
            };
            for index in left.drain(..) {
                results[index] = Some(outcome.clone());
            }
        }
        let alone = futures::future::join_all(
            left.iter()
                .map(|&index| self.end_run(&runs[index].0, runs[index].1.clone())),
        )
        .await;
        for (index, result) in left.into_iter().zip(alone) {
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|result| result.expect("every run ended, fenced or failed"))
            .collect()
    }

    /// The writes that end a run (without the fence).
    fn end_writes(&self, claim: &Claim, end: &RunEnd) -> Vec<TxnOp> {
        let id = &claim.task;
        let (outcome, result, error) = match end {
            RunEnd::Released => {
                let run = RunRecord {
                    open: false,
                    ..claim.run.clone()
                };
                return vec![
                    delete(self.ns.owner(id)),
                    put(self.ns.run(id), encode(&run)),
                ];
            }
            RunEnd::Done(result) => {
                let size = serde_json::to_vec(result).map(|v| v.len()).unwrap_or(0);
                if size > MAX_RESULT_BYTES {
                    let reason = format!(
                        "the handler's result is {size} bytes; the limit is {MAX_RESULT_BYTES} bytes"
                    );
                    (Outcome::Failed, Value::Null, Some(reason))
                } else {
                    (Outcome::Done, result.clone(), None)
                }
            }
            RunEnd::Failed(reason) => (Outcome::Failed, Value::Null, Some(reason.clone())),
            RunEnd::Killed => (
                Outcome::Killed,
                Value::Null,
                Some("killed by a task command".to_string()),
            ),
        };
        let record = ResultRecord {
            outcome,
            result,
            error,
            spec: claim.record.spec.clone(),
            epoch: claim.epoch,
            node: claim.node.clone(),
            runs: RunRecord {
                open: false,
                ..claim.run.clone()
            },
            finished_at_ms: now_ms(),
        };
        let mut writes = vec![
            delete(self.ns.task(id)),
            delete(self.ns.owner(id)),
            delete(self.ns.run(id)),
            put(self.ns.result(id), encode(&record)),
        ];
        writes.extend(self.forget_machine(id));
        writes
    }

    /// Whether a live node (one whose registration's lease holds) is named
    /// `name`: one key read.
    pub async fn node_is_live(&self, name: &NodeName) -> Result<bool, ProtocolError> {
        let key = self.ns.node(name);
        Ok(self
            .store
            .get_key(&key)
            .await?
            .is_some_and(|kv| decode_node(&kv.key, &kv.value, kv.lease).is_ok()))
    }

    /// Queue a command for `node`. Commands are applied in the order they were
    /// queued, each once.
    pub async fn send_node_command(
        &self,
        node: &NodeName,
        command: &NodeCommand,
    ) -> Result<(), ProtocolError> {
        // The key's suffix only needs to be unique; order comes from the store revision.
        let key = format!(
            "{}{:016x}",
            self.ns.node_commands(node),
            rand::random::<u64>()
        );
        self.store
            .put(PutRequest::new(key, command.encode()))
            .await?;
        Ok(())
    }

    /// Take a queued command: read and delete its key in one transaction if
    /// it is still the one seen at `mod_revision`. Returns its value if this
    /// caller took it (and so must apply it), `None` if it was gone.
    pub async fn take_node_command(
        &self,
        key: &str,
        mod_revision: Revision,
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        let txn = Txn::new()
            .when(Compare::mod_revision_is(key, mod_revision))
            .and_then(get(key.to_string()))
            .and_then(delete(key.to_string()));
        let response = self.store.txn(txn).await?;
        if !response.succeeded {
            return Ok(None);
        }
        Ok(got(response.responses.first()).map(|kv| kv.value))
    }

    /// Everything in the namespace, with the revision of the read.
    pub async fn list_namespace(&self) -> Result<GetResponse, ProtocolError> {
        Ok(self.store.get_prefix(self.ns.root()).await?)
    }

    /// Watch the whole namespace from `revision` on.
    pub async fn watch_namespace(&self, revision: Revision) -> Result<WatchStream, ProtocolError> {
        Ok(self
            .store
            .watch(KeyRange::prefix(self.ns.root()), revision)
            .await?)
    }

    /// Read a task's terminal record, if it has one.
    pub async fn result(&self, id: &TaskId) -> Result<Option<ResultRecord>, ProtocolError> {
        let key = self.ns.result(id);
        match self.store.get_key(&key).await? {
            None => Ok(None),
            Some(kv) => decode("result", &key, &kv.value)
                .map(Some)
                .map_err(ProtocolError::Malformed),
        }
    }
}
