//! Calls to the API server that outlast its passing faults: throttling
//! (429), its own errors (5xx), connections that fail and calls that hang
//! are tried again with backoff, within a bound; every other answer is
//! final.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// The first wait after a transient failure; it doubles up to [`LONGEST_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
const LONGEST_WAIT: Duration = Duration::from_secs(5);
/// Longest one call may take (watches and log streams are not calls): a
/// connection that went silent is given up, not waited on for ever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP status of an API server's answer, if the error is one.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether trying `error`'s call again may succeed.
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Why a call was not (or no longer) tried.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The API's last answer.
    #[error("{0}")]
    Api(#[from] kube::Error),
    /// The caller's `abort` said stop before a try.
    #[error("stopped before the call was sent")]
    Aborted,
}

impl CallError {
    /// The HTTP status, if the API answered with one.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            CallError::Api(error) => status_code(error),
            CallError::Aborted => None,
        }
    }
}

/// Run `call` until it answers something final, `budget` has passed since
/// the first try (then its last transient error is returned), or `abort`
/// holds before a try. Each try is bounded by [`CALL_TIMEOUT`].
pub async fn with_retries<T, F, Fut>(
    what: &str,
    budget: Duration,
    mut abort: impl FnMut() -> bool,
    mut call: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let started = Instant::now();
    let mut wait = FIRST_WAIT;
    loop {
        if abort() {
            return Err(CallError::Aborted);
        }
        let answer = match tokio::time::timeout(CALL_TIMEOUT, call()).await {
            Ok(answer) => answer,
            Err(_) => Err(kube::Error::Service(
                format!("no answer within {CALL_TIMEOUT:?}").into(),
            )),
        };
        match answer {
            Err(error) if is_transient(&error) && started.elapsed() + wait < budget => {
                warn!(%error, retry_in = ?wait, "{what}: the Kubernetes API failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
            }
            answer => return answer.map_err(CallError::Api),
        }
    }
}
