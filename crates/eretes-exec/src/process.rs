//! [`ProcessHandler`]: a task's work as a child process in a process group
//! of its own.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::TaskRecord;
use eretes_runtime::{ErrorPolicy, StateContext, StatefulHandler, Step};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::checkpoint::CheckpointFile;
use crate::output::{capture, Captured};
use crate::spec::ProcessSpec;
use crate::{leftovers, ExecConfig, AGENT_DIR_ENV, CHECKPOINT_FILE_ENV, CHECKPOINT_POLL};

/// Runs each task's [`ProcessSpec`] as a child process, as the work of a
/// task state machine (wrap it in [`eretes_runtime::StateMachine`]).
///
/// * The child gets `ERETES_TASK_ID`, `ERETES_EPOCH`, `ERETES_NODE`,
///   `ERETES_ATTEMPT` and `ERETES_CHECKPOINT_FILE` in its environment, runs
///   in a process group of its own, and receives SIGKILL if the thread that
///   started it dies (the agent's runtime threads live as long as the agent).
/// * stdout and stderr go to `<data-dir>/logs/<task>/stdout.log` and
///   `stderr.log`, each capped at [`ExecConfig::log_cap`] per run; the
///   attempts after an error append.
/// * Stopping a task (a pause, sleep or kill command, release, delete,
///   drain, lease loss) sends SIGTERM to the whole group, then SIGKILL after
///   [`ExecConfig::stop_grace`]; a task that ends kills what is left of its
///   group too.
/// * Exit 0 → done, with the exit code and the output's tail as the result;
///   non-zero → an error: the state machine sleeps (backing off from
///   [`ExecConfig::retry_backoff`]) and runs it again, until the spec's
///   `max_attempts` errors fail it. A permanent task is restarted (with
///   backoff) whenever it exits, and never ends by itself.
pub struct ProcessHandler {
    config: ExecConfig,
}

/// Errors of a process task count for this long (its attempts are counted
/// over its whole life, for any practical purpose).
/// A year of 365.25 days, which error messages print as `1year`.
const ATTEMPT_WINDOW: Duration = Duration::from_secs(31_557_600);

impl ProcessHandler {
    /// A handler with `config`. Creates its directories and kills the
    /// process groups a previous agent on the same data directory left
    /// behind (after a `kill -9`, say).
    pub fn new(config: ExecConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(config.logs_dir())?;
        std::fs::create_dir_all(config.groups_dir())?;
        // No task runs yet, so every checkpoint file is a previous agent's;
        // the checkpoints themselves are in the store.
        let _ = std::fs::remove_dir_all(config.checkpoints_dir());
        std::fs::create_dir_all(config.checkpoints_dir())?;
        let killed = leftovers::kill_leftovers(&config);
        if killed > 0 {
            warn!(
                groups = killed,
                "killed process groups a previous agent left running"
            );
        }
        Ok(ProcessHandler { config })
    }
}

/// How one attempt ended.
enum Ended {
    Exited(ExitStatus, Captured, Captured),
    Stopped,
}

#[async_trait]
impl StatefulHandler for ProcessHandler {
    async fn run(&self, ctx: StateContext) -> Step {
        let id = ctx.task.id.clone();
        let spec = match ProcessSpec::from_properties(&ctx.task.task.spec.properties) {
            Ok(spec) => spec,
            Err(error) => return Step::Fatal(error.to_string()),
        };
        if !self.config.allow.allows(&spec.program) {
            return Step::Fatal(format!(
                "program {:?} is not on this agent's --allow list",
                spec.program
            ));
        }
        let logs = self.config.logs_dir().join(id.as_str());
        // Logs start afresh with each run that is not a retry after an
        // error (a resumed or woken task too); retries append.
        if ctx.recent_errors == 0 {
            if let Err(error) = reset_logs(&logs).await {
                // The run goes on; `capture` reports the log it cannot write.
                warn!(task = %id, %error, "cannot reset the task's logs");
            }
        }
        let path = self
            .config
            .checkpoints_dir()
            .join(format!("{id}.{}", ctx.task.epoch));
        let mut checkpoint = match CheckpointFile::prepare(path, ctx.checkpoint.clone()).await {
            Ok(file) => file,
            Err(error) => {
                return Step::Error(format!("cannot prepare the checkpoint file: {error}"))
            }
        };
        let step = if spec.permanent {
            self.serve(&ctx, &spec, &logs, &mut checkpoint).await
        } else {
            self.once(&ctx, &spec, &logs, &mut checkpoint).await
        };
        drop(checkpoint);
        step
    }

    fn error_policy(&self, task: &TaskRecord) -> Option<ErrorPolicy> {
        let spec = ProcessSpec::from_properties(&task.spec.properties).ok()?;
        let (first_backoff, longest_backoff) = self.config.retry_backoff;
        Some(ErrorPolicy {
            max_errors: spec.max_attempts as usize,
            window: ATTEMPT_WINDOW,
            first_backoff,
            longest_backoff,
        })
    }
}

impl ProcessHandler {
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
                "stdout_tail": stdout.tail_text(),
                "stderr_tail": stderr.tail_text(),
            }));
        }
        Step::Error(format!(
            "{} (attempt {attempt}); stderr ends with: {:?}",
            describe(status),
            stderr.tail_text()
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

    /// Run the program once, until it exits or the task is stopped; save
    /// the checkpoint file whenever it changes, and once more at the end.
    async fn attempt(
        &self,
        ctx: &StateContext,
        spec: &ProcessSpec,
        logs: &std::path::Path,
        attempt: u32,
        checkpoint: &mut CheckpointFile,
    ) -> std::io::Result<Ended> {
        let task = &ctx.task;
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env("ERETES_TASK_ID", task.id.as_str())
            .env("ERETES_EPOCH", task.epoch.to_string())
            .env("ERETES_NODE", task.node.as_str())
            .env("ERETES_ATTEMPT", attempt.to_string())
            .env(CHECKPOINT_FILE_ENV, checkpoint.path())
            .env(AGENT_DIR_ENV, &self.config.data_dir)
            // The agent's own secrets are not the task's business: whoever can
            // submit a task must not learn the API token or etcd's password.
            .env_remove("ERETES_TOKEN")
            .env_remove("ERETES_ETCD_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the child between fork and exec, and calls only
        // async-signal-safe functions (prctl, getppid, _exit).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let mut group = GroupFile::record(&self.config, task.id.as_str(), task.epoch, &child);
        let (cap, tail) = (self.config.log_cap, self.config.tail_bytes);
        let stdout = Capture::start(child.stdout.take(), logs.join("stdout.log"), cap, tail);
        let stderr = Capture::start(child.stderr.take(), logs.join("stderr.log"), cap, tail);
        let mut poll = tokio::time::interval(CHECKPOINT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                _ = task.cancel.cancelled() => break None,
                _ = poll.tick() => checkpoint.sync(task.id.as_str(), &ctx.checkpointer).await,
            }
        };
        let status = match ended {
            Some(status) => status,
            None => {
                stop(&mut child, group.pgid, self.config.stop_grace).await;
                group.settled = true;
                drop(group);
                // What the process saved on its way out (on SIGTERM, say).
                checkpoint.sync(task.id.as_str(), &ctx.checkpointer).await;
                return Ok(Ended::Stopped);
            }
        };
        // Whatever the leader left running in its group goes with it.
        signal_group(group.pgid, libc::SIGKILL);
        group.settled = true;
        drop(group);
        let status = status?;
        checkpoint.sync(task.id.as_str(), &ctx.checkpointer).await;
        Ok(Ended::Exited(
            status,
            stdout.finish().await,
            stderr.finish().await,
        ))
    }
}

/// One output stream being captured.
struct Capture {
    task: Option<tokio::task::JoinHandle<()>>,
    progress: Arc<Mutex<Captured>>,
}

/// How long the output may stay open after the group was killed: only a
/// process that left the group (a daemon) can still hold it.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

impl Capture {
    fn start(
        source: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
        log: PathBuf,
        cap: u64,
        tail: usize,
    ) -> Capture {
        let progress = Arc::new(Mutex::new(Captured::default()));
        let task = source.map(|source| {
            let progress = Arc::clone(&progress);
            tokio::spawn(async move { capture(source, &log, cap, tail, progress).await })
        });
        Capture { task, progress }
    }

    /// What the stream produced, once it ended or [`OUTPUT_DRAIN`] passed.
    async fn finish(self) -> Captured {
        if let Some(task) = self.task {
            let abort = task.abort_handle();
            if tokio::time::timeout(OUTPUT_DRAIN, task).await.is_err() {
                warn!("a process that left the task's group still holds its output; not waiting for it");
                abort.abort();
            }
        }
        let captured = self.progress.lock().expect("not poisoned").clone();
        captured
    }
}

/// Truncate a task's logs for a new run (attempts of one run append).
async fn reset_logs(dir: &std::path::Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    for name in ["stdout.log", "stderr.log"] {
        tokio::fs::File::create(dir.join(name)).await?;
    }
    Ok(())
}

/// SIGTERM to the group, SIGKILL after `grace`, and wait for the leader.
async fn stop(child: &mut Child, pgid: libc::pid_t, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    // Members that outlived the leader's SIGTERM.
    signal_group(pgid, libc::SIGKILL);
}

/// Send `signal` to every process of group `pgid` (gone groups are fine).
pub(crate) fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid addresses one process group;
        // it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// The record of a running process group, `<data-dir>/groups/<task>.pgid`,
/// that lets the next agent kill it if this one dies; removed on drop.
struct GroupFile {
    pgid: libc::pid_t,
    path: Option<PathBuf>,
    /// Set once the group was stopped and its leader reaped here; until
    /// then, dropping the record kills the group.
    settled: bool,
}

impl GroupFile {
    fn record(config: &ExecConfig, task: &str, epoch: i64, child: &Child) -> GroupFile {
        let pgid = child.id().map_or(0, |id| id as libc::pid_t);
        // Per run, so that a stopping run and a new one of the same id never
        // share (or delete) each other's record.
        let path = config.groups_dir().join(format!("{task}.{epoch}.pgid"));
        match std::fs::write(&path, format!("{pgid}\n")) {
            Ok(()) => GroupFile {
                pgid,
                path: Some(path),
                settled: false,
            },
            Err(error) => {
                warn!(task, %error, "cannot record the task's process group");
                GroupFile {
                    pgid,
                    path: None,
                    settled: false,
                }
            }
        }
    }
}

impl Drop for GroupFile {
    /// The group goes with its record. On the normal paths it was stopped
    /// and its leader reaped (`settled`); when the runtime drops a handler
    /// that did not stop in time (fencing, an expired drain), this is what
    /// kills the whole group, not just its leader (`kill_on_drop` would).
    fn drop(&mut self) {
        if !self.settled {
            signal_group(self.pgid, libc::SIGKILL);
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// "exited with code 3" or "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".to_string(),
    }
}
