//! [`AgentClient`]: a Rust client of an eretes agent's HTTP API, for
//! programs that submit tasks and wait for them remotely. The `eretes` CLI
//! is built on it.
//!
//! Every call is bounded in time (2 minutes; a wait asks again every
//! 30 s; a followed log lasts as long as its task), sends the bearer token
//! when one is given, and fails with a [`ClientError`] that says whether the
//! agent could not be reached, refused the call (with its status, error
//! code and message), or answered something unreadable.

use std::time::Duration;

use eretes_exec::ProcessSpec;
use eretes_protocol::{NodeView, TaskId, TaskView};
use futures::{Stream, TryStreamExt};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The longest a call may take, answer included.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// How long one wait request holds at the agent before asking again.
const WAIT_STEP_S: u64 = 30;
/// Tasks asked for per list page.
const PAGE: usize = 1000;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The call was not made: an argument is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Nothing answered at the agent's address.
    #[error(
        "no eretes agent answers at {url}: {reason}. Start one with `eretes agent`, or point \
         --agent (or ERETES_AGENT) at one"
    )]
    Unreachable {
        /// The agent's address.
        url: String,
        /// What failed (connection refused, timed out…).
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the agent refused ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The agent's error code (`not_found`, `invalid_request`,
        /// `unauthorized`…), empty if it gave none.
        code: String,
        /// The agent's message.
        message: String,
    },
    /// The exchange broke off, or the answer could not be read.
    #[error("calling the agent at {url}: {reason}")]
    Transport {
        /// The agent's address.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

impl ClientError {
    /// Whether the agent said the task (or node) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// A process task to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Submit {
    /// Its id; the agent makes one up when absent.
    pub id: Option<String>,
    /// Its group; `default` when absent.
    pub group: Option<String>,
    /// What it runs.
    pub spec: ProcessSpec,
}

impl Submit {
    /// `program` with `args`, in the default group, with a made-up id.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Submit {
        Submit {
            id: None,
            group: None,
            spec: ProcessSpec::new(program, args),
        }
    }
}

/// A task command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop its work and keep it parked.
    Pause,
    /// Run it again.
    Resume,
    /// Stop it now and run it again after this long.
    Sleep(Duration),
    /// Stop it and end it for good (killed).
    Kill,
}

/// What the agent says of a queued task command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// The task.
    pub task: String,
    /// The command's name.
    pub command: String,
    /// The store revision it was queued at (commands apply in this order).
    pub revision: i64,
    /// For a sleep: when the task wakes, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
}

/// A node command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// Stop claiming.
    Freeze,
    /// Claim again.
    Unfreeze,
    /// Run the balancer now.
    Balance,
    /// Release every task and stop claiming.
    Drain,
    /// Release one task.
    StopTask(String),
}

/// Which output stream of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// A page of the task list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskPage {
    /// The tasks, in id order.
    pub tasks: Vec<TaskView>,
    /// The id to pass as `after` for the next page; `None` on the last.
    pub next: Option<String>,
    /// How many records in the store do not decode, and so are in no page.
    #[serde(default)]
    pub malformed: usize,
    /// The keys of the first few of them.
    #[serde(default)]
    pub malformed_keys: Vec<String>,
}

/// Tasks read page after page ([`AgentClient::list_up_to`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskListing {
    /// The tasks, in id order.
    pub tasks: Vec<TaskView>,
    /// If more follow, the id to pass as `after` to go on.
    pub more_after: Option<String>,
    /// How many records in the store do not decode, and so are in no
    /// listing, as the last page read counted them.
    pub malformed: usize,
    /// The keys of the first few of them.
    pub malformed_keys: Vec<String>,
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AgentClient {
    /// A client of the agent at `url` (`http://HOST:PORT`, perhaps with a
    /// path before the API's), sending `token` with every call if given.
    pub fn new(url: &str, token: Option<String>) -> Result<AgentClient, ClientError> {
        let base = url.trim_end_matches('/').to_string();
        let invalid =
            |why: &str| ClientError::Invalid(format!("the agent's address {url:?} {why}"));
        if !base.contains("://") {
            return Err(invalid("must start with http://"));
        }
        let parsed = reqwest::Url::parse(&base)
            .map_err(|error| invalid(&format!("is not a URL: {error}")))?;
        match parsed.scheme() {
            "http" => {}
            "https" => return Err(invalid(
                "is https: this client speaks plain HTTP only (the agent serves no TLS either); \
                     reach a remote agent through a tunnel or a proxy on loopback",
            )),
            _ => return Err(invalid("must start with http://")),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("names no host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid("must not have a query or a fragment"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| ClientError::Invalid(format!("building the HTTP client: {error}")))?;
        Ok(AgentClient { base, token, http })
    }

    /// The agent's address.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Submit a task; its view as stored.
    pub async fn submit(&self, task: &Submit) -> Result<TaskView, ClientError> {
        let mut body = serde_json::to_value(&task.spec)
            .map_err(|error| ClientError::Invalid(error.to_string()))?;
        if let Some(id) = &task.id {
            body["id"] = json!(checked(id)?.as_str());
        }
        if let Some(group) = &task.group {
            body["group"] = json!(group);
        }
        self.call(Method::POST, "/v1/tasks", Some(body)).await
    }

    /// Submit a Kubernetes task (run as a Job by an agent started with
    /// `--kubernetes`), with `id` (made up when `None`) in `group`
    /// (`default` when `None`).
    pub async fn submit_kubernetes(
        &self,
        id: Option<&str>,
        group: Option<&str>,
        spec: &eretes_kube::KubeSpec,
    ) -> Result<TaskView, ClientError> {
        let mut body = json!({ "kubernetes": spec });
        if let Some(id) = id {
            body["id"] = json!(checked(id)?.as_str());
        }
        if let Some(group) = group {
            body["group"] = json!(group);
        }
        self.call(Method::POST, "/v1/tasks", Some(body)).await
    }

    /// One task.
    pub async fn show(&self, id: &str) -> Result<TaskView, ClientError> {
        let id = checked(id)?;
        self.call(Method::GET, &format!("/v1/tasks/{id}"), None)
            .await
    }

    /// Every task (of `state` and `group`, if given), page after page.
    pub async fn list(
        &self,
        state: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TaskView>, ClientError> {
        self.list_up_to(state, group, None, usize::MAX)
            .await
            .map(|listing| listing.tasks)
    }

    /// Up to `most` tasks (of `state` and `group`, if given) whose ids sort
    /// after `after`, in id order, read page after page; and, if more
    /// follow, the id to pass as `after` to go on.
    pub async fn list_up_to(
        &self,
        state: Option<&str>,
        group: Option<&str>,
        after: Option<&str>,
        most: usize,
    ) -> Result<TaskListing, ClientError> {
        let mut listing = TaskListing {
            tasks: Vec::new(),
            more_after: after.map(str::to_string),
            malformed: 0,
            malformed_keys: Vec::new(),
        };
        while listing.tasks.len() < most {
            let limit = (most - listing.tasks.len()).min(PAGE);
            let page = self
                .list_page(state, group, listing.more_after.as_deref(), limit)
                .await?;
            listing.tasks.extend(page.tasks);
            listing.malformed = page.malformed;
            listing.malformed_keys = page.malformed_keys;
            listing.more_after = page.next;
            if listing.more_after.is_none() {
                break;
            }
        }
        Ok(listing)
    }

    /// One page: at most `limit` (1–1000) tasks of `state` and `group`, if
    /// given, whose ids sort after `after`.
    pub async fn list_page(
        &self,
        state: Option<&str>,
        group: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, ClientError> {
        let mut path = format!("/v1/tasks?limit={limit}");
        for (name, value) in [("state", state), ("group", group), ("after", after)] {
            if let Some(value) = value {
                path.push_str(&format!("&{name}={}", encoded(value)));
            }
        }
        self.call(Method::GET, &path, None).await
    }

    /// Wait until the task has ended (done, failed or killed); its final
    /// view.
    pub async fn wait(&self, id: &str) -> Result<TaskView, ClientError> {
        let id = checked(id)?;
        loop {
            let view: TaskView = self
                .call(
                    Method::GET,
                    &format!("/v1/tasks/{id}/wait?timeout_s={WAIT_STEP_S}"),
                    None,
                )
                .await?;
            if view.state.is_terminal() {
                return Ok(view);
            }
        }
    }

    /// Delete a task, stopping it wherever it runs.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        let id = checked(id)?;
        self.send(
            Method::DELETE,
            &format!("/v1/tasks/{id}"),
            None,
            Some(CALL_LIMIT),
        )
        .await
        .map(drop)
    }

    /// Queue a task command.
    pub async fn command(&self, id: &str, command: Command) -> Result<Queued, ClientError> {
        let id = checked(id)?;
        let body = match command {
            Command::Pause => json!({"command": "pause"}),
            Command::Resume => json!({"command": "resume"}),
            Command::Kill => json!({"command": "kill"}),
            Command::Sleep(duration) => json!({
                "command": "sleep",
                "duration_ms": u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        self.call(
            Method::POST,
            &format!("/v1/tasks/{id}/commands"),
            Some(body),
        )
        .await
    }

    /// The live nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        #[derive(Deserialize)]
        struct Nodes {
            nodes: Vec<NodeView>,
        }
        let nodes: Nodes = self.call(Method::GET, "/v1/nodes", None).await?;
        Ok(nodes.nodes)
    }

    /// Queue a command for a node.
    pub async fn node_command(&self, node: &str, action: &NodeAction) -> Result<(), ClientError> {
        let body = match action {
            NodeAction::Freeze => json!({"command": "freeze"}),
            NodeAction::Unfreeze => json!({"command": "unfreeze"}),
            NodeAction::Balance => json!({"command": "balance"}),
            NodeAction::Drain => json!({"command": "drain"}),
            NodeAction::StopTask(id) => {
                json!({"command": "stop_task", "task": checked(id)?.as_str()})
            }
        };
        self.send(
            Method::POST,
            &format!("/v1/nodes/{}/commands", encoded(node)),
            Some(body),
            Some(CALL_LIMIT),
        )
        .await
        .map(drop)
    }

    /// A task's output on this agent: the last `tail` lines (all if
    /// `None`), and with `follow` what it writes next, until it has ended.
    pub async fn logs(
        &self,
        id: &str,
        output: Output,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>> + use<>, ClientError> {
        let id = checked(id)?;
        let stream = match output {
            Output::Stdout => "stdout",
            Output::Stderr => "stderr",
        };
        let mut path = format!("/v1/tasks/{id}/logs?stream={stream}&follow={follow}");
        if let Some(lines) = tail {
            path.push_str(&format!("&tail={lines}"));
        }
        let limit = (!follow).then_some(CALL_LIMIT);
        let response = self.send(Method::GET, &path, None, limit).await?;
        let url = self.base.clone();
        Ok(response
            .bytes_stream()
            .map_err(move |error| ClientError::Transport {
                url: url.clone(),
                reason: error.to_string(),
            }))
    }

    /// A call whose answer is JSON of type `T`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body, Some(CALL_LIMIT)).await?;
        response
            .json()
            .await
            .map_err(|error| ClientError::Transport {
                url: self.base.clone(),
                reason: format!("reading the answer: {error}"),
            })
    }

    /// Send a request, `limit` on the whole exchange (`None` for a stream
    /// that lasts as long as it needs); an error answer becomes
    /// [`ClientError::Refused`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        limit: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|error| {
            // reqwest's message leaves out the cause ("connection refused").
            let mut reason = error.to_string();
            let mut cause = std::error::Error::source(&error);
            while let Some(inner) = cause {
                reason.push_str(&format!(": {inner}"));
                cause = inner.source();
            }
            let url = self.base.clone();
            if error.is_connect() || error.is_timeout() {
                ClientError::Unreachable { url, reason }
            } else {
                ClientError::Transport { url, reason }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let answer = serde_json::from_str::<Value>(&text).ok();
        let field = |name: &str| {
            answer
                .as_ref()
                .and_then(|body| body["error"][name].as_str())
                .map(str::to_string)
        };
        Err(ClientError::Refused {
            status,
            code: field("code").unwrap_or_default(),
            message: field("message").unwrap_or(text),
        })
    }
}

/// `id` if it is a valid task id; refused before any call otherwise (it
/// becomes part of a URL path).
pub fn checked(id: &str) -> Result<TaskId, ClientError> {
    TaskId::new(id).map_err(|error| ClientError::Invalid(error.to_string()))
}

/// `value` percent-encoded for a URL query or path segment.
fn encoded(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_refused_before_any_call() {
        assert!(matches!(
            AgentClient::new("127.0.0.1:7070", None),
            Err(ClientError::Invalid(_))
        ));
        assert!(matches!(checked("a/b"), Err(ClientError::Invalid(_))));
        assert_eq!(encoded("a b&c"), "a%20b%26c");
    }
}
