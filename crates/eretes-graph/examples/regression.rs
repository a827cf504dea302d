//! taskgraph's regression as a program of its own: four nodes in this
//! process on the embedded store, a node killed at job epoch 1, every
//! epoch's sum checked. `cargo run -p eretes-graph --example regression`.
//! (`eretes graph regression` is the same with every option, on etcd too.)

use std::time::Duration;

use eretes_graph::driver::{run_regression, RegressionOptions};
use eretes_protocol::Namespace;
use eretes_store::embedded::EmbeddedStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = RegressionOptions {
        tasks: 15,
        epochs: 10,
        nodes: 4,
        kill_at_epoch: Some(1),
        lease_ttl: Duration::from_secs(1),
        ..RegressionOptions::default()
    };
    let report = run_regression(EmbeddedStore::new(), Namespace::new("example")?, options).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.passed() {
        return Err("an epoch's sum was wrong or never checked".into());
    }
    Ok(())
}
