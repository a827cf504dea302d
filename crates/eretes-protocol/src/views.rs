//! What a task and a node look like from outside: their states read back
//! from the store in one consistent snapshot, for the agent's API and CLI.

use std::collections::BTreeMap;

use eretes_store::{
    GetRequest, KeyRange, Revision, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchStream,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::coordinator::Coordinator;
use crate::error::ProtocolError;
use crate::ids::{GroupName, NodeName, TaskId};
use crate::machine::{ErrorEntry, MachineState, StateRecord};
use crate::records::{decode, decode_task, OwnerRecord, Properties, ResultRecord};
use crate::task_index::{ended, TaskIndex};

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Submitted, not running: no live node of its group has claimed it yet.
    Pending,
    /// A node owns it and runs it.
    Running,
    /// Parked until a time (a `sleep` command, or backing off after an error).
    Sleeping,
    /// Parked until a `resume` command.
    Paused,
    /// Its handler reported an error; the error policy is deciding.
    Fault,
    /// Finished with a result.
    Done,
    /// Failed for good (by its handler, its error policy, or parked after too
    /// many takeovers).
    Failed,
    /// Ended by a `kill` command.
    Killed,
}

impl TaskState {
    /// Whether the task has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Killed
        )
    }

    /// Every state, in life order.
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Sleeping,
        TaskState::Paused,
        TaskState::Fault,
        TaskState::Done,
        TaskState::Failed,
        TaskState::Killed,
    ];

    /// Its name, as in JSON: `pending`, `running`, `sleeping`, `paused`,
    /// `fault`, `done`, `failed`, `killed`.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Sleeping => "sleeping",
            TaskState::Paused => "paused",
            TaskState::Fault => "fault",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Killed => "killed",
        }
    }

    /// The state of a task that has not ended, from its machine's persisted
    /// state and whether a node owns it. A machine that reached a terminal
    /// state but is not yet retired shows as running or pending: its owner
    /// (or the next one) is about to retire it.
    pub fn of_live(machine: Option<&MachineState>, owned: bool) -> TaskState {
        match machine {
            Some(MachineState::Sleeping { .. }) => TaskState::Sleeping,
            Some(MachineState::Paused) => TaskState::Paused,
            Some(MachineState::Fault) => TaskState::Fault,
            _ if owned => TaskState::Running,
            _ => TaskState::Pending,
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<TaskState> {
        Self::ALL.into_iter().find(|state| state.name() == name)
    }
}

/// One task as the store says it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Its id.
    pub id: TaskId,
    /// Its group.
    pub group: GroupName,
    /// Its state.
    pub state: TaskState,
    /// Its properties as submitted.
    pub properties: Properties,
    /// The node running it (running) or that ended it (done, failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    /// The fencing epoch of its current or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// Its result (done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When a sleeping task wakes, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeping_until_ms: Option<u64>,
    /// The newest errors its handler reported, oldest first (a live task).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorEntry>,
    /// When it was submitted, milliseconds since the Unix epoch (a live
    /// task whose record has the time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at_ms: Option<u64>,
    /// When it ended, milliseconds since the Unix epoch (an ended task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

impl TaskView {
    /// About how many bytes of JSON the view takes: its variable parts
    /// (properties, result, errors) and a fixed allowance for the rest.
    pub fn weight(&self) -> usize {
        const FIXED: usize = 256;
        FIXED
            + self.properties.json().len()
            + self.result.as_ref().map_or(0, json_weight)
            + self.error.as_ref().map_or(0, String::len)
            + self
                .errors
                .iter()
                .map(|entry| entry.message.len() + 32)
                .sum::<usize>()
    }

    /// Fold a live task's persisted machine state into its view.
    pub(crate) fn with_machine(mut self, record: Option<StateRecord>) -> TaskView {
        let owned = self.node.is_some();
        self.state = TaskState::of_live(record.as_ref().map(|r| &r.state), owned);
        if let Some(record) = record {
            if let MachineState::Sleeping { until_ms } = record.state {
                self.sleeping_until_ms = Some(until_ms);
            }
            self.errors = record.errors;
        }
        self
    }
}

/// One live node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its name.
    pub name: NodeName,
    /// The groups it serves.
    pub groups: Vec<GroupName>,
    /// When it started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Tasks it runs now.
    pub running: usize,
    /// Of those, how many each group has.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub running_by_group: BTreeMap<GroupName, usize>,
    /// Most tasks it runs at once over all its groups, if it has a limit.
    pub max_running: Option<u64>,
}

/// Every task and node at one revision; entries the store holds in a shape
/// the protocol does not know are counted, not fatal.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The revision of the read.
    pub revision: Revision,
    /// Tasks by id.
    pub tasks: BTreeMap<TaskId, TaskView>,
    /// Live nodes by name.
    pub nodes: BTreeMap<NodeName, NodeView>,
    /// Entries skipped as malformed.
    pub malformed: usize,
}

impl Coordinator {
    /// Read every task and node in one transaction (one revision).
    pub async fn snapshot(&self) -> Result<Snapshot, ProtocolError> {
        Ok(self.read_index().await?.to_snapshot())
    }

    /// Read every task and node in one transaction (one revision) into an
    /// index that watch events can then keep current.
    pub async fn read_index(&self) -> Result<TaskIndex, ProtocolError> {
        let response = self.read_index_keys().await?;
        Ok(self.index_from(&response))
    }

    /// [`Coordinator::read_index`], and a watch of the namespace from the
    /// revision after the read, started before the read is decoded: the
    /// watch needs the store's history to reach back only as far as the
    /// read itself, however long decoding a large namespace takes.
    pub async fn read_and_watch_index(&self) -> Result<(TaskIndex, WatchStream), ProtocolError> {
        let response = self.read_index_keys().await?;
        let watch = self.watch_namespace(response.revision + 1).await?;
        Ok((self.index_from(&response), watch))
    }

    /// The keys an index is made of, in one transaction.
    async fn read_index_keys(&self) -> Result<TxnResponse, ProtocolError> {
        let ns = self.namespace();
        let prefixes = [
            ns.tasks_prefix(),
            ns.owners_prefix(),
            ns.results_prefix(),
            ns.nodes_prefix(),
            ns.states_prefix(),
        ];
        let mut txn = Txn::new();
        for prefix in &prefixes {
            txn = txn.and_then(TxnOp::Get(GetRequest::new(KeyRange::prefix(
                prefix.clone(),
            ))));
        }
        Ok(self.store().txn(txn).await?)
    }

    /// The index of what [`Coordinator::read_index_keys`] read.
    fn index_from(&self, response: &TxnResponse) -> TaskIndex {
        let kvs = response.responses.iter().flat_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs.as_slice(),
            _ => &[],
        });
        TaskIndex::from_read(self.namespace().clone(), response.revision, kvs)
    }

    /// One task, read in one transaction; `None` if there is no such task.
    pub async fn task_view(&self, id: &TaskId) -> Result<Option<TaskView>, ProtocolError> {
        let ns = self.namespace();
        let keys = [ns.task(id), ns.owner(id), ns.result(id), ns.state(id)];
        let mut txn = Txn::new();
        for key in &keys {
            txn = txn.and_then(TxnOp::Get(GetRequest::new(KeyRange::key(key.clone()))));
        }
        let response = self.store().txn(txn).await?;
        let value = |n: usize| match response.responses.get(n) {
            Some(TxnOpResponse::Get(get)) => get.kvs.first().cloned(),
            _ => None,
        };
        if let Some(kv) = value(2) {
            let result: ResultRecord = decode("result", &kv.key, &kv.value)?;
            return Ok(Some(ended(id.clone(), result)));
        }
        let Some(kv) = value(0) else {
            return Ok(None);
        };
        let record = decode_task(&kv.key, &kv.value)?;
        let owner = match value(1) {
            Some(kv) => Some((
                decode::<OwnerRecord>("owner", &kv.key, &kv.value)?,
                kv.mod_revision,
            )),
            None => None,
        };
        // A state record that does not decode shows as no state; its owner
        // replaces it at the next transition.
        let machine =
            value(3).and_then(|kv| decode::<StateRecord>("state", &kv.key, &kv.value).ok());
        let view = TaskView {
            id: id.clone(),
            group: record.spec.group,
            state: TaskState::Pending,
            properties: record.spec.properties,
            epoch: owner.as_ref().map(|(_, epoch)| *epoch),
            node: owner.map(|(owner, _)| owner.node),
            result: None,
            error: None,
            sleeping_until_ms: None,
            errors: Vec::new(),
            submitted_at_ms: (record.submitted_at_ms > 0).then_some(record.submitted_at_ms),
            finished_at_ms: None,
        };
        Ok(Some(view.with_machine(machine)))
    }
}

/// About how many bytes of JSON `value` takes (its text and numbers, a few
/// bytes for each punctuation), without writing it.
fn json_weight(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 20,
        Value::String(text) => text.len() + 2,
        Value::Array(items) => {
            2 + items
                .iter()
                .map(|item| json_weight(item) + 1)
                .sum::<usize>()
        }
        Value::Object(fields) => {
            2 + fields
                .iter()
                .map(|(name, item)| name.len() + 4 + json_weight(item))
                .sum::<usize>()
        }
    }
}
