//! What the process executor's integration tests share: a node running
//! process tasks in a temporary data directory on the embedded store, and
//! bounded waits on real processes.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eretes_exec::{AllowList, ExecConfig, ProcessHandler, ProcessSpec, SupervisorProgram};
use eretes_protocol::{
    Coordinator, GroupName, Namespace, NodeName, ResultRecord, TaskId, TaskSpec,
};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::{Node, NodeConfig, NodeHandle, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;

/// One node running process tasks in a temporary data directory.
pub struct Agent {
    pub coordinator: Coordinator,
    pub node: NodeHandle,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &Path, allow: AllowList) -> ExecConfig {
    let mut config = ExecConfig::new(dir.to_path_buf(), allow);
    config.supervisor = SupervisorProgram::binary(env!("CARGO_BIN_EXE_eretes-supervisor"));
    config.stop_grace = Duration::from_millis(500);
    config.retry_backoff = (Duration::from_millis(50), Duration::from_millis(200));
    config
}

impl Agent {
    pub async fn start(allow: AllowList, tune: impl FnOnce(&mut ExecConfig)) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut exec = config(dir.path(), allow);
        tune(&mut exec);
        let (coordinator, node) = start_node(exec).await;
        Agent {
            coordinator,
            node,
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Submit `sh -c script` (run in the data directory) as task `id`.
    pub async fn submit_sh(&self, id: &str, script: &str, tune: impl FnOnce(&mut ProcessSpec)) {
        let mut spec = ProcessSpec::new("sh", vec!["-c".into(), script.into()]);
        spec.cwd = Some(self.dir.path().to_path_buf());
        tune(&mut spec);
        self.submit(id, spec.to_properties()).await;
    }

    pub async fn submit(&self, id: &str, properties: serde_json::Value) {
        self.coordinator
            .submit(
                &TaskId::new(id).unwrap(),
                &TaskSpec::new(GroupName::default(), properties),
            )
            .await
            .unwrap();
    }

    /// The task's result, waiting for it up to 20 s.
    pub async fn result(&self, id: &str) -> ResultRecord {
        let id = TaskId::new(id).unwrap();
        for _ in 0..400 {
            if let Some(result) = self.coordinator.result(&id).await.unwrap() {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no result for {id} within 20 s");
    }
}

pub async fn start_node(exec: ExecConfig) -> (Coordinator, NodeHandle) {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("exec").unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let handler = Arc::new(StateMachine::new(
        ProcessHandler::new(exec).unwrap(),
        coordinator,
    ));
    let config = NodeConfig::new(NodeName::new("n1").unwrap(), ns.clone());
    let node = Node::start(store.clone(), config, handler, Box::new(DumbBalancer))
        .await
        .unwrap();
    (Coordinator::new(store, ns), node)
}

/// Wait up to `limit` for `done`; panic naming `what` after it.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid written to `file`, once it is there.
pub async fn pid_in(file: &Path) -> i32 {
    wait_until(
        &format!("{} is written", file.display()),
        Duration::from_secs(20),
        || std::fs::read_to_string(file).is_ok_and(|text| text.ends_with('\n')),
    )
    .await;
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped, does not).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next();
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// The parent of process `pid`.
pub fn parent_of(pid: i32) -> i32 {
    parent(pid).unwrap_or_else(|| panic!("process {pid} has no parent to read"))
}

/// The parent of `pid`, if it still exists.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pid in `file` once it differs from `old`.
pub async fn new_pid(file: &Path, old: i32) -> i32 {
    for _ in 0..400 {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            if pid != old {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no new pid in {} within 20 s", file.display());
}

/// Whether no record under `groups` names a process group (a free slot
/// is blank).
pub fn no_group_recorded(groups: &Path) -> bool {
    std::fs::read_dir(groups).unwrap().flatten().all(|record| {
        std::fs::read_to_string(record.path()).is_ok_and(|text| text.trim().is_empty())
    })
}
