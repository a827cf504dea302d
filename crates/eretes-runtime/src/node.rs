//! One node: registration, the main loop, claims, handlers, fencing, commands,
//! balancing and shutdown.
//!
//! The main loop owns all state and never sleeps: it waits on the watch, on
//! finished store calls and handlers, and on timers (fence deadline, balance,
//! resync, ignore-list deadlines). Store calls run as futures the loop polls,
//! so a slow store never delays the fence deadline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{
    now_ms, Claim, ClaimBasis, ClaimOutcome, Coordinator, GroupName, NodeCommand, NodeName,
    NodeRecord, ProtocolError, RunEnd, TaskId, MAX_FINISH_BATCH,
};
use eretes_store::{EventKind, LeaseId, Revision, Store, StoreError, WatchStream};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{debug, info, warn};

use crate::balancer::{Balancer, ClaimDecision, RunningTask};
use crate::cache::{Cache, CachedOwner, Change};
use crate::config::NodeConfig;
use crate::handler::{
    CommandSignals, Deadline, FenceDeadline, Handler, HandlerOutcome, TaskContext,
};
use crate::lease::{keep_alive, LeaseEvent};
use crate::stats::NodeStats;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// Registration failed (for example the name is taken).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// What a node reports about itself, updated as it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// Whether the node holds a live lease and is registered.
    pub registered: bool,
    /// Whether claiming is frozen (freeze or drain).
    pub frozen: bool,
    /// Tasks whose handlers run here now.
    pub running: usize,
    /// Live nodes this node sees, itself included.
    pub live_nodes: usize,
    /// The lease the node is registered under, while it is. An embedding
    /// program may keep it, to revoke it after a crash (see
    /// `Coordinator::revoke_previous_registration`).
    pub lease: Option<LeaseId>,
}

/// Requests from the embedding program to the main loop.
enum Control {
    Shutdown(oneshot::Sender<()>),
    Command(NodeCommand),
}

/// A running node. Dropping the handle does not stop the node; call
/// [`NodeHandle::shutdown`] (graceful) or [`NodeHandle::kill`] (abrupt).
#[derive(Debug)]
pub struct NodeHandle {
    name: NodeName,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<NodeStatus>,
    stats: Arc<NodeStats>,
    main_loop: AbortHandle,
}

impl NodeHandle {
    /// The node's name.
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// The node's counters.
    pub fn stats(&self) -> &Arc<NodeStats> {
        &self.stats
    }

    /// The latest status; `.changed().await` on a clone to follow it.
    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Apply a node command locally, as if it had come through the store.
    pub fn command(&self, command: NodeCommand) {
        let _ = self.control.send(Control::Command(command));
    }

    /// Drain and stop: stop claiming, stop every handler, release their
    /// tasks, deregister. Bounded by the configured shutdown timeout.
    pub async fn shutdown(self) {
        let (done, wait) = oneshot::channel();
        if self.control.send(Control::Shutdown(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Stop abruptly, as if the process died: the main loop, the keepalive and
    /// every handler are dropped; nothing is released or deregistered, so the
    /// node's tasks move only when its lease expires.
    pub fn kill(&self) {
        self.main_loop.abort();
    }

    /// Whether the node has stopped (shut down or killed).
    pub fn is_stopped(&self) -> bool {
        self.main_loop.is_finished()
    }
}

/// A node's entry point.
pub struct Node;

impl Node {
    /// Register a node and start its main loop. Fails if the configuration is
    /// invalid or another live node has the same name.
    pub async fn start(
        store: Arc<dyn Store>,
        config: NodeConfig,
        handler: Arc<dyn Handler>,
        balancer: Box<dyn Balancer>,
    ) -> Result<NodeHandle, StartError> {
        config.validate().map_err(StartError::Config)?;
        let coordinator = Coordinator::new(store.clone(), config.namespace.clone())
            .with_takeover_limit(config.takeover_limit);
        let record = NodeRecord {
            groups: config.groups.clone(),
            started_at_ms: now_ms(),
            max_running: (config.max_running != usize::MAX).then_some(config.max_running as u64),
            slots: config
                .groups
                .iter()
                .map(|group| (group.clone(), config.slots_for(group)))
                .filter(|(_, slots)| *slots != usize::MAX)
                .map(|(group, slots)| (group, slots as u64))
                .collect(),
        };
        let lease = register(&coordinator, &config, &record).await?;
        info!(node = %config.name, lease = format!("{lease:#x}"), "node registered");
        let stats = Arc::new(NodeStats::default());
        stats.claim_window.store(
            config.max_claims_in_flight as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(NodeStatus::default());
        let name = config.name.clone();
        let main = MainLoop::new(
            coordinator,
            config,
            record,
            handler,
            balancer,
            stats.clone(),
            status_tx,
            lease,
        );
        let task = tokio::spawn(main.run(control_rx));
        Ok(NodeHandle {
            name,
            control: control_tx,
            status: status_rx,
            stats,
            main_loop: task.abort_handle(),
        })
    }
}

/// Grant a lease and register the node under it; revoke the lease again if
/// the registration is refused.
async fn register(
    coordinator: &Coordinator,
    config: &NodeConfig,
    record: &NodeRecord,
) -> Result<LeaseId, ProtocolError> {
    let store = coordinator.store();
    let lease = store.lease_grant(config.lease_ttl).await?.id;
    if let Err(error) = coordinator.register_node(&config.name, record, lease).await {
        let _ = store.lease_revoke(lease).await;
        return Err(error);
    }
    Ok(lease)
}

/// Why the runtime stopped a handler; decides what is written afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Give the task back (balance, stop_task, drain, shutdown).
    Release,
    /// The task was deleted or is owned elsewhere now: write nothing.
    Gone,
    /// This node lost (or may have lost) its lease: write nothing.
    Fenced,
}

/// A task whose handler runs here.
struct Running {
    claim: Claim,
    cancel: CancellationToken,
    /// Aborts the handler task when it does not stop by itself in time.
    abort: AbortHandle,
    stop: Option<StopReason>,
}

/// How a handler task ended, from the runtime's side.
enum Exit {
    Returned(HandlerOutcome),
    Panicked(String),
    /// Cancelled and still running after the grace period: dropped.
    Abandoned,
}

/// What a finished claim future reports.
struct ClaimResult {
    id: TaskId,
    group: GroupName,
    outcome: Result<ClaimOutcome, ProtocolError>,
}

/// A full listing plus the watch that continues it.
struct Sync {
    kvs: Vec<eretes_store::KeyValue>,
    revision: Revision,
    watch: WatchStream,
}

/// A node command's key and, if this node took it, its value.
type TakenCommand = (String, Revision, Result<Option<Vec<u8>>, ProtocolError>);

/// Re-registration after fencing.
type Reregistration = Pin<Box<dyn Future<Output = Result<LeaseId, ProtocolError>> + Send>>;

/// Lease bookkeeping while registered.
struct LeaseState {
    id: LeaseId,
    /// Dropping it stops the keepalive loop.
    _keepalive: tokio::task::JoinHandle<()>,
    events: mpsc::UnboundedReceiver<LeaseEvent>,
    /// Cancel every handler at this instant unless a renewal moves it.
    fence_at: Instant,
}

impl Drop for LeaseState {
    fn drop(&mut self) {
        self._keepalive.abort();
    }
}

struct MainLoop {
    coordinator: Coordinator,
    config: NodeConfig,
    record: NodeRecord,
    handler: Arc<dyn Handler>,
    balancer: Box<dyn Balancer>,
    stats: Arc<NodeStats>,
    status: watch::Sender<NodeStatus>,
    my_groups: Vec<GroupName>,

    cache: Cache,
    lease: Option<LeaseState>,
    reregistering: Option<Reregistration>,
    reregister_at: Option<Instant>,
    reregister_backoff: Duration,
    /// The lease to revoke before registering again after fencing.
    reregister_old: Option<LeaseId>,
    /// Fenced; register again once no handler runs any more.
    awaiting_reregistration: bool,
    /// Abort fenced handlers that are still running at this instant.
    fence_abort_at: Option<Instant>,
    /// Cancelled handlers (task and epoch) to abort if they are still running
    /// when their grace period ends. Kept here rather than as a timer inside
    /// every handler task, which would cost each running task a timer's memory.
    overdue: DelayQueue<(TaskId, Revision)>,
    /// Handlers this node aborted, by tokio task id, until their exit is seen.
    aborted: HashMap<tokio::task::Id, TaskId>,
    watch: Option<WatchStream>,
    syncing: Option<BoxFuture<'static, Result<Sync, ProtocolError>>>,
    sync_at: Option<Instant>,
    /// Count malformed keys of the next listing (the first one, and after a
    /// watch restart); periodic resyncs re-read the same keys and do not.
    count_listing_malformed: bool,

    running: HashMap<TaskId, Running>,
    handlers: JoinSet<(TaskId, Exit)>,
    /// Claim transactions in flight, each for one or more tasks.
    /// Claim transactions in flight; each reports how long it took.
    claims: FuturesUnordered<BoxFuture<'static, (Duration, Vec<ClaimResult>)>>,
    /// Tasks that may be being claimed at once now (see [`Node::pace_claims`]).
    claim_window: usize,
    claiming: HashSet<TaskId>,
    /// Runs that ended and whose end is not yet being written; written in
    /// batches at the end of each loop iteration.
    unfinished: Vec<(Claim, RunEnd)>,
    /// Writes of run ends in flight; each yields the groups whose slots it frees.
    finishing: FuturesUnordered<BoxFuture<'static, Vec<GroupName>>>,
    /// Tasks claiming, running or finishing, per group: what slots limit.
    busy: HashMap<GroupName, usize>,
    /// Which group the next claiming pass starts with.
    claim_rotation: usize,
    ignore: DelayQueue<TaskId>,
    ignored: HashMap<TaskId, tokio_util::time::delay_queue::Key>,
    /// The task the balancer last deferred, per group. Counts change when a
    /// claim is lost or a task loses its owner; the deferral is then lifted at
    /// once instead of waiting for its deadline.
    deferred: HashMap<GroupName, TaskId>,

    /// Handlers waiting for task commands.
    command_signals: CommandSignals,
    /// Where the fence deadline is published to handlers (process
    /// supervisors hold it outside this process).
    fence_publisher: watch::Sender<Option<Deadline>>,
    /// What every handler's context gets to read it.
    fence_deadline: FenceDeadline,
    /// Commands queued for this node, in store order.
    commands: BTreeMap<Revision, String>,
    /// After a failed take, wait until then before taking the next command.
    command_retry_at: Option<Instant>,
    taking_command: Option<BoxFuture<'static, TakenCommand>>,

    frozen: bool,
    shutting_down: Option<(oneshot::Sender<()>, Instant)>,
    next_balance: Instant,
    next_resync: Instant,
}

impl MainLoop {
    #[allow(clippy::too_many_arguments)]
    fn new(
        coordinator: Coordinator,
        config: NodeConfig,
        record: NodeRecord,
        handler: Arc<dyn Handler>,
        balancer: Box<dyn Balancer>,
        stats: Arc<NodeStats>,
        status: watch::Sender<NodeStatus>,
        lease: LeaseId,
    ) -> Self {
        let now = Instant::now();
        let (fence_publisher, fence_deadline) = FenceDeadline::channel(None);
        let mut main = MainLoop {
            fence_publisher,
            fence_deadline,
            cache: Cache::new(config.namespace.clone(), config.name.clone()),
            my_groups: config.groups.clone(),
            next_balance: now + config.balance_interval,
            next_resync: now + config.resync_interval,
            coordinator,
            record,
            handler,
            balancer,
            stats,
            status,
            lease: None,
            reregistering: None,
            reregister_at: None,
            reregister_backoff: Duration::from_millis(100),
            reregister_old: None,
            awaiting_reregistration: false,
            fence_abort_at: None,
            overdue: DelayQueue::new(),
            aborted: HashMap::new(),
            watch: None,
            syncing: None,
            sync_at: Some(now),
            count_listing_malformed: true,
            running: HashMap::new(),
            handlers: JoinSet::new(),
            claims: FuturesUnordered::new(),
            claim_window: config.max_claims_in_flight,
            claiming: HashSet::new(),
            unfinished: Vec::new(),
            finishing: FuturesUnordered::new(),
            busy: HashMap::new(),
            claim_rotation: 0,
            ignore: DelayQueue::new(),
            ignored: HashMap::new(),
            deferred: HashMap::new(),
            commands: BTreeMap::new(),
            command_signals: CommandSignals::default(),
            command_retry_at: None,
            taking_command: None,
            frozen: false,
            shutting_down: None,
            config,
        };
        main.start_lease(lease);
        main
    }

    fn start_lease(&mut self, id: LeaseId) {
        let (tx, events) = mpsc::unbounded_channel();
        let keepalive = tokio::spawn(keep_alive(
            self.coordinator.store().clone(),
            id,
            self.config.keepalive_interval,
            tx,
        ));
        // The lease was granted (or last renewed) no earlier than now minus the
        // grant's round trip; counting from now would be optimistic by that
        // much, which the margin covers.
        let deadline = Deadline::after(self.config.lease_ttl - self.config.fence_margin);
        let fence_at = deadline.at;
        self.fence_publisher.send_replace(Some(deadline));
        self.lease = Some(LeaseState {
            id,
            _keepalive: keepalive,
            events,
            fence_at,
        });
    }

    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut control_open = true;
        // One timer for every deadline, re-armed only when the earliest one
        // moves: cheaper than a fresh timer registration per iteration.
        let mut wake_at = self.next_deadline();
        let wake = sleep_until(wake_at);
        tokio::pin!(wake);
        loop {
            self.publish_status();
            if self.shutdown_finished() {
                return;
            }
            let next = self.next_deadline();
            if next != wake_at {
                wake_at = next;
                wake.as_mut().reset(next);
            }
            tokio::select! {
                biased;
                _ = &mut wake => self.on_timers(),
                event = async { self.lease.as_mut().unwrap().events.recv().await }, if self.lease.is_some() => {
                    self.on_lease_event(event)
                }
                message = control.recv(), if control_open => match message {
                    Some(Control::Shutdown(done)) => self.begin_shutdown(done),
                    Some(Control::Command(command)) => self.apply_command(command),
                    // Every handle is gone: nobody can stop the node any more,
                    // so it keeps running until its process ends.
                    None => control_open = false,
                },
                batch = async { self.watch.as_mut().unwrap().next().await }, if self.watch.is_some() => {
                    self.on_watch(batch)
                }
                Some(joined) = self.handlers.join_next_with_id(), if !self.handlers.is_empty() => {
                    self.on_joined(joined);
                    // Take every other handler that has finished too, so their
                    // ends are written in one batch.
                    for _ in 0..MAX_FINISH_BATCH * 4 {
                        let Some(joined) = self.handlers.try_join_next_with_id() else { break };
                        self.on_joined(joined);
                    }
                }
                Some((took, results)) = self.claims.next(), if !self.claims.is_empty() => {
                    self.pace_claims(took);
                    for result in results {
                        self.on_claim(result);
                    }
                }
                Some(groups) = self.finishing.next(), if !self.finishing.is_empty() => {
                    for group in &groups {
                        self.release_slot(group);
                    }
                }
                Some(expired) = self.overdue.next(), if !self.overdue.is_empty() => {
                    let (id, epoch) = expired.into_inner();
                    self.on_grace_over(id, epoch);
                }
                Some(expired) = self.ignore.next(), if !self.ignore.is_empty() => {
                    let id = expired.into_inner();
                    self.ignored.remove(&id);
                    self.deferred.retain(|_, deferred| *deferred != id);
                }
                result = async { self.syncing.as_mut().unwrap().await }, if self.syncing.is_some() => {
                    self.syncing = None;
                    self.on_sync(result);
                }
                result = async { self.reregistering.as_mut().unwrap().await }, if self.reregistering.is_some() => {
                    self.reregistering = None;
                    self.on_reregistered(result);
                }
                result = async { self.taking_command.as_mut().unwrap().await }, if self.taking_command.is_some() => {
                    self.taking_command = None;
                    self.on_command_taken(result);
                }
            }
            self.resume_after_fencing();
            self.next_command();
            self.try_claims();
            self.write_run_ends();
        }
    }

    fn on_joined(
        &mut self,
        joined: Result<(tokio::task::Id, (TaskId, Exit)), tokio::task::JoinError>,
    ) {
        match joined {
            Ok((handler, (id, exit))) => {
                // It may have returned just as it was aborted.
                self.aborted.remove(&handler);
                self.on_handler_exit(id, exit)
            }
            // Aborted: it ignored cancellation past a deadline.
            Err(error) => {
                if let Some(id) = self.aborted.remove(&error.id()) {
                    self.on_handler_exit(id, Exit::Abandoned);
                }
            }
        }
    }

    /// A cancelled handler's grace period is over: abort it if that run
    /// still has not returned.
    fn on_grace_over(&mut self, id: TaskId, epoch: Revision) {
        let overdue = self
            .running
            .get(&id)
            .is_some_and(|r| r.claim.epoch == epoch && r.stop.is_some());
        if overdue {
            warn!(node = %self.config.name, task = %id, grace = ?self.config.handler_grace, "handler ignored cancellation past its grace period; aborting it");
            self.abort_handler(id);
        }
    }

    fn abort_handler(&mut self, id: TaskId) {
        if let Some(running) = self.running.get(&id) {
            running.abort.abort();
            self.aborted.insert(running.abort.id(), id);
        }
    }

    /// The earliest of the loop's timers. One sleep per iteration instead of
    /// one per timer keeps the hot path cheap.
    fn next_deadline(&self) -> Instant {
        [
            self.lease.as_ref().map(|l| l.fence_at),
            Some(self.next_balance),
            Some(self.next_resync),
            self.sync_at,
            self.reregister_at,
            self.command_retry_at,
            self.fence_abort_at,
            self.shutting_down.as_ref().map(|(_, at)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("balance and resync deadlines always exist")
    }

    /// Fire every timer that is due, the fence deadline first.
    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.lease.as_ref().is_some_and(|l| l.fence_at <= now) {
            self.fence("lease could not be renewed in time");
        }
        if self.fence_abort_at.is_some_and(|at| at <= now) {
            self.fence_abort_at = None;
            let fenced: Vec<TaskId> = self
                .running
                .iter()
                .filter(|(_, running)| running.stop == Some(StopReason::Fenced))
                .map(|(id, _)| id.clone())
                .collect();
            for id in fenced {
                warn!(node = %self.config.name, task = %id, "handler ignored cancellation after fencing; aborting it");
                self.abort_handler(id);
            }
        }
        if self
            .shutting_down
            .as_ref()
            .is_some_and(|(_, at)| *at <= now)
        {
            self.abandon_shutdown();
        }
        if self.sync_at.is_some_and(|at| at <= now) {
            self.start_sync();
        }
        // Every due deadline is cleared or moved here, so the loop's single
        // timer never stays armed in the past.
        if self.command_retry_at.is_some_and(|at| at <= now) {
            self.command_retry_at = None;
        }
        if self.reregister_at.is_some_and(|at| at <= now) {
            self.start_reregistration();
        }
        if self.next_balance <= now {
            self.next_balance = now + self.config.balance_interval;
            self.balance();
        }
        if self.next_resync <= now {
            self.next_resync = now + self.config.resync_interval;
            if self.syncing.is_none() && self.lease.is_some() {
                self.start_sync();
            }
        }
    }

    fn publish_status(&self) {
        let status = NodeStatus {
            registered: self.lease.is_some(),
            frozen: self.frozen,
            running: self.running.len(),
            live_nodes: self.cache.live_nodes(),
            lease: self.lease.as_ref().map(|lease| lease.id),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    // ----- lease and fencing -------------------------------------------------

    fn on_lease_event(&mut self, event: Option<LeaseEvent>) {
        match event {
            Some(LeaseEvent::Renewed {
                sent_at,
                sent_at_boottime_ns,
            }) => {
                if let Some(lease) = &mut self.lease {
                    // The store extended the lease no earlier than when the
                    // request left, so the lease lives at least until then + TTL.
                    let deadline = Deadline::after_moment(
                        sent_at,
                        sent_at_boottime_ns,
                        self.config.lease_ttl - self.config.fence_margin,
                    );
                    lease.fence_at = deadline.at;
                    self.fence_publisher.send_replace(Some(deadline));
                }
            }
            Some(LeaseEvent::Failed(error)) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, "lease renewal failed");
            }
            Some(LeaseEvent::Lost) | None => self.fence("the store no longer has the node's lease"),
        }
    }

    /// Self-fencing: stop every handler and drop every claim before the lease
    /// can expire at the store, then register again.
    fn fence(&mut self, why: &str) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        NodeStats::bump(&self.stats.fences);
        warn!(node = %self.config.name, why, running = self.running.len(), "fencing: cancelling every handler");
        // The lease is gone or about to be: work held outside this process
        // (process supervisors) stops now, without a grace period.
        self.fence_publisher
            .send_replace(Some(Deadline::after(Duration::ZERO)));
        for running in self.running.values_mut() {
            running.stop = Some(StopReason::Fenced);
            running.cancel.cancel();
        }
        // Writes in flight were made under the old lease; their outcome no
        // longer matters (the epoch fences them), so forget them.
        self.claims.clear();
        for id in self.claiming.drain() {
            self.cache.clear_tentative(&id);
        }
        self.unfinished.clear();
        self.finishing.clear();
        self.busy.clear();
        for running in self.running.values() {
            *self
                .busy
                .entry(running.claim.record.spec.group.clone())
                .or_default() += 1;
        }
        self.watch = None;
        self.syncing = None;
        self.sync_at = None;
        self.taking_command = None;
        self.commands.clear();
        self.reregister_backoff = Duration::from_millis(100);
        self.reregister_old = Some(lease.id);
        // The lease cannot expire before the fence deadline + margin; a
        // handler still running by the middle of that window is aborted.
        self.fence_abort_at = Some(Instant::now() + self.config.fence_margin / 2);
        drop(lease);
        // Registering again revokes the old lease, which frees our tasks for
        // other nodes; that must wait until every cancelled handler has
        // stopped (see `resume_after_fencing`).
        self.awaiting_reregistration = true;
    }

    /// Register again once every fenced handler has exited.
    fn resume_after_fencing(&mut self) {
        if self.awaiting_reregistration && self.running.is_empty() && self.shutting_down.is_none() {
            self.awaiting_reregistration = false;
            self.start_reregistration();
        }
    }

    fn start_reregistration(&mut self) {
        self.reregister_at = None;
        if self.lease.is_some() || self.reregistering.is_some() || self.shutting_down.is_some() {
            return;
        }
        let coordinator = self.coordinator.clone();
        let config = self.config.clone();
        let record = self.record.clone();
        let old = self.reregister_old;
        self.reregistering = Some(Box::pin(async move {
            if let Some(old) = old {
                // Revoking frees the name and drops stale owner records at once
                // instead of after the TTL; an expired lease is already gone.
                match coordinator.store().lease_revoke(old).await {
                    Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            register(&coordinator, &config, &record).await
        }));
    }

    fn on_reregistered(&mut self, result: Result<LeaseId, ProtocolError>) {
        match result {
            Ok(lease) => {
                info!(node = %self.config.name, "registered again after fencing");
                self.reregister_old = None;
                self.start_lease(lease);
                self.start_sync();
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, retry_in = ?self.reregister_backoff, "re-registration failed");
                self.reregister_at = Some(Instant::now() + self.reregister_backoff);
                self.reregister_backoff = (self.reregister_backoff * 2).min(self.config.lease_ttl);
            }
        }
    }

    // ----- listing and watching ----------------------------------------------

    fn start_sync(&mut self) {
        self.sync_at = None;
        if self.lease.is_none() {
            return;
        }
        let coordinator = self.coordinator.clone();
        self.syncing = Some(Box::pin(async move {
            let listing = coordinator.list_namespace().await?;
            let watch = coordinator.watch_namespace(listing.revision + 1).await?;
            Ok(Sync {
                kvs: listing.kvs,
                revision: listing.revision,
                watch,
            })
        }));
    }

    fn on_sync(&mut self, result: Result<Sync, ProtocolError>) {
        match result {
            Ok(sync) => {
                NodeStats::bump(&self.stats.listings);
                let (cache, changes) = self.cache.rebuild(&sync.kvs);
                let membership_changed = cache.node_names() != self.cache.node_names();
                self.cache = cache;
                if membership_changed {
                    self.balance_soon();
                }
                self.watch = Some(sync.watch);
                let count = std::mem::replace(&mut self.count_listing_malformed, false);
                self.commands.clear();
                for change in changes {
                    match change {
                        // Handled above by comparing the node sets.
                        Change::Membership { .. } => {}
                        Change::Malformed(_) if !count => {}
                        change => self.on_change(change),
                    }
                }
                // Anything running here whose owner record is not ours any more
                // was lost while the watch was down.
                let lost: Vec<TaskId> = self
                    .running
                    .iter()
                    // A claim newer than the listing is not in it; only older
                    // ones can have been lost.
                    .filter(|(id, r)| {
                        r.claim.epoch <= sync.revision
                            && self.cache.owner(id).map(|o| o.epoch) != Some(r.claim.epoch)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in lost {
                    self.stop_task(&id, StopReason::Gone);
                }
                // Claims newer than the listing stay counted as ours until the
                // watch delivers their owner records.
                for running in self.running.values() {
                    if running.claim.epoch > sync.revision {
                        let group = &running.claim.record.spec.group;
                        self.cache
                            .set_mine(&running.claim.task, group, running.claim.epoch);
                    }
                }
                for id in &self.claiming {
                    if let Some(task) = self.cache.task(id) {
                        let group = task.record.spec.group.clone();
                        self.cache.set_mine(id, &group, 0);
                    }
                }
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, "listing the namespace failed; retrying");
                self.sync_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    fn on_watch(&mut self, batch: Option<Result<eretes_store::WatchBatch, StoreError>>) {
        match batch {
            Some(Ok(events)) => {
                for event in events {
                    let change = match event.kind {
                        EventKind::Put => self.cache.apply_put(&event.kv),
                        EventKind::Delete => self
                            .cache
                            .apply_delete(&event.kv.key, event.kv.mod_revision),
                    };
                    self.on_change(change);
                }
            }
            other => {
                // Compaction, a stream error or the end of the stream: list
                // again and watch from the listing's revision. Nothing is
                // missed because the listing is the state after every event.
                let why = match other {
                    Some(Err(error)) => error.to_string(),
                    _ => "watch stream ended".to_string(),
                };
                NodeStats::bump(&self.stats.relists);
                warn!(node = %self.config.name, why, "watch interrupted; re-listing");
                self.watch = None;
                self.count_listing_malformed = true;
                if self.syncing.is_none() {
                    self.start_sync();
                }
            }
        }
    }

    fn on_change(&mut self, change: Change) {
        match change {
            Change::None => {}
            Change::Malformed(what) => {
                NodeStats::bump(&self.stats.malformed_skipped);
                warn!(node = %self.config.name, what, "skipping malformed entry");
            }
            Change::TaskGone(id) => self.stop_task(&id, StopReason::Gone),
            Change::OwnerChanged { task, owner } => {
                if owner.is_none() {
                    if let Some(group) = self.cache.task(&task).map(|t| t.record.spec.group.clone())
                    {
                        self.lift_deferral(&group);
                    }
                }
                let Some(running) = self.running.get(&task) else {
                    return;
                };
                let ours = matches!(&owner, Some(CachedOwner { epoch, .. }) if *epoch == running.claim.epoch);
                if !ours && running.stop.is_none() {
                    // Our owner record vanished without our doing: the task was
                    // deleted or our lease is gone. Stop without writing.
                    self.stop_task(&task, StopReason::Gone);
                }
            }
            Change::Membership { node, joined } => {
                if node == self.config.name && !joined && self.lease.is_some() {
                    self.fence("this node's registration disappeared from the store");
                    return;
                }
                debug!(node = %self.config.name, peer = %node, joined, "membership changed");
                self.balance_soon();
            }
            Change::TaskCommand(task) => self.command_signals.ring(&task),
            Change::Command {
                key,
                revision,
                present,
            } => {
                if present {
                    self.commands.insert(revision, key);
                } else {
                    self.commands.retain(|_, k| *k != key);
                }
            }
        }
    }

    // ----- node commands -----------------------------------------------------

    /// Take the oldest queued command, one at a time so order is kept.
    fn next_command(&mut self) {
        if self.taking_command.is_some() || self.lease.is_none() || self.command_retry_at.is_some()
        {
            return;
        }
        let Some((revision, key)) = self.commands.pop_first() else {
            return;
        };
        let coordinator = self.coordinator.clone();
        self.taking_command = Some(Box::pin(async move {
            let result = coordinator.take_node_command(&key, revision).await;
            (key, revision, result)
        }));
    }

    fn on_command_taken(&mut self, (key, revision, result): TakenCommand) {
        match result {
            Ok(Some(bytes)) => match NodeCommand::decode(&bytes) {
                Ok(command) => {
                    info!(node = %self.config.name, command = command.name(), "applying node command");
                    self.apply_command(command);
                }
                Err(error) => {
                    NodeStats::bump(&self.stats.commands_rejected);
                    warn!(node = %self.config.name, key, %error, "discarding node command");
                }
            },
            Ok(None) => {}
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, key, %error, "could not take node command; retrying");
                // Keep its place at the head of the queue so order holds.
                self.commands.insert(revision, key);
                self.command_retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    fn apply_command(&mut self, command: NodeCommand) {
        NodeStats::bump(&self.stats.commands_applied);
        match command {
            NodeCommand::Freeze => self.frozen = true,
            NodeCommand::Unfreeze => {
                if self.shutting_down.is_none() {
                    self.frozen = false;
                }
            }
            NodeCommand::Balance => self.balance(),
            NodeCommand::Drain => {
                self.frozen = true;
                let ids: Vec<TaskId> = self.running.keys().cloned().collect();
                for id in ids {
                    self.stop_task(&id, StopReason::Release);
                }
            }
            NodeCommand::StopTask(id) => self.stop_task(&id, StopReason::Release),
        }
    }

    // ----- claiming ----------------------------------------------------------

    fn try_claims(&mut self) {
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return;
        };
        if self.frozen || self.shutting_down.is_some() || self.watch.is_none() {
            return;
        }
        // Each pass starts with the next group, so that under an agent-wide
        // limit no group waits for ever behind another that always has work.
        let groups = self.my_groups.len();
        self.claim_rotation = (self.claim_rotation + 1) % groups;
        for step in 0..groups {
            let group = self.my_groups[(self.claim_rotation + step) % groups].clone();
            // Under an agent-wide limit, the room left is shared among the
            // groups still to come in this pass (what one leaves unused
            // goes to the next), so no group takes every slot.
            let share_of_room = if self.config.max_running == usize::MAX {
                usize::MAX
            } else {
                let running: usize = self.busy.values().sum();
                (self.config.max_running.saturating_sub(running)).div_ceil(groups - step)
            };
            let mut free = self
                .config
                .slots_for(&group)
                .saturating_sub(self.busy.get(&group).copied().unwrap_or(0))
                .min(share_of_room);
            let mut batch = Vec::new();
            let share = self.claim_share(&group);
            while free > 0 && self.claiming.len() < self.claim_window {
                let candidate = self.next_candidate(&group, share);
                let Some(id) = candidate else { break };
                match self.balancer.can_claim(&id, &group, &self.cache.view) {
                    ClaimDecision::Claim => {
                        if let Some(basis) = self.cache.claim_basis(&id) {
                            // Counted as this node's at once, so the balancer's
                            // next decision sees it.
                            self.cache.set_mine(&id, &group, 0);
                            self.claiming.insert(id.clone());
                            *self.busy.entry(group.clone()).or_default() += 1;
                            batch.push((id, basis));
                            free -= 1;
                        }
                        if batch.len() >= self.config.claim_batch {
                            self.launch_claims(lease, group.clone(), std::mem::take(&mut batch));
                        }
                    }
                    ClaimDecision::RetryAfter(delay) => {
                        self.ignore_for(&id, delay);
                        self.deferred.insert(group.clone(), id);
                        break;
                    }
                    ClaimDecision::Skip(delay) => self.ignore_for(&id, delay),
                }
            }
            if !batch.is_empty() {
                self.launch_claims(lease, group, batch);
            }
        }
    }

    /// This node's share of `group`'s unowned tasks: its rank among the
    /// group's serving nodes and their number, if it is one of them.
    fn claim_share(&self, group: &GroupName) -> Option<(u64, u64)> {
        let serving = &self.cache.view.groups.get(group)?.serving;
        let rank = serving.iter().position(|n| *n == self.config.name)?;
        Some((rank as u64, serving.len() as u64))
    }

    /// The next task of `group` to claim: the oldest eligible one among this
    /// node's share, looking a bounded way ahead, else the oldest eligible
    /// one of all. Without shares every node would try the same oldest tasks
    /// at once, and a batch that loses one compare falls back to one
    /// transaction per task; with them, nodes contend only for leftovers.
    fn next_candidate(&self, group: &GroupName, share: Option<(u64, u64)>) -> Option<TaskId> {
        let eligible =
            |id: &&TaskId| !self.ignored.contains_key(*id) && !self.claiming.contains(*id);
        if let Some((rank, nodes)) = share.filter(|(_, nodes)| *nodes > 1) {
            let look_ahead = self.config.max_claims_in_flight * nodes as usize * 2;
            // The share test first: it is a modulo, the eligibility test two
            // map lookups.
            let mine = self
                .cache
                .unowned_spread(group)
                .take(look_ahead)
                .filter(|(spread, _)| spread % nodes == rank)
                .map(|(_, id)| id)
                .find(eligible);
            if let Some(id) = mine {
                return Some(id.clone());
            }
        }
        self.cache.unowned(group).find(eligible).cloned()
    }

    /// Claim `batch` (tasks of `group`) in one transaction where possible.
    fn launch_claims(
        &mut self,
        lease: LeaseId,
        group: GroupName,
        batch: Vec<(TaskId, ClaimBasis)>,
    ) {
        let coordinator = self.coordinator.clone();
        let node = self.config.name.clone();
        self.claims.push(off_loop(async move {
            let sent = Instant::now();
            let outcomes = coordinator.claim_batch(&node, lease, &batch).await;
            let took = sent.elapsed();
            let results = batch
                .into_iter()
                .zip(outcomes)
                .map(|((id, _), outcome)| ClaimResult {
                    id,
                    group: group.clone(),
                    outcome,
                })
                .collect();
            (took, results)
        }));
    }

    /// Fewer claims in flight while the store is slow to answer them, more
    /// again when it is quick. A store that applies writes in order (etcd)
    /// answers a lease renewal only after the writes queued before it: a
    /// burst of claims from many nodes (a rejoin, a large submit) can keep
    /// its queue long enough that renewals miss the TTL and every node
    /// fences itself. A claim transaction slower than a twentieth of the
    /// TTL halves the window (down to one batch); a quicker one grows it by
    /// a batch, up to `max_claims_in_flight`.
    fn pace_claims(&mut self, took: Duration) {
        let batch = self.config.claim_batch.max(1);
        let most = self.config.max_claims_in_flight;
        self.claim_window = if took > self.config.lease_ttl / 20 {
            (self.claim_window / 2).max(batch.min(most))
        } else {
            (self.claim_window + batch).min(most)
        };
        self.stats.claim_window.store(
            self.claim_window as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn on_claim(&mut self, result: ClaimResult) {
        let ClaimResult { id, group, outcome } = result;
        self.claiming.remove(&id);
        match outcome {
            Ok(ClaimOutcome::Claimed(claim)) => {
                NodeStats::bump(&self.stats.claims);
                if claim.takeover {
                    NodeStats::bump(&self.stats.takeovers);
                }
                self.cache.set_mine(&id, &group, claim.epoch);
                if self.frozen || self.shutting_down.is_some() {
                    // Frozen, drained or draining since the claim left: give
                    // the task straight back instead of starting it.
                    self.finish(claim, RunEnd::Released);
                } else {
                    self.start_handler(claim);
                }
            }
            Ok(ClaimOutcome::Parked { takeovers }) => {
                NodeStats::bump(&self.stats.parked);
                warn!(node = %self.config.name, task = %id, takeovers, "task parked as failed after too many takeovers");
                self.cache.clear_tentative(&id);
                self.release_slot(&group);
            }
            Ok(ClaimOutcome::Lost(keys)) => {
                NodeStats::bump(&self.stats.claim_conflicts);
                self.cache.clear_tentative(&id);
                self.lift_deferral(&group);
                // Bring the cache up to what the store said, so the next
                // attempt (if any) starts from the truth instead of waiting
                // for the watch to catch up.
                let ns = self.config.namespace.clone();
                let updates = [
                    (ns.task(&id), keys.task),
                    (ns.owner(&id), keys.owner),
                    (ns.run(&id), keys.run),
                ];
                for (key, kv) in updates {
                    let change = match kv {
                        Some(kv) => self.cache.apply_put(&kv),
                        None => self.cache.apply_delete(&key, 0),
                    };
                    if !matches!(change, Change::TaskGone(_) | Change::OwnerChanged { .. }) {
                        self.on_change(change);
                    }
                }
                if self.cache.claim_basis(&id).is_some() {
                    // Still looks claimable (say its owner record is garbage
                    // the cache cannot read): back off rather than spin.
                    self.ignore_for(&id, self.config.release_ignore);
                }
                self.release_slot(&group);
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, task = %id, %error, "claim failed; will retry");
                self.cache.clear_tentative(&id);
                self.ignore_for(&id, Duration::from_secs(1));
                self.release_slot(&group);
            }
        }
    }

    fn ignore_for(&mut self, id: &TaskId, delay: Duration) {
        if let Some(key) = self.ignored.get(id) {
            self.ignore.reset(key, delay);
        } else {
            let key = self.ignore.insert(id.clone(), delay);
            self.ignored.insert(id.clone(), key);
        }
    }

    /// Run the balancer shortly: a node joined or left.
    fn balance_soon(&mut self) {
        let soon = Instant::now() + self.config.membership_balance_delay;
        self.next_balance = self.next_balance.min(soon);
    }

    /// The group's counts changed: let the balancer judge its deferred task again.
    fn lift_deferral(&mut self, group: &GroupName) {
        if let Some(id) = self.deferred.remove(group) {
            if let Some(key) = self.ignored.remove(&id) {
                self.ignore.remove(&key);
            }
        }
    }

    fn release_slot(&mut self, group: &GroupName) {
        if let Some(count) = self.busy.get_mut(group) {
            *count = count.saturating_sub(1);
        }
    }

    // ----- handlers ----------------------------------------------------------

    fn start_handler(&mut self, claim: Claim) {
        let cancel = CancellationToken::new();
        let ctx = TaskContext {
            id: claim.task.clone(),
            task: claim.record.clone(),
            epoch: claim.epoch,
            node: self.config.name.clone(),
            claims: claim.run.claims,
            cancel: cancel.clone(),
            commands: self.command_signals.clone(),
            fence: self.fence_deadline.clone(),
        };
        self.cache.view.running.insert(
            claim.task.clone(),
            RunningTask {
                group: claim.record.spec.group.clone(),
                epoch: claim.epoch,
                claimed_at: Instant::now(),
            },
        );
        let handler = self.handler.clone();
        let id = claim.task.clone();
        let abort = self.handlers.spawn(async move {
            let exit = match AssertUnwindSafe(handler.run(ctx)).catch_unwind().await {
                Ok(outcome) => Exit::Returned(outcome),
                Err(panic) => Exit::Panicked(panic_message(&*panic)),
            };
            (id, exit)
        });
        self.running.insert(
            claim.task.clone(),
            Running {
                claim,
                cancel,
                abort,
                stop: None,
            },
        );
    }

    fn stop_task(&mut self, id: &TaskId, reason: StopReason) {
        if let Some(running) = self.running.get_mut(id) {
            if running.stop.is_none() {
                self.overdue
                    .insert((id.clone(), running.claim.epoch), self.config.handler_grace);
            }
            // A stronger reason (nothing may be written) wins over a release.
            if running.stop.is_none() || reason != StopReason::Release {
                running.stop = Some(reason);
            }
            running.cancel.cancel();
        }
    }

    fn on_handler_exit(&mut self, id: TaskId, exit: Exit) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        let group = running.claim.record.spec.group.clone();
        if let Some(task) = self.cache.view.running.remove(&id) {
            metrics::histogram!("eretes_handler_run_seconds", "group" => group.to_string())
                .record(task.claimed_at.elapsed().as_secs_f64());
        }
        let finish = match (running.stop, exit) {
            (Some(StopReason::Gone | StopReason::Fenced), _) => None,
            (_, Exit::Returned(HandlerOutcome::Done(result))) => Some(RunEnd::Done(result)),
            // The kill is already persisted in the task's state: retire it.
            (_, Exit::Returned(HandlerOutcome::Killed)) => Some(RunEnd::Killed),
            // Asked to stop: an error or panic on the way out is not the
            // task's failure, so give it back.
            (Some(StopReason::Release), _)
            | (_, Exit::Returned(HandlerOutcome::Release))
            | (_, Exit::Abandoned) => Some(RunEnd::Released),
            (None, Exit::Returned(HandlerOutcome::Failed(reason))) => Some(RunEnd::Failed(reason)),
            (None, Exit::Panicked(message)) => {
                Some(RunEnd::Failed(format!("handler panicked: {message}")))
            }
        };
        match finish {
            Some(finish) => self.finish(running.claim, finish),
            None => self.release_slot(&group),
        }
    }

    /// Queue the write of how a run ended (fenced by its epoch); its slot is
    /// freed once the write is done.
    fn finish(&mut self, claim: Claim, end: RunEnd) {
        match &end {
            RunEnd::Done(_) => NodeStats::bump(&self.stats.completions),
            RunEnd::Failed(_) | RunEnd::Killed => NodeStats::bump(&self.stats.failures),
            RunEnd::Released => {
                NodeStats::bump(&self.stats.releases);
                // Whoever asked for the release, let another node have it.
                let delay = self.config.release_ignore;
                self.ignore_for(&claim.task, delay);
            }
        }
        self.unfinished.push((claim, end));
    }

    /// Write the queued run ends, many per transaction.
    fn write_run_ends(&mut self) {
        while !self.unfinished.is_empty() {
            let take = self.unfinished.len().min(MAX_FINISH_BATCH);
            let batch: Vec<(Claim, RunEnd)> = self.unfinished.drain(..take).collect();
            let coordinator = self.coordinator.clone();
            self.finishing.push(off_loop(async move {
                let groups = batch
                    .iter()
                    .map(|(claim, _)| claim.record.spec.group.clone())
                    .collect();
                let results = coordinator.end_runs(&batch).await;
                // Store errors are retried one by one; the rest are final.
                let retries = batch.into_iter().zip(results).filter_map(|((claim, end), result)| {
                    match result {
                        Ok(()) | Err(ProtocolError::NotOwner { .. }) => None,
                        Err(error) => {
                            warn!(task = %claim.task, %error, "could not record the end of a run; retrying");
                            let coordinator = &coordinator;
                            Some(async move { end_with_retries(coordinator, &claim, end).await })
                        }
                    }
                });
                futures::future::join_all(retries).await;
                groups
            }));
        }
    }

    // ----- balancing -----------------------------------------------------------

    fn balance(&mut self) {
        if self.lease.is_none() || self.shutting_down.is_some() {
            return;
        }
        let releases = self.balancer.balance(&self.cache.view);
        if !releases.is_empty() {
            info!(node = %self.config.name, count = releases.len(), "balancer releases tasks");
        }
        for id in releases {
            self.stop_task(&id, StopReason::Release);
        }
    }

    // ----- shutdown ------------------------------------------------------------

    fn begin_shutdown(&mut self, done: oneshot::Sender<()>) {
        info!(node = %self.config.name, running = self.running.len(), "draining for shutdown");
        self.frozen = true;
        self.shutting_down = Some((done, Instant::now() + self.config.shutdown_timeout));
        let ids: Vec<TaskId> = self.running.keys().cloned().collect();
        for id in ids {
            self.stop_task(&id, StopReason::Release);
        }
    }

    fn shutdown_finished(&mut self) -> bool {
        if self.shutting_down.is_none()
            || !self.running.is_empty()
            || !self.finishing.is_empty()
            || !self.unfinished.is_empty()
            || !self.claims.is_empty()
        {
            return false;
        }
        self.deregister_and_notify();
        true
    }

    /// The shutdown timeout passed: drop whatever still runs and leave.
    fn abandon_shutdown(&mut self) {
        warn!(node = %self.config.name, running = self.running.len(), "shutdown timed out; abandoning remaining tasks");
        self.handlers.abort_all();
        self.running.clear();
        self.unfinished.clear();
        self.finishing.clear();
        self.claims.clear();
    }

    fn deregister_and_notify(&mut self) {
        let Some((done, _)) = self.shutting_down.take() else {
            return;
        };
        let lease = self.lease.take().map(|l| l.id);
        let store = self.coordinator.store().clone();
        let name = self.config.name.clone();
        let ttl = self.config.lease_ttl;
        // Revoking the lease removes the node record (and any owner record a
        // timed-out handler left) in one revision.
        tokio::spawn(async move {
            if let Some(lease) = lease {
                match tokio::time::timeout(ttl, store.lease_revoke(lease)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        warn!(node = %name, %error, "could not revoke the lease; it will expire")
                    }
                    Err(_) => warn!(node = %name, "revoking the lease timed out; it will expire"),
                }
            }
            info!(node = %name, "node stopped");
            let _ = done.send(());
        });
    }
}

/// Write how a run ended, retrying store errors with capped backoff for as
/// long as the node holds the task: giving up would leave the owner record
/// under a live lease and strand the task. Fencing, shutdown or a kill drop
/// this future. A fenced write (someone else owns the task now) is final.
async fn end_with_retries(coordinator: &Coordinator, claim: &Claim, end: RunEnd) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1u64.. {
        tokio::time::sleep(backoff).await;
        match coordinator.end_run(claim, end.clone()).await {
            Ok(()) => return,
            Err(ProtocolError::NotOwner { .. }) => {
                debug!(task = %claim.task, epoch = claim.epoch, "run end refused: no longer the owner");
                return;
            }
            Err(error) => {
                warn!(task = %claim.task, attempt, %error, "could not record the end of a run; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Run a store call as its own task, so that the main loop keeps going while
/// the store works on it (on another worker thread when one is free). The
/// task is aborted when the returned future is dropped: fencing, shutdown and
/// a kill forget store calls in flight by dropping them.
fn off_loop<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
) -> BoxFuture<'static, T> {
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(call));
    Box::pin(async move {
        match task.await {
            Ok(value) => value,
            // Only a panic in a store call gets here (aborting needs the
            // handle, which is this future); carry it on to the main loop.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    })
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
