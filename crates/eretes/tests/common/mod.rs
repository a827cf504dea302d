//! What the agent's end-to-end tests share: a real `eretes agent` process
//! and bounded waits.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_eretes");

/// A running `eretes agent`; SIGKILLed when dropped.
pub struct Agent {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Agent {
    /// Start an agent on `data_dir` with `extra` arguments; wait until ready.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_with(data_dir, extra, Command::new(BIN)).await
    }

    /// The same, run by `command` (`BIN`, or a wrapper that runs `BIN`, with
    /// its environment set).
    pub async fn start_with(data_dir: &Path, extra: &[&str], mut command: Command) -> Agent {
        let port = eretes_etcd::testing::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .unwrap();
        // The helper's defaults, unless the test gives its own.
        let mut args: Vec<&str> = Vec::new();
        for (flag, value) in [
            ("--name", "a1"),
            ("--stop-grace-ms", "500"),
            ("--lease-ttl-ms", "2000"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        let child = command
            .arg("agent")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut agent = Agent {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
        };
        agent.wait_ready().await;
        agent
    }

    pub async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited with {status}: {}", self.log());
            }
            if let Ok(response) = http.get(format!("{}/readyz", self.url)).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agent was not ready within 30 s: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Run the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("ERETES_AGENT", &self.url)
            .env_remove("ERETES_TOKEN")
            .output()
            .unwrap()
    }

    /// Run the CLI and expect success; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "eretes {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next()
            != Some("Z")
    })
}

pub async fn pid_in(file: &Path) -> i32 {
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(file) {
            if text.ends_with('\n') {
                return text.trim().parse().unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} was not written within 30 s", file.display());
}

pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after 30 s waiting until {what}");
}

/// Remove everything under namespace `ns` from the test etcd.
pub async fn remove_namespace(ns: &str) {
    let store = eretes_etcd::testing::connect_test_etcd().await;
    store
        .delete(eretes_store::DeleteRequest::new(
            eretes_store::KeyRange::prefix(format!("{ns}/")),
        ))
        .await
        .unwrap();
}

/// Start `eretes agent` on `data_dir` with `args` (no token in its
/// environment) and expect it to refuse to start: exit 1, nothing served.
/// Its stderr, which says why.
pub fn agent_refuses(data_dir: &Path, args: &[&str]) -> String {
    let output = Command::new(BIN)
        .arg("agent")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("ERETES_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `/metrics` parsed by a real Prometheus text parser (Python's
/// prometheus_client, which `scripts/test.sh` installs as Debian's
/// python3-prometheus-client): every sample, as `[name, labels, value]`.
pub fn parse_prometheus(text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    const PARSER: &str = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's python3 (scripts/test.sh installs python3-prometheus-client)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&output.stdout).unwrap();
    samples
}

/// The parsed `show ID --json` of a task.
pub fn view(agent: &Agent, id: &str) -> Value {
    serde_json::from_str(&agent.ok(&["show", id, "--json"])).unwrap()
}

/// The state `ls --json` gives task `id`.
pub fn listed_state(agent: &Agent, id: &str) -> Value {
    let listed: Value = serde_json::from_str(&agent.ok(&["ls", "--json"])).unwrap();
    listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|task| task["id"] == id)
        .map(|task| task["state"].clone())
        .unwrap_or(Value::Null)
}
