//! taskgraph's regression, the worked example: tasks in a binary tree; in
//! job epoch e, task i's gradient is e × i plus the sum of its children's
//! gradients, which it fetches by data requests once each child has
//! flagged meta. The root checks that it sees e × N(N−1)/2, then moves the
//! job to the next epoch, and after the last one shuts the job down.
//!
//! The counters are shared by every task built by one [`Regression`] (the
//! in-process driver reads them); the root also keeps its findings in its
//! checkpoint and every task reports its own as its result, which is what a
//! driver of node processes reads. A run that restarts after a failover
//! recomputes its epoch, so nothing is lost, and a sum is only counted
//! wrong if it is. The root's findings go through its update log
//! ([`TaskHandle::update`]), so with backups (`--backups 1`) a backup of
//! the root takes over with them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::handle::TaskHandle;
use crate::ids::JobEpoch;
use crate::model::{GraphTask, JobKind, JobSpec, Topology};

/// The link to a task's parent.
pub const PARENT: &str = "parent";
/// The links to a task's children.
pub const CHILDREN: &str = "children";

/// What the regression's tasks counted.
#[derive(Debug, Default)]
pub struct RegressionStats {
    /// Epochs whose root sum was checked and right (each counted once).
    pub verified: Mutex<BTreeSet<u64>>,
    /// Root sums that were wrong.
    pub wrong_sums: AtomicU64,
    /// Meta a task received twice in one run (the framework promises 0).
    pub meta_duplicates: AtomicU64,
}

/// The regression job kind: a binary tree of the job's tasks, run for the
/// job's `properties.epochs` epochs (0..epochs; 10 when absent).
#[derive(Default)]
pub struct Regression {
    /// What the tasks it built in this process counted.
    pub stats: Arc<RegressionStats>,
}

impl Regression {
    /// The regression kind, with fresh counters.
    pub fn new() -> Regression {
        Regression::default()
    }

    /// The properties of a regression job of `epochs` epochs.
    pub fn properties(epochs: u64) -> serde_json::Value {
        serde_json::json!({ "epochs": epochs })
    }
}

/// What the root keeps in its checkpoint, and every task reports as its
/// result when the job ends: the run's own findings, and the root's
/// verifications over all its runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Findings {
    /// Epochs whose sum the root found right.
    #[serde(default)]
    pub verified: BTreeSet<u64>,
    /// Sums the root found wrong.
    #[serde(default)]
    pub wrong_sums: u64,
    /// Meta this run got twice.
    #[serde(default)]
    pub meta_duplicates: u64,
}

/// One entry of the root's update log: what it found of an epoch's sum.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Finding {
    epoch: u64,
    right: bool,
}

/// The binary tree: task i's parent is (i − 1) / 2, its children 2i + 1
/// and 2i + 2 (those below N).
pub struct BinaryTree {
    tasks: u32,
}

impl Topology for BinaryTree {
    fn links(&self) -> Vec<String> {
        vec![PARENT.into(), CHILDREN.into()]
    }

    fn neighbours(&self, link: &str, task: u32, _epoch: JobEpoch) -> Vec<u32> {
        match link {
            PARENT if task > 0 => vec![(task - 1) / 2],
            CHILDREN => [2 * task + 1, 2 * task + 2]
                .into_iter()
                .filter(|&child| child < self.tasks)
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl JobKind for Regression {
    fn topology(&self, job: &JobSpec) -> Arc<dyn Topology> {
        Arc::new(BinaryTree { tasks: job.tasks })
    }

    fn build(&self, job: &JobSpec, _index: u32) -> Arc<dyn GraphTask> {
        Arc::new(TreeTask {
            epochs: job.properties["epochs"].as_u64().unwrap_or(10),
            findings: Mutex::new(Findings::default()),
            stats: self.stats.clone(),
            state: Mutex::new(Epoch::default()),
            gradient: watch::channel(None).0,
            seen: Mutex::new(BTreeSet::new()),
        })
    }
}

/// A task's work in its current epoch.
#[derive(Debug, Default)]
struct Epoch {
    epoch: u64,
    children: HashMap<u32, u64>,
}

struct TreeTask {
    epochs: u64,
    /// This run's findings (the root's start from its checkpoint).
    findings: Mutex<Findings>,
    stats: Arc<RegressionStats>,
    state: Mutex<Epoch>,
    /// The gradient of (epoch), once computed; `serve_data` waits for it.
    gradient: watch::Sender<Option<(u64, u64)>>,
    /// (sender, epoch) of every meta this run received.
    seen: Mutex<BTreeSet<(u32, u64)>>,
}

impl TreeTask {
    /// The gradient is complete when every child's is in: publish it, tell
    /// the parent, or (the root) check the sum and move on.
    async fn complete_if_ready(&self, task: &TaskHandle) {
        let children = task.neighbours(CHILDREN);
        let (epoch, sum) = {
            let state = self.state.lock().expect("not poisoned");
            if children.iter().any(|c| !state.children.contains_key(c)) {
                return;
            }
            let sum: u64 = state.children.values().sum();
            (state.epoch, state.epoch * u64::from(task.task_id()) + sum)
        };
        if self.gradient.borrow().is_some_and(|(e, _)| e == epoch) {
            return;
        }
        self.gradient.send_replace(Some((epoch, sum)));
        if task.task_id() > 0 {
            // A failed flag means this run was fenced: its successor redoes it.
            let meta = epoch.to_string();
            let _ = task.retrying(|| task.flag_meta(PARENT, &meta)).await;
            return;
        }
        let n = u64::from(task.tasks());
        let right = sum == epoch * n * (n - 1) / 2;
        if right {
            let mut verified = self.stats.verified.lock().expect("not poisoned");
            verified.insert(epoch);
        } else {
            self.stats.wrong_sums.fetch_add(1, Ordering::Relaxed);
        }
        // The finding goes through the update log: applied here and on the
        // root's backups (if the job has any), which take over with it.
        let entry = serde_json::to_vec(&Finding { epoch, right }).expect("plain data");
        if task.update(&entry).await.is_err() {
            return; // the run ended: the next run of the root checks again
        }
        let checkpoint =
            serde_json::to_vec(&*self.findings.lock().expect("not poisoned")).expect("plain data");
        // Kept before moving on, so that a root that dies after this has it.
        if task
            .retrying(|| task.checkpoint(&checkpoint))
            .await
            .is_err()
        {
            return; // fenced: the next run of the root checks again
        }
        // Lost (someone moved it) or fenced (a next run redoes this): done.
        let _ = if epoch + 1 < self.epochs {
            task.retrying(|| task.inc_epoch()).await
        } else {
            task.retrying(|| task.shutdown_job()).await
        };
    }
}

#[async_trait]
impl GraphTask for TreeTask {
    async fn init(&self, _task: &TaskHandle, checkpoint: Option<Vec<u8>>) {
        if let Some(found) =
            checkpoint.and_then(|bytes| serde_json::from_slice::<Findings>(&bytes).ok())
        {
            let mut findings = self.findings.lock().expect("not poisoned");
            findings.verified = found.verified;
            findings.wrong_sums = found.wrong_sums;
        }
    }

    async fn backup_state(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.findings.lock().expect("not poisoned")).expect("plain data")
    }

    async fn became_backup(&self, state: Vec<u8>) {
        if let Ok(found) = serde_json::from_slice::<Findings>(&state) {
            let mut findings = self.findings.lock().expect("not poisoned");
            findings.verified = found.verified;
            findings.wrong_sums = found.wrong_sums;
        }
    }

    async fn apply_update(&self, entry: &[u8]) {
        let Ok(finding) = serde_json::from_slice::<Finding>(entry) else {
            return;
        };
        let mut findings = self.findings.lock().expect("not poisoned");
        if finding.right {
            findings.verified.insert(finding.epoch);
        } else {
            findings.wrong_sums += 1;
        }
    }

    async fn result(&self, _task: &TaskHandle) -> serde_json::Value {
        serde_json::to_value(&*self.findings.lock().expect("not poisoned")).expect("plain data")
    }

    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        *self.state.lock().expect("not poisoned") = Epoch {
            epoch: epoch.0,
            children: HashMap::new(),
        };
        self.complete_if_ready(task).await;
    }

    async fn meta_ready(&self, task: &TaskHandle, from: u32, _link: &str, meta: &str) {
        let Ok(epoch) = meta.parse::<u64>() else {
            return;
        };
        if !self
            .seen
            .lock()
            .expect("not poisoned")
            .insert((from, epoch))
        {
            self.stats.meta_duplicates.fetch_add(1, Ordering::Relaxed);
            self.findings.lock().expect("not poisoned").meta_duplicates += 1;
        }
        let Ok(answer) = task
            .data_request(from, "gradient", epoch.to_le_bytes().to_vec())
            .await
        else {
            // The epoch ended or the job shut down: nothing to do for it.
            return;
        };
        let Ok(bytes) = <[u8; 8]>::try_from(answer.as_slice()) else {
            return;
        };
        {
            let mut state = self.state.lock().expect("not poisoned");
            if state.epoch != epoch {
                return;
            }
            state.children.insert(from, u64::from_le_bytes(bytes));
        }
        self.complete_if_ready(task).await;
    }

    async fn serve_data(
        &self,
        _task: &TaskHandle,
        _from: u32,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        if method != "gradient" {
            return Err(format!("unknown method {method:?}"));
        }
        let epoch = <[u8; 8]>::try_from(input.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| "the input is the epoch, 8 bytes".to_string())?;
        // Wait until this epoch's gradient is computed (the framework ends
        // the wait if the epoch ends first).
        let mut gradient = self.gradient.subscribe();
        let ready = gradient
            .wait_for(|g| g.is_some_and(|(e, _)| e == epoch))
            .await
            .map_err(|_| "the task stopped".to_string())?;
        Ok(ready.expect("waited for it").1.to_le_bytes().to_vec())
    }
}
