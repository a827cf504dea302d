//! What the agent and a supervisor say over their socket: one line per
//! message, ASCII words and decimal numbers.
//!
//! Agent → supervisor: first the run to start ([`Launch`]):
//!
//! * `launch JSON` — the program, its arguments, directory and environment
//!   additions, where its output goes, the stop grace period and the first
//!   deadline. A supervisor is started ahead of its run and waits for this
//!   line, so that its start is not on a task's start path; orders before
//!   it (for a run that ended as they were sent) are dropped.
//!
//! Then ([`Order`]):
//!
//! * `deadline NS` — kill the tree at `CLOCK_BOOTTIME` instant `NS`
//!   (nanoseconds) unless a later line moves it; `0` is no deadline.
//! * `stop` — SIGTERM the tree, SIGKILL it after the grace period.
//!
//! Supervisor → agent ([`Report`]):
//!
//! * `started PID` — the task's leader runs as `PID` (its group and session
//!   id too).
//! * `failed TEXT` — the program could not be started, for this reason.
//! * `output JSON` — once the tree is gone, for each of stdout and stderr:
//!   the end of what the run wrote to it, and why its log could not be
//!   written, if it could not ([`StreamEnd`]).
//! * `ended STATUS CAUSE [again]` — the whole tree is gone; `STATUS` is the
//!   leader's raw wait status, `CAUSE` one of `exited`, `stopped`, `fenced`.
//!   With `again` (only if the launch allowed it, [`Launch::again`]), the
//!   supervisor waits for another `launch` on the same socket, as a new one
//!   would; without, it exits.
//!
//! **Why again.** A supervisor that takes one run and exits costs a fork,
//! its first touches of the binary's pages, and an exit and a reap per
//! run: under short tasks, a fifth of the machine. One whose run is over
//! has nothing of it left (no process, no descriptor, no thread), so the
//! agent hands it the next run instead.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use serde::{Deserialize, Serialize};

/// Longest line either side accepts after the launch (but an `output`
/// report); anything longer is a protocol error.
pub const MAX_LINE: usize = 4096;

/// Longest `output` report: a tail of `MAX_TAIL` (16 KiB) bytes,
/// each escaped to at most six characters, and an error's text.
pub const MAX_OUTPUT_LINE: usize = 6 * crate::output::MAX_TAIL + MAX_LINE;

/// Longest launch line (a task record is at most 64 KiB, the environment
/// additions are a few paths).
pub const MAX_LAUNCH: usize = 1 << 20;

/// The run a supervisor starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The program (looked up in `PATH` unless it has a `/`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its working directory; the supervisor's own if absent.
    pub cwd: Option<String>,
    /// Variables added to the supervisor's environment for the task, as
    /// bytes (a path need not be UTF-8).
    pub env: Vec<(String, Vec<u8>)>,
    /// From SIGTERM to SIGKILL when the run is stopped, in milliseconds.
    pub grace_ms: u64,
    /// The first fencing deadline on CLOCK_BOOTTIME; 0 for none.
    pub deadline_ns: u64,
    /// The user the program runs as; the supervisor's own if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<crate::RunAs>,
    /// The soft open-file limit the program starts with; the supervisor's
    /// own if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Where the program's stdout and stderr go; the supervisor's own if
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LaunchLogs>,
    /// The agent may hand this supervisor another run once this one ended:
    /// it then says `again` in its end report and waits for the next
    /// launch. (Absent, as an older agent sends it: it exits.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub again: bool,
}

/// The logs a run writes: `stdout.log` and `stderr.log` in a directory,
/// appended to, each rotated at a cap (see `output.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchLogs {
    /// The directory (created if need be), as bytes: a path need not be UTF-8.
    pub dir: Vec<u8>,
    /// Empty both logs first: the first attempt of a run.
    pub reset: bool,
    /// Bytes at which a log rotates.
    pub cap: u64,
    /// Bytes of each stream's end to report (at most
    /// `MAX_TAIL` (16 KiB)).
    pub tail_bytes: usize,
}

/// Which of the task's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// How one output stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// Which.
    pub stream: Stream,
    /// Its last bytes (invalid UTF-8 replaced).
    pub tail: String,
    /// Why its log could not be written, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Launch {
    /// The line for this launch, newline included.
    pub fn encode(&self) -> String {
        let json = serde_json::to_string(self).expect("a launch serialises");
        format!("launch {json}\n")
    }

    /// Parse one line (without its newline).
    pub fn decode(line: &str) -> Result<Launch, String> {
        let json = line
            .strip_prefix("launch ")
            .ok_or_else(|| "the first line must launch the run".to_string())?;
        serde_json::from_str(json).map_err(|error| format!("bad launch: {error}"))
    }
}

/// What the agent tells a supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The fencing deadline on `CLOCK_BOOTTIME`, or none.
    Deadline(Option<u64>),
    /// Stop the task: SIGTERM, the grace period, SIGKILL.
    Stop,
}

impl Order {
    /// The line for this order, newline included.
    pub fn encode(&self) -> String {
        match self {
            Order::Deadline(at) => format!("deadline {}\n", at.unwrap_or(0)),
            Order::Stop => "stop\n".to_string(),
        }
    }

    /// Parse one line (without its newline).
    pub fn decode(line: &str) -> Result<Order, String> {
        match line.split_once(' ') {
            Some(("deadline", at)) => {
                let at: u64 = at
                    .parse()
                    .map_err(|_| format!("bad deadline {at:?}: not a count of nanoseconds"))?;
                Ok(Order::Deadline((at != 0).then_some(at)))
            }
            None if line == "stop" => Ok(Order::Stop),
            _ => Err(format!("unknown order {line:?}")),
        }
    }
}

/// Why a supervised run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The task's main process exited by itself.
    Exited,
    /// The agent (or a signal to the supervisor) stopped it.
    Stopped,
    /// The fencing deadline passed: the tree was killed at once.
    Fenced,
}

impl Cause {
    fn word(self) -> &'static str {
        match self {
            Cause::Exited => "exited",
            Cause::Stopped => "stopped",
            Cause::Fenced => "fenced",
        }
    }
}

/// What a supervisor tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The leader runs with this pid.
    Started(i32),
    /// The program could not be started.
    Failed(String),
    /// An output stream's end (sent before [`Report::Ended`]).
    Output(StreamEnd),
    /// Every process of the tree is gone.
    Ended {
        /// The leader's raw wait status.
        status: i32,
        /// Why it ended.
        cause: Cause,
        /// The supervisor waits for another launch (it exits otherwise).
        again: bool,
    },
}

impl Report {
    /// The line for this report, newline included (a failure's text is
    /// kept to one line).
    pub fn encode(&self) -> String {
        match self {
            Report::Started(pid) => format!("started {pid}\n"),
            Report::Failed(text) => {
                let mut text = text.replace(['\n', '\r'], " ");
                let mut cut = text.len().min(MAX_LINE - 16);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                format!("failed {text}\n")
            }
            Report::Output(end) => {
                let json = serde_json::to_string(end).expect("a stream's end serialises");
                format!("output {json}\n")
            }
            Report::Ended {
                status,
                cause,
                again,
            } => {
                let again = if *again { " again" } else { "" };
                format!("ended {status} {}{again}\n", cause.word())
            }
        }
    }

    /// Parse one line (without its newline).
    pub fn decode(line: &str) -> Result<Report, String> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "started" => rest
                .parse()
                .ok()
                .filter(|&pid: &i32| pid > 1)
                .map(Report::Started)
                .ok_or_else(|| format!("bad pid in {line:?}")),
            "failed" => Ok(Report::Failed(rest.to_string())),
            "output" => serde_json::from_str(rest)
                .map(Report::Output)
                .map_err(|error| format!("bad output report: {error}")),
            "ended" => {
                let (status, cause) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("bad end {line:?}"))?;
                let status = status
                    .parse()
                    .map_err(|_| format!("bad status in {line:?}"))?;
                let (cause, again) = match cause.split_once(' ') {
                    Some((cause, "again")) => (cause, true),
                    Some(_) => return Err(format!("bad end {line:?}")),
                    None => (cause, false),
                };
                let cause = match cause {
                    "exited" => Cause::Exited,
                    "stopped" => Cause::Stopped,
                    "fenced" => Cause::Fenced,
                    _ => return Err(format!("bad cause in {line:?}")),
                };
                Ok(Report::Ended {
                    status,
                    cause,
                    again,
                })
            }
            _ => Err(format!("unknown report {line:?}")),
        }
    }
}

/// A raw wait status as the standard library's [`ExitStatus`].
pub fn exit_status(raw: i32) -> ExitStatus {
    ExitStatus::from_raw(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_survives_its_line_bytes_and_all() {
        let launch = Launch {
            program: "sh".into(),
            args: vec!["-c".into(), "echo \"a\nb\"".into()],
            cwd: Some("/tmp".into()),
            env: vec![("ERETES_CHECKPOINT_FILE".into(), vec![b'/', 0xff, b'x'])],
            grace_ms: 500,
            deadline_ns: 42,
            run_as: None,
            open_files: Some(1024),
            logs: Some(LaunchLogs {
                dir: b"/var/lib/eretes/logs/t\xff".to_vec(),
                reset: true,
                cap: 10 << 20,
                tail_bytes: 4096,
            }),
            again: true,
        };
        let line = launch.encode();
        assert_eq!(line.matches('\n').count(), 1, "one line");
        assert_eq!(Launch::decode(line.trim_end()), Ok(launch.clone()));
        for bad in ["stop", "launch", "launch {}", "launch {\"program\":1}"] {
            assert!(Launch::decode(bad).is_err(), "{bad:?}");
        }
        // An older agent's launch says nothing of another run: none.
        let older = Launch {
            again: false,
            ..launch
        };
        let line = older.encode();
        assert!(!line.contains("again"), "{line}");
        assert_eq!(Launch::decode(line.trim_end()), Ok(older));
    }

    #[test]
    fn every_message_survives_its_line() {
        for order in [
            Order::Deadline(Some(17)),
            Order::Deadline(None),
            Order::Stop,
        ] {
            let line = order.encode();
            assert_eq!(Order::decode(line.trim_end()), Ok(order));
        }
        for report in [
            Report::Started(4242),
            Report::Failed("No such file or directory (os error 2)".into()),
            Report::Output(StreamEnd {
                stream: Stream::Stderr,
                tail: "a \"quoted\"\nline\u{0}\u{fffd}".into(),
                error: Some("cannot write: No space left on device".into()),
            }),
            Report::Output(StreamEnd {
                stream: Stream::Stdout,
                tail: String::new(),
                error: None,
            }),
            Report::Ended {
                status: 256,
                cause: Cause::Exited,
                again: false,
            },
            Report::Ended {
                status: 0,
                cause: Cause::Exited,
                again: true,
            },
            Report::Ended {
                status: 9,
                cause: Cause::Fenced,
                again: true,
            },
            Report::Ended {
                status: 15,
                cause: Cause::Stopped,
                again: false,
            },
        ] {
            let line = report.encode();
            assert_eq!(Report::decode(line.trim_end()), Ok(report));
        }
        assert_eq!(exit_status(256).code(), Some(1));
        assert_eq!(exit_status(9).signal(), Some(9));
    }

    #[test]
    fn garbage_is_refused_with_what_was_wrong() {
        for line in [
            "",
            "deadline",
            "deadline -1",
            "deadline soon",
            "stop now",
            "kill",
        ] {
            assert!(Order::decode(line).is_err(), "{line:?}");
        }
        for line in [
            "started",
            "started 1",
            "started x",
            "ended 0",
            "ended x exited",
            "ended 0 vanished",
            "ended 0 exited later",
            "ended 0 exited again again",
            "ended 0 again",
            "output",
            "output {}",
            "output {\"stream\":\"stdin\",\"tail\":\"\"}",
            "hello",
        ] {
            let error = Report::decode(line).unwrap_err();
            assert!(!error.is_empty(), "{line:?}");
        }
        let multiline = Report::Failed("a\nb".into()).encode();
        assert_eq!(multiline, "failed a b\n");
        // Cut to fit a line, never inside a character.
        let long = Report::Failed("é".repeat(MAX_LINE)).encode();
        assert!(long.len() <= MAX_LINE, "{}", long.len());
        assert!(Report::decode(long.trim_end()).is_ok());
    }
}
