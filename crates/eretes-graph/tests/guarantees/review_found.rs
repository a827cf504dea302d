//! Promises an adversarial review found broken, each probed as the review
//! did (they hold since the fixes): a kept handle cannot move the job, an
//! abandoned serve_data stops with its epoch, meta arrive in store order,
//! a view re-read ends an epoch's requests, a panicking serve_data is a
//! refusal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_graph::{
    graph_task_id, EpochMove, GraphError, GraphNode, GraphTask, JobEpoch, JobKind, JobName,
    TaskHandle,
};
use eretes_protocol::{Coordinator, GroupName, NodeName};
use eretes_runtime::balancer::FairBalancer;
use eretes_runtime::{Node, NodeConfig};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::*;
use futures::StreamExt;
use tokio::time::{sleep, Instant};

use crate::support::*;

// A. A run's handle kept past the run cannot move the job epoch (Err(Fenced), docs §2.4, §4.1).
struct StashTask {
    slot: Arc<Mutex<Vec<TaskHandle>>>,
}
#[async_trait]
impl GraphTask for StashTask {
    async fn init(&self, task: &TaskHandle, _c: Option<Vec<u8>>) {
        lock(&self.slot).push(task.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_kept_past_its_run_cannot_move_the_job() {
    let slot = Arc::new(Mutex::new(Vec::<TaskHandle>::new()));
    let s = slot.clone();
    let mut cluster = Cluster::new(kind(move |_| Arc::new(StashTask { slot: s.clone() })));
    cluster.add(1).await;
    let job = cluster.start_job("fence", 1).await;
    let first = eventually("first run", || lock(&slot).first().cloned()).await;
    let runner = eventually("runner", || cluster.runner(&graph_task_id(&job, 0))).await;
    cluster.add(1).await;
    cluster.kill(&runner);
    let second = eventually("second run", || {
        let s = lock(&slot);
        (s.len() >= 2).then(|| s[1].clone())
    })
    .await;
    assert!(second.claim_epoch() > first.claim_epoch());
    let cp = first.checkpoint(b"x").await;
    assert!(
        matches!(cp, Err(GraphError::Fenced(_))),
        "control: checkpoint is fenced: {cp:?}"
    );
    let moved = first.inc_epoch().await;
    let now = cluster.jobs.epoch(&job).await.unwrap();
    assert!(
        matches!(moved, Err(GraphError::Fenced(_))),
        "fenced run's inc_epoch must be Err(Fenced); got {moved:?}, job epoch now {now:?}"
    );
}

// B. serve_data of an abandoned request stops when its epoch ends, on another node or this one.
#[derive(Default)]
struct ParkLog {
    serving: bool,
    dropped: bool,
    answer: Option<String>,
    entered: Vec<(u32, u64)>,
}
struct Guard(Arc<Mutex<ParkLog>>);
impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.0).dropped = true;
    }
}
struct ParkTask {
    log: Arc<Mutex<ParkLog>>,
    state: tokio::sync::Mutex<()>,
}
#[async_trait]
impl GraphTask for ParkTask {
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        if task.task_id() == 1 {
            let _state = self.state.lock().await;
            lock(&self.log).entered.push((1, epoch.0));
            return;
        }
        if epoch.0 != 0 {
            return;
        }
        let log = self.log.clone();
        wait_for(|| lock(&log).entered.contains(&(1, 0))).await;
        let answer = task.data_request(1, "m", Vec::new()).await;
        lock(&log).answer = Some(show(&answer));
    }
    async fn serve_data(
        &self,
        _t: &TaskHandle,
        _f: u32,
        _m: &str,
        _i: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let _guard = Guard(self.log.clone());
        let _state = self.state.lock().await; // the task's state, as §2.3 advises
        lock(&self.log).serving = true;
        std::future::pending::<()>().await;
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_serve_data_stops_when_its_epoch_ends() {
    park(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_serve_data_on_the_same_node_stops_too() {
    park(true).await
}

async fn park(local: bool) {
    let log = Arc::new(Mutex::new(ParkLog::default()));
    let l = log.clone();
    let mut cluster = Cluster::new(kind(move |_| {
        Arc::new(ParkTask {
            log: l.clone(),
            state: tokio::sync::Mutex::new(()),
        })
    }));
    let job = if local {
        let n = cluster.add(2).await;
        let job = cluster.start_job("park", 2).await;
        eventually("both on one node", || {
            (0..2)
                .all(|i| cluster.runner(&graph_task_id(&job, i)) == Some(n.clone()))
                .then_some(())
        })
        .await;
        job
    } else {
        cluster.add(1).await;
        cluster.add(1).await;
        let job = cluster.start_job("park", 2).await;
        cluster.wait_spread(&job, 2).await;
        job
    };
    eventually("serving", || lock(&log).serving.then_some(())).await;
    assert_eq!(
        cluster.jobs.inc_epoch(&job, JobEpoch(0)).await.unwrap(),
        EpochMove::Moved(JobEpoch(1))
    );
    let answer = eventually("the caller's request ends", || lock(&log).answer.clone()).await;
    sleep(Duration::from_secs(3)).await;
    let log = lock(&log);
    assert!(
        log.dropped && log.entered.contains(&(1, 1)),
        "caller got {answer}; serve_data dropped: {}; task 1 entered: {:?} (its enter_epoch(1) waits on the lock the parked serve_data holds)",
        log.dropped,
        log.entered
    );
}

// C. Meta of one epoch arrive in store order, the last value last.
#[derive(Default)]
struct OrderLog {
    receiver_in_1: bool,
    flagged: bool,
    received: Vec<String>,
}
struct OrderTask {
    log: Arc<Mutex<OrderLog>>,
}
#[async_trait]
impl GraphTask for OrderTask {
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        if epoch.0 != 1 {
            return;
        }
        let log = self.log.clone();
        if task.task_id() == 1 {
            lock(&log).receiver_in_1 = true;
            wait_for(|| lock(&log).flagged).await;
            sleep(Duration::from_millis(300)).await; // let the view apply both writes
            return;
        }
        wait_for(|| lock(&log).receiver_in_1).await;
        task.flag_meta(PEER, "a").await.unwrap();
        task.flag_meta(PEER, "b").await.unwrap();
        lock(&log).flagged = true;
    }
    async fn meta_ready(&self, task: &TaskHandle, _from: u32, _link: &str, meta: &str) {
        if task.task_id() == 1 {
            lock(&self.log).received.push(meta.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_of_an_epoch_arrive_in_store_order() {
    let log = Arc::new(Mutex::new(OrderLog::default()));
    let l = log.clone();
    let mut cluster = Cluster::new(kind(move |_| Arc::new(OrderTask { log: l.clone() })));
    cluster.add(1).await;
    cluster.add(1).await;
    let job = cluster.start_job("order", 2).await;
    cluster.wait_spread(&job, 2).await;
    sleep(Duration::from_millis(200)).await;
    cluster.jobs.inc_epoch(&job, JobEpoch(0)).await.unwrap();
    eventually("two meta", || {
        (lock(&log).received.len() >= 2).then_some(())
    })
    .await;
    sleep(QUIET).await;
    assert_eq!(
        lock(&log).received,
        vec!["a".to_string(), "b".to_string()],
        "store order, last value last"
    );
}

// D. A stuck watch: the 10 s re-read moves every run's epoch scope, ending its requests.
struct StallStore {
    inner: Arc<dyn Store>,
    stalled: Arc<AtomicBool>,
}
#[async_trait]
impl Store for StallStore {
    async fn get(&self, r: GetRequest) -> StoreResult<GetResponse> {
        self.inner.get(r).await
    }
    async fn put(&self, r: PutRequest) -> StoreResult<PutResponse> {
        self.inner.put(r).await
    }
    async fn delete(&self, r: DeleteRequest) -> StoreResult<DeleteResponse> {
        self.inner.delete(r).await
    }
    async fn txn(&self, t: Txn) -> StoreResult<TxnResponse> {
        self.inner.txn(t).await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, l: LeaseId) -> StoreResult<Duration> {
        self.inner.lease_keepalive(l).await
    }
    async fn lease_revoke(&self, l: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(l).await
    }
    async fn compact(&self, r: Revision) -> StoreResult<()> {
        self.inner.compact(r).await
    }
    async fn watch(&self, range: KeyRange, rev: Revision) -> StoreResult<WatchStream> {
        let stream = self.inner.watch(range, rev).await?;
        let stalled = self.stalled.clone();
        Ok(Box::pin(futures::stream::unfold(
            (stream, stalled),
            |(mut s, stalled)| async move {
                let item = s.next().await?;
                while stalled.load(Ordering::SeqCst) {
                    sleep(Duration::from_millis(10)).await;
                }
                Some((item, (s, stalled)))
            },
        )))
    }
}

#[derive(Default)]
struct MutualLog {
    asking: Vec<u32>,
    answers: Vec<(u32, String)>,
}
/// In epoch 0 each task asks the other; each answers only once its own
/// epoch-0 work is done, so only the end of the epoch ends the wait (§2.3).
struct MutualTask {
    log: Arc<Mutex<MutualLog>>,
    ready: AtomicBool,
}
#[async_trait]
impl GraphTask for MutualTask {
    async fn enter_epoch(&self, task: &TaskHandle, epoch: JobEpoch) {
        if epoch.0 != 0 {
            return;
        }
        let me = task.task_id();
        lock(&self.log).asking.push(me);
        let answer = task.data_request(1 - me, "m", Vec::new()).await;
        lock(&self.log).answers.push((me, show(&answer)));
        self.ready.store(true, Ordering::SeqCst);
    }
    async fn serve_data(
        &self,
        _t: &TaskHandle,
        _f: u32,
        _m: &str,
        _i: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        while !self.ready.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(5)).await;
        }
        Ok(b"x".to_vec())
    }
}

async fn mutual(stall: bool) -> (Duration, Vec<(u32, String)>) {
    let log = Arc::new(Mutex::new(MutualLog::default()));
    let l = log.clone();
    let kind: Arc<dyn JobKind> = kind(move |_| {
        Arc::new(MutualTask {
            log: l.clone(),
            ready: AtomicBool::new(false),
        })
    });
    let inner: Arc<dyn Store> = EmbeddedStore::new();
    let stalled = Arc::new(AtomicBool::new(false));
    let graph_store: Arc<dyn Store> = Arc::new(StallStore {
        inner: inner.clone(),
        stalled: stalled.clone(),
    });
    let ns = eretes_protocol::Namespace::new("stall").unwrap();
    let name = NodeName::new("n1").unwrap();
    let graph = GraphNode::start(
        Coordinator::new(graph_store, ns.clone()),
        name.clone(),
        [(KIND.to_string(), kind)].into(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let mut config = NodeConfig::new(name, ns.clone()).with_lease_ttl(TTL);
    config.groups = vec![GroupName::new("graph").unwrap()];
    config.slots = 2;
    let node = Node::start(
        inner.clone(),
        config,
        graph.handler(),
        graph.balancer(Box::new(FairBalancer::default())),
    )
    .await
    .unwrap();
    graph.publish_address(node.status());
    let jobs = eretes_graph::Jobs::new(Coordinator::new(inner, ns));
    let job = JobName::new("mutual").unwrap();
    jobs.start(&job, &spec(KIND, 2)).await.unwrap();
    eventually("both asking", || {
        (lock(&log).asking.len() == 2).then_some(())
    })
    .await;
    sleep(Duration::from_millis(200)).await;
    stalled.store(stall, Ordering::SeqCst);
    jobs.inc_epoch(&job, JobEpoch(0)).await.unwrap();
    let at = Instant::now();
    while lock(&log).answers.len() < 2 && at.elapsed() < Duration::from_secs(16) {
        sleep(Duration::from_millis(20)).await;
    }
    let took = at.elapsed();
    let answers = lock(&log).answers.clone();
    node.kill();
    graph.stop();
    (took, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_an_epoch_reaches_requests_after_a_view_reread() {
    let (took, answers) = mutual(false).await;
    println!("healthy watch: ended after {took:?}: {answers:?}");
    assert_eq!(answers.len(), 2, "control");
    let (took, answers) = mutual(true).await;
    assert_eq!(
        answers.len(),
        2,
        "stuck watch: the view re-read (10 s) saw the new epoch, but after {took:?} the requests still wait: {answers:?}"
    );
}

// E. A panic in the target's serve_data is a refusal, not the caller's failure.
struct PanicTask;
#[async_trait]
impl GraphTask for PanicTask {
    async fn enter_epoch(&self, task: &TaskHandle, _e: JobEpoch) {
        if task.task_id() == 0 {
            let _ = task.data_request(1, "m", b"bad".to_vec()).await;
        }
    }
    async fn serve_data(
        &self,
        _t: &TaskHandle,
        _f: u32,
        _m: &str,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let _n = <[u8; 8]>::try_from(input.as_slice()).unwrap(); // a bug in task 1's decoding
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_serve_data_is_a_refusal_not_the_callers_failure() {
    let mut cluster = Cluster::new(kind(|_| Arc::new(PanicTask)));
    cluster.add(2).await;
    let job = cluster.start_job("panic", 2).await;
    let coordinator = cluster.jobs.coordinator().clone();
    let mut ended = None;
    for _ in 0..200 {
        if let Some(r) = coordinator.result(&graph_task_id(&job, 0)).await.unwrap() {
            ended = Some(format!("{:?}", r.outcome));
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_millis(500)).await;
    let still = cluster.runner(&graph_task_id(&job, 0));
    println!("after retirement, GraphNode::runs() still lists task 0 on {still:?}");
    assert_eq!(
        ended, None,
        "task 0 (the caller) was retired: {ended:?}; still listed as running on {still:?}"
    );
}
