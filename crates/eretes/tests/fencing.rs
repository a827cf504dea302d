//! Process tasks obey the fence, end to end: real agents on a real etcd,
//! real process trees, an agent frozen with SIGSTOP. Every run appends
//! ticks (task, epoch, node, time) to one file from a grandchild of the
//! task; the checker finds, per task, the interval each run ticked in and
//! requires that no two runs of a task ticked at the same time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{wait_until, Agent};

/// Ticks per run: a run lasts some 5 s (plus the cost of `date`).
const TICKS: u32 = 50;
const TASKS: usize = 8;
const TTL_MS: u64 = 2000;

/// `sh -c "sh -c '<loop>'; true"`: the ticking loop is the task's child,
/// each tick's `date` a grandchild; `; true` keeps the outer shell alive
/// (no exec of the last command), so the loop is never the leader.
fn ticking_script(ticks: &Path) -> String {
    format!(
        "sh -c 'i=0; while [ $i -lt {TICKS} ]; do \
           echo \"$ERETES_TASK_ID $ERETES_EPOCH $ERETES_NODE $(date +%s%N)\" >> {}; \
           i=$((i+1)); sleep 0.1; done'; true",
        ticks.display()
    )
}

/// One run of a task as its ticks show it.
#[derive(Debug, Clone)]
struct Run {
    epoch: i64,
    node: String,
    first_ns: u128,
    last_ns: u128,
}

/// The runs of every task, each task's sorted by their first tick.
fn runs(ticks: &Path) -> BTreeMap<String, Vec<Run>> {
    let text = std::fs::read_to_string(ticks).unwrap_or_default();
    let mut by_run: BTreeMap<(String, i64), Run> = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [task, epoch, node, at] = words[..] else {
            // A tick cut short by SIGKILL mid-write.
            continue;
        };
        let (Ok(epoch), Ok(at)) = (epoch.parse::<i64>(), at.parse::<u128>()) else {
            continue;
        };
        let run = by_run.entry((task.to_string(), epoch)).or_insert(Run {
            epoch,
            node: node.to_string(),
            first_ns: at,
            last_ns: at,
        });
        run.first_ns = run.first_ns.min(at);
        run.last_ns = run.last_ns.max(at);
    }
    let mut by_task: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for ((task, _), run) in by_run {
        by_task.entry(task).or_default().push(run);
    }
    for runs in by_task.values_mut() {
        runs.sort_by_key(|run| run.first_ns);
    }
    by_task
}

/// Every pair of runs of one task that ticked at the same time.
fn overlaps(runs: &BTreeMap<String, Vec<Run>>) -> Vec<String> {
    let mut found = Vec::new();
    for (task, runs) in runs {
        for pair in runs.windows(2) {
            if pair[1].first_ns <= pair[0].last_ns {
                found.push(format!(
                    "{task}: epoch {} on {} ticked {} ms into epoch {} on {}",
                    pair[0].epoch,
                    pair[0].node,
                    (pair[0].last_ns - pair[1].first_ns) / 1_000_000,
                    pair[1].epoch,
                    pair[1].node,
                ));
            }
        }
    }
    found
}

#[test]
fn the_checker_finds_overlapping_runs_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let ticks = dir.path().join("ticks");
    std::fs::write(
        &ticks,
        "t 5 a 100\nt 5 a 200\nt 9 b 300\nt 9 b 400\nu 5 a 100\nu 5 a 350\nu 9 b 300\ncut\n",
    )
    .unwrap();
    let found = overlaps(&runs(&ticks));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("u: epoch 5 on a ticked 0 ms into epoch 9 on b"));
}

/// Two agents' common flags on a fresh namespace of the test etcd.
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    namespace: String,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            url: eretes_etcd::testing::test_etcd_url(),
            namespace: format!("fencing-{:08x}", rand::random::<u32>()),
        }
    }

    async fn agent(&self, name: &str) -> Agent {
        let ttl = TTL_MS.to_string();
        let args = [
            "--etcd",
            self.url.as_str(),
            "--namespace",
            self.namespace.as_str(),
            "--allow",
            "sh",
            "--name",
            name,
            "--lease-ttl-ms",
            ttl.as_str(),
        ];
        Agent::start(&self.dir.path().join(name), &args).await
    }

    fn ticks(&self) -> std::path::PathBuf {
        self.dir.path().join("ticks")
    }

    /// Submit the ticking tasks and wait until each has ticked on `agent`.
    async fn start_ticking(&self, agent: &Agent) {
        let script = ticking_script(&self.ticks());
        for n in 0..TASKS {
            agent.ok(&[
                "submit",
                "--id",
                &format!("tick-{n}"),
                "--",
                "sh",
                "-c",
                &script,
            ]);
        }
        let ticks = self.ticks();
        wait_until("every task ticks", || runs(&ticks).len() == TASKS).await;
    }

    /// Wait until every task is done; their `show` documents.
    fn wait_done(&self, agent: &Agent) -> Vec<Value> {
        let mut wait = vec!["wait".to_string()];
        wait.extend((0..TASKS).map(|n| format!("tick-{n}")));
        let wait: Vec<&str> = wait.iter().map(String::as_str).collect();
        agent.ok(&wait);
        (0..TASKS)
            .map(|n| {
                serde_json::from_str(&agent.ok(&["show", &format!("tick-{n}"), "--json"])).unwrap()
            })
            .collect()
    }

    async fn remove(&self) {
        common::remove_namespace(&self.namespace).await;
    }
}

fn signal(agent: &Agent, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the agent is our
    // child and not yet reaped.
    unsafe {
        libc::kill(agent.child.id() as libc::pid_t, signal);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agents_tasks_stop_before_another_agent_runs_them() {
    let cluster = Cluster::new();
    let frozen = cluster.agent("a").await;
    cluster.start_ticking(&frozen).await;
    let other = cluster.agent("b").await;

    // Frozen for three lease TTLs: its supervisors must kill every task's
    // tree by the fence deadline, before the lease expires and b claims.
    signal(&frozen, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(3 * TTL_MS)).await;
    signal(&frozen, libc::SIGCONT);

    let shown = cluster.wait_done(&other);
    let runs = runs(&cluster.ticks());
    let found = overlaps(&runs);
    assert!(
        found.is_empty(),
        "runs of a task ticked at once:\n{}",
        found.join("\n")
    );
    for (task, task_runs) in &runs {
        assert!(
            task_runs.iter().any(|run| run.node == "a")
                && task_runs.iter().any(|run| run.node == "b"),
            "{task} ran on a, then on b: {task_runs:?}"
        );
    }
    for show in &shown {
        assert_eq!(show["state"], "done", "{show}");
    }
    // The frozen agent woke up fenced and goes on as a node.
    wait_until("the frozen agent is ready again", || {
        frozen.cli(&["nodes", "--json"]).status.success()
            && frozen.ok(&["nodes", "--json"]).contains("\"a\"")
    })
    .await;
    drop((frozen, other));
    cluster.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_shorter_than_the_margin_kills_and_moves_nothing() {
    let cluster = Cluster::new();
    let agent = cluster.agent("a").await;
    cluster.start_ticking(&agent).await;
    // The margin is a quarter of the TTL; a renewal is due every third.
    signal(&agent, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(TTL_MS / 5)).await;
    signal(&agent, libc::SIGCONT);

    let shown = cluster.wait_done(&agent);
    for show in &shown {
        assert_eq!(show["state"], "done", "{show}");
    }
    let runs = runs(&cluster.ticks());
    for (task, task_runs) in &runs {
        assert_eq!(task_runs.len(), 1, "{task} ran once: {task_runs:?}");
    }
    drop(agent);
    cluster.remove().await;
}
