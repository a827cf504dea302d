//! `eretes graph`: task graphs (the `eretes-graph` crate) from the command
//! line. `eretes graph regression` runs taskgraph's regression as a job on
//! nodes of this process (or, with `--processes`, on node processes of its
//! own on etcd), kills nodes while it runs, and reports what happened,
//! counted.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use eretes_graph::driver::{run_regression, run_regression_on, RegressionOptions};
use eretes_protocol::Namespace;

use crate::store_args::StoreArgs;

pub mod jobs;
pub mod node_process;
pub mod processes;

/// Options of `eretes graph`.
#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(subcommand)]
    command: GraphCommand,
}

#[derive(Debug, Subcommand)]
enum GraphCommand {
    /// Run the regression job (a binary tree; in job epoch e the root must
    /// see e × N(N−1)/2) while nodes are killed; exits non-zero if a sum
    /// was wrong or an epoch never verified.
    Regression(RegressionArgs),
    /// The jobs of a namespace (on etcd): name, kind, tasks, backups, job
    /// epoch.
    Ls(jobs::JobsStore),
    /// One job: its record, job epoch, and where each task runs, whether it
    /// ended, and where its backups are.
    Show(jobs::JobArgs),
    /// Remove a job: its tasks (wherever they run), records, meta and
    /// backups.
    Rm(jobs::JobArgs),
    /// One regression node in a process of its own (started by
    /// `regression --processes`).
    #[command(hide = true)]
    Node(node_process::GraphNodeArgs),
}

/// Options of `eretes graph regression`.
#[derive(Debug, Args)]
pub struct RegressionArgs {
    /// Tasks in the tree.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    tasks: u32,
    /// Job epochs to run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    epochs: u64,
    /// Nodes running at a time (a killed node is replaced).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Hot standbys per task (0-3): a backup of a lost task takes over
    /// with its state, instead of a cold restart.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=3))]
    backups: u32,
    /// At each new job epoch, kill each task's node with this probability.
    #[arg(long, default_value_t = 0.0, conflicts_with = "kill_every")]
    kill_rate: f64,
    /// Kill a random node this often (e.g. 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    kill_every: Option<Duration>,
    /// Kill the node running the root once, when the job reaches this epoch.
    #[arg(long)]
    kill_at_epoch: Option<u64>,
    /// The nodes' lease TTL: a killed node's tasks move after it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Give up (and fail) after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Run each node as a process of its own (`eretes graph node`), killed
    /// with SIGKILL; needs --etcd.
    #[arg(long)]
    processes: bool,
    /// The store: embedded unless --etcd is given.
    #[command(flatten)]
    store: StoreArgs,
    /// End with one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
}

/// Run `eretes graph`; the exit code.
pub async fn run(args: GraphArgs) -> Result<i32> {
    match args.command {
        GraphCommand::Regression(args) => regression(args).await,
        GraphCommand::Ls(args) => jobs::list(args).await,
        GraphCommand::Show(args) => jobs::show(args).await,
        GraphCommand::Rm(args) => jobs::remove(args).await,
        GraphCommand::Node(args) => node_process::run(args).await.map(|()| 0),
    }
}

async fn regression(args: RegressionArgs) -> Result<i32> {
    let etcd = match (&args.store.etcd, args.processes) {
        (None, true) => bail!("--processes needs --etcd: node processes share one store"),
        (Some(_), true)
            if args.store.etcd_ca.is_some()
                || args.store.etcd_cert.is_some()
                || args.store.etcd_user.is_some() =>
        {
            bail!("--processes: node processes reach etcd by --etcd URL only (no TLS or user yet)")
        }
        (etcd, _) => etcd.clone(),
    };
    if !(0.0..=1.0).contains(&args.kill_rate) {
        bail!("--kill-rate {} is not between 0 and 1", args.kill_rate);
    }
    if args.lease_ttl < Duration::from_millis(300) {
        bail!("--lease-ttl must be at least 300ms");
    }
    // A kill more often than a lease can expire only kills replacements
    // before they do anything.
    if let Some(every) = args.kill_every.filter(|every| *every < args.lease_ttl) {
        bail!(
            "--kill-every {} is shorter than the lease TTL ({}): no node would live long enough to \
             take a task over",
            humantime::format_duration(every),
            humantime::format_duration(args.lease_ttl)
        );
    }
    if let Some(at) = args
        .kill_at_epoch
        .filter(|at| *at == 0 || *at > args.epochs)
    {
        bail!(
            "--kill-at-epoch {at} is not one of the job's epochs (1 to --epochs {})",
            args.epochs
        );
    }
    if args.timeout < Duration::from_secs(1) {
        bail!(
            "--timeout {} is too short for any job: give at least 1s",
            humantime::format_duration(args.timeout)
        );
    }
    let store = args.store.open().await?;
    // A namespace of its own, removed afterwards: runs never meet.
    let ns = Namespace::new(&format!("graph-regression-{:08x}", rand::random::<u32>()))?;
    let options = RegressionOptions {
        tasks: args.tasks,
        epochs: args.epochs,
        nodes: usize::from(args.nodes),
        kill_rate: args.kill_rate,
        kill_every: args.kill_every,
        kill_at_epoch: args.kill_at_epoch,
        lease_ttl: args.lease_ttl,
        backups: args.backups,
        timeout: args.timeout,
    };
    let processes = etcd.filter(|_| args.processes);
    let run = async {
        match processes {
            Some(url) => {
                let mut fleet = processes::ProcessFleet::new(ns.name(), &url, args.lease_ttl)
                    .context("a directory for the node processes' counters")?;
                run_regression_on(&mut fleet, store.clone(), ns.clone(), options)
                    .await
                    .context("the regression")
            }
            None => run_regression(store.clone(), ns.clone(), options)
                .await
                .context("the regression"),
        }
    };
    // Interrupted (Ctrl-C, SIGTERM), the run is dropped where it stands, so
    // its node processes are killed with their fleet, and its namespace is
    // removed as at its end (killed by the signal, it left both behind).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        report = run => Some(report),
        _ = tokio::signal::ctrl_c() => None,
        _ = terminate.recv() => None,
    };
    // Bounded: a store that stopped answering must not keep an interrupted
    // run (whose signal handlers stay installed) from ending.
    let removed = tokio::time::timeout(
        Duration::from_secs(30),
        store.delete(eretes_store::DeleteRequest::new(
            eretes_store::KeyRange::prefix(ns.root()),
        )),
    )
    .await
    .unwrap_or_else(|_| {
        Err(eretes_store::StoreError::Unavailable(
            "the store did not answer within 30 s".into(),
        ))
    });
    let Some(report) = report else {
        removed.context("removing the run's namespace")?;
        bail!("interrupted; the run's node processes and its namespace are gone");
    };
    let report = report?;
    removed.context("removing the run's namespace")?;
    println!(
        "regression: {} tasks, {} of {} epochs verified, {} wrong sums; {} kills, {} failovers; \
         {} meta, {} data requests ({} retried, {} stale answers dropped); {} ms",
        report.tasks,
        report.epochs_verified,
        report.epochs,
        report.wrong_sums,
        report.kills,
        report.failovers,
        report.meta_delivered,
        report.data_requests,
        report.data_retries,
        report.stale_answers_dropped,
        report.elapsed_ms
    );
    if report.backups > 0 {
        let ms = |median: Option<u64>| median.map_or("-".to_string(), |ms| format!("{ms} ms"));
        println!(
            "failovers after kills: {} by a backup (median {} from the kill), {} cold (median {}; \
             {} of them had a backup at the kill); {} tasks had none at their kill",
            report.primary_takeovers,
            ms(report.primary_takeover_ms),
            report.cold_restarts,
            ms(report.cold_restart_ms),
            report.cold_restarts_of_backed_tasks,
            report.tasks_unbacked_at_kill
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(if report.passed() { 0 } else { 1 })
}
