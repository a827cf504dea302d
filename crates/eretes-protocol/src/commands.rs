//! Node commands: small instructions delivered to one node through the store.
//!
//! Wire form: `{"command": "<name>", "parameters": {...}}`. Commands are
//! queued under `node-commands/<node>/` and taken in store order (create
//! revision). A node takes a command by deleting its key in a transaction
//! guarded by the key's revision and applies it only if that delete succeeded,
//! so each command is applied exactly once by a live node even if it sees the
//! key twice (from a list and a watch). A command taken by a node that dies
//! before applying it is lost with the node, which is what its sender wants.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ProtocolError;
use crate::ids::TaskId;

/// A command for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommand {
    /// Stop claiming new tasks; running tasks keep running.
    Freeze,
    /// Resume claiming.
    Unfreeze,
    /// Run the balancer now.
    Balance,
    /// Freeze, then release every running task so other nodes take them over.
    Drain,
    /// Stop one task here and release it (it may be claimed elsewhere).
    StopTask(TaskId),
}

/// The wire form.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    command: String,
    #[serde(default)]
    parameters: Value,
}

impl NodeCommand {
    /// The command's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            NodeCommand::Freeze => "freeze",
            NodeCommand::Unfreeze => "unfreeze",
            NodeCommand::Balance => "balance",
            NodeCommand::Drain => "drain",
            NodeCommand::StopTask(_) => "stop_task",
        }
    }

    /// Encode to the wire form.
    pub fn encode(&self) -> Vec<u8> {
        let parameters = match self {
            NodeCommand::StopTask(task) => serde_json::json!({ "task": task }),
            _ => Value::Object(Default::default()),
        };
        serde_json::to_vec(&Wire {
            command: self.name().to_string(),
            parameters,
        })
        .expect("commands always serialize")
    }

    /// Decode the wire form; a malformed or unknown command is an error that
    /// names the problem.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let wire: Wire = serde_json::from_slice(bytes)
            .map_err(|e| ProtocolError::InvalidCommand(format!("not a command object: {e}")))?;
        Ok(match wire.command.as_str() {
            "freeze" => NodeCommand::Freeze,
            "unfreeze" => NodeCommand::Unfreeze,
            "balance" => NodeCommand::Balance,
            "drain" => NodeCommand::Drain,
            "stop_task" => {
                let task = wire
                    .parameters
                    .get("task")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ProtocolError::InvalidCommand(
                            "stop_task needs parameters.task (a task id)".into(),
                        )
                    })?;
                NodeCommand::StopTask(TaskId::new(task)?)
            }
            other => {
                return Err(ProtocolError::InvalidCommand(format!(
                    "unknown command {:?}; known: freeze, unfreeze, balance, drain, stop_task",
                    other.chars().take(64).collect::<String>()
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for command in [
            NodeCommand::Freeze,
            NodeCommand::Unfreeze,
            NodeCommand::Balance,
            NodeCommand::Drain,
            NodeCommand::StopTask(TaskId::new("t1").unwrap()),
        ] {
            assert_eq!(NodeCommand::decode(&command.encode()).unwrap(), command);
        }
    }

    #[test]
    fn bad_commands_are_named() {
        let cases: [(&[u8], &str); 5] = [
            (b"nope", "not a command object"),
            (br#"{"parameters":{}}"#, "not a command object"),
            (br#"{"command":"explode"}"#, "unknown command \"explode\""),
            (br#"{"command":"stop_task"}"#, "needs parameters.task"),
            (
                br#"{"command":"stop_task","parameters":{"task":"a/b"}}"#,
                "invalid task id",
            ),
        ];
        for (bytes, expected) in cases {
            let err = NodeCommand::decode(bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }
}
