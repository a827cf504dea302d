//! One node: registration, the main loop, claims, handlers, fencing, commands,
//! balancing and shutdown.
//!
//! The main loop owns all state and never sleeps: it waits on the watch, on
//! finished store calls and handlers, and on timers (fence deadline, balance,
//! resync, ignore-list deadlines). Store calls run as futures the loop polls,
//! so a slow store never delays the fence deadline.
//!
//! The loop's state and its select are here; what it does on each event is
//! in one file per concern: [`claims`], [`handlers`], [`fencing`],
//! [`listing`] (the cache's listing and watch), [`commands`] and [`shutdown`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{
    now_ms, Claim, ClaimBasis, ClaimOutcome, Coordinator, GroupName, NodeCommand, NodeListing,
    NodeName, NodeRecord, ProtocolError, RunEnd, TaskId, MAX_FINISH_BATCH,
};
use eretes_store::{LeaseId, Revision, Store, WatchStream};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{info, warn};

use crate::balancer::Balancer;
use crate::cache::Cache;
use crate::config::NodeConfig;
use crate::handler::{CommandSignals, Deadline, FenceDeadline, Handler, HandlerOutcome};
use crate::lease::{keep_alive, LeaseEvent};
use crate::stats::NodeStats;

mod claims;
mod commands;
mod fencing;
mod handlers;
mod listing;
mod shutdown;

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
        stats.end_window.store(
            handlers::MAX_END_TXNS_IN_FLIGHT as u64,
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
    /// The read of an unread task's keys (see `Cache::is_unread`), not a
    /// claim: its outcome is [`ClaimOutcome::Lost`] with what was read.
    read_only: bool,
}

/// A node's listing plus the watch that continues it.
struct Sync {
    listing: NodeListing,
    watch: WatchStream,
    /// When the sync started: what it took spaces the periodic resyncs.
    started: Instant,
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
    /// The last listing's reads (no keys), while the watch may still deliver
    /// events that some of its reads already saw; dropped once the watch is
    /// past them all.
    listed: Option<NodeListing>,
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
    /// Run-end transactions in flight, each one of the end window's.
    finishing: FuturesUnordered<BoxFuture<'static, handlers::EndsWritten>>,
    /// Run ends that a transaction could not write, waiting for a retry
    /// slot ([`MainLoop::retry_run_ends`]).
    ends_to_retry: VecDeque<handlers::EndToRetry>,
    /// Run ends being tried again, each on its own.
    retrying_ends: FuturesUnordered<BoxFuture<'static, handlers::EndTried>>,
    /// How many run-end transactions may be in flight now
    /// ([`MainLoop::pace_run_ends`]).
    end_window: usize,
    /// Tasks claiming, running or finishing, per group: what slots limit.
    busy: HashMap<GroupName, usize>,
    /// Which group the next claiming pass starts with: the one after the
    /// last group that claimed.
    claim_rotation: usize,
    /// When each ignored task becomes a claim candidate again. While it is
    /// ignored the cache holds it back from the candidates, and keeps its
    /// key in this queue (`Cache::held_key`).
    ignore: DelayQueue<TaskId>,
    /// Groups the balancer said to wait with ([`ClaimDecision::RetryAfter`]),
    /// until when. Counts change when a claim is lost, a task loses its
    /// owner or a node joins or leaves; the wait then ends at once.
    waiting: HashMap<GroupName, Instant>,
    /// Per waiting group, the tasks the balancer put first
    /// ([`Balancer::claim_first`](crate::balancer::Balancer::claim_first))
    /// and then told to wait for: not asked again until the group's wait
    /// ends, so that its passes do not ask about them at every event.
    first_waited: HashMap<GroupName, HashSet<TaskId>>,
    /// Per group, a claim batch not full yet, held while a claim or read of
    /// this node is in flight (see `MainLoop::send_or_hold`). Its tasks are
    /// marked as being claimed.
    held_batches: HashMap<GroupName, Vec<(TaskId, ClaimBasis)>>,

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
            cache: Cache::new(
                config.namespace.clone(),
                config.name.clone(),
                &config.groups,
            ),
            my_groups: config.groups.clone(),
            next_balance: now + config.balance_interval,
            next_resync: now + listing::resync_delay(&config.name, 0, config.resync_interval),
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
            listed: None,
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
            ends_to_retry: VecDeque::new(),
            retrying_ends: FuturesUnordered::new(),
            end_window: handlers::MAX_END_TXNS_IN_FLIGHT,
            busy: HashMap::new(),
            claim_rotation: 0,
            ignore: DelayQueue::new(),
            waiting: HashMap::new(),
            first_waited: HashMap::new(),
            held_batches: HashMap::new(),
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
        let renewing = keep_alive(
            self.coordinator.store().clone(),
            id,
            self.config.keepalive_interval,
            tx,
        );
        let keepalive = match &self.config.keepalive_runtime {
            Some(runtime) => runtime.spawn(renewing),
            None => tokio::spawn(renewing),
        };
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
                Some(written) = self.finishing.next(), if !self.finishing.is_empty() => {
                    self.on_ends_written(written);
                }
                Some(retried) = self.retrying_ends.next(), if !self.retrying_ends.is_empty() => {
                    self.settle_end(retried);
                }
                Some(expired) = self.overdue.next(), if !self.overdue.is_empty() => {
                    let (id, epoch) = expired.into_inner();
                    self.on_grace_over(id, epoch);
                    compact_if_empty(&mut self.overdue);
                }
                Some(expired) = self.ignore.next(), if !self.ignore.is_empty() => {
                    let id = expired.into_inner();
                    self.cache.end_hold(&id);
                    // Keys of this queue are kept by the cache; an empty
                    // queue has none to move.
                    compact_if_empty(&mut self.ignore);
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
            self.waiting.values().min().copied(),
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
            // A busy loop may wake past the deadline with a renewal already
            // waiting in the channel (the keepalive runs as its own task):
            // that renewal moves the deadline, so it is applied first.
            self.apply_waiting_renewals();
        }
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
        self.waiting.retain(|_, until| *until > now);
        let waiting = &self.waiting;
        self.first_waited
            .retain(|group, _| waiting.contains_key(group));
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
            self.next_resync = now + self.resync_delay();
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
}

/// Give back a queue's room once it is empty, as [`crate::sparse`] does for
/// tables. Compacting moves entries, which changes their keys: an empty
/// queue has none.
fn compact_if_empty<T>(queue: &mut DelayQueue<T>) {
    if queue.is_empty() && queue.capacity() > 64 {
        queue.compact();
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
