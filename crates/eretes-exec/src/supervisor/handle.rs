//! The agent's side of a supervisor: start it ahead of its run, launch the
//! run, push deadlines and stops to it, read how the run ended, keep it for
//! another run, and clean up if the supervisor itself died.

use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use eretes_runtime::FenceDeadline;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::gates::RunGate;
use super::spawner::{Spawner, SupervisorChild};
use super::wire::{exit_status, Cause, Launch, Order, Report, StreamEnd, MAX_OUTPUT_LINE};
use crate::leftovers::{self, GroupRecord, GroupRecords, RunMarker};
use crate::ExecConfig;

/// The longest a new supervisor may take to say that the task started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a supervisor whose run is over (it reported the end) may take
/// to exit before it is killed.
const EXIT_AFTER_END: Duration = Duration::from_secs(5);

/// How long a supervisor dropped before its end (the runtime gave up on
/// the handler: fenced, or a stop that ran past its grace) may take to
/// exit once its socket closed before it is killed, with what is left of
/// its tree. A live one kills the tree at once, and by then it has
/// usually done so already (at the fence deadline, or in the stop's
/// grace); one that is stopped (a task running as the agent's user can
/// SIGSTOP it) would never read the socket's end, and is killed as soon as
/// it is seen stopped ([`STOPPED_CHECK`]), since the runtime drops a
/// fenced handler halfway between the fence deadline and the earliest
/// expiry of the lease.
const EXIT_AFTER_DROP: Duration = Duration::from_secs(2);

/// How often a supervisor waited for is looked at for having exited or
/// being stopped.
const STOPPED_CHECK: Duration = Duration::from_millis(20);

/// How a supervised run ended, as the agent saw it.
#[derive(Debug)]
pub(crate) enum SupervisorEnd {
    /// The supervisor reported the end: the whole tree is gone.
    Ended {
        /// The leader's exit status.
        status: ExitStatus,
        /// Why it ended.
        cause: Cause,
        /// How its output streams ended (none if it had no logs).
        outputs: Vec<StreamEnd>,
    },
    /// The supervisor died without a report (this says how); the agent
    /// killed what it could find of the tree.
    Crashed(String),
}

/// One running supervisor.
///
/// Deadlines and the stop are written to it from [`Supervised::report`],
/// while it waits for the supervisor's next report: the run's own loop
/// (`ProcessHandler::attempt`) always waits there, and does its other work
/// (checkpoint saves) beside it, never instead of it, so nothing the
/// handler does delays them. (They were written by a task of each run's
/// own, which cost every running task about a kilobyte.)
pub(crate) struct Supervised {
    /// Until reaped.
    child: Option<SupervisorChild>,
    /// Its socket: reports in, orders out.
    socket: Socket,
    /// The deadline to forward as it moves.
    fence: FenceDeadline,
    /// The stop is sent once this fires (or [`Supervised::stop`] is called).
    cancel: CancellationToken,
    /// The stop was queued.
    stop_sent: bool,
    /// The task's leader: its pid, process group and session.
    leader: libc::pid_t,
    marker: RunMarker,
    /// Held until the supervisor is reaped or back for another run (its
    /// tree gone): the next run of the same task on this agent waits for it.
    gate: Option<RunGate>,
    /// The leader's process group in `<data-dir>/groups/`, for the next
    /// agent if this one dies; blanked once the supervisor is reaped.
    record: Option<GroupRecord>,
    /// An end reported in place of the start (fenced before it began);
    /// boxed, as it is rare and a run holds this struct while it idles.
    pending_end: Option<Box<Report>>,
    /// The output streams' ends, reported just before the end.
    outputs: Vec<StreamEnd>,
}

/// What a run needs besides its supervisor.
pub(crate) struct LaunchPlan {
    /// What to run.
    pub launch: Launch,
    /// Where to record the leader's process group.
    pub records: Arc<GroupRecords>,
    /// What marks the run's processes.
    pub marker: RunMarker,
    /// The deadline to forward as it moves.
    pub fence: FenceDeadline,
    /// Cancelled when the run is to stop.
    pub cancel: CancellationToken,
}

/// A supervisor started ahead of its run, waiting for its launch: its
/// start is then off the task's start path. Dropped unused, its socket
/// closes and it exits.
pub(crate) struct Warm {
    pub(super) child: SupervisorChild,
    socket: tokio::net::UnixStream,
}

impl Warm {
    /// A new supervisor from `spawner`, its stdin our socket.
    pub(super) fn spawn(spawner: &Spawner, config: &ExecConfig) -> std::io::Result<Warm> {
        let new = spawner.spawn(config)?;
        new.control.set_nonblocking(true)?;
        Ok(Warm {
            child: new.child,
            socket: tokio::net::UnixStream::from_std(new.control)?,
        })
    }
}

impl Supervised {
    /// Hand `plan`'s launch to the `warm` supervisor (then call `sent`),
    /// forward the fence deadline and a stop to it from then on, and wait
    /// until it started the task.
    pub(crate) async fn launch(
        warm: Warm,
        plan: LaunchPlan,
        gate: RunGate,
        sent: impl FnOnce(),
    ) -> std::io::Result<Supervised> {
        let Warm { child, socket } = warm;
        let (reader, mut writer) = socket.into_split();
        let written = writer.write_all(plan.launch.encode().as_bytes()).await;
        sent();
        // From here on, `report` forwards the deadline and the stop.
        let mut supervised = Supervised {
            child: Some(child),
            socket: Socket {
                reader: Some(reader),
                inbox: Vec::new(),
                read_closed: false,
                writer: Some(writer),
                outbox: Vec::new(),
            },
            fence: plan.fence,
            cancel: plan.cancel,
            stop_sent: false,
            leader: 0,
            marker: plan.marker,
            gate: Some(gate),
            record: None,
            pending_end: None,
            outputs: Vec::new(),
        };
        if let Err(error) = written {
            supervised.kill_supervisor();
            let status = supervised.reap().await;
            return Err(std::io::Error::other(format!(
                "the task's supervisor took no launch: {error} ({status})"
            )));
        }
        let first = tokio::time::timeout(START_TIMEOUT, supervised.report()).await;
        match first {
            Ok(Ok(Report::Started(leader))) => {
                supervised.leader = leader;
                // Recorded before anything else can happen to the run.
                match plan.records.record(leader) {
                    Ok(record) => supervised.record = Some(record),
                    Err(error) => warn!(%error, "cannot record the task's process group"),
                }
                Ok(supervised)
            }
            // Ended at once: fenced before it began. `finish` reads it.
            Ok(Ok(end @ Report::Ended { .. })) => {
                supervised.pending_end = Some(Box::new(end));
                Ok(supervised)
            }
            Ok(Ok(Report::Failed(text))) => {
                supervised.reap().await;
                Err(std::io::Error::other(text))
            }
            outcome => {
                let why = match outcome {
                    Ok(Ok(report)) => format!("said {report:?} first"),
                    Ok(Err(error)) => error,
                    Err(_) => format!("did not answer within {START_TIMEOUT:?}"),
                };
                supervised.kill_supervisor();
                let status = supervised.reap().await;
                Err(std::io::Error::other(format!(
                    "the task's supervisor did not start it: {why} ({status})"
                )))
            }
        }
    }

    /// The supervisor's next report (output streams' ends are kept for
    /// [`Supervised::finish`], not returned); an error once its socket
    /// closed or it said something it should not. Meanwhile, writes the
    /// fence deadline to the supervisor whenever it moves, and the stop
    /// once the run's cancel token fires. Cancel-safe: what was read or
    /// not yet written is kept for the next call.
    pub(crate) async fn report(&mut self) -> Result<Report, String> {
        if let Some(end) = self.pending_end.take() {
            return Ok(*end);
        }
        loop {
            if let Some(line) = self.socket.next_line()? {
                let report = match std::str::from_utf8(&line) {
                    Ok(line) => Report::decode(line),
                    Err(error) => Err(format!("its socket failed: {error}")),
                };
                match report {
                    Ok(Report::Output(end)) => self.outputs.push(end),
                    report => return report,
                }
                continue;
            }
            let ordering = self.socket.writer.is_some();
            let moves = self.fence.moves();
            // The socket is polled by hand, which keeps no state in this
            // future (the waits below keep theirs): a run idles here.
            let socket = &mut self.socket;
            tokio::select! {
                io = std::future::poll_fn(|cx| socket.poll_io(cx)) => io?,
                at = moved(&mut self.fence), if ordering && moves => {
                    self.order(&Order::Deadline(at.map(|at| at.boottime_ns)));
                }
                () = self.cancel.cancelled(), if ordering && !self.stop_sent => self.stop(),
            }
        }
    }

    /// Send the stop (SIGTERM, the grace period, SIGKILL) once; it goes out
    /// from [`Supervised::report`].
    pub(crate) fn stop(&mut self) {
        if !self.stop_sent {
            self.stop_sent = true;
            self.order(&Order::Stop);
        }
    }

    /// Queue `order` for the supervisor (nothing once its socket is closed).
    fn order(&mut self, order: &Order) {
        if self.socket.writer.is_some() {
            self.socket
                .outbox
                .extend_from_slice(order.encode().as_bytes());
        }
    }

    /// Wait for the supervisor's end report (ignoring anything else). Its
    /// tree is gone then. A supervisor that said it takes another run comes
    /// back, to be handed one ([`super::WarmPool::give_back`]), and the run's gate
    /// and record are let go at once; any other is reaped in the
    /// background, and they are held until it has exited.
    pub(crate) async fn finish(
        mut self,
        mut report: Result<Report, String>,
    ) -> (SupervisorEnd, Option<Warm>) {
        loop {
            match report {
                Ok(Report::Ended {
                    status,
                    cause,
                    again,
                }) => {
                    let end = SupervisorEnd::Ended {
                        status: exit_status(status),
                        cause,
                        outputs: std::mem::take(&mut self.outputs),
                    };
                    let warm = if again { self.take_back() } else { None };
                    if warm.is_none() {
                        // Its tree is gone: nothing of the task is left to stop it.
                        self.reap_later(EXIT_AFTER_END, false);
                    }
                    return (end, warm);
                }
                Ok(_) => report = self.report().await,
                Err(error) => return (self.crashed(error).await, None),
            }
        }
    }

    /// The supervisor back for another run, its run's gate and record let
    /// go; `None` if its socket is not as a new one's would be: closed,
    /// holding more than the end, or with orders not yet written (part of
    /// one may be, and the next launch would follow that part).
    fn take_back(&mut self) -> Option<Warm> {
        let socket = &mut self.socket;
        if socket.read_closed
            || !socket.inbox.is_empty()
            || !socket.outbox.is_empty()
            || socket.writer.is_none()
        {
            return None;
        }
        let child = self.child.take()?;
        let writer = socket.writer.take().expect("looked at above");
        let reader = socket.reader.take().expect("not closed");
        socket.read_closed = true;
        let socket = reader.reunite(writer).ok()?;
        self.release();
        Some(Warm { child, socket })
    }

    /// The supervisor died without reporting the end: its leader went with
    /// it (parent-death signal); kill the rest of the group and whatever
    /// still carries the run's identity, until nothing does (within a
    /// bound), and only then let another run of the task start here.
    async fn crashed(mut self, why: String) -> SupervisorEnd {
        self.kill_supervisor();
        let status = self.wait_supervisor().await;
        let killed = leftovers::kill_run(self.leader, &self.marker).await;
        warn!(task = %self.marker.task, epoch = self.marker.epoch, %status, %why, killed, "the task's supervisor died; its processes were killed");
        self.release();
        SupervisorEnd::Crashed(status)
    }

    fn kill_supervisor(&self) {
        if let Some(child) = &self.child {
            child.kill();
        }
    }

    /// Reap the supervisor; say how it ended. Releases the run's gate and
    /// record.
    async fn reap(&mut self) -> String {
        let status = self.wait_supervisor().await;
        self.release();
        status
    }

    /// Stop writing to the supervisor and wait for it to exit; how it ended.
    async fn wait_supervisor(&mut self) -> String {
        self.close_orders();
        match self.child.take() {
            Some(mut child) => match child.wait().await {
                Ok(status) => describe(status),
                Err(error) => format!("could not be waited for: {error}"),
            },
            None => "was reaped".into(),
        }
    }

    /// Let the next run of the task start here, and drop the run's record.
    fn release(&mut self) {
        self.gate = None;
        self.record = None;
    }
}

impl Supervised {
    /// Reap the supervisor in the background, then release the run's gate
    /// and record. One that has not exited `within` that is killed first,
    /// and so is whatever is left of the run's tree (as after a crash); with
    /// `stop_check`, also one seen stopped meanwhile. (Without it the wait
    /// is the SIGCHLD-driven one: every run's end takes this path.)
    fn reap_later(&mut self, within: Duration, stop_check: bool) {
        self.close_orders();
        let Some(mut child) = self.child.take() else {
            return;
        };
        let gate = self.gate.take();
        let record = self.record.take();
        let (leader, marker) = (self.leader, self.marker.clone());
        let reap = async move {
            let exited = if stop_check {
                tokio::time::timeout(within, async {
                    loop {
                        if child.has_exited() {
                            return true;
                        }
                        if child.is_stopped() {
                            return false;
                        }
                        tokio::time::sleep(STOPPED_CHECK).await;
                    }
                })
                .await
                .unwrap_or(false)
            } else {
                tokio::time::timeout(within, child.wait()).await.is_ok()
            };
            if !exited {
                child.kill();
                let _ = child.wait().await;
                let killed = leftovers::kill_run(leader, &marker).await;
                warn!(
                    task = %marker.task,
                    epoch = marker.epoch,
                    killed,
                    "the task's supervisor was stopped (by the task?), or did not exit within \
                     {within:?} of its run's end; it and the run's processes were killed"
                );
            }
            drop(gate);
            drop(record);
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap);
        }
    }
}

impl Supervised {
    /// Write no more orders: our end of the socket is shut for writing, and
    /// a supervisor whose run is not over kills the tree at once.
    fn close_orders(&mut self) {
        self.socket.writer = None;
        self.socket.outbox = Vec::new();
    }
}

/// The fence deadline once it moved. Its wait is boxed: a run idles in
/// [`Supervised::report`], and a fence that never moves (no lease: the
/// embedded store) is then not waited for at all, and takes no room.
async fn moved(fence: &mut FenceDeadline) -> Option<eretes_runtime::Deadline> {
    Box::pin(fence.changed()).await
}

/// A supervisor's socket, from the agent's side.
struct Socket {
    /// Where its reports come from; taken (and the socket counted as
    /// closed) when the supervisor goes back for another run.
    reader: Option<OwnedReadHalf>,
    /// What was read of a report line not complete yet: empty, with no
    /// capacity, between reports (a run keeps no read buffer while it
    /// idles).
    inbox: Vec<u8>,
    /// The socket said end of file.
    read_closed: bool,
    /// Where orders go; dropped (which closes our end of the socket, and
    /// the supervisor kills the tree) once the run is over, or when a
    /// write failed (the supervisor is gone: its end shows in the reports).
    writer: Option<OwnedWriteHalf>,
    /// Orders not written yet (empty, with no capacity, while none wait).
    outbox: Vec<u8>,
}

impl Socket {
    /// Write what orders wait, and read until a report line is complete,
    /// the socket ends or fails. Ready once there is something for
    /// [`Socket::next_line`] to look at. Cancel-safe: what was read or
    /// written is accounted for before it returns.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        while let Some(writer) = self.writer.as_mut().filter(|_| !self.outbox.is_empty()) {
            match Pin::new(writer).poll_write(cx, &self.outbox) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.outbox.drain(..n);
                    if self.outbox.is_empty() {
                        self.outbox = Vec::new();
                    }
                }
                Poll::Ready(_) => {
                    // The supervisor is gone; its end shows in the reports.
                    self.writer = None;
                    self.outbox = Vec::new();
                }
                Poll::Pending => break,
            }
        }
        // On the stack for this call only: nothing is kept between reads.
        let mut buffer = [0u8; REPORT_BUFFER];
        let Some(reader) = self.reader.as_mut() else {
            self.read_closed = true;
            return Poll::Ready(Ok(()));
        };
        loop {
            let mut read = ReadBuf::new(&mut buffer);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    let filled = read.filled();
                    self.inbox.extend_from_slice(filled);
                    if filled.contains(&b'\n') || self.inbox.len() > MAX_OUTPUT_LINE {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(error)) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Err(format!("its socket failed: {error}")))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The next complete report line read, if any (or the rest at the end
    /// of the stream); an error once the stream ended or a line grew
    /// longer than any report.
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, String> {
        if let Some(at) = self.inbox.iter().position(|&byte| byte == b'\n') {
            if at > MAX_OUTPUT_LINE {
                return Err("a report longer than any report".into());
            }
            let mut line: Vec<u8> = self.inbox.drain(..=at).collect();
            line.pop();
            if self.inbox.is_empty() {
                self.inbox = Vec::new();
            }
            return Ok(Some(line));
        }
        if self.inbox.len() > MAX_OUTPUT_LINE {
            return Err("a report longer than any report".into());
        }
        if self.read_closed {
            return match std::mem::take(&mut self.inbox) {
                line if line.is_empty() => Err("its socket closed".into()),
                line => Ok(Some(line)),
            };
        }
        Ok(None)
    }
}

impl Drop for Supervised {
    /// Dropped before its end (the runtime gave up on the handler): closing
    /// the socket's write side makes the supervisor kill the tree at once;
    /// one that does not exit is killed with the tree
    /// ([`EXIT_AFTER_DROP`]). The gate and the record are kept until then.
    fn drop(&mut self) {
        self.reap_later(EXIT_AFTER_DROP, true);
    }
}

/// "exited with code 3" or "was killed by signal 9".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".to_string(),
    }
}

/// How much of a supervisor's reports is read at a time (on the stack: a
/// line longer than this is read in several reads).
const REPORT_BUFFER: usize = 512;
