//! The task's stdout and stderr, read by its supervisor: each a pipe whose
//! read end the supervisor's loop polls beside its socket, signals and
//! timer, copied into the task's log ([`crate::output`]).

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::wire::{LaunchLogs, Stream, StreamEnd};
use crate::output::{reset_logs, OutputLog};

/// Bytes read from a pipe at a time.
const READ_SIZE: usize = 16 * 1024;

/// Reads of one pipe per wake of the loop: a task that writes without pause
/// must not keep the loop from its deadlines and orders.
const READS_PER_WAKE: usize = 4;

/// One output stream.
struct TaskStream {
    stream: Stream,
    /// The read end, until the stream ended.
    pipe: Option<OwnedFd>,
    log: OutputLog,
}

/// The task's two output streams.
pub(super) struct TaskStreams {
    streams: [TaskStream; 2],
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
        let stream = |stream, pipe, name| {
            let mut log = OutputLog::open(dir.join(name), logs.cap, logs.tail_bytes);
            if let Err(error) = &prepared {
                log.note_error(format!("cannot prepare {}: {error}", dir.display()));
            }
            TaskStream {
                stream,
                pipe: Some(pipe),
                log,
            }
        };
        let streams = TaskStreams {
            streams: [
                stream(Stream::Stdout, stdout, "stdout.log"),
                stream(Stream::Stderr, stderr, "stderr.log"),
            ],
        };
        Ok((streams, stdout_writer, stderr_writer))
    }

    /// The descriptors to poll: each open pipe, or -1 (which poll skips).
    pub(super) fn poll_fds(&self) -> [RawFd; 2] {
        self.streams
            .each_ref()
            .map(|stream| stream.pipe.as_ref().map_or(-1, AsRawFd::as_raw_fd))
    }

    /// Read what is there from each open pipe (a bounded amount).
    pub(super) fn read_ready(&mut self) {
        for stream in &mut self.streams {
            stream.read_ready();
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
            if fds.iter().all(|&fd| fd < 0) || left.is_zero() {
                return;
            }
            let mut polled = fds.map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `polled` is an array of initialised pollfd of the length given.
            unsafe {
                libc::poll(
                    polled.as_mut_ptr(),
                    polled.len() as libc::nfds_t,
                    left.as_millis().min(i32::MAX as u128) as libc::c_int + 1,
                )
            };
        }
    }

    /// How each stream ended.
    pub(super) fn ends(&self) -> Vec<StreamEnd> {
        self.streams
            .iter()
            .map(|stream| StreamEnd {
                stream: stream.stream,
                tail: stream.log.tail_text(),
                error: stream.log.error().map(str::to_string),
            })
            .collect()
    }
}

impl TaskStream {
    fn read_ready(&mut self) {
        let Some(pipe) = &self.pipe else {
            return;
        };
        let mut buffer = [0u8; READ_SIZE];
        for _ in 0..READS_PER_WAKE {
            // SAFETY: reads at most `buffer.len()` bytes into `buffer`.
            let read =
                unsafe { libc::read(pipe.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if read > 0 {
                self.log.push(&buffer[..read as usize]);
                continue;
            }
            let error = std::io::Error::last_os_error();
            match (read, error.raw_os_error()) {
                (0, _) => self.pipe = None,
                (_, Some(libc::EINTR)) => continue,
                (_, Some(libc::EAGAIN)) => {}
                // A pipe that fails to read has ended, as far as it goes.
                _ => self.pipe = None,
            }
            return;
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
