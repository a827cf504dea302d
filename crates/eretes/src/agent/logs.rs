//! `GET /v1/tasks/{id}/logs?stream=&tail=&follow=`: a task's stdout or
//! stderr as this agent logged it.
//!
//! A read costs what it returns, not what the log holds: the last `tail`
//! lines are found by reading the file backwards in 64 KiB blocks, and
//! whatever is sent is streamed from the file in blocks of that size, so a
//! reader of a huge log holds one block in memory. With `follow`, the
//! response goes on with what the file grows by until the task has ended
//! and the log is read to its end. A log is created with the task's first
//! output: a task of this agent's that has printed nothing reads as empty.
//!
//! Logs do not outlive their task for long: `eretes rm` removes them on the
//! agent it was sent to, and every agent sweeps its logs directory (every
//! quarter of the retention, at most every 5 minutes), removing the logs of
//! tasks that no longer exist at once and those of ended tasks once they
//! are older than the retention (`--log-retention`, 24 h by default).

use std::io::SeekFrom;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::api::{task_id, ApiError, ApiResult, ApiState};

/// How much of a log is read at once.
const BLOCK: usize = 64 * 1024;

/// How often a followed log is looked at for growth.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Remove task `id`'s logs on this agent (gone already is fine).
pub(crate) async fn remove_logs(logs_dir: &std::path::Path, id: &eretes_protocol::TaskId) {
    match tokio::fs::remove_dir_all(logs_dir.join(id.as_str())).await {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(task = %id, %error, "cannot remove the task's logs");
        }
        _ => {}
    }
}

/// Sweep `logs_dir` for ever (see the module docs).
pub async fn sweep_logs(
    logs_dir: std::path::PathBuf,
    coordinator: eretes_protocol::Coordinator,
    retention: Duration,
) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        tokio::time::sleep(every).await;
        // One read of the namespace per sweep, not one per log directory.
        let Ok(snapshot) = coordinator.snapshot().await else {
            continue;
        };
        let Ok(mut entries) = tokio::fs::read_dir(&logs_dir).await else {
            continue;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|name| eretes_protocol::TaskId::new(name).ok())
            else {
                continue;
            };
            let expired = match snapshot.tasks.get(&id) {
                // Missing from the snapshot: submitted since, or gone. Only
                // a fresh look tells, so a task started here meanwhile keeps
                // its logs.
                None => matches!(coordinator.task_view(&id).await, Ok(None)),
                Some(view) if view.state.is_terminal() => last_written(&entry.path())
                    .await
                    .is_some_and(|at| at.elapsed().is_ok_and(|age| age > retention)),
                Some(_) => false,
            };
            if expired {
                remove_logs(&logs_dir, &id).await;
            }
        }
    }
}

/// When anything in a task's log directory was last written.
async fn last_written(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = tokio::fs::metadata(dir).await.ok()?.modified().ok();
    let mut entries = tokio::fs::read_dir(dir).await.ok()?;
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Ok(modified) = entry.metadata().await.and_then(|m| m.modified()) {
            newest = newest.max(Some(modified));
        }
    }
    newest
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    stream: Option<String>,
    follow: Option<bool>,
    /// Only the last this many lines (of what is there when asked).
    tail: Option<usize>,
}

/// The handler.
pub(crate) async fn logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query?;
    let id = task_id(&id)?;
    let stream = query.stream.as_deref().unwrap_or("stdout");
    if !matches!(stream, "stdout" | "stderr") {
        return Err(ApiError::invalid(format!(
            "stream {stream:?} is not stdout or stderr"
        )));
    }
    let path = state
        .logs_dir
        .join(id.as_str())
        .join(format!("{stream}.log"));
    let internal = |e: std::io::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let following = query.follow.unwrap_or(false);
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let mut file = match File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A log is created with the task's first output: a task of
            // this agent's (or one not started yet) that printed nothing
            // has none yet, which reads as empty.
            match state.coordinator.task_view(&id).await? {
                None => {
                    let message = format!("task {id} not found");
                    return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", message));
                }
                Some(view) if view.node.as_ref().is_some_and(|node| *node != state.node) => {
                    let message = format!(
                        "no {stream} log for task {id} on this agent (it is {} on node {})",
                        view.state.name(),
                        view.node.map(|node| node.to_string()).unwrap_or_default()
                    );
                    return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", message));
                }
                Some(_) => {}
            }
            if !following {
                return Ok((text_plain, axum::body::Body::empty()).into_response());
            }
            let growth = follow(None, 0, path, state.coordinator, id);
            return Ok((text_plain, axum::body::Body::from_stream(growth)).into_response());
        }
        Err(error) => return Err(internal(error)),
    };
    let length = file.metadata().await.map_err(internal)?.len();
    let start = match query.tail {
        Some(lines) => tail_offset(&mut file, length, lines)
            .await
            .map_err(internal)?,
        None => 0,
    };
    file.seek(SeekFrom::Start(start)).await.map_err(internal)?;
    let existing = ReaderStream::with_capacity(file.take(length - start), BLOCK);
    if !following {
        return Ok((text_plain, axum::body::Body::from_stream(existing)).into_response());
    }
    let follower = File::open(&path).await.map_err(internal)?;
    let growth = follow(Some(follower), length, path, state.coordinator, id);
    let chunks = existing.chain(growth);
    Ok((text_plain, axum::body::Body::from_stream(chunks)).into_response())
}

/// Whether `path` is no longer the file `file` has open (the log rotated).
async fn rotated(file: &File, path: &std::path::Path) -> bool {
    match (file.metadata().await, tokio::fs::metadata(path).await) {
        (Ok(open), Ok(current)) => file_id(&open) != file_id(&current),
        _ => false,
    }
}

/// What tells one file from another: its device and inode.
fn file_id(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

/// What the file grows by past `offset`, read from where the last read
/// stopped every [`FOLLOW_POLL`], until the task has ended and one last
/// read found nothing new. A new run replaces the log: start over; a
/// rotation moves it: go on in the part after the one read (the older
/// part, if the log rotated again meanwhile, then the new file). Parts
/// that rotated away before they could be read are said to be missing, in
/// a line of their own: each part's first line numbers its rotation. With
/// no file yet, follow the one the task's first output creates.
fn follow(
    file: Option<File>,
    offset: u64,
    path: std::path::PathBuf,
    coordinator: eretes_protocol::Coordinator,
    id: eretes_protocol::TaskId,
) -> impl futures::Stream<Item = std::io::Result<axum::body::Bytes>> {
    let state = Following {
        file,
        offset,
        ended: false,
        rotation: None,
        expected: None,
    };
    futures::stream::unfold(state, move |mut state| {
        let (coordinator, id, path) = (coordinator.clone(), id.clone(), path.clone());
        let mut older = path.clone().into_os_string();
        older.push(".1");
        let older = std::path::PathBuf::from(older);
        async move {
            loop {
                let Some(open) = &mut state.file else {
                    // The log appeared: from its start, and from its older
                    // part's if it rotated already (this run's: a new run
                    // removes both), which is read first.
                    let first = match File::open(&older).await {
                        Ok(older) => Ok(older),
                        Err(_) => File::open(&path).await,
                    };
                    if let Ok(new) = first {
                        state.file = Some(new);
                        state.offset = 0;
                        // Whatever part this is, those before it were
                        // this run's too.
                        state.expected = Some(0);
                        continue;
                    }
                    if state.ended {
                        return None;
                    }
                    state.ended = task_ended(&coordinator, &id).await;
                    if !state.ended {
                        tokio::time::sleep(FOLLOW_POLL).await;
                    }
                    continue;
                };
                // The part's number, once its first line is there (a
                // part is created empty, then given its note).
                if state.rotation.is_none() {
                    state.rotation = rotation_of(open).await;
                    if let Some(started) = state.rotation {
                        let missing = state
                            .expected
                            .take()
                            .map_or(0, |expected| started.saturating_sub(expected));
                        if missing > 0 {
                            // A new run's parts count from 0 again: at least.
                            let note = format!(
                                "[eretes: at least {missing} part(s) of this log rotated away \
                                 before they could be read; their output is missing here]\n"
                            );
                            return Some((Ok(axum::body::Bytes::from(note)), state));
                        }
                    }
                }
                let length = open
                    .metadata()
                    .await
                    .map(|m| m.len())
                    .unwrap_or(state.offset);
                if length <= state.offset && rotated(open, &path).await {
                    // The log was rotated (or replaced by a new run's):
                    // what was read is the older part, or older still.
                    let next = match File::open(&older).await {
                        Ok(part) if !same_file(open, &part).await => Some(part),
                        _ => File::open(&path).await.ok(),
                    };
                    if let Some(next) = next {
                        // By now the part read has its first line.
                        let read = match state.rotation {
                            Some(read) => read,
                            None => rotation_of(open).await.unwrap_or(0),
                        };
                        state.file = Some(next);
                        state.offset = 0;
                        state.rotation = None;
                        // A lower number: a new run's log, started over.
                        state.expected = Some(read.saturating_add(1));
                        continue;
                    }
                }
                if length < state.offset {
                    state.offset = 0;
                }
                if length > state.offset {
                    let mut chunk = vec![0; (length - state.offset).min(BLOCK as u64) as usize];
                    let read = match open.seek(SeekFrom::Start(state.offset)).await {
                        Ok(_) => open.read(&mut chunk).await.unwrap_or(0),
                        Err(_) => 0,
                    };
                    if read > 0 {
                        chunk.truncate(read);
                        state.offset += read as u64;
                        return Some((Ok(axum::body::Bytes::from(chunk)), state));
                    }
                }
                if state.ended {
                    return None;
                }
                state.ended = task_ended(&coordinator, &id).await;
                if !state.ended {
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        }
    })
}

/// Where a followed log stands.
struct Following {
    /// The part being read, once there is one.
    file: Option<File>,
    /// How much of it was sent.
    offset: u64,
    /// The task had ended at the last look.
    ended: bool,
    /// The rotation the part being read began with, once its first line
    /// was there to read.
    rotation: Option<u64>,
    /// The rotation the part being read should have begun with, until it
    /// is known (then a higher one says parts were missed).
    expected: Option<u64>,
}

/// The rotation `file` began with ([`eretes_exec::log_rotation`]), from
/// its first bytes (read where they are: the reader seeks before reading);
/// `None` while it is empty.
async fn rotation_of(file: &mut File) -> Option<u64> {
    let mut head = [0u8; 256];
    let read = match file.seek(SeekFrom::Start(0)).await {
        Ok(_) => file.read(&mut head).await.unwrap_or(0),
        Err(_) => 0,
    };
    (read > 0).then(|| eretes_exec::log_rotation(&head[..read]))
}

/// Whether two open files are the same file (taken as so if either
/// cannot say: the older part is then not read again).
async fn same_file(one: &File, other: &File) -> bool {
    match (one.metadata().await, other.metadata().await) {
        (Ok(one), Ok(other)) => file_id(&one) == file_id(&other),
        _ => true,
    }
}

/// Whether task `id` has ended (or is gone); not if the store cannot say.
async fn task_ended(
    coordinator: &eretes_protocol::Coordinator,
    id: &eretes_protocol::TaskId,
) -> bool {
    match coordinator.task_view(id).await {
        Ok(Some(view)) => view.state.is_terminal(),
        Ok(None) => true,
        Err(_) => false, // the store will answer again
    }
}

/// Where the last `lines` lines of the first `length` bytes of `file`
/// start, reading backwards one block at a time. A final newline ends the
/// last line rather than starting another.
async fn tail_offset(file: &mut File, length: u64, lines: usize) -> std::io::Result<u64> {
    if lines == 0 {
        return Ok(length);
    }
    let mut seen = 0;
    let mut end = length;
    let mut block = vec![0u8; BLOCK];
    while end > 0 {
        let start = end.saturating_sub(BLOCK as u64);
        let size = (end - start) as usize;
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(&mut block[..size]).await?;
        for at in (0..size).rev() {
            let position = start + at as u64;
            if block[at] == b'\n' && position + 1 != length {
                seen += 1;
                if seen == lines {
                    return Ok(position + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same, on bytes in memory: what `tail_offset` must agree with.
    fn tail_in_memory(text: &[u8], lines: usize) -> usize {
        if lines == 0 {
            return text.len();
        }
        let body = text.strip_suffix(b"\n").unwrap_or(text);
        body.iter()
            .enumerate()
            .rev()
            .filter(|(_, byte)| **byte == b'\n')
            .nth(lines - 1)
            .map_or(0, |(at, _)| at + 1)
    }

    fn coordinator() -> eretes_protocol::Coordinator {
        let store: std::sync::Arc<dyn eretes_store::Store> =
            eretes_store::embedded::EmbeddedStore::new();
        eretes_protocol::Coordinator::new(store, eretes_protocol::Namespace::new("logs").unwrap())
    }

    /// Everything [`follow`] sends from `file` (if any) at `offset` on,
    /// for a task that does not exist (so, ended).
    async fn followed(file: Option<File>, offset: u64, path: &std::path::Path) -> String {
        let id = eretes_protocol::TaskId::new("gone").unwrap();
        collected(follow(file, offset, path.to_path_buf(), coordinator(), id)).await
    }

    async fn collected(
        stream: impl futures::Stream<Item = std::io::Result<axum::body::Bytes>>,
    ) -> String {
        let chunks: Vec<_> = stream.collect().await;
        let bytes: Vec<u8> = chunks
            .into_iter()
            .flat_map(|chunk| chunk.unwrap().to_vec())
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    /// Rotate `path` as the supervisor does: to `.1`, and a new file that
    /// starts with the numbered note, then `body`.
    fn rotate(path: &std::path::Path, rotation: u64, body: &str) {
        let mut older = path.as_os_str().to_owned();
        older.push(".1");
        std::fs::rename(path, older).unwrap();
        let note = format!(
            "[eretes: this log reached 10 bytes (rotation {rotation}); the 10 before this line \
             are in stdout.log.1, anything older was dropped]\n"
        );
        std::fs::write(path, format!("{note}{body}")).unwrap();
    }

    #[tokio::test]
    async fn a_followed_log_goes_on_in_the_next_part_and_says_which_parts_it_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        // Once: the follower reads on in the new file, nothing missing.
        std::fs::write(&path, "first\n").unwrap();
        let file = File::open(&path).await.unwrap();
        rotate(&path, 1, "second\n");
        let text = followed(Some(file), 6, &path).await;
        assert!(
            text.ends_with("anything older was dropped]\nsecond\n"),
            "{text}"
        );
        assert!(!text.contains("missing"), "{text}");

        // Three times while the follower waited: the part after its own is
        // gone, the one after that is the older part now, then the newest.
        std::fs::write(&path, "first\n").unwrap();
        let file = File::open(&path).await.unwrap();
        rotate(&path, 1, "lost\n");
        rotate(&path, 2, "older\n");
        rotate(&path, 3, "newest\n");
        let text = followed(Some(file), 6, &path).await;
        let missing = text
            .find("1 part(s) of this log rotated away")
            .expect(&text);
        let older = text.find("older\n").expect(&text);
        let newest = text.find("newest\n").expect(&text);
        assert!(missing < older && older < newest, "{text}");
        assert!(!text.contains("lost"), "{text}");
        assert_eq!(text.matches("missing here").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn a_log_that_appears_rotated_already_says_what_it_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, "part 0\n").unwrap();
        rotate(&path, 1, "part 1\n");
        rotate(&path, 2, "part 2\n");
        let text = followed(None, 0, &path).await;
        let missing = text.find("at least 1 part(s)").expect(&text);
        let one = text.find("part 1\n").expect(&text);
        let two = text.find("part 2\n").expect(&text);
        assert!(missing < one && one < two, "{text}");
        assert!(!text.contains("part 0"), "{text}");
    }

    #[tokio::test]
    async fn a_part_found_before_its_first_line_is_numbered_once_it_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, "first\n").unwrap();
        let file = File::open(&path).await.unwrap();
        // Rotated, and the new part not yet given its note, while the task
        // still runs: the follower must not take it for part 0.
        let mut older = path.as_os_str().to_owned();
        older.push(".1");
        std::fs::rename(&path, &older).unwrap();
        std::fs::write(&path, "").unwrap();
        let coordinator = coordinator();
        let id = eretes_protocol::TaskId::new("running").unwrap();
        let spec = eretes_protocol::TaskSpec::new(
            eretes_protocol::GroupName::default(),
            serde_json::json!({}),
        );
        coordinator.submit(&id, &spec).await.unwrap();
        let stream = follow(Some(file), 6, path.clone(), coordinator.clone(), id.clone());
        let reader = tokio::spawn(collected(stream));
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        let note = "[eretes: this log reached 10 bytes (rotation 1); the 10 before this line \
                    are in stdout.log.1, anything older was dropped]\n";
        std::fs::write(&path, format!("{note}second\n")).unwrap();
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        // The next rotation, which the follower sees in time: nothing missed.
        rotate(&path, 2, "third\n");
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        coordinator.delete(&id).await.unwrap();
        let text = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(
            text.contains("second\n") && text.ends_with("third\n"),
            "{text}"
        );
        assert!(!text.contains("missing"), "{text}");
    }

    #[tokio::test]
    async fn the_tail_is_found_backwards_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let long_line = "y".repeat(BLOCK + 10);
        let texts: Vec<Vec<u8>> = vec![
            b"one\ntwo\nthree\n".to_vec(),
            b"one\ntwo".to_vec(),
            Vec::new(),
            b"\n\n\n".to_vec(),
            (0..40_000)
                .flat_map(|n| format!("{n}\n").into_bytes())
                .collect(),
            format!("a\n{long_line}\nb\n{long_line}").into_bytes(),
        ];
        for (n, text) in texts.iter().enumerate() {
            let path = dir.path().join(format!("log{n}"));
            std::fs::write(&path, text).unwrap();
            let mut file = File::open(&path).await.unwrap();
            for lines in [0, 1, 2, 3, 10, 20_000, 1_000_000] {
                let offset = tail_offset(&mut file, text.len() as u64, lines)
                    .await
                    .unwrap();
                assert_eq!(
                    offset as usize,
                    tail_in_memory(text, lines),
                    "text {n}, {lines} lines"
                );
            }
        }
    }
}
