//! How to reach etcd: endpoints, timeouts, TLS and credentials, validated
//! before anything connects.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bad connection setting, named precisely.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    /// No endpoint was given.
    #[error(
        "no etcd endpoint given (expected URLs such as http://127.0.0.1:2379, comma-separated)"
    )]
    NoEndpoints,
    /// An endpoint is not an `http://` or `https://` URL with a host and port.
    #[error("etcd endpoint {endpoint:?} is invalid: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `https://` and `http://` endpoints were mixed.
    #[error("etcd endpoints mix http:// and https://; use one scheme for all")]
    MixedSchemes,
    /// A timeout of zero.
    #[error("the etcd {what} timeout must be greater than zero")]
    ZeroTimeout {
        /// Which timeout.
        what: &'static str,
    },
    /// A TLS file could not be read.
    #[error("cannot read the TLS {what} {path}: {reason}")]
    TlsFile {
        /// CA, certificate or key.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A client certificate without its key, or the reverse.
    #[error("a TLS client certificate needs both --etcd-cert and --etcd-key")]
    HalfIdentity,
    /// A user name without a password, or the reverse, or an empty one.
    #[error("etcd auth needs both a non-empty user name and a password")]
    HalfCredentials,
}

/// TLS settings, as PEM bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate; `None` uses the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its private key, for etcd's
    /// `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check etcd's certificate against, if not the endpoint's
    /// host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl EtcdTls {
    /// Read a CA and an optional client certificate and key from PEM files.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, OptionsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| OptionsError::TlsFile {
                what,
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read("certificate", cert)?, read("key", key)?)),
            (None, None) => None,
            _ => return Err(OptionsError::HalfIdentity),
        };
        Ok(EtcdTls {
            ca_pem: ca.map(|ca| read("CA", ca)).transpose()?,
            identity,
            domain: None,
        })
    }
}

/// Everything [`crate::EtcdStore::connect`] needs.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// The cluster's client URLs; requests are balanced over them and move
    /// to another when one fails.
    pub endpoints: Vec<String>,
    /// The longest any single request may take before it fails with
    /// `Unavailable`. Default 5 s.
    pub request_timeout: Duration,
    /// The longest a connection attempt may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Refuse requests when the member has no leader (it is cut off in a
    /// minority) instead of waiting. Default on.
    pub require_leader: bool,
    /// TLS, required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// User name and password for etcd's auth.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdOptions {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("require_leader", &self.require_leader)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Default per-request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdOptions {
    /// Options for a comma-separated list of URLs, with the defaults.
    pub fn from_urls(urls: &str) -> Result<Self, OptionsError> {
        let endpoints: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_string)
            .collect();
        let options = EtcdOptions {
            endpoints,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            require_leader: true,
            tls: None,
            credentials: None,
        };
        options.validate()?;
        Ok(options)
    }

    /// Use username/password auth.
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// Use TLS.
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Set the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Check every setting; [`crate::EtcdStore::connect`] calls this first.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.endpoints.is_empty() {
            return Err(OptionsError::NoEndpoints);
        }
        let mut https = None;
        for endpoint in &self.endpoints {
            let secure = check_endpoint(endpoint)?;
            if https.is_some_and(|seen| seen != secure) {
                return Err(OptionsError::MixedSchemes);
            }
            https = Some(secure);
        }
        if self.request_timeout.is_zero() {
            return Err(OptionsError::ZeroTimeout { what: "request" });
        }
        if self.connect_timeout.is_zero() {
            return Err(OptionsError::ZeroTimeout { what: "connect" });
        }
        if let Some((user, _)) = &self.credentials {
            if user.is_empty() {
                return Err(OptionsError::HalfCredentials);
            }
        }
        Ok(())
    }
}

/// Whether `endpoint` is a valid `https://` (true) or `http://` (false) URL
/// of a host and port.
fn check_endpoint(endpoint: &str) -> Result<bool, OptionsError> {
    let bad = |reason: &str| OptionsError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let (secure, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("it must start with http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err(bad("it must be a scheme, a host and a port, with no path"));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(bad("it has no port (etcd's client port is usually 2379)"));
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("it has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(secure),
        _ => Err(bad("its port is not a number from 1 to 65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_several_endpoints() {
        let options =
            EtcdOptions::from_urls(" http://127.0.0.1:2379, http://[::1]:22379/ ").unwrap();
        assert_eq!(
            options.endpoints,
            ["http://127.0.0.1:2379", "http://[::1]:22379/"]
        );
        assert!(options.require_leader);
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(
            EtcdOptions::from_urls(" , "),
            Err(OptionsError::NoEndpoints)
        );
        for (url, reason) in [
            ("127.0.0.1:2379", "must start with http://"),
            ("http://127.0.0.1", "no port"),
            ("http://:2379", "no host"),
            ("http://host:99999", "port is not a number"),
            ("http://host:0", "port is not a number"),
            ("http://host:2379/v3/kv", "no path"),
        ] {
            let err = EtcdOptions::from_urls(url).unwrap_err().to_string();
            assert!(err.contains(reason) && err.contains(url), "{url}: {err}");
        }
        assert_eq!(
            EtcdOptions::from_urls("http://a:1,https://b:2"),
            Err(OptionsError::MixedSchemes)
        );
        let zero = EtcdOptions::from_urls("http://a:1")
            .unwrap()
            .with_request_timeout(Duration::ZERO);
        assert_eq!(
            zero.validate(),
            Err(OptionsError::ZeroTimeout { what: "request" })
        );
        let anonymous = EtcdOptions::from_urls("http://a:1")
            .unwrap()
            .with_credentials("", "pw");
        assert_eq!(anonymous.validate(), Err(OptionsError::HalfCredentials));
    }

    #[test]
    fn tls_files_are_read_or_named() {
        let missing = Path::new("/nonexistent/ca.pem");
        let err = EtcdTls::from_files(Some(missing), None, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = EtcdTls::from_files(None, Some(missing), None).unwrap_err();
        assert_eq!(err, OptionsError::HalfIdentity);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let options = EtcdOptions::from_urls("http://a:1")
            .unwrap()
            .with_credentials("root", "hunter2")
            .with_tls(EtcdTls {
                ca_pem: None,
                identity: Some((b"cert".to_vec(), b"secret-key".to_vec())),
                domain: None,
            });
        let shown = format!("{options:?}");
        assert!(shown.contains("root"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("secret-key"),
            "{shown}"
        );
    }
}
