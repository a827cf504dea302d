//! `eretes graph node` (hidden): one regression node in a process of its
//! own — a node runtime and a graph node, on etcd — for `eretes graph
//! regression --processes`, which starts several and `kill -9`s them.
//!
//! Every 100 ms it writes its data request and meta counters to
//! `--stats-file` (written to a temporary file, then renamed, so the file
//! is always whole): a process killed with SIGKILL loses at most its last
//! 100 ms of counts. On SIGTERM or SIGINT it drains and writes them once more.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use eretes_graph::driver::{regression_kinds, regression_node_config, NodeReport};
use eretes_graph::regression::Regression;
use eretes_graph::GraphNode;
use eretes_protocol::{Coordinator, Namespace, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::Node;
use tokio::signal::unix::{signal, SignalKind};

use crate::store_args::StoreArgs;

/// Options of `eretes graph node`.
#[derive(Debug, Args)]
pub struct GraphNodeArgs {
    /// The run's namespace.
    #[arg(long)]
    namespace: String,
    /// This node's name, unique among live nodes.
    #[arg(long)]
    name: String,
    /// The node's lease TTL in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(300..=60_000))]
    lease_ttl_ms: u64,
    /// Where its counters are written.
    #[arg(long, value_name = "FILE")]
    stats_file: PathBuf,
    /// The store (etcd: several processes share it).
    #[command(flatten)]
    store: StoreArgs,
}

/// Run the node until SIGTERM or SIGINT.
pub async fn run(args: GraphNodeArgs) -> Result<()> {
    if !args.store.is_etcd() {
        bail!("eretes graph node needs --etcd: node processes share one store");
    }
    let ns = Namespace::new(&args.namespace).context("--namespace")?;
    let name = NodeName::new(&args.name).context("--name")?;
    // Before the node registers: a file that cannot be written would
    // otherwise stop it only after it claimed tasks.
    write_stats(&args.stats_file, NodeReport::default())
        .context("--stats-file cannot be written")?;
    // Its data server takes a descriptor per peer connection, as the agent's
    // API does: at a soft limit of 1,024, a thousand idle connections left
    // it none to write its counters with.
    crate::agent::server::raise_open_file_limit();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let store = args.store.open().await?;
    let graph = GraphNode::start(
        Coordinator::new(store.clone(), ns.clone()),
        name.clone(),
        regression_kinds(Arc::new(Regression::new())),
        "127.0.0.1:0".parse().expect("an address"),
    )
    .await?;
    let config =
        regression_node_config(name.clone(), ns, Duration::from_millis(args.lease_ttl_ms))?;
    let node = Node::start(
        store,
        config,
        graph.handler(),
        graph.balancer(Box::new(FairBalancer::default())),
    )
    .await
    .with_context(|| format!("starting node {name}"))?;
    graph.publish_address(node.status());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A write that fails (no descriptor free, a full disk) is
                // retried at the next tick; the node runs on meanwhile.
                if let Err(error) = write_stats(&args.stats_file, NodeReport::of(&graph)) {
                    tracing::warn!(error = format!("{error:#}"), "cannot write the node's counters");
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    node.shutdown().await;
    graph.stop();
    write_stats(&args.stats_file, NodeReport::of(&graph))
}

fn write_stats(path: &Path, report: NodeReport) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory", path.display());
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec(&report)?)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}
