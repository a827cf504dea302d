//! The dashboard in a real browser: Debian's headless Chromium, driven by
//! its chromedriver through WebDriver, against a real `eretes agent` whose
//! tasks are submitted and checked with the CLI.
//!
//! WebDriver client: fantoccini. It is async on tokio and hyper like the
//! rest of the project, so the tests keep one runtime and need no TLS stack
//! (it connects to the local chromedriver through a plain HTTP connector);
//! thirtyfour would bring its own HTTP client for the same work.
//!
//! `scripts/test.sh` installs `chromium` and `chromium-driver`; without
//! them these tests fail and say so, they never skip. With
//! `ERETES_SCREENSHOTS=1` the first test writes a screenshot of each view
//! to `docs/dashboard/` (the ones the README shows).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Agent, BIN};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest any one wait on the page lasts.
const PATIENCE: Duration = Duration::from_secs(30);

/// A headless Chromium under its chromedriver; both stopped when dropped.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for path in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: run scripts/test.sh, which installs chromium and chromium-driver"
            );
        }
        let port = eretes_etcd::testing::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::tempdir().unwrap();
        // The flags keep Chromium off the network (this machine's is
        // closed: without them it keeps trying Google's hosts).
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let capabilities = capabilities.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut last_error = String::new();
        for _ in 0..100 {
            match ClientBuilder::new(connector.clone())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => {
                    return Browser {
                        driver,
                        client: Some(client),
                        _profile: profile,
                    }
                }
                // chromedriver is still starting.
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no WebDriver session within 10 s: {last_error}");
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// The browser's console since the last call: `(level, source, message)`.
    async fn console(&self) -> Vec<(String, String, String)> {
        let entries = self.client().issue_cmd(BrowserLog).await.unwrap();
        entries
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|entry| {
                let field = |name: &str| entry[name].as_str().unwrap_or("").to_string();
                (field("level"), field("source"), field("message"))
            })
            .collect()
    }

    /// The text of the first element `css` selects, once `wanted` holds
    /// for it (bounded by [`PATIENCE`]).
    async fn text_when(&self, css: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if let Ok(element) = self.client().find(Locator::Css(css)).await {
                if let Ok(text) = element.text().await {
                    if wanted(&text) {
                        return text;
                    }
                    last = Some(text);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{css} never showed what was wanted (last: {last:?}); console: {:?}",
            self.console().await
        );
    }

    /// Click the element `css` selects; again if the page redrew it
    /// between the find and the click (a stale element).
    async fn click(&self, css: &str) {
        let mut last_error = String::new();
        for _ in 0..50 {
            self.text_when(css, |_| true).await;
            let element = self.client().find(Locator::Css(css)).await;
            match element {
                Ok(element) => match element.click().await {
                    Ok(_) => return,
                    Err(error) => last_error = error.to_string(),
                },
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("clicking {css}: {last_error}");
    }

    /// A screenshot of the page as it is, kept under docs/dashboard/ when
    /// ERETES_SCREENSHOTS is set.
    async fn screenshot(&self, name: &str) {
        let png = self.client().screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        if std::env::var_os("ERETES_SCREENSHOTS").is_some() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// chromedriver's `POST /session/{id}/se/log` for the browser's console.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// The task's state as the CLI reports it.
fn cli_state(agent: &Agent, id: &str) -> String {
    let shown: Value = serde_json::from_str(&agent.ok(&["show", "--json", id])).unwrap();
    shown["state"].as_str().unwrap().to_string()
}

async fn wait_cli_state(agent: &Agent, id: &str, wanted: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cli_state(agent, id) != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {wanted} (it is {})",
            cli_state(agent, id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of(id: &str) -> String {
    format!(r#"#tasks tr[data-id="{id}"] td.state"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_tasks_and_steers_them() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"), &[]).await;
    agent.ok(&[
        "submit",
        "--id",
        "hello",
        "--",
        "sh",
        "-c",
        "echo hello-from-the-task; exec sleep 600",
    ]);
    agent.ok(&["submit", "--id", "quick", "--", "true"]);
    for n in 1..=3 {
        agent.ok(&["submit", "--id", &format!("idle-{n}"), "--", "sleep", "600"]);
    }
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&format!("{}/ui/", agent.url)).await.unwrap();

    // The tasks, with the states the CLI gives them.
    browser
        .text_when(&state_of("hello"), |s| s == "running")
        .await;
    browser.text_when(&state_of("quick"), |s| s == "done").await;
    for n in 1..=3 {
        browser
            .text_when(&state_of(&format!("idle-{n}")), |s| s == "running")
            .await;
    }
    let node = browser
        .text_when(r#"#tasks tr[data-id="hello"] td.node"#, |s| !s.is_empty())
        .await;
    assert_eq!(node, "a1");
    browser.screenshot("tasks").await;

    // A task submitted now appears without a reload: a mark set on this
    // document is still there when the row is.
    page.execute("window.notReloaded = true;", vec![])
        .await
        .unwrap();
    agent.ok(&["submit", "--id", "late", "--", "sleep", "600"]);
    browser
        .text_when(&state_of("late"), |s| s == "running")
        .await;
    let same_document = page
        .execute("return window.notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(same_document, json!(true), "the page was reloaded");

    // A task's page: its facts, its runs and its log's tail.
    browser
        .click(r##"#tasks tr[data-id="hello"] td.id a"##)
        .await;
    browser
        .text_when("#task-log", |log| log.contains("hello-from-the-task"))
        .await;
    browser
        .text_when("#task-runs tbody", |runs| runs.contains("started"))
        .await;
    browser.screenshot("task").await;

    // Pause from the page: the CLI sees it, and so does the page.
    browser.click("#action-pause").await;
    wait_cli_state(&agent, "hello", "paused").await;
    browser
        .text_when(r#"[data-fact="state"]"#, |s| s == "paused")
        .await;
    browser
        .text_when("#task-runs tbody", |runs| runs.contains("paused"))
        .await;

    // Nodes: drain this agent's node from the page.
    browser.click("#nav-nodes").await;
    browser
        // The paused task stays with its node.
        .text_when(r#"#nodes tr[data-node="a1"] td.running"#, |s| s == "5")
        .await;
    browser.screenshot("nodes").await;
    browser
        .click(r#"#nodes tr[data-node="a1"] button[data-command="drain"]"#)
        .await;
    // Drained: the node let its tasks go and claims none (the only node).
    for id in ["idle-1", "idle-2", "idle-3", "late"] {
        wait_cli_state(&agent, id, "pending").await;
    }
    browser
        .text_when(r#"#nodes tr[data-node="a1"] td.frozen"#, |s| s == "frozen")
        .await;

    // The cluster's counts.
    browser.click("#nav-cluster").await;
    browser
        .text_when(r#"#state-counts [data-state="pending"] .n"#, |s| s == "4")
        .await;
    browser
        .text_when("#chart-claims", |s| s.contains("/s"))
        .await;
    browser.screenshot("cluster").await;

    // Pages: 130 tasks of a group nobody serves, 100 to a page, filtered
    // by group and state.
    let http = reqwest::Client::new();
    for n in 0..130 {
        http.post(format!("{}/v1/tasks", agent.url))
            .json(&json!({ "id": format!("many-{n:03}"), "group": "elsewhere", "program": "true" }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }
    page.goto(&format!(
        "{}/ui/#/tasks?group=elsewhere&state=pending",
        agent.url
    ))
    .await
    .unwrap();
    browser
        .text_when("#page-status", |s| s == "page 1, 100 tasks")
        .await;
    browser
        .text_when(&state_of("many-099"), |s| s == "pending")
        .await;
    browser.click("#page-next").await;
    browser
        .text_when("#page-status", |s| s == "page 2, 30 tasks")
        .await;
    browser
        .text_when(&state_of("many-129"), |s| s == "pending")
        .await;
    let rows = page
        .find_all(Locator::Css("#tasks tbody tr"))
        .await
        .unwrap()
        .len();
    assert_eq!(rows, 30);

    let console = browser.console().await;
    let errors: Vec<_> = console
        .iter()
        .filter(|(level, _, _)| level == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "errors in the console: {errors:?}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_says_when_an_action_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--token", "write-secret", "--read-token", "read-secret"],
    )
    .await;
    let submitted = Command::new(BIN)
        .args(["submit", "--id", "guarded", "--", "sleep", "600"])
        .env("ERETES_AGENT", &agent.url)
        .env("ERETES_TOKEN", "write-secret")
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{submitted:?}");
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&format!("{}/ui/", agent.url)).await.unwrap();

    // Without a token nothing is shown but the request for one.
    browser
        .text_when("#token-form", |s| s.contains("token"))
        .await;
    let asked = page
        .find(Locator::Css("#token-form"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap();
    assert!(asked, "the page did not ask for the token");

    // The read token shows the tasks...
    page.find(Locator::Css("#token-input"))
        .await
        .unwrap()
        .send_keys("read-secret")
        .await
        .unwrap();
    browser.click("#token-submit").await;
    browser
        .text_when(&state_of("guarded"), |s| s == "running")
        .await;

    // ...but an action needs the agent's token: refused, and said so.
    browser
        .click(r##"#tasks tr[data-id="guarded"] td.id a"##)
        .await;
    browser.click("#action-pause").await;
    let said = browser
        .text_when("#notice", |s| s.contains("refused"))
        .await;
    assert!(said.contains("--token"), "{said}");
    let guarded = Command::new(BIN)
        .args(["show", "--json", "guarded"])
        .env("ERETES_AGENT", &agent.url)
        .env("ERETES_TOKEN", "read-secret")
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&guarded.stdout).unwrap();
    assert_eq!(shown["state"], "running", "{shown}");

    // The token never went into a URL.
    let url = page.current_url().await.unwrap();
    assert!(!url.as_str().contains("secret"), "{url}");

    // The refusals are network answers in the console, not script errors.
    let console = browser.console().await;
    let script_errors: Vec<_> = console
        .iter()
        .filter(|(level, source, _)| level == "SEVERE" && source != "network")
        .collect();
    assert!(script_errors.is_empty(), "script errors: {script_errors:?}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_graph_is_drawn_with_its_tasks_states() {
    use eretes_graph::{regression::Regression, JobName, JobSpec, Jobs};
    use eretes_protocol::{Coordinator, GroupName, Namespace};

    let ns = format!("dashboard-graph-{}", std::process::id());
    common::remove_namespace(&ns).await;
    let url = eretes_etcd::testing::test_etcd_url();
    let dir = tempfile::tempdir().unwrap();
    // The agent serves `default`; the job's tasks are of group `graph`,
    // which no node serves here: they stay pending.
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--etcd", &url, "--namespace", &ns],
    )
    .await;
    let store = eretes_etcd::testing::connect_test_etcd().await;
    let jobs = Jobs::new(Coordinator::new(store, Namespace::new(&ns).unwrap()));
    let spec = JobSpec {
        kind: "regression".into(),
        tasks: 7,
        group: GroupName::new("graph").unwrap(),
        properties: Regression::properties(10),
        backups: 0,
    };
    jobs.start(&JobName::new("tree").unwrap(), &spec)
        .await
        .unwrap();

    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&format!("{}/ui/#/graphs", agent.url))
        .await
        .unwrap();
    browser
        .text_when(r#"#jobs tr[data-job="tree"]"#, |s| s.contains("regression"))
        .await;
    browser.click(r##"#jobs tr[data-job="tree"] a"##).await;
    browser
        .text_when("#graph-facts", |s| s.contains("7 tasks, 6 links"))
        .await;
    let drawn = page
        .find_all(Locator::Css(
            r#"svg.topology g.graph-task[data-state="pending"]"#,
        ))
        .await
        .unwrap()
        .len();
    assert_eq!(drawn, 7, "every task drawn, coloured as pending");
    let edges = page
        .find_all(Locator::Css("svg.topology line.graph-edge"))
        .await
        .unwrap()
        .len();
    assert_eq!(edges, 6);
    browser.screenshot("graph").await;
    // A task of the graph opens its page.
    browser
        .click(r#"svg.topology g.graph-task[data-index="3"]"#)
        .await;
    browser
        .text_when("#task-title", |s| s.contains("tree.3"))
        .await;
    let console = browser.console().await;
    let errors: Vec<_> = console
        .iter()
        .filter(|(level, _, _)| level == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "errors in the console: {errors:?}");
    browser.close().await;
    drop(agent);
    common::remove_namespace(&ns).await;
}
