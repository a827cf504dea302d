//! `eretes agent`'s HTTP API end to end: bad requests get clear 4xx
//! errors and write nothing, the token guards every change, and the
//! metrics parse with a real Prometheus parser. Real binary, real HTTP on
//! loopback; every wait is bounded.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::{parse_prometheus, wait_until, Agent, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let http = reqwest::Client::new();
    let tasks = format!("{}/v1/tasks", agent.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str, &str)> = vec![
        (
            http.post(&tasks)
                .json(&json!({"id": "bad id!", "program": "true"})),
            400,
            "invalid_request",
            "invalid task id",
        ),
        (
            http.post(&tasks).json(&json!({"program": ""})),
            400,
            "invalid_request",
            "program is empty",
        ),
        (
            http.post(&tasks)
                .json(&json!({"program": "true", "colour": "red"})),
            400,
            "invalid_request",
            "unknown field `colour`",
        ),
        (
            http.post(&tasks)
                .header("content-type", "application/json")
                .body(r#"{"id": "first", "id": "second", "program": "true"}"#),
            400,
            "invalid_request",
            "duplicate field `id`",
        ),
        (
            http.post(&tasks)
                .header("content-type", "application/json")
                .body(r#"{"program": "true", "program": "false"}"#),
            400,
            "invalid_request",
            "duplicate field `program`",
        ),
        (
            http.post(&tasks)
                .json(&json!({"program": "true", "group": "a/b"})),
            400,
            "invalid_request",
            "invalid group name",
        ),
        (
            http.post(&tasks)
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "invalid_request",
            "Failed to parse",
        ),
        (
            http.post(&tasks).body("program=true"),
            415,
            "unsupported_media_type",
            "Content-Type",
        ),
        (
            http.post(&tasks)
                .json(&json!({"program": "true", "args": ["x".repeat(300 * 1024)]})),
            413,
            "payload_too_large",
            "too large",
        ),
        (
            http.get(format!("{tasks}?state=sleepy")),
            400,
            "invalid_request",
            "state \"sleepy\" is not one of pending, running, sleeping, paused, fault, done, failed, killed",
        ),
        (
            http.get(format!("{tasks}?limit=0")),
            400,
            "invalid_request",
            "limit 0",
        ),
        (
            http.get(format!("{tasks}/no%20such")),
            400,
            "invalid_request",
            "invalid task id",
        ),
        (
            http.get(format!("{tasks}/missing")),
            404,
            "not_found",
            "task missing not found",
        ),
        (
            http.get(format!("{tasks}/missing/wait?timeout_s=9999")),
            400,
            "invalid_request",
            "timeout_s 9999",
        ),
        (
            http.post(format!("{}/v1/nodes/a1/commands", agent.url))
                .json(&json!({"command": "explode"})),
            400,
            "invalid_request",
            "unknown command",
        ),
        (
            http.post(format!("{}/v1/nodes/a1/commands", agent.url))
                .json(&json!({"command": "drain", "task": "t"})),
            400,
            "invalid_request",
            "parameter of stop-task only, not of drain",
        ),
        (
            http.post(format!("{}/v1/nodes/a1/commands", agent.url))
                .json(&json!({"command": "stop-task", "task": "missing"})),
            404,
            "not_found",
            "task missing not found",
        ),
        (
            http.get(format!("{tasks}/%FF")),
            400,
            "invalid_request",
            "Invalid URL",
        ),
        (
            http.put(&tasks).json(&json!({})),
            405,
            "method_not_allowed",
            "Method Not Allowed",
        ),
        (
            http.get(format!("{}/v2/everything", agent.url)),
            404,
            "not_found",
            "no such endpoint",
        ),
    ];
    for (request, status, code, message) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "expected {message:?} in {text:?}");
    }
    // A command for a node nobody is: refused, not queued for a future one.
    let ghost = http
        .post(format!("{}/v1/nodes/ghost/commands", agent.url))
        .json(&json!({"command": "drain"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ghost.status().as_u16(), 404);
    let body: Value = ghost.json().await.unwrap();
    assert_eq!(body["error"]["message"], "no live node is named ghost");
    // Without a token, a request must name this agent's loopback address as
    // its Host: a rebound domain is refused (DNS rebinding).
    let rebound = http
        .post(&tasks)
        .header("host", "evil.example")
        .json(&json!({"program": "sh", "args": ["-c", "echo pwned"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status().as_u16(), 403);
    let body: Value = rebound.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    let listed: Value = http.get(&tasks).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["tasks"], json!([]), "nothing was written");
    // A duplicate id is a conflict and changes nothing.
    let first = http
        .post(&tasks)
        .json(&json!({"id": "once", "program": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let second = http
        .post(&tasks)
        .json(&json!({"id": "once", "program": "false"}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status().as_u16(), 409);
    let once = get_json(&http, format!("{tasks}/once")).await;
    assert_eq!(once["properties"]["process"]["program"], "true");
}

/// GET `url`; its body as JSON.
async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_large_tasks_is_cut_by_its_size_and_says_where_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let http = reqwest::Client::new();
    let tasks = format!("{}/v1/tasks", agent.url);
    let big = "x".repeat(60_000);
    for n in 0..24 {
        let submitted = http
            .post(&tasks)
            .json(&json!({"id": format!("big-{n}"), "group": "nobody", "program": "echo", "args": [big]}))
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status().as_u16(), 201);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..24 {
        let mut url = format!("{tasks}?limit=1000&group=nobody");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page = get_json(&http, url).await;
        let ids: Vec<String> = page["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_string())
            .collect();
        // About 1 MiB a page: some 17 of these tasks fit, never all 24.
        assert!(!ids.is_empty() && ids.len() < 24, "{ids:?}");
        seen.extend(ids);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..24).map(|n| format!("big-{n}")).collect();
    expected.sort();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_task_is_taken_only_for_a_task_the_node_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let http = reqwest::Client::new();
    let tasks = format!("{}/v1/tasks", agent.url);
    let stop = |task: &str| {
        http.post(format!("{}/v1/nodes/a1/commands", agent.url))
            .json(&json!({"command": "stop-task", "task": task}))
            .send()
    };
    for (id, group) in [("waits", "nobody"), ("runs", "default")] {
        let submitted = http
            .post(&tasks)
            .json(&json!({"id": id, "program": "sleep", "args": ["30"], "group": group}))
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status().as_u16(), 201);
    }
    // Pending (its group has no node): nothing to stop, and nothing queued.
    let refused = stop("waits").await.unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_running_here");
    assert_eq!(
        body["error"]["message"],
        "task waits is not running on any node"
    );
    let mut state = Value::Null;
    for _ in 0..300 {
        let view = get_json(&http, format!("{tasks}/runs")).await;
        state = view["state"].clone();
        if state == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "running", "the task never ran");
    assert_eq!(stop("runs").await.unwrap().status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_change_and_other_addresses_need_one() {
    let dir = tempfile::tempdir().unwrap();
    let refused = common::agent_refuses(&dir.path().join("open"), &["--listen", "0.0.0.0:0"]);
    assert!(refused.contains("set --token"), "{refused}");

    let agent = Agent::start(&dir.path().join("data"), &["--token", "s3cret"]).await;
    // One agent per data directory.
    let second = Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another eretes agent uses --data-dir")
    );
    let without = agent.cli(&["submit", "--", "true"]);
    assert_eq!(without.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("401"),
        "{without:?}"
    );
    let with_token = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("ERETES_AGENT", &agent.url)
            .env("ERETES_TOKEN", "s3cret")
            .output()
            .unwrap()
    };
    let listed = with_token(&["ls"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).lines().count(),
        1,
        "nothing was written: {listed:?}"
    );
    let with = with_token(&["submit", "--id", "ok", "--", "true"]);
    assert!(with.status.success(), "{with:?}");
    // Task commands are changes too.
    let command = agent.cli(&["task", "ok", "kill"]);
    assert_eq!(command.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&command.stderr).contains("401"),
        "{command:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_a_real_prometheus_parser_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    agent.ok(&["submit", "--id", "ok", "--wait", "--", "true"]);
    let _ = agent.cli(&[
        "submit",
        "--id",
        "bad",
        "--max-attempts",
        "1",
        "--wait",
        "--",
        "false",
    ]);
    agent.ok(&["submit", "--id", "long", "--", "sleep", "1000"]);
    wait_until("long runs", || {
        agent
            .ok(&["show", "long", "--json"])
            .contains("\"running\"")
    })
    .await;

    let http = reqwest::Client::new();
    let mut samples = Vec::new();
    // A lease renewal comes every TTL/3 (667 ms here); wait for the first.
    for _ in 0..100 {
        let text = http
            .get(format!("{}/metrics", agent.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        samples = parse_prometheus(&text);
        if samples
            .iter()
            .any(|(name, _, _)| name == "eretes_lease_renewal_seconds_count")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    };
    for state in ["done", "failed", "running"] {
        assert_eq!(
            value("eretes_tasks", &[("state", state), ("group", "default")]),
            Some(1.0),
            "{state}"
        );
    }
    // Every state of a group is reported, the empty ones as 0.
    for state in ["pending", "sleeping", "paused", "fault", "killed"] {
        assert_eq!(
            value("eretes_tasks", &[("state", state), ("group", "default")]),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(value("eretes_claims_total", &[]), Some(3.0));
    assert_eq!(value("eretes_completions_total", &[]), Some(1.0));
    assert_eq!(value("eretes_failures_total", &[]), Some(1.0));
    assert_eq!(value("eretes_failovers_total", &[]), Some(0.0));
    assert!(value("eretes_handler_run_seconds_count", &[("group", "default")]).unwrap() >= 2.0);
    assert!(value("eretes_store_request_seconds_count", &[("op", "txn")]).unwrap() >= 3.0);
    assert!(value("eretes_lease_renewal_seconds_count", &[]).unwrap() >= 1.0);
}
