//! The embedded backend: an in-process store with etcd v3's exact semantics.
//!
//! This is a real backend (the single-node agent runs on it), not a test stub.
//! Everything lives behind one mutex: the keys in a `BTreeMap` (so prefix reads
//! are ordered range scans), the watch history in a `VecDeque` of per-revision
//! event batches, the leases and the watchers. Every operation takes the lock
//! once, does its work synchronously and releases it; nothing awaits while
//! holding it.
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so tests that run with
//! `#[tokio::test(start_paused = true)]` expire leases deterministically: a
//! background task sleeps until the earliest lease deadline (letting paused
//! time auto-advance) and every operation also expires overdue leases first,
//! so no caller can observe a lease after its deadline even if the background
//! task has not run yet.
//!
//! Watch fan-out is cheap: the events of one revision are built once into an
//! `Arc`, stored in the history and queued (as an `Arc` clone) for every
//! watcher whose range they touch; watchers are woken after the lock is
//! released. Keys and values are reference-counted and shared between the
//! live map, the lease index and the history, so retained history costs a
//! few words per event rather than copies of keys and values. Each watch
//! stream filters the events of its range and copies them out on
//! its own task, outside the lock, coalescing whatever revisions are queued
//! into one item. Queues are unbounded: a watcher that never polls holds on
//! to every revision queued for it (as etcd buffers for a slow watcher).
//!
//! The live map's gets, puts, deletes and compares are in `embedded/kv.rs`.
//!
//! A durable store ([`EmbeddedStore::open_durable`]) writes every revision
//! to its journal (`embedded/journal.rs`) before anyone sees it. When the
//! journal cannot (a full disk), a client's write is undone and refused and
//! everything else goes on (`embedded/write_failure.rs`) until the journal
//! writes again.

mod group_commit;
mod journal;
mod kv;
mod watch;
mod write_failure;

use group_commit::{Write, Written};
use watch::{EmbeddedWatch, RevisionEvents, StoredEvent, WatchQueue, WatchShared, Watcher};

use arcstr::ArcStr;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::ops::{Bound, Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::Duration;

use async_trait::async_trait;
use futures::task::AtomicWaker;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{StoreError, StoreResult};
use crate::store::{Store, WatchStream};
use crate::types::*;
use crate::validate::{check_key, check_range, check_txn, invalid};

/// Default number of revisions of watch history the store keeps. Every
/// watcher of an embedded store lives in the same process and keeps up, so a
/// short history suffices; one that falls further behind gets
/// [`StoreError::Compacted`] and re-lists.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;

/// Default age past which a revision leaves the watch history (the latest
/// revision always stays). The history is for watches that start from a
/// past revision — a snapshot's, read a moment before — not a log: kept
/// until 10,000 newer revisions push it out, an idle store would hold on
/// to every value deleted before it went idle. A minute leaves a reader
/// that takes long to build from its snapshot (a huge namespace on a slow
/// host) ample time to start its watch.
pub const DEFAULT_HISTORY_AGE: Duration = Duration::from_secs(60);

/// etcd's default limit on compares / operations per branch of a transaction.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// Upper bound on the events one watch stream item carries when several
/// revisions are ready at once; keeps a long replay from becoming one huge
/// allocation while still amortising per-item overhead for busy watchers.
const MAX_BATCH_EVENTS: usize = 1024;

/// The shortest time between two attempts of a durable store to reopen its
/// file after a failed write ([`EmbeddedStore::write_failure`]); writes in
/// between fail at once with the last error. Reopening repairs the file,
/// which reads all of it, under the store's lock: done at most this often it
/// costs reads little while the disk stays full, and writes work again this
/// soon after space returns. (Measured on the system's clock, not tokio's.)
pub const JOURNAL_REOPEN_INTERVAL: Duration = Duration::from_millis(500);

/// Tuning knobs of an [`EmbeddedStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// How many past revisions of watch history to keep. Older history is
    /// compacted automatically after every write, exactly as if
    /// [`Store::compact`] had been called with `current - history_limit + 1`;
    /// watches from before that point fail with [`StoreError::Compacted`].
    /// Values below 1 are treated as 1. Default: [`DEFAULT_HISTORY_LIMIT`].
    pub history_limit: usize,
    /// How long a revision stays in the watch history at most (the latest
    /// always stays), checked at every write and lease renewal; older ones
    /// are compacted as above. Default: [`DEFAULT_HISTORY_AGE`].
    pub history_age: Duration,
    /// The most compares, or operations per branch, one transaction may have
    /// (etcd's `--max-txn-ops`, default [`DEFAULT_MAX_TXN_OPS`]); larger
    /// transactions fail with [`StoreError::InvalidArgument`], so code that
    /// passes on the embedded store does not fail on etcd.
    pub max_txn_ops: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_limit: DEFAULT_HISTORY_LIMIT,
            history_age: DEFAULT_HISTORY_AGE,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
        }
    }
}

impl EmbeddedOptions {
    /// Keep `limit` revisions of watch history.
    pub fn with_history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    /// Keep revisions in the watch history for at most `age`.
    pub fn with_history_age(mut self, age: Duration) -> Self {
        self.history_age = age;
        self
    }

    /// Allow at most `limit` compares and operations per branch in one txn.
    pub fn with_max_txn_ops(mut self, limit: usize) -> Self {
        self.max_txn_ops = limit;
        self
    }
}

/// The in-process store backend.
///
/// Constructed as an `Arc` ([`EmbeddedStore::new`]) so that it coerces
/// directly into `Arc<dyn Store>`:
///
/// ```
/// use std::sync::Arc;
/// use eretes_store::{embedded::EmbeddedStore, Store};
/// let store: Arc<dyn Store> = EmbeddedStore::new();
/// ```
///
/// Lease expiry runs on a background tokio task spawned by the first
/// [`Store::lease_grant`] (so constructing the store needs no runtime). The
/// task holds only a weak reference: dropping the last `Arc` stops it and
/// ends every open watch stream with [`StoreError::Closed`]. Without a tokio
/// runtime, leases still expire, but only when the next operation runs.
pub struct EmbeddedStore {
    state: Mutex<State>,
    max_txn_ops: usize,
    /// Wakes the expiry task when a lease with an earlier deadline appears or
    /// the store is dropped.
    wake_expiry: Arc<Notify>,
    /// A weak handle to ourselves, given to the expiry task.
    me: Weak<EmbeddedStore>,
    /// A durable store's queue of writes, committed together with one
    /// journal write (group commit).
    writer: std::sync::OnceLock<group_commit::Writer>,
}

/// One version of a key. Its value is shared, not copied, between the live
/// map and every history event that mentions it; a watch stream copies it
/// into a [`KeyValue`] only when it delivers the event.
#[derive(Clone)]
struct Entry {
    value: Arc<[u8]>,
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: LeaseId,
}

/// One live lease.
struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// Attached keys, ordered so that revocation deletes them in key order
    /// (etcd sorts them too).
    keys: BTreeSet<ArcStr>,
}

struct State {
    revision: Revision,
    /// The oldest revision watches may still start from; 0 until the first
    /// compaction (as etcd, a fresh store may be compacted to revision 1).
    compact_revision: Revision,
    history_limit: Revision,
    /// The longest a revision stays in `history` (the latest always stays).
    history_age: Duration,
    kvs: BTreeMap<ArcStr, Entry>,
    /// One entry per revision above `compact_revision - 1`, in order. Every
    /// revision wrote at least one event, so the deque is contiguous.
    history: VecDeque<Arc<RevisionEvents>>,
    watchers: Vec<Watcher>,
    /// History trimmed by the last operation, freed by the caller after the
    /// lock is released (freeing old events is the costly part of trimming).
    retired: Vec<Arc<RevisionEvents>>,
    /// Watch streams to wake once the lock is released.
    to_wake: Vec<Waker>,
    leases: HashMap<LeaseId, Lease>,
    /// Lease deadlines, earliest first. Entries go stale when a lease is
    /// renewed (its real deadline is later: re-queued on pop) or revoked
    /// (skipped on pop); each live lease has exactly one entry, which keeps
    /// keepalive O(1).
    deadlines: BinaryHeap<Reverse<(Instant, LeaseId)>>,
    next_lease_id: LeaseId,
    expiry_task: Option<JoinHandle<()>>,
    /// The durable journal every revision is written to, if the store is
    /// durable ([`EmbeddedStore::open_durable`]).
    journal: Option<journal::Journal>,
}

impl EmbeddedStore {
    /// An empty store (revision 1) with default options.
    pub fn new() -> Arc<EmbeddedStore> {
        Self::with_options(EmbeddedOptions::default())
    }

    /// An empty store (revision 1) with the given options.
    pub fn with_options(options: EmbeddedOptions) -> Arc<EmbeddedStore> {
        let history_limit = i64::try_from(options.history_limit.max(1)).unwrap_or(i64::MAX);
        let history_age = options.history_age;
        Arc::new_cyclic(|me| EmbeddedStore {
            state: Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                history_limit,
                history_age,
                kvs: BTreeMap::new(),
                history: VecDeque::new(),
                watchers: Vec::new(),
                retired: Vec::new(),
                to_wake: Vec::new(),
                leases: HashMap::new(),
                deadlines: BinaryHeap::new(),
                next_lease_id: 1,
                expiry_task: None,
                journal: None,
            }),
            wake_expiry: Arc::new(Notify::new()),
            me: me.clone(),
            max_txn_ops: options.max_txn_ops,
            writer: std::sync::OnceLock::new(),
        })
    }

    /// A durable store kept in the redb file at `path` (created if missing):
    /// every write is on disk before it is answered or seen by a watch, so it
    /// survives a crash or `kill -9` of the process.
    ///
    /// Reopened, the store has the keys and the revision it had. Leases do
    /// not survive (nobody renews them while the process is down), so keys
    /// that were under a lease are deleted at once, in one revision, as if
    /// their leases had expired; the watch history starts after the reopen
    /// (older revisions read as compacted). Only one store may have a file
    /// open at a time; a second gets an error naming the file.
    ///
    /// A write the file cannot take (disk full, file-size limit, I/O error)
    /// is not applied and fails with [`StoreError::Unavailable`], which
    /// names the file and the OS's reason; reads, watches and leases go on,
    /// and [`EmbeddedStore::write_failure`] says why writes fail. The store
    /// reopens the file and writes again by itself once it can (see
    /// [`JOURNAL_REOPEN_INTERVAL`]); no restart is needed.
    pub fn open_durable(path: &Path, options: EmbeddedOptions) -> StoreResult<Arc<EmbeddedStore>> {
        let (journal, loaded) = journal::Journal::open(path)?;
        let store = Self::with_options(options);
        {
            let mut state = store.lock();
            let mut leased = Vec::new();
            for (key, entry) in loaded.keys {
                state.next_lease_id = state.next_lease_id.max(entry.lease + 1);
                let key = ArcStr::from(key);
                if entry.lease != 0 {
                    leased.push(key.clone());
                }
                state.kvs.insert(key, entry);
            }
            state.revision = loaded.revision;
            // History before the reopen is gone, except for a new file, which
            // had none (a watch from revision 1 works there, as on etcd).
            let fresh = loaded.revision == 1 && state.kvs.is_empty();
            state.compact_revision = if fresh { 0 } else { loaded.revision + 1 };
            state.journal = Some(journal);
            let revision = state.revision + 1;
            let events = leased
                .into_iter()
                .filter_map(|key| {
                    let previous = state.kvs.remove(&key)?;
                    Some(StoredEvent {
                        key,
                        current: None,
                        previous: Some(previous),
                    })
                })
                .collect();
            // If this fails, the store opens all the same: reads work, and
            // the deletions are redone by the next open if no write
            // reaches the file before (see `commit_lease_deletes`).
            state.commit_lease_deletes(revision, events);
        }
        let _ = store.writer.set(group_commit::Writer::default());
        Ok(store)
    }

    /// The current revision, synchronously. (Not named `current_revision` so
    /// that it does not shadow the async [`crate::StoreExt::current_revision`].)
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// The oldest revision a watch may start from (0 if never compacted).
    pub fn compact_revision(&self) -> Revision {
        self.lock().compact_revision
    }

    /// How long a revision stays in the watch history at most
    /// ([`EmbeddedOptions::history_age`]).
    pub fn history_age(&self) -> Duration {
        self.lock().history_age
    }

    /// Drop, now, the watch history older than [`Self::history_age`] (the
    /// latest revision stays), as the next write or lease renewal would:
    /// for a caller that wants what it held freed at a time of its choosing
    /// (the agent, before it gives freed memory back to the system) rather
    /// than at a renewal that a long lease TTL may put minutes away.
    pub fn expire_history(&self) {
        self.lock().trim_old_history();
    }

    /// How many watchers are registered. A dropped watch stream is noticed
    /// (and unregistered) at the next write, so this may briefly count it.
    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// How many leases are alive.
    pub fn lease_count(&self) -> usize {
        self.lock().leases.len()
    }

    /// How many transactions a durable store's journal committed (each one
    /// fsync, carrying every write that waited for it); 0 for a store that
    /// is not durable.
    pub fn journal_commits(&self) -> u64 {
        self.lock()
            .journal
            .as_ref()
            .map_or(0, |journal| journal.commits)
    }

    /// How many keys are stored.
    pub fn key_count(&self) -> usize {
        self.lock().kvs.len()
    }

    /// Why writes fail, if the durable journal could not write the last
    /// revision it was given: its error, naming the file and the OS's
    /// reason (e.g. "No space left on device"). Set by the first write that
    /// fails, cleared by the next that succeeds; always `None` for a store
    /// that is not durable.
    ///
    /// While it is set, client writes fail with [`StoreError::Unavailable`]
    /// and are not applied; reads, watches and leases work as ever. When the
    /// journal may be reopened again (see [`JOURNAL_REOPEN_INTERVAL`]), this
    /// call first tries to write the current revision, so that a health
    /// check sees the journal recover even while no client writes.
    pub fn write_failure(&self) -> Option<String> {
        let mut state = self.lock();
        let state = &mut *state;
        let journal = state.journal.as_mut()?;
        journal.retry(state.revision, &state.kvs);
        journal.failure().map(str::to_string)
    }

    /// Take the lock and expire every lease whose deadline has passed, so that
    /// each operation sees leases exactly as the clock says, whether or not the
    /// background task has run yet.
    fn lock(&self) -> Locked<'_> {
        let mut state = self.state.lock();
        state.expire_due();
        Locked(Some(state))
    }

    /// Make sure the lease expiry task runs (it is spawned lazily, and again
    /// if the runtime it ran on has gone away).
    fn ensure_expiry_task(&self, state: &mut State) {
        if state.expiry_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            state.expiry_task =
                Some(handle.spawn(expiry_loop(self.me.clone(), Arc::clone(&self.wake_expiry))));
        }
    }
}

/// The state lock, which frees trimmed history only after unlocking.
struct Locked<'a>(Option<MutexGuard<'a, State>>);

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("guard present until drop")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("guard present until drop")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(mut state) = self.0.take() {
            let retired = std::mem::take(&mut state.retired);
            let to_wake = std::mem::take(&mut state.to_wake);
            drop(state);
            to_wake.into_iter().for_each(Waker::wake);
            drop(retired);
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The expiry task may be parked on the notify with no deadline; wake it
        // so that it notices the store is gone and exits.
        self.wake_expiry.notify_one();
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("EmbeddedStore")
            .field("revision", &state.revision)
            .field("compact_revision", &state.compact_revision)
            .field("keys", &state.kvs.len())
            .field("leases", &state.leases.len())
            .field("watchers", &state.watchers.len())
            .field("history", &state.history.len())
            .finish()
    }
}

/// Sleeps until the earliest lease deadline and expires due leases. Holds
/// only a weak reference so that dropping the store ends it.
async fn expiry_loop(store: Weak<EmbeddedStore>, wake: Arc<Notify>) {
    loop {
        let next_deadline = {
            let Some(store) = store.upgrade() else { return };
            // `lock()` expires everything due.
            let state = store.lock();
            state
                .deadlines
                .peek()
                .map(|Reverse((deadline, _))| *deadline)
        };
        match next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Now + `ttl`; a TTL too large for the clock means "practically never".
fn deadline_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn key_value(key: &str, entry: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: entry.value.to_vec(),
        create_revision: entry.create_revision,
        mod_revision: entry.mod_revision,
        version: entry.version,
        lease: entry.lease,
    }
}

impl State {
    /// Keys of `range` in key order.
    fn scan<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> impl Iterator<Item = (&'a ArcStr, &'a Entry)> + 'a {
        self.kvs
            .range::<str, _>((Bound::Included(range.start()), Bound::Unbounded))
            .take_while(move |(key, _)| range.contains(key))
    }

    fn expire_due(&mut self) {
        let Some(Reverse((earliest, _))) = self.deadlines.peek() else {
            return;
        };
        let now = Instant::now();
        if *earliest > now {
            return;
        }
        while let Some(&Reverse((deadline, id))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let Some(lease) = self.leases.get(&id) else {
                continue; // revoked earlier
            };
            if lease.deadline > now {
                // Renewed since this entry was queued.
                self.deadlines.push(Reverse((lease.deadline, id)));
            } else {
                self.revoke_lease(id);
            }
        }
    }

    /// Remove a lease and delete its keys in one revision. False if unknown.
    fn revoke_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        if lease.keys.is_empty() {
            return true;
        }
        let revision = self.revision + 1;
        let mut events = Vec::with_capacity(lease.keys.len());
        for key in lease.keys {
            if let Some(entry) = self.kvs.remove(&key) {
                debug_assert_eq!(entry.lease, id, "lease key index out of sync");
                events.push(StoredEvent {
                    key,
                    current: None,
                    previous: Some(entry),
                });
            }
        }
        self.commit_lease_deletes(revision, events);
        true
    }

    /// Make `revision` (= current + 1) with `events`, a client's write, the
    /// new current revision, or, if the journal cannot write it, undo it:
    /// the caller gets the journal's error and nobody saw the write (nothing
    /// was acknowledged or sent to a watcher yet). The current revision
    /// (unchanged if `events` is empty).
    fn commit(&mut self, revision: Revision, events: Vec<StoredEvent>) -> StoreResult<Revision> {
        if events.is_empty() {
            return Ok(self.revision);
        }
        if let Err(failure) = self.write_journal(revision, &events) {
            self.roll_back(events);
            return Err(StoreError::Unavailable(format!(
                "{failure}; the write was not applied"
            )));
        }
        Ok(self.publish(revision, events))
    }

    /// Make `revision` with `events` the current revision (journaled or
    /// not): fan it out to watchers and trim old history.
    fn publish(&mut self, revision: Revision, events: Vec<StoredEvent>) -> Revision {
        self.revision = revision;
        let batch = Arc::new(RevisionEvents {
            revision,
            made: std::time::Instant::now(),
            events: events.into_boxed_slice(),
        });
        let to_wake = &mut self.to_wake;
        self.watchers.retain(|watcher| {
            // Checked for every watcher, touched or not, so that dropped
            // watches of idle ranges do not pile up.
            if watcher.shared.stream_gone.load(Ordering::Acquire) {
                return false;
            }
            if revision >= watcher.min_revision && batch.touches(&watcher.range) {
                watcher
                    .shared
                    .queue
                    .lock()
                    .revisions
                    .push_back(Arc::clone(&batch));
                to_wake.extend(watcher.shared.waker.take());
            }
            true
        });
        self.history.push_back(batch);
        let floor = revision.saturating_sub(self.history_limit) + 1;
        if floor > self.compact_revision {
            self.compact_to(floor);
        }
        self.trim_old_history();
        revision
    }

    /// Compact away revisions older than the history's age limit, but the
    /// latest.
    fn trim_old_history(&mut self) {
        let now = std::time::Instant::now();
        let mut floor = None;
        for batch in self
            .history
            .iter()
            .take(self.history.len().saturating_sub(1))
        {
            if now.duration_since(batch.made) < self.history_age {
                break;
            }
            floor = Some(batch.revision + 1);
        }
        if let Some(floor) = floor.filter(|&floor| floor > self.compact_revision) {
            self.compact_to(floor);
        }
    }

    fn compact_to(&mut self, revision: Revision) {
        self.compact_revision = revision;
        while self.history.front().is_some_and(|b| b.revision < revision) {
            self.retired.extend(self.history.pop_front());
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        check_range(&request.range)?;
        let state = self.lock();
        Ok(state.get(&request, state.revision))
    }

    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        check_key(&request.key)?;
        match self.write(Write::Put(request)).await? {
            Written::Put(response) => Ok(response),
            _ => unreachable!("a put is answered as a put"),
        }
    }

    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        check_range(&request.range)?;
        match self.write(Write::Delete(request)).await? {
            Written::Delete(response) => Ok(response),
            _ => unreachable!("a delete is answered as a delete"),
        }
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        check_txn(&txn, self.max_txn_ops)?;
        match self.write(Write::Txn(txn)).await? {
            Written::Txn(response) => Ok(response),
            _ => unreachable!("a transaction is answered as one"),
        }
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        if ttl.is_zero() {
            return Err(invalid("lease TTL must be positive"));
        }
        let deadline = deadline_after(ttl);
        let mut state = self.lock();
        let id = state.next_lease_id;
        state.next_lease_id += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        let earliest = state
            .deadlines
            .peek()
            .is_none_or(|Reverse((first, _))| deadline < *first);
        state.deadlines.push(Reverse((deadline, id)));
        self.ensure_expiry_task(&mut state);
        drop(state);
        if earliest {
            self.wake_expiry.notify_one();
        }
        Ok(LeaseGrant { id, ttl })
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let mut state = self.lock();
        let entry = state
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        // Extending a deadline never needs to wake the expiry task: its stale
        // heap entry is re-queued when it comes due.
        entry.deadline = deadline_after(entry.ttl);
        let ttl = entry.ttl;
        // A renewal comes every few seconds whatever the writes do: the
        // history of an idle store ages out too.
        state.trim_old_history();
        Ok(ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        let mut state = self.lock();
        if state.revoke_lease(lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        check_range(&range)?;
        let mut state = self.lock();
        let next = state.revision + 1;
        let mut replay = VecDeque::new();
        if start_revision > 0 {
            if start_revision < state.compact_revision {
                return Err(StoreError::Compacted {
                    requested: start_revision,
                    compact_revision: state.compact_revision,
                });
            }
            // Under the same lock that registers the watcher below, so the
            // replay and the live events meet without gap or duplicate.
            let first = state
                .history
                .partition_point(|b| b.revision < start_revision);
            replay.extend(
                state
                    .history
                    .range(first..)
                    .filter(|b| b.touches(&range))
                    .cloned(),
            );
        }
        let shared = Arc::new(WatchShared {
            queue: Mutex::new(WatchQueue {
                revisions: VecDeque::new(),
                store_gone: false,
            }),
            waker: AtomicWaker::new(),
            stream_gone: AtomicBool::new(false),
        });
        state.watchers.push(Watcher {
            range: range.clone(),
            min_revision: start_revision.max(next),
            shared: Arc::clone(&shared),
        });
        drop(state);
        Ok(Box::pin(EmbeddedWatch {
            range,
            pending: replay,
            shared,
            done: false,
        }))
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        let mut state = self.lock();
        if revision > state.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: state.revision,
            });
        }
        if revision <= state.compact_revision {
            return Err(StoreError::Compacted {
                requested: revision,
                compact_revision: state.compact_revision,
            });
        }
        state.compact_to(revision);
        Ok(())
    }
}
