//! The process executor with real child processes, real signals and real
//! files, under a real node on the embedded store (real time: processes do
//! not run on tokio's clock). Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eretes_exec::{AllowList, ExecConfig, ProcessHandler, ProcessSpec};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, Outcome, TaskId, TaskSpec};
use eretes_runtime::{Deadline, FenceDeadline, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;

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
        error.contains("cannot start \"/no/such/program\""),
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

/// The environment variable that turns [`agent_process`] on: the data
/// directory it runs in.
const AGENT_DIR: &str = "ERETES_EXEC_TEST_AGENT_DIR";

/// Not a test on its own: the agent that the next test kills with SIGKILL.
/// It runs one task whose tree has a background child and a `setsid`
/// daemon that closed its output, and says "ready" once all run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the kill test's child process"]
async fn agent_process() {
    let Ok(dir) = std::env::var(AGENT_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (coordinator, _node) = start_node(config(&dir, AllowList::Any)).await;
    let mut spec = ProcessSpec::new(
        "sh",
        vec![
            "-c".into(),
            "sleep 1000 & echo $! > background.pid; \
             setsid sh -c 'exec >/dev/null 2>&1 </dev/null; echo $$ > daemon.pid; exec sleep 1000' & \
             echo $$ > leader.pid; wait"
                .into(),
        ],
    );
    spec.cwd = Some(dir.clone());
    coordinator
        .submit(
            &TaskId::new("orphan").unwrap(),
            &TaskSpec::new(GroupName::default(), spec.to_properties()),
        )
        .await
        .unwrap();
    pid_in(&dir.join("background.pid")).await;
    pid_in(&dir.join("daemon.pid")).await;
    println!("ready");
    tokio::time::sleep(Duration::from_secs(1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_whole_task_tree_dies_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "agent_process", "--ignored", "--nocapture"])
        .env(AGENT_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = agent.stdout.take().unwrap();
    let ready = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "ready")
    });
    wait_until("the agent runs its task", Duration::from_secs(30), || {
        ready.is_finished()
    })
    .await;
    assert!(ready.join().unwrap(), "the agent said ready");
    let tree = [
        pid_in(&dir.path().join("leader.pid")).await,
        pid_in(&dir.path().join("background.pid")).await,
        pid_in(&dir.path().join("daemon.pid")).await,
    ];
    let supervisor = parent_of(tree[0]);
    assert!(tree.iter().all(|&pid| alive(pid)));

    agent.kill().unwrap(); // SIGKILL: no clean-up of its own
    agent.wait().unwrap();
    // No other agent starts: the supervisor alone kills the whole tree,
    // the daemon that left the group and closed its output included.
    wait_until(
        "the whole tree and its supervisor die with the agent",
        Duration::from_secs(1),
        || tree.iter().all(|&pid| !alive(pid)) && !alive(supervisor),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_takes_the_daemon_it_started_with_it() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // The escaped process would keep the task's stdout open for good.
    agent
        .submit_sh(
            "daemonizes",
            "setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & \
             while [ ! -s escaped.pid ]; do sleep 0.05; done; echo started it",
            |_| {},
        )
        .await;
    let result = agent.result("daemonizes").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["stdout_tail"], "started it\n");
    // KillMode=control-group: nothing of the task outlives it.
    let escaped = pid_in(&agent.path("escaped.pid")).await;
    assert!(!alive(escaped), "the daemon died with its task");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_takes_the_tree_with_it_and_the_run_is_retried() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // The first attempt starts a grandchild and waits; the second succeeds.
    agent
        .submit_sh(
            "crashy",
            "if [ \"$ERETES_ATTEMPT\" = 1 ]; then \
               sleep 1000 & echo $! > grandchild.pid; echo $$ > leader.pid; wait; \
             fi; echo second attempt",
            |spec| spec.max_attempts = 3,
        )
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    let grandchild = pid_in(&agent.path("grandchild.pid")).await;
    let supervisor = parent_of(leader);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(supervisor, libc::SIGKILL);
    }
    wait_until(
        "the task's tree dies with its supervisor",
        Duration::from_secs(5),
        || !alive(leader) && !alive(grandchild),
    )
    .await;
    let result = agent.result("crashy").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["attempts"], 2, "{result:?}");
    assert_eq!(result.result["stdout_tail"], "second attempt\n");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_kills_the_tree_at_a_fence_deadline_nobody_extends() {
    // A node publishes its deadline; here it is published once, then never
    // extended, as by a frozen agent. The supervisor acts on its own.
    let start = tokio::time::Instant::now();
    let at = deadline_from(start);
    let (deadline, fence) = FenceDeadline::channel(Some(at(Duration::from_secs(3))));
    let stubborn = StubbornRun::start("fenced", fence, |_| {}).await;
    let (leader, background) = (stubborn.leader, stubborn.background);
    // Extended once: the first deadline passes without a kill.
    deadline.send_replace(Some(at(Duration::from_secs(5))));
    tokio::time::sleep_until(start + Duration::from_millis(4000)).await;
    assert!(
        alive(leader) && alive(background),
        "extended, so not killed"
    );
    // The last deadline passes: SIGKILL (TERM is ignored; no grace period).
    wait_until(
        "the whole tree is killed at the deadline",
        Duration::from_secs(20),
        || !alive(leader) && !alive(background),
    )
    .await;
    assert!(start.elapsed() >= Duration::from_secs(5), "not before it");
    let outcome = tokio::time::timeout(Duration::from_secs(20), stubborn.run)
        .await
        .expect("the handler returns")
        .unwrap();
    // Fenced is not the task's failure: the task is given back.
    assert_eq!(outcome, eretes_runtime::HandlerOutcome::Release);
}

/// Deadlines `left` after `start` (and after now on CLOCK_BOOTTIME).
fn deadline_from(start: tokio::time::Instant) -> impl Fn(Duration) -> Deadline {
    let boot = eretes_runtime::boottime_ns() - start.elapsed().as_nanos() as u64;
    move |left| Deadline::after_moment(start, boot, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passed_while_the_supervisor_was_stopped_is_final() {
    // The supervisor misses its deadline (stopped, as on a suspended
    // machine), and the extension the agent sent meanwhile arrives after
    // it: the tree is killed all the same.
    let start = tokio::time::Instant::now();
    let at = deadline_from(start);
    let (deadline, fence) = FenceDeadline::channel(Some(at(Duration::from_millis(1500))));
    let stubborn = StubbornRun::start("late", fence, |_| {}).await;
    let supervisor = parent_of(stubborn.leader);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(supervisor, libc::SIGSTOP) };
    tokio::time::sleep_until(start + Duration::from_millis(2500)).await;
    deadline.send_replace(Some(at(Duration::from_secs(600))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: as above.
    unsafe { libc::kill(supervisor, libc::SIGCONT) };
    wait_until(
        "the tree is killed for the deadline that passed",
        Duration::from_secs(20),
        || !alive(stubborn.leader) && !alive(stubborn.background),
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), stubborn.run)
        .await
        .expect("the handler returns")
        .unwrap();
    assert_eq!(outcome, eretes_runtime::HandlerOutcome::Release);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_starts_with_no_signal_blocked() {
    // The supervisor blocks signals for its signalfd; its task must not
    // inherit that, or SIGTERM would never reach it.
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh("mask", "echo $$ > mask.pid; exec sleep 1000", |_| {})
        .await;
    let pid = pid_in(&agent.path("mask.pid")).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let blocked = status
        .lines()
        .find_map(|line| line.strip_prefix("SigBlk:"))
        .unwrap()
        .trim();
    assert_eq!(u64::from_str_radix(blocked, 16).unwrap(), 0, "{status}");
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fence_processes_the_deadline_kills_nothing() {
    // The embedded agent's setting: no other node can take the task over.
    let start = tokio::time::Instant::now();
    let fence = FenceDeadline::fixed(Some(deadline_from(start)(Duration::from_millis(500))));
    let stubborn = StubbornRun::start("unfenced", fence, |exec| {
        exec.fence_processes = false;
    })
    .await;
    tokio::time::sleep_until(start + Duration::from_secs(2)).await;
    assert!(
        alive(stubborn.leader) && alive(stubborn.background),
        "the deadline passed, and nothing was killed"
    );
    stubborn.run.abort();
    let _ = stubborn.run.await;
    wait_until(
        "the tree dies with the dropped handler",
        Duration::from_secs(20),
        || !alive(stubborn.leader) && !alive(stubborn.background),
    )
    .await;
}

/// A run of a task started by hand, outside a node (as a node would for a
/// claim), whose shell ignores SIGTERM and has a background child; the
/// stop grace period is a minute.
struct StubbornRun {
    dir: tempfile::TempDir,
    run: tokio::task::JoinHandle<eretes_runtime::HandlerOutcome>,
    cancel: tokio_util::sync::CancellationToken,
    leader: i32,
    background: i32,
}

impl StubbornRun {
    async fn start(
        id: &str,
        fence: FenceDeadline,
        tune: impl FnOnce(&mut ExecConfig),
    ) -> StubbornRun {
        let dir = tempfile::tempdir().unwrap();
        let mut exec = config(dir.path(), AllowList::Any);
        exec.stop_grace = Duration::from_secs(60);
        tune(&mut exec);
        let store: Arc<dyn Store> = EmbeddedStore::new();
        let handler = StateMachine::new(
            ProcessHandler::new(exec).unwrap(),
            Coordinator::new(store, Namespace::new("exec").unwrap()),
        );
        let script = format!(
            "trap '' TERM; cd {}; sleep 1000 & echo $! > background.pid; echo $$ > leader.pid; wait",
            dir.path().display()
        );
        let spec = ProcessSpec::new("sh", vec!["-c".into(), script]);
        let cancel = tokio_util::sync::CancellationToken::new();
        let ctx = eretes_runtime::TaskContext {
            id: TaskId::new(id).unwrap(),
            task: Arc::new(eretes_protocol::TaskRecord {
                spec: TaskSpec::new(GroupName::default(), spec.to_properties()),
                submitted_at_ms: 0,
            }),
            epoch: 7,
            node: NodeName::new("n1").unwrap(),
            claims: 1,
            cancel: cancel.clone(),
            commands: Default::default(),
            fence,
        };
        let run = tokio::spawn(async move { eretes_runtime::Handler::run(&handler, ctx).await });
        let leader = pid_in(&dir.path().join("leader.pid")).await;
        let background = pid_in(&dir.path().join("background.pid")).await;
        StubbornRun {
            dir,
            run,
            cancel,
            leader,
            background,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_dropped_mid_stop_takes_its_whole_group_with_it() {
    // What the runtime does to a handler that does not stop in time (after
    // fencing, or when a drain runs out): it drops it. The group, SIGTERM
    // ignored and with a background child, must die with it at once.
    let stubborn = StubbornRun::start("dropped", FenceDeadline::none(), |_| {}).await;
    let (leader, background, run) = (stubborn.leader, stubborn.background, stubborn.run);
    let dir = stubborn.dir;
    stubborn.cancel.cancel(); // SIGTERM, which the group ignores...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(leader) && alive(background), "SIGTERM is ignored");
    run.abort(); // ...and the runtime gives up on the handler.
    let _ = run.await;
    wait_until(
        "the whole group dies with the dropped handler",
        Duration::from_secs(20),
        || !alive(leader) && !alive(background),
    )
    .await;
    wait_until(
        "the run's record goes once its supervisor is reaped",
        Duration::from_secs(20),
        || no_group_recorded(&dir.path().join("groups")),
    )
    .await;
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
