//! The agent's Prometheus metrics, served as text at `GET /metrics`.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `eretes_tasks` | gauge: tasks in the cluster, counted at scrape time in the agent's task index; every state (`pending`, `running`, `sleeping`, `paused`, `fault`, `done`, `failed`, `killed`) of every group seen, 0 included | `state`, `group` |
//! | `eretes_claims_total`, `eretes_claim_conflicts_total`, `eretes_failovers_total`, `eretes_releases_total`, `eretes_completions_total`, `eretes_failures_total` (failed or killed), `eretes_fences_total`, `eretes_malformed_skipped_total`, `eretes_node_commands_rejected_total` | counters of this agent's node | — |
//! | `eretes_task_list_store_reads_total` | counter: reads of the store made for list, node and task-count requests because the agent's task index was loading or behind (one at a time; requests that come while one is made share the next) | — |
//! | `eretes_lease_renewal_seconds`, `eretes_lease_renewal_failures_total` | histogram, counter | — |
//! | `eretes_handler_run_seconds` | histogram: how long runs lasted | `group` |
//! | `eretes_store_request_seconds`, `eretes_store_request_errors_total` | histogram, counter: every request to the store | `op` |

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use eretes_protocol::{ProtocolError, TaskIndex, TaskState};
use eretes_runtime::{NodeStats, NodeStatsSnapshot};
use eretes_store::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyRange, LeaseGrant, LeaseId,
    PutRequest, PutResponse, Revision, Store, StoreResult, Txn, TxnResponse, WatchStream,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use super::task_list::LiveTasks;

/// Histogram buckets, in seconds: from a store round trip to an hour-long run.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
];

/// How long a group's task gauges stay after its last task went: scrapes
/// in that time see them at 0, later ones no more. (Every group ever seen
/// was reported for good: a group per batch of tasks, created and deleted,
/// grew the scrape and the recorder without end.)
const GONE_GROUP_GAUGES: Duration = Duration::from_secs(600);

/// The recorder and what a scrape reads.
pub struct Metrics {
    handle: PrometheusHandle,
    stats: Arc<NodeStats>,
    tasks: Arc<LiveTasks>,
    /// The groups reported: each of its states is reported, as 0 when
    /// empty, rather than left at its last value or missing. A group with
    /// no task left is reported at 0 once more, then left to the
    /// recorder's idle timeout ([`GONE_GROUP_GAUGES`]).
    reported: std::sync::Mutex<BTreeSet<String>>,
}

/// How often the recorder's histogram samples are folded into their
/// buckets when nobody scrapes `/metrics`.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Fold the recorded histogram samples into their buckets every
/// [`UPKEEP_EVERY`]. The recorder keeps each sample (a store request's
/// time, a lease renewal's) until a scrape or an upkeep folds it in; an
/// agent that nobody scrapes would otherwise hold every sample of its
/// life — some 50 bytes per run — and scatter them over the heap's pages.
async fn keep_up(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(UPKEEP_EVERY).await;
        handle.run_upkeep();
    }
}

impl Metrics {
    /// Install the process-wide recorder (once per process), and start its
    /// upkeep on the current runtime.
    pub fn install() -> Result<PrometheusHandle> {
        let handle = PrometheusBuilder::new()
            .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GONE_GROUP_GAUGES))
            .set_buckets(BUCKETS)
            .context("histogram buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        tokio::spawn(keep_up(handle.clone()));
        Ok(handle)
    }

    /// Metrics of the node with `stats`, tasks counted in `tasks`.
    pub fn new(handle: PrometheusHandle, stats: Arc<NodeStats>, tasks: Arc<LiveTasks>) -> Self {
        Metrics {
            handle,
            stats,
            tasks,
            reported: Default::default(),
        }
    }

    /// This agent's node's counters now.
    pub fn node_stats(&self) -> NodeStatsSnapshot {
        self.stats.snapshot()
    }

    /// The Prometheus text exposition, with task counts read now.
    pub async fn render(&self) -> Result<String, ProtocolError> {
        let counts = self.tasks.read(TaskIndex::counts).await?;
        let counts: std::collections::BTreeMap<(String, TaskState), usize> = counts
            .into_iter()
            .map(|((group, state), count)| ((group.to_string(), state), count))
            .collect();
        {
            let mut reported = self.reported.lock().expect("not poisoned");
            reported.extend(counts.keys().map(|(group, _)| group.clone()));
            reported.retain(|group| {
                let mut any = false;
                for state in TaskState::ALL {
                    let count = counts.get(&(group.clone(), state)).copied().unwrap_or(0);
                    any |= count > 0;
                    metrics::gauge!("eretes_tasks", "state" => state.name(), "group" => group.clone())
                        .set(count as f64);
                }
                any
            });
        }
        let stats = self.stats.snapshot();
        for (name, value) in [
            ("eretes_claims_total", stats.claims),
            ("eretes_claim_conflicts_total", stats.claim_conflicts),
            ("eretes_failovers_total", stats.takeovers),
            ("eretes_releases_total", stats.releases),
            ("eretes_completions_total", stats.completions),
            ("eretes_failures_total", stats.failures),
            ("eretes_fences_total", stats.fences),
            ("eretes_malformed_skipped_total", stats.malformed_skipped),
            (
                "eretes_task_list_store_reads_total",
                self.tasks.store_reads(),
            ),
            (
                "eretes_node_commands_rejected_total",
                stats.commands_rejected,
            ),
        ] {
            metrics::counter!(name).absolute(value);
        }
        Ok(self.handle.render())
    }
}

/// How long the latest successful lease renewal answered in, in
/// microseconds (0: none yet), and when it was, in milliseconds since the
/// Unix epoch. One per process, as the agent runs one node.
static LAST_RENEWAL_US: AtomicU64 = AtomicU64::new(0);
static LAST_RENEWAL_AT_MS: AtomicU64 = AtomicU64::new(0);

/// How long the latest successful lease renewal through a [`MeteredStore`]
/// took, and when it answered (ms since the Unix epoch): a renewal long
/// ago says the node is failing to renew, however fast that one was.
pub fn last_lease_renewal() -> Option<(Duration, u64)> {
    match LAST_RENEWAL_US.load(Ordering::Relaxed) {
        0 => None,
        us => Some((
            Duration::from_micros(us),
            LAST_RENEWAL_AT_MS.load(Ordering::Relaxed),
        )),
    }
}

/// Times every request to the store it wraps, and counts the failures.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        MeteredStore { inner }
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    let started = Instant::now();
    let result = call.await;
    metrics::histogram!("eretes_store_request_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("eretes_store_request_errors_total", "op" => op).increment(1);
    }
    result
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        timed("get", self.inner.get(request)).await
    }
    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        timed("put", self.inner.put(request)).await
    }
    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        timed("delete", self.inner.delete(request)).await
    }
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        timed("txn", self.inner.txn(txn)).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        timed("lease_grant", self.inner.lease_grant(ttl)).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let started = Instant::now();
        let renewed = timed("lease_keepalive", self.inner.lease_keepalive(lease)).await;
        if renewed.is_ok() {
            let us = started.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
            LAST_RENEWAL_AT_MS.store(eretes_protocol::now_ms(), Ordering::Relaxed);
            LAST_RENEWAL_US.store(us, Ordering::Relaxed);
        }
        renewed
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        timed("lease_revoke", self.inner.lease_revoke(lease)).await
    }
    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        timed("watch", self.inner.watch(range, start_revision)).await
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        timed("compact", self.inner.compact(revision)).await
    }
}
