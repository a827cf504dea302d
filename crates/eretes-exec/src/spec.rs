//! What a process task runs: its [`ProcessSpec`], kept in the task's
//! properties under `"process"`, and the checks it passes before anything
//! is started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest program name or path, in bytes.
pub const MAX_PROGRAM_BYTES: usize = 4096;
/// Most arguments a process task may have.
pub const MAX_ARGS: usize = 4096;
/// Most attempts a process task may ask for: as many errors as a task's
/// state record keeps, since the error policy counts the kept errors.
pub const MAX_ATTEMPTS: u32 = eretes_protocol::machine::MAX_ERRORS_KEPT as u32;
/// Attempts when the spec does not say.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Most environment variables a process task may set.
pub const MAX_ENV: usize = 256;
/// Whether `name` is a variable name a task's environment may hold:
/// letters, digits and `_`, not starting with a digit.
pub fn is_env_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Most bytes of names and values a process task's environment may hold.
pub const MAX_ENV_BYTES: usize = 32 * 1024;
/// Longest per-attempt timeout (a year), in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;

/// A process task: run `program` with `args` (no shell unless the program
/// is one), in `cwd` if given.
///
/// In a task's properties:
///
/// ```json
/// {"process": {"program": "backup", "args": ["--full"], "cwd": "/srv",
///              "env": {"MODE": "full"}, "timeout_ms": 3600000,
///              "max_attempts": 3, "permanent": false}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// The program: a path, or a name looked up in the agent's `PATH`.
    pub program: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The working directory (absolute); the agent's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// How many times a run that exits non-zero is tried, in all.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Restart whenever it exits, like a service, instead of finishing.
    #[serde(default)]
    pub permanent: bool,
    /// Variables set for the program, on top of the clean environment every
    /// task gets (names of letters, digits and `_`, not `ERETES_*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Longest one attempt may run, in milliseconds: then it is stopped as
    /// by a stop command (SIGTERM, the grace period, SIGKILL) and counts as
    /// a failed attempt whose reason says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn default_attempts() -> u32 {
    DEFAULT_ATTEMPTS
}

/// Why a spec was refused; the message names the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid process task: {0}")]
pub struct SpecError(pub String);

impl ProcessSpec {
    /// A spec for `program` with `args` and the defaults.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Self {
        ProcessSpec {
            program: program.into(),
            args,
            cwd: None,
            max_attempts: DEFAULT_ATTEMPTS,
            permanent: false,
            env: BTreeMap::new(),
            timeout_ms: None,
        }
    }

    /// The spec in a task's properties (`{"process": {...}}`), checked.
    pub fn from_properties(properties: &Value) -> Result<Self, SpecError> {
        let process = properties
            .get("process")
            .ok_or_else(|| SpecError("the task's properties have no \"process\" object".into()))?;
        let spec: ProcessSpec = serde_json::from_value(process.clone())
            .map_err(|e| SpecError(format!("\"process\": {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The per-attempt timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }

    /// The properties that carry this spec.
    pub fn to_properties(&self) -> Value {
        serde_json::json!({ "process": self })
    }

    /// Check every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.program.is_empty() {
            return Err(SpecError("program is empty".into()));
        }
        if self.program.len() > MAX_PROGRAM_BYTES {
            return Err(SpecError(format!(
                "program is {} bytes; the limit is {MAX_PROGRAM_BYTES}",
                self.program.len()
            )));
        }
        if self.program.contains('\0') {
            return Err(SpecError("program contains a NUL byte".into()));
        }
        if self.args.len() > MAX_ARGS {
            return Err(SpecError(format!(
                "{} arguments; the limit is {MAX_ARGS}",
                self.args.len()
            )));
        }
        if let Some(n) = self.args.iter().position(|arg| arg.contains('\0')) {
            return Err(SpecError(format!("argument {n} contains a NUL byte")));
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.is_absolute() {
                return Err(SpecError(format!(
                    "cwd {} is not an absolute path",
                    cwd.display()
                )));
            }
            if cwd.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(SpecError("cwd contains a NUL byte".into()));
            }
        }
        if self.env.len() > MAX_ENV {
            return Err(SpecError(format!(
                "{} environment variables; the limit is {MAX_ENV}",
                self.env.len()
            )));
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(SpecError(format!(
                "the environment holds {env_bytes} bytes; the limit is {MAX_ENV_BYTES}"
            )));
        }
        for (name, value) in &self.env {
            if !is_env_name(name) {
                return Err(SpecError(format!(
                    "env name {name:?} is not letters, digits and _ (not starting with a digit)"
                )));
            }
            if name.starts_with("ERETES_") {
                return Err(SpecError(format!(
                    "env name {name:?}: ERETES_* variables are eretes' own"
                )));
            }
            if value.contains('\0') {
                return Err(SpecError(format!("env {name} contains a NUL byte")));
            }
        }
        if let Some(timeout) = self.timeout_ms {
            if !(1..=MAX_TIMEOUT_MS).contains(&timeout) {
                return Err(SpecError(format!(
                    "timeout_ms {timeout} is not between 1 and {MAX_TIMEOUT_MS} (a year)"
                )));
            }
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(SpecError(format!(
                "max_attempts {} is not between 1 and {MAX_ATTEMPTS}",
                self.max_attempts
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spec_round_trips_with_defaults() {
        let spec = ProcessSpec::from_properties(&json!({"process": {"program": "true"}})).unwrap();
        assert_eq!(spec, ProcessSpec::new("true", vec![]));
        let back = ProcessSpec::from_properties(&spec.to_properties()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let long = "x".repeat(MAX_PROGRAM_BYTES + 1);
        for (properties, expected) in [
            (json!({}), "no \"process\" object"),
            (json!({"process": "sh"}), "\"process\": invalid type"),
            (json!({"process": {"args": []}}), "missing field `program`"),
            (json!({"process": {"program": ""}}), "program is empty"),
            (json!({"process": {"program": long}}), "the limit is 4096"),
            (json!({"process": {"program": "a\u{0}b"}}), "NUL"),
            (
                json!({"process": {"program": "sh", "args": ["ok", "b\u{0}"]}}),
                "argument 1",
            ),
            (
                json!({"process": {"program": "sh", "cwd": "rel/dir"}}),
                "not an absolute path",
            ),
            (
                json!({"process": {"program": "sh", "max_attempts": 0}}),
                "max_attempts 0",
            ),
            (
                json!({"process": {"program": "sh", "max_attempts": 33}}),
                "max_attempts 33 is not between 1 and 32",
            ),
            (
                json!({"process": {"program": "sh", "colour": "red"}}),
                "unknown field `colour`",
            ),
            (
                json!({"process": {"program": "sh", "env": {"1X": "a"}}}),
                "env name \"1X\"",
            ),
            (
                json!({"process": {"program": "sh", "env": {"A-B": "a"}}}),
                "env name \"A-B\"",
            ),
            (
                json!({"process": {"program": "sh", "env": {"ERETES_EPOCH": "1"}}}),
                "eretes' own",
            ),
            (
                json!({"process": {"program": "sh", "env": {"A": "a\u{0}"}}}),
                "env A contains a NUL",
            ),
            (
                json!({"process": {"program": "sh", "env": {"A": "x".repeat(MAX_ENV_BYTES)}}}),
                "the limit is 32768",
            ),
            (
                json!({"process": {"program": "sh", "timeout_ms": 0}}),
                "timeout_ms 0",
            ),
            (
                json!({"process": {"program": "sh", "env": {"A": 1}}}),
                "invalid type",
            ),
            (
                json!({"process": {"program": "sh", "args": "-c"}}),
                "invalid type",
            ),
        ] {
            let error = ProcessSpec::from_properties(&properties)
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("invalid process task: "), "{error}");
            assert!(error.contains(expected), "{properties}: {error}");
        }
    }
}
