//! The agent's HTTP API (axum). Every error has one shape,
//! `{"error": {"code": "...", "message": "..."}}`, with the status code that
//! fits; request bodies are limited in size; who may call what is
//! [`super::access`]'s to say (with a token configured, every call but the
//! health checks needs it).
//!
//! Task states (`state` in a task, `?state=` in a list) are `pending`,
//! `running`, `sleeping` (with `sleeping_until_ms`), `paused`, `fault`,
//! `done`, `failed` and `killed`; a live task also lists the newest
//! `errors` its handler reported.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/tasks` | submit a process task |
//! | `GET /v1/tasks?state=&group=&limit=&after=` | list, filtered, paginated by id (`limit` 1–1000, default 100, and about 1 MiB of tasks at most, at least one; `next` in the answer is the `after` of the next page; `malformed` counts records that do not decode); served from the agent's watch-kept index ([`super::task_list`]): O(page), and it holds every submit and removal this agent acknowledged before |
//! | `GET /v1/tasks/{id}` | one task |
//! | `DELETE /v1/tasks/{id}` | delete it (stops it wherever it runs) |
//! | `GET /v1/tasks/{id}/wait?timeout_s=` | long-poll until it ends |
//! | `GET /v1/tasks/{id}/logs?stream=&tail=&follow=` | its stdout or stderr on this agent (last `tail` lines; `follow` until it ends) |
//! | `POST /v1/tasks/{id}/commands` | queue a task command: `{"command": "pause"}`, `"resume"`, `"kill"`, or `{"command": "sleep", "duration_ms": N}` (or `"until_ms"`); 202, 404 for no such task, 409 once it has ended |
//! | `GET /v1/nodes` | live nodes |
//! | `POST /v1/nodes/{name}/commands` | queue a node command: `{"command": "drain"}` (or `freeze`, `unfreeze`, `balance`), or `{"command": "stop-task", "task": ID}`; 202, 404 for no such live node or task, 409 when the task does not run on that node |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness |
//! | `GET /metrics` | Prometheus text format (see [`super::metrics`]) |
//! | `GET /v1/events`, `GET /v1/summary`, `GET /v1/tasks/{id}/runs` | the dashboard's live views (see [`super::live`]) |
//! | `GET /v1/jobs`, `GET /v1/jobs/{name}` | task graphs of the namespace (see [`super::jobs`]) |
//! | `GET /`, `GET /ui/` | the dashboard (see [`super::ui`]) |

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eretes_exec::ProcessSpec;
use eretes_protocol::{
    Coordinator, GroupName, ProtocolError, TaskCommand, TaskId, TaskQuery, TaskSpec, TaskState,
    TaskView,
};
use eretes_runtime::NodeStatus;
use eretes_store::KeyRange;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

mod error;
mod nodes;

use error::errors_as_json;
pub use error::ApiError;
pub(crate) use error::{task_id, ApiResult};

use super::access::{self, Access};
use super::task_list::LiveTasks;

/// Largest request body accepted. A task spec is at most 64 KiB once stored.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest a wait call holds, in seconds.
pub const MAX_WAIT_S: u64 = 300;
/// Most tasks one list call returns.
pub const MAX_PAGE: usize = 1000;
/// Longest sleep a `sleep` task command may ask for (365 days), in ms.
pub const MAX_SLEEP_MS: u64 = 365 * 24 * 3600 * 1000;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The cluster's protocol.
    pub coordinator: Coordinator,
    /// This agent's node, as the runtime reports it.
    pub status: watch::Receiver<NodeStatus>,
    /// The embedded store, when the agent runs on it (not with `--etcd`):
    /// `/readyz` asks it whether it can write.
    pub embedded: Option<std::sync::Arc<eretes_store::embedded::EmbeddedStore>>,
    /// Where this agent keeps task logs.
    pub logs_dir: PathBuf,
    /// How long a removed task's run here may take to stop (the handlers'
    /// grace): what it prints meanwhile makes its log directory again,
    /// which is removed once more after this.
    pub stop_grace: Duration,
    /// This agent's node name.
    pub node: eretes_protocol::NodeName,
    /// Who may call what.
    pub access: Access,
    /// The task list, kept current by this agent's watch.
    pub tasks: Arc<LiveTasks>,
    /// What `/metrics` reports.
    pub metrics: std::sync::Arc<super::metrics::Metrics>,
    /// True once the agent stops serving: streams that never end by
    /// themselves (`/v1/events`) end then, so shutdown need not wait on them.
    pub stopping: watch::Receiver<bool>,
}

/// The router with every route, the body limit and deadline
/// (`body_timeout`), and the token check.
pub fn router(state: ApiState, body_timeout: Duration) -> Router {
    Router::new()
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/{id}", get(show).delete(remove))
        .route("/v1/tasks/{id}/wait", get(wait))
        .route("/v1/tasks/{id}/logs", get(super::logs::logs))
        .route("/v1/tasks/{id}/commands", post(task_command))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus))
        .merge(nodes::routes())
        .merge(super::live::routes())
        .merge(super::jobs::routes())
        .merge(super::ui::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        // Inside the checks below: what they refuse is not read.
        .layer(middleware::from_fn(
            move |request: axum::extract::Request, next: middleware::Next| {
                super::server::read_body_within(request, next, body_timeout)
            },
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access::require_token,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access::check_host,
        ))
        .layer(middleware::from_fn(access::refuse_cross_site_changes))
        .layer(middleware::from_fn(access::refuse_ambiguous))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(errors_as_json))
        .with_state(state)
}

/// The body of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The task's id; one is made up when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Its group (`default` when absent).
    #[serde(default)]
    pub group: Option<String>,
    /// What to run.
    #[serde(flatten)]
    pub process: ProcessSpec,
}

/// The body of `POST /v1/tasks` for a Kubernetes task:
/// `{"id": ..., "group": ..., "kubernetes": {...}}` (see
/// [`eretes_kube::KubeSpec`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitKubernetesRequest {
    /// The task's id; one is made up when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Its group (`default` when absent).
    #[serde(default)]
    pub group: Option<String>,
    /// What to run, checked by [`eretes_kube::KubeSpec::from_value`] (which
    /// refuses unknown fields at any depth).
    pub kubernetes: serde_json::Value,
}

async fn submit(
    State(state): State<ApiState>,
    body: Result<Json<Box<serde_json::value::RawValue>>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let Json(body) = body?;
    let text = body.get();
    // A body naming "kubernetes" is a Kubernetes task; any other a process.
    // Each request type is read from the text itself, which refuses a field
    // named twice: read through a `Value` first, the last one won, and
    // `{"id": "a", "id": "b"}` submitted `b`.
    let kind: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ApiError::invalid(e.to_string()))?;
    let (id, group, properties) = if kind.get(eretes_kube::PROPERTIES_KEY).is_some() {
        let request: SubmitKubernetesRequest =
            serde_json::from_str(text).map_err(|e| ApiError::invalid(e.to_string()))?;
        let spec = eretes_kube::KubeSpec::from_value(&request.kubernetes)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        (request.id, request.group, spec.to_properties())
    } else {
        let request: SubmitRequest =
            serde_json::from_str(text).map_err(|e| ApiError::invalid(e.to_string()))?;
        request
            .process
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        (request.id, request.group, request.process.to_properties())
    };
    let id = match &id {
        Some(id) => task_id(id)?,
        None => TaskId::new(format!(
            "task-{}-{:06x}",
            eretes_protocol::now_ms(),
            rand::random::<u32>() & 0xff_ffff
        ))
        .expect("generated ids are valid"),
    };
    let group = match &group {
        Some(group) => GroupName::new(group).map_err(|e| ApiError::invalid(e.to_string()))?,
        None => GroupName::default_group(),
    };
    let spec = TaskSpec::new(group, properties);
    let revision = state.coordinator.submit(&id, &spec).await?;
    state.tasks.wrote(revision);
    let view = state
        .coordinator
        .task_view(&id)
        .await?
        .ok_or_else(|| ProtocolError::NotFound(id.to_string()))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    group: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

/// About the most bytes of tasks a page of the list holds (at least one
/// task): a thousand tasks of 60 KB each made 60 MB pages, built whole for
/// each request, which a reader that reads nothing can make the agent hold
/// per connection. A shorter page says `next` as a full one does.
const MAX_PAGE_BYTES: usize = 1 << 20;

/// How many keys of records that do not decode a page names.
const MALFORMED_NAMED: usize = 5;

/// A page of tasks.
#[derive(Debug, Serialize)]
struct TaskPage {
    tasks: Vec<TaskView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<TaskId>,
    /// How many records in the store do not decode, and so are in no page
    /// (a client that lists everything must not take its list for all);
    /// absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    malformed: usize,
    /// The keys of the first [`MALFORMED_NAMED`] of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    malformed_keys: Vec<String>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<TaskPage>> {
    let Query(query) = query?;
    let wanted_state = match &query.state {
        Some(name) => Some(TaskState::parse(name).ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.name()).collect();
            ApiError::invalid(format!("state {name:?} is not one of {}", names.join(", ")))
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit} is not between 1 and {MAX_PAGE}"
        )));
    }
    let query = TaskQuery {
        after: query
            .after
            .as_deref()
            .map(|after| TaskId::new(after).map_err(|e| ApiError::invalid(format!("after: {e}"))))
            .transpose()?,
        state: wanted_state,
        group: query.group,
        limit,
        max_bytes: MAX_PAGE_BYTES,
    };
    let (tasks, next, malformed, malformed_keys) = state
        .tasks
        .read(|index| {
            let (tasks, next) = index.page(&query);
            (
                tasks,
                next,
                index.malformed(),
                index.malformed_keys(MALFORMED_NAMED),
            )
        })
        .await?;
    Ok(Json(TaskPage {
        tasks,
        next,
        malformed,
        malformed_keys,
    }))
}

async fn show(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<TaskView>> {
    let id = task_id(&id)?;
    match state.coordinator.task_view(&id).await? {
        Some(view) => Ok(Json(view)),
        None => Err(ProtocolError::NotFound(id.to_string()).into()),
    }
}

async fn remove(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = task_id(&id)?;
    let revision = state.coordinator.delete(&id).await?;
    state.tasks.wrote(revision);
    // Its logs here go with it (other agents' sweeps remove theirs); and
    // once more when its run here has had its grace to stop, since what
    // it prints while it stops (a SIGTERM handler's goodbye) makes them
    // again. Not if the id was submitted again meanwhile.
    super::logs::remove_logs(&state.logs_dir, &id).await;
    let (logs_dir, coordinator, grace) = (
        state.logs_dir.clone(),
        state.coordinator.clone(),
        state.stop_grace,
    );
    tokio::spawn(async move {
        tokio::time::sleep(grace + Duration::from_secs(1)).await;
        // Most removed tasks never ran here: no read of the store for them.
        let made_again = tokio::fs::try_exists(logs_dir.join(id.as_str()))
            .await
            .unwrap_or(true);
        if made_again && matches!(coordinator.task_view(&id).await, Ok(None)) {
            super::logs::remove_logs(&logs_dir, &id).await;
        }
    });
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /v1/tasks/{id}/wait`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_s: Option<u64>,
}

/// The task once it has ended, or as it is when `timeout_s` (default 30)
/// runs out: the caller looks at `state` and asks again.
async fn wait(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<TaskView>> {
    let Query(query) = query?;
    let id = task_id(&id)?;
    let timeout = query.timeout_s.unwrap_or(30);
    if timeout > MAX_WAIT_S {
        return Err(ApiError::invalid(format!(
            "timeout_s {timeout} is above {MAX_WAIT_S}"
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let coordinator = &state.coordinator;
    let ns = coordinator.namespace();
    // Watched once, before the first look, so that an end between the two
    // is seen. If the watches end (the store closed them), look once a
    // second instead.
    let store = coordinator.store();
    let mut result_changes = store
        .watch(KeyRange::key(ns.result(&id)), 0)
        .await
        .map_err(ProtocolError::from)?;
    let mut task_changes = store
        .watch(KeyRange::key(ns.task(&id)), 0)
        .await
        .map_err(ProtocolError::from)?;
    let mut watching = true;
    loop {
        let view = coordinator
            .task_view(&id)
            .await?
            .ok_or_else(|| ProtocolError::NotFound(id.to_string()))?;
        if view.state.is_terminal() {
            return Ok(Json(view));
        }
        let change = async {
            if !watching {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return true;
            }
            tokio::select! {
                event = result_changes.next() => matches!(event, Some(Ok(_))),
                event = task_changes.next() => matches!(event, Some(Ok(_))),
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(view)),
            still_watching = change => watching &= still_watching,
        }
    }
}

/// The body of `POST /v1/tasks/{id}/commands`: a command, and for `sleep`
/// either how long (`duration_ms`) or until when (`until_ms`, milliseconds
/// since the Unix epoch by the agent's clock).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskCommandRequest {
    /// `pause`, `resume`, `sleep` or `kill`.
    pub command: String,
    /// For `sleep`: how long, 1 ms to [`MAX_SLEEP_MS`].
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// For `sleep`: until when, at most [`MAX_SLEEP_MS`] from now.
    #[serde(default)]
    pub until_ms: Option<u64>,
}

impl TaskCommandRequest {
    /// The command this asks for, checked, with `now_ms` the agent's clock;
    /// an error message says what is wrong with it.
    pub fn to_command(&self, now_ms: u64) -> Result<TaskCommand, String> {
        let timed = self.duration_ms.is_some() || self.until_ms.is_some();
        let command = match self.command.as_str() {
            "pause" => TaskCommand::Pause,
            "resume" => TaskCommand::Resume,
            "kill" => TaskCommand::Kill,
            "sleep" => {
                let until_ms = match (self.duration_ms, self.until_ms) {
                    (Some(duration), None) => {
                        if !(1..=MAX_SLEEP_MS).contains(&duration) {
                            return Err(format!(
                                "duration_ms {duration} is not between 1 and {MAX_SLEEP_MS} (365 days)"
                            ));
                        }
                        now_ms.saturating_add(duration)
                    }
                    (None, Some(until)) => {
                        if until <= now_ms {
                            return Err(format!(
                                "until_ms {until} is not in the future (the agent's clock says {now_ms})"
                            ));
                        }
                        if until - now_ms > MAX_SLEEP_MS {
                            return Err(format!("until_ms {until} is more than 365 days ahead"));
                        }
                        until
                    }
                    (Some(_), Some(_)) => {
                        return Err("sleep takes duration_ms or until_ms, not both".into())
                    }
                    (None, None) => {
                        return Err(
                            "sleep needs duration_ms (how long) or until_ms (until when)".into(),
                        )
                    }
                };
                return Ok(TaskCommand::Sleep { until_ms });
            }
            other => {
                return Err(format!(
                    "unknown task command {other:?}; task commands are {}",
                    TaskCommand::NAMES.join(", ")
                ))
            }
        };
        if timed {
            return Err(format!(
                "{} takes no duration_ms or until_ms (only sleep does)",
                self.command
            ));
        }
        Ok(command)
    }
}

/// Queue a command for a task; its owner applies it (or the next owner,
/// if the task is not running now).
async fn task_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<TaskCommandRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let id = task_id(&id)?;
    let Json(request) = body?;
    let command = request
        .to_command(eretes_protocol::now_ms())
        .map_err(ApiError::invalid)?;
    let revision = state.coordinator.send_task_command(&id, &command).await?;
    let mut answer = json!({ "task": id, "command": command.name(), "revision": revision });
    if let TaskCommand::Sleep { until_ms } = command {
        answer["until_ms"] = json!(until_ms);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// The Prometheus text exposition.
async fn prometheus(State(state): State<ApiState>) -> ApiResult<Response> {
    let text = state.metrics.render().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Ready once this agent's node holds a lease and is registered, and, on
/// the embedded store, while that store can write: from its first failed
/// write (a full disk, say) until it writes again, 503 with its error.
async fn ready(State(state): State<ApiState>) -> Response {
    // Also retries the store's file, so that readiness returns with the
    // disk space even while nobody writes.
    if let Some(failure) = state.embedded.as_ref().and_then(|s| s.write_failure()) {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", failure)
            .into_response();
    }
    let status = state.status.borrow().clone();
    if status.registered {
        Json(json!({ "status": "ready", "running": status.running })).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this agent's node is not registered (no lease): the store is unreachable or it is fencing",
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::{TaskCommandRequest, MAX_SLEEP_MS};
    use eretes_protocol::TaskCommand;

    fn request(body: serde_json::Value) -> Result<TaskCommandRequest, serde_json::Error> {
        serde_json::from_value(body)
    }

    #[test]
    fn task_command_bodies_become_commands() {
        use serde_json::json;
        let now = 1_000_000;
        let command = |body| request(body).unwrap().to_command(now);
        assert_eq!(command(json!({"command": "pause"})), Ok(TaskCommand::Pause));
        assert_eq!(
            command(json!({"command": "resume"})),
            Ok(TaskCommand::Resume)
        );
        assert_eq!(command(json!({"command": "kill"})), Ok(TaskCommand::Kill));
        assert_eq!(
            command(json!({"command": "sleep", "duration_ms": 2500})),
            Ok(TaskCommand::Sleep {
                until_ms: now + 2500
            })
        );
        assert_eq!(
            command(json!({"command": "sleep", "until_ms": now + 1})),
            Ok(TaskCommand::Sleep { until_ms: now + 1 })
        );
        assert_eq!(
            command(json!({"command": "sleep", "duration_ms": MAX_SLEEP_MS})),
            Ok(TaskCommand::Sleep {
                until_ms: now + MAX_SLEEP_MS
            })
        );
        for (body, expected) in [
            (
                json!({"command": "explode"}),
                "unknown task command \"explode\"; task commands are pause, resume, sleep, kill",
            ),
            (json!({"command": "sleep"}), "sleep needs duration_ms"),
            (
                json!({"command": "sleep", "duration_ms": 0}),
                "duration_ms 0",
            ),
            (
                json!({"command": "sleep", "duration_ms": MAX_SLEEP_MS + 1}),
                "365 days",
            ),
            (
                json!({"command": "sleep", "duration_ms": 5, "until_ms": now + 5}),
                "not both",
            ),
            (
                json!({"command": "sleep", "until_ms": now}),
                "not in the future",
            ),
            (
                json!({"command": "sleep", "until_ms": now + MAX_SLEEP_MS + 1}),
                "more than 365 days",
            ),
            (
                json!({"command": "pause", "duration_ms": 5}),
                "pause takes no duration_ms",
            ),
            (
                json!({"command": "kill", "until_ms": now + 5}),
                "only sleep",
            ),
        ] {
            let error = command(body.clone()).unwrap_err();
            assert!(error.contains(expected), "{body}: {error}");
        }
        for bad in [
            json!({"command": "pause", "colour": "red"}),
            json!({}),
            json!({"command": 3}),
            json!({"command": "sleep", "duration_ms": -1}),
        ] {
            assert!(request(bad.clone()).is_err(), "{bad}");
        }
    }
}
