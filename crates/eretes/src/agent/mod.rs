//! `eretes agent`: one node that runs process tasks, with the HTTP API the
//! CLI talks to.
//!
//! Without `--etcd` the node runs on the embedded store kept durably in
//! `<data-dir>/store.redb`, so tasks, their states and results survive a
//! restart and a `kill -9`. With `--etcd` it joins that cluster. The first
//! SIGINT or SIGTERM drains (handlers stopped, tasks released, node
//! deregistered, the API closed); a second one exits at once.

pub mod access;
pub mod allocator;
pub mod api;
mod args;
pub mod executors;
pub mod expiry;
pub mod jobs;
pub mod live;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod run_history;
pub mod server;
pub mod task_list;
pub mod ui;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use eretes_exec::{AllowList, ExecConfig, ProcessHandler};
use eretes_protocol::{Coordinator, GroupName, Namespace, NodeName, ProtocolError};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig, StartError, StateMachine};
use eretes_store::embedded::{EmbeddedOptions, EmbeddedStore};
use eretes_store::Store;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::secrets;
use args::default_node_name;
pub use args::AgentArgs;
use executors::Executors;

/// Run the agent until a signal drains it.
pub async fn run(mut args: AgentArgs, secrets: Vec<(&'static str, String)>) -> Result<()> {
    args.token = secrets::resolve(
        args.token.take(),
        args.token_file.as_deref(),
        "ERETES_TOKEN",
        &secrets,
        "--token",
    )?;
    args.read_token = secrets::resolve(
        args.read_token.take(),
        args.read_token_file.as_deref(),
        "ERETES_READ_TOKEN",
        &secrets,
        "--read-token",
    )?;
    if args.read_token.is_some() && args.token.is_none() {
        bail!("--read-token needs --token (or --token-file): without one, everything is open");
    }
    for (flag, token) in [("--token", &args.token), ("--read-token", &args.read_token)] {
        // It travels in an HTTP header: a token no client can send would
        // shut every client out.
        if let Some(bad) = token
            .as_deref()
            .and_then(|token| token.chars().find(|c| !c.is_ascii_graphic()))
        {
            bail!("{flag}: a token is visible ASCII characters only (it is sent in an HTTP header), not {bad:?}");
        }
    }
    if args.read_token.is_some() && args.read_token == args.token {
        bail!("--read-token is the same as --token: it would give readers every right");
    }
    args.store.etcd_password = secrets::taken(&secrets, "ERETES_ETCD_PASSWORD");
    for name in &args.pass_env {
        if name.is_empty() || name.contains(['=', '\0']) || name.starts_with("ERETES_") {
            bail!("--pass-env {name:?}: a variable name, without '=', not one of eretes' own");
        }
    }
    for name in &args.allow_env {
        if !eretes_exec::is_env_name(name) || name.starts_with("ERETES_") {
            bail!(
                "--allow-env {name:?}: a variable name (letters, digits and _, not starting with a \
                 digit), not one of eretes' own"
            );
        }
    }
    if !args.allow_env.is_empty() && args.allow.is_none() {
        bail!(
            "--allow-env applies only with --allow: without an allow list, a task may set any \
             variable, and the list would restrict nothing"
        );
    }
    if args.log_retention < Duration::from_secs(1) {
        bail!(
            "--log-retention {}: at least 1s (a deleted task's logs go at once whatever it is)",
            humantime::format_duration(args.log_retention)
        );
    }
    if let Some(empty) = args
        .allow
        .iter()
        .flatten()
        .find(|program| program.trim().is_empty() || program.contains('\0'))
    {
        bail!(
            "--allow {empty:?}: not a program name (the list is comma-separated names, none empty)"
        );
    }
    let namespace = Namespace::new(&args.namespace).context("--namespace")?;
    let name =
        NodeName::new(args.name.clone().unwrap_or_else(default_node_name)).context("--name")?;
    let groups = args
        .groups
        .iter()
        .map(GroupName::new)
        .collect::<Result<Vec<_>, _>>()
        .context("--groups")?;
    let loopback = args.listen.ip().is_loopback();
    if !loopback && args.token.is_none() {
        bail!(
            "--listen {} is reachable from other hosts: set --token (or ERETES_TOKEN) so that \
             every change through the API needs it",
            args.listen
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| match &args.name {
        // An agent of an earlier version kept a named agent's data in
        // ./eretes-data: it goes on there rather than starting empty.
        Some(name)
            if !PathBuf::from(format!("./eretes-data-{name}")).exists()
                && PathBuf::from("./eretes-data/store.redb").exists() =>
        {
            info!("using ./eretes-data, where this agent's data already is (pass --data-dir to choose)");
            PathBuf::from("./eretes-data")
        }
        Some(name) => PathBuf::from(format!("./eretes-data-{name}")),
        None => PathBuf::from("./eretes-data"),
    });
    // Made by this process only if its own create_dir made it: a directory
    // that existed (or that another agent started at the same moment made
    // first, or a symbolic link) is never taken for one made here.
    if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating --data-dir {}", data_dir.display()))?;
    }
    let made = match std::fs::create_dir(&data_dir) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(error) => {
            return Err(error)
                .with_context(|| format!("creating --data-dir {}", data_dir.display()))
        }
    };
    let data_dir = data_dir.canonicalize().context("--data-dir")?;
    // One agent per data directory: a second would clean up the first's
    // process groups as leftovers and share its logs (with --etcd nothing
    // else would stop it). Held until the process exits.
    let lock_path = data_dir.join("agent.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another eretes agent uses --data-dir {}; give each agent on this machine its own \
             --data-dir (or its own --name: the default directory is ./eretes-data-NODE then)",
            data_dir.display()
        );
    }
    // A directory made here goes again if the agent does not start (a
    // refused --etcd, --run-as, --listen …): nothing is left half-made.
    // Only once its lock is held: until then another agent may use it.
    let mut made_here = MadeHere(made.then(|| data_dir.clone()));

    let recorder = metrics::Metrics::install()?;
    // Under a file-size limit (RLIMIT_FSIZE), a write past it must fail
    // with EFBIG, which the embedded store survives like a full disk,
    // rather than kill the agent with SIGXFSZ. Tasks get the default
    // action back (the supervisor resets it before their exec).
    // SAFETY: signal(2) with SIG_IGN installs no handler.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let (store, embedded): (Arc<dyn Store>, _) = match &args.store.etcd {
        // An etcd out of reach at the start (a partition, a member down, a
        // machine booting before its network) is waited for as the start's
        // other calls are; a refusal (credentials, TLS) ends the agent.
        Some(_) => {
            let until = tokio::time::Instant::now() + START_RETRIES;
            let connected = retry_unavailable(until, "connecting to etcd", || args.store.open());
            (connected.await?, None)
        }
        None => {
            let embedded = EmbeddedStore::open_durable(
                &data_dir.join("store.redb"),
                EmbeddedOptions::default().with_history_age(memory::AGENT_HISTORY_AGE),
            )
            .context("opening the embedded store")?;
            (embedded.clone(), Some(embedded))
        }
    };
    let store: Arc<dyn Store> = Arc::new(metrics::MeteredStore::new(store));
    let allow = match &args.allow {
        Some(programs) => AllowList::only(programs.iter().cloned()),
        None if args.store.is_etcd() || !loopback => {
            warn!("no program may run here: anyone who can write to the store could otherwise run commands on this host; pass --allow PROGRAM,..");
            AllowList::only(Vec::<String>::new())
        }
        None => {
            warn!("every program may run here (embedded store, API on loopback); pass --allow PROGRAM,.. to restrict");
            AllowList::Any
        }
    };
    let (open_files_before, open_files) = server::raise_open_file_limit();
    if open_files != 0 && open_files < u64::from(args.max_connections) + 256 {
        warn!(
            open_files,
            max_connections = args.max_connections,
            "the open-file limit is below --max-connections plus what tasks and the store need"
        );
    }
    let mut exec = ExecConfig::new(data_dir.clone(), allow);
    // Tasks start with the limit the agent was given, not the raised one.
    exec.task_open_files = (open_files_before != open_files).then_some(open_files_before);
    exec.stop_grace = Duration::from_millis(args.stop_grace_ms);
    // On the embedded store no other node can take a task over: a task's
    // processes need not die at the fence deadline (after a suspend, say).
    exec.fence_processes = args.store.is_etcd();
    exec.pass_env = args.pass_env.clone();
    exec.allow_env = args.allow_env.iter().cloned().collect();
    if let Some(user) = &args.run_as {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("--run-as {user}: only an agent running as root can run tasks as another user");
        }
        exec.run_as = Some(eretes_exec::RunAs::lookup(user).map_err(|e| anyhow!("--run-as: {e}"))?);
    }
    let logs_dir = exec.logs_dir();
    let kubernetes = args.kubernetes.handler(&namespace, &exec).await?;
    if let Some(kubernetes) = &kubernetes {
        // Jobs of tasks that ended or were removed while their delete
        // could not be made.
        let reaper = eretes_kube::Reaper::new(kubernetes.config());
        let coordinator = Coordinator::new(store.clone(), namespace.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(eretes_kube::REAP_INTERVAL);
            loop {
                every.tick().await;
                reaper.sweep(&coordinator).await;
            }
        });
    }
    // Tasks run as task state machines: task commands steer them, and
    // their state and checkpoints live in the store.
    let handler = Arc::new(StateMachine::new(
        Executors {
            process: ProcessHandler::new(exec).context("preparing the data directory")?,
            kubernetes,
        },
        Coordinator::new(store.clone(), namespace.clone()),
    ));

    let mut config = NodeConfig::new(name.clone(), namespace.clone())
        .with_lease_ttl(Duration::from_millis(args.lease_ttl_ms));
    config.groups = groups;
    if let Some(slots) = args.slots {
        config.slots = slots as usize;
    }
    if let Some(max_running) = args.max_running {
        config.max_running = max_running as usize;
    }
    config.handler_grace = exec_grace(args.stop_grace_ms);
    config.takeover_limit = args.takeover_limit;
    // A drain waits for every task's own grace (and then some), rather than
    // dropping handlers while their processes are still being stopped.
    config.shutdown_timeout = config
        .shutdown_timeout
        .max(config.handler_grace + Duration::from_secs(5));
    // The data directory's lock proves that its previous agent is dead,
    // and the process handler above killed what it left running: the
    // lease it held can go now, so its tasks move at once (not after the
    // TTL) and this agent can register under the same name.
    // The API's address is taken before the node registers: an agent that
    // cannot listen must not first claim tasks and leave its lease behind.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let lease_file = data_dir.join(LEASE_FILE);
    // etcd answered the connection's probe, but a member dying or a leader
    // changing now fails single calls: the start's calls are retried for
    // up to START_RETRIES rather than ending the agent.
    let retry_until = tokio::time::Instant::now() + START_RETRIES;
    if let Some(previous) = read_lease_file(&lease_file, &name) {
        let coordinator = Coordinator::new(store.clone(), namespace.clone());
        let revoked = retry_unavailable(retry_until, "revoking the previous agent's lease", || {
            coordinator.revoke_previous_registration(&name, previous)
        })
        .await;
        match revoked {
            Ok(true) => info!(
                lease = format!("{previous:#x}"),
                "revoked the lease of this data directory's previous agent: its tasks move now"
            ),
            Ok(false) => {}
            Err(error) => {
                warn!(%error, "cannot revoke the previous agent's lease; its tasks move when it expires")
            }
        }
    }
    let node = retry_unavailable(retry_until, "registering the node", || {
        Node::start(
            store.clone(),
            config.clone(),
            handler.clone(),
            Box::new(FairBalancer::default()),
        )
    })
    .await
    .with_context(|| format!("starting node {name}"))?;
    tokio::spawn(keep_lease_file(
        node.status(),
        lease_file.clone(),
        name.clone(),
    ));
    // Ended tasks the result retention deleted: activity the memory
    // return follows.
    let expired = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(memory::return_freed_memory(
        node.stats().clone(),
        node.status(),
        embedded.clone(),
        expired.clone(),
    ));
    tokio::spawn(logs::sweep_logs(
        logs_dir.clone(),
        Coordinator::new(store.clone(), namespace.clone()),
        args.log_retention,
    ));
    tokio::spawn(expiry::expire_ended_tasks(
        Coordinator::new(store.clone(), namespace.clone()),
        args.result_retention,
        logs_dir.clone(),
        expired,
    ));

    let bound = listener.local_addr()?;
    let coordinator = Coordinator::new(store, namespace);
    let tasks = task_list::LiveTasks::start(coordinator.clone());
    // Set once the node has drained: the API stops, and long-lived
    // responses (the dashboard's change streams) end with it.
    let (drained_tx, drained_rx) = tokio::sync::watch::channel(false);
    let state = api::ApiState {
        stopping: drained_rx.clone(),
        metrics: Arc::new(metrics::Metrics::new(
            recorder,
            node.stats().clone(),
            tasks.clone(),
        )),
        coordinator,
        tasks,
        status: node.status(),
        embedded,
        logs_dir,
        stop_grace: exec_grace(args.stop_grace_ms),
        node: name.clone(),
        access: access::Access {
            token: args.token.clone(),
            read_token: args.read_token.clone(),
            metrics_public: args.metrics_public,
            // Without a token, only requests addressed to loopback by name
            // are served: a web page whose domain rebinds to 127.0.0.1
            // cannot use the API (its requests carry that domain as Host).
            allowed_hosts: args.token.is_none().then(|| {
                let port = bound.port();
                vec![
                    format!("127.0.0.1:{port}"),
                    format!("localhost:{port}"),
                    format!("[::1]:{port}"),
                ]
            }),
        },
    };
    made_here.keep();
    info!(node = %name, listen = %bound, data_dir = %data_dir.display(), "agent ready");

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let limits = server::ServerLimits {
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        max_connections: args.max_connections as usize,
        max_connections_per_peer: args.max_connections_per_peer as usize,
    };
    let server = tokio::spawn(server::serve(
        listener,
        api::router(state, Duration::from_millis(args.header_timeout_ms)),
        limits,
        drained_rx,
    ));
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    info!("draining: stopping tasks and releasing them (a second signal exits at once)");
    tokio::select! {
        _ = node.shutdown() => {}
        // 128 + the signal's number (SIGTERM 15, SIGINT 2), as shells report it.
        _ = terminate.recv() => std::process::exit(143),
        _ = interrupt.recv() => std::process::exit(130),
    }
    let _ = drained_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    // Deregistered: the lease is revoked, nothing to revoke at next start.
    let _ = std::fs::remove_file(&lease_file);
    info!("agent stopped");
    Ok(())
}

/// Where the agent records the lease its node holds, for the next agent on
/// the data directory to revoke after a crash.
const LEASE_FILE: &str = "node.lease";

/// The lease recorded for node `name`, if the file holds one.
fn read_lease_file(path: &std::path::Path, name: &NodeName) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    let record: serde_json::Value = serde_json::from_str(&text).ok()?;
    (record["name"].as_str() == Some(name.as_str()))
        .then(|| record["lease"].as_i64())
        .flatten()
}

/// Write the node's lease to `path` whenever it registers (again), by a
/// rename, so the file is never half-written.
async fn keep_lease_file(
    mut status: tokio::sync::watch::Receiver<eretes_runtime::NodeStatus>,
    path: PathBuf,
    name: NodeName,
) {
    let mut written = None;
    loop {
        let lease = status.borrow_and_update().lease;
        if lease.is_some() && lease != written {
            let record = serde_json::json!({ "name": name.as_str(), "lease": lease });
            let temporary = path.with_extension("tmp");
            let saved = std::fs::write(&temporary, record.to_string())
                .and_then(|()| std::fs::rename(&temporary, &path));
            match saved {
                Ok(()) => written = lease,
                Err(error) => {
                    warn!(%error, file = %path.display(), "cannot record the node's lease")
                }
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// How long the agent's start retries store calls that found etcd
/// unavailable (a member down, an election) before it gives up.
const START_RETRIES: Duration = Duration::from_secs(30);

/// Errors that say the store could not be reached, as opposed to a refusal.
trait Unavailable {
    fn is_unavailable(&self) -> bool;
}

/// A failed connection to the store, with its context: unavailable when
/// the store's own error says so.
impl Unavailable for anyhow::Error {
    fn is_unavailable(&self) -> bool {
        self.downcast_ref::<eretes_store::StoreError>()
            .is_some_and(eretes_store::StoreError::is_transient)
    }
}

impl Unavailable for ProtocolError {
    fn is_unavailable(&self) -> bool {
        matches!(self, ProtocolError::Store(error) if error.is_transient())
    }
}

impl Unavailable for StartError {
    /// Store errors that may pass, and a name held by a live lease: at
    /// start that is most often this agent's own earlier registration (a
    /// start that failed after registering, or a crash before `node.lease`
    /// was written), which expires within the TTL. An agent that really
    /// shares its name with a live one is refused once the retries end.
    fn is_unavailable(&self) -> bool {
        match self {
            StartError::Protocol(ProtocolError::NameTaken { .. }) => true,
            StartError::Protocol(error) => error.is_unavailable(),
            StartError::Config(_) => false,
        }
    }
}

/// `call`, again every 500 ms while it fails because the store is
/// unavailable, until `until`; its last answer.
async fn retry_unavailable<T, E, F>(
    until: tokio::time::Instant,
    what: &str,
    mut call: impl FnMut() -> F,
) -> Result<T, E>
where
    E: Unavailable + std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match call().await {
            Err(error) if error.is_unavailable() && tokio::time::Instant::now() < until => {
                warn!(error = %format_args!("{error:#}"), "{what}: not yet; again in 500 ms");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            answer => return answer,
        }
    }
}

/// The runtime's grace for a stopped handler: the executor's own SIGTERM
/// grace plus time to reap the group.
fn exec_grace(stop_grace_ms: u64) -> Duration {
    Duration::from_millis(stop_grace_ms) + Duration::from_secs(2)
}

/// A data directory the agent made at its start, removed (with what the
/// start put in it) when dropped before [`MadeHere::keep`]: an agent that
/// refuses its arguments leaves nothing behind.
struct MadeHere(Option<PathBuf>);

impl MadeHere {
    /// The agent started: the directory stays.
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for MadeHere {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Unavailable;
    use anyhow::Context;
    use eretes_store::StoreError;

    #[test]
    fn an_unreachable_store_is_waited_for_and_a_refusal_is_not() {
        let failed = |error: StoreError| Err::<(), _>(error).context("connecting to etcd at x");
        let unreachable = failed(StoreError::Unavailable("connection reset".into()));
        assert!(unreachable.unwrap_err().is_unavailable());
        let refused = failed(StoreError::Denied("authentication failed".into()));
        assert!(!refused.unwrap_err().is_unavailable());
        assert!(!anyhow::anyhow!("--etcd: not a URL").is_unavailable());
    }
}
