//! The task's stdout and stderr, read by its supervisor: each a pipe whose
//! read end the supervisor's loop polls beside its socket, signals and
//! timer. What it reads goes to a writer thread, which keeps the task's
//! logs ([`crate::output`]).
//!
//! **Why a thread.** The loop must never wait on the disk: a frozen or
//! hung filesystem (a snapshot's `fsfreeze`, a hard-mounted NFS) would
//! otherwise keep it from its deadline, and a fenced task from being
//! killed. The loop only hands chunks over through a bounded queue; when
//! the queue is full it stops reading that pipe (the task then waits on a
//! full pipe, as it would on a slow disk) and looks again shortly. The
//! thread is started with the first byte of output: a quiet task has none.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use super::wire::{LaunchLogs, Stream, StreamEnd};
use crate::output::{reset_logs, OutputLog};

/// Bytes read from a pipe at a time.
const READ_SIZE: usize = 16 * 1024;

/// Reads of one pipe per wake of the loop: a task that writes without pause
/// must not keep the loop from its deadlines and orders.
const READS_PER_WAKE: usize = 4;

/// Chunks queued for the writer at most (with [`READ_SIZE`], 256 KiB).
const QUEUE: usize = 16;

/// How soon the loop looks again at a pipe it stopped reading because the
/// writer's queue was full.
pub(super) const RETRY: Duration = Duration::from_millis(10);

/// Stack of the writer thread: it copies chunks into files, no more.
const WRITER_STACK: usize = 64 * 1024;

/// The streams, in the order every array here keeps them.
const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

/// One output stream, as the loop sees it.
struct TaskStream {
    /// The read end, until the stream ended.
    pipe: Option<OwnedFd>,
    /// A chunk read but not yet taken by the writer's full queue.
    pending: Option<Vec<u8>>,
}

/// The task's two output streams.
pub(super) struct TaskStreams {
    streams: [TaskStream; 2],
    /// The logs, until the writer starts (it takes them).
    logs: Option<[OutputLog; 2]>,
    writer: Option<Writer>,
}

/// The writer thread's ends.
struct Writer {
    chunks: SyncSender<(usize, Vec<u8>)>,
    /// How the streams ended, once the queue closed and was written.
    ends: Receiver<Vec<StreamEnd>>,
}

impl TaskStreams {
    /// Pipes for the task's stdout and stderr into the logs `logs` names
    /// (emptied first if it says so). Returns the streams, and the write
    /// ends the task gets as its stdout and stderr (close-on-exec here:
    /// the task gets copies).
    pub(super) fn open(logs: &LaunchLogs) -> std::io::Result<(TaskStreams, OwnedFd, OwnedFd)> {
        let dir = Path::new(OsStr::from_bytes(&logs.dir));
        let prepared = if logs.reset { reset_logs(dir) } else { Ok(()) };
        let (stdout, stdout_writer) = pipe()?;
        let (stderr, stderr_writer) = pipe()?;
        let log = |name| {
            let mut log = OutputLog::open(dir.join(name), logs.cap, logs.tail_bytes);
            if let Err(error) = &prepared {
                log.note_error(format!("cannot prepare {}: {error}", dir.display()));
            }
            log
        };
        let stream = |pipe| TaskStream {
            pipe: Some(pipe),
            pending: None,
        };
        let streams = TaskStreams {
            streams: [stream(stdout), stream(stderr)],
            logs: Some([log("stdout.log"), log("stderr.log")]),
            writer: None,
        };
        Ok((streams, stdout_writer, stderr_writer))
    }

    /// The descriptors to poll: each open pipe the writer can take more
    /// from, or -1 (which poll skips).
    pub(super) fn poll_fds(&self) -> [RawFd; 2] {
        self.streams
            .each_ref()
            .map(|stream| match (&stream.pipe, &stream.pending) {
                (Some(pipe), None) => pipe.as_raw_fd(),
                _ => -1,
            })
    }

    /// Whether a chunk waits for room in the writer's queue (then the loop
    /// looks again within [`RETRY`]).
    pub(super) fn waiting(&self) -> bool {
        self.streams.iter().any(|stream| stream.pending.is_some())
    }

    /// Hand what waits to the writer, and read what is there from each
    /// open pipe (a bounded amount).
    pub(super) fn read_ready(&mut self) {
        for index in 0..self.streams.len() {
            self.read_stream(index);
        }
    }

    fn read_stream(&mut self, index: usize) {
        if let Some(chunk) = self.streams[index].pending.take() {
            if let Some(chunk) = self.hand_over(index, chunk) {
                self.streams[index].pending = Some(chunk);
                return;
            }
        }
        let mut buffer = [0u8; READ_SIZE];
        for _ in 0..READS_PER_WAKE {
            let Some(pipe) = &self.streams[index].pipe else {
                return;
            };
            // SAFETY: reads at most `buffer.len()` bytes into `buffer`.
            let read =
                unsafe { libc::read(pipe.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if read > 0 {
                let chunk = buffer[..read as usize].to_vec();
                if let Some(chunk) = self.hand_over(index, chunk) {
                    self.streams[index].pending = Some(chunk);
                    return;
                }
                continue;
            }
            let error = std::io::Error::last_os_error();
            match (read, error.raw_os_error()) {
                (0, _) => self.streams[index].pipe = None,
                (_, Some(libc::EINTR)) => continue,
                (_, Some(libc::EAGAIN)) => {}
                // A pipe that fails to read has ended, as far as it goes.
                _ => self.streams[index].pipe = None,
            }
            return;
        }
    }

    /// Queue `chunk` of stream `index` for the writer (started with the
    /// first); the chunk back if the queue is full.
    fn hand_over(&mut self, index: usize, chunk: Vec<u8>) -> Option<Vec<u8>> {
        if self.writer.is_none() {
            if let Some(logs) = self.logs.take() {
                match start_writer(logs) {
                    Ok(writer) => self.writer = Some(writer),
                    Err((error, mut logs)) => {
                        // No thread: the output is kept in the tails only.
                        for log in &mut logs {
                            log.note_error(format!("cannot start the log writer: {error}"));
                            log.keep_tail_only();
                        }
                        self.logs = Some(logs);
                    }
                }
            }
        }
        match &self.writer {
            Some(writer) => match writer.chunks.try_send((index, chunk)) {
                Ok(()) => None,
                Err(TrySendError::Full((_, chunk))) => Some(chunk),
                // The writer is gone (it cannot panic short of a bug): drop.
                Err(TrySendError::Disconnected(_)) => None,
            },
            None => {
                if let Some(logs) = &mut self.logs {
                    logs[index].push(&chunk);
                }
                None
            }
        }
    }

    /// Once the task's tree is gone: read each pipe to its end, for at most
    /// `limit` (only a process outside the tree could still hold one open).
    pub(super) fn drain(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        loop {
            self.read_ready();
            let fds = self.poll_fds();
            let left = until.saturating_duration_since(Instant::now());
            let open = self
                .streams
                .iter()
                .any(|stream| stream.pipe.is_some() || stream.pending.is_some());
            if !open || left.is_zero() {
                return;
            }
            let mut polled = fds.map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            let wait = if self.waiting() {
                left.min(RETRY)
            } else {
                left
            };
            // SAFETY: `polled` is an array of initialised pollfd of the length given.
            unsafe {
                libc::poll(
                    polled.as_mut_ptr(),
                    polled.len() as libc::nfds_t,
                    wait.as_millis().min(i32::MAX as u128) as libc::c_int + 1,
                )
            };
        }
    }

    /// How each stream ended: the writer is told that no more comes, and
    /// waited for at most `limit` (a log on a disk that does not answer
    /// cannot hold up the report: its stream then says so). The flag says
    /// whether the writer finished: if not, its thread still holds the
    /// logs, and this process must not take another run.
    pub(super) fn ends(mut self, limit: Duration) -> (Vec<StreamEnd>, bool) {
        if let Some(writer) = self.writer.take() {
            drop(writer.chunks);
            return match writer.ends.recv_timeout(limit) {
                Ok(ends) => (ends, true),
                Err(_) => {
                    let ends = STREAMS
                        .into_iter()
                        .map(|stream| StreamEnd {
                            stream,
                            tail: String::new(),
                            error: Some(format!(
                                "its log was still being written {} s after the task ended",
                                limit.as_secs()
                            )),
                        })
                        .collect();
                    (ends, false)
                }
            };
        }
        let logs = self
            .logs
            .take()
            .expect("the logs, or the writer that took them");
        (stream_ends(&logs), true)
    }
}

/// Each log's tail and error, as the report says them.
fn stream_ends(logs: &[OutputLog; 2]) -> Vec<StreamEnd> {
    STREAMS
        .into_iter()
        .zip(logs)
        .map(|(stream, log)| StreamEnd {
            stream,
            tail: log.tail_text(),
            error: log.error().map(str::to_string),
        })
        .collect()
}

/// Start the writer thread with `logs`; them back if it cannot start.
#[allow(clippy::result_large_err)]
fn start_writer(logs: [OutputLog; 2]) -> Result<Writer, (std::io::Error, [OutputLog; 2])> {
    let (chunks, queue) = mpsc::sync_channel::<(usize, Vec<u8>)>(QUEUE);
    let (ended, ends) = mpsc::channel();
    // The logs go to the thread through a slot it empties, so that they
    // come back if the thread cannot be started.
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(logs)));
    let theirs = std::sync::Arc::clone(&slot);
    let started = std::thread::Builder::new()
        .name("logs".into())
        .stack_size(WRITER_STACK)
        .spawn(move || {
            let Some(mut logs) = theirs.lock().ok().and_then(|mut slot| slot.take()) else {
                return;
            };
            for (index, chunk) in queue {
                logs[index].push(&chunk);
            }
            let _ = ended.send(stream_ends(&logs));
        });
    match started {
        Ok(_) => Ok(Writer { chunks, ends }),
        Err(error) => {
            let logs = slot
                .lock()
                .ok()
                .and_then(|mut slot| slot.take())
                .expect("the thread never ran");
            Err((error, logs))
        }
    }
}

/// A pipe: (read end, non-blocking; write end), both close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((reader, writer))
}
