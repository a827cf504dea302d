//! The fake's HTTP face: routing, fault injection, and the verbs (list,
//! watch, get, create, delete, pod log) with the real server's query
//! parameters, status codes and bodies.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxumState};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::controller::prepare_meta;
use super::deletion::{check_preconditions, DeleteOpts, Deleted};
use super::fake_api::Propagation;
use super::logs::log;
use super::selector::{FieldSelector, Filter, LabelSelector};
use super::status::{json_response, ApiError};
use super::store::{lock, Key, Kind, Obj, Shared, State, WatchRequest};
use super::validation::{validate_configmap, FieldErr};

/// How long a watch lasts when the client names no `timeoutSeconds` (the
/// real server's minimum request timeout).
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;

/// The query string, in order; the last of a repeated parameter wins.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// A boolean parameter, parsed as Go's `strconv.ParseBool`.
    pub(crate) fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!(
                "invalid boolean value for {name}: {v:?}"
            ))),
        }
    }

    /// An integer parameter.
    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid value for {name}: {v:?}")))
            })
            .transpose()
    }
}

/// What a path names.
enum Target {
    Version,
    Collection(Kind, Option<String>),
    Item(Kind, String, String),
    JobStatus(String, String),
    Log(String, String),
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (core, rest) = match segs.as_slice() {
        ["version"] => return Some(Target::Version),
        ["api", "v1", rest @ ..] => (true, rest),
        ["apis", "batch", "v1", rest @ ..] => (false, rest),
        _ => return None,
    };
    let kind = |res: &str| match (res, core) {
        ("pods", true) => Some(Kind::Pod),
        ("configmaps", true) => Some(Kind::ConfigMap),
        ("jobs", false) => Some(Kind::Job),
        _ => None,
    };
    let s = |x: &&str| x.to_string();
    match rest {
        [res] => Some(Target::Collection(kind(res)?, None)),
        ["namespaces", ns, res] => Some(Target::Collection(kind(res)?, Some(s(ns)))),
        ["namespaces", ns, res, name] => Some(Target::Item(kind(res)?, s(ns), s(name))),
        ["namespaces", ns, "jobs", name, "status"] if !core => {
            Some(Target::JobStatus(s(ns), s(name)))
        }
        ["namespaces", ns, "pods", name, "log"] if core => Some(Target::Log(s(ns), s(name))),
        _ => None,
    }
}

/// Every request: recorded, answered with an armed fault if one matches,
/// else served.
pub(crate) async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let lost_answer = {
        let mut st = lock(&shared);
        let full = uri
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_string());
        st.requests.push((method.to_string(), full));
        match st.take_fault(method.as_str(), &path) {
            Some((code, false)) => return ApiError::fault(code, &path).into_response(),
            Some((code, true)) => Some(code),
            None => None,
        }
    };
    if let Some(code) = lost_answer {
        // Served, but the client is told otherwise.
        let _ = serve(&shared, &method, &uri, &path, &body);
        return ApiError::fault(code, &path).into_response();
    }
    serve(&shared, &method, &uri, &path, &body)
}

/// Parse and dispatch one request.
fn serve(shared: &Arc<Shared>, method: &Method, uri: &Uri, path: &str, body: &[u8]) -> Response {
    let params = match Query::<Vec<(String, String)>>::try_from_uri(uri) {
        Ok(Query(q)) => Params(q),
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let Some(target) = route(path) else {
        return ApiError::no_route().into_response();
    };
    dispatch(shared, method, target, &params, body).unwrap_or_else(IntoResponse::into_response)
}

fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    target: Target,
    q: &Params,
    body: &[u8],
) -> Result<Response, ApiError> {
    match (target, method.clone()) {
        (Target::Version, Method::GET) => Ok(version()),
        (Target::Collection(kind, ns), Method::GET) => {
            if q.flag("watch")? == Some(true) {
                watch(shared, kind, ns, q)
            } else {
                list(&lock(shared), kind, ns, q)
            }
        }
        (Target::Collection(kind, Some(ns)), Method::POST) => create(shared, kind, &ns, q, body),
        (Target::Item(kind, ns, name), Method::GET) => get(&lock(shared), kind, &ns, &name),
        (Target::JobStatus(ns, name), Method::GET) => get(&lock(shared), Kind::Job, &ns, &name),
        (Target::Item(kind, ns, name), Method::DELETE) => delete(shared, kind, &ns, &name, q, body),
        (Target::Log(ns, name), Method::GET) => log(shared, &ns, &name, q),
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn version() -> Response {
    let info = json!({
        "major": "1", "minor": "37", "gitVersion": "v1.37.0-eretes-fake", "gitCommit": "0000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
        "compiler": "gc", "platform": "linux/amd64",
    });
    json_response(StatusCode::OK, &info)
}

fn filter(kind: Kind, namespace: Option<String>, q: &Params) -> Result<Filter, ApiError> {
    Ok(Filter {
        kind,
        namespace,
        labels: LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(kind, q.get("fieldSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?,
    })
}

/// 422 for bad list or watch options (the real server's `ListOptions`
/// validation).
fn invalid_options(field: &str, value: &str, detail: &str) -> ApiError {
    let errs = [FieldErr::invalid(field, value, detail)];
    ApiError::invalid_of(
        "ListOptions.meta.k8s.io",
        "meta.k8s.io",
        "ListOptions",
        "",
        &errs,
    )
}

/// 422 for bad `DeleteOptions`.
fn invalid_delete(err: FieldErr) -> ApiError {
    ApiError::invalid_of(
        "DeleteOptions.meta.k8s.io",
        "meta.k8s.io",
        "DeleteOptions",
        "",
        &[err],
    )
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "invalid resource version {s:?}: not a decimal number"
        ))
    })
}

/// The 504 for a resourceVersion the server has not reached.
fn too_large(asked: u64, current: u64) -> ApiError {
    let mut err = ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {asked}, current: {current}"),
    );
    err.details = Some(json!({
        "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
        "retryAfterSeconds": 1,
    }));
    err
}

fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = format!("{rv}\n{}\n{}", key.namespace, key.name);
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str, kind: Kind) -> Option<(u64, Key)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let raw = String::from_utf8(bytes?).ok()?;
    let mut parts = raw.split('\n');
    let rv = parts.next()?.parse().ok()?;
    let (ns, name) = (parts.next()?, parts.next()?);
    Some((rv, Key::new(kind, ns, name)))
}

/// GET of a collection: the selected objects at the current
/// resourceVersion, paged by `limit`/`continue`.
fn list(st: &State, kind: Kind, ns: Option<String>, q: &Params) -> Result<Response, ApiError> {
    let filter = filter(kind, ns, q)?;
    let rv = q.get("resourceVersion");
    let rv_match = q.get("resourceVersionMatch");
    let token = q.get("continue");
    let limit = q
        .int("limit")?
        .filter(|l| *l > 0)
        .map(|l| l.unsigned_abs() as usize);
    if let Some(m) = rv_match {
        if m != "Exact" && m != "NotOlderThan" {
            return Err(invalid_options(
                "resourceVersionMatch",
                m,
                "supported values: \"Exact\", \"NotOlderThan\"",
            ));
        }
        if rv.is_none() {
            return Err(invalid_options(
                "resourceVersionMatch",
                m,
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if token.is_some() {
            return Err(invalid_options(
                "resourceVersionMatch",
                m,
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
    }
    let mut list_rv = st.rv();
    let mut after: Option<Key> = None;
    if let Some(token) = token {
        if rv.is_some_and(|r| r != "0") {
            return Err(invalid_options(
                "resourceVersion",
                rv.unwrap_or(""),
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (token_rv, key) = decode_continue(token, kind)
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        if token_rv < st.floor() {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        // Later pages show the current objects after the last key, labelled
        // with the first page's resourceVersion: a watch from it then
        // replays whatever changed since, so nothing is missed.
        list_rv = token_rv;
        after = Some(key);
    } else if let Some(r) = rv {
        let r = parse_rv(r)?;
        if r > st.rv() {
            return Err(too_large(r, st.rv()));
        }
        if rv_match == Some("Exact") && r < st.floor() {
            return Err(ApiError::expired(
                "The resourceVersion for the provided list is too old.",
            ));
        }
    }
    let items: Vec<&Obj> = st
        .select(&filter)
        .filter(|o| after.as_ref().is_none_or(|k| o.key() > *k))
        .collect();
    let (page, remaining) = match limit {
        Some(l) if items.len() > l => (&items[..l], items.len() - l),
        _ => (&items[..], 0),
    };
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if let (true, Some(last)) = (remaining > 0, page.last()) {
        metadata["continue"] = json!(encode_continue(list_rv, &last.key()));
        metadata["remainingItemCount"] = json!(remaining);
    }
    let items: Vec<Value> = page
        .iter()
        .map(|o| {
            // Items of a list carry no kind or apiVersion, as the real
            // server's typed lists do not.
            let mut v = o.to_json();
            if let Some(m) = v.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            v
        })
        .collect();
    let body = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// GET with `watch=true`: newline-delimited events until `timeoutSeconds`.
fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    q: &Params,
) -> Result<Response, ApiError> {
    let filter = filter(kind, ns, q)?;
    let timeout = q
        .int("timeoutSeconds")?
        .filter(|t| *t > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, i64::unsigned_abs);
    let bookmarks = q.flag("allowWatchBookmarks")?.unwrap_or(false);
    let send_initial = q.flag("sendInitialEvents")?;
    let rv_match = q.get("resourceVersionMatch");
    match send_initial {
        Some(_) => {
            if rv_match != Some("NotOlderThan") {
                return Err(invalid_options(
                    "resourceVersionMatch",
                    rv_match.unwrap_or(""),
                    "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
                ));
            }
            if !bookmarks {
                return Err(invalid_options(
                    "allowWatchBookmarks",
                    "false",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        None => {
            if let Some(m) = rv_match {
                return Err(invalid_options("resourceVersionMatch", m, "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"));
            }
        }
    }
    let after = match q.get("resourceVersion") {
        None | Some("0") => None,
        Some(r) => Some(parse_rv(r)?),
    };
    let rx = {
        let mut st = lock(shared);
        if let Some(a) = after.filter(|a| *a > st.rv()) {
            return Err(too_large(a, st.rv()));
        }
        // Without a resourceVersion (or "0") a watch starts with the current
        // objects as ADDED, unless sendInitialEvents=false asks it not to.
        let initial_events = send_initial.unwrap_or(after.is_none());
        let after = if initial_events {
            None
        } else {
            Some(after.unwrap_or(st.rv()))
        };
        st.open_watch(WatchRequest {
            filter,
            after,
            initial_events,
            initial_end_bookmark: send_initial == Some(true),
            bookmarks,
        })
    };
    let stream = UnboundedReceiverStream::new(rx)
        .map(Ok::<Bytes, Infallible>)
        .take_until(tokio::time::sleep(Duration::from_secs(timeout)));
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn get(st: &State, kind: Kind, ns: &str, name: &str) -> Result<Response, ApiError> {
    let obj = st
        .objects
        .get(&Key::new(kind, ns, name))
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    Ok(json_response(StatusCode::OK, &obj.to_json()))
}

fn dry_run(values: &[&str]) -> Result<bool, ApiError> {
    match values {
        [] => Ok(false),
        ["All"] => Ok(true),
        other => Err(ApiError::bad_request(format!(
            "Unsupported dryRun value: {other:?}, supported values: \"All\""
        ))),
    }
}

fn decode_error(kind: Kind, e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("error decoding {}: {e}", kind.name()))
}

/// POST to a collection.
fn create(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    q: &Params,
    body: &[u8],
) -> Result<Response, ApiError> {
    let dry = dry_run(&q.get("dryRun").into_iter().collect::<Vec<_>>())?;
    let created = match kind {
        Kind::Job => {
            let job: Job = serde_json::from_slice(body).map_err(|e| decode_error(kind, &e))?;
            lock(shared).create_job(ns, job, dry)?
        }
        Kind::ConfigMap => {
            let cm: ConfigMap = serde_json::from_slice(body).map_err(|e| decode_error(kind, &e))?;
            create_configmap(&mut lock(shared), ns, cm, dry)?
        }
        // Pods here are made only by the Job controller.
        Kind::Pod => return Err(ApiError::method_not_allowed()),
    };
    Ok(json_response(StatusCode::CREATED, &created.to_json()))
}

fn create_configmap(
    st: &mut State,
    ns: &str,
    mut cm: ConfigMap,
    dry: bool,
) -> Result<Obj, ApiError> {
    prepare_meta(&mut cm.metadata, ns, false)?;
    let name = cm.metadata.name.clone().unwrap_or_default();
    let errs = validate_configmap(&cm);
    if !errs.is_empty() {
        return Err(ApiError::invalid(Kind::ConfigMap, &name, &errs));
    }
    let key = Key::new(Kind::ConfigMap, ns, &name);
    if st.objects.contains_key(&key) {
        return Err(ApiError::already_exists(Kind::ConfigMap, &name));
    }
    Ok(if dry {
        Obj::ConfigMap(cm)
    } else {
        st.insert(Obj::ConfigMap(cm))
    })
}

/// `DeleteOptions` from the query and then the body (which wins, as on the
/// real server).
fn delete_opts(q: &Params, body: &[u8]) -> Result<DeleteOpts, ApiError> {
    let parse_policy = |p: &str| match p {
        "Foreground" => Ok(Propagation::Foreground),
        "Background" => Ok(Propagation::Background),
        "Orphan" => Ok(Propagation::Orphan),
        other => Err(invalid_delete(FieldErr::not_supported(
            "propagationPolicy",
            other,
            &["Foreground", "Background", "Orphan"],
        ))),
    };
    let mut opts = DeleteOpts {
        grace: q.int("gracePeriodSeconds")?,
        propagation: q.get("propagationPolicy").map(parse_policy).transpose()?,
        dry_run: dry_run(&q.get("dryRun").into_iter().collect::<Vec<_>>())?,
        ..Default::default()
    };
    let mut orphan = q.flag("orphanDependents")?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        if let Some(g) = v.get("gracePeriodSeconds").and_then(Value::as_i64) {
            opts.grace = Some(g);
        }
        if let Some(p) = v.get("propagationPolicy").and_then(Value::as_str) {
            opts.propagation = Some(parse_policy(p)?);
        }
        if let Some(o) = v.get("orphanDependents").and_then(Value::as_bool) {
            orphan = Some(o);
        }
        let pre = v.get("preconditions");
        opts.uid = pre
            .and_then(|p| p.get("uid"))
            .and_then(Value::as_str)
            .map(str::to_string);
        opts.resource_version = pre
            .and_then(|p| p.get("resourceVersion"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(list) = v.get("dryRun").and_then(Value::as_array) {
            let values: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            opts.dry_run = dry_run(&values)?;
        }
    }
    if let Some(o) = orphan {
        if opts.propagation.is_some() {
            return Err(invalid_delete(FieldErr::invalid(
                "propagationPolicy",
                "",
                "orphanDependents and deletionPropagation cannot be both set",
            )));
        }
        opts.propagation = Some(if o {
            Propagation::Orphan
        } else {
            Propagation::Background
        });
    }
    Ok(opts)
}

/// The `Status` a DELETE answers with when the object is gone at once and
/// its kind does not return the deleted object.
fn success(obj: &Obj) -> Response {
    let kind = obj.kind();
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": { "name": obj.name(), "group": kind.group(), "kind": kind.plural(), "uid": obj.uid() },
    });
    json_response(StatusCode::OK, &body)
}

/// DELETE of one object.
fn delete(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    name: &str,
    q: &Params,
    body: &[u8],
) -> Result<Response, ApiError> {
    let opts = delete_opts(q, body)?;
    let key = Key::new(kind, ns, name);
    let mut st = lock(shared);
    let answer = |obj: &Obj| json_response(StatusCode::OK, &obj.to_json());
    match kind {
        Kind::Job => Ok(match st.delete_job(&key, &opts)? {
            Deleted::Pending(obj) => answer(&obj),
            Deleted::Removed(obj) => success(&obj),
        }),
        // Pods return the deleted object, removed or not.
        Kind::Pod => Ok(match st.delete_pod_request(&key, &opts)? {
            Deleted::Pending(obj) | Deleted::Removed(obj) => answer(&obj),
        }),
        Kind::ConfigMap => {
            let obj = st
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            check_preconditions(&obj, &opts)?;
            if !opts.dry_run {
                st.remove(&key);
            }
            Ok(success(&obj))
        }
    }
}
