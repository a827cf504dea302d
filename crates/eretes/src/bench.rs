//! `eretes bench`: the figures in BENCHMARKS.md. Each scenario prints a human
//! line and, with `--json`, one JSON object as the last line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{GetRequest, KeyRange, Store};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{Cluster, Work};

/// The benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// No-op tasks end to end on the embedded store: submit → claim → complete.
    Throughput,
    /// Resident memory per running idle in-process task.
    Memory,
    /// A 3-node in-process cluster claims tasks submitted beforehand.
    ClusterClaim,
}

/// Options of `eretes bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Tasks to use (default: 100,000 for throughput and cluster-claim, 50,000 for memory).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    tasks: Option<u32>,
    /// Nodes to run (default: 1 for throughput and memory, 3 for cluster-claim).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: Option<u16>,
    /// Run against etcd at this URL instead of the embedded store.
    #[arg(long)]
    etcd: Option<String>,
    /// End with one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
}

/// The longest a benchmark may run before it gives up.
const LIMIT: Duration = Duration::from_secs(600);

/// Run a benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    if let Some(url) = &args.etcd {
        bail!("--etcd {url}: the etcd backend is not part of this build yet; run the benchmarks on the embedded store (omit --etcd)");
    }
    let report = match args.scenario {
        Scenario::Throughput => throughput(&args).await?,
        Scenario::Memory => memory(&args).await?,
        Scenario::ClusterClaim => cluster_claim(&args).await?,
    };
    if args.json {
        println!("{report}");
    }
    Ok(())
}

/// Names of `count` nodes: node-1, node-2, …
fn nodes(count: u16) -> Vec<String> {
    (1..=count).map(|i| format!("node-{i}")).collect()
}

/// A cluster with no nodes yet on a fresh embedded store, whose handlers do `work`.
fn bench_cluster(work: Work) -> Result<(Arc<EmbeddedStore>, Cluster)> {
    let store = EmbeddedStore::new();
    let cluster = Cluster::new(store.clone(), "bench", work, Duration::from_secs(10))?;
    Ok((store, cluster))
}

/// Start `count` nodes in `cluster`.
async fn add_nodes(cluster: &mut Cluster, count: u16) -> Result<()> {
    for name in nodes(count) {
        cluster.add_node(&name).await?;
    }
    Ok(())
}

/// Submit N no-op tasks while the nodes run them; the clock stops when the
/// store holds N results (counted from a watch, so only durable completions count).
async fn throughput(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Noop)?;
    add_nodes(&mut cluster, args.nodes.unwrap_or(1)).await?;
    let results = cluster.ns.results_prefix();
    let mut watch = store.watch(KeyRange::prefix(results), 0).await?;
    let started = Instant::now();
    let submitting = cluster.submit("noop", tasks);
    let counting = async {
        let mut done = 0usize;
        while done < tasks {
            let batch = watch.next().await.context("watch ended")??;
            done += batch.len();
        }
        anyhow::Ok(())
    };
    let (submitted, counted) =
        tokio::time::timeout(LIMIT, futures::future::join(submitting, counting))
            .await
            .context("throughput benchmark timed out")?;
    submitted?;
    counted?;
    let elapsed = started.elapsed();
    let rate = tasks as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {tasks} no-op tasks submitted, claimed and completed in {:.3} s = {:.0} tasks/s ({} node(s))",
        elapsed.as_secs_f64(),
        rate,
        cluster.nodes.len()
    );
    let nodes = cluster.nodes.len();
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "throughput",
        "tasks": tasks,
        "nodes": nodes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "tasks_per_s": rate.round(),
    }))
}

/// Resident set size of this process, in bytes, from /proc/self/statm.
fn resident_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("/proc/self/statm has no resident field")?
        .parse()
        .context("/proc/self/statm resident field is not a number")?;
    // The page size is 4 KiB on every Linux target this runs on.
    Ok(pages * 4096)
}

/// How long the memory benchmark lets the cluster settle before reading the
/// resident set: the node may still be applying the last claims' watch events.
const SETTLE: Duration = Duration::from_secs(1);

/// Wait until the cluster's nodes run `count` handlers between them, then
/// let it settle.
async fn wait_running(cluster: &Cluster, count: usize) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let running: usize = cluster
            .nodes
            .values()
            .map(|node| node.status().borrow().running)
            .sum();
        if running >= count {
            tokio::time::sleep(SETTLE).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {running} of {count} tasks were running within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many keys start with `prefix`, counted by the store without copying them.
async fn count_keys(store: &dyn Store, prefix: &str) -> Result<usize> {
    let request = GetRequest::new(KeyRange::prefix(prefix)).count_only();
    Ok(store.get(request).await?.count)
}

/// Wait until `count` tasks of the cluster's namespace have an owner.
async fn wait_owned(store: &dyn Store, prefix: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let owned = count_keys(store, prefix).await?;
        if owned >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {owned} of {count} tasks were claimed within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// RSS growth per running idle task: everything one more task costs the
/// process (its store keys, the node's cache entries, the handler task).
async fn memory(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(50_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Idle)?;
    add_nodes(&mut cluster, args.nodes.unwrap_or(1)).await?;
    // Warm up allocator pools with a first batch, so the measured growth is
    // the steady cost per task rather than one-off arena set-up.
    let warmup = tasks / 10;
    cluster.submit("warm", warmup).await?;
    wait_running(&cluster, warmup).await?;
    let before = resident_bytes()?;
    cluster.submit("idle", tasks).await?;
    wait_running(&cluster, warmup + tasks).await?;
    let after = resident_bytes()?;
    let per_task = after.saturating_sub(before) as f64 / tasks as f64;
    let running = count_keys(store.as_ref(), &cluster.ns.owners_prefix()).await?;
    println!(
        "memory: {running} idle tasks running; RSS grew {:.1} MiB for {tasks} tasks = {:.0} bytes per task",
        after.saturating_sub(before) as f64 / 1048576.0,
        per_task
    );
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "memory",
        "tasks": tasks,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_task": per_task.round(),
    }))
}

/// Submit N tasks first, then start the cluster and time until all are claimed.
async fn cluster_claim(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Idle)?;
    cluster.submit("claim", tasks).await?;
    let started = Instant::now();
    let node_count = args.nodes.unwrap_or(3);
    add_nodes(&mut cluster, node_count).await?;
    wait_owned(store.as_ref(), &cluster.ns.owners_prefix(), tasks).await?;
    let elapsed = started.elapsed();
    let rate = tasks as f64 / elapsed.as_secs_f64();
    println!(
        "cluster-claim: {node_count} nodes claimed {tasks} submitted tasks in {:.3} s = {:.0} claims/s",
        elapsed.as_secs_f64(),
        rate
    );
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "cluster-claim",
        "tasks": tasks,
        "nodes": node_count,
        "elapsed_ms": elapsed.as_millis() as u64,
        "claims_per_s": rate.round(),
    }))
}
