//! A fake Kubernetes API server for tests: the real `kube` client talks
//! HTTP to it on 127.0.0.1, and it answers as the real API server would for
//! the resources the Job executor uses — Jobs (`batch/v1`), Pods and their
//! logs, ConfigMaps — with resourceVersions, watches, selectors, `Status`
//! errors, deletion propagation, and a simulated Job controller and kubelet
//! whose pods follow a [`PodScript`] chosen by the test.
//!
//! It is not a mock of the executor's functions: a test drives the executor
//! against it exactly as against a cluster, then inspects what happened
//! ([`FakeApiServer::jobs`], [`FakeApiServer::job_history`],
//! [`FakeApiServer::requests`]) or injects trouble
//! ([`FakeApiServer::fail_next`], [`FakeApiServer::expire_watches`],
//! [`FakeApiServer::delete_job_externally`]).
//!
//! Simplifications (each a place where a real cluster does more): one pod
//! per Job attempt (`completions`/`parallelism` above 1 are accepted but run
//! one pod), no suspend, no pod failure policy, `restartPolicy: OnFailure`
//! treated as `Never`, no `batch.kubernetes.io/job-tracking` finalizer, no
//! PATCH/PUT, a list with `resourceVersionMatch=Exact` inside the retained
//! window returns the current objects, and simulated grace periods are cut to
//! [`MAX_SIMULATED_GRACE`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerState, ContainerStateWaiting, Pod};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::deletion::DeleteOpts;
use super::kubelet::set_pod_state;
use super::store::{lock, Fault, Key, Kind, Obj, Shared, State};

/// The longest grace period the fake really waits: a pod deleted with a
/// longer one (say the default 30 s) that ignores SIGTERM is stopped after
/// this, so tests stay short.
pub const MAX_SIMULATED_GRACE: Duration = Duration::from_secs(3);

/// How often open watches that allow bookmarks get one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// What a Job's pod does, as the fake kubelet plays it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodScript {
    /// How long the pod stays Pending (container waiting, reason
    /// `ContainerCreating`) before Running.
    pub pending_for: Duration,
    /// Lines the container writes while running, spread evenly over
    /// `run_for` (the first at the start).
    pub log: Vec<String>,
    /// How long the container runs before it exits.
    pub run_for: Duration,
    /// The exit code after `run_for`; `None` runs until the pod is deleted.
    pub exit_code: Option<i32>,
    /// Whether the process ignores SIGTERM: if so a deleted pod lingers,
    /// terminating, for its grace period (at most [`MAX_SIMULATED_GRACE`])
    /// and then exits 137; otherwise it exits 143 within about 50 ms.
    pub ignore_sigterm: bool,
}

impl Default for PodScript {
    /// The default kubelet's script: 10 ms Pending, then runs 50 ms and
    /// exits 0 with no log.
    fn default() -> Self {
        PodScript {
            pending_for: Duration::from_millis(10),
            log: Vec::new(),
            run_for: Duration::from_millis(50),
            exit_code: Some(0),
            ignore_sigterm: false,
        }
    }
}

/// A deletion's propagation policy (`DeleteOptions.propagationPolicy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents are deleted first; the owner goes when they are gone.
    Foreground,
    /// The owner goes at once; the garbage collector deletes dependents.
    Background,
    /// Dependents stay, their ownerReferences removed (the default for
    /// `batch/v1` Jobs deleted through the API).
    Orphan,
}

/// What happened to a Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEventKind {
    /// Created by a POST.
    Created,
    /// A DELETE was accepted with this (effective) propagation policy; the
    /// Job may linger until its pods are gone.
    Deleted(Propagation),
    /// The Job left the store (its DELETED watch event).
    Removed,
}

/// One entry of [`FakeApiServer::job_history`].
#[derive(Clone, Debug)]
pub struct JobEvent {
    /// When it happened.
    pub at: Instant,
    /// What happened.
    pub kind: JobEventKind,
    /// The Job's namespace.
    pub namespace: String,
    /// The Job's name.
    pub name: String,
    /// The Job's uid (tells apart Jobs that reused a name).
    pub uid: String,
    /// The Job's labels.
    pub labels: BTreeMap<String, String>,
}

/// A fake Kubernetes API server on 127.0.0.1 (see the module docs). Dropping
/// it stops the server, its simulated controllers, and its open watches.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and serves until dropped. Must be
    /// called within a tokio runtime.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the fake API server");
        let addr = listener
            .local_addr()
            .expect("the fake API server's address");
        let shared: Arc<Shared> = Arc::new_cyclic(|me| Mutex::new(State::new(me.clone())));
        let router = Router::new()
            .fallback(super::http::handle)
            .with_state(shared.clone());
        let server = tokio::spawn(serve(listener, router));
        lock(&shared).spawn(bookmarks);
        FakeApiServer {
            shared,
            addr,
            server,
        }
    }

    /// The server's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Config` for [`url`](Self::url) with default namespace
    /// "default", for a test that wants to change it (say `default_retry`,
    /// which is on: the client itself retries 429/503/504).
    pub fn config(&self) -> kube::Config {
        let uri = self
            .url()
            .parse()
            .expect("the fake API server's URL parses");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        config
    }

    /// A `kube::Client` for [`url`](Self::url) (plain HTTP). Must be called
    /// within a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a kube client for the fake API server")
    }

    /// Writes a kubeconfig pointing at [`url`](Self::url): cluster, user and
    /// context all named "fake", namespace "default".
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\n    namespace: default\ncurrent-context: fake\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// Sets the kubelet: what each new pod of a Job does. It is called (with
    /// the server's lock held, so it must not call back into the server) once
    /// per pod, so a Job whose `backoffLimit` allows retries calls it again.
    pub fn set_kubelet(&self, script: impl Fn(&Job) -> PodScript + Send + Sync + 'static) {
        lock(&self.shared).kubelet = Arc::new(script);
    }

    fn objects<T>(&self, kind: Kind, namespace: &str, pick: impl Fn(&Obj) -> Option<T>) -> Vec<T> {
        let st = lock(&self.shared);
        let from = Key::new(kind, namespace, "");
        st.objects
            .range(from..)
            .take_while(|(k, _)| k.kind == kind && k.namespace == namespace)
            .filter_map(|(_, o)| pick(o))
            .collect()
    }

    /// The Jobs in `namespace` now, including those being deleted.
    pub fn jobs(&self, namespace: &str) -> Vec<Job> {
        self.objects(Kind::Job, namespace, |o| match o {
            Obj::Job(j) => Some(j.clone()),
            _ => None,
        })
    }

    /// The pods in `namespace` now, including those being deleted.
    pub fn pods(&self, namespace: &str) -> Vec<Pod> {
        self.objects(Kind::Pod, namespace, |o| match o {
            Obj::Pod(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// The ConfigMaps in `namespace` now.
    pub fn config_maps(&self, namespace: &str) -> Vec<ConfigMap> {
        self.objects(Kind::ConfigMap, namespace, |o| match o {
            Obj::ConfigMap(c) => Some(c.clone()),
            _ => None,
        })
    }

    /// Every Job creation, accepted deletion and removal so far, in order.
    pub fn job_history(&self) -> Vec<JobEvent> {
        lock(&self.shared).job_history.clone()
    }

    /// Every request served so far, `(method, path with query)`, in order,
    /// including those answered with an injected fault.
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.shared).requests.clone()
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> String {
        lock(&self.shared).rv().to_string()
    }

    /// How many watches are open now (of any kind, their clients still
    /// connected): lets a test wait until the code under test is watching
    /// before it changes something or calls [`expire_watches`](Self::expire_watches).
    pub fn open_watches(&self) -> usize {
        lock(&self.shared).open_watches()
    }

    /// Answers the next `count` requests with `method` (`None`: any) whose
    /// path (without query) starts with `path_prefix` with `status` (429
    /// carries `Retry-After: 1`) and a `Status` body, without acting on them.
    /// Faults armed earlier are matched first.
    pub fn fail_next(&self, method: Option<&str>, path_prefix: &str, status: u16, count: usize) {
        lock(&self.shared).faults.push(Fault {
            method: method.map(str::to_string),
            path_prefix: path_prefix.to_string(),
            status,
            remaining: count,
            after_serving: false,
        });
    }

    /// Like [`fail_next`](Self::fail_next), but each matching request is
    /// served first and only its answer replaced by `status`: a create that
    /// happened although the client saw it fail (a lost response).
    pub fn lose_next_answers(
        &self,
        method: Option<&str>,
        path_prefix: &str,
        status: u16,
        count: usize,
    ) {
        lock(&self.shared).faults.push(Fault {
            method: method.map(str::to_string),
            path_prefix: path_prefix.to_string(),
            status,
            remaining: count,
            after_serving: true,
        });
    }

    /// Forgets the history before the current resourceVersion, as etcd
    /// compaction does: every open watch gets an ERROR event (410 Expired)
    /// and ends, and a watch from an older resourceVersion gets the same.
    pub fn expire_watches(&self) {
        lock(&self.shared).expire();
    }

    /// Marks pod `name`'s container as waiting for `reason` (say
    /// `ImagePullBackOff`), as a kubelet does when it cannot start it (give
    /// the pod's script a long `pending_for`, or the kubelet starts it
    /// anyway). Returns whether the pod existed.
    pub fn set_waiting(&self, namespace: &str, name: &str, reason: &str, message: &str) -> bool {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
            }),
            ..Default::default()
        };
        lock(&self.shared)
            .update(&Key::new(Kind::Pod, namespace, name), |object| {
                if let Obj::Pod(pod) = object {
                    set_pod_state(pod, "Pending", waiting);
                }
            })
            .is_some()
    }

    /// Deletes a Job as `kubectl delete job` would (Background propagation).
    /// Returns whether the Job existed. Must be called within a tokio
    /// runtime.
    pub fn delete_job_externally(&self, namespace: &str, name: &str) -> bool {
        let opts = DeleteOpts {
            propagation: Some(Propagation::Background),
            ..Default::default()
        };
        lock(&self.shared)
            .delete_job(&Key::new(Kind::Job, namespace, name), &opts)
            .is_ok()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its connection tasks with it, which
        // closes every open watch and log stream.
        self.server.abort();
        lock(&self.shared).shut_down();
    }
}

/// Sends bookmarks to the watches that allow them, for the server's life
/// (the task is aborted with the server).
async fn bookmarks(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(BOOKMARK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        lock(&shared).send_bookmarks();
    }
}

/// The accept loop: one HTTP/1 connection task per client connection, all
/// owned by this task so that aborting it ends them (axum's own `serve`
/// detaches them).
async fn serve(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = TowerToHyperService::new(router.clone());
                    connections.spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        // A client that hangs up mid-stream is not an error
                        // worth reporting.
                        let _ = conn.await;
                    });
                }
                // Out of descriptors, say: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
