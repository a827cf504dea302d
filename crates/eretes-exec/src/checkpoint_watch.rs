//! Waking a run when its process replaces its checkpoint file, instead of
//! looking at every file every second: with thousands of idle tasks, a
//! poll is thousands of `statx` calls a second through the blocking pool.
//!
//! One inotify instance per handler watches the directories checkpoint
//! files live in (the shared one, and each run's private one when tasks
//! run as another user) for a file renamed into place (`MOVED_TO`, the
//! documented way to replace it) or written (`MODIFY`, `CLOSE_WRITE`). Its
//! events wake the run whose file they name; an idle run costs nothing.
//! Where inotify is unavailable (no instance left, no watch left), the run
//! falls back to looking every [`crate::CHECKPOINT_POLL`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tracing::warn;

/// What the watch looks for in a checkpoint directory: a file renamed into
/// place, written and closed, or written through a descriptor that stays
/// open (repeated events of one file wake its run once; its looks are a
/// second apart anyway). A file changed only through a shared memory
/// mapping raises none of these: such a task must write or replace it.
const MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MODIFY);

/// A watched file: its directory's watch and its name.
type FileKey = (WatchDescriptor, OsString);

/// The checkpoint files of one handler's runs, watched.
#[derive(Default)]
pub(crate) struct CheckpointWatcher {
    /// Started at the first watch (it needs a tokio runtime); `None` inside
    /// when inotify could not be set up.
    shared: OnceLock<Option<Arc<Shared>>>,
}

struct Shared {
    watches: Mutex<Watches>,
    /// Set when reading events failed: runs poll from then on.
    broken: AtomicBool,
    /// The wake-up of each watched file's run.
    files: Mutex<HashMap<FileKey, Arc<Signal>>>,
}

/// A run's watched checkpoint file; unwatched when dropped.
pub(crate) struct Watched {
    shared: Arc<Shared>,
    key: FileKey,
    /// Notified when the file may have changed.
    pub changed: Arc<Signal>,
}

impl Watched {
    /// Whether the watch stopped working (the run polls instead).
    pub(crate) fn broken(&self) -> bool {
        self.shared.broken.load(Ordering::Relaxed)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let mut files = self.shared.files.lock().expect("not poisoned");
        // Only this run's entry (never one a later run of the same file
        // put there).
        if files
            .get(&self.key)
            .is_some_and(|changed| Arc::ptr_eq(changed, &self.changed))
        {
            files.remove(&self.key);
            eretes_runtime::sparse::Sparse::shrink_if_sparse(&mut *files);
        }
        // A private directory's watch goes with the directory (the kernel
        // drops it when the directory is removed); the shared one stays.
    }
}

impl CheckpointWatcher {
    /// Watch `file` (in a directory that exists); `None` when inotify is
    /// not available, and the caller polls instead.
    pub(crate) fn watch(&self, file: &Path) -> Option<Watched> {
        let shared = self.shared.get_or_init(start).as_ref()?.clone();
        let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
            return None;
        };
        let added = shared.watches.lock().expect("not poisoned").add(dir, MASK);
        let wd = match added {
            Ok(wd) => wd,
            Err(error) => {
                warn!(%error, dir = %dir.display(), "cannot watch a checkpoint directory; polling its file instead");
                return None;
            }
        };
        let key = (wd, name.to_os_string());
        let changed = Arc::new(Signal::default());
        shared
            .files
            .lock()
            .expect("not poisoned")
            .insert(key.clone(), changed.clone());
        Some(Watched {
            shared,
            key,
            changed,
        })
    }
}

/// A wake-up that keeps one permit, like `tokio::sync::Notify` with one
/// waiter, but waited for by polling ([`Signal::poll_take`]): the waiting
/// future holds no state of its own, and every idle run waits on one.
#[derive(Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wake the waiter, or the next one if none waits now.
    pub(crate) fn notify(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready (taking the permit) once notified since the last take.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A notification between the look above and the registration.
        if self.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Set up the inotify instance and the task that reads its events.
fn start() -> Option<Arc<Shared>> {
    let inotify = match Inotify::init() {
        Ok(inotify) => inotify,
        Err(error) => {
            warn!(%error, "inotify is not available; checkpoint files are polled");
            return None;
        }
    };
    let stream = match inotify.into_event_stream([0u8; 8192]) {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%error, "inotify is not available; checkpoint files are polled");
            return None;
        }
    };
    let shared = Arc::new(Shared {
        watches: Mutex::new(stream.watches()),
        broken: AtomicBool::new(false),
        files: Mutex::new(HashMap::new()),
    });
    let weak = Arc::downgrade(&shared);
    tokio::spawn(async move {
        // However the reader ends (the stream ends, the runtime stops, a
        // panic), the runs fall back to polling rather than wait for ever.
        let _ended = ReaderEnded(weak.clone());
        let mut stream = stream;
        while let Some(event) = stream.next().await {
            let Some(shared) = weak.upgrade() else { return };
            let files = shared.files.lock().expect("not poisoned");
            match event {
                Ok(event) if event.mask.contains(EventMask::Q_OVERFLOW) => {
                    // Events were lost: every run looks at its file.
                    files.values().for_each(|changed| changed.notify());
                }
                Ok(event) => {
                    if let Some(name) = event.name {
                        if let Some(changed) = files.get(&(event.wd, name)) {
                            changed.notify();
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "reading inotify events failed; checkpoint files are polled from now on");
                    return;
                }
            }
        }
    });
    Some(shared)
}

/// Marks the watcher broken, and wakes every run (to poll from then on),
/// when the reader task ends.
struct ReaderEnded(std::sync::Weak<Shared>);

impl Drop for ReaderEnded {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.broken.store(true, Ordering::Relaxed);
            let files = shared.files.lock().unwrap_or_else(|e| e.into_inner());
            files.values().for_each(|changed| changed.notify());
        }
    }
}
