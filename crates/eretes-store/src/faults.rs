//! Fault injection around a real store, for tests of failure handling.
//!
//! [`FaultyStore`] wraps any [`Store`] and passes every call through until a
//! fault is switched on; then the affected calls fail with
//! [`StoreError::Unavailable`] *without reaching the inner store*, exactly as
//! an unreachable etcd would look to its client. The inner store keeps running
//! (its leases keep expiring on its own clock), which is what makes lease-loss
//! and outage scenarios realistic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{StoreError, StoreResult};
use crate::store::{Store, WatchStream};
use crate::types::*;

/// A store wrapper whose calls can be made to fail on demand.
#[derive(Debug)]
pub struct FaultyStore<S: ?Sized> {
    inner: Arc<S>,
    keepalives_blocked: AtomicBool,
    outage: AtomicBool,
    txn_latency_us: AtomicU64,
    read_latency_us: AtomicU64,
    watch_latency_us: AtomicU64,
    /// Reads whose range starts with this prefix fail.
    failing_reads: Mutex<Option<String>>,
    /// Transactions that compare a key starting with this prefix fail.
    failing_txns: Mutex<Option<String>>,
    /// Transactions passed on and not answered yet, and the most there
    /// were at once since the last reset.
    txns_in_flight: AtomicU64,
    most_txns_in_flight: AtomicU64,
}

impl<S: Store + ?Sized> FaultyStore<S> {
    /// Wrap `inner` with no fault switched on.
    pub fn new(inner: Arc<S>) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            keepalives_blocked: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            txn_latency_us: AtomicU64::new(0),
            read_latency_us: AtomicU64::new(0),
            watch_latency_us: AtomicU64::new(0),
            failing_reads: Mutex::new(None),
            failing_txns: Mutex::new(None),
            txns_in_flight: AtomicU64::new(0),
            most_txns_in_flight: AtomicU64::new(0),
        })
    }

    /// Make lease keepalives fail (every other call still works), as when the
    /// keepalive path to the store is broken.
    pub fn block_keepalives(&self, blocked: bool) {
        self.keepalives_blocked.store(blocked, Ordering::SeqCst);
    }

    /// Make every call fail, as when the store is unreachable. Open watch
    /// streams are not cut by this; new ones cannot be opened.
    pub fn set_outage(&self, outage: bool) {
        self.outage.store(outage, Ordering::SeqCst);
    }

    /// Delay every transaction by `latency` (on tokio's clock) before it
    /// reaches the inner store, as a network round trip to etcd would: with
    /// it, concurrent claims overlap in time the way they do on a real
    /// cluster, which an in-process store answering at once hides.
    pub fn set_txn_latency(&self, latency: Duration) {
        self.txn_latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Delay every range read (not the gets inside transactions) by
    /// `latency`, on tokio's clock: a listing made of several reads then
    /// spans writes made in between, as it does on a busy etcd.
    pub fn set_read_latency(&self, latency: Duration) {
        self.read_latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Deliver every batch of watches opened from now on `latency` late, on
    /// tokio's clock, as etcd's watch stream trails the answers to the
    /// writes it reports: a writer then hears of its own write's success
    /// before its watch does.
    pub fn set_watch_latency(&self, latency: Duration) {
        self.watch_latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Make every read of keys under `prefix` fail (a get, or a transaction
    /// with such a get), as a store that times out on one call would; `None`
    /// ends it. Everything else works.
    pub fn fail_reads_under(&self, prefix: Option<&str>) {
        *self.failing_reads.lock().expect("not poisoned") = prefix.map(str::to_string);
    }

    fn check_read(&self, range: &KeyRange) -> StoreResult<()> {
        let failing = self.failing_reads.lock().expect("not poisoned");
        let start = range.start();
        match failing.as_deref() {
            Some(prefix) if start.starts_with(prefix) => {
                Err(StoreError::Unavailable("injected read failure".into()))
            }
            _ => Ok(()),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Make every transaction that compares a key starting with `prefix`
    /// fail (`None`: none), as a store that keeps refusing one write would.
    pub fn fail_txns_comparing(&self, prefix: Option<&str>) {
        *self.failing_txns.lock().expect("not poisoned") = prefix.map(str::to_string);
    }

    /// The most transactions that were in flight through this store at
    /// once (sent and not answered yet) since the last
    /// [`FaultyStore::reset_most_txns_in_flight`].
    pub fn most_txns_in_flight(&self) -> u64 {
        self.most_txns_in_flight.load(Ordering::SeqCst)
    }

    /// Start counting [`FaultyStore::most_txns_in_flight`] again from the
    /// transactions in flight now.
    pub fn reset_most_txns_in_flight(&self) {
        self.most_txns_in_flight
            .store(self.txns_in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn check(&self) -> StoreResult<()> {
        if self.outage.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("injected outage".into()))
        } else {
            Ok(())
        }
    }
}

/// One call counted in a gauge while it lasts, however it ends (a caller
/// that drops the future counts too).
struct InFlight<'a> {
    gauge: &'a AtomicU64,
    /// The gauge just after this call entered.
    now: u64,
}

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        let now = gauge.fetch_add(1, Ordering::SeqCst) + 1;
        InFlight { gauge, now }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for FaultyStore<S> {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        self.check()?;
        self.check_read(&request.range)?;
        let latency = self.read_latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        self.inner.get(request).await
    }
    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        self.check()?;
        self.inner.put(request).await
    }
    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        self.check()?;
        self.inner.delete(request).await
    }
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        self.check()?;
        for op in txn.success.iter().chain(&txn.failure) {
            if let TxnOp::Get(get) = op {
                self.check_read(&get.range)?;
            }
        }
        if let Some(prefix) = self.failing_txns.lock().expect("not poisoned").as_deref() {
            if let Some(compare) = txn.compares.iter().find(|c| c.key.starts_with(prefix)) {
                return Err(StoreError::Unavailable(format!(
                    "injected failure of a transaction comparing {}",
                    compare.key
                )));
            }
        }
        let in_flight = InFlight::enter(&self.txns_in_flight);
        self.most_txns_in_flight
            .fetch_max(in_flight.now, Ordering::SeqCst);
        let latency = self.txn_latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        self.check()?;
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        self.check()?;
        if self.keepalives_blocked.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected keepalive failure".into()));
        }
        self.inner.lease_keepalive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.check()?;
        self.inner.lease_revoke(lease).await
    }
    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        self.check()?;
        let stream = self.inner.watch(range, start_revision).await?;
        let latency = Duration::from_micros(self.watch_latency_us.load(Ordering::SeqCst));
        if latency.is_zero() {
            return Ok(stream);
        }
        // Each batch waits its latency from when the store sent it, in order.
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = stream;
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(batch) = stream.next().await {
                let due = tokio::time::Instant::now() + latency;
                if sender.send((due, batch)).is_err() {
                    return;
                }
            }
        });
        let delayed = futures::stream::unfold(receiver, |mut receiver| async move {
            let (due, batch) = receiver.recv().await?;
            tokio::time::sleep_until(due).await;
            Some((batch, receiver))
        });
        Ok(Box::pin(delayed))
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.check()?;
        self.inner.compact(revision).await
    }
}
