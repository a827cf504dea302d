//! A task's output as its supervisor keeps it, under conditions that are
//! not the easy case: a disk that refuses every write, and a task that
//! writes without pause while it is stopped. Real processes, real files,
//! bounded waits.

use std::time::Duration;

use eretes_exec::AllowList;
use eretes_protocol::{Outcome, TaskId};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_for_the_logs_does_not_stop_the_task_and_its_tail_is_kept() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // Both logs of task `full` are /dev/full: every write fails with ENOSPC.
    let logs = agent.path("logs/full");
    std::fs::create_dir_all(&logs).unwrap();
    for name in ["stdout.log", "stderr.log"] {
        std::os::unix::fs::symlink("/dev/full", logs.join(name)).unwrap();
    }
    agent
        .submit_sh(
            "full",
            "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo END; echo oops >&2",
            |_| {},
        )
        .await;
    let result = agent.result("full").await;
    assert_eq!(result.outcome, Outcome::Done, "{result:?}");
    assert!(
        result.result["stdout_tail"]
            .as_str()
            .unwrap()
            .ends_with("line 1999\nEND\n"),
        "{result:?}"
    );
    assert_eq!(result.result["stderr_tail"], "oops\n");
    // The agent goes on: the next task (with writable logs) runs as usual.
    agent.submit_sh("next", "echo fine", |_| {}).await;
    let next = agent.result("next").await;
    assert_eq!(next.outcome, Outcome::Done);
    assert_eq!(
        std::fs::read_to_string(agent.path("logs/next/stdout.log")).unwrap(),
        "fine\n"
    );
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_floods_its_output_is_stopped_on_time_and_its_log_stays_capped() {
    let cap = 1 << 20;
    let agent = Agent::start(AllowList::Any, |config| config.log_cap = cap).await;
    // `yes` writes as fast as the pipe takes it, for ever.
    agent
        .submit_sh("flood", "echo $$ > leader.pid; exec yes flooding", |_| {})
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    let log = agent.path("logs/flood/stdout.log");
    // Several rotations' worth of output go through the supervisor.
    wait_until("the log rotates", Duration::from_secs(20), || {
        agent.path("logs/flood/stdout.log.1").exists()
    })
    .await;
    agent
        .coordinator
        .delete(&TaskId::new("flood").unwrap())
        .await
        .unwrap();
    // Stopping it is an order on the supervisor's socket, read between
    // reads of the flood: `yes` gets SIGTERM and dies of it.
    wait_until(
        "the flooding task is stopped",
        Duration::from_secs(10),
        || !alive(leader),
    )
    .await;
    for path in [log.clone(), agent.path("logs/flood/stdout.log.1")] {
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= cap, "{} holds {size} bytes", path.display());
    }
    agent.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_writes_hang_does_not_keep_a_flooding_task_from_being_stopped() {
    let agent = Agent::start(AllowList::Any, |_| {}).await;
    // The task makes its own stdout log a FIFO nobody reads: opening it for
    // writing hangs, as a write to a frozen filesystem would. Then it
    // floods its output, which fills the supervisor's queue to the writer.
    agent
        .submit_sh(
            "stuck",
            "mkdir -p logs/stuck && mkfifo logs/stuck/stdout.log && \
             echo $$ > leader.pid && exec yes flooding",
            |_| {},
        )
        .await;
    let leader = pid_in(&agent.path("leader.pid")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let supervisor = parent_of(leader);
    assert!(alive(leader), "the task runs (blocked on its full pipe)");
    agent
        .coordinator
        .delete(&TaskId::new("stuck").unwrap())
        .await
        .unwrap();
    // The supervisor's loop never waits on the log: the stop goes through.
    wait_until(
        "the task and its supervisor are gone",
        Duration::from_secs(10),
        || !alive(leader) && !alive(supervisor),
    )
    .await;
    agent.node.shutdown().await;
}
