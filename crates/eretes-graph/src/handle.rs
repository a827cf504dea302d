//! [`TaskHandle`]: what the framework gives a task's callbacks — its
//! identity and topology, and the calls that reach the rest of the job.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eretes_protocol::TaskId;
use tokio::sync::watch;

use tokio_util::sync::CancellationToken;

use crate::ids::{graph_task_id, JobEpoch, JobName};
use crate::jobs::EpochMove;
use crate::model::{GraphTask, JobSpec, Topology};
use crate::node::NodeShared;
use crate::proto::{data_reply, DataRequest};
use crate::GraphError;

/// The job epoch a run is in, and the token cancelled when it ends.
#[derive(Debug, Clone)]
pub(crate) struct EpochScope {
    pub epoch: JobEpoch,
    pub shutdown: bool,
    pub ended: CancellationToken,
}

/// One run of one graph task, shared by its handle, its event loop and the
/// data request server.
pub(crate) struct RunShared {
    pub node: Arc<NodeShared>,
    pub job: JobName,
    pub index: u32,
    pub id: TaskId,
    pub spec: Arc<JobSpec>,
    pub topology: Arc<dyn Topology>,
    /// The task's implementation.
    pub task: Arc<dyn GraphTask>,
    /// The claim (fencing) epoch of this run.
    pub claim_epoch: i64,
    /// The job epoch this run is in; moved by the node's dispatcher as soon as the
    /// store says so, before the task's `enter_epoch` is called.
    pub scope: watch::Sender<EpochScope>,
    /// What this run flagged last on each link (held across the write, so
    /// that it always agrees with the store).
    pub flagged: tokio::sync::Mutex<HashMap<String, (JobEpoch, String)>>,
    /// The job epoch the task's callbacks were last told (`enter_epoch`):
    /// what its calls act in. `scope` may be ahead of it.
    pub entered: Mutex<JobEpoch>,
    /// Its update log (jobs with backups).
    pub log: tokio::sync::Mutex<crate::backup::UpdateLog>,
    /// Cancelled when the run ends.
    pub ended: CancellationToken,
}

impl RunShared {
    /// Enter `epoch`: end the previous epoch's work at once.
    pub fn move_to(&self, epoch: JobEpoch, shutdown: bool) {
        self.scope.send_if_modified(|scope| {
            if epoch < scope.epoch || (epoch == scope.epoch && shutdown == scope.shutdown) {
                return false;
            }
            scope.ended.cancel();
            // A job that shut down has no epoch to work in: its scope is
            // over from the start, so that no call waits in it.
            let ended = self.ended.child_token();
            if shutdown {
                ended.cancel();
            }
            *scope = EpochScope {
                epoch,
                shutdown,
                ended,
            };
            true
        });
    }
}

/// A task's handle on its job, given to every callback.
#[derive(Clone)]
pub struct TaskHandle {
    pub(crate) run: Arc<RunShared>,
    /// For `serve_data`: the job epoch of the request it answers, whatever
    /// the task's callbacks were last told.
    pub(crate) pinned: Option<JobEpoch>,
}

impl TaskHandle {
    /// This task's index in its job (0..tasks).
    pub fn task_id(&self) -> u32 {
        self.run.index
    }

    /// The job.
    pub fn job(&self) -> &JobName {
        &self.run.job
    }

    /// How many tasks the job has.
    pub fn tasks(&self) -> u32 {
        self.run.spec.tasks
    }

    /// The job's record as started.
    pub fn spec(&self) -> &JobSpec {
        &self.run.spec
    }

    /// The job's topology.
    pub fn topology(&self) -> &Arc<dyn Topology> {
        &self.run.topology
    }

    /// This task's neighbours over `link` in the current job epoch.
    pub fn neighbours(&self, link: &str) -> Vec<u32> {
        self.run
            .topology
            .neighbours(link, self.run.index, self.epoch())
    }

    /// The job epoch this task is in: the last one its `enter_epoch` was
    /// called for. Its calls act in this epoch.
    ///
    /// In `serve_data` it is the job epoch of the request being answered.
    pub fn epoch(&self) -> JobEpoch {
        self.pinned
            .unwrap_or_else(|| *self.run.entered.lock().expect("not poisoned"))
    }

    /// The scope of the task's epoch: its token ends when that epoch does
    /// (already, if the job moved on before the task was told).
    fn scope(&self) -> EpochScope {
        let epoch = self.epoch();
        let scope = self.run.scope.borrow().clone();
        if scope.epoch == epoch {
            return scope;
        }
        let ended = CancellationToken::new();
        ended.cancel();
        EpochScope {
            epoch,
            shutdown: scope.shutdown,
            ended,
        }
    }

    /// The claim (fencing) epoch of this run of the task: larger for every
    /// later run. Not the job epoch.
    pub fn claim_epoch(&self) -> i64 {
        self.run.claim_epoch
    }

    /// Resolves when the task's job epoch ends (or the run does).
    pub async fn epoch_ended(&self) {
        self.scope().ended.cancelled().await
    }

    /// Notify every neighbour over `link` of `meta`, in the current job
    /// epoch. Flagging again what this run flagged last on the link in this
    /// epoch does nothing (and receivers deliver each value once anyway).
    pub async fn flag_meta(&self, link: &str, meta: &str) -> Result<(), GraphError> {
        if !self.run.topology.links().iter().any(|known| known == link) {
            return Err(GraphError::Invalid(format!(
                "link {link:?} is not one of the job's topology: {:?}",
                self.run.topology.links()
            )));
        }
        let epoch = self.epoch();
        let last = (epoch, meta.to_string());
        let mut flagged = self.run.flagged.lock().await;
        if flagged.get(link) == Some(&last) {
            return Ok(());
        }
        self.run
            .node
            .jobs
            .flag_meta(
                &self.run.job,
                self.run.index,
                self.run.claim_epoch,
                link,
                epoch,
                meta,
            )
            .await?;
        flagged.insert(link.to_string(), last);
        Ok(())
    }

    /// Move the job to the next epoch, from the one this task is in, under
    /// the run's claim. Losing the race (another task moved it first) is an
    /// ordinary answer; a run that no longer owns its task gets
    /// [`GraphError::Fenced`] and moves nothing.
    pub async fn inc_epoch(&self) -> Result<EpochMove, GraphError> {
        let fence = Some((&self.run.id, self.run.claim_epoch));
        let jobs = &self.run.node.jobs;
        jobs.inc_epoch_fenced(&self.run.job, self.epoch(), fence)
            .await
    }

    /// End the job, under the run's claim: every task gets `exit` and its
    /// run ends as done. [`GraphError::Fenced`] if the run lost its task.
    pub async fn shutdown_job(&self) -> Result<EpochMove, GraphError> {
        let fence = Some((&self.run.id, self.run.claim_epoch));
        let jobs = &self.run.node.jobs;
        jobs.shutdown_fenced(&self.run.job, self.epoch(), fence)
            .await
    }

    /// Run `call` again while it fails because the store could not be
    /// reached (backing off 50 ms → 1 s), until it succeeds, fails for
    /// another reason (fenced, invalid, …), or this task's epoch ends
    /// ([`GraphError::EpochEnded`] / [`GraphError::JobEnded`]). For the
    /// calls whose failure a task cannot leave to its next run: a store
    /// outage leaves no next run, only a stalled job.
    pub async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, GraphError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, GraphError>>,
    {
        let scope = self.scope();
        let mut pause = Duration::from_millis(50);
        loop {
            match call().await {
                Err(GraphError::Store(_))
                | Err(GraphError::Protocol(eretes_protocol::ProtocolError::Store(_))) => {}
                other => return other,
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = scope.ended.cancelled() => return Err(self.ended_error(scope.epoch)),
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Save this task's checkpoint under the run's claim; the next run after
    /// a failover gets it in `init`.
    pub async fn checkpoint(&self, bytes: &[u8]) -> Result<(), GraphError> {
        let coordinator = self.run.node.jobs.coordinator();
        match coordinator
            .save_checkpoint(&self.run.id, self.run.claim_epoch, bytes)
            .await
        {
            Err(eretes_protocol::ProtocolError::NotOwner { .. }) => {
                Err(GraphError::Fenced(self.run.id.to_string()))
            }
            other => other.map_err(GraphError::from),
        }
    }

    /// Ask task `to` for data: sent to whichever node runs it now, retried
    /// across failovers (re-resolving the owner, with backoff), answered
    /// once per run of `to`. Fails with [`GraphError::EpochEnded`] once the
    /// job epoch moves on (an answer that arrives later is dropped), and
    /// with [`GraphError::DataFailed`] if `to` refused it.
    pub async fn data_request(
        &self,
        to: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, GraphError> {
        let scope = self.scope();
        if to >= self.run.spec.tasks {
            return Err(GraphError::Invalid(format!(
                "task {to} is not in job {} of {} tasks",
                self.run.job, self.run.spec.tasks
            )));
        }
        let node = &self.run.node;
        let stats = &node.stats;
        stats.data_requests.fetch_add(1, Ordering::Relaxed);
        let request = DataRequest {
            job: self.run.job.to_string(),
            from: self.run.index,
            to,
            job_epoch: scope.epoch.0,
            request_id: rand::random(),
            method: method.to_string(),
            input,
        };
        let target = graph_task_id(&self.run.job, to);
        let mut pause = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            if scope.ended.is_cancelled() {
                return Err(self.ended_error(scope.epoch));
            }
            let reply = tokio::select! {
                reply = node.call(&target, request.clone()) => reply,
                () = scope.ended.cancelled() => return Err(self.ended_error(scope.epoch)),
            };
            match reply {
                Ok(data_reply::Outcome::Output(output)) => {
                    if scope.ended.is_cancelled() {
                        stats.stale_answers_dropped.fetch_add(1, Ordering::Relaxed);
                        return Err(self.ended_error(scope.epoch));
                    }
                    return Ok(output);
                }
                Ok(data_reply::Outcome::Failed(message)) => {
                    return Err(GraphError::DataFailed(message));
                }
                Ok(data_reply::Outcome::Refused(refusal)) => {
                    tracing::debug!(from = %self.run.id, %target, reason = refusal.reason, "data request refused; retrying");
                    stats.data_retries.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::debug!(from = %self.run.id, %target, error, "data request failed; retrying");
                    stats.data_retries.fetch_add(1, Ordering::Relaxed);
                }
            }
            attempts += 1;
            if attempts.is_multiple_of(8) {
                // Failing for a while: make sure the job has not moved on
                // without this node's view saying so yet.
                if let Ok(Some(record)) = node.jobs.epoch(&self.run.job).await {
                    self.run.move_to(record.epoch, record.shutdown);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = scope.ended.cancelled() => return Err(self.ended_error(scope.epoch)),
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn ended_error(&self, epoch: JobEpoch) -> GraphError {
        let now = self.run.scope.borrow().clone();
        if now.shutdown {
            GraphError::JobEnded(self.run.job.to_string())
        } else if self.run.ended.is_cancelled() && now.epoch == epoch {
            // Not the epoch: the run itself ended (released, fenced, drained).
            GraphError::RunEnded(self.run.id.to_string())
        } else {
            GraphError::EpochEnded {
                requested: epoch,
                now: now.epoch,
            }
        }
    }
}
