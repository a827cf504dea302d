//! Who may use an agent's API: tokens for reads and changes, a read-only
//! token, public metrics, the Host check, and ambiguous requests refused.
//! Real agents, real HTTP on loopback (raw TCP where a client library would
//! not send the request at all).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

mod common;
use common::{Agent, BIN};

/// Send `request` (CRLF line ends added) to `agent` over a fresh
/// connection; the response's status code.
fn raw(agent: &Agent, request: &str) -> u16 {
    let address = agent.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let request = request.replace('\n', "\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// `METHOD path` with `Host` = the agent's address and `headers`.
fn call(agent: &Agent, method: &str, path: &str, headers: &[&str]) -> u16 {
    let host = agent.url.trim_start_matches("http://");
    let mut request = format!("{method} {path} HTTP/1.1\nHost: {host}\nConnection: close\n");
    for header in headers {
        request.push_str(header);
        request.push('\n');
    }
    if method == "POST" {
        let body = r#"{"program":"true"}"#;
        request.push_str(&format!(
            "Content-Type: application/json\nContent-Length: {}\n\n{body}",
            body.len()
        ));
    } else {
        request.push('\n');
    }
    raw(agent, &request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_reads_need_it_too_and_a_read_token_only_reads() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--token", "admin-t0ken", "--read-token", "reader-t0ken"],
    )
    .await;
    let admin = "Authorization: Bearer admin-t0ken";
    let reader = "Authorization: Bearer reader-t0ken";
    let wrong = "Authorization: Bearer admin-t0kem";
    assert_eq!(call(&agent, "POST", "/v1/tasks", &[admin]), 201);
    for path in ["/v1/tasks", "/v1/nodes", "/metrics", "/v1/tasks/x/logs"] {
        assert_eq!(
            call(&agent, "GET", path, &[]),
            401,
            "{path} without a token"
        );
        assert_eq!(
            call(&agent, "GET", path, &[wrong]),
            401,
            "{path}, wrong token"
        );
        let read = call(&agent, "GET", path, &[reader]);
        assert!(
            read == 200 || read == 404,
            "{path} with the read token: {read}"
        );
        assert_eq!(call(&agent, "GET", path, &[admin]), read, "{path} as admin");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(call(&agent, "GET", path, &[]), 200, "{path} is open");
    }
    // The read token changes nothing.
    assert_eq!(call(&agent, "POST", "/v1/tasks", &[reader]), 401);
    assert_eq!(call(&agent, "DELETE", "/v1/tasks/none", &[reader]), 401);

    // The CLI sends ERETES_TOKEN on every call.
    let ls = |token: Option<&str>| {
        let mut command = Command::new(BIN);
        command.arg("ls").env("ERETES_AGENT", &agent.url);
        match token {
            Some(token) => command.env("ERETES_TOKEN", token),
            None => command.env_remove("ERETES_TOKEN"),
        };
        command.output().unwrap()
    };
    let refused = ls(None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let listed = ls(Some("reader-t0ken"));
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_public_opens_metrics_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--token", "t0ken", "--metrics-public"],
    )
    .await;
    assert_eq!(call(&agent, "GET", "/metrics", &[]), 200);
    assert_eq!(call(&agent, "GET", "/v1/tasks", &[]), 401);
    // A read token needs a token to go with it.
    let refused = common::agent_refuses(&dir.path().join("other"), &["--read-token", "r"]);
    assert!(refused.contains("--token"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_and_foreign_hosts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let host = agent.url.trim_start_matches("http://").to_string();
    assert_eq!(call(&agent, "GET", "/v1/tasks", &[]), 200);
    // Without a token, reads too must name this agent (DNS rebinding).
    assert_eq!(
        raw(
            &agent,
            "GET /v1/tasks HTTP/1.1\nHost: evil.example\nConnection: close\n\n"
        ),
        403
    );
    // Two Host headers, either order.
    for (first, second) in [
        (host.as_str(), "evil.example"),
        ("evil.example", host.as_str()),
    ] {
        let request =
            format!("GET /v1/tasks HTTP/1.1\nHost: {first}\nHost: {second}\nConnection: close\n\n");
        assert_eq!(raw(&agent, &request), 400, "{request}");
    }
    // Two Authorization headers.
    assert_eq!(
        call(
            &agent,
            "GET",
            "/v1/tasks",
            &["Authorization: Bearer a", "Authorization: Bearer b"]
        ),
        400
    );
    // An absolute-form request line naming another host.
    let request =
        format!("GET http://evil.example/v1/tasks HTTP/1.1\nHost: {host}\nConnection: close\n\n");
    assert_eq!(raw(&agent, &request), 400);
    // Naming this one is fine.
    let request =
        format!("GET http://{host}/v1/tasks HTTP/1.1\nHost: {host}\nConnection: close\n\n");
    assert_eq!(raw(&agent, &request), 200);
    // A change a browser sends for another site's page is refused; the
    // same from the agent's own page (or from a client that is no browser)
    // goes through.
    for foreign in [
        "Origin: http://evil.example".to_string(),
        "Sec-Fetch-Site: cross-site".to_string(),
        "Sec-Fetch-Site: same-site".to_string(),
    ] {
        assert_eq!(
            call(&agent, "POST", "/v1/tasks", &[foreign.as_str()]),
            403,
            "{foreign}"
        );
    }
    let own = format!("Origin: http://{host}");
    assert_eq!(
        call(
            &agent,
            "POST",
            "/v1/tasks",
            &[own.as_str(), "Sec-Fetch-Site: same-origin"]
        ),
        201
    );
    // Reads are not changes.
    assert_eq!(
        call(&agent, "GET", "/v1/tasks", &["Sec-Fetch-Site: cross-site"]),
        200
    );
}
