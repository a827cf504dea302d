//! The list benchmark: N tasks (default 100,000) written straight into a
//! durable store, pending in a group nobody serves; then a real agent on
//! that store, and the latency of `GET /v1/tasks` through its API. In the
//! same run, the time of one read of the whole namespace, which is what
//! every page cost before the agent kept its own index.

use std::sync::Arc;

use anyhow::{Context, Result};
use eretes_protocol::{encode, Coordinator, GroupName, Namespace, TaskId, TaskRecord, TaskSpec};
use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore, DEFAULT_MAX_TXN_OPS};
use eretes_store::{PutRequest, Store, Txn, TxnOp};
use serde_json::json;
use tokio::time::Instant;

use super::agent::{fresh_data_dir, BenchAgent};
use super::BenchArgs;

/// Requests timed per kind of page.
const SAMPLES: usize = 50;

pub(super) async fn list(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let data_dir = fresh_data_dir();
    std::fs::create_dir_all(&data_dir)?;
    let full_read_ms = fill(&data_dir, tasks).await?;
    let agent = BenchAgent::start(args, data_dir).await?;
    let (url, pid) = (agent.url.clone(), agent.pid);
    let mut report = agent.measure(measure(&url, tasks, pid)).await?;
    report["full_read_ms"] = json!(full_read_ms);
    report["full_read_per_page"] =
        json!(full_read_ms / report["first_page_ms"].as_f64().unwrap_or(f64::NAN));
    println!(
        "list of {tasks} tasks: first page of 100 {:.2} ms, a middle page {:.2} ms, \
         a filter matching nothing {:.1} ms, all pages {:.0} ms; \
         one read of the whole namespace (the old cost of every page) {full_read_ms:.0} ms; \
         agent RSS {} MiB",
        report["first_page_ms"].as_f64().unwrap_or(f64::NAN),
        report["middle_page_ms"].as_f64().unwrap_or(f64::NAN),
        report["no_match_ms"].as_f64().unwrap_or(f64::NAN),
        report["all_pages_ms"].as_f64().unwrap_or(f64::NAN),
        report["agent_rss_mib"],
    );
    Ok(report)
}

/// Write `tasks` task records into the agent's store file, many per
/// transaction; then time reading them all back in one snapshot (median of
/// 5), as each page did before.
async fn fill(data_dir: &std::path::Path, tasks: usize) -> Result<f64> {
    let store: Arc<dyn Store> =
        EmbeddedStore::open_durable(&data_dir.join("store.redb"), EmbeddedOptions::default())?;
    let ns = Namespace::new("eretes")?;
    let spec = TaskSpec::new(
        GroupName::new("nobody")?,
        json!({"program": "sleep", "args": ["1000"]}),
    );
    let value = encode(&TaskRecord {
        spec,
        submitted_at_ms: eretes_protocol::now_ms(),
    });
    let ids: Vec<TaskId> = (0..tasks)
        .map(|n| TaskId::new(format!("task-{n:07}")))
        .collect::<Result<_, _>>()?;
    for chunk in ids.chunks(DEFAULT_MAX_TXN_OPS) {
        let txn = chunk.iter().fold(Txn::new(), |txn, id| {
            txn.and_then(TxnOp::Put(PutRequest::new(ns.task(id), value.clone())))
        });
        store.txn(txn).await.context("filling the store")?;
    }
    let coordinator = Coordinator::new(store, ns);
    let mut reads = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let snapshot = coordinator.snapshot().await?;
        reads.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(snapshot.tasks.len() == tasks, "the store holds every task");
    }
    Ok(median(reads))
}

async fn measure(url: &str, tasks: usize, pid: i32) -> Result<serde_json::Value> {
    let http = reqwest::Client::new();
    let page = |query: String| {
        let http = http.clone();
        let url = format!("{url}/v1/tasks?{query}");
        async move {
            let started = Instant::now();
            let body: serde_json::Value = http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok::<_, anyhow::Error>((started.elapsed().as_secs_f64() * 1000.0, body))
        }
    };
    // The agent answers from the store until its index has loaded: wait
    // until a scrape (whose task counts come from the index) adds no store
    // read to the count of them.
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let mut before = store_reads(&http, url).await?;
    loop {
        let now = store_reads(&http, url).await?;
        if now == before {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent's index did not load");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        before = now;
    }
    let timed = |query: String, samples: usize, expected: usize| {
        let page = &page;
        async move {
            let mut times = Vec::with_capacity(samples);
            for _ in 0..samples {
                let (ms, body) = page(query.clone()).await?;
                let listed = body["tasks"].as_array().map_or(0, Vec::len);
                anyhow::ensure!(listed == expected, "a page of {listed}, not {expected}");
                times.push(ms);
            }
            Ok::<_, anyhow::Error>(median(times))
        }
    };
    let first_page_ms = timed("limit=100".into(), SAMPLES, 100.min(tasks)).await?;
    let middle = format!("limit=100&after=task-{:07}", tasks / 2);
    let middle_page_ms = timed(middle, SAMPLES, 100.min(tasks - tasks / 2 - 1)).await?;
    // Every task is pending: a filter for running ones looks at them all.
    let no_match_ms = timed("limit=100&state=running".into(), 10, 0).await?;
    let started = Instant::now();
    let (mut after, mut listed) = (None::<String>, 0);
    loop {
        let mut query = "limit=1000".to_string();
        if let Some(after) = &after {
            query.push_str(&format!("&after={after}"));
        }
        let (_, body) = page(query).await?;
        listed += body["tasks"].as_array().map_or(0, Vec::len);
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let all_pages_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(listed == tasks, "listed {listed} of {tasks} tasks");
    Ok(json!({
        "scenario": "list",
        "tasks": tasks,
        "first_page_ms": first_page_ms,
        "middle_page_ms": middle_page_ms,
        "no_match_ms": no_match_ms,
        "all_pages_ms": all_pages_ms,
        "agent_rss_mib": rss_mib(pid)?,
    }))
}

/// How many of the agent's list reads went to the store, from its metrics
/// (0 for an agent of a build before the index, which always reads there).
async fn store_reads(http: &reqwest::Client, url: &str) -> Result<u64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("eretes_task_list_store_reads_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0))
}

/// The resident set of process `pid`, in MiB.
fn rss_mib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/PID/status")?;
    Ok(kib / 1024)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
