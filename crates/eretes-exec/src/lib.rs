//! # eretes-exec — executors
//!
//! Layer 4 of eretes: where a task's work runs. The node runtime
//! (`eretes-runtime`) claims a task and calls a [`eretes_runtime::Handler`];
//! this crate's [`ProcessHandler`] is the [`eretes_runtime::StatefulHandler`]
//! that runs the task as a child process inside the task state machine
//! ([`eretes_runtime::StateMachine`]), as `eretes agent` does for tasks
//! submitted with `eretes submit -- PROGRAM ARGS`. Task commands steer it:
//! pause and sleep stop the process group and park the task, resume starts
//! it again, kill ends it for good.
//!
//! **Checkpoints.** A process finds the path of its checkpoint file in
//! `ERETES_CHECKPOINT_FILE` ([`CHECKPOINT_FILE_ENV`]). At start the file holds
//! the task's latest checkpoint (it is absent if there is none). Whenever the
//! process replaces the file (write `$ERETES_CHECKPOINT_FILE.tmp`, then rename
//! it over the file, so a half-written checkpoint is never read), the agent
//! saves it as the task's checkpoint with a fenced write, within
//! [`CHECKPOINT_POLL`] (the file is watched with inotify, not polled); it looks once more after the process ends or is
//! stopped, so a process can save its progress on SIGTERM. The next run —
//! here, or on another node after a release or a failover — starts with it.
//! At most 256 KiB; a larger file is not saved (logged).
//!
//! A process task's properties carry a [`ProcessSpec`]:
//! `{"process": {"program": "...", "args": [...], "cwd": "...",
//! "max_attempts": 3, "permanent": false}}`. No shell is involved unless
//! the program is one (`sh -c '...'`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use eretes_exec::{AllowList, ExecConfig, ProcessHandler, ProcessSpec};
//! use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec};
//! use eretes_runtime::{balancer::FairBalancer, Node, NodeConfig, StateMachine};
//! use eretes_store::{embedded::EmbeddedStore, Store};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store: Arc<dyn Store> = EmbeddedStore::new();
//! let ns = Namespace::new("example").unwrap();
//! let config = ExecConfig::new("/var/lib/eretes".into(), AllowList::only(["backup"]));
//! let coordinator = Coordinator::new(store.clone(), ns.clone());
//! let handler = Arc::new(StateMachine::new(ProcessHandler::new(config).unwrap(), coordinator));
//! let node_config = NodeConfig::new(NodeName::new("n1").unwrap(), ns.clone());
//! let node = Node::start(store.clone(), node_config, handler, Box::new(FairBalancer::default()))
//!     .await
//!     .unwrap();
//! let spec = ProcessSpec::new("backup", vec!["--full".into()]);
//! Coordinator::new(store, ns)
//!     .submit(&TaskId::new("nightly").unwrap(), &TaskSpec::new(GroupName::default(), spec.to_properties()))
//!     .await
//!     .unwrap();
//! # node.shutdown().await;
//! # });
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

mod checkpoint;
mod checkpoint_watch;
mod leftovers;
mod output;
mod process;
mod run_as;
mod spec;
pub mod supervisor;

pub use output::log_rotation;
pub use process::ProcessHandler;
pub use run_as::RunAs;
pub use spec::{
    is_env_name, ProcessSpec, SpecError, DEFAULT_ATTEMPTS, MAX_ARGS, MAX_ATTEMPTS,
    MAX_PROGRAM_BYTES,
};
pub use supervisor::SupervisorProgram;

/// The environment variable that marks a task's processes with the agent's
/// data directory, so that leftovers are recognised (and only they killed).
pub const AGENT_DIR_ENV: &str = "ERETES_AGENT_DIR";

/// The environment variable that names a process task's checkpoint file.
pub const CHECKPOINT_FILE_ENV: &str = "ERETES_CHECKPOINT_FILE";

/// The least time between two looks at a running process's checkpoint
/// file, which bounds how often it is saved: every save is a store write
/// that every watch of checkpoints carries (each agent's task index). The file is watched
/// (inotify), so an unchanged file costs nothing; where it cannot be
/// watched, it is looked at this often.
pub const CHECKPOINT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Which programs process tasks may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowList {
    /// Any program (the embedded, loopback-only agent's default).
    Any,
    /// Only these, compared with the task's `program` exactly.
    Only(BTreeSet<String>),
}

impl AllowList {
    /// Only the programs named.
    pub fn only<I, S>(programs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AllowList::Only(programs.into_iter().map(Into::into).collect())
    }

    /// Whether `program` may run.
    pub fn allows(&self, program: &str) -> bool {
        match self {
            AllowList::Any => true,
            AllowList::Only(programs) => programs.contains(program),
        }
    }
}

/// How process tasks run on one agent.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The agent's data directory: logs under `logs/`, running process
    /// groups recorded under `groups/`.
    pub data_dir: PathBuf,
    /// Which programs may run.
    pub allow: AllowList,
    /// Under an allow list of programs, the variables a task's spec may set
    /// (any, without one). Default: none.
    pub allow_env: BTreeSet<String>,
    /// Size at which a task's log (stdout, stderr) rotates: the full one is
    /// kept as `<log>.1`, replacing an older one, so each stream takes at
    /// most twice this. Default 10 MiB.
    pub log_cap: u64,
    /// Bytes of each stream's end kept in the result. Default 4 KiB.
    pub tail_bytes: usize,
    /// From SIGTERM to SIGKILL when a task is stopped. Default 10 s.
    pub stop_grace: Duration,
    /// First and longest pause before a failed attempt is retried (or a
    /// permanent task restarted); doubled each time. Default 1 s and 60 s.
    pub retry_backoff: (Duration, Duration),
    /// How each run's supervisor is started. Default: this binary's
    /// `supervise` subcommand ([`SupervisorProgram::this_binary`]), which
    /// needs [`supervisor::run_if_invoked`] at the top of `main`.
    pub supervisor: SupervisorProgram,
    /// Whether supervisors hold the node's fence deadline and kill a task's
    /// tree when it passes (default). Only another node can take a task
    /// over, so a single node whose store lives in its own process (the
    /// embedded store) turns it off: there a suspended machine's tasks
    /// would be killed for nothing on resume.
    pub fence_processes: bool,
    /// Variables of the agent's environment that tasks get too. Tasks get
    /// `PATH`, `HOME` and `LANG` (those the agent has), their `ERETES_*`
    /// variables, these, and nothing else of the agent's environment.
    /// Default: none.
    pub pass_env: Vec<String>,
    /// Run every task as this user (its groups, its `HOME`) instead of the
    /// agent's; the agent must be root. Default: the agent's user.
    pub run_as: Option<RunAs>,
    /// The soft open-file limit tasks start with, when the agent raised its
    /// own (so that tasks get the limit the agent was started with).
    pub task_open_files: Option<u64>,
}

impl ExecConfig {
    /// The defaults above, for `data_dir` and `allow`.
    pub fn new(data_dir: PathBuf, allow: AllowList) -> Self {
        ExecConfig {
            data_dir,
            allow,
            allow_env: BTreeSet::new(),
            log_cap: 10 << 20,
            tail_bytes: 4096,
            stop_grace: Duration::from_secs(10),
            retry_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            supervisor: SupervisorProgram::this_binary(),
            fence_processes: true,
            pass_env: Vec::new(),
            run_as: None,
            task_open_files: None,
        }
    }

    /// Where each task's logs are: `<data-dir>/logs/<task>/{stdout,stderr}.log`.
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// Where each run's process group is recorded, for the next agent on
    /// this data directory should this one die.
    pub fn groups_dir(&self) -> PathBuf {
        self.data_dir.join("groups")
    }

    /// Where running tasks' checkpoint files are:
    /// `<data-dir>/checkpoints/<task>.<epoch>`, named to the task by
    /// [`CHECKPOINT_FILE_ENV`].
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.data_dir.join("checkpoints")
    }
}
