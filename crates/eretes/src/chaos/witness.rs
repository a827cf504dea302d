//! `eretes chaos-witness` (hidden): the program every task of a chaos run
//! runs, started by the agents like any process task.
//!
//! Every 100 ms it sends one numbered write to the chaos run's fenced sink
//! (a Unix socket) and waits for the answer; after each accepted write it
//! checkpoints the number (`$ERETES_CHECKPOINT_FILE`, written to a
//! temporary file and renamed over it), so that a later run continues after
//! it. A write names the run: task, epoch, node, a nonce of its own, and
//! the checkpoint it started from, with the time it was sent. A refused
//! write means a newer run of the task has written: this run is stale and
//! exits at once (status 3). With `--work N` it ends after write N (one
//! `done` line, then exit 0); with `--work 0` it never ends.
//!
//! It runs before the async runtime and logging are set up (see
//! `main.rs`): a witness is a small synchronous loop, and a chaos run
//! starts hundreds of them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sink::{Answer, Line};
use crate::witness::now_us;

/// The hidden subcommand's name.
pub const WITNESS_COMMAND: &str = "chaos-witness";

/// How often a witness writes.
pub const WRITE_EVERY: Duration = Duration::from_millis(100);

/// Exit status of a witness whose write the sink refused.
pub const STALE_EXIT: i32 = 3;

/// Runs the witness and exits when the process was started as
/// `eretes chaos-witness --sink PATH --work N`; returns otherwise.
pub fn run_if_invoked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|command| command != WITNESS_COMMAND) {
        return;
    }
    let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let code = match parse(&rest).and_then(|(sink, work)| witness(&sink, work)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chaos-witness: {error}");
            2
        }
    };
    std::process::exit(code)
}

/// `--sink PATH --work N`, in that order or the other.
fn parse(args: &[String]) -> Result<(PathBuf, u64), String> {
    let (mut sink, mut work) = (None, None);
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sink" => sink = Some(PathBuf::from(value)),
            "--work" => {
                work = Some(
                    value
                        .parse::<u64>()
                        .map_err(|e| format!("--work {value}: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((
        sink.ok_or("--sink PATH is required")?,
        work.ok_or("--work N is required")?,
    ))
}

fn required_env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set: run me as an eretes task"))
}

fn witness(sink: &Path, work: u64) -> Result<i32, String> {
    let task = required_env("ERETES_TASK_ID")?;
    let node = required_env("ERETES_NODE")?;
    let epoch: i64 = required_env("ERETES_EPOCH")?
        .parse()
        .map_err(|e| format!("ERETES_EPOCH: {e}"))?;
    let checkpoint = PathBuf::from(required_env(eretes_exec::CHECKPOINT_FILE_ENV)?);
    let loaded = read_checkpoint(&checkpoint)?;
    let nonce = run_nonce();
    let stream = UnixStream::connect(sink)
        .map_err(|e| format!("cannot reach the sink at {}: {e}", sink.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut answers = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let mut ask = |line: Line| -> Result<Answer, String> {
        writer
            .write_all(line.encode().as_bytes())
            .map_err(|e| format!("the sink went away: {e}"))?;
        let mut answer = String::new();
        answers
            .read_line(&mut answer)
            .map_err(|e| format!("the sink did not answer: {e}"))?;
        Answer::decode(&answer)
    };
    let mut sequence = loaded + 1;
    loop {
        if work > 0 && sequence > work {
            ask(Line::Done {
                task: task.clone(),
                epoch,
                node: node.clone(),
                nonce,
                sequence: work,
                sent_us: now_us(),
            })?;
            return Ok(0);
        }
        let answer = ask(Line::Write {
            task: task.clone(),
            epoch,
            node: node.clone(),
            nonce,
            loaded,
            sequence,
            sent_us: now_us(),
        })?;
        if answer == Answer::Stale {
            eprintln!("chaos-witness: the sink refused write {sequence} of epoch {epoch}: stale");
            return Ok(STALE_EXIT);
        }
        write_checkpoint(&checkpoint, sequence)?;
        sequence += 1;
        std::thread::sleep(WRITE_EVERY);
    }
}

/// The checkpoint a run starts from: 0 when there is none.
fn read_checkpoint(path: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| format!("the checkpoint {text:?} is not a number: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("cannot read the checkpoint: {e}")),
    }
}

fn write_checkpoint(path: &Path, sequence: u64) -> Result<(), String> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, sequence.to_string())
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("cannot write the checkpoint: {e}"))
}

/// A number telling this run from another of the same epoch (a permanent
/// task's restart, a retry): its pid and the time it started.
fn run_nonce() -> u64 {
    (u64::from(std::process::id()) << 32) ^ now_us()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_and_named() {
        let ok = parse(&["--work".into(), "5".into(), "--sink".into(), "/s".into()]).unwrap();
        assert_eq!(ok, (PathBuf::from("/s"), 5));
        assert!(parse(&["--work".into(), "x".into()])
            .unwrap_err()
            .contains("--work x"));
        assert!(parse(&["--sink".into(), "/s".into()])
            .unwrap_err()
            .contains("--work"));
        assert!(parse(&["--bogus".into(), "1".into()])
            .unwrap_err()
            .contains("--bogus"));
        assert!(parse(&["--sink".into()])
            .unwrap_err()
            .contains("needs a value"));
    }

    #[test]
    fn a_checkpoint_is_a_number_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        assert_eq!(read_checkpoint(&path).unwrap(), 0);
        write_checkpoint(&path, 42).unwrap();
        assert_eq!(read_checkpoint(&path).unwrap(), 42);
        std::fs::write(&path, "garbage").unwrap();
        assert!(read_checkpoint(&path).unwrap_err().contains("not a number"));
    }
}
