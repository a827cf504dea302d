//! [`BackupBalancer`]: a lost primary's task goes to the node holding its
//! backup first.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use eretes_protocol::{GroupName, TaskId};
use eretes_runtime::balancer::{newest_first, Balancer, ClaimDecision, ClusterView};
use tokio::time::Instant;

use super::TAKEOVER_GRACE;
use crate::ids::parse_graph_task_id;
use crate::node::NodeShared;

/// A balancer that lets a lost primary's task go to the node holding its
/// backup: that node claims it at once; other nodes leave it for
/// [`TAKEOVER_GRACE`] while a live node holds a backup of it (then claim it,
/// and ask a backup for its state). Everything else is the wrapped
/// balancer's decision.
pub struct BackupBalancer {
    inner: Box<dyn Balancer>,
    node: Weak<NodeShared>,
    /// When this node first left each task to a backup, in the current
    /// failover of that task.
    leaving: HashMap<TaskId, Instant>,
}

impl BackupBalancer {
    pub(crate) fn new(inner: Box<dyn Balancer>, node: Weak<NodeShared>) -> BackupBalancer {
        BackupBalancer {
            inner,
            node,
            leaving: HashMap::new(),
        }
    }

    /// How long this node should still leave `task` to another node's
    /// backup (zero: not at all).
    fn leave_for(&mut self, task: &TaskId) -> Duration {
        let now = Instant::now();
        // An entry older than this is from an earlier failover of the task
        // (its backup's node took it over, and this node never looked at it
        // again): this is a new one.
        let episode = TAKEOVER_GRACE * 2;
        if self.leaving.len() > 10_000 {
            self.leaving.retain(|_, since| now - *since < episode);
        }
        let since = self.leaving.entry(task.clone()).or_insert(now);
        if now - *since > episode {
            *since = now;
        }
        TAKEOVER_GRACE.saturating_sub(now - *since)
    }
}

impl Balancer for BackupBalancer {
    fn can_claim(&mut self, task: &TaskId, group: &GroupName, view: &ClusterView) -> ClaimDecision {
        let Some(node) = self.node.upgrade() else {
            return self.inner.can_claim(task, group, view);
        };
        if parse_graph_task_id(task).is_none() {
            return self.inner.can_claim(task, group, view);
        }
        if !node.view.is_loaded() {
            // Backups are not known yet: claiming now could race one.
            return ClaimDecision::Skip(Duration::from_millis(100));
        }
        let records = node.view.backups(task);
        if records.contains_key(&node.name) && node.replica(task).is_some() {
            self.leaving.remove(task);
            return ClaimDecision::Claim;
        }
        let held_elsewhere = records
            .keys()
            .any(|holder| *holder != node.name && node.view.address(holder).is_some());
        if held_elsewhere {
            let left = self.leave_for(task);
            if !left.is_zero() {
                return ClaimDecision::Skip(left);
            }
        }
        self.leaving.remove(task);
        self.inner.can_claim(task, group, view)
    }

    /// The tasks this node holds a backup of, asked about before the
    /// group's others: while this node is at its fair share, the wrapped
    /// balancer's wait for any other task of the group would keep them
    /// from being asked, and once [`TAKEOVER_GRACE`] ran out another node
    /// restarted them cold.
    fn claim_first(&mut self, group: &GroupName, view: &ClusterView) -> Vec<TaskId> {
        let mut first = self.inner.claim_first(group, view);
        if let Some(node) = self.node.upgrade() {
            // The runtime passes over those whose primary still runs.
            first.extend(node.replicas.lock().expect("not poisoned").keys().cloned());
        }
        first
    }

    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId> {
        let picked = self.inner.balance(view);
        match self.node.upgrade() {
            Some(node) if !picked.is_empty() && node.view.is_loaded() => {
                let backed_up_elsewhere = |task: &TaskId| {
                    node.view
                        .backups(task)
                        .keys()
                        .any(|holder| *holder != node.name && node.view.address(holder).is_some())
                };
                prefer_hot_releases(picked, view, backed_up_elsewhere)
            }
            _ => picked,
        }
    }
}

/// `picked` (what the wrapped balancer releases), with each task whose
/// release would restart it cold swapped, while there are any, for another
/// running task of its group whose release is `hot` (a live node elsewhere
/// holds its backup and takes it over), the newest such task first.
///
/// The fair balancer releases the newest tasks, and right after a failover
/// those are the ones this node has just taken over from its backups: a
/// membership change (the dead node gone, a new one come) would give them
/// straight back, to be restarted cold elsewhere, and lose the hot standby
/// the failover was for.
fn prefer_hot_releases(
    picked: Vec<TaskId>,
    view: &ClusterView,
    hot: impl Fn(&TaskId) -> bool,
) -> Vec<TaskId> {
    let chosen: HashSet<&TaskId> = picked.iter().collect();
    let mut spares: Vec<(TaskId, &GroupName)> = newest_first(view, |_| true)
        .into_iter()
        .filter(|id| !chosen.contains(id) && hot(id))
        .filter_map(|id| view.running.get(&id).map(|task| (id, &task.group)))
        .collect();
    picked
        .iter()
        .map(|task| {
            if hot(task) {
                return task.clone();
            }
            let group = view.running.get(task).map(|running| &running.group);
            match spares.iter().position(|(_, spare)| Some(*spare) == group) {
                Some(at) => spares.remove(at).0,
                None => task.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use eretes_runtime::balancer::{DumbBalancer, RunningTask};

    #[tokio::test(start_paused = true)]
    async fn releases_go_to_tasks_a_backup_takes_over() {
        let me = eretes_protocol::NodeName::new("me").unwrap();
        let mut view = ClusterView::new(me);
        let (group, other) = (GroupName::default(), GroupName::new("other").unwrap());
        // Claimed one after another: `old` first, `promoted` last.
        for (id, group) in [
            ("old", &group),
            ("elsewhere", &other),
            ("mid", &group),
            ("promoted", &group),
            ("also-promoted", &group),
        ] {
            tokio::time::advance(Duration::from_secs(1)).await;
            view.running.insert(
                TaskId::new(id).unwrap(),
                RunningTask {
                    group: group.clone(),
                    epoch: 1,
                    claimed_at: Instant::now(),
                },
            );
        }
        let hot = |task: &TaskId| ["old", "mid", "elsewhere"].contains(&task.as_str());
        let ids = |names: &[&str]| -> Vec<TaskId> {
            names.iter().map(|n| TaskId::new(*n).unwrap()).collect()
        };
        // Cold picks go to hot tasks of their group, the newest first.
        assert_eq!(
            prefer_hot_releases(ids(&["promoted", "also-promoted"]), &view, hot),
            ids(&["mid", "old"])
        );
        // A hot pick stays, and is not picked twice.
        assert_eq!(
            prefer_hot_releases(ids(&["promoted", "mid"]), &view, hot),
            ids(&["old", "mid"])
        );
        // No hot task of the group left: the pick stands.
        assert_eq!(
            prefer_hot_releases(ids(&["promoted", "also-promoted", "mid"]), &view, hot),
            ids(&["old", "also-promoted", "mid"])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_failover_of_a_task_gets_the_whole_grace() {
        let mut balancer = BackupBalancer::new(Box::new(DumbBalancer), Weak::new());
        let task = TaskId::new("job.0").unwrap();
        assert_eq!(balancer.leave_for(&task), TAKEOVER_GRACE);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            balancer.leave_for(&task),
            TAKEOVER_GRACE - Duration::from_secs(1)
        );
        tokio::time::advance(TAKEOVER_GRACE).await;
        assert_eq!(
            balancer.leave_for(&task),
            Duration::ZERO,
            "the grace is over"
        );
        // The backup's node took it over; much later the task fails over
        // again: a new grace, not the old one's end.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(balancer.leave_for(&task), TAKEOVER_GRACE);
    }
}
