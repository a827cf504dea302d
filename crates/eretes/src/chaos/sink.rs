//! The fenced sink of a chaos run: the one resource every task's runs write
//! to, held by the chaos process itself on a Unix socket.
//!
//! It accepts a write only when its epoch is at least the highest epoch it
//! has accepted for that task, the way a storage system guarded by fencing
//! tokens would, and records every write, accepted or refused, with the
//! time the witness sent it and the time it arrived. The checker reads the
//! record afterwards; nothing in it comes from the store.
//!
//! The protocol is one JSON object per line each way: a [`Line`] from the
//! witness, an [`Answer`] back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::witness::now_us;

/// Longest line the sink reads; a longer one closes the connection.
const MAX_LINE: usize = 4096;

/// What a witness says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// Write number `sequence` of a run.
    Write {
        /// The task.
        task: String,
        /// The run's epoch.
        epoch: i64,
        /// The node it runs on.
        node: String,
        /// Tells runs of one epoch apart.
        nonce: u64,
        /// The checkpoint the run started from.
        loaded: u64,
        /// This write's number.
        sequence: u64,
        /// When the witness sent it (µs since the Unix epoch).
        sent_us: u64,
    },
    /// The run did all its work: its last write was `sequence`.
    Done {
        /// The task.
        task: String,
        /// The run's epoch.
        epoch: i64,
        /// The node it runs on.
        node: String,
        /// Tells runs of one epoch apart.
        nonce: u64,
        /// The last write's number.
        sequence: u64,
        /// When the witness sent it.
        sent_us: u64,
    },
}

impl Line {
    /// One line of JSON, newline included.
    pub fn encode(&self) -> String {
        let mut text = serde_json::to_string(self).expect("a line always encodes");
        text.push('\n');
        text
    }
}

/// The sink's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Accepted (a `done` is always accepted: it changes nothing).
    Ok,
    /// Refused: a newer epoch of the task has written.
    Stale,
}

impl Answer {
    /// Parse an answer line.
    pub fn decode(line: &str) -> Result<Answer, String> {
        serde_json::from_str(line.trim()).map_err(|e| format!("a bad answer {line:?}: {e}"))
    }
}

/// A write as the sink recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// What the witness sent.
    pub line: Line,
    /// When it arrived (µs since the Unix epoch).
    pub received_us: u64,
    /// Whether it was accepted.
    pub accepted: bool,
}

/// Everything the sink saw.
#[derive(Debug, Default)]
pub struct SinkLog {
    /// Every line, in arrival order.
    pub lines: Vec<Recorded>,
    /// Lines that were not a [`Line`] (their connections were closed).
    pub malformed: u64,
    highest: HashMap<String, i64>,
}

impl SinkLog {
    /// Decide on `line` and record it; the answer to send back.
    pub fn take(&mut self, line: Line, received_us: u64) -> Answer {
        let accepted = match &line {
            Line::Write { task, epoch, .. } => {
                let highest = self.highest.entry(task.clone()).or_insert(*epoch);
                if epoch >= highest {
                    *highest = *epoch;
                    true
                } else {
                    false
                }
            }
            Line::Done { .. } => true,
        };
        self.lines.push(Recorded {
            line,
            received_us,
            accepted,
        });
        if accepted {
            Answer::Ok
        } else {
            Answer::Stale
        }
    }
}

/// The sink: listening until dropped.
pub struct Sink {
    log: Arc<Mutex<SinkLog>>,
    accept: JoinHandle<()>,
}

impl Sink {
    /// Listen on `path` (a Unix socket, created here).
    pub fn start(path: &Path) -> std::io::Result<Sink> {
        let listener = UnixListener::bind(path)?;
        let log: Arc<Mutex<SinkLog>> = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, log.clone()));
        Ok(Sink { log, accept })
    }

    /// A copy of what it recorded so far.
    pub fn snapshot(&self) -> (Vec<Recorded>, u64) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (log.lines.clone(), log.malformed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: UnixListener, log: Arc<Mutex<SinkLog>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, log.clone()));
            }
            // Out of descriptors, say: wait rather than spin.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

async fn serve(stream: tokio::net::UnixStream, log: Arc<Mutex<SinkLog>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut text = String::new();
    loop {
        text.clear();
        let read = tokio::io::AsyncReadExt::take(&mut lines, MAX_LINE as u64)
            .read_line(&mut text)
            .await;
        match read {
            Ok(0) | Err(_) => return,
            // A line that does not end within the limit is no line.
            Ok(_) if !text.ends_with('\n') => {
                log.lock().unwrap_or_else(|e| e.into_inner()).malformed += 1;
                return;
            }
            Ok(_) => {}
        }
        let received_us = now_us();
        let answer = match serde_json::from_str::<Line>(text.trim()) {
            Ok(line) => log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(line, received_us),
            Err(_) => {
                log.lock().unwrap_or_else(|e| e.into_inner()).malformed += 1;
                return;
            }
        };
        let mut reply = serde_json::to_string(&answer).expect("an answer always encodes");
        reply.push('\n');
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(task: &str, epoch: i64, sequence: u64) -> Line {
        Line::Write {
            task: task.into(),
            epoch,
            node: "a0".into(),
            nonce: 1,
            loaded: 0,
            sequence,
            sent_us: sequence,
        }
    }

    #[test]
    fn a_write_older_than_the_highest_accepted_epoch_is_refused_and_recorded() {
        let mut log = SinkLog::default();
        assert_eq!(log.take(write("t", 10, 1), 1), Answer::Ok);
        assert_eq!(log.take(write("t", 12, 2), 2), Answer::Ok);
        assert_eq!(log.take(write("t", 10, 3), 3), Answer::Stale);
        assert_eq!(log.take(write("t", 12, 4), 4), Answer::Ok);
        // Another task's epochs are its own.
        assert_eq!(log.take(write("u", 5, 1), 5), Answer::Ok);
        let accepted: Vec<bool> = log.lines.iter().map(|r| r.accepted).collect();
        assert_eq!(accepted, [true, true, false, true, true]);
    }

    #[test]
    fn lines_round_trip_and_bad_answers_are_named() {
        let line = write("t-1", 7, 3);
        let text = line.encode();
        assert!(text.ends_with('\n'));
        assert_eq!(serde_json::from_str::<Line>(text.trim()).unwrap(), line);
        assert_eq!(Answer::decode("\"stale\"\n").unwrap(), Answer::Stale);
        assert!(Answer::decode("nope").unwrap_err().contains("nope"));
    }

    #[tokio::test]
    async fn the_socket_answers_and_closes_on_garbage() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink.sock");
        let sink = Sink::start(&path).unwrap();
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        client
            .write_all(write("t", 3, 1).encode().as_bytes())
            .await
            .unwrap();
        let mut answer = [0u8; 5];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"\"ok\"\n");
        client.write_all(b"{not json}\n").await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "garbage gets no answer, only a close");
        let (lines, malformed) = sink.snapshot();
        assert_eq!((lines.len(), malformed), (1, 1));
    }
}
