//! Steering a running task of a real `eretes agent`: bad task commands are
//! refused clearly, pause / resume / sleep / kill act on the real process,
//! and `show` gives a live task's errors and wake time. Every wait is
//! bounded.

use std::process::{Command, Stdio};

use serde_json::{json, Value};

mod common;
use common::{alive, listed_state, parse_prometheus, pid_in, view, wait_until, Agent, BIN};

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
