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

#[test]
fn node_processes_killed_with_sigkill_lose_nothing() {
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
    // killed late enough that every backup is up: its tasks are taken over
    // by their backups, not restarted cold.
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
    assert_eq!(report["cold_restarts"], 0, "{report}");
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
fn bad_arguments_are_refused_by_name() {
    for (args, expected) in [
        (&["--processes"][..], "--processes needs --etcd"),
        (&["--kill-rate", "2"][..], "--kill-rate 2"),
        (&["--backups", "4"][..], "--backups"),
        (&["--tasks", "0"][..], "--tasks"),
        (&["--lease-ttl", "10ms"][..], "--lease-ttl"),
        (&["--kill-every", "soon"][..], "--kill-every"),
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
