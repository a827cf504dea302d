//! How a supervisor starts its task's leader: `clone(CLONE_VM |
//! CLONE_VFORK)`, as glibc's `posix_spawn` does, with the steps
//! `posix_spawn` cannot take done in the child before its exec: the
//! parent-death signal (so that a supervisor killed with `kill -9` takes
//! the leader with it), the task's user and groups, the open-file limit.
//!
//! **Why not fork.** A forked child gets a copy of the supervisor's page
//! tables (its share of the agent's large binary included), takes a fault
//! on every page it writes before its exec, and has that copy torn down at
//! the exec. Under short tasks this was some 40 % of all the supervisors'
//! CPU (`perf`, 2,000 `true` tasks); the child made here shares the
//! supervisor's memory until its exec, while the supervisor waits
//! (`CLONE_VFORK`), and costs none of that.
//!
//! **What the child may do.** It runs on a stack of its own but in the
//! supervisor's memory, so it allocates nothing, takes no lock and cannot
//! panic: everything it needs (paths, arguments, environment, descriptors)
//! is made ready here first, and it only makes system calls. Credentials
//! change through raw system calls, not the C library's wrappers, which in
//! a process with threads (the log writer) broadcast the change to every
//! thread the library knows of — the supervisor's, not this child's. It
//! reports a failure through memory it
//! shares with the supervisor, then `_exit`s; the supervisor reads it once
//! the clone returns, which `CLONE_VFORK` delays until the child has either
//! exec'd or exited. One of its changes reaches the supervisor: a change
//! of user marks the memory they share as not dumpable, so a supervisor
//! that started a `--run-as` task writes no core dump (it runs as root,
//! whose processes only root may trace either way).
//!
//! The program is looked up as `execvp` does: in the `PATH` of the task's
//! environment (or `/bin:/usr/bin`), an `EACCES` remembered while the
//! search goes on, and a file the kernel cannot execute (`ENOEXEC`, a
//! script without `#!`) run by `/bin/sh`.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The child's stack: it makes a few system calls, no more.
const CHILD_STACK: usize = 32 * 1024;

/// Where `execvp` looks when the environment has no `PATH`.
const DEFAULT_SEARCH: &[u8] = b"/bin:/usr/bin";

/// The leader to start.
pub(super) struct LeaderSpec<'a> {
    /// The program: a path if it holds a `/`, a name to look up otherwise.
    pub program: &'a str,
    /// Its arguments, after its name (which `argv[0]` is, as `Command`
    /// makes it).
    pub args: &'a [String],
    /// Its whole environment.
    pub env: BTreeMap<OsString, OsString>,
    /// Its working directory (entered before the user changes).
    pub cwd: Option<&'a str>,
    /// Its stdout and stderr; `/dev/null` if absent.
    pub stdout: Option<RawFd>,
    /// See `stdout`.
    pub stderr: Option<RawFd>,
    /// Its soft open-file limit (within the hard one).
    pub open_files: Option<u64>,
    /// Its user, group and supplementary groups.
    pub identity: Option<(libc::uid_t, libc::gid_t, &'a [libc::gid_t])>,
}

/// What the child reads, all of it made before the clone.
struct Prepared {
    /// The paths to try, in order.
    candidates: Vec<CString>,
    /// Each argument, then a null pointer.
    argv: Vec<*const libc::c_char>,
    /// `/bin/sh`, a slot for the script's path, the arguments after the
    /// name, then a null pointer: for a file the kernel cannot execute
    /// (the child fills the slot; nothing else looks meanwhile).
    shell_argv: UnsafeCell<Vec<*const libc::c_char>>,
    /// `NAME=value` for each variable, then a null pointer.
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    /// For stdin, and for stdout and stderr where none is given.
    null: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    open_files: Option<u64>,
    identity: Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>,
    /// The supervisor's pid: the child that finds another parent (the
    /// supervisor died before the parent-death signal was set) ends.
    parent: libc::pid_t,
    /// Set by the child that fails: the errno, then the flag.
    failed_errno: AtomicI32,
    failed: AtomicBool,
}

const SHELL: &std::ffi::CStr = c"/bin/sh";

/// The memory a leader's child runs its few calls on, kept for the next:
/// its pages, once touched, are not touched anew (nor left dirty in the
/// heap) by each run. Below it, a page that faults.
pub(super) struct ChildStack {
    /// The mapping: the guard page, then the stack.
    base: *mut libc::c_void,
}

impl ChildStack {
    /// Map one.
    pub(super) fn new() -> std::io::Result<ChildStack> {
        // SAFETY: an anonymous private mapping of a size, at no address
        // asked for; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUARD + CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = ChildStack { base };
        // SAFETY: the first page of the mapping just made.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// Where the child's stack starts (it grows down), 16-byte aligned as
    /// the ABI asks (a mapping is page-aligned).
    fn top(&mut self) -> *mut libc::c_void {
        self.base
            .cast::<u8>()
            .wrapping_add(GUARD + CHILD_STACK)
            .cast()
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by nothing any more.
        unsafe { libc::munmap(self.base, GUARD + CHILD_STACK) };
    }
}

/// The system calls that set a process's groups, group and user with ids
/// of 32 bits (on 32-bit x86 and ARM the plain ones take 16).
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SET_GROUPS: libc::c_long = libc::SYS_setgroups32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SET_GID: libc::c_long = libc::SYS_setgid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SET_UID: libc::c_long = libc::SYS_setuid32;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SET_GROUPS: libc::c_long = libc::SYS_setgroups;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SET_GID: libc::c_long = libc::SYS_setgid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SET_UID: libc::c_long = libc::SYS_setuid;

/// The guard page below a child's stack.
const GUARD: usize = 4096;

/// Start the leader on `stack`; its pid. Its exit is the caller's to reap
/// (SIGCHLD).
pub(super) fn spawn(spec: LeaderSpec<'_>, stack: &mut ChildStack) -> std::io::Result<libc::pid_t> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "nul byte found in provided data",
            )
        })
    };
    if spec.program.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
    }
    let program = cstring(spec.program.as_bytes())?;
    let args = spec
        .args
        .iter()
        .map(|arg| cstring(arg.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let variables = spec
        .env
        .iter()
        .map(|(name, value)| cstring(&[name.as_bytes(), b"=", value.as_bytes()].concat()))
        .collect::<Result<Vec<_>, _>>()?;
    let candidates = if spec.program.contains('/') {
        vec![program.clone()]
    } else {
        let search = spec
            .env
            .get(std::ffi::OsStr::new("PATH"))
            .map_or(DEFAULT_SEARCH, |path| path.as_bytes());
        search
            .split(|&byte| byte == b':')
            .map(|dir| {
                // An empty entry is the working directory, as for execvp.
                let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
                cstring(&[dir, b"/", spec.program.as_bytes()].concat())
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let cwd = spec.cwd.map(|cwd| cstring(cwd.as_bytes())).transpose()?;
    let null = open_null()?;
    let mut argv: Vec<*const libc::c_char> = std::iter::once(program.as_ptr())
        .chain(args.iter().map(|arg| arg.as_ptr()))
        .collect();
    argv.push(std::ptr::null());
    let mut shell_argv: Vec<*const libc::c_char> = vec![SHELL.as_ptr(), std::ptr::null()];
    shell_argv.extend(args.iter().map(|arg| arg.as_ptr()));
    shell_argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = variables.iter().map(|var| var.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut prepared = Prepared {
        candidates,
        argv,
        shell_argv: UnsafeCell::new(shell_argv),
        envp,
        cwd,
        null: null.as_raw_fd(),
        stdout: spec.stdout.unwrap_or(null.as_raw_fd()),
        stderr: spec.stderr.unwrap_or(null.as_raw_fd()),
        open_files: spec.open_files,
        identity: spec
            .identity
            .map(|(uid, gid, groups)| (uid, gid, groups.as_ptr(), groups.len())),
        // SAFETY: getpid(2) has no preconditions.
        parent: unsafe { libc::getpid() },
        failed_errno: AtomicI32::new(0),
        failed: AtomicBool::new(false),
    };
    // SAFETY: the child runs `leader_main` on `stack`, which outlives it
    // (CLONE_VFORK: this call returns only once the child exec'd or
    // exited) and which nothing else uses meanwhile (it is borrowed
    // mutably), with `prepared`, which it only reads but for the failure
    // fields and the shell slot, which nothing else touches meanwhile.
    let pid = unsafe {
        libc::clone(
            leader_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of_mut!(prepared).cast(),
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if prepared.failed.load(Ordering::SeqCst) {
        let errno = prepared.failed_errno.load(Ordering::SeqCst);
        // It exited: reap it here, so that the run never sees it.
        super::spawner::reap_blocking(pid);
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
}

/// `/dev/null` for reading and writing, close-on-exec.
fn open_null() -> std::io::Result<OwnedFd> {
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// In the child: report the errno of the step that failed, and exit.
///
/// # Safety
///
/// As [`leader_main`].
unsafe fn fail(prepared: *const Prepared) -> ! {
    let errno = *libc::__errno_location();
    (*prepared).failed_errno.store(errno, Ordering::SeqCst);
    (*prepared).failed.store(true, Ordering::SeqCst);
    libc::_exit(127)
}

/// The child: set itself up as `prepared` says and exec the program; on
/// failure, say which step failed and why, and exit.
///
/// # Safety
///
/// `arg` points at a live `Prepared` in memory shared with the suspended
/// parent. Only system calls are made here: no allocation, no lock, no
/// panic (nothing is indexed; every slice is walked).
extern "C" fn leader_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: see the function's contract.
    unsafe {
        let prepared = arg.cast::<Prepared>().cast_const();
        let this = &*prepared;
        for (from, to) in [(this.null, 0), (this.stdout, 1), (this.stderr, 2)] {
            let done = if from == to {
                // Already in place: it must only survive the exec.
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if done < 0 {
                fail(prepared);
            }
        }
        if let Some(cwd) = &this.cwd {
            if libc::chdir(cwd.as_ptr()) != 0 {
                fail(prepared);
            }
        }
        // The mask is inherited across exec: the task must not start with
        // the supervisor's signals blocked (it would never see SIGTERM).
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(prepared);
        }
        // So is an ignored signal: the agent ignores SIGXFSZ (its writes
        // past a file-size limit must fail, not kill it), and Rust programs
        // SIGPIPE; a task gets the default actions, as any program expects.
        // (This child's dispositions are its own: no CLONE_SIGHAND.)
        for signal in [libc::SIGXFSZ, libc::SIGPIPE] {
            if libc::signal(signal, libc::SIG_DFL) == libc::SIG_ERR {
                fail(prepared);
            }
        }
        // A session and a process group of its own (pgid = sid = pid).
        if libc::setsid() < 0 {
            fail(prepared);
        }
        // The open-file limit the agent was started with, not the one it
        // raised for itself.
        if let Some(soft) = this.open_files {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = soft.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
        // The task's user, groups first (after setuid they could not be
        // changed). Raw calls: they change this process only (see the
        // module's page).
        if let Some((uid, gid, groups, count)) = this.identity {
            if libc::syscall(SET_GROUPS, count, groups) != 0
                || libc::syscall(SET_GID, gid) != 0
                || libc::syscall(SET_UID, uid) != 0
            {
                fail(prepared);
            }
        }
        // If the supervisor dies (kill -9), the leader goes with it. After
        // the user changed: the kernel clears the parent-death signal of a
        // process whose user or group changes.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(prepared);
        }
        // The supervisor died before that: nothing would kill this process.
        if libc::getppid() != this.parent {
            libc::_exit(1);
        }
        // As execvp: the first candidate that runs; EACCES is remembered
        // (it wins over a later ENOENT); an error other than "not here"
        // ends the search.
        let mut denied = false;
        for candidate in &this.candidates {
            libc::execve(candidate.as_ptr(), this.argv.as_ptr(), this.envp.as_ptr());
            match *libc::__errno_location() {
                libc::ENOEXEC => {
                    let shell_argv = &mut *this.shell_argv.get();
                    if let Some(slot) = shell_argv.get_mut(1) {
                        *slot = candidate.as_ptr();
                    }
                    libc::execve(SHELL.as_ptr(), shell_argv.as_ptr(), this.envp.as_ptr());
                    fail(prepared);
                }
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(prepared),
            }
        }
        if denied {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(prepared)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Run `program` with `args` and `env` (PATH from this process if not
    /// given) in `cwd`; its exit code and stdout.
    fn run(
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        cwd: Option<&str>,
    ) -> std::io::Result<(i32, String)> {
        let mut whole: BTreeMap<OsString, OsString> = BTreeMap::new();
        whole.insert("PATH".into(), std::env::var_os("PATH").unwrap_or_default());
        for (name, value) in env {
            whole.insert(name.into(), value.into());
        }
        run_with(program, args, whole, cwd, None)
    }

    /// [`run`] with the whole environment given, as `identity` if given.
    fn run_with(
        program: &str,
        args: &[&str],
        env: BTreeMap<OsString, OsString>,
        cwd: Option<&str>,
        identity: Option<(libc::uid_t, libc::gid_t, &[libc::gid_t])>,
    ) -> std::io::Result<(i32, String)> {
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let pid = spawn(
            LeaderSpec {
                program,
                args: &args,
                env,
                cwd,
                stdout: Some(writer.as_raw_fd()),
                stderr: None,
                open_files: None,
                identity,
            },
            &mut ChildStack::new()?,
        )?;
        drop(writer);
        let mut output = String::new();
        std::fs::File::from(reader)
            .read_to_string(&mut output)
            .unwrap();
        let mut status = 0;
        // SAFETY: waitpid writes one int, which `status` is.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        Ok((libc::WEXITSTATUS(status), output))
    }

    #[test]
    fn a_program_is_looked_up_in_the_tasks_path_and_gets_its_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("only-here");
        std::fs::write(&tool, "#!/bin/sh\necho \"found $1 $2\"\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/nonexistent:{}:/bin", dir.path().display());
        let (code, output) = run("only-here", &["a", "b c"], &[("PATH", &path)], None).unwrap();
        assert_eq!((code, output.as_str()), (0, "found a b c\n"));
        // Not in this process's PATH: the task's was searched.
        let missing = run("only-here", &[], &[], None).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT), "{missing}");
    }

    #[test]
    fn a_script_without_an_interpreter_line_runs_under_sh() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("plain");
        std::fs::write(&script, "echo \"plain $1\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (code, output) = run(script.to_str().unwrap(), &["x"], &[], None).unwrap();
        assert_eq!((code, output.as_str()), (0, "plain x\n"));
    }

    #[test]
    fn a_file_that_cannot_be_run_is_permission_denied_and_a_missing_one_not_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not-executable"), "echo no\n").unwrap();
        let path = format!("{}:/nonexistent", dir.path().display());
        let denied = run("not-executable", &[], &[("PATH", &path)], None).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(libc::EACCES), "{denied}");
        let missing = run("/no/such/program", &[], &[], None).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT), "{missing}");
        let empty = run("", &[], &[], None).unwrap_err();
        assert_eq!(empty.raw_os_error(), Some(libc::ENOENT), "{empty}");
        let nul = run("sh", &["a\0b"], &[], None).unwrap_err();
        assert_eq!(nul.kind(), std::io::ErrorKind::InvalidInput, "{nul}");
    }

    #[test]
    fn the_leader_has_its_own_session_directory_environment_and_default_signals() {
        // What a Rust program ignores, and a supervisor blocks, the task
        // must not inherit.
        // SAFETY: signal(2) with SIG_IGN installs no handler.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        // As the supervisor does: SIGTERM and SIGCHLD blocked (in this
        // thread, whose mask the child starts from).
        // SAFETY: sigset_t is plain data, set up by sigemptyset/sigaddset;
        // pthread_sigmask changes this thread's mask only.
        let previous = unsafe {
            let mut blocked: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut blocked);
            libc::sigaddset(&mut blocked, libc::SIGTERM);
            libc::sigaddset(&mut blocked, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut previous);
            previous
        };
        let dir = tempfile::tempdir().unwrap();
        let ran = run(
            "sh",
            &[
                "-c",
                "echo \"$MARK\"; pwd; cut -d' ' -f6 /proc/$$/stat; echo $$",
            ],
            &[("MARK", "here")],
            Some(dir.path().to_str().unwrap()),
        );
        // The masks are read by a leader that is grep itself: a shell
        // changes its own around the commands it starts (dash blocks every
        // signal while it forks one, and clears its mask afterwards).
        let masks = run(
            "grep",
            &["-E", "^(SigIgn|SigBlk)", "/proc/self/status"],
            &[],
            None,
        );
        // SAFETY: as above, `previous` being this thread's earlier mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
        let (code, output) = ran.unwrap();
        assert_eq!(code, 0, "{output}");
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines[0], "here");
        assert_eq!(lines[1], dir.path().to_str().unwrap());
        assert_eq!(lines[2], lines[3], "the leader leads its session: {output}");
        let (code, masks) = masks.unwrap();
        assert_eq!(code, 0, "{masks}");
        let mask = |name: &str| {
            let line = masks.lines().find(|line| line.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        let bit = |signal: libc::c_int| 1u64 << (signal - 1);
        assert_eq!(
            mask("SigIgn:") & (bit(libc::SIGPIPE) | bit(libc::SIGXFSZ)),
            0,
            "{masks}"
        );
        assert_eq!(mask("SigBlk:"), 0, "{masks}");
    }

    #[test]
    fn the_leader_runs_as_the_tasks_user_and_this_process_stays_as_it_was() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: the user cannot change (crates/eretes/tests/run_as.rs checks the refusal)");
            return;
        }
        let groups_of_this_process = || {
            let mut groups = vec![0 as libc::gid_t; 256];
            // SAFETY: getgroups writes at most the count given.
            let count =
                unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
            groups.truncate(count.max(0) as usize);
            groups
        };
        let before = groups_of_this_process();
        let groups = [65534, 4242];
        // A second thread of this process, to see that it keeps its user.
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, told) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            asked.recv().unwrap();
            // SAFETY: getuid(2) has no preconditions.
            tell.send(unsafe { libc::getuid() }).unwrap();
        });
        let (code, output) = run_with(
            "sh",
            &["-c", "id -u; id -g; id -G"],
            std::env::vars_os().collect(),
            Some("/"),
            Some((65534, 65534, &groups)),
        )
        .unwrap();
        assert_eq!(code, 0, "{output}");
        assert_eq!(output, "65534\n65534\n65534 4242\n");
        // SAFETY: getuid(2) has no preconditions.
        assert_eq!(unsafe { libc::getuid() }, 0, "this thread is still root");
        ask.send(()).unwrap();
        assert_eq!(told.recv().unwrap(), 0, "and so is every other");
        other.join().unwrap();
        assert_eq!(groups_of_this_process(), before);
    }

    #[test]
    fn a_directory_that_cannot_be_entered_fails_the_start() {
        let error = run("true", &[], &[], Some("/no/such/dir")).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "{error}");
    }
}
