//! Group commit: the writes of a durable store queue up, and one committer
//! at a time takes every write waiting, applies each at its own revision,
//! writes them to the journal in one transaction (one fsync for all), and
//! only then publishes them to watchers and answers each caller, in order.
//! A write that finds no committer commits itself at once, on its own task
//! (as every write did before: no hand-over, so a lone write is as fast),
//! taking along whatever queued meanwhile; writes that queue while it runs
//! are committed after it by a committer on tokio's blocking pool (where
//! paused test time does not run ahead of it).
//!
//! While one group's fsync runs, the next group gathers; so under
//! concurrent writers the fsyncs per second stay about the same while the
//! writes per second grow with the writers. The fsync no longer runs on a
//! tokio worker either. Nothing changes for a caller: its write is on disk
//! before it is answered or seen, and a write the journal cannot take is
//! not applied. When the journal fails a group, every write of the group is
//! undone (last first) and each caller gets the error: a later write of the
//! group may have read an earlier one, so none of them stands.
//!
//! A store that is not durable applies each write at once, on the caller's
//! task, as before (nothing to wait for).

use std::sync::Weak;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{EmbeddedStore, State, StoredEvent};
use crate::error::{StoreError, StoreResult};
use crate::types::{
    DeleteRequest, DeleteResponse, PutRequest, PutResponse, Revision, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};

/// Most writes committed in one group.
const MAX_GROUP: usize = 1024;

/// A client's write.
pub(super) enum Write {
    Put(PutRequest),
    Delete(DeleteRequest),
    Txn(Txn),
}

/// Its answer.
pub(super) enum Written {
    Put(PutResponse),
    Delete(DeleteResponse),
    Txn(TxnResponse),
}

/// A write waiting for the writer thread, and where its answer goes.
struct Waiting {
    write: Write,
    answer: oneshot::Sender<StoreResult<Written>>,
}

/// A durable store's queue of writes.
#[derive(Default)]
pub(super) struct Writer {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Whether a committer runs (it takes what queues until none is left).
    committing: bool,
}

/// Commit groups of `store`'s writes until none is waiting.
fn commit_waiting(store: Weak<EmbeddedStore>) {
    let Some(store) = store.upgrade() else { return };
    while store.commit_next_group() {}
}

impl Writer {
    /// The next group to commit, if any write waits (else the committer
    /// stops).
    fn next_group(&self) -> Option<Vec<Waiting>> {
        let mut queue = self.queue.lock();
        if queue.waiting.is_empty() {
            queue.committing = false;
            return None;
        }
        let take = queue.waiting.len().min(MAX_GROUP);
        Some(queue.waiting.drain(..take).collect())
    }
}

impl EmbeddedStore {
    /// Apply `write`: through the writer thread for a durable store, at
    /// once otherwise.
    pub(super) async fn write(&self, write: Write) -> StoreResult<Written> {
        let Some(writer) = self.writer.get() else {
            let mut state = self.lock();
            let (written, revision, events) = state.apply(write)?;
            state.commit(revision, events)?;
            return Ok(written);
        };
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queue = writer.queue.lock();
            queue.waiting.push(Waiting { write, answer });
            !std::mem::replace(&mut queue.committing, true)
        };
        if start && self.commit_next_group() {
            // Ours is committed; others queued meanwhile: theirs go on.
            let store = self.me.clone();
            tokio::task::spawn_blocking(move || commit_waiting(store));
        }
        answered.await.map_err(|_| StoreError::Closed)?
    }

    /// Commit the next group of waiting writes; whether more wait (the
    /// committer goes on) or not (it stopped).
    fn commit_next_group(&self) -> bool {
        let Some(writer) = self.writer.get() else {
            return false;
        };
        let Some(group) = writer.next_group() else {
            return false;
        };
        self.commit_group(group);
        let mut queue = writer.queue.lock();
        if queue.waiting.is_empty() {
            queue.committing = false;
            false
        } else {
            true
        }
    }

    /// Apply the writes of `group` in order, each at its own revision; write
    /// them to the journal at once; then publish them and answer each (or,
    /// if the journal failed, undo them all and answer each with its error).
    fn commit_group(&self, group: Vec<Waiting>) {
        let mut state = self.lock();
        let before = state.revision;
        let mut answers = Vec::with_capacity(group.len());
        let mut revisions: Vec<(Revision, Vec<StoredEvent>)> = Vec::new();
        for Waiting { write, answer } in group {
            let outcome = state.apply(write).map(|(written, revision, events)| {
                if !events.is_empty() {
                    // Later writes of the group build on this one.
                    state.revision = revision;
                    revisions.push((revision, events));
                }
                written
            });
            answers.push((answer, outcome));
        }
        if revisions.is_empty() {
            drop(state);
            answers.into_iter().for_each(|(answer, outcome)| {
                let _ = answer.send(outcome);
            });
            return;
        }
        let last = state.revision;
        let recorded = {
            let state = &mut *state;
            let events: Vec<&[StoredEvent]> = revisions.iter().map(|(_, e)| e.as_slice()).collect();
            match &mut state.journal {
                Some(journal) => journal.record(last, &events, &state.kvs),
                None => Ok(()),
            }
        };
        match recorded {
            Ok(()) => {
                state.revision = before;
                for (revision, events) in revisions {
                    state.publish(revision, events);
                }
            }
            Err(failure) => {
                for (_, events) in revisions.into_iter().rev() {
                    state.roll_back(events);
                }
                state.revision = before;
                let failure = format!("{failure}; the write was not applied");
                for (_, outcome) in &mut answers {
                    if outcome.is_ok() {
                        *outcome = Err(StoreError::Unavailable(failure.clone()));
                    }
                }
            }
        }
        // Answered once the lock is released, and the watchers woken.
        drop(state);
        answers.into_iter().for_each(|(answer, outcome)| {
            let _ = answer.send(outcome);
        });
    }
}

impl State {
    /// Apply `write` to the keys at the next revision, without committing
    /// it: its answer, that revision, and its events (none if it changed
    /// nothing; then the revision is not used).
    fn apply(&mut self, write: Write) -> StoreResult<(Written, Revision, Vec<StoredEvent>)> {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        let written = match write {
            Write::Put(request) => {
                self.check_lease(request.lease)?;
                Written::Put(self.put(request, revision, &mut events))
            }
            Write::Delete(request) => {
                Written::Delete(self.delete(&request.range, request.prev_kv, revision, &mut events))
            }
            Write::Txn(txn) => Written::Txn(self.apply_txn(txn, revision, &mut events)?),
        };
        Ok((written, revision, events))
    }

    fn apply_txn(
        &mut self,
        txn: Txn,
        revision: Revision,
        events: &mut Vec<StoredEvent>,
    ) -> StoreResult<TxnResponse> {
        let succeeded = txn.compares.iter().all(|c| self.compare(c));
        let ops = if succeeded { txn.success } else { txn.failure };
        // Validate everything that can fail before the first write, so that
        // the transaction is all-or-nothing (etcd checks leases of the chosen
        // branch only).
        for op in &ops {
            if let TxnOp::Put(put) = op {
                self.check_lease(put.lease)?;
            }
        }
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                TxnOp::Get(get) => {
                    // A read after a write of this branch sees the new revision.
                    let seen = if events.is_empty() {
                        self.revision
                    } else {
                        revision
                    };
                    TxnOpResponse::Get(self.get(&get, seen))
                }
                TxnOp::Put(put) => TxnOpResponse::Put(self.put(put, revision, events)),
                TxnOp::Delete(delete) => TxnOpResponse::Delete(self.delete(
                    &delete.range,
                    delete.prev_kv,
                    revision,
                    events,
                )),
            });
        }
        Ok(TxnResponse {
            succeeded,
            revision: if events.is_empty() {
                self.revision
            } else {
                revision
            },
            responses,
        })
    }
}
