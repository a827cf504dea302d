//! The CLI's commands that talk to an agent's HTTP API: submit, ls, show,
//! wait, logs, rm, nodes, node, task. Tables for people, `--json` for
//! scripts.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use eretes::{AgentClient, Command, Output, Submit};
use eretes_kube::KubeSpec;
use eretes_protocol::TaskView;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::agent::api::MAX_SLEEP_MS;

mod render;

use render::{
    command_line, exit_code, from_now, print_outcome, print_table, print_task, text, timestamp,
};

/// Where the agent is.
#[derive(Debug, Clone, Args)]
pub struct AgentUrl {
    /// The agent's API.
    #[arg(
        long,
        value_name = "URL",
        env = "ERETES_AGENT",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    agent: String,
    /// Bearer token, for agents started with --token.
    #[arg(long, env = "ERETES_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl AgentUrl {
    /// A client of this agent (the library every CLI command goes through).
    fn client(&self) -> Result<AgentClient> {
        AgentClient::new(&self.agent, self.token.clone())
            .map_err(|error| anyhow!("--agent: {error}"))
    }
}

/// A typed view as the JSON document the agent sent (what `--json` prints
/// and the tables read).
fn document<T: serde::Serialize>(view: &T) -> Result<Value> {
    serde_json::to_value(view).context("encoding the agent's answer")
}

/// Options of `eretes submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task's id (1–128 of A–Z a–z 0–9 . _ : -); made up when absent.
    #[arg(long)]
    id: Option<String>,
    /// Its group.
    #[arg(long)]
    group: Option<String>,
    /// Attempts for a run that exits non-zero.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=eretes_exec::MAX_ATTEMPTS as i64))]
    max_attempts: Option<u32>,
    /// Restart it whenever it exits, like a service.
    #[arg(long)]
    permanent: bool,
    /// Its working directory (absolute).
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// An environment variable for it, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Stop an attempt that runs longer than this (30s, 5m, 2h…); it counts
    /// as a failed attempt.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Wait until it ends and exit with its exit code.
    #[arg(long)]
    wait: bool,
    /// Print the task as JSON.
    #[arg(long)]
    json: bool,
    /// Run it as a Kubernetes Job of this image (on an agent started with
    /// --kubernetes): PROGRAM ARGS become the container's command, or the
    /// image's own runs when none is given.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// A Kubernetes task's whole spec, from a JSON file (the "kubernetes"
    /// object of the API: resources, tolerations, a pod template…); the
    /// other options lie over it.
    #[arg(long, value_name = "FILE")]
    kubernetes_spec: Option<PathBuf>,
    /// The Kubernetes namespace of its Job (default: the agent's).
    #[arg(long, value_name = "NS")]
    kubernetes_namespace: Option<String>,
    /// PROGRAM ARGS..: run as is, with no shell (write `sh -c '...'` for one).
    #[arg(
        required_unless_present_any = ["image", "kubernetes_spec"],
        last = true,
        value_name = "PROGRAM ARGS"
    )]
    command: Vec<String>,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only tasks in this state: pending, running, sleeping, paused, fault,
    /// done, failed, killed.
    #[arg(long)]
    state: Option<String>,
    /// Only tasks of this group.
    #[arg(long)]
    group: Option<eretes_protocol::GroupName>,
    /// At most this many tasks (default: all). When more follow, the id to
    /// go on from is printed to standard error.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Only tasks whose ids sort after this one.
    #[arg(long)]
    after: Option<String>,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The task.
    id: String,
    /// The task as JSON (with its `state`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The tasks.
    #[arg(required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The task.
    id: String,
    /// Keep printing until the task ends.
    #[arg(long, short)]
    follow: bool,
    /// Its stderr instead of its stdout.
    #[arg(long)]
    stderr: bool,
    /// Only the last N lines (then new ones, with --follow).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The task.
    id: String,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentUrl,
}

/// Options of `eretes node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node (checked here: a name such as `..` would otherwise make
    /// another URL of the request).
    node: eretes_protocol::NodeName,
    /// What it should do.
    #[command(subcommand)]
    action: NodeAction,
    #[command(flatten)]
    agent: AgentUrl,
}

/// The node commands.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Stop claiming new tasks.
    Freeze,
    /// Claim again.
    Unfreeze,
    /// Run the balancer now.
    Balance,
    /// Freeze and release every task, so that other nodes take them.
    Drain,
    /// Stop one task there and release it.
    StopTask {
        /// The task.
        id: eretes_protocol::TaskId,
    },
}

/// Options of `eretes task`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The task.
    id: String,
    /// What it should do.
    #[command(subcommand)]
    action: TaskAction,
    /// Print the agent's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    agent: AgentUrl,
}

/// The task commands. Each is queued and applied by the task's owner, in
/// the order sent.
#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Stop its work and keep it parked until `resume`.
    Pause,
    /// Run a paused or sleeping task again.
    Resume,
    /// Stop its work for a while, then run it again.
    Sleep {
        /// How long: `250ms`, `30s`, `5m`, `1h30m`, `2days` (at most 365
        /// days).
        #[arg(value_parser = sleep_duration)]
        duration: Duration,
    },
    /// Stop its work and end it for good (state killed).
    Kill,
    /// Anything else: refused with the list of commands.
    #[command(external_subcommand)]
    Unknown(Vec<String>),
}

/// A sleep's DURATION: humantime's format (`1h30m`, `250ms`, `2days`),
/// more than zero and at most 365 days.
fn sleep_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 250ms, 30s, 5m or 1h30m"))?;
    if duration.is_zero() {
        return Err("a sleep must last longer than 0".to_string());
    }
    if duration > Duration::from_millis(MAX_SLEEP_MS) {
        return Err("a sleep may last at most 365 days".to_string());
    }
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err("the finest unit of a sleep is 1ms".to_string());
    }
    Ok(duration)
}

/// `eretes show ID [--json]`.
pub async fn show(args: ShowArgs) -> Result<i32> {
    let view = document(&args.agent.client()?.show(&args.id).await?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_task(&view);
    }
    Ok(0)
}

/// `eretes logs ID [--follow] [--stderr]`.
pub async fn logs(args: LogsArgs) -> Result<i32> {
    let output = if args.stderr {
        Output::Stderr
    } else {
        Output::Stdout
    };
    let mut body = args
        .agent
        .client()?
        .logs(&args.id, output, args.tail, args.follow)
        .await?;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.context("reading the log")?)?;
        out.flush()?;
    }
    Ok(0)
}

/// `eretes rm ID`.
pub async fn rm(args: RmArgs) -> Result<i32> {
    args.agent.client()?.delete(&args.id).await?;
    println!("removed {}", args.id);
    Ok(0)
}

/// `eretes nodes [--json]`.
pub async fn nodes(args: NodesArgs) -> Result<i32> {
    let nodes = document(&json!({ "nodes": args.agent.client()?.nodes().await? }))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|node| {
            vec![
                text(&node["name"]),
                node["groups"]
                    .as_array()
                    .map(|g| g.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                node["running"].to_string(),
                match node["max_running"].as_u64() {
                    Some(max) => max.to_string(),
                    None => "-".to_string(),
                },
            ]
        })
        .collect();
    print_table(&["NAME", "GROUPS", "RUNNING", "MAX"], &rows);
    Ok(0)
}

/// `eretes node NODE ACTION`.
pub async fn node(args: NodeArgs) -> Result<i32> {
    let action = match &args.action {
        NodeAction::Freeze => eretes::NodeAction::Freeze,
        NodeAction::Unfreeze => eretes::NodeAction::Unfreeze,
        NodeAction::Balance => eretes::NodeAction::Balance,
        NodeAction::Drain => eretes::NodeAction::Drain,
        NodeAction::StopTask { id } => eretes::NodeAction::StopTask(id.to_string()),
    };
    args.agent
        .client()?
        .node_command(args.node.as_str(), &action)
        .await?;
    println!("sent to {}", args.node);
    Ok(0)
}

/// `eretes task ID pause|resume|sleep DURATION|kill`.
pub async fn task(args: TaskArgs) -> Result<i32> {
    let command = match &args.action {
        TaskAction::Pause => Command::Pause,
        TaskAction::Resume => Command::Resume,
        TaskAction::Kill => Command::Kill,
        TaskAction::Sleep { duration } => Command::Sleep(*duration),
        TaskAction::Unknown(words) => bail!(
            "unknown task command {:?}; task commands are pause, resume, sleep DURATION, kill",
            words.first().map_or("", String::as_str)
        ),
    };
    let id = &args.id;
    let queued = args.agent.client()?.command(id, command).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&queued)?);
        return Ok(0);
    }
    let command = &queued.command;
    match queued.until_ms {
        Some(until) => println!(
            "sent {command} to task {id}: it sleeps until {} ({})",
            timestamp(until),
            from_now(until)
        ),
        None => println!("sent {command} to task {id}"),
    }
    Ok(0)
}

/// `eretes submit [OPTIONS] -- PROGRAM ARGS..`.
pub async fn submit(args: SubmitArgs) -> Result<i32> {
    let client = args.agent.client()?;
    if args.image.is_some() || args.kubernetes_spec.is_some() {
        let spec = kubernetes_spec(&args)?;
        let submitted = client
            .submit_kubernetes(args.id.as_deref(), args.group.as_deref(), &spec)
            .await?;
        return finish_submit(&client, submitted, args.wait, args.json).await;
    }
    if args.kubernetes_namespace.is_some() {
        bail!("--kubernetes-namespace is for Kubernetes tasks (--image or --kubernetes-spec)");
    }
    let (program, rest) = args.command.split_first().expect("clap requires a program");
    let mut task = Submit::new(program.clone(), rest.to_vec());
    task.id = args.id;
    task.group = args.group;
    task.spec.permanent = args.permanent;
    task.spec.cwd = args.cwd;
    if let Some(attempts) = args.max_attempts {
        task.spec.max_attempts = attempts;
    }
    for pair in &args.env {
        let Some((name, value)) = pair.split_once('=') else {
            bail!("--env {pair:?} is not KEY=VALUE");
        };
        task.spec.env.insert(name.to_string(), value.to_string());
    }
    if let Some(timeout) = args.timeout {
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            bail!("--timeout must be at least 1ms");
        }
        task.spec.timeout_ms = Some(millis);
    }
    let submitted = client.submit(&task).await?;
    finish_submit(&client, submitted, args.wait, args.json).await
}

/// Print a submitted task, or wait for its end and print that.
async fn finish_submit(
    client: &AgentClient,
    submitted: TaskView,
    wait: bool,
    json: bool,
) -> Result<i32> {
    if !wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&submitted)?);
        } else {
            println!("{}", submitted.id);
        }
        return Ok(0);
    }
    let view = document(&client.wait(submitted.id.as_str()).await?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_outcome(&view);
    }
    Ok(exit_code(&view))
}

/// The Kubernetes spec `eretes submit --image/--kubernetes-spec` asks for:
/// the file's, with the command line's options over it, checked here so a
/// mistake is named before anything is sent.
fn kubernetes_spec(args: &SubmitArgs) -> Result<KubeSpec> {
    let mut value = match &args.kubernetes_spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--kubernetes-spec {}", path.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("--kubernetes-spec {}: not JSON", path.display()))?
        }
        None => json!({}),
    };
    let Some(object) = value.as_object_mut() else {
        bail!("--kubernetes-spec: the file must hold a JSON object");
    };
    if let Some(image) = &args.image {
        object.insert("image".into(), json!(image));
    }
    if let Some((program, rest)) = args.command.split_first() {
        object.insert("command".into(), json!([program]));
        object.insert("args".into(), json!(rest));
    }
    if let Some(ns) = &args.kubernetes_namespace {
        object.insert("namespace".into(), json!(ns));
    }
    if let Some(attempts) = args.max_attempts {
        object.insert("max_attempts".into(), json!(attempts));
    }
    if let Some(timeout) = args.timeout {
        // A Job's deadline is in whole seconds: a part second counts as one.
        let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        object.insert("active_deadline_seconds".into(), json!(seconds));
    }
    if !args.env.is_empty() {
        let env = object
            .entry("env")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| anyhow!("--kubernetes-spec: \"env\" must be an object"))?;
        for pair in &args.env {
            let Some((name, value)) = pair.split_once('=') else {
                bail!("--env {pair:?} is not KEY=VALUE");
            };
            env.insert(name.to_string(), json!(value));
        }
    }
    if args.permanent {
        bail!("--permanent is for process tasks: a Kubernetes task runs until its Job ends");
    }
    if args.cwd.is_some() {
        bail!("--cwd is for process tasks: set a Kubernetes task's workingDir in --kubernetes-spec's pod_template");
    }
    Ok(KubeSpec::from_value(&value)?)
}

/// `eretes ls [--state S] [--group G] [--limit N] [--after ID] [--json]`.
pub async fn ls(args: LsArgs) -> Result<i32> {
    if let Some(after) = &args.after {
        eretes::api_client::checked(after)?;
    }
    let most = args
        .limit
        .map_or(usize::MAX, |n| n.try_into().unwrap_or(usize::MAX));
    let listing = args
        .agent
        .client()?
        .list_up_to(
            args.state.as_deref(),
            args.group.as_ref().map(|group| group.as_str()),
            args.after.as_deref(),
            most,
        )
        .await?;
    if let Some(after) = &listing.more_after {
        eprintln!("more tasks follow: eretes ls --after {after}");
    }
    if listing.malformed > 0 {
        eprintln!(
            "warning: {} record(s) in the store do not decode and are not listed; the first: {}",
            listing.malformed,
            // Keys from the store, which may hold anything.
            listing
                .malformed_keys
                .iter()
                .map(|key| text(&json!(key)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let tasks = document(&listing.tasks)?;
    if args.json {
        let mut page = json!({ "tasks": tasks });
        if let Some(after) = listing.more_after {
            page["next"] = json!(after);
        }
        if listing.malformed > 0 {
            page["malformed"] = json!(listing.malformed);
            page["malformed_keys"] = json!(listing.malformed_keys);
        }
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = tasks
        .as_array()
        .into_iter()
        .flatten()
        .map(|task| {
            vec![
                text(&task["id"]),
                text(&task["state"]),
                text(&task["group"]),
                task["node"].as_str().unwrap_or("-").to_string(),
                command_line(task),
            ]
        })
        .collect();
    print_table(&["ID", "STATE", "GROUP", "NODE", "COMMAND"], &rows);
    Ok(0)
}

/// `eretes wait ID..`: exits non-zero if any failed or was killed (with the
/// task's own exit code when there is one task that failed).
pub async fn wait(args: WaitArgs) -> Result<i32> {
    let client = &args.agent.client()?;
    for id in &args.ids {
        eretes::api_client::checked(id)?;
    }
    let bar = ProgressBar::new(args.ids.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} ended {msg}")
            .expect("a valid progress template"),
    );
    if args.ids.len() < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut waits = futures::stream::iter(
        args.ids
            .iter()
            .map(|id| async move { (id.clone(), client.wait(id).await) }),
    )
    .buffer_unordered(16);
    let mut failed = 0;
    let mut last_code = 0;
    while let Some((id, view)) = waits.next().await {
        let view = document(&view.with_context(|| format!("waiting for {id}"))?)?;
        let code = exit_code(&view);
        if view["state"] != "done" {
            failed += 1;
            last_code = code;
        }
        bar.suspend(|| print_outcome(&view));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(match (failed, args.ids.len()) {
        (0, _) => 0,
        (1, 1) => last_code.max(1),
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_durations_are_parsed_strictly() {
        for (text, ms) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("2days", 172_800_000),
            ("365days", MAX_SLEEP_MS),
        ] {
            assert_eq!(
                sleep_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for (text, expected) in [
            ("", "write a duration such as"),
            ("soon", "write a duration such as"),
            ("30", "write a duration such as"),
            ("-5s", "write a duration such as"),
            ("5 parsecs", "write a duration such as"),
            ("0s", "longer than 0"),
            ("366days", "at most 365 days"),
            ("1us", "finest unit"),
        ] {
            let error = sleep_duration(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn killed_tasks_have_ended_and_wait_says_so() {
        for (state, over) in [
            ("pending", false),
            ("running", false),
            ("sleeping", false),
            ("paused", false),
            ("fault", false),
            ("done", true),
            ("failed", true),
            ("killed", true),
        ] {
            let parsed = eretes_protocol::TaskState::parse(state).unwrap();
            assert_eq!(parsed.is_terminal(), over, "{state}: wait stops there");
        }
        let killed = json!({"id": "t", "state": "killed", "error": "killed by a task command"});
        assert_eq!(exit_code(&killed), 1);
    }
}
