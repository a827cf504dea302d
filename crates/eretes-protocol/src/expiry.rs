//! Expiry of ended tasks.
//!
//! What stays of a task once it has ended (done, failed or killed) is its
//! result record, `results/<id>`, which holds the spec, the outcome and
//! when it ended. Kept forever, results are the one part of a namespace
//! that grows with every task ever run: on the embedded store, which holds
//! the namespace in memory, for the life of the agent (some 1.4 KiB per
//! ended `true` task in an agent's heap). An agent with a result retention reads the results page by
//! page ([`Coordinator::ended_before`]) and deletes those that ended before
//! the retention's cutoff ([`Coordinator::delete_ended`]).
//!
//! A deletion is guarded: it happens only if the result is still the one
//! that was read (its `mod_revision`) and no task has been submitted under
//! the id meanwhile. Several agents sweeping one namespace thus never
//! delete anything but what each of them judged expired, and a task
//! removed and submitted again under the same id is never touched.

use eretes_store::{prefix_end, Compare, GetRequest, KeyRange, Revision, Txn};
use serde::Deserialize;

use crate::coordinator::Coordinator;
use crate::error::ProtocolError;
use crate::ids::TaskId;
use crate::keys::KeyKind;

/// Results an agent reads per request while looking for expired ones: a
/// page is one bounded read, whatever the namespace holds. Large, because a
/// limited read still counts the rest of its range (etcd's `count`, which
/// the embedded store reproduces by walking it): pages of 10,000 walk a
/// million results a hundred times, not a thousand.
pub const EXPIRY_PAGE: usize = 10_000;

/// An ended task whose result is old enough to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The task.
    pub id: TaskId,
    /// `mod_revision` of its result when it was read.
    pub result_revision: Revision,
}

/// One page of [`Coordinator::ended_before`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredPage {
    /// The results of the page that ended before the cutoff.
    pub expired: Vec<Expired>,
    /// Where the next page starts (pass it as `after`); `None` after the
    /// last.
    pub next: Option<String>,
}

/// The one field of a result record the expiry reads.
#[derive(Deserialize)]
struct Ended {
    #[serde(default)]
    finished_at_ms: u64,
}

impl Coordinator {
    /// One page of up to `page` results (at least one; see
    /// [`EXPIRY_PAGE`]), from the first result key after `after` (the start
    /// when `None`): those of tasks that ended before `cutoff_ms`
    /// (milliseconds since the Unix epoch, against the ending node's clock).
    /// A result that does not say when it ended, or cannot be read, is never
    /// expired.
    pub async fn ended_before(
        &self,
        cutoff_ms: u64,
        after: Option<&str>,
        page: usize,
    ) -> Result<ExpiredPage, ProtocolError> {
        let prefix = self.namespace().results_prefix();
        let start = match after {
            // The first key after `after`.
            Some(key) => format!("{key}\0"),
            None => prefix.clone(),
        };
        let end = String::from_utf8(prefix_end(&prefix)).expect("keys are ASCII");
        let response = self
            .store()
            .get(GetRequest::new(KeyRange::span(start, end)).with_limit(page.max(1)))
            .await?;
        let next = (response.more)
            .then(|| response.kvs.last().map(|kv| kv.key.clone()))
            .flatten();
        let expired = response
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let Ok(KeyKind::Result(id)) = self.namespace().parse(&kv.key) else {
                    return None;
                };
                let ended: Ended = serde_json::from_slice(&kv.value).ok()?;
                (ended.finished_at_ms > 0 && ended.finished_at_ms < cutoff_ms).then_some(Expired {
                    id,
                    result_revision: kv.mod_revision,
                })
            })
            .collect();
        Ok(ExpiredPage { expired, next })
    }

    /// Delete the ended task `expired` — its result and whatever else is
    /// kept under its id — in one transaction, if its result is still the
    /// one [`Coordinator::ended_before`] read and no task was submitted
    /// under the id since. False if either changed (nothing is deleted).
    pub async fn delete_ended(&self, expired: &Expired) -> Result<bool, ProtocolError> {
        let ns = self.namespace();
        let id = &expired.id;
        let txn = Txn::new()
            .when(Compare::mod_revision_is(
                ns.result(id),
                expired.result_revision,
            ))
            .when(Compare::absent(ns.task(id)));
        let txn = self.delete_every_key(txn, id);
        Ok(self.store().txn(txn).await?.succeeded)
    }
}
