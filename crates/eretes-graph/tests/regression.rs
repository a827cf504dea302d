//! taskgraph's regression on in-process nodes with real gRPC between them:
//! every epoch's root sum is right, with and without nodes killed.

use std::sync::Arc;
use std::time::Duration;

use eretes_graph::driver::{run_regression, RegressionOptions, RegressionReport};
use eretes_protocol::Namespace;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{DeleteRequest, KeyRange, Store};

async fn regression(options: RegressionOptions) -> RegressionReport {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    regression_on(store, "graph-test", options).await
}

async fn regression_on(
    store: Arc<dyn Store>,
    ns: &str,
    options: RegressionOptions,
) -> RegressionReport {
    let ns = Namespace::new(ns).unwrap();
    let report = run_regression(store.clone(), ns.clone(), options).await;
    store
        .delete(DeleteRequest::new(KeyRange::prefix(ns.root())))
        .await
        .unwrap();
    let report = report.unwrap();
    println!("{}", serde_json::to_string(&report).unwrap());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_tasks_ten_epochs_every_sum_right() {
    let report = regression(RegressionOptions::default()).await;
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.epochs_verified, 10);
    assert_eq!(report.kills, 0);
    // 14 children × 10 epochs: one meta and one data request each.
    assert_eq!(report.meta_delivered, 140, "{report:?}");
    assert!(report.data_requests >= 140, "{report:?}");
    assert!(
        report.connections <= 4 * 4,
        "one connection per pair at most: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_roots_node_at_epoch_one_loses_nothing() {
    let report = regression(RegressionOptions {
        kill_at_epoch: Some(1),
        ..RegressionOptions::default()
    })
    .await;
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.kills, 1);
    assert!(report.failovers >= 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_percent_kills_per_epoch_at_127_tasks() {
    let report = regression(RegressionOptions {
        tasks: 127,
        kill_rate: 0.03,
        timeout: Duration::from_secs(120),
        ..RegressionOptions::default()
    })
    .await;
    assert!(report.passed(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_with_kills_at_epoch_one_and_at_random() {
    let store = eretes_etcd::testing::connect_test_etcd().await;
    let ns = format!("graph-etcd-{:08x}", rand::random::<u32>());
    let report = regression_on(
        store.clone(),
        &ns,
        RegressionOptions {
            kill_at_epoch: Some(1),
            ..RegressionOptions::default()
        },
    )
    .await;
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.kills, 1);
    let report = regression_on(
        store,
        &format!("{ns}-127"),
        RegressionOptions {
            tasks: 127,
            kill_rate: 0.03,
            timeout: Duration::from_secs(120),
            ..RegressionOptions::default()
        },
    )
    .await;
    assert!(report.passed(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_backup_per_task_the_roots_backup_takes_over() {
    // Killed at epoch 100 of 150: epochs take a few milliseconds, and the
    // backups should all be up by then.
    let report = regression(RegressionOptions {
        epochs: 150,
        kill_at_epoch: Some(100),
        backups: 1,
        ..RegressionOptions::default()
    })
    .await;
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.kills, 1);
    // The killed node ran the root at least, and each of its tasks had a
    // backup elsewhere (four nodes, one backup each).
    assert!(report.primary_takeovers >= 1, "{report:?}");
    assert_eq!(report.cold_restarts_of_backed_tasks, 0, "{report:?}");
    assert!(report.primary_takeover_ms.is_some(), "{report:?}");
}
