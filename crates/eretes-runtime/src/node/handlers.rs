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
    /// end window's transactions in flight; the rest wait their turn here.
    pub(super) fn write_run_ends(&mut self) {
        while !self.unfinished.is_empty() && self.finishing.len() < self.end_window {
            let take = self.unfinished.len().min(MAX_FINISH_BATCH);
            let batch: Vec<(Claim, RunEnd)> = self.unfinished.drain(..take).collect();
            let coordinator = self.coordinator.clone();
            self.finishing.push(off_loop(async move {
                let started = Instant::now();
                let results = coordinator.end_runs(&batch).await;
                let mut written = EndsWritten {
                    took: started.elapsed(),
                    groups: Vec::with_capacity(batch.len()),
                    failed: Vec::new(),
                };
                // Store errors are retried one by one; the rest are final.
                for ((claim, end), result) in batch.into_iter().zip(results) {
                    match result {
                        Ok(()) | Err(ProtocolError::NotOwner { .. }) => {
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

    /// A run-end transaction came back: pace the window by it, free the
    /// slots of the ends it wrote, and retry the ones it could not write.
    /// The retries run outside the window (each one end at a time, with its
    /// own backoff), so that an end the store keeps refusing cannot hold a
    /// window of one, and with it every other end of the node, for ever.
    pub(super) fn on_ends_written(&mut self, written: EndsWritten) {
        self.pace_run_ends(written.took);
        for group in &written.groups {
            self.release_slot(group);
        }
        for (claim, end) in written.failed {
            let coordinator = self.coordinator.clone();
            self.retrying_ends.push(off_loop(async move {
                end_with_retries(&coordinator, &claim, end).await;
                claim.record.spec.group.clone()
            }));
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
    /// transaction (its retries included) slower than a twentieth of the
    /// TTL halves the window, down to one; a quicker one grows it by one,
    /// up to [`MAX_END_TXNS_IN_FLIGHT`].
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
