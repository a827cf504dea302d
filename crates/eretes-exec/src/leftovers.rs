//! Processes that outlived their supervisor, or their agent.
//!
//! A supervisor kills its task's whole tree by itself, also when its agent
//! dies. Two cases are left to the agent:
//!
//! * the supervisor itself died (`kill -9`): its leader went with it
//!   (parent-death signal); the agent kills the leader's process group and
//!   every process that carries the run's identity in its environment
//!   ([`kill_marked`]);
//! * an agent starts on a data directory whose previous agent died: every
//!   recorded group (`<data-dir>/groups/<task>.<epoch>.pgid`) that still has
//!   a process of this data directory, and every process that carries the
//!   data directory in its environment ([`crate::AGENT_DIR_ENV`]), is killed
//!   before any task runs ([`kill_leftovers`]) — supervisors of the previous
//!   agent included, so no older run of a task is alive when a new one
//!   starts. Only marked processes are touched, so a recycled process id
//!   never costs an unrelated process its life.
//!
//! A process that both left its group and dropped its environment escapes
//! these sweeps; only a supervisor's own death leaves such a process behind.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::supervisor::{signal_group, stat_fields};
use crate::ExecConfig;

/// How long a starting agent waits for the previous agent's processes to
/// be gone.
const SWEEP_LIMIT: Duration = Duration::from_secs(10);

/// Scans in a row, [`SWEEP_PAUSE`] apart, that must find no marked process
/// before a sweep ends. One is not proof: a process in the middle of
/// `exec` shows an empty environment for a moment (the kernel fills in the
/// new one after the old memory is gone), so a scan can miss it.
const QUIET_SCANS: u32 = 2;

/// The pause between two scans of a sweep.
const SWEEP_PAUSE: Duration = Duration::from_millis(20);

/// What marks the processes of one run: the agent's data directory, the
/// task and the epoch, as their environment carries them.
#[derive(Debug, Clone)]
pub(crate) struct RunMarker {
    /// Shared by every run of the agent (each running task holds a marker).
    pub agent_dir: std::sync::Arc<str>,
    pub task: eretes_protocol::TaskId,
    pub epoch: i64,
}

impl RunMarker {
    fn variables(&self) -> [String; 3] {
        [
            format!("{}={}", crate::AGENT_DIR_ENV, self.agent_dir),
            format!("ERETES_TASK_ID={}", self.task),
            format!("ERETES_EPOCH={}", self.epoch),
        ]
    }
}

/// SIGKILL every process that carries `marker`'s run in its environment.
/// Returns how many were found.
pub(crate) fn kill_marked(marker: &RunMarker) -> usize {
    let wanted = marker.variables();
    let found = marked_processes(&wanted);
    for &pid in &found {
        kill(pid);
    }
    found.len()
}

/// After a run's supervisor died: SIGKILL the run's process group (led by
/// `leader`, if a marked process is still in it, so that a recycled group
/// id is never hit) and every process marked with the run, again and again
/// until [`QUIET_SCANS`] scans in a row find none (a process may fork
/// meanwhile), within a bound. Returns how many were killed.
pub(crate) async fn kill_run(leader: libc::pid_t, marker: &RunMarker) -> usize {
    let wanted = marker.variables();
    let started = Instant::now();
    let mut killed = 0;
    let mut quiet_scans = 0;
    loop {
        if leader > 1 && group_has_marked_process(leader, &wanted) {
            signal_group(leader, libc::SIGKILL);
        }
        let found = kill_marked(marker);
        killed += found;
        quiet_scans = if found == 0 { quiet_scans + 1 } else { 0 };
        if quiet_scans >= QUIET_SCANS || started.elapsed() > SWEEP_LIMIT {
            return killed;
        }
        tokio::time::sleep(SWEEP_PAUSE).await;
    }
}

/// Kill everything a previous agent on this data directory left running;
/// remove the records. Returns how many processes were killed.
pub(crate) fn kill_leftovers(config: &ExecConfig) -> usize {
    let marker = [format!(
        "{}={}",
        crate::AGENT_DIR_ENV,
        config.data_dir.to_string_lossy()
    )];
    let mut killed = 0;
    if let Ok(records) = std::fs::read_dir(config.groups_dir()) {
        for record in records.flatten() {
            let path = record.path();
            let pgid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse::<libc::pid_t>().ok());
            if let Some(pgid) = pgid.filter(|&pgid| pgid > 1) {
                if group_has_marked_process(pgid, &marker) {
                    signal_group(pgid, libc::SIGKILL);
                    killed += 1;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    // Until none is left (a dying supervisor may still fork-race its tree),
    // within a bound: a process stuck in the kernel cannot be waited for.
    let started = Instant::now();
    let mut quiet_scans = 0;
    loop {
        let found = marked_processes(&marker);
        killed += found.len();
        quiet_scans = if found.is_empty() { quiet_scans + 1 } else { 0 };
        for pid in found {
            kill(pid);
        }
        if quiet_scans >= QUIET_SCANS || started.elapsed() > SWEEP_LIMIT {
            return killed;
        }
        std::thread::sleep(SWEEP_PAUSE);
    }
}

fn kill(pid: libc::pid_t) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Every live (not zombie) process whose environment holds all of `wanted`
/// (`NAME=value` each).
fn marked_processes(wanted: &[String]) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<libc::pid_t>().ok()?;
            let dir = entry.path();
            (state(&dir) != Some('Z') && has_all(&dir, wanted)).then_some(pid)
        })
        .collect()
}

/// Whether some process in group `pgid` has all of `wanted` in its
/// environment.
fn group_has_marked_process(pgid: libc::pid_t, wanted: &[String]) -> bool {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    processes.flatten().any(|entry| {
        let dir = entry.path();
        process_group(&dir) == Some(pgid) && has_all(&dir, wanted)
    })
}

fn state(dir: &Path) -> Option<char> {
    stat_fields(dir)?.first()?.chars().next()
}

/// The process group of `/proc/<pid>`.
fn process_group(dir: &Path) -> Option<libc::pid_t> {
    stat_fields(dir)?.get(2)?.parse().ok()
}

fn has_all(dir: &Path, wanted: &[String]) -> bool {
    std::fs::read(dir.join("environ")).is_ok_and(|environ| {
        wanted.iter().all(|variable| {
            environ
                .split(|&byte| byte == 0)
                .any(|present| present == variable.as_bytes())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_group() {
        let me = Path::new("/proc/self");
        // SAFETY: getpgrp(2) has no preconditions.
        let expected = unsafe { libc::getpgrp() };
        assert_eq!(process_group(me), Some(expected));
        assert!(state(me).is_some_and(|state| state != 'Z'));
    }

    #[test]
    fn only_processes_with_the_whole_marker_are_killed() {
        let spawn = |epoch: &str| {
            std::process::Command::new("sleep")
                .arg("30")
                .env("ERETES_AGENT_DIR", "/marker/test")
                .env("ERETES_TASK_ID", "t")
                .env("ERETES_EPOCH", epoch)
                .spawn()
                .unwrap()
        };
        let (mut mine, mut other) = (spawn("7"), spawn("8"));
        let marker = RunMarker {
            agent_dir: "/marker/test".into(),
            task: eretes_protocol::TaskId::new("t").unwrap(),
            epoch: 7,
        };
        // `spawn` returns once `exec` began, and the new environment shows
        // only a moment later (the sweeps scan twice for it): the test
        // of which processes match waits until both show theirs.
        for child in [&mine, &other] {
            let dir = std::path::PathBuf::from(format!("/proc/{}", child.id()));
            let shown = || has_all(&dir, &["ERETES_TASK_ID=t".to_string()]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !shown() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(kill_marked(&marker), 1);
        assert!(mine.wait().unwrap().code().is_none(), "killed");
        assert!(other.try_wait().unwrap().is_none(), "another run lives");
        other.kill().unwrap();
        other.wait().unwrap();
    }
}

/// Width of a record's line: a pid right-aligned in 10 characters and a
/// newline, so that a record is rewritten in place, never truncated.
const RECORD_WIDTH: usize = 11;

/// A free slot's line.
const BLANK_RECORD: &str = "          \n";

/// The records of running process groups, under `<data-dir>/groups/`: one
/// file per slot, reused from run to run. A running task's slot holds its
/// leader's process group; a free slot holds blanks. Rewriting a file in
/// place costs an open and a write; a new file per run cost an inode
/// allocation (and its removal a free), which on a busy ext4 was a large
/// share of a short task's start. No file is held open between writes: a
/// running task costs the agent no descriptor for its record.
#[derive(Debug)]
pub(crate) struct GroupRecords {
    dir: std::path::PathBuf,
    free: std::sync::Mutex<Vec<u64>>,
    next: std::sync::atomic::AtomicU64,
}

/// One slot, holding a run's process group until dropped (then blank
/// again and free for the next run).
#[derive(Debug)]
pub(crate) struct GroupRecord {
    records: std::sync::Arc<GroupRecords>,
    slot: u64,
}

impl GroupRecords {
    /// Records in `dir` (which [`kill_leftovers`] emptied).
    pub(crate) fn new(dir: std::path::PathBuf) -> GroupRecords {
        GroupRecords {
            dir,
            free: Default::default(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn path(&self, slot: u64) -> std::path::PathBuf {
        self.dir.join(format!("{slot}.pgid"))
    }

    /// Record process group `pgid` in a free slot (a new one if none is).
    pub(crate) fn record(
        self: &std::sync::Arc<Self>,
        pgid: libc::pid_t,
    ) -> std::io::Result<GroupRecord> {
        let reused = self.free.lock().expect("not poisoned").pop();
        let slot =
            reused.unwrap_or_else(|| self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        // A slot that cannot be written is not given back (nor reused).
        write_record(&self.path(slot), &format!("{pgid:>10}\n"))?;
        Ok(GroupRecord {
            records: std::sync::Arc::clone(self),
            slot,
        })
    }
}

/// Write `line` over the start of the record at `path` (made if missing).
fn write_record(path: &Path, line: &str) -> std::io::Result<()> {
    debug_assert_eq!(line.len(), RECORD_WIDTH);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    std::os::unix::fs::FileExt::write_all_at(&file, line.as_bytes(), 0)
}

impl Drop for GroupRecord {
    /// Blank the slot and give it back; one that cannot be blanked is not
    /// reused (its file stays, naming a group that is gone, which the next
    /// agent's check of the group's processes sees).
    fn drop(&mut self) {
        if write_record(&self.records.path(self.slot), BLANK_RECORD).is_ok() {
            self.records
                .free
                .lock()
                .expect("not poisoned")
                .push(self.slot);
        }
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    fn lines(dir: &Path) -> Vec<String> {
        let mut lines: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap())
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_slot_names_its_group_while_held_and_is_blanked_and_reused_after() {
        let dir = tempfile::tempdir().unwrap();
        let records = std::sync::Arc::new(GroupRecords::new(dir.path().to_path_buf()));
        let first = records.record(4242).unwrap();
        let second = records.record(77).unwrap();
        assert_eq!(lines(dir.path()), ["        77\n", "      4242\n"]);
        drop(first);
        assert_eq!(lines(dir.path()), ["          \n", "        77\n"]);
        // The blank slot is taken again: no new file.
        let third = records.record(123).unwrap();
        assert_eq!(lines(dir.path()), ["        77\n", "       123\n"]);
        drop((second, third));
        assert!(lines(dir.path()).iter().all(|line| line.trim().is_empty()));
    }
}
