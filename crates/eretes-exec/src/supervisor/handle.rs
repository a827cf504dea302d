//! The agent's side of a supervisor: start it ahead of its run, launch the
//! run, push deadlines and stops to it, read how the run ended, and clean
//! up if the supervisor itself died.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eretes_runtime::FenceDeadline;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::spawner::{Spawner, SupervisorChild};
use super::wire::{exit_status, Cause, Launch, Order, Report, StreamEnd, MAX_OUTPUT_LINE};
use crate::leftovers::{self, GroupRecord, GroupRecords, RunMarker};
use crate::ExecConfig;

/// The longest a new supervisor may take to say that the task started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
pub(crate) struct Supervised {
    /// Until reaped.
    child: Option<SupervisorChild>,
    reports: Lines<BufReader<OwnedReadHalf>>,
    /// The task that writes to the supervisor (deadlines and the stop,
    /// which so never wait for the handler's loop); aborting it closes our
    /// end of the socket, and the supervisor kills the tree.
    forwarder: Option<AbortHandle>,
    /// The task's leader: its pid, process group and session.
    leader: libc::pid_t,
    marker: RunMarker,
    /// Held until the supervisor is reaped: the next run of the same task
    /// on this agent waits for it.
    gate: Option<OwnedMutexGuard<()>>,
    /// The leader's process group in `<data-dir>/groups/`, for the next
    /// agent if this one dies; blanked once the supervisor is reaped.
    record: Option<GroupRecord>,
    /// An end reported in place of the start (fenced before it began).
    pending_end: Option<Report>,
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

/// Write the fence deadline whenever it moves, and a stop once `cancel`
/// fires, to the supervisor. Runs as a task of its own, so that nothing the
/// handler does (a slow checkpoint save) delays them.
async fn forward(mut writer: OwnedWriteHalf, mut fence: FenceDeadline, cancel: CancellationToken) {
    let mut stopped = false;
    loop {
        let order = tokio::select! {
            at = fence.changed() => Order::Deadline(at.map(|at| at.boottime_ns)),
            _ = cancel.cancelled(), if !stopped => {
                stopped = true;
                Order::Stop
            }
        };
        if writer.write_all(order.encode().as_bytes()).await.is_err() {
            // The supervisor is gone; its end shows in the reports.
            return;
        }
    }
}

/// A supervisor started ahead of its run, waiting for its launch: its
/// start is then off the task's start path. Dropped unused, its socket
/// closes and it exits.
pub(crate) struct Warm {
    child: SupervisorChild,
    socket: tokio::net::UnixStream,
}

impl Warm {
    /// A new supervisor from `spawner`, its stdin our socket.
    fn spawn(spawner: &Spawner, config: &ExecConfig) -> std::io::Result<Warm> {
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
        gate: OwnedMutexGuard<()>,
        sent: impl FnOnce(),
    ) -> std::io::Result<Supervised> {
        let Warm { child, socket } = warm;
        let (reader, mut writer) = socket.into_split();
        let written = writer.write_all(plan.launch.encode().as_bytes()).await;
        sent();
        let forwarder = tokio::spawn(forward(writer, plan.fence, plan.cancel)).abort_handle();
        let mut supervised = Supervised {
            child: Some(child),
            // Reports are short lines, and a run keeps this buffer for its
            // whole life: not the default 8 KiB.
            reports: BufReader::with_capacity(REPORT_BUFFER, reader).lines(),
            forwarder: Some(forwarder),
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
                supervised.pending_end = Some(end);
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
    /// closed or it said something it should not. Cancel-safe.
    pub(crate) async fn report(&mut self) -> Result<Report, String> {
        if let Some(end) = self.pending_end.take() {
            return Ok(end);
        }
        loop {
            let report = match self.reports.next_line().await {
                Ok(Some(line)) if line.len() <= MAX_OUTPUT_LINE => Report::decode(&line),
                Ok(Some(_)) => Err("a report longer than any report".into()),
                Ok(None) => Err("its socket closed".into()),
                Err(error) => Err(format!("its socket failed: {error}")),
            };
            match report {
                Ok(Report::Output(end)) => self.outputs.push(end),
                report => return report,
            }
        }
    }

    /// Wait for the supervisor's end report (ignoring anything else). The
    /// supervisor, whose tree is gone then, is reaped in the background:
    /// the run's gate and record are held until it has exited.
    pub(crate) async fn finish(mut self, mut report: Result<Report, String>) -> SupervisorEnd {
        loop {
            match report {
                Ok(Report::Ended { status, cause }) => {
                    self.reap_later();
                    return SupervisorEnd::Ended {
                        status: exit_status(status),
                        cause,
                        outputs: std::mem::take(&mut self.outputs),
                    };
                }
                Ok(_) => report = self.report().await,
                Err(error) => return self.crashed(error).await,
            }
        }
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
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.abort();
        }
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
    /// and record.
    fn reap_later(&mut self) {
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.abort();
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let gate = self.gate.take();
        let record = self.record.take();
        let reap = async move {
            let _ = child.wait().await;
            drop(gate);
            drop(record);
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap);
        }
    }
}

impl Drop for Supervised {
    /// Dropped before its end (the runtime gave up on the handler): the
    /// forwarder's abort closes the socket, and the supervisor kills the
    /// tree at once. The gate and
    /// the record are kept until it has exited.
    fn drop(&mut self) {
        self.reap_later();
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

/// At most one [`Warm`] supervisor kept ready for the next run.
#[derive(Default)]
pub(crate) struct WarmPool {
    ready: Mutex<Option<Warm>>,
    spawner: Spawner,
}

impl WarmPool {
    /// The ready supervisor, or a new one.
    pub(crate) fn take(&self, config: &ExecConfig) -> std::io::Result<Warm> {
        // A ready one that died meanwhile (killed while idle) is not handed out.
        let ready = self.ready.lock().expect("not poisoned").take();
        match ready {
            Some(mut warm) => {
                if warm.child.has_exited() {
                    Warm::spawn(&self.spawner, config)
                } else {
                    Ok(warm)
                }
            }
            None => Warm::spawn(&self.spawner, config),
        }
    }

    /// Start the next one, unless one is ready.
    pub(crate) fn refill(&self, config: &ExecConfig) {
        let mut ready = self.ready.lock().expect("not poisoned");
        if ready.is_none() {
            match Warm::spawn(&self.spawner, config) {
                Ok(warm) => *ready = Some(warm),
                Err(error) => warn!(%error, "cannot start a supervisor ahead of its run"),
            }
        }
    }
}

/// One gate per task id: a run of a task starts only once the supervisor
/// of its previous run on this agent has exited.
#[derive(Debug, Default)]
pub(crate) struct RunGates {
    gates: Mutex<Gates>,
}

#[derive(Debug, Default)]
struct Gates {
    by_task: HashMap<String, Weak<tokio::sync::Mutex<()>>>,
    /// Forget gates nobody holds once the map grows past this.
    prune_at: usize,
}

impl RunGates {
    /// Wait until no earlier run of `task` is alive here; the guard keeps
    /// later runs waiting until it is dropped.
    pub(crate) async fn enter(&self, task: &str) -> OwnedMutexGuard<()> {
        let gate = {
            let mut gates = self.gates.lock().expect("not poisoned");
            match gates.by_task.get(task).and_then(Weak::upgrade) {
                Some(gate) => gate,
                None => {
                    let gate = Arc::new(tokio::sync::Mutex::new(()));
                    gates
                        .by_task
                        .insert(task.to_string(), Arc::downgrade(&gate));
                    if gates.by_task.len() > gates.prune_at {
                        gates.by_task.retain(|_, gate| gate.strong_count() > 0);
                        gates.prune_at = (gates.by_task.len() * 2).max(64);
                    }
                    gate
                }
            }
        };
        gate.lock_owned().await
    }
}

/// The read buffer of a supervisor's reports (a line longer than this is
/// read in several fills).
const REPORT_BUFFER: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_waits_for_the_previous_run_of_its_task_only() {
        let gates = RunGates::default();
        let first = gates.enter("a").await;
        let other = tokio::time::timeout(Duration::from_secs(5), gates.enter("b")).await;
        assert!(other.is_ok(), "another task does not wait");
        let blocked = tokio::time::timeout(Duration::from_millis(50), gates.enter("a")).await;
        assert!(blocked.is_err(), "the same task waits");
        drop(first);
        let next = tokio::time::timeout(Duration::from_secs(5), gates.enter("a")).await;
        assert!(next.is_ok(), "and goes on once the first is gone");
    }

    #[tokio::test]
    async fn gates_nobody_holds_are_forgotten() {
        let gates = RunGates::default();
        for n in 0..1000 {
            drop(gates.enter(&format!("t{n}")).await);
        }
        assert!(gates.gates.lock().unwrap().by_task.len() <= 128);
    }
}
