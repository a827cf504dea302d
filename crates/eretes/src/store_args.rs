//! `--etcd URL,..` and its TLS and auth flags, shared by every subcommand
//! that can run on etcd instead of the embedded store.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use eretes_etcd::{EtcdOptions, EtcdStore, EtcdTls};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::Store;

/// Where the cluster's state lives.
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// Run on etcd at these client URLs (comma-separated) instead of the
    /// in-process embedded store.
    #[arg(long, value_name = "URL,..", env = "ERETES_ETCD")]
    pub etcd: Option<String>,
    /// PEM file of the CA that signed etcd's certificate (https:// URLs).
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate, for etcd's --client-cert-auth.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name; the password comes from --etcd-password-file or
    /// ERETES_ETCD_PASSWORD.
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub etcd_user: Option<String>,
    /// A file whose first line is the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// The password, once the agent took it from its environment (which no
    /// longer has it).
    #[arg(skip)]
    pub etcd_password: Option<String>,
}

impl StoreArgs {
    /// Whether these arguments name etcd.
    pub fn is_etcd(&self) -> bool {
        self.etcd.is_some()
    }

    /// Connect to etcd if asked to, otherwise create an embedded store.
    pub async fn open(&self) -> Result<Arc<dyn Store>> {
        let Some(urls) = &self.etcd else {
            return Ok(EmbeddedStore::new());
        };
        Ok(Arc::new(self.connect_etcd(urls).await?))
    }

    /// Connect to etcd at `urls` with the TLS and auth flags.
    pub async fn connect_etcd(&self, urls: &str) -> Result<EtcdStore> {
        let mut options = EtcdOptions::from_urls(urls).context("--etcd")?;
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
            let tls = EtcdTls::from_files(
                self.etcd_ca.as_deref(),
                self.etcd_cert.as_deref(),
                self.etcd_key.as_deref(),
            )?;
            options = options.with_tls(tls);
        }
        if let Some(user) = &self.etcd_user {
            let password = match (&self.etcd_password_file, &self.etcd_password) {
                (Some(file), _) => crate::secrets::read_secret_file(file, "--etcd-password-file")?,
                (None, Some(password)) => password.clone(),
                (None, None) => std::env::var("ERETES_ETCD_PASSWORD")
                    .context("--etcd-user needs --etcd-password-file or ERETES_ETCD_PASSWORD")?,
            };
            options = options.with_credentials(user.clone(), password);
        }
        options.validate().context("etcd options")?;
        EtcdStore::connect(options)
            .await
            .with_context(|| format!("connecting to etcd at {urls}"))
    }
}
