//! Lease keepalive, supervised. The keepalive loop runs as its own task and
//! reports to the node's main loop, which owns the fencing deadline.

use std::sync::Arc;
use std::time::Duration;

use eretes_store::{LeaseId, Store, StoreError};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the keepalive loop reports.
#[derive(Debug)]
pub(crate) enum LeaseEvent {
    /// A renewal sent at `sent_at` (`sent_at_boottime_ns` on
    /// CLOCK_BOOTTIME) succeeded; the lease is good until at least
    /// `sent_at + ttl` at the store.
    Renewed {
        sent_at: Instant,
        sent_at_boottime_ns: u64,
    },
    /// A renewal failed for a reason that may pass.
    Failed(StoreError),
    /// The store no longer has the lease: fence at once.
    Lost,
}

/// Renew `lease` every `interval` (sooner after a failure) until the receiver
/// is dropped or the lease is gone. Each call is bounded by `interval` so a
/// hung store shows up as a failure, not as silence.
pub(crate) async fn keep_alive(
    store: Arc<dyn Store>,
    lease: LeaseId,
    interval: Duration,
    events: mpsc::UnboundedSender<LeaseEvent>,
) {
    let retry = (interval / 4).max(Duration::from_millis(10));
    let mut next = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next).await;
        let sent_at = Instant::now();
        let sent_at_boottime_ns = crate::handler::boottime_ns();
        let event = match tokio::time::timeout(interval, store.lease_keepalive(lease)).await {
            Ok(Ok(remaining)) if !remaining.is_zero() => {
                metrics::histogram!("eretes_lease_renewal_seconds")
                    .record(sent_at.elapsed().as_secs_f64());
                LeaseEvent::Renewed {
                    sent_at,
                    sent_at_boottime_ns,
                }
            }
            Ok(Ok(_)) | Ok(Err(StoreError::LeaseNotFound(_))) => LeaseEvent::Lost,
            Ok(Err(error)) => LeaseEvent::Failed(error),
            Err(_) => LeaseEvent::Failed(StoreError::Unavailable(format!(
                "keepalive took longer than {interval:?}"
            ))),
        };
        if matches!(event, LeaseEvent::Failed(_)) {
            metrics::counter!("eretes_lease_renewal_failures_total").increment(1);
        }
        next = match event {
            LeaseEvent::Renewed { .. } => sent_at + interval,
            LeaseEvent::Failed(_) => Instant::now() + retry,
            LeaseEvent::Lost => {
                let _ = events.send(event);
                return;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}
