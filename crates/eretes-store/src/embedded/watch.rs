//! Watches of the embedded store: the events of each revision as the
//! history keeps them, the queue a writer shares with each watch stream, and
//! the stream that turns queued revisions into batches.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use arcstr::ArcStr;
use futures::task::AtomicWaker;
use futures::Stream;
use parking_lot::Mutex;

use super::{key_value, Entry, MAX_BATCH_EVENTS};
use crate::error::{StoreError, StoreResult};
use crate::types::*;

/// One event as the history keeps it: the key and the versions before and
/// after, all shared with the live map.
pub(super) struct StoredEvent {
    pub(super) key: ArcStr,
    /// The new version; `None` for a delete.
    pub(super) current: Option<Entry>,
    pub(super) previous: Option<Entry>,
}

/// The events of one revision, shared between the history and every watcher.
pub(super) struct RevisionEvents {
    pub(super) revision: Revision,
    /// When it was made (the system's clock: the age limit is real time).
    pub(super) made: std::time::Instant,
    /// Exactly as long as needed: history holds thousands of these, and a
    /// growing `Vec` would keep up to four events' room for one event.
    pub(super) events: Box<[StoredEvent]>,
}

impl RevisionEvents {
    pub(super) fn touches(&self, range: &KeyRange) -> bool {
        self.events.iter().any(|e| range.contains(&e.key))
    }

    /// The public form of one of this revision's events.
    pub(super) fn watch_event(&self, event: &StoredEvent) -> WatchEvent {
        let (kind, kv) = match &event.current {
            Some(entry) => (EventKind::Put, key_value(&event.key, entry)),
            // etcd's delete event: only the key and the deleting revision.
            None => (
                EventKind::Delete,
                KeyValue {
                    key: event.key.to_string(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: self.revision,
                    version: 0,
                    lease: 0,
                },
            ),
        };
        WatchEvent {
            kind,
            kv,
            prev_kv: event.previous.as_ref().map(|e| key_value(&event.key, e)),
        }
    }
}

/// A registered watch.
pub(super) struct Watcher {
    pub(super) range: KeyRange,
    /// Events of earlier revisions are not for this watcher (only differs
    /// from "everything from now on" when the watch started in the future).
    pub(super) min_revision: Revision,
    pub(super) shared: Arc<WatchShared>,
}

impl Drop for Watcher {
    /// Unregistered (its stream is gone) or the store is dropped: tell the
    /// stream, which ends with [`StoreError::Closed`] once it has drained.
    fn drop(&mut self) {
        self.shared.queue.lock().store_gone = true;
        self.shared.waker.wake();
    }
}

/// What a writer and one watch stream share: an unbounded queue of revisions
/// and the stream's waker.
///
/// Not a tokio channel because a channel wakes the receiver inside `send`,
/// i.e. under the store lock, and on a multi-thread runtime a wake may be a
/// futex syscall. Here writers enqueue under the store lock (which keeps
/// revisions in order) and take the waker, and the wake happens after the
/// store lock is released. A stream that has not polled since its last wake
/// has no waker registered, so a burst of writes wakes it once.
pub(super) struct WatchShared {
    pub(super) queue: Mutex<WatchQueue>,
    pub(super) waker: AtomicWaker,
    /// Set when the stream is dropped; the writer unregisters it lazily.
    pub(super) stream_gone: AtomicBool,
}

pub(super) struct WatchQueue {
    pub(super) revisions: VecDeque<Arc<RevisionEvents>>,
    pub(super) store_gone: bool,
}

/// The stream of one watch: the replayed history first, then live batches.
pub(super) struct EmbeddedWatch {
    pub(super) range: KeyRange,
    /// Revisions taken from the shared queue (initially: the replay), not yet
    /// turned into items. Swapped with the shared queue wholesale so that
    /// both keep their capacity and the queue lock is held only for a swap.
    pub(super) pending: VecDeque<Arc<RevisionEvents>>,
    pub(super) shared: Arc<WatchShared>,
    pub(super) done: bool,
}

impl EmbeddedWatch {
    /// Move whatever is queued into `pending`; `Err(())` if nothing is and
    /// the store is gone.
    fn refill(&mut self) -> Result<(), ()> {
        let mut queue = self.shared.queue.lock();
        if queue.revisions.is_empty() {
            return if queue.store_gone { Err(()) } else { Ok(()) };
        }
        std::mem::swap(&mut queue.revisions, &mut self.pending);
        Ok(())
    }
}

impl Drop for EmbeddedWatch {
    fn drop(&mut self) {
        self.shared.stream_gone.store(true, Ordering::Release);
    }
}

impl Stream for EmbeddedWatch {
    type Item = StoreResult<WatchBatch>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.pending.is_empty() {
                let mut refilled = this.refill();
                if refilled.is_ok() && this.pending.is_empty() {
                    // Register, then look again: a writer enqueues before it
                    // takes the waker, so nothing can slip in between.
                    this.shared.waker.register(cx.waker());
                    refilled = this.refill();
                }
                if refilled.is_err() {
                    // The store was dropped: the watch cannot continue.
                    this.done = true;
                    return Poll::Ready(Some(Err(StoreError::Closed)));
                }
                if this.pending.is_empty() {
                    return Poll::Pending;
                }
            }
            // Coalesce the pending revisions into one item, up to the cap.
            let mut capacity = 0;
            for revision in &this.pending {
                capacity += revision.events.len();
                if capacity >= MAX_BATCH_EVENTS {
                    break;
                }
            }
            let mut batch = Vec::with_capacity(capacity);
            while batch.len() < MAX_BATCH_EVENTS {
                let Some(revision) = this.pending.pop_front() else {
                    break;
                };
                let range = &this.range;
                batch.extend(
                    revision
                        .events
                        .iter()
                        .filter(|e| range.contains(&e.key))
                        .map(|e| revision.watch_event(e)),
                );
            }
            // Only revisions touching the range are queued, so this is
            // non-empty; the loop is a guard against an empty item.
            if !batch.is_empty() {
                return Poll::Ready(Some(Ok(batch)));
            }
        }
    }
}
