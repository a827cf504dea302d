//! A real etcd cluster of several members on loopback, in a temporary
//! directory: what `eretes chaos` runs against, and what a test uses when it
//! needs to lose a member or the leader.
//!
//! Each member is Debian's `etcd` binary with a data directory of its own.
//! A member can be killed (SIGKILL: nothing flushed beyond the WAL's
//! fsyncs, as in a crash) and restarted on the same ports and data
//! directory, where it rejoins the cluster as itself.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client as etcd;

use super::free_port;

/// How long a started or restarted cluster has to answer.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One member's fixed settings.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A cluster of `etcd` processes on loopback; every member is killed and
/// the directory removed when it is dropped.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Start `size` members (1 to 7) and wait until the cluster has a
    /// leader. Fails when `etcd` is missing or does not come up in time.
    pub async fn start(size: usize) -> Result<EtcdCluster, String> {
        if !(1..=7).contains(&size) {
            return Err(format!("an etcd cluster has 1 to 7 members, not {size}"));
        }
        let dir = tempfile::Builder::new()
            .prefix("eretes-etcd-cluster-")
            .tempdir()
            .map_err(|e| format!("cannot create a directory for etcd: {e}"))?;
        let members = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(),
                peer_port: free_port(),
                process: None,
            })
            .collect();
        let mut cluster = EtcdCluster { dir, members };
        for index in 0..size {
            cluster.spawn(index)?;
        }
        cluster.wait_for_leader().await?;
        Ok(cluster)
    }

    /// How many members it has (running or not).
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL, in member order.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The members' client URLs joined with commas, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.client_urls().join(",")
    }

    /// Whether member `index` runs.
    pub fn is_running(&mut self, index: usize) -> bool {
        let Some(member) = self.members.get_mut(index) else {
            return false;
        };
        match member.process.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                member.process = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL member `index` (a no-op when it is not running).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members.get_mut(index).and_then(|m| m.process.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `index` again on its data directory, where it rejoins
    /// as itself. It does not wait: a member alone cannot answer without a
    /// quorum, and the caller decides how long the cluster may take.
    pub fn restart(&mut self, index: usize) -> Result<(), String> {
        if index >= self.members.len() {
            return Err(format!("there is no etcd member {index}"));
        }
        if self.is_running(index) {
            return Ok(());
        }
        self.spawn(index)
    }

    /// The index of the member the running members name as their leader,
    /// if one answers within a second.
    pub async fn leader(&self) -> Option<usize> {
        let mut statuses = Vec::with_capacity(self.members.len());
        for member in &self.members {
            statuses.push(member_status(&member.client_url()).await);
        }
        let leader = statuses
            .iter()
            .flatten()
            .map(|&(_, leader)| leader)
            .find(|&leader| leader != 0)?;
        statuses
            .iter()
            .position(|status| status.is_some_and(|(id, _)| id == leader))
    }

    /// Wait until some member names a leader, for at most 30 s.
    pub async fn wait_for_leader(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if self.leader().await.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "the etcd cluster at {} elected no leader within {READY_WITHIN:?}; see the logs in {}",
            self.endpoints(),
            self.dir.path().display()
        ))
    }

    fn data_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(&self.members[index].name)
    }

    fn spawn(&mut self, index: usize) -> Result<(), String> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let log_path = self
            .dir
            .path()
            .join(format!("{}.log", self.members[index].name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let data_dir = self.data_dir(index);
        let member = &mut self.members[index];
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &member.client_url()])
            .args(["--advertise-client-urls", &member.client_url()])
            .args(["--listen-peer-urls", &member.peer_url()])
            .args(["--initial-advertise-peer-urls", &member.peer_url()])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "eretes-chaos"])
            // Elections within a second of a leader's death, as a
            // loopback cluster can afford.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start etcd ({e}); scripts/test.sh installs Debian's etcd-server")
            })?;
        member.process = Some(child);
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

/// A member's own id and the leader it names, asked with a 1 s timeout.
async fn member_status(url: &str) -> Option<(u64, u64)> {
    let options = etcd::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(1));
    let ask = async {
        let mut client = etcd::Client::connect([url], Some(options)).await.ok()?;
        let status = client.status().await.ok()?;
        Some((status.header()?.member_id(), status.leader()))
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}
