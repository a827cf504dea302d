//! A [`Store`] wrapper that counts the requests made through it, by kind.
//!
//! It answers "how many requests per second does a node send to etcd?"
//! without trusting the node's own bookkeeping: every call of the [`Store`]
//! interface passes through here on its way to the real backend.
//!
//! ```
//! use std::sync::Arc;
//! use eretes_store::{counting::CountingStore, embedded::EmbeddedStore, PutRequest, Store};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = Arc::new(CountingStore::new(EmbeddedStore::new()));
//! store.put(PutRequest::new("k", "v")).await.unwrap();
//! assert_eq!(store.counts().put, 1);
//! assert_eq!(store.counts().total(), 1);
//! # });
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::error::StoreResult;
use crate::store::{Store, WatchStream};
use crate::types::*;

/// Request counts by kind, read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    /// Range reads.
    pub get: u64,
    /// Single-key writes.
    pub put: u64,
    /// Deletes.
    pub delete: u64,
    /// Transactions (claims, releases, completions, …).
    pub txn: u64,
    /// Lease grants.
    pub lease_grant: u64,
    /// Lease renewals.
    pub lease_keepalive: u64,
    /// Lease revocations.
    pub lease_revoke: u64,
    /// Watches opened (each one is a single long-lived stream).
    pub watch: u64,
    /// Compactions.
    pub compact: u64,
    /// Batches received on watch streams: pushed by the store, not requested.
    pub watch_batches: u64,
    /// Events in those batches: every change the watches carried.
    pub watch_events: u64,
    /// Keys that range reads returned (not a request count: what the reads
    /// cost the store and the network).
    pub keys_read: u64,
}

impl RequestCounts {
    /// Every request made (watch batches are not requests and are left out).
    pub fn total(&self) -> u64 {
        self.get
            + self.put
            + self.delete
            + self.txn
            + self.lease_grant
            + self.lease_keepalive
            + self.lease_revoke
            + self.watch
            + self.compact
    }

    /// The counts accrued since `earlier`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            get: self.get - earlier.get,
            put: self.put - earlier.put,
            delete: self.delete - earlier.delete,
            txn: self.txn - earlier.txn,
            lease_grant: self.lease_grant - earlier.lease_grant,
            lease_keepalive: self.lease_keepalive - earlier.lease_keepalive,
            lease_revoke: self.lease_revoke - earlier.lease_revoke,
            watch: self.watch - earlier.watch,
            compact: self.compact - earlier.compact,
            watch_batches: self.watch_batches - earlier.watch_batches,
            watch_events: self.watch_events - earlier.watch_events,
            keys_read: self.keys_read - earlier.keys_read,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
    txn: AtomicU64,
    lease_grant: AtomicU64,
    lease_keepalive: AtomicU64,
    lease_revoke: AtomicU64,
    watch: AtomicU64,
    compact: AtomicU64,
    watch_batches: Arc<AtomicU64>,
    watch_events: Arc<AtomicU64>,
    keys_read: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts every request passed on to the store it wraps.
pub struct CountingStore<S> {
    inner: S,
    counters: Counters,
}

impl<S: Store> CountingStore<S> {
    /// Wrap `inner`; every count starts at zero.
    pub fn new(inner: S) -> Self {
        CountingStore {
            inner,
            counters: Counters::default(),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> RequestCounts {
        let c = &self.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RequestCounts {
            get: read(&c.get),
            put: read(&c.put),
            delete: read(&c.delete),
            txn: read(&c.txn),
            lease_grant: read(&c.lease_grant),
            lease_keepalive: read(&c.lease_keepalive),
            lease_revoke: read(&c.lease_revoke),
            watch: read(&c.watch),
            compact: read(&c.compact),
            watch_batches: read(&c.watch_batches),
            watch_events: read(&c.watch_events),
            keys_read: read(&c.keys_read),
        }
    }
}

#[async_trait]
impl<S: Store> Store for CountingStore<S> {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        bump(&self.counters.get);
        let response = self.inner.get(request).await?;
        self.counters
            .keys_read
            .fetch_add(response.kvs.len() as u64, Ordering::Relaxed);
        Ok(response)
    }
    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        bump(&self.counters.put);
        self.inner.put(request).await
    }
    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        bump(&self.counters.delete);
        self.inner.delete(request).await
    }
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        bump(&self.counters.txn);
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        bump(&self.counters.lease_grant);
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        bump(&self.counters.lease_keepalive);
        self.inner.lease_keepalive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        bump(&self.counters.lease_revoke);
        self.inner.lease_revoke(lease).await
    }
    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        bump(&self.counters.watch);
        let batches = self.counters.watch_batches.clone();
        let events = self.counters.watch_events.clone();
        let stream = self.inner.watch(range, start_revision).await?;
        Ok(stream
            .inspect(move |batch| {
                bump(&batches);
                if let Ok(batch) = batch {
                    events.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
            })
            .boxed())
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        bump(&self.counters.compact);
        self.inner.compact(revision).await
    }
}
