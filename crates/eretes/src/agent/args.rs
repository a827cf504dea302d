//! The options of `eretes agent`, and what they build on their own: the
//! Kubernetes executor's client, and the node's default name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use eretes_exec::ExecConfig;
use eretes_protocol::Namespace;
use tracing::info;

use super::expiry;
use crate::store_args::StoreArgs;

/// Options of `eretes agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The cluster's namespace in the store.
    #[arg(long, default_value = "eretes")]
    pub(super) namespace: String,
    /// Where the embedded store, task logs and process records live.
    /// Default: ./eretes-data, or ./eretes-data-NODE with --name NODE (so
    /// that several named agents on one machine need no more flags).
    #[arg(long, value_name = "DIR")]
    pub(super) data_dir: Option<PathBuf>,
    /// This node's name, unique among live nodes (default: the host name).
    #[arg(long, value_name = "NODE")]
    pub(super) name: Option<String>,
    /// The groups this agent serves (comma-separated).
    #[arg(
        long,
        value_name = "G,..",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub(super) groups: Vec<String>,
    /// Most tasks this agent runs at once over all its groups (default: no
    /// limit): at most one task at a time on a small machine with
    /// `--max-running 1`, whatever group it comes from.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) max_running: Option<u32>,
    /// Most tasks of each group this agent runs at once (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) slots: Option<u32>,
    /// Where the HTTP API listens. Any address but loopback needs --token.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub(super) listen: SocketAddr,
    /// Programs process tasks may run (comma-separated, exact names). Default:
    /// every program on the embedded store behind loopback, none otherwise.
    #[arg(long, value_name = "PROGRAM,..", value_delimiter = ',')]
    pub(super) allow: Option<Vec<String>>,
    /// Bearer token every API call (but the health checks) must present.
    /// Also read from ERETES_TOKEN; prefer --token-file (a command line is
    /// readable by every user of the machine).
    #[arg(long, value_name = "TOKEN")]
    pub(super) token: Option<String>,
    /// A file whose first line is the token.
    #[arg(long, value_name = "FILE")]
    pub(super) token_file: Option<PathBuf>,
    /// A second bearer token that may only read (list, show, wait, logs,
    /// nodes, metrics): for dashboards and scrapers. Also read from
    /// ERETES_READ_TOKEN. Needs a token.
    #[arg(long, value_name = "TOKEN")]
    pub(super) read_token: Option<String>,
    /// A file whose first line is the read token.
    #[arg(long, value_name = "FILE")]
    pub(super) read_token_file: Option<PathBuf>,
    /// Variables a task's spec may set when --allow restricts programs
    /// (comma-separated names; only with --allow: without an allow list a
    /// spec may set any).
    #[arg(long, value_name = "NAME,..", value_delimiter = ',')]
    pub(super) allow_env: Vec<String>,
    /// Run every task as this user (its groups and home) instead of the
    /// agent's own: the recommended setting for an agent running as root.
    #[arg(long, value_name = "USER")]
    pub(super) run_as: Option<String>,
    /// Environment variables of the agent that tasks get too (comma-
    /// separated names). Tasks otherwise get PATH, HOME and LANG, their
    /// ERETES_* variables and nothing else of the agent's environment.
    #[arg(long, value_name = "NAME,..", value_delimiter = ',')]
    pub(super) pass_env: Vec<String>,
    /// A client must send a whole request head (or start its next request
    /// on an idle connection) within this many milliseconds, and then the
    /// request's whole body within as many again.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub(super) header_timeout_ms: u64,
    /// Most API connections served at once; more are closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) max_connections: u32,
    /// Most API connections served at once from one IP address (capped by
    /// --max-connections); more from it are closed. Behind a proxy, where
    /// every client has the proxy's address, set it to --max-connections.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) max_connections_per_peer: u32,
    /// How long an ended task's logs are kept on this agent (24h, 30m…;
    /// at least 1s); a deleted task's logs go at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub(super) log_retention: Duration,
    /// How long an ended task (done, failed, killed) is kept, result and
    /// all, before this agent deletes it (7d, 12h…; at least 1s), or
    /// `forever`.
    #[arg(long, value_parser = expiry::parse_retention, default_value = "7d")]
    pub(super) result_retention: expiry::Retention,
    /// Serve /metrics without a token (with --token).
    #[arg(long)]
    pub(super) metrics_public: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// The node's lease TTL in milliseconds: how long a dead agent's tasks wait.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub(super) lease_ttl_ms: u64,
    /// From SIGTERM to SIGKILL when a task is stopped, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub(super) stop_grace_ms: u64,
    /// Takeovers (claims after an owner that died or lost its lease
    /// without releasing) after which a task is parked as failed: a task
    /// that kills its agent every time stops at this many. `eretes chaos`
    /// raises it, since its faults take tasks over without their fault.
    #[arg(long, default_value_t = eretes_protocol::DEFAULT_TAKEOVER_LIMIT, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) takeover_limit: u32,
    /// Kubernetes tasks (`eretes submit --image ...`) and where they run.
    #[command(flatten)]
    pub(super) kubernetes: KubernetesArgs,
    /// The store: embedded (durable, in --data-dir) unless --etcd is given.
    #[command(flatten)]
    pub(super) store: StoreArgs,
}

/// The agent's options for Kubernetes tasks.
#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// Run Kubernetes tasks as Jobs, with the in-cluster service account, or
    /// with --kubeconfig (else $KUBECONFIG or ~/.kube/config). Needs
    /// --allow-images.
    #[arg(long)]
    pub(super) kubernetes: bool,
    /// The kubeconfig file to reach the cluster with.
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub(super) kubeconfig: Option<PathBuf>,
    /// The Kubernetes namespace of Jobs whose spec names none (default: the
    /// kubeconfig's or the service account's namespace).
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    pub(super) kubernetes_namespace: Option<String>,
    /// Images Kubernetes tasks may run (comma-separated): an exact
    /// reference, or a prefix ending with '/' (a registry or repository).
    #[arg(
        long,
        value_name = "IMAGE,..",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    pub(super) allow_images: Vec<String>,
    /// Kubernetes namespaces a task's spec may name besides the agent's
    /// (comma-separated); the Role must be bound in each.
    #[arg(
        long,
        value_name = "NS,..",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    pub(super) allow_kubernetes_namespaces: Vec<String>,
    /// Service accounts a task's pod may run as (comma-separated); without
    /// it, the namespace's default account. Never list the agent's own.
    #[arg(
        long,
        value_name = "NAME,..",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    pub(super) allow_service_accounts: Vec<String>,
}

impl KubernetesArgs {
    /// The Kubernetes executor these options ask for, connected; `None`
    /// without --kubernetes.
    pub(super) async fn handler(
        &self,
        namespace: &Namespace,
        exec: &ExecConfig,
    ) -> Result<Option<eretes_kube::KubeHandler>> {
        if !self.kubernetes {
            return Ok(None);
        }
        let allow_images = eretes_kube::AllowImages::new(self.allow_images.iter().cloned())
            .map_err(|e| anyhow!("{e}"))?;
        if allow_images.is_empty() {
            bail!("--kubernetes needs --allow-images IMAGE,..: the images its tasks may run");
        }
        for ns in &self.allow_kubernetes_namespaces {
            if !eretes_kube::names::is_dns_label(ns) {
                bail!("--allow-kubernetes-namespaces: {ns:?} is not a DNS-1123 label");
            }
        }
        for account in &self.allow_service_accounts {
            if !eretes_kube::names::is_dns_subdomain(account) {
                bail!("--allow-service-accounts: {account:?} is not a DNS-1123 subdomain");
            }
        }
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| anyhow!("--kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| anyhow!("--kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| anyhow!("--kubernetes: no cluster configuration found: {e}"))?,
        };
        let default_namespace = match &self.kubernetes_namespace {
            Some(ns) if eretes_kube::names::is_dns_label(ns) => ns.clone(),
            Some(ns) => bail!("--kubernetes-namespace {ns:?} is not a DNS-1123 label"),
            None => config.default_namespace.clone(),
        };
        // A watch is a long poll of up to 290 s; a connection silent for
        // longer is dead (one-shot calls have their own shorter bound).
        config.read_timeout = Some(Duration::from_secs(330));
        config.connect_timeout = Some(Duration::from_secs(10));
        let client = kube::Client::try_from(config)
            .map_err(|e| anyhow!("--kubernetes: cannot make a client: {e}"))?;
        info!(namespace = %default_namespace, "running Kubernetes tasks as Jobs");
        Ok(Some(eretes_kube::KubeHandler::new(
            eretes_kube::KubeConfig {
                client,
                namespace: namespace.clone(),
                default_namespace,
                allow_images,
                allow_namespaces: self.allow_kubernetes_namespaces.clone(),
                allow_service_accounts: self.allow_service_accounts.clone(),
                stop_grace: exec.stop_grace,
                logs_dir: exec.logs_dir(),
                log_cap: exec.log_cap,
                tail_bytes: exec.tail_bytes,
                retry_backoff: exec.retry_backoff,
            },
        )))
    }
}

/// The host's name made into a valid node name, or `agent`.
pub(super) fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() {
        "agent".to_string()
    } else {
        name
    }
}
