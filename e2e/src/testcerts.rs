//! Throw-away X.509 v3 certificates for TLS tests, made with the `openssl` command line (in
//! every set-up profile): a CA, server certificates for `localhost`/127.0.0.1 and client
//! certificates, laid out the way NBD tools look for them in a directory (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`: what nbdkit's
//! and qemu's `--tls-certificates`/`dir=` and libnbd's `tls-certificates=` read).
//!
//! Keys are ECDSA P-256 (PKCS#8), which rustls and GnuTLS both accept. Any failure panics:
//! these are test helpers.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test-only code: a failure panics the test

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority: its certificate and key on disk.
#[derive(Debug, Clone)]
pub struct Ca {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A leaf certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    /// `serverAuth`, for `localhost` and 127.0.0.1.
    Server,
    /// `clientAuth`.
    Client,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

impl Ca {
    /// Makes a new self-signed CA in `dir` as `<name>-cert.pem` / `<name>-key.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let cert = dir.join(format!("{name}-cert.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "3",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                path_str(&key),
                "-out",
                path_str(&cert),
            ],
            dir,
        );
        Self { cert, key }
    }

    /// Issues a leaf certificate signed by this CA into `dir` as `<name>-cert.pem` /
    /// `<name>-key.pem`.
    pub fn issue(&self, dir: &Path, name: &str, usage: Usage) -> Leaf {
        let cert = dir.join(format!("{name}-cert.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        let csr = dir.join(format!("{name}.csr"));
        let ext = dir.join(format!("{name}.ext"));
        let usage_ext = match usage {
            Usage::Server => {
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
            }
            Usage::Client => "extendedKeyUsage=clientAuth\n",
        };
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{usage_ext}"
            ),
        )
        .expect("write extensions");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                path_str(&key),
                "-out",
                path_str(&csr),
            ],
            dir,
        );
        let serial = format!("0x{:016x}{:08x}", rand_u64(), std::process::id());
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                path_str(&csr),
                "-CA",
                path_str(&self.cert),
                "-CAkey",
                path_str(&self.key),
                "-set_serial",
                &serial,
                "-days",
                "3",
                "-extfile",
                path_str(&ext),
                "-out",
                path_str(&cert),
            ],
            dir,
        );
        let _ = std::fs::remove_file(&csr);
        let _ = std::fs::remove_file(&ext);
        Leaf { cert, key }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A directory in the NBD tools' layout: `ca-cert.pem`, `server-cert.pem`/`server-key.pem`
/// and `client-cert.pem`/`client-key.pem`, the server's for `localhost`/127.0.0.1, both
/// signed by `ca`.
#[derive(Debug, Clone)]
pub struct ToolDir {
    pub dir: PathBuf,
    pub ca: Ca,
    pub server: Leaf,
    pub client: Leaf,
}

impl ToolDir {
    /// Makes `dir` (created if missing) with a new CA and both leaves.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let ca = Ca::new(dir, "ca");
        let server = ca.issue(dir, "server", Usage::Server);
        let client = ca.issue(dir, "client", Usage::Client);
        Self {
            dir: dir.to_owned(),
            ca,
            server,
            client,
        }
    }

    /// A directory with only the CA certificate of `self` (a client that trusts the server
    /// but has no certificate of its own), at `dir`.
    pub fn ca_only(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create cert dir");
        std::fs::copy(&self.ca.cert, dir.join("ca-cert.pem")).expect("copy CA");
        dir.to_owned()
    }
}
