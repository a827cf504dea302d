//! The handler API: what a task's work looks like to the runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::{NodeName, TaskId, TaskRecord};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Everything a handler gets for one run of one task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task.
    pub id: TaskId,
    /// Its record (group and properties) as submitted.
    pub task: Arc<TaskRecord>,
    /// The fencing epoch of this run. Pass it to external sinks so they can
    /// reject writes from a stale owner; it grows with every claim.
    pub epoch: i64,
    /// The node running it.
    pub node: NodeName,
    /// How many times the task has been claimed, this run included.
    pub claims: u32,
    /// Cancelled when the runtime wants the handler to stop: the task is
    /// released, deleted, the node drains or shuts down, or the node lost its
    /// lease (self-fencing). Return promptly once it fires.
    pub cancel: CancellationToken,
    /// Rings when a task command is queued for a task of this node; see
    /// [`TaskContext::subscribe_commands`].
    pub commands: CommandSignals,
    /// The node's self-fencing deadline, moved by every lease renewal: an
    /// executor whose work runs outside this process (a process task's
    /// supervisor) holds it there, so that the work dies by this instant
    /// even if this process is frozen or killed.
    pub fence: FenceDeadline,
}

impl TaskContext {
    /// Be told when a command is queued for this task. The node sees every
    /// command key in its namespace watch and rings the subscription, so a
    /// handler needs no watch of its own; nothing is kept for handlers that
    /// never subscribe. Subscribe before reading the queue: a command queued
    /// in between still rings.
    pub fn subscribe_commands(&self) -> CommandSubscription {
        self.commands.subscribe(&self.id)
    }
}

/// An instant on two clocks: tokio's, which the node's timers use, and
/// `CLOCK_BOOTTIME`, which keeps counting while the machine is suspended
/// (tokio's clock, `CLOCK_MONOTONIC`, does not) and which a process outside
/// this one can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// On tokio's clock.
    pub at: Instant,
    /// On `CLOCK_BOOTTIME`, in nanoseconds.
    pub boottime_ns: u64,
}

impl Deadline {
    /// `left` from now.
    pub fn after(left: Duration) -> Deadline {
        Deadline::after_moment(Instant::now(), boottime_ns(), left)
    }

    /// `left` after a moment read on both clocks (`at`, `at_boottime_ns`).
    pub fn after_moment(at: Instant, at_boottime_ns: u64, left: Duration) -> Deadline {
        let left_ns = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
        Deadline {
            at: at + left,
            boottime_ns: at_boottime_ns.saturating_add(left_ns),
        }
    }
}

/// Now on `CLOCK_BOOTTIME`, in nanoseconds.
pub fn boottime_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME exists on every supported kernel");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The instant by which a node stops its handlers unless its lease is
/// renewed (last renewal sent + TTL − margin), as it moves.
///
/// The node publishes a later deadline after each renewal, computed from
/// when the renewal was sent on both clocks, and the present instant when
/// it fences itself (its lease is gone or about to be: stop at once).
/// `None` means the work runs under no lease (a handler run by hand,
/// outside a node).
#[derive(Debug, Clone)]
pub struct FenceDeadline {
    inner: Fence,
}

/// A deadline that moves (the node's), or one that never does: the latter
/// needs no channel, which costs some 360 bytes of the heap per run (the
/// agent on its embedded store runs every process task without one).
#[derive(Debug, Clone)]
enum Fence {
    Fixed(Option<Deadline>),
    Moving(watch::Receiver<Option<Deadline>>),
}

impl FenceDeadline {
    /// A deadline that never comes, for handlers run outside a node.
    pub fn none() -> Self {
        FenceDeadline::fixed(None)
    }

    /// A deadline that never moves from `at`.
    pub fn fixed(at: Option<Deadline>) -> Self {
        // `changed` waits for ever.
        FenceDeadline {
            inner: Fence::Fixed(at),
        }
    }

    /// A deadline moved through the returned sender (the node keeps it).
    pub fn channel(at: Option<Deadline>) -> (watch::Sender<Option<Deadline>>, Self) {
        let (sender, receiver) = watch::channel(at);
        (
            sender,
            FenceDeadline {
                inner: Fence::Moving(receiver),
            },
        )
    }

    /// Whether the deadline can move (it came from [`FenceDeadline::channel`]):
    /// if not, [`FenceDeadline::changed`] never returns, and need not be
    /// waited for.
    pub fn moves(&self) -> bool {
        matches!(self.inner, Fence::Moving(_))
    }

    /// The deadline now, marking it seen.
    pub fn current(&mut self) -> Option<Deadline> {
        match &mut self.inner {
            Fence::Fixed(at) => *at,
            Fence::Moving(receiver) => *receiver.borrow_and_update(),
        }
    }

    /// Wait until the deadline moves, and return it. Never returns once the
    /// node is gone (the deadline last published stands), nor for a fixed
    /// deadline. Cancel-safe.
    pub async fn changed(&mut self) -> Option<Deadline> {
        let moved = match &mut self.inner {
            Fence::Moving(receiver) => receiver.changed().await.is_ok(),
            Fence::Fixed(_) => false,
        };
        if !moved {
            std::future::pending::<()>().await;
        }
        self.current()
    }
}

/// The node's registry of handlers waiting for task commands (one per node,
/// shared by every [`TaskContext`]).
#[derive(Debug, Clone, Default)]
pub struct CommandSignals {
    waiting: Arc<Mutex<HashMap<TaskId, Arc<Notify>>>>,
}

impl CommandSignals {
    /// Subscribe to commands for task `id` (a later subscription for the same
    /// task replaces this one).
    pub fn subscribe(&self, id: &TaskId) -> CommandSubscription {
        let notify = Arc::new(Notify::new());
        self.waiting
            .lock()
            .expect("not poisoned")
            .insert(id.clone(), notify.clone());
        CommandSubscription {
            signals: self.clone(),
            id: id.clone(),
            notify,
        }
    }

    /// A command for task `id` was queued: ring its subscription, if any.
    pub fn ring(&self, id: &TaskId) {
        if let Some(notify) = self.waiting.lock().expect("not poisoned").get(id) {
            // Stores a permit when nobody waits yet, so no ring is lost.
            notify.notify_one();
        }
    }
}

/// A subscription to one task's commands; unsubscribes when dropped.
#[derive(Debug)]
pub struct CommandSubscription {
    signals: CommandSignals,
    id: TaskId,
    notify: Arc<Notify>,
}

impl CommandSubscription {
    /// Wait until a command is queued for the task (at once if one was
    /// queued since the last wait).
    pub async fn rung(&self) {
        self.notify.notified().await
    }
}

impl Drop for CommandSubscription {
    fn drop(&mut self) {
        let mut waiting = self.signals.waiting.lock().expect("not poisoned");
        if waiting
            .get(&self.id)
            .is_some_and(|notify| Arc::ptr_eq(notify, &self.notify))
        {
            waiting.remove(&self.id);
            crate::sparse::Sparse::shrink_if_sparse(&mut *waiting);
        }
    }
}

/// How a handler run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerOutcome {
    /// The work is finished: store this result and retire the task.
    Done(Value),
    /// Give the task back unfinished; some node (maybe this one) runs it again.
    Release,
    /// The work failed for good: retire the task as failed with this reason.
    Failed(String),
    /// A kill command ended the task: retire it as killed.
    Killed,
}

/// The work of a task. One handler value serves every task of a node; each
/// run gets its own [`TaskContext`].
///
/// A panic inside `run` is caught and reported as [`HandlerOutcome::Failed`].
/// A handler that ignores cancellation is dropped after the node's grace
/// period and its task released.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Run one task until it is done, fails, or `ctx.cancel` fires.
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome;
}
