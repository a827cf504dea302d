//! The key layout of a namespace. Documented in `docs/protocol.md`.
//!
//! ```text
//! <ns>/tasks/<id>                 task record (group + properties); exists while pending or running
//! <ns>/owners/<id>                owner record, under the owner node's lease; epoch = its create revision
//! <ns>/claims/<id>                run record: claims, takeovers, whether the last run ended cleanly
//! <ns>/results/<id>               terminal record: done (with result) or failed (with reason), plus the spec
//! <ns>/nodes/<name>               node record, under the node's lease
//! <ns>/node-commands/<name>/<uid> one pending command for a node; deleted when taken
//! <ns>/states/<id>                the task's state machine: state, errors (absent = runnable)
//! <ns>/checkpoints/<id>           the task's latest checkpoint (opaque bytes)
//! <ns>/task-commands/<id>/<uid>   one pending command for a task; deleted when applied
//! ```
//!
//! Every prefix ends with `/`, and identifiers cannot contain `/`, so a prefix
//! read or delete for one id or node can never reach another's keys.
//!
//! Run records live under `claims/`, which sorts before `node-commands/`,
//! so that a node's watch (one range, `node-commands/` through `tasks/`)
//! does not carry them: only the claimant needs a claim's run record, and
//! it carried one event per claim to every node. Builds before the move
//! kept them under `runs/` ([`Namespace::legacy_runs_prefix`]); nodes move
//! what they find there (`Coordinator::move_legacy_run_records`).

use std::fmt;

use crate::error::ProtocolError;
use crate::ids::{NodeName, TaskId};

/// The kinds of keys below a namespace, each a fixed path segment.
const TASKS: &str = "tasks/";
const OWNERS: &str = "owners/";
const RUNS: &str = "claims/";
/// Where builds before the move kept run records.
const LEGACY_RUNS: &str = "runs/";
const RESULTS: &str = "results/";
const NODES: &str = "nodes/";
const NODE_COMMANDS: &str = "node-commands/";
const STATES: &str = "states/";
const CHECKPOINTS: &str = "checkpoints/";
const TASK_COMMANDS: &str = "task-commands/";
/// Keys of the task graph layer (`eretes-graph`), which decodes them itself.
const GRAPH: &str = "graph/";

/// A namespace: the isolated key prefix one eretes cluster lives under.
/// Nothing eretes does touches keys outside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// The prefix with its trailing `/`. Shared: every coordinator holds
    /// one, and a running task's checkpointer holds a coordinator.
    root: arcstr::ArcStr,
}

impl Namespace {
    /// Validate a namespace name: 1–64 characters of `[A-Za-z0-9._-]`.
    pub fn new(name: &str) -> Result<Self, ProtocolError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(ProtocolError::InvalidId {
                kind: "namespace",
                value: name.chars().take(72).collect(),
                reason: "must be 1-64 characters of A-Z a-z 0-9 . _ -".into(),
            });
        }
        Ok(Namespace {
            root: arcstr::ArcStr::from(format!("{name}/")),
        })
    }

    /// The namespace's own prefix, `<ns>/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The namespace's name, as given to [`Namespace::new`].
    pub fn name(&self) -> &str {
        &self.root[..self.root.len() - 1]
    }

    fn join(&self, kind: &str, rest: &str) -> String {
        let mut key = String::with_capacity(self.root.len() + kind.len() + rest.len());
        key.push_str(&self.root);
        key.push_str(kind);
        key.push_str(rest);
        key
    }

    /// `<ns>/tasks/<id>`
    pub fn task(&self, id: &TaskId) -> String {
        self.join(TASKS, id.as_str())
    }
    /// `<ns>/owners/<id>`
    pub fn owner(&self, id: &TaskId) -> String {
        self.join(OWNERS, id.as_str())
    }
    /// `<ns>/claims/<id>`: the run record.
    pub fn run(&self, id: &TaskId) -> String {
        self.join(RUNS, id.as_str())
    }
    /// `<ns>/results/<id>`
    pub fn result(&self, id: &TaskId) -> String {
        self.join(RESULTS, id.as_str())
    }
    /// `<ns>/nodes/<name>`
    pub fn node(&self, name: &NodeName) -> String {
        self.join(NODES, name.as_str())
    }
    /// `<ns>/node-commands/<name>/` — the prefix of one node's command queue.
    pub fn node_commands(&self, name: &NodeName) -> String {
        let mut key = self.join(NODE_COMMANDS, name.as_str());
        key.push('/');
        key
    }
    /// `<ns>/states/<id>`
    pub fn state(&self, id: &TaskId) -> String {
        self.join(STATES, id.as_str())
    }
    /// `<ns>/checkpoints/<id>`
    pub fn checkpoint(&self, id: &TaskId) -> String {
        self.join(CHECKPOINTS, id.as_str())
    }
    /// `<ns>/task-commands/<id>/` — the prefix of one task's command queue.
    pub fn task_commands(&self, id: &TaskId) -> String {
        let mut key = self.join(TASK_COMMANDS, id.as_str());
        key.push('/');
        key
    }
    /// `<ns>/graph/`: the task graph layer's keys.
    pub fn graph_prefix(&self) -> String {
        format!("{}{GRAPH}", self.root)
    }

    /// `<ns>/states/`
    pub fn states_prefix(&self) -> String {
        self.join(STATES, "")
    }
    /// `<ns>/tasks/`
    pub fn tasks_prefix(&self) -> String {
        self.join(TASKS, "")
    }
    /// `<ns>/owners/`
    pub fn owners_prefix(&self) -> String {
        self.join(OWNERS, "")
    }
    /// `<ns>/results/`
    pub fn results_prefix(&self) -> String {
        self.join(RESULTS, "")
    }
    /// `<ns>/nodes/`
    pub fn nodes_prefix(&self) -> String {
        self.join(NODES, "")
    }
    /// `<ns>/claims/`: every run record.
    pub fn runs_prefix(&self) -> String {
        self.join(RUNS, "")
    }
    /// `<ns>/runs/`: where builds before the move to `claims/` kept run
    /// records.
    pub fn legacy_runs_prefix(&self) -> String {
        self.join(LEGACY_RUNS, "")
    }
    /// `<ns>/node-commands/`: every node's command queue.
    pub fn node_commands_prefix(&self) -> String {
        self.join(NODE_COMMANDS, "")
    }
    /// `<ns>/task-commands/`: every task's command queue.
    pub fn task_commands_prefix(&self) -> String {
        self.join(TASK_COMMANDS, "")
    }

    /// Classify a key of this namespace. `Err` names what is wrong with a key
    /// that is inside the namespace but does not fit the layout (for example a
    /// task id with characters ids cannot have); such keys are skipped and
    /// counted by the runtime, never fatal.
    pub fn parse(&self, key: &str) -> Result<KeyKind, MalformedKey> {
        let malformed = |why: &str| MalformedKey {
            key: key.chars().take(200).collect(),
            reason: why.to_string(),
        };
        let rest = key
            .strip_prefix(&*self.root)
            .ok_or_else(|| malformed("outside the namespace"))?;
        let task = |id: &str| TaskId::new(id).map_err(|e| malformed(&e.to_string()));
        let node = |name: &str| NodeName::new(name).map_err(|e| malformed(&e.to_string()));
        if let Some(id) = rest.strip_prefix(TASKS) {
            Ok(KeyKind::Task(task(id)?))
        } else if let Some(id) = rest.strip_prefix(OWNERS) {
            Ok(KeyKind::Owner(task(id)?))
        } else if let Some(id) = rest.strip_prefix(RUNS) {
            Ok(KeyKind::Run(task(id)?))
        } else if let Some(id) = rest.strip_prefix(LEGACY_RUNS) {
            Ok(KeyKind::LegacyRun(task(id)?))
        } else if let Some(id) = rest.strip_prefix(RESULTS) {
            Ok(KeyKind::Result(task(id)?))
        } else if let Some(name) = rest.strip_prefix(NODES) {
            Ok(KeyKind::Node(node(name)?))
        } else if let Some(rest) = rest.strip_prefix(NODE_COMMANDS) {
            let (name, uid) = rest
                .split_once('/')
                .ok_or_else(|| malformed("node command key without a command id"))?;
            if uid.is_empty() || uid.contains('/') {
                return Err(malformed("node command id must be one non-empty segment"));
            }
            Ok(KeyKind::NodeCommand(node(name)?))
        } else if let Some(id) = rest.strip_prefix(STATES) {
            Ok(KeyKind::State(task(id)?))
        } else if let Some(id) = rest.strip_prefix(CHECKPOINTS) {
            Ok(KeyKind::Checkpoint(task(id)?))
        } else if let Some(rest) = rest.strip_prefix(TASK_COMMANDS) {
            let (id, uid) = rest
                .split_once('/')
                .ok_or_else(|| malformed("task command key without a command id"))?;
            if uid.is_empty() || uid.contains('/') {
                return Err(malformed("task command id must be one non-empty segment"));
            }
            Ok(KeyKind::TaskCommand(task(id)?))
        } else if rest.starts_with(GRAPH) {
            Ok(KeyKind::Graph)
        } else {
            Err(malformed("unknown key kind"))
        }
    }
}

/// What a namespace key denotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// `tasks/<id>`
    Task(TaskId),
    /// `owners/<id>`
    Owner(TaskId),
    /// `claims/<id>`: the run record.
    Run(TaskId),
    /// `runs/<id>`: a run record where builds before the move to `claims/`
    /// kept it, still to be moved (`Coordinator::move_legacy_run_records`).
    LegacyRun(TaskId),
    /// `results/<id>`
    Result(TaskId),
    /// `nodes/<name>`
    Node(NodeName),
    /// `node-commands/<name>/<uid>`
    NodeCommand(NodeName),
    /// `states/<id>`
    State(TaskId),
    /// `checkpoints/<id>`
    Checkpoint(TaskId),
    /// `task-commands/<id>/<uid>`
    TaskCommand(TaskId),
    /// `graph/...`: the task graph layer's keys (jobs, job epochs, meta,
    /// node addresses), which it decodes and validates itself.
    Graph,
}

/// A key inside a namespace that does not fit the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedKey {
    /// The key (truncated).
    pub key: String,
    /// Why it does not fit.
    pub reason: String,
}

impl fmt::Display for MalformedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed key {:?}: {}", self.key, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let ns = Namespace::new("prod").unwrap();
        let id = TaskId::new("a").unwrap();
        let node = NodeName::new("n1").unwrap();
        assert_eq!(ns.task(&id), "prod/tasks/a");
        assert_eq!(ns.parse(&ns.task(&id)), Ok(KeyKind::Task(id.clone())));
        assert_eq!(ns.parse(&ns.owner(&id)), Ok(KeyKind::Owner(id.clone())));
        assert_eq!(ns.run(&id), "prod/claims/a");
        assert_eq!(ns.parse(&ns.run(&id)), Ok(KeyKind::Run(id.clone())));
        let legacy = format!("{}a", ns.legacy_runs_prefix());
        assert_eq!(ns.parse(&legacy), Ok(KeyKind::LegacyRun(id.clone())));
        assert_eq!(ns.parse(&ns.result(&id)), Ok(KeyKind::Result(id.clone())));
        assert_eq!(ns.parse(&ns.node(&node)), Ok(KeyKind::Node(node.clone())));
        let command = format!("{}x1", ns.node_commands(&node));
        assert_eq!(ns.parse(&command), Ok(KeyKind::NodeCommand(node)));
        assert_eq!(ns.parse(&ns.state(&id)), Ok(KeyKind::State(id.clone())));
        assert_eq!(
            ns.parse(&ns.checkpoint(&id)),
            Ok(KeyKind::Checkpoint(id.clone()))
        );
        let command = format!("{}c1", ns.task_commands(&id));
        assert_eq!(ns.parse(&command), Ok(KeyKind::TaskCommand(id)));
    }

    #[test]
    fn every_prefix_ends_with_a_slash() {
        let ns = Namespace::new("p").unwrap();
        let node = NodeName::new("n").unwrap();
        for prefix in [
            ns.root().to_string(),
            ns.tasks_prefix(),
            ns.owners_prefix(),
            ns.runs_prefix(),
            ns.legacy_runs_prefix(),
            ns.results_prefix(),
            ns.nodes_prefix(),
            ns.node_commands(&node),
            ns.states_prefix(),
            ns.task_commands(&TaskId::new("t").unwrap()),
        ] {
            assert!(prefix.ends_with('/'), "{prefix}");
        }
    }

    #[test]
    fn malformed_keys_are_named() {
        let ns = Namespace::new("p").unwrap();
        for bad in [
            "p/tasks/",
            "p/tasks/a/b",
            "p/whatever/x",
            "p/node-commands/n",
            "p/task-commands/a",
            "p/task-commands/a/",
            "p/states/a/b",
            "q/tasks/a",
        ] {
            let err = ns.parse(bad).unwrap_err();
            assert!(!err.reason.is_empty(), "{bad}");
        }
    }

    #[test]
    fn namespace_is_validated() {
        assert!(Namespace::new("").is_err());
        assert!(Namespace::new("a/b").is_err());
        assert!(Namespace::new(&"x".repeat(65)).is_err());
        assert!(Namespace::new("eretes-test_1.0").is_ok());
    }
}
