//! Handlers: starting a claimed task's run, stopping it, and writing how
//! it ended (fenced by its epoch, many ends per transaction).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use eretes_protocol::{Claim, Coordinator, ProtocolError, RunEnd, TaskId, MAX_FINISH_BATCH};
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
    /// Each end it carried, with its outcome.
    ends: Vec<EndTried>,
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
                let took = started.elapsed();
                let ends = batch
                    .into_iter()
                    .zip(results)
                    .map(|((claim, end), result)| EndTried {
                        end: EndToRetry {
                            claim,
                            end,
                            wait: Duration::ZERO,
                            attempt: 0,
                        },
                        result,
                    })
                    .collect();
                EndsWritten { took, ends }
            }));
        }
    }

    /// A run-end transaction came back: pace the window by it (one that
    /// failed counts as slow: a store that refuses writes is not one to
    /// send more to), then settle each of its ends.
    pub(super) fn on_ends_written(&mut self, EndsWritten { took, ends }: EndsWritten) {
        let failed = ends
            .iter()
            .any(|tried| !matches!(tried.result, Ok(()) | Err(ProtocolError::NotOwner { .. })));
        self.pace_run_ends(if failed { self.config.lease_ttl } else { took });
        for tried in ends {
            self.settle_end(tried);
        }
    }

    /// An end came back from the store, from its transaction or a retry.
    /// Written, or refused because another node owns the task now (final
    /// and harmless): its slot is free, and a written release holds the
    /// task back from this node's claims for the full ignore time from now
    /// (the end may have waited in the queue). Refused by the store: it
    /// goes to the back of the retry queue, first after 50 ms, then twice
    /// the wait each time, so an end the store keeps refusing takes a
    /// retry slot for one try at a time and the others behind it get
    /// theirs. Retried for as long as the node holds the task: giving up
    /// would leave the owner record under a live lease and strand the task.
    pub(super) fn settle_end(
        &mut self,
        EndTried {
            end: mut pending,
            result,
        }: EndTried,
    ) {
        match result {
            Ok(()) => {
                if pending.end == RunEnd::Released {
                    let delay = self.config.release_ignore;
                    self.ignore_for(&pending.claim.task, delay);
                }
                self.release_slot(&pending.claim.record.spec.group);
            }
            Err(ProtocolError::NotOwner { .. }) => {
                debug!(task = %pending.claim.task, epoch = pending.claim.epoch, "run end refused: no longer the owner");
                self.release_slot(&pending.claim.record.spec.group);
            }
            Err(error) => {
                pending.attempt += 1;
                warn!(task = %pending.claim.task, attempt = pending.attempt, %error, "could not record the end of a run; retrying");
                pending.wait = if pending.wait.is_zero() {
                    FIRST_END_RETRY_WAIT
                } else {
                    (pending.wait * 2).min(MAX_END_RETRY_WAIT)
                };
                self.ends_to_retry.push_back(pending);
            }
        }
    }

    /// Start the retries of ends a transaction could not write, each one
    /// end on its own after its wait, at most [`MAX_END_TXNS_IN_FLIGHT`] at
    /// once. They have slots of their own, apart from the end window, and
    /// an end refused again goes to the back of the queue
    /// ([`MainLoop::settle_end`]): an end the store keeps refusing
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

/// A run end still to be written, and how long to wait before its next
/// try on its own.
pub(super) struct EndToRetry {
    claim: Claim,
    end: RunEnd,
    /// Zero until a try failed.
    wait: Duration,
    /// Tries that failed so far, for the log.
    attempt: u64,
}

/// One try of an end, and its outcome.
pub(super) struct EndTried {
    end: EndToRetry,
    result: Result<(), ProtocolError>,
}

/// Wait, then try to write one end. Fencing, shutdown's timeout or a kill
/// drop this future; the main loop queues the end again if it failed.
async fn retry_end(coordinator: Coordinator, retry: EndToRetry) -> EndTried {
    tokio::time::sleep(retry.wait).await;
    let result = coordinator.end_run(&retry.claim, retry.end.clone()).await;
    EndTried { end: retry, result }
}
