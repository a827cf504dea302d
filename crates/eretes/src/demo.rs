//! `eretes demo`: a cluster on the embedded store (or, with `--etcd`, on a
//! real etcd) loses a node abruptly and gains a fresh one; an observer
//! measures what really happened.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use eretes_protocol::NodeName;
use eretes_runtime::balancer::{min_moves, GroupLoad};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::{Cluster, Work};
use crate::store_args::StoreArgs;

/// Options of `eretes demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes at the start (one is killed, one added later).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,
    /// Long-running tasks to submit.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tasks: u32,
    /// The nodes' lease TTL in milliseconds: how long a dead node's tasks wait.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    lease_ttl_ms: u64,
    /// End with one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
    /// The store: embedded unless --etcd is given.
    #[command(flatten)]
    store: StoreArgs,
}

/// The demo's figures, all measured by the observer.
#[derive(Debug, Serialize)]
struct Summary {
    nodes: usize,
    tasks: usize,
    running: usize,
    lost: usize,
    overlaps: usize,
    failover_ms: u64,
    ttl_ms: u64,
    killed_tasks: usize,
    moved: usize,
    min_moved: usize,
    spread: usize,
    elapsed_ms: u64,
}

/// The longest any phase may take before the demo gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

/// Poll `done` until it holds, updating the bar; fail naming `what` after the limit.
async fn wait_for(
    bar: &ProgressBar,
    what: &str,
    mut done: impl FnMut(&ProgressBar) -> bool,
) -> Result<()> {
    bar.set_message(what.to_string());
    let deadline = Instant::now() + PHASE_LIMIT;
    while !done(bar) {
        if Instant::now() > deadline {
            bail!("timed out after {PHASE_LIMIT:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Max − min of running tasks over `nodes`.
fn spread(cluster: &Cluster, nodes: &[String]) -> usize {
    let per_node = cluster.observer.running_per_node();
    let counts: Vec<usize> = nodes
        .iter()
        .map(|n| per_node.get(n).copied().unwrap_or(0))
        .collect();
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// Run the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let (node_count, task_count) = (args.nodes as usize, args.tasks as usize);
    let ttl = Duration::from_millis(args.lease_ttl_ms);
    let store = args.store.open().await?;
    // On etcd the demo gets a namespace of its own, so runs never meet each
    // other's tasks, and removes it at the end.
    let (namespace, backend) = match &args.store.etcd {
        Some(urls) => (
            format!("demo-{:08x}", rand::random::<u32>()),
            format!("etcd at {urls}"),
        ),
        None => ("demo".to_string(), "embedded store".to_string()),
    };
    let mut cluster = Cluster::new(store, &namespace, Work::Observed, ttl)?;
    let mut live: Vec<String> = (1..=node_count).map(|i| format!("node-{i}")).collect();
    for name in &live {
        cluster.add_node(name).await?;
    }
    let bar = ProgressBar::new(task_count as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg:48} [{bar:30}] {pos}/{len} running")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let running = |bar: &ProgressBar, cluster: &Cluster| {
        let n = cluster.observer.running_tasks();
        bar.set_position(n as u64);
        n
    };

    cluster.submit("task", task_count).await?;
    wait_for(&bar, "submitted; waiting until every task runs", |bar| {
        running(bar, &cluster) == task_count
    })
    .await?;
    let all_running_ms = started.elapsed().as_millis();

    // Kill a node abruptly: no release, no deregistration; its lease lapses.
    let victim = live.remove(0);
    let orphans = cluster.observer.running_on(&victim);
    let killed_at = Instant::now();
    cluster.nodes[&victim].kill();
    wait_for(
        &bar,
        &format!("killed {victim}; waiting for its orphans"),
        |bar| {
            running(bar, &cluster) == task_count
                && cluster.observer.last_restart(&orphans, killed_at).is_some()
                && orphans
                    .iter()
                    .all(|t| !cluster.observer.running_on(&victim).contains(t))
        },
    )
    .await?;
    let failover = cluster
        .observer
        .last_restart(&orphans, killed_at)
        .map(|at| at - killed_at)
        .unwrap_or_default();

    // A fresh node joins; the fair balancer moves the fewest tasks it can.
    let fresh = format!("node-{}", node_count + 1);
    let mut load = GroupLoad::default();
    let per_node = cluster.observer.running_per_node();
    for name in live.iter().chain(std::iter::once(&fresh)) {
        let name = NodeName::new(name.clone())?;
        load.owned.insert(
            name.clone(),
            per_node.get(name.as_str()).copied().unwrap_or(0),
        );
        load.serving.insert(name);
    }
    let min_moved = min_moves(&load);
    let joined_at = Instant::now();
    cluster.add_node(&fresh).await?;
    live.push(fresh.clone());
    let quiet = Duration::from_millis(1500);
    wait_for(
        &bar,
        &format!("added {fresh}; waiting for balance"),
        |bar| {
            running(bar, &cluster) == task_count
                && spread(&cluster, &live) <= 1
                && cluster
                    .observer
                    .last_start()
                    .is_some_and(|at| at.elapsed() >= quiet)
        },
    )
    .await?;
    bar.finish_and_clear();

    let summary = Summary {
        nodes: live.len(),
        tasks: task_count,
        running: cluster.observer.running_tasks(),
        lost: task_count - cluster.observer.running_tasks(),
        overlaps: cluster.observer.overlaps(),
        failover_ms: failover.as_millis() as u64,
        ttl_ms: ttl.as_millis() as u64,
        killed_tasks: orphans.len(),
        moved: cluster.observer.moves_since(joined_at),
        min_moved,
        spread: spread(&cluster, &live),
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let (store, root) = (cluster.store.clone(), cluster.ns.root().to_string());
    cluster.shutdown().await;
    if args.store.is_etcd() {
        store
            .delete(eretes_store::DeleteRequest::new(
                eretes_store::KeyRange::prefix(root),
            ))
            .await?;
    }

    println!(
        "eretes demo: {node_count} nodes, {task_count} tasks, {backend} (namespace {namespace})"
    );
    println!("  every task running after {all_running_ms} ms");
    println!(
        "  killed {victim} with {} tasks: the last orphan ran again after {} ms (lease TTL {} ms)",
        summary.killed_tasks, summary.failover_ms, summary.ttl_ms
    );
    println!(
        "  added {fresh}: {} tasks moved (the fewest possible: {}); spread {}",
        summary.moved, summary.min_moved, summary.spread
    );
    println!(
        "  running {}, lost {}, overlapping runs {}",
        summary.running, summary.lost, summary.overlaps
    );
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if summary.overlaps > 0 || summary.lost > 0 {
        bail!(
            "the demo saw {} overlaps and {} lost tasks",
            summary.overlaps,
            summary.lost
        );
    }
    Ok(())
}
