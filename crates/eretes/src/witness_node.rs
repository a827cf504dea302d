//! `eretes witness-node` (hidden): one node in a process of its own, whose
//! tasks run until they are stopped and leave a witness record of every run.
//!
//! The multi-process tests (`tests/processes.rs`) start several of these on a
//! real etcd, then `kill -9` them, stop etcd under them or cut their
//! connection, and read the witness file afterwards to check what really
//! ran: that no two runs of one task overlapped, that every orphan ran again,
//! and how soon. The file is the only evidence that does not come from the
//! store itself, which is the point: an overlap the store did not see would
//! still show here.
//!
//! Each run appends two lines (`O_APPEND`, one `write` each, so lines from
//! several processes never interleave within a line):
//!
//! ```text
//! {"event":"start","task":"t-0001","node":"n1","epoch":812,"at_us":1795432100123456}
//! {"event":"stop","task":"t-0001","node":"n1","epoch":812,"at_us":1795432104120001}
//! ```
//!
//! `at_us` is wall-clock time in microseconds since the Unix epoch, so lines
//! from different processes on one machine can be compared. A process killed
//! with SIGKILL writes no `stop` lines: its runs ended when it died.
//!
//! On SIGTERM or SIGINT the node drains (stops its handlers, releases their
//! tasks, deregisters) and prints its counters as one JSON object, the last
//! line of standard output; a second signal exits at once.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use eretes_protocol::{Namespace, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Handler, HandlerOutcome, Node, TaskContext};
use tokio::signal::unix::{signal, SignalKind};

use crate::cluster::quick_node_config;
use crate::store_args::StoreArgs;
use crate::witness::{now_us, WitnessLine};

/// Options of `eretes witness-node`.
#[derive(Debug, Args)]
pub struct WitnessNodeArgs {
    /// The cluster's namespace.
    #[arg(long)]
    namespace: String,
    /// This node's name, unique among live nodes.
    #[arg(long)]
    name: String,
    /// The node's lease TTL in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    lease_ttl_ms: u64,
    /// The witness file every run is appended to (created if missing).
    #[arg(long, value_name = "FILE")]
    record: PathBuf,
    /// The store: embedded unless --etcd is given.
    #[command(flatten)]
    store: StoreArgs,
}

/// Appends every run's start and stop to the witness file, and otherwise
/// runs until cancelled.
struct WitnessHandler {
    file: File,
}

impl WitnessHandler {
    fn record(&self, event: &str, ctx: &TaskContext) {
        let line = WitnessLine {
            event: event.to_string(),
            task: ctx.id.to_string(),
            node: ctx.node.to_string(),
            epoch: ctx.epoch,
            at_us: now_us(),
        };
        let mut text = serde_json::to_string(&line).expect("a witness line serializes");
        text.push('\n');
        // One write of the whole line: with O_APPEND the kernel keeps it
        // contiguous even when several processes append at once.
        if let Err(error) = (&self.file).write_all(text.as_bytes()) {
            tracing::error!(%error, "cannot append to the witness file");
        }
    }
}

#[async_trait::async_trait]
impl Handler for WitnessHandler {
    async fn run(&self, ctx: TaskContext) -> HandlerOutcome {
        self.record("start", &ctx);
        ctx.cancel.cancelled().await;
        self.record("stop", &ctx);
        HandlerOutcome::Release
    }
}

/// Run the node until SIGTERM or SIGINT, then drain and print its counters.
pub async fn run(args: WitnessNodeArgs) -> Result<()> {
    let namespace = Namespace::new(&args.namespace).context("--namespace")?;
    let name = NodeName::new(&args.name).context("--name")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.record)
        .with_context(|| format!("opening the witness file {}", args.record.display()))?;
    // Installed before the node starts, so a signal that arrives as soon as
    // "ready" is printed still drains the node.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let store = args.store.open().await?;
    let config = quick_node_config(name, namespace, Duration::from_millis(args.lease_ttl_ms));
    let node = Node::start(
        store,
        config,
        Arc::new(WitnessHandler { file }),
        Box::new(FairBalancer::default()),
    )
    .await
    .with_context(|| format!("starting node {}", args.name))?;
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "node": args.name })
    );

    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    let stats = node.stats().clone();
    tokio::select! {
        _ = node.shutdown() => {}
        _ = terminate.recv() => std::process::exit(130),
        _ = interrupt.recv() => std::process::exit(130),
    }
    println!("{}", serde_json::to_string(&stats.snapshot())?);
    Ok(())
}
