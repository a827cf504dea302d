//! Graceful shutdown: drain, write every run's end, then revoke the lease.

use eretes_protocol::TaskId;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{MainLoop, StopReason};

impl MainLoop {
    pub(super) fn begin_shutdown(&mut self, done: oneshot::Sender<()>) {
        info!(node = %self.config.name, running = self.running.len(), "draining for shutdown");
        self.frozen = true;
        self.shutting_down = Some((done, Instant::now() + self.config.shutdown_timeout));
        let ids: Vec<TaskId> = self.running.keys().cloned().collect();
        for id in ids {
            self.stop_task(&id, StopReason::Release);
        }
    }

    pub(super) fn shutdown_finished(&mut self) -> bool {
        if self.shutting_down.is_none()
            || !self.running.is_empty()
            || !self.finishing.is_empty()
            || !self.retrying_ends.is_empty()
            || !self.ends_to_retry.is_empty()
            || !self.unfinished.is_empty()
            || !self.claims.is_empty()
        {
            return false;
        }
        self.deregister_and_notify();
        true
    }

    /// The shutdown timeout passed: drop whatever still runs and leave.
    pub(super) fn abandon_shutdown(&mut self) {
        warn!(node = %self.config.name, running = self.running.len(), "shutdown timed out; abandoning remaining tasks");
        self.handlers.abort_all();
        self.running.clear();
        self.unfinished.clear();
        self.finishing.clear();
        self.retrying_ends.clear();
        self.ends_to_retry.clear();
        self.claims.clear();
    }

    pub(super) fn deregister_and_notify(&mut self) {
        let Some((done, _)) = self.shutting_down.take() else {
            return;
        };
        let lease = self.lease.take().map(|l| l.id);
        let store = self.coordinator.store().clone();
        let name = self.config.name.clone();
        let ttl = self.config.lease_ttl;
        // Revoking the lease removes the node record (and any owner record a
        // timed-out handler left) in one revision.
        tokio::spawn(async move {
            if let Some(lease) = lease {
                match tokio::time::timeout(ttl, store.lease_revoke(lease)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        warn!(node = %name, %error, "could not revoke the lease; it will expire")
                    }
                    Err(_) => warn!(node = %name, "revoking the lease timed out; it will expire"),
                }
            }
            info!(node = %name, "node stopped");
            let _ = done.send(());
        });
    }
}
