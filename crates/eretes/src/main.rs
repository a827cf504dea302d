//! # eretes — the command-line front end
//!
//! This binary is the agent layer's entry point (layer 6 of DESIGN.md). It
//! parses the command line and nothing below it does. It offers:
//!
//! * `eretes agent` — one node running process tasks, with the HTTP API
//!   (`agent/api/`) and Prometheus metrics;
//! * `submit`, `ls`, `show`, `wait`, `logs`, `rm`, `nodes`, `node`, and
//!   `task ID pause|resume|sleep DURATION|kill` — the CLI that talks to an
//!   agent (`client/`);
//! * `eretes demo [--nodes N] [--tasks M] [--json]` — an in-process cluster on
//!   the embedded store that survives a node's abrupt death and rebalances
//!   onto a fresh node, with every figure measured by an observer;
//! * `eretes bench SCENARIO [--json]` — the benchmarks behind BENCHMARKS.md;
//! * `eretes chaos [--agents N] [--duration D] [--seed N] [--json]` — a
//!   Jepsen-style run of real agents on a real etcd cluster under faults,
//!   checked by a fenced witness (`chaos/`);
//! * `eretes supervise` (hidden) — the supervisor every process task runs
//!   under (`eretes_exec::supervisor`), started by the agent, never by hand.
//!
//! ```text
//! $ eretes demo --nodes 3 --tasks 300 --json | tail -n 1
//! {"nodes":3,"tasks":300,"running":300,"lost":0,"overlaps":0,"failover_ms":2104,...}
//! ```

use anyhow::Result;
use clap::{Parser, Subcommand};

mod agent;
mod bench;
mod chaos;
mod client;
mod cluster;
mod demo;
mod graph;
mod secrets;
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
    /// Run an agent: one node that runs process tasks, and the HTTP API the
    /// other commands talk to.
    Agent(Box<agent::AgentArgs>),
    /// Submit a process task: `eretes submit [OPTIONS] -- PROGRAM ARGS..`.
    Submit(client::SubmitArgs),
    /// List tasks.
    Ls(client::LsArgs),
    /// Show one task.
    Show(client::ShowArgs),
    /// Wait until tasks end; exits non-zero if any failed or was killed.
    Wait(client::WaitArgs),
    /// Print a task's output (from the agent that ran it).
    Logs(client::LogsArgs),
    /// Delete a task, stopping it wherever it runs.
    Rm(client::RmArgs),
    /// List live nodes.
    Nodes(client::NodesArgs),
    /// Send a command to a node: freeze, unfreeze, balance, drain, stop-task ID.
    Node(client::NodeArgs),
    /// Send a command to a task: pause, resume, sleep DURATION, kill.
    Task(client::TaskArgs),
    /// Run an in-process cluster on the embedded store: submit tasks, kill a
    /// node, add one, and report what the cluster did.
    Demo(demo::DemoArgs),
    /// Run a benchmark scenario and report its figures.
    Bench(bench::BenchArgs),
    /// Check the guarantees under faults: real agents on a real etcd
    /// cluster, a witness workload, a nemesis and a checker.
    Chaos(chaos::ChaosArgs),
    /// Task graphs: `eretes graph regression` runs taskgraph's regression
    /// job while killing nodes.
    Graph(graph::GraphArgs),
    /// One node whose tasks run until stopped, recording every run in a
    /// witness file: the node process of the multi-process tests.
    #[command(hide = true)]
    WitnessNode(witness_node::WitnessNodeArgs),
}

fn main() -> Result<()> {
    // `eretes supervise …`, the hidden subcommand the agent starts every
    // process task under: before clap, logging and the async runtime, none
    // of which a supervisor needs (it stays small and starts fast).
    eretes_exec::supervisor::run_if_invoked();
    // `eretes chaos-witness …`, the program of a chaos run's tasks: a
    // small synchronous loop, started by the hundred.
    chaos::witness::run_if_invoked();
    // The agent's secrets leave its environment before any thread or child
    // exists: no task may inherit them or read them from its /proc entries.
    // (The other commands are clients: they read ERETES_TOKEN to send it.)
    let secrets = match std::env::args_os().nth(1) {
        Some(command) if command == "agent" => secrets::take_from_environment(),
        _ => Vec::new(),
    };
    let cli = Cli::parse();
    // The agent logs what it does; the other commands only their errors.
    let (default_level, json) = match &cli.command {
        Command::Agent(args) => ("info", args.log_json),
        _ => ("error", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ERETES_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    if matches!(cli.command, Command::Agent(_)) {
        agent::allocator::tune();
    }
    if matches!(
        cli.command,
        Command::Submit(_)
            | Command::Ls(_)
            | Command::Show(_)
            | Command::Wait(_)
            | Command::Logs(_)
            | Command::Rm(_)
            | Command::Nodes(_)
            | Command::Node(_)
            | Command::Task(_)
    ) {
        // The client commands print for a reader that may go away (`ls |
        // head`): they end quietly there, as other command-line tools do,
        // rather than panic at the next print (Rust ignores SIGPIPE).
        // SAFETY: restores one signal's default action, before any thread
        // of this process exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A worker flushes its malloc cache when the agent's memory return
        // asks (nothing else asks: for other commands, one atomic load).
        .on_thread_park(|| {
            agent::allocator::flush_thread_cache_if_asked();
        })
        .build()?;
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => agent::run(*args, secrets).await.map(|()| 0),
            Command::Submit(args) => client::submit(args).await,
            Command::Ls(args) => client::ls(args).await,
            Command::Show(args) => client::show(args).await,
            Command::Wait(args) => client::wait(args).await,
            Command::Logs(args) => client::logs(args).await,
            Command::Rm(args) => client::rm(args).await,
            Command::Nodes(args) => client::nodes(args).await,
            Command::Node(args) => client::node(args).await,
            Command::Task(args) => client::task(args).await,
            Command::Demo(args) => demo::run(args).await.map(|()| 0),
            Command::Bench(args) => bench::run(args).await.map(|()| 0),
            Command::Graph(args) => graph::run(args).await,
            Command::Chaos(args) => chaos::run(args).await,
            Command::WitnessNode(args) => witness_node::run(args).await.map(|()| 0),
        }
    });
    // Leave the runtime first, so that nothing it owns outlives the exit.
    drop(runtime);
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            // The message and its causes, never a backtrace.
            eprintln!("error: {error:#}");
            std::process::exit(1)
        }
    }
}
