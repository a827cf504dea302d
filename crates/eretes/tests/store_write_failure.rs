//! An agent whose embedded store cannot write (its file may not grow: the
//! test lowers the agent's RLIMIT_FSIZE, so the store's writes fail with
//! EFBIG as on a full disk): submits answer 503 with the reason, reads go
//! on, `/readyz` answers 503 from the first failed write, and everything
//! works again once the file may grow, without a restart.

use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::Agent;

/// Set process `pid`'s soft file-size limit to `bytes`; the limit it had.
fn limit_file_size(pid: i32, bytes: libc::rlim_t) -> libc::rlim_t {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes plain structs; a null new limit
    // only reads the current one.
    unsafe {
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: bytes.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    old.rlim_cur
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    let response = http.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_store_cannot_write_serves_reads_is_unready_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]).await;
    let http = reqwest::Client::new();

    // The agent ignores SIGXFSZ; its tasks do not.
    agent.ok(&[
        "submit",
        "--id",
        "signals",
        "--wait",
        "--",
        "grep",
        "SigIgn",
        "/proc/self/status",
    ]);
    let line = agent.ok(&["logs", "signals"]);
    let ignored = u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16)
        .unwrap_or_else(|_| panic!("{line:?}"));
    assert_eq!(ignored & (1 << (libc::SIGXFSZ - 1)), 0, "{line}");

    // The store's file may not grow any more: submit until one fails. The
    // tasks are for a group nobody serves, so that only submits write.
    let pid = agent.child.id() as i32;
    let size = std::fs::metadata(data.join("store.redb")).unwrap().len();
    let unlimited = limit_file_size(pid, size);
    let filler = "x".repeat(8192);
    let submit = |id: String| {
        http.post(format!("{}/v1/tasks", agent.url))
            .json(&json!({"id": id, "group": "parked", "program": "true", "args": [filler]}))
            .send()
    };
    let mut acked = Vec::new();
    let (refused, why) = loop {
        assert!(acked.len() < 3000, "3000 submits did not grow the file");
        let id = format!("fill-{:04}", acked.len());
        let response = submit(id.clone()).await.unwrap();
        match response.status().as_u16() {
            201 => acked.push(id),
            503 => break (id, response.text().await.unwrap()),
            other => panic!("submit {id}: {other} {}", response.text().await.unwrap()),
        }
    };
    assert!(
        why.contains("store.redb") && why.contains("File too large"),
        "{why}"
    );
    let (status, body) = get(&http, format!("{}/readyz", agent.url)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("File too large"), "{body}");

    // Reads go on, and the refused task is not there.
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent died");
    assert!(agent.ok(&["ls"]).contains(&acked[0]));
    let shown: Value =
        serde_json::from_str(&agent.ok(&["show", acked.last().unwrap(), "--json"])).unwrap();
    assert_eq!(shown["state"], "pending");
    let (status, body) = get(&http, format!("{}/v1/tasks/{refused}", agent.url)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(&http, format!("{}/metrics", agent.url)).await;
    assert_eq!(status, 200, "{body}");
    // Still refused a while later (the store retries its file, and fails).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let response = submit(refused.clone()).await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(get(&http, format!("{}/readyz", agent.url)).await.0, 503);

    // Room again: ready again by itself, and submits work.
    limit_file_size(pid, unlimited);
    let mut ready = false;
    for _ in 0..100 {
        if get(&http, format!("{}/readyz", agent.url)).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "not ready 10 s after the limit was lifted: {}",
        agent.log()
    );
    let response = submit(refused.clone()).await.unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let shown: Value = serde_json::from_str(&agent.ok(&["show", &refused, "--json"])).unwrap();
    assert_eq!(shown["state"], "pending");
    assert!(agent.log().contains("writes again"), "{}", agent.log());
}
