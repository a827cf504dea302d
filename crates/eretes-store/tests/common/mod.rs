//! Helpers the embedded store's test files share.

#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use eretes_store::{PutRequest, WatchBatch, WatchStream};
use futures::StreamExt;

/// A put of `value` at `key`, without a lease.
pub fn put(key: &str, value: &str) -> PutRequest {
    PutRequest::new(key, value)
}

/// The next batch of `stream`, within 10 s; panics on an error or the end.
pub async fn next_batch(stream: &mut WatchStream) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch item in time")
        .expect("the stream goes on")
        .expect("no watch error")
}
