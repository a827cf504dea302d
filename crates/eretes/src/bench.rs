//! `eretes bench`: the figures in BENCHMARKS.md. Each scenario prints a human
//! line and, with `--json`, one JSON object as the last line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use eretes_protocol::MAX_CLAIM_BATCH;
use eretes_store::counting::CountingStore;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{
    Compare, DeleteRequest, EventKind, GetRequest, KeyRange, PutRequest, Store, Txn, TxnOp,
};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{Cluster, Work, CLAIMS_IN_FLIGHT};
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
    /// Three nodes claim 10,000 submitted tasks, against plain
    /// create-if-absent transactions at the same concurrency (embedded or etcd).
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
    /// Nodes to run (default: 1 for throughput and memory, 3 otherwise).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
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
}

/// The longest a benchmark may run before it gives up.
const LIMIT: Duration = Duration::from_secs(600);

/// Run a benchmark.
pub async fn run(args: BenchArgs) -> Result<()> {
    let embedded_only = matches!(
        args.scenario,
        Scenario::Throughput | Scenario::Memory | Scenario::ClusterClaim | Scenario::Agent
    );
    if embedded_only && args.store.is_etcd() {
        bail!(
            "--etcd: the {:?} benchmark measures the embedded store only; \
             on etcd, run `eretes bench claim`, `failover` or `steady`",
            args.scenario
        );
    }
    let report = match args.scenario {
        Scenario::Throughput => throughput(&args).await?,
        Scenario::Memory => memory(&args).await?,
        Scenario::ClusterClaim => cluster_claim(&args).await?,
        Scenario::Agent => agent(&args).await?,
        Scenario::Claim | Scenario::Failover | Scenario::Steady => on_any_store(&args).await?,
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
    for name in nodes(count) {
        cluster.add_node(&name).await?;
    }
    Ok(())
}

/// Submit N no-op tasks while the nodes run them; the clock stops when the
/// store holds N results (counted from a watch, so only durable completions count).
async fn throughput(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Noop)?;
    add_nodes(&mut cluster, args.nodes.unwrap_or(1)).await?;
    let results = cluster.ns.results_prefix();
    let mut watch = store.watch(KeyRange::prefix(results), 0).await?;
    let started = Instant::now();
    let submitting = cluster.submit("noop", tasks);
    let counting = async {
        let mut done = 0usize;
        while done < tasks {
            let batch = watch.next().await.context("watch ended")??;
            done += batch.len();
        }
        anyhow::Ok(())
    };
    let (submitted, counted) =
        tokio::time::timeout(LIMIT, futures::future::join(submitting, counting))
            .await
            .context("throughput benchmark timed out")?;
    submitted?;
    counted?;
    let elapsed = started.elapsed();
    let rate = tasks as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {tasks} no-op tasks submitted, claimed and completed in {:.3} s = {:.0} tasks/s ({} node(s))",
        elapsed.as_secs_f64(),
        rate,
        cluster.nodes.len()
    );
    let nodes = cluster.nodes.len();
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "throughput",
        "tasks": tasks,
        "nodes": nodes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "tasks_per_s": rate.round(),
    }))
}

/// Resident set size of this process, in bytes, from /proc/self/statm.
fn resident_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("/proc/self/statm has no resident field")?
        .parse()
        .context("/proc/self/statm resident field is not a number")?;
    // The page size is 4 KiB on every Linux target this runs on.
    Ok(pages * 4096)
}

/// How long the memory benchmark lets the cluster settle before reading the
/// resident set: the node may still be applying the last claims' watch events.
const SETTLE: Duration = Duration::from_secs(1);

/// Wait until the cluster's nodes run `count` handlers between them, then
/// let it settle.
async fn wait_running(cluster: &Cluster, count: usize) -> Result<()> {
    wait_until(&format!("{count} tasks run"), || {
        let running: usize = cluster
            .nodes
            .values()
            .map(|node| node.status().borrow().running)
            .sum();
        running >= count
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

/// How many keys start with `prefix`, counted by the store without copying them.
async fn count_keys(store: &dyn Store, prefix: &str) -> Result<usize> {
    let request = GetRequest::new(KeyRange::prefix(prefix)).count_only();
    Ok(store.get(request).await?.count)
}

/// Wait until `count` tasks of the cluster's namespace have an owner.
async fn wait_owned(store: &dyn Store, prefix: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let owned = count_keys(store, prefix).await?;
        if owned >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {owned} of {count} tasks were claimed within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// RSS growth per running idle task: everything one more task costs the
/// process (its store keys, the node's cache entries, the handler task).
async fn memory(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(50_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Idle)?;
    add_nodes(&mut cluster, args.nodes.unwrap_or(1)).await?;
    // Warm up allocator pools with a first batch, so the measured growth is
    // the steady cost per task rather than one-off arena set-up.
    let warmup = tasks / 10;
    cluster.submit("warm", warmup).await?;
    wait_running(&cluster, warmup).await?;
    let before = resident_bytes()?;
    cluster.submit("idle", tasks).await?;
    wait_running(&cluster, warmup + tasks).await?;
    let after = resident_bytes()?;
    let per_task = after.saturating_sub(before) as f64 / tasks as f64;
    let running = count_keys(store.as_ref(), &cluster.ns.owners_prefix()).await?;
    println!(
        "memory: {running} idle tasks running; RSS grew {:.1} MiB for {tasks} tasks = {:.0} bytes per task",
        after.saturating_sub(before) as f64 / 1048576.0,
        per_task
    );
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "memory",
        "tasks": tasks,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_task": per_task.round(),
    }))
}

/// Submit N tasks first, then start the cluster and time until all are claimed.
async fn cluster_claim(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let (store, mut cluster) = bench_cluster(Work::Idle)?;
    cluster.submit("claim", tasks).await?;
    let started = Instant::now();
    let node_count = args.nodes.unwrap_or(3);
    add_nodes(&mut cluster, node_count).await?;
    wait_owned(store.as_ref(), &cluster.ns.owners_prefix(), tasks).await?;
    let elapsed = started.elapsed();
    let rate = tasks as f64 / elapsed.as_secs_f64();
    println!(
        "cluster-claim: {node_count} nodes claimed {tasks} submitted tasks in {:.3} s = {:.0} claims/s",
        elapsed.as_secs_f64(),
        rate
    );
    cluster.shutdown().await;
    Ok(json!({
        "scenario": "cluster-claim",
        "tasks": tasks,
        "nodes": node_count,
        "elapsed_ms": elapsed.as_millis() as u64,
        "claims_per_s": rate.round(),
    }))
}

/// Run the claim or failover benchmark on the store the arguments name, in a
/// namespace of its own that is removed afterwards.
async fn on_any_store(args: &BenchArgs) -> Result<serde_json::Value> {
    let store = args.store.open().await?;
    let (namespace, backend) = match &args.store.etcd {
        Some(_) => (format!("bench-{:08x}", rand::random::<u32>()), "etcd"),
        None => ("bench".to_string(), "embedded"),
    };
    let report = match args.scenario {
        Scenario::Failover => failover(args, store.clone(), &namespace).await,
        Scenario::Steady => steady(args, store.clone(), &namespace).await,
        _ => claim(args, store.clone(), &namespace).await,
    };
    store
        .delete(DeleteRequest::new(KeyRange::prefix(format!(
            "{namespace}/"
        ))))
        .await?;
    let mut report = report?;
    report["backend"] = json!(backend);
    Ok(report)
}

/// Plain create-if-absent transactions on `count` fresh keys under `prefix`,
/// `concurrency` at a time: the store's raw claim-shaped rate, per second.
async fn raw_create_rate(
    store: &Arc<dyn Store>,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (store, next, prefix) = (store.clone(), next.clone(), prefix.to_string());
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return anyhow::Ok(());
                }
                let key = format!("{prefix}{n:07}");
                let value = br#"{"node":"node-1","group":"default"}"#.to_vec();
                let txn = Txn::new()
                    .when(Compare::absent(&key))
                    .and_then(TxnOp::Put(PutRequest::new(&key, value)));
                if !store.txn(txn).await?.succeeded {
                    bail!("raw create of fresh key {key} failed its compare");
                }
            }
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Three nodes claim N tasks submitted beforehand; in the same run, the rate
/// of plain create-if-absent transactions at the concurrency the nodes' claim
/// pipelines can reach (each node has `CLAIMS_IN_FLIGHT / MAX_CLAIM_BATCH`
/// claim transactions in flight at most).
async fn claim(args: &BenchArgs, store: Arc<dyn Store>, ns: &str) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(10_000) as usize;
    let node_count = args.nodes.unwrap_or(3);
    let concurrency = node_count as usize * CLAIMS_IN_FLIGHT.div_ceil(MAX_CLAIM_BATCH);
    let raw_prefix = format!("{ns}/raw/");
    let raw_rate = raw_create_rate(&store, &raw_prefix, tasks, concurrency).await?;
    store
        .delete(DeleteRequest::new(KeyRange::prefix(&raw_prefix)))
        .await?;

    let mut cluster = Cluster::new(store.clone(), ns, Work::Idle, Duration::from_secs(10))?;
    cluster.submit("claim", tasks).await?;
    // Count owner records from a watch: precise, and no polling load on the store.
    let mut owners = store
        .watch(KeyRange::prefix(cluster.ns.owners_prefix()), 0)
        .await?;
    let started = Instant::now();
    add_nodes(&mut cluster, node_count).await?;
    let counting = async {
        let mut owned = std::collections::HashSet::new();
        while owned.len() < tasks {
            for event in owners.next().await.context("watch ended")?? {
                match event.kind {
                    EventKind::Put => owned.insert(event.kv.key),
                    EventKind::Delete => owned.remove(&event.kv.key),
                };
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(LIMIT, counting)
        .await
        .context("claim benchmark timed out")??;
    let elapsed = started.elapsed();
    cluster.shutdown().await;
    let rate = tasks as f64 / elapsed.as_secs_f64();
    let ratio = rate / raw_rate;
    println!(
        "claim: {node_count} nodes claimed {tasks} tasks in {:.3} s = {rate:.0} claims/s; \
         raw create-if-absent transactions ({concurrency} at a time): {raw_rate:.0}/s; ratio {ratio:.2}",
        elapsed.as_secs_f64()
    );
    Ok(json!({
        "scenario": "claim",
        "tasks": tasks,
        "nodes": node_count,
        "elapsed_ms": elapsed.as_millis() as u64,
        "claims_per_s": rate.round(),
        "raw_txn_per_s": raw_rate.round(),
        "raw_concurrency": concurrency,
        "ratio": (ratio * 100.0).round() / 100.0,
    }))
}

/// A node owning N tasks is killed abruptly (no release, its lease lapses);
/// the clock runs until the last of its tasks runs on a survivor. Nodes keep
/// what they claim (no rebalancing), so the victim owns every task.
async fn failover(args: &BenchArgs, store: Arc<dyn Store>, ns: &str) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(1_000) as usize;
    let node_count = args.nodes.unwrap_or(3).max(2);
    let ttl = Duration::from_secs(2);
    let mut cluster = Cluster::new(store, ns, Work::Observed, ttl)?;
    cluster.rebalance = false;
    let victim = "node-1";
    cluster.add_node(victim).await?;
    cluster.submit("failover", tasks).await?;
    wait_until(&format!("{tasks} tasks run on {victim}"), || {
        cluster.observer.running_on(victim).len() == tasks
    })
    .await?;
    for name in nodes(node_count).iter().skip(1) {
        cluster.add_node(name).await?;
    }
    let orphans = cluster.observer.running_on(victim);
    // When etcd (or the embedded store) expires the victim's lease: the
    // first deletion of an owner record. Splits the failover into the
    // store's expiry and the survivors' claims.
    let mut owners = cluster
        .store
        .watch(KeyRange::prefix(cluster.ns.owners_prefix()), 0)
        .await?;
    let killed_at = Instant::now();
    cluster.nodes[victim].kill();
    let expired = tokio::spawn(async move {
        while let Some(Ok(batch)) = owners.next().await {
            if batch.iter().any(|e| e.kind == EventKind::Delete) {
                return Some(Instant::now());
            }
        }
        None
    });
    wait_until("every orphan runs on a survivor", || {
        cluster.observer.running_tasks() == tasks && cluster.observer.running_on(victim).is_empty()
    })
    .await?;
    let failover = cluster
        .observer
        .last_restart(&orphans, killed_at)
        .context("no orphan restarted")?
        - killed_at;
    let overlaps = cluster.observer.overlaps();
    let expiry = expired.await?.map(|at| at - killed_at).unwrap_or_default();
    cluster.shutdown().await;
    let ratio = failover.as_secs_f64() / ttl.as_secs_f64();
    println!(
        "failover: killed a node owning {tasks} tasks; its lease expired after {} ms; \
         all ran elsewhere after {} ms (lease TTL {} ms, ratio {ratio:.2}); overlapping runs {overlaps}",
        expiry.as_millis(),
        failover.as_millis(),
        ttl.as_millis()
    );
    Ok(json!({
        "scenario": "failover",
        "tasks": tasks,
        "nodes": node_count,
        "failover_ms": failover.as_millis() as u64,
        "expiry_ms": expiry.as_millis() as u64,
        "ttl_ms": ttl.as_millis() as u64,
        "ratio": (ratio * 100.0).round() / 100.0,
        "overlaps": overlaps,
    }))
}

/// One node runs N idle tasks with the runtime's default timings (lease
/// 10 s, resync 30 s); once all of them run, every request it sends to the
/// store is counted for a window. O(1) means the rate does not grow with N.
async fn steady(args: &BenchArgs, store: Arc<dyn Store>, ns: &str) -> Result<serde_json::Value> {
    let sizes = match args.tasks {
        Some(tasks) => vec![tasks as usize],
        None => vec![100, 1_000, 10_000],
    };
    let window = Duration::from_secs(args.window_s);
    let counting = Arc::new(CountingStore::new(store));
    let mut runs = Vec::new();
    for &tasks in &sizes {
        // One size after another in the bench's namespace, emptied between
        // sizes (and by the caller at the end, whatever happens).
        let mut cluster = Cluster::new(counting.clone(), ns, Work::Idle, Duration::from_secs(10))?;
        cluster.add_node("node-1").await?;
        cluster.submit("steady", tasks).await?;
        let status = cluster.nodes["node-1"].status();
        wait_until(&format!("{tasks} tasks run"), || {
            status.borrow().running == tasks
        })
        .await?;
        let before = counting.counts();
        tokio::time::sleep(window).await;
        let counts = counting.counts().since(&before);
        cluster.shutdown().await;
        counting
            .delete(DeleteRequest::new(KeyRange::prefix(format!("{ns}/"))))
            .await?;
        let rate = counts.total() as f64 / window.as_secs_f64();
        println!(
            "steady: one node running {tasks} tasks sent {} requests in {} s = {rate:.2}/s \
             ({} keepalives, {} reads, {} transactions, {} watches opened)",
            counts.total(),
            window.as_secs(),
            counts.lease_keepalive,
            counts.get,
            counts.txn,
            counts.watch
        );
        runs.push(json!({
            "tasks": tasks,
            "requests": counts.total(),
            "requests_per_s": (rate * 100.0).round() / 100.0,
            "by_kind": counts,
        }));
    }
    let rates: Vec<f64> = runs
        .iter()
        .map(|run| run["requests_per_s"].as_f64().unwrap_or(0.0))
        .collect();
    let max_rate = rates.iter().cloned().fold(0.0, f64::max);
    Ok(json!({
        "scenario": "steady",
        "window_s": window.as_secs(),
        "runs": runs,
        "max_requests_per_s": max_rate,
    }))
}

/// Start this binary's `eretes agent` on a fresh data directory and measure
/// it through its API: N `true` tasks one after another, each from submit
/// until the wait call reports it done (every step is fsync'd by the durable
/// store); then 20 × N submissions by 8 concurrent clients to a group no
/// agent serves (so nothing runs), for the API's submit rate.
async fn agent(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100) as usize;
    let data_dir = std::env::temp_dir().join(format!("eretes-bench-{:08x}", rand::random::<u32>()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("agent")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "bench"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting eretes agent")?;
    let agent_pid = child.id().context("the agent's pid")? as i32;
    let result = measure_agent(&url, tasks, agent_pid).await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn measure_agent(url: &str, tasks: usize, agent_pid: i32) -> Result<serde_json::Value> {
    let http = reqwest::Client::new();
    let ready = format!("{url}/readyz");
    wait_until_async("the agent is ready", || {
        let (http, ready) = (http.clone(), ready.clone());
        async move {
            http.get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await?;
    let mut overheads = Vec::with_capacity(tasks);
    for n in 0..tasks {
        let id = format!("overhead-{n}");
        let started = Instant::now();
        http.post(format!("{url}/v1/tasks"))
            .json(&json!({ "id": id, "program": "true" }))
            .send()
            .await?
            .error_for_status()?;
        let view: serde_json::Value = http
            .get(format!("{url}/v1/tasks/{id}/wait?timeout_s=60"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if view["state"] != "done" {
            bail!("task {id} did not finish: {view}");
        }
        overheads.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    overheads.sort_by(f64::total_cmp);
    let median_ms = overheads[overheads.len() / 2];
    let p90_ms = overheads[overheads.len() * 9 / 10];

    let submissions = tasks * 20;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, next, url) = (http.clone(), next.clone(), url.to_string());
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= submissions {
                    return anyhow::Ok(());
                }
                http.post(format!("{url}/v1/tasks"))
                    .json(&json!({ "id": format!("submit-{n}"), "group": "nobody", "program": "true" }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let submits_per_s = submissions as f64 / started.elapsed().as_secs_f64();
    let pss = supervisor_pss(url, &http, agent_pid).await?;
    let (direct_ms, supervised_ms) = supervisor_start_cost(tasks).await?;
    println!(
        "agent: a `true` task takes {median_ms:.1} ms from submit to done (median of {tasks}; p90 {p90_ms:.1} ms); \
         the API takes {submits_per_s:.0} submissions/s (8 clients, {submissions} tasks); \
         a supervisor costs {pss:.0} KiB PSS (median of {SUPERVISED}) and `true` takes {supervised_ms:.2} ms \
         under one against {direct_ms:.2} ms alone (medians of {tasks})"
    );
    Ok(json!({
        "scenario": "agent",
        "tasks": tasks,
        "overhead_median_ms": (median_ms * 10.0).round() / 10.0,
        "overhead_p90_ms": (p90_ms * 10.0).round() / 10.0,
        "submissions": submissions,
        "submits_per_s": submits_per_s.round(),
        "supervisor_pss_kib": pss.round(),
        "true_direct_ms": (direct_ms * 100.0).round() / 100.0,
        "true_supervised_ms": (supervised_ms * 100.0).round() / 100.0,
    }))
}

/// Long-running tasks whose supervisors' memory is measured.
const SUPERVISED: usize = 20;

/// Run [`SUPERVISED`] `sleep` tasks on the agent and return the median
/// proportional set size of their supervisors (the agent's children), in
/// KiB: what each costs once the pages it shares with the agent and the
/// other supervisors are divided among them.
async fn supervisor_pss(url: &str, http: &reqwest::Client, agent_pid: i32) -> Result<f64> {
    for n in 0..SUPERVISED {
        http.post(format!("{url}/v1/tasks"))
            .json(&json!({ "id": format!("resident-{n}"), "program": "sleep", "args": ["600"] }))
            .send()
            .await?
            .error_for_status()?;
    }
    let supervisors = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| parent_of(pid) == Some(agent_pid))
            .collect::<Vec<i32>>()
    };
    wait_until("every resident task runs", || {
        supervisors().len() >= SUPERVISED
    })
    .await?;
    let mut pss: Vec<f64> = supervisors()
        .into_iter()
        .filter_map(|pid| {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .collect();
    if pss.is_empty() {
        bail!("no supervisor's memory could be read");
    }
    pss.sort_by(f64::total_cmp);
    Ok(pss[pss.len() / 2])
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Medians, over `runs` alternating runs, of `true` started and reaped
/// alone and `true` under this binary's supervisor (exec'd, launched,
/// reported and reaped — what a run costs when no supervisor was started
/// ahead of it): the supervisor's extra cost per task start, in
/// milliseconds.
async fn supervisor_start_cost(runs: usize) -> Result<(f64, f64)> {
    let launch = eretes_exec::supervisor::wire::Launch {
        program: "true".into(),
        args: Vec::new(),
        cwd: None,
        env: Vec::new(),
        grace_ms: 1000,
        deadline_ns: 0,
        run_as: None,
        open_files: None,
    }
    .encode();
    let (mut direct, mut supervised) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        tokio::process::Command::new("true").status().await?;
        direct.push(started.elapsed().as_secs_f64() * 1000.0);

        let started = Instant::now();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg(eretes_exec::supervisor::SUBCOMMAND)
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs,
            )))
            .spawn()?;
        let launch = launch.clone();
        // The supervisor reports and exits; its socket then reads as closed.
        tokio::task::spawn_blocking(move || {
            std::io::Write::write_all(&mut &ours, launch.as_bytes())?;
            let mut reports = String::new();
            std::io::Read::read_to_string(&mut &ours, &mut reports).map(|_| reports)
        })
        .await??
        .contains("ended 0 exited")
        .then_some(())
        .context("the supervisor did not report `true` exiting")?;
        child.wait().await?;
        supervised.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    direct.sort_by(f64::total_cmp);
    supervised.sort_by(f64::total_cmp);
    Ok((direct[runs / 2], supervised[runs / 2]))
}

/// Poll `done` every 50 ms until it holds; fail naming `what` after 30 s.
async fn wait_until_async<F, Fut>(what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        if Instant::now() > deadline {
            bail!("timed out after 30 s waiting until {what}");
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
