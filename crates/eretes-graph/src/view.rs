//! What a graph node knows of the cluster, kept current by one watch of the
//! namespace: who owns each graph task, where each node serves data
//! requests, each job's epoch and its tasks' meta. Runs subscribe to its
//! events, in store order; data requests resolve owners from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eretes_protocol::{
    decode, Coordinator, GroupName, KeyKind, NodeName, NodeRecord, OwnerRecord, TaskId,
};
use eretes_store::{
    EventKind, GetRequest, KeyRange, KeyValue, Revision, Txn, TxnOp, TxnOpResponse,
};
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ids::{parse_graph_task_id, GraphKey, GraphKeys, JobName};
use crate::model::{BackupRecord, EpochRecord, MetaRecord};
use crate::GraphError;

/// A meta record as the view saw it, with the store revision that wrote
/// it (later writes of one sender and link have larger ones).
#[derive(Debug, Clone)]
pub(crate) struct SeenMeta {
    pub record: MetaRecord,
    pub revision: i64,
}

/// A change runs may care about, in store order.
#[derive(Debug, Clone)]
pub(crate) enum GraphEvent {
    /// A job's epoch record was written.
    Epoch(JobName, EpochRecord),
    /// A task flagged meta.
    Meta {
        job: JobName,
        from: u32,
        link: String,
        meta: SeenMeta,
    },
    /// A graph task got an owner, or lost it (`None`).
    Owner(TaskId, Option<NodeName>),
    /// A node's backup of a graph task was recorded, or its record is gone
    /// (`None`), at a store revision.
    Backup(TaskId, NodeName, Option<BackupRecord>, i64),
    /// The view was read again (after a broken watch): what a run depends
    /// on may have changed without an event.
    Resync,
}

#[derive(Default)]
struct ViewState {
    /// Each owned graph task's node and claim (fencing) epoch.
    owners: HashMap<TaskId, (NodeName, i64)>,
    addresses: HashMap<NodeName, String>,
    /// The groups of each live node.
    nodes: HashMap<NodeName, Vec<GroupName>>,
    /// Each task's backups: node → its record.
    backups: HashMap<TaskId, BTreeMap<NodeName, BackupRecord>>,
    epochs: HashMap<JobName, EpochRecord>,
    metas: HashMap<(JobName, u32, String), SeenMeta>,
}

/// The watch-kept view of one namespace's graph state.
pub(crate) struct GraphView {
    keys: GraphKeys,
    namespace: eretes_protocol::Namespace,
    state: Mutex<ViewState>,
    events: broadcast::Sender<GraphEvent>,
    loaded: watch::Sender<bool>,
    /// Ends the follower (the node stopped).
    stop: CancellationToken,
    /// Bumped whenever owners, nodes, addresses or backups change: what a
    /// primary's choice of backups depends on.
    placement: watch::Sender<u64>,
    /// The store revision the view is current with.
    revision: std::sync::atomic::AtomicI64,
    /// Graph keys whose value did not decode, skipped.
    pub malformed: AtomicU64,
}

impl GraphView {
    /// Start following `coordinator`'s namespace; ends when dropped.
    pub fn start(coordinator: Coordinator) -> Arc<GraphView> {
        let view = Arc::new(GraphView {
            keys: GraphKeys::new(coordinator.namespace()),
            namespace: coordinator.namespace().clone(),
            state: Mutex::new(ViewState::default()),
            events: broadcast::channel(4096).0,
            loaded: watch::channel(false).0,
            stop: CancellationToken::new(),
            placement: watch::channel(0).0,
            revision: std::sync::atomic::AtomicI64::new(0),
            malformed: AtomicU64::new(0),
        });
        let stop = view.stop.clone();
        let follower = follow(Arc::downgrade(&view), coordinator);
        tokio::spawn(async move {
            tokio::select! {
                () = follower => {}
                () = stop.cancelled() => {}
            }
        });
        view
    }

    /// Stop following the store (the node stopped).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GraphEvent> {
        self.events.subscribe()
    }

    /// Whether the view has been read once.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Wait until the view has been read once.
    pub async fn loaded(&self) {
        let _ = self.loaded.subscribe().wait_for(|&loaded| loaded).await;
    }

    /// The node owning graph task `id` and its data address, if known.
    pub fn owner(&self, id: &TaskId) -> Option<(NodeName, Option<String>)> {
        let state = self.state.lock().expect("not poisoned");
        let (node, _) = state.owners.get(id)?.clone();
        let address = state.addresses.get(&node).cloned();
        Some((node, address))
    }

    /// The store revision the view is current with: every change up to it
    /// is in.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Follows changes of what backups are placed by (see `placement`).
    pub fn placement(&self) -> watch::Receiver<u64> {
        self.placement.subscribe()
    }

    /// The backups of task `id` now: node → record.
    pub fn backups(&self, id: &TaskId) -> BTreeMap<NodeName, BackupRecord> {
        let state = self.state.lock().expect("not poisoned");
        state.backups.get(id).cloned().unwrap_or_default()
    }

    /// Live nodes that serve `group` and publish a data address, with it.
    pub fn serving(&self, group: &GroupName) -> Vec<(NodeName, String)> {
        let state = self.state.lock().expect("not poisoned");
        let mut nodes: Vec<_> = state
            .nodes
            .iter()
            .filter(|(_, groups)| groups.contains(group))
            .filter_map(|(node, _)| Some((node.clone(), state.addresses.get(node)?.clone())))
            .collect();
        nodes.sort();
        nodes
    }

    /// The data address of `node`, while it is live and publishes one.
    pub fn address(&self, node: &NodeName) -> Option<String> {
        let state = self.state.lock().expect("not poisoned");
        state.nodes.contains_key(node).then_some(())?;
        state.addresses.get(node).cloned()
    }

    /// Whether graph task `id` has an owner.
    pub fn is_owned(&self, id: &TaskId) -> bool {
        self.state
            .lock()
            .expect("not poisoned")
            .owners
            .contains_key(id)
    }

    /// A job's epoch record, if known.
    pub fn epoch(&self, job: &JobName) -> Option<EpochRecord> {
        self.state
            .lock()
            .expect("not poisoned")
            .epochs
            .get(job)
            .copied()
    }

    /// Every meta of `job` now: (sender, link, meta).
    pub fn metas(&self, job: &JobName) -> Vec<(u32, String, SeenMeta)> {
        let state = self.state.lock().expect("not poisoned");
        state
            .metas
            .iter()
            .filter(|((j, _, _), _)| j == job)
            .map(|((_, from, link), record)| (*from, link.clone(), record.clone()))
            .collect()
    }

    /// Apply one put or delete; the event runs see, if any.
    fn apply(&self, kv: &KeyValue, deleted: bool) -> Option<GraphEvent> {
        let mut state = self.state.lock().expect("not poisoned");
        let event = self.apply_to(&mut state, kv, deleted);
        drop(state);
        if !matches!(event, Some(GraphEvent::Epoch(..) | GraphEvent::Meta { .. })) {
            self.placement.send_modify(|generation| *generation += 1);
        }
        event
    }

    /// [`GraphView::apply`] to `state`.
    fn apply_to(&self, state: &mut ViewState, kv: &KeyValue, deleted: bool) -> Option<GraphEvent> {
        if let Some(key) = self.keys.parse(&kv.key) {
            return match key {
                GraphKey::Rpc(node) => {
                    if deleted {
                        state.addresses.remove(&node);
                    } else {
                        match String::from_utf8(kv.value.clone()) {
                            Ok(address) => {
                                state.addresses.insert(node, address);
                            }
                            Err(_) => self.skip(&kv.key),
                        }
                    }
                    None
                }
                GraphKey::Epoch(job) if !deleted => {
                    match decode::<EpochRecord>("job epoch", &kv.key, &kv.value) {
                        Ok(record) => {
                            state.epochs.insert(job.clone(), record);
                            Some(GraphEvent::Epoch(job, record))
                        }
                        Err(_) => {
                            self.skip(&kv.key);
                            None
                        }
                    }
                }
                GraphKey::Epoch(job) => {
                    state.epochs.remove(&job);
                    None
                }
                GraphKey::Meta(job, from, link) if !deleted => {
                    match decode::<MetaRecord>("meta", &kv.key, &kv.value) {
                        Ok(record) => {
                            let slot = (job.clone(), from, link.clone());
                            let meta = SeenMeta {
                                record,
                                revision: kv.mod_revision,
                            };
                            state.metas.insert(slot, meta.clone());
                            Some(GraphEvent::Meta {
                                job,
                                from,
                                link,
                                meta,
                            })
                        }
                        Err(_) => {
                            self.skip(&kv.key);
                            None
                        }
                    }
                }
                GraphKey::Meta(job, from, link) => {
                    state.metas.remove(&(job, from, link));
                    None
                }
                GraphKey::Backup(job, index, node) => {
                    let id = crate::ids::graph_task_id(&job, index);
                    let record = if deleted {
                        None
                    } else {
                        match decode::<BackupRecord>("backup", &kv.key, &kv.value) {
                            Ok(record) => Some(record),
                            Err(_) => {
                                self.skip(&kv.key);
                                return None;
                            }
                        }
                    };
                    let backups = state.backups.entry(id.clone()).or_default();
                    match record {
                        Some(record) => {
                            backups.insert(node.clone(), record);
                        }
                        None => {
                            backups.remove(&node);
                            if backups.is_empty() {
                                state.backups.remove(&id);
                            }
                        }
                    }
                    let revision = kv.mod_revision;
                    Some(GraphEvent::Backup(id, node, record, revision))
                }
                GraphKey::Job(_) => None,
            };
        }
        if let Ok(KeyKind::Node(node)) = self.namespace.parse(&kv.key) {
            if deleted {
                state.nodes.remove(&node);
            } else if let Ok(record) = decode::<NodeRecord>("node", &kv.key, &kv.value) {
                state.nodes.insert(node, record.groups);
            }
            return None;
        }
        if kv.key.starts_with(self.keys.root()) {
            self.skip(&kv.key);
            return None;
        }
        // Otherwise an owner record (the only other prefix read and watched
        // besides nodes).
        let id = TaskId::new(kv.key.rsplit('/').next()?).ok()?;
        parse_graph_task_id(&id)?;
        if deleted {
            state.owners.remove(&id);
            return Some(GraphEvent::Owner(id, None));
        }
        let owner: OwnerRecord = decode("owner", &kv.key, &kv.value).ok()?;
        // The claim wrote the owner record: its revision is the claim's
        // fencing epoch.
        state
            .owners
            .insert(id.clone(), (owner.node.clone(), kv.create_revision));
        Some(GraphEvent::Owner(id, Some(owner.node)))
    }

    fn skip(&self, key: &str) {
        if self.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(key, "skipping a malformed graph record (logged once)");
        }
    }
}

/// Read the view, then apply the watch; read again after any failure.
async fn follow(view: Weak<GraphView>, coordinator: Coordinator) {
    let mut pause = Duration::from_millis(100);
    loop {
        match follow_once(&view, &coordinator).await {
            Ok(Followed::ViewGone) => return,
            Ok(Followed::ResyncDue) => {
                pause = Duration::from_millis(100);
                continue;
            }
            Err(error) => {
                warn!(%error, "the graph view stopped following the store; reading it again")
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// How often the view is read again whole, whatever its watch says: a
/// bound on how long a lost or stuck watch can hide a change from runs.
const RESYNC_EVERY: Duration = Duration::from_secs(10);

/// Why a follow ended without an error.
enum Followed {
    ViewGone,
    ResyncDue,
}

async fn follow_once(
    view: &Weak<GraphView>,
    coordinator: &Coordinator,
) -> Result<Followed, GraphError> {
    let resync_at = tokio::time::Instant::now() + RESYNC_EVERY;
    let ns = coordinator.namespace();
    let graph = GraphKeys::new(ns).root().to_string();
    let txn = Txn::new()
        .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(
            ns.owners_prefix(),
        ))))
        .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(graph.clone()))))
        .and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(
            ns.nodes_prefix(),
        ))));
    let response = coordinator.store().txn(txn).await?;
    let revision: Revision = response.revision;
    let mut events = coordinator.watch_namespace(revision + 1).await?;
    {
        let Some(view) = view.upgrade() else {
            return Ok(Followed::ViewGone);
        };
        // Built aside and swapped in at once: readers never see it half-read.
        let mut fresh = ViewState::default();
        for kv in response.responses.iter().flat_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs.as_slice(),
            _ => &[],
        }) {
            view.apply_to(&mut fresh, kv, false);
        }
        *view.state.lock().expect("not poisoned") = fresh;
        view.revision.store(revision, Ordering::Release);
        view.placement.send_modify(|generation| *generation += 1);
        let _ = view.events.send(GraphEvent::Resync);
        view.loaded.send_replace(true);
    }
    let owners = ns.owners_prefix();
    let nodes = ns.nodes_prefix();
    loop {
        let batch = tokio::select! {
            batch = events.next() => batch,
            () = tokio::time::sleep_until(resync_at) => return Ok(Followed::ResyncDue),
        };
        let Some(batch) = batch else { break };
        let batch = batch?;
        let Some(view) = view.upgrade() else {
            return Ok(Followed::ViewGone);
        };
        for event in &batch {
            let relevant = event.kv.key.starts_with(&graph)
                || matches!(
                    ns.parse(&event.kv.key),
                    Ok(KeyKind::Owner(_) | KeyKind::Node(_))
                ) && (event.kv.key.starts_with(&owners) || event.kv.key.starts_with(&nodes));
            if relevant {
                if let Some(change) = view.apply(&event.kv, event.kind == EventKind::Delete) {
                    let _ = view.events.send(change);
                }
            }
            // Only once it is applied: a primary takes a backup's record
            // missing from the view as deleted once the view is past the
            // revision that wrote it.
            view.revision
                .fetch_max(event.kv.mod_revision, Ordering::AcqRel);
        }
    }
    Err(GraphError::Transport("the namespace's watch ended".into()))
}
