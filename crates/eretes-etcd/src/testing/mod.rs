//! Real etcd servers for tests and `eretes chaos`: the shared one that
//! `scripts/test.sh` starts (found through [`TEST_ETCD_ENV`]), private ones
//! a test starts, stops and restarts itself ([`LocalEtcd`]) when it needs to
//! take etcd down or configure it (TLS with client certificates, extra flags
//! such as auth settings), clusters of several members ([`EtcdCluster`]),
//! and a TCP [`Relay`] that cuts one client's link to one member.
//!
//! Tests that need etcd fail loudly when it is missing; they never skip.
//!
//! This module is part of the normal build (other crates' tests use it), so
//! it takes certificates as PEM bytes and never makes them: the certificate
//! generator (`rcgen`) is a dev-dependency, used by `tests/common` of this
//! crate, and stays out of every non-test build without a cargo feature.

mod cluster;
mod relay;

pub use cluster::EtcdCluster;
pub use relay::Relay;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eretes_store::{Store, StoreError};

use crate::{EtcdOptions, EtcdStore, EtcdTls};

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

/// How long [`LocalEtcd`] waits for a fresh or restarted server to answer.
/// Generous: several tests start their own servers at once on a small
/// machine, and a TLS handshake adds to every attempt.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// TLS for a [`LocalEtcd`]'s client port, as PEM bytes.
#[derive(Clone)]
pub struct LocalEtcdTls {
    /// etcd's server certificate; it must name `127.0.0.1` (an IP subject
    /// alternative name), the address clients dial.
    pub server_cert_pem: Vec<u8>,
    /// The server certificate's private key.
    pub server_key_pem: Vec<u8>,
    /// The CA etcd trusts for client certificates. etcd runs with
    /// `--client-cert-auth`, so a client without a certificate signed by it
    /// is refused during the handshake.
    pub client_ca_pem: Vec<u8>,
    /// How a trusted client connects (the CA of the server certificate and a
    /// client certificate); [`LocalEtcd`] uses it to see when etcd answers,
    /// and [`LocalEtcd::client_options`] hands it to tests.
    pub client: EtcdTls,
}

impl std::fmt::Debug for LocalEtcdTls {
    // Never print key material, like `EtcdTls`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEtcdTls")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// How a [`LocalEtcd`] is run; the default is plain HTTP with no extra flags.
#[derive(Clone, Debug, Default)]
pub struct LocalEtcdConfig {
    /// Serve clients over `https://` with a client certificate required.
    pub tls: Option<LocalEtcdTls>,
    /// More command-line flags for etcd (for example `--auth-token-ttl=1`).
    pub extra_args: Vec<String>,
}

/// An etcd server of a test's own, in a temporary directory, on loopback.
/// Stopped (and its directory removed) when dropped.
pub struct LocalEtcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    config: LocalEtcdConfig,
    child: Option<Child>,
}

impl LocalEtcd {
    /// Start a fresh plain-HTTP server and wait until it answers.
    pub async fn start() -> LocalEtcd {
        LocalEtcd::start_with(LocalEtcdConfig::default()).await
    }

    /// Start a fresh server configured by `config` and wait until it answers.
    /// With TLS, the server's certificate, key and client CA are written to
    /// the server's temporary directory, where etcd reads them.
    pub async fn start_with(config: LocalEtcdConfig) -> LocalEtcd {
        let mut etcd = LocalEtcd {
            dir: tempfile::Builder::new()
                .prefix("eretes-etcd-")
                .tempdir()
                .expect("create a temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            config,
            child: None,
        };
        if let Some(tls) = &etcd.config.tls {
            let dir = etcd.tls_dir();
            std::fs::create_dir_all(&dir).expect("create the TLS directory");
            for (name, pem) in [
                ("server.pem", &tls.server_cert_pem),
                ("server-key.pem", &tls.server_key_pem),
                ("client-ca.pem", &tls.client_ca_pem),
            ] {
                std::fs::write(dir.join(name), pem).expect("write a TLS file for etcd");
            }
        }
        etcd.resume().await;
        etcd
    }

    /// The client URL: `https://` when the server runs with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Options that reach this server as a trusted client: its URL, and with
    /// TLS the client settings of [`LocalEtcdTls::client`]. No credentials.
    pub fn client_options(&self) -> EtcdOptions {
        let options = EtcdOptions::from_urls(&self.url()).expect("a valid loopback URL");
        match &self.config.tls {
            Some(tls) => options.with_tls(tls.client.clone()),
            None => options,
        }
    }

    /// etcd's log so far (warnings and errors), for a failing test's message.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("etcd.log"))
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
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
        // Peers always talk plain HTTP: there is one member, and the tests
        // are about the client port.
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .args(["--name", "eretes-local"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("eretes-local={peer}")])
            .args(["--log-level", "warn"]);
        if self.config.tls.is_some() {
            let dir = self.tls_dir();
            command
                .arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(dir.join("client-ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command
            .args(&self.config.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}); scripts/test.sh installs Debian's etcd-server")
            });
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Wait until etcd answers a read, for at most [`READY_TIMEOUT`]. Each
    /// attempt is bounded by its own short timeout, and the loop by a
    /// deadline, so a server that never comes up fails the test in bounded
    /// time; one that exits (a bad flag or certificate) fails it at once.
    async fn wait_ready(&mut self) {
        let options = self
            .client_options()
            .with_request_timeout(Duration::from_millis(500));
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no attempt finished");
        while Instant::now() < deadline {
            match EtcdStore::connect(options.clone()).await {
                // Refusing an anonymous read (auth enabled) is an answer too.
                Ok(_) | Err(StoreError::Denied(_)) => return,
                Err(e) => last = e.to_string(),
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "etcd at {} exited ({status}) before answering; its log:\n{}",
                        self.url(),
                        self.log()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd did not answer at {} within {READY_TIMEOUT:?} (last error: {last}); its log:\n{}",
            self.url(),
            self.log()
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
