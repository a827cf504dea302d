//! `eretes bench idle`: what idle running process tasks cost a real agent.
//! N `sleep` tasks are submitted and left running; then, over a quiet
//! window, the agent's CPU time (from `/proc/<pid>/stat`), its threads and
//! its resident memory above the baseline it had before the tasks, per
//! task; the supervisors' proportional set size; and after every task is
//! removed, how much of that memory the agent gave back 30 s later, and
//! 75 s later. The baseline is read after a warm-up of a few tasks, run and
//! removed, so that the code the first run maps in is not counted as
//! memory the tasks held; the RSS before any task is reported beside it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::time::Instant;

use super::agent::{fresh_data_dir, pss_kib, BenchAgent};
use super::{wait_until_async_within, BenchArgs};

/// How long the agent's CPU time is measured with every task running.
const QUIET_WINDOW: Duration = Duration::from_secs(20);

/// How long after the tasks are removed its memory is read again.
const GIVE_BACK: Duration = Duration::from_secs(30);

/// A second reading, well after the agent's store has let go of the
/// removals (it keeps 20 s of watch history,
/// [`crate::agent::memory::AGENT_HISTORY_AGE`], where an
/// embedded store's default is a minute) and the agent gave the freed pages
/// back.
const AFTER_HISTORY: Duration = Duration::from_secs(75);

/// Idle process tasks: CPU, threads and memory of the agent.
pub(super) async fn idle(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(2_000) as usize;
    let agent = BenchAgent::start(args, fresh_data_dir()).await?;
    let (url, pid) = (agent.url.clone(), agent.pid);
    agent.measure(measure_idle(url, pid, tasks)).await
}

/// Tasks the warm-up runs and removes before the baseline is read.
const WARM_UP_TASKS: usize = 20;

async fn measure_idle(url: String, pid: i32, tasks: usize) -> Result<serde_json::Value> {
    let http = reqwest::Client::new();
    // Settled: the agent's own start is over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cold_kib = status_field(pid, "VmRSS:")?;
    let cold_anon_kib = status_field(pid, "RssAnon:")?;
    // The first runs map in the code a run needs (some 1.7 MiB of the
    // binary's pages, file-backed and shared with the page cache), once for
    // the agent's life: the baseline is read after a few tasks have run
    // and been removed, and the memory given back 30 s later, so that the
    // return below measures what the tasks held, not what the first run
    // loaded. The cold figures are reported too.
    start_sleeping_tasks(&http, &url, "warm", WARM_UP_TASKS).await?;
    remove_sleeping_tasks(&http, &url, pid, "warm", WARM_UP_TASKS).await?;
    tokio::time::sleep(GIVE_BACK).await;
    let baseline_kib = status_field(pid, "VmRSS:")?;
    // Anonymous memory (the heap) apart: the rest is mostly the binary's
    // pages, which more code run maps in.
    let baseline_anon_kib = status_field(pid, "RssAnon:")?;
    start_sleeping_tasks(&http, &url, "idle", tasks).await?;
    // Let the starts' work (logs, checkpoint files, store writes) finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_seconds(pid)?;
    let started = Instant::now();
    tokio::time::sleep(QUIET_WINDOW).await;
    let busy = cpu_seconds(pid)? - before;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_percent = busy / seconds * 100.0;
    let threads = status_field(pid, "Threads:")?;
    let running_kib = status_field(pid, "VmRSS:")?;
    let running_anon_kib = status_field(pid, "RssAnon:")?;
    let supervisors = super::agent::supervisors_of(pid);
    let supervisor_pss_kib: u64 = supervisors.iter().filter_map(|&child| pss_kib(child)).sum();
    let per_task_kib = running_kib.saturating_sub(baseline_kib) as f64 / tasks as f64;
    let anon_per_task_kib =
        running_anon_kib.saturating_sub(baseline_anon_kib) as f64 / tasks as f64;
    let supervisor_per_task_kib = supervisor_pss_kib as f64 / supervisors.len().max(1) as f64;
    println!(
        "{tasks} idle `sleep` tasks: the agent uses {cpu_percent:.2}% of a core over {seconds:.0} s \
         with {threads} threads; RSS {baseline_kib} KiB → {running_kib} KiB ({per_task_kib:.1} KiB \
         per task), each supervisor {supervisor_per_task_kib:.0} KiB PSS"
    );
    let removed_in = remove_sleeping_tasks(&http, &url, pid, "idle", tasks).await?;
    tokio::time::sleep(GIVE_BACK).await;
    let after_kib = status_field(pid, "VmRSS:")?;
    let after_anon_kib = status_field(pid, "RssAnon:")?;
    let after_over_baseline = after_kib as f64 / baseline_kib as f64;
    let after_over_cold = after_kib as f64 / cold_kib as f64;
    let anon_after_over_baseline = after_anon_kib as f64 / baseline_anon_kib.max(1) as f64;
    println!(
        "removed, and their processes gone, in {:.1} s; {} s later the agent's RSS is {after_kib} \
         KiB ({:.0}% of the baseline of {baseline_kib} KiB after {WARM_UP_TASKS} tasks, {:.0}% of \
         the {cold_kib} KiB it had before any), its heap {after_anon_kib} KiB ({:.0}% of the \
         baseline's {baseline_anon_kib} KiB)",
        removed_in.as_secs_f64(),
        GIVE_BACK.as_secs(),
        after_over_baseline * 100.0,
        after_over_cold * 100.0,
        anon_after_over_baseline * 100.0
    );
    tokio::time::sleep(AFTER_HISTORY - GIVE_BACK).await;
    let later_kib = status_field(pid, "VmRSS:")?;
    let later_anon_kib = status_field(pid, "RssAnon:")?;
    let later_over_baseline = later_kib as f64 / baseline_kib as f64;
    println!(
        "{} s after: RSS {later_kib} KiB ({:.0}% of the baseline), heap {later_anon_kib} KiB",
        AFTER_HISTORY.as_secs(),
        later_over_baseline * 100.0
    );
    if supervisors.len() < tasks {
        bail!(
            "only {} of {tasks} supervisors were found",
            supervisors.len()
        );
    }
    let ratio = |value: f64| (value * 100.0).round() / 100.0;
    Ok(json!({
        "scenario": "idle",
        "tasks": tasks,
        "agent_cpu_percent": ratio(cpu_percent),
        "agent_threads": threads,
        "cold_rss_kib": cold_kib,
        "cold_anon_kib": cold_anon_kib,
        "warm_up_tasks": WARM_UP_TASKS,
        "baseline_rss_kib": baseline_kib,
        "running_rss_kib": running_kib,
        "agent_kib_per_task": (per_task_kib * 10.0).round() / 10.0,
        "agent_anon_kib_per_task": (anon_per_task_kib * 10.0).round() / 10.0,
        "supervisor_pss_kib_per_task": supervisor_per_task_kib.round(),
        "total_kib_per_task": (per_task_kib + supervisor_per_task_kib).round(),
        "removal_s": (removed_in.as_secs_f64() * 10.0).round() / 10.0,
        "rss_after_removal_kib": after_kib,
        "rss_after_removal_over_baseline": ratio(after_over_baseline),
        "rss_after_removal_over_cold": ratio(after_over_cold),
        "baseline_anon_kib": baseline_anon_kib,
        "anon_after_removal_kib": after_anon_kib,
        "anon_after_removal_over_baseline": ratio(anon_after_over_baseline),
        "rss_75s_after_removal_kib": later_kib,
        "rss_75s_after_removal_over_baseline": ratio(later_over_baseline),
        "anon_75s_after_removal_kib": later_anon_kib,
    }))
}

/// Submit `count` tasks that run `sleep SECONDS`, `{prefix}-0` onwards.
pub(super) async fn submit_sleeping_tasks(
    http: &reqwest::Client,
    url: &str,
    prefix: &str,
    count: usize,
    seconds: u32,
) -> Result<()> {
    for n in 0..count {
        http.post(format!("{url}/v1/tasks"))
            .json(&json!({
                "id": format!("{prefix}-{n}"),
                "program": "sleep",
                "args": [seconds.to_string()],
            }))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Submit `count` tasks that sleep for an hour, `{prefix}-0` onwards, and
/// wait until every one runs.
async fn start_sleeping_tasks(
    http: &reqwest::Client,
    url: &str,
    prefix: &str,
    count: usize,
) -> Result<()> {
    submit_sleeping_tasks(http, url, prefix, count, 3600).await?;
    // The agent's count, not a scan of /proc: with tens of thousands of
    // processes a scan takes longer than the wait between two.
    let ready = format!("{url}/readyz");
    let limit = Duration::from_secs(30) + Duration::from_millis(5) * count as u32;
    wait_until_async_within("every idle task runs", limit, || async {
        let running = async {
            http.get(&ready)
                .send()
                .await?
                .json::<serde_json::Value>()
                .await
        };
        running
            .await
            .is_ok_and(|status| status["running"].as_u64() >= Some(count as u64))
    })
    .await
}

/// Remove the tasks [`start_sleeping_tasks`] started, and wait until their
/// supervisors are gone; returns how long that took.
async fn remove_sleeping_tasks(
    http: &reqwest::Client,
    url: &str,
    pid: i32,
    prefix: &str,
    count: usize,
) -> Result<Duration> {
    let removing = Instant::now();
    for n in 0..count {
        http.delete(format!("{url}/v1/tasks/{prefix}-{n}"))
            .send()
            .await?
            .error_for_status()?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    // Until no supervisor runs one of them (those kept for later runs,
    // and the one started ahead, run none).
    while !super::agent::supervisors_of(pid).is_empty() {
        if Instant::now() > deadline {
            bail!("the removed tasks' supervisors still run after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(removing.elapsed())
}

/// A `Name: value kB`-style field of `/proc/<pid>/status`, as a number.
pub(super) fn status_field(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))
}

/// User and system CPU time of `pid` (its threads included), in seconds.
pub(super) fn cpu_seconds(pid: i32) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(cpu_ticks(pid)? as f64 / per_second)
}

/// User and system CPU time of `pid` (its threads included), in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: the fields start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("the stat line")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here,
    // counted from 0 after the name.
    let field = |n: usize| -> Result<u64> { Ok(fields.get(n).context("stat field")?.parse()?) };
    Ok(field(11)? + field(12)?)
}
