//! Clients cannot hold the agent: half-sent requests (heads or bodies) and
//! idle keep-alive connections are closed after the header-read timeout,
//! a declared body over the limit is refused before it is read,
//! connections past the cap are closed at once (logged once), and the API
//! keeps answering.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::Agent;

/// Whether the agent closes `stream` within `limit` (a read sees its end).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a response (408, say); its end follows
        }
    }
}

/// The agent's socket address (a name lookup per connection would be
/// slow enough, with hundreds of them, for the first to time out before the
/// last connects).
fn socket_address(agent: &Agent) -> std::net::SocketAddr {
    agent.url.trim_start_matches("http://").parse().unwrap()
}

/// The API answers a health check.
async fn assert_answers(agent: &Agent) {
    let health = reqwest::Client::new()
        .get(format!("{}/healthz", agent.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_idle_connections_are_closed_and_the_api_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        // Long enough that all 300 connect before the first times out.
        &["--header-timeout-ms", "3000", "--max-connections", "200"],
    )
    .await;
    let address = socket_address(&agent);
    // 300 connections that each send half a request head and stop (to a
    // socket address: a name lookup per connection would be slow enough
    // for the first to time out before the last connects).
    let mut half_sent = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET /v1/tasks HTTP/1.1\r\nHost: {address}\r\n").as_bytes())
            .await
            .unwrap();
        half_sent.push(stream);
    }
    let mut closed = 0;
    for stream in &mut half_sent {
        if closed_within(stream, Duration::from_secs(15)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "every half-sent request is closed");
    assert_answers(&agent).await;
    let log = agent.log();
    assert_eq!(
        log.matches("connection cap is reached").count(),
        1,
        "one line per burst: {log}"
    );

    // A keep-alive connection served once, then idle, is closed too.
    let mut idle = TcpStream::connect(address).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = [0u8; 1024];
    let read = idle.read(&mut response).await.unwrap();
    assert!(String::from_utf8_lossy(&response[..read]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut idle, Duration::from_secs(15)).await,
        "an idle keep-alive connection is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_start_with_the_open_file_limit_the_agent_was_given() {
    // The agent raises its own soft limit to the hard one for its
    // connections; its tasks must not inherit that.
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("sh");
    command.args(["-c", "ulimit -Sn 512; exec \"$0\" \"$@\"", common::BIN]);
    let agent = Agent::start_with(&dir.path().join("data"), &[], command).await;
    let agent_limits =
        std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let open_files = agent_limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    assert_ne!(open_files, "512", "the agent raised its own");
    agent.ok(&[
        "submit",
        "--id",
        "limits",
        "--wait",
        "--",
        "sh",
        "-c",
        "ulimit -Sn",
    ]);
    assert_eq!(agent.ok(&["logs", "limits"]), "512\n");
}

/// Everything `stream` receives until the agent closes it, if it does
/// within `limit`.
async fn answer_then_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&answer).into_owned()),
            Ok(Ok(read)) => answer.extend_from_slice(&buffer[..read]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_bodies_get_a_408_and_oversized_ones_a_413_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--header-timeout-ms", "2000"]).await;
    let address = socket_address(&agent);
    // 50 submissions that send a whole head and part of the body, then
    // stop: each held its connection for ever before.
    let mut half_sent = Vec::new();
    for i in 0..50 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /v1/tasks HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"id\": \"half-{i}\", "
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        half_sent.push(stream);
    }
    for stream in &mut half_sent {
        let answer = answer_then_close(stream, Duration::from_secs(15))
            .await
            .expect("a half-sent body's connection is closed");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within 2000 ms"), "{answer}");
    }
    // A declared length over the limit is refused before any body comes.
    let mut oversized = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: 104857600\r\n\r\n"
    );
    oversized.write_all(head.as_bytes()).await.unwrap();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(1), oversized.read(&mut buffer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buffer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Nothing was written, and the API answers.
    let listed = agent.ok(&["ls", "--json"]);
    assert!(!listed.contains("half-"), "{listed}");
    assert_answers(&agent).await;
}

/// A request the token check refuses is answered at once, its body unread:
/// the body deadline (and its buffer) is only for requests that pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--header-timeout-ms", "5000", "--token", "s3cret"],
    )
    .await;
    let address = socket_address(&agent);
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"id\": "
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buffer[..read]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// A connection to `address` from loopback address `from` (all of
/// 127.0.0.0/8 is this machine's, so each is a peer of its own).
async fn connect_from(from: [u8; 4], address: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(address).await.unwrap()
}

/// Send a health check on `stream`; whether a 200 came back.
async fn healthy_on(stream: &mut TcpStream, address: std::net::SocketAddr) -> bool {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = [0u8; 1024];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut response)).await {
        Ok(Ok(read)) => String::from_utf8_lossy(&response[..read]).starts_with("HTTP/1.1 200"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &[
            "--header-timeout-ms",
            "60000",
            "--max-connections",
            "20",
            "--max-connections-per-peer",
            "5",
        ],
    )
    .await;
    let address = socket_address(&agent);
    // One peer's five connections, each served and then kept open.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = connect_from([127, 0, 0, 2], address).await;
        assert!(healthy_on(&mut stream, address).await);
        held.push(stream);
    }
    // Its sixth is closed at once, unanswered.
    let mut sixth = connect_from([127, 0, 0, 2], address).await;
    assert!(!healthy_on(&mut sixth, address).await);
    assert!(closed_within(&mut sixth, Duration::from_secs(10)).await);
    // Another peer is served meanwhile.
    let mut other = connect_from([127, 0, 0, 3], address).await;
    assert!(
        healthy_on(&mut other, address).await,
        "another peer is served"
    );
    // Once one of the first peer's ends, it may open another.
    drop(held.pop());
    let log = agent.log();
    assert_eq!(
        log.matches("a peer holds as many API connections as one may")
            .count(),
        1,
        "{log}"
    );
    let mut again = None;
    for _ in 0..100 {
        let mut stream = connect_from([127, 0, 0, 2], address).await;
        if healthy_on(&mut stream, address).await {
            again = Some(stream);
            break;
        }
        // The agent sees the close a moment after the drop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a place freed is a place to take");
}
