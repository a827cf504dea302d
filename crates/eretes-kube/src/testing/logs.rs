//! Pod logs (`GET .../pods/{name}/log`): the lines a pod's script wrote,
//! with `container`, `tailLines`, `limitBytes`, `sinceSeconds`/`sinceTime`,
//! `timestamps`, and `follow` streaming until the container ends.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

use super::http::Params;
use super::status::ApiError;
use super::store::{lock, Key, Kind, Obj, Shared};
use super::validation::FieldErr;

/// One log line as served, with the timestamp prefix if asked for.
fn render(ts: &Timestamp, line: &str, timestamps: bool) -> String {
    if timestamps {
        format!("{ts} {line}\n")
    } else {
        format!("{line}\n")
    }
}

/// Cuts `text` to what is left of `limitBytes`.
fn cut(mut text: String, left: &mut Option<usize>) -> String {
    if let Some(l) = left {
        if text.len() > *l {
            let mut end = *l;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        *l -= text.len();
    }
    text
}

/// A `follow=true` log stream's position.
struct Follow {
    shared: Arc<Shared>,
    uid: String,
    next: usize,
    rx: watch::Receiver<()>,
    left: Option<usize>,
    timestamps: bool,
    first: Option<String>,
    done: bool,
}

/// The next chunk of a followed log: the first chunk, then lines as they
/// are written; ends when the container terminates, the pod goes, or
/// `limitBytes` is used up.
async fn next_chunk(mut f: Follow) -> Option<(Result<Bytes, Infallible>, Follow)> {
    if let Some(first) = f.first.take().filter(|s| !s.is_empty()) {
        return Some((Ok(Bytes::from(first)), f));
    }
    // Each pass sends what is new or waits for the next write; the
    // container's end (or the pod's removal) ends it.
    loop {
        if f.done || f.left == Some(0) {
            return None;
        }
        let (text, ended) = {
            let st = lock(&f.shared);
            match st.pods_rt.get(&f.uid) {
                None => (String::new(), true),
                Some(rt) => {
                    let text: String = rt.log[f.next..]
                        .iter()
                        .map(|(ts, l)| render(ts, l, f.timestamps))
                        .collect();
                    f.next = rt.log.len();
                    f.rx.borrow_and_update();
                    (text, rt.terminated)
                }
            }
        };
        let text = cut(text, &mut f.left);
        f.done = ended;
        if !text.is_empty() {
            return Some((Ok(Bytes::from(text)), f));
        }
        if ended {
            return None;
        }
        if f.rx.changed().await.is_err() {
            f.done = true;
        }
    }
}

/// GET of a pod's log.
pub(crate) fn log(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    q: &Params,
) -> Result<Response, ApiError> {
    let st = lock(shared);
    let Some(Obj::Pod(pod)) = st.objects.get(&Key::new(Kind::Pod, ns, name)) else {
        return Err(ApiError::not_found(Kind::Pod, name));
    };
    let names: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect();
    let container = match q.get("container") {
        Some(c) if names.iter().any(|n| n == c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    if q.flag("previous")? == Some(true) {
        return Err(ApiError::bad_request(format!(
            "previous terminated container {container:?} in pod {name:?} not found"
        )));
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let rt = st
        .pods_rt
        .get(&uid)
        .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
    if !rt.started && !rt.terminated {
        return Err(ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} is waiting to start: ContainerCreating"
        )));
    }
    let positive = |p: &str| -> Result<Option<i64>, ApiError> {
        match q.int(p)? {
            Some(v) if v < 1 => Err(ApiError::invalid(
                Kind::Pod,
                name,
                &[FieldErr::invalid(
                    p,
                    &v.to_string(),
                    "must be greater than 0",
                )],
            )),
            other => Ok(other),
        }
    };
    let mut left = positive("limitBytes")?.map(|l| l.unsigned_abs() as usize);
    let since = match (positive("sinceSeconds")?, q.get("sinceTime")) {
        (Some(s), _) => Some(Timestamp::now() - SignedDuration::from_secs(s)),
        (None, Some(t)) => Some(
            t.parse::<Timestamp>()
                .map_err(|e| ApiError::bad_request(format!("invalid sinceTime {t:?}: {e}")))?,
        ),
        (None, None) => None,
    };
    let timestamps = q.flag("timestamps")?.unwrap_or(false);
    // Only the first container runs the pod's script; others write nothing.
    let lines: &[(Timestamp, String)] = if rt.container == container {
        &rt.log
    } else {
        &[]
    };
    let mut selected: Vec<&(Timestamp, String)> = lines
        .iter()
        .filter(|(ts, _)| since.is_none_or(|s| *ts >= s))
        .collect();
    if let Some(n) = q.int("tailLines")?.filter(|n| *n >= 0) {
        let n = n.unsigned_abs() as usize;
        selected.drain(..selected.len().saturating_sub(n));
    }
    let text: String = selected
        .iter()
        .map(|(ts, l)| render(ts, l, timestamps))
        .collect();
    let text = cut(text, &mut left);
    let plain = [(header::CONTENT_TYPE, "text/plain")];
    if q.flag("follow")? != Some(true) || rt.terminated || rt.container != container {
        return Ok((plain, text).into_response());
    }
    let follow = Follow {
        shared: shared.clone(),
        uid,
        next: rt.log.len(),
        rx: rt.log_tx.subscribe(),
        left,
        timestamps,
        first: Some(text),
        done: false,
    };
    Ok((
        plain,
        Body::from_stream(futures::stream::unfold(follow, next_chunk)),
    )
        .into_response())
}
