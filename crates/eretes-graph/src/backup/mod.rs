//! Primary/backup hot standby: a job with `backups: k` keeps, for each task,
//! up to k backups on other nodes, each a second instance of the task that
//! the primary's update log keeps current, and one of which takes over when
//! the primary is lost.
//!
//! * **Placement.** A primary's run brings its backups up itself: it picks
//!   live nodes that serve the job's group (not its own), hands each its
//!   state (`backup_state` → `became_backup`) over gRPC, and when the node
//!   answers with its lease, records `backups/<job>/<task>/<node>` under
//!   that lease, in a transaction fenced by its own claim. Only the primary
//!   writes records, with its log held, so a record never stands for a
//!   backup the primary does not send its entries to: a transfer whose
//!   answer is lost writes nothing, and a record write whose outcome is
//!   unknown is deleted before any update goes on. A backup whose node dies
//!   vanishes with its lease, and the primary brings up another. A
//!   candidate that fails is left alone for [`CANDIDATE_BACKOFF`].
//! * **The update log.** [`TaskHandle::update`] applies an entry to the
//!   primary's instance, then sends it to every backup, and returns once
//!   each has applied it. A backup that cannot be reached within
//!   [`UPDATE_PATIENCE`], or refuses, is given up: its record is deleted
//!   (fenced by the primary's claim) before `update` returns, so a backup
//!   that still has a record has every entry `update` returned for.
//! * **Takeover.** When the primary's claim goes (its lease expired), the
//!   backup's node claims the task first: [`BackupBalancer`] makes the
//!   other nodes leave it alone for [`TAKEOVER_GRACE`]. The run there finds
//!   its local backup and a record of it in the store for the primary's
//!   claim, and calls `became_primary` on that instance instead of `init`.
//!   A run that starts elsewhere (the backup's node had no free slot, say)
//!   asks a recorded backup for its state instead (a handover, which ends
//!   that backup) and starts from it: `became_backup(state)`, then
//!   `became_primary`. Only when no recorded backup answers does it start
//!   cold (`init`, with the checkpoint).
//! * **No stale backup.** Every new primary deletes the records of earlier
//!   runs' backups (fenced) before its task can update anything; records
//!   are written only under a current claim. So the records that stand are
//!   those of the last primary that could have acknowledged an update, and
//!   a backup without a record never takes over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eretes_protocol::{NodeName, TaskId};
use tokio::time::Instant;

use crate::model::GraphTask;

mod balancer;
mod holder;
mod primary;

pub use balancer::BackupBalancer;
pub(crate) use primary::{end_backups, keep_backups, place_backups, Start};

/// How long a backup may take to apply one entry (retrying) before the
/// primary gives it up.
pub const UPDATE_PATIENCE: Duration = Duration::from_secs(5);

/// How long other nodes leave a lost primary's task to a node holding a
/// backup of it before they may claim it (and ask a backup for its state).
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(3);

/// How long one state transfer (to a new backup, or from a backup to a new
/// primary) may take. The primary's log is held meanwhile, so its updates
/// wait that long at most per candidate.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a candidate that failed to become a backup is left alone.
pub const CANDIDATE_BACKOFF: Duration = Duration::from_secs(10);

/// How long a backup whose record never appeared is kept.
const UNRECORDED_KEPT: Duration = Duration::from_secs(30);

/// A backup of a primary run: where it answers, and the store revision
/// that recorded it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub address: String,
    pub recorded_at: i64,
}

/// A primary run's update log: how many entries it applied, and the
/// backups that have all of them.
#[derive(Debug, Default)]
pub(crate) struct UpdateLog {
    /// The last entry applied.
    pub sequence: u64,
    /// The backups brought up by this run that are current.
    pub members: BTreeMap<NodeName, Member>,
    /// Candidates that failed, and until when they are left alone.
    pub failed: HashMap<NodeName, Instant>,
}

/// A backup held on this node: an instance of the task, kept current by its
/// primary's log.
pub(crate) struct Replica {
    /// The task instance (built by the job's kind).
    pub task: Arc<dyn GraphTask>,
    /// The claim epoch of the primary run it backs up.
    pub primary_claim_epoch: i64,
    /// The store revision that recorded it, once this node's view saw the
    /// record (0 before): a deletion of the record seen later ends it.
    pub recorded_at: AtomicI64,
    /// When it was built: one whose record never came (the primary could
    /// not write it) is dropped after [`UNRECORDED_KEPT`].
    pub built: Instant,
    /// The last entry applied, and whether it has ended (it became the
    /// primary, or handed its state over): then it applies nothing more.
    /// Held while an entry is applied, so entries apply one at a time.
    pub applied: tokio::sync::Mutex<(u64, bool)>,
}

/// The backups held on one node, by task.
pub(crate) type Replicas = Mutex<HashMap<TaskId, Arc<Replica>>>;

/// A node's place in a task's order of backup candidates (and of backups
/// asked for a handover): each task ranks the nodes its own way.
fn rank(task: &TaskId, node: &NodeName) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (task.as_str(), node.as_str()).hash(&mut hasher);
    hasher.finish()
}
