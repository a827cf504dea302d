//! # eretes-store — the bottom layer of eretes
//!
//! An etcd-shaped, revisioned key-value store interface ([`Store`]) and its
//! backends. Nothing above this crate knows which backend it runs on.
//!
//! * [`embedded::EmbeddedStore`] — in-process, with etcd's exact semantics,
//!   driven by tokio's clock so that tests which pause and advance time expire
//!   leases deterministically. [`embedded::EmbeddedStore::open_durable`]
//!   keeps it in one redb file instead, every write on disk before it is
//!   answered (the single-node agent's default).
//! * The etcd v3 backend lives in its own crate and passes the same
//!   [`conformance`] suite unchanged.
//! * Wrappers: [`faults::FaultyStore`] injects failures for tests, and
//!   [`counting::CountingStore`] counts the requests a node makes.
//!
//! The model, as in etcd v3: every write advances one global revision; each key
//! carries `create_revision`, `mod_revision`, `version` and an optional lease;
//! transactions compare fields and then apply one of two operation lists
//! atomically; a lease's expiry deletes all its keys in one revision; watches
//! deliver every change of a range from a revision on, or report
//! [`StoreError::Compacted`] when that history is gone.
//!
//! ```
//! use eretes_store::{embedded::EmbeddedStore, Compare, PutRequest, Store, StoreExt, Txn, TxnOp};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = EmbeddedStore::new();
//! // Create-if-absent, the building block of a claim.
//! let txn = Txn::new()
//!     .when(Compare::absent("jobs/a"))
//!     .and_then(TxnOp::Put(PutRequest::new("jobs/a", "mine")));
//! assert!(store.txn(txn.clone()).await.unwrap().succeeded);
//! assert!(!store.txn(txn).await.unwrap().succeeded, "the second create fails");
//! let kv = store.get_key("jobs/a").await.unwrap().unwrap();
//! assert_eq!(kv.value, b"mine");
//! assert_eq!(kv.version, 1);
//! # });
//! ```

pub mod conformance;
pub mod counting;
pub mod embedded;
mod error;
pub mod faults;
mod store;
mod types;
pub mod validate;

pub use error::{StoreError, StoreResult};
pub use store::{Store, StoreExt, WatchStream};
pub use types::*;
