//! [`StateMachine`]: a [`Handler`] that runs a [`StatefulHandler`] through
//! the task state machine of [`eretes_protocol::machine`].
//!
//! * The state (runnable, sleeping, paused, fault, …) lives in the store and
//!   is written at every transition, fenced by the run's epoch, so the next
//!   owner — after a release or a failover — carries on where this one left
//!   off.
//! * Task commands (pause, resume, sleep, kill) are applied in the order they
//!   were sent, each exactly once: the command is deleted in the transaction
//!   that writes the state it leads to. A command that the state does not
//!   accept is discarded with a warning, never a panic.
//! * Paused and sleeping tasks stay owned (and hold their slot) while their
//!   work is stopped; a sleeping task wakes at its time.
//! * Errors go through an [`ErrorPolicy`]: back off (sleeping) and try again,
//!   or fail after too many errors within a window.
//! * A store error while loading or writing the state releases the task to be
//!   tried again later; it never ends the task.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::machine::{transition, MAX_ERRORS_KEPT};
use eretes_protocol::{
    now_ms, Coordinator, MachineLoad, MachineState, Message, ProtocolError, QueuedCommand,
    StateRecord, TaskId, TaskRecord,
};
use futures::FutureExt;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::handler::{CommandSubscription, Handler, HandlerOutcome, TaskContext};
use crate::node::panic_message;

/// What the machine does with a handler's errors: after `max_errors` errors
/// within `window` the task fails; before that, it sleeps for a backoff that
/// starts at `first_backoff` and doubles with each error in the window, up
/// to `longest_backoff`, then runs again.
///
/// The default is 8 errors within 4 hours, backing off from 1 s to 10 min.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPolicy {
    /// Errors within the window that fail the task: at least 1, at most
    /// [`MAX_ERRORS_KEPT`] (the errors a state record keeps, which are what
    /// is counted); values outside are taken as the nearest bound.
    pub max_errors: usize,
    /// How far back errors count.
    pub window: Duration,
    /// The sleep after the first error.
    pub first_backoff: Duration,
    /// The longest sleep.
    pub longest_backoff: Duration,
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        ErrorPolicy {
            max_errors: 8,
            window: Duration::from_secs(4 * 3600),
            first_backoff: Duration::from_secs(1),
            longest_backoff: Duration::from_secs(600),
        }
    }
}

impl ErrorPolicy {
    /// A window as long as a task's life, for any practical purpose: a year
    /// of 365.25 days, which error messages print as `1year`.
    pub const LIFETIME: Duration = Duration::from_secs(31_557_600);

    /// A policy that fails a task at its `max_attempts`-th error over its
    /// whole life, backing off from `first_backoff` up to
    /// `longest_backoff` in between (what executors whose specs name a
    /// number of attempts use).
    pub fn attempts(
        max_attempts: u32,
        (first_backoff, longest_backoff): (Duration, Duration),
    ) -> Self {
        ErrorPolicy {
            max_errors: max_attempts as usize,
            window: Self::LIFETIME,
            first_backoff,
            longest_backoff,
        }
    }

    /// How many of `record`'s errors fall within the window at `now_ms`.
    pub fn recent_errors(&self, record: &StateRecord, now_ms: u64) -> usize {
        record.errors_since(now_ms.saturating_sub(millis(self.window)))
    }

    /// The policy's answer in the fault state: `Message::Error` (fail) when
    /// the task has had `max_errors` errors within the window at `now_ms`,
    /// else `Message::Sleep` until the end of its backoff, which is returned
    /// too.
    pub fn decide(&self, record: &StateRecord, now_ms: u64) -> (Message, Duration) {
        let recent = self.recent_errors(record, now_ms);
        if recent >= self.max_errors.clamp(1, MAX_ERRORS_KEPT) {
            let last = record
                .errors
                .last()
                .map_or_else(String::new, |e| e.message.clone());
            return (
                Message::Error(format!(
                    "{recent} errors within {} (the limit is {}); the last: {last}",
                    humantime::format_duration(self.window),
                    self.max_errors
                )),
                Duration::ZERO,
            );
        }
        let doublings = u32::try_from(recent.saturating_sub(1)).unwrap_or(u32::MAX);
        let backoff = self
            .first_backoff
            .checked_mul(2u32.saturating_pow(doublings))
            .unwrap_or(self.longest_backoff)
            .min(self.longest_backoff);
        let until_ms = now_ms.saturating_add(millis(backoff));
        (Message::Sleep { until_ms }, backoff)
    }
}

/// How one run of a [`StatefulHandler`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The work is finished with this result.
    Complete(Value),
    /// Something went wrong; the [`ErrorPolicy`] decides whether to back off
    /// and try again or to fail.
    Error(String),
    /// Something went wrong that trying again cannot fix (a bad spec, say):
    /// the task fails at once, whatever the policy.
    Fatal(String),
    /// Sleep this long, then run again.
    Sleep(Duration),
    /// Give the task back (some node runs it again).
    Release,
}

/// Saves a task's checkpoint, fenced by the run's epoch.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    coordinator: Coordinator,
    /// The task and the run's epoch: all it needs of the run's context
    /// (a copy of the whole context would be held by every running task).
    id: TaskId,
    epoch: i64,
    latest: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Checkpointer {
    /// Save `checkpoint` (opaque, at most
    /// [`eretes_protocol::machine::MAX_CHECKPOINT_BYTES`]) in place of the
    /// previous one. The next run of the task, here or on another node,
    /// receives it. Refused with [`ProtocolError::NotOwner`] once this run
    /// has lost the task.
    pub async fn save(&self, checkpoint: Vec<u8>) -> Result<(), ProtocolError> {
        self.coordinator
            .save_checkpoint(&self.id, self.epoch, &checkpoint)
            .await?;
        debug!(task = %self.id, bytes = checkpoint.len(), "checkpoint saved");
        *self.latest.lock().expect("not poisoned") = Some(checkpoint);
        Ok(())
    }
}

/// Everything a [`StatefulHandler`] gets for one run.
#[derive(Debug, Clone)]
pub struct StateContext {
    /// The task's context. Its `cancel` also fires when a command (pause,
    /// sleep, kill) interrupts the run: stop promptly, save a checkpoint
    /// first if that helps the next run.
    pub task: TaskContext,
    /// The task's latest checkpoint, from this or an earlier owner.
    pub checkpoint: Option<Vec<u8>>,
    /// Errors within the error policy's window so far (0 on a first try).
    pub recent_errors: usize,
    /// Saves checkpoints.
    pub checkpointer: Checkpointer,
}

/// The work of a task run by a [`StateMachine`].
#[async_trait]
pub trait StatefulHandler: Send + Sync + 'static {
    /// Run the task until its work ends or `ctx.task.cancel` fires.
    async fn run(&self, ctx: StateContext) -> Step;

    /// The error policy for `task`; `None` (the default) uses the
    /// machine's.
    fn error_policy(&self, _task: &TaskRecord) -> Option<ErrorPolicy> {
        None
    }
}

/// A [`Handler`] that runs a [`StatefulHandler`] as a task state machine.
pub struct StateMachine<H> {
    inner: Arc<H>,
    coordinator: Coordinator,
    policy: ErrorPolicy,
}

impl<H: StatefulHandler> StateMachine<H> {
    /// Run `inner` with states kept through `coordinator` (the node's store
    /// and namespace) and the default [`ErrorPolicy`].
    pub fn new(inner: H, coordinator: Coordinator) -> Self {
        StateMachine {
            inner: Arc::new(inner),
            coordinator,
            policy: ErrorPolicy::default(),
        }
    }

    /// Use `policy` for tasks whose handler names none.
    pub fn with_error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// Drive `handling` to its end while `work` keeps being polled; `handling`'s
/// answer, and `work`'s step if it finished meanwhile.
async fn while_working<T, W: std::future::Future<Output = Step>>(
    handling: impl std::future::Future<Output = T>,
    mut work: std::pin::Pin<&mut W>,
) -> (T, Option<Step>) {
    tokio::pin!(handling);
    let mut finished = None;
    loop {
        tokio::select! {
            answer = &mut handling => return (answer, finished),
            step = work.as_mut(), if finished.is_none() => finished = Some(step),
        }
    }
}

/// Why a run of the machine stops early: the store failed, or the task is
/// no longer ours. Either way the task is given back and nothing is lost:
/// what was not written is still queued or still in its old state.
struct Interrupted;

/// One run of the machine for one claim.
struct Run<'a, H> {
    machine: &'a StateMachine<H>,
    ctx: &'a TaskContext,
    policy: ErrorPolicy,
    record: StateRecord,
    queue: VecDeque<QueuedCommand>,
    latest: Arc<Mutex<Option<Vec<u8>>>>,
    /// The sleep being timed: its wall-clock end and the instant it ends.
    wake: Option<(u64, Instant)>,
}

impl<H: StatefulHandler> Handler for StateMachine<H> {
    // Written out rather than through `#[async_trait]`, whose async block
    // would hold `ctx` twice (moved in, then bound again) for as long as
    // the task runs: this block holds it once, and the machine borrows it.
    fn run<'life0, 'async_trait>(
        &'life0 self,
        ctx: TaskContext,
    ) -> Pin<Box<dyn Future<Output = HandlerOutcome> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.run_machine(&ctx).await })
    }
}

impl<H: StatefulHandler> StateMachine<H> {
    /// One claim's run of the machine.
    async fn run_machine(&self, ctx: &TaskContext) -> HandlerOutcome {
        // Subscribe before loading, so a command queued in between rings.
        let subscription = ctx.subscribe_commands();
        // Taken apart at once: a whole load would keep its room in this
        // future (held as long as the task runs) for the fields moved out.
        let MachineLoad {
            state,
            checkpoint,
            commands,
        } = match self.coordinator.load_machine(&ctx.id).await {
            Ok(load) => load,
            Err(error) => {
                warn!(task = %ctx.id, %error, "cannot load the task's state; releasing it to try again later");
                return HandlerOutcome::Release;
            }
        };
        // A record nobody can read may have said paused or killed: park the
        // task rather than run it, and say why, until a user resumes it.
        let (record, malformed) = match state {
            Ok(record) => (record, false),
            Err(malformed) => {
                warn!(task = %ctx.id, %malformed, "the task's state record is malformed; pausing the task until it is resumed");
                let mut record = StateRecord {
                    state: MachineState::Paused,
                    ..StateRecord::default()
                };
                record.push_error(
                    now_ms(),
                    &format!("{malformed}; paused until a resume command"),
                );
                (record, true)
            }
        };
        let policy = self.inner.error_policy(&ctx.task).unwrap_or(self.policy);
        let mut run = Run {
            machine: self,
            ctx,
            policy,
            record,
            queue: commands.into(),
            latest: Arc::new(Mutex::new(checkpoint)),
            wake: None,
        };
        if malformed {
            let record = run.record.clone();
            if Box::pin(run.write(record, None)).await.is_err() {
                return HandlerOutcome::Release;
            }
        }
        match run.drive(&subscription).await {
            Ok(outcome) => outcome,
            Err(Interrupted) => HandlerOutcome::Release,
        }
    }
}

impl<H: StatefulHandler> Run<'_, H> {
    async fn drive(
        &mut self,
        commands: &CommandSubscription,
    ) -> Result<HandlerOutcome, Interrupted> {
        loop {
            Box::pin(self.apply_queued()).await?;
            if self.ctx.cancel.is_cancelled() {
                return Ok(HandlerOutcome::Release);
            }
            match self.record.state {
                MachineState::Runnable => {
                    if let Some(outcome) = Box::pin(self.run_handler(commands)).await? {
                        return Ok(outcome);
                    }
                }
                MachineState::Fault => {
                    let (message, backoff) = self.policy.decide(&self.record, now_ms());
                    if !backoff.is_zero() {
                        info!(task = %self.ctx.id, ?backoff, "backing off after an error");
                    }
                    // The backoff is timed from this decision on the
                    // runtime's clock, not from whenever the write below
                    // returns (which a slow store would eat into).
                    if let Message::Sleep { until_ms } = message {
                        self.wake = Some((until_ms, Instant::now() + backoff.min(LONGEST_SLEEP)));
                    }
                    Box::pin(self.persist(&message, None)).await?;
                }
                // Boxed, as the handler's run is: this future is held for
                // as long as the task runs, and these waits would otherwise
                // set its size for every running task.
                MachineState::Paused | MachineState::Sleeping { .. } => {
                    if let Some(outcome) = Box::pin(self.rest(commands)).await? {
                        return Ok(outcome);
                    }
                }
                MachineState::Killed => return Ok(HandlerOutcome::Killed),
                MachineState::Failed => {
                    let reason = self
                        .record
                        .errors
                        .last()
                        .map_or_else(|| "failed".to_string(), |e| e.message.clone());
                    return Ok(HandlerOutcome::Failed(reason));
                }
                // Never persisted (completion retires the task), but a
                // record saying so means the work was done.
                MachineState::Completed => return Ok(HandlerOutcome::Done(Value::Null)),
            }
        }
    }

    /// Wait, paused or sleeping, for a command, the wake-up time or the
    /// runtime's stop. `Some` when the task's run is over.
    async fn rest(
        &mut self,
        commands: &CommandSubscription,
    ) -> Result<Option<HandlerOutcome>, Interrupted> {
        match self.record.state {
            MachineState::Sleeping { until_ms } => {
                let wake_at = self.wake_at(until_ms);
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return Ok(Some(HandlerOutcome::Release)),
                    _ = commands.rung() => Box::pin(self.refill()).await?,
                    _ = tokio::time::sleep_until(wake_at) => {
                        Box::pin(self.persist(&Message::Run, None)).await?;
                    }
                }
            }
            _ => {
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return Ok(Some(HandlerOutcome::Release)),
                    _ = commands.rung() => Box::pin(self.refill()).await?,
                }
            }
        }
        Ok(None)
    }

    /// When to wake from a sleep until `until_ms`, measured once per sleep
    /// on tokio's clock (so paused-time tests and wall clock agree).
    fn wake_at(&mut self, until_ms: u64) -> Instant {
        match self.wake {
            Some((until, at)) if until == until_ms => at,
            _ => {
                // Capped, so a wake-up time at the end of time (a saturated
                // sleep, or a record from elsewhere) cannot overflow the clock.
                let left =
                    Duration::from_millis(until_ms.saturating_sub(now_ms())).min(LONGEST_SLEEP);
                let at = Instant::now() + left;
                self.wake = Some((until_ms, at));
                at
            }
        }
    }

    /// Run the handler until it returns, the runtime cancels it, or a command
    /// interrupts it. `Some` when the task's run is over.
    /// Read the task's queued commands and apply those that do not
    /// interrupt a run; whether one does (then the run is stopped).
    async fn handle_commands(&mut self) -> Result<bool, Interrupted> {
        Box::pin(self.refill()).await?;
        if self.queue.iter().any(interrupts_a_run) {
            debug!(task = %self.ctx.id, "a command interrupts the run");
            return Ok(true);
        }
        Box::pin(self.apply_queued()).await.map(|()| false)
    }

    async fn run_handler(
        &mut self,
        commands: &CommandSubscription,
    ) -> Result<Option<HandlerOutcome>, Interrupted> {
        let cancel = self.ctx.cancel.child_token();
        let recent_errors = self.policy.recent_errors(&self.record, now_ms());
        let ctx = StateContext {
            task: TaskContext {
                cancel: cancel.clone(),
                ..self.ctx.clone()
            },
            checkpoint: self.latest.lock().expect("not poisoned").clone(),
            recent_errors,
            checkpointer: Checkpointer {
                coordinator: self.machine.coordinator.clone(),
                id: self.ctx.id.clone(),
                epoch: self.ctx.epoch,
                latest: self.latest.clone(),
            },
        };
        let inner = self.machine.inner.clone();
        // A panic is the handler's error, for the policy to judge.
        let work = AssertUnwindSafe(inner.run(ctx))
            .catch_unwind()
            .map(|result| {
                result.unwrap_or_else(|panic| {
                    Step::Error(format!("the handler panicked: {}", panic_message(&*panic)))
                })
            });
        tokio::pin!(work);
        let mut interrupted = false;
        let mut failed = false;
        let step = loop {
            tokio::select! {
                step = &mut work => break step,
                _ = commands.rung(), if !interrupted => {
                    // The work is polled while the commands are handled:
                    // a process task's run forwards the fencing deadline
                    // and the stop to its supervisor only while polled, and
                    // these store calls may take seconds.
                    let handling = Box::pin(self.handle_commands());
                    let (handled, finished) = while_working(handling, work.as_mut()).await;
                    // On a store error the run still stops the proper way
                    // (cancelled, waited for), then the task is given back.
                    failed = handled.is_err();
                    if handled.unwrap_or(true) {
                        interrupted = true;
                        cancel.cancel();
                    }
                    if let Some(step) = finished {
                        break step;
                    }
                }
            }
        };
        if failed {
            return Err(Interrupted);
        }
        let stopped = interrupted || self.ctx.cancel.is_cancelled();
        match step {
            // Finished work is kept even if a stop arrived meanwhile.
            Step::Complete(result) => Ok(Some(HandlerOutcome::Done(result))),
            // A stopped handler's error or answer is the stop's doing.
            _ if stopped => Ok(None),
            Step::Release => Ok(Some(HandlerOutcome::Release)),
            Step::Sleep(duration) => {
                let until_ms = now_ms().saturating_add(millis(duration));
                Box::pin(self.persist(&Message::Sleep { until_ms }, None)).await?;
                Ok(None)
            }
            Step::Error(error) => {
                warn!(task = %self.ctx.id, %error, "the task reported an error");
                Box::pin(self.persist(&Message::Error(error), None)).await?;
                Ok(None)
            }
            Step::Fatal(error) => {
                warn!(task = %self.ctx.id, %error, "the task failed");
                // Into fault and straight on to failed, in one write, so no
                // owner ever finds it in fault and asks the policy.
                let message = Message::Error(error);
                Box::pin(self.persist_all(&[message.clone(), message], None)).await?;
                Ok(None)
            }
        }
    }

    /// Read the task's command queue again (after a ring).
    async fn refill(&mut self) -> Result<(), Interrupted> {
        match self.machine.coordinator.task_commands(&self.ctx.id).await {
            Ok(commands) => {
                self.queue = commands.into();
                Ok(())
            }
            Err(error) => {
                warn!(task = %self.ctx.id, %error, "cannot read the task's commands; releasing it to try again later");
                Err(Interrupted)
            }
        }
    }

    /// Apply every queued command, oldest first.
    async fn apply_queued(&mut self) -> Result<(), Interrupted> {
        while let Some(queued) = self.queue.pop_front() {
            let message = match &queued.command {
                Ok(command) => {
                    info!(task = %self.ctx.id, %command, "applying task command");
                    command.message()
                }
                Err(error) => {
                    warn!(task = %self.ctx.id, key = queued.key, %error, "discarding a malformed task command");
                    let record = self.record.clone();
                    self.write(record, Some(&queued.key)).await?;
                    continue;
                }
            };
            self.persist(&message, Some(&queued.key)).await?;
        }
        Ok(())
    }

    /// Apply `message`: write the state it leads to (taking the command at
    /// `applied` in the same transaction). A message the state does not
    /// accept changes nothing, but its command is still taken.
    async fn persist(
        &mut self,
        message: &Message,
        applied: Option<&str>,
    ) -> Result<(), Interrupted> {
        self.persist_all(std::slice::from_ref(message), applied)
            .await
    }

    /// Apply `messages` one after the other and write only the state they
    /// lead to (taking the command at `applied` in the same transaction).
    async fn persist_all(
        &mut self,
        messages: &[Message],
        applied: Option<&str>,
    ) -> Result<(), Interrupted> {
        let mut record = self.record.clone();
        let mut changed = false;
        for message in messages {
            changed |= apply_message(self.ctx, &mut record, message);
        }
        if !changed && applied.is_none() {
            return Ok(());
        }
        self.write(record, applied).await
    }

    async fn write(
        &mut self,
        mut record: StateRecord,
        applied: Option<&str>,
    ) -> Result<(), Interrupted> {
        record.updated_at_ms = now_ms();
        let written = self
            .machine
            .coordinator
            .write_state(&self.ctx.id, self.ctx.epoch, &record, applied)
            .await;
        match written {
            Ok(()) => {
                self.record = record;
                Ok(())
            }
            Err(error @ ProtocolError::NotOwner { .. }) => {
                debug!(task = %self.ctx.id, %error, "state write refused");
                Err(Interrupted)
            }
            Err(error) => {
                warn!(task = %self.ctx.id, %error, "cannot write the task's state; releasing it to try again later");
                Err(Interrupted)
            }
        }
    }
}

/// Move `record` by `message`; false (and a warning) if its state does not
/// accept it.
fn apply_message(ctx: &TaskContext, record: &mut StateRecord, message: &Message) -> bool {
    match transition(record.state, message) {
        Ok(next) => {
            debug!(task = %ctx.id, from = record.state.name(), to = next.name(), message = message.name(), "transition");
            // The same text twice in a row (a fatal error on its way to
            // failed) is one error.
            if let Message::Error(error) = message {
                if next == MachineState::Fault
                    || record
                        .errors
                        .last()
                        .is_none_or(|last| last.message != *error)
                {
                    record.push_error(now_ms(), error);
                }
            }
            record.state = next;
            true
        }
        Err(invalid) => {
            warn!(task = %ctx.id, %invalid, "ignoring the message");
            false
        }
    }
}

/// The longest a sleep is timed for (100 years): a task asked to sleep
/// longer, up to the end of time, wakes after that.
const LONGEST_SLEEP: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `duration` in whole milliseconds, saturating (a sleep too long to count
/// is a sleep until the end of time, never none).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a queued command stops a running handler: one that moves a
/// runnable task elsewhere (pause, sleep, kill).
fn interrupts_a_run(queued: &QueuedCommand) -> bool {
    queued.command.as_ref().is_ok_and(|command| {
        transition(MachineState::Runnable, &command.message())
            .is_ok_and(|next| next != MachineState::Runnable)
    })
}
