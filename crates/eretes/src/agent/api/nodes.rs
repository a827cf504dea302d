//! `/v1/nodes`: the live nodes, and the commands queued for one.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use eretes_protocol::{decode, Coordinator, NodeCommand, NodeName, OwnerRecord, TaskId, TaskIndex};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, ApiState};

/// `GET /v1/nodes` and `POST /v1/nodes/{name}/commands`.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/commands", post(node_command))
}

/// Live nodes.
async fn nodes(State(state): State<ApiState>) -> ApiResult<Json<serde_json::Value>> {
    let nodes = state.tasks.read(TaskIndex::nodes).await?;
    Ok(Json(json!({ "nodes": nodes })))
}

/// The body of `POST /v1/nodes/{name}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    command: String,
    #[serde(default)]
    task: Option<String>,
}

async fn node_command(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<CommandRequest>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(request) = body?;
    let node = NodeName::new(&name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let wire = json!({
        "command": request.command.replace('-', "_"),
        "parameters": request.task.as_ref().map(|task| json!({ "task": task })).unwrap_or(json!({})),
    });
    let command = NodeCommand::decode(wire.to_string().as_bytes())?;
    if request.task.is_some() && !matches!(command, NodeCommand::StopTask(_)) {
        return Err(ApiError::invalid(format!(
            "\"task\" is a parameter of stop-task only, not of {}",
            request.command
        )));
    }
    // Only to a live node: a command for a name nobody has would wait for
    // whoever takes that name next.
    if !state.coordinator.node_is_live(&node).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no live node is named {node}"),
        ));
    }
    if let NodeCommand::StopTask(task) = &command {
        check_runs_on(&state.coordinator, task, &node).await?;
    }
    state.coordinator.send_node_command(&node, &command).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Refuse a stop-task for a task that does not run on `node` now: queued,
/// the node would pass over it, and a 202 would say it was done. (A task
/// that moves between this read and the node taking the command is passed
/// over the same way; that race is the command's, not the caller's.)
async fn check_runs_on(coordinator: &Coordinator, task: &TaskId, node: &NodeName) -> ApiResult<()> {
    let keys = coordinator
        .read_task_keys(std::slice::from_ref(task))
        .await?
        .into_iter()
        .next();
    let Some(keys) = keys.filter(|keys| keys.task.is_some()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("task {task} not found"),
        ));
    };
    let owner = keys
        .owner
        .and_then(|kv| decode::<OwnerRecord>("owner", &kv.key, &kv.value).ok());
    let message = match owner {
        Some(owner) if owner.node == *node => return Ok(()),
        Some(owner) => format!("task {task} runs on node {}, not on {node}", owner.node),
        None => format!("task {task} is not running on any node"),
    };
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "not_running_here",
        message,
    ))
}
