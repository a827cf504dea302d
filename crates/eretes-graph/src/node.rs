//! [`GraphNode`]: the graph layer of one eretes node. Its [`Handler`] runs
//! graph tasks (each an ordinary eretes task, claimed, balanced, drained
//! and fenced like any other), and it serves and sends their data requests.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::{Coordinator, NodeName, TaskId};
use eretes_runtime::balancer::Balancer;
use eretes_runtime::{Handler, HandlerOutcome, NodeStatus, TaskContext};
use eretes_store::PutRequest;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backup::{
    end_backups, keep_backups, place_backups, BackupBalancer, Replicas, Start, UpdateLog,
};
use crate::dispatch::{dispatch, Listener, RunEvent};
use crate::handle::{EpochScope, RunShared, TaskHandle};
use crate::ids::{graph_task_id, parse_graph_task_id, JobEpoch, JobName};
use crate::jobs::Jobs;
use crate::model::{GraphTask, JobKind};
use crate::rpc::{spawn_server, Remembered};
use crate::view::{GraphView, SeenMeta};
use crate::GraphError;

/// Counters of one graph node.
#[derive(Debug, Default)]
pub struct GraphStats {
    /// Data requests its tasks made.
    pub data_requests: AtomicU64,
    /// Attempts of them that were refused or failed to reach a node, and
    /// were retried.
    pub data_retries: AtomicU64,
    /// Answers that arrived after their job epoch ended, dropped.
    pub stale_answers_dropped: AtomicU64,
    /// Data requests its tasks answered (each once per run).
    pub data_served: AtomicU64,
    /// `meta_ready` calls made.
    pub meta_delivered: AtomicU64,
    /// Meta events not delivered again because the run had them already.
    pub meta_repeats_suppressed: AtomicU64,
    /// Connections opened to other nodes (one per peer).
    pub connections: AtomicU64,
    /// Update log entries its primaries applied (`TaskHandle::update`).
    pub updates: AtomicU64,
    /// Backups it took on (state transfers from primaries).
    pub backups_taken: AtomicU64,
    /// Update log entries its backups applied.
    pub updates_applied: AtomicU64,
    /// Backups its primaries gave up (they did not apply an update).
    pub backups_dropped: AtomicU64,
    /// Backups of it that became the primary (`became_primary`).
    pub takeovers: AtomicU64,
    /// Its latest runs' starts, oldest first (at most [`RUN_STARTS_KEPT`]).
    pub run_starts: Mutex<std::collections::VecDeque<RunStart>>,
}

/// How many run starts [`GraphStats::run_starts`] keeps.
pub const RUN_STARTS_KEPT: usize = 10_000;

/// A graph task's run, ready: its `init` or `became_primary` returned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunStart {
    /// The task.
    pub task: TaskId,
    /// When (wall clock, milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// Whether a backup took over (`became_primary`), not a cold start.
    pub promoted: bool,
}

impl GraphStats {
    /// Note a run's start.
    fn started(&self, task: &TaskId, promoted: bool) {
        let mut starts = self.run_starts.lock().expect("not poisoned");
        if starts.len() >= RUN_STARTS_KEPT {
            starts.pop_front();
        }
        starts.push_back(RunStart {
            task: task.clone(),
            at_ms: eretes_protocol::now_ms(),
            promoted,
        });
    }
}

pub(crate) struct NodeShared {
    pub name: NodeName,
    pub jobs: Jobs,
    pub kinds: HashMap<String, Arc<dyn JobKind>>,
    pub view: Arc<GraphView>,
    pub runs: Mutex<HashMap<TaskId, Arc<RunShared>>>,
    /// The runs here waiting for events, by job.
    pub(crate) listeners: Mutex<HashMap<JobName, Vec<Listener>>>,
    /// Numbers listeners, so that each can be removed.
    pub(crate) next_listener: AtomicU64,
    /// The data requests each task's run here answered lately.
    pub requests: Mutex<HashMap<TaskId, Remembered>>,
    /// The backups of other nodes' tasks held here.
    pub replicas: Replicas,
    /// The lease the node is registered under (backups are recorded under
    /// it).
    pub lease: Mutex<Option<eretes_store::LeaseId>>,
    pub clients:
        Mutex<HashMap<String, crate::proto::graph_client::GraphClient<tonic::transport::Channel>>>,
    pub stats: GraphStats,
    pub address: String,
    /// Open a connection for every request instead of pooling (only to
    /// measure what pooling saves).
    pub connection_per_request: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

/// The graph layer of one node: pass [`GraphNode::handler`] to the node
/// runtime (for the groups graph jobs use), then
/// [`GraphNode::publish_address`] with the node's status.
#[derive(Clone)]
pub struct GraphNode {
    shared: Arc<NodeShared>,
}

impl GraphNode {
    /// The graph layer of node `name` in `coordinator`'s namespace, running
    /// jobs of the given kinds, serving data requests on `listen`.
    pub async fn start(
        coordinator: Coordinator,
        name: NodeName,
        kinds: HashMap<String, Arc<dyn JobKind>>,
        listen: SocketAddr,
    ) -> Result<GraphNode, GraphError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|error| GraphError::Transport(format!("listening on {listen}: {error}")))?;
        let address = listener
            .local_addr()
            .map_err(|e| GraphError::Transport(e.to_string()))?
            .to_string();
        let shared = Arc::new(NodeShared {
            name,
            view: GraphView::start(coordinator.clone()),
            jobs: Jobs::new(coordinator),
            kinds,
            runs: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            replicas: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
            clients: Mutex::new(HashMap::new()),
            stats: GraphStats::default(),
            address,
            connection_per_request: std::sync::atomic::AtomicBool::new(false),
            listeners: Mutex::new(HashMap::new()),
            next_listener: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        spawn_server(Arc::downgrade(&shared), listener, shared.stop.clone());
        // Subscribed now, before any run can register.
        let events = shared.view.subscribe();
        let stop = shared.stop.clone();
        let dispatcher = dispatch(Arc::downgrade(&shared), events);
        tokio::spawn(async move {
            tokio::select! {
                () = dispatcher => {}
                () = stop.cancelled() => {}
            }
        });
        Ok(GraphNode { shared })
    }

    /// The handler that runs graph tasks.
    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(GraphHandler {
            node: self.shared.clone(),
        })
    }

    /// `inner`, made to hand a lost primary's task to the node holding its
    /// backup (see [`BackupBalancer`]): pass it to the node runtime of
    /// every node that runs jobs with backups.
    pub fn balancer(&self, inner: Box<dyn Balancer>) -> Box<dyn Balancer> {
        Box::new(BackupBalancer::new(inner, Arc::downgrade(&self.shared)))
    }

    /// Keep this node's data address in the store under the node's lease
    /// (written again whenever the node registers anew).
    pub fn publish_address(&self, mut status: watch::Receiver<NodeStatus>) {
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut published = None;
            loop {
                let lease = status.borrow_and_update().lease;
                let Some(node) = shared.upgrade() else { return };
                *node.lease.lock().expect("not poisoned") = lease;
                if lease.is_some() && lease != published {
                    let key = node.jobs.keys().rpc(&node.name);
                    let put =
                        PutRequest::new(key, node.address.clone()).with_lease(lease.unwrap_or(0));
                    match node.jobs.coordinator().store().put(put).await {
                        Ok(_) => published = lease,
                        Err(error) => {
                            warn!(%error, "cannot publish the graph data address; retrying")
                        }
                    }
                }
                let retry = lease.is_some() && lease != published;
                drop(node);
                // Until it is published, try again every second even if the
                // node's status does not change.
                let wait = tokio::time::sleep(if retry {
                    Duration::from_secs(1)
                } else {
                    Duration::from_secs(3600)
                });
                tokio::select! {
                    changed = status.changed() => if changed.is_err() { return },
                    () = wait => {}
                }
            }
        });
    }

    /// Open a new connection for every data request instead of one per
    /// peer: only for measuring what the pool saves (`eretes bench
    /// graph-data`), never faster.
    pub fn set_connection_per_request(&self, unpooled: bool) {
        self.shared
            .connection_per_request
            .store(unpooled, Ordering::Relaxed);
    }

    /// The address it serves data requests on.
    pub fn address(&self) -> &str {
        &self.shared.address
    }

    /// Its counters.
    pub fn stats(&self) -> &GraphStats {
        &self.shared.stats
    }

    /// Its latest runs' starts, oldest first.
    pub fn run_starts(&self) -> Vec<RunStart> {
        let starts = self.shared.stats.run_starts.lock().expect("not poisoned");
        starts.iter().cloned().collect()
    }

    /// Stop serving data requests and end its runs' work, as if the process
    /// died (the node runtime is killed separately).
    pub fn stop(&self) {
        self.shared.stop.cancel();
        self.shared.view.stop();
        for run in self.shared.runs.lock().expect("not poisoned").values() {
            run.ended.cancel();
        }
    }

    /// The graph tasks it runs now, with the job epoch each is in.
    pub fn runs(&self) -> Vec<(TaskId, JobEpoch)> {
        let runs = self.shared.runs.lock().expect("not poisoned");
        let mut list: Vec<_> = runs
            .iter()
            .filter(|(_, run)| !run.ended.is_cancelled())
            .map(|(id, run)| (id.clone(), run.scope.borrow().epoch))
            .collect();
        list.sort();
        list
    }

    /// The jobs of its namespace.
    pub fn jobs(&self) -> &Jobs {
        &self.shared.jobs
    }
}

struct GraphHandler {
    node: Arc<NodeShared>,
}

#[async_trait]
impl Handler for GraphHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        let Some((job, index)) = parse_graph_task_id(&ctx.id) else {
            return HandlerOutcome::Failed(format!(
                "{} is not a graph task (<job>.<index>)",
                ctx.id
            ));
        };
        match run_task(&self.node, &ctx, job, index).await {
            Ok(outcome) => outcome,
            Err(GraphError::Store(error))
            | Err(GraphError::Protocol(eretes_protocol::ProtocolError::Store(error))) => {
                debug!(%error, task = %ctx.id, "store error; the task goes back");
                HandlerOutcome::Release
            }
            // Another run owns the task: this one only ends.
            Err(GraphError::Fenced(_)) => HandlerOutcome::Release,
            Err(error) => HandlerOutcome::Failed(error.to_string()),
        }
    }
}

async fn run_task(
    node: &Arc<NodeShared>,
    ctx: &TaskContext,
    job: JobName,
    index: u32,
) -> Result<HandlerOutcome, GraphError> {
    let spec = node
        .jobs
        .job(&job)
        .await?
        .ok_or_else(|| GraphError::NoSuchJob(job.to_string()))?;
    if index >= spec.tasks {
        return Err(GraphError::Invalid(format!(
            "job {job} has no task {index}"
        )));
    }
    let kind = node
        .kinds
        .get(&spec.kind)
        .ok_or_else(|| {
            GraphError::Invalid(format!(
                "job kind {:?} is not known on {}",
                spec.kind, node.name
            ))
        })?
        .clone();
    node.view.loaded().await;
    let start = if spec.backups > 0 {
        node.begin_primary(&job, index, &ctx.id, ctx.epoch).await?
    } else {
        Start {
            promoted: None,
            handed_over: None,
        }
    };
    // Listen before reading the view, so that nothing falls between.
    let (queue, mut queued) = mpsc::unbounded_channel();
    let listening = node.listen(&job, index, queue);
    let record = match node.view.epoch(&job) {
        Some(record) => record,
        None => node
            .jobs
            .epoch(&job)
            .await?
            .ok_or_else(|| GraphError::NoSuchJob(job.to_string()))?,
    };
    let ended = ctx.cancel.child_token();
    let run = Arc::new(RunShared {
        node: node.clone(),
        job: job.clone(),
        index,
        id: ctx.id.clone(),
        topology: kind.topology(&spec),
        task: start
            .promoted
            .clone()
            .unwrap_or_else(|| kind.build(&spec, index)),
        spec: Arc::new(spec),
        claim_epoch: ctx.epoch,
        scope: watch::channel(EpochScope {
            epoch: record.epoch,
            shutdown: record.shutdown,
            ended: {
                let scope = ended.child_token();
                if record.shutdown {
                    scope.cancel();
                }
                scope
            },
        })
        .0,
        flagged: tokio::sync::Mutex::new(HashMap::new()),
        entered: Mutex::new(record.epoch),
        log: tokio::sync::Mutex::new(UpdateLog::default()),
        ended,
    });
    debug!(task = %ctx.id, claim_epoch = ctx.epoch, job_epoch = record.epoch.0, shutdown = record.shutdown, "graph run starts");
    listening.run_is(&run);
    // Ends the run however `drive` ends: returned, panicked, or dropped.
    let _ended = RunEnded(run.clone());
    let begin = match (start.promoted.is_some(), start.handed_over) {
        (true, _) => Begin::Promoted,
        (false, Some(state)) => Begin::HandedOver(state),
        (false, None) => Begin::Cold,
    };
    let outcome = drive(node, &run, ctx, begin, &mut queued).await;
    drop(listening);
    debug!(task = %ctx.id, claim_epoch = ctx.epoch, outcome = ?outcome.as_ref().map(|_| ()), "graph run ends");
    outcome
}

/// How a run's task instance comes up.
enum Begin {
    /// It is this node's backup of the task, which becomes the primary.
    Promoted,
    /// Another node's backup handed this state over.
    HandedOver(Vec<u8>),
    /// From scratch (`init`, with the checkpoint).
    Cold,
}

/// Ends a run when dropped: its work is cancelled and it leaves the node's
/// runs (it answers no more data requests), with its remembered answers.
struct RunEnded(Arc<RunShared>);

impl Drop for RunEnded {
    fn drop(&mut self) {
        let run = &self.0;
        run.ended.cancel();
        let mut runs = run.node.runs.lock().expect("not poisoned");
        if runs.get(&run.id).is_some_and(|r| Arc::ptr_eq(r, run)) {
            runs.remove(&run.id);
            // Its answers go with it (a next run here answers anew).
            run.node
                .requests
                .lock()
                .expect("not poisoned")
                .remove(&run.id);
        }
    }
}

/// Deliver the run's callbacks until the job shuts down or the run is
/// cancelled.
async fn drive(
    node: &Arc<NodeShared>,
    run: &Arc<RunShared>,
    ctx: &TaskContext,
    begin: Begin,
    queued: &mut mpsc::UnboundedReceiver<RunEvent>,
) -> Result<HandlerOutcome, GraphError> {
    let handle = TaskHandle {
        run: run.clone(),
        pinned: None,
    };
    let task = run.task.clone();
    let cancelled = ctx.cancel.clone();
    let step = async {
        let promoted = !matches!(begin, Begin::Cold);
        match begin {
            // This node's backup, current with the lost primary's log.
            Begin::Promoted => task.became_primary(&handle).await,
            // Another node's backup handed its state over.
            Begin::HandedOver(state) => {
                task.became_backup(state).await;
                task.became_primary(&handle).await;
            }
            Begin::Cold => {
                let checkpoint = node.jobs.coordinator().checkpoint(&run.id).await?;
                task.init(&handle, checkpoint).await;
            }
        }
        if promoted {
            node.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        node.stats.started(&run.id, promoted);
        // Data requests for this task are answered from here on (before,
        // they are refused and retried).
        node.runs
            .lock()
            .expect("not poisoned")
            .insert(run.id.clone(), run.clone());
        if run.spec.backups > 0 && !run.scope.borrow().shutdown {
            // Backed up before the task is told anything (and so before it
            // updates much): a takeover right after this one finds them.
            if let Err(error) = place_backups(run).await {
                debug!(%error, task = %run.id, "backups not complete yet");
            }
            tokio::spawn(keep_backups(run.clone()));
        }
        if run.scope.borrow().shutdown {
            // The job ended before this run began (its last run died before
            // it could end the task): report what the task had saved.
            return Ok(exit(run, &handle, &task).await);
        }
        let mut state = Delivery::default();
        let first = run.scope.borrow().epoch;
        if enter(run, &handle, &task, &mut state, first, CatchUp::FromView).await {
            return Ok(exit(run, &handle, &task).await);
        }
        while let Some(event) = queued.recv().await {
            match event {
                RunEvent::Epoch(epoch, shutdown) => {
                    // (Done already unless the event came before the run
                    // was built.)
                    run.move_to(epoch, shutdown);
                    if enter(run, &handle, &task, &mut state, epoch, CatchUp::FromQueue).await
                        || shutdown
                    {
                        return Ok(exit(run, &handle, &task).await);
                    }
                }
                RunEvent::Meta(from, link, meta) => {
                    deliver_meta(node, run, &handle, &task, &mut state, from, &link, &meta).await;
                }
                RunEvent::Owner(id, owned) => {
                    owner_changed(run, &handle, &task, &mut state, &id, owned).await;
                }
                RunEvent::Resync => {
                    // Events may have been missed: catch up from the view.
                    if let Some(record) = node.view.epoch(&run.job) {
                        run.move_to(record.epoch, record.shutdown);
                        if enter(
                            run,
                            &handle,
                            &task,
                            &mut state,
                            record.epoch,
                            CatchUp::FromView,
                        )
                        .await
                            || record.shutdown
                        {
                            return Ok(exit(run, &handle, &task).await);
                        }
                    }
                    deliver_current(node, run, &handle, &task, &mut state).await;
                    for (id, owned) in neighbours_owned(node, run) {
                        owner_changed(run, &handle, &task, &mut state, &id, owned).await;
                    }
                }
            }
        }
        Ok(HandlerOutcome::Release)
    };
    tokio::select! {
        outcome = step => outcome,
        () = cancelled.cancelled() => Ok(HandlerOutcome::Release),
    }
}

/// Enter every epoch after the last one entered, up to `epoch`, in order;
/// then (when catching up from the view) deliver the neighbours' meta of
/// the new epoch that the view holds, and refresh which neighbours are
/// watched. True if the job turned out to be shut down.
async fn enter(
    run: &Arc<RunShared>,
    handle: &TaskHandle,
    task: &Arc<dyn GraphTask>,
    state: &mut Delivery,
    epoch: JobEpoch,
    catch_up: CatchUp,
) -> bool {
    let node = &run.node;
    let mut next = state.entered.map_or(epoch.0, |e| e.0 + 1);
    if next > epoch.0 {
        return false;
    }
    while next <= epoch.0 {
        debug!(task = %run.id, job_epoch = next, "entering");
        state.entered = Some(JobEpoch(next));
        state.metas.clear();
        *run.entered.lock().expect("not poisoned") = JobEpoch(next);
        task.enter_epoch(handle, JobEpoch(next)).await;
        next += 1;
    }
    if node
        .view
        .epoch(&run.job)
        .is_some_and(|record| record.shutdown)
    {
        return true;
    }
    if catch_up == CatchUp::FromView {
        deliver_current(node, run, handle, task, state).await;
    }
    // The topology may differ in the new epoch: watch its neighbours,
    // keeping what is known of those watched already.
    for (id, owned) in neighbours_owned(node, run) {
        state.neighbours.entry(id).or_insert(if owned {
            Neighbour::Running
        } else {
            Neighbour::NotYet
        });
    }
    false
}

/// Where a run entering an epoch finds the meta flagged in it so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// In its queue, in store order, after the epoch's event: the ordinary
    /// case, which keeps every meta in store order.
    FromQueue,
    /// In the view (at the run's start, and after a resync, when events may
    /// have been missed): its current value of each sender and link; queued
    /// events of older writes are then skipped as superseded.
    FromView,
}

/// The job shut down: the task's `exit`, and its result.
async fn exit(run: &RunShared, handle: &TaskHandle, task: &Arc<dyn GraphTask>) -> HandlerOutcome {
    if run.spec.backups > 0 {
        end_backups(run).await;
    }
    task.exit(handle).await;
    HandlerOutcome::Done(task.result(handle).await)
}

/// A watched neighbour, as the task knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Neighbour {
    /// Not claimed yet since this run began: its first claim is no restart.
    NotYet,
    /// Running.
    Running,
    /// Its run was lost (the task was told).
    Lost,
}

/// What a run has delivered.
#[derive(Default)]
struct Delivery {
    entered: Option<JobEpoch>,
    /// (sender, link, meta) delivered in the current epoch.
    metas: BTreeSet<(u32, String, String)>,
    /// The store revision of the last meta delivered of each (sender, link).
    meta_revisions: HashMap<(u32, String), i64>,
    /// What the task was told of each neighbour it watches.
    neighbours: HashMap<TaskId, Neighbour>,
}

/// Deliver the current epoch's meta of this run's neighbours that it has
/// not had yet (at start, and after a resync).
async fn deliver_current(
    node: &Arc<NodeShared>,
    run: &Arc<RunShared>,
    handle: &TaskHandle,
    task: &Arc<dyn GraphTask>,
    state: &mut Delivery,
) {
    let mut metas = node.view.metas(&run.job);
    metas.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for (from, link, meta) in metas {
        deliver_meta(node, run, handle, task, state, from, &link, &meta).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn deliver_meta(
    node: &Arc<NodeShared>,
    run: &Arc<RunShared>,
    handle: &TaskHandle,
    task: &Arc<dyn GraphTask>,
    state: &mut Delivery,
    from: u32,
    link: &str,
    meta: &SeenMeta,
) {
    let record = &meta.record;
    let Some(epoch) = state.entered else { return };
    if record.epoch != epoch
        || !run
            .topology
            .neighbours(link, from, epoch)
            .contains(&run.index)
    {
        return;
    }
    // Older than what was delivered of this sender and link already (the
    // view's current value, delivered on entering the epoch, can come
    // before queued events of earlier writes): superseded, never delivered.
    let last = state
        .meta_revisions
        .entry((from, link.to_string()))
        .or_default();
    if meta.revision <= *last {
        return;
    }
    *last = meta.revision;
    if !state
        .metas
        .insert((from, link.to_string(), record.meta.clone()))
    {
        node.stats
            .meta_repeats_suppressed
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    node.stats.meta_delivered.fetch_add(1, Ordering::Relaxed);
    task.meta_ready(handle, from, link, &record.meta).await;
}

/// Whether each task that is a neighbour of this run (over any link, in
/// the current epoch) has an owner now.
fn neighbours_owned(node: &Arc<NodeShared>, run: &Arc<RunShared>) -> HashMap<TaskId, bool> {
    let epoch = *run.entered.lock().expect("not poisoned");
    let mut owned = HashMap::new();
    for link in run.topology.links() {
        for id in run.topology.neighbours(&link, run.index, epoch) {
            let task = graph_task_id(&run.job, id);
            let is_owned = node.view.is_owned(&task);
            owned.insert(task, is_owned);
        }
    }
    owned
}

async fn owner_changed(
    run: &Arc<RunShared>,
    handle: &TaskHandle,
    task: &Arc<dyn GraphTask>,
    state: &mut Delivery,
    id: &TaskId,
    owned: bool,
) {
    let Some(was) = state.neighbours.get(id).copied() else {
        return;
    };
    let (now, tell) = match (was, owned) {
        (Neighbour::Running, false) => (Neighbour::Lost, Some(false)),
        (Neighbour::Lost, true) => (Neighbour::Running, Some(true)),
        (Neighbour::NotYet, true) => (Neighbour::Running, None),
        (same, _) => (same, None),
    };
    state.neighbours.insert(id.clone(), now);
    let (Some(restarted), Some((_, neighbour))) = (tell, parse_graph_task_id(id)) else {
        return;
    };
    let epoch = handle.epoch();
    for link in run.topology.links() {
        if run
            .topology
            .neighbours(&link, run.index, epoch)
            .contains(&neighbour)
        {
            if restarted {
                task.neighbour_restarted(handle, &link, neighbour).await;
            } else {
                task.neighbour_failed(handle, &link, neighbour).await;
            }
        }
    }
}
