//! `eretes bench`: the figures in BENCHMARKS.md. Each scenario prints a human
//! line and, with `--json`, one JSON object as the last line.
//!
//! [`in_process`] measures nodes in this process on the embedded store or
//! etcd; [`agent`] measures a real `eretes agent` through its HTTP API.

mod agent;
mod ended;
mod etcd_load;
mod graph;
mod idle;
mod in_process;
mod list;
mod scale;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use eretes_store::embedded::EmbeddedStore;
use tokio::time::Instant;

use crate::cluster::{Cluster, Work};
use crate::store_args::StoreArgs;

/// The benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// No-op tasks end to end on the embedded store: submit → claim → complete.
    Throughput,
    /// Resident memory per running idle in-process task.
    Memory,
    /// A 3-node in-process cluster claims tasks submitted beforehand.
    ClusterClaim,
    /// N nodes (default 3), all up and seeing each other, claim 10,000
    /// tasks submitted in batches, against plain create-if-absent
    /// transactions at the same concurrency (embedded or etcd).
    Claim,
    /// A node owning 1,000 tasks is killed; time until all run elsewhere
    /// (embedded or etcd).
    Failover,
    /// Requests per second one node sends to the store in steady state,
    /// running 100, 1,000 and 10,000 idle tasks in turn (embedded or etcd).
    Steady,
    /// A real `eretes agent` on a fresh data directory: per-task overhead
    /// (submit → exit seen, for `true`) and API submit throughput.
    Agent,
    /// A real `eretes agent` running N idle `sleep` tasks (default 2,000):
    /// its CPU use, threads and memory per task, the supervisors' memory,
    /// and the memory given back 30 s after the tasks are removed.
    Idle,
    /// Two real `eretes agent`s, one keeping ended tasks forever and one
    /// deleting them 10 s after they end: each runs three rounds of N
    /// `true` tasks (default 10,000), and its heap is read after each.
    Ended,
    /// A real `eretes agent` whose store holds N pending tasks (default
    /// 100,000): the latency of a page of its task list, against one read
    /// of the whole namespace in the same run.
    List,
    /// N in-process nodes (default 10) claim M idle tasks (default
    /// 100,000), then a tenth of them die and rejoin: times, moves against
    /// the minimum, spread, store requests per node, memory (embedded or
    /// etcd).
    Scale,
    /// Task graphs: data requests per second between two nodes, pooled and
    /// with a connection per request (`--tasks` is the number of requests,
    /// default 20,000).
    GraphData,
    /// Task graphs: a task's failover as its peer sees it, taken over by a
    /// backup and restarted cold, five alternating rounds of each.
    GraphFailover,
    /// Task graphs: milliseconds per job epoch of the regression at 15 and
    /// 127 tasks (`--tasks` is the number of epochs, default 50).
    GraphEpochs,
}

impl Scenario {
    /// The scenario's name, as given on the command line.
    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |value| value.get_name().to_string())
    }
}

/// Options of `eretes bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Tasks to use (default: 100,000 for throughput and cluster-claim,
    /// 50,000 for memory, 10,000 for claim, 1,000 for failover).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    tasks: Option<u32>,
    /// Nodes to run (default: 1 for throughput and memory, 10 for scale, 3
    /// otherwise).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=2000))]
    nodes: Option<u16>,
    /// How long the steady scenario counts requests, in seconds (the default
    /// spans one periodic resync).
    #[arg(long, default_value_t = 35, value_parser = clap::value_parser!(u64).range(1..=3600))]
    window_s: u64,
    /// The store (claim, failover and steady only): embedded unless --etcd is given.
    #[command(flatten)]
    store: StoreArgs,
    /// End with one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
    /// The agent and list scenarios: run this `eretes` binary as the agent
    /// instead of this one (to compare two builds in the same session).
    #[arg(long, value_name = "PATH")]
    agent_binary: Option<std::path::PathBuf>,
    /// The scale scenario: the nodes' lease TTL in milliseconds (default
    /// 2,000, so that the deaths are over quickly; the agent's default is
    /// 10,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    lease_ttl_ms: Option<u64>,
    /// The claim scenario on etcd: the etcd server's process id on this
    /// machine, so that the CPU etcd spent on the claims is reported.
    #[arg(long, value_name = "PID", requires = "etcd")]
    etcd_pid: Option<u32>,
}

/// The longest a benchmark may run before it gives up.
const LIMIT: Duration = Duration::from_secs(600);

/// How often a long wait says on stderr how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Run a benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    let embedded_only = matches!(
        args.scenario,
        Scenario::Throughput
            | Scenario::Memory
            | Scenario::ClusterClaim
            | Scenario::Agent
            | Scenario::Idle
            | Scenario::Ended
            | Scenario::List
            | Scenario::GraphData
            | Scenario::GraphFailover
            | Scenario::GraphEpochs
    );
    let takes_nodes = matches!(
        args.scenario,
        Scenario::Throughput
            | Scenario::Memory
            | Scenario::ClusterClaim
            | Scenario::Claim
            | Scenario::Failover
            | Scenario::Scale
    );
    if let Some(nodes) = args.nodes {
        if !takes_nodes {
            bail!(
                "--nodes: the {} benchmark runs a fixed set of nodes; \
                 --nodes is for throughput, memory, cluster-claim, claim, failover and scale",
                args.scenario.name()
            );
        }
        if matches!(args.scenario, Scenario::Failover) && nodes < 2 {
            bail!("--nodes {nodes}: the failover benchmark kills one node and needs a survivor, so at least 2");
        }
    }
    if args.lease_ttl_ms.is_some() && !matches!(args.scenario, Scenario::Scale) {
        bail!("--lease-ttl-ms is for the scale benchmark only");
    }
    if embedded_only && args.store.is_etcd() {
        bail!(
            "--etcd: the {} benchmark measures the embedded store only; \
             on etcd, run `eretes bench claim`, `failover` or `steady`",
            args.scenario.name()
        );
    }
    let report = match args.scenario {
        Scenario::Throughput => in_process::throughput(&args).await?,
        Scenario::Memory => in_process::memory(&args).await?,
        Scenario::ClusterClaim => in_process::cluster_claim(&args).await?,
        Scenario::Agent => agent::agent(&args).await?,
        Scenario::Idle => idle::idle(&args).await?,
        Scenario::Ended => ended::ended(&args).await?,
        Scenario::List => list::list(&args).await?,
        Scenario::GraphData => graph::data(&args).await?,
        Scenario::GraphFailover => graph::failover(&args).await?,
        Scenario::GraphEpochs => graph::epochs(&args).await?,
        Scenario::Scale => scale::scale(&args).await?,
        Scenario::Claim | Scenario::Failover | Scenario::Steady => {
            in_process::on_any_store(&args).await?
        }
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
    let started = Instant::now();
    let mut next_progress = started + PROGRESS_EVERY;
    for (done, name) in nodes(count).into_iter().enumerate() {
        if Instant::now() > next_progress {
            next_progress += PROGRESS_EVERY;
            eprintln!(
                "starting nodes after {:.0} s: {done} of {count} started",
                started.elapsed().as_secs_f64()
            );
        }
        cluster.add_node(&name).await?;
    }
    Ok(())
}

/// Poll `done` every 50 ms until it holds; fail naming `what` after 30 s.
async fn wait_until_async<F, Fut>(what: &str, done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_async_within(what, Duration::from_secs(30), done).await
}

/// Poll `done` every 50 ms until it holds; fail naming `what` after `limit`.
async fn wait_until_async_within<F, Fut>(what: &str, limit: Duration, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !done().await {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Poll `done` every 10 ms until it holds; fail naming `what` after [`LIMIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {LIMIT:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
