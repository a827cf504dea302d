//! How the agent creates a supervisor: forked by the agent's fork server
//! ([`super::fork_server`]) when it can, exec'd from the supervisor program
//! otherwise; either way a child of the agent, with a control socket.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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
                SupervisorChild::Spawned(child)
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
            // SAFETY: the AsyncFd owns the pidfd, which stays open and
            // the same until it is dropped.
            Ok((_pid, pidfd)) => {
                match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
                    Ok(pidfd) => {
                        *failures = 0;
                        return Some(SupervisorChild::Forked(Forked { pidfd: Some(pidfd) }));
                    }
                    // The supervisor exists; without a way to wait for it, it
                    // is left to exit when its control socket (dropped by the
                    // caller with this failure) closes.
                    Err(error) => std::io::Error::other(error.to_string()),
                }
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
    /// Exec'd by the agent.
    Spawned(Child),
    /// Forked by the fork server.
    Forked(Forked),
}

/// A supervisor the fork server made: waited for through its pidfd.
pub(crate) struct Forked {
    /// Until reaped.
    pidfd: Option<AsyncFd<OwnedFd>>,
}

/// `waitid`'s id type for a pidfd (Linux 5.4; not in the libc crate).
const P_PIDFD: libc::idtype_t = 3;

impl SupervisorChild {
    /// SIGKILL it (nothing once it was reaped: its pid may be another's).
    pub(crate) fn kill(&self) {
        match self {
            SupervisorChild::Spawned(child) => {
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) has no memory-safety preconditions; the
                    // child is not reaped yet, so its pid is still its own.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            SupervisorChild::Forked(forked) => {
                if let Some(pidfd) = &forked.pidfd {
                    // SAFETY: pidfd_send_signal on a pidfd we own; it names
                    // this process only, even after it ended.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            pidfd.get_ref().as_raw_fd(),
                            libc::SIGKILL,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        )
                    };
                }
            }
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
        let Some(pidfd) = &self.pidfd else {
            return Err(std::io::Error::other("it was reaped already"));
        };
        let status = wait_for_exit(pidfd).await?;
        self.pidfd = None;
        Ok(status)
    }

    /// Reap it if it exited: its status, or `None` while it runs.
    fn try_reap(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(pidfd) = &self.pidfd else {
            return Err(std::io::Error::other("it was reaped already"));
        };
        let status = reap(pidfd.get_ref())?;
        if status.is_some() {
            self.pidfd = None;
        }
        Ok(status)
    }
}

/// Wait until the child `pidfd` names exits, and reap it.
async fn wait_for_exit(pidfd: &AsyncFd<OwnedFd>) -> std::io::Result<ExitStatus> {
    loop {
        // A pidfd is readable once its process has exited.
        let mut ready = pidfd.readable().await?;
        if let Some(status) = reap(pidfd.get_ref())? {
            return Ok(status);
        }
        ready.clear_ready();
    }
}

/// Reap the child `pidfd` names if it exited: its status, or `None` while
/// it runs.
fn reap(pidfd: &OwnedFd) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a pidfd of our own child, writing `info`.
    let rc = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid set si_pid (0 while the child runs) and si_status.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // Back to a raw wait status: the exit code in the second byte, or the signal.
    let raw = if info.si_code == libc::CLD_EXITED {
        (status & 0xff) << 8
    } else {
        status & 0x7f
    };
    Ok(Some(std::os::unix::process::ExitStatusExt::from_raw(raw)))
}

impl Drop for Forked {
    /// Never leave a zombie: one dropped before it was reaped is waited for
    /// in the background (it exits once its control socket closes).
    fn drop(&mut self) {
        // (The task holds the pidfd alone: should the runtime drop it
        // unrun, as one shutting down does, nothing is spawned again.)
        if let Some(pidfd) = self.pidfd.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = wait_for_exit(&pidfd).await;
                });
            }
        }
    }
}
