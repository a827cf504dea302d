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

use std::future::Future;
use std::os::unix::process::CommandExt;
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
/// Longest a whole test lasts (a hung browser or driver fails it).
const TEST_LIMIT: Duration = Duration::from_secs(300);

/// One browser at a time: three Chromiums at once on a 2-core CI machine
/// would make every wait in them a race.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Run a test's body alone and within [`TEST_LIMIT`]; on timeout the body
/// is dropped, and with it the browser and the agent.
async fn bounded(body: impl Future<Output = ()>) {
    let _alone = ONE_BROWSER.lock().await;
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {TEST_LIMIT:?}"));
}

/// Kills chromedriver's process group, and every process started with the
/// test's browser profile (Chromium's own children may leave the group),
/// when dropped: on success, failure or timeout alike.
struct DriverGuard {
    driver: Child,
    profile: tempfile::TempDir,
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        let group = self.driver.id() as libc::pid_t;
        // SAFETY: killpg takes plain integers; the group is chromedriver's
        // own (process_group(0) at spawn).
        unsafe { libc::killpg(group, libc::SIGKILL) };
        let _ = self.driver.wait();
        let marker = self.profile.path().as_os_str().as_encoded_bytes().to_vec();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if cmdline.windows(marker.len()).any(|window| window == marker) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A headless Chromium under its chromedriver; both stopped when dropped.
struct Browser {
    client: Option<Client>,
    _driver: DriverGuard,
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
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let guard = DriverGuard {
            driver,
            profile: tempfile::tempdir().unwrap(),
        };
        let profile = guard.profile.path().to_path_buf();
        // The flags keep Chromium off the network (this machine's is
        // closed: without them it keeps trying Google's hosts).
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-breakpad", "--disable-crash-reporter",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
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
                        client: Some(client),
                        _driver: guard,
                    }
                }
                // chromedriver is still starting.
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no WebDriver session after 100 tries: {last_error}");
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// The browser's console since the last call: `(level, source, message)`.
    async fn console(&self) -> Vec<(String, String, String)> {
        let entries = self.client().issue_cmd(BrowserLog).await.unwrap();
        let entries = entries
            .as_array()
            .unwrap_or_else(|| panic!("the console log is no list: {entries}"));
        entries
            .iter()
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

    /// How many elements `css` selects now.
    async fn count(&self, css: &str) -> usize {
        self.client()
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("finding {css}: {error}"))
            .len()
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

/// Assert the console holds no error, then that it can: a probe error
/// written now is what the next read finds (so an empty log means quiet,
/// not deaf).
async fn assert_console_clean(browser: &Browser, allow_network: bool) {
    let console = browser.console().await;
    let errors: Vec<_> = console
        .iter()
        .filter(|(level, source, _)| level == "SEVERE" && !(allow_network && source == "network"))
        .collect();
    assert!(errors.is_empty(), "errors in the console: {errors:?}");
    browser
        .client()
        .execute("console.error('eretes-console-probe');", vec![])
        .await
        .unwrap();
    let probed = browser.console().await;
    assert!(
        probed.iter().any(
            |(level, _, message)| level == "SEVERE" && message.contains("eretes-console-probe")
        ),
        "the console probe was not seen: {probed:?}"
    );
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

/// The highest `tick-N` in a log's text.
fn last_tick(log: &str) -> u32 {
    log.split_whitespace()
        .filter_map(|word| word.strip_prefix("tick-")?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_tasks_and_steers_them() {
    bounded(shows_live_tasks_and_steers_them()).await;
}

async fn shows_live_tasks_and_steers_them() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"), &[]).await;
    // The static files carry their content security policy.
    let page_response = reqwest::get(format!("{}/ui/", agent.url)).await.unwrap();
    let policy = page_response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");

    agent.ok(&[
        "submit",
        "--id",
        "hello",
        "--",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done",
    ]);
    agent.ok(&["submit", "--id", "quick", "--", "true"]);
    for n in 1..=3 {
        agent.ok(&["submit", "--id", &format!("idle-{n}"), "--", "sleep", "600"]);
    }
    // Markup in a task's command and output is shown as text, never run.
    let markup = "<img src=x onerror=window.injected=1>";
    agent.ok(&[
        "submit",
        "--id",
        "markup",
        "--",
        "sh",
        "-c",
        &format!("echo '{markup}'; exec sleep 600"),
    ]);
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
    browser
        .text_when(r#"#tasks tr[data-id="markup"] td.command"#, |s| {
            s.contains(markup)
        })
        .await;
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

    // Found by its id: its facts, its runs, and its log followed live (a
    // line printed after the page opened shows up on it).
    page.find(Locator::Css("#search-id"))
        .await
        .unwrap()
        .send_keys("hello")
        .await
        .unwrap();
    browser.click("#search-go").await;
    let first = last_tick(
        &browser
            .text_when("#task-log", |log| last_tick(log) > 0)
            .await,
    );
    browser
        .text_when("#task-log", |log| last_tick(log) > first)
        .await;
    browser
        .text_when("#task-runs tbody", |runs| runs.contains("started"))
        .await;
    browser.screenshot("task").await;

    // Pause and resume from the page: the CLI sees each, and so does the
    // page.
    browser.click("#action-pause").await;
    wait_cli_state(&agent, "hello", "paused").await;
    browser
        .text_when(r#"[data-fact="state"]"#, |s| s == "paused")
        .await;
    browser
        .text_when("#task-runs tbody", |runs| runs.contains("paused"))
        .await;
    browser.click("#action-resume").await;
    wait_cli_state(&agent, "hello", "running").await;
    browser
        .text_when(r#"[data-fact="state"]"#, |s| s == "running")
        .await;

    // The task with markup: its output is text too; kill it, then remove it.
    page.goto(&format!("{}/ui/#/task/markup", agent.url))
        .await
        .unwrap();
    browser
        .text_when("#task-log", |log| log.contains(markup))
        .await;
    browser.click("#action-kill").await;
    wait_cli_state(&agent, "markup", "killed").await;
    browser
        .text_when(r#"[data-fact="state"]"#, |s| s == "killed")
        .await;
    browser.click("#action-remove").await;
    browser
        .text_when("#action-remove", |s| s.contains("Really"))
        .await;
    browser.click("#action-remove").await;
    browser
        .text_when("#notice", |s| s.contains("removed markup"))
        .await;
    let gone = agent.cli(&["show", "markup"]);
    assert!(!gone.status.success(), "markup is still there");
    let injected = page
        .execute("return window.injected === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(injected, json!(true), "markup in a task ran as HTML");

    // Nodes: freeze and unfreeze, then drain this agent's node.
    browser.click("#nav-nodes").await;
    let node_row = r#"#nodes tr[data-node="a1"]"#;
    browser
        .text_when(&format!("{node_row} td.running"), |s| s == "5")
        .await;
    browser
        .click(&format!(r#"{node_row} button[data-command="freeze"]"#))
        .await;
    browser
        .text_when(&format!("{node_row} td.frozen"), |s| s == "frozen")
        .await;
    browser
        .click(&format!(r#"{node_row} button[data-command="unfreeze"]"#))
        .await;
    browser
        .text_when(&format!("{node_row} td.frozen"), |s| s == "claiming")
        .await;
    browser.screenshot("nodes").await;
    browser
        .click(&format!(r#"{node_row} button[data-command="drain"]"#))
        .await;
    // Drained: the node let its tasks go and claims none (the only node).
    for id in ["hello", "idle-1", "idle-2", "idle-3", "late"] {
        wait_cli_state(&agent, id, "pending").await;
    }
    browser
        .text_when(&format!("{node_row} td.frozen"), |s| s == "frozen")
        .await;

    // The cluster's counts, and the rates drawn from the samples.
    browser.click("#nav-cluster").await;
    browser
        .text_when(r#"#state-counts [data-state="pending"] .n"#, |s| s == "5")
        .await;
    let points = page
        .find(Locator::Css("#chart-claims polyline"))
        .await
        .unwrap()
        .attr("points")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(points.split_whitespace().count() >= 2, "{points:?}");
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
    // Submissions past the last row keep asking the page to refresh while
    // it is paged: a click during a refresh must still move the page.
    let (stop_churn, mut churn_stopped) = tokio::sync::oneshot::channel::<()>();
    let churn = tokio::spawn({
        let http = http.clone();
        let url = agent.url.clone();
        async move {
            for n in 0..2_000 {
                if churn_stopped.try_recv().is_ok() {
                    return n;
                }
                http.post(format!("{url}/v1/tasks"))
                    .json(
                        &json!({ "id": format!("zz-{n:04}"), "group": "churn", "program": "true" }),
                    )
                    .send()
                    .await
                    .unwrap()
                    .error_for_status()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            2_000
        }
    });
    // Back and forth a few times: each click has a chance to land while
    // the page refreshes.
    for round in 0..6 {
        browser.click("#page-next").await;
        browser
            .text_when("#page-status", |s| s == "page 2, 30 tasks")
            .await;
        browser
            .text_when(&state_of("many-129"), |s| s == "pending")
            .await;
        if round == 0 {
            let rows = browser.count("#tasks tbody tr").await;
            assert_eq!(rows, 30);
        }
        browser.click("#page-prev").await;
        browser
            .text_when("#page-status", |s| s == "page 1, 100 tasks")
            .await;
        browser
            .text_when(&state_of("many-000"), |s| s == "pending")
            .await;
    }
    let _ = stop_churn.send(());
    let churned = churn.await.unwrap();
    assert!(churned > 0, "no submission churned the page");

    assert_console_clean(&browser, false).await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_says_when_an_action_is_refused() {
    bounded(asks_for_the_token_and_says_when_refused()).await;
}

async fn asks_for_the_token_and_says_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--token", "write-secret", "--read-token", "read-secret"],
    )
    .await;
    let cli = |args: &[&str], token: &str| {
        Command::new(BIN)
            .args(args)
            .env("ERETES_AGENT", &agent.url)
            .env("ERETES_TOKEN", token)
            .output()
            .unwrap()
    };
    let submitted = cli(
        &["submit", "--id", "guarded", "--", "sleep", "600"],
        "write-secret",
    );
    assert!(submitted.status.success(), "{submitted:?}");
    let state = |cli_output: std::process::Output| {
        let shown: Value = serde_json::from_slice(&cli_output.stdout).unwrap();
        shown["state"].as_str().unwrap().to_string()
    };
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
    let now = cli(&["show", "--json", "guarded"], "read-secret");
    assert_eq!(state(now), "running");

    // The token is kept in this tab only, and never went into a URL.
    let kept = page
        .execute(
            "return [location.href, document.referrer, localStorage.length, \
             sessionStorage.getItem('eretes.token')];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept[2], json!(0), "{kept}");
    assert_eq!(kept[3], json!("read-secret"), "{kept}");
    for url in [&kept[0], &kept[1]] {
        assert!(!url.as_str().unwrap_or("").contains("secret"), "{kept}");
    }

    // With the agent's own token, the same button acts.
    page.execute(
        "sessionStorage.setItem('eretes.token', 'write-secret');",
        vec![],
    )
    .await
    .unwrap();
    page.refresh().await.unwrap();
    browser.click("#action-pause").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while state(cli(&["show", "--json", "guarded"], "read-secret")) != "paused" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pause with the token never took"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The refusals are network answers in the console, not script errors.
    assert_console_clean(&browser, true).await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_graph_is_drawn_with_its_tasks_states() {
    bounded(draws_a_task_graph()).await;
}

async fn draws_a_task_graph() {
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
    let drawn = browser
        .count(r#"svg.topology g.graph-task[data-state="pending"]"#)
        .await;
    assert_eq!(drawn, 7, "every task drawn, coloured as pending");
    let edges = browser.count("svg.topology line.graph-edge").await;
    assert_eq!(edges, 6);
    browser.screenshot("graph").await;
    // A task of the graph opens its page.
    browser
        .click(r#"svg.topology g.graph-task[data-index="3"]"#)
        .await;
    browser
        .text_when("#task-title", |s| s.contains("tree.3"))
        .await;
    assert_console_clean(&browser, false).await;
    browser.close().await;
    drop(agent);
    common::remove_namespace(&ns).await;
}
