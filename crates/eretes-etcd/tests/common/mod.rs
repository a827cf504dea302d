//! Certificates for the TLS tests, made fresh by each test with `rcgen`.
//!
//! They live here rather than in `eretes_etcd::testing` so that `rcgen`
//! stays a dev-dependency: `testing` is compiled into the library, and takes
//! the PEM bytes this module makes.

use std::path::{Path, PathBuf};

use eretes_etcd::testing::LocalEtcdTls;
use eretes_etcd::EtcdTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM.
pub struct Signed {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A private CA with one server certificate for `127.0.0.1` and one client
/// certificate, all signed by it.
pub struct Pki {
    /// The CA's own certificate: what clients trust for the server, and etcd
    /// for clients.
    pub ca_pem: String,
    /// etcd's certificate, valid for the IP address 127.0.0.1.
    pub server: Signed,
    /// A client certificate for etcd's `--client-cert-auth`.
    pub client: Signed,
}

impl Pki {
    /// A new CA named `name` and its two certificates. Every call makes new
    /// keys, so two `Pki`s never trust each other.
    pub fn generate(name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let mut ca = CertificateParams::new(Vec::new()).expect("CA parameters");
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");

        let leaf = |common_name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("generate a key");
            let mut params = CertificateParams::new(sans).expect("certificate parameters");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            // Go's TLS (etcd) and rustls both check the extended key usage
            // when it is present; say exactly what each certificate is for.
            params.extended_key_usages = vec![usage];
            let cert = params
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("sign a certificate");
            Signed {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        };
        Pki {
            ca_pem: ca_cert.pem(),
            // An IP subject alternative name: clients dial 127.0.0.1, and
            // rustls checks the address against it.
            server: leaf(
                "etcd",
                vec!["127.0.0.1".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(
                "eretes-client",
                Vec::new(),
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        }
    }

    /// The server side for [`eretes_etcd::testing::LocalEtcd`]: this CA's
    /// server certificate, trusting this CA's clients.
    pub fn server_tls(&self) -> LocalEtcdTls {
        LocalEtcdTls {
            server_cert_pem: self.server.cert_pem.clone().into_bytes(),
            server_key_pem: self.server.key_pem.clone().into_bytes(),
            client_ca_pem: self.ca_pem.clone().into_bytes(),
            client: self.client_tls(),
        }
    }

    /// A trusted client's TLS settings: this CA and this CA's client
    /// certificate.
    pub fn client_tls(&self) -> EtcdTls {
        EtcdTls {
            ca_pem: Some(self.ca_pem.clone().into_bytes()),
            identity: Some((
                self.client.cert_pem.clone().into_bytes(),
                self.client.key_pem.clone().into_bytes(),
            )),
            domain: None,
        }
    }

    /// Write the client side (CA, certificate, key) as PEM files into
    /// `dir`, as an operator would pass them to `--etcd-ca`, `--etcd-cert`
    /// and `--etcd-key`; returns their paths in that order.
    pub fn write_client_files(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        (
            write("ca.pem", &self.ca_pem),
            write("client.pem", &self.client.cert_pem),
            write("client-key.pem", &self.client.key_pem),
        )
    }
}
