//! Ended tasks go once they are older than the result retention
//! (`--result-retention`, 7 days by default; `forever` keeps them).
//!
//! A task that ended (done, failed, killed) leaves its result record,
//! which `eretes show`, `eretes wait` and the dashboard read. Kept forever,
//! results are what an agent's store grows by with every task it ever
//! ran — on the embedded store, which holds the namespace in memory, some
//! 1.4 KiB of heap per ended `true` task for the life of the agent. Every
//! quarter of the retention (but no more often than every second, and at
//! least every hour) the agent reads the results page by page and deletes
//! each one that ended before the retention's cutoff, only if it is still
//! the result it read (see [`eretes_protocol::Coordinator::delete_ended`]),
//! and the task's logs with it. Agents sharing a namespace each sweep it; a
//! result goes at the first sweep of the agent with the shortest retention.
//! The cutoff is on this agent's clock and the end time on the clock of the
//! node that ended the task: agents whose clocks disagree by more than a
//! short retention may delete a result sooner than it says.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::{now_ms, Coordinator, ProtocolError, EXPIRY_PAGE};
use futures::StreamExt;
use tracing::{info, warn};

use super::logs;

/// What `--result-retention` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Ended tasks are deleted once they ended this long ago.
    For(Duration),
    /// Ended tasks stay until they are removed.
    Forever,
}

/// The shortest retention: an ended task stays at least about this long
/// (clocks agreeing), so that whoever waits for it can read its result.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Parse `--result-retention`: `forever`, or a duration (`7d`, `12h`,
/// `30s`) of at least [`MIN_RETENTION`].
pub fn parse_retention(text: &str) -> Result<Retention, String> {
    if text == "forever" {
        return Ok(Retention::Forever);
    }
    let retention = humantime::parse_duration(text)
        .map_err(|error| format!("{error}: give a duration such as 7d or 12h, or `forever`"))?;
    if retention < MIN_RETENTION {
        return Err(format!(
            "{text} is shorter than the shortest retention, {}",
            humantime::format_duration(MIN_RETENTION)
        ));
    }
    Ok(Retention::For(retention))
}

/// How often the results are swept for `retention`: a quarter of it,
/// between a second and an hour (a sweep reads every result).
fn sweep_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Deletions one sweep keeps in flight: each is a transaction of its own
/// (guarded for its task alone), and the store writes those that wait
/// together (the embedded store's group commit, etcd's batching), so a
/// first sweep with a large backlog is not one fsync after another.
const DELETES_IN_FLIGHT: usize = 16;

/// Delete ended tasks older than `retention`, with their logs in
/// `logs_dir`, sweeping until the agent exits (`expired` counts the
/// deletions); with [`Retention::Forever`], return at once.
pub async fn expire_ended_tasks(
    coordinator: Coordinator,
    retention: Retention,
    logs_dir: PathBuf,
    expired: Arc<AtomicU64>,
) {
    let Retention::For(retention) = retention else {
        return;
    };
    let every = sweep_every(retention);
    loop {
        tokio::time::sleep(every).await;
        let age = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff_ms = now_ms().saturating_sub(age);
        match sweep(&coordinator, cutoff_ms, &logs_dir, &expired).await {
            Ok(0) => {}
            Ok(deleted) => info!(
                deleted,
                "deleted ended tasks older than the result retention"
            ),
            Err(error) => {
                warn!(%error, "sweeping ended tasks failed; trying again at the next sweep")
            }
        }
    }
}

/// One pass over every result: delete those that ended before `cutoff_ms`
/// and their logs; how many were deleted.
async fn sweep(
    coordinator: &Coordinator,
    cutoff_ms: u64,
    logs_dir: &Path,
    expired: &AtomicU64,
) -> Result<usize, ProtocolError> {
    let (mut after, mut deleted) = (None::<String>, 0);
    loop {
        let page = coordinator
            .ended_before(cutoff_ms, after.as_deref(), EXPIRY_PAGE)
            .await?;
        let mut deletions = futures::stream::iter(page.expired)
            .map(|task| {
                let coordinator = coordinator.clone();
                async move {
                    let outcome = coordinator.delete_ended(&task).await;
                    (task, outcome)
                }
            })
            .buffer_unordered(DELETES_IN_FLIGHT);
        while let Some((task, outcome)) = deletions.next().await {
            if outcome? {
                // At once, not at the next log sweep: the id is free, and a
                // task submitted under it again must not append to these.
                logs::remove_logs(logs_dir, &task.id).await;
                expired.fetch_add(1, Ordering::Relaxed);
                deleted += 1;
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(deleted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_a_duration_of_a_second_or_more_or_forever() {
        assert_eq!(parse_retention("forever"), Ok(Retention::Forever));
        assert_eq!(
            parse_retention("7d"),
            Ok(Retention::For(Duration::from_secs(7 * 86_400)))
        );
        assert_eq!(
            parse_retention("1s"),
            Ok(Retention::For(Duration::from_secs(1)))
        );
        let short = parse_retention("500ms").unwrap_err();
        assert!(short.contains("500ms") && short.contains("1s"), "{short}");
        let garbled = parse_retention("a week").unwrap_err();
        assert!(garbled.contains("forever"), "{garbled}");
        assert!(parse_retention("").is_err());
    }

    #[test]
    fn sweeps_come_every_quarter_of_the_retention_within_bounds() {
        assert_eq!(sweep_every(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            sweep_every(Duration::from_secs(60)),
            Duration::from_secs(15)
        );
        assert_eq!(
            sweep_every(Duration::from_secs(7 * 86_400)),
            Duration::from_secs(3600)
        );
    }
}
