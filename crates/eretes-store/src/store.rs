//! The [`Store`] trait: the whole interface the layers above the store use.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::StoreResult;
use crate::types::*;

/// A stream of watch batches. Each item holds the events of one or more
/// consecutive revisions in revision order; an `Err` (for example
/// [`crate::StoreError::Compacted`]) ends the stream. Dropping the stream
/// cancels the watch.
pub type WatchStream = BoxStream<'static, StoreResult<WatchBatch>>;

/// A revisioned key-value store with etcd v3 semantics.
///
/// Implementations: [`crate::embedded::EmbeddedStore`] (in-process) and the
/// etcd backend. The conformance suite in [`crate::conformance`] pins down the
/// semantics every implementation must have.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Read a key or a prefix.
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse>;

    /// Write one key.
    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse>;

    /// Delete one key or a prefix.
    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse>;

    /// Apply a transaction atomically.
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse>;

    /// Grant a lease that expires `ttl` after the last keepalive.
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant>;

    /// Renew a lease; returns the remaining TTL after renewal.
    /// [`crate::StoreError::LeaseNotFound`] if it has expired or was revoked.
    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration>;

    /// Revoke a lease, deleting every key attached to it in one revision.
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()>;

    /// Watch `range` for changes from `start_revision` on (inclusive).
    /// `start_revision` 0 means "from the next write". Every put and delete is
    /// delivered in revision order with its previous value. A start revision
    /// older than the compaction point fails with
    /// [`crate::StoreError::Compacted`], either at once or as the stream's
    /// first item.
    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream>;

    /// Discard history older than `revision`. Reads and watches from an
    /// earlier revision then fail with [`crate::StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> StoreResult<()>;
}

/// Convenience calls every [`Store`] gets for free.
#[async_trait]
pub trait StoreExt: Store {
    /// Read one key.
    async fn get_key(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let mut response = self.get(GetRequest::new(KeyRange::key(key))).await?;
        Ok(response.kvs.pop())
    }

    /// Read every key under `prefix`, with the revision of the read.
    async fn get_prefix(&self, prefix: &str) -> StoreResult<GetResponse> {
        self.get(GetRequest::new(KeyRange::prefix(prefix))).await
    }

    /// The store's current revision.
    async fn current_revision(&self) -> StoreResult<Revision> {
        // A count-only read of a key nobody uses costs nothing and reports the revision.
        let response = self
            .get(GetRequest::new(KeyRange::key("\u{0}revision-probe")).count_only())
            .await?;
        Ok(response.revision)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        (**self).get(request).await
    }
    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        (**self).put(request).await
    }
    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        (**self).delete(request).await
    }
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        (**self).txn(txn).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        (**self).lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        (**self).lease_keepalive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        (**self).lease_revoke(lease).await
    }
    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        (**self).watch(range, start_revision).await
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        (**self).compact(revision).await
    }
}
