//! The API's HTTP server: hyper's HTTP/1.1 over an accept loop of our own,
//! so that idle and half-sent connections cannot exhaust the agent.
//!
//! What it does not bound: connections that are legitimately busy — a
//! `logs --follow` of a long task, a `wait` long-poll (at most 5 minutes),
//! a client that reads slowly — hold their place under the cap for as long
//! as they last. With a token set, only token holders can open those.
//!
//! * **Header-read timeout.** A connection must send a whole request head
//!   within it, and an idle keep-alive connection must start its next
//!   request within it; otherwise it is closed. Half-sent requests cannot
//!   pile up.
//! * **Body deadline.** A request's whole body must then arrive within the
//!   same time (every body the API takes is small and read whole), or the
//!   request gets a 408 and its connection is closed; a declared length
//!   over the API's limit gets a 413 before any of it is read. Without
//!   this, a head followed by half a body held its connection for as long
//!   as the client liked, and 1,024 of them shut the API out.
//! * **Connection cap.** At most `max_connections` are served at once; one
//!   more is closed at once (logged once per burst), rather than the agent
//!   running out of file descriptors and failing everything.
//! * **Per-peer cap.** At most `max_connections_per_peer` of them from one
//!   IP address ([`eretes_runtime::admission`]), so that one client (a
//!   token holder's runaway script, or anyone who can reach the port and
//!   keeps sending requests within the header timeout) cannot take every
//!   place.
//! * **Open-file limit.** The soft limit is raised to the hard one at
//!   start, so the cap, not the kernel, is what binds.
//! * **Drain.** Once asked to stop, no connection is accepted and the open
//!   ones finish what they were doing (bounded by the caller).

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use eretes_runtime::admission::{ConnectionCaps, Refused};
use http_body::Body as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::api::{ApiError, MAX_BODY_BYTES};

/// How the server treats its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A request head (or the next request on an idle connection) must
    /// arrive within this.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one IP address.
    pub max_connections_per_peer: usize,
}

/// Raise the soft open-file limit to the hard one; the soft limit before
/// and the one in force.
pub fn raise_open_file_limit() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (0, 0);
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        (before, limit.rlim_cur)
    }
}

/// Serve `router` on `listener` until `stop` turns true, then wait for the
/// open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let caps = ConnectionCaps::new(limits.max_connections, limits.max_connections_per_peer);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A client that reset before its connection was accepted.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(error) => {
                    // Out of descriptors, say: wait a moment, never spin.
                    warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { drop(stop.wait_for(|stop| *stop).await) } => break,
        };
        while connections.try_join_next().is_some() {}
        let places = match caps.admit(peer.ip()) {
            Ok(places) => places,
            Err(refused) => {
                match refused {
                    Refused::Total {
                        first_of_burst: true,
                    } => warn!(
                        max = limits.max_connections,
                        "the API's connection cap is reached; new connections are closed until \
                         some end"
                    ),
                    Refused::Peer {
                        first_of_burst: true,
                    } => warn!(
                        %peer,
                        max = limits.max_connections_per_peer,
                        "a peer holds as many API connections as one may; its new ones are \
                         closed until some end"
                    ),
                    _ => {}
                }
                drop(stream);
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _places = places;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = outcome {
                debug!(%peer, %error, "connection ended");
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// Read `request`'s whole body within `timeout` before it goes on to its
/// handler (see the module's "Body deadline"). Layered inside the token
/// and host checks (`api::router`): a request they refuse is answered
/// without its body being read.
pub(super) async fn read_body_within(request: Request, next: Next, timeout: Duration) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return closing(ApiError::too_large().into_response());
    }
    if request.body().size_hint().exact() == Some(0) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(error)) if over_limit(&error) => closing(ApiError::too_large().into_response()),
        Ok(Err(error)) => {
            ApiError::invalid(format!("cannot read the request body: {error}")).into_response()
        }
        Err(_) => closing(
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms of its head",
                    timeout.as_millis()
                ),
            )
            .into_response(),
        ),
    }
}

/// `response`, saying that the connection closes after it: the rest of
/// the request's body is not read, so the connection cannot carry another
/// request, and a client that did not know would send its next one into
/// a closed connection.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// Whether reading a body failed because it is longer than the limit.
fn over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}
