//! The process executor with real child processes, real signals and real
//! files, under a real node on the embedded store (real time: processes do
//! not run on tokio's clock). Every wait is bounded.

use std::time::Duration;

use eretes_exec::{AllowList, ProcessSpec};
use eretes_protocol::{Outcome, TaskId};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_with_its_identity_and_its_exit_and_output_become_the_result() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh(
            "hello",
            r#"echo "$ERETES_TASK_ID $ERETES_EPOCH $ERETES_NODE"; echo careful >&2"#,
            |_| {},
        )
        .await;
    let result = agent.result("hello").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["exit_code"], 0);
    assert_eq!(result.result["attempts"], 1);
    let expected = format!("hello {} n1\n", result.epoch);
    assert_eq!(result.result["stdout_tail"], expected.as_str());
    assert_eq!(result.result["stderr_tail"], "careful\n");
    let logs = agent.path("logs/hello");
    assert_eq!(
        std::fs::read_to_string(logs.join("stdout.log")).unwrap(),
        expected
    );
    assert_eq!(
        std::fs::read_to_string(logs.join("stderr.log")).unwrap(),
        "careful\n"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_with_backoff_until_it_succeeds() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // Fails twice, then succeeds; counts its attempts in a file.
    let script = r#"n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; echo "attempt $ERETES_ATTEMPT"; [ $n -ge 3 ]"#;
    agent.submit_sh("flaky", script, |_| {}).await;
    let result = agent.result("flaky").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["attempts"], 3);
    assert_eq!(std::fs::read_to_string(agent.path("tries")).unwrap(), "3\n");
    // The attempts of one run share its log.
    let log = std::fs::read_to_string(agent.path("logs/flaky/stdout.log")).unwrap();
    assert_eq!(log, "attempt 1\nattempt 2\nattempt 3\n");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_failing_fails_after_max_attempts_with_the_reason() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh("broken", "echo disk full >&2; exit 3", |spec| {
            spec.max_attempts = 2
        })
        .await;
    let result = agent.result("broken").await;
    assert_eq!(result.outcome, Outcome::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("2 errors") && error.contains("the limit is 2"),
        "{error}"
    );
    assert!(
        error.contains("exited with code 3 (attempt 2)") && error.contains("disk full"),
        "{error}"
    );

    agent
        .submit(
            "missing",
            ProcessSpec {
                max_attempts: 1,
                ..ProcessSpec::new("/no/such/program", vec![])
            }
            .to_properties(),
        )
        .await;
    let error = agent.result("missing").await.error.unwrap();
    assert!(
        error.contains("the last: cannot start \"/no/such/program\": No such file or directory"),
        "{error}"
    );
    // A missing working directory is named as such, not as the program.
    let mut elsewhere = ProcessSpec {
        max_attempts: 1,
        ..ProcessSpec::new("true", vec![])
    };
    elsewhere.cwd = Some("/no/such/dir".into());
    agent.submit("elsewhere", elsewhere.to_properties()).await;
    let error = agent.result("elsewhere").await.error.unwrap();
    assert!(
        error.contains(
            "the last: cannot start \"true\": its working directory \"/no/such/dir\": No such file \
             or directory"
        ),
        "{error}"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_sets_the_environment_and_an_attempt_past_its_timeout_is_stopped_and_counted() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh("greets", "echo \"$GREETING $ERETES_TASK_ID\"", |spec| {
            spec.env.insert("GREETING".into(), "hello from".into());
        })
        .await;
    let result = agent.result("greets").await;
    assert_eq!(result.result["stdout_tail"], "hello from greets\n");

    // TERM is trapped, so the timeout's stop runs its course: SIGTERM, the
    // grace period (500 ms here), SIGKILL; each attempt counts.
    agent
        .submit_sh(
            "slow",
            "echo $$ >> slow.pids; trap '' TERM; sleep 30",
            |spec| {
                spec.timeout_ms = Some(300);
                spec.max_attempts = 2;
            },
        )
        .await;
    let result = agent.result("slow").await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let error = result.error.unwrap();
    assert!(
        error.contains("timed out after 300ms and was stopped (attempt 2)"),
        "{error}"
    );
    let pids = std::fs::read_to_string(agent.path("slow.pids")).unwrap();
    assert_eq!(pids.lines().count(), 2, "two attempts");
    for pid in pids.lines() {
        assert!(!alive(pid.parse().unwrap()), "attempt {pid} was stopped");
    }
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_task_kills_its_whole_process_group() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh(
            "tree",
            "sleep 1000 & echo $! > background.pid; echo $$ > leader.pid; wait",
            |_| {},
        )
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    let background = pid_in(&agent.path("background.pid")).await;
    assert!(alive(leader) && alive(background));
    agent
        .coordinator
        .delete(&TaskId::new("tree").unwrap())
        .await
        .unwrap();
    // The record goes once the leader is reaped, a moment after it died.
    let groups = agent.path("groups");
    wait_until(
        "the group is gone, and so is its record",
        Duration::from_secs(20),
        || !alive(leader) && !alive(background) && no_group_recorded(&groups),
    )
    .await;
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // Ignored signals stay ignored across exec, so the whole group ignores
    // SIGTERM.
    agent
        .submit_sh(
            "stubborn",
            r#"trap "" TERM; echo $$ > leader.pid; while true; do sleep 0.1; done"#,
            |_| {},
        )
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    agent
        .coordinator
        .delete(&TaskId::new("stubborn").unwrap())
        .await
        .unwrap();
    wait_until(
        "the stubborn group is killed",
        Duration::from_secs(20),
        || !alive(leader),
    )
    .await;
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_off_the_allow_list_and_bad_specs_fail_with_the_reason() {
    let agent = Agent::start(AllowList::only(["true"]), |_| {}).await;
    agent.submit_sh("shell", "echo never", |_| {}).await;
    let error = agent.result("shell").await.error.unwrap();
    assert_eq!(error, "program \"sh\" is not on this agent's --allow list");
    assert!(!agent.path("logs/shell/stdout.log").exists(), "nothing ran");

    agent
        .submit("plain", serde_json::json!({"colour": "red"}))
        .await;
    let error = agent.result("plain").await.error.unwrap();
    assert!(
        error.starts_with("invalid process task: the task's properties have no \"process\""),
        "{error}"
    );

    agent
        .submit("allowed", ProcessSpec::new("true", vec![]).to_properties())
        .await;
    assert_eq!(agent.result("allowed").await.outcome, Outcome::Done);

    // PATH would make the allowed `true` another program: refused, as is
    // any variable the agent did not allow.
    let mut sneaky = ProcessSpec::new("true", vec![]);
    sneaky
        .env
        .insert("PATH".into(), agent.path("evil").display().to_string());
    agent.submit("sneaky", sneaky.to_properties()).await;
    let error = agent.result("sneaky").await.error.unwrap();
    assert_eq!(
        error,
        "env \"PATH\" is not on this agent's --allow-env list"
    );
    agent.node.shutdown().await;

    let agent = Agent::start(AllowList::only(["sh"]), |config| {
        config.allow_env.insert("GREETING".into());
    })
    .await;
    agent
        .submit_sh("greets", "echo $GREETING", |spec| {
            spec.env.insert("GREETING".into(), "hi".into());
        })
        .await;
    assert_eq!(agent.result("greets").await.result["stdout_tail"], "hi\n");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_rotates_the_log_and_the_tail_is_kept() {
    let agent = Agent::start(AllowList::Any, |config| config.log_cap = 100_000).await;
    agent
        .submit_sh(
            "chatty",
            "for i in $(seq 1 30000); do echo line $i; done; echo END",
            |_| {},
        )
        .await;
    let result = agent.result("chatty").await;
    assert_eq!(result.outcome, Outcome::Done);
    assert!(result.result["stdout_tail"]
        .as_str()
        .unwrap()
        .ends_with("line 30000\nEND\n"));
    let newest = std::fs::read_to_string(agent.path("logs/chatty/stdout.log")).unwrap();
    let older = std::fs::read_to_string(agent.path("logs/chatty/stdout.log.1")).unwrap();
    assert!(
        newest.starts_with("[eretes: this log reached 100000 bytes"),
        "{}",
        &newest[..200]
    );
    assert!(newest.ends_with("line 30000\nEND\n"));
    assert!(newest.len() <= 100_000 && older.len() <= 100_000);
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_task_is_restarted_whenever_it_exits() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh("service", "echo run >> runs; exit 0", |spec| {
            spec.permanent = true
        })
        .await;
    let runs = agent.path("runs");
    wait_until(
        "the service ran three times",
        Duration::from_secs(20),
        || std::fs::read_to_string(&runs).is_ok_and(|text| text.lines().count() >= 3),
    )
    .await;
    let id = TaskId::new("service").unwrap();
    assert!(
        agent.coordinator.result(&id).await.unwrap().is_none(),
        "a service never finishes"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_do_not_inherit_the_agents_secrets() {
    // SAFETY (edition 2021: set_var is safe): no other test reads these.
    std::env::set_var("ERETES_TOKEN", "api-secret");
    std::env::set_var("ERETES_ETCD_PASSWORD", "etcd-secret");
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh(
            "nosy",
            r#"echo "${ERETES_TOKEN:-none} ${ERETES_ETCD_PASSWORD:-none} $ERETES_TASK_ID""#,
            |_| {},
        )
        .await;
    let result = agent.result("nosy").await;
    assert_eq!(result.result["stdout_tail"], "none none nosy\n");
    agent.node.shutdown().await;
}

impl Agent {
    async fn command(&self, id: &str, command: eretes_protocol::TaskCommand) {
        self.coordinator
            .send_task_command(&TaskId::new(id).unwrap(), &command)
            .await
            .unwrap();
    }

    async fn state(&self, id: &str) -> eretes_protocol::TaskState {
        self.coordinator
            .task_view(&TaskId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    /// Wait up to 20 s until task `id` is in `state`.
    async fn wait_state(&self, id: &str, state: eretes_protocol::TaskState) {
        for _ in 0..400 {
            if self.state(id).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} did not become {state:?} within 20 s");
    }

    async fn checkpoint(&self, id: &str) -> Option<String> {
        self.coordinator
            .checkpoint(&TaskId::new(id).unwrap())
            .await
            .unwrap()
            .map(|bytes| String::from_utf8(bytes).unwrap())
    }
}

/// A counter that keeps its count in its checkpoint file (replaced by
/// rename), notes where each start began in `starts`, and its pid in `pid`.
const COUNTER: &str = r#"echo $$ > pid.tmp; mv pid.tmp pid
n=$(cat "$ERETES_CHECKPOINT_FILE" 2>/dev/null || echo 0)
echo "$n" >> starts
while true; do
  n=$((n+1)); echo $n > "$ERETES_CHECKPOINT_FILE.tmp"; mv "$ERETES_CHECKPOINT_FILE.tmp" "$ERETES_CHECKPOINT_FILE"
  sleep 0.1
done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_commands_pause_resume_sleep_and_kill_a_process_task() {
    use eretes_protocol::{TaskCommand, TaskState};
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent.submit_sh("counter", COUNTER, |_| {}).await;
    let pid_file = agent.path("pid");
    let first = new_pid(&pid_file, 0).await;
    wait_until("a checkpoint is saved", Duration::from_secs(20), || {
        std::fs::read_to_string(agent.path("starts")).is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    agent.command("counter", TaskCommand::Pause).await;
    agent.wait_state("counter", TaskState::Paused).await;
    wait_until(
        "the paused process is gone",
        Duration::from_secs(20),
        || !alive(first),
    )
    .await;
    let at_pause: u64 = agent
        .checkpoint("counter")
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(at_pause >= 3, "the counter saved checkpoints ({at_pause})");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first.to_string(),
        "nothing runs while paused"
    );

    agent.command("counter", TaskCommand::Resume).await;
    let second = new_pid(&pid_file, first).await;
    assert_eq!(agent.state("counter").await, TaskState::Running);
    let starts = std::fs::read_to_string(agent.path("starts")).unwrap();
    assert_eq!(
        starts,
        format!("0\n{at_pause}\n"),
        "the resumed process starts from the checkpoint saved at the pause"
    );

    let until_ms = eretes_protocol::now_ms() + 1500;
    agent
        .command("counter", TaskCommand::Sleep { until_ms })
        .await;
    agent.wait_state("counter", TaskState::Sleeping).await;
    wait_until(
        "the sleeping process is gone",
        Duration::from_secs(20),
        || !alive(second),
    )
    .await;
    let third = new_pid(&pid_file, second).await;
    assert!(
        eretes_protocol::now_ms() >= until_ms,
        "it woke no earlier than asked"
    );
    assert_eq!(agent.state("counter").await, TaskState::Running);

    agent.command("counter", TaskCommand::Kill).await;
    let result = agent.result("counter").await;
    assert_eq!(result.outcome, Outcome::Killed);
    wait_until(
        "the killed process is gone",
        Duration::from_secs(20),
        || !alive(third),
    )
    .await;
    assert!(
        std::fs::read_dir(agent.path("checkpoints"))
            .unwrap()
            .next()
            .is_none(),
        "no checkpoint file is left behind"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_written_on_sigterm_reaches_the_next_run_and_oversized_ones_are_not_saved() {
    use eretes_protocol::{TaskCommand, TaskState};
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // Saves its progress only when told to stop; the second run reports what
    // it was given. A 300 KiB checkpoint file is over the limit.
    let script = r#"if [ -f "$ERETES_CHECKPOINT_FILE" ]; then cat "$ERETES_CHECKPOINT_FILE"; exit 0; fi
trap 'echo saved-on-term > "$ERETES_CHECKPOINT_FILE"; exit 143' TERM
head -c 307200 /dev/zero > big; mv big "$ERETES_CHECKPOINT_FILE"
echo $$ > pid.tmp; mv pid.tmp pid
while true; do sleep 0.1; done"#;
    agent.submit_sh("graceful", script, |_| {}).await;
    let pid = new_pid(&agent.path("pid"), 0).await;
    // Past two looks at the file.
    tokio::time::sleep(eretes_exec::CHECKPOINT_POLL * 2 + Duration::from_millis(500)).await;
    assert_eq!(
        agent.checkpoint("graceful").await,
        None,
        "300 KiB is over the limit"
    );
    agent.command("graceful", TaskCommand::Pause).await;
    agent.wait_state("graceful", TaskState::Paused).await;
    assert!(!alive(pid));
    assert_eq!(
        agent.checkpoint("graceful").await.as_deref(),
        Some("saved-on-term\n")
    );
    agent.command("graceful", TaskCommand::Resume).await;
    let result = agent.result("graceful").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["stdout_tail"], "saved-on-term\n");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_file_written_in_place_is_saved_while_the_process_idles() {
    // Written in place (no rename), twice within the least time between two
    // saves, then idle: the watch sees both writes, and the second is saved
    // once that time has passed, with no poll to find it.
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    let script = r#"echo 1 > "$ERETES_CHECKPOINT_FILE"; sleep 0.3
echo 2 > "$ERETES_CHECKPOINT_FILE"; exec sleep 600"#;
    agent.submit_sh("idler", script, |_| {}).await;
    for _ in 0..200 {
        if agent.checkpoint("idler").await.as_deref().map(str::trim) == Some("2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agent.checkpoint("idler").await.as_deref().map(str::trim),
        Some("2"),
        "the last write was saved within 10 s"
    );
    assert_eq!(
        agent.state("idler").await,
        eretes_protocol::TaskState::Running,
        "saved while the process runs, not at its end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_a_task_makes_where_its_checkpoint_goes_are_removed() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // The first attempt leaves a tree where the checkpoint's replacement
    // goes and a directory where the checkpoint itself goes, and fails;
    // the second must still start, and leave nothing either.
    agent
        .submit_sh(
            "dirs",
            "if [ \"$ERETES_ATTEMPT\" = 1 ]; then \
               mkdir -p \"$ERETES_CHECKPOINT_FILE.tmp/inner\" && echo x > \"$ERETES_CHECKPOINT_FILE.tmp/inner/f\" \
               && rm -f \"$ERETES_CHECKPOINT_FILE\" && mkdir \"$ERETES_CHECKPOINT_FILE\" && exit 1; \
             fi; echo second",
            |spec| spec.max_attempts = 2,
        )
        .await;
    let result = agent.result("dirs").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["stdout_tail"], "second\n");
    let left: Vec<_> = std::fs::read_dir(agent.path("checkpoints"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    agent.node.shutdown().await;
}
