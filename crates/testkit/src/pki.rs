//! Test certificates made with the openssl CLI: a CA, a server certificate
//! for 127.0.0.1 it signed, and optionally a second CA that signed another
//! certificate for the same name, for the TLS tests of the gateway paths.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
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
