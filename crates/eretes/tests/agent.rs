//! `eretes agent` and the CLI, end to end: the real binary, real processes,
//! real HTTP on loopback, the durable embedded store in a temporary
//! directory. Every wait is bounded; agents are killed when a test ends.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

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
async fn ls_says_how_many_records_do_not_decode_and_names_them() {
    use eretes_store::{PutRequest, Store};
    let url = eretes_etcd::testing::test_etcd_url();
    let ns = format!("ls-garbage-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("a1"),
        &["--etcd", url.as_str(), "--namespace", ns.as_str()],
    )
    .await;
    agent.ok(&["submit", "--id", "fine", "--group", "nobody", "--", "true"]);
    let store = eretes_etcd::testing::connect_test_etcd().await;
    for (id, value) in [("broken", &b"{\"spec\": "[..]), ("listy", &b"[1, 2]"[..])] {
        store
            .put(PutRequest::new(format!("{ns}/tasks/{id}"), value))
            .await
            .unwrap();
    }
    let listed = |args: &[&str]| {
        let mut all = vec!["ls"];
        all.extend(args);
        let output = agent.cli(&all);
        assert!(output.status.success(), "{output:?}");
        (
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let mut seen = (String::new(), String::new());
    for _ in 0..100 {
        seen = listed(&[]);
        if seen.1.contains("2 record(s)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stdout, stderr) = seen;
    assert!(
        stdout.contains("fine") && !stdout.contains("broken"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "2 record(s) in the store do not decode and are not listed; \
             the first: {ns}/tasks/broken, {ns}/tasks/listy"
        )),
        "{stderr}"
    );
    let (json, _) = listed(&["--json"]);
    let page: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(page["malformed"], 2, "{page}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
    drop(agent);
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

/// A client command whose reader goes away (`eretes logs ID | head -c1`)
/// ends quietly, as other command-line tools do, instead of panicking at
/// its next print.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_reader_goes_away_ends_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    // 512 KiB of output: far more than a pipe holds.
    agent.ok(&[
        "submit",
        "--id",
        "loud",
        "--wait",
        "--",
        "sh",
        "-c",
        "head -c 524288 /dev/zero | tr '\\0' x",
    ]);
    let mut logs = Command::new(BIN)
        .args(["logs", "loud"])
        .env("ERETES_AGENT", &agent.url)
        .env_remove("ERETES_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader closes its end at once.
    drop(logs.stdout.take());
    let output = logs.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}

/// An agent that refuses its arguments leaves no data directory behind
/// (one it did not make stays, as it was).
#[test]
fn an_agent_that_does_not_start_leaves_no_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (&["--etcd", "http://127.0.0.1:1"][..], "cannot reach etcd"),
        (&["--run-as", "no-such-user-here"][..], "--run-as"),
        (&["--listen", "203.0.113.1:1"][..], "--listen"),
    ] {
        let data = dir.path().join("new");
        let output = Command::new(BIN)
            .arg("agent")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .args(["--token", "t"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!data.exists(), "{args:?} left {}", data.display());
    }
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("mine"), "kept").unwrap();
    let output = Command::new(BIN)
        .arg("agent")
        .arg("--data-dir")
        .arg(&existing)
        .args(["--etcd", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_eq!(
        std::fs::read_to_string(existing.join("mine")).unwrap(),
        "kept"
    );
}
