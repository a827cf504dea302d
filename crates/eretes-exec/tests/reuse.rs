//! A supervisor whose run ended takes the agent's next run: with nothing
//! of the last one (environment, directory, output, a signal sent to it
//! while idle), as few kept as the bound says, and none outliving a
//! burst by much. Real processes, bounded waits.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use eretes_exec::{supervisor::FORK_SERVER_ARG, AllowList, AGENT_DIR_ENV};
use eretes_protocol::Outcome;

mod common;

use common::*;

const SUPERVISOR: &str = env!("CARGO_BIN_EXE_eretes-supervisor");

/// The supervisors (not the fork server) this process started for the
/// agent whose data directory is `dir`, alive.
fn supervisors_of(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let marker = [AGENT_DIR_ENV.as_bytes(), b"=", dir.as_os_str().as_bytes()].concat();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid) && parent(pid) == Some(me))
        .filter(|&pid| {
            let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = line.split(|&byte| byte == 0).collect();
            args.first() == Some(&SUPERVISOR.as_bytes())
                && !args.contains(&FORK_SERVER_ARG.as_bytes())
        })
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|&byte| byte == 0)
                .any(|variable| variable == marker.as_slice())
        })
        .collect()
}

fn read(agent: &Agent, name: &str) -> String {
    std::fs::read_to_string(agent.path(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_takes_the_next_run_with_nothing_of_the_last() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    let elsewhere = agent.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let script = |name: &str| {
        format!(
            "echo $PPID > {dir}/{name}.ppid; echo \"${{MARK-unset}}\" > {dir}/{name}.mark; \
             pwd > {dir}/{name}.cwd; echo out-of-{name}",
            dir = agent.dir.path().display()
        )
    };
    agent
        .submit_sh("first", &script("first"), |spec| {
            spec.env.insert("MARK".into(), "one".into());
            spec.cwd = Some(elsewhere.clone());
        })
        .await;
    let first = agent.result("first").await;
    assert_eq!(first.outcome, Outcome::Done, "{first:?}");
    assert_eq!(first.result["stdout_tail"], "out-of-first\n");
    let supervisor: i32 = read(&agent, "first.ppid").trim().parse().unwrap();
    assert_eq!(read(&agent, "first.mark"), "one\n");

    agent.submit_sh("second", &script("second"), |_| {}).await;
    let second = agent.result("second").await;
    assert_eq!(second.outcome, Outcome::Done, "{second:?}");
    assert_eq!(
        read(&agent, "second.ppid").trim().parse::<i32>().unwrap(),
        supervisor,
        "the first run's supervisor ran the second"
    );
    assert_eq!(
        read(&agent, "second.mark"),
        "unset\n",
        "no variable of the first run"
    );
    assert_eq!(
        read(&agent, "second.cwd").trim(),
        agent.dir.path().to_str().unwrap(),
        "the second run's own directory"
    );
    assert_eq!(second.result["stdout_tail"], "out-of-second\n");
    assert_eq!(
        read(&agent, "logs/second/stdout.log"),
        "out-of-second\n",
        "the second run's log holds its own output only"
    );
    agent.node.shutdown().await;
}

/// The supervisor of a run `agent` made and ended, once it waits for
/// another run.
async fn an_idle_supervisor(agent: &Agent) -> i32 {
    agent
        .submit_sh("first", "echo $PPID > first.ppid", |_| {})
        .await;
    assert_eq!(agent.result("first").await.outcome, Outcome::Done);
    let supervisor = pid_in(&agent.path("first.ppid")).await;
    wait_until(
        "the supervisor waits for another run",
        Duration::from_secs(5),
        || supervisors_of(agent.dir.path()).contains(&supervisor),
    )
    .await;
    supervisor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_to_an_idle_supervisor_stops_no_later_run() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    let supervisor = an_idle_supervisor(&agent).await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(supervisor, libc::SIGTERM) };
    // Delivered (blocked, so pending) before the next launch comes.
    wait_until("the signal is pending", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{supervisor}/status")).is_ok_and(|status| {
            status.lines().any(|line| {
                line.strip_prefix("ShdPnd:")
                    .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                    .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
            })
        })
    })
    .await;
    agent
        .submit_sh(
            "second",
            "echo $ERETES_ATTEMPT >> second.attempts; echo $PPID > second.ppid; sleep 0.3; \
             echo survived",
            |_| {},
        )
        .await;
    let second = agent.result("second").await;
    assert_eq!(pid_in(&agent.path("second.ppid")).await, supervisor);
    assert_eq!(second.outcome, Outcome::Done, "{second:?}");
    assert_eq!(second.result["stdout_tail"], "survived\n");
    assert_eq!(
        read(&agent, "second.attempts"),
        "1\n",
        "the first attempt ran to its end: the signal stopped nothing"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_idle_supervisor_is_not_handed_a_run_and_is_ended() {
    // A task running as the agent's user can SIGSTOP the supervisors that
    // wait for later runs. Handed a run, a stopped one would hold it for
    // the whole start timeout and fail its first attempt.
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    let stopped = an_idle_supervisor(&agent).await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    wait_until("it is stopped", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{stopped}/stat")).is_ok_and(|stat| {
            stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                == Some("T")
        })
    })
    .await;
    agent
        .submit_sh(
            "second",
            "echo $ERETES_ATTEMPT >> second.attempts; echo $PPID > second.ppid",
            |_| {},
        )
        .await;
    let second = agent.result("second").await;
    assert_eq!(second.outcome, Outcome::Done, "{second:?}");
    assert_ne!(pid_in(&agent.path("second.ppid")).await, stopped);
    assert_eq!(
        read(&agent, "second.attempts"),
        "1\n",
        "the first attempt started: it did not wait on the stopped supervisor"
    );
    wait_until(
        "the stopped supervisor is killed and reaped",
        Duration::from_secs(10),
        || !Path::new(&format!("/proc/{stopped}")).exists(),
    )
    .await;
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_supervisors_end_with_their_agent_even_stopped() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    let stopped = an_idle_supervisor(&agent).await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let Agent { node, dir, .. } = agent;
    node.shutdown().await;
    wait_until(
        "the idle supervisors are ended and reaped",
        Duration::from_secs(10),
        || {
            !Path::new(&format!("/proc/{stopped}")).exists()
                && supervisors_of(dir.path()).is_empty()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_kept_for_later_runs_are_bounded() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    const RUNS: usize = 24;
    // All run at once, each under a supervisor of its own, then all end.
    for n in 0..RUNS {
        agent
            .submit_sh(
                &format!("t{n}"),
                &format!("echo $$ > t{n}.pid; while [ ! -e go ]; do sleep 0.05; done"),
                |_| {},
            )
            .await;
    }
    for n in 0..RUNS {
        pid_in(&agent.path(&format!("t{n}.pid"))).await;
    }
    assert!(
        supervisors_of(agent.dir.path()).len() > RUNS,
        "one per run, and one ready"
    );
    std::fs::write(agent.path("go"), "").unwrap();
    for n in 0..RUNS {
        let result = agent.result(&format!("t{n}")).await;
        assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    }
    // 16 kept at most; the rest exit as their sockets close.
    wait_until(
        "at most 16 supervisors are kept",
        Duration::from_secs(10),
        || supervisors_of(agent.dir.path()).len() <= 16,
    )
    .await;
    let kept = supervisors_of(agent.dir.path());
    assert!(
        kept.len() >= 2,
        "ended runs' supervisors are kept: {kept:?}"
    );
    // And they run later runs, with no new supervisor.
    for n in 0..8 {
        let id = format!("later-{n}");
        agent.submit_sh(&id, "echo $PPID", |_| {}).await;
        let result = agent.result(&id).await;
        let ran_under: i32 = result.result["stdout_tail"]
            .as_str()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            kept.contains(&ran_under),
            "{ran_under} is not one of {kept:?}"
        );
    }
    agent.node.shutdown().await;
}
