//! [`EtcdStore`]: the [`Store`] trait on etcd v3, every call bounded by the
//! request timeout, leases renewed over one reused keepalive stream each.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eretes_store::validate::{check_key, check_range, check_txn};
use eretes_store::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyRange, LeaseGrant, LeaseId,
    PutRequest, PutResponse, Revision, Store, StoreError, StoreExt, StoreResult, Txn, TxnOp,
    TxnResponse, WatchStream,
};
use etcd_client as etcd;

use crate::convert::{self, classify, Failure};
use crate::options::EtcdOptions;
use crate::watch;

/// etcd's default `--max-txn-ops`. Checked here too, so that an oversized
/// transaction fails with the same message as on the embedded store.
pub const ETCD_MAX_TXN_OPS: usize = 128;

/// One lease's keepalive stream, opened on first use and reused.
type KeepAlive = (etcd::LeaseKeeper, etcd::LeaseKeepAliveStream);

/// The [`Store`] on an etcd v3 cluster. Cheap to share behind an `Arc`; all
/// calls may run concurrently.
pub struct EtcdStore {
    client: etcd::Client,
    timeout: Duration,
    /// Per lease, its keepalive stream. The inner lock serialises renewals of
    /// one lease, which keeps each answer paired with its request.
    keepalives: Mutex<HashMap<LeaseId, Arc<tokio::sync::Mutex<Option<KeepAlive>>>>>,
    /// Whether the client authenticates (then a refused watch is retried
    /// once with a fresh token).
    authenticated: bool,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connect to the cluster. The options are validated first; the
    /// connection itself is checked with one read, so a wrong address or bad
    /// credentials fail here with a clear error rather than at first use.
    pub async fn connect(options: EtcdOptions) -> StoreResult<Self> {
        options
            .validate()
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        let mut connect = etcd::ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_require_leader(options.require_leader)
            // HTTP/2 pings find a dead connection (a killed or partitioned
            // member) while a watch or keepalive stream is idle.
            .with_keep_alive(Duration::from_secs(2), options.request_timeout)
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &options.credentials {
            // etcd's auth tokens expire (simple tokens after --auth-token-ttl
            // idle, 300 s by default; JWTs after their TTL whatever the use),
            // and etcd-client does not re-authenticate unless told to: without
            // this a long-lived node's calls fail with "invalid auth token".
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &options.tls {
            let mut config = etcd::TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                config = config.ca_certificate(etcd::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(etcd::Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            connect = connect.with_tls(config);
        }
        let timeout = options.request_timeout;
        let urls = options.endpoints.join(",");
        let what = format!("connecting to etcd at {urls}");
        // A refusal names the user it refused, so an operator sees which
        // credentials to fix (never the password).
        let refused = |reason: String| match &options.credentials {
            Some((user, _)) => StoreError::Denied(format!("{what} as user {user:?}: {reason}")),
            None => StoreError::Denied(format!("{what} without credentials: {reason}")),
        };
        let client = bounded(
            &what,
            timeout,
            etcd::Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|failure| match StoreError::from(failure) {
            StoreError::Unavailable(reason) if !reason.starts_with(&what) => {
                StoreError::Unavailable(tls_hint(&options, format!("{what}: {reason}")))
            }
            StoreError::Denied(reason) => refused(reason),
            error => error,
        })?;
        let store = EtcdStore {
            client,
            timeout,
            keepalives: Mutex::new(HashMap::new()),
            authenticated: options.credentials.is_some(),
        };
        // With several members, one that is down (or was killed under an
        // open connection) fails only the calls routed to it: the probe is
        // tried once per endpoint, and passes when any member answers.
        let mut probe = store.current_revision().await;
        for _ in 1..(2 * options.endpoints.len()).saturating_sub(1).max(1) {
            if !matches!(probe, Err(StoreError::Unavailable(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            probe = store.current_revision().await;
        }
        match probe {
            Ok(_) => {}
            // The probe's key lies outside any namespace, so a user whose
            // role grants only its own prefix (the least-privilege setup) is
            // refused it. That refusal still proves etcd answered and
            // accepted the credentials, so it is not a connection failure.
            Err(StoreError::Denied(reason)) if convert::is_permission_denied(&reason) => {}
            Err(StoreError::Unavailable(reason)) => {
                return Err(StoreError::Unavailable(tls_hint(
                    &options,
                    format!("cannot reach etcd at {urls}: {reason}"),
                )))
            }
            Err(StoreError::Denied(reason)) => return Err(refused(reason)),
            Err(other) => return Err(other),
        }
        Ok(store)
    }

    /// The underlying client, for what the interface does not cover (tests
    /// use it for raw transactions as a benchmark baseline).
    pub fn client(&self) -> etcd::Client {
        self.client.clone()
    }

    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd::Error>>,
    ) -> Result<T, Failure> {
        bounded(what, self.timeout, call).await
    }

    fn keepalive_slot(&self, lease: LeaseId) -> Arc<tokio::sync::Mutex<Option<KeepAlive>>> {
        let mut slots = self.keepalives.lock().expect("keepalive map poisoned");
        slots.entry(lease).or_default().clone()
    }

    fn forget_keepalive(&self, lease: LeaseId) {
        self.keepalives
            .lock()
            .expect("keepalive map poisoned")
            .remove(&lease);
    }

    /// One renewal over the lease's stream, opening it if needed.
    async fn renew(&self, lease: LeaseId, slot: &mut Option<KeepAlive>) -> Result<i64, Failure> {
        if slot.is_none() {
            let mut client = self.client.lease_client();
            *slot = Some(
                self.call("opening a keepalive stream", client.keep_alive(lease))
                    .await?,
            );
        }
        let (keeper, stream) = slot.as_mut().expect("opened above");
        self.call("sending a keepalive", keeper.keep_alive())
            .await?;
        match self
            .call("awaiting a keepalive answer", stream.message())
            .await?
        {
            Some(answer) => Ok(answer.ttl()),
            None => Err(Failure::Other(StoreError::Unavailable(
                "etcd closed the keepalive stream".to_string(),
            ))),
        }
    }

    /// The exact compaction point, for an error etcd reports without it: a
    /// watch from revision 1 is refused with the compact revision.
    async fn compact_revision(&self) -> Revision {
        let mut client = self.client.watch_client();
        let options = etcd::WatchOptions::new().with_start_revision(1);
        let probe = async {
            let mut stream = client.watch("\u{0}compaction-probe", Some(options)).await?;
            let mut revision = 0;
            while let Some(response) = stream.message().await? {
                if response.compact_revision() > 0 || response.canceled() {
                    revision = response.compact_revision();
                    break;
                }
                if response.created() && !response.canceled() {
                    break; // nothing compacted
                }
            }
            Ok(revision)
        };
        self.call("probing the compaction point", probe)
            .await
            .unwrap_or(0)
    }
}

/// `reason` for a failed TLS connection, with what it most likely means in
/// an operator's terms. rustls names a server certificate it rejects, but
/// in words about certificates rather than flags. And etcd running with
/// `--client-cert-auth` refuses a missing or untrusted client certificate
/// by closing the connection right after the TLS 1.3 handshake, so the
/// client sees only a closed connection, with no alert to say why.
fn tls_hint(options: &EtcdOptions, reason: String) -> String {
    let Some(tls) = &options.tls else {
        return reason;
    };
    let lower = reason.to_lowercase();
    // How a closing shows depends on what the client was doing when it
    // came: reading ("connection closed"), writing ("broken pipe"), or
    // (with TLS 1.2) still in the handshake (a fatal alert).
    let closed = [
        "connection closed",
        "broken pipe",
        "connection reset",
        "fatal alert",
        "close_notify",
        "eof",
    ];
    let hint = if lower.contains("unknownissuer") {
        "etcd's certificate is not signed by the CA given (--etcd-ca)"
    } else if lower.contains("notvalidforname") {
        "etcd's certificate does not name the host of the endpoint"
    } else if !closed.iter().any(|sign| lower.contains(sign)) {
        return reason;
    } else if tls.identity.is_some() {
        "etcd closed the TLS connection: it probably does not trust the client certificate \
         (is it signed by the CA in etcd's --trusted-ca-file?)"
    } else {
        "etcd closed the TLS connection: it probably requires a client certificate \
         (--client-cert-auth); give one with --etcd-cert and --etcd-key"
    };
    format!("{reason} ({hint})")
}

/// Run `call`, failing with `Unavailable` if it takes longer than `timeout`.
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(classify(error)),
        Err(_) => Err(Failure::Other(StoreError::Unavailable(format!(
            "{what}: etcd did not answer within {timeout:?}"
        )))),
    }
}

/// The first lease a write of `ops` names, for etcd's "lease not found",
/// which does not say which one.
fn first_lease(ops: &[TxnOp]) -> LeaseId {
    ops.iter()
        .find_map(|op| match op {
            TxnOp::Put(put) if put.lease != 0 => Some(put.lease),
            _ => None,
        })
        .unwrap_or(0)
}

/// The largest response (a watch batch, a page of a listing) the client
/// accepts. gRPC's default of 4 MiB is reached by ~13,000 tasks' records;
/// etcd itself sends responses of any size.
pub const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// Most keys one range request asks etcd for. A prefix read of more (a
/// node's listing of its namespace) is made in pages of this many keys, all
/// at the first page's revision, so the result is the same single snapshot.
/// One response of a 100,000-task namespace is tens of megabytes that etcd
/// builds, and the client decodes, in one go: long enough, on a busy host,
/// to hold up every other request on the connection, lease renewals
/// included (measured: every node of a 10 × 30,000 `bench scale` on one
/// etcd fenced itself while one node listed).
pub const READ_PAGE_KEYS: usize = 2_000;

impl EtcdStore {
    /// A read of the keys from `start` to `end` in pages of
    /// [`READ_PAGE_KEYS`] keys, every page at the
    /// first one's revision: the answer a single read at that revision
    /// gives (`count` the range's size then, `more` whether `limit` cut
    /// it). A compaction past that revision between two pages fails the
    /// read as `Compacted`; the caller reads again.
    async fn get_paged(
        &self,
        start: String,
        end: Vec<u8>,
        limit: Option<usize>,
    ) -> StoreResult<GetResponse> {
        let mut kv = self.kv();
        let mut answer = GetResponse {
            kvs: Vec::new(),
            count: 0,
            more: false,
            revision: 0,
        };
        let mut from = start.into_bytes();
        loop {
            let wanted = limit.map_or(READ_PAGE_KEYS, |limit| {
                (limit - answer.kvs.len()).min(READ_PAGE_KEYS)
            });
            let mut options = etcd::GetOptions::new()
                .with_range(end.clone())
                .with_limit(wanted as i64);
            if answer.revision > 0 {
                options = options.with_revision(answer.revision);
            }
            let response = self
                .call("get", kv.get(from.clone(), Some(options)))
                .await?;
            let page = convert::get_response(&response);
            if answer.revision == 0 {
                // The first page sets the snapshot: its revision and the
                // range's size at it.
                answer.revision = page.revision;
                answer.count = page.count;
            }
            let Some(last) = page.kvs.last().map(|kv| kv.key.clone()) else {
                return Ok(answer);
            };
            answer.kvs.extend(page.kvs);
            if !page.more {
                return Ok(answer);
            }
            if limit.is_some_and(|limit| answer.kvs.len() >= limit) {
                answer.more = true;
                return Ok(answer);
            }
            // The next page starts just after the last key read.
            from = last.into_bytes();
            from.push(0);
        }
    }

    /// A KV client that accepts responses up to [`MAX_RESPONSE_BYTES`].
    fn kv(&self) -> etcd::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, request: GetRequest) -> StoreResult<GetResponse> {
        check_range(&request.range)?;
        if let (start, Some(end)) = convert::range_bounds(&request.range) {
            if !request.count_only && request.limit.is_none_or(|limit| limit > READ_PAGE_KEYS) {
                return self.get_paged(start, end, request.limit).await;
            }
        }
        let (key, options) = convert::get_options(&request);
        let mut kv = self.kv();
        let response = self.call("get", kv.get(key, Some(options))).await?;
        Ok(convert::get_response(&response))
    }

    async fn put(&self, request: PutRequest) -> StoreResult<PutResponse> {
        check_key(&request.key)?;
        let options = convert::put_options(&request);
        let mut kv = self.kv();
        match self
            .call("put", kv.put(request.key, request.value, Some(options)))
            .await
        {
            Ok(response) => Ok(convert::put_response(&response)),
            Err(Failure::LeaseNotFound) => Err(StoreError::LeaseNotFound(request.lease)),
            Err(failure) => Err(failure.into()),
        }
    }

    async fn delete(&self, request: DeleteRequest) -> StoreResult<DeleteResponse> {
        check_range(&request.range)?;
        let (key, options) = convert::delete_options(&request);
        let mut kv = self.kv();
        let response = self.call("delete", kv.delete(key, Some(options))).await?;
        Ok(convert::delete_response(&response))
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResponse> {
        check_txn(&txn, ETCD_MAX_TXN_OPS)?;
        let request = etcd::Txn::new()
            .when(
                txn.compares
                    .iter()
                    .map(convert::compare)
                    .collect::<Vec<_>>(),
            )
            .and_then(txn.success.iter().map(convert::txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(convert::txn_op).collect::<Vec<_>>());
        let mut kv = self.kv();
        match self.call("txn", kv.txn(request)).await {
            Ok(response) => {
                let revision = convert::header_revision(response.header());
                Ok(TxnResponse {
                    succeeded: response.succeeded(),
                    revision,
                    responses: response
                        .op_responses()
                        .iter()
                        .map(|r| convert::txn_op_response(r, revision))
                        .collect(),
                })
            }
            Err(Failure::LeaseNotFound) => {
                let lease = match first_lease(&txn.success) {
                    0 => first_lease(&txn.failure),
                    lease => lease,
                };
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(failure) => Err(failure.into()),
        }
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseGrant> {
        // etcd counts TTLs in whole seconds; round up so a lease never lives
        // shorter than asked.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        if seconds == 0 {
            return Err(StoreError::InvalidArgument(
                "lease TTL must be positive".into(),
            ));
        }
        let seconds = i64::try_from(seconds)
            .map_err(|_| StoreError::InvalidArgument(format!("lease TTL {ttl:?} is too long")))?;
        let mut leases = self.client.lease_client();
        let response = self
            .call("lease grant", leases.grant(seconds, None))
            .await?;
        if !response.error().is_empty() {
            return Err(StoreError::Unavailable(format!(
                "etcd refused the lease: {}",
                response.error()
            )));
        }
        Ok(LeaseGrant {
            id: response.id(),
            ttl: Duration::from_secs(u64::try_from(response.ttl()).unwrap_or(0)),
        })
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let slot = self.keepalive_slot(lease);
        let mut stream = slot.lock().await;
        match self.renew(lease, &mut stream).await {
            // etcd answers a keepalive of an unknown lease with TTL 0.
            Ok(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            Ok(_) | Err(Failure::LeaseNotFound) => {
                *stream = None;
                drop(stream);
                self.forget_keepalive(lease);
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(failure) => {
                // A broken stream is reopened by the next renewal.
                *stream = None;
                Err(failure.into())
            }
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.forget_keepalive(lease);
        let mut leases = self.client.lease_client();
        match self.call("lease revoke", leases.revoke(lease)).await {
            Ok(_) => Ok(()),
            Err(Failure::LeaseNotFound) => Err(StoreError::LeaseNotFound(lease)),
            Err(failure) => Err(failure.into()),
        }
    }

    async fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreResult<WatchStream> {
        check_range(&range)?;
        watch::open(
            self.client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            self.authenticated.then(|| self.client.clone()),
            range,
            start_revision,
            self.timeout,
        )
        .await
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        let mut kv = self.kv();
        let options = etcd::CompactionOptions::new().with_physical();
        match self
            .call("compact", kv.compact(revision, Some(options)))
            .await
        {
            Ok(_) => Ok(()),
            Err(Failure::Compacted) => Err(StoreError::Compacted {
                requested: revision,
                compact_revision: self.compact_revision().await.max(revision),
            }),
            Err(Failure::FutureRevision) => Err(StoreError::FutureRevision {
                requested: revision,
                current: self.current_revision().await?,
            }),
            Err(failure) => Err(failure.into()),
        }
    }
}
