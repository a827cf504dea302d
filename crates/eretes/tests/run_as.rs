//! `eretes agent --run-as USER`: tasks run as that user, with its groups and
//! home, and can still replace their checkpoint file; an agent that is not
//! root refuses the flag.

use std::os::unix::fs::PermissionsExt;

mod common;
use common::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_the_named_user() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let refused = common::agent_refuses(&dir.path().join("data"), &["--run-as", "nobody"]);
        assert!(
            refused.contains("only an agent running as root"),
            "{refused}"
        );
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--run-as", "nobody"]).await;
    let out = dir.path().display().to_string();
    let script = format!(
        "id -u > {out}/uid; echo \"$HOME $USER\" > {out}/home; \
         echo saved > \"$ERETES_CHECKPOINT_FILE.tmp\" && mv \"$ERETES_CHECKPOINT_FILE.tmp\" \"$ERETES_CHECKPOINT_FILE\" \
         && echo moved > {out}/checkpoint"
    );
    let done = agent.ok(&["submit", "--wait", "--", "sh", "-c", &script]);
    assert!(done.ends_with("done (exit code 0)\n"), "{done}");
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert_eq!(read("uid"), "65534\n");
    assert!(read("home").ends_with(" nobody\n"), "{}", read("home"));
    assert_eq!(read("checkpoint"), "moved\n");
    // The task cannot make the agent (root) read a file for it: a link
    // planted as its checkpoint is not followed.
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "ROOT-ONLY\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = format!(
        "if [ \"$ERETES_ATTEMPT\" = 1 ]; then \
           ln -sf {secret} \"$ERETES_CHECKPOINT_FILE.tmp\" && mv -f \"$ERETES_CHECKPOINT_FILE.tmp\" \"$ERETES_CHECKPOINT_FILE\"; \
           sleep 1.5; exit 1; \
         fi; cat \"$ERETES_CHECKPOINT_FILE\" > {out}/leaked 2>&1; echo end >> {out}/leaked",
        secret = secret.display()
    );
    agent.ok(&[
        "submit",
        "--max-attempts",
        "2",
        "--wait",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let leaked = read("leaked");
    assert!(!leaked.contains("ROOT-ONLY"), "{leaked}");
    assert!(leaked.ends_with("end\n"), "{leaked}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "ROOT-ONLY\n");

    // A user that does not exist is refused at start.
    let refused = common::agent_refuses(
        &dir.path().join("other"),
        &["--run-as", "no-such-user-here"],
    );
    assert!(
        refused.contains("no user \"no-such-user-here\""),
        "{refused}"
    );
}
