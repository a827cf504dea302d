//! `eretes agent` and the CLI, end to end: the real binary, real processes,
//! real HTTP on loopback, the durable embedded store in a temporary
//! directory. Every wait is bounded; agents are killed when a test ends.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::{alive, pid_in, wait_until, Agent, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_ls_show_logs_and_rm_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;

    let id = agent.ok(&[
        "submit",
        "--id",
        "greet",
        "--",
        "sh",
        "-c",
        "echo hello $ERETES_TASK_ID; echo careful >&2",
    ]);
    assert_eq!(id, "greet\n");
    let waited = agent.ok(&["wait", "greet"]);
    assert_eq!(waited, "greet done (exit code 0)\n");

    let show: Value = serde_json::from_str(&agent.ok(&["show", "greet", "--json"])).unwrap();
    assert_eq!(show["state"], "done");
    assert_eq!(show["result"]["exit_code"], 0);
    assert_eq!(show["node"], "a1");
    assert_eq!(agent.ok(&["logs", "greet"]), "hello greet\n");
    // A task that printed nothing has no log file (none is made before
    // the first byte), and its logs read as empty, not as missing.
    agent.ok(&["submit", "--id", "quiet", "--wait", "--", "true"]);
    assert_eq!(agent.ok(&["logs", "quiet"]), "");
    assert_eq!(agent.ok(&["logs", "quiet", "--stderr", "--follow"]), "");
    assert!(!agent.data_dir.join("logs/quiet").exists());
    agent.ok(&[
        "submit",
        "--id",
        "lines",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo 1; echo 2; echo 3",
    ]);
    assert_eq!(agent.ok(&["logs", "lines", "--tail", "2"]), "2\n3\n");
    assert_eq!(agent.ok(&["logs", "greet", "--stderr"]), "careful\n");

    agent.ok(&["submit", "--id", "nap", "--", "sleep", "1000"]);
    wait_until("nap runs", || {
        agent.ok(&["show", "nap", "--json"]).contains("\"running\"")
    })
    .await;
    let table = agent.ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID     STATE    GROUP    NODE  COMMAND"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("greet  done     default  a1    sh -c echo hello")),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("nap    running  default  a1    sleep 1000")),
        "{table}"
    );
    let running: Value =
        serde_json::from_str(&agent.ok(&["ls", "--state", "running", "--json"])).unwrap();
    assert_eq!(running["tasks"].as_array().unwrap().len(), 1);

    assert_eq!(agent.ok(&["rm", "nap"]), "removed nap\n");
    let rm_again = agent.cli(&["rm", "nap"]);
    assert_eq!(rm_again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&rm_again.stderr).contains("task nap not found"));
    let nodes: Value = serde_json::from_str(&agent.ok(&["nodes", "--json"])).unwrap();
    assert_eq!(nodes["nodes"][0]["name"], "a1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_exits_with_the_commands_exit_code_and_wait_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let failed = agent.cli(&[
        "submit",
        "--id",
        "seven",
        "--max-attempts",
        "2",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo nope >&2; exit 7",
    ]);
    assert_eq!(failed.status.code(), Some(7), "{failed:?}");
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(
        stdout.starts_with("seven failed: ") && stdout.contains("exited with code 7 (attempt 2)"),
        "{stdout}"
    );

    let done = agent.cli(&["submit", "--wait", "--", "true"]);
    assert_eq!(done.status.code(), Some(0));
    agent.ok(&["submit", "--id", "fine", "--", "true"]);
    let both = agent.cli(&["wait", "fine", "seven"]);
    assert_eq!(both.status.code(), Some(1), "one of several failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_loses_nothing_its_tree_dies_and_the_task_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let work = dir.path().to_str().unwrap().to_string();
    let mut agent = Agent::start(&data, &[]).await;
    agent.ok(&["submit", "--id", "before", "--wait", "--", "true"]);
    // Runs long the first time (with a background child); ends the second.
    let script = format!(
        "cd {work}; if [ -f ran-once ]; then echo second run; exit 0; fi; touch ran-once; \
         echo $$ > leader.pid; sleep 1000 & echo $! > background.pid; wait"
    );
    agent.ok(&["submit", "--id", "long", "--", "sh", "-c", &script]);
    let leader = pid_in(&dir.path().join("leader.pid")).await;
    let background = pid_in(&dir.path().join("background.pid")).await;

    agent.kill9();
    // The task's supervisor (`eretes supervise`) kills the whole tree.
    wait_until("the task's whole tree dies with its agent", || {
        !alive(leader) && !alive(background)
    })
    .await;

    let agent = Agent::start(&data, &[]).await;
    let again = agent.ok(&["wait", "long"]);
    assert_eq!(again, "long done (exit code 0)\n");
    assert_eq!(agent.ok(&["logs", "long"]), "second run\n");
    let before: Value = serde_json::from_str(&agent.ok(&["show", "before", "--json"])).unwrap();
    assert_eq!(before["state"], "done", "results survive a kill -9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_of_a_running_task_kills_its_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let work = dir.path().to_str().unwrap();
    let script =
        format!("cd {work}; sleep 1000 & echo $! > background.pid; echo $$ > leader.pid; wait");
    agent.ok(&["submit", "--id", "tree", "--", "sh", "-c", &script]);
    let leader = pid_in(&dir.path().join("leader.pid")).await;
    let background = pid_in(&dir.path().join("background.pid")).await;
    agent.ok(&["rm", "tree"]);
    wait_until("the whole group is gone", || {
        !alive(leader) && !alive(background)
    })
    .await;
}

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
    let once: Value = http
        .get(format!("{tasks}/once"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(once["properties"]["process"]["program"], "true");
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
async fn programs_off_the_allow_list_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--allow", "true,echo"]).await;
    let refused = agent.cli(&[
        "submit", "--id", "shell", "--wait", "--", "sh", "-c", "echo hi",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout)
        .contains("program \"sh\" is not on this agent's --allow list"));
    let fine = agent.cli(&["submit", "--wait", "--", "echo", "allowed"]);
    assert_eq!(fine.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_is_named_clearly() {
    let output = Command::new(BIN)
        .args(["ls", "--agent", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no eretes agent answers at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

/// `/metrics` parsed by a real Prometheus text parser (Python's
/// prometheus_client, which `scripts/test.sh` installs as Debian's
/// python3-prometheus-client): every sample, as `[name, labels, value]`.
fn parse_prometheus(text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    const PARSER: &str = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's python3 (scripts/test.sh installs python3-prometheus-client)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&output.stdout).unwrap();
    samples
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_etcd_honour_groups_and_slots_and_a_task_waits_for_its_group() {
    let url = eretes_etcd::testing::test_etcd_url();
    let ns = format!("agents-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_str().unwrap().to_string();
    let common = [
        "--etcd",
        url.as_str(),
        "--namespace",
        ns.as_str(),
        "--allow",
        "sh",
        "--slots",
        "1",
    ];
    let mut b1: Vec<&str> = common.to_vec();
    b1.extend(["--groups", "build", "--name", "b1"]);
    let mut b2: Vec<&str> = common.to_vec();
    b2.extend(["--groups", "build", "--name", "b2"]);
    let first = Agent::start(&dir.path().join("b1"), &b1).await;
    let second = Agent::start(&dir.path().join("b2"), &b2).await;

    // Six half-second builds: with one slot each, each agent runs one at a
    // time; every run records its node and when it started and ended.
    let script = format!(
        "echo \"$ERETES_NODE start $(date +%s%N)\" >> {work}/runs; sleep 0.5; \
         echo \"$ERETES_NODE end $(date +%s%N)\" >> {work}/runs"
    );
    for n in 0..6 {
        first.ok(&[
            "submit",
            "--id",
            &format!("build-{n}"),
            "--group",
            "build",
            "--",
            "sh",
            "-c",
            &script,
        ]);
    }
    // A task of a group nobody serves waits, shown as pending.
    first.ok(&[
        "submit",
        "--id",
        "docs",
        "--group",
        "docs",
        "--",
        "sh",
        "-c",
        "echo documented",
    ]);
    let ids: Vec<String> = (0..6).map(|n| format!("build-{n}")).collect();
    let mut wait: Vec<&str> = vec!["wait"];
    wait.extend(ids.iter().map(String::as_str));
    first.ok(&wait);
    let docs: Value = serde_json::from_str(&first.ok(&["show", "docs", "--json"])).unwrap();
    assert_eq!(docs["state"], "pending", "nobody serves docs yet");

    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    let mut per_node: std::collections::BTreeMap<String, Vec<(String, u128)>> = Default::default();
    for line in runs.lines() {
        let mut words = line.split_whitespace();
        let (node, event, at) = (
            words.next().unwrap(),
            words.next().unwrap(),
            words.next().unwrap(),
        );
        per_node
            .entry(node.to_string())
            .or_default()
            .push((event.to_string(), at.parse().unwrap()));
    }
    assert_eq!(
        per_node.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "both agents built: {runs}"
    );
    for (node, mut events) in per_node {
        events.sort_by_key(|(_, at)| *at);
        let mut running = 0;
        for (event, _) in events {
            running += if event == "start" { 1 } else { -1 };
            assert!(running <= 1, "{node} ran two builds at once:\n{runs}");
        }
    }

    let mut d1: Vec<&str> = common.to_vec();
    d1.extend(["--groups", "docs", "--name", "d1"]);
    let docs_agent = Agent::start(&dir.path().join("d1"), &d1).await;
    assert_eq!(
        docs_agent.ok(&["wait", "docs"]),
        "docs done (exit code 0)\n"
    );
    let docs: Value = serde_json::from_str(&docs_agent.ok(&["show", "docs", "--json"])).unwrap();
    assert_eq!(docs["node"], "d1");
    drop((first, second, docs_agent));
    common::remove_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_a_running_tasks_output_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let gate = dir.path().join("gate");
    let script = format!(
        "echo first; while [ ! -f {} ]; do sleep 0.05; done; echo second",
        gate.display()
    );
    agent.ok(&["submit", "--id", "talker", "--", "sh", "-c", &script]);
    let mut follow = Command::new(BIN)
        .args(["logs", "talker", "--follow"])
        .env("ERETES_AGENT", &agent.url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    // The follower is still going while the task waits at its gate.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        follow.try_wait().unwrap().is_none(),
        "follow ended before the task did"
    );
    std::fs::write(&gate, "").unwrap();
    wait_until("the follower ends with the task", || {
        follow.try_wait().unwrap().is_some()
    })
    .await;
    assert!(follow.wait().unwrap().success());
    assert_eq!(reader.join().unwrap(), ["first", "second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let work = dir.path().to_str().unwrap().to_string();
    let mut agent = Agent::start(&data, &[]).await;
    // It says when it gets SIGTERM, so the test tells a drain (SIGTERM, then
    // a release) from the agent merely dying (SIGKILL by the parent-death
    // signal).
    let calm_script = format!(
        "trap 'echo term > {work}/calm.term; exit 0' TERM; echo $$ > {work}/calm.pid; \
         while true; do sleep 0.1; done"
    );
    agent.ok(&["submit", "--id", "calm", "--", "sh", "-c", &calm_script]);
    let calm = pid_in(&dir.path().join("calm.pid")).await;
    let term = |pid: u32| {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    term(agent.child.id());
    wait_until("the agent drains and exits", || {
        agent.child.try_wait().unwrap().is_some()
    })
    .await;
    assert!(
        agent.child.wait().unwrap().success(),
        "a drain exits 0: {}",
        agent.log()
    );
    assert!(!alive(calm), "the task's process was stopped");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("calm.term")).unwrap(),
        "term\n",
        "the drain stopped the task with SIGTERM"
    );

    // Restarted, the drained task was released (not failed) and runs again.
    let mut agent = Agent::start(&data, &["--stop-grace-ms", "60000"]).await;
    let shown: Value = serde_json::from_str(&agent.ok(&["show", "calm", "--json"])).unwrap();
    assert!(
        matches!(shown["state"].as_str(), Some("pending" | "running")),
        "{shown}"
    );

    // A task that ignores SIGTERM holds the drain for its grace (a minute
    // here); a second signal ends the agent at once.
    agent.ok(&[
        "submit",
        "--id",
        "stubborn",
        "--",
        "sh",
        "-c",
        &format!("trap '' TERM; echo $$ > {work}/stubborn.pid; while true; do sleep 0.1; done"),
    ]);
    pid_in(&dir.path().join("stubborn.pid")).await;
    term(agent.child.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still draining");
    term(agent.child.id());
    wait_until("the second signal ends the agent", || {
        agent.child.try_wait().unwrap().is_some()
    })
    .await;
    assert_eq!(
        agent.child.wait().unwrap().code(),
        Some(143),
        "128 + SIGTERM"
    );
}

/// The parsed `show ID --json` of a task.
fn view(agent: &Agent, id: &str) -> Value {
    serde_json::from_str(&agent.ok(&["show", id, "--json"])).unwrap()
}

/// The state `ls --json` gives task `id`.
fn listed_state(agent: &Agent, id: &str) -> Value {
    let listed: Value = serde_json::from_str(&agent.ok(&["ls", "--json"])).unwrap();
    listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|task| task["id"] == id)
        .map(|task| task["state"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_commands_are_refused_clearly_and_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]).await;
    // Nobody serves this group: the task stays pending and whatever is sent
    // to it stays in its queue, where the end of the test counts it.
    agent.ok(&[
        "submit", "--id", "parked", "--group", "nobody", "--", "sleep", "1000",
    ]);
    agent.ok(&["submit", "--id", "over", "--wait", "--", "true"]);

    for (args, code, expected) in [
        (
            &["task", "parked", "explode"][..],
            1,
            "unknown task command \"explode\"; task commands are pause, resume, sleep DURATION, kill",
        ),
        (&["task", "parked", "sleep", "soon"][..], 2, "invalid value 'soon'"),
        (&["task", "parked", "sleep", "30"][..], 2, "such as 250ms, 30s"),
        (&["task", "parked", "sleep", "0s"][..], 2, "longer than 0"),
        (&["task", "parked", "sleep", "400days"][..], 2, "at most 365 days"),
        (&["task", "parked", "sleep"][..], 2, "<DURATION>"),
        (&["task", "parked"][..], 2, "requires a subcommand"),
        (&["task", "bad id", "pause"][..], 1, "invalid task id"),
        (&["task", "missing", "pause"][..], 1, "task missing not found"),
        (&["task", "over", "kill"][..], 1, "task over has ended"),
    ] {
        let output = agent.cli(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    let refused = agent.cli(&["task", "over", "resume"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("409"));

    let http = reqwest::Client::new();
    let commands = |id: &str| format!("{}/v1/tasks/{id}/commands", agent.url);
    let day_ms: u64 = 24 * 3600 * 1000;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str, &str)> = vec![
        (
            http.post(commands("parked"))
                .json(&json!({"command": "explode"})),
            400,
            "invalid_request",
            "unknown task command \"explode\"; task commands are pause, resume, sleep, kill",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "sleep"})),
            400,
            "invalid_request",
            "sleep needs duration_ms (how long) or until_ms (until when)",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "sleep", "duration_ms": 0})),
            400,
            "invalid_request",
            "duration_ms 0 is not between 1 and",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "sleep", "duration_ms": 366 * day_ms})),
            400,
            "invalid_request",
            "(365 days)",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "sleep", "duration_ms": 5, "until_ms": u64::MAX})),
            400,
            "invalid_request",
            "not both",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "sleep", "until_ms": 1})),
            400,
            "invalid_request",
            "until_ms 1 is not in the future",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "pause", "duration_ms": 5})),
            400,
            "invalid_request",
            "pause takes no duration_ms or until_ms (only sleep does)",
        ),
        (
            http.post(commands("parked"))
                .json(&json!({"command": "pause", "colour": "red"})),
            400,
            "invalid_request",
            "unknown field `colour`",
        ),
        (
            http.post(commands("parked"))
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "invalid_request",
            "Failed to parse",
        ),
        (
            http.post(commands("no%20such"))
                .json(&json!({"command": "pause"})),
            400,
            "invalid_request",
            "invalid task id",
        ),
        (
            http.post(commands("missing"))
                .json(&json!({"command": "pause"})),
            404,
            "not_found",
            "task missing not found",
        ),
        (
            http.post(commands("over"))
                .json(&json!({"command": "resume"})),
            409,
            "task_ended",
            "task over has ended; it takes no more commands",
        ),
        (
            http.post(commands("parked"))
                .header("host", "evil.example")
                .json(&json!({"command": "kill"})),
            403,
            "forbidden",
            "is not this agent's address",
        ),
    ];
    for (request, status, code, message) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{message}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "expected {message:?} in {text:?}");
    }

    // Two good ones, which the count below must find (and nothing else).
    let before = eretes_protocol::now_ms();
    let sleep: Value =
        serde_json::from_str(&agent.ok(&["task", "parked", "sleep", "90s", "--json"])).unwrap();
    assert_eq!(sleep["task"], "parked");
    assert_eq!(sleep["command"], "sleep");
    assert!(sleep["revision"].as_i64().unwrap() > 0, "{sleep}");
    let until = sleep["until_ms"].as_u64().unwrap();
    assert!(
        (before + 90_000..=eretes_protocol::now_ms() + 90_000).contains(&until),
        "{sleep}"
    );
    assert_eq!(
        agent.ok(&["task", "parked", "pause"]),
        "sent pause to task parked\n"
    );
    assert_eq!(view(&agent, "parked")["state"], "pending", "nobody runs it");

    agent.kill9();
    let store = eretes_store::embedded::EmbeddedStore::open_durable(
        &data.join("store.redb"),
        Default::default(),
    )
    .unwrap();
    let coordinator = eretes_protocol::Coordinator::new(
        store,
        eretes_protocol::Namespace::new("eretes").unwrap(),
    );
    let queued = |id: &str| {
        let coordinator = coordinator.clone();
        let id = eretes_protocol::TaskId::new(id).unwrap();
        async move {
            coordinator
                .task_commands(&id)
                .await
                .unwrap()
                .into_iter()
                .map(|queued| queued.command.unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        queued("parked").await,
        [
            eretes_protocol::TaskCommand::Sleep { until_ms: until },
            eretes_protocol::TaskCommand::Pause
        ]
    );
    assert!(queued("over").await.is_empty());
    assert!(queued("missing").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_sleep_and_kill_steer_a_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let pid_file = dir.path().join("svc.pid");
    let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
    agent.ok(&["submit", "--id", "svc", "--", "sh", "-c", &script]);
    let first = pid_in(&pid_file).await;
    wait_until("svc runs", || view(&agent, "svc")["state"] == "running").await;

    // Pause: the process goes, the task stays, parked.
    assert_eq!(
        agent.ok(&["task", "svc", "pause"]),
        "sent pause to task svc\n"
    );
    wait_until("svc is paused and its process gone", || {
        view(&agent, "svc")["state"] == "paused" && !alive(first)
    })
    .await;
    assert_eq!(listed_state(&agent, "svc"), "paused");
    let paused: Value =
        serde_json::from_str(&agent.ok(&["ls", "--state", "paused", "--json"])).unwrap();
    assert_eq!(paused["tasks"].as_array().unwrap().len(), 1);
    let table = agent.ok(&["ls"]);
    assert!(
        table
            .lines()
            .any(|line| line.split_whitespace().take(2).eq(["svc", "paused"])),
        "{table}"
    );
    assert!(agent.ok(&["show", "svc"]).contains("state:     paused\n"));
    let metrics = reqwest::get(format!("{}/metrics", agent.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_prometheus(&metrics);
    let tasks = |state: &str| {
        samples
            .iter()
            .find(|(name, labels, _)| {
                name == "eretes_tasks" && labels["state"] == state && labels["group"] == "default"
            })
            .map(|(_, _, value)| *value)
    };
    assert_eq!(tasks("paused"), Some(1.0));
    assert_eq!(tasks("running"), Some(0.0));

    // Resume: a new run, a new process.
    std::fs::remove_file(&pid_file).unwrap();
    assert_eq!(
        agent.ok(&["task", "svc", "resume"]),
        "sent resume to task svc\n"
    );
    let second = pid_in(&pid_file).await;
    assert_ne!(second, first);
    wait_until("svc runs again", || {
        view(&agent, "svc")["state"] == "running"
    })
    .await;
    assert!(alive(second));

    // Sleep: parked until a time, then running again by itself.
    std::fs::remove_file(&pid_file).unwrap();
    let said = agent.ok(&["task", "svc", "sleep", "3s"]);
    assert!(
        said.starts_with("sent sleep to task svc: it sleeps until "),
        "{said}"
    );
    let mut until = 0;
    wait_until("svc sleeps and its process is gone", || {
        let shown = view(&agent, "svc");
        until = shown["sleeping_until_ms"].as_u64().unwrap_or(0);
        shown["state"] == "sleeping" && !alive(second)
    })
    .await;
    assert!(until > 0);
    assert_eq!(listed_state(&agent, "svc"), "sleeping");
    let shown = agent.ok(&["show", "svc"]);
    assert!(shown.contains("state:     sleeping until "), "{shown}");
    let third = pid_in(&pid_file).await;
    assert!(
        eretes_protocol::now_ms() >= until,
        "it woke before its time"
    );
    assert_ne!(third, second);
    wait_until("svc runs after its sleep", || {
        view(&agent, "svc")["state"] == "running"
    })
    .await;
    assert!(view(&agent, "svc")["sleeping_until_ms"].is_null());

    // Kill: the process goes and the task ends; a waiter sees it, non-zero.
    let mut waiter = Command::new(BIN)
        .args(["wait", "svc"])
        .env("ERETES_AGENT", &agent.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(
        agent.ok(&["task", "svc", "kill"]),
        "sent kill to task svc\n"
    );
    wait_until("the waiter returns", || {
        waiter.try_wait().unwrap().is_some()
    })
    .await;
    let waited = waiter.wait_with_output().unwrap();
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    assert_eq!(String::from_utf8_lossy(&waited.stdout), "svc killed\n");
    wait_until("the process is gone", || !alive(third)).await;
    let killed = view(&agent, "svc");
    assert_eq!(killed["state"], "killed", "{killed}");
    assert_eq!(killed["error"], "killed by a task command");
    assert_eq!(listed_state(&agent, "svc"), "killed");
    let again = agent.cli(&["task", "svc", "resume"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("task svc has ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_gives_a_live_tasks_recent_errors_and_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    // Each failed attempt is an error; the task backs off (sleeping) in
    // between, 1 s, 2 s, 4 s, ...
    agent.ok(&[
        "submit",
        "--id",
        "flaky",
        "--max-attempts",
        "5",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 3",
    ]);
    let mut shown = String::new();
    wait_until("flaky has an error and sleeps", || {
        shown = agent.ok(&["show", "flaky"]);
        shown.contains("errors:") && shown.contains("state:     sleeping until ")
    })
    .await;
    let errors = shown
        .lines()
        .find(|line| line.starts_with("errors:"))
        .unwrap();
    assert!(
        errors.contains(" recent; the last at ") && errors.contains("exited with code 3"),
        "{shown}"
    );
    let json = view(&agent, "flaky");
    assert!(!json["errors"].as_array().unwrap().is_empty(), "{json}");
    assert!(json["errors"][0]["at_ms"].as_u64().unwrap() > 0, "{json}");
}
