//! Test certificates made with the openssl CLI: a CA, a server certificate
//! for 127.0.0.1 it signed, and optionally a second CA that signed another
//! certificate for the same name, for the TLS tests of the gateway paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::support::stdout_of;

/// The files of one test PKI, in a directory of its own.
pub struct Pki {
    /// The CA that signed `server_cert`.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A certificate for the same name signed by another CA, which nothing
    /// trusts.
    pub untrusted_cert: PathBuf,
}

/// Runs `openssl ARGS` in `dir`, panicking with its standard error.
fn openssl(dir: &Path, args: &[&str]) {
    stdout_of(
        Command::new("openssl").args(args).current_dir(dir),
        &format!("openssl {args:?}"),
    );
}

/// Makes the PKI in `dir` (created if missing).
pub fn make(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).expect("the PKI's directory");
    for ca in ["ca", "other-ca"] {
        let subject = format!("/CN=fanout test {ca}");
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        #[rustfmt::skip]
        openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", &subject, "-keyout", &key, "-out", &pem]);
    }
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("san.cnf");
    #[rustfmt::skip]
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr"]);
    for (ca, out) in [("ca", "server.pem"), ("other-ca", "untrusted.pem")] {
        let (pem, key) = (format!("{ca}.pem"), format!("{ca}.key"));
        #[rustfmt::skip]
        openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", &pem, "-CAkey", &key,
            "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", out]);
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        untrusted_cert: dir.join("untrusted.pem"),
    }
}

impl Pki {
    /// A TLS acceptor serving `server_cert` (HTTP/1.1 by ALPN), for a test
    /// sink.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let chain = CertificateDer::pem_file_iter(&self.server_cert)
            .expect("the server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("a PEM chain");
        let key = PrivateKeyDer::from_pem_file(&self.server_key).expect("the server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
