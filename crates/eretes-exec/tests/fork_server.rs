//! Supervisors come from the agent's fork server, as the agent's own
//! children; a fork server that dies is replaced, and a supervisor program
//! that has none is exec'd for every run. Real processes, bounded waits.

use std::time::Duration;

use eretes_exec::{supervisor::FORK_SERVER_ARG, AllowList, SupervisorProgram};
use eretes_protocol::Outcome;

mod common;

use common::*;

const SUPERVISOR: &str = env!("CARGO_BIN_EXE_eretes-supervisor");

/// Running children of this process (the agent is this test process) that
/// are `eretes-supervisor --fork-server`.
fn fork_servers() -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid) && parent(pid) == Some(me) && is_fork_server(pid))
        .collect()
}

/// Whether `pid`'s command line is the supervisor binary's with the fork
/// server's flag.
fn is_fork_server(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
        let args: Vec<&[u8]> = line.split(|&byte| byte == 0).collect();
        args.first() == Some(&SUPERVISOR.as_bytes()) && args.contains(&FORK_SERVER_ARG.as_bytes())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_are_the_agents_children_and_a_killed_fork_server_is_replaced() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    agent
        .submit_sh("long", "echo $$ > long.pid; exec sleep 1000", |_| {})
        .await;
    let leader = pid_in(&agent.path("long.pid")).await;
    let supervisor = parent_of(leader);
    assert_eq!(
        parent_of(supervisor),
        std::process::id() as i32,
        "the supervisor's parent is the agent, not the fork server"
    );
    assert!(
        !is_fork_server(supervisor),
        "a supervisor does not show as the fork server"
    );
    let servers = fork_servers();
    assert_eq!(servers.len(), 1, "one fork server: {servers:?}");
    let first = servers[0];
    assert_ne!(first, supervisor);

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_until("the fork server is gone", Duration::from_secs(5), || {
        !alive(first)
    })
    .await;
    // What it made lives on: the running task is untouched.
    assert!(alive(supervisor) && alive(leader));

    // Later runs still start: the one kept ready, then one exec'd while
    // the dead fork server is found out, then a new fork server's (each
    // of these runs holds its supervisor: none comes back for another).
    let mut leaders = Vec::new();
    for n in 0..4 {
        let id = format!("after-{n}");
        agent
            .submit_sh(&id, &format!("echo $$ > {id}.pid; exec sleep 1000"), |_| {})
            .await;
        leaders.push(pid_in(&agent.path(&format!("{id}.pid"))).await);
    }
    let servers = fork_servers();
    assert_eq!(servers.len(), 1, "a new fork server: {servers:?}");
    assert_ne!(servers[0], first);
    assert!(alive(leader), "the first task still runs");
    agent.submit_sh("short", "echo fine", |_| {}).await;
    let result = agent.result("short").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert_eq!(result.result["stdout_tail"], "fine\n");
    agent.node.shutdown().await;
    wait_until("the task's tree is gone", Duration::from_secs(10), || {
        !alive(leader) && !alive(supervisor) && leaders.iter().all(|&pid| !alive(pid))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_program_without_a_fork_server_is_execd_instead() {
    // A wrapper that fails as a fork server and execs the real supervisor
    // otherwise.
    let script =
        format!("if [ \"$1\" = {FORK_SERVER_ARG} ]; then exit 3; fi; exec {SUPERVISOR} \"$@\"");
    let agent = Agent::start(AllowList::Any, |config| {
        config.supervisor = SupervisorProgram {
            program: "sh".into(),
            args: vec!["-c".into(), script.into(), "supervisor".into()],
        };
    })
    .await;
    for n in 0..5 {
        let id = format!("plain-{n}");
        agent.submit_sh(&id, "echo ran", |_| {}).await;
        let result = agent.result(&id).await;
        assert_eq!(result.outcome, Outcome::Done, "{result:?}");
        assert_eq!(result.result["stdout_tail"], "ran\n");
    }
    agent.node.shutdown().await;
}
