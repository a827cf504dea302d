//! The regression's nodes as processes of their own (`--processes`): each an
//! `eretes graph node` on etcd, killed with SIGKILL, its counters read from
//! the file it keeps writing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::driver::{Fleet, GraphCounters, NodeReport};
use eretes_graph::GraphError;
use eretes_graph::RunStart;
use eretes_protocol::NodeName;
use tokio::process::{Child, Command};

/// Node processes of one regression run.
pub struct ProcessFleet {
    namespace: String,
    etcd: String,
    lease_ttl: Duration,
    /// Counter files and logs, removed with the fleet.
    dir: PathBuf,
    live: Vec<(NodeName, Child)>,
    started: usize,
}

impl ProcessFleet {
    /// No processes yet; they will join namespace `namespace` on the etcd at
    /// `etcd`.
    pub fn new(namespace: &str, etcd: &str, lease_ttl: Duration) -> std::io::Result<ProcessFleet> {
        Ok(ProcessFleet {
            namespace: namespace.to_string(),
            etcd: etcd.to_string(),
            lease_ttl,
            dir: {
                let dir = std::env::temp_dir()
                    .join(format!("eretes-graph-{:08x}", rand::random::<u32>()));
                std::fs::create_dir_all(&dir)?;
                dir
            },
            live: Vec::new(),
            started: 0,
        })
    }

    fn stats_file(&self, name: &NodeName) -> PathBuf {
        self.dir.as_path().join(format!("{name}.json"))
    }

    /// What each node process wrote last (the files of killed ones stay).
    fn reports(&self) -> Vec<NodeReport> {
        let Ok(entries) = std::fs::read_dir(self.dir.as_path()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<NodeReport>(&bytes).ok())
            .collect()
    }
}

impl Drop for ProcessFleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[async_trait]
impl Fleet for ProcessFleet {
    async fn start_node(&mut self) -> Result<NodeName, GraphError> {
        self.started += 1;
        let name = NodeName::new(format!("graph-{}", self.started))?;
        let failed =
            |error: std::io::Error| GraphError::Transport(format!("starting {name}: {error}"));
        let log = std::fs::File::create(self.dir.as_path().join(format!("{name}.log")))
            .map_err(failed)?;
        let exe = std::env::current_exe().map_err(failed)?;
        let child = Command::new(exe)
            .args([
                "graph",
                "node",
                "--namespace",
                &self.namespace,
                "--name",
                name.as_str(),
            ])
            .arg("--lease-ttl-ms")
            .arg(self.lease_ttl.as_millis().to_string())
            .arg("--stats-file")
            .arg(self.stats_file(&name))
            .args(["--etcd", &self.etcd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(failed)?;
        self.live.push((name.clone(), child));
        Ok(name)
    }

    async fn kill(&mut self, name: &NodeName) -> Result<(), GraphError> {
        if let Some(at) = self.live.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.live.remove(at);
            // SIGKILL: nothing is released, the lease runs out.
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        Ok(())
    }

    fn live(&self) -> Vec<NodeName> {
        self.live.iter().map(|(name, _)| name.clone()).collect()
    }

    fn counters(&self) -> GraphCounters {
        self.reports()
            .into_iter()
            .map(|report| report.counters)
            .fold(GraphCounters::default(), GraphCounters::plus)
    }

    fn run_starts(&self) -> Vec<RunStart> {
        self.reports()
            .into_iter()
            .flat_map(|report| report.run_starts)
            .collect()
    }

    async fn stop(&mut self) {
        for (_, child) in &self.live {
            if let Some(pid) = child.id() {
                // SAFETY: a signal to our own child, whose pid we hold.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for (_, mut child) in self.live.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}
