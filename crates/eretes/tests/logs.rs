//! Reading a task's log costs what the read returns: twenty concurrent
//! `tail=1` reads of a 60 MiB log leave the agent's peak memory far below
//! one copy of the log.

use std::io::Write;

mod common;
use common::Agent;

/// The agent's peak resident set, in KiB (`VmHWM`).
fn peak_rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reads_of_a_huge_log_cost_what_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]).await;
    // A 60 MiB log, as a permanent task's restarts could leave.
    let log_dir = data.join("logs/huge");
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut log =
        std::io::BufWriter::new(std::fs::File::create(log_dir.join("stdout.log")).unwrap());
    let line = format!("{}\n", "x".repeat(1023));
    for _ in 0..60 * 1024 - 1 {
        log.write_all(line.as_bytes()).unwrap();
    }
    log.write_all(b"the last line\n").unwrap();
    drop(log);
    let before = peak_rss_kib(&agent);

    let http = reqwest::Client::new();
    let reads = (0..20).map(|_| {
        let (http, url) = (http.clone(), agent.url.clone());
        tokio::spawn(async move {
            http.get(format!("{url}/v1/tasks/huge/logs?tail=1"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    });
    for read in reads.collect::<Vec<_>>() {
        assert_eq!(read.await.unwrap(), "the last line\n");
    }
    // The whole log, streamed: every byte, in order.
    let whole = http
        .get(format!("{}/v1/tasks/huge/logs", agent.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(whole.len(), 60 * 1024 * 1024 - 1024 + 14);
    assert!(whole.ends_with(b"x\nthe last line\n"));
    let grown = peak_rss_kib(&agent).saturating_sub(before);
    // One copy of the log is 61,440 KiB; twenty were read at once before.
    assert!(grown < 30 * 1024, "the agent's peak grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_go_with_their_task_and_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &["--log-retention", "2s"]).await;
    let logs = |id: &str| data.join("logs").join(id);
    agent.ok(&[
        "submit",
        "--id",
        "ended",
        "--wait",
        "--",
        "echo",
        "kept a while",
    ]);
    agent.ok(&[
        "submit",
        "--id",
        "doomed",
        "--",
        "sh",
        "-c",
        "echo here; sleep 1000",
    ]);
    agent.ok(&[
        "submit",
        "--id",
        "alive",
        "--",
        "sh",
        "-c",
        "echo running; sleep 1000",
    ]);
    common::wait_until("both running tasks logged", || {
        ["doomed", "alive"]
            .iter()
            .all(|id| std::fs::read(logs(id).join("stdout.log")).is_ok_and(|log| !log.is_empty()))
    })
    .await;
    assert!(logs("ended").exists());
    // rm takes its logs with it, at once.
    agent.ok(&["rm", "doomed"]);
    assert!(!logs("doomed").exists(), "rm removed the logs");
    // An ended task's logs go once older than the retention; a running
    // task's stay, however old.
    common::wait_until("the ended task's logs are swept", || {
        !logs("ended").exists()
    })
    .await;
    assert_eq!(agent.ok(&["logs", "alive"]), "running\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_removed_task_prints_while_it_stops_does_not_bring_its_logs_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The helper's stop grace, 500 ms; logs kept for the default week.
    let agent = Agent::start(&data, &[]).await;
    let logs = data.join("logs").join("polite");
    let pid_file = dir.path().join("polite.pid");
    // Silent until its SIGTERM, which it answers a moment later: after
    // rm removed its (not yet made) logs.
    let script = format!(
        "trap 'sleep 0.3; echo goodbye; exit 0' TERM; echo $$ > {}; \
         while :; do sleep 0.1; done",
        pid_file.display()
    );
    agent.ok(&["submit", "--id", "polite", "--", "sh", "-c", &script]);
    common::wait_until("the task runs", || pid_file.exists()).await;
    agent.ok(&["rm", "polite"]);
    common::wait_until("its goodbye made its log directory again", || logs.exists()).await;
    common::wait_until("the directory is removed once more", || !logs.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_tasks_go_after_the_result_retention_and_running_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(
        &data,
        &["--result-retention", "2s", "--log-retention", "1h"],
    )
    .await;
    let logs = |id: &str| data.join("logs").join(id);
    agent.ok(&["submit", "--id", "ended", "--wait", "--", "echo", "done"]);
    let failed = agent.cli(&[
        "submit",
        "--id",
        "failed",
        "--max-attempts",
        "1",
        "--wait",
        "--",
        "false",
    ]);
    assert!(!failed.status.success(), "false failed");
    agent.ok(&[
        "submit",
        "--id",
        "alive",
        "--",
        "sh",
        "-c",
        "echo up; sleep 1000",
    ]);
    common::wait_until("the running task logged", || {
        std::fs::read(logs("alive").join("stdout.log")).is_ok_and(|log| !log.is_empty())
    })
    .await;
    assert!(logs("ended").exists());
    // Ended tasks go once older than the retention, result and all; a
    // running task stays, however old.
    common::wait_until("the ended tasks are deleted", || {
        ["ended", "failed"]
            .iter()
            .all(|id| !agent.cli(&["show", id]).status.success())
    })
    .await;
    let alive: serde_json::Value =
        serde_json::from_str(&agent.ok(&["show", "alive", "--json"])).unwrap();
    assert_eq!(alive["state"], "running");
    assert_eq!(agent.ok(&["logs", "alive"]), "up\n");
    // Their logs went with them, so a task submitted again under the id
    // (which is free again) logs afresh.
    common::wait_until("the deleted tasks' logs are removed", || {
        !logs("ended").exists()
    })
    .await;
    agent.ok(&["submit", "--id", "ended", "--wait", "--", "echo", "again"]);
    assert_eq!(agent.ok(&["logs", "ended"]), "again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_goes_on_across_its_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let gate = dir.path().join("gate");
    // 11 MB, past the 10 MiB rotation, then a last line.
    let script = format!(
        "while [ ! -f {} ]; do sleep 0.05; done; \
         head -c 11000000 /dev/zero | tr '\\0' x; echo; echo LAST-LINE",
        gate.display()
    );
    agent.ok(&["submit", "--id", "big", "--", "sh", "-c", &script]);
    let follower = std::process::Command::new(common::BIN)
        .args(["logs", "big", "--follow"])
        .env("ERETES_AGENT", &agent.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    std::fs::write(&gate, "").unwrap();
    let output = tokio::task::spawn_blocking(move || follower.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success());
    assert!(
        output.stdout.ends_with(b"x\nLAST-LINE\n"),
        "the end of the output arrived"
    );
    // Every byte once, and the line that says where the log rotated.
    let text = String::from_utf8(output.stdout).unwrap();
    let note_at = text
        .find("[eretes: this log reached")
        .expect("the rotation is noted");
    let note_end = note_at + text[note_at..].find('\n').unwrap() + 1;
    assert_eq!(text.len() - (note_end - note_at), 11_000_000 + 1 + 10);
}
