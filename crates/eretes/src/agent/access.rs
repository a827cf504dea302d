//! Who may use the agent's API, checked before any handler runs.
//!
//! * **Tokens.** With `--token`, every endpoint but `/healthz` and
//!   `/readyz` needs `Authorization: Bearer <token>`: reads too, since a
//!   task's command line and output are nobody else's business. A
//!   `--read-token` opens the reading endpoints (`GET`, `HEAD`) and nothing
//!   else, for dashboards and scrapers; `--metrics-public` opens `/metrics`
//!   to anyone. Tokens are compared in constant time.
//! * **Host.** Without a token, only requests addressed to the agent's
//!   loopback address by name are served, reads included: a web page whose
//!   domain rebinds to 127.0.0.1 sends its own domain as `Host` and is
//!   refused (DNS rebinding).
//! * **Ambiguous requests** are refused whatever the settings: two `Host`
//!   headers, two `Authorization` headers, or an absolute-form request line
//!   (`GET http://other/...`) naming another host than `Host` does. Each
//!   could make a proxy and the agent disagree on who asked for what.
//!
//! The API speaks HTTP/1.1 only.

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::api::{ApiError, ApiState};

/// Who may call what; part of [`ApiState`].
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The token every call but the health checks needs, if any.
    pub token: Option<String>,
    /// A token that may only read, if any (needs `token`).
    pub read_token: Option<String>,
    /// Whether `/metrics` answers without a token.
    pub metrics_public: bool,
    /// The `Host` values requests must carry, when set (no token).
    pub allowed_hosts: Option<Vec<String>>,
}

/// Refuse ambiguous requests (see the module docs).
pub async fn refuse_ambiguous(request: Request, next: Next) -> Response {
    for name in [header::HOST, header::AUTHORIZATION] {
        if request.headers().get_all(&name).iter().count() > 1 {
            return twice(&name);
        }
    }
    if let Some(authority) = request.uri().authority() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok());
        if host != Some(authority.as_str()) {
            return ApiError::invalid(format!(
                "the request line names {:?} but Host is {:?}",
                authority.as_str(),
                host.unwrap_or("")
            ))
            .into_response();
        }
    }
    next.run(request).await
}

/// Refuse a change (any method but GET and HEAD) that a browser says it
/// sends on behalf of another site's page: `Sec-Fetch-Site: cross-site` or
/// `same-site`, or an `Origin` that is not this agent's `Host`. The
/// dashboard's own calls are same-origin; a foreign page has no business
/// steering tasks, whether or not the agent has a token (without one, its
/// browser on the agent's machine is on loopback). Clients that are not
/// browsers send neither header and are not affected.
pub async fn refuse_cross_site_changes(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    match cross_site(request.headers()) {
        Some(refusal) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal).into_response(),
        None => next.run(request).await,
    }
}

/// Why these request headers say the request comes from another site's
/// page, if they do.
fn cross_site(headers: &axum::http::HeaderMap) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let fetch_site = header("sec-fetch-site");
    let foreign_fetch = matches!(fetch_site, Some("cross-site" | "same-site"));
    let host = header("host").unwrap_or("");
    let foreign_origin = header("origin").is_some_and(|origin| {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or(origin);
        authority != host
    });
    (foreign_fetch || foreign_origin).then(|| {
        format!(
            "a change sent from another site's page is refused (Origin {:?}, Sec-Fetch-Site {:?})",
            header("origin").unwrap_or(""),
            fetch_site.unwrap_or("")
        )
    })
}

fn twice(name: &HeaderName) -> Response {
    ApiError::invalid(format!("the request has more than one {name} header")).into_response()
}

/// With a token configured, every call but the health checks needs it (or
/// the read token, for a read).
pub async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let access = &state.access;
    let Some(token) = &access.token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let open = matches!(path, "/healthz" | "/readyz")
        || (access.metrics_public && path == "/metrics")
        || super::ui::is_static(path);
    if open {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let reading = matches!(*request.method(), Method::GET | Method::HEAD);
    let granted = presented.is_some_and(|presented| {
        same(presented, token)
            || (reading
                && access
                    .read_token
                    .as_deref()
                    .is_some_and(|read| same(presented, read)))
    });
    if granted {
        return next.run(request).await;
    }
    let message = match (presented, reading) {
        (Some(_), false) if access.read_token.is_some() => {
            "this call changes something: it needs the agent's --token, not a read token"
        }
        _ => "this agent needs `Authorization: Bearer <token>` (--token; --read-token for reads)",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

/// Whether two tokens are equal, in time that does not depend on where
/// they differ.
fn same(presented: &str, token: &str) -> bool {
    presented.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Without a token, serve only requests addressed to this agent's loopback
/// address by name.
pub async fn check_host(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(allowed) = &state.access.allowed_hosts else {
        return next.run(request).await;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if allowed.iter().any(|ok| ok == host) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "Host {host:?} is not this agent's address ({}); start the agent with --token to serve other names",
                allowed.join(", ")
            ),
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cre", "s3cret"));
        assert!(!same("s3cret!", "s3cret"));
        assert!(!same("", "s3cret"));
    }
}
