//! One-to-one conversions between the store interface's types and
//! etcd-client's, and etcd's errors mapped onto [`StoreError`].

use eretes_store::{
    prefix_end, Compare, CompareOp, CompareTarget, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, KeyRange, KeyValue, PutRequest, PutResponse, StoreError, TxnOp, TxnOpResponse,
};
use etcd_client as etcd;

/// A key or value as etcd stores it. Keys are UTF-8 by construction (the
/// interface's keys are `String`s); a non-UTF-8 key written by someone else
/// is shown lossily rather than failing the whole read.
pub(crate) fn key_value(kv: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

/// The revision a response was served at (0 if etcd sent no header).
pub(crate) fn header_revision(header: Option<&etcd::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// The key etcd is sent for `range`, and its range end (`None` for a
/// single key).
pub(crate) fn range_bounds(range: &KeyRange) -> (String, Option<Vec<u8>>) {
    match range {
        KeyRange::Key(key) => (key.clone(), None),
        KeyRange::Prefix(prefix) => (prefix.clone(), Some(prefix_end(prefix))),
        KeyRange::Span { start, end } => (start.clone(), Some(end.clone().into_bytes())),
    }
}

pub(crate) fn get_options(request: &GetRequest) -> (String, etcd::GetOptions) {
    let (key, end) = range_bounds(&request.range);
    let mut options = etcd::GetOptions::new();
    if let Some(end) = end {
        options = options.with_range(end);
    }
    if let Some(limit) = request.limit {
        options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    if request.count_only {
        options = options.with_count_only();
    }
    (key, options)
}

pub(crate) fn get_response(response: &etcd::GetResponse) -> GetResponse {
    GetResponse {
        kvs: response.kvs().iter().map(key_value).collect(),
        count: usize::try_from(response.count()).unwrap_or(0),
        more: response.more(),
        revision: header_revision(response.header()),
    }
}

pub(crate) fn put_options(request: &PutRequest) -> etcd::PutOptions {
    let mut options = etcd::PutOptions::new();
    if request.lease != 0 {
        options = options.with_lease(request.lease);
    }
    if request.prev_kv {
        options = options.with_prev_key();
    }
    options
}

pub(crate) fn put_response(response: &etcd::PutResponse) -> PutResponse {
    PutResponse {
        revision: header_revision(response.header()),
        prev_kv: response.prev_key().map(key_value),
    }
}

pub(crate) fn delete_options(request: &DeleteRequest) -> (String, etcd::DeleteOptions) {
    let (key, end) = range_bounds(&request.range);
    let mut options = etcd::DeleteOptions::new();
    if let Some(end) = end {
        options = options.with_range(end);
    }
    if request.prev_kv {
        options = options.with_prev_key();
    }
    (key, options)
}

pub(crate) fn delete_response(response: &etcd::DeleteResponse) -> DeleteResponse {
    DeleteResponse {
        revision: header_revision(response.header()),
        deleted: response.deleted(),
        prev_kvs: response.prev_kvs().iter().map(key_value).collect(),
    }
}

pub(crate) fn compare(compare: &Compare) -> etcd::Compare {
    let op = match compare.op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Less => etcd::CompareOp::Less,
        CompareOp::Greater => etcd::CompareOp::Greater,
    };
    let key = compare.key.clone();
    match &compare.target {
        CompareTarget::Value(value) => etcd::Compare::value(key, op, value.clone()),
        CompareTarget::Version(version) => etcd::Compare::version(key, op, *version),
        CompareTarget::CreateRevision(rev) => etcd::Compare::create_revision(key, op, *rev),
        CompareTarget::ModRevision(rev) => etcd::Compare::mod_revision(key, op, *rev),
        CompareTarget::Lease(lease) => etcd::Compare::lease(key, op, *lease),
    }
}

pub(crate) fn txn_op(op: &TxnOp) -> etcd::TxnOp {
    match op {
        TxnOp::Get(get) => {
            let (key, options) = get_options(get);
            etcd::TxnOp::get(key, Some(options))
        }
        TxnOp::Put(put) => {
            etcd::TxnOp::put(put.key.clone(), put.value.clone(), Some(put_options(put)))
        }
        TxnOp::Delete(delete) => {
            let (key, options) = delete_options(delete);
            etcd::TxnOp::delete(key, Some(options))
        }
    }
}

/// A response inside a transaction. etcd gives the inner responses no header
/// of their own; they all happened at the transaction's revision.
pub(crate) fn txn_op_response(response: &etcd::TxnOpResponse, revision: i64) -> TxnOpResponse {
    match response {
        etcd::TxnOpResponse::Get(get) => TxnOpResponse::Get(GetResponse {
            revision,
            ..get_response(get)
        }),
        etcd::TxnOpResponse::Put(put) => TxnOpResponse::Put(PutResponse {
            revision,
            ..put_response(put)
        }),
        etcd::TxnOpResponse::Delete(delete) => TxnOpResponse::Delete(DeleteResponse {
            revision,
            ..delete_response(delete)
        }),
        // The interface has no nested transactions, so etcd never sends one.
        etcd::TxnOpResponse::Txn(_) => TxnOpResponse::Get(GetResponse {
            kvs: Vec::new(),
            count: 0,
            more: false,
            revision,
        }),
    }
}

/// etcd's messages for the errors the interface distinguishes.
const MSG_COMPACTED: &str = "required revision has been compacted";
const MSG_FUTURE: &str = "required revision is a future revision";
const MSG_LEASE_NOT_FOUND: &str = "requested lease not found";
/// etcd's auth refusals that it sends with code InvalidArgument rather than
/// Unauthenticated or PermissionDenied: a wrong password or unknown user
/// ("authentication failed, invalid user ID or password"), and a request
/// without credentials to a cluster with auth enabled ("user name is
/// empty"). They are refusals of the caller, not malformed requests.
const MSG_AUTH_REFUSALS: [&str; 2] = ["authentication failed", "user name is empty"];
/// etcd's message when an authenticated user's roles do not cover a key.
const MSG_PERMISSION_DENIED: &str = "etcdserver: permission denied";

/// Whether a [`StoreError::Denied`] reason is etcd refusing a key to a user
/// it did authenticate (rather than refusing the user).
pub(crate) fn is_permission_denied(reason: &str) -> bool {
    reason.contains(MSG_PERMISSION_DENIED)
}

/// The error for a watch etcd cancelled at creation with `reason`. A key
/// the user's roles do not cover is `Denied`, so that no one retries it as
/// if etcd were unavailable; anything else may pass.
pub(crate) fn watch_refusal(reason: &str) -> StoreError {
    let text = format!("etcd refused the watch: {reason}");
    if is_permission_denied(reason) || MSG_AUTH_REFUSALS.iter().any(|r| reason.contains(r)) {
        StoreError::Denied(text)
    } else {
        StoreError::Unavailable(text)
    }
}

/// A gRPC status's message, followed by what its causes add. A transport
/// failure's status says only "operation was canceled" or "tcp connect
/// error"; the cause says why ("connection closed", "Connection refused").
fn status_text(status: &dyn std::error::Error, message: &str) -> String {
    let mut text = format!("etcd: {message}");
    let mut cause = status.source();
    while let Some(error) = cause {
        let said = error.to_string();
        // Wrappers repeat their cause's words or say only "transport error".
        if !said.is_empty() && said != "transport error" && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = error.source();
    }
    text
}

/// What kind of failure an etcd error is, before the details the caller
/// knows (the lease, the revision) are filled in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Compacted,
    FutureRevision,
    LeaseNotFound,
    Other(StoreError),
}

/// Classify an etcd-client error.
pub(crate) fn classify(error: etcd::Error) -> Failure {
    use tonic_code::*;
    match error {
        etcd::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.contains(MSG_COMPACTED) {
                return Failure::Compacted;
            }
            if message.contains(MSG_FUTURE) {
                return Failure::FutureRevision;
            }
            if message.contains(MSG_LEASE_NOT_FOUND) {
                return Failure::LeaseNotFound;
            }
            let text = status_text(&status, message);
            if MSG_AUTH_REFUSALS
                .iter()
                .any(|refusal| message.contains(refusal))
            {
                return Failure::Other(StoreError::Denied(text));
            }
            Failure::Other(match status.code() as i32 {
                INVALID_ARGUMENT | FAILED_PRECONDITION | OUT_OF_RANGE => {
                    StoreError::InvalidArgument(text)
                }
                UNAUTHENTICATED | PERMISSION_DENIED => StoreError::Denied(text),
                _ => StoreError::Unavailable(text),
            })
        }
        // etcd-client's own report of a keepalive answered with TTL 0.
        etcd::Error::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            Failure::LeaseNotFound
        }
        etcd::Error::InvalidArgs(message) => Failure::Other(StoreError::InvalidArgument(message)),
        other => Failure::Other(StoreError::Unavailable(format!("etcd: {other}"))),
    }
}

/// gRPC status codes as numbers, so this crate needs no direct tonic
/// dependency for a `match`.
mod tonic_code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// A failure of a call whose caller has no lease or revision to name; the
/// calls that do (put, txn, keepalive, revoke, compact) match the specific
/// kinds first.
impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Other(error) => error,
            Failure::Compacted => StoreError::InvalidArgument(format!("etcd: {MSG_COMPACTED}")),
            Failure::FutureRevision => StoreError::InvalidArgument(format!("etcd: {MSG_FUTURE}")),
            Failure::LeaseNotFound => {
                StoreError::InvalidArgument(format!("etcd: {MSG_LEASE_NOT_FOUND}"))
            }
        }
    }
}
