//! The fork server: one process per agent, started from the agent's binary
//! once, that forks every supervisor after it.
//!
//! **Why.** A supervisor exec'd from the agent's binary pays for that
//! binary on every run: the kernel maps it, the dynamic loader relocates
//! it, and the pages it writes doing so are private to each supervisor —
//! about 0.9 MiB of memory per running task, and most of a task's start-up
//! CPU. A supervisor forked from a process that has done all of that once
//! shares those pages with it (copy-on-write): it costs only the pages it
//! writes itself.
//!
//! **Still the agent's child.** The fork server creates each supervisor
//! with `clone3(CLONE_PARENT)`: the new process's parent is the agent, not
//! the fork server, so the agent reaps it and reads its exit status as it
//! would an exec'd one (and its pid, until then, cannot name another
//! process), and the fork server's own death changes nothing for the
//! supervisors it made.
//!
//! ```text
//! agent ──SOCK_SEQPACKET (fork server's stdin)──> fork server
//!   │  request: one byte + [its control socket] (SCM_RIGHTS)
//!   │  answer:  the pid (or −errno)
//!   └── parent of every supervisor ── supervisor (fd 0 = the socket passed)
//! ```
//!
//! The fork server is single-threaded and has no async runtime, so forking
//! it is sound. It exits when the agent's end of its socket closes. An agent
//! whose fork server is missing or refuses (an old kernel without `clone3`,
//! a seccomp profile that denies it) execs each supervisor instead, as
//! before.

use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The argument that makes a supervisor binary a fork server.
pub const FORK_SERVER_ARG: &str = "--fork-server";

/// The one byte of a request.
const REQUEST: u8 = b'f';

/// How long the agent waits for the fork server's answer: it forks a small
/// single-threaded process, which takes well under a millisecond; one that
/// takes longer than this is stuck, and the agent stops using it.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve fork requests on fd 0 until the agent's end closes.
pub(crate) fn serve() -> Result<()> {
    // Forking is sound only in a process with one thread, and the child's
    // C library state is right only with glibc (whose `raise` asks the
    // kernel for the thread's id instead of trusting its own record).
    if !cfg!(target_env = "gnu") || threads() != Some(1) {
        return Err(Error::other(
            "the fork server needs a single-threaded process on glibc",
        ));
    }
    // SAFETY: fd 0 is the agent's SOCK_SEQPACKET socket, handed to this
    // process as its stdin; nothing else here uses it.
    let socket = unsafe { OwnedFd::from_raw_fd(0) };
    loop {
        let (payload, mut fds) = match receive(socket.as_raw_fd(), 1) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        let answer = match (payload.as_slice(), fds.pop()) {
            ([REQUEST], Some(control)) if fds.is_empty() => fork_supervisor(control),
            _ => Err(Error::from_raw_os_error(libc::EINVAL)),
        };
        let code = match answer {
            Ok(pid) => pid,
            Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
        };
        let sent = send(socket.as_raw_fd(), &code.to_le_bytes(), &[]);
        if let Err(error) = sent {
            // The agent is gone (or went away mid-request): so is the reason to run.
            if error.kind() == ErrorKind::BrokenPipe
                || error.raw_os_error() == Some(libc::ECONNRESET)
            {
                return Ok(());
            }
            return Err(error);
        }
    }
}

/// This process's thread count, from `/proc/self/status`.
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Create a supervisor whose fd 0 is `control` (its socket to the agent),
/// as a child of this process's parent. Returns its pid.
/// The new process never returns here. (Its stdout and stderr are this
/// process's: nothing, and the agent's stderr, for its own errors.)
fn fork_supervisor(control: OwnedFd) -> Result<libc::pid_t> {
    // SAFETY: clone_args is plain data; zeroed is a valid (empty) value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = libc::CLONE_PARENT as u64;
    // `exit_signal` stays 0, as clone3 requires with CLONE_PARENT: the
    // child gets this process's own exit signal (SIGCHLD), so the agent
    // waits for it as for any child of its own.
    // SAFETY: clone3 without CLONE_VM is fork with flags: the child gets a
    // copy of this single-threaded process and returns 0 on the same stack.
    // `args` lives across the call and is of the size given.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid < 0 {
        return Err(Error::last_os_error());
    }
    if pid == 0 {
        become_supervisor(control);
    }
    Ok(pid as libc::pid_t)
}

/// In the new process: put `control` in place of stdin (the fork server's
/// socket on fd 0 goes with that), and run the supervisor.
fn become_supervisor(control: OwnedFd) -> ! {
    // SAFETY: dup2 of an open descriptor onto 0; the received one is above
    // 2 (0, 1 and 2 were open when it was received).
    if unsafe { libc::dup2(control.as_raw_fd(), 0) } < 0 {
        // SAFETY: _exit ends this process at once.
        unsafe { libc::_exit(127) };
    }
    drop(control);
    retitle();
    // Not in the agent's (or the fork server's) process group: a signal to
    // that group (Ctrl-C on a terminal) reaches the agent, which drains,
    // and not every supervisor at once.
    // SAFETY: setpgid on this process.
    unsafe { libc::setpgid(0, 0) };
    std::process::exit(super::main(std::iter::empty()))
}

/// Drop [`FORK_SERVER_ARG`] from this process's command line (as `ps` and
/// `/proc/PID/cmdline` show it), which it inherited from the fork server:
/// a supervisor shows as `… supervise`, only the fork server as
/// `… supervise --fork-server`.
fn retitle() {
    // Fields 48 and 49 of /proc/self/stat: where the argument strings are
    // in this process's memory (after the command name, which may hold
    // spaces, but not a ')').
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(after_name) = stat.rfind(')').map(|end| &stat[end + 2..]) else {
        return;
    };
    // The fields after the name start with the 3rd.
    let mut fields = after_name.split_whitespace().skip(48 - 3);
    let (Some(Ok(start)), Some(Ok(end))) = (
        fields.next().map(str::parse::<usize>),
        fields.next().map(str::parse::<usize>),
    ) else {
        return;
    };
    let wanted = FORK_SERVER_ARG.as_bytes();
    if end <= start || end - start < wanted.len() + 1 {
        return;
    }
    // SAFETY: [start, end) is this process's own argument area, mapped and
    // writable (it is on the initial stack), as the kernel reports it; it
    // is read as bytes only.
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    // The last argument, NUL-terminated, is the fork server's flag.
    let tail = area.len() - wanted.len() - 1;
    if area.ends_with(&[wanted, b"\0"].concat()) && tail > 0 && area[tail - 1] == 0 {
        area[tail..].fill(0);
    }
}

/// Send `payload` with `fds` attached (SCM_RIGHTS) on a SOCK_SEQPACKET
/// socket, as one message.
pub(crate) fn send(socket: RawFd, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let mut control = vec![0u8; control_space(fds.len())];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid, and the fields set
    // below point at live buffers of the lengths given.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if !fds.is_empty() {
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = control.len() as _;
        // SAFETY: the control buffer has room for one header and the
        // descriptors (control_space); CMSG_* stay within it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(header).cast::<RawFd>();
            for (n, fd) in fds.iter().enumerate() {
                data.add(n).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `message` points at `iov` and `control`, alive here.
        let sent = unsafe { libc::sendmsg(socket, &message, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let error = Error::last_os_error();
        if error.kind() != ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Receive one message of at most 64 bytes with at most `max_fds`
/// descriptors (close-on-exec); `None` once the peer closed.
pub(crate) fn receive(socket: RawFd, max_fds: usize) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut payload = [0u8; 64];
    let mut control = vec![0u8; control_space(max_fds)];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: as in `send`.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control.len() as _;
    // SAFETY: `message` points at `iov` and `control`, alive here.
    let read = unsafe { libc::recvmsg(socket, &mut message, libc::MSG_CMSG_CLOEXEC) };
    if read < 0 {
        return Err(Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_*
    // walk only within it, and every SCM_RIGHTS descriptor is new and ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for n in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(n).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if read == 0 && fds.is_empty() {
        return Ok(None);
    }
    if message.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "a message too large for the fork server protocol",
        ));
    }
    Ok(Some((payload[..read as usize].to_vec(), fds)))
}

fn control_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((fds.max(1) * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// The agent's end: ask for a supervisor with `control` as its fd 0;
/// returns its pid. `socket` must have a receive timeout (a stuck fork
/// server then fails the request).
pub(crate) fn request(socket: RawFd, control: BorrowedFd<'_>) -> Result<libc::pid_t> {
    send(socket, &[REQUEST], &[control])?;
    let (payload, received) = loop {
        match receive(socket, 0) {
            Ok(Some(answer)) => break answer,
            Ok(None) => return Err(Error::new(ErrorKind::BrokenPipe, "the fork server exited")),
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    };
    let malformed = || {
        Error::new(
            ErrorKind::InvalidData,
            "a malformed answer from the fork server",
        )
    };
    let code = <[u8; 4]>::try_from(payload.as_slice())
        .map(i32::from_le_bytes)
        .map_err(|_| malformed())?;
    match code {
        pid if pid > 0 && received.is_empty() => Ok(pid),
        code if code < 0 && received.is_empty() => Err(Error::from_raw_os_error(-code)),
        _ => Err(malformed()),
    }
}
