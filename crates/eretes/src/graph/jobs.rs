//! `eretes graph ls | show | rm`: a namespace's graph jobs, read and
//! removed in the store (etcd) directly, as `eretes ls | show | rm` do for
//! tasks through an agent.

use anyhow::{bail, Context, Result};
use clap::Args;
use eretes_graph::{JobName, Jobs};
use eretes_protocol::{Coordinator, Namespace};

use crate::store_args::StoreArgs;

/// Where the jobs are: a namespace on etcd.
#[derive(Debug, Args)]
pub struct JobsStore {
    /// The namespace the jobs were started in.
    #[arg(long, value_name = "NS")]
    namespace: String,
    /// The store (etcd: an embedded store belongs to its agent alone).
    #[command(flatten)]
    store: StoreArgs,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

impl JobsStore {
    async fn jobs(&self) -> Result<Jobs> {
        if !self.store.is_etcd() {
            bail!("--etcd is needed: jobs are read in the store where they were started");
        }
        let namespace = Namespace::new(&self.namespace)
            .with_context(|| format!("--namespace {:?}", self.namespace))?;
        let store = self.store.open().await?;
        Ok(Jobs::new(Coordinator::new(store, namespace)))
    }
}

/// Options of `eretes graph show` and `rm`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job.
    job: String,
    #[command(flatten)]
    at: JobsStore,
}

fn job_name(name: &str) -> Result<JobName> {
    JobName::new(name).with_context(|| format!("job name {name:?}"))
}

/// `eretes graph ls`.
pub async fn list(args: JobsStore) -> Result<i32> {
    let list = args.jobs().await?.list().await?;
    if args.json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(0);
    }
    println!(
        "{:<24} {:<16} {:>6} {:>7} {:>10}  STATE",
        "JOB", "KIND", "TASKS", "BACKUPS", "EPOCH"
    );
    for job in &list.jobs {
        let (epoch, state) = match job.epoch {
            Some(record) if record.shutdown => (record.epoch.0.to_string(), "shut down"),
            Some(record) => (record.epoch.0.to_string(), "running"),
            None if job.epoch_malformed.is_some() => ("-".into(), "epoch record malformed"),
            None => ("-".into(), "no epoch record"),
        };
        println!(
            "{:<24} {:<16} {:>6} {:>7} {:>10}  {state}",
            job.name.as_str(),
            job.spec.kind,
            job.spec.tasks,
            job.spec.backups,
            epoch
        );
    }
    if list.malformed > 0 {
        eprintln!("{} malformed job records were skipped", list.malformed);
    }
    Ok(0)
}

/// `eretes graph show JOB`: non-zero if there is no such job.
pub async fn show(args: JobArgs) -> Result<i32> {
    let name = job_name(&args.job)?;
    let Some(status) = args.at.jobs().await?.status(&name).await? else {
        bail!("no job {name} in namespace {}", args.at.namespace);
    };
    if args.at.json {
        println!("{}", serde_json::to_string(&status)?);
        return Ok(0);
    }
    let epoch = match (&status.epoch, &status.epoch_malformed) {
        (Some(record), _) => record.epoch.0.to_string(),
        (None, Some(error)) => format!("- (its record is malformed: {error})"),
        (None, None) => "- (no epoch record)".into(),
    };
    let ended = status.tasks.iter().filter(|task| task.ended).count();
    println!(
        "job {name}: kind {}, {} tasks ({ended} ended), {} backups per task, group {}, job epoch {epoch}{}",
        status.spec.kind,
        status.spec.tasks,
        status.spec.backups,
        status.spec.group,
        if status.epoch.is_some_and(|record| record.shutdown) { ", shut down" } else { "" }
    );
    println!("{:>6}  {:<20} {:<6} BACKUPS", "TASK", "NODE", "ENDED");
    for task in &status.tasks {
        let node = task.node.as_ref().map_or("-", |node| node.as_str());
        let backups: Vec<&str> = task.backups.iter().map(|node| node.as_str()).collect();
        println!(
            "{:>6}  {node:<20} {:<6} {}",
            task.index,
            if task.ended { "yes" } else { "no" },
            backups.join(",")
        );
    }
    Ok(0)
}

/// `eretes graph rm JOB`: its tasks, records, meta and backups.
pub async fn remove(args: JobArgs) -> Result<i32> {
    let name = job_name(&args.job)?;
    args.at
        .jobs()
        .await?
        .remove(&name)
        .await
        .with_context(|| format!("removing job {name}"))?;
    println!("removed job {name}");
    Ok(0)
}
