//! How the agent creates a supervisor: forked by the agent's fork server
//! ([`super::fork_server`]) when it can, exec'd from the supervisor program
//! otherwise; either way a child of the agent, with a control socket.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::fork_server::{self, ANSWER_TIMEOUT, FORK_SERVER_ARG};
use crate::{ExecConfig, AGENT_DIR_ENV};

/// `PATH` for tasks when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Failed requests in a row after which the fork server is given up on
/// (every later supervisor is exec'd).
const FORK_SERVER_FAILURES: u32 = 3;

/// A new supervisor, waiting for its launch on `control`.
pub(crate) struct NewSupervisor {
    /// The process.
    pub child: SupervisorChild,
    /// The agent's end of its control socket.
    pub control: std::os::unix::net::UnixStream,
}

/// Creates supervisors for one agent.
#[derive(Default)]
pub(crate) struct Spawner {
    fork_server: Mutex<ForkServer>,
}

#[derive(Default)]
enum ForkServer {
    /// Started on the first request (after the agent killed what a
    /// previous agent left: the fork server carries the same marker).
    #[default]
    NotStarted,
    Running {
        socket: OwnedFd,
        /// Killed when dropped.
        _process: Child,
        /// Requests that failed in a row.
        failures: u32,
    },
    /// Refused or failed too often: supervisors are exec'd.
    Unavailable,
}

impl Spawner {
    /// A new supervisor for `config`'s tasks.
    pub(crate) fn spawn(&self, config: &ExecConfig) -> std::io::Result<NewSupervisor> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let child = match self.fork(config, theirs.as_fd()) {
            Some(child) => child,
            None => {
                // A new pair: a fork server that answered too late may
                // have made a supervisor on the first one after all, which
                // must not share this one's socket (it reads the end of
                // the first and exits).
                drop((ours, theirs));
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
                let mut command = supervisor_command(config, None);
                // Its stderr is the agent's, for its own errors.
                command
                    .stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                let child = command.spawn()?;
                // The command holds the supervisor's ends, which must close
                // when the supervisor dies: no copy may stay here.
                drop(command);
                return Ok(NewSupervisor {
                    child: SupervisorChild::Spawned(Box::new(child)),
                    control: ours,
                });
            }
        };
        Ok(NewSupervisor {
            child,
            control: ours,
        })
    }

    /// Ask the fork server (started if need be) for a supervisor; `None`
    /// if there is none to ask or it failed (then the caller execs one).
    fn fork(
        &self,
        config: &ExecConfig,
        control: std::os::fd::BorrowedFd<'_>,
    ) -> Option<SupervisorChild> {
        let mut server = self.fork_server.lock().expect("not poisoned");
        if matches!(*server, ForkServer::NotStarted) {
            *server = match start_fork_server(config) {
                Ok(started) => started,
                Err(error) => {
                    warn!(%error, "cannot start the fork server; supervisors are exec'd");
                    ForkServer::Unavailable
                }
            };
        }
        let ForkServer::Running {
            socket, failures, ..
        } = &mut *server
        else {
            return None;
        };
        let error = match fork_server::request(socket.as_raw_fd(), control) {
            Ok(pid) => {
                *failures = 0;
                return Some(SupervisorChild::Forked(Forked { pid: Some(pid) }));
            }
            Err(error) => error,
        };
        *failures += 1;
        let refused = matches!(
            error.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL)
        );
        if refused || *failures >= FORK_SERVER_FAILURES {
            warn!(%error, "the fork server cannot fork supervisors; they are exec'd from now on");
            *server = ForkServer::Unavailable;
        } else {
            // A stuck or dead one is replaced by the next request.
            warn!(%error, "the fork server failed; starting another for the next run");
            *server = ForkServer::NotStarted;
        }
        None
    }
}

/// Start the fork server: the supervisor program with [`FORK_SERVER_ARG`].
fn start_fork_server(config: &ExecConfig) -> std::io::Result<ForkServer> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two new descriptors that nothing else owns.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let timeout = libc::timeval {
        tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the size given.
    if unsafe {
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let mut command = supervisor_command(config, Some(FORK_SERVER_ARG));
    command
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let process = command.spawn()?;
    drop(command);
    info!(pid = process.id(), "started the supervisors' fork server");
    Ok(ForkServer::Running {
        socket: ours,
        _process: process,
        failures: 0,
    })
}

/// The supervisor program as `config` says, with `extra` after its
/// arguments, its environment the one tasks get — `PATH`, `HOME` and `LANG`
/// of the agent's, the variables `config.pass_env` names, and the data
/// directory's marker; nothing else of the agent's (no secret, no stray API
/// key).
fn supervisor_command(config: &ExecConfig, extra: Option<&str>) -> Command {
    let program = &config.supervisor;
    let mut command = Command::new(&program.program);
    command.args(&program.args).args(extra).env_clear();
    let passed = ["PATH", "HOME", "LANG"]
        .into_iter()
        .chain(config.pass_env.iter().map(String::as_str));
    for name in passed {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    command
        .env(AGENT_DIR_ENV, &config.data_dir)
        // Not in the agent's group: a signal to that group (Ctrl-C on a
        // terminal, `kill -- -PGID`) reaches the agent, which drains, and
        // not every supervisor at once.
        .process_group(0)
        .kill_on_drop(false);
    command
}

/// A supervisor process, the agent's child either way.
pub(crate) enum SupervisorChild {
    /// Exec'd by the agent (boxed: a `Child` is some 160 bytes, and every
    /// running task holds this while it idles; most supervisors are forked).
    Spawned(Box<Child>),
    /// Forked by the fork server.
    Forked(Forked),
}

/// A supervisor the fork server made. Its pid names it until the agent
/// reaps it (a child's pid is not reused before then), so no descriptor is
/// held for it: a running task costs the agent one descriptor, its
/// supervisor's socket.
pub(crate) struct Forked {
    /// `None` once reaped.
    pid: Option<libc::pid_t>,
}

/// How often a wait looks again without a SIGCHLD (one can be missed only
/// if signal handling failed to start).
const REAP_FALLBACK: Duration = Duration::from_millis(100);

impl SupervisorChild {
    /// Its pid, until it is reaped.
    fn pid(&self) -> Option<libc::pid_t> {
        match self {
            SupervisorChild::Spawned(child) => child.id().map(|pid| pid as libc::pid_t),
            SupervisorChild::Forked(forked) => forked.pid,
        }
    }

    /// Whether it is stopped (SIGSTOP, or traced): it acts on nothing until
    /// continued.
    pub(crate) fn is_stopped(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // The state follows the command name, which may hold anything but
        // ends at the last ')'.
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    }

    /// SIGKILL it (nothing once it was reaped: its pid may be another's).
    pub(crate) fn kill(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) has no memory-safety preconditions; the child
            // is not reaped yet, so its pid is still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Wait for it to exit, and reap it.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            SupervisorChild::Spawned(child) => child.wait().await,
            SupervisorChild::Forked(forked) => forked.wait().await,
        }
    }

    /// Whether it has exited (reaping it if so).
    pub(crate) fn has_exited(&mut self) -> bool {
        match self {
            SupervisorChild::Spawned(child) => !matches!(child.try_wait(), Ok(None)),
            SupervisorChild::Forked(forked) => !matches!(forked.try_reap(), Ok(None)),
        }
    }
}

impl Forked {
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let Some(pid) = self.pid else {
            return Err(std::io::Error::other("it was reaped already"));
        };
        let status = wait_for_exit(pid).await?;
        self.pid = None;
        Ok(status)
    }

    /// Reap it if it exited: its status, or `None` while it runs.
    fn try_reap(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(pid) = self.pid else {
            return Err(std::io::Error::other("it was reaped already"));
        };
        let status = reap(pid)?;
        if status.is_some() {
            self.pid = None;
        }
        Ok(status)
    }
}

/// Wait until child `pid` exits, and reap it: looked at on every SIGCHLD
/// the agent gets (a wait starts only once the supervisor reported its end
/// or its socket closed, so few wait at once).
async fn wait_for_exit(pid: libc::pid_t) -> std::io::Result<ExitStatus> {
    // Registered before the first look: an exit after it is not missed.
    let mut exits = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
    loop {
        if let Some(status) = reap(pid)? {
            return Ok(status);
        }
        match &mut exits {
            Some(exits) => {
                let _ = tokio::time::timeout(REAP_FALLBACK, exits.recv()).await;
            }
            None => tokio::time::sleep(REAP_FALLBACK).await,
        }
    }
}

/// Wait until child `pid` exits, and reap it, blocking the thread.
pub(super) fn reap_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid writes one int, which `status` is.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
}

/// Reap child `pid` if it exited: its status, or `None` while it runs.
fn reap(pid: libc::pid_t) -> std::io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int, which `status` is.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == pid {
            return Ok(Some(std::os::unix::process::ExitStatusExt::from_raw(
                status,
            )));
        }
        if reaped == 0 {
            return Ok(None);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

impl Drop for Forked {
    /// Never leave a zombie: one dropped before it was reaped is waited for
    /// in the background (it exits once its control socket closes).
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        let _ = wait_for_exit(pid).await;
                    });
                }
                // No runtime to wait in (a pool dropped after it): a thread
                // waits instead.
                Err(_) => {
                    std::thread::spawn(move || reap_blocking(pid));
                }
            }
        }
    }
}
