//! A child's stdout or stderr: copied into its log file up to a size cap,
//! with the last bytes kept for the task's result.
//!
//! The stream is always read to its end, cap or no cap, and whatever happens
//! to the file: a child that writes more than the cap, or whose log cannot
//! be written, must never block on a full pipe.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// What one stream left behind.
#[derive(Debug, Default, Clone)]
pub(crate) struct Captured {
    /// Its last bytes (at most the tail size asked for).
    pub tail: VecDeque<u8>,
    /// Bytes the stream produced in all.
    pub total: u64,
    /// Whether the log stopped at the cap.
    pub capped: bool,
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

/// Copy `source` into the file at `log` (appended) until `cap` bytes have
/// been written there, then note the cap in the file and discard the rest;
/// keep the last `tail_bytes` of everything in `progress`, updated as the
/// stream goes (so that a caller that stops waiting still has it).
pub(crate) async fn capture(
    mut source: impl AsyncRead + Unpin,
    log: &Path,
    cap: u64,
    tail_bytes: usize,
    progress: Arc<Mutex<Captured>>,
) {
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
    {
        Ok(file) => Some(file),
        Err(error) => {
            tracing::warn!(log = %log.display(), %error, "cannot open the task's log; its output is discarded");
            None
        }
    };
    let mut written = 0u64;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match source.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        let newly_capped = {
            let mut captured = progress.lock().expect("not poisoned");
            captured.total += read as u64;
            captured.tail.extend(chunk.iter().copied());
            let excess = captured.tail.len().saturating_sub(tail_bytes);
            captured.tail.drain(..excess);
            let room = cap.saturating_sub(written) as usize;
            let capped = room < chunk.len() && !captured.capped;
            captured.capped |= room < chunk.len();
            capped
        };
        let Some(out) = file.as_mut() else { continue };
        let room = cap.saturating_sub(written) as usize;
        let keep = &chunk[..chunk.len().min(room)];
        let mut failed = out.write_all(keep).await.is_err();
        written += keep.len() as u64;
        if newly_capped {
            let note = format!("\n[eretes: log capped at {cap} bytes; the rest is discarded]\n");
            failed |= out.write_all(note.as_bytes()).await.is_err();
        }
        if failed {
            tracing::warn!(log = %log.display(), "cannot write the task's log; its output is discarded");
            file = None;
        }
    }
    if let Some(mut out) = file {
        let _ = out.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_log_stops_at_the_cap_and_the_tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let input: Vec<u8> = (0..100_000u32)
            .flat_map(|n| format!("{n}\n").into_bytes())
            .collect();
        let progress = Arc::default();
        capture(&input[..], &log, 1000, 10, Arc::clone(&progress)).await;
        let captured = progress.lock().unwrap().clone();
        assert_eq!(captured.total, input.len() as u64);
        assert!(captured.capped);
        assert_eq!(captured.tail_text(), "998\n99999\n");
        let written = std::fs::read_to_string(&log).unwrap();
        assert!(written.starts_with("0\n1\n2\n"));
        assert!(written.ends_with("[eretes: log capped at 1000 bytes; the rest is discarded]\n"));
        assert!(written.len() < 1100, "{}", written.len());
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
