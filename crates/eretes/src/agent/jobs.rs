//! Task graphs in the agent's namespace, for the dashboard:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/jobs` | every job: name, kind, tasks, epoch |
//! | `GET /v1/jobs/{name}` | one job: each task's state and node (from the agent's watch-kept index), and the edges of its topology in the current job epoch (for the kinds this binary knows: `regression`; another kind's job is listed with its tasks and no edges) |
//!
//! The agent runs process tasks, not graph tasks: a job's tasks run on the
//! graph nodes that serve its group. The agent shows them because they are
//! ordinary tasks of its namespace.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use eretes_graph::regression::Regression;
use eretes_graph::{
    graph_task_id, GraphError, JobEpoch, JobKind, JobName, JobSpec, Jobs, Topology,
};
use serde_json::{json, Value};

use super::api::{ApiError, ApiResult, ApiState};

/// Most edges one answer draws (a job has at most 10,000 tasks; a kind
/// whose topology links every task to every other is cut here).
pub const MAX_EDGES: usize = 50_000;

/// The graph routes, merged into the API's router (under its token check).
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/jobs", get(list))
        .route("/v1/jobs/{name}", get(show))
}

impl From<GraphError> for ApiError {
    fn from(error: GraphError) -> Self {
        let message = error.to_string();
        match error {
            GraphError::Invalid(_) => ApiError::invalid(message),
            GraphError::NoSuchJob(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            GraphError::Protocol(protocol) => protocol.into(),
            GraphError::Store(store) => eretes_protocol::ProtocolError::Store(store).into(),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

/// The topology of `spec`, if this binary knows its kind.
fn topology(spec: &JobSpec) -> Option<Arc<dyn Topology>> {
    match spec.kind.as_str() {
        "regression" => Some(Regression::new().topology(spec)),
        _ => None,
    }
}

/// Every `(from, to, link)` of `topology` over `tasks` tasks in `epoch`:
/// each pair of tasks once, under the first link that joins them (a link
/// and its reverse, such as parent and children, are one edge); at most
/// [`MAX_EDGES`], and whether it was cut.
fn edges(topology: &dyn Topology, tasks: u32, epoch: JobEpoch) -> (Vec<(u32, u32, String)>, bool) {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for link in topology.links() {
        for task in 0..tasks {
            for neighbour in topology.neighbours(&link, task, epoch) {
                if neighbour >= tasks {
                    continue;
                }
                // A link and its reverse (parent/children) are one edge.
                let pair = (task.min(neighbour), task.max(neighbour));
                if !seen.insert(pair) {
                    continue;
                }
                if out.len() == MAX_EDGES {
                    return (out, true);
                }
                out.push((task, neighbour, link.clone()));
            }
        }
    }
    (out, false)
}

async fn list(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let jobs = Jobs::new(state.coordinator.clone()).list().await?;
    Ok(Json(json!(jobs)))
}

async fn show(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let job = JobName::new(name).map_err(ApiError::from)?;
    let jobs = Jobs::new(state.coordinator.clone());
    // The job's two records from the store; its tasks' states and nodes
    // from the watch-kept index (no read of every result value).
    let spec = jobs
        .job(&job)
        .await?
        .ok_or_else(|| GraphError::NoSuchJob(job.to_string()))?;
    let epoch = jobs.epoch(&job).await?;
    let ids: Vec<_> = (0..spec.tasks)
        .map(|index| graph_task_id(&job, index))
        .collect();
    let positions = state
        .tasks
        .read(|index| ids.iter().map(|id| index.position(id)).collect::<Vec<_>>())
        .await?;
    let tasks: Vec<Value> = ids
        .iter()
        .zip(positions)
        .enumerate()
        .map(|(index, (id, position))| {
            json!({
                "index": index,
                "id": id,
                "state": position.as_ref().map(|p| p.state.name()),
                "node": position.and_then(|p| p.owner).map(|(node, _)| node),
            })
        })
        .collect();
    let known = topology(&spec);
    let at = epoch.as_ref().map_or(JobEpoch(0), |e| e.epoch);
    let (edges, cut) = known
        .as_deref()
        .map(|t| edges(t, spec.tasks, at))
        .unwrap_or_default();
    Ok(Json(json!({
        "name": job,
        "kind": spec.kind,
        "group": spec.group,
        "epoch": epoch,
        "tasks": tasks,
        "topology_known": known.is_some(),
        "edges": edges.into_iter().map(|(from, to, link)| json!({ "from": from, "to": to, "link": link })).collect::<Vec<_>>(),
        "edges_cut": cut,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eretes_protocol::GroupName;

    #[test]
    fn a_regression_job_is_a_tree_with_each_link_drawn_once() {
        let spec = JobSpec {
            kind: "regression".into(),
            tasks: 15,
            group: GroupName::new("graph").unwrap(),
            properties: Regression::properties(10),
            backups: 0,
        };
        let tree = topology(&spec).expect("regression is known");
        let (edges, cut) = edges(tree.as_ref(), 15, JobEpoch(0));
        assert!(!cut);
        // A tree of 15 has 14 edges, whichever link names them.
        assert_eq!(edges.len(), 14, "{edges:?}");
        let mut children_of_root: Vec<u32> = edges
            .iter()
            .filter_map(|&(a, b, _)| match (a, b) {
                (0, other) | (other, 0) => Some(other),
                _ => None,
            })
            .collect();
        children_of_root.sort_unstable();
        assert_eq!(children_of_root, [1, 2]);
        let unknown = JobSpec {
            kind: "elsewhere".into(),
            ..spec
        };
        assert!(topology(&unknown).is_none());
    }
}
