//! The simplest policy: take everything offered, give nothing back.

use eretes_protocol::{GroupName, TaskId};

use super::{Balancer, ClaimDecision, ClusterView};

/// Always claims and never releases.
///
/// Useful for a single node, for tests, and for clusters where something
/// outside eretes already spreads the work (for example one group per node).
/// With several nodes the first node to see a task wins it, so load can end up
/// very uneven; use [`FairBalancer`](super::FairBalancer) for that case.
#[derive(Debug, Clone, Copy, Default)]
pub struct DumbBalancer;

impl DumbBalancer {
    /// A new dumb balancer (it has no state or configuration).
    pub fn new() -> Self {
        DumbBalancer
    }
}

impl Balancer for DumbBalancer {
    fn can_claim(
        &mut self,
        _task: &TaskId,
        _group: &GroupName,
        _view: &ClusterView,
    ) -> ClaimDecision {
        ClaimDecision::Claim
    }

    fn balance(&mut self, _view: &ClusterView) -> Vec<TaskId> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use eretes_protocol::NodeName;
    use tokio::time::Instant;

    use super::*;
    use crate::balancer::{GroupLoad, RunningTask};

    #[test]
    fn claims_everything_and_releases_nothing() {
        let me = NodeName::new("n1").unwrap();
        let group = GroupName::new("g").unwrap();
        let mut view = ClusterView::new(me.clone());
        // Even a node that owns everything and does not serve the group claims:
        // the dumb balancer deliberately looks at nothing.
        view.groups.insert(
            group.clone(),
            GroupLoad {
                serving: BTreeSet::new(),
                owned: [(me, 100)].into_iter().collect(),
                unowned: 3,
                limit: Default::default(),
            },
        );
        let task = TaskId::new("t1").unwrap();
        view.running.insert(
            task.clone(),
            RunningTask {
                group: group.clone(),
                epoch: 1,
                claimed_at: Instant::now(),
            },
        );
        let mut balancer = DumbBalancer::new();
        assert_eq!(
            balancer.can_claim(&task, &group, &view),
            ClaimDecision::Claim
        );
        assert!(balancer.balance(&view).is_empty());
    }
}
