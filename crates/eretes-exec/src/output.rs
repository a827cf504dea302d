//! A task's stdout or stderr, as its supervisor keeps it: copied into its
//! log file, rotated at a size cap, with the last bytes kept for the task's
//! result. The supervisor reads the task's pipes itself, so the agent holds
//! nothing per stream (no task, no buffer, no descriptor) while a task runs.
//!
//! The cap holds for the log as a whole, whatever number of attempts or
//! restarts append to it: when `stdout.log` reaches the cap it becomes
//! `stdout.log.1` (replacing the previous one) and a new `stdout.log`
//! starts with a line saying so. A task's output thus never takes more than
//! about twice the cap on disk, and the newest part is always kept.
//!
//! The stream is always read to its end, whatever happens to the file: a
//! task whose log cannot be written (a full disk) must never block on a
//! full pipe. The first failure is reported with the run's end.
//!
//! A log (and the task's log directory) is created with the stream's first
//! byte: a task that prints nothing costs no file. Each new file is an
//! inode to allocate, and on a busy ext4 that allocation, not the task, is
//! what a start of a short task spent most of its time on.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The most bytes of a stream's end a result keeps, whatever the agent asks.
pub const MAX_TAIL: usize = 16 * 1024;

/// How the line a rotated log starts with begins.
const ROTATION_NOTE: &str = "[eretes: this log reached ";

/// Which rotation of its task's log a log file began with, from its first
/// bytes: the number its first line gives, and 0 for a log's first file
/// (or one rotated before the notes were numbered). A reader that follows
/// the log knows from it whether parts rotated away before it read them.
pub fn log_rotation(head: &[u8]) -> u64 {
    let Some(rest) = head.strip_prefix(ROTATION_NOTE.as_bytes()) else {
        return 0;
    };
    let line = rest.split(|&byte| byte == b'\n').next().unwrap_or_default();
    std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split_once("(rotation "))
        .and_then(|(_, after)| after.split_once(')'))
        .and_then(|(number, _)| number.parse().ok())
        .unwrap_or(0)
}

/// The log file being written, and how much it holds.
struct Log {
    path: PathBuf,
    file: File,
    size: u64,
    /// The rotation this file began with ([`log_rotation`]).
    rotation: u64,
}

impl Log {
    fn open(path: &Path) -> std::io::Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let size = file.metadata()?.len();
        // An earlier attempt's log, appended to: its numbering goes on. (A
        // log with no older part is part 0, whatever the task printed
        // first.)
        let mut older = path.as_os_str().to_owned();
        older.push(".1");
        let rotation = if size > 0 && Path::new(&older).exists() {
            let mut head = [0u8; 256];
            let read = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0)?;
            log_rotation(&head[..read])
        } else {
            0
        };
        Ok(Log {
            path: path.to_path_buf(),
            file,
            size,
            rotation,
        })
    }

    /// Move the full log aside (`<log>.1`) and start a new one that says so.
    fn rotate(&mut self, cap: u64) -> std::io::Result<()> {
        let mut older = self.path.clone().into_os_string();
        older.push(".1");
        std::fs::rename(&self.path, &older)?;
        let name = Path::new(&older)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rotation = self.rotation.saturating_add(1);
        *self = Log::open(&self.path)?;
        self.rotation = rotation;
        let note = format!(
            "{ROTATION_NOTE}{cap} bytes (rotation {rotation}); the {cap} before this line are in {name}, anything older was dropped]\n"
        );
        self.file.write_all(note.as_bytes())?;
        self.size += note.len() as u64;
        Ok(())
    }

    /// Append `bytes`, rotating first when they would take the log past `cap`.
    fn write(&mut self, bytes: &[u8], cap: u64) -> std::io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > cap {
            self.rotate(cap)?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

/// Whether a stream's log is open.
enum LogState {
    /// Nothing was written yet: the file may not exist.
    NotYet,
    Open(Log),
    /// It could not be opened or written: the rest is discarded.
    Failed,
}

/// One stream's log and tail.
pub(crate) struct OutputLog {
    path: PathBuf,
    log: LogState,
    cap: u64,
    tail: VecDeque<u8>,
    tail_bytes: usize,
    /// The first failure to write the log.
    error: Option<String>,
}

impl OutputLog {
    /// Append to the log at `path` (created, with its directory, with the
    /// first byte), rotating at `cap` bytes, keeping the last `tail_bytes`
    /// (at most [`MAX_TAIL`]).
    pub(crate) fn open(path: PathBuf, cap: u64, tail_bytes: usize) -> OutputLog {
        OutputLog {
            path,
            log: LogState::NotYet,
            cap: cap.max(1),
            tail: VecDeque::new(),
            tail_bytes: tail_bytes.min(MAX_TAIL),
            error: None,
        }
    }

    /// Take `chunk`, the stream's next bytes.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let keep = &chunk[chunk.len().saturating_sub(self.tail_bytes)..];
        self.tail.extend(keep.iter().copied());
        let excess = self.tail.len().saturating_sub(self.tail_bytes);
        self.tail.drain(..excess);
        if chunk.is_empty() {
            return;
        }
        if matches!(self.log, LogState::NotYet) {
            let opened = match self.path.parent() {
                Some(dir) => std::fs::create_dir_all(dir).and_then(|()| Log::open(&self.path)),
                None => Log::open(&self.path),
            };
            self.log = match opened {
                Ok(log) => LogState::Open(log),
                Err(error) => {
                    self.note_error(format!("cannot open {}: {error}", self.path.display()));
                    LogState::Failed
                }
            };
        }
        let LogState::Open(log) = &mut self.log else {
            return;
        };
        // A chunk larger than the cap is cut to its end: the newest part.
        let newest = &chunk[chunk.len().saturating_sub(self.cap as usize)..];
        if let Err(error) = log.write(newest, self.cap) {
            self.note_error(format!(
                "cannot write {}: {error}; the rest of the output is discarded",
                self.path.display()
            ));
            self.log = LogState::Failed;
        }
    }

    /// The tail as text (invalid UTF-8 replaced).
    pub(crate) fn tail_text(&self) -> String {
        let (front, back) = self.tail.as_slices();
        let mut bytes = Vec::with_capacity(self.tail.len());
        bytes.extend_from_slice(front);
        bytes.extend_from_slice(back);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Write no more to the log (the tail is still kept).
    pub(crate) fn keep_tail_only(&mut self) {
        self.log = LogState::Failed;
    }

    /// Record a failure about this log (the first one is kept).
    pub(crate) fn note_error(&mut self, error: String) {
        self.error.get_or_insert(error);
    }

    /// The first failure to open or write the log, if any.
    pub(crate) fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

/// Start `dir`'s logs afresh for a new run (attempts of one run append):
/// remove `stdout.log` and `stderr.log` and the older parts of rotated ones
/// (the run's first output creates them again).
pub(crate) fn reset_logs(dir: &Path) -> std::io::Result<()> {
    for name in ["stdout.log", "stderr.log", "stdout.log.1", "stderr.log.1"] {
        match std::fs::remove_file(dir.join(name)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in reads of at most 16 KiB, as the supervisor does.
    fn feed(output: &mut OutputLog, input: &[u8]) {
        for chunk in input.chunks(16 * 1024) {
            output.push(chunk);
        }
    }

    #[test]
    fn the_log_rotates_at_the_cap_keeping_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let input: Vec<u8> = (0..100_000u32)
            .flat_map(|n| format!("{n}\n").into_bytes())
            .collect();
        // A cap above the 16 KiB read size, so nothing is cut within a read.
        let mut output = OutputLog::open(log.clone(), 100_000, 10);
        feed(&mut output, &input);
        assert_eq!(output.tail_text(), "998\n99999\n");
        assert_eq!(output.error(), None);
        let newest = std::fs::read_to_string(&log).unwrap();
        let older = std::fs::read_to_string(dir.path().join("out.log.1")).unwrap();
        assert!(newest.starts_with("[eretes: this log reached 100000 bytes"));
        assert!(newest.contains("are in out.log.1"), "{newest}");
        assert!(newest.ends_with("99998\n99999\n"));
        assert!(newest.len() <= 100_000, "{}", newest.len());
        assert!(older.len() <= 100_000, "{}", older.len());
        // The two files hold the end of the output, nothing missing between
        // them (the cut may fall inside a line).
        // (Each file after the first rotation starts with the note.)
        let body = |log: &str| log.split_once('\n').unwrap().1.to_string();
        let kept = format!("{}{}", body(&older), body(&newest));
        assert!(input.ends_with(kept.as_bytes()), "a gap between the files");
        assert!(kept.len() > 100_000);
    }

    #[test]
    fn each_rotation_is_numbered_in_the_file_it_starts_and_appends_go_on_counting() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let head = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        let mut line = vec![b'y'; 999];
        line.push(b'\n');
        let mut output = OutputLog::open(log.clone(), 5_000, 10);
        for _ in 0..6 {
            output.push(&line);
        }
        assert_eq!(log_rotation(&head("out.log")), 1);
        drop(output);
        // The next attempt appends, and numbers on from the file it finds.
        let mut output = OutputLog::open(log.clone(), 5_000, 10);
        for _ in 0..5 {
            output.push(&line);
        }
        assert_eq!(log_rotation(&head("out.log.1")), 1);
        assert_eq!(log_rotation(&head("out.log")), 2);
        assert_eq!(log_rotation(b"no note\n"), 0);
        assert_eq!(
            log_rotation(b"[eretes: this log reached 5 bytes; the 5 before\n"),
            0
        );
        assert_eq!(
            log_rotation(b"[eretes: this log reached 5 bytes (rotation x)\n"),
            0
        );
    }

    #[test]
    fn appends_count_toward_the_cap_across_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let mut line = vec![b'x'; 999];
        line.push(b'\n');
        for _ in 0..50 {
            // One attempt (or restart) after another, each appending.
            OutputLog::open(log.clone(), 5_000, 10).push(&line);
        }
        let newest = std::fs::metadata(&log).unwrap().len();
        let older = std::fs::metadata(dir.path().join("out.log.1"))
            .unwrap()
            .len();
        assert!(
            newest <= 5_000 + 200 && older <= 5_000 + 200,
            "{newest} {older}"
        );
    }

    #[test]
    fn an_unwritable_log_still_keeps_the_tail_and_says_why() {
        // Its directory would have to be made inside a regular file.
        let file = tempfile::NamedTempFile::new().unwrap();
        let log = file.path().join("task/out.log");
        let mut output = OutputLog::open(log.clone(), 10, 4);
        feed(&mut output, &[b'x'; 100_000]);
        assert_eq!(output.tail_text(), "xxxx");
        let error = output.error().unwrap();
        assert!(error.contains(&log.display().to_string()), "{error}");
    }

    #[test]
    fn a_tail_never_exceeds_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut output = OutputLog::open(dir.path().join("out.log"), 1 << 20, usize::MAX);
        feed(&mut output, &vec![b'y'; 100_000]);
        assert_eq!(output.tail_text().len(), MAX_TAIL);
    }

    #[test]
    fn resetting_removes_both_logs_and_their_rotated_parts() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["stdout.log", "stderr.log", "stdout.log.1"] {
            std::fs::write(dir.path().join(name), "old").unwrap();
        }
        reset_logs(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A directory that does not exist has nothing to reset.
        reset_logs(&dir.path().join("never")).unwrap();
    }

    #[test]
    fn a_quiet_stream_creates_no_file_and_the_first_byte_creates_both_file_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("task/out.log");
        let mut output = OutputLog::open(log.clone(), 1000, 10);
        output.push(b"");
        assert!(!dir.path().join("task").exists());
        output.push(b"hi\n");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\n");
    }
}
