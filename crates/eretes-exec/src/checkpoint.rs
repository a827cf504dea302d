//! A process task's checkpoint file: filled with the latest checkpoint before
//! the process starts, and saved (fenced) whenever the process replaces it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use eretes_protocol::machine::MAX_CHECKPOINT_BYTES;
use tokio::time::Instant;

use crate::checkpoint_watch::{CheckpointWatcher, Watched};
use crate::CHECKPOINT_POLL;
use eretes_runtime::Checkpointer;
use tracing::{debug, warn};

/// One run's checkpoint file.
pub(crate) struct CheckpointFile {
    path: PathBuf,
    /// The run's own directory, when the task runs as another user.
    private_dir: Option<PathBuf>,
    /// The user the task runs as, if not the agent's: the only owner whose
    /// file is read back.
    owner: Option<(u32, u32)>,
    /// Size and modification time last looked at, to skip unchanged files.
    seen: Option<(u64, SystemTime)>,
    /// The bytes the store holds (delivered at start, or saved since).
    saved: Option<Vec<u8>>,
    /// The file's watch (`None`: it is polled).
    watched: Option<Watched>,
    /// When it was last looked at: looks (and so saves) are at least
    /// [`CHECKPOINT_POLL`] apart.
    looked_at: Option<Instant>,
    /// The last save failed: look again after [`CHECKPOINT_POLL`] even
    /// without a change.
    retry: bool,
    /// A change was seen and the look is due (once the last look is
    /// [`CHECKPOINT_POLL`] old).
    due: bool,
}

impl CheckpointFile {
    /// Prepare the file `name` under `root` for a run: it holds `latest`,
    /// or is absent. When the task runs as another user (`owner`, uid and
    /// gid), the file lives in a directory of the run's own that only that
    /// user (and root) may enter, and is created for and owned by it: the
    /// agent never follows a link the task planted, nor reads a file the
    /// task does not own.
    pub(crate) async fn prepare(
        root: &Path,
        name: &str,
        latest: Option<Vec<u8>>,
        owner: Option<(u32, u32)>,
        watcher: &CheckpointWatcher,
    ) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(root).await?;
        let private_dir = match owner {
            Some((uid, gid)) => {
                let dir = root.join(format!("{name}.d"));
                match tokio::fs::remove_dir_all(&dir).await {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        return Err(error)
                    }
                    _ => {}
                }
                std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
                Some(dir)
            }
            None => None,
        };
        let path = match &private_dir {
            Some(dir) => dir.join("checkpoint"),
            None => root.join(name),
        };
        // Whatever the last run left there, a directory too (and at the
        // replacement's name: a run the agent could not clean up after).
        remove_any(&path)?;
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        remove_any(Path::new(&temporary))?;
        if let Some(bytes) = &latest {
            // A new file, never through a link.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            std::io::Write::write_all(&mut file, bytes)?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        let watched = watcher.watch(&path);
        let mut file = CheckpointFile {
            path,
            private_dir,
            owner,
            seen: None,
            saved: latest,
            watched,
            looked_at: None,
            retry: false,
            due: false,
        };
        file.seen = file.stamp().await;
        Ok(file)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Size and modification time of the file itself (never a link's target).
    async fn stamp(&self) -> Option<(u64, SystemTime)> {
        let metadata = tokio::fs::symlink_metadata(&self.path).await.ok()?;
        metadata
            .is_file()
            .then(|| Some((metadata.len(), metadata.modified().ok()?)))
            .flatten()
    }

    /// The file's bytes: opened without following a link or blocking on a
    /// pipe, a regular file of the task's user, at most one byte over the
    /// limit read.
    fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if let Some((uid, _)) = self.owner {
            if std::os::unix::fs::MetadataExt::uid(&metadata) != uid {
                return Err(std::io::Error::other("not owned by the task's user"));
            }
        }
        let mut bytes = Vec::new();
        file.take(MAX_CHECKPOINT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Resolves when the file should be looked at: the process may have
    /// replaced it (its watch fired, or, unwatched, every
    /// [`CHECKPOINT_POLL`]), or a failed save is due again; never sooner
    /// than [`CHECKPOINT_POLL`] after the last look. Cancel-safe.
    pub(crate) async fn changed(&mut self) {
        // Every idle run waits here: the watch is waited for by polling,
        // which keeps nothing in this future, and the timers (a poll where
        // the file is not watched, the pause between two looks) are boxed,
        // so that they take room only while they run.
        if !self.due {
            match &self.watched {
                Some(watched) if !watched.broken() && !self.retry => {
                    std::future::poll_fn(|cx| watched.changed.poll_take(cx)).await
                }
                _ => Box::pin(tokio::time::sleep(CHECKPOINT_POLL)).await,
            }
            // Kept if this future is dropped while it waits below.
            self.due = true;
        }
        if let Some(looked_at) = self.looked_at {
            let next = looked_at + CHECKPOINT_POLL;
            if next > Instant::now() {
                Box::pin(tokio::time::sleep_until(next)).await;
            }
        }
    }

    /// Save the file as the task's checkpoint if the process changed it.
    /// Cancel-safe: the look counts only once it is over, so a look cut
    /// short (the run ended meanwhile) is made again by the next one.
    pub(crate) async fn sync(&mut self, task: &str, checkpointer: &Checkpointer) {
        self.looked_at = Some(Instant::now());
        self.retry = false;
        self.due = false;
        let stamp = self.stamp().await;
        if stamp.is_none() || stamp == self.seen {
            return;
        }
        let bytes = match self.read() {
            Ok(bytes) => bytes,
            Err(error) => {
                self.seen = stamp;
                warn!(task, %error, "cannot read the task's checkpoint file");
                return;
            }
        };
        if bytes.len() > MAX_CHECKPOINT_BYTES {
            self.seen = stamp;
            warn!(
                task,
                limit = MAX_CHECKPOINT_BYTES,
                "the task's checkpoint file is over the limit; not saved"
            );
            return;
        }
        if self.saved.as_ref() == Some(&bytes) {
            self.seen = stamp;
            return;
        }
        // Bounded, so a slow store cannot hold off stopping the process.
        match tokio::time::timeout(SAVE_TIMEOUT, checkpointer.save(bytes.clone())).await {
            Ok(Ok(())) => {
                self.seen = stamp;
                self.saved = Some(bytes);
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no answer within {SAVE_TIMEOUT:?}"),
                };
                debug!(task, error, "the task's checkpoint was not saved");
                // Look again soon: the store may be back.
                self.seen = None;
                self.retry = true;
            }
        }
    }

    /// The process's half-written replacement, by the documented convention.
    fn temporary(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".tmp");
        PathBuf::from(name)
    }
}

/// The longest a checkpoint save may take before the run goes on without it.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for CheckpointFile {
    /// The run is over (or was dropped): its checkpoint is in the store, so
    /// the file and any half-written replacement go.
    fn drop(&mut self) {
        let _ = remove_any(&self.path);
        let _ = remove_any(&self.temporary());
        if let Some(dir) = &self.private_dir {
            // Never follows links inside the directory.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Remove what is at `path`: a file, a link (not what it points at), or a
/// directory with all in it (links inside not followed) — a task may make
/// any of them where its checkpoint file goes. Nothing there is no error.
fn remove_any(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => match std::fs::remove_dir_all(path) {
            // A directory inside that its owner (the task, as the agent's
            // user) made unwritable: the agent, as its owner, may open it
            // up again. Not with the power to change any file's mode (root):
            // the walk goes by path, and a task racing it could swap a link
            // in, whose target would then be changed; such an agent's own
            // removal fails only where even root is refused (a FUSE mount).
            Err(error)
                if error.kind() == std::io::ErrorKind::PermissionDenied
                    && !may_change_any_files_mode() =>
            {
                open_up(path).and_then(|()| std::fs::remove_dir_all(path))
            }
            removed => removed,
        },
        Ok(_) => std::fs::remove_file(path),
        Err(error) => Err(error),
    };
    match removed {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Whether this thread may change the mode of files it does not own
/// (CAP_FOWNER in its effective set: capabilities are per thread).
fn may_change_any_files_mode() -> bool {
    const CAP_FOWNER: u32 = 3;
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| {
            let effective = status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))?;
            u64::from_str_radix(effective.trim(), 16).ok()
        })
        .map(|effective| effective & (1 << CAP_FOWNER) != 0)
        // Unreadable (no /proc): root is assumed to have it.
        // SAFETY: geteuid(2) has no preconditions.
        .unwrap_or_else(|| unsafe { libc::geteuid() } == 0)
}

/// Make directory `top` and every directory under it readable, writable
/// and searchable by its owner (without recursion, as a task may nest
/// directories deeply). An entry that is a link is not followed, but the
/// walk goes by path: called only without the power to change the mode of
/// files one does not own, so a link swapped in meanwhile gains a task
/// nothing. One this process does not own is an error.
fn open_up(top: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&dir)?;
        if !metadata.is_dir() {
            continue;
        }
        let mode = metadata.permissions().mode();
        if mode & 0o700 != 0o700 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o700))?;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whatever_a_task_left_at_its_checkpoint_path_goes_but_not_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "kept").unwrap();
        let tree = dir.path().join("checkpoint.tmp");
        std::fs::create_dir_all(tree.join("deeper")).unwrap();
        std::fs::write(tree.join("deeper/file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        let link = dir.path().join("checkpoint");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        for path in [&tree, &link, &file] {
            remove_any(path).unwrap();
            assert!(std::fs::symlink_metadata(path).is_err(), "{path:?} is gone");
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("keep")).unwrap(),
            "kept"
        );
        remove_any(&dir.path().join("never-there")).unwrap();
    }

    /// Run `check` in a thread of its own without the capabilities that let
    /// root ignore file modes (capabilities are per thread to the kernel),
    /// so that it meets them as a task's owner that is not root would.
    fn as_an_owner_without_privileges(check: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: libc::c_int,
            }
            #[repr(C)]
            #[derive(Clone, Copy, Default)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            const VERSION_3: u32 = 0x2008_0522;
            let mut header = Header {
                version: VERSION_3,
                pid: 0,
            };
            let mut data = [Data::default(); 2];
            // SAFETY: capget/capset read and write the header and two data
            // structs of version 3, which these are; pid 0 is this thread.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_capget, &mut header, &mut data), 0);
                let overrides = (1 << 1) | (1 << 2) | (1 << 3); // DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
                data[0].effective &= !overrides;
                assert_eq!(libc::syscall(libc::SYS_capset, &mut header, &data), 0);
            }
            check();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn directories_a_task_made_unwritable_go_too() {
        as_an_owner_without_privileges(directories_made_unwritable_are_removed);
    }

    fn directories_made_unwritable_are_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("checkpoint");
        std::fs::create_dir_all(tree.join("locked/deeper")).unwrap();
        std::fs::write(tree.join("locked/deeper/file"), "x").unwrap();
        std::fs::write(tree.join("locked/file"), "x").unwrap();
        for (path, mode) in [("locked/deeper", 0o000), ("locked", 0o500), ("", 0o500)] {
            std::fs::set_permissions(tree.join(path), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        assert!(!may_change_any_files_mode());
        // Unprivileged indeed: the plain removal fails.
        let refused = std::fs::remove_dir_all(&tree).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        remove_any(&tree).unwrap();
        assert!(std::fs::symlink_metadata(&tree).is_err(), "it is gone");
    }
}
