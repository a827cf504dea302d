//! Data requests between nodes over gRPC: the server that answers for the
//! tasks this node runs, and the client side's pool of one HTTP/2
//! connection per peer node.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use eretes_protocol::TaskId;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::handle::TaskHandle;
use crate::ids::{graph_task_id, JobEpoch, JobName};
use crate::incoming::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, PREFACE_WITHIN};
use crate::node::NodeShared;
use crate::proto::graph_client::GraphClient;
use crate::proto::graph_server::{Graph, GraphServer};
use crate::proto::{
    data_reply, BackupReply, BackupRequest, DataReply, DataRequest, HandoverReply, HandoverRequest,
    Refusal, UpdateRequest,
};
use eretes_runtime::admission::ConnectionCaps;

/// Longest one attempt of a data request waits for its answer; then the
/// caller retries (the server runs a request once per run anyway).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A served request's outcome, shared by its duplicates.
pub(crate) type Served = Shared<BoxFuture<'static, data_reply::Outcome>>;

/// How many answered requests of one run and epoch are remembered, so that
/// a retry gets the answer instead of running the request again. A retry of
/// a request older than that runs it again.
pub const REMEMBERED_REQUESTS: usize = 4096;

/// The requests one run of a task served in one job epoch, newest last.
pub(crate) struct Remembered {
    /// (claim epoch, job epoch) they belong to.
    pub scope: (i64, JobEpoch),
    served: HashMap<u64, Served>,
    order: std::collections::VecDeque<u64>,
}

impl Remembered {
    fn new(scope: (i64, JobEpoch)) -> Remembered {
        Remembered {
            scope,
            served: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }

    /// The request `id`'s outcome, started by `start` if it is new.
    fn or_insert_with(&mut self, id: u64, start: impl FnOnce() -> Served) -> Served {
        if let Some(served) = self.served.get(&id) {
            return served.clone();
        }
        let served = start();
        self.served.insert(id, served.clone());
        self.order.push_back(id);
        while self.order.len() > REMEMBERED_REQUESTS {
            if let Some(oldest) = self.order.pop_front() {
                self.served.remove(&oldest);
            }
        }
        served
    }
}

fn refused(reason: impl Into<String>, server_job_epoch: u64) -> data_reply::Outcome {
    data_reply::Outcome::Refused(Refusal {
        reason: reason.into(),
        server_job_epoch,
    })
}

struct Service {
    node: Weak<NodeShared>,
}

#[tonic::async_trait]
impl Graph for Service {
    async fn data(&self, request: Request<DataRequest>) -> Result<Response<DataReply>, Status> {
        let Some(node) = self.node.upgrade() else {
            return Err(Status::unavailable("the node is stopping"));
        };
        let outcome = node.serve(request.into_inner()).await;
        Ok(Response::new(DataReply {
            outcome: Some(outcome),
        }))
    }

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupReply>, Status> {
        let Some(node) = self.node.upgrade() else {
            return Err(Status::unavailable("the node is stopping"));
        };
        Ok(Response::new(node.take_backup(request.into_inner()).await))
    }

    async fn update(
        &self,
        request: Request<UpdateRequest>,
    ) -> Result<Response<BackupReply>, Status> {
        let Some(node) = self.node.upgrade() else {
            return Err(Status::unavailable("the node is stopping"));
        };
        Ok(Response::new(node.apply_entry(request.into_inner()).await))
    }

    async fn handover(
        &self,
        request: Request<HandoverRequest>,
    ) -> Result<Response<HandoverReply>, Status> {
        let Some(node) = self.node.upgrade() else {
            return Err(Status::unavailable("the node is stopping"));
        };
        Ok(Response::new(node.hand_over(request.into_inner()).await))
    }
}

/// Requests one connection may have in flight at once (its HTTP/2
/// streams): tonic's default is no limit, and each request may buffer a
/// message of up to 4 MB while it arrives (one peer opening hundreds of
/// streams of almost 4 MB each grew a node by 1.6 GB). Not a limit over
/// all connections: a data request may wait long for its answer (a parent
/// for its children's), holding its place, and a node's places all held
/// by requests waiting on another node whose places are held the same way
/// would stall both until their callers give up.
const STREAMS_PER_CONNECTION: u32 = 32;

/// The longest a request may take, its message's arrival included: longer
/// than any caller waits for one ([`ATTEMPT_TIMEOUT`]), so only a request
/// that nobody waits for any more is cut.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Idle connections are pinged this often, and closed when a ping is not
/// answered within [`PING_TIMEOUT`].
const PING_EVERY: Duration = Duration::from_secs(20);

/// See [`PING_EVERY`].
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve data requests for `node` on `listener` until `stop` fires.
pub(crate) fn spawn_server(
    node: Weak<NodeShared>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let service = GraphServer::new(Service { node });
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .concurrency_limit_per_connection(STREAMS_PER_CONNECTION as usize)
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(PING_EVERY))
            .http2_keepalive_timeout(Some(PING_TIMEOUT))
            .add_service(service)
            .serve_with_incoming_shutdown(
                crate::incoming::capped(
                    listener,
                    ConnectionCaps::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER),
                    PREFACE_WITHIN,
                ),
                stop.cancelled_owned(),
            )
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the graph data server stopped");
        }
    });
}

impl NodeShared {
    /// Answer one data request for a task this node runs, or refuse it.
    pub(crate) async fn serve(self: &Arc<Self>, request: DataRequest) -> data_reply::Outcome {
        let Ok(job) = JobName::new(request.job.clone()) else {
            return data_reply::Outcome::Failed(format!("job name {:?} is invalid", request.job));
        };
        let id: TaskId = graph_task_id(&job, request.to);
        let Some(run) = self.runs.lock().expect("not poisoned").get(&id).cloned() else {
            return refused(format!("{id} does not run on {}", self.name), 0);
        };
        let scope = run.scope.borrow().clone();
        if run.ended.is_cancelled() {
            return refused(format!("the run of {id} here has ended"), 0);
        }
        if scope.epoch != JobEpoch(request.job_epoch) || scope.shutdown {
            return refused(
                format!(
                    "{id} is in {}, the request in job epoch {}",
                    scope.epoch, request.job_epoch
                ),
                scope.epoch.0,
            );
        }
        let served = {
            let mut requests = self.requests.lock().expect("not poisoned");
            let remembered = requests
                .entry(id.clone())
                .or_insert_with(|| Remembered::new((run.claim_epoch, scope.epoch)));
            // Requests of an earlier run or epoch are over: forget them. A
            // request whose own epoch is the earlier one (it was checked just
            // before the epoch moved) is too late.
            let current = (run.claim_epoch, scope.epoch);
            if remembered.scope < current {
                *remembered = Remembered::new(current);
            } else if remembered.scope > current {
                return refused("the job epoch ended", 0);
            }
            remembered.or_insert_with(request.request_id, || {
                let handle = TaskHandle {
                    run: run.clone(),
                    pinned: Some(scope.epoch),
                };
                let task = run.task.clone();
                let ended = scope.ended.clone();
                let stats = self.clone();
                // Its own tokio task: it sees the epoch end and stops even
                // when nobody waits for it any more (a caller on this node
                // that gave up), and a panic in serve_data becomes a final
                // refusal instead of taking the caller down.
                let serving = async move {
                    stats.stats.data_served.fetch_add(1, Ordering::Relaxed);
                    let answer = std::panic::AssertUnwindSafe(task.serve_data(
                        &handle,
                        request.from,
                        &request.method,
                        request.input,
                    ))
                    .catch_unwind();
                    // The epoch's end wins a tie, and is looked at again
                    // after the answer: nothing is answered into a later
                    // epoch.
                    let outcome = tokio::select! {
                        biased;
                        () = ended.cancelled() => None,
                        answer = answer => Some(answer),
                    };
                    match outcome {
                        Some(_) if ended.is_cancelled() => refused("the job epoch ended", 0),
                        Some(Ok(Ok(output))) => data_reply::Outcome::Output(output),
                        Some(Ok(Err(message))) => data_reply::Outcome::Failed(message),
                        Some(Err(_)) => data_reply::Outcome::Failed("serve_data panicked".into()),
                        None => refused("the job epoch ended", 0),
                    }
                };
                let running = AbortOnDropHandle::new(tokio::spawn(serving));
                async move {
                    running
                        .await
                        .unwrap_or_else(|_| refused("the serving task was stopped", 0))
                }
                .boxed()
                .shared()
            })
        };
        served.await
    }

    /// Send `request` to the node that runs `target` now; an error when it
    /// cannot be resolved or reached (the caller retries).
    pub(crate) async fn call(
        self: &Arc<Self>,
        target: &TaskId,
        request: DataRequest,
    ) -> Result<data_reply::Outcome, String> {
        let (owner, address) = self
            .view
            .owner(target)
            .ok_or_else(|| format!("{target} has no owner now"))?;
        if owner == self.name {
            // A task of this node: no need to go through the network.
            return Ok(self.serve(request).await);
        }
        let address = address.ok_or_else(|| format!("{owner} publishes no data address"))?;
        let mut client = self.client(&address)?;
        let mut request = Request::new(request);
        request.set_timeout(ATTEMPT_TIMEOUT);
        let reply = match client.data(request).await {
            Ok(reply) => reply,
            Err(status) => {
                if status.code() == tonic::Code::Unavailable {
                    // The peer is gone (or restarting): a later request opens
                    // a new connection, and a dead peer's is not kept.
                    self.clients
                        .lock()
                        .expect("not poisoned")
                        .remove(address.as_str());
                }
                return Err(format!("{owner} at {address}: {status}"));
            }
        };
        reply
            .into_inner()
            .outcome
            .ok_or_else(|| format!("{owner} sent an empty answer"))
    }

    /// The pooled client of the node at `address`: one HTTP/2 connection
    /// carries every request to it.
    pub(crate) fn client(&self, address: &str) -> Result<GraphClient<Channel>, String> {
        let unpooled = self.connection_per_request.load(Ordering::Relaxed);
        let mut pool = self.clients.lock().expect("not poisoned");
        if let Some(client) = pool.get(address).filter(|_| !unpooled) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| format!("data address {address:?}: {error}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = GraphClient::new(endpoint.connect_lazy());
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        if !unpooled {
            pool.insert(address.to_string(), client.clone());
        }
        Ok(client)
    }
}
