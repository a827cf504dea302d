//! The protocol side of the task state machine: task commands, the state
//! record and checkpoints. Every write an owner makes is fenced by its epoch
//! ([`Coordinator::fence_epoch`]), so an owner that lost the task cannot
//! change its state or checkpoint.

use eretes_store::{
    Compare, DeleteRequest, GetRequest, KeyRange, KeyValue, PutRequest, Revision, StoreExt, Txn,
    TxnOp,
};

use crate::coordinator::{get, got_all, Coordinator};
use crate::error::ProtocolError;
use crate::ids::TaskId;
use crate::machine::{StateRecord, TaskCommand, MAX_CHECKPOINT_BYTES};
use crate::records::{decode, encode, MalformedValue};

/// One command waiting in a task's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedCommand {
    /// Its key; deleting it takes the command.
    pub key: String,
    /// When it was queued (its create revision): the queue's order.
    pub revision: Revision,
    /// The command, or why it could not be decoded (it is discarded then).
    pub command: Result<TaskCommand, ProtocolError>,
}

/// What a task's state machine starts a run with, read in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineLoad {
    /// The persisted state; runnable when none was written. A record that
    /// does not decode is reported so the caller can log and replace it.
    pub state: Result<StateRecord, MalformedValue>,
    /// The latest checkpoint.
    pub checkpoint: Option<Vec<u8>>,
    /// Commands queued for the task, oldest first.
    pub commands: Vec<QueuedCommand>,
}

/// Queued commands from a listing of one task's queue, oldest first.
fn queued(kvs: &[KeyValue]) -> Vec<QueuedCommand> {
    let mut commands: Vec<QueuedCommand> = kvs
        .iter()
        .map(|kv| QueuedCommand {
            key: kv.key.clone(),
            revision: kv.create_revision,
            command: TaskCommand::decode(&kv.value),
        })
        .collect();
    commands.sort_by(|a, b| (a.revision, &a.key).cmp(&(b.revision, &b.key)));
    commands
}

impl Coordinator {
    /// Queue `command` for task `id`. The task must exist and not have
    /// ended ([`ProtocolError::NotFound`], [`ProtocolError::TaskEnded`]);
    /// both are checked in the transaction that queues it. Returns the
    /// revision that orders it among the task's commands.
    pub async fn send_task_command(
        &self,
        id: &TaskId,
        command: &TaskCommand,
    ) -> Result<Revision, ProtocolError> {
        let ns = self.namespace();
        // The suffix only needs to be unique; order comes from the revision.
        let key = format!("{}{:016x}", ns.task_commands(id), rand::random::<u64>());
        let txn = Txn::new()
            .when(Compare::present(ns.task(id)))
            .and_then(TxnOp::Put(PutRequest::new(key, command.encode())))
            .or_else(get(ns.result(id)));
        let response = self.store().txn(txn).await?;
        if response.succeeded {
            return Ok(response.revision);
        }
        if got_all(response.responses.first()).is_empty() {
            Err(ProtocolError::NotFound(id.to_string()))
        } else {
            Err(ProtocolError::TaskEnded(id.to_string()))
        }
    }

    /// Read a task's state, checkpoint and queued commands in one
    /// transaction (one revision).
    pub async fn load_machine(&self, id: &TaskId) -> Result<MachineLoad, ProtocolError> {
        let ns = self.namespace();
        let txn = Txn::new()
            .and_then(get(ns.state(id)))
            .and_then(get(ns.checkpoint(id)))
            .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(
                ns.task_commands(id),
            ))));
        let response = self.store().txn(txn).await?;
        let state = match got_all(response.responses.first()).first() {
            None => Ok(StateRecord::default()),
            Some(kv) => decode::<StateRecord>("state", &kv.key, &kv.value),
        };
        let checkpoint = got_all(response.responses.get(1))
            .first()
            .map(|kv| kv.value.clone());
        Ok(MachineLoad {
            state,
            checkpoint,
            commands: queued(got_all(response.responses.get(2))),
        })
    }

    /// The commands queued for task `id`, oldest first.
    pub async fn task_commands(&self, id: &TaskId) -> Result<Vec<QueuedCommand>, ProtocolError> {
        let listing = self
            .store()
            .get(GetRequest::new(KeyRange::prefix(
                self.namespace().task_commands(id),
            )))
            .await?;
        Ok(queued(&listing.kvs))
    }

    /// Write task `id`'s state as its owner at `epoch`, and take the command
    /// at `applied` (delete it) in the same transaction, so a command is
    /// applied exactly once: if the owner dies before this commits, the next
    /// owner finds it still queued; after, it finds the state it led to.
    /// [`ProtocolError::NotOwner`] if `epoch` is no longer the owner's.
    pub async fn write_state(
        &self,
        id: &TaskId,
        epoch: Revision,
        record: &StateRecord,
        applied: Option<&str>,
    ) -> Result<(), ProtocolError> {
        let mut txn = Txn::new()
            .when(self.fence_epoch(id, epoch))
            .and_then(TxnOp::Put(PutRequest::new(
                self.namespace().state(id),
                encode(record),
            )));
        if let Some(key) = applied {
            txn = txn.and_then(TxnOp::Delete(DeleteRequest::new(KeyRange::Key(
                key.to_string(),
            ))));
        }
        self.fenced(txn, id, epoch).await
    }

    /// Save task `id`'s checkpoint as its owner at `epoch`, replacing the
    /// previous one. At most [`MAX_CHECKPOINT_BYTES`]
    /// ([`ProtocolError::CheckpointTooLarge`], nothing written);
    /// [`ProtocolError::NotOwner`] if `epoch` is no longer the owner's.
    pub async fn save_checkpoint(
        &self,
        id: &TaskId,
        epoch: Revision,
        checkpoint: &[u8],
    ) -> Result<(), ProtocolError> {
        if checkpoint.len() > MAX_CHECKPOINT_BYTES {
            return Err(ProtocolError::CheckpointTooLarge {
                size: checkpoint.len(),
                limit: MAX_CHECKPOINT_BYTES,
            });
        }
        let txn = Txn::new()
            .when(self.fence_epoch(id, epoch))
            .and_then(TxnOp::Put(PutRequest::new(
                self.namespace().checkpoint(id),
                checkpoint.to_vec(),
            )));
        self.fenced(txn, id, epoch).await
    }

    /// Task `id`'s latest checkpoint, if it saved one.
    pub async fn checkpoint(&self, id: &TaskId) -> Result<Option<Vec<u8>>, ProtocolError> {
        let key = self.namespace().checkpoint(id);
        Ok(self.store().get_key(&key).await?.map(|kv| kv.value))
    }

    async fn fenced(&self, txn: Txn, id: &TaskId, epoch: Revision) -> Result<(), ProtocolError> {
        if self.store().txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(ProtocolError::NotOwner {
                task: id.to_string(),
                epoch,
            })
        }
    }
}
