//! `eretes chaos`: a Jepsen-style run that checks the guarantees under
//! mixed faults, against this build and a real etcd cluster.
//!
//! * **etcd**: `--etcd-members` real members on loopback ports
//!   ([`EtcdCluster`]), in a temporary directory, stopped at the end.
//! * **agents**: `--agents` real `eretes agent` processes, each with its
//!   own data directory and its own TCP relays to the members
//!   ([`agents`]), `--allow` naming only this binary.
//! * **workload**: `--tasks` tasks running `eretes chaos-witness`
//!   ([`witness`]): a quarter permanent, the rest ending after 2–6 s of
//!   work, submitted over the first 60% of the run; some are paused and
//!   resumed, some killed, by task commands. Every 100 ms each run writes a
//!   numbered, epoch-stamped line to the fenced [`sink`] and checkpoints
//!   the number.
//! * **nemesis**: faults from a seeded schedule for `--duration`
//!   ([`nemesis`]): `kill -9`, SIGSTOP, partitions, etcd member and leader
//!   kills, node commands.
//! * **checker**: after every fault is healed and the tasks have settled,
//!   the figures of [`checker::Report`], counted from the sink's record and
//!   the store's watched history ([`history`]); the run fails when a
//!   guarantee did not hold, and prints the first violation's history.
//!
//! ```text
//! $ eretes chaos --agents 3 --tasks 60 --duration 30s --seed 7 --json | tail -n 1
//! {"agents":3,"tasks":60,"faults":{"kill":2,...},"overlaps":0,"lost":0,...,"ok":true,"seed":7}
//! ```

mod agents;
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod sink;
pub mod witness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use eretes::{ClientError, Command, Submit};
use eretes_etcd::testing::EtcdCluster;
use eretes_etcd::{EtcdOptions, EtcdStore};
use eretes_protocol::{decode, KeyKind, Namespace, ResultRecord};
use eretes_store::{Store, StoreExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use agents::{Agent, AgentSettings};
use checker::{Evidence, FinalState, PlannedTask};
use history::History;
use nemesis::{FaultKind, Nemesis};
use sink::Sink;

use crate::witness::now_us;

/// The most witness writes a run may make (tasks × seconds × 10): about
/// 3 GB of records in the checker.
const MAX_WRITES: u64 = 15_000_000;

/// The namespace a chaos run uses on its own etcd.
const NAMESPACE: &str = "chaos";

/// Options of `eretes chaos`.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// Agents (separate processes).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=32))]
    agents: u32,
    /// Tasks in the workload.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=5000))]
    tasks: u32,
    /// How long faults are injected (30s, 10m…).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// The agents' lease TTL in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    lease_ttl_ms: u64,
    /// The fault kinds (comma-separated): kill, freeze, partition,
    /// etcd-kill, etcd-leader-kill, commands. Default: all of them.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// The seed of the schedule and the workload (default: from the clock;
    /// it is printed, so a failing run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Members of the etcd cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
    etcd_members: u32,
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if !(Duration::from_secs(5)..=Duration::from_secs(86_400)).contains(&duration) {
        return Err(format!("{text:?}: a chaos run lasts from 5s to 24h"));
    }
    Ok(duration)
}

/// One step of the workload, at an offset from the run's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Steer {
    Submit(usize),
    Pause(usize),
    Resume(usize),
    Kill(usize),
}

/// The workload: the tasks and when each step is taken.
struct Workload {
    tasks: Vec<PlannedTask>,
    steps: Vec<(Duration, Steer)>,
    /// How long after its pause went through each paused task is resumed
    /// (a resume is queued only then: task commands apply in queue order,
    /// and a resume queued before its pause would leave the task paused).
    resume_after: HashMap<usize, Duration>,
}

impl Workload {
    /// A quarter of the tasks (at least one) permanent and submitted at
    /// once; the others end after 20–60 writes and are submitted over the
    /// first 60% of the run. One task in ten is paused 0.5–3 s after its
    /// submission and resumed 1–2.5 s later; one ending task in twenty is
    /// killed 0.5–2 s after its submission.
    fn plan(rng: &mut StdRng, tasks: usize, duration: Duration) -> Workload {
        let permanent = (tasks / 4).max(1);
        let mut planned = Vec::with_capacity(tasks);
        let mut steps = Vec::new();
        let mut resume_after = HashMap::new();
        for index in 0..tasks {
            let work = if index < permanent {
                0
            } else {
                rng.gen_range(20..=60)
            };
            let submit = if work == 0 {
                Duration::ZERO
            } else {
                duration.mul_f64(rng.gen_range(0.0..0.6))
            };
            steps.push((submit, Steer::Submit(index)));
            if rng.gen_bool(0.1) {
                let pause = submit + Duration::from_millis(rng.gen_range(500..3000));
                steps.push((pause, Steer::Pause(index)));
                resume_after.insert(index, Duration::from_millis(rng.gen_range(1000..2500)));
            } else if work > 0 && rng.gen_bool(0.05) {
                let kill = submit + Duration::from_millis(rng.gen_range(500..2000));
                steps.push((kill, Steer::Kill(index)));
            }
            planned.push(PlannedTask {
                id: format!("w-{index:04}"),
                work,
                kill_sent: false,
                paused: Vec::new(),
            });
        }
        steps.sort_by_key(|(at, _)| *at);
        Workload {
            tasks: planned,
            steps,
            resume_after,
        }
    }
}

/// Run `eretes chaos`; the process's exit code (1 when a guarantee failed).
pub async fn run(args: ChaosArgs) -> Result<i32> {
    // Interrupted (Ctrl-C, SIGTERM), the run is dropped where it stands:
    // its agents and etcd members are killed and its directories removed
    // by their owners, as at its end. Killed by the signal instead, it
    // left them behind (some 60-300 MB in the temporary directory).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        outcome = run_to_end(args) => outcome,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the run's agents, etcd members and files are gone"),
        _ = terminate.recv() => bail!("terminated; the run's agents, etcd members and files are gone"),
    }
}

/// The whole run (see [`run`]).
async fn run_to_end(args: ChaosArgs) -> Result<i32> {
    // The checker keeps every write in memory (about 200 bytes each, ten a
    // second per task): refuse a run that would not fit.
    let writes = u64::from(args.tasks) * args.duration.as_secs() * 10;
    if writes > MAX_WRITES {
        bail!(
            "--tasks {} for --duration {:?} would make about {writes} witness writes, which the \
             checker keeps in memory; at most {MAX_WRITES} (for example 200 tasks for 2h)",
            args.tasks,
            args.duration
        );
    }
    let seed = args.seed.unwrap_or_else(now_us);
    let kinds = if args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        let mut kinds = args.faults.clone();
        kinds.dedup();
        kinds
    };
    let ttl = Duration::from_millis(args.lease_ttl_ms);
    eprintln!(
        "chaos: seed {seed}, {} agents, {} etcd members, {} tasks, {:?}, faults {}",
        args.agents,
        args.etcd_members,
        args.tasks,
        args.duration,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
    );
    let dir = tempfile::Builder::new()
        .prefix("eretes-chaos-")
        .tempdir()
        .context("creating the run's directory")?;
    let mut cluster = EtcdCluster::start(args.etcd_members as usize)
        .await
        .map_err(anyhow::Error::msg)?;
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(EtcdOptions::from_urls(&cluster.endpoints())?)
            .await
            .context("connecting to the run's etcd")?,
    );
    let namespace = Namespace::new(NAMESPACE)?;
    let start_revision = store.get_prefix(namespace.root()).await?.revision + 1;
    let history = History::start(store.clone(), namespace.clone(), start_revision);
    let sink_path = dir.path().join("sink.sock");
    let sink = Sink::start(&sink_path).context("starting the sink")?;

    let settings = AgentSettings {
        binary: std::env::current_exe()?,
        namespace: NAMESPACE.into(),
        lease_ttl: ttl,
        dir: dir.path().to_path_buf(),
    };
    let mut agents = Vec::new();
    for index in 0..args.agents as usize {
        agents.push(Agent::start(&settings, index, &cluster.client_urls()).await?);
    }
    agents::wait_ready(&mut agents, Duration::from_secs(60), dir.path()).await?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut workload = Workload::plan(&mut rng, args.tasks as usize, args.duration);
    let mut nemesis = Nemesis::new(rng, kinds, ttl);
    let started = Instant::now();
    let started_us = now_us();
    let deadline = started + args.duration;
    let mut next_fault = started + nemesis.next_pause();
    let mut steps = std::mem::take(&mut workload.steps).into_iter().peekable();
    let mut retries: Vec<(Instant, Steer)> = Vec::new();
    // Pauses sent at least once: one may have been queued although its
    // answer was lost, so each of these tasks is resumed at the end.
    let mut pauses_tried = std::collections::BTreeSet::new();
    // Which agent takes a request: a stream of its own, so that the
    // nemesis's schedule depends on the seed alone.
    let mut routing = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    while Instant::now() < deadline {
        nemesis
            .heal_due(&mut agents, &mut cluster, &settings, false)
            .await;
        restart_crashed(&mut agents, &settings);
        if Instant::now() >= next_fault {
            nemesis.strike(&mut agents, &mut cluster).await;
            next_fault = Instant::now() + nemesis.next_pause();
        }
        let now = Instant::now();
        let mut due: Vec<Steer> = Vec::new();
        while let Some((_, step)) = steps.next_if(|(at, _)| started + *at <= now) {
            due.push(step);
        }
        retries.retain(|(at, step)| {
            if *at <= now {
                due.push(*step);
                false
            } else {
                true
            }
        });
        for step in due {
            if let Steer::Pause(index) = step {
                pauses_tried.insert(index);
            }
            let taken = take_step(
                step,
                &mut workload.tasks,
                &agents,
                &mut routing,
                (&settings.binary, &sink_path),
            )
            .await?;
            match step {
                _ if !taken => {
                    retries.push((Instant::now() + Duration::from_millis(500), step));
                }
                Steer::Pause(index) => {
                    let after = workload.resume_after[&index];
                    retries.push((Instant::now() + after, Steer::Resume(index)));
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Heal everything, then finish the workload: every submission still
    // owed, and a resume for every task a pause was sent to (pauses and
    // kills not taken yet are dropped).
    nemesis
        .heal_due(&mut agents, &mut cluster, &settings, true)
        .await;
    let owed: Vec<Steer> = steps
        .map(|(_, step)| step)
        .chain(retries.into_iter().map(|(_, step)| step))
        .filter(|step| matches!(step, Steer::Submit(_)))
        .chain(pauses_tried.into_iter().map(Steer::Resume))
        .collect();
    let settle_limit = Duration::from_secs(30) + ttl * 10;
    let settle_deadline = Instant::now() + settle_limit;
    for step in owed {
        while !take_step(
            step,
            &mut workload.tasks,
            &agents,
            &mut routing,
            (&settings.binary, &sink_path),
        )
        .await?
        {
            restart_crashed(&mut agents, &settings);
            if Instant::now() > settle_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    cluster
        .wait_for_leader()
        .await
        .map_err(anyhow::Error::msg)?;
    let mut finals = HashMap::new();
    while Instant::now() < settle_deadline {
        restart_crashed(&mut agents, &settings);
        if let Ok(read) = final_states(store.as_ref(), &namespace).await {
            finals = read;
            let settled = workload.tasks.iter().all(|task| {
                checker::ends_well(
                    task,
                    finals.get(&task.id).copied().unwrap_or(FinalState::Missing),
                )
            });
            if settled {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let end_us = now_us();
    // The watch and the sink catch up with the last writes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for agent in agents.iter_mut() {
        agent.crashed();
    }
    let agent_crashes: u64 = agents.iter().map(|a| u64::from(a.crashes)).sum();
    let (writes, malformed) = sink.snapshot();
    if malformed > 0 {
        eprintln!("chaos: the sink closed {malformed} connection(s) that sent malformed lines");
    }
    let evidence = Evidence {
        tasks: workload.tasks,
        writes,
        history: history.snapshot(),
        finals,
        faults: nemesis.log.clone(),
        agent_crashes,
        agents: agents.len(),
        duration_us: end_us - started_us,
        end_us,
        ttl_us: ttl.as_micros() as u64,
    };
    for agent in agents.iter_mut() {
        agent.stop(Duration::from_secs(10)).await;
    }
    let report = checker::check(&evidence);
    print_report(&report);
    if !report.ok {
        let kept = dir.keep();
        eprintln!(
            "chaos: FAILED (seed {seed}); the agents' logs are kept in {}",
            kept.display()
        );
        if let Some(violation) = &report.first_violation {
            eprintln!("chaos: first violation: {violation}");
        }
    }
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["seed"] = seed.into();
        println!("{json}");
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// Start again every agent that exited by itself (each counted as a crash).
fn restart_crashed(agents: &mut [Agent], settings: &AgentSettings) {
    for agent in agents.iter_mut() {
        if agent.crashed() {
            eprintln!("chaos: agent {} exited without being killed", agent.name);
            let _ = agent.spawn(settings);
        }
    }
}

/// Take one workload step through some agent that answers; `false` when
/// none did (the step is retried). A request the agent calls malformed is
/// the run's own bug and ends it.
async fn take_step(
    step: Steer,
    tasks: &mut [PlannedTask],
    agents: &[Agent],
    rng: &mut StdRng,
    (program, sink): (&Path, &Path),
) -> Result<bool> {
    let mut order: Vec<&Agent> = agents
        .iter()
        .filter(|a| a.pid().is_some() && !a.frozen)
        .collect();
    order.shuffle(rng);
    let index = match step {
        Steer::Submit(i) | Steer::Pause(i) | Steer::Resume(i) | Steer::Kill(i) => i,
    };
    if let Steer::Kill(_) = step {
        // Counted from the first attempt: one whose answer was lost may
        // have been queued, and the task may end killed.
        tasks[index].kill_sent = true;
    }
    for agent in order {
        let task = &mut tasks[index];
        let call = async {
            match step {
                Steer::Submit(_) => {
                    let mut submit = Submit::new(
                        program.to_string_lossy(),
                        vec![
                            witness::WITNESS_COMMAND.into(),
                            "--sink".into(),
                            sink.to_string_lossy().into_owned(),
                            "--work".into(),
                            task.work.to_string(),
                        ],
                    );
                    submit.id = Some(task.id.clone());
                    submit.spec.permanent = task.work == 0;
                    // Stale runs exit non-zero: they must not use up a
                    // task's attempts (as many as a spec may have).
                    submit.spec.max_attempts = eretes_exec::MAX_ATTEMPTS;
                    agent.client.submit(&submit).await.map(|_| ())
                }
                Steer::Pause(_) => agent
                    .client
                    .command(&task.id, Command::Pause)
                    .await
                    .map(|_| ()),
                Steer::Resume(_) => agent
                    .client
                    .command(&task.id, Command::Resume)
                    .await
                    .map(|_| ()),
                Steer::Kill(_) => agent
                    .client
                    .command(&task.id, Command::Kill)
                    .await
                    .map(|_| ()),
            }
        };
        let sent_us = now_us();
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(())) => {
                match step {
                    Steer::Pause(_) => task.paused.push((sent_us, u64::MAX)),
                    // Closes the open pause window only: the resume sent to
                    // every paused task at the end must not stretch one
                    // that was closed long before.
                    Steer::Resume(_) => {
                        if let Some(window) = task.paused.last_mut().filter(|w| w.1 == u64::MAX) {
                            window.1 = now_us();
                        }
                    }
                    Steer::Kill(_) | Steer::Submit(_) => {}
                }
                return Ok(true);
            }
            // A submission that went through before its answer was lost.
            Ok(Err(ClientError::Refused { status, .. }))
                if status == reqwest::StatusCode::CONFLICT && step == Steer::Submit(index) =>
            {
                return Ok(true)
            }
            // A command for a task that has ended (or was never paused)
            // has nothing to do.
            Ok(Err(ClientError::Refused { status, .. }))
                if status == reqwest::StatusCode::CONFLICT =>
            {
                return Ok(true)
            }
            Ok(Err(ClientError::Refused {
                status, message, ..
            })) if status == reqwest::StatusCode::BAD_REQUEST => {
                bail!(
                    "agent {} refused the workload's {step:?}: {message}",
                    agent.name
                )
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, ?step, agent = %agent.name, "a workload step failed")
            }
            Err(_) => tracing::debug!(?step, agent = %agent.name, "a workload step timed out"),
        }
    }
    Ok(false)
}

/// Each task's standing in the store now.
async fn final_states(
    store: &dyn Store,
    namespace: &Namespace,
) -> Result<HashMap<String, FinalState>> {
    let read = store.get_prefix(namespace.root()).await?;
    let mut records: HashMap<String, (bool, bool)> = HashMap::new();
    let mut ended: HashMap<String, FinalState> = HashMap::new();
    for kv in &read.kvs {
        match namespace.parse(&kv.key) {
            Ok(KeyKind::Task(id)) => records.entry(id.as_str().into()).or_default().0 = true,
            Ok(KeyKind::Owner(id)) => records.entry(id.as_str().into()).or_default().1 = true,
            Ok(KeyKind::Result(id)) => {
                let result: ResultRecord = decode("result", &kv.key, &kv.value)?;
                ended.insert(id.as_str().into(), FinalState::Ended(result.outcome));
            }
            _ => {}
        }
    }
    let mut finals: HashMap<String, FinalState> = records
        .into_iter()
        .filter(|(_, (record, _))| *record)
        .map(|(id, (_, owned))| {
            let state = if owned {
                FinalState::Running
            } else {
                FinalState::Pending
            };
            (id, state)
        })
        .collect();
    finals.extend(ended);
    Ok(finals)
}

fn print_report(report: &checker::Report) {
    let faults: Vec<String> = report
        .faults
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    println!(
        "{} agents, {} tasks, {:.1} s; faults: {}",
        report.agents,
        report.tasks,
        report.duration_ms as f64 / 1000.0,
        if faults.is_empty() {
            "none".to_string()
        } else {
            faults.join(", ")
        }
    );
    println!(
        "{} runs wrote {} times; overlaps {}, stale writes accepted {} (refused {}), lost {}, \
         double completions {}, sequence gaps {}, agent crashes {}; {} completed; the longest \
         a task waited for a run: {} ms",
        report.runs,
        report.writes,
        report.overlaps,
        report.stale_writes_accepted,
        report.stale_writes_refused,
        report.lost,
        report.double_completions,
        report.sequence_gaps,
        report.agent_crashes,
        report.completed,
        report.max_unavailable_ms
    );
    if let Some(at) = &report.max_unavailable_at {
        println!("the longest wait: {at}");
    }
    if report.ok {
        println!("every guarantee held");
    }
}
