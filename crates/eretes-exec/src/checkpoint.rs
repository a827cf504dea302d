//! A process task's checkpoint file: filled with the latest checkpoint before
//! the process starts, and saved (fenced) whenever the process replaces it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use eretes_protocol::machine::MAX_CHECKPOINT_BYTES;
use eretes_runtime::Checkpointer;
use tracing::{debug, warn};

/// One run's checkpoint file.
pub(crate) struct CheckpointFile {
    path: PathBuf,
    /// Size and modification time last looked at, to skip unchanged files.
    seen: Option<(u64, SystemTime)>,
    /// The bytes the store holds (delivered at start, or saved since).
    saved: Option<Vec<u8>>,
}

impl CheckpointFile {
    /// Prepare `path` for a run: it holds `latest`, or is absent; owned by
    /// `owner` (uid, gid) if given, so that a task running as that user can
    /// replace it.
    pub(crate) async fn prepare(
        path: PathBuf,
        latest: Option<Vec<u8>>,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        match &latest {
            Some(bytes) => {
                tokio::fs::write(&path, bytes).await?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
            None => match tokio::fs::remove_file(&path).await {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            },
        }
        let mut file = CheckpointFile {
            path,
            seen: None,
            saved: latest,
        };
        file.seen = file.stamp().await;
        Ok(file)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    async fn stamp(&self) -> Option<(u64, SystemTime)> {
        let metadata = tokio::fs::metadata(&self.path).await.ok()?;
        Some((metadata.len(), metadata.modified().ok()?))
    }

    /// Save the file as the task's checkpoint if the process changed it.
    pub(crate) async fn sync(&mut self, task: &str, checkpointer: &Checkpointer) {
        let stamp = self.stamp().await;
        if stamp.is_none() || stamp == self.seen {
            return;
        }
        self.seen = stamp;
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!(task, %error, "cannot read the task's checkpoint file");
                return;
            }
        };
        if bytes.len() > MAX_CHECKPOINT_BYTES {
            warn!(
                task,
                bytes = bytes.len(),
                limit = MAX_CHECKPOINT_BYTES,
                "the task's checkpoint file is over the limit; not saved"
            );
            return;
        }
        if self.saved.as_ref() == Some(&bytes) {
            return;
        }
        // Bounded, so a slow store cannot hold off stopping the process.
        match tokio::time::timeout(SAVE_TIMEOUT, checkpointer.save(bytes.clone())).await {
            Ok(Ok(())) => self.saved = Some(bytes),
            outcome => {
                let error = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no answer within {SAVE_TIMEOUT:?}"),
                };
                debug!(task, error, "the task's checkpoint was not saved");
                // Look again next time: the store may be back.
                self.seen = None;
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
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.temporary());
    }
}
