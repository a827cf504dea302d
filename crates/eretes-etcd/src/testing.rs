//! Real etcd servers for tests: the shared one that `scripts/test.sh` starts
//! (found through [`TEST_ETCD_ENV`]), and private ones a test starts, stops
//! and restarts itself ([`LocalEtcd`]) when it needs to take etcd down.
//!
//! Tests that need etcd fail loudly when it is missing; they never skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eretes_store::Store;

use crate::{EtcdOptions, EtcdStore};

/// The environment variable holding the shared test etcd's URL.
pub const TEST_ETCD_ENV: &str = "ERETES_TEST_ETCD";

/// The shared test etcd's URL. Panics with instructions when it is not set.
pub fn test_etcd_url() -> String {
    match std::env::var(TEST_ETCD_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{TEST_ETCD_ENV} is not set, but this test needs a real etcd. Run the tests with \
             `bash scripts/test.sh`, which installs etcd-server and starts it on a loopback \
             port, or set {TEST_ETCD_ENV}=http://127.0.0.1:PORT yourself."
        ),
    }
}

/// A store on the shared test etcd. Panics if it is unreachable.
pub async fn connect_test_etcd() -> Arc<dyn Store> {
    let url = test_etcd_url();
    let options = EtcdOptions::from_urls(&url).expect("valid ERETES_TEST_ETCD");
    match EtcdStore::connect(options).await {
        Ok(store) => Arc::new(store),
        Err(e) => panic!("the test etcd at {url} is unreachable: {e}"),
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// An etcd server of a test's own, in a temporary directory, on loopback.
/// Stopped (and its directory removed) when dropped.
pub struct LocalEtcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl LocalEtcd {
    /// Start a fresh server and wait until it answers.
    pub async fn start() -> LocalEtcd {
        let mut etcd = LocalEtcd {
            dir: tempfile::Builder::new()
                .prefix("eretes-etcd-")
                .tempdir()
                .expect("create a temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.resume().await;
        etcd
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory (kept across [`LocalEtcd::stop`] and
    /// [`LocalEtcd::resume`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Kill the server (SIGKILL: nothing is flushed beyond what etcd's WAL
    /// already fsynced, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same ports and data directory, and wait
    /// until it answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("open etcd's log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "eretes-local"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("eretes-local={peer}")])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}); scripts/test.sh installs Debian's etcd-server")
            });
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let options = EtcdOptions::from_urls(&self.url())
            .expect("valid URL")
            .with_request_timeout(Duration::from_millis(500));
        for _ in 0..100 {
            if EtcdStore::connect(options.clone()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd did not answer at {} within 10 s; its log:\n{}",
            self.url(),
            read_log(&self.dir.path().join("etcd.log"))
        );
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"))
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}
