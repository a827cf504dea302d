//! The handler API: what a task's work looks like to the runtime.

use std::sync::Arc;

use async_trait::async_trait;
use eretes_protocol::{NodeName, TaskId, TaskRecord};
use serde_json::Value;
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
