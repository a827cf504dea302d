//! A child's stdout or stderr: copied into its log file, rotated at a size
//! cap, with the last bytes kept for the task's result.
//!
//! The cap holds for the log as a whole, whatever number of attempts or
//! restarts append to it: when `stdout.log` reaches the cap it becomes
//! `stdout.log.1` (replacing the previous one) and a new `stdout.log`
//! starts with a line saying so. A task's output thus never takes more than
//! about twice the cap on disk, and the newest part is always kept.
//!
//! The stream is always read to its end, whatever happens to the file: a
//! child whose log cannot be written must never block on a full pipe.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The first read buffer of a stream.
const READ_MIN: usize = 512;
/// The largest read buffer of a stream.
const READ_MAX: usize = 16 * 1024;

/// What one stream left behind.
#[derive(Debug, Default, Clone)]
pub(crate) struct Captured {
    /// Its last bytes (at most the tail size asked for).
    pub tail: VecDeque<u8>,
    /// Bytes the stream produced in all.
    pub total: u64,
    /// Whether the log was rotated while this stream wrote to it.
    pub rotated: bool,
}

impl Captured {
    /// The tail as text (invalid UTF-8 replaced).
    pub fn tail_text(&self) -> String {
        let (front, back) = self.tail.as_slices();
        let mut bytes = Vec::with_capacity(self.tail.len());
        bytes.extend_from_slice(front);
        bytes.extend_from_slice(back);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The log file being written, and how much it holds.
struct Log {
    path: PathBuf,
    file: File,
    size: u64,
}

impl Log {
    async fn open(path: &Path) -> std::io::Result<Log> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let size = file.metadata().await?.len();
        Ok(Log {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// Move the full log aside (`<log>.1`) and start a new one that says so.
    async fn rotate(&mut self, cap: u64) -> std::io::Result<()> {
        self.file.flush().await?;
        let mut older = self.path.clone().into_os_string();
        older.push(".1");
        tokio::fs::rename(&self.path, &older).await?;
        let name = Path::new(&older)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        *self = Log::open(&self.path).await?;
        let note = format!(
            "[eretes: this log reached {cap} bytes; the {cap} before this line are in {name}, anything older was dropped]\n"
        );
        self.file.write_all(note.as_bytes()).await?;
        self.size += note.len() as u64;
        Ok(())
    }

    /// Append `bytes`, rotating first when they would take the log past `cap`.
    async fn write(&mut self, bytes: &[u8], cap: u64) -> std::io::Result<bool> {
        let rotated = self.size > 0 && self.size + bytes.len() as u64 > cap;
        if rotated {
            self.rotate(cap).await?;
        }
        self.file.write_all(bytes).await?;
        self.size += bytes.len() as u64;
        Ok(rotated)
    }
}

/// Copy `source` into the log at `log` (appended; rotated at `cap` bytes,
/// see the module docs); keep the last `tail_bytes` of everything in
/// `progress`, updated as the stream goes (so that a caller that stops
/// waiting still has it).
pub(crate) async fn capture(
    mut source: impl AsyncRead + Unpin,
    log: &Path,
    cap: u64,
    tail_bytes: usize,
    progress: Arc<Mutex<Captured>>,
) {
    let mut out = match Log::open(log).await {
        Ok(out) => Some(out),
        Err(error) => {
            tracing::warn!(log = %log.display(), %error, "cannot open the task's log; its output is discarded");
            None
        }
    };
    // Small while the stream is quiet (most tasks print little, and an idle
    // one holds its buffers for as long as it runs), doubled up to
    // `READ_MAX` while reads fill it.
    let mut buffer = vec![0u8; READ_MIN];
    loop {
        let read = match source.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if read == buffer.len() && buffer.len() < READ_MAX {
            buffer.resize(buffer.len() * 2, 0);
        }
        let chunk = &buffer[..read];
        {
            let mut captured = progress.lock().expect("not poisoned");
            captured.total += read as u64;
            captured.tail.extend(chunk.iter().copied());
            let excess = captured.tail.len().saturating_sub(tail_bytes);
            captured.tail.drain(..excess);
        }
        let Some(file) = out.as_mut() else { continue };
        // A chunk larger than the cap is cut to its end: the newest part.
        let keep = &chunk[chunk.len().saturating_sub(cap as usize)..];
        match file.write(keep, cap).await {
            Ok(rotated) => progress.lock().expect("not poisoned").rotated |= rotated,
            Err(error) => {
                tracing::warn!(log = %log.display(), %error, "cannot write the task's log; its output is discarded");
                out = None;
            }
        }
    }
    if let Some(mut out) = out {
        let _ = out.file.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_log_rotates_at_the_cap_keeping_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let input: Vec<u8> = (0..100_000u32)
            .flat_map(|n| format!("{n}\n").into_bytes())
            .collect();
        let progress = Arc::default();
        // A cap above the 16 KiB read size, so nothing is cut within a read.
        capture(&input[..], &log, 100_000, 10, Arc::clone(&progress)).await;
        let captured = progress.lock().unwrap().clone();
        assert_eq!(captured.total, input.len() as u64);
        assert!(captured.rotated);
        assert_eq!(captured.tail_text(), "998\n99999\n");
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

    #[tokio::test]
    async fn appends_count_toward_the_cap_across_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let line = vec![b'x'; 999];
        for _ in 0..50 {
            // One attempt (or restart) after another, each appending.
            let mut input = line.clone();
            input.push(b'\n');
            capture(&input[..], &log, 5_000, 10, Arc::default()).await;
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

    #[tokio::test]
    async fn an_unwritable_log_still_drains_the_stream() {
        let input = vec![b'x'; 100_000];
        let progress = Arc::default();
        capture(
            &input[..],
            Path::new("/nonexistent/dir/out.log"),
            10,
            4,
            Arc::clone(&progress),
        )
        .await;
        let captured = progress.lock().unwrap().clone();
        assert_eq!(captured.total, 100_000);
        assert_eq!(captured.tail_text(), "xxxx");
    }
}
