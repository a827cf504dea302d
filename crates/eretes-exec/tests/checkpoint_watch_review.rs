//! Review test of the inotify checkpoint watch: a checkpoint written in
//! place through a descriptor the process keeps open (no close, so no
//! CLOSE_WRITE; no rename, so no MOVED_TO) is still saved while the
//! process runs, as it was when files were polled.

use std::sync::Arc;
use std::time::Duration;

use eretes_exec::{AllowList, ExecConfig, ProcessHandler, ProcessSpec, SupervisorProgram};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, TaskId, TaskSpec, TaskState};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::{Node, NodeConfig, StateMachine};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_written_through_a_kept_open_descriptor_is_saved_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut exec = ExecConfig::new(dir.path().to_path_buf(), AllowList::Any);
    exec.supervisor = SupervisorProgram::binary(env!("CARGO_BIN_EXE_eretes-supervisor"));
    exec.stop_grace = Duration::from_millis(500);
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("exec").unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let handler = Arc::new(StateMachine::new(
        ProcessHandler::new(exec).unwrap(),
        coordinator.clone(),
    ));
    let config = NodeConfig::new(NodeName::new("n1").unwrap(), ns.clone());
    let node = Node::start(store.clone(), config, handler, Box::new(DumbBalancer))
        .await
        .unwrap();

    let script = r#"exec 3>"$ERETES_CHECKPOINT_FILE"; printf 7 >&3; exec sleep 600"#;
    let mut spec = ProcessSpec::new("sh", vec!["-c".into(), script.into()]);
    spec.cwd = Some(dir.path().to_path_buf());
    let id = TaskId::new("open").unwrap();
    coordinator
        .submit(
            &id,
            &TaskSpec::new(GroupName::default(), spec.to_properties()),
        )
        .await
        .unwrap();
    let saved = || async { coordinator.checkpoint(&id).await.unwrap() };
    for _ in 0..200 {
        if saved().await.as_deref() == Some(&b"7"[..]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        saved().await.as_deref(),
        Some(&b"7"[..]),
        "written in place (descriptor kept open): not saved within 10 s"
    );
    assert_eq!(
        coordinator.task_view(&id).await.unwrap().unwrap().state,
        TaskState::Running
    );
    node.shutdown().await;
}
