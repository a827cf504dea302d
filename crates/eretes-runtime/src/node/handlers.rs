//! Handlers: starting a claimed task's run, stopping it, and writing how
//! it ended (fenced by its epoch, many ends per transaction).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use eretes_protocol::{
    Claim, Coordinator, GroupName, ProtocolError, RunEnd, TaskId, MAX_FINISH_BATCH,
};
use eretes_store::Revision;
use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::balancer::RunningTask;
use crate::handler::{HandlerOutcome, TaskContext};
use crate::sparse::Sparse;
use crate::stats::NodeStats;

use super::{off_loop, panic_message, Exit, MainLoop, Running, StopReason};

/// The most run-end transactions (of up to [`MAX_FINISH_BATCH`] ends each)
/// a node has in flight at once: 128 ends, as many as its claims.
pub(super) const MAX_END_TXNS_IN_FLIGHT: usize = 8;

/// What one run-end transaction came back with.
pub(super) struct EndsWritten {
    /// How long the store took to answer it.
    took: Duration,
    /// The groups of the runs it ended (or found ended by another owner):
    /// their slots are free.
    groups: Vec<GroupName>,
    /// The tasks whose release it wrote.
    released: Vec<TaskId>,
    /// The runs whose ends it could not write, to retry one by one.
    failed: Vec<(Claim, RunEnd)>,
}

impl MainLoop {
    pub(super) fn start_handler(&mut self, claim: Claim) {
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

    pub(super) fn stop_task(&mut self, id: &TaskId, reason: StopReason) {
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

    pub(super) fn on_handler_exit(&mut self, id: TaskId, exit: Exit) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        self.running.shrink_if_sparse();
        let group = running.claim.record.spec.group.clone();
        let task = self.cache.view.running.remove(&id);
        self.cache.view.running.shrink_if_sparse();
        if let Some(task) = task {
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
    pub(super) fn finish(&mut self, claim: Claim, end: RunEnd) {
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

    /// Write the queued run ends, many per transaction, with at most the
    /// end window's transactions in flight (all of [`MAX_END_TXNS_IN_FLIGHT`]
    /// while shutting down, which has a deadline); the rest wait their turn
    /// here. Then start the retries that have a retry slot.
    pub(super) fn write_run_ends(&mut self) {
        self.retry_run_ends();
        let window = if self.shutting_down.is_some() {
            MAX_END_TXNS_IN_FLIGHT
        } else {
            self.end_window
        };
        while !self.unfinished.is_empty() && self.finishing.len() < window {
            let take = self.unfinished.len().min(MAX_FINISH_BATCH);
            let batch: Vec<(Claim, RunEnd)> = self.unfinished.drain(..take).collect();
            let coordinator = self.coordinator.clone();
            self.finishing.push(off_loop(async move {
                let started = Instant::now();
                let results = coordinator.end_runs(&batch).await;
                let mut written = EndsWritten {
                    took: started.elapsed(),
                    groups: Vec::with_capacity(batch.len()),
                    released: Vec::new(),
                    failed: Vec::new(),
                };
                // Store errors are retried one by one; the rest are final.
                for ((claim, end), result) in batch.into_iter().zip(results) {
                    match result {
                        Ok(()) | Err(ProtocolError::NotOwner { .. }) => {
                            if result.is_ok() && end == RunEnd::Released {
                                written.released.push(claim.task.clone());
                            }
                            written.groups.push(claim.record.spec.group.clone());
                        }
                        Err(error) => {
                            warn!(task = %claim.task, %error, "could not record the end of a run; retrying");
                            written.failed.push((claim, end));
                        }
                    }
                }
                written
            }));
        }
    }

    /// A run-end transaction came back: pace the window by it (one that
    /// failed counts as slow: a store that refuses writes is not one to
    /// send more to), free the slots of the ends it wrote, hold back what
    /// it released from this node's claims for the release's full ignore
    /// time from now (the end may have waited in the queue), and queue the
    /// ends it could not write for a retry.
    pub(super) fn on_ends_written(&mut self, written: EndsWritten) {
        let took = if written.failed.is_empty() {
            written.took
        } else {
            self.config.lease_ttl
        };
        self.pace_run_ends(took);
        for group in &written.groups {
            self.release_slot(group);
        }
        let delay = self.config.release_ignore;
        for id in &written.released {
            self.ignore_for(id, delay);
        }
        self.ends_to_retry
            .extend(written.failed.into_iter().map(|(claim, end)| EndToRetry {
                claim,
                end,
                wait: FIRST_END_RETRY_WAIT,
                attempt: 1,
            }));
    }

    /// A retried end came back. Written, or refused because another node
    /// owns the task now (final and harmless): its slot is free. Refused
    /// by the store again: it goes to the back of the queue with twice the
    /// wait, so an end the store keeps refusing takes a retry slot for one
    /// try at a time and the others behind it get theirs. Retried for as
    /// long as the node holds the task: giving up would leave the owner
    /// record under a live lease and strand the task.
    pub(super) fn on_end_retried(&mut self, EndRetried { mut retry, result }: EndRetried) {
        match result {
            Ok(()) | Err(ProtocolError::NotOwner { .. }) => {
                if let Err(ProtocolError::NotOwner { .. }) = result {
                    debug!(task = %retry.claim.task, epoch = retry.claim.epoch, "run end refused: no longer the owner");
                } else if retry.end == RunEnd::Released {
                    let delay = self.config.release_ignore;
                    self.ignore_for(&retry.claim.task, delay);
                }
                self.release_slot(&retry.claim.record.spec.group);
            }
            Err(error) => {
                warn!(task = %retry.claim.task, attempt = retry.attempt, %error, "could not record the end of a run; retrying");
                retry.attempt += 1;
                retry.wait = (retry.wait * 2).min(MAX_END_RETRY_WAIT);
                self.ends_to_retry.push_back(retry);
            }
        }
    }

    /// Start the retries of ends a transaction could not write, each one
    /// end on its own after its wait, at most [`MAX_END_TXNS_IN_FLIGHT`] at
    /// once. They have slots of their own, apart from the end window, and
    /// an end refused again goes to the back of the queue
    /// ([`MainLoop::on_end_retried`]): an end the store keeps refusing
    /// would otherwise hold a window shrunk to one, and with it every other
    /// end of the node, for ever.
    fn retry_run_ends(&mut self) {
        while self.retrying_ends.len() < MAX_END_TXNS_IN_FLIGHT {
            let Some(retry) = self.ends_to_retry.pop_front() else {
                return;
            };
            self.retrying_ends
                .push(off_loop(retry_end(self.coordinator.clone(), retry)));
        }
    }

    /// Fewer run-end transactions in flight while the store is slow to
    /// answer them, more again when it is quick: the same rule as the
    /// claims' window ([`MainLoop::pace_claims`]), and for the same reason.
    /// When a node rejoins a cluster of 100,000 tasks on etcd, each of nine
    /// nodes releases some 1,100 tasks at once; sent all together, their
    /// 630 transactions kept etcd's apply queue long enough that every
    /// node's lease renewal failed ("waiting for the applied index took
    /// too long") and all ten fenced themselves, which released more. A
    /// transaction slower than a twentieth of the TTL, or one that failed,
    /// halves the window, down to one; a quicker one grows it by one, up to
    /// [`MAX_END_TXNS_IN_FLIGHT`].
    pub(super) fn pace_run_ends(&mut self, took: Duration) {
        self.end_window = if took > self.config.lease_ttl / 20 {
            (self.end_window / 2).max(1)
        } else {
            (self.end_window + 1).min(MAX_END_TXNS_IN_FLIGHT)
        };
        self.stats
            .end_window
            .store(self.end_window as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// A cancelled handler's grace period is over: abort it if that run
    /// still has not returned.
    pub(super) fn on_grace_over(&mut self, id: TaskId, epoch: Revision) {
        let overdue = self
            .running
            .get(&id)
            .is_some_and(|r| r.claim.epoch == epoch && r.stop.is_some());
        if overdue {
            warn!(node = %self.config.name, task = %id, grace = ?self.config.handler_grace, "handler ignored cancellation past its grace period; aborting it");
            self.abort_handler(id);
        }
    }

    pub(super) fn abort_handler(&mut self, id: TaskId) {
        if let Some(running) = self.running.get(&id) {
            running.abort.abort();
            self.aborted.insert(running.abort.id(), id);
        }
    }
}

/// The first wait before an end a transaction could not write is tried
/// again on its own; each failure doubles it, up to [`MAX_END_RETRY_WAIT`].
const FIRST_END_RETRY_WAIT: Duration = Duration::from_millis(50);

/// The longest wait between two tries of an end the store refused.
const MAX_END_RETRY_WAIT: Duration = Duration::from_secs(5);

/// An end waiting to be tried again on its own, and how long to wait first.
pub(super) struct EndToRetry {
    claim: Claim,
    end: RunEnd,
    wait: Duration,
    /// Tries so far, for the log.
    attempt: u64,
}

/// One retry's outcome.
pub(super) struct EndRetried {
    retry: EndToRetry,
    result: Result<(), ProtocolError>,
}

/// Wait, then try to write one end. Fencing, shutdown's timeout or a kill
/// drop this future; the main loop queues the end again if it failed.
async fn retry_end(coordinator: Coordinator, retry: EndToRetry) -> EndRetried {
    tokio::time::sleep(retry.wait).await;
    let result = coordinator.end_run(&retry.claim, retry.end.clone()).await;
    EndRetried { retry, result }
}
