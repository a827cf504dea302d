//! The task list the API serves: a [`TaskIndex`] kept current by this
//! agent's own watch of the namespace, so that a page of `GET /v1/tasks`
//! costs O(page) however many tasks the namespace holds, and `/v1/nodes`
//! and `/metrics` count without reading every task.
//!
//! **Consistency.** A page reflects every submit and removal this agent
//! acknowledged before the request: the request waits until the watch has
//! delivered them (up to [`CATCH_UP`]). Changes made through other agents,
//! and nodes' claims and state changes, appear after the watch's delay
//! (milliseconds). While the index is loading, or after its watch broke and
//! until it has been read again, or when it is more than [`CATCH_UP`] behind,
//! requests read the store directly as before: correct, O(namespace). One
//! such read at a time: the requests that arrive while it is made share the
//! next one, so a burst of requests while a large index loads costs two reads
//! of the namespace, not one per request.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use eretes_protocol::{Coordinator, KeyKind, ProtocolError, TaskId, TaskIndex};
use eretes_store::{EventKind, Revision, StoreError, WatchEvent};
use futures::StreamExt;
use tokio::sync::{broadcast, watch};

use super::run_history::RunHistory;
use tracing::{debug, warn};

/// Longest a request waits for the watch to deliver this agent's own
/// acknowledged writes before it reads the store directly instead.
pub const CATCH_UP: Duration = Duration::from_secs(2);

/// What a read of the store for requests came to.
type StoreRead = Result<Arc<TaskIndex>, ProtocolError>;

/// First and longest pause before the index is read again after a failure.
const RELOAD_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Most task ids one [`TaskChanges`] names; a batch that touches more says
/// only that everything may have changed.
pub const MAX_CHANGED_IDS: usize = 200;

/// What one watch batch (or a reload) changed, for the dashboard's live
/// stream ([`LiveTasks::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskChanges {
    /// These tasks changed (at most [`MAX_CHANGED_IDS`]).
    Tasks(Arc<[TaskId]>),
    /// The index was loaded anew, or more tasks changed than are named:
    /// anything may differ.
    All,
}

/// The watch-kept task index and what the API needs to read it consistently.
pub struct LiveTasks {
    coordinator: Coordinator,
    /// The index, `None` while it is (re)loading.
    index: RwLock<Option<TaskIndex>>,
    /// The revision the index is at (0 while it is not usable).
    revision: watch::Sender<Revision>,
    /// The highest revision of a write this agent's API acknowledged.
    written: AtomicI64,
    /// Reads of the store made because the index was not current.
    store_reads: AtomicU64,
    /// The last such read (when it started, and what it read or how it
    /// failed), which the requests that asked before it started share; one
    /// read at a time.
    store_read: tokio::sync::Mutex<Option<(tokio::time::Instant, StoreRead)>>,
    /// The runs the watch saw start and end.
    runs: RunHistory,
    /// What each applied batch changed, for live views.
    changes: broadcast::Sender<TaskChanges>,
}

impl LiveTasks {
    /// Start keeping the index of `coordinator`'s namespace; the follower
    /// task ends when the returned value is dropped.
    pub fn start(coordinator: Coordinator) -> Arc<LiveTasks> {
        let live = Arc::new(LiveTasks {
            coordinator,
            index: RwLock::new(None),
            revision: watch::channel(0).0,
            written: AtomicI64::new(0),
            store_reads: AtomicU64::new(0),
            store_read: tokio::sync::Mutex::new(None),
            runs: RunHistory::default(),
            changes: broadcast::channel(1024).0,
        });
        tokio::spawn(follow(Arc::downgrade(&live)));
        live
    }

    /// Note a write the API acknowledged at `revision`: later reads wait
    /// for it.
    pub fn wrote(&self, revision: Revision) {
        self.written.fetch_max(revision, Ordering::AcqRel);
    }

    /// Run `read` on an index that holds every write this agent
    /// acknowledged: the live one once it has caught up (within
    /// [`CATCH_UP`]), else one read from the store now.
    pub async fn read<R>(&self, read: impl FnOnce(&TaskIndex) -> R) -> Result<R, ProtocolError> {
        let asked = tokio::time::Instant::now();
        let needed = self.written.load(Ordering::Acquire);
        let mut revision = self.revision.subscribe();
        // Wait while the index is loaded but behind; not while it is
        // loading (0). The watch's borrow is dropped at once: the follower
        // needs it.
        let caught_up = matches!(
            tokio::time::timeout(CATCH_UP, revision.wait_for(|&at| at == 0 || at >= needed)).await,
            Ok(Ok(at)) if *at > 0
        );
        if caught_up {
            let index = self.index.read().expect("not poisoned");
            // The follower may have dropped the index since; then read anew.
            if let Some(index) = index.as_ref().filter(|i| i.revision() >= needed) {
                let answer = read(index);
                // One made while the live index came back.
                self.forget_store_read();
                return Ok(answer);
            }
        }
        Ok(read(&*self.read_store(asked, needed).await?))
    }

    /// The namespace read from the store, for a request made at `asked`
    /// that needs the writes up to `needed`: a read that started after the
    /// request was made (as fresh as its own would be), else a new one.
    async fn read_store(
        &self,
        asked: tokio::time::Instant,
        needed: Revision,
    ) -> Result<Arc<TaskIndex>, ProtocolError> {
        let mut last = self.store_read.lock().await;
        if let Some((_, read)) = last.as_ref().filter(|(started, _)| *started >= asked) {
            match read {
                Ok(index) if index.revision() >= needed => return Ok(index.clone()),
                // A store that failed a read begun after this request was
                // made fails it too: the requests queued behind one read
                // do not each wait for the store's timeout in turn.
                Err(error) => return Err(error.clone()),
                Ok(_) => {}
            }
        }
        debug!(needed, "the task index is not current; reading the store");
        let started = tokio::time::Instant::now();
        self.store_reads.fetch_add(1, Ordering::Relaxed);
        let read = self.coordinator.read_index().await.map(Arc::new);
        *last = Some((started, read.clone()));
        read
    }

    /// Drop the last store read, once the live index serves requests again:
    /// it is of no more use (a request waiting for it has its own copy) and
    /// may be a large copy of the namespace. One still being made is not
    /// waited for; the next request the live index serves drops it.
    fn forget_store_read(&self) {
        if let Ok(mut last) = self.store_read.try_lock() {
            last.take();
        }
    }

    /// How many reads of the store were made because the index was
    /// loading, broken or behind (requests that came while one was made
    /// share the next).
    pub fn store_reads(&self) -> u64 {
        self.store_reads.load(Ordering::Relaxed)
    }

    /// The runs of the tasks this agent's watch saw start and end.
    pub fn runs(&self) -> &RunHistory {
        &self.runs
    }

    /// What later watch batches change, as they are applied. A receiver
    /// that falls behind gets `Lagged` and should treat it as
    /// [`TaskChanges::All`].
    pub fn subscribe(&self) -> broadcast::Receiver<TaskChanges> {
        self.changes.subscribe()
    }

    fn publish(&self, index: Option<TaskIndex>) {
        let revision = index.as_ref().map_or(0, TaskIndex::revision);
        if revision > 0 {
            self.forget_store_read();
        }
        *self.index.write().expect("not poisoned") = index;
        self.revision.send_replace(revision);
        // A new index may differ anywhere (nobody listening is no error).
        // Not when it is dropped: readers then go to the store, and telling
        // every page to read again at that moment would only add to that.
        if revision > 0 {
            let _ = self.changes.send(TaskChanges::All);
        }
    }

    /// Apply one watch batch to `index`, noting the runs it started and
    /// ended, and what it changed. A batch may hold several revisions (the
    /// embedded store commits writes in groups); each revision is one
    /// transaction, and is diffed on its own.
    fn apply_batch(&self, index: &mut TaskIndex, batch: &[WatchEvent]) -> TaskChanges {
        let ns = self.coordinator.namespace();
        let mut changed: Vec<TaskId> = Vec::new();
        for revision in batch.chunk_by(|a, b| a.kv.mod_revision == b.kv.mod_revision) {
            let mut touched: Vec<TaskId> = Vec::new();
            // Tasks whose run record this transaction wrote: an owner that
            // went with such a write was released by its node; one that
            // went alone was lost with its lease.
            let mut run_written: Vec<TaskId> = Vec::new();
            for event in revision {
                match ns.parse(&event.kv.key) {
                    Ok(
                        KeyKind::Task(id)
                        | KeyKind::Owner(id)
                        | KeyKind::Result(id)
                        | KeyKind::State(id),
                    ) => touched.push(id),
                    Ok(KeyKind::Run(id)) => {
                        if event.kind == EventKind::Put {
                            run_written.push(id.clone());
                        }
                        changed.push(id);
                    }
                    Ok(KeyKind::Checkpoint(id)) => changed.push(id),
                    _ => {}
                }
            }
            touched.sort_unstable();
            touched.dedup();
            let before: Vec<_> = touched.iter().map(|id| index.position(id)).collect();
            revision.iter().for_each(|event| index.apply(event));
            for (id, before) in touched.iter().zip(&before) {
                let released = run_written.contains(id);
                self.runs
                    .note(id, before.as_ref(), index.position(id).as_ref(), released);
            }
            changed.extend(touched);
        }
        changed.sort_unstable();
        changed.dedup();
        if changed.len() > MAX_CHANGED_IDS {
            TaskChanges::All
        } else {
            TaskChanges::Tasks(changed.into())
        }
    }
}

/// Load the index, then apply the namespace's watch events to it; after any
/// failure, drop it and load again. Ends when the [`LiveTasks`] is gone (it
/// is held here only weakly, between steps).
async fn follow(live: Weak<LiveTasks>) {
    let (first_pause, longest_pause) = RELOAD_BACKOFF;
    let mut pause = first_pause;
    loop {
        let failure = match follow_once(&live, &mut pause, first_pause).await {
            Ok(()) => return,
            Err(error) => error,
        };
        let Some(tasks) = live.upgrade() else { return };
        tasks.publish(None);
        drop(tasks);
        warn!(%failure, "the task index stopped following the store; reading it again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(longest_pause);
    }
}

/// One load and the watch after it, until the watch fails (`Err`) or the
/// [`LiveTasks`] is dropped (`Ok`).
async fn follow_once(
    live: &Weak<LiveTasks>,
    pause: &mut Duration,
    first_pause: Duration,
) -> Result<(), ProtocolError> {
    let Some(tasks) = live.upgrade() else {
        return Ok(());
    };
    let coordinator = tasks.coordinator.clone();
    drop(tasks);
    // The watch starts before the read is decoded: the store's history (20 s
    // on the agent's embedded store) must reach back to the read only.
    let (index, mut events) = coordinator.read_and_watch_index().await?;
    let Some(tasks) = live.upgrade() else {
        return Ok(());
    };
    tasks.publish(Some(index));
    drop(tasks);
    *pause = first_pause;
    while let Some(batch) = events.next().await {
        let batch = batch?;
        let Some(tasks) = live.upgrade() else {
            return Ok(());
        };
        let revision = {
            let mut guard = tasks.index.write().expect("not poisoned");
            let Some(index) = guard.as_mut() else {
                return Ok(());
            };
            let changes = tasks.apply_batch(index, &batch);
            let _ = tasks.changes.send(changes);
            index.revision()
        };
        tasks.revision.send_replace(revision);
    }
    Err(StoreError::Unavailable("the namespace's watch ended".into()).into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use eretes_protocol::{GroupName, Namespace, TaskQuery, TaskSpec, TaskState};
    use eretes_store::embedded::EmbeddedStore;
    use eretes_store::{PutRequest, Store};
    use serde_json::json;

    use super::*;

    fn ids(index: &TaskIndex) -> Vec<String> {
        let (tasks, _) = index.page(&TaskQuery::new(100));
        tasks.into_iter().map(|t| t.id.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn pages_hold_acknowledged_writes_and_others_changes_without_reading_the_store() {
        let store: Arc<dyn Store> = EmbeddedStore::new();
        let ns = Namespace::new("live").unwrap();
        let coordinator = Coordinator::new(store.clone(), ns.clone());
        let spec = TaskSpec::new(GroupName::default(), json!({}));
        coordinator
            .submit(&"before".parse().unwrap(), &spec)
            .await
            .unwrap();
        let live = LiveTasks::start(coordinator.clone());
        let mut loaded = live.revision.subscribe();
        loaded.wait_for(|&at| at > 0).await.unwrap();

        // Each acknowledged write is in the very next read.
        for n in 0..20 {
            let id = format!("t{n:02}").parse().unwrap();
            live.wrote(coordinator.submit(&id, &spec).await.unwrap());
            let listed = live.read(ids).await.unwrap();
            assert!(
                listed.contains(&id.to_string()),
                "{id} missing from {listed:?}"
            );
        }
        live.wrote(coordinator.delete(&"t03".parse().unwrap()).await.unwrap());
        let listed = live.read(ids).await.unwrap();
        assert_eq!(listed.len(), 20);
        assert!(!listed.contains(&"t03".to_string()));

        // Others' writes (another agent's submit, a node's claim) arrive by
        // the watch.
        let other = Coordinator::new(store.clone(), ns.clone());
        other.submit(&"zz".parse().unwrap(), &spec).await.unwrap();
        let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
        let owner = PutRequest::new(
            ns.owner(&"t00".parse().unwrap()),
            r#"{"node":"n1","group":"default"}"#,
        )
        .with_lease(lease);
        store.put(owner).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = live
                .read(|index| {
                    let (tasks, _) = index.page(&TaskQuery::new(100));
                    tasks
                        .into_iter()
                        .map(|t| (t.id.to_string(), t.state))
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap();
            if seen.len() == 21 && seen[1] == ("t00".to_string(), TaskState::Running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.len(), 21, "{seen:?}");
        assert_eq!(seen[1], ("t00".to_string(), TaskState::Running));
        assert_eq!(seen.last().unwrap().0, "zz");
        assert_eq!(live.store_reads(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_are_told_apart_per_transaction_and_changes_are_broadcast() {
        use eretes_store::{KeyRange, Txn, TxnOp};
        let store: Arc<dyn Store> = EmbeddedStore::new();
        let ns = Namespace::new("runs").unwrap();
        let coordinator = Coordinator::new(store.clone(), ns.clone());
        let live = LiveTasks::start(coordinator.clone());
        let mut loaded = live.revision.subscribe();
        loaded.wait_for(|&at| at > 0).await.unwrap();
        let mut changes = live.subscribe();
        let id: TaskId = "t".parse().unwrap();
        let spec = TaskSpec::new(GroupName::default(), json!({}));
        let submitted = coordinator.submit(&id, &spec).await.unwrap();
        let owner = |lease| {
            TxnOp::Put(
                PutRequest::new(ns.owner(&id), r#"{"node":"n1","group":"default"}"#)
                    .with_lease(lease),
            )
        };
        let run = || {
            TxnOp::Put(PutRequest::new(
                ns.run(&id),
                r#"{"claims":1,"takeovers":0,"open":true}"#,
            ))
        };
        // A claim (owner and run record in one transaction), then the
        // owner's lease expires: lost.
        let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
        store
            .txn(Txn::new().and_then(owner(lease)).and_then(run()))
            .await
            .unwrap();
        store.lease_revoke(lease).await.unwrap();
        // Another claim, then a release: the owner goes with a run record.
        let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap().id;
        store
            .txn(Txn::new().and_then(owner(lease)).and_then(run()))
            .await
            .unwrap();
        let released = store
            .txn(
                Txn::new()
                    .and_then(TxnOp::Delete(eretes_store::DeleteRequest::new(
                        KeyRange::key(ns.owner(&id)),
                    )))
                    .and_then(run()),
            )
            .await
            .unwrap();
        live.wrote(released.revision);
        live.read(|_| ()).await.unwrap();
        let kinds: Vec<(&str, i64)> = live
            .runs()
            .of(&id)
            .into_iter()
            .map(|event| (event.kind, event.epoch))
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert_eq!(
            kinds.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(),
            ["started", "lost", "started", "released"]
        );
        assert!(
            kinds[0].1 > submitted && kinds[2].1 > kinds[0].1,
            "{kinds:?}"
        );
        // What changed was named, task by task.
        let mut named = Vec::new();
        while let Ok(change) = changes.try_recv() {
            match change {
                TaskChanges::Tasks(ids) => named.extend(ids.iter().cloned()),
                TaskChanges::All => panic!("a small change said everything changed"),
            }
        }
        assert!(
            !named.is_empty() && named.iter().all(|named| named == &id),
            "{named:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_that_cannot_catch_up_gives_way_to_a_read_of_the_store() {
        let store: Arc<dyn Store> = EmbeddedStore::new();
        let coordinator = Coordinator::new(store.clone(), Namespace::new("live").unwrap());
        let live = LiveTasks::start(coordinator.clone());
        let mut revision = live.revision.subscribe();
        revision.wait_for(|&at| at > 0).await.unwrap();
        // A write the watch will never deliver: it is in another namespace,
        // and stands for one the watch is late with.
        let foreign = store
            .put(PutRequest::new("elsewhere/x", "1"))
            .await
            .unwrap();
        live.wrote(foreign.revision);
        let started = tokio::time::Instant::now();
        assert!(live.read(ids).await.unwrap().is_empty());
        assert_eq!(started.elapsed(), CATCH_UP);
        assert_eq!(live.store_reads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_while_the_index_loads_share_reads_of_the_store() {
        use eretes_store::faults::FaultyStore;
        // Every read of the namespace takes a second (it is one
        // transaction), as a large one does.
        let faulty = FaultyStore::new(EmbeddedStore::new());
        let coordinator = Coordinator::new(faulty.clone(), Namespace::new("live").unwrap());
        let spec = TaskSpec::new(GroupName::default(), json!({}));
        for n in 0..10 {
            let id = format!("t{n}").parse().unwrap();
            coordinator.submit(&id, &spec).await.unwrap();
        }
        faulty.set_txn_latency(Duration::from_secs(1));
        let live = LiveTasks::start(coordinator.clone());
        // 20 requests while the index loads, then 20 more half a second
        // into the first store read.
        let first = futures::future::join_all((0..20).map(|_| live.read(ids)));
        let second = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            futures::future::join_all((0..20).map(|_| live.read(ids))).await
        };
        let (first, second) = tokio::join!(first, second);
        for listed in first.into_iter().chain(second) {
            assert_eq!(listed.unwrap().len(), 10);
        }
        // The first read serves the first burst, the one after it every
        // request that came while the first was made: two, not forty.
        assert_eq!(live.store_reads(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_share_a_failed_read_fail_together() {
        use eretes_store::faults::FaultyStore;
        let faulty = FaultyStore::new(EmbeddedStore::new());
        let coordinator = Coordinator::new(faulty.clone(), Namespace::new("live").unwrap());
        faulty.set_outage(true);
        let live = LiveTasks::start(coordinator.clone());
        let answers = futures::future::join_all((0..20).map(|_| live.read(ids))).await;
        assert!(answers.iter().all(Result::is_err), "{answers:?}");
        assert_eq!(
            live.store_reads(),
            1,
            "one failed read, not one per request"
        );
        // Once the store is back, a new request reads it again.
        faulty.set_outage(false);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(live.read(ids).await.is_ok());
    }
}
