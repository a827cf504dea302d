//! `eretes bench scale`: N in-process nodes on one store (embedded, or etcd
//! with `--etcd`) claim M idle tasks submitted beforehand; then a tenth of
//! the nodes die abruptly and, once their tasks run elsewhere, rejoin under
//! their names. Real timers and real leases (TTL 2 s, or `--lease-ttl-ms`), the real protocol;
//! the nodes are simulated only in that they share one process and one
//! store client.
//!
//! Reported: the time until every task runs, and until the cluster is
//! balanced (no ownership change for 3 s); the spread (most minus fewest
//! tasks on a live node); the ownership moves after the deaths against the
//! minimum (the dead nodes' tasks, and the rejoined nodes' fair share); the
//! store requests per second, per node, while claiming and in a quiet
//! window; the process's resident memory per task and node (every node's
//! view of the cluster and the idle handlers, the store's own copy aside);
//! what one more node that serves another group costs per task (its view of
//! tasks it will never run); and what one more node of the tasks' own group
//! costs per task when it has no room to run any (`--slots 0`): its view of
//! the group, without a handler; and how often the nodes fenced. A run in
//! which a task was parked (taken over past the takeover limit, after fences
//! on an overloaded machine) fails at once, naming the fences, since the
//! task will never run again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eretes_protocol::{decode, GroupName, OwnerRecord};
use eretes_runtime::{NodeHandle, NodeStats};
use eretes_store::counting::{CountingStore, RequestCounts};
use eretes_store::{DeleteRequest, EventKind, KeyRange, Store, StoreExt};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use super::{nodes, BenchArgs, PROGRESS_EVERY};
use crate::cluster::{Cluster, Work};

/// The nodes' lease TTL unless `--lease-ttl-ms` gives one.
const TTL: Duration = Duration::from_secs(2);

/// No ownership change for this long counts as balanced.
const QUIET: Duration = Duration::from_secs(3);

/// How long the observer node gets to load its view before memory is read.
const OBSERVER_SETTLE: Duration = Duration::from_secs(3);

/// How often a wait for the owners to reach a state looks at them.
const POLL: Duration = Duration::from_millis(10);

/// The quiet window whose store requests are counted.
const STEADY_WINDOW: Duration = Duration::from_secs(10);

/// Who owns what, from a watch on the owner keys.
#[derive(Default)]
struct Owners {
    /// Task key → owning node.
    owner: HashMap<Box<str>, Arc<str>>,
    /// Owner records written (claims) so far.
    claims: u64,
    last_change: Option<Instant>,
    /// When the first owner record went after [`Owners::first_delete`] was
    /// last cleared: after a kill, when the victims' leases expired.
    first_delete: Option<Instant>,
}

impl Owners {
    fn per_node(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for node in self.owner.values() {
            *counts.entry(node.as_ref()).or_default() += 1;
        }
        counts
    }
}

/// Run the scenario.
pub(super) async fn scale(args: &BenchArgs) -> Result<serde_json::Value> {
    let tasks = args.tasks.unwrap_or(100_000) as usize;
    let node_count = args.nodes.unwrap_or(10);
    if node_count < 2 {
        bail!("--nodes {node_count}: the scale benchmark kills a tenth of the nodes (at least one) and needs a survivor, so at least 2");
    }
    // The embedded store in memory: the figures are the nodes', not a disk's.
    let store = args.store.open().await?;
    let on = if args.store.is_etcd() {
        "etcd"
    } else {
        "embedded"
    };
    let ns = format!("bench-scale-{:08x}", rand::random::<u32>());
    let ttl = args.lease_ttl_ms.map_or(TTL, Duration::from_millis);
    let outcome = measure(store.clone(), &ns, tasks, node_count, on, ttl).await;
    // Whatever happened, the namespace goes (it matters on etcd).
    let _ = store
        .delete(DeleteRequest::new(KeyRange::prefix(format!("{ns}/"))))
        .await;
    outcome
}

async fn measure(
    store: Arc<dyn Store>,
    ns: &str,
    tasks: usize,
    node_count: u16,
    on: &str,
    ttl: Duration,
) -> Result<serde_json::Value> {
    let counting = Arc::new(CountingStore::new(store));
    let mut cluster = Cluster::new(counting.clone(), ns, Work::Idle, ttl)?;
    let submitted = Instant::now();
    cluster.submit("scale", tasks).await?;
    let submit_s = submitted.elapsed().as_secs_f64();
    // A node of the tasks' group with no slot, while every task waits: its
    // view of a backlog (each task a claim candidate).
    let heap_without = heap_in_use();
    let backlog_node_heap = view_of_node_without_slots(&mut cluster, tasks, heap_without).await?;
    let rss_before = retained_bytes()?;
    let heap_before = heap_in_use();
    let owners = watch_owners(counting.as_ref(), &cluster).await?;

    // Every node starts; the clock runs until every task has an owner.
    let started = Instant::now();
    let counts_before = counting.counts();
    super::add_nodes(&mut cluster, node_count).await?;
    let mut killed_nodes = KilledNodes::default();
    let owned = || {
        format!(
            "{} of {tasks} tasks have an owner",
            lock(&owners).owner.len()
        )
    };
    wait_for(
        "every task runs",
        &cluster,
        &killed_nodes,
        POLL,
        || Ok(lock(&owners).owner.len() == tasks),
        owned,
    )
    .await?;
    let all_run = started.elapsed();
    let relists_claiming = relists(&cluster);
    let claiming = counting.counts().since(&counts_before);
    let balanced =
        wait_balanced(&owners, node_count as usize, &cluster, &killed_nodes).await? - started;
    let spread_first = spread(&owners, node_count as usize);
    let rss_running = retained_bytes()?;
    let heap_running = heap_in_use();
    // One more node, serving a group no task is in: what it costs is its
    // view of tasks it will never run.
    cluster
        .add_node_with("observer", |config| {
            config.groups = vec![GroupName::new("bench-scale-observer").expect("a valid group")]
        })
        .await?;
    tokio::time::sleep(OBSERVER_SETTLE).await;
    let observer_bytes = retained_bytes()?.saturating_sub(rss_running) as f64 / tasks as f64;
    let observer_heap = heap_in_use().saturating_sub(heap_running) as f64 / tasks as f64;
    if let Some(observer) = cluster.nodes.remove("observer") {
        observer.shutdown().await;
    }
    // The same once every task runs elsewhere.
    let heap_without = heap_in_use();
    let full_node_heap = view_of_node_without_slots(&mut cluster, tasks, heap_without).await?;
    let steady_before = counting.counts();
    tokio::time::sleep(STEADY_WINDOW).await;
    let steady = counting.counts().since(&steady_before);

    // A tenth of the nodes die; once their tasks run elsewhere they rejoin.
    let victims: Vec<String> = nodes(node_count)
        .into_iter()
        .take((node_count as usize / 10).max(1))
        .collect();
    let (orphans, claims_before) = {
        let owners = lock(&owners);
        let orphans = owners
            .owner
            .values()
            .filter(|node| victims.iter().any(|v| v.as_str() == node.as_ref()))
            .count();
        (orphans, owners.claims)
    };
    lock(&owners).first_delete = None;
    let killed = Instant::now();
    for victim in &victims {
        if let Some(node) = cluster.nodes.remove(victim) {
            killed_nodes.count(&node);
            node.kill();
        }
    }
    wait_for(
        "every orphan runs on a survivor",
        &cluster,
        &killed_nodes,
        POLL,
        || {
            let owners = lock(&owners);
            Ok(owners.owner.len() == tasks
                && owners
                    .owner
                    .values()
                    .all(|node| !victims.iter().any(|v| v.as_str() == node.as_ref())))
        },
        owned,
    )
    .await?;
    let recovered = killed.elapsed();
    // Recovery is the lease's expiry, which depends on where in its
    // keepalive cycle the kill fell (up to a third of the TTL), then the
    // survivors' claims: reported apart, so that a change in the claims
    // is not hidden by that phase.
    let expired = lock(&owners)
        .first_delete
        .context("no owner record went after the kill")?
        - killed;
    for victim in &victims {
        cluster.add_node(victim).await?;
    }
    let rebalanced =
        wait_balanced(&owners, node_count as usize, &cluster, &killed_nodes).await? - killed;
    let spread_after = spread(&owners, node_count as usize);
    let moves = lock(&owners).claims - claims_before;
    let relists_total = relists(&cluster);
    // Orphans read before their claim (a node keeps only counts of what
    // another node runs).
    let task_reads: u64 = cluster
        .nodes
        .values()
        .map(|node| NodeStats::get(&node.stats().task_reads))
        .sum();
    // Claims that lost to another node's (the nodes that survive and the
    // ones that rejoin, counted from their start).
    let claim_conflicts: u64 = cluster
        .nodes
        .values()
        .map(|node| NodeStats::get(&node.stats().claim_conflicts))
        .sum();
    let minimum = orphans + victims.len() * (tasks / node_count as usize);
    let (fences, _) = fences_and_parked(&cluster, &killed_nodes);
    cluster.shutdown().await;

    let per_node = |counts: &RequestCounts, seconds: f64| {
        counts.total() as f64 / seconds / f64::from(node_count)
    };
    let claim_rate = tasks as f64 / all_run.as_secs_f64();
    let claiming_per_node = per_node(&claiming, all_run.as_secs_f64());
    let steady_per_node = per_node(&steady, STEADY_WINDOW.as_secs_f64());
    let view_bytes =
        rss_running.saturating_sub(rss_before) as f64 / tasks as f64 / f64::from(node_count);
    println!(
        "scale ({on}): {node_count} nodes, {tasks} tasks (submitted in {submit_s:.1} s): all run \
         after {:.2} s ({claim_rate:.0} claims/s), balanced after {:.2} s, spread {spread_first}; \
         {:.1} store requests/s per node while claiming, {steady_per_node:.2}/s in a quiet \
         window; {view_bytes:.0} bytes of resident memory per task per node, and \
         {observer_bytes:.0} per task for one more node that serves none of them; \
         {full_node_heap:.0} bytes of heap per task for one more node of their group without a \
         slot ({backlog_node_heap:.0} while they all waited). {} nodes killed: \
         their {orphans} tasks ran elsewhere after {:.2} s (their leases expired after {:.2} s); rejoined and balanced after {:.2} s \
         with {moves} moves (minimum {minimum}), spread {spread_after}; {fences} fences",
        all_run.as_secs_f64(),
        balanced.as_secs_f64(),
        claiming_per_node,
        victims.len(),
        recovered.as_secs_f64(),
        expired.as_secs_f64(),
        rebalanced.as_secs_f64(),
    );
    Ok(json!({
        "scenario": "scale",
        "store": on,
        "nodes": node_count,
        "tasks": tasks,
        "timers": "real",
        "lease_ttl_ms": ttl.as_millis() as u64,
        "all_run_ms": all_run.as_millis() as u64,
        "claims_per_s": claim_rate.round(),
        "balanced_ms": balanced.as_millis() as u64,
        "spread": spread_first,
        "store_requests_per_s_per_node_claiming": (claiming_per_node * 10.0).round() / 10.0,
        "store_requests_per_s_per_node_quiet": (steady_per_node * 100.0).round() / 100.0,
        "rss_bytes_per_task_per_node": view_bytes.round(),
        "other_group_node_bytes_per_task": observer_bytes.round(),
        "heap_bytes_per_task_per_node": (heap_running.saturating_sub(heap_before) as f64
            / tasks as f64
            / f64::from(node_count))
        .round(),
        "other_group_node_heap_bytes_per_task": observer_heap.round(),
        "same_group_node_without_slots_heap_bytes_per_task": full_node_heap.round(),
        "same_group_node_without_slots_backlog_heap_bytes_per_task": backlog_node_heap.round(),
        "task_reads": task_reads,
        "claim_conflicts": claim_conflicts,
        "killed": victims.len(),
        "orphans": orphans,
        "recovered_ms": recovered.as_millis() as u64,
        "lease_expired_ms": expired.as_millis() as u64,
        "orphans_claimed_ms": (recovered.as_millis() - expired.as_millis()) as u64,
        "rebalanced_ms": rebalanced.as_millis() as u64,
        "moves": moves,
        "min_moves": minimum,
        "spread_after": spread_after,
        "relists_while_claiming": relists_claiming,
        "relists": relists_total,
        "fences": fences,
    }))
}

/// Start following the owner keys of `cluster`'s namespace.
async fn watch_owners(store: &dyn Store, cluster: &Cluster) -> Result<Arc<Mutex<Owners>>> {
    let prefix = cluster.ns.owners_prefix();
    let from = store.get_prefix(&prefix).await?.revision + 1;
    let mut stream = store.watch(KeyRange::prefix(&prefix), from).await?;
    let owners: Arc<Mutex<Owners>> = Arc::default();
    let tracked = owners.clone();
    // On a thread of its own: on the nodes' workers, at 300 nodes this
    // watch fell a minute behind what the nodes had claimed (by their own
    // counts), and the times measured the starved watch, not the nodes.
    static WATCHER: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    crate::cluster::thread_runtime(&WATCHER, "bench-owner-watch")?.spawn(async move {
        while let Some(Ok(batch)) = stream.next().await {
            let mut owners = lock(&tracked);
            for event in batch {
                let key: Box<str> = event.kv.key.as_str().into();
                match event.kind {
                    EventKind::Put => {
                        let Ok(record) = decode::<OwnerRecord>("owner", &key, &event.kv.value)
                        else {
                            continue;
                        };
                        if event.kv.version == 1 {
                            owners.claims += 1;
                        }
                        owners.owner.insert(key, record.node.as_str().into());
                    }
                    EventKind::Delete => {
                        owners.owner.remove(&key);
                        owners.first_delete.get_or_insert_with(Instant::now);
                    }
                }
                owners.last_change = Some(Instant::now());
            }
        }
    });
    Ok(owners)
}

/// Counters of the nodes the run killed, kept past their handles.
#[derive(Default)]
struct KilledNodes {
    fences: u64,
    parked: u64,
}

impl KilledNodes {
    fn count(&mut self, node: &NodeHandle) {
        let stats = node.stats().snapshot();
        self.fences += stats.fences;
        self.parked += stats.parked;
    }
}

/// Fences and parked tasks over every node of the run, killed ones included.
fn fences_and_parked(cluster: &Cluster, killed: &KilledNodes) -> (u64, u64) {
    cluster
        .nodes
        .values()
        .fold((killed.fences, killed.parked), |(fences, parked), node| {
            let stats = node.stats().snapshot();
            (fences + stats.fences, parked + stats.parked)
        })
}

/// Fail at once when a task was parked: it will never run again, so a wait
/// for every task to run would last the whole limit and then say nothing of
/// why.
fn no_task_parked(cluster: &Cluster, killed: &KilledNodes) -> Result<()> {
    let (fences, parked) = fences_and_parked(cluster, killed);
    if parked > 0 {
        bail!(
            "{parked} tasks were parked as failed (taken over more often than the takeover \
             limit allows) and will never run: the nodes fenced {fences} times, and each fence \
             leaves the node's tasks to be taken over. The process could not renew the nodes' \
             leases in time; try a longer --lease-ttl-ms or fewer nodes"
        );
    }
    Ok(())
}

/// Poll `done` every `poll` until it holds, saying on stderr every
/// [`PROGRESS_EVERY`] how far it got (`progress`); fail naming `what` after
/// [`super::LIMIT`], as soon as a task is parked, or when `done` fails.
async fn wait_for(
    what: &str,
    cluster: &Cluster,
    killed: &KilledNodes,
    poll: Duration,
    mut done: impl FnMut() -> Result<bool>,
    progress: impl Fn() -> String,
) -> Result<()> {
    let started = Instant::now();
    let deadline = started + super::LIMIT;
    let mut next_progress = started + PROGRESS_EVERY;
    while !done()? {
        no_task_parked(cluster, killed)?;
        if Instant::now() > deadline {
            bail!(
                "timed out after {:?} waiting until {what}: {}",
                super::LIMIT,
                progress()
            );
        }
        if Instant::now() > next_progress {
            next_progress += PROGRESS_EVERY;
            let (fences, _) = fences_and_parked(cluster, killed);
            // Listings are where a node's time goes when many re-list: each
            // reads and rebuilds everything it keeps.
            // What the nodes count themselves, beside what this process's
            // own watch has seen so far (which lags when the CPU is short).
            let (listings, relists, claims) =
                cluster.nodes.values().fold((0, 0, 0), |(l, r, c), node| {
                    let stats = node.stats();
                    (
                        l + NodeStats::get(&stats.listings),
                        r + NodeStats::get(&stats.relists),
                        c + NodeStats::get(&stats.claims),
                    )
                });
            eprintln!(
                "still waiting until {what} after {:.0} s: {}, {fences} fences, {listings} \
                 listings ({relists} after a broken watch), {claims} claims by the live nodes' \
                 count so far",
                started.elapsed().as_secs_f64(),
                progress()
            );
        }
        tokio::time::sleep(poll).await;
    }
    Ok(())
}

/// When ownership last changed, once it has not changed for [`QUIET`] (fail
/// after [`super::LIMIT`], or as soon as a task is parked).
async fn wait_balanced(
    owners: &Mutex<Owners>,
    nodes: usize,
    cluster: &Cluster,
    killed: &KilledNodes,
) -> Result<Instant> {
    let last_change = || {
        lock(owners)
            .last_change
            .context("no ownership change was seen")
    };
    wait_for(
        "the cluster is balanced",
        cluster,
        killed,
        Duration::from_millis(100),
        // Balanced: at most one task apart, and no move for a while (a
        // quiet spell alone is not enough: a balancer may move tasks in
        // rounds, with pauses between them).
        || Ok(last_change()?.elapsed() >= QUIET && spread(owners, nodes) <= 1),
        || {
            let claims = lock(owners).claims;
            format!(
                "spread {}, {claims} claims; {}",
                spread(owners, nodes),
                extremes(owners, cluster)
            )
        },
    )
    .await?;
    last_change()
}

/// The nodes that own the most and the fewest tasks, each with what it
/// runs and how many nodes it sees: when a cluster stays unbalanced, which
/// node holds on to its excess (or does not claim) and why.
fn extremes(owners: &Mutex<Owners>, cluster: &Cluster) -> String {
    let owners = lock(owners);
    let counts = owners.per_node();
    let describe = |name: &str| {
        let owned = counts.get(name).copied().unwrap_or(0);
        match cluster.nodes.get(name) {
            Some(node) => {
                let status = node.status().borrow().clone();
                format!(
                    "{name} owns {owned}, runs {}, sees {} nodes",
                    status.running, status.live_nodes
                )
            }
            None => format!("{name} owns {owned} (not a live node)"),
        }
    };
    let mut names: Vec<&str> = cluster.nodes.keys().map(String::as_str).collect();
    names.sort_by_key(|name| (counts.get(name).copied().unwrap_or(0), *name));
    match (names.first(), names.last()) {
        (Some(fewest), Some(most)) => {
            format!("most: {}; fewest: {}", describe(most), describe(fewest))
        }
        _ => String::new(),
    }
}

/// Most minus fewest tasks on a node, over `nodes` live nodes (a node with
/// none counts as 0).
fn spread(owners: &Mutex<Owners>, nodes: usize) -> usize {
    let owners = lock(owners);
    let counts = owners.per_node();
    let most = counts.values().copied().max().unwrap_or(0);
    let fewest = if counts.len() < nodes {
        0
    } else {
        counts.values().copied().min().unwrap_or(0)
    };
    most - fewest
}

/// Bytes the allocator has handed out and not had back (glibc's
/// `mallinfo2`: blocks in use in its arenas plus its mmapped blocks): what
/// the nodes' data takes, without the free pages that fragmentation keeps
/// resident, which the resident figures include.
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's
    // own statistics, under its own locks.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Resident memory once the allocator has returned its free pages: what
/// the process holds, not what a transient peak (a node's first read of the
/// whole namespace) left in the allocator's free lists.
fn retained_bytes() -> Result<u64> {
    // SAFETY: malloc_trim takes a plain integer and only touches the
    // allocator's own free lists, under its own locks.
    unsafe { libc::malloc_trim(0) };
    super::in_process::resident_bytes()
}

/// Re-lists after a broken or compacted watch, over the cluster's live nodes.
/// The heap per task of one more node of the tasks' group that has no slot
/// (so it claims nothing and moves nothing): its view of the group, read
/// against `heap_without`, the heap before it started.
async fn view_of_node_without_slots(
    cluster: &mut Cluster,
    tasks: usize,
    heap_without: u64,
) -> Result<f64> {
    cluster
        .add_node_with("no-slot", |config| config.slots = 0)
        .await?;
    tokio::time::sleep(OBSERVER_SETTLE).await;
    let per_task = heap_in_use().saturating_sub(heap_without) as f64 / tasks as f64;
    if let Some(node) = cluster.nodes.remove("no-slot") {
        node.shutdown().await;
    }
    Ok(per_task)
}

fn relists(cluster: &Cluster) -> u64 {
    cluster
        .nodes
        .values()
        .map(|node| node.stats().snapshot().relists)
        .sum()
}

fn lock(owners: &Mutex<Owners>) -> std::sync::MutexGuard<'_, Owners> {
    owners.lock().unwrap_or_else(|e| e.into_inner())
}
