//! Watches that survive a broken stream: reopened from the revision after
//! the last event delivered, so nothing is lost or repeated; a compacted
//! revision ends the stream with [`StoreError::Compacted`].

use std::time::Duration;

use eretes_store::{
    EventKind, KeyRange, Revision, StoreError, StoreResult, WatchBatch, WatchEvent, WatchStream,
};
use etcd_client as etcd;
use futures::StreamExt;
use tracing::{debug, warn};

use crate::convert::{classify, key_value, range_bounds, watch_refusal};

/// How long a broken watch keeps trying to resume before it gives up and
/// reports `Unavailable` (the runtime then lists again). Longer than a
/// typical etcd restart or leader election.
const RESUME_WINDOW: Duration = Duration::from_secs(30);
/// First and longest pause between resume attempts.
const RESUME_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

struct Watch {
    client: etcd::WatchClient,
    /// With credentials: the client whose shared auth token a refused watch
    /// refreshes. etcd-client refreshes expired tokens for plain calls only;
    /// a watch opened with a stale one is created, then cancelled.
    auth: Option<etcd::Client>,
    range: KeyRange,
    /// The first revision not yet delivered; 0 until the first creation
    /// when watching "from now".
    next_revision: Revision,
    timeout: Duration,
    stream: Option<etcd::WatchStream>,
}

/// Open a watch and wait until etcd confirms it, so that every write made
/// after this returns is seen.
pub(crate) async fn open(
    client: etcd::WatchClient,
    auth: Option<etcd::Client>,
    range: KeyRange,
    start_revision: Revision,
    timeout: Duration,
) -> StoreResult<WatchStream> {
    let mut watch = Watch {
        client,
        auth,
        range,
        next_revision: start_revision.max(0),
        timeout,
        stream: None,
    };
    watch.create().await?;
    Ok(futures::stream::unfold(Some(watch), |state| async move {
        let mut watch = state?;
        match watch.next_batch().await {
            Ok(batch) => Some((Ok(batch), Some(watch))),
            // An error ends the stream.
            Err(error) => Some((Err(error), None)),
        }
    })
    .boxed())
}

impl Watch {
    /// Create the etcd watch, and if etcd refuses it for a reason a stale
    /// auth token would give (a simple token is forgotten when etcd restarts
    /// and expires when idle), refresh the token and try once more. A
    /// refusal that survives a fresh token is the user's permissions.
    async fn create(&mut self) -> StoreResult<()> {
        let first = self.create_once().await;
        let Some(client) = self.auth.clone() else {
            return first;
        };
        match first {
            Err(StoreError::Denied(reason)) | Err(StoreError::Unavailable(reason))
                if reason.contains("permission denied") || reason.contains("auth token") =>
            {
                match client.refresh_token().await {
                    Ok(()) => self.create_once().await,
                    Err(error) => {
                        debug!(%error, "refreshing the auth token failed");
                        Err(StoreError::Denied(reason))
                    }
                }
            }
            other => other,
        }
    }

    /// Create the etcd watch from `next_revision` and wait for its
    /// confirmation.
    async fn create_once(&mut self) -> StoreResult<()> {
        let (key, end) = range_bounds(&self.range);
        let mut options = etcd::WatchOptions::new().with_prev_key();
        if let Some(end) = end {
            options = options.with_range(end);
        }
        if self.next_revision > 0 {
            options = options.with_start_revision(self.next_revision);
        }
        let requested = self.next_revision;
        let timeout = self.timeout;
        let created = async {
            let mut stream = self.client.watch(key, Some(options)).await?;
            let first = stream.message().await?;
            Ok::<_, etcd::Error>((stream, first))
        };
        let (stream, first) = match tokio::time::timeout(timeout, created).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => return Err(classify(error).into()),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "creating a watch: etcd did not answer within {timeout:?}"
                )))
            }
        };
        let Some(first) = first else {
            return Err(StoreError::Unavailable(
                "etcd closed the watch stream before confirming it".into(),
            ));
        };
        if first.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested,
                compact_revision: first.compact_revision(),
            });
        }
        if first.canceled() || !first.created() {
            return Err(watch_refusal(first.cancel_reason()));
        }
        if self.next_revision == 0 {
            // "From now" means after the revision etcd created the watch at.
            self.next_revision = first.header().map_or(0, |h| h.revision()) + 1;
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// The next non-empty batch, resuming the stream as often as needed.
    async fn next_batch(&mut self) -> StoreResult<WatchBatch> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.resume().await?;
                continue;
            };
            let reason = match stream.message().await {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        return Err(StoreError::Compacted {
                            requested: self.next_revision,
                            compact_revision: response.compact_revision(),
                        });
                    }
                    if response.canceled() {
                        format!("etcd cancelled the watch: {}", response.cancel_reason())
                    } else {
                        let batch = self.convert(response.events());
                        if batch.is_empty() {
                            continue; // a progress notification
                        }
                        return Ok(batch);
                    }
                }
                Ok(None) => "etcd closed the watch stream".to_string(),
                Err(error) => format!("watch stream error: {error}"),
            };
            debug!(
                reason,
                next_revision = self.next_revision,
                "watch broken; resuming"
            );
            self.stream = None;
        }
    }

    /// Reopen from `next_revision`, retrying with backoff for up to
    /// [`RESUME_WINDOW`].
    async fn resume(&mut self) -> StoreResult<()> {
        let deadline = tokio::time::Instant::now() + RESUME_WINDOW;
        let (mut pause, longest) = RESUME_BACKOFF;
        loop {
            match self.create().await {
                Ok(()) => return Ok(()),
                // Neither passes with time: the caller must list again, or
                // fix the user's permissions.
                Err(error @ (StoreError::Compacted { .. } | StoreError::Denied(_))) => {
                    return Err(error)
                }
                Err(error) if tokio::time::Instant::now() + pause >= deadline => {
                    warn!(%error, "giving up resuming a watch");
                    return Err(StoreError::Unavailable(format!(
                        "the watch could not be resumed within {RESUME_WINDOW:?}: {error}"
                    )));
                }
                Err(error) => {
                    debug!(%error, "resuming a watch failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(longest);
                }
            }
        }
    }

    fn convert(&mut self, events: &[etcd::Event]) -> WatchBatch {
        let mut batch = Vec::with_capacity(events.len());
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let kind = match event.event_type() {
                etcd::EventType::Put => EventKind::Put,
                etcd::EventType::Delete => EventKind::Delete,
            };
            self.next_revision = self.next_revision.max(kv.mod_revision() + 1);
            batch.push(WatchEvent {
                kind,
                kv: key_value(kv),
                prev_kv: event.prev_kv().map(key_value),
            });
        }
        batch
    }
}
