//! The real `eretes` binary, end to end.

use std::process::Command;

fn eretes(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eretes"))
        .args(args)
        .output()
        .expect("the eretes binary runs")
}

/// Run `eretes args`, expect success, and return the last line of its
/// standard output as JSON (where `--json` puts its one object).
fn last_json(args: &[&str]) -> serde_json::Value {
    let output = eretes(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "eretes {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is not JSON ({e}): {last}"))
}

#[test]
fn demo_reports_a_clean_failover_and_minimal_rebalancing() {
    let summary = last_json(&[
        "demo",
        "--nodes",
        "3",
        "--tasks",
        "60",
        "--lease-ttl-ms",
        "1000",
        "--json",
    ]);
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
            &["bench", "failover", "--nodes", "1"][..],
            "kills one node and needs a survivor, so at least 2",
        ),
        (
            &["bench", "agent", "--nodes", "4"][..],
            "the agent benchmark runs a fixed set of nodes",
        ),
        (
            &["bench", "claim", "--lease-ttl-ms", "5000"][..],
            "--lease-ttl-ms is for the scale benchmark only",
        ),
        (
            &["bench", "throughput", "--etcd", "http://127.0.0.1:1"][..],
            "measures the embedded store only",
        ),
        (
            &["demo", "--etcd", "127.0.0.1:2379"][..],
            "must start with http:// or https://",
        ),
        (&["demo", "--etcd", "http://localhost"][..], "has no port"),
        (
            &["task", "t", "explode"][..],
            "unknown task command \"explode\"; task commands are pause, resume, sleep DURATION, kill",
        ),
        (&["task", "t", "sleep", "soon"][..], "invalid value 'soon'"),
        (&["task", "t", "sleep", "0ms"][..], "longer than 0"),
        (
            &["agent", "--result-retention", "10ms"][..],
            "shorter than the shortest retention, 1s",
        ),
        (
            &["agent", "--result-retention", "a week"][..],
            "give a duration such as 7d or 12h, or `forever`",
        ),
        (&["task", "t/..", "pause"][..], "invalid task id"),
        (&["node", "..", "freeze"][..], "invalid node name \"..\""),
        (&["ls", "--agent", "https://127.0.0.1:1"][..], "speaks plain HTTP only"),
        (&["ls", "--agent", "http://h/p?x"][..], "must not have a query"),
        (&["ls", "--agent", "127.0.0.1:7070"][..], "must start with http://"),
        (&["ls", "--group", "a/b"][..], "invalid group name \"a/b\""),
        (&["node", "a1", "stop-task", "a/b"][..], "invalid task id \"a/b\""),
        (&["demo", "--etcd-user", "root"][..], "--etcd <URL,..>"),
        (
            &[
                "demo",
                "--etcd",
                "http://127.0.0.1:1",
                "--etcd-cert",
                "c.pem",
            ][..],
            "--etcd-key",
        ),
    ] {
        let output = eretes(args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unreachable_etcd_is_named_in_the_error() {
    let url = format!("http://127.0.0.1:{}", eretes_etcd::testing::free_port());
    let output = eretes(&["demo", "--etcd", &url]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&url) && stderr.contains("etcd"), "{stderr}");
}

/// The demo as a real process on a real etcd (the one scripts/test.sh runs).
#[test]
fn demo_on_etcd_reports_a_clean_failover() {
    let url = eretes_etcd::testing::test_etcd_url();
    let output = eretes(&["demo", "--etcd", &url, "--tasks", "60", "--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo on etcd failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON");
    assert_eq!(summary["running"], 60);
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["overlaps"], 0);
    assert_eq!(summary["moved"], summary["min_moved"]);
    assert!(stdout.contains(&format!("etcd at {url}")), "{stdout}");
}

#[test]
fn claim_and_failover_benches_run_on_etcd() {
    let url = eretes_etcd::testing::test_etcd_url();
    for (scenario, tasks, field) in [
        ("claim", "300", "ratio"),
        ("failover", "100", "failover_ms"),
    ] {
        let output = eretes(&[
            "bench", scenario, "--etcd", &url, "--tasks", tasks, "--json",
        ]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{scenario}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(report["backend"], "etcd", "{scenario}");
        assert!(
            report[field].as_f64().unwrap() > 0.0,
            "{scenario}: {report}"
        );
        if scenario == "failover" {
            assert_eq!(report["overlaps"], 0);
        }
        if scenario == "claim" {
            // Every node was up before the first task existed, so none
            // claimed the others' shares to hand them back (starting the
            // nodes on waiting tasks, the first claimed nearly all 300 and
            // released two thirds). A few releases could still come from a
            // balance pass on a view a claim had not reached yet.
            let released = report["released"].as_u64().expect("released");
            assert!(released <= 30, "{report}");
            assert_eq!(report["nodes"], 3, "{report}");
            // Read from etcd's /metrics: each claimed task reached the three
            // nodes' watches twice (its submission and its owner record),
            // and the benchmark's own watch once; not with its run record,
            // which no node watches (3 events per node and claim before).
            let events = report["etcd_watch_events_per_claim"].as_f64();
            assert!(events.is_some_and(|e| (6.0..9.0).contains(&e)), "{report}");
        }
    }
}

#[test]
fn a_claim_bench_given_an_etcd_pid_that_is_no_process_stops_before_it_starts() {
    let url = eretes_etcd::testing::test_etcd_url();
    // No process has this pid: pid_max is at most 2^22.
    let output = eretes(&[
        "bench",
        "claim",
        "--etcd",
        &url,
        "--etcd-pid",
        "2147483647",
        "--tasks",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--etcd-pid 2147483647"), "{stderr}");
    // Without --etcd there is no etcd to watch.
    let output = eretes(&["bench", "claim", "--etcd-pid", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--etcd"), "{stderr}");
}

#[test]
fn steady_bench_counts_a_nodes_requests_on_etcd() {
    let url = eretes_etcd::testing::test_etcd_url();
    let report = last_json(&[
        "bench",
        "steady",
        "--etcd",
        &url,
        "--tasks",
        "50",
        "--window-s",
        "5",
        "--json",
    ]);
    let run = &report["runs"][0];
    assert_eq!(run["tasks"], 50);
    // Idle tasks cost nothing per task: within 5 s a node renews its 10 s
    // lease once or twice and sends nothing else (no claims, no per-task
    // refresh), except that the resync (a listing and a new watch, every
    // 30 s) may fall in the window once: at most 2 + 2 requests.
    let kinds = &run["by_kind"];
    assert!(
        (1..=2).contains(&kinds["lease_keepalive"].as_u64().unwrap()),
        "{run}"
    );
    assert_eq!(kinds["txn"], 0, "{run}");
    assert!(run["requests"].as_u64().unwrap() <= 4, "{run}");
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

#[test]
fn scale_bench_reports_a_recovery_as_lease_expiry_then_claims() {
    let report = last_json(&["bench", "scale", "--nodes", "2", "--tasks", "100", "--json"]);
    assert_eq!(
        (report["tasks"].as_u64(), report["killed"].as_u64()),
        (Some(100), Some(1))
    );
    let orphans = report["orphans"].as_u64().unwrap();
    assert!((40..=60).contains(&orphans), "{report}");
    let [recovered, expired, claimed] = ["recovered_ms", "lease_expired_ms", "orphans_claimed_ms"]
        .map(|k| report[k].as_u64().unwrap());
    // The victim's lease outlives the kill by up to its TTL (2 s), and
    // only then can the survivor claim.
    assert!(expired > 0 && expired <= recovered, "{report}");
    assert_eq!(expired + claimed, recovered, "{report}");
    assert!(
        report["moves"].as_u64() >= report["min_moves"].as_u64(),
        "{report}"
    );
    assert!(report["spread_after"].as_u64().unwrap() <= 1, "{report}");
}

#[test]
fn agent_bench_runs_a_real_agent_and_reports_both_figures() {
    let report = last_json(&["bench", "agent", "--tasks", "5", "--json"]);
    assert_eq!(report["tasks"], 5);
    assert_eq!(report["submissions"], 100);
    assert!(
        report["overhead_median_ms"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["submits_per_s"].as_f64().unwrap() > 0.0, "{report}");
}
