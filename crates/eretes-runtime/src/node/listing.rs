//! The node's cache kept current: the listing of the namespace (first, on a
//! watch restart, and every resync), the watch that continues it, and what
//! each change means for the node.

use std::time::Duration;

use eretes_protocol::{NodeName, ProtocolError, TaskId};
use eretes_store::{EventKind, StoreError};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cache::{CachedOwner, Change};
use crate::stats::NodeStats;

use super::{MainLoop, StopReason, Sync};

/// How soon a node resyncs after an owner record went unseen
/// ([`Change::OwnerGoneUnseen`]); also the most often it does so for them.
const UNSEEN_OWNER_RESYNC: Duration = Duration::from_secs(1);

/// A periodic resync comes at least this many times what the last sync
/// took after it: the safety net costs at most about 1 % of the node's time
/// (and of its share of the store's).
const RESYNC_COST_SHARE: u32 = 100;

/// However long syncs take, a periodic resync comes within this many
/// `resync_interval`s (5 minutes with the default 30 s).
const RESYNC_STRETCH_MAX: u32 = 10;

/// Periodic resyncs of a cluster of more nodes than this come that many
/// times less often per node (at most [`RESYNC_STRETCH_MAX`] intervals
/// apart), so that the cluster's resyncs read the namespace about this many
/// times per `resync_interval` rather than once per node: every node's
/// listing reads every task, and at 300 nodes × 30,000 tasks the periodic
/// resyncs were most of the nodes' work (5 listings of 90,000 keys a
/// second).
const RESYNC_NODES_PER_INTERVAL: usize = 10;

/// Periodic resyncs are spread over this share of `resync_interval` either
/// way (22.5 to 37.5 s with the default 30 s). Nodes started together (a
/// cluster's boot, the in-process nodes of `eretes bench scale`) otherwise
/// re-list at the same moments for ever: a hundred nodes re-listing 30,000
/// tasks at once kept a bench's orphans unclaimed for 10 s.
const RESYNC_JITTER: f64 = 0.25;

/// The wait from one periodic resync of node `name` to the next, counted
/// from a listing that followed `listings` others: `interval` spread by
/// [`RESYNC_JITTER`], by a hash of the two rather than a random draw, so
/// that nodes differ from one another but a run under paused time repeats
/// itself.
pub(super) fn resync_delay(name: &NodeName, listings: u64, interval: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (name.as_str(), listings).hash(&mut hasher);
    // The hash's top 53 bits, as a fraction in [0, 1).
    let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(1.0 - RESYNC_JITTER + 2.0 * RESYNC_JITTER * fraction)
}

impl MainLoop {
    pub(super) fn start_sync(&mut self) {
        self.sync_at = None;
        if self.lease.is_none() {
            return;
        }
        let coordinator = self.coordinator.clone();
        let me = self.config.name.clone();
        let started = Instant::now();
        self.syncing = Some(Box::pin(async move {
            let moved = coordinator.move_legacy_run_records().await?;
            if moved > 0 {
                tracing::info!(
                    moved,
                    "moved run records an older build kept under runs/ to claims/"
                );
            }
            let listing = coordinator.list_for_node(&me).await?;
            let watch = coordinator
                .watch_for_node(listing.first_revision() + 1)
                .await?;
            Ok(Sync {
                listing,
                watch,
                started,
            })
        }));
    }

    /// Put the next periodic resync at least [`RESYNC_COST_SHARE`] times
    /// what the sync that began at `started` took (to its rebuild, waits
    /// for the store and for a busy runtime included), at most
    /// [`RESYNC_STRETCH_MAX`] resync intervals away. A resync reads and
    /// rebuilds everything the node keeps: with many tasks, many nodes or
    /// a slow store, a fixed interval makes that safety net the node's (and
    /// the store's) main work.
    fn space_resyncs(&mut self, started: Instant) {
        let now = Instant::now();
        let took = now - started;
        let spaced = (took * RESYNC_COST_SHARE)
            .min(self.config.resync_interval * RESYNC_STRETCH_MAX)
            .max(self.resync_delay());
        self.next_resync = self.next_resync.max(now + spaced);
    }

    /// The wait until this node's next periodic resync ([`resync_delay`]),
    /// from an interval stretched by the cluster's size
    /// ([`RESYNC_NODES_PER_INTERVAL`]).
    pub(super) fn resync_delay(&self) -> Duration {
        let stretch = self
            .cache
            .live_nodes()
            .div_ceil(RESYNC_NODES_PER_INTERVAL)
            .clamp(1, RESYNC_STRETCH_MAX as usize);
        resync_delay(
            &self.config.name,
            NodeStats::get(&self.stats.listings),
            self.config.resync_interval * stretch as u32,
        )
    }

    pub(super) fn on_sync(&mut self, result: Result<Sync, ProtocolError>) {
        match result {
            Ok(Sync {
                mut listing,
                watch,
                started,
            }) => {
                let kvs = std::mem::take(&mut listing.kvs);
                let owners_read = listing
                    .revision_of(&self.config.namespace.owners_prefix())
                    .unwrap_or_else(|| listing.last_revision());
                let (cache, changes) = self.cache.rebuild(&kvs, listing.last_revision());
                drop(kvs);
                // Before the count moves on: the wait it draws is the one
                // the periodic resync drew when it started this listing, so
                // the two agree rather than the later of two draws winning.
                self.space_resyncs(started);
                NodeStats::bump(&self.stats.listings);
                let membership_changed = cache.node_names() != self.cache.node_names();
                let registered = cache.node_names().contains(&self.config.name);
                self.cache = cache;
                if !registered && self.lease.is_some() {
                    // Registered before it listed: the record is gone, or
                    // is no longer one (see `Cache::apply_put`).
                    self.fence("this node's registration is missing from the store, or is not one");
                    return;
                }
                if membership_changed {
                    self.balance_soon();
                }
                self.watch = Some(watch);
                // Until the watch is past the last read, some of its events
                // are in the listing already.
                self.listed =
                    (listing.first_revision() < listing.last_revision()).then_some(listing);
                let count = std::mem::replace(&mut self.count_listing_malformed, false);
                self.commands.clear();
                for change in changes {
                    match change {
                        // Handled above by comparing the node sets.
                        Change::Membership { .. } => {}
                        Change::Malformed(_) if !count => {}
                        change => self.on_change(change),
                    }
                }
                // Anything running here whose owner record is not ours any more
                // was lost while the watch was down.
                let lost: Vec<TaskId> = self
                    .running
                    .iter()
                    // A claim newer than the listing is not in it; only older
                    // ones can have been lost.
                    .filter(|(id, r)| {
                        r.claim.epoch <= owners_read
                            && self.cache.owner(id).map(|o| o.epoch) != Some(r.claim.epoch)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in lost {
                    self.stop_task(&id, StopReason::Gone);
                }
                // Claims newer than the listing stay counted as ours until the
                // watch delivers their owner records.
                for running in self.running.values() {
                    if running.claim.epoch > owners_read {
                        let group = &running.claim.record.spec.group;
                        self.cache
                            .set_mine(&running.claim.task, group, running.claim.epoch);
                    }
                }
                for id in &self.claiming {
                    // A claim in flight is this node's, whether the listing
                    // left its task in the window or spilled it.
                    self.cache.take_back(id);
                    if let Some(task) = self.cache.task(id) {
                        let group = task.group.clone();
                        self.cache.set_mine(id, &group, 0);
                    }
                }
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, "listing the namespace failed; retrying");
                self.sync_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    pub(super) fn on_watch(&mut self, batch: Option<Result<eretes_store::WatchBatch, StoreError>>) {
        match batch {
            Some(Ok(events)) => {
                for event in events {
                    if let Some(listing) = &self.listed {
                        let revision = event.kv.mod_revision;
                        if revision > listing.last_revision() {
                            self.listed = None;
                        } else if !listing.is_newer(&event.kv.key, revision) {
                            // Its kind was read after this change.
                            continue;
                        }
                    }
                    let change = match event.kind {
                        EventKind::Put => self.cache.apply_put(&event.kv),
                        EventKind::Delete => self.cache.apply_delete(
                            &event.kv.key,
                            event.kv.mod_revision,
                            event.prev_kv.as_ref(),
                        ),
                    };
                    self.on_change(change);
                }
            }
            other => {
                // Compaction, a stream error or the end of the stream: list
                // again and watch from the listing's revision. Nothing is
                // missed because the listing is the state after every event.
                let why = match other {
                    Some(Err(error)) => error.to_string(),
                    _ => "watch stream ended".to_string(),
                };
                NodeStats::bump(&self.stats.relists);
                warn!(node = %self.config.name, why, "watch interrupted; re-listing");
                self.watch = None;
                self.count_listing_malformed = true;
                if self.syncing.is_none() {
                    self.start_sync();
                }
            }
        }
    }

    pub(super) fn on_change(&mut self, change: Change) {
        match change {
            Change::None => {}
            Change::Malformed(what) => {
                NodeStats::bump(&self.stats.malformed_skipped);
                warn!(node = %self.config.name, what, "skipping malformed entry");
            }
            // One more task may raise this node's share of the group.
            Change::TaskAdded(group) => self.stop_waiting(&group),
            Change::TaskGone(id) => self.stop_task(&id, StopReason::Gone),
            Change::OwnerChanged { task, owner, freed } => {
                // An owner went (a release, a completion, a lease that
                // expired): that node's count, and maybe this one's share,
                // moved. Taken from the owner record, since a completion
                // removes the task before its owner.
                if let Some(group) = freed {
                    self.stop_waiting(&group);
                }
                let Some(running) = self.running.get(&task) else {
                    return;
                };
                let ours = matches!(&owner, Some(CachedOwner { epoch, .. }) if *epoch == running.claim.epoch);
                if !ours && running.stop.is_none() {
                    // Our owner record vanished without our doing: the task was
                    // deleted or our lease is gone. Stop without writing.
                    self.stop_task(&task, StopReason::Gone);
                }
            }
            Change::Membership { node, joined } => {
                if node == self.config.name && !joined && self.lease.is_some() {
                    self.fence(
                        "this node's registration disappeared from the store, or was overwritten",
                    );
                    return;
                }
                debug!(node = %self.config.name, peer = %node, joined, "membership changed");
                self.balance_soon();
            }
            Change::TaskCommand(task) => self.command_signals.ring(&task),
            Change::OwnerGoneUnseen(task) => {
                // Both stores send `prev_kv`; should one not, resync soon
                // (at most once a second) rather than leave a freed task
                // unclaimed until the periodic resync.
                NodeStats::bump(&self.stats.malformed_skipped);
                warn!(node = %self.config.name, %task, "an owner record went without the record it removed; resyncing soon");
                let soon = Instant::now() + UNSEEN_OWNER_RESYNC;
                self.next_resync = self.next_resync.min(soon);
            }
            Change::Command {
                key,
                revision,
                present,
            } => {
                if present {
                    self.commands.insert(revision, key);
                } else {
                    self.commands.retain(|_, k| *k != key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_are_spread_around_their_interval_and_differ_between_nodes() {
        let interval = Duration::from_secs(30);
        let (low, high) = (interval.mul_f64(0.75), interval.mul_f64(1.25));
        let node = |i: u32| NodeName::new(format!("node-{i}")).unwrap();
        let firsts: Vec<Duration> = (1..=100)
            .map(|i| resync_delay(&node(i), 0, interval))
            .collect();
        assert!(firsts.iter().all(|d| (low..high).contains(d)));
        // A hundred nodes started together: their first resyncs spread over
        // most of the 15 s the jitter allows, not at one moment.
        let earliest = firsts.iter().min().unwrap();
        let latest = firsts.iter().max().unwrap();
        assert!(
            *latest - *earliest > Duration::from_secs(12),
            "{earliest:?} to {latest:?}"
        );
        // One node's waits change from one listing to the next, and stay
        // in bounds; the mean stays the interval.
        let waits: Vec<Duration> = (0..1000)
            .map(|listings| resync_delay(&node(1), listings, interval))
            .collect();
        assert!(waits.iter().all(|d| (low..high).contains(d)));
        let mean = waits.iter().sum::<Duration>() / 1000;
        assert!(
            mean > interval.mul_f64(0.97) && mean < interval.mul_f64(1.03),
            "{mean:?}"
        );
        // The same node and count give the same wait: paused-time runs
        // repeat.
        assert_eq!(
            resync_delay(&node(7), 3, interval),
            resync_delay(&node(7), 3, interval)
        );
    }
}
