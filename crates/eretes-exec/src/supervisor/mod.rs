//! The per-task supervisor: a small process of its own between the agent and
//! a task's processes, which owns the task's whole process tree and kills it
//! on its own when the node's fencing deadline passes or the agent dies.
//!
//! ```text
//! agent ──socketpair (stdin)──> supervisor   (subreaper, no async runtime)
//!                                  └─ task leader (own session and group, parent-death SIGKILL)
//!                                       └─ children, grandchildren, setsid daemons …
//! ```
//!
//! **Why a process.** A frozen agent (SIGSTOP, a paused VM, a swapping host)
//! cannot stop anything, and a `kill -9`'d one reaches only its direct
//! children through the parent-death signal. The supervisor keeps running
//! through both:
//!
//! * **Deadline.** The agent pushes the node's self-fencing deadline (last
//!   lease renewal sent + TTL − margin) on every renewal, as an absolute
//!   instant of `CLOCK_BOOTTIME`, which keeps counting while the machine is
//!   suspended. When it passes without an extension the supervisor SIGKILLs
//!   the whole tree at once, whatever the agent is doing, and reports the run
//!   as *fenced*. The lease cannot expire at the store before that instant +
//!   the margin, so the task's processes are dead before another node can
//!   claim the task.
//! * **Agent gone.** Its end of the socket closes: the tree is killed at once.
//! * **Whole tree.** The supervisor is a child subreaper
//!   (`PR_SET_CHILD_SUBREAPER`), so whatever a task's process leaves behind —
//!   a `setsid` daemon included — is re-parented to it, never to init. It
//!   kills the task's group and every descendant it finds in `/proc`, again
//!   and again, and exits only once it has no child left: then no process of
//!   the tree exists.
//! * **Ordinary stop.** SIGTERM to the tree, the grace period, SIGKILL.
//! * **The task's main process exits.** Whatever else of its tree still runs
//!   is killed too (systemd's `KillMode=control-group`): a finished task
//!   leaves nothing behind.
//!
//! The agent starts a supervisor *ahead* of its run (one is kept ready),
//! forked by its fork server (`fork_server.rs`, one per agent) as the
//! agent's own child, or exec'd where that cannot be, and hands it the run
//! over the socket ([`wire::Launch`]: program,
//! arguments, directory, environment additions, logs, grace period, first
//! deadline). Once the run's tree is gone and its end reported, the
//! supervisor waits for another run: the agent keeps a few such for its
//! next runs (`pool.rs`, [`wire`]'s `again`), which saves a fork and an
//! exit per run. The supervisor reads the task's output itself and keeps its
//! logs (`output.rs`). The supervisor reports the leader's pid, then how the run ended: the
//! leader's wait status and whether it exited by itself, was stopped, or was
//! fenced ([`wire`]). A supervisor that dies itself (`kill -9`) takes the
//! leader with it (parent-death signal); the agent then kills the leader's
//! group and every process that carries the run's identity in its
//! environment, and reports the run as failed.
//!
//! A program that embeds [`crate::ProcessHandler`] must run the supervisor
//! when it is started as one: call [`run_if_invoked`] first thing in `main`
//! (`eretes` does), or point [`crate::ExecConfig::supervisor`] at a binary
//! that does.

mod fork_server;
mod gates;
mod handle;
mod leader;
mod pool;
mod spawner;
mod streams;
mod supervise;
mod tree;
pub mod wire;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

pub use fork_server::FORK_SERVER_ARG;
pub(crate) use gates::RunGates;
pub(crate) use handle::{describe, LaunchPlan, Supervised, SupervisorEnd};
pub(crate) use pool::WarmPool;
pub(crate) use tree::{signal_group, stat_fields};

/// The argument that makes a binary a supervisor (`eretes supervise …`).
pub const SUBCOMMAND: &str = "supervise";

/// How the agent starts a supervisor: a program and the arguments before
/// the supervisor's own (which begin with [`SUBCOMMAND`]'s options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorProgram {
    /// The program to run.
    pub program: PathBuf,
    /// Arguments before the supervisor's options.
    pub args: Vec<OsString>,
}

impl SupervisorProgram {
    /// This very binary, `supervise` subcommand: through `/proc/self/exe`,
    /// so the supervisor is the agent's own code even after the file on disk
    /// was replaced by an upgrade. The binary's `main` must call
    /// [`run_if_invoked`].
    pub fn this_binary() -> Self {
        SupervisorProgram {
            program: PathBuf::from("/proc/self/exe"),
            args: vec![OsString::from(SUBCOMMAND)],
        }
    }

    /// A binary that runs the supervisor with no subcommand: its arguments
    /// are the supervisor's options (as `eretes-supervisor`'s are).
    pub fn binary(program: impl Into<PathBuf>) -> Self {
        SupervisorProgram {
            program: program.into(),
            args: Vec::new(),
        }
    }
}

/// If this process was started as a supervisor (its first argument is
/// [`SUBCOMMAND`]), run it and exit with its status; otherwise return at
/// once. Call it before anything else in `main` — before an async runtime
/// or logging starts, which a supervisor does not need.
pub fn run_if_invoked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(SUBCOMMAND)) {
        std::process::exit(main(args));
    }
}

/// The supervisor's `main`, given its arguments after [`SUBCOMMAND`]
/// (there are none: the run comes over the socket, [`wire::Launch`]). Its
/// stdin must be the agent's socket, its stdout and stderr the task's;
/// returns the exit status.
pub fn main(mut args: impl Iterator<Item = OsString>) -> i32 {
    let first = args.next();
    if first.as_deref() == Some(OsStr::new(fork_server::FORK_SERVER_ARG)) && args.next().is_none() {
        return match fork_server::serve() {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("eretes supervise --fork-server: {error}");
                1
            }
        };
    }
    if let Some(arg) = first {
        eprintln!(
            "eretes supervise: unexpected argument {arg:?}; the agent starts supervisors and sends them their runs"
        );
        return 2;
    }
    match supervise::supervise() {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("eretes supervise: {error}");
            1
        }
    }
}
