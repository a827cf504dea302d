//! An agent `kill -9`'d and started again on its data directory rejoins
//! under its name at once, and its tasks run again long before its old
//! lease could have expired: the new agent revokes the lease it finds
//! recorded there (the directory's lock proves the old agent is dead).

use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::Agent;

const TTL_MS: u64 = 10_000;
const TASKS: usize = 5;

fn epochs(agent: &Agent) -> Vec<Option<i64>> {
    (0..TASKS)
        .map(|n| {
            let view: Value =
                serde_json::from_str(&agent.ok(&["show", &format!("w-{n}"), "--json"])).unwrap();
            (view["state"] == "running")
                .then(|| view["epoch"].as_i64())
                .flatten()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_rejoins_under_its_name_and_its_tasks_move_at_once() {
    let url = eretes_etcd::testing::test_etcd_url();
    let ns = format!("restart-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("w1");
    let ttl = TTL_MS.to_string();
    let args = [
        "--etcd",
        url.as_str(),
        "--namespace",
        ns.as_str(),
        "--allow",
        "sleep",
        "--name",
        "w1",
        "--lease-ttl-ms",
        ttl.as_str(),
    ];
    let mut agent = Agent::start(&data, &args).await;
    for n in 0..TASKS {
        agent.ok(&["submit", "--id", &format!("w-{n}"), "--", "sleep", "1000"]);
    }
    common::wait_until("every task runs", || {
        epochs(&agent).iter().all(Option::is_some)
    })
    .await;
    let before = epochs(&agent);

    agent.kill9();
    let killed_at = Instant::now();
    // Under systemd's restart policy the agent comes back at once; its name
    // must be free for it.
    let agent = Agent::start(&data, &args).await;
    common::wait_until("every task runs again", || {
        epochs(&agent)
            .iter()
            .zip(&before)
            .all(|(now, then)| now.is_some() && now != then)
    })
    .await;
    let moved_in = killed_at.elapsed();
    eprintln!(
        "restart failover: {} ms (lease TTL {TTL_MS} ms)",
        moved_in.as_millis()
    );
    assert!(
        moved_in < Duration::from_millis(TTL_MS),
        "the tasks waited for the old lease: {moved_in:?}"
    );
    assert!(agent
        .log()
        .contains("revoked the lease of this data directory's previous agent"));
    drop(agent);
    common::remove_namespace(&ns).await;
}
