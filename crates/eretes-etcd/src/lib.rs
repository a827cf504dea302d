//! # eretes-etcd — the store layer on etcd v3
//!
//! [`EtcdStore`] implements [`eretes_store::Store`] on a real etcd cluster
//! through the maintained `etcd-client` crate, so that everything above the
//! store (the coordination protocol, the node runtime, the agent) runs
//! unchanged on more than one machine. It passes the same conformance suite
//! as the embedded store (`tests/conformance.rs`).
//!
//! Besides the one-to-one mapping of requests, it carries the **session
//! layer** that real etcd users end up writing themselves:
//!
//! * **Supervised lease keepalives.** One keepalive stream per lease is kept
//!   open and reused. A keepalive answered with a TTL of 0 is reported as
//!   [`StoreError::LeaseNotFound`] at once, which the node runtime treats as
//!   lease loss: it fences itself and registers again with a new lease. A
//!   broken stream is reported as [`StoreError::Unavailable`] and reopened by
//!   the next renewal; the runtime fences itself if renewals keep failing
//!   until the lease could have expired.
//! * **Resumed watches.** A watch whose stream breaks (a network error, an
//!   etcd restart) is reopened from the revision after the last event it
//!   delivered, so no event is lost or repeated. If that revision has been
//!   compacted meanwhile, the stream ends with [`StoreError::Compacted`] and
//!   the runtime lists again, then watches from the listing's revision.
//! * **require-leader** on every request, so a member cut off in a minority
//!   fails fast instead of serving stale reads or hanging.
//! * **Several endpoints**, a **timeout on every call**, **TLS** (CA and client
//!   certificate) and **username/password auth**: see [`EtcdOptions`].
//!
//! Keys are used as given: the coordination protocol already puts everything
//! under its namespace, and etcd's revision is the fencing epoch.
//!
//! ```no_run
//! use eretes_etcd::{EtcdOptions, EtcdStore};
//! use eretes_store::{PutRequest, Store, StoreExt};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let options = EtcdOptions::from_urls("http://127.0.0.1:2379,http://127.0.0.1:22379")?;
//! let store = EtcdStore::connect(options).await?;
//! store.put(PutRequest::new("demo/hello", "world")).await?;
//! assert_eq!(store.get_key("demo/hello").await?.unwrap().value, b"world");
//! # Ok(())
//! # }
//! ```

mod convert;
mod options;
mod store;
pub mod testing;
mod watch;

pub use options::{EtcdOptions, EtcdTls, OptionsError};
pub use store::{EtcdStore, MAX_RESPONSE_BYTES, READ_PAGE_KEYS};

/// Re-exported for the error type of every call.
pub use eretes_store::StoreError;
