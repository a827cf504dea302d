//! What the store did during a chaos run, as the chaos process watched it
//! (directly on the etcd members, never through an agent's relay): every
//! claim (an owner key's creation, whose revision is the run's epoch),
//! every owner's end, every checkpoint and every terminal result, each with
//! its revision and the time the watch delivered it.
//!
//! The watch resumes from the last revision it saw when a member dies
//! under it, and the run never compacts, so no event is missed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eretes_protocol::{decode, KeyKind, Namespace, Outcome, OwnerRecord, ResultRecord};
use eretes_store::{EventKind, KeyRange, Revision, Store, WatchEvent};
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::witness::now_us;

/// One thing the store did to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node claimed it: a run with this epoch may start.
    Claimed {
        /// The claiming node.
        node: String,
        /// The claim's epoch (the owner key's create revision).
        epoch: i64,
    },
    /// Its owner key went (a release, an end, or a lease's expiry).
    Unowned,
    /// A checkpoint was stored: the witness' sequence number.
    Checkpoint(u64),
    /// A checkpoint that is not a number (the witness never writes one).
    BadCheckpoint,
    /// Its terminal result was written.
    Ended(Outcome),
}

/// A change, when it happened in the store and when the watch saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The task's id.
    pub task: String,
    /// What changed.
    pub change: Change,
    /// The store revision of the change.
    pub revision: Revision,
    /// When the chaos process's watch delivered it (µs since the Unix epoch).
    pub seen_us: u64,
}

/// The recorder: watching until dropped.
pub struct History {
    seen: Arc<Mutex<Vec<Observed>>>,
    watch: JoinHandle<()>,
}

impl History {
    /// Watch `namespace` on `store` from `start` (the revision after the
    /// namespace was found empty).
    pub fn start(store: Arc<dyn Store>, namespace: Namespace, start: Revision) -> History {
        let seen: Arc<Mutex<Vec<Observed>>> = Arc::default();
        let watch = tokio::spawn(watch_loop(store, namespace, start, seen.clone()));
        History { seen, watch }
    }

    /// A copy of everything seen so far.
    pub fn snapshot(&self) -> Vec<Observed> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

async fn watch_loop(
    store: Arc<dyn Store>,
    namespace: Namespace,
    mut next: Revision,
    seen: Arc<Mutex<Vec<Observed>>>,
) {
    let range = KeyRange::prefix(namespace.root());
    loop {
        let mut stream = match store.watch(range.clone(), next).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "the chaos history's watch failed; again in 200 ms");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while let Some(batch) = stream.next().await {
            let Ok(batch) = batch else { break };
            let seen_us = now_us();
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            for event in batch {
                next = next.max(event.kv.mod_revision + 1);
                if let Some(observed) = observe(&namespace, &event, seen_us) {
                    seen.push(observed);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an event says of a task, if it is one the checker reads.
pub fn observe(namespace: &Namespace, event: &WatchEvent, seen_us: u64) -> Option<Observed> {
    let kv = &event.kv;
    let (task, change) = match (namespace.parse(&kv.key).ok()?, event.kind) {
        (KeyKind::Owner(task), EventKind::Put) if kv.version == 1 => {
            let owner: OwnerRecord = decode("owner", &kv.key, &kv.value).ok()?;
            let change = Change::Claimed {
                node: owner.node.as_str().to_string(),
                epoch: kv.create_revision,
            };
            (task, change)
        }
        (KeyKind::Owner(task), EventKind::Delete) => (task, Change::Unowned),
        (KeyKind::Checkpoint(task), EventKind::Put) => {
            let change = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .map_or(Change::BadCheckpoint, Change::Checkpoint);
            (task, change)
        }
        (KeyKind::Result(task), EventKind::Put) => {
            let result: ResultRecord = decode("result", &kv.key, &kv.value).ok()?;
            (task, Change::Ended(result.outcome))
        }
        _ => return None,
    };
    Some(Observed {
        task: task.as_str().to_string(),
        change,
        revision: kv.mod_revision,
        seen_us,
    })
}
