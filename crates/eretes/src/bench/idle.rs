//! `eretes bench idle`: what idle running process tasks cost a real agent.
//! N `sleep` tasks are submitted and left running; then, over a quiet
//! window, the agent's CPU time (from `/proc/<pid>/stat`), its threads and
//! its resident memory above the baseline it had before the tasks, per
//! task; the supervisors' proportional set size; and after every task is
//! removed, how much of that memory the agent gave back 30 s later, and
//! 75 s later.

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

async fn measure_idle(url: String, pid: i32, tasks: usize) -> Result<serde_json::Value> {
    let http = reqwest::Client::new();
    // Settled: the agent's own start is over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_kib = status_field(pid, "VmRSS:")?;
    // Anonymous memory (the heap) apart: the rest is mostly the binary's
    // pages, which more code run maps in.
    let baseline_anon_kib = status_field(pid, "RssAnon:")?;
    for n in 0..tasks {
        http.post(format!("{url}/v1/tasks"))
            .json(&json!({ "id": format!("idle-{n}"), "program": "sleep", "args": ["3600"] }))
            .send()
            .await?
            .error_for_status()?;
    }
    // The agent's count, not a scan of /proc: with tens of thousands of
    // processes a scan takes longer than the wait between two.
    let ready = format!("{url}/readyz");
    let limit = Duration::from_secs(30) + Duration::from_millis(5) * tasks as u32;
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
            .is_ok_and(|status| status["running"].as_u64() >= Some(tasks as u64))
    })
    .await?;
    // Let the starts' work (logs, checkpoint files, store writes) finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(QUIET_WINDOW).await;
    let ticks = cpu_ticks(pid)? - before;
    let seconds = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_percent = ticks as f64 / per_second / seconds * 100.0;
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
    let removing = Instant::now();
    for n in 0..tasks {
        http.delete(format!("{url}/v1/tasks/idle-{n}"))
            .send()
            .await?
            .error_for_status()?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    // One supervisor is kept started ahead, for the next task.
    while super::agent::supervisors_of(pid).len() > 1 {
        if Instant::now() > deadline {
            bail!("the removed tasks' supervisors still run after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let removed_in = removing.elapsed();
    tokio::time::sleep(GIVE_BACK).await;
    let after_kib = status_field(pid, "VmRSS:")?;
    let after_anon_kib = status_field(pid, "RssAnon:")?;
    let after_over_baseline = after_kib as f64 / baseline_kib as f64;
    let anon_after_over_baseline = after_anon_kib as f64 / baseline_anon_kib.max(1) as f64;
    println!(
        "removed, and their processes gone, in {:.1} s; {} s later the agent's RSS is {after_kib} \
         KiB ({:.0}% of the baseline), its heap {after_anon_kib} KiB ({:.0}% of the baseline's \
         {baseline_anon_kib} KiB)",
        removed_in.as_secs_f64(),
        GIVE_BACK.as_secs(),
        after_over_baseline * 100.0,
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
    Ok(json!({
        "scenario": "idle",
        "tasks": tasks,
        "agent_cpu_percent": (cpu_percent * 100.0).round() / 100.0,
        "agent_threads": threads,
        "baseline_rss_kib": baseline_kib,
        "running_rss_kib": running_kib,
        "agent_kib_per_task": (per_task_kib * 10.0).round() / 10.0,
        "agent_anon_kib_per_task": (anon_per_task_kib * 10.0).round() / 10.0,
        "supervisor_pss_kib_per_task": supervisor_per_task_kib.round(),
        "total_kib_per_task": (per_task_kib + supervisor_per_task_kib).round(),
        "removal_s": (removed_in.as_secs_f64() * 10.0).round() / 10.0,
        "rss_after_removal_kib": after_kib,
        "rss_after_removal_over_baseline": (after_over_baseline * 100.0).round() / 100.0,
        "baseline_anon_kib": baseline_anon_kib,
        "anon_after_removal_kib": after_anon_kib,
        "anon_after_removal_over_baseline": (anon_after_over_baseline * 100.0).round() / 100.0,
        "rss_75s_after_removal_kib": later_kib,
        "rss_75s_after_removal_over_baseline": (later_over_baseline * 100.0).round() / 100.0,
        "anon_75s_after_removal_kib": later_anon_kib,
    }))
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
