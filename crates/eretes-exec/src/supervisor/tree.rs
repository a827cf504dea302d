//! A process tree as `/proc` shows it: finding every descendant of a
//! process and signalling them all.

use std::collections::HashMap;
use std::path::Path;

/// Send `signal` to every process of group `pgid` (gone groups are fine).
pub(crate) fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid addresses one process group;
        // it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Send `signal` to group `group` and to every descendant of `root` (not
/// `root` itself). Returns how many descendants were found.
pub(crate) fn signal_tree(root: libc::pid_t, group: libc::pid_t, signal: libc::c_int) -> usize {
    // The group first: one call reaches its members even before /proc is read.
    signal_group(group, signal);
    let found = descendants(root);
    for &pid in &found {
        // SAFETY: kill(2) has no memory-safety preconditions. (A pid found
        // here was a descendant of `root` a moment ago; it can only be
        // another process's if it was reaped and reused in between.)
        unsafe {
            libc::kill(pid, signal);
        }
    }
    found.len()
}

/// Every descendant of `root` that `/proc` lists now: through each
/// process's `/proc/<pid>/task/<tid>/children` lists, which cost what the
/// tree holds; or, where the kernel has no such lists, by reading every
/// process's parent.
pub(crate) fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let lists = std::path::PathBuf::from(format!("/proc/{root}/task/{root}/children"));
    if !lists.exists() {
        return descendants_by_scan(root);
    }
    let mut found = Vec::new();
    let mut next = children_of(root);
    while let Some(pid) = next.pop() {
        found.push(pid);
        next.extend(children_of(pid));
    }
    found
}

/// The children of `pid`, from the lists of each of its threads (a thread
/// or process that ended meanwhile lists none).
fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    threads
        .flatten()
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// [`descendants`] by reading the parent of every process.
fn descendants_by_scan(root: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if let Some(parent) = parent_of(&entry.path()) {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        if let Some(kids) = children.remove(&pid) {
            found.extend_from_slice(&kids);
            next.extend(kids);
        }
    }
    found
}

/// The fields of `/proc/<pid>/stat` after the command name (which may
/// contain spaces and brackets): state, ppid, pgrp, …
pub(crate) fn stat_fields(dir: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(
        after_name
            .split_whitespace()
            .take(3)
            .map(str::to_string)
            .collect(),
    )
}

/// The parent of `/proc/<pid>`.
fn parent_of(dir: &Path) -> Option<libc::pid_t> {
    stat_fields(dir)?.get(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_grandchildren_and_reads_parents() {
        let me = std::process::id() as libc::pid_t;
        // SAFETY: getppid(2) has no preconditions.
        let parent = unsafe { libc::getppid() };
        assert_eq!(parent_of(Path::new("/proc/self")), Some(parent));
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: libc::pid_t = line.trim().parse().unwrap();
        for found in [descendants(me), descendants_by_scan(me)] {
            assert!(found.contains(&(child.id() as libc::pid_t)), "{found:?}");
            assert!(found.contains(&grandchild), "{found:?}");
        }
        // The shell is in this test's group, so kill it by the tree only
        // (the shell's, not this test binary's: other tests have children).
        let shell = child.id() as libc::pid_t;
        assert_eq!(signal_tree(shell, 0, libc::SIGKILL), 1);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
