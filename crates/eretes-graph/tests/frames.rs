//! Master/worker frames: the star example runs every epoch through a kill
//! of the master's node and of a worker's node.

use std::sync::Arc;
use std::time::Duration;

use eretes_graph::driver::{Fleet, InProcess};
use eretes_graph::frames::example;
use eretes_graph::{graph_task_id, JobKind, JobName, JobSpec, Jobs};
use eretes_protocol::{Coordinator, GroupName, Namespace};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_star_checks_every_epoch_through_kills_of_master_and_worker() {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("star-test").unwrap();
    let kinds = [(
        "star".to_string(),
        Arc::new(example::kind()) as Arc<dyn JobKind>,
    )]
    .into();
    let mut nodes = InProcess::with_kinds(store.clone(), ns.clone(), Duration::from_secs(1), kinds);
    for _ in 0..3 {
        nodes.start_node().await.unwrap();
    }
    let coordinator = Coordinator::new(store, ns);
    let jobs = Jobs::new(coordinator.clone());
    let job = JobName::new("sum").unwrap();
    let spec = JobSpec {
        kind: "star".into(),
        tasks: 6,
        group: GroupName::new("graph").unwrap(),
        properties: json!({ "epochs": 30 }),
        backups: 0,
    };
    jobs.start(&job, &spec).await.unwrap();
    let (master, worker) = (graph_task_id(&job, 0), graph_task_id(&job, 3));
    let mut kills = Vec::new();
    let mut result = None;
    // Polled often: a job epoch takes milliseconds when nothing fails.
    for _ in 0..6000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if let Some(done) = coordinator.result(&master).await.unwrap() {
            result = Some(done.result);
            break;
        }
        let epoch = jobs
            .epoch(&job)
            .await
            .unwrap()
            .map_or(0, |record| record.epoch.0);
        let target = match (epoch, kills.len()) {
            (1.., 0) => &master,
            (3.., 1) => &worker,
            _ => continue,
        };
        let owner = coordinator
            .task_view(target)
            .await
            .unwrap()
            .and_then(|view| view.node);
        if let Some(owner) = owner.filter(|owner| nodes.live().contains(owner)) {
            nodes.kill(&owner).await.unwrap();
            nodes.start_node().await.unwrap();
            kills.push((epoch, owner));
        }
    }
    nodes.stop().await;
    assert_eq!(kills.len(), 2, "{kills:?}");
    assert_eq!(
        result,
        Some(json!({ "checked": (0..30).collect::<Vec<u64>>() })),
        "every epoch's sum checked once, through the kills {kills:?}"
    );
}
