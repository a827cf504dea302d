//! `eretes submit --env KEY=VALUE --timeout DURATION`: what a task's spec
//! sets for it, shown by `show`, and refused clearly when malformed.

mod common;
use common::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_sets_env_and_timeout_and_show_tells_them() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let done = agent.ok(&[
        "submit",
        "--id",
        "envy",
        "--env",
        "A=1",
        "--env",
        "B=two words",
        "--timeout",
        "1m",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo \"$A|$B\"",
    ]);
    assert_eq!(done, "envy done (exit code 0)\n");
    assert_eq!(agent.ok(&["logs", "envy"]), "1|two words\n");
    let shown = agent.ok(&["show", "envy"]);
    assert!(shown.contains("env:       A=1 B=two words"), "{shown}");
    assert!(shown.contains("timeout:   1m per attempt"), "{shown}");

    for (args, expected) in [
        (
            &["submit", "--env", "NOEQUALS", "--", "true"][..],
            "--env \"NOEQUALS\" is not KEY=VALUE",
        ),
        (
            &["submit", "--env", "1X=a", "--", "true"][..],
            "env name \"1X\"",
        ),
        (
            &["submit", "--env", "ERETES_NODE=x", "--", "true"][..],
            "eretes' own",
        ),
        (
            &["submit", "--timeout", "0s", "--", "true"][..],
            "--timeout must be at least 1ms",
        ),
        (
            &["submit", "--timeout", "soon", "--", "true"][..],
            "--timeout",
        ),
    ] {
        let output = agent.cli(args);
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Nothing of the refused submissions was stored.
    assert_eq!(agent.ok(&["ls"]).lines().count(), 2, "header and envy");
}
