//! The JSON records stored under the namespace's keys.
//!
//! Records are parsed defensively: a value that is not valid JSON or misses a
//! required field is reported as [`MalformedValue`], and the runtime skips and
//! counts it instead of failing.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::error::ProtocolError;
use crate::ids::{GroupName, NodeName, TaskId};

/// The largest accepted task spec, serialized, in bytes.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// The largest accepted handler result, serialized, in bytes.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// What a submitter says about a task: its group and free-form properties.
/// Immutable once submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The consumer group; only nodes serving it claim the task.
    #[serde(default)]
    pub group: GroupName,
    /// Anything the handler needs (JSON). `null` when absent.
    #[serde(default)]
    pub properties: Properties,
}

impl TaskSpec {
    /// A spec in `group` with `properties`.
    pub fn new(group: GroupName, properties: impl Into<Properties>) -> Self {
        TaskSpec {
            group,
            properties: properties.into(),
        }
    }
}

/// A task's properties: any JSON value, held as its compact JSON text.
///
/// Every node keeps the record of each task it sees, and a running task's
/// record for as long as it runs; a decoded [`Value`] costs a B-tree node
/// of some 600 bytes per JSON object, the text a few dozen. Handlers
/// decode what they need once, when a run starts ([`Properties::value`],
/// [`Properties::parse`]). Serialized, it is the same JSON value again, so
/// stored records and API bodies are unchanged. Two are equal when their
/// texts are; object keys are written sorted, so that is equality of the
/// JSON values, but for `-0.0` against `0.0`.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Properties(Option<Box<str>>);

impl Properties {
    /// `null`.
    pub const NULL: Properties = Properties(None);

    /// The properties `value` holds.
    pub fn new(value: &Value) -> Self {
        match value {
            Value::Null => Properties::NULL,
            value => Properties(Some(value.to_string().into_boxed_str())),
        }
    }

    /// The properties, decoded.
    pub fn value(&self) -> Value {
        self.parse().unwrap_or(Value::Null)
    }

    /// The properties decoded as a `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.json())
    }

    /// The compact JSON text (`null` when absent).
    pub fn json(&self) -> &str {
        self.0.as_deref().unwrap_or("null")
    }

    /// Whether they are `null`.
    pub fn is_null(&self) -> bool {
        self.0.is_none()
    }
}

impl From<Value> for Properties {
    fn from(value: Value) -> Self {
        Properties::new(&value)
    }
}

impl From<&Value> for Properties {
    fn from(value: &Value) -> Self {
        Properties::new(value)
    }
}

impl PartialEq<Value> for Properties {
    fn eq(&self, other: &Value) -> bool {
        self.value() == *other
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.json())
    }
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Through a Value, so that any serializer (not only serde_json's)
        // gets the JSON value rather than a string.
        match &self.0 {
            None => serializer.serialize_unit(),
            Some(_) => self.value().serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A Value first: records flatten their spec, and serde's flatten
        // buffers the fields, which rules out borrowing the raw text.
        Value::deserialize(deserializer).map(Properties::from)
    }
}

/// The stored form of a pending or running task (`tasks/<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The spec as submitted.
    #[serde(flatten)]
    pub spec: TaskSpec,
    /// Wall-clock submission time, milliseconds since the Unix epoch (informational).
    #[serde(default)]
    pub submitted_at_ms: u64,
}

/// Who runs a task (`owners/<id>`, under the owner's lease). The fencing epoch
/// is the key's create revision, so it is not repeated in the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owning node.
    pub node: NodeName,
    /// The task's group, so that load per group can be counted from owners alone.
    pub group: GroupName,
}

/// Claim bookkeeping of a task (`claims/<id>`), written by each claim and by a
/// clean release. A claim that finds `open == true` knows the previous owner
/// never released: it died or lost its lease, and that counts as a takeover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// How many times the task has been claimed.
    pub claims: u32,
    /// How many claims followed an owner that never released it.
    pub takeovers: u32,
    /// Whether the latest claim is still running or ended without a release.
    pub open: bool,
    /// The latest claimant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The handler finished and returned a result.
    Done,
    /// The handler failed, or the task was parked after too many takeovers.
    Failed,
    /// A kill command ended it.
    Killed,
}

/// The terminal record of a task (`results/<id>`). It keeps the spec, so a
/// retired task can be read back or resubmitted until it is removed (by
/// `delete`, or by an agent's result retention:
/// [`crate::Coordinator::delete_ended`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Done or failed.
    pub outcome: Outcome,
    /// The handler's result (`null` when failed).
    #[serde(default)]
    pub result: Value,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The spec as submitted.
    pub spec: TaskSpec,
    /// The epoch of the run that ended it (0 when parked before running).
    pub epoch: i64,
    /// The node that ended it.
    pub node: NodeName,
    /// Claims and takeovers up to the end.
    pub runs: RunRecord,
    /// Wall-clock end time, milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
}

/// A live node (`nodes/<name>`, under its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The groups it serves.
    pub groups: Vec<GroupName>,
    /// Wall-clock start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Most tasks it runs at once over all its groups, if it has a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u64>,
    /// Most tasks of a group it runs at once, for the groups where it has a
    /// limit (`--slots`), so that other nodes' fair balancers count with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub slots: BTreeMap<GroupName, u64>,
}

/// A stored value that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} record at {key:?}: {reason}")]
pub struct MalformedValue {
    /// What record was expected.
    pub kind: &'static str,
    /// The key it was found under (truncated).
    pub key: String,
    /// The decoder's complaint.
    pub reason: String,
}

/// Decode a record, naming the key and the problem on failure.
pub fn decode<T: DeserializeOwned>(
    kind: &'static str,
    key: &str,
    value: &[u8],
) -> Result<T, MalformedValue> {
    serde_json::from_slice(value).map_err(|e| MalformedValue {
        kind,
        key: key.chars().take(200).collect(),
        reason: e.to_string(),
    })
}

/// Decode a task record found in the store. A record over the submission
/// limit ([`MAX_SPEC_BYTES`]) is malformed even if it parses: only a writer
/// that bypassed [`encode_task`] (etcdctl, say) can have put it there, and a
/// node must not carry megabytes per task because someone did.
pub fn decode_task(key: &str, value: &[u8]) -> Result<TaskRecord, MalformedValue> {
    if value.len() > MAX_SPEC_BYTES {
        return Err(MalformedValue {
            kind: "task",
            key: key.chars().take(200).collect(),
            reason: format!("{} bytes; the limit is {MAX_SPEC_BYTES} bytes", value.len()),
        });
    }
    decode("task", key, value)
}

/// Decode a node record found in the store. A node is live only while its
/// record is attached to its lease (the store deletes it when the lease
/// ends); a record without one (put by hand, say) would count as a live
/// node for ever and skew every fair share, so it is malformed.
pub fn decode_node(key: &str, value: &[u8], lease: i64) -> Result<NodeRecord, MalformedValue> {
    if lease == 0 {
        return Err(MalformedValue {
            kind: "node",
            key: key.chars().take(200).collect(),
            reason: "not attached to a lease, so never known to be live".into(),
        });
    }
    decode("node", key, value)
}

/// Encode a record. Records are plain data, so this cannot fail.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records always serialize")
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Validate a spec for submission and encode the task record.
pub fn encode_task(id: &TaskId, spec: &TaskSpec) -> Result<Vec<u8>, ProtocolError> {
    let bytes = encode(&TaskRecord {
        spec: spec.clone(),
        submitted_at_ms: now_ms(),
    });
    if bytes.len() > MAX_SPEC_BYTES {
        return Err(ProtocolError::InvalidSpec(format!(
            "task {id}: spec is {} bytes; the limit is {MAX_SPEC_BYTES} bytes",
            bytes.len()
        )));
    }
    Ok(bytes)
}
