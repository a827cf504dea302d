//! Calls to the API server that outlast its passing faults: throttling
//! (429), its own errors (5xx) and connections that fail are tried again
//! with backoff, within a bound; every other answer is final.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// The first wait after a transient failure; it doubles up to [`LONGEST_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
const LONGEST_WAIT: Duration = Duration::from_secs(5);

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

/// Run `call` until it answers something final, or `budget` has passed
/// since the first try (then its last transient error is returned).
pub async fn with_retries<T, F, Fut>(what: &str, budget: Duration, mut call: F) -> kube::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let started = Instant::now();
    let mut wait = FIRST_WAIT;
    loop {
        match call().await {
            Err(error) if is_transient(&error) && started.elapsed() + wait < budget => {
                warn!(%error, retry_in = ?wait, "{what}: the Kubernetes API failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LONGEST_WAIT);
            }
            answer => return answer,
        }
    }
}
