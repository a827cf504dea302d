//! `eretes bench ended`: what ended tasks cost a real agent, kept forever
//! and with a short result retention. Each agent runs three rounds of N
//! `true` tasks (8 clients submitting); after each round ends, and a
//! settling wait, its heap (`RssAnon`) and resident set are read. Kept
//! forever, every ended task's result stays in the embedded store, which
//! holds the namespace in memory: the heap grows by the same amount each
//! round. With a retention of 10 s the agent deletes them, and the heap
//! stays where the first round left it.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::agent::{fresh_data_dir, submit_rate, BenchAgent};
use super::idle::status_field;
use super::{wait_until_async_within, BenchArgs};

/// Rounds of tasks each agent runs.
const ROUNDS: usize = 3;

/// The short retention measured against keeping everything.
const RETENTION: &str = "10s";

/// How long after a round's tasks ended its memory is read: the retention
/// (10 s), the sweep that deletes them (every 2.5 s, and a few seconds for
/// 10,000 deletions), then the store's 20 s of watch history and the look
/// after it at which the agent expires the history and trims the heap
/// (5 s apart, counted from the last deletion).
const SETTLE: Duration = Duration::from_secs(60);

/// Ended tasks' memory, kept forever and with a short retention.
pub(super) async fn ended(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(10_000) as usize;
    let mut report = serde_json::Map::new();
    report.insert("scenario".into(), json!("ended"));
    report.insert("tasks_per_round".into(), json!(tasks));
    for (name, retention) in [("kept", "forever"), ("expired", RETENTION)] {
        let agent =
            BenchAgent::start_with(args, fresh_data_dir(), &["--result-retention", retention])
                .await?;
        let (url, pid) = (agent.url.clone(), agent.pid);
        let rounds = agent.measure(rounds(url, pid, tasks)).await?;
        let heaps: Vec<u64> = rounds.iter().map(|r| r.heap_kib).collect();
        println!(
            "{ROUNDS} rounds of {tasks} `true` tasks, results {name} (--result-retention {retention}): \
             heap {} KiB before, {heaps:?} KiB {} s after each round",
            rounds[0].baseline_heap_kib,
            SETTLE.as_secs()
        );
        // What each round after the first added, per ended task.
        let growth = heaps[ROUNDS - 1].saturating_sub(heaps[0]) as f64 * 1024.0
            / ((ROUNDS - 1) * tasks) as f64;
        report.insert(
            name.into(),
            json!({
                "retention": retention,
                "baseline_heap_kib": rounds[0].baseline_heap_kib,
                "heap_kib_after_rounds": heaps,
                "rss_kib_after_rounds": rounds.iter().map(|r| r.rss_kib).collect::<Vec<_>>(),
                "heap_bytes_per_ended_task_after_the_first_round": growth.round(),
            }),
        );
    }
    Ok(serde_json::Value::Object(report))
}

/// What one round left.
struct Round {
    /// The agent's heap before the first round.
    baseline_heap_kib: u64,
    /// Its heap [`SETTLE`] after this round's tasks ended.
    heap_kib: u64,
    /// Its resident set then.
    rss_kib: u64,
}

/// Run [`ROUNDS`] rounds of `tasks` `true` tasks on the agent at `url`
/// (process `pid`), reading its memory after each.
async fn rounds(url: String, pid: i32, tasks: usize) -> Result<Vec<Round>> {
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_heap_kib = status_field(pid, "RssAnon:")?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        submit_rate(&http, &url, &format!("round{round}"), "default", tasks).await?;
        let limit = Duration::from_secs(60) + Duration::from_millis(10) * tasks as u32;
        wait_until_async_within("every task of the round ended", limit, || {
            every_task_ended(&http, &url)
        })
        .await?;
        tokio::time::sleep(SETTLE).await;
        rounds.push(Round {
            baseline_heap_kib,
            heap_kib: status_field(pid, "RssAnon:")?,
            rss_kib: status_field(pid, "VmRSS:")?,
        });
    }
    Ok(rounds)
}

/// Whether no task is pending or running.
async fn every_task_ended(http: &reqwest::Client, url: &str) -> bool {
    let mut idle = true;
    for state in ["pending", "running"] {
        let page = async {
            http.get(format!("{url}/v1/tasks?state={state}&limit=1"))
                .send()
                .await?
                .json::<serde_json::Value>()
                .await
        };
        idle &= page
            .await
            .is_ok_and(|body| body["tasks"].as_array().is_some_and(Vec::is_empty));
    }
    idle
}
