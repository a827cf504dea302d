//! Master/worker frames: the common star shape on top of the graph model.
//! Task 0 of a job is the **master**, tasks 1..N its **workers**. The
//! master notifies a worker and gets its answer
//! ([`MasterFrame::notify_worker`]); a worker notifies the master
//! ([`WorkerFrame::notify_master`]) and asks other workers for data
//! ([`WorkerFrame::request_peer`]). Every notification is a data request,
//! so it has their guarantees: it reaches the current run of its target,
//! is retried across failovers, is answered once per run, and ends with
//! the job epoch.
//!
//! ```
//! use std::sync::Arc;
//! use eretes_graph::frames::{Star, StarKind};
//! use eretes_graph::{JobEpoch, Topology};
//!
//! let star = Star { tasks: 4 };
//! assert_eq!(star.neighbours("workers", 0, JobEpoch(0)), vec![1, 2, 3]);
//! assert_eq!(star.neighbours("master", 2, JobEpoch(0)), vec![0]);
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::handle::TaskHandle;
use crate::ids::JobEpoch;
use crate::jobs::EpochMove;
use crate::model::{GraphTask, JobKind, JobSpec, Topology};
use crate::GraphError;

/// The link from a worker to the master.
pub const MASTER: &str = "master";
/// The links from the master to every worker.
pub const WORKERS: &str = "workers";
/// The links from a worker to every other worker.
pub const PEERS: &str = "peers";

/// The star: task 0 the master, 1..tasks the workers.
pub struct Star {
    /// Tasks in the job, master included.
    pub tasks: u32,
}

impl Topology for Star {
    fn links(&self) -> Vec<String> {
        vec![MASTER.into(), WORKERS.into(), PEERS.into()]
    }

    fn neighbours(&self, link: &str, task: u32, _epoch: JobEpoch) -> Vec<u32> {
        match (link, task) {
            (MASTER, 1..) => vec![0],
            (WORKERS, 0) => (1..self.tasks).collect(),
            (PEERS, 1..) => (1..self.tasks).filter(|&peer| peer != task).collect(),
            _ => Vec::new(),
        }
    }
}

/// What the master's frame offers.
#[derive(Clone)]
pub struct MasterFrame {
    task: TaskHandle,
}

impl MasterFrame {
    /// The workers' ids.
    pub fn workers(&self) -> Vec<u32> {
        (1..self.task.tasks()).collect()
    }

    /// The job epoch the master is in.
    pub fn epoch(&self) -> JobEpoch {
        self.task.epoch()
    }

    /// Notify worker `worker` and wait for its answer (its
    /// [`Worker::master_notified`]).
    pub async fn notify_worker(
        &self,
        worker: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, GraphError> {
        if worker == 0 || worker >= self.task.tasks() {
            return Err(GraphError::Invalid(format!("{worker} is not a worker")));
        }
        self.task
            .data_request(worker, &format!("master:{method}"), input)
            .await
    }

    /// Move the job to the next epoch.
    pub async fn inc_epoch(&self) -> Result<EpochMove, GraphError> {
        self.task.inc_epoch().await
    }

    /// End the job.
    pub async fn shutdown_job(&self) -> Result<EpochMove, GraphError> {
        self.task.shutdown_job().await
    }

    /// Save the master's checkpoint.
    pub async fn checkpoint(&self, bytes: &[u8]) -> Result<(), GraphError> {
        self.task.checkpoint(bytes).await
    }

    /// The task handle underneath, for everything else.
    pub fn task(&self) -> &TaskHandle {
        &self.task
    }
}

/// What a worker's frame offers.
#[derive(Clone)]
pub struct WorkerFrame {
    task: TaskHandle,
}

impl WorkerFrame {
    /// This worker's id (1..tasks).
    pub fn worker_id(&self) -> u32 {
        self.task.task_id()
    }

    /// The job epoch the worker is in.
    pub fn epoch(&self) -> JobEpoch {
        self.task.epoch()
    }

    /// Notify the master and wait for its answer (its
    /// [`Master::worker_notified`]).
    pub async fn notify_master(&self, method: &str, input: Vec<u8>) -> Result<Vec<u8>, GraphError> {
        self.task
            .data_request(0, &format!("worker:{method}"), input)
            .await
    }

    /// Ask worker `peer` for data (its [`Worker::serve_peer`]).
    pub async fn request_peer(
        &self,
        peer: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, GraphError> {
        if peer == 0 || peer >= self.task.tasks() || peer == self.worker_id() {
            return Err(GraphError::Invalid(format!("{peer} is not a peer")));
        }
        self.task
            .data_request(peer, &format!("peer:{method}"), input)
            .await
    }

    /// Save the worker's checkpoint.
    pub async fn checkpoint(&self, bytes: &[u8]) -> Result<(), GraphError> {
        self.task.checkpoint(bytes).await
    }

    /// The task handle underneath, for everything else.
    pub fn task(&self) -> &TaskHandle {
        &self.task
    }
}

/// The master of a star job.
#[async_trait]
pub trait Master: Send + Sync + 'static {
    /// Bring the master up (with its checkpoint after a failover).
    async fn init(&self, _frame: &MasterFrame, _checkpoint: Option<Vec<u8>>) {}
    /// The job entered `epoch`: typically, notify the workers and gather
    /// their answers, then move the job on.
    async fn enter_epoch(&self, frame: &MasterFrame, epoch: JobEpoch);
    /// Worker `worker` notified the master; the answer goes back to it.
    async fn worker_notified(
        &self,
        _frame: &MasterFrame,
        worker: u32,
        method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err(format!(
            "the master takes no {method:?} from worker {worker}"
        ))
    }
    /// A worker's run was lost.
    async fn worker_failed(&self, _frame: &MasterFrame, _worker: u32) {}
    /// The master's result when the job ends.
    async fn result(&self, _frame: &MasterFrame) -> Value {
        Value::Null
    }
}

/// A worker of a star job.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// Bring the worker up (with its checkpoint after a failover).
    async fn init(&self, _frame: &WorkerFrame, _checkpoint: Option<Vec<u8>>) {}
    /// The job entered `epoch`.
    async fn enter_epoch(&self, _frame: &WorkerFrame, _epoch: JobEpoch) {}
    /// The master notified this worker; the answer goes back to it.
    async fn master_notified(
        &self,
        frame: &WorkerFrame,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String>;
    /// Worker `peer` asks for data.
    async fn serve_peer(
        &self,
        _frame: &WorkerFrame,
        peer: u32,
        method: &str,
        _input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        Err(format!(
            "worker {peer} asked for {method:?}, which this worker does not serve"
        ))
    }
    /// The master's run was lost.
    async fn master_failed(&self, _frame: &WorkerFrame) {}
    /// The worker's result when the job ends.
    async fn result(&self, _frame: &WorkerFrame) -> Value {
        Value::Null
    }
}

/// Builds a star job's master and workers.
type MasterBuilder = dyn Fn(&JobSpec) -> Arc<dyn Master> + Send + Sync;
type WorkerBuilder = dyn Fn(&JobSpec, u32) -> Arc<dyn Worker> + Send + Sync;

/// A [`JobKind`] of star jobs: register it under a kind name on every node.
pub struct StarKind {
    master: Box<MasterBuilder>,
    worker: Box<WorkerBuilder>,
}

impl StarKind {
    /// A star kind whose master and workers `master` and `worker` build.
    pub fn new(
        master: impl Fn(&JobSpec) -> Arc<dyn Master> + Send + Sync + 'static,
        worker: impl Fn(&JobSpec, u32) -> Arc<dyn Worker> + Send + Sync + 'static,
    ) -> StarKind {
        StarKind {
            master: Box::new(master),
            worker: Box::new(worker),
        }
    }
}

impl JobKind for StarKind {
    fn topology(&self, job: &JobSpec) -> Arc<dyn Topology> {
        Arc::new(Star { tasks: job.tasks })
    }

    fn build(&self, job: &JobSpec, index: u32) -> Arc<dyn GraphTask> {
        if index == 0 {
            Arc::new(MasterTask((self.master)(job)))
        } else {
            Arc::new(WorkerTask((self.worker)(job, index)))
        }
    }
}

struct MasterTask(Arc<dyn Master>);
struct WorkerTask(Arc<dyn Worker>);

fn master(task: &TaskHandle) -> MasterFrame {
    MasterFrame { task: task.clone() }
}

fn worker(task: &TaskHandle) -> WorkerFrame {
    WorkerFrame { task: task.clone() }
}

#[async_trait]
impl GraphTask for MasterTask {
    async fn init(&self, task: &TaskHandle, checkpoint: Option<Vec<u8>>) {
        self.0.init(&master(task), checkpoint).await;
    }
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        self.0.enter_epoch(&master(task), epoch).await;
    }
    async fn serve_data(
        &self,
        task: &TaskHandle,
        from: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        match method.strip_prefix("worker:") {
            Some(method) => {
                self.0
                    .worker_notified(&master(task), from, method, input)
                    .await
            }
            None => Err(format!("the master serves notifications, not {method:?}")),
        }
    }
    async fn neighbour_failed(&self, task: &TaskHandle, link: &str, id: u32) {
        if link == WORKERS {
            self.0.worker_failed(&master(task), id).await;
        }
    }
    async fn result(&self, task: &TaskHandle) -> Value {
        self.0.result(&master(task)).await
    }
}

#[async_trait]
impl GraphTask for WorkerTask {
    async fn init(&self, task: &TaskHandle, checkpoint: Option<Vec<u8>>) {
        self.0.init(&worker(task), checkpoint).await;
    }
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        self.0.enter_epoch(&worker(task), epoch).await;
    }
    async fn serve_data(
        &self,
        task: &TaskHandle,
        from: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        if let Some(method) = method.strip_prefix("master:").filter(|_| from == 0) {
            return self.0.master_notified(&worker(task), method, input).await;
        }
        match method.strip_prefix("peer:") {
            Some(method) if from != 0 => {
                self.0.serve_peer(&worker(task), from, method, input).await
            }
            _ => Err(format!(
                "a worker serves the master's and its peers' requests, not {method:?} from {from}"
            )),
        }
    }
    async fn neighbour_failed(&self, task: &TaskHandle, link: &str, _id: u32) {
        if link == MASTER {
            self.0.master_failed(&worker(task)).await;
        }
    }
    async fn result(&self, task: &TaskHandle) -> Value {
        self.0.result(&worker(task)).await
    }
}

/// The frames' worked example (`cargo run -p eretes-graph --example star`):
/// in job epoch e the master notifies every worker; worker w asks its next
/// peer for that peer's id and answers e × w + that id; the master checks
/// that the answers sum to (e + 1) × (1 + … + N−1), then moves on, and shuts
/// the job down after `properties.epochs` epochs. Its result is the epochs
/// it checked.
pub mod example {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use serde_json::{json, Value};

    use super::{Master, MasterFrame, StarKind, Worker, WorkerFrame};
    use crate::ids::JobEpoch;
    use crate::model::JobSpec;

    /// The example's job kind.
    pub fn kind() -> StarKind {
        StarKind::new(
            |job| {
                Arc::new(SumMaster {
                    epochs: job.properties["epochs"].as_u64().unwrap_or(3),
                    checked: Mutex::new(BTreeSet::new()),
                }) as Arc<dyn Master>
            },
            |job: &JobSpec, _| Arc::new(SumWorker { tasks: job.tasks }) as Arc<dyn Worker>,
        )
    }

    struct SumMaster {
        epochs: u64,
        checked: Mutex<BTreeSet<u64>>,
    }

    #[async_trait]
    impl Master for SumMaster {
        async fn init(&self, _frame: &MasterFrame, checkpoint: Option<Vec<u8>>) {
            if let Some(saved) = checkpoint.and_then(|c| serde_json::from_slice(&c).ok()) {
                *self.checked.lock().expect("not poisoned") = saved;
            }
        }

        async fn enter_epoch(&self, frame: &MasterFrame, epoch: JobEpoch) {
            let mut sum = 0;
            for worker in frame.workers() {
                let input = epoch.0.to_le_bytes().to_vec();
                let Ok(answer) = frame.notify_worker(worker, "compute", input).await else {
                    return; // the epoch ended: a later run of the master redoes it
                };
                let Ok(bytes) = <[u8; 8]>::try_from(answer.as_slice()) else {
                    return;
                };
                sum += u64::from_le_bytes(bytes);
            }
            let workers: u64 = frame.workers().iter().map(|&w| u64::from(w)).sum();
            if sum != (epoch.0 + 1) * workers {
                return; // never checked: the run reports it by its result
            }
            let saved = {
                let mut checked = self.checked.lock().expect("not poisoned");
                checked.insert(epoch.0);
                serde_json::to_vec(&*checked).expect("plain data")
            };
            let task = frame.task();
            if task.retrying(|| task.checkpoint(&saved)).await.is_err() {
                return;
            }
            let _ = if epoch.0 + 1 < self.epochs {
                task.retrying(|| task.inc_epoch()).await
            } else {
                task.retrying(|| task.shutdown_job()).await
            };
        }

        async fn result(&self, _frame: &MasterFrame) -> Value {
            json!({ "checked": *self.checked.lock().expect("not poisoned") })
        }
    }

    struct SumWorker {
        tasks: u32,
    }

    #[async_trait]
    impl Worker for SumWorker {
        async fn master_notified(
            &self,
            frame: &WorkerFrame,
            method: &str,
            input: Vec<u8>,
        ) -> Result<Vec<u8>, String> {
            if method != "compute" {
                return Err(format!("unknown method {method:?}"));
            }
            let epoch = <[u8; 8]>::try_from(input.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| "the input is the epoch, 8 bytes".to_string())?;
            let me = frame.worker_id();
            let next = me % (self.tasks - 1) + 1;
            let peer = if next == me {
                u64::from(me)
            } else {
                let answer = frame
                    .request_peer(next, "id", Vec::new())
                    .await
                    .map_err(|e| e.to_string())?;
                u64::from_le_bytes(<[u8; 8]>::try_from(answer.as_slice()).map_err(|_| "8 bytes")?)
            };
            Ok((epoch * u64::from(me) + peer).to_le_bytes().to_vec())
        }

        async fn serve_peer(
            &self,
            frame: &WorkerFrame,
            _peer: u32,
            method: &str,
            _input: Vec<u8>,
        ) -> Result<Vec<u8>, String> {
            match method {
                "id" => Ok(u64::from(frame.worker_id()).to_le_bytes().to_vec()),
                other => Err(format!("unknown method {other:?}")),
            }
        }
    }
}
