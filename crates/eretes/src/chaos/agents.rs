//! The agents of a chaos run: real `eretes agent` processes, each with a
//! data directory of its own and its own relays to the etcd members, so
//! that the nemesis can kill, freeze or cut off one agent at a time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eretes::AgentClient;
use eretes_etcd::testing::Relay;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How the agents are run.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// This binary: the agents and the witness program.
    pub binary: PathBuf,
    /// The namespace of the run.
    pub namespace: String,
    /// The agents' lease TTL.
    pub lease_ttl: Duration,
    /// Where the agents' data directories and logs go.
    pub dir: PathBuf,
}

/// One agent.
pub struct Agent {
    /// Its node name (`a0`, `a1`, …).
    pub name: String,
    /// A client of its API.
    pub client: AgentClient,
    port: u16,
    relays: Vec<Relay>,
    process: Option<Child>,
    /// Set while the nemesis holds it stopped (SIGSTOP).
    pub frozen: bool,
    /// Exits the nemesis did not cause.
    pub crashes: u32,
}

impl Agent {
    /// Start agent `index`, reaching the members at `members` through
    /// relays of its own.
    pub async fn start(
        settings: &AgentSettings,
        index: usize,
        members: &[String],
    ) -> Result<Agent> {
        let mut relays = Vec::with_capacity(members.len());
        for member in members {
            let target = member
                .trim_start_matches("http://")
                .parse()
                .with_context(|| format!("an etcd member's address {member}"))?;
            relays.push(Relay::start(target).await.context("starting a relay")?);
        }
        let port = listen_port();
        let name = format!("a{index}");
        let client = AgentClient::new(&format!("http://127.0.0.1:{port}"), None)?;
        let mut agent = Agent {
            name,
            client,
            port,
            relays,
            process: None,
            frozen: false,
            crashes: 0,
        };
        agent.spawn(settings)?;
        Ok(agent)
    }

    /// Start its process (again), on the same data directory and port.
    pub fn spawn(&mut self, settings: &AgentSettings) -> Result<()> {
        let data_dir = settings.dir.join(&self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(settings.dir.join(format!("{}.log", self.name)))?;
        let etcd = self
            .relays
            .iter()
            .map(Relay::url)
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new(&settings.binary)
            .arg("agent")
            .args(["--name", &self.name, "--namespace", &settings.namespace])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--etcd", &etcd])
            .arg("--allow")
            .arg(&settings.binary)
            .args([
                "--lease-ttl-ms",
                &settings.lease_ttl.as_millis().to_string(),
            ])
            .args(["--stop-grace-ms", "1000"])
            // Faults take tasks over without the task's fault: no task may
            // be parked as a poison task by them.
            .args(["--takeover-limit", "1000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting agent {}", self.name))?;
        self.process = Some(child);
        self.frozen = false;
        Ok(())
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref()?.id().map(|pid| pid as i32)
    }

    /// Whether its process exited by itself since the last look (an exit
    /// the nemesis did not cause): counted as a crash, and the process is
    /// gone until [`Agent::spawn`] starts it again.
    pub fn crashed(&mut self) -> bool {
        let Some(child) = self.process.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => false,
            _ => {
                self.crashes += 1;
                self.process = None;
                true
            }
        }
    }

    /// SIGKILL it (and resume it first if frozen, so it is reaped).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.start_kill();
            self.signal_pid(child.id(), libc::SIGCONT);
            let _ = child.wait().await;
        }
        self.frozen = false;
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn freeze(&mut self, stop: bool) {
        let pid = self.process.as_ref().and_then(Child::id);
        self.signal_pid(pid, if stop { libc::SIGSTOP } else { libc::SIGCONT });
        self.frozen = stop && pid.is_some();
    }

    fn signal_pid(&self, pid: Option<u32>, signal: i32) {
        if let Some(pid) = pid {
            // SAFETY: kill has no memory preconditions; the pid is our
            // unreaped child, so it cannot have been reused.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Cut (`true`) or restore (`false`) its links to every etcd member.
    pub fn partition(&self, cut: bool) {
        for relay in &self.relays {
            if cut {
                relay.cut()
            } else {
                relay.restore()
            }
        }
    }

    /// Whether it is cut off from etcd.
    pub fn partitioned(&self) -> bool {
        self.relays.iter().any(Relay::is_cut)
    }

    /// Stop it with SIGTERM (it drains), waiting up to `limit`, then kill.
    pub async fn stop(&mut self, limit: Duration) {
        self.partition(false);
        self.freeze(false);
        if let Some(mut child) = self.process.take() {
            self.signal_pid(child.id(), libc::SIGTERM);
            if tokio::time::timeout(limit, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// Wait until every agent's `/readyz` answers, for at most `limit`.
pub async fn wait_ready(agents: &mut [Agent], limit: Duration, logs: &Path) -> Result<()> {
    let deadline = Instant::now() + limit;
    for agent in agents.iter_mut() {
        let ready = format!("{}/readyz", agent.client.url());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        loop {
            if http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if agent.crashed() {
                bail!(
                    "agent {} exited at start; see {}",
                    agent.name,
                    logs.join(format!("{}.log", agent.name)).display()
                );
            }
            if Instant::now() > deadline {
                bail!("agent {} was not ready within {limit:?}", agent.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A loopback port for an agent's API that stays free while the agent is
/// down: below the kernel's ephemeral range, so that no outgoing connection
/// (another agent's, a relay's) takes it as its source port between a kill
/// and the restart on the same port. (Seen: a restarted agent refused with
/// "Address already in use", counted as a crash.)
fn listen_port() -> u16 {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const LOWEST: u16 = 10_000;
    if ephemeral_from > LOWEST {
        for _ in 0..1_000 {
            let port = LOWEST + rand::random::<u16>() % (ephemeral_from - LOWEST);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    eretes_etcd::testing::free_port()
}
