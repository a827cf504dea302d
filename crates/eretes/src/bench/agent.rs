//! The agent benchmark: a real `eretes agent` on a fresh data directory,
//! measured through its API.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::time::Instant;

use super::{wait_until, wait_until_async, BenchArgs};

/// Start this binary's `eretes agent` on a fresh data directory and measure
/// it through its API: N `true` tasks one after another, each from submit
/// until the wait call reports it done (every step is fsync'd by the durable
/// store); then 20 × N submissions by 8 concurrent clients to a group no
/// agent serves (so nothing runs), for the API's submit rate.
pub(super) async fn agent(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100) as usize;
    let agent = BenchAgent::start(args, fresh_data_dir()).await?;
    let (url, pid) = (agent.url.clone(), agent.pid);
    agent.measure(measure_agent(&url, tasks, pid)).await
}

/// A data directory of its own under the system's temporary directory.
pub(super) fn fresh_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("eretes-bench-{:08x}", rand::random::<u32>()))
}

/// This binary's `eretes agent` on a loopback port, killed (and its data
/// directory removed) when the measurement ends.
pub(super) struct BenchAgent {
    child: tokio::process::Child,
    data_dir: PathBuf,
    /// Its API's base URL.
    pub url: String,
    /// Its process id.
    pub pid: i32,
}

impl BenchAgent {
    /// Start an agent named `bench` on `data_dir` (this binary, or the
    /// one `--agent-binary` names) and wait until it is ready.
    pub async fn start(args: &BenchArgs, data_dir: PathBuf) -> Result<BenchAgent> {
        Self::start_with(args, data_dir, &[]).await
    }

    /// [`BenchAgent::start`], with `extra` arguments for the agent.
    pub async fn start_with(
        args: &BenchArgs,
        data_dir: PathBuf,
        extra: &[&str],
    ) -> Result<BenchAgent> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let binary = match &args.agent_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()?,
        };
        let child = tokio::process::Command::new(binary)
            .arg("agent")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "bench"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting eretes agent")?;
        let pid = child.id().context("the agent's pid")? as i32;
        let agent = BenchAgent {
            child,
            data_dir,
            url: format!("http://127.0.0.1:{port}"),
            pid,
        };
        let (http, ready) = (reqwest::Client::new(), format!("{}/readyz", agent.url));
        wait_until_async("the agent is ready", || {
            let (http, ready) = (http.clone(), ready.clone());
            async move {
                http.get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await?;
        Ok(agent)
    }

    /// Await `measurement`, then stop the agent and remove its data.
    pub async fn measure<T>(mut self, measurement: impl Future<Output = T>) -> T {
        let result = measurement.await;
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        result
    }
}

async fn measure_agent(url: &str, tasks: usize, agent_pid: i32) -> Result<serde_json::Value> {
    let http = reqwest::Client::new();
    let mut overheads = Vec::with_capacity(tasks);
    for n in 0..tasks {
        let id = format!("overhead-{n}");
        let started = Instant::now();
        http.post(format!("{url}/v1/tasks"))
            .json(&json!({ "id": id, "program": "true" }))
            .send()
            .await?
            .error_for_status()?;
        let view: serde_json::Value = http
            .get(format!("{url}/v1/tasks/{id}/wait?timeout_s=60"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if view["state"] != "done" {
            bail!("task {id} did not finish: {view}");
        }
        overheads.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    overheads.sort_by(f64::total_cmp);
    let median_ms = overheads[overheads.len() / 2];
    let p90_ms = overheads[overheads.len() * 9 / 10];

    let submissions = tasks * 20;
    let submits_per_s = submit_rate(&http, url, "submit", "nobody", submissions).await?;
    // The same while the tasks run: every start and end is written too.
    let submits_running_per_s = submit_rate(&http, url, "run", "default", submissions).await?;
    let pss = supervisor_pss(url, &http, agent_pid).await?;
    let (direct_ms, supervised_ms) = supervisor_start_cost(tasks).await?;
    let reused_ms = reused_supervisor_cost(tasks).await?;
    println!(
        "agent: a `true` task takes {median_ms:.1} ms from submit to done (median of {tasks}; p90 {p90_ms:.1} ms); \
         the API takes {submits_per_s:.0} submissions/s (8 clients, {submissions} tasks; \
         {submits_running_per_s:.0}/s when the tasks run); \
         a supervisor costs {pss:.0} KiB PSS (median of {SUPERVISED}) and `true` takes {supervised_ms:.2} ms \
         under a new one, {reused_ms:.2} ms under one that ran the run before, against {direct_ms:.2} ms \
         alone (medians of {tasks})"
    );
    Ok(json!({
        "scenario": "agent",
        "tasks": tasks,
        "overhead_median_ms": (median_ms * 10.0).round() / 10.0,
        "overhead_p90_ms": (p90_ms * 10.0).round() / 10.0,
        "submissions": submissions,
        "submits_per_s": submits_per_s.round(),
        "submits_running_per_s": submits_running_per_s.round(),
        "supervisor_pss_kib": pss.round(),
        "true_direct_ms": (direct_ms * 100.0).round() / 100.0,
        "true_supervised_ms": (supervised_ms * 100.0).round() / 100.0,
        "true_reused_supervisor_ms": (reused_ms * 100.0).round() / 100.0,
    }))
}

/// Submissions per second of `count` `true` tasks to `group` by 8 clients
/// at once (ids `<prefix>-<n>`).
pub(super) async fn submit_rate(
    http: &reqwest::Client,
    url: &str,
    prefix: &str,
    group: &str,
    count: usize,
) -> Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, next, url) = (http.clone(), next.clone(), url.to_string());
        let (prefix, group) = (prefix.to_string(), group.to_string());
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return anyhow::Ok(());
                }
                http.post(format!("{url}/v1/tasks"))
                    .json(&json!({ "id": format!("{prefix}-{n}"), "group": group, "program": "true" }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Long-running tasks whose supervisors' memory is measured.
const SUPERVISED: usize = 20;

/// Run [`SUPERVISED`] `sleep` tasks on the agent and return the median
/// proportional set size of their supervisors (the agent's children), in
/// KiB: what each costs once the pages it shares with the agent and the
/// other supervisors are divided among them.
async fn supervisor_pss(url: &str, http: &reqwest::Client, agent_pid: i32) -> Result<f64> {
    super::idle::submit_sleeping_tasks(http, url, "resident", SUPERVISED, 600).await?;
    let supervisors = || supervisors_of(agent_pid);
    wait_until("every resident task runs", || {
        supervisors().len() >= SUPERVISED
    })
    .await?;
    let mut pss: Vec<f64> = supervisors()
        .into_iter()
        .filter_map(|pid| Some(pss_kib(pid)? as f64))
        .collect();
    if pss.is_empty() {
        bail!("no supervisor's memory could be read");
    }
    pss.sort_by(f64::total_cmp);
    Ok(pss[pss.len() / 2])
}

/// The proportional set size of `pid`, in KiB.
pub(super) fn pss_kib(pid: i32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The supervisors the agent `agent_pid` runs that supervise a run: its
/// children but its supervisors' fork server, that have a child of their
/// own (one started ahead, or kept for a later run, has none).
pub(super) fn supervisors_of(agent_pid: i32) -> Vec<i32> {
    let fork_server = eretes_exec::supervisor::FORK_SERVER_ARG.as_bytes();
    let processes: Vec<(i32, Option<i32>)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(|pid| (pid, parent_of(pid)))
        .collect();
    let parents: std::collections::HashSet<i32> =
        processes.iter().filter_map(|&(_, parent)| parent).collect();
    processes
        .into_iter()
        .filter(|&(pid, parent)| parent == Some(agent_pid) && parents.contains(&pid))
        .map(|(pid, _)| pid)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|line| !line.split(|&byte| byte == 0).any(|arg| arg == fork_server))
        })
        .collect()
}

/// The parent of process `pid`.
pub(super) fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The launch line of a run of `true` (with `again`: the supervisor then
/// waits for another).
fn launch_of_true(again: bool) -> String {
    eretes_exec::supervisor::wire::Launch {
        program: "true".into(),
        args: Vec::new(),
        cwd: None,
        env: Vec::new(),
        grace_ms: 1000,
        deadline_ns: 0,
        run_as: None,
        open_files: None,
        logs: None,
        again,
    }
    .encode()
}

/// A supervisor of this binary, exec'd, and our end of its socket.
fn start_supervisor() -> Result<(std::os::unix::net::UnixStream, tokio::process::Child)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .arg(eretes_exec::supervisor::SUBCOMMAND)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )))
        .spawn()?;
    Ok((ours, child))
}

/// Median, over `runs` runs, of `true` under one supervisor of this binary
/// that takes run after run (launched, reported, its end read): what a run
/// costs when the agent hands it a supervisor whose last run ended, in
/// milliseconds.
async fn reused_supervisor_cost(runs: usize) -> Result<f64> {
    let launch = launch_of_true(true);
    let (ours, mut child) = start_supervisor()?;
    let timings = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        use std::io::BufRead;
        let mut reports = std::io::BufReader::new(ours.try_clone()?);
        let mut timings = Vec::with_capacity(runs);
        // One run first, not timed: the supervisor's own start.
        for n in 0..=runs {
            let started = std::time::Instant::now();
            std::io::Write::write_all(&mut &ours, launch.as_bytes())?;
            loop {
                let mut line = String::new();
                if reports.read_line(&mut line)? == 0 {
                    bail!("the supervisor ended after {n} runs");
                }
                if line.starts_with("ended ") {
                    if !line.starts_with("ended 0 exited again") {
                        bail!("the supervisor said {line:?}");
                    }
                    break;
                }
            }
            if n > 0 {
                timings.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(timings)
    })
    .await??;
    // Its socket closes with `ours`: it exits.
    child.wait().await?;
    let mut timings = timings;
    timings.sort_by(f64::total_cmp);
    Ok(timings[runs / 2])
}

/// Medians, over `runs` alternating runs, of `true` started and reaped
/// alone and `true` under this binary's supervisor (exec'd, launched,
/// reported and reaped — what a run costs when no supervisor was started
/// ahead of it): the supervisor's extra cost per task start, in
/// milliseconds.
async fn supervisor_start_cost(runs: usize) -> Result<(f64, f64)> {
    let launch = launch_of_true(false);
    let (mut direct, mut supervised) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        tokio::process::Command::new("true").status().await?;
        direct.push(started.elapsed().as_secs_f64() * 1000.0);

        let started = Instant::now();
        let (ours, mut child) = start_supervisor()?;
        let launch = launch.clone();
        // The supervisor reports and exits; its socket then reads as closed.
        tokio::task::spawn_blocking(move || {
            std::io::Write::write_all(&mut &ours, launch.as_bytes())?;
            let mut reports = String::new();
            std::io::Read::read_to_string(&mut &ours, &mut reports).map(|_| reports)
        })
        .await??
        .contains("ended 0 exited")
        .then_some(())
        .context("the supervisor did not report `true` exiting")?;
        child.wait().await?;
        supervised.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    direct.sort_by(f64::total_cmp);
    supervised.sort_by(f64::total_cmp);
    Ok((direct[runs / 2], supervised[runs / 2]))
}
