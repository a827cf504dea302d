//! TLS and username/password auth against a real etcd (Debian's
//! etcd-server), each test on a private server on loopback.
//!
//! What this proves:
//!
//! * **TLS with client certificates.** With the CA that signed etcd's
//!   certificate and a client certificate etcd trusts (read from PEM files,
//!   as the CLI does), every basic operation works over `https://`: put, get,
//!   transactions, lease grant and keepalive, a put under a lease, and a
//!   watch that delivers its event.
//! * **TLS refusals are clear and bounded.** No client certificate, a CA that
//!   did not sign etcd's certificate, or a client certificate from a CA etcd
//!   does not trust: `connect` fails as [`StoreError::Unavailable`] naming
//!   the URL and what is wrong with the certificates, at once (every step of
//!   `connect` is bounded by the request timeout), rather than hanging.
//! * **Auth.** With auth enabled and a user whose role grants readwrite on
//!   one prefix: the right credentials work (reads, writes, transactions,
//!   leases, watches inside the prefix), although `connect`'s own probe
//!   reads a key outside it; a wrong password, an unknown user or no
//!   credentials fail `connect` as [`StoreError::Denied`] naming the URL,
//!   the user and etcd's reason;
//!   reads, writes, transactions and watches outside the prefix are
//!   `Denied`, not retried as if etcd were unavailable.
//! * **Auth over TLS**, the combination a production cluster runs, works, and
//!   a session idle for longer than etcd's auth-token TTL keeps working (the
//!   client re-authenticates).
//!
//! Every wait is bounded; etcd must be installed (the tests panic with
//! instructions otherwise, they never skip).

mod common;

use std::time::Duration;

use common::Pki;
use eretes_etcd::testing::{LocalEtcd, LocalEtcdConfig};
use eretes_etcd::{EtcdOptions, EtcdStore, EtcdTls};
use eretes_store::{
    Compare, GetRequest, KeyRange, PutRequest, Store, StoreError, StoreExt, Txn, TxnOp,
    TxnOpResponse, WatchEvent,
};
use etcd_client::Permission;
use futures::StreamExt;

/// The request timeout the tests connect with: short, so that a refusal
/// that were to surface only as a timeout still ends the test quickly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The outer bound on anything a test awaits. `connect` makes two bounded
/// calls (the connection, then one read), so a refusal takes at most twice
/// the request timeout; the rest is slack for a loaded machine. Reaching it
/// means a hang, which fails the test.
const HANG: Duration = Duration::from_secs(30);

/// Await `future`, failing the test if it takes longer than [`HANG`].
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no answer within {HANG:?} (a hang)"),
    }
}

async fn connect(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
    bounded(
        "connect",
        EtcdStore::connect(options.with_request_timeout(REQUEST_TIMEOUT)),
    )
    .await
}

async fn next_events(stream: &mut eretes_store::WatchStream, what: &str) -> Vec<WatchEvent> {
    match bounded(what, stream.next()).await {
        Some(Ok(batch)) => batch,
        other => panic!("{what}: expected a batch of events, got {other:?}"),
    }
}

/// A private etcd serving `pki`'s server certificate and trusting its
/// clients, plus `extra_args`.
async fn tls_etcd(pki: &Pki, extra_args: &[&str]) -> LocalEtcd {
    LocalEtcd::start_with(LocalEtcdConfig {
        tls: Some(pki.server_tls()),
        extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
    })
    .await
}

/// The error `connect` must fail with; panics (with etcd's log) if it
/// connects instead.
async fn refused(etcd: &LocalEtcd, options: EtcdOptions) -> StoreError {
    match connect(options).await {
        Ok(_) => panic!(
            "connected, but etcd should have refused; its log:\n{}",
            etcd.log()
        ),
        Err(error) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_and_client_certificate_serve_every_operation_over_tls() {
    let pki = Pki::generate("trusted");
    let etcd = tls_etcd(&pki, &[]).await;
    assert!(
        etcd.url().starts_with("https://127.0.0.1:"),
        "{}",
        etcd.url()
    );

    // The client side from PEM files, the way `--etcd-ca/--etcd-cert/--etcd-key`
    // reach the store.
    let files = tempfile::tempdir().expect("a temporary directory");
    let (ca, cert, key) = pki.write_client_files(files.path());
    let tls = EtcdTls::from_files(Some(&ca), Some(&cert), Some(&key)).expect("read the PEM files");
    let options = EtcdOptions::from_urls(&etcd.url()).unwrap().with_tls(tls);
    let store = connect(options).await.expect("connect over TLS");

    // A watch first, so the writes below must reach it.
    let mut watch = bounded("watch", store.watch(KeyRange::prefix("tls/"), 0))
        .await
        .expect("watch over TLS");

    let put = bounded("put", store.put(PutRequest::new("tls/a", "1")))
        .await
        .expect("put over TLS");
    let got = bounded("get", store.get_key("tls/a"))
        .await
        .expect("get over TLS")
        .expect("the key just written");
    assert_eq!(got.value, b"1");
    assert_eq!(got.mod_revision, put.revision);

    // A transaction that creates a key only if absent: the first applies,
    // the second takes the failure branch and reads the winner.
    let create = |value: &str| {
        Txn::new()
            .when(Compare::absent("tls/b"))
            .and_then(TxnOp::Put(PutRequest::new("tls/b", value)))
            .or_else(TxnOp::Get(GetRequest::new(KeyRange::key("tls/b"))))
    };
    let first = bounded("txn", store.txn(create("first")))
        .await
        .expect("txn over TLS");
    assert!(first.succeeded);
    let second = bounded("txn", store.txn(create("second")))
        .await
        .expect("txn over TLS");
    assert!(!second.succeeded);
    match &second.responses[..] {
        [TxnOpResponse::Get(get)] => assert_eq!(get.kvs[0].value, b"first"),
        other => panic!("expected one get response, got {other:?}"),
    }

    let lease = bounded("lease grant", store.lease_grant(Duration::from_secs(30)))
        .await
        .expect("lease grant over TLS");
    let ttl = bounded("keepalive", store.lease_keepalive(lease.id))
        .await
        .expect("keepalive over TLS");
    assert!(ttl > Duration::ZERO, "keepalive TTL {ttl:?}");
    // A second renewal reuses the keepalive stream opened by the first.
    bounded("keepalive", store.lease_keepalive(lease.id))
        .await
        .expect("second keepalive over TLS");
    let leased = bounded(
        "put with lease",
        store.put(PutRequest::new("tls/leased", "x").with_lease(lease.id)),
    )
    .await
    .expect("put with a lease over TLS");

    // Every write above, in order, once.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(next_events(&mut watch, "watch over TLS").await);
    }
    let seen: Vec<_> = seen
        .iter()
        .map(|e| (e.kv.key.as_str(), e.kv.mod_revision))
        .collect();
    assert_eq!(
        seen,
        [
            ("tls/a", put.revision),
            ("tls/b", first.revision),
            ("tls/leased", leased.revision),
        ]
    );
    let on_lease = bounded("get", store.get_key("tls/leased")).await.unwrap();
    assert_eq!(on_lease.map(|kv| kv.lease), Some(lease.id));
    bounded("lease revoke", store.lease_revoke(lease.id))
        .await
        .expect("revoke over TLS");

    // Credentials for an etcd without auth are a configuration mistake,
    // reported as such rather than ignored.
    let credentials = etcd.client_options().with_credentials(USER, PASSWORD);
    match connect(credentials).await {
        Err(StoreError::InvalidArgument(message)) => assert!(
            message.contains("authentication is not enabled"),
            "{message}"
        ),
        other => panic!("credentials for an etcd without auth: {other:?}"),
    }
}

/// Assert `error` is a connection failure naming `url` and saying that the
/// trouble is a certificate, and what about it (`problem`).
#[track_caller]
fn assert_certificate_refusal(error: &StoreError, url: &str, problem: &str, case: &str) {
    match error {
        StoreError::Unavailable(message) => {
            assert!(
                message.contains(url),
                "{case}: the error does not name {url}: {message}"
            );
            assert!(
                message.contains(problem),
                "{case}: the error does not say {problem:?}: {message}"
            );
        }
        other => panic!("{case}: expected Unavailable, got {other:?}"),
    }
}

/// Start a TLS etcd whose certificates come from `pki`, connect with `tls`,
/// and check the refusal names the URL and gives `hint` (`what` names the
/// case in failure messages).
async fn expect_certificate_refusal(pki: &Pki, tls: EtcdTls, hint: &str, what: &str) {
    let etcd = tls_etcd(pki, &[]).await;
    let error = refused(
        &etcd,
        EtcdOptions::from_urls(&etcd.url()).unwrap().with_tls(tls),
    )
    .await;
    assert_certificate_refusal(&error, &etcd.url(), hint, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused_with_an_error_naming_the_url() {
    let pki = Pki::generate("trusted");
    let tls = EtcdTls {
        identity: None,
        ..pki.client_tls()
    };
    expect_certificate_refusal(
        &pki,
        tls,
        "requires a client certificate",
        "no client certificate",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_server_certificate_is_refused() {
    let pki = Pki::generate("trusted");
    let stranger = Pki::generate("stranger");
    let tls = EtcdTls {
        ca_pem: Some(stranger.ca_pem.clone().into_bytes()),
        ..pki.client_tls()
    };
    expect_certificate_refusal(
        &pki,
        tls,
        "not signed by the CA given",
        "a CA that did not sign etcd's certificate",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_an_untrusted_ca_is_refused() {
    let pki = Pki::generate("trusted");
    let stranger = Pki::generate("stranger");
    let tls = EtcdTls {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        ..stranger.client_tls()
    };
    expect_certificate_refusal(
        &pki,
        tls,
        "does not trust the client certificate",
        "an untrusted client certificate",
    )
    .await;
}

/// The user the auth tests connect as, its password, and the one prefix its
/// role may read and write.
const USER: &str = "eretes";
const PASSWORD: &str = "eretes-password";
const PREFIX: &str = "granted/";

/// Set up auth on a fresh etcd, through etcd-client's auth API on a client
/// `options` reaches it with: a root user (etcd refuses to enable auth
/// without one), and [`USER`] with a role granting readwrite on [`PREFIX`]
/// only. Then enable auth.
async fn enable_auth(options: EtcdOptions) {
    let admin = connect(options)
        .await
        .expect("connect before enabling auth");
    let mut auth = admin.client().auth_client();
    bounded("setup", async {
        auth.user_add("root", "root-password", None)
            .await
            .expect("add root");
        auth.user_grant_role("root", "root")
            .await
            .expect("grant root its role");
        auth.role_add("eretes-prefix").await.expect("add the role");
        auth.role_grant_permission(
            "eretes-prefix",
            Permission::read_write(PREFIX).with_prefix(),
        )
        .await
        .expect("grant readwrite on the prefix");
        auth.user_add(USER, PASSWORD, None)
            .await
            .expect("add the user");
        auth.user_grant_role(USER, "eretes-prefix")
            .await
            .expect("grant the user its role");
        auth.auth_enable().await.expect("enable auth");
    })
    .await;
}

/// A private plain-HTTP etcd with auth enabled (see [`enable_auth`]).
async fn auth_etcd() -> LocalEtcd {
    let etcd = LocalEtcd::start().await;
    enable_auth(etcd.client_options()).await;
    etcd
}

/// Assert `result` failed as `Denied` with a message containing every one
/// of `needles`.
#[track_caller]
fn assert_denied<T: std::fmt::Debug>(result: Result<T, StoreError>, needles: &[&str], case: &str) {
    match result {
        Err(StoreError::Denied(message)) => {
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{case}: the message does not say {needle:?}: {message}"
                );
            }
        }
        other => panic!("{case}: expected Denied, got {other:?}"),
    }
}

/// Everything the user may do inside its prefix, and nothing outside it.
async fn check_the_granted_prefix_only(store: &EtcdStore) {
    let inside = format!("{PREFIX}k");
    let mut watch = bounded("watch", store.watch(KeyRange::prefix(PREFIX), 0))
        .await
        .expect("watch inside the granted prefix");
    let put = bounded("put", store.put(PutRequest::new(inside.clone(), "v")))
        .await
        .expect("put inside the granted prefix");
    let got = bounded("get", store.get_key(&inside))
        .await
        .expect("get inside");
    assert_eq!(got.map(|kv| kv.value), Some(b"v".to_vec()));
    let txn = Txn::new()
        .when(Compare::mod_revision_is(inside.clone(), put.revision))
        .and_then(TxnOp::Put(PutRequest::new(inside.clone(), "w")));
    let txn = bounded("txn", store.txn(txn)).await.expect("txn inside");
    assert!(txn.succeeded);
    let lease = bounded("lease grant", store.lease_grant(Duration::from_secs(30)))
        .await
        .expect("lease grant with auth");
    bounded("keepalive", store.lease_keepalive(lease.id))
        .await
        .expect("keepalive with auth");
    let events = next_events(&mut watch, "watch inside the granted prefix").await;
    assert_eq!(events[0].kv.mod_revision, put.revision);

    let outside = "elsewhere/k";
    assert_denied(
        bounded("get", store.get_key(outside)).await,
        &["permission denied"],
        "get outside the prefix",
    );
    assert_denied(
        bounded("put", store.put(PutRequest::new(outside, "v"))).await,
        &["permission denied"],
        "put outside the prefix",
    );
    // A transaction is refused whole if any key it touches is not granted.
    let mixed = Txn::new()
        .when(Compare::absent(outside))
        .and_then(TxnOp::Put(PutRequest::new(inside.clone(), "x")));
    assert_denied(
        bounded("txn", store.txn(mixed)).await,
        &["permission denied"],
        "txn comparing a key outside the prefix",
    );
    assert_denied(
        bounded("watch", store.watch(KeyRange::prefix("elsewhere/"), 0))
            .await
            .map(|_| ()),
        &["permission denied"],
        "watch outside the prefix",
    );
    bounded("lease revoke", store.lease_revoke(lease.id))
        .await
        .expect("revoke a lease with no keys outside the prefix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_credentials_work_inside_the_granted_prefix_only() {
    let etcd = auth_etcd().await;
    // `connect` checks the connection with a read of a key outside the
    // granted prefix; the refusal of that key must not fail the connection.
    let store = connect(etcd.client_options().with_credentials(USER, PASSWORD))
        .await
        .expect("connect with the right credentials");
    check_the_granted_prefix_only(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_unknown_or_missing_credentials_are_denied() {
    let etcd = auth_etcd().await;
    let options = etcd.client_options();
    // Each refusal says where, as whom, and what etcd said.
    let url = etcd.url();

    let wrong = connect(options.clone().with_credentials(USER, "not-the-password")).await;
    let whom = format!("connecting to etcd at {url} as user \"{USER}\": ");
    assert_denied(wrong, &[&whom, "authentication failed"], "a wrong password");

    let unknown = connect(options.clone().with_credentials("nobody", PASSWORD)).await;
    assert_denied(unknown, &["authentication failed"], "an unknown user");

    let anonymous = connect(options).await;
    let whom = format!("connecting to etcd at {url} without credentials: ");
    assert_denied(anonymous, &[&whom, "user name is empty"], "no credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_over_tls_works_and_outlives_the_auth_token() {
    let pki = Pki::generate("trusted");
    // Tokens expire after one idle second, so the session below must
    // re-authenticate.
    let etcd = tls_etcd(&pki, &["--auth-token-ttl=1"]).await;
    enable_auth(etcd.client_options()).await;

    let wrong = connect(
        etcd.client_options()
            .with_credentials(USER, "not-the-password"),
    )
    .await;
    assert_denied(
        wrong,
        &["authentication failed"],
        "a wrong password over TLS",
    );

    let store = connect(etcd.client_options().with_credentials(USER, PASSWORD))
        .await
        .expect("connect over TLS with the right credentials");
    check_the_granted_prefix_only(&store).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = bounded(
        "put after the token expired",
        store.put(PutRequest::new(format!("{PREFIX}late"), "v")),
    )
    .await
    .expect("a put after the auth token expired");

    // A watch is not a plain call: etcd creates one made with a stale token
    // and then cancels it, which the client library does not retry. The
    // store refreshes the token and creates it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut watch = bounded(
        "a watch after the token expired",
        store.watch(KeyRange::prefix(PREFIX), late.revision),
    )
    .await
    .expect("a watch after the auth token expired");
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch delivers within 10 s")
        .expect("the watch stays open")
        .expect("the watch delivers the last put");
    assert!(
        batch.iter().any(|event| event.kv.key.ends_with("late")),
        "{batch:?}"
    );
}
