//! The real `eretes` binary, end to end.

use std::process::Command;

fn eretes(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eretes"))
        .args(args)
        .output()
        .expect("the eretes binary runs")
}

#[test]
fn demo_reports_a_clean_failover_and_minimal_rebalancing() {
    let output = eretes(&[
        "demo",
        "--nodes",
        "3",
        "--tasks",
        "60",
        "--lease-ttl-ms",
        "1000",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("output");
    let summary: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(summary["tasks"], 60);
    assert_eq!(summary["nodes"], 3);
    assert_eq!(summary["running"], 60);
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["overlaps"], 0);
    assert_eq!(summary["moved"], summary["min_moved"]);
    assert!(summary["spread"].as_u64().unwrap() <= 1);
    assert!(summary["killed_tasks"].as_u64().unwrap() > 0);
    assert!(summary["failover_ms"].as_u64().unwrap() > 0);
}

#[test]
fn bad_arguments_are_refused_with_a_clear_error() {
    for (args, expected) in [
        (&["demo", "--nodes", "1"][..], "--nodes"),
        (&["demo", "--tasks", "0"][..], "--tasks"),
        (&["demo", "--tasks", "lots"][..], "invalid digit"),
        (&["bench", "warp-speed"][..], "invalid value 'warp-speed'"),
        (
            &["bench", "throughput", "--etcd", "http://127.0.0.1:1"][..],
            "etcd backend is not part of this build",
        ),
    ] {
        let output = eretes(args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn throughput_bench_ends_with_one_json_object() {
    let output = eretes(&["bench", "throughput", "--tasks", "500", "--json"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["tasks"], 500);
    assert!(report["tasks_per_s"].as_f64().unwrap() > 0.0);
}
