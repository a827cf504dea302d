//! The task state machine: its states, the messages that move it, the
//! transition table, the record persisted for it (`states/<id>`), and the
//! task commands users send to it (`task-commands/<id>/<uid>`).
//!
//! The table (anything not listed is an [`InvalidTransition`], never a
//! panic):
//!
//! | from \ message | run | sleep(t) | pause | kill | error | complete | checkpoint | release |
//! |---|---|---|---|---|---|---|---|---|
//! | runnable | – | sleeping(t) | paused | killed | fault | completed | runnable | runnable |
//! | sleeping(u) | runnable | sleeping(t) | paused | killed | – | – | – | sleeping(u) |
//! | paused | runnable | sleeping(t) | paused | killed | – | – | – | paused |
//! | fault | – | sleeping(t) | paused | killed | failed | – | – | fault |
//! | completed, killed, failed | – | – | – | – | – | – | – | – |
//!
//! `run` also stands for a sleeping task's timer going off. In `fault` the
//! error policy answers with `sleep` (back off and try again) or `error`
//! (too many errors: failed).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// The largest checkpoint a task may save (256 KiB); it must fit one store
/// request with room to spare (etcd's default limit is 1.5 MiB).
pub const MAX_CHECKPOINT_BYTES: usize = 256 * 1024;

/// How many errors a state record keeps (the newest).
pub const MAX_ERRORS_KEPT: usize = 32;

/// The longest error text kept (in bytes); longer texts are cut.
pub const MAX_ERROR_TEXT: usize = 1024;

/// A state of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MachineState {
    /// Ready to run (or running, while a node owns it).
    Runnable,
    /// Parked until a wall-clock time, then runnable again.
    Sleeping {
        /// When to wake, milliseconds since the Unix epoch.
        until_ms: u64,
    },
    /// Parked until a `resume` command.
    Paused,
    /// The handler reported an error; the error policy decides what next.
    Fault,
    /// Finished with a result (terminal).
    Completed,
    /// Ended by a `kill` command (terminal).
    Killed,
    /// Failed for good (terminal).
    Failed,
}

impl MachineState {
    /// Its name: `runnable`, `sleeping`, `paused`, `fault`, `completed`,
    /// `killed` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            MachineState::Runnable => "runnable",
            MachineState::Sleeping { .. } => "sleeping",
            MachineState::Paused => "paused",
            MachineState::Fault => "fault",
            MachineState::Completed => "completed",
            MachineState::Killed => "killed",
            MachineState::Failed => "failed",
        }
    }

    /// Whether no message can move it any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MachineState::Completed | MachineState::Killed | MachineState::Failed
        )
    }
}

/// What moves the machine: a handler's answer, a user's command, the error
/// policy or the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Run (again): a resume command, or a sleeping task's timer.
    Run,
    /// Sleep until this wall-clock time (ms since the Unix epoch).
    Sleep {
        /// When to wake.
        until_ms: u64,
    },
    /// Park until resumed.
    Pause,
    /// End for good, without a result.
    Kill,
    /// Something went wrong, with this text.
    Error(String),
    /// The work is finished.
    Complete,
    /// The handler saved a checkpoint.
    Checkpoint,
    /// The node gives the task back (it stays in its state).
    Release,
}

impl Message {
    /// Its name, as in the table.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Run => "run",
            Message::Sleep { .. } => "sleep",
            Message::Pause => "pause",
            Message::Kill => "kill",
            Message::Error(_) => "error",
            Message::Complete => "complete",
            Message::Checkpoint => "checkpoint",
            Message::Release => "release",
        }
    }
}

/// A message the current state does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition: a task that is {from} does not accept {message}")]
pub struct InvalidTransition {
    /// The state's name.
    pub from: &'static str,
    /// The message's name.
    pub message: &'static str,
}

/// The state `message` moves `from` to, by the table in this module's docs.
pub fn transition(
    from: MachineState,
    message: &Message,
) -> Result<MachineState, InvalidTransition> {
    use MachineState as S;
    use Message as M;
    let next = match (from, message) {
        (S::Runnable | S::Sleeping { .. } | S::Paused | S::Fault, M::Sleep { until_ms }) => {
            S::Sleeping {
                until_ms: *until_ms,
            }
        }
        (S::Runnable | S::Sleeping { .. } | S::Paused | S::Fault, M::Pause) => S::Paused,
        (S::Runnable | S::Sleeping { .. } | S::Paused | S::Fault, M::Kill) => S::Killed,
        (S::Sleeping { .. } | S::Paused, M::Run) => S::Runnable,
        (S::Runnable, M::Error(_)) => S::Fault,
        (S::Fault, M::Error(_)) => S::Failed,
        (S::Runnable, M::Complete) => S::Completed,
        (S::Runnable, M::Checkpoint) => S::Runnable,
        (state, M::Release) if !state.is_terminal() => state,
        (from, message) => {
            return Err(InvalidTransition {
                from: from.name(),
                message: message.name(),
            })
        }
    };
    Ok(next)
}

/// One error the handler reported, kept with its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What went wrong (at most [`MAX_ERROR_TEXT`] bytes).
    pub message: String,
}

/// The persisted state of a task's machine (`states/<id>`). Absent means
/// runnable with no errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The state, flattened: `{"state": "sleeping", "until_ms": ...}`.
    #[serde(flatten)]
    pub state: MachineState,
    /// The newest errors, oldest first, at most [`MAX_ERRORS_KEPT`].
    #[serde(default)]
    pub errors: Vec<ErrorEntry>,
    /// When the state was written, milliseconds since the Unix epoch.
    #[serde(default)]
    pub updated_at_ms: u64,
}

impl Default for StateRecord {
    fn default() -> Self {
        StateRecord {
            state: MachineState::Runnable,
            errors: Vec::new(),
            updated_at_ms: 0,
        }
    }
}

impl StateRecord {
    /// Remember an error at `at_ms`, cutting its text and dropping the
    /// oldest entries beyond [`MAX_ERRORS_KEPT`].
    pub fn push_error(&mut self, at_ms: u64, message: &str) {
        let mut end = message.len().min(MAX_ERROR_TEXT);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.errors.push(ErrorEntry {
            at_ms,
            message: message[..end].to_string(),
        });
        let excess = self.errors.len().saturating_sub(MAX_ERRORS_KEPT);
        self.errors.drain(..excess);
    }

    /// How many kept errors happened at or after `since_ms`.
    pub fn errors_since(&self, since_ms: u64) -> usize {
        self.errors.iter().filter(|e| e.at_ms >= since_ms).count()
    }
}

/// A command a user sends to one task. Queued under
/// `task-commands/<id>/<uid>` and applied, in the order sent, by the task's
/// owner, each exactly once: the owner deletes the command in the same
/// epoch-fenced transaction that writes the state it leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum TaskCommand {
    /// Stop the work and park the task until resumed.
    Pause,
    /// Run a paused or sleeping task again.
    Resume,
    /// Stop the work and park the task until a wall-clock time.
    Sleep {
        /// When to wake, milliseconds since the Unix epoch.
        until_ms: u64,
    },
    /// Stop the work and end the task for good (state killed).
    Kill,
}

impl TaskCommand {
    /// Every command's name, for error messages.
    pub const NAMES: [&'static str; 4] = ["pause", "resume", "sleep", "kill"];

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            TaskCommand::Pause => "pause",
            TaskCommand::Resume => "resume",
            TaskCommand::Sleep { .. } => "sleep",
            TaskCommand::Kill => "kill",
        }
    }

    /// The message it sends the machine.
    pub fn message(&self) -> Message {
        match self {
            TaskCommand::Pause => Message::Pause,
            TaskCommand::Resume => Message::Run,
            TaskCommand::Sleep { until_ms } => Message::Sleep {
                until_ms: *until_ms,
            },
            TaskCommand::Kill => Message::Kill,
        }
    }

    /// The wire form, `{"command": "sleep", "until_ms": ...}`.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands always serialize")
    }

    /// Decode the wire form; an unknown or malformed command is an error that
    /// names the problem and the commands there are.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(|e| {
            ProtocolError::InvalidCommand(format!(
                "{e}; task commands are {}",
                TaskCommand::NAMES.join(", ")
            ))
        })
    }
}

impl fmt::Display for TaskCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState as S;

    fn states() -> Vec<MachineState> {
        vec![
            S::Runnable,
            S::Sleeping { until_ms: 5 },
            S::Paused,
            S::Fault,
            S::Completed,
            S::Killed,
            S::Failed,
        ]
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::Run,
            Message::Sleep { until_ms: 9 },
            Message::Pause,
            Message::Kill,
            Message::Error("boom".into()),
            Message::Complete,
            Message::Checkpoint,
            Message::Release,
        ]
    }

    /// The table of the module docs, written out cell by cell; `None` is
    /// an invalid transition.
    fn expected(from: MachineState, message: &Message) -> Option<MachineState> {
        let sleeping = S::Sleeping { until_ms: 9 };
        let live = !from.is_terminal();
        match (from.name(), message.name()) {
            (_, _) if !live => None,
            ("runnable", "run") => None,
            ("runnable", "error") => Some(S::Fault),
            ("runnable", "complete") => Some(S::Completed),
            ("runnable", "checkpoint") => Some(S::Runnable),
            ("sleeping" | "paused", "run") => Some(S::Runnable),
            ("fault", "run") => None,
            ("fault", "error") => Some(S::Failed),
            (_, "error" | "complete" | "checkpoint") => None,
            (_, "sleep") => Some(sleeping),
            (_, "pause") => Some(S::Paused),
            (_, "kill") => Some(S::Killed),
            (_, "release") => Some(from),
            other => unreachable!("{other:?}"),
        }
    }

    #[test]
    fn every_cell_of_the_table() {
        let mut valid = 0;
        for from in states() {
            for message in messages() {
                let got = transition(from, &message);
                match expected(from, &message) {
                    Some(to) => {
                        assert_eq!(got, Ok(to), "{} --{}-->", from.name(), message.name());
                        valid += 1;
                    }
                    None => {
                        let error = got.expect_err(&format!("{from:?} {message:?}"));
                        assert_eq!(error.from, from.name());
                        assert_eq!(error.message, message.name());
                        assert!(error.to_string().contains("does not accept"));
                    }
                }
            }
        }
        // 7 states × 8 messages = 56 cells, of which these are valid.
        assert_eq!(valid, 22);
    }

    #[test]
    fn the_error_list_is_bounded_and_cut() {
        let mut record = StateRecord::default();
        for n in 0..(MAX_ERRORS_KEPT as u64 + 10) {
            record.push_error(n, &format!("error {n}"));
        }
        assert_eq!(record.errors.len(), MAX_ERRORS_KEPT);
        assert_eq!(record.errors[0].message, "error 10");
        assert_eq!(record.errors_since(40), 2);
        record.push_error(99, &"é".repeat(MAX_ERROR_TEXT));
        let last = &record.errors.last().unwrap().message;
        assert!(last.len() <= MAX_ERROR_TEXT && last.len() >= MAX_ERROR_TEXT - 1);
    }

    #[test]
    fn state_records_round_trip_with_a_flat_state() {
        let record = StateRecord {
            state: S::Sleeping { until_ms: 42 },
            errors: vec![ErrorEntry {
                at_ms: 1,
                message: "x".into(),
            }],
            updated_at_ms: 3,
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["state"], "sleeping");
        assert_eq!(json["until_ms"], 42);
        let back: StateRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn commands_round_trip_and_unknown_ones_are_named() {
        for command in [
            TaskCommand::Pause,
            TaskCommand::Resume,
            TaskCommand::Sleep { until_ms: 7 },
            TaskCommand::Kill,
        ] {
            assert_eq!(TaskCommand::decode(&command.encode()), Ok(command));
        }
        for bad in [
            &br#"{"command":"explode"}"#[..],
            br#"{"command":"sleep"}"#,
            b"not json",
        ] {
            let error = TaskCommand::decode(bad).unwrap_err().to_string();
            assert!(error.contains("pause, resume, sleep, kill"), "{error}");
        }
    }
}
