//! The supervisor process itself: one task leader, one socket to the agent,
//! five file descriptors to wait on (the socket, a signalfd for SIGCHLD and
//! stop signals, a `CLOCK_BOOTTIME` timerfd for the deadline, and the
//! task's stdout and stderr pipes) and no async runtime.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use eretes_runtime::boottime_ns;

use super::leader::{self, ChildStack, LeaderSpec};
use super::streams::TaskStreams;
use super::tree::signal_tree;
use super::wire::{Cause, Launch, Order, Report, MAX_LAUNCH, MAX_LINE};

/// How often the tree is looked for and SIGKILLed again while it dies: a
/// process forked between two looks is found by the next.
const KILL_RESCAN: Duration = Duration::from_millis(50);

/// How long the output may stay open after the tree is gone: only a
/// process outside it (one the task handed its pipe to) can still hold it.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Wait for a run to launch, then supervise it until every process of its
/// tree is gone; again for as long as the agent hands this process runs
/// ([`Launch::again`]).
pub(crate) fn supervise() -> std::io::Result<()> {
    // SAFETY: fd 0 is the agent's end of the socket, handed to this process
    // as its stdin; nothing else in this process uses fd 0.
    let control = unsafe { UnixStream::from_raw_fd(0) };
    // Whether SIGTERM stops the run: not if it was ignored when the agent
    // started this process (SIGINT and SIGHUP never do: a terminal's
    // hang-up or Ctrl-C is the agent's business, which drains).
    let term_stops = !inherited_ignore(libc::SIGTERM);
    // This process writes the task's logs: one past a file-size limit must
    // fail the write (reported), not kill the supervisor and so the task.
    // (The task gets the default action back before its exec.)
    // SAFETY: signal(2) with SIG_IGN installs no handler.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // Blocked before the task exists, so that no SIGCHLD is missed (the
    // task gets an empty mask back before its exec, below).
    let signals =
        SignalFd::block_and_open(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let timer = BootTimer::new()?;
    let mut holder = Holder {
        control,
        signals,
        timer,
        term_stops,
        // SAFETY: getpid(2) has no preconditions.
        me: unsafe { libc::getpid() },
        carried: Vec::new(),
        child_stack: ChildStack::new()?,
    };
    loop {
        // Started ahead of its run: wait for it (the agent's end closing
        // first means it was not needed, or no more runs come).
        let carried = std::mem::take(&mut holder.carried);
        let (launch, pending) = match read_launch(&mut holder.control, carried)? {
            Some(Ok(launched)) => launched,
            Some(Err(error)) => {
                let _ = holder
                    .control
                    .write_all(Report::Failed(error).encode().as_bytes());
                return Ok(());
            }
            None => return Ok(()),
        };
        // A signal that came while no run was here is not this run's (a
        // SIGTERM to an idle supervisor stops nothing).
        holder.signals.drain_stop_signal(false);
        holder.timer.clear();
        if !holder.run(launch, &pending)? {
            return Ok(());
        }
        // What the run allocated is free again: the pages it can, the heap
        // gives back (halving what a reused supervisor's heap holds; its
        // stack's deepest pages stay, BENCHMARKS.md).
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim takes a plain integer, and locks the
        // allocator's arenas itself.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// What a supervisor keeps from one run to the next.
struct Holder {
    /// The agent's socket.
    control: UnixStream,
    /// SIGCHLD and the stop signals.
    signals: SignalFd,
    /// The deadline's timer.
    timer: BootTimer,
    /// Whether SIGTERM to this process stops the run.
    term_stops: bool,
    me: libc::pid_t,
    /// What was read of an order line when the last run ended.
    carried: Vec<u8>,
    /// Where the leader's start runs.
    child_stack: ChildStack,
}

impl Holder {
    /// Start `launch` (with the orders read behind it), supervise it until
    /// its tree is gone, and report its end. True if this process takes
    /// another run.
    fn run(&mut self, launch: Launch, pending: &[u8]) -> std::io::Result<bool> {
        let control = &mut self.control;
        let deadline = (launch.deadline_ns != 0).then_some(launch.deadline_ns);
        if deadline.is_some_and(|at| at <= boottime_ns()) {
            // Fenced before it began: nothing is started.
            let report = Report::Ended {
                status: 0,
                cause: Cause::Fenced,
                again: launch.again,
            };
            // Orders read behind the launch may end in part of one.
            self.carried = pending.to_vec();
            let sent = control.write_all(report.encode().as_bytes()).is_ok();
            return Ok(sent && launch.again);
        }
        let me = self.me;
        // The task's output: pipes into its logs, or nowhere.
        let (mut streams, outputs) = match launch.logs.as_ref().map(TaskStreams::open).transpose() {
            Ok(Some((streams, stdout, stderr))) => (Some(streams), Some((stdout, stderr))),
            Ok(None) => (None, None),
            Err(error) => {
                let text = format!("cannot make the task's output pipes: {error}");
                let _ = control.write_all(Report::Failed(text).encode().as_bytes());
                return Ok(false);
            }
        };
        // This process's environment, with the run's additions.
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        for (name, value) in &launch.env {
            env.insert(name.into(), OsStr::from_bytes(value).into());
        }
        if let Some(user) = &launch.run_as {
            for (name, value) in [
                ("HOME", &user.home),
                ("USER", &user.name),
                ("LOGNAME", &user.name),
            ] {
                env.insert(name.into(), value.into());
            }
        }
        let spawned = leader::spawn(
            LeaderSpec {
                program: &launch.program,
                args: &launch.args,
                env,
                cwd: launch.cwd.as_deref(),
                stdout: outputs.as_ref().map(|(stdout, _)| stdout.as_raw_fd()),
                stderr: outputs.as_ref().map(|(_, stderr)| stderr.as_raw_fd()),
                open_files: launch.open_files,
                identity: launch
                    .run_as
                    .as_ref()
                    .map(|user| (user.uid, user.gid, user.groups.as_slice())),
            },
            &mut self.child_stack,
        );
        // This process's copies of the pipes' write ends: the streams end
        // only once no copy is left.
        drop(outputs);
        let leader = match spawned {
            Ok(pid) => pid,
            Err(error) => {
                // The reason only: the agent's message names the program. A
                // working directory that cannot be entered fails the spawn as
                // a missing program would: say which it was.
                let text = match launch.cwd.as_ref().map(std::fs::metadata) {
                    Some(Err(cwd_error)) => format!(
                        "its working directory {:?}: {cwd_error}",
                        launch.cwd.as_ref().expect("just read")
                    ),
                    Some(Ok(metadata)) if !metadata.is_dir() => format!(
                        "its working directory {:?} is not a directory",
                        launch.cwd.as_ref().expect("just read")
                    ),
                    _ => error.to_string(),
                };
                let _ = control.write_all(Report::Failed(text).encode().as_bytes());
                return Ok(false);
            }
        };
        // The agent may be gone already; the socket's end says so below.
        let _ = control.write_all(Report::Started(leader).encode().as_bytes());
        let mut run = Run {
            me,
            leader,
            status: None,
            cause: Cause::Exited,
            deadline,
            grace: Duration::from_millis(launch.grace_ms),
            term_stops: self.term_stops,
            kill_at: None,
            killing: false,
            last_scan: Instant::now(),
            control_open: true,
            pending: Vec::new(),
            discarding: false,
        };
        // Orders the agent sent right behind the launch.
        run.take_orders(pending);
        if let Err(error) = run.watch(control, &self.signals, &self.timer, streams.as_mut()) {
            // Never leave while the tree lives, whatever failed.
            run.kill_and_reap();
            return Err(error);
        }
        if !run.control_open {
            return Ok(false);
        }
        self.carried = std::mem::take(&mut run.pending);
        let mut reports = String::new();
        // Nothing of the run may outlive it here if another is to come:
        // a log writer that did not finish still holds its logs.
        let mut again = launch.again;
        if let Some(mut streams) = streams.take() {
            streams.drain(OUTPUT_DRAIN);
            let (ends, finished) = streams.ends(OUTPUT_DRAIN);
            again &= finished;
            for end in ends {
                reports.push_str(&Report::Output(end).encode());
            }
        }
        let end = Report::Ended {
            status: run.status.unwrap_or(0),
            cause: run.cause,
            again,
        };
        reports.push_str(&end.encode());
        let sent = control.write_all(reports.as_bytes()).is_ok();
        Ok(sent && again)
    }
}

/// Whether `signal` was ignored (SIG_IGN) when this process started.
fn inherited_ignore(signal: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one
    // into `current`, a plain-data struct.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// One supervised run.
struct Run {
    me: libc::pid_t,
    leader: libc::pid_t,
    /// The leader's wait status, once reaped.
    status: Option<i32>,
    cause: Cause,
    /// The fencing deadline on CLOCK_BOOTTIME.
    deadline: Option<u64>,
    grace: Duration,
    /// Whether SIGTERM to this process stops the run.
    term_stops: bool,
    /// When a stop's grace period ends (CLOCK_BOOTTIME).
    kill_at: Option<u64>,
    /// SIGKILLing the tree until nothing of it is left.
    killing: bool,
    /// When the tree was last looked for.
    last_scan: Instant,
    control_open: bool,
    /// Bytes of an order not yet ended by a newline.
    pending: Vec<u8>,
    /// Skipping the rest of an order line that was too long.
    discarding: bool,
}

impl Run {
    /// Wait on the socket, signals, the timer and the task's output until
    /// no child is left.
    fn watch(
        &mut self,
        control: &mut UnixStream,
        signals: &SignalFd,
        timer: &BootTimer,
        mut streams: Option<&mut TaskStreams>,
    ) -> std::io::Result<()> {
        loop {
            if self.reap() {
                return Ok(());
            }
            self.check_deadlines();
            if self.killing && self.last_scan.elapsed() >= KILL_RESCAN {
                // On a schedule, however busy the loop is: a process forked
                // between two looks is found by the next.
                self.signal_tree(libc::SIGKILL);
            }
            let wake = if self.killing {
                None
            } else {
                [self.deadline, self.kill_at].into_iter().flatten().min()
            };
            timer.arm(wake)?;
            let [stdout, stderr] = streams
                .as_ref()
                .map_or([-1, -1], |streams| streams.poll_fds());
            let mut fds = [
                poll_in(if self.control_open {
                    control.as_raw_fd()
                } else {
                    -1
                }),
                poll_in(signals.fd.as_raw_fd()),
                poll_in(timer.fd.as_raw_fd()),
                poll_in(stdout),
                poll_in(stderr),
            ];
            let mut timeout = if self.killing {
                let left = KILL_RESCAN.saturating_sub(self.last_scan.elapsed());
                left.as_millis() as libc::c_int + 1
            } else {
                -1
            };
            // Output waits for room in the log writer's queue: look again soon.
            let waiting = streams.as_ref().is_some_and(|streams| streams.waiting());
            if waiting {
                let retry = super::streams::RETRY.as_millis() as libc::c_int;
                timeout = if timeout < 0 {
                    retry
                } else {
                    timeout.min(retry)
                };
            }
            // SAFETY: `fds` is an array of initialised pollfd of the length given.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            // A deadline that passed while this process was not scheduled
            // (stopped, or the machine suspended) is acted on before any
            // order that would move it.
            self.check_deadlines();
            if fds[0].revents != 0 {
                self.read_orders(control);
            }
            if fds[1].revents != 0 && signals.drain_stop_signal(self.term_stops) {
                self.begin_stop();
            }
            if fds[2].revents != 0 {
                timer.clear();
            }
            if waiting || fds[3].revents != 0 || fds[4].revents != 0 {
                if let Some(streams) = streams.as_deref_mut() {
                    streams.read_ready();
                }
            }
        }
    }

    /// Fence if the deadline passed; kill if a stop's grace period ended.
    fn check_deadlines(&mut self) {
        let now = boottime_ns();
        if self.status.is_none() && !self.killing && self.deadline.is_some_and(|at| at <= now) {
            // Fenced: the lease may expire soon; no grace period.
            self.cause = Cause::Fenced;
            self.kill();
        }
        if self.kill_at.is_some_and(|at| at <= now) {
            self.kill();
        }
    }

    /// Reap every child that ended. True once no child is left, which for
    /// a subreaper means no process of the tree exists any more (a
    /// descendant whose parent dies becomes this process's child).
    fn reap(&mut self) -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes one int, which `status` is.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                if pid == self.leader {
                    self.status = Some(status);
                }
                continue;
            }
            if pid == 0 {
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // ECHILD: no child at all.
                _ => return true,
            }
        }
        if self.status.is_some() {
            // KillMode=control-group: nothing outlives the task's main
            // process. (A leader that left no child needs no search.)
            self.kill();
        }
        false
    }

    /// Send `signal` to the whole tree: every descendant, and the leader's
    /// group while the leader is not reaped (until then its pid, and so the
    /// group's id, cannot be another process's).
    fn signal_tree(&mut self, signal: libc::c_int) {
        let group = if self.status.is_none() {
            self.leader
        } else {
            0
        };
        signal_tree(self.me, group, signal);
        self.last_scan = Instant::now();
    }

    fn kill(&mut self) {
        if !self.killing {
            self.killing = true;
            self.signal_tree(libc::SIGKILL);
        }
    }

    /// When the loop cannot go on: kill the tree and reap it, blocking.
    fn kill_and_reap(&mut self) {
        self.killing = true;
        loop {
            self.signal_tree(libc::SIGKILL);
            let mut status = 0;
            // SAFETY: waitpid writes one int, which `status` is.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid == self.leader {
                self.status = Some(status);
            }
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }

    /// SIGTERM the tree; SIGKILL it when the grace period ends.
    fn begin_stop(&mut self) {
        if self.killing || self.kill_at.is_some() {
            return;
        }
        if self.status.is_none() {
            self.cause = Cause::Stopped;
        }
        if self.grace.is_zero() {
            self.kill();
            return;
        }
        self.signal_tree(libc::SIGTERM);
        let grace = u64::try_from(self.grace.as_nanos()).unwrap_or(u64::MAX);
        self.kill_at = Some(boottime_ns().saturating_add(grace));
    }

    /// Read what the agent sent; its end closing kills the tree at once.
    fn read_orders(&mut self, control: &mut UnixStream) {
        let mut buffer = [0u8; 1024];
        let read = match control.read(&mut buffer) {
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if read == 0 {
            // The agent is gone (killed, or it dropped this run).
            self.control_open = false;
            if self.status.is_none() {
                self.cause = Cause::Stopped;
            }
            self.kill();
            return;
        }
        self.take_orders(&buffer[..read]);
    }

    /// Apply every whole order line in what was read so far.
    fn take_orders(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if std::mem::take(&mut self.discarding) {
                // The end of a line too long to be an order.
                continue;
            }
            let order = std::str::from_utf8(&line[..end])
                .map_err(|_| "not UTF-8".to_string())
                .and_then(Order::decode);
            match order {
                Ok(Order::Deadline(at)) => {
                    // A deadline that passed is final: a later renewal
                    // cannot bring back what may already run elsewhere.
                    self.check_deadlines();
                    if !self.killing {
                        self.deadline = at;
                    }
                }
                Ok(Order::Stop) => self.begin_stop(),
                // Only the agent writes here; a line it did not mean is
                // dropped rather than guessed at.
                Err(_) => {}
            }
        }
        if self.pending.len() > MAX_LINE {
            self.pending.clear();
            self.discarding = true;
        }
    }
}

/// Read the launch line, after `line` (what was read past the last run's
/// orders); `None` if the socket closed first. Returns the bytes read past
/// it too (orders sent right behind it). Orders before it are dropped:
/// they were for a run that ended before they came.
#[allow(clippy::type_complexity)]
fn read_launch(
    control: &mut UnixStream,
    mut line: Vec<u8>,
) -> std::io::Result<Option<Result<(Launch, Vec<u8>), String>>> {
    let mut buffer = [0u8; 8192];
    loop {
        while let Some(end) = line.iter().position(|&byte| byte == b'\n') {
            let rest = line.split_off(end + 1);
            line.truncate(end);
            let text = std::str::from_utf8(&line);
            if text.is_ok_and(|text| Order::decode(text).is_ok()) {
                line = rest;
                continue;
            }
            let launch = text
                .map_err(|_| "the launch is not UTF-8".to_string())
                .and_then(Launch::decode);
            return Ok(Some(launch.map(|launch| (launch, rest))));
        }
        if line.len() > MAX_LAUNCH {
            return Ok(Some(Err(format!(
                "the launch is longer than {MAX_LAUNCH} bytes"
            ))));
        }
        let read = match control.read(&mut buffer) {
            Ok(0) => return Ok(None),
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        line.extend_from_slice(&buffer[..read]);
    }
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// A signalfd for signals this process blocks.
struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    fn block_and_open(signals: &[libc::c_int]) -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset/sigaddset write the set they are given;
        // sigprocmask reads it (this process has one thread).
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            for &signal in signals {
                libc::sigaddset(&mut set, signal);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Read every pending signal; true if one asks this process to stop:
    /// SIGTERM, if `term_stops` (SIGCHLD only wakes the loop, which reaps;
    /// SIGINT and SIGHUP are dropped).
    fn drain_stop_signal(&self, term_stops: bool) -> bool {
        let mut stop = false;
        loop {
            // SAFETY: signalfd_siginfo is plain data; read fills it whole or not at all.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most `size` bytes into `info`.
            let read = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if read != size as isize {
                return stop;
            }
            stop |= term_stops && info.ssi_signo == libc::SIGTERM as u32;
        }
    }
}

/// A one-shot timer on CLOCK_BOOTTIME, armed at absolute instants.
struct BootTimer {
    fd: OwnedFd,
}

impl BootTimer {
    fn new() -> std::io::Result<BootTimer> {
        // SAFETY: timerfd_create takes plain integers.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_BOOTTIME, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: timerfd_create returned a new descriptor that nothing else owns.
        Ok(BootTimer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fire at `at` (nanoseconds of CLOCK_BOOTTIME), or never.
    fn arm(&self, at: Option<u64>) -> std::io::Result<()> {
        // An instant of 0 disarms the timer; an instant in the past fires at once.
        let at = at.map_or(0, |at| at.max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consume an expiry, so the descriptor is no longer readable.
    fn clear(&self) {
        let mut expirations = 0u64;
        // SAFETY: reads at most 8 bytes into a u64.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut expirations as *mut u64).cast(),
                8,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch_line(program: &str) -> String {
        Launch {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            grace_ms: 0,
            deadline_ns: 0,
            run_as: None,
            open_files: None,
            logs: None,
            again: true,
        }
        .encode()
    }

    #[test]
    fn orders_for_a_run_that_ended_are_dropped_before_the_next_launch() {
        let (mut agent, mut supervisor) = UnixStream::pair().unwrap();
        // The end of an order the last run read half of, two whole ones
        // that crossed its end report, the launch, and an order for it.
        let carried = b"deadline 12".to_vec();
        let sent = format!("34\nstop\ndeadline 0\n{}deadline 99\n", launch_line("true"));
        agent.write_all(sent.as_bytes()).unwrap();
        let (launch, rest) = read_launch(&mut supervisor, carried)
            .unwrap()
            .expect("a launch")
            .expect("a good one");
        assert_eq!(launch.program, "true");
        assert_eq!(rest, b"deadline 99\n");
    }

    #[test]
    fn anything_else_before_a_launch_is_refused_and_an_end_is_none() {
        let (mut agent, mut supervisor) = UnixStream::pair().unwrap();
        agent.write_all(b"hello\n").unwrap();
        let refused = read_launch(&mut supervisor, Vec::new()).unwrap().unwrap();
        assert!(refused.is_err(), "{refused:?}");
        agent.write_all(b"stop\n").unwrap();
        drop(agent);
        assert!(read_launch(&mut supervisor, Vec::new()).unwrap().is_none());
    }
}
