//! [`ProcessHandler`]: a task's work as a child process in a process group
//! of its own.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_runtime::{Handler, HandlerOutcome, TaskContext};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::output::{capture, Captured};
use crate::spec::ProcessSpec;
use crate::{leftovers, ExecConfig, AGENT_DIR_ENV};

/// Runs each task's [`ProcessSpec`] as a child process.
///
/// * The child gets `ERETES_TASK_ID`, `ERETES_EPOCH` and `ERETES_NODE` in
///   its environment, runs in a process group of its own, and receives
///   SIGKILL if the thread that started it dies (the agent's runtime threads
///   live as long as the agent).
/// * stdout and stderr go to `<data-dir>/logs/<task>/stdout.log` and
///   `stderr.log`, each capped at [`ExecConfig::log_cap`] per run.
/// * Stopping a task (release, delete, drain, lease loss) sends SIGTERM to
///   the whole group, then SIGKILL after [`ExecConfig::stop_grace`]; a task
///   that ends kills what is left of its group too.
/// * Exit 0 → done, with the exit code and the output's tail as the result;
///   non-zero → tried again with backoff up to the spec's `max_attempts`,
///   then failed with the reason. A permanent task is restarted whenever it
///   exits.
pub struct ProcessHandler {
    config: ExecConfig,
}

impl ProcessHandler {
    /// A handler with `config`. Creates its directories and kills the
    /// process groups a previous agent on the same data directory left
    /// behind (after a `kill -9`, say).
    pub fn new(config: ExecConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(config.logs_dir())?;
        std::fs::create_dir_all(config.groups_dir())?;
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
impl Handler for ProcessHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        let spec = match ProcessSpec::from_properties(&ctx.task.spec.properties) {
            Ok(spec) => spec,
            Err(error) => return HandlerOutcome::Failed(error.to_string()),
        };
        if !self.config.allow.allows(&spec.program) {
            return HandlerOutcome::Failed(format!(
                "program {:?} is not on this agent's --allow list",
                spec.program
            ));
        }
        let logs = self.config.logs_dir().join(ctx.id.as_str());
        if let Err(error) = reset_logs(&logs).await {
            // The run goes on; `capture` reports the log it cannot write.
            warn!(task = %ctx.id, %error, "cannot reset the task's logs");
        }
        let (first_backoff, longest_backoff) = self.config.retry_backoff;
        let mut backoff = first_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let ended = match self.attempt(&ctx, &spec, &logs, attempt).await {
                Ok(ended) => ended,
                Err(error) => {
                    let reason = format!("cannot start {:?}: {error}", spec.program);
                    if spec.permanent || attempt < spec.max_attempts {
                        warn!(task = %ctx.id, %reason, "retrying");
                        Ended::Exited(failed_status(), Captured::default(), Captured::default())
                    } else {
                        return HandlerOutcome::Failed(reason);
                    }
                }
            };
            let (status, stdout, stderr) = match ended {
                Ended::Stopped => return HandlerOutcome::Release,
                Ended::Exited(status, stdout, stderr) => (status, stdout, stderr),
            };
            let code = status.code();
            let result = json!({
                "exit_code": code,
                "signal": std::os::unix::process::ExitStatusExt::signal(&status),
                "attempts": attempt,
                "stdout_tail": stdout.tail_text(),
                "stderr_tail": stderr.tail_text(),
            });
            if spec.permanent {
                // A service: restart it; a run that lasted a while resets the
                // backoff, one that died at once doubles it.
                if started.elapsed() > longest_backoff {
                    backoff = first_backoff;
                }
                info!(task = %ctx.id, ?code, retry_in = ?backoff, "permanent task exited; restarting");
            } else if code == Some(0) {
                return HandlerOutcome::Done(result);
            } else if attempt >= spec.max_attempts {
                return HandlerOutcome::Failed(format!(
                    "{} after {attempt} attempt(s); stderr ends with: {:?}",
                    describe(status),
                    stderr.tail_text()
                ));
            } else {
                info!(task = %ctx.id, ?code, attempt, retry_in = ?backoff, "task exited non-zero; retrying");
            }
            tokio::select! {
                _ = ctx.cancel.cancelled() => return HandlerOutcome::Release,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(longest_backoff);
        }
    }
}

impl ProcessHandler {
    /// Run the program once, until it exits or the task is stopped.
    async fn attempt(
        &self,
        ctx: &TaskContext,
        spec: &ProcessSpec,
        logs: &std::path::Path,
        attempt: u32,
    ) -> std::io::Result<Ended> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env("ERETES_TASK_ID", ctx.id.as_str())
            .env("ERETES_EPOCH", ctx.epoch.to_string())
            .env("ERETES_NODE", ctx.node.as_str())
            .env("ERETES_ATTEMPT", attempt.to_string())
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
        let group = GroupFile::record(&self.config, ctx.id.as_str(), ctx.epoch, &child);
        let (cap, tail) = (self.config.log_cap, self.config.tail_bytes);
        let stdout = Capture::start(child.stdout.take(), logs.join("stdout.log"), cap, tail);
        let stderr = Capture::start(child.stderr.take(), logs.join("stderr.log"), cap, tail);
        let ended = tokio::select! {
            status = child.wait() => Some(status?),
            _ = ctx.cancel.cancelled() => None,
        };
        let status = match ended {
            Some(status) => status,
            None => {
                let mut group = group;
                stop(&mut child, group.pgid, self.config.stop_grace).await;
                group.settled = true;
                drop(group);
                return Ok(Ended::Stopped);
            }
        };
        // Whatever the leader left running in its group goes with it.
        let mut group = group;
        signal_group(group.pgid, libc::SIGKILL);
        group.settled = true;
        drop(group);
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

/// An exit status of 127 (as a shell reports a command it cannot run), for
/// attempts that could not start.
fn failed_status() -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(127 << 8)
}
