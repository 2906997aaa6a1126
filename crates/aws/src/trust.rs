//! What the gateway client trusts beyond its endpoint's URL: plain HTTP to a
//! host that is not loopback, and an operator's private CA.
//!
//! A private CA (a gateway behind a proxy or a private custom domain) is
//! added to the system's roots for the gateway client alone. `SSL_CERT_FILE`
//! would replace the system's roots for every client in the process, SQS
//! and DynamoDB included, which then fail their TLS handshakes.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// How the gateway client may reach its endpoint, as the operator set it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayTrust {
    /// Accept `http://` for a host that is not loopback: without TLS,
    /// anything on the path can answer 410 for every connection, and fanout
    /// would remove their rows. Loopback needs no such setting.
    pub allow_plain_http: bool,
    /// PEM certificates trusted for the gateway's TLS in addition to the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
}

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BadCaFile {
    #[error("cannot read the CA file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("the CA file {path} is not PEM: {reason}")]
    NotPem { path: PathBuf, reason: String },
    #[error("the CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificates { path: PathBuf },
    #[error("the CA file {path} holds a certificate that cannot be a root: {reason}")]
    NotARoot { path: PathBuf, reason: String },
}

/// A private CA's certificates, checked: each can be a trust anchor.
#[derive(Clone, Debug)]
pub(crate) struct PrivateCa {
    /// The file as read, for the SDK's trust store (which takes PEM).
    pub pem: Vec<u8>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl PrivateCa {
    /// Reads and checks `path`: every certificate in it must parse as a
    /// root, so a broken file fails at startup, not at the first send.
    pub fn load(path: &Path) -> Result<Self, BadCaFile> {
        let pem = std::fs::read(path).map_err(|e| BadCaFile::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BadCaFile::NotPem {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(BadCaFile::NoCertificates {
                path: path.to_owned(),
            });
        }
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots.add(cert.clone()).map_err(|e| BadCaFile::NotARoot {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self { pem, certs })
    }
}

/// Checks the CA file an operator named, as the configuration does at
/// startup.
pub fn check_ca_file(path: &Path) -> Result<(), BadCaFile> {
    PrivateCa::load(path).map(drop)
}

/// The system's roots, as every AWS client of the process trusts them:
/// the platform's store, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (the
/// SDK's HTTP client loads them the same way).
pub(crate) fn system_roots() -> RootCertStore {
    let loaded = rustls_native_certs::load_native_certs();
    if !loaded.errors.is_empty() {
        tracing::warn!(errors = ?loaded.errors, "some system root certificates could not be loaded");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    roots
}

/// The gateway's roots: the system's, and the private CA's on top.
pub(crate) fn gateway_roots(ca: Option<&PrivateCa>) -> RootCertStore {
    let mut roots = system_roots();
    if let Some(ca) = ca {
        // Checked when loaded: each is a valid root.
        roots.add_parsable_certificates(ca.certs.iter().cloned());
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/unit-test-ca.pem");

    #[test]
    fn a_private_ca_adds_to_the_system_roots_for_the_gateway_alone() {
        let system = system_roots().len();
        assert!(system > 0, "this machine has system roots");
        let ca = PrivateCa::load(Path::new(TEST_CA)).unwrap();
        assert_eq!(ca.certs.len(), 1);
        assert_eq!(gateway_roots(Some(&ca)).len(), system + 1);
        assert_eq!(gateway_roots(None).len(), system);
        // Loading the CA changed nothing for the other clients, whose
        // HTTP client loads the system's store the same way.
        assert_eq!(system_roots().len(), system);
        assert_eq!(
            rustls_native_certs::load_native_certs().certs.len(),
            system,
            "the SDK clients' roots are the system's"
        );
    }

    #[test]
    fn a_bad_ca_file_is_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("fanout-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let key_only = dir.join("key.pem");
        std::fs::write(
            &key_only,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(
            check_ca_file(&missing),
            Err(BadCaFile::Unreadable { .. })
        ));
        for path in [&empty, &key_only] {
            let err = check_ca_file(path).unwrap_err();
            assert!(matches!(err, BadCaFile::NoCertificates { .. }), "{err}");
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        let err = check_ca_file(&garbage).unwrap_err();
        assert!(matches!(err, BadCaFile::NotARoot { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
