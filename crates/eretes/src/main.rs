//! # eretes — the command-line front end
//!
//! This binary is the agent layer's entry point (layer 6 of DESIGN.md). It
//! parses the command line and nothing below it does. Today it offers:
//!
//! * `eretes demo [--nodes N] [--tasks M] [--json]` — an in-process cluster on
//!   the embedded store that survives a node's abrupt death and rebalances
//!   onto a fresh node, with every figure measured by an observer;
//! * `eretes bench SCENARIO [--json]` — the benchmarks behind BENCHMARKS.md.
//!
//! ```text
//! $ eretes demo --nodes 3 --tasks 300 --json | tail -n 1
//! {"nodes":3,"tasks":300,"running":300,"lost":0,"overlaps":0,"failover_ms":2104,...}
//! ```

use anyhow::Result;
use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a node allocates and frees many
/// small records per task, and glibc's malloc spent a third of the
/// throughput benchmark's CPU time on them (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod cluster;
mod demo;
mod store_args;
mod witness;
mod witness_node;

/// Run long-lived tasks on a cluster: exactly one owner per task, moved when
/// nodes join, leave or die.
#[derive(Debug, Parser)]
#[command(name = "eretes", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an in-process cluster on the embedded store: submit tasks, kill a
    /// node, add one, and report what the cluster did.
    Demo(demo::DemoArgs),
    /// Run a benchmark scenario and report its figures.
    Bench(bench::BenchArgs),
    /// One node whose tasks run until stopped, recording every run in a
    /// witness file: the node process of the multi-process tests.
    #[command(hide = true)]
    WitnessNode(witness_node::WitnessNodeArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ERETES_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::WitnessNode(args) => witness_node::run(args).await,
        }
    })
}
