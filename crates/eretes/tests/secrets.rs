//! The agent's secrets stay the agent's: a task gets a clean environment
//! (no token, no etcd password, no stray API key of the agent's), cannot
//! read the agent's /proc entries, and finds no token on its command line.
//! The agent runs as an unprivileged user (dropped to `nobody` with
//! `setpriv` when the tests run as root), like the tasks it starts: the
//! case where the kernel alone would not keep them apart.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

mod common;
use common::{Agent, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_gets_a_clean_environment_and_cannot_read_the_agents_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let open = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(dir.path(), 0o777);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-t0ken\n").unwrap();
    open(&token_file, 0o644);
    let data = dir.path().join("data");

    // SAFETY: geteuid(2) has no preconditions.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        setpriv
    } else {
        Command::new(BIN)
    };
    command
        .env("SOME_API_KEY", "leak-me")
        .env("KEEP_ME", "kept")
        .env("ERETES_READ_TOKEN", "read-leak")
        .env("ERETES_ETCD_PASSWORD", "etcd-leak");
    let token = token_file.to_str().unwrap();
    let agent = Agent::start_with(
        &data,
        &["--token-file", token, "--pass-env", "KEEP_ME"],
        command,
    )
    .await;

    let out = dir.path().display().to_string();
    let script = format!(
        "env > {out}/env.txt; \
         agent=$(awk '{{print $4}}' /proc/$PPID/stat); \
         cat /proc/$agent/environ > {out}/agent-environ.txt 2> {out}/agent-environ.err; \
         tr '\\0' ' ' < /proc/$agent/cmdline > {out}/agent-cmdline.txt; true"
    );
    let submit = Command::new(BIN)
        .args(["submit", "--wait", "--", "sh", "-c", &script])
        .env("ERETES_AGENT", &agent.url)
        .env("ERETES_TOKEN", "file-t0ken")
        .output()
        .unwrap();
    assert!(submit.status.success(), "{submit:?}\n{}", agent.log());

    let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
    for present in [
        "PATH=",
        "HOME=",
        "KEEP_ME=kept",
        "ERETES_TASK_ID=",
        "ERETES_EPOCH=",
    ] {
        assert!(
            env.lines().any(|line| line.starts_with(present)),
            "{present} in:\n{env}"
        );
    }
    for absent in ["leak-me", "file-t0ken", "read-leak", "etcd-leak"] {
        assert!(!env.contains(absent), "{absent} leaked into:\n{env}");
    }
    let environ = std::fs::read(dir.path().join("agent-environ.txt")).unwrap_or_default();
    assert!(environ.is_empty(), "the task read the agent's environ");
    let refused = std::fs::read_to_string(dir.path().join("agent-environ.err")).unwrap();
    assert!(refused.contains("Permission denied"), "{refused}");
    let cmdline = std::fs::read_to_string(dir.path().join("agent-cmdline.txt")).unwrap();
    assert!(
        cmdline.contains("agent") && !cmdline.contains("file-t0ken"),
        "{cmdline}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    for (args, expected) in [
        (
            vec!["--token-file", "/nonexistent/token"],
            "--token-file /nonexistent/token",
        ),
        (vec!["--token-file", empty.to_str().unwrap()], "is empty"),
        (
            vec!["--token", "a", "--token-file", empty.to_str().unwrap()],
            "not both",
        ),
        (vec!["--read-token", "r"], "--read-token needs --token"),
        (vec!["--token", " "], "--token (or ERETES_TOKEN) is empty"),
        (
            vec!["--token", "a\nb"],
            "--token: a token is visible ASCII characters only",
        ),
        (
            vec!["--token", "t", "--read-token", "r s"],
            "--read-token: a token is visible ASCII",
        ),
        (
            vec!["--token", "same", "--read-token", "same"],
            "--read-token is the same as --token",
        ),
        (vec!["--pass-env", "A=B"], "--pass-env \"A=B\""),
        (vec!["--pass-env", "ERETES_TOKEN"], "not one of eretes' own"),
        (
            vec!["--allow-env", "A=B"],
            "--allow-env \"A=B\": a variable name",
        ),
        (
            vec!["--allow-env", "1A"],
            "--allow-env \"1A\": a variable name",
        ),
        (
            vec!["--allow", "sh,,true"],
            "--allow \"\": not a program name",
        ),
        (
            vec!["--allow-env", "FOO"],
            "--allow-env applies only with --allow",
        ),
        (
            vec!["--log-retention", "0s"],
            "--log-retention 0s: at least 1s",
        ),
    ] {
        let stderr = common::agent_refuses(&dir.path().join("data"), &args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
