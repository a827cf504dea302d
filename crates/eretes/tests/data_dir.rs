//! Where an agent keeps its data when no --data-dir is given: named agents
//! on one machine each get their own directory, and a clash says which
//! flag to pass.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_agents_default_to_their_own_data_directories() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut agents = Vec::new();
    for name in ["x", "y"] {
        let port = eretes_etcd::testing::free_port();
        let child = Command::new(BIN)
            .args(["agent", "--name", name, "--lease-ttl-ms", "2000"])
            .args(["--groups", "a,b", "--max-running", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        agents.push((child, port));
    }
    for (child, port) in &mut agents {
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let mut up = false;
        for _ in 0..300 {
            assert!(child.try_wait().unwrap().is_none(), "an agent exited");
            if http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "the agent on {port} became ready");
    }
    for name in ["x", "y"] {
        assert!(dir
            .path()
            .join(format!("eretes-data-{name}/store.redb"))
            .exists());
    }
    // A third agent named like the first clashes, and says what to do.
    let clash = Command::new(BIN)
        .args(["agent", "--name", "x", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(clash.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&clash.stderr);
    assert!(stderr.contains("its own --data-dir"), "{stderr}");
    for (mut child, _) in agents {
        let _ = child.kill();
        let _ = child.wait();
    }
}
