//! `eretes chaos` as a user runs it: three real agents on a real three-member
//! etcd cluster, every fault kind for 30 s, and the checker's verdict. One
//! run has a fixed seed (the same draws of faults every time); the other takes its
//! seed from the clock, so that each run of the suite tries a new schedule,
//! and prints it on failure so that the failure can be repeated with
//! `eretes chaos --seed N`.
//!
//! Needs Debian's `etcd` on the PATH (`scripts/test.sh` installs it).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The two runs take the machine in turn: each starts eight processes and
/// sixty tasks.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A run's limit: 30 s of faults, the settling after them (at most 30 s and
/// ten TTLs), and the start and stop of everything, on a busy machine.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Run `eretes chaos` with `seed` (from the clock when `None`) and return
/// the seed and the last line's figures, with the run's output for a
/// failure's message.
fn chaos(seed: Option<u64>) -> (u64, Value, String) {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_eretes"))
        .args([
            "chaos",
            "--agents",
            "3",
            "--tasks",
            "30",
            "--duration",
            "30s",
        ])
        .args(["--etcd-members", "3", "--lease-ttl-ms", "2000", "--json"])
        .args(["--seed", &seed.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start eretes chaos");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("eretes chaos --seed {seed} ran past {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let output = format!("exit: {status}\nstdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or_default();
    let figures: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("seed {seed}: the last line is not JSON ({e}):\n{output}"));
    assert_eq!(
        status.success(),
        figures["ok"] == true,
        "seed {seed}: the exit status and the verdict disagree:\n{output}"
    );
    (seed, figures, output)
}

fn assert_guarantees_held(seed: u64, figures: &Value, output: &str) {
    for violation in [
        "overlaps",
        "stale_writes_accepted",
        "lost",
        "double_completions",
        "sequence_gaps",
        "agent_crashes",
    ] {
        assert_eq!(
            figures[violation], 0,
            "seed {seed} (repeat it with `eretes chaos --seed {seed}`): {violation}:\n{output}"
        );
    }
    assert_eq!(figures["ok"], true, "seed {seed}:\n{output}");
    assert_eq!(figures["seed"], seed);
    assert_eq!(figures["agents"], 3);
    assert_eq!(figures["tasks"], 30);
    // The run did happen: every fault kind struck, tasks completed, and
    // faults made tasks run more than once.
    let faults = &figures["faults"];
    for kind in [
        "kill",
        "freeze",
        "partition",
        "etcd-kill",
        "etcd-leader-kill",
    ] {
        assert!(
            faults[kind].as_u64() >= Some(1),
            "seed {seed}: no {kind} fault in {faults}:\n{output}"
        );
    }
    let commands: u64 = ["drain", "freeze-node", "balance"]
        .iter()
        .filter_map(|kind| faults[kind].as_u64())
        .sum();
    assert!(commands >= 1, "seed {seed}: no node command in {faults}");
    assert!(figures["completed"].as_u64() >= Some(1), "{output}");
    assert!(
        figures["runs"].as_u64() > Some(30),
        "seed {seed}: no task ran twice:\n{output}"
    );
    assert!(figures["writes"].as_u64() > Some(1000), "{output}");
}

#[test]
fn a_chaos_run_with_a_fixed_seed_keeps_every_guarantee() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (seed, figures, output) = chaos(Some(7));
    assert_guarantees_held(seed, &figures, &output);
}

#[test]
fn a_chaos_run_with_a_seed_from_the_clock_keeps_every_guarantee() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (seed, figures, output) = chaos(None);
    assert_guarantees_held(seed, &figures, &output);
}

#[test]
fn bad_arguments_are_refused_with_their_name() {
    for (args, named) in [
        (vec!["--faults", "kill,meteor"], "meteor"),
        (vec!["--duration", "1s"], "5s to 24h"),
        (vec!["--agents", "0"], "--agents"),
        (vec!["--etcd-members", "9"], "--etcd-members"),
        (vec!["--lease-ttl-ms", "10"], "--lease-ttl-ms"),
        (
            vec!["--tasks", "5000", "--duration", "24h"],
            "keeps in memory",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_eretes"))
            .arg("chaos")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

/// An interrupted run (Ctrl-C) stops its agents and etcd members and
/// removes its files, as a finished one does: its temporary directory is
/// empty once it has exited, and no process of it is left.
#[test]
fn an_interrupted_run_leaves_nothing_behind() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eretes"))
        .args([
            "chaos",
            "--agents",
            "2",
            "--tasks",
            "4",
            "--duration",
            "60s",
        ])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted while it starts or runs: its directories exist by then.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(tmp.path()).unwrap().count() < 2 {
        assert!(Instant::now() < deadline, "the run made no directories");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the interrupted run did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let processes = Command::new("pgrep")
        .args(["-f", &tmp.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        processes.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&processes.stdout)
    );
}
