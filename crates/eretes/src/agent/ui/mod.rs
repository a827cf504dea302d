//! The dashboard: an HTML page, its script and its style sheet, compiled
//! into the binary and served by the agent at `/ui/` (`/` redirects there).
//! No build step and no network: the files under `static/` are what the
//! browser gets. The page reads the same API as the CLI (`/v1/...`, see
//! [`super::api`] and [`super::live`]), with the token the user typed, sent
//! as a bearer token and kept in the tab's session storage, never in a URL.
//!
//! The files themselves hold no data, so they are served without a token;
//! every call the page makes is checked as any other.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::api::ApiState;

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const APP_CSS: &str = include_str!("static/app.css");

/// Scripts, styles and calls only from the agent itself; no inline script,
/// no framing (clickjacking of the action buttons).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The dashboard's routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

/// Whether `path` is one of the dashboard's static files (served without a
/// token: they hold no data).
pub fn is_static(path: &str) -> bool {
    matches!(path, "/" | "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        // A new agent binary serves new files at once.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
