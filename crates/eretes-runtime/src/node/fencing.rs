//! Lease renewals and self-fencing: every handler stops before the lease
//! can expire at the store, and the node registers again once they have.

use std::time::Duration;

use eretes_protocol::ProtocolError;
use eretes_store::{LeaseId, StoreError};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::handler::Deadline;
use crate::lease::LeaseEvent;
use crate::stats::NodeStats;

use super::{register, MainLoop, StopReason};

impl MainLoop {
    pub(super) fn on_lease_event(&mut self, event: Option<LeaseEvent>) {
        match event {
            Some(LeaseEvent::Renewed {
                sent_at,
                sent_at_boottime_ns,
            }) => {
                if let Some(lease) = &mut self.lease {
                    // The store extended the lease no earlier than when the
                    // request left, so the lease lives at least until then + TTL.
                    let deadline = Deadline::after_moment(
                        sent_at,
                        sent_at_boottime_ns,
                        self.config.lease_ttl - self.config.fence_margin,
                    );
                    lease.fence_at = deadline.at;
                    self.fence_publisher.send_replace(Some(deadline));
                }
            }
            Some(LeaseEvent::Failed(error)) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, "lease renewal failed");
            }
            Some(LeaseEvent::Lost) | None => self.fence("the store no longer has the node's lease"),
        }
    }

    /// Apply every lease event the keepalive has already sent: the biased
    /// main loop looks at its timers before its channels, and a renewal
    /// that came in while the loop was busy must count before the deadline
    /// it moves is judged.
    pub(super) fn apply_waiting_renewals(&mut self) {
        while let Some(lease) = &mut self.lease {
            match lease.events.try_recv() {
                Ok(event) => self.on_lease_event(Some(event)),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return self.on_lease_event(None)
                }
            }
        }
    }

    /// Self-fencing: stop every handler and drop every claim before the lease
    /// can expire at the store, then register again.
    pub(super) fn fence(&mut self, why: &str) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        NodeStats::bump(&self.stats.fences);
        warn!(node = %self.config.name, why, running = self.running.len(), "fencing: cancelling every handler");
        // The lease is gone or about to be: work held outside this process
        // (process supervisors) stops now, without a grace period.
        self.fence_publisher
            .send_replace(Some(Deadline::after(Duration::ZERO)));
        for running in self.running.values_mut() {
            running.stop = Some(StopReason::Fenced);
            running.cancel.cancel();
        }
        // Writes in flight were made under the old lease; their outcome no
        // longer matters (the epoch fences them), so forget them.
        self.claims.clear();
        self.held_batches.clear();
        for id in self.claiming.drain() {
            self.cache.clear_tentative(&id);
        }
        self.unfinished.clear();
        self.finishing.clear();
        self.retrying_ends.clear();
        self.ends_to_retry.clear();
        self.busy.clear();
        for running in self.running.values() {
            *self
                .busy
                .entry(running.claim.record.spec.group.clone())
                .or_default() += 1;
        }
        self.watch = None;
        self.syncing = None;
        self.sync_at = None;
        self.taking_command = None;
        self.commands.clear();
        self.reregister_backoff = Duration::from_millis(100);
        self.reregister_old = Some(lease.id);
        // The lease cannot expire before the fence deadline + margin; a
        // handler still running by the middle of that window is aborted.
        self.fence_abort_at = Some(Instant::now() + self.config.fence_margin / 2);
        drop(lease);
        // Registering again revokes the old lease, which frees our tasks for
        // other nodes; that must wait until every cancelled handler has
        // stopped (see `resume_after_fencing`).
        self.awaiting_reregistration = true;
    }

    /// Register again once every fenced handler has exited.
    pub(super) fn resume_after_fencing(&mut self) {
        if self.awaiting_reregistration && self.running.is_empty() && self.shutting_down.is_none() {
            self.awaiting_reregistration = false;
            self.start_reregistration();
        }
    }

    pub(super) fn start_reregistration(&mut self) {
        self.reregister_at = None;
        if self.lease.is_some() || self.reregistering.is_some() || self.shutting_down.is_some() {
            return;
        }
        let coordinator = self.coordinator.clone();
        let config = self.config.clone();
        let record = self.record.clone();
        let old = self.reregister_old;
        self.reregistering = Some(Box::pin(async move {
            if let Some(old) = old {
                // Revoking frees the name and drops stale owner records at once
                // instead of after the TTL; an expired lease is already gone.
                match coordinator.store().lease_revoke(old).await {
                    Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            register(&coordinator, &config, &record).await
        }));
    }

    pub(super) fn on_reregistered(&mut self, result: Result<LeaseId, ProtocolError>) {
        match result {
            Ok(lease) => {
                info!(node = %self.config.name, "registered again after fencing");
                self.reregister_old = None;
                self.start_lease(lease);
                self.start_sync();
            }
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, %error, retry_in = ?self.reregister_backoff, "re-registration failed");
                self.reregister_at = Some(Instant::now() + self.reregister_backoff);
                self.reregister_backoff = (self.reregister_backoff * 2).min(self.config.lease_ttl);
            }
        }
    }
}
