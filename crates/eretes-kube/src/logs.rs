//! A Job's pod log, followed into the task's log file on the agent
//! (`<data-dir>/logs/<task>/stdout.log`, where `eretes logs` and the
//! dashboard read a process task's output), so the log of a Kubernetes task
//! is read the same way, while it runs and after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::AsyncReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::Api;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::job::CONTAINER;

/// How long the follower waits before opening the stream again after it
/// broke (the API server restarted, a proxy cut it).
const REOPEN_WAIT: Duration = Duration::from_millis(500);
/// Reopenings before the follower gives up on a pod.
const MOST_REOPENINGS: u32 = 1_000;

/// Where one run's log goes.
#[derive(Debug, Clone)]
pub struct LogTarget {
    /// The task's log directory.
    pub dir: PathBuf,
    /// Start the file afresh (a first attempt) rather than append (a retry).
    pub reset: bool,
    /// The file rotates at this size (the older part kept as `.1`).
    pub cap: u64,
}

/// Follow `pod`'s log into `target` until the stream ends after `ended`
/// turns true (the Job finished), reopening a stream that breaks before and
/// skipping what was already written, so that no line is written twice.
pub async fn follow(
    api: Api<Pod>,
    pod: String,
    target: LogTarget,
    mut ended: watch::Receiver<bool>,
) {
    let path = target.dir.join("stdout.log");
    if let Err(error) = tokio::fs::create_dir_all(&target.dir).await {
        warn!(%error, dir = %target.dir.display(), "cannot make the task's log directory");
        return;
    }
    let mut file = match open(&path, target.reset).await {
        Ok(file) => file,
        Err(error) => {
            warn!(%error, path = %path.display(), "cannot open the task's log");
            return;
        }
    };
    let mut size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut written: u64 = 0;
    let params = LogParams {
        container: Some(CONTAINER.into()),
        follow: true,
        ..LogParams::default()
    };
    let mut buffer = vec![0u8; 16 * 1024];
    for _ in 0..MOST_REOPENINGS {
        let finished_before = *ended.borrow();
        match api.log_stream(&pod, &params).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                let mut offset: u64 = 0;
                loop {
                    let read = match stream.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(read) => read,
                        Err(error) => {
                            debug!(%error, pod, "the pod's log stream broke");
                            break;
                        }
                    };
                    let chunk = &buffer[..read];
                    // Skip what an earlier stream already delivered.
                    let skip = written.saturating_sub(offset).min(read as u64) as usize;
                    offset += read as u64;
                    let new = &chunk[skip..];
                    if new.is_empty() {
                        continue;
                    }
                    if size + new.len() as u64 > target.cap && size > 0 {
                        match rotate(&path, file).await {
                            Ok(fresh) => {
                                file = fresh;
                                size = 0;
                            }
                            Err(error) => {
                                warn!(%error, path = %path.display(), "cannot rotate the task's log");
                                return;
                            }
                        }
                    }
                    if let Err(error) = file.write_all(new).await {
                        warn!(%error, path = %path.display(), "cannot write the task's log");
                        return;
                    }
                    size += new.len() as u64;
                    written += new.len() as u64;
                }
            }
            Err(error) => debug!(%error, pod, "cannot open the pod's log stream"),
        }
        // A stream that ended after the Job finished has all of it.
        if finished_before {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(REOPEN_WAIT) => {}
            changed = ended.changed() => {
                // The run is gone without saying it ended: so is this.
                if changed.is_err() {
                    return;
                }
            }
        }
    }
    warn!(pod, "gave up following the pod's log");
}

async fn open(path: &Path, reset: bool) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(!reset)
        .write(true)
        .truncate(reset)
        .open(path)
        .await
}

async fn rotate(path: &Path, file: tokio::fs::File) -> std::io::Result<tokio::fs::File> {
    drop(file);
    let mut older = path.as_os_str().to_owned();
    older.push(".1");
    tokio::fs::rename(path, PathBuf::from(older)).await?;
    open(path, true).await
}
