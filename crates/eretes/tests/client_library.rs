//! The client library against a real agent: typed views and typed errors,
//! as a program that submits and waits remotely would use them.

use std::time::Duration;

use eretes::{AgentClient, ClientError, Command, Output, Submit};
use eretes_protocol::TaskState;
use futures::TryStreamExt;

mod common;
use common::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_submits_waits_reads_and_steers_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let client = AgentClient::new(&agent.url, None).unwrap();

    let mut task = Submit::new("sh", vec!["-c".into(), "echo from the library".into()]);
    task.id = Some("lib-1".into());
    let submitted = client.submit(&task).await.unwrap();
    assert_eq!(submitted.id.as_str(), "lib-1");
    let ended = client.wait("lib-1").await.unwrap();
    assert_eq!(ended.state, TaskState::Done);
    assert_eq!(ended.result.unwrap()["exit_code"], 0);
    let chunks: Vec<_> = client
        .logs("lib-1", Output::Stdout, None, false)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let log = chunks.concat();
    assert_eq!(log, b"from the library\n");

    let mut parked = Submit::new("sleep", vec!["1000".into()]);
    parked.id = Some("lib-2".into());
    client.submit(&parked).await.unwrap();
    let queued = client
        .command("lib-2", Command::Sleep(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(queued.command, "sleep");
    assert!(queued.until_ms.is_some());
    let listed = client.list(None, None).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(client.nodes().await.unwrap().len(), 1);
    client.delete("lib-2").await.unwrap();

    // Typed errors: what was wrong, and who said so.
    let missing = client.show("nope").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    match client.submit(&task).await.unwrap_err() {
        ClientError::Refused { status, code, .. } => {
            assert_eq!((status.as_u16(), code.as_str()), (409, "already_exists"));
        }
        other => panic!("a duplicate id was {other:?}"),
    }
    assert!(matches!(
        client.show("a/b").await,
        Err(ClientError::Invalid(_))
    ));
    let port = eretes_etcd::testing::free_port();
    let nobody = AgentClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    assert!(matches!(
        nobody.show("lib-1").await,
        Err(ClientError::Unreachable { .. })
    ));
}
