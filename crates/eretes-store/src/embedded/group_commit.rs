//! Group commit: the writes of a durable store queue up, and one committer
//! at a time takes every write waiting, applies each at its own revision,
//! writes them to the journal in one transaction (one fsync for all), and
//! only then publishes them to watchers and answers each caller, in order.
//! A write that finds no committer commits itself at once, on its own task
//! (as every write did before: no hand-over, so a lone write is as fast),
//! taking along whatever queued meanwhile; writes that queue while it runs
//! are committed after it by a committer on tokio's blocking pool (where
//! paused test time does not run ahead of it), or by this caller when there
//! is no runtime; a committer the pool drops unrun (the runtime shuts down)
//! commits them where it is dropped.
//!
//! While one group's fsync runs, the next group gathers; so under
//! concurrent writers the fsyncs per second stay about the same while the
//! writes per second grow with the writers. For a caller, a write is on
//! disk before it is answered or seen, as before, and a write the journal
//! cannot take is not applied. When the journal fails a group, every write
//! of the group is undone (last first) and each caller gets the error: a
//! later write of the group may have read an earlier one, so none of them
//! stands. One thing is new: a caller that stops waiting (its future
//! dropped) after its write queued may still have it committed, as with
//! etcd.
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

/// The answers of a committed group, sent once the store is let go of (so
/// that a caller that drops its store on its answer can reopen the file).
type Answers = Vec<(oneshot::Sender<StoreResult<Written>>, StoreResult<Written>)>;

fn send(answers: Answers) {
    for (answer, outcome) in answers {
        let _ = answer.send(outcome);
    }
}

/// The committer of the writes that queued while a write committed
/// itself, on tokio's blocking pool. If the pool drops it without running
/// it (the runtime shuts down), it commits them where it is dropped, so no
/// write waits for ever.
struct Committer {
    store: Weak<EmbeddedStore>,
    ran: bool,
}

impl Committer {
    /// Commit groups until none is waiting; holds the store only while it
    /// commits one.
    fn run(mut self) {
        self.ran = true;
        loop {
            let Some(store) = self.store.upgrade() else {
                return;
            };
            let Some((answers, more)) = store.commit_next_group() else {
                return;
            };
            drop(store);
            send(answers);
            if !more {
                return;
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if !self.ran {
            self.ran = true;
            let committer = Committer {
                store: self.store.clone(),
                ran: false,
            };
            committer.run();
        }
    }
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
        if start {
            if let Some((answers, more)) = self.commit_next_group() {
                send(answers);
                if more {
                    // Ours is committed; others queued meanwhile: theirs
                    // go on, off this task.
                    let committer = Committer {
                        store: self.me.clone(),
                        ran: false,
                    };
                    match tokio::runtime::Handle::try_current() {
                        Ok(runtime) => {
                            runtime.spawn_blocking(move || committer.run());
                        }
                        // No runtime (a store used from plain threads):
                        // this caller commits them.
                        Err(_) => committer.run(),
                    }
                }
            }
        }
        answered.await.map_err(|_| StoreError::Closed)?
    }

    /// Commit the next group of waiting writes: its answers (to send), and
    /// whether more wait (the committer goes on) or not (it stopped); `None`
    /// when none waited. A panic while committing answers the group's
    /// writes with an error (their senders dropped) and stops the
    /// committer cleanly, so later writes are not stuck behind it.
    fn commit_next_group(&self) -> Option<(Answers, bool)> {
        let writer = self.writer.get()?;
        let group = writer.next_group()?;
        let committed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit_group(group)));
        let answers = committed.unwrap_or_else(|_| {
            tracing::error!("committing a group of writes panicked; its writes failed");
            Vec::new()
        });
        let mut queue = writer.queue.lock();
        let more = !queue.waiting.is_empty();
        queue.committing = more;
        Some((answers, more))
    }

    /// Apply the writes of `group` in order, each at its own revision; write
    /// them to the journal at once; then publish them; their answers (or,
    /// if the journal failed, undo them all and answer each with its error).
    fn commit_group(&self, group: Vec<Waiting>) -> Answers {
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
            return answers;
        }
        let last = state.revision;
        let recorded = {
            let state = &mut *state;
            let events: Vec<&[StoredEvent]> = revisions.iter().map(|(_, e)| e.as_slice()).collect();
            match &mut state.journal {
                // A panic in the journal (redb) fails the group like an
                // error: it is undone below, never left half-applied.
                Some(journal) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    journal.record(last, &events, &state.kvs)
                }))
                .unwrap_or_else(|_| Err("the journal write panicked".to_string())),
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
        answers
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
