//! `eretes ls` and `GET /v1/tasks` against a real agent: every acknowledged
//! submit and removal is in the very next list (the list is served from the
//! agent's watch-kept index), pages go on where the last stopped, and bad
//! list arguments are refused clearly.

mod common;

use common::Agent;
use serde_json::Value;

fn listed_ids(agent: &Agent, args: &[&str]) -> Vec<String> {
    let mut all = vec!["ls", "--json"];
    all.extend_from_slice(args);
    let listed: Value = serde_json::from_str(&agent.ok(&all)).unwrap();
    listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_hold_every_acknowledged_write_and_page_on() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    // Nobody serves the group: the tasks stay pending and listed.
    let http = reqwest::Client::new();
    let mut expected = Vec::new();
    for n in 0..30 {
        let id = format!("t{n:02}");
        let submitted = http
            .post(format!("{}/v1/tasks", agent.url))
            .json(&serde_json::json!({"id": id, "group": "nobody", "program": "true"}))
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status(), 201);
        expected.push(id);
        let page: Value = http
            .get(format!("{}/v1/tasks?limit=1000", agent.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = page["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, expected, "the list right after submitting {n}");
    }
    agent.ok(&["rm", "t05"]);
    expected.retain(|id| id != "t05");
    assert_eq!(listed_ids(&agent, &[]), expected);

    // --limit stops early and says where to go on; --after goes on.
    let first = agent.cli(&["ls", "--limit", "12"]);
    assert!(first.status.success());
    let table = String::from_utf8(first.stdout).unwrap();
    assert_eq!(table.lines().count(), 13, "header and 12 rows: {table}");
    let stderr = String::from_utf8(first.stderr).unwrap();
    assert!(
        stderr.contains("more tasks follow: eretes ls --after t12"),
        "{stderr}"
    );
    let rest = listed_ids(&agent, &["--after", "t12"]);
    assert_eq!(rest, expected[12..]);
    let last = agent.cli(&["ls", "--after", "t20", "--limit", "9"]);
    assert!(String::from_utf8(last.stderr).unwrap().is_empty());

    // Bad arguments, each named.
    for (args, expected) in [
        (&["ls", "--limit", "0"][..], "--limit"),
        (&["ls", "--after", "no spaces"][..], "no spaces"),
        (&["ls", "--state", "asleep"][..], "asleep"),
    ] {
        let output = agent.cli(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    for (query, expected) in [
        ("limit=1001", "limit 1001 is not between 1 and 1000"),
        ("after=%20", "after"),
        ("colour=red", "colour"),
    ] {
        let response = http
            .get(format!("{}/v1/tasks?{query}", agent.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body = response.text().await.unwrap();
        assert!(body.contains(expected), "{query}: {body}");
    }
}
