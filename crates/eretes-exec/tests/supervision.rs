//! The process supervisor with real processes and real signals: a task's
//! whole tree (its group, background children, daemons that left the
//! group) dies with its agent, its supervisor, a fence deadline nobody
//! extends, or a handler dropped mid-stop; under a real node on the
//! embedded store, in real time. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eretes_exec::{AllowList, ExecConfig, ProcessHandler, ProcessSpec};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, Outcome, TaskId, TaskSpec};
use eretes_runtime::{Deadline, FenceDeadline, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;

mod common;

use common::*;

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
    // A run that ends first: its supervisor then waits for another run.
    let mut before = ProcessSpec::new("sh", vec!["-c".into(), "echo $PPID > before.ppid".into()]);
    before.cwd = Some(dir.clone());
    let before_id = TaskId::new("before").unwrap();
    coordinator
        .submit(
            &before_id,
            &TaskSpec::new(GroupName::default(), before.to_properties()),
        )
        .await
        .unwrap();
    for _ in 0..400 {
        if coordinator.result(&before_id).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Run this binary's ignored test `name` as an agent in `dir` (its tasks
/// as `user`, if given), until it says "ready".
async fn start_agent_process(name: &str, dir: &std::path::Path, user: Option<&str>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", name, "--ignored", "--nocapture"])
        .env(AGENT_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(user) = user {
        command.env(RUN_AS, user);
    }
    let mut agent = command.spawn().unwrap();
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
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_whole_task_tree_dies_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent_process("agent_process", dir.path(), None).await;
    let tree = [
        pid_in(&dir.path().join("leader.pid")).await,
        pid_in(&dir.path().join("background.pid")).await,
        pid_in(&dir.path().join("daemon.pid")).await,
    ];
    let supervisor = parent_of(tree[0]);
    assert!(tree.iter().all(|&pid| alive(pid)));
    // Every process the agent started: the fork server, the task's
    // supervisor, and those waiting for a run (the first run's among them,
    // unless it took this one).
    let agent_pid = agent.id() as i32;
    let started: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent(pid) == Some(agent_pid) && alive(pid))
        .collect();
    let first_supervisor = pid_in(&dir.path().join("before.ppid")).await;
    assert!(
        started.contains(&first_supervisor),
        "the first run's supervisor waits for a run, or runs this one: {started:?}"
    );
    assert!(started.len() >= 3, "{started:?}");

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
    wait_until(
        "every process the agent started ends with it",
        Duration::from_secs(1),
        || started.iter().all(|&pid| !alive(pid)),
    )
    .await;
}

/// With [`AGENT_DIR`], the user [`leader_after_supervisor`]'s agent runs
/// its task as (none: its own).
const RUN_AS: &str = "ERETES_EXEC_TEST_RUN_AS";

/// Not a test on its own: the agent that the next test freezes. It runs
/// one task that is `sleep`, and says "ready" once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the frozen agent test's child process"]
async fn frozen_agent_process() {
    let Ok(dir) = std::env::var(AGENT_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut exec = config(&dir, AllowList::Any);
    if let Ok(user) = std::env::var(RUN_AS) {
        exec.run_as = Some(eretes_exec::RunAs::lookup(&user).unwrap());
    }
    let (coordinator, _node) = start_node(exec).await;
    let mut spec = ProcessSpec::new(
        "sh",
        vec!["-c".into(), "echo $$ > leader.pid; exec sleep 1000".into()],
    );
    spec.cwd = Some(dir.clone());
    coordinator
        .submit(
            &TaskId::new("sleeper").unwrap(),
            &TaskSpec::new(GroupName::default(), spec.to_properties()),
        )
        .await
        .unwrap();
    pid_in(&dir.join("leader.pid")).await;
    println!("ready");
    tokio::time::sleep(Duration::from_secs(1000)).await;
}

/// Start [`frozen_agent_process`] (as `user`'s tasks, if given), freeze it,
/// kill its task's supervisor: the leader dies by its parent-death signal
/// alone, the agent being in no state to sweep.
async fn leader_after_supervisor(user: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    // The task may run as another user: it writes its pid here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut agent = start_agent_process("frozen_agent_process", dir.path(), user).await;
    let leader = pid_in(&dir.path().join("leader.pid")).await;
    let supervisor = parent_of(leader);
    let agent_pid = agent.id() as i32;
    assert_eq!(parent_of(supervisor), agent_pid);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(agent_pid, libc::SIGSTOP);
        libc::kill(supervisor, libc::SIGKILL);
    }
    let died = tokio::time::timeout(Duration::from_secs(2), async {
        while alive(leader) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    agent.kill().unwrap(); // a stopped process dies of SIGKILL too
    agent.wait().unwrap();
    assert!(
        died.is_ok(),
        "the leader (as {user:?}) outlived its supervisor while the agent was frozen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_dies_with_its_killed_supervisor_while_the_agent_is_frozen() {
    leader_after_supervisor(None).await;
    // The kernel clears a parent-death signal set before a change of user.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        leader_after_supervisor(Some("nobody")).await;
    }
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
async fn a_task_that_stops_its_supervisor_still_ends_at_its_timeout() {
    // The timeout's stop goes to a supervisor that reads nothing; after
    // the grace (500 ms here) and 2 s more, the agent kills it and the tree.
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh(
            "stops-and-times-out",
            "sleep 0.3; echo $$ > leader.pid; kill -STOP $PPID; sleep 1000",
            |spec| {
                spec.timeout_ms = Some(1000);
                spec.max_attempts = 1;
            },
        )
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    let result = agent.result("stops-and-times-out").await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("timed out after 1s"), "{error}");
    wait_until("the tree is gone", Duration::from_secs(10), || {
        !alive(leader)
    })
    .await;
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_sigterms_its_supervisor_fails_the_attempt_rather_than_moving_for_ever() {
    // A SIGTERM the agent did not send stops the run, but is no release:
    // released, the task was claimed again and again, its attempts never
    // counted, and it never ended.
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh(
            "terminates-its-supervisor",
            "kill $PPID; sleep 30",
            |spec| spec.max_attempts = 1,
        )
        .await;
    let result = agent.result("terminates-its-supervisor").await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let error = result.error.clone().unwrap_or_default();
    assert!(
        error.contains("sent SIGTERM by another process than the agent"),
        "{error}"
    );
    assert_eq!(result.runs.claims, 1, "claimed once: {result:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_stops_its_supervisor_still_dies_with_its_dropped_handler() {
    // A task running as the agent's own user can SIGSTOP its supervisor
    // (its parent), which then never reads the end of its socket: the
    // agent kills it, and the tree, when it does not exit. The supervisor
    // reports the start before the task's shell runs, so the pause only
    // keeps the stop after that report.
    let stubborn = StubbornRun::start_after(
        "stops-its-supervisor",
        FenceDeadline::none(),
        |_| {},
        "sleep 0.3; kill -STOP $PPID; ",
    )
    .await;
    let (leader, background, run) = (stubborn.leader, stubborn.background, stubborn.run);
    let supervisor = parent_of(leader);
    wait_until(
        "the task stopped its supervisor",
        Duration::from_secs(10),
        || state_of(supervisor).as_deref() == Some("T"),
    )
    .await;
    stubborn.cancel.cancel(); // the stop order, which nobody reads...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(leader) && alive(background), "nothing stopped them");
    run.abort(); // ...and the runtime gives up on the handler.
    let _ = run.await;
    wait_until(
        "the stopped supervisor and the whole tree die with the dropped handler",
        Duration::from_secs(20),
        || !alive(supervisor) && !alive(leader) && !alive(background),
    )
    .await;
    wait_until(
        "the run's record goes once its supervisor is reaped",
        Duration::from_secs(20),
        || no_group_recorded(&stubborn.dir.path().join("groups")),
    )
    .await;
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, ...), if
/// it exists.
fn state_of(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()
        .map(str::to_string)
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
        StubbornRun::start_after(id, fence, tune, "").await
    }

    /// The same, its shell running `prelude` first.
    async fn start_after(
        id: &str,
        fence: FenceDeadline,
        tune: impl FnOnce(&mut ExecConfig),
        prelude: &str,
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
            "{prelude}trap '' TERM; cd {}; sleep 1000 & echo $! > background.pid; echo $$ > leader.pid; wait",
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
