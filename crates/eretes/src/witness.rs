//! The witness file's line format, shared by `eretes witness-node` (which
//! writes it) and the multi-process tests (which read it, including this
//! file by path).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One line of the witness file: a run of a task started or stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessLine {
    /// `start` or `stop`.
    pub event: String,
    /// The task.
    pub task: String,
    /// The node that ran it.
    pub node: String,
    /// The run's fencing epoch.
    pub epoch: i64,
    /// Wall-clock microseconds since the Unix epoch.
    pub at_us: u64,
}

/// Wall-clock microseconds since the Unix epoch: comparable between
/// processes on one machine, which is all the witness file needs.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}
