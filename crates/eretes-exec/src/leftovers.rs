//! Process groups a previous agent left running.
//!
//! The parent-death signal reaches only a task's first process; its own
//! children live on when an agent is killed with SIGKILL. Every running
//! group is recorded in `<data-dir>/groups/<task>.pgid`, and an agent
//! starting on that data directory kills what those files name — but only
//! processes that carry this data directory in their environment
//! ([`crate::AGENT_DIR_ENV`]), so a recycled process id never costs an
//! unrelated process its life.

use std::path::Path;

use crate::process::signal_group;
use crate::ExecConfig;

/// Kill every recorded group that still has a process of this data
/// directory; remove the records. Returns how many groups were killed.
pub(crate) fn kill_leftovers(config: &ExecConfig) -> usize {
    let Ok(records) = std::fs::read_dir(config.groups_dir()) else {
        return 0;
    };
    let marker = format!(
        "{}={}",
        crate::AGENT_DIR_ENV,
        config.data_dir.to_string_lossy()
    );
    let mut killed = 0;
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
    killed
}

/// Whether some process in group `pgid` has `marker` (`NAME=value`) in its
/// environment.
fn group_has_marked_process(pgid: libc::pid_t, marker: &str) -> bool {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    processes.flatten().any(|entry| {
        let dir = entry.path();
        process_group(&dir) == Some(pgid) && has_marker(&dir, marker)
    })
}

/// The process group of `/proc/<pid>`: the fifth field of its `stat`,
/// counted after the command name (which may contain spaces and brackets).
fn process_group(dir: &Path) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(2)?.parse().ok()
}

fn has_marker(dir: &Path, marker: &str) -> bool {
    std::fs::read(dir.join("environ")).is_ok_and(|environ| {
        environ
            .split(|&byte| byte == 0)
            .any(|variable| variable == marker.as_bytes())
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
    }
}
