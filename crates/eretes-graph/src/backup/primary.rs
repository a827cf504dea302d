//! The primary's side: the update log, bringing backups up, and how a new
//! primary run begins (from its own backup, from another node's, or cold).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{decode, encode, NodeName, TaskId};
use eretes_store::{DeleteRequest, GetRequest, KeyRange, PutRequest, Txn, TxnOp};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{rank, Member, UpdateLog, CANDIDATE_BACKOFF, TRANSFER_TIMEOUT, UPDATE_PATIENCE};
use crate::handle::{RunShared, TaskHandle};
use crate::ids::JobName;
use crate::model::{BackupRecord, GraphTask};
use crate::node::NodeShared;
use crate::proto::{BackupRequest, HandoverRequest, UpdateRequest};
use crate::GraphError;

impl TaskHandle {
    /// Apply `entry` to this task (its `apply_update`) and to every live
    /// backup of it, in order with the entries before; returns once each
    /// backup has applied it. A backup that does not within
    /// [`UPDATE_PATIENCE`] is given up first (and replaced), so every
    /// backup left has every entry this call returned for, and one of them
    /// takes over with that state if the primary is lost.
    ///
    /// The job's `backups` is a target: with fewer live candidates (or
    /// while a lost backup is replaced) an entry is on fewer backups. In a
    /// job without backups it only applies the entry here. Fails with
    /// [`GraphError::RunEnded`] when the run has ended (before: nothing
    /// applied; during: the entry was applied here, perhaps not on every
    /// backup), and [`GraphError::Fenced`] when another run owns the task
    /// now.
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
        if !log.members.is_empty() {
            let request = UpdateRequest {
                job: run.job.to_string(),
                task: run.index,
                primary_claim_epoch: run.claim_epoch,
                sequence: log.sequence,
                entry: entry.to_vec(),
            };
            let sends = log.members.iter().map(|(node, member)| {
                let request = request.clone();
                async move { (node.clone(), send_update(run, node, member, request).await) }
            });
            let failed: Vec<NodeName> = futures::future::join_all(sends)
                .await
                .into_iter()
                .filter_map(|(node, applied)| (!applied).then_some(node))
                .collect();
            for node in failed {
                give_up(run, &node).await?;
                warn!(task = %run.id, %node, "gave a backup up: it did not apply an update");
                log.members.remove(&node);
            }
        }
        if run.ended.is_cancelled() {
            return Err(ended());
        }
        Ok(())
    }
}

/// Send one entry to one backup, retrying until it applied it, refused it,
/// its record vanished, or [`UPDATE_PATIENCE`] ran out. Whether it applied.
async fn send_update(
    run: &RunShared,
    node: &NodeName,
    member: &Member,
    request: UpdateRequest,
) -> bool {
    let give_up_at = Instant::now() + UPDATE_PATIENCE;
    let mut pause = Duration::from_millis(20);
    loop {
        let attempt = async {
            let mut client = run.node.client(&member.address)?;
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
        // A backup whose record is gone (its node died) is not waited for.
        // (One whose record the view has not seen yet still counts.)
        let view = &run.node.view;
        let seen = view.revision();
        let recorded = view.backups(&run.id).contains_key(node) || seen < member.recorded_at;
        if !recorded || Instant::now() + pause >= give_up_at {
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
    let mut pause = Duration::from_millis(50);
    loop {
        match delete_records(run, std::slice::from_ref(node)).await {
            Ok(()) => {
                run.node
                    .stats
                    .backups_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(GraphError::Store(error)) => {
                debug!(%error, task = %run.id, "cannot delete a backup's record yet; retrying")
            }
            Err(other) => return Err(other),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = run.ended.cancelled() => return Err(GraphError::RunEnded(run.id.to_string())),
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Keep `run`'s task backed up by its job's number of backups until the run
/// ends: bring up a new one whenever one is missing (a backup's node died,
/// one was given up, a node joined after a candidate was missing).
pub(crate) async fn keep_backups(run: Arc<RunShared>) {
    let mut placement = run.node.view.placement();
    loop {
        tokio::select! {
            () = run.ended.cancelled() => return,
            changed = placement.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(error) = place_backups(&run).await {
            debug!(%error, task = %run.id, "backups not complete yet");
        }
    }
}

/// One pass of [`keep_backups`] (also run once as a primary run starts,
/// before its task is told anything).
pub(crate) async fn place_backups(run: &Arc<RunShared>) -> Result<(), GraphError> {
    let wanted = run.spec.backups as usize;
    let node = &run.node;
    let mut log = run.log.lock().await;
    // The view's revision first, then its records: a record the view
    // applies in between is then never taken for a deleted one.
    let seen = node.view.revision();
    let records = node.view.backups(&run.id);
    // A member whose record is gone (its node died, or it was given up) is
    // no backup any more. (One whose record the view has not seen yet is.)
    log.members
        .retain(|member, state| records.contains_key(member) || seen < state.recorded_at);
    let now = Instant::now();
    log.failed.retain(|_, until| *until > now);
    if log.members.len() < wanted {
        let mut candidates: Vec<(NodeName, String)> = node
            .view
            .serving(&run.spec.group)
            .into_iter()
            .filter(|(name, _)| {
                *name != node.name
                    && !log.members.contains_key(name)
                    && !log.failed.contains_key(name)
            })
            .collect();
        candidates.sort_by_key(|(name, _)| rank(&run.id, name));
        for (candidate, address) in candidates {
            if log.members.len() >= wanted || run.ended.is_cancelled() {
                break;
            }
            let recorded = match transfer(run, &log, &address).await {
                Ok(lease) => record(run, &candidate, lease).await?,
                Err(error) => {
                    debug!(task = %run.id, %candidate, error, "could not make it a backup");
                    None
                }
            };
            match recorded {
                Some(recorded_at) => {
                    debug!(task = %run.id, backup = %candidate, "backup up");
                    log.members.insert(
                        candidate,
                        Member {
                            address,
                            recorded_at,
                        },
                    );
                }
                None => {
                    log.failed
                        .insert(candidate, Instant::now() + CANDIDATE_BACKOFF);
                }
            }
        }
    }
    // Records of earlier runs' backups that were not brought up again: end
    // them.
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

/// Hand the task's state to the node at `address`, making it a backup at
/// the log's current entry. The log is held, so no update comes between.
/// The lease its node is registered under.
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
    let reply = tokio::time::timeout(TRANSFER_TIMEOUT, client.backup(call))
        .await
        .map_err(|_| format!("no answer within {TRANSFER_TIMEOUT:?}"))?
        .map_err(|status| status.to_string())?
        .into_inner();
    if reply.refused.is_empty() {
        Ok(reply.lease)
    } else {
        Err(reply.refused)
    }
}

/// Record `node`'s backup of the run's task under `lease` (its node's),
/// fenced by the run's claim: the store revision that wrote it, or `None`
/// when it was not written (the lease is gone, say). A write whose outcome
/// is unknown is undone (retrying until the run ends), so a record never
/// stands for a backup the run does not count.
async fn record(run: &RunShared, node: &NodeName, lease: i64) -> Result<Option<i64>, GraphError> {
    let keys = run.node.jobs.keys();
    let coordinator = run.node.jobs.coordinator();
    let value = BackupRecord {
        primary_claim_epoch: run.claim_epoch,
    };
    let txn = Txn::new()
        .when(coordinator.fence_epoch(&run.id, run.claim_epoch))
        .and_then(TxnOp::Put(
            PutRequest::new(keys.backup(&run.job, run.index, node), encode(&value))
                .with_lease(lease),
        ));
    match coordinator.store().txn(txn).await {
        Ok(response) if response.succeeded => Ok(Some(response.revision)),
        Ok(_) => Err(GraphError::Fenced(run.id.to_string())),
        Err(error) => {
            debug!(%error, task = %run.id, %node, "a backup record's write failed; undoing it");
            give_up(run, node).await?;
            Ok(None)
        }
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

/// The job shut down: the run's backups are over (their nodes drop them
/// when their records go). Best effort: a record left behind goes with its
/// node's lease, or with the job.
pub(crate) async fn end_backups(run: &RunShared) {
    let members: Vec<NodeName> = run.log.lock().await.members.keys().cloned().collect();
    if !members.is_empty() {
        if let Err(error) = delete_records(run, &members).await {
            debug!(%error, task = %run.id, "the backups' records stay until their leases end");
        }
    }
}

/// How a run of a task with backups begins.
pub(crate) struct Start {
    /// This node's backup of the task, current with the last primary: it
    /// becomes the primary.
    pub promoted: Option<Arc<dyn GraphTask>>,
    /// Else, the state another node's backup handed over.
    pub handed_over: Option<Vec<u8>>,
}

impl NodeShared {
    /// At the start of a run (claim epoch `claim_epoch`) of task `id`: take
    /// this node's backup of it if it is current with the last primary (its
    /// record stands for the claim it was brought up by), else ask a
    /// recorded backup elsewhere to hand its state over; then delete every
    /// backup record of earlier runs, fenced by the new claim, before the
    /// task can update anything.
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
        let stored = coordinator
            .store()
            .get(GetRequest::new(KeyRange::prefix(prefix.clone())))
            .await?;
        let records: Vec<(NodeName, BackupRecord)> = stored
            .kvs
            .iter()
            .filter_map(|kv| {
                let node = NodeName::new(&kv.key[prefix.len()..]).ok()?;
                let record = decode::<BackupRecord>("backup", &kv.key, &kv.value).ok()?;
                Some((node, record))
            })
            .collect();
        let mut start = Start {
            promoted: None,
            handed_over: None,
        };
        if let Some(replica) = replica {
            // Waits for an entry being applied; none is applied after.
            let mut applied = replica.applied.lock().await;
            applied.1 = true;
            let recorded = records.iter().any(|(node, record)| {
                *node == self.name && record.primary_claim_epoch == replica.primary_claim_epoch
            });
            if recorded {
                start.promoted = Some(replica.task.clone());
            }
        }
        if start.promoted.is_none() {
            start.handed_over = self
                .ask_handover(job, index, id, claim_epoch, &records)
                .await;
        }
        if !stored.kvs.is_empty() {
            let mut txn = Txn::new().when(coordinator.fence_epoch(id, claim_epoch));
            for kv in &stored.kvs {
                txn = txn.and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::key(
                    kv.key.clone(),
                ))));
            }
            if !coordinator.store().txn(txn).await?.succeeded {
                return Err(GraphError::Fenced(id.to_string()));
            }
        }
        Ok(start)
    }

    /// Ask the recorded backups of the last primary (other nodes'), one
    /// after another, to hand their state over to this run; the first
    /// state given.
    async fn ask_handover(
        &self,
        job: &JobName,
        index: u32,
        id: &TaskId,
        claim_epoch: i64,
        records: &[(NodeName, BackupRecord)],
    ) -> Option<Vec<u8>> {
        let last = records
            .iter()
            .map(|(_, record)| record.primary_claim_epoch)
            .max()?;
        let mut holders: Vec<&NodeName> = records
            .iter()
            .filter(|(node, record)| *node != self.name && record.primary_claim_epoch == last)
            .map(|(node, _)| node)
            .collect();
        holders.sort_by_key(|node| super::rank(id, node));
        for holder in holders {
            let Some(address) = self.view.address(holder) else {
                continue;
            };
            let request = HandoverRequest {
                job: job.to_string(),
                task: index,
                claim_epoch,
                new_primary_node: self.name.to_string(),
                primary_claim_epoch: last,
            };
            let asked = async {
                let mut client = self.client(&address)?;
                let mut call = tonic::Request::new(request);
                call.set_timeout(TRANSFER_TIMEOUT);
                client
                    .handover(call)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| status.to_string())
            };
            match tokio::time::timeout(TRANSFER_TIMEOUT, asked).await {
                Ok(Ok(reply)) if reply.refused.is_empty() => {
                    debug!(task = %id, %holder, "a backup handed its state over");
                    return Some(reply.state);
                }
                Ok(Ok(reply)) => {
                    debug!(task = %id, %holder, refused = reply.refused, "no handover")
                }
                Ok(Err(error)) => debug!(task = %id, %holder, error, "no handover"),
                Err(_) => debug!(task = %id, %holder, "no handover in time"),
            }
        }
        None
    }
}
