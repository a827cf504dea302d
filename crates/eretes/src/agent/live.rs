//! What the dashboard reads beyond the task and node resources:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/events` | server-sent events: `change` with `{"ids": [...]}` (the tasks that changed, at most 200) or `{"all": true}`, at most one every [`COALESCE`], from the agent's watch of the namespace; a keep-alive comment every 15 s |
//! | `GET /v1/summary` | this agent's node (frozen, running, the latest successful lease renewal's latency and age, counters) and the cluster's task counts by state and by group, kept by the watch-kept index as it changes |
//! | `GET /v1/tasks/{id}/runs` | a task's runs as this agent's watch saw them start and end ([`super::run_history`]), its claim and takeover counts, and its checkpoint's size |
//!
//! The stream names what changed, not what it changed to: a page reads the
//! rows it shows again (one page of the list, O(page)), so the stream stays
//! small whatever the tasks hold, and a client that misses events only
//! reads a page more.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use eretes_protocol::{decode, now_ms, RunRecord, TaskId, TaskIndex, TaskState};
use eretes_store::{GetRequest, KeyRange, Txn, TxnOp, TxnOpResponse};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

use super::api::{task_id, ApiResult, ApiState};
use super::metrics::last_lease_renewal;
use super::task_list::{TaskChanges, MAX_CHANGED_IDS};

/// Changes that arrive within this time of the first go out as one event.
pub const COALESCE: Duration = Duration::from_millis(250);

/// The live routes, merged into the API's router (under its token check).
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/summary", get(summary))
        .route("/v1/tasks/{id}/runs", get(runs))
}

/// What changed since the last event, gathered over [`COALESCE`].
#[derive(Debug, Default, PartialEq)]
struct Gathered {
    ids: BTreeSet<TaskId>,
    all: bool,
}

impl Gathered {
    fn add(&mut self, changes: Result<TaskChanges, ()>) {
        match changes {
            Ok(TaskChanges::Tasks(ids)) if !self.all => {
                self.ids.extend(ids.iter().cloned());
                if self.ids.len() > MAX_CHANGED_IDS {
                    self.all = true;
                    self.ids.clear();
                }
            }
            Ok(TaskChanges::Tasks(_)) => {}
            // A reload, or a receiver that fell behind: anything may differ.
            Ok(TaskChanges::All) | Err(()) => {
                self.all = true;
                self.ids.clear();
            }
        }
    }

    fn to_json(&self) -> Value {
        if self.all {
            json!({ "all": true })
        } else {
            json!({ "ids": self.ids })
        }
    }
}

/// The next event of one stream: wait for a change, gather what else comes
/// within [`COALESCE`]; `None` once the index's follower is gone.
async fn next_change(receiver: &mut Receiver<TaskChanges>) -> Option<Gathered> {
    let mut gathered = Gathered::default();
    match receiver.recv().await {
        Ok(changes) => gathered.add(Ok(changes)),
        Err(RecvError::Lagged(_)) => gathered.add(Err(())),
        Err(RecvError::Closed) => return None,
    }
    tokio::time::sleep(COALESCE).await;
    loop {
        match receiver.try_recv() {
            Ok(changes) => gathered.add(Ok(changes)),
            Err(TryRecvError::Lagged(_)) => gathered.add(Err(())),
            Err(TryRecvError::Empty | TryRecvError::Closed) => return Some(gathered),
        }
    }
}

async fn events(
    State(state): State<ApiState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.tasks.subscribe();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let gathered = next_change(&mut receiver).await?;
        let event = Event::default()
            .event("change")
            .data(gathered.to_json().to_string());
        Some((Ok(event), receiver))
    });
    let mut stopping = state.stopping.clone();
    let stopped = async move {
        // A dropped sender is a stop too.
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    Sse::new(stream.take_until(stopped))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn summary(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let counts = state.tasks.read(TaskIndex::counts).await?;
    let mut states: BTreeMap<&str, usize> = TaskState::ALL.iter().map(|s| (s.name(), 0)).collect();
    let mut groups: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for ((group, task_state), count) in counts {
        *states.entry(task_state.name()).or_default() += count;
        *groups
            .entry(group.to_string())
            .or_default()
            .entry(task_state.name())
            .or_default() += count;
    }
    let status = state.status.borrow().clone();
    let (now, renewal) = (now_ms(), last_lease_renewal());
    Ok(Json(json!({
        "at_ms": now,
        "node": state.node,
        "registered": status.registered,
        "frozen": status.frozen,
        "running": status.running,
        "live_nodes": status.live_nodes,
        "lease_renewal_ms": renewal.map(|(took, _)| took.as_secs_f64() * 1000.0),
        "lease_renewed_ms_ago": renewal.map(|(_, at_ms)| now.saturating_sub(at_ms)),
        "counters": state.metrics.node_stats(),
        "states": states,
        "groups": groups,
    })))
}

async fn runs(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = task_id(&id)?;
    let (store, ns) = (state.coordinator.store(), state.coordinator.namespace());
    // Both records in one round trip, at one revision.
    let get = |key: String| TxnOp::Get(GetRequest::new(KeyRange::key(key)));
    let read = Txn::new()
        .and_then(get(ns.run(&id)))
        .and_then(get(ns.checkpoint(&id)));
    let response = store
        .txn(read)
        .await
        .map_err(eretes_protocol::ProtocolError::from)?;
    let mut found = response.responses.into_iter().map(|answer| match answer {
        TxnOpResponse::Get(mut got) => got.kvs.pop(),
        _ => None,
    });
    let (record, checkpoint) = (found.next().flatten(), found.next().flatten());
    // A record that does not decode is shown as absent, not as an error:
    // the page still has the rest to show.
    let record = record.and_then(|kv| decode::<RunRecord>("run", &kv.key, &kv.value).ok());
    Ok(Json(json!({
        "task": id,
        "runs": state.tasks.runs().of(&id),
        "claims": record.as_ref().map(|r| r.claims),
        "takeovers": record.as_ref().map(|r| r.takeovers),
        "checkpoint": checkpoint.map(|kv| json!({ "bytes": kv.value.len(), "revision": kv.mod_revision })),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> TaskChanges {
        TaskChanges::Tasks(names.iter().map(|n| n.parse().unwrap()).collect())
    }

    #[test]
    fn changes_merge_until_there_are_too_many_to_name() {
        let mut gathered = Gathered::default();
        gathered.add(Ok(ids(&["b", "a"])));
        gathered.add(Ok(ids(&["a", "c"])));
        assert_eq!(gathered.to_json(), json!({ "ids": ["a", "b", "c"] }));
        let many: Vec<String> = (0..MAX_CHANGED_IDS).map(|n| format!("t{n}")).collect();
        gathered.add(Ok(ids(&many
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>())));
        assert_eq!(gathered.to_json(), json!({ "all": true }));
        // Once everything may have changed, names add nothing.
        gathered.add(Ok(ids(&["d"])));
        assert_eq!(gathered.to_json(), json!({ "all": true }));
    }

    #[test]
    fn a_reload_or_a_lag_means_everything() {
        for missed in [Ok(TaskChanges::All), Err(())] {
            let mut gathered = Gathered::default();
            gathered.add(Ok(ids(&["a"])));
            gathered.add(missed);
            assert_eq!(gathered.to_json(), json!({ "all": true }));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_event_carries_what_came_within_the_window() {
        let (sender, mut receiver) = tokio::sync::broadcast::channel(8);
        sender.send(ids(&["a"])).unwrap();
        let later = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(COALESCE / 2).await;
            later.send(ids(&["b"])).unwrap();
            tokio::time::sleep(COALESCE * 2).await;
            later.send(ids(&["c"])).unwrap();
        });
        let first = next_change(&mut receiver).await.unwrap();
        assert_eq!(first.to_json(), json!({ "ids": ["a", "b"] }));
        let second = next_change(&mut receiver).await.unwrap();
        assert_eq!(second.to_json(), json!({ "ids": ["c"] }));
        drop(sender);
        assert!(next_change(&mut receiver).await.is_none());
    }
}
