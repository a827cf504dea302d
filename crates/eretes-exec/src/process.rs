//! [`ProcessHandler`]: a task's work as a process tree under a supervisor
//! process of its own (see [`crate::supervisor`]).

use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::TaskRecord;
use eretes_runtime::{ErrorPolicy, FenceDeadline, StateContext, StatefulHandler, Step};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::checkpoint::CheckpointFile;
use crate::checkpoint_watch::CheckpointWatcher;
use crate::leftovers::{self, GroupRecords, RunMarker};
use crate::spec::ProcessSpec;
use crate::supervisor::wire::{Cause, Launch, LaunchLogs, Report, Stream, StreamEnd};
use crate::supervisor::{describe, LaunchPlan, RunGates, Supervised, SupervisorEnd, WarmPool};
use crate::{AllowList, ExecConfig, CHECKPOINT_FILE_ENV};

/// Runs each task's [`ProcessSpec`] as a child process, as the work of a
/// task state machine (wrap it in [`eretes_runtime::StateMachine`]).
///
/// * Each run's program runs under a supervisor ([`crate::supervisor`]),
///   in a session and process group of its own, with `ERETES_TASK_ID`,
///   `ERETES_EPOCH`, `ERETES_NODE`, `ERETES_ATTEMPT` and
///   `ERETES_CHECKPOINT_FILE` in its environment. The supervisor holds the
///   node's fencing deadline and kills the whole process tree when it
///   passes or the agent dies; a run of a task never starts while an older
///   run's supervisor on this agent is alive.
/// * stdout and stderr go to `<data-dir>/logs/<task>/stdout.log` and
///   `stderr.log`; the attempts after an error, and a permanent task's
///   restarts, append; each log rotates at [`ExecConfig::log_cap`] (the
///   older part kept as `stdout.log.1`), so a task's output never takes
///   more than twice the cap.
/// * Stopping a task (a pause, sleep or kill command, release, delete,
///   drain) sends SIGTERM to the whole tree, then SIGKILL after
///   [`ExecConfig::stop_grace`]; lease loss kills it at once. When the
///   program exits, whatever else of its tree still runs is killed.
/// * Exit 0 → done, with the exit code and the output's tail as the result;
///   non-zero → an error: the state machine sleeps (backing off from
///   [`ExecConfig::retry_backoff`]) and runs it again, until the spec's
///   `max_attempts` errors fail it. A permanent task is restarted (with
///   backoff) whenever it exits, and never ends by itself.
pub struct ProcessHandler {
    config: ExecConfig,
    /// A run of a task waits here until its previous run's supervisor is gone.
    gates: RunGates,
    /// The supervisor of the next run, started ahead.
    warm: WarmPool,
    /// Wakes runs whose process replaced its checkpoint file.
    watcher: CheckpointWatcher,
    /// Where running process groups are recorded.
    records: Arc<GroupRecords>,
    /// The data directory as runs' markers carry it.
    agent_dir: Arc<str>,
}

/// Longest the end of an attempt waits for a checkpoint save under way.
const SAVE_DRAIN: Duration = Duration::from_secs(10);

impl ProcessHandler {
    /// A handler with `config`. Creates its directories and kills the
    /// processes a previous agent on the same data directory left behind
    /// (its supervisors included), waiting up to 10 s for them to be gone.
    pub fn new(config: ExecConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(config.logs_dir())?;
        std::fs::create_dir_all(config.groups_dir())?;
        // No task runs yet, so every checkpoint file is a previous agent's;
        // the checkpoints themselves are in the store.
        let _ = std::fs::remove_dir_all(config.checkpoints_dir());
        std::fs::create_dir_all(config.checkpoints_dir())?;

        let killed = leftovers::kill_leftovers(&config);
        if killed > 0 {
            warn!(killed, "killed processes a previous agent left running");
        }
        let records = Arc::new(GroupRecords::new(config.groups_dir()));
        let agent_dir = Arc::from(config.data_dir.to_string_lossy());
        Ok(ProcessHandler {
            agent_dir,
            config,
            gates: RunGates::default(),
            warm: WarmPool::default(),
            watcher: CheckpointWatcher::default(),
            records,
        })
    }
}

/// How one attempt ended.
enum Ended {
    /// The program exited by itself (and the rest of its tree was killed):
    /// its status, and the ends of its stdout and stderr.
    Exited(ExitStatus, String, String),
    /// Stopped: by the runtime, a command, or the fencing deadline.
    Stopped,
    /// Its supervisor died without a report; the agent killed the tree.
    SupervisorDied(String),
    /// It ran past the spec's timeout and was stopped.
    TimedOut(Duration),
    /// Its supervisor stopped it on a SIGTERM that the agent did not send
    /// (the task's own `kill $PPID`, say), and the agent did not stop.
    StoppedFromOutside,
}

/// How long an attempt whose supervisor stopped it on a SIGTERM the agent
/// did not send waits for the agent's own stop before it counts as failed:
/// a service manager stopping the machine's agent signals every process
/// of it at once, supervisors too, and the agent's drain then stops the
/// run (a release) within moments.
const OUTSIDE_STOP_WAIT: Duration = Duration::from_secs(2);

/// What a supervisor has, beyond the stop's grace, to report the end of a
/// run it was told to stop.
const STOP_REPORT_MARGIN: Duration = Duration::from_secs(2);

impl StatefulHandler for ProcessHandler {
    // Written out rather than through `#[async_trait]`, whose async block
    // would hold `ctx` twice (moved in, then bound again) for as long as
    // the task runs: this block holds it once, and `run_task` borrows it.
    fn run<'life0, 'async_trait>(
        &'life0 self,
        ctx: StateContext,
    ) -> Pin<Box<dyn Future<Output = Step> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.run_task(&ctx).await })
    }

    fn error_policy(&self, task: &TaskRecord) -> Option<ErrorPolicy> {
        let spec = ProcessSpec::from_properties(&task.spec.properties.value()).ok()?;
        Some(ErrorPolicy::attempts(
            spec.max_attempts,
            self.config.retry_backoff,
        ))
    }
}

impl ProcessHandler {
    /// One run of a task: check its spec, prepare its checkpoint file, and
    /// run it once (or for ever, if permanent).
    async fn run_task(&self, ctx: &StateContext) -> Step {
        let id = &ctx.task.id;
        let spec = match ProcessSpec::from_properties(&ctx.task.task.spec.properties.value()) {
            Ok(spec) => spec,
            Err(error) => return Step::Fatal(error.to_string()),
        };
        if !self.config.allow.allows(&spec.program) {
            return Step::Fatal(format!(
                "program {:?} is not on this agent's --allow list",
                spec.program
            ));
        }
        // Under an allow list, a task's variables are allowed one by one
        // too: PATH or LD_PRELOAD would make an allowed program another.
        if matches!(self.config.allow, AllowList::Only(_)) {
            if let Some(name) = spec
                .env
                .keys()
                .find(|name| !self.config.allow_env.contains(*name))
            {
                return Step::Fatal(format!(
                    "env {name:?} is not on this agent's --allow-env list"
                ));
            }
        }
        let logs = self.config.logs_dir().join(id.as_str());
        // In a block of its own: what only the preparation needs is gone
        // before the run's long wait, so it takes no room in its state.
        let mut checkpoint = {
            let name = format!("{id}.{}", ctx.task.epoch);
            let root = self.config.checkpoints_dir();
            let owner = self.config.run_as.as_ref().map(|user| (user.uid, user.gid));
            match Box::pin(CheckpointFile::prepare(
                &root,
                &name,
                ctx.checkpoint.clone(),
                owner,
                &self.watcher,
            ))
            .await
            {
                Ok(file) => file,
                Err(error) => {
                    return Step::Error(format!("cannot prepare the checkpoint file: {error}"))
                }
            }
        };
        let step = if spec.permanent {
            // Boxed: its loop's state would otherwise set this future's
            // size for every task, permanent or not.
            Box::pin(self.serve(ctx, &spec, &logs, &mut checkpoint)).await
        } else {
            self.once(ctx, &spec, &logs, &mut checkpoint).await
        };
        drop(checkpoint);
        step
    }

    /// One attempt of a task that ends: exit 0 completes it, anything else
    /// is an error for the state machine's policy.
    async fn once(
        &self,
        ctx: &StateContext,
        spec: &ProcessSpec,
        logs: &std::path::Path,
        checkpoint: &mut CheckpointFile,
    ) -> Step {
        let attempt = u32::try_from(ctx.recent_errors).unwrap_or(u32::MAX - 1) + 1;
        let (status, stdout, stderr) =
            match self.attempt(ctx, spec, logs, attempt, checkpoint).await {
                Ok(Ended::Exited(status, stdout, stderr)) => (status, stdout, stderr),
                Ok(Ended::Stopped) => return Step::Release,
                Ok(Ended::SupervisorDied(how)) => {
                    return Step::Error(format!(
                        "the task's supervisor {how}; its processes were killed (attempt {attempt})"
                    ))
                }
                Ok(Ended::StoppedFromOutside) => {
                    return Step::Error(format!(
                        "its supervisor was sent SIGTERM by another process than the agent \
                         (the task itself?), and stopped it (attempt {attempt})"
                    ))
                }
                Ok(Ended::TimedOut(limit)) => {
                    return Step::Error(format!(
                        "timed out after {} and was stopped (attempt {attempt})",
                        humantime::format_duration(limit)
                    ))
                }
                Err(error) => {
                    return Step::Error(format!(
                        "cannot start {:?}: {error} (attempt {attempt})",
                        spec.program
                    ))
                }
            };
        if status.code() == Some(0) {
            return Step::Complete(json!({
                "exit_code": 0,
                "signal": null,
                "attempts": attempt,
                "stdout_tail": stdout,
                "stderr_tail": stderr,
            }));
        }
        Step::Error(format!(
            "{} (attempt {attempt}); stderr ends with: {stderr:?}",
            describe(status),
        ))
    }

    /// A permanent task: restart the program whenever it exits, until the
    /// task is stopped. A run that lasted a while resets the backoff, one
    /// that died at once doubles it.
    async fn serve(
        &self,
        ctx: &StateContext,
        spec: &ProcessSpec,
        logs: &std::path::Path,
        checkpoint: &mut CheckpointFile,
    ) -> Step {
        let (first_backoff, longest_backoff) = self.config.retry_backoff;
        let mut backoff = first_backoff;
        for attempt in 1u32.. {
            let started = Instant::now();
            match self.attempt(ctx, spec, logs, attempt, checkpoint).await {
                Ok(Ended::Stopped) => return Step::Release,
                Ok(Ended::Exited(status, _, _)) => {
                    info!(task = %ctx.task.id, status = describe(status), retry_in = ?backoff, "permanent task exited; restarting");
                }
                Ok(Ended::SupervisorDied(how)) => {
                    warn!(task = %ctx.task.id, supervisor = how, retry_in = ?backoff, "the permanent task's supervisor died; restarting");
                }
                Ok(Ended::StoppedFromOutside) => {
                    warn!(task = %ctx.task.id, retry_in = ?backoff, "the permanent task's supervisor was sent SIGTERM by another process than the agent; restarting");
                }
                Ok(Ended::TimedOut(limit)) => {
                    info!(task = %ctx.task.id, timeout = ?limit, retry_in = ?backoff, "permanent task timed out; restarting");
                }
                Err(error) => {
                    warn!(task = %ctx.task.id, %error, retry_in = ?backoff, "cannot start the permanent task; retrying");
                }
            }
            if started.elapsed() > longest_backoff {
                backoff = first_backoff;
            }
            tokio::select! {
                _ = ctx.task.cancel.cancelled() => return Step::Release,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(longest_backoff);
        }
        Step::Release
    }

    /// Run the program once under its supervisor, until it exits or the
    /// task is stopped or fenced; save the checkpoint file whenever it
    /// changes, and once more at the end.
    async fn attempt(
        &self,
        ctx: &StateContext,
        spec: &ProcessSpec,
        logs: &std::path::Path,
        attempt: u32,
        checkpoint: &mut CheckpointFile,
    ) -> std::io::Result<Ended> {
        let task = &ctx.task;
        // No run of a task starts while its previous run here is alive.
        let gate = tokio::select! {
            gate = self.gates.enter(&task.id) => gate,
            _ = task.cancel.cancelled() => return Ok(Ended::Stopped),
        };
        let mut fence = if self.config.fence_processes {
            task.fence.clone()
        } else {
            FenceDeadline::none()
        };
        let deadline = fence.current().map(|at| at.boottime_ns);
        // The spec's own variables, then eretes' (the spec may not name
        // ERETES_* ones).
        let mut env: Vec<(String, Vec<u8>)> = spec
            .env
            .iter()
            .map(|(name, value)| (name.clone(), value.clone().into_bytes()))
            .collect();
        env.extend([
            ("ERETES_TASK_ID".into(), task.id.as_str().into()),
            ("ERETES_EPOCH".into(), task.epoch.to_string().into()),
            ("ERETES_NODE".into(), task.node.as_str().into()),
            ("ERETES_ATTEMPT".into(), attempt.to_string().into()),
            (
                CHECKPOINT_FILE_ENV.into(),
                checkpoint.path().as_os_str().as_bytes().to_vec(),
            ),
        ]);
        // Logs start afresh with each run that is not a retry after an
        // error (a resumed or woken task too); retries and a permanent
        // task's restarts append.
        let reset_logs = ctx.recent_errors == 0 && attempt == 1;
        let launch = Launch {
            program: spec.program.clone(),
            args: spec.args.clone(),
            cwd: spec
                .cwd
                .as_ref()
                .map(|cwd| cwd.to_string_lossy().into_owned()),
            env,
            grace_ms: u64::try_from(self.config.stop_grace.as_millis()).unwrap_or(u64::MAX),
            deadline_ns: deadline.unwrap_or(0),
            run_as: self.config.run_as.clone(),
            open_files: self.config.task_open_files,
            logs: Some(LaunchLogs {
                dir: logs.as_os_str().as_bytes().to_vec(),
                reset: reset_logs,
                cap: self.config.log_cap,
                tail_bytes: self.config.tail_bytes,
            }),
            // Its supervisor may run the next run here too.
            again: true,
        };
        let plan = LaunchPlan {
            launch,
            records: Arc::clone(&self.records),
            marker: RunMarker {
                agent_dir: Arc::clone(&self.agent_dir),
                task: task.id.clone(),
                epoch: task.epoch,
            },
            fence,
            cancel: task.cancel.clone(),
        };
        let warm = self.warm.take(&self.config)?;
        // The next run's supervisor starts while this one starts its task.
        let refill = || self.warm.refill(&self.config);
        // Boxed, here and below: a run's future is held for as long as the
        // task runs, and is as large as its largest state; the launch, the
        // checkpoint saves and the end are short states that would
        // otherwise set that size for every idle task.
        let mut supervised = Box::pin(Supervised::launch(warm, plan, gate, refill)).await?;
        // This loop waits for the end in `Supervised::report`, which
        // forwards the deadline and the task's stop to the supervisor
        // meanwhile; beside it, never in its place, it saves checkpoints
        // and stops the attempt if it outlives its timeout. (A timer only
        // when there is a timeout: every idle run holds this state.)
        let mut timeout = spec
            .timeout()
            .map(|limit| Box::pin(tokio::time::sleep(limit)));
        let mut timed_out = false;
        // After the timeout's stop: how long the supervisor has to end the
        // run (the grace, and a margin to report) before it counts as
        // dead. One the task stopped (SIGSTOP) never reads the stop, and
        // the run would wait for ever; as dead, it is killed with the tree.
        let mut stop_wait: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let report = {
            let (id, checkpointer) = (task.id.as_str(), &ctx.checkpointer);
            // Whether a save is under way (its write may be in the store's
            // hands already).
            let saving = std::sync::atomic::AtomicBool::new(false);
            // Never ends; dropped after the loop, between saves.
            let saves = async {
                loop {
                    checkpoint.changed().await;
                    saving.store(true, std::sync::atomic::Ordering::Relaxed);
                    Box::pin(checkpoint.sync(id, checkpointer)).await;
                    saving.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            };
            tokio::pin!(saves);
            let report = loop {
                tokio::select! {
                    report = supervised.report() => match report {
                        Ok(Report::Ended { .. }) | Err(_) => break report,
                        Ok(_) => {}
                    },
                    () = expiry(&mut timeout), if !timed_out => {
                        timed_out = true;
                        // This attempt only: the task's token stays as it is.
                        supervised.stop();
                        stop_wait = Some(Box::pin(tokio::time::sleep(
                            self.config.stop_grace + STOP_REPORT_MARGIN,
                        )));
                    }
                    () = expiry(&mut stop_wait) => {
                        break Err(format!(
                            "did not end the run within {} of its timeout's stop (stopped?)",
                            humantime::format_duration(self.config.stop_grace + STOP_REPORT_MARGIN)
                        ));
                    }
                    () = &mut saves => {}
                }
            };
            // A save under way is finished, not dropped: a dropped write
            // could still land after the final save below and put older
            // bytes back. (The supervisor has ended: nothing waits on it.)
            if saving.load(std::sync::atomic::Ordering::Relaxed) {
                let finish = std::future::poll_fn(|cx| {
                    let _ = saves.as_mut().poll(cx);
                    if saving.load(std::sync::atomic::Ordering::Relaxed) {
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                });
                let _ = tokio::time::timeout(SAVE_DRAIN, finish).await;
            }
            report
        };
        let (end, warm) = Box::pin(supervised.finish(report)).await;
        if let Some(warm) = warm {
            self.warm.give_back(warm);
        }
        // What the process saved on its way out (on SIGTERM, say).
        Box::pin(checkpoint.sync(task.id.as_str(), &ctx.checkpointer)).await;
        // A stop the task itself asked for (release, command) is a stop; one
        // only this attempt's timeout asked for is the attempt's failure.
        // (An exit or a fence that raced the timeout is what it was.)
        // A supervisor that had to be killed after the timeout's stop (see
        // `stop_wait`) ended a run that timed out all the same.
        if timed_out && !task.cancel.is_cancelled() && matches!(end, SupervisorEnd::Crashed(_)) {
            return Ok(Ended::TimedOut(spec.timeout().unwrap_or_default()));
        }
        if let SupervisorEnd::Ended {
            cause: Cause::Stopped,
            ..
        } = end
        {
            if timed_out && !task.cancel.is_cancelled() {
                return Ok(Ended::TimedOut(spec.timeout().unwrap_or_default()));
            }
            // Neither the node nor the timeout asked: a SIGTERM to the
            // supervisor from elsewhere. Counted as a stop only if the
            // agent's own stop follows it (it is shutting down); otherwise
            // a task that signals its supervisor would be released and
            // claimed again for ever, its attempts never counted.
            if !timed_out
                && tokio::time::timeout(OUTSIDE_STOP_WAIT, task.cancel.cancelled())
                    .await
                    .is_err()
            {
                return Ok(Ended::StoppedFromOutside);
            }
        }
        Ok(match end {
            SupervisorEnd::Ended {
                status,
                cause: Cause::Exited,
                outputs,
            } => {
                let (stdout, stderr) = tails(task.id.as_str(), outputs);
                Ended::Exited(status, stdout, stderr)
            }
            SupervisorEnd::Ended {
                cause: Cause::Stopped,
                ..
            } => Ended::Stopped,
            SupervisorEnd::Ended {
                cause: Cause::Fenced,
                ..
            } => {
                warn!(task = %task.id, epoch = task.epoch, "the node's fencing deadline passed: the supervisor killed the task's processes");
                Ended::Stopped
            }
            SupervisorEnd::Crashed(how) => Ended::SupervisorDied(how),
        })
    }
}

/// Resolves when `timeout` (if any) expires; never without one.
async fn expiry(timeout: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timeout {
        Some(timeout) => timeout.await,
        None => std::future::pending().await,
    }
}

/// The tails of a run's stdout and stderr from its supervisor's report;
/// a log it could not write is logged here.
fn tails(task: &str, outputs: Vec<StreamEnd>) -> (String, String) {
    let (mut stdout, mut stderr) = (String::new(), String::new());
    for end in outputs {
        if let Some(error) = &end.error {
            warn!(task, stream = ?end.stream, %error, "the task's log could not be written");
        }
        match end.stream {
            Stream::Stdout => stdout = end.tail,
            Stream::Stderr => stderr = end.tail,
        }
    }
    (stdout, stderr)
}
