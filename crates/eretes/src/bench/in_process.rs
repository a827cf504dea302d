//! Benchmarks of nodes running in this process: throughput, memory, claim
//! rate against the store's raw transaction rate, failover, steady-state
//! store load.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eretes_protocol::{GroupName, TaskId, TaskSpec, MAX_CLAIM_BATCH, MAX_SUBMIT_BATCH};
use eretes_runtime::NodeStats;
use eretes_store::counting::CountingStore;
use eretes_store::{
    Compare, DeleteRequest, EventKind, GetRequest, KeyRange, PutRequest, Store, Txn, TxnOp,
};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use super::etcd_load::EtcdProbe;
use super::{add_nodes, bench_cluster, nodes, wait_until, BenchArgs, Scenario, LIMIT};
use crate::cluster::{Cluster, Work, CLAIMS_IN_FLIGHT};

/// Submit N no-op tasks while the nodes run them; the clock stops when the
/// store holds N results (counted from a watch, so only durable completions count).
pub(super) async fn throughput(args: &BenchArgs) -> Result<serde_json::Value> {
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
pub(super) fn resident_bytes() -> Result<u64> {
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
pub(super) async fn memory(args: &BenchArgs) -> Result<serde_json::Value> {
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
pub(super) async fn cluster_claim(args: &BenchArgs) -> Result<serde_json::Value> {
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
pub(super) async fn on_any_store(args: &BenchArgs) -> Result<serde_json::Value> {
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

/// N nodes claim M tasks; in the same run, the rate of plain
/// create-if-absent transactions at the concurrency the nodes' claim
/// pipelines can reach (each node has `CLAIMS_IN_FLIGHT / MAX_CLAIM_BATCH`
/// claim transactions in flight at most).
///
/// Every node is up and sees every other before the first task exists: with
/// tasks waiting while the nodes start one by one, the first node claimed
/// nearly all of them alone and then handed most back, so the figure
/// measured start-up and rebalancing, and fell with the nodes (16,451
/// claims/s at 1 node, 3,874 at 10, on etcd). The tasks are then written
/// in batches of [`MAX_SUBMIT_BATCH`] (`Coordinator::submit_batch`),
/// faster than the nodes claim them; the clock runs
/// from the first submission until every task has an owner.
async fn claim(args: &BenchArgs, store: Arc<dyn Store>, ns: &str) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(10_000) as usize;
    let node_count = args.nodes.unwrap_or(3);
    let concurrency = node_count as usize * CLAIMS_IN_FLIGHT.div_ceil(MAX_CLAIM_BATCH);
    let etcd = EtcdProbe::new(args.store.etcd.as_deref(), args.etcd_pid)?;
    let raw_prefix = format!("{ns}/raw/");
    let raw_rate = raw_create_rate(&store, &raw_prefix, tasks, concurrency).await?;
    // A thousand keys to a delete: etcd took more than the client's 5 s
    // to delete 20,000 in one request, now and then.
    for start in (0..tasks).step_by(1_000) {
        let range = KeyRange::span(
            format!("{raw_prefix}{start:07}"),
            format!("{raw_prefix}{:07}", start + 1_000),
        );
        store.delete(DeleteRequest::new(range)).await?;
    }
    // Whatever the spans missed (names past seven digits).
    store
        .delete(DeleteRequest::new(KeyRange::prefix(&raw_prefix)))
        .await?;

    let mut cluster = Cluster::new(store.clone(), ns, Work::Idle, Duration::from_secs(10))?;
    add_nodes(&mut cluster, node_count).await?;
    wait_until(&format!("every node sees {node_count} nodes"), || {
        cluster
            .nodes
            .values()
            .all(|node| node.status().borrow().live_nodes == node_count as usize)
    })
    .await?;
    // Count owner records from a watch: precise, and no polling load on the store.
    let mut owners = store
        .watch(KeyRange::prefix(cluster.ns.owners_prefix()), 0)
        .await?;
    let etcd_before = etcd.read().await;
    let own_cpu_before = super::idle::cpu_seconds(std::process::id() as i32)?;
    let started = Instant::now();
    let submitting = async {
        submit_in_batches(&cluster, "claim", tasks).await?;
        anyhow::Ok(started.elapsed())
    };
    let counting = async {
        let mut owned = std::collections::HashSet::new();
        let mut released = 0usize;
        while owned.len() < tasks {
            for event in owners.next().await.context("watch ended")?? {
                match event.kind {
                    EventKind::Put => {
                        owned.insert(event.kv.key);
                    }
                    EventKind::Delete => {
                        owned.remove(&event.kv.key);
                        released += 1;
                    }
                }
            }
        }
        anyhow::Ok((started.elapsed(), released))
    };
    let (submitted_in, (elapsed, released)) =
        tokio::time::timeout(LIMIT, futures::future::try_join(submitting, counting))
            .await
            .context("claim benchmark timed out")??;
    let own_cpu = super::idle::cpu_seconds(std::process::id() as i32)? - own_cpu_before;
    let etcd_after = etcd.read().await;
    // Claims that lost a compare to another node's: each costs the store a
    // transaction, and a batch that loses one is sent again task by task.
    let claim_conflicts: u64 = cluster
        .nodes
        .values()
        .map(|node| NodeStats::get(&node.stats().claim_conflicts))
        .sum();
    cluster.shutdown().await;
    let seconds = elapsed.as_secs_f64();
    let rate = tasks as f64 / seconds;
    let ratio = rate / raw_rate;
    println!(
        "claim: {node_count} nodes claimed {tasks} tasks in {seconds:.3} s = {rate:.0} claims/s \
         (submitted in {:.3} s, {released} released again, {claim_conflicts} claims lost to \
         another node's); raw create-if-absent transactions \
         ({concurrency} at a time): {raw_rate:.0}/s; ratio {ratio:.2}",
        submitted_in.as_secs_f64()
    );
    let mut report = json!({
        "scenario": "claim",
        "tasks": tasks,
        "nodes": node_count,
        "elapsed_ms": elapsed.as_millis() as u64,
        "submitted_ms": submitted_in.as_millis() as u64,
        "claims_per_s": rate.round(),
        "released": released,
        "claim_conflicts": claim_conflicts,
        "raw_txn_per_s": raw_rate.round(),
        "raw_concurrency": concurrency,
        "ratio": (ratio * 100.0).round() / 100.0,
        "bench_cpu_cores": (own_cpu / seconds * 100.0).round() / 100.0,
    });
    if args.store.is_etcd() {
        let load = etcd_before.report(&etcd_after, seconds, tasks);
        report
            .as_object_mut()
            .expect("an object")
            .extend(load.as_object().expect("an object").clone());
    }
    Ok(report)
}

/// Submit `count` tasks named `<prefix>-<n>` to the default group, in
/// batches of [`MAX_SUBMIT_BATCH`] (`Coordinator::submit_batch`), eight
/// batches at a time.
async fn submit_in_batches(cluster: &Cluster, prefix: &str, count: usize) -> Result<()> {
    const SUBMITTERS: usize = 8;
    let spec = TaskSpec::new(GroupName::default(), serde_json::Value::Null);
    let batches: Vec<Vec<(TaskId, TaskSpec)>> = (0..count)
        .map(|n| Ok((TaskId::new(format!("{prefix}-{n:07}"))?, spec.clone())))
        .collect::<Result<Vec<_>>>()?
        .chunks(MAX_SUBMIT_BATCH)
        .map(<[_]>::to_vec)
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let submitter = || async {
        loop {
            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(batch) = batches.get(index) else {
                return anyhow::Ok(());
            };
            cluster
                .coordinator
                .submit_batch(batch)
                .await
                .with_context(|| format!("submission batch {index} in a fresh namespace"))?;
        }
    };
    futures::future::try_join_all((0..SUBMITTERS).map(|_| submitter())).await?;
    Ok(())
}

/// A node owning N tasks is killed abruptly (no release, its lease lapses);
/// the clock runs until the last of its tasks runs on a survivor. Nodes keep
/// what they claim (no rebalancing), so the victim owns every task.
async fn failover(args: &BenchArgs, store: Arc<dyn Store>, ns: &str) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(1_000) as usize;
    let node_count = args.nodes.unwrap_or(3);
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
