//! Master/worker frames: the star example on three nodes of this process,
//! the master's node killed once the job is under way.
//! `cargo run -p eretes-graph --example star`.

use std::sync::Arc;
use std::time::Duration;

use eretes_graph::driver::{Fleet, InProcess};
use eretes_graph::frames::example;
use eretes_graph::{graph_task_id, JobKind, JobName, JobSpec, Jobs};
use eretes_protocol::{Coordinator, GroupName, Namespace};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("star")?;
    let kinds = [(
        "star".to_string(),
        Arc::new(example::kind()) as Arc<dyn JobKind>,
    )]
    .into();
    let mut nodes = InProcess::with_kinds(store.clone(), ns.clone(), Duration::from_secs(1), kinds);
    for _ in 0..3 {
        nodes.start_node().await?;
    }
    let coordinator = Coordinator::new(store, ns);
    let jobs = Jobs::new(coordinator.clone());
    let job = JobName::new("sum")?;
    let spec = JobSpec {
        kind: "star".into(),
        tasks: 6,
        group: GroupName::new("graph")?,
        properties: json!({ "epochs": 5 }),
        backups: 0,
    };
    jobs.start(&job, &spec).await?;
    let master = graph_task_id(&job, 0);
    let mut killed = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(result) = coordinator.result(&master).await? {
            println!("the master's result: {}", result.result);
            nodes.stop().await;
            return Ok(());
        }
        let epoch = jobs.epoch(&job).await?.map_or(0, |record| record.epoch.0);
        if epoch >= 1 && !killed {
            if let Some(owner) = coordinator
                .task_view(&master)
                .await?
                .and_then(|view| view.node)
            {
                println!("killing {owner}, which runs the master, at job epoch {epoch}");
                nodes.kill(&owner).await?;
                nodes.start_node().await?;
                killed = true;
            }
        }
    }
    Err("the job did not end within 30 s".into())
}
