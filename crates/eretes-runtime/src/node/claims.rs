//! Claiming: which unowned tasks this node asks the balancer about, the
//! claim transactions in flight and their outcomes, the ignore list, and
//! the balancer's releases.

use std::collections::VecDeque;
use std::time::Duration;

use eretes_protocol::{ClaimBasis, ClaimOutcome, GroupName, ProtocolError, RunEnd, TaskId};
use eretes_store::LeaseId;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::balancer::ClaimDecision;
use crate::cache::Change;
use crate::sparse::Sparse;
use crate::stats::NodeStats;

use super::{off_loop, ClaimResult, MainLoop, StopReason};

impl MainLoop {
    pub(super) fn try_claims(&mut self) {
        let blocked = self.frozen || self.shutting_down.is_some() || self.watch.is_none();
        let Some(lease) = self.lease.as_ref().map(|l| l.id).filter(|_| !blocked) else {
            self.withdraw_held_batches();
            return;
        };
        // A pass starts with the group after the last one that claimed, so
        // that under an agent-wide limit the groups take the room that
        // frees in turn, and none waits behind another that always has
        // work. (Turning by one group per pass instead gave the room to
        // whichever group the count of passes between two runs' ends
        // favoured: with one slot, the same group three times in a row.)
        let groups = self.my_groups.len();
        let first = self.claim_rotation % groups;
        for step in 0..groups {
            let index = (first + step) % groups;
            let group = self.my_groups[index].clone();
            let mut batch = self.held_batches.remove(&group).unwrap_or_default();
            let mut waiting = self.waiting.contains_key(&group);
            // Under an agent-wide limit, the room left is shared among the
            // groups still to come in this pass (what one leaves unused
            // goes to the next), so no group takes every slot.
            let share_of_room = if self.config.max_running == usize::MAX {
                usize::MAX
            } else {
                let running: usize = self.busy.values().sum();
                (self.config.max_running.saturating_sub(running)).div_ceil(groups - step)
            };
            let mut free = self
                .config
                .slots_for(&group)
                .saturating_sub(self.busy.get(&group).copied().unwrap_or(0))
                .min(share_of_room);
            // Only with room to claim and candidates to claim: a balancer's
            // list may be long (every backup a node holds).
            let room = free > 0 && self.claiming.len() < self.claim_window;
            let mut asked_first: VecDeque<TaskId> = if room && self.cache.has_candidates(&group) {
                let waited = self.first_waited.get(&group);
                self.balancer
                    .claim_first(&group, &self.cache.view)
                    .into_iter()
                    .filter(|id| !waited.is_some_and(|waited| waited.contains(id)))
                    .collect()
            } else {
                VecDeque::new()
            };
            if waiting && asked_first.is_empty() {
                self.send_or_hold(lease, group, batch);
                continue;
            }
            let mut reads = Vec::new();
            let busy_before = self.busy.get(&group).copied().unwrap_or(0);
            let share = self.claim_share(&group);
            while free > 0 && self.claiming.len() < self.claim_window {
                // A wait keeps the group's other tasks from being asked,
                // not those the balancer puts first.
                let first = asked_first.pop_front();
                if let Some(id) = &first {
                    // Asked for by name: back from the backlog, if spilled.
                    self.cache.take_back(id);
                }
                let candidate = match first {
                    // Checked as it comes up: an earlier decision of this
                    // pass may have taken it (or the list named it twice).
                    Some(id)
                        if !self.cache.is_candidate(&id, &group) || self.claiming.contains(&id) =>
                    {
                        continue;
                    }
                    Some(id) => Some((id, true)),
                    None if waiting => None,
                    None => self.next_candidate(&group, share).map(|id| (id, false)),
                };
                let Some((id, put_first)) = candidate else {
                    break;
                };
                match self.balancer.can_claim(&id, &group, &self.cache.view) {
                    ClaimDecision::Claim => {
                        let basis = self.cache.claim_basis(&id);
                        if basis.is_none() && !self.cache.is_unread(&id) {
                            // Never so for a candidate; should it be, the
                            // task is held back rather than picked again.
                            self.ignore_for(&id, self.config.release_ignore);
                            continue;
                        }
                        // Counted as this node's at once, so the balancer's
                        // next decision sees it; a task read first is
                        // counted so too, as a claim of it follows.
                        self.cache.set_mine(&id, &group, 0);
                        self.claiming.insert(id.clone());
                        *self.busy.entry(group.clone()).or_default() += 1;
                        free -= 1;
                        match basis {
                            Some(basis) => batch.push((id, basis)),
                            None => reads.push(id),
                        }
                        if batch.len() >= self.config.claim_batch {
                            self.launch_claims(lease, group.clone(), std::mem::take(&mut batch));
                        }
                        if reads.len() >= self.config.claim_batch {
                            self.launch_reads(group.clone(), std::mem::take(&mut reads));
                        }
                    }
                    ClaimDecision::RetryAfter(delay) => {
                        // A wait is about the group (this node's share of
                        // it, its resources), not this task: asking about
                        // the next task at every event until the counts
                        // change would only put one task after another on
                        // the ignore list. So the group waits, and only
                        // the tasks put first are asked from here.
                        if put_first {
                            // Asked at every pass while the group waits
                            // otherwise: left alone until the wait ends.
                            self.first_waited
                                .entry(group.clone())
                                .or_default()
                                .insert(id.clone());
                        }
                        if !waiting {
                            self.waiting.insert(group.clone(), Instant::now() + delay);
                            waiting = true;
                        }
                    }
                    ClaimDecision::Skip(delay) => self.ignore_for(&id, delay),
                }
            }
            if busy_before != self.busy.get(&group).copied().unwrap_or(0) {
                self.claim_rotation = index + 1;
            }
            if !reads.is_empty() {
                self.launch_reads(group.clone(), reads);
            }
            self.send_or_hold(lease, group, batch);
        }
    }

    /// Send `batch` (tasks of `group` marked as being claimed), or hold it
    /// for the next pass if it is not full and this node has a claim or
    /// read in flight: the pass that the answer brings sends it, with what
    /// that pass adds. Sent at once, every submission that the nodes' shares
    /// split N ways became N small transactions, and the store's work per
    /// claim grew with the nodes. Nothing waits long: an answer ends the
    /// wait, and a node with nothing in flight sends at once.
    fn send_or_hold(&mut self, lease: LeaseId, group: GroupName, batch: Vec<(TaskId, ClaimBasis)>) {
        if batch.is_empty() {
            return;
        }
        if batch.len() < self.config.claim_batch && !self.claims.is_empty() {
            self.held_batches.insert(group, batch);
        } else {
            self.launch_claims(lease, group, batch);
        }
    }

    /// Give up every held batch (the node can claim nothing now: frozen,
    /// shutting down, fenced or between watches): each task is a candidate
    /// again.
    fn withdraw_held_batches(&mut self) {
        for (group, batch) in std::mem::take(&mut self.held_batches) {
            for (id, _) in batch {
                self.cache.clear_tentative(&id);
                self.claiming.remove(&id);
                self.release_slot(&group);
            }
        }
    }

    /// This node's share of `group`'s unowned tasks: its rank among the
    /// group's serving nodes and their number, if it is one of them.
    pub(super) fn claim_share(&self, group: &GroupName) -> Option<(u64, u64)> {
        let serving = &self.cache.view.groups.get(group)?.serving;
        let rank = serving.iter().position(|n| *n == self.config.name)?;
        Some((rank as u64, serving.len() as u64))
    }

    /// The next task of `group` to claim: the oldest eligible one among this
    /// node's share, else among the next rank's share, and so on, looking a
    /// bounded way ahead; else the oldest eligible one of all. Without
    /// shares every node would try the same oldest tasks at once, and their
    /// batches would lose compares to each other; with them, nodes contend
    /// only for leftovers, and a batch that loses some costs one more
    /// transaction (see `Coordinator::claim_batch`).
    pub(super) fn next_candidate(
        &self,
        group: &GroupName,
        share: Option<(u64, u64)>,
    ) -> Option<TaskId> {
        // Ignored tasks are held back by the cache, and a claim in flight
        // counts as owned, so neither is among the candidates; the check
        // only guards against the two ever disagreeing.
        let eligible = |id: &&TaskId| !self.claiming.contains(*id);
        if let Some((rank, nodes)) = share.filter(|(_, nodes)| *nodes > 1) {
            let look_ahead = self.config.max_claims_in_flight * nodes as usize * 2;
            // The nearest share at or after this node's own, the oldest task
            // in it: a node whose share is empty takes from the next rank's,
            // where only that node contends with it. (Taking the oldest task
            // of all, every node with an empty share went for the same
            // tasks: at 1,000 nodes, an orphan was read 59 times before one
            // node claimed it.)
            let mut nearest: Option<(u64, &TaskId)> = None;
            for (spread, id) in self.cache.unowned_spread(group).take(look_ahead) {
                // The distance first: a modulo; eligibility is a set lookup.
                let distance = (spread % nodes + nodes - rank) % nodes;
                if nearest.is_some_and(|(best, _)| best <= distance) || !eligible(&id) {
                    continue;
                }
                nearest = Some((distance, id));
                if distance == 0 {
                    break;
                }
            }
            if let Some((_, id)) = nearest {
                return Some(id.clone());
            }
        }
        self.cache.unowned(group).find(eligible).cloned()
    }

    /// Claim `batch` (tasks of `group`) in one transaction where possible.
    pub(super) fn launch_claims(
        &mut self,
        lease: LeaseId,
        group: GroupName,
        batch: Vec<(TaskId, ClaimBasis)>,
    ) {
        let coordinator = self.coordinator.clone();
        let node = self.config.name.clone();
        self.claims.push(off_loop(async move {
            let sent = Instant::now();
            let outcomes = coordinator.claim_batch(&node, lease, &batch).await;
            let ids = batch.into_iter().map(|(id, _)| id);
            (sent.elapsed(), claim_results(&group, ids, outcomes, false))
        }));
    }

    /// Read what a claim of each of `ids` (unread tasks of `group`) checks,
    /// in one transaction where possible. Each answer comes back as a lost
    /// claim's would, with the keys read; the claim follows once the cache
    /// has them.
    pub(super) fn launch_reads(&mut self, group: GroupName, ids: Vec<TaskId>) {
        NodeStats::add(&self.stats.task_reads, ids.len() as u64);
        let coordinator = self.coordinator.clone();
        self.claims.push(off_loop(async move {
            let sent = Instant::now();
            let outcomes = match coordinator.read_task_keys(&ids).await {
                Ok(read) => read
                    .into_iter()
                    .map(|keys| Ok(ClaimOutcome::Lost(keys)))
                    .collect(),
                Err(error) => vec![Err(error); ids.len()],
            };
            (sent.elapsed(), claim_results(&group, ids, outcomes, true))
        }));
    }

    /// Fewer claims in flight while the store is slow to answer them, more
    /// again when it is quick. A store that applies writes in order (etcd)
    /// answers a lease renewal only after the writes queued before it: a
    /// burst of claims from many nodes (a rejoin, a large submit) can keep
    /// its queue long enough that renewals miss the TTL and every node
    /// fences itself. A claim transaction slower than a twentieth of the
    /// TTL halves the window (down to one batch); a quicker one grows it by
    /// a batch, up to `max_claims_in_flight`.
    pub(super) fn pace_claims(&mut self, took: Duration) {
        let batch = self.config.claim_batch.max(1);
        let most = self.config.max_claims_in_flight;
        self.claim_window = if took > self.config.lease_ttl / 20 {
            (self.claim_window / 2).max(batch.min(most))
        } else {
            (self.claim_window + batch).min(most)
        };
        self.stats.claim_window.store(
            self.claim_window as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(super) fn on_claim(&mut self, result: ClaimResult) {
        let ClaimResult {
            id,
            group,
            outcome,
            read_only,
        } = result;
        self.claiming.remove(&id);
        self.claiming.shrink_if_sparse();
        match outcome {
            Ok(ClaimOutcome::Claimed(mut claim)) => {
                NodeStats::bump(&self.stats.claims);
                // The claim decoded the record afresh: share the node's copy
                // of the group's name instead of keeping one per run.
                if let Some(record) = std::sync::Arc::get_mut(&mut claim.record) {
                    if record.spec.group == group {
                        record.spec.group = group.clone();
                    }
                }
                if claim.takeover {
                    NodeStats::bump(&self.stats.takeovers);
                }
                self.cache.set_mine(&id, &group, claim.epoch);
                if self.frozen || self.shutting_down.is_some() {
                    // Frozen, drained or draining since the claim left: give
                    // the task straight back instead of starting it.
                    self.finish(claim, RunEnd::Released);
                } else {
                    self.start_handler(claim);
                }
            }
            Ok(ClaimOutcome::Parked { takeovers }) => {
                NodeStats::bump(&self.stats.parked);
                warn!(node = %self.config.name, task = %id, takeovers, "task parked as failed after too many takeovers");
                self.cache.clear_tentative(&id);
                self.release_slot(&group);
            }
            Ok(ClaimOutcome::Lost(keys)) => {
                if !read_only {
                    NodeStats::bump(&self.stats.claim_conflicts);
                }
                self.cache.clear_tentative(&id);
                self.stop_waiting(&group);
                // Bring the cache up to what the store said, so the next
                // attempt (if any) starts from the truth instead of waiting
                // for the watch to catch up.
                let applied = self.cache.apply_read_back(&id, &keys);
                let stale = applied.is_none();
                for change in applied.into_iter().flatten() {
                    if !matches!(change, Change::TaskGone(_) | Change::OwnerChanged { .. }) {
                        self.on_change(change);
                    }
                }
                // A lost claim that still looks claimable (say its owner
                // record is garbage the cache cannot read), or a read that
                // left the task unread (it said nothing the cache could
                // use): back off rather than spin. A task read and found
                // claimable is claimed by the next pass, and one whose read
                // was older than what the cache knows is read again.
                let spin = if read_only {
                    !stale && self.cache.is_unread(&id)
                } else {
                    self.cache.claim_basis(&id).is_some()
                };
                if spin {
                    self.ignore_for(&id, self.config.release_ignore);
                }
                self.release_slot(&group);
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, task = %id, %error, "claim failed; will retry");
                self.cache.clear_tentative(&id);
                self.ignore_for(&id, Duration::from_secs(1));
                self.release_slot(&group);
            }
        }
    }

    /// Put `id` on the ignore list for `delay` (from now, if it is on it
    /// already): the cache holds it back from the candidates until then.
    pub(super) fn ignore_for(&mut self, id: &TaskId, delay: Duration) {
        match self.cache.held_key(id) {
            Some(key) => self.ignore.reset(&key, delay),
            None => {
                let key = self.ignore.insert(id.clone(), delay);
                self.cache.hold_back(id, key);
            }
        }
    }

    /// Run the balancer shortly: a node joined or left.
    /// Every share changes with the membership, so no group waits either.
    pub(super) fn balance_soon(&mut self) {
        let soon = Instant::now() + self.config.membership_balance_delay;
        self.next_balance = self.next_balance.min(soon);
        self.waiting.clear();
        self.first_waited.clear();
    }

    /// The group's counts changed: let the balancer judge it again now.
    pub(super) fn stop_waiting(&mut self, group: &GroupName) {
        self.waiting.remove(group);
        self.first_waited.remove(group);
    }

    pub(super) fn release_slot(&mut self, group: &GroupName) {
        if let Some(count) = self.busy.get_mut(group) {
            *count = count.saturating_sub(1);
        }
    }

    pub(super) fn balance(&mut self) {
        if self.lease.is_none() || self.shutting_down.is_some() {
            return;
        }
        let releases = self.balancer.balance(&self.cache.view);
        if !releases.is_empty() {
            info!(node = %self.config.name, count = releases.len(), "balancer releases tasks");
        }
        for id in releases {
            self.stop_task(&id, StopReason::Release);
        }
    }
}

/// One [`ClaimResult`] per task of `group`, from its outcome.
fn claim_results(
    group: &GroupName,
    ids: impl IntoIterator<Item = TaskId>,
    outcomes: Vec<Result<ClaimOutcome, ProtocolError>>,
    read_only: bool,
) -> Vec<ClaimResult> {
    ids.into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| ClaimResult {
            id,
            group: group.clone(),
            outcome,
            read_only,
        })
        .collect()
}
