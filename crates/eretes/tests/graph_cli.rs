//! `eretes graph regression` as a user runs it: on nodes of its own process,
//! and on node processes on etcd that it kills with SIGKILL; bad arguments
//! refused, each named.

mod common;

use std::process::Command;

use common::BIN;
use serde_json::Value;

/// Run `eretes graph regression ARGS --json`; its exit code and report.
fn regression(args: &[&str]) -> (Option<i32>, Value) {
    let output = Command::new(BIN)
        .args(["graph", "regression", "--json", "--timeout", "120s"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    let report = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "no JSON report: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

fn assert_passed(report: &Value, tasks: u64) {
    assert_eq!(report["tasks_ended"], tasks, "{report}");
    assert_eq!(report["epochs_verified"], report["epochs"], "{report}");
    assert_eq!(report["wrong_sums"], 0, "{report}");
    assert_eq!(report["meta_duplicates"], 0, "{report}");
}

#[test]
fn in_process_nodes_with_a_kill_at_epoch_one() {
    let (code, report) = regression(&["--kill-at-epoch", "1"]);
    assert_eq!(code, Some(0), "{report}");
    assert_passed(&report, 15);
    assert_eq!(report["kills"], 1, "{report}");
    assert!(report["failovers"].as_u64().unwrap() >= 1, "{report}");
}

/// Held by the tests that run node processes: one looks for any left
/// running, which the other's would be.
static NODE_PROCESSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn node_processes_killed_with_sigkill_lose_nothing() {
    let _alone = NODE_PROCESSES.lock().unwrap_or_else(|e| e.into_inner());
    let etcd = eretes_etcd::testing::test_etcd_url();
    let (code, report) = regression(&[
        "--processes",
        "--etcd",
        &etcd,
        "--kill-at-epoch",
        "1",
        "--kill-rate",
        "0.03",
    ]);
    assert_eq!(code, Some(0), "{report}");
    assert_passed(&report, 15);
    assert!(report["kills"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["failovers"].as_u64().unwrap() >= 1, "{report}");
    // With a backup per task (held by other processes), the root's node
    // killed once its tasks' backups are up (the kill waits a bounded
    // while for them): each task that had one is taken over by its backup,
    // not restarted cold.
    let (code, report) = regression(&[
        "--processes",
        "--etcd",
        &etcd,
        "--backups",
        "1",
        "--epochs",
        "60",
        "--kill-at-epoch",
        "40",
    ]);
    assert_eq!(code, Some(0), "{report}");
    assert_passed(&report, 15);
    assert_eq!(report["kills"], 1, "{report}");
    assert!(
        report["primary_takeovers"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(report["cold_restarts_of_backed_tasks"], 0, "{report}");
    // Every node process is gone: the killed ones and the drained ones.
    let left = Command::new("pgrep")
        .args(["-f", "graph node --namespace graph-regression"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "node processes left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn an_interrupted_regression_leaves_no_node_process_behind() {
    let _alone = NODE_PROCESSES.lock().unwrap_or_else(|e| e.into_inner());
    let etcd = eretes_etcd::testing::test_etcd_url();
    let mut driver = Command::new(BIN)
        .args(["graph", "regression", "--processes", "--etcd", &etcd])
        .args(["--epochs", "100000", "--timeout", "120s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let children = || -> Vec<i32> {
        let out = Command::new("pgrep")
            .args(["-P", &driver.id().to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    };
    let mut nodes = Vec::new();
    for _ in 0..300 {
        nodes = children();
        if nodes.len() >= 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(nodes.len() >= 4, "the run's node processes: {nodes:?}");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(driver.id() as i32, libc::SIGTERM) };
    let mut status = None;
    for _ in 0..300 {
        status = driver.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let Some(status) = status else {
        let _ = driver.kill();
        panic!("the driver did not end within 30 s of SIGTERM");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut driver.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    for _ in 0..100 {
        if !nodes.iter().any(|&pid| alive(pid)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left: Vec<i32> = nodes.into_iter().filter(|&pid| alive(pid)).collect();
    assert!(left.is_empty(), "node processes left running: {left:?}");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    for (args, expected) in [
        (&["--processes"][..], "--processes needs --etcd"),
        (&["--kill-rate", "2"][..], "--kill-rate 2"),
        (&["--backups", "4"][..], "--backups"),
        (&["--tasks", "0"][..], "--tasks"),
        (&["--lease-ttl", "10ms"][..], "--lease-ttl"),
        (&["--kill-every", "soon"][..], "--kill-every"),
        (
            &["--kill-every", "0s"][..],
            "--kill-every 0s is shorter than the lease TTL",
        ),
        (
            &["--kill-at-epoch", "11"][..],
            "--kill-at-epoch 11 is not one of the job's epochs",
        ),
        (&["--timeout", "0s"][..], "--timeout 0s is too short"),
    ] {
        let output = Command::new(BIN)
            .args(["graph", "regression"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn a_node_process_refuses_a_stats_file_it_cannot_write_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("stats.json");
    for (stats_file, expected) in [
        (dir.path().to_path_buf(), "is a directory"),
        (missing, "No such file or directory"),
    ] {
        let output = Command::new(BIN)
            .args(["graph", "node", "--namespace", "n", "--name", "n1"])
            .arg("--stats-file")
            .arg(&stats_file)
            // Nothing listens there: the refusal comes before any store.
            .args(["--etcd", "http://127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{stats_file:?} was taken");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains("--stats-file cannot be written") && stderr.contains(expected),
            "{stats_file:?}: {stderr}"
        );
    }
}

/// Run `eretes graph ARGS`: its exit code, stdout and stderr.
fn graph(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_eretes"))
        .arg("graph")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_shown_and_removed_on_etcd() {
    use eretes_graph::{JobName, JobSpec, Jobs};
    use eretes_protocol::{Coordinator, GroupName, Namespace};
    let etcd = eretes_etcd::testing::test_etcd_url();
    let store = eretes_etcd::testing::connect_test_etcd().await;
    let namespace = format!("graph-jobs-{:08x}", rand::random::<u32>());
    let ns = Namespace::new(&namespace).unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let jobs = Jobs::new(coordinator.clone());
    let job = JobName::new("tree").unwrap();
    let spec = JobSpec {
        kind: "regression".into(),
        tasks: 3,
        group: GroupName::new("graph").unwrap(),
        properties: serde_json::json!({ "epochs": 2 }),
        backups: 1,
    };
    jobs.start(&job, &spec).await.unwrap();
    let at = ["--namespace", namespace.as_str(), "--etcd", etcd.as_str()];

    let (code, out, err) = graph(&[&["ls", "--json"][..], &at].concat());
    assert_eq!(code, Some(0), "{err}");
    let listed: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(listed["jobs"][0]["name"], "tree", "{listed}");
    assert_eq!(listed["jobs"][0]["spec"]["backups"], 1, "{listed}");
    assert_eq!(listed["jobs"][0]["epoch"]["epoch"], 0, "{listed}");
    let (code, out, _) = graph(&[&["ls"][..], &at].concat());
    assert_eq!(code, Some(0));
    assert!(out.contains("tree") && out.contains("running"), "{out}");

    let (code, out, err) = graph(&[&["show", "tree", "--json"][..], &at].concat());
    assert_eq!(code, Some(0), "{err}");
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["tasks"].as_array().unwrap().len(), 3, "{shown}");
    assert_eq!(
        shown["tasks"][2]["node"],
        Value::Null,
        "nobody serves it: {shown}"
    );
    assert_eq!(shown["tasks"][2]["ended"], false, "{shown}");

    for (args, expected) in [
        (&["show", "nosuch"][..], "no job nosuch"),
        (&["show", "bad.name"][..], "job name \"bad.name\""),
        (&["rm", "nosuch"][..], "no job nosuch"),
    ] {
        let (code, _, err) = graph(&[args, &at].concat());
        assert_ne!(code, Some(0), "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let (code, _, err) = graph(&["ls", "--namespace", namespace.as_str()]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--etcd"), "{err}");

    // An epoch record overwritten with garbage is said to be malformed,
    // not missing.
    {
        use eretes_store::{PutRequest, Store, StoreExt};
        let all = store.get_prefix(&format!("{namespace}/")).await.unwrap();
        let epoch_key = all
            .kvs
            .iter()
            .map(|kv| kv.key.clone())
            .find(|key| key.ends_with("/epochs/tree"))
            .expect("the job's epoch record");
        store
            .put(PutRequest::new(epoch_key, b"{\"epoch\": \"x\"}".to_vec()))
            .await
            .unwrap();
    }
    let (code, out, err) = graph(&[&["ls"][..], &at].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("epoch record malformed"), "{out}");
    let (code, out, err) = graph(&[&["show", "tree"][..], &at].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("job epoch - (its record is malformed:"),
        "{out}"
    );

    let (code, out, err) = graph(&[&["rm", "tree"][..], &at].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("removed job tree"), "{out}");
    assert!(jobs.list().await.unwrap().jobs.is_empty());
    assert!(
        coordinator.snapshot().await.unwrap().tasks.is_empty(),
        "its tasks are gone"
    );
}
