//! The fake API server's storage: the objects, the global resourceVersion,
//! the retained event history that watches resume from, the open watches,
//! and the `Status` errors the server answers with.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use axum::body::Bytes;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::fake_api::{JobEvent, PodScript};
use super::selector::Filter;
use super::status::ApiError;

/// Everything the fake holds, behind one lock: handlers and the simulated
/// controllers each take it briefly and never across an await.
pub(crate) type Shared = Mutex<State>;

/// Locks the state; a panic elsewhere (a failed assertion in a test's
/// kubelet script) must not wedge every later request.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many events the history keeps; older ones are forgotten, as etcd
/// compaction does, and watches from before them get 410.
const MAX_HISTORY: usize = 10_000;

/// The kinds of object the fake serves.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) enum Kind {
    Job,
    Pod,
    ConfigMap,
}

impl Kind {
    /// The resource name in paths (`jobs`).
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Job => "jobs",
            Kind::Pod => "pods",
            Kind::ConfigMap => "configmaps",
        }
    }

    /// The API group (`""` for core).
    pub(crate) fn group(self) -> &'static str {
        match self {
            Kind::Job => "batch",
            Kind::Pod | Kind::ConfigMap => "",
        }
    }

    /// `kind` as objects carry it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::Pod => "Pod",
            Kind::ConfigMap => "ConfigMap",
        }
    }

    /// `apiVersion` as objects carry it.
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Kind::Job => "batch/v1",
            Kind::Pod | Kind::ConfigMap => "v1",
        }
    }

    /// The resource as messages name it (`jobs.batch`, `pods`).
    pub(crate) fn qualified_plural(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// The kind as `Invalid` messages name it (`Job.batch`, `Pod`).
    pub(crate) fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.name().to_string(),
            g => format!("{}.{g}", self.name()),
        }
    }
}

/// A stored object.
// Jobs and Pods are about the same size and make up nearly every value;
// boxing would only add an allocation to every clone.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Obj {
    Job(Job),
    Pod(Pod),
    ConfigMap(ConfigMap),
}

impl Obj {
    /// Its kind.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Obj::Job(_) => Kind::Job,
            Obj::Pod(_) => Kind::Pod,
            Obj::ConfigMap(_) => Kind::ConfigMap,
        }
    }

    /// Its metadata.
    pub(crate) fn meta(&self) -> &ObjectMeta {
        match self {
            Obj::Job(o) => &o.metadata,
            Obj::Pod(o) => &o.metadata,
            Obj::ConfigMap(o) => &o.metadata,
        }
    }

    /// Its metadata, to change.
    pub(crate) fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Obj::Job(o) => &mut o.metadata,
            Obj::Pod(o) => &mut o.metadata,
            Obj::ConfigMap(o) => &mut o.metadata,
        }
    }

    /// `metadata.name`.
    pub(crate) fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or("")
    }

    /// `metadata.namespace`.
    pub(crate) fn namespace(&self) -> &str {
        self.meta().namespace.as_deref().unwrap_or("")
    }

    /// `metadata.uid`.
    pub(crate) fn uid(&self) -> &str {
        self.meta().uid.as_deref().unwrap_or("")
    }

    /// Its storage key.
    pub(crate) fn key(&self) -> Key {
        Key::new(self.kind(), self.namespace(), self.name())
    }

    /// The object as JSON, with `kind` and `apiVersion` (as GET and watch
    /// events carry it).
    pub(crate) fn to_json(&self) -> Value {
        let v = match self {
            Obj::Job(o) => serde_json::to_value(o),
            Obj::Pod(o) => serde_json::to_value(o),
            Obj::ConfigMap(o) => serde_json::to_value(o),
        };
        v.expect("Kubernetes objects serialize to JSON")
    }
}

/// Where an object is stored: kind, namespace, name (ordered as lists are).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl Key {
    /// The key of `kind` `namespace/name`.
    pub(crate) fn new(kind: Kind, namespace: &str, name: &str) -> Key {
        Key {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// The watch event types that carry an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One retained change: the resourceVersion it made, the object as of it,
/// and the watch line already serialized.
struct HistEntry {
    rv: u64,
    obj: Obj,
    line: Bytes,
}

/// An open watch: what it selects and where its lines go.
struct Watcher {
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// What a watch request asks for, once its parameters are checked.
pub(crate) struct WatchRequest {
    pub filter: Filter,
    /// Resume after this resourceVersion; `None` for "0" or absent.
    pub after: Option<u64>,
    /// Send the current objects as ADDED first.
    pub initial_events: bool,
    /// End the initial events with a BOOKMARK annotated
    /// `k8s.io/initial-events-end` (streaming lists).
    pub initial_end_bookmark: bool,
    pub bookmarks: bool,
}

/// A fault armed by `fail_next`.
pub(crate) struct Fault {
    pub method: Option<String>,
    pub path_prefix: String,
    pub status: u16,
    pub remaining: usize,
    /// Serve the request, then answer with the fault (a lost answer).
    pub after_serving: bool,
}

/// The kubelet's side of a pod: its log, and the channels to its task.
pub(crate) struct PodRuntime {
    pub container: String,
    pub log: Vec<(Timestamp, String)>,
    /// Bumped on every log line and when the container ends, so followers
    /// wake; dropped with the pod, which ends them.
    pub log_tx: watch::Sender<()>,
    /// When the container is to be stopped (the deletion's grace deadline);
    /// dropped with the pod, which ends the kubelet task.
    pub kill_tx: watch::Sender<Option<Instant>>,
    pub started: bool,
    pub terminated: bool,
}

/// The Job controller's memory of one Job (keyed by its uid).
#[derive(Default)]
pub(crate) struct JobRuntime {
    /// When the controller started the Job (for `activeDeadlineSeconds`).
    pub started_at: Option<Instant>,
    /// Pods already counted as succeeded or failed.
    pub counted: HashSet<String>,
    /// Pods removed before they were counted (forced deletion, say).
    pub uncounted_removed: i32,
    pub ttl_scheduled: bool,
}

/// The script every Job's pod follows, set by a test.
pub(crate) type Kubelet = Arc<dyn Fn(&Job) -> PodScript + Send + Sync>;

/// The fake's whole state.
pub(crate) struct State {
    me: Weak<Shared>,
    rv: u64,
    /// The oldest resourceVersion a watch may resume from: history at or
    /// before it is forgotten.
    floor: u64,
    pub objects: BTreeMap<Key, Obj>,
    history: VecDeque<HistEntry>,
    watchers: Vec<Watcher>,
    pub requests: Vec<(String, String)>,
    pub faults: Vec<Fault>,
    pub job_history: Vec<JobEvent>,
    pub kubelet: Kubelet,
    pub pods_rt: HashMap<String, PodRuntime>,
    pub jobs_rt: HashMap<String, JobRuntime>,
    tasks: JoinSet<()>,
    shut_down: bool,
}

impl State {
    /// A fresh, empty cluster. `me` lets controllers spawn tasks that take
    /// the lock later.
    pub(crate) fn new(me: Weak<Shared>) -> State {
        State {
            me,
            // Start well above 0, whose meaning in requests is "any".
            rv: 1000,
            floor: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: Vec::new(),
            requests: Vec::new(),
            faults: Vec::new(),
            job_history: Vec::new(),
            kubelet: Arc::new(|_| PodScript::default()),
            pods_rt: HashMap::new(),
            jobs_rt: HashMap::new(),
            tasks: JoinSet::new(),
            shut_down: false,
        }
    }

    /// The current resourceVersion.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion still servable.
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// Runs a simulated controller's task; it is aborted when the server is
    /// dropped.
    pub(crate) fn spawn<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        if self.shut_down {
            return;
        }
        // Reap finished tasks so a long test does not accumulate them.
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(task(shared));
    }

    /// Ends everything: controller tasks and open watches.
    pub(crate) fn shut_down(&mut self) {
        self.shut_down = true;
        self.tasks.abort_all();
        self.watchers.clear();
        self.pods_rt.clear();
    }

    /// Records a change: bumps the resourceVersion, stamps the object with
    /// it, keeps it in the history and sends it to the watches it matches.
    fn commit(&mut self, etype: EventType, obj: &mut Obj) {
        self.rv += 1;
        let rv = self.rv;
        obj.meta_mut().resource_version = Some(rv.to_string());
        let line = event_line(etype.as_str(), obj.to_json());
        self.watchers.retain(|w| {
            if !w.filter.matches(obj) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.history.push_back(HistEntry {
            rv,
            obj: obj.clone(),
            line,
        });
        if self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
    }

    /// Stores a new object (ADDED) and returns it as stored.
    pub(crate) fn insert(&mut self, mut obj: Obj) -> Obj {
        self.commit(EventType::Added, &mut obj);
        self.objects.insert(obj.key(), obj.clone());
        obj
    }

    /// Changes a stored object; when `change` really changed it, stores it
    /// (MODIFIED). Returns the object as it now is.
    pub(crate) fn update(&mut self, key: &Key, change: impl FnOnce(&mut Obj)) -> Option<Obj> {
        let old = self.objects.get(key)?;
        let mut new = old.clone();
        change(&mut new);
        if new != *old {
            self.commit(EventType::Modified, &mut new);
            self.objects.insert(key.clone(), new.clone());
        }
        Some(new)
    }

    /// Removes an object (DELETED) and returns its final state.
    pub(crate) fn remove(&mut self, key: &Key) -> Option<Obj> {
        let mut obj = self.objects.remove(key)?;
        self.commit(EventType::Deleted, &mut obj);
        Some(obj)
    }

    /// The objects a filter selects, in key order.
    pub(crate) fn select<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a Obj> + 'a {
        self.objects
            .range(Key::new(filter.kind, "", "")..)
            .take_while(move |(k, _)| k.kind == filter.kind)
            .map(|(_, o)| o)
            .filter(move |o| filter.matches(o))
    }

    /// Opens a watch: the initial events or the replayed history first, then
    /// every matching change. A resourceVersion older than the retained
    /// history gets one ERROR 410 event and the end of the stream.
    pub(crate) fn open_watch(&mut self, req: WatchRequest) -> mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(after) = req.after.filter(|a| *a < self.floor) {
            let _ = tx.send(expired_line(after, self.floor));
            return rx;
        }
        if req.initial_events {
            for obj in self.select(&req.filter) {
                let _ = tx.send(event_line("ADDED", obj.to_json()));
            }
            if req.initial_end_bookmark {
                let _ = tx.send(bookmark_line(req.filter.kind, self.rv, true));
            }
        } else if let Some(after) = req.after {
            for entry in self.history.iter().filter(|e| e.rv > after) {
                if req.filter.matches(&entry.obj) {
                    let _ = tx.send(entry.line.clone());
                }
            }
        }
        self.watchers.push(Watcher {
            filter: req.filter,
            bookmarks: req.bookmarks,
            tx,
        });
        rx
    }

    /// How many watches are open (their clients still connected).
    pub(crate) fn open_watches(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.len()
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that
    /// allowed them. Sent under the lock like every event, so a bookmark
    /// never overtakes an event it covers.
    pub(crate) fn send_bookmarks(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            w.tx.send(bookmark_line(w.filter.kind, rv, false)).is_ok()
        });
    }

    /// Forgets all history: every open watch gets ERROR 410 and ends, and
    /// older resourceVersions are refused from now on.
    pub(crate) fn expire(&mut self) {
        self.floor = self.rv;
        self.history.clear();
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(expired_line(self.rv.saturating_sub(1), self.rv));
        }
    }

    /// Takes an armed fault matching this request, if any.
    pub(crate) fn take_fault(&mut self, method: &str, path: &str) -> Option<(u16, bool)> {
        let fault = self.faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && path.starts_with(&f.path_prefix)
        })?;
        fault.remaining -= 1;
        let answer = (fault.status, fault.after_serving);
        self.faults.retain(|f| f.remaining > 0);
        Some(answer)
    }
}

/// A watch line: `{"type":..,"object":..}` and a newline.
pub(crate) fn event_line(etype: &str, object: Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({ "type": etype, "object": object })).expect("JSON serializes");
    line.push(b'\n');
    Bytes::from(line)
}

/// A BOOKMARK line: only kind, apiVersion and metadata.resourceVersion, as
/// the real server sends them.
fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        json!({ "kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata }),
    )
}

/// The ERROR event a watch from a forgotten resourceVersion gets.
fn expired_line(asked: u64, oldest: u64) -> Bytes {
    let status = ApiError::expired(format!("too old resource version: {asked} ({oldest})"));
    event_line("ERROR", status.body())
}

/// The current time, as object timestamps carry it.
pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

/// A random number for uids and generated names (no need for a crypto RNG:
/// only uniqueness within a test matters).
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A fresh uid, shaped like the real server's (a v4 UUID).
pub(crate) fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// `n` random characters from the alphabet the real server uses for
/// generated names (no vowels, so no words).
pub(crate) fn random_suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    (0..n)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect()
}
