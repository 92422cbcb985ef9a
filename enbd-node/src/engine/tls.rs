//! The engine's TLS client settings (NBD_OPT_STARTTLS): the CA that servers' certificates
//! must chain to and, optionally, the node's own client certificate, all from PEM files that
//! are re-read when they change (every connect and reconnect asks for the current config).
//!
//! Invariants: TLS 1.3 only; the server's certificate is checked against the CA and against
//! the host of the address dialled. While changed files do not load (half-way through a
//! copy), the last good config stays in use. Key material never reaches a log line or an
//! error: errors name the file and the kind of problem.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{what}: {reason}")]
    Config { what: &'static str, reason: String },
}

/// Where the engine's trust and identity come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates (PEM) that servers' certificates must chain to.
    pub ca: PathBuf,
    /// Client certificate chain and key (PEM), presented when the server asks.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.ca.as_path()];
        if let Some((c, k)) = &self.identity {
            v.push(c);
            v.push(k);
        }
        v
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem(path: &Path, what: &'static str) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what,
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem(path, "malformed PEM certificate"))?;
    if certs.is_empty() {
        return Err(pem(path, "no certificate found"));
    }
    Ok(certs)
}

/// Builds a TLS 1.3 client config from the files as they are now.
pub fn build_client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&files.ca)? {
        roots.add(cert).map_err(|_| {
            pem(
                &files.ca,
                "a CA certificate is not a valid X.509 certificate",
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            what: "TLS versions",
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    Ok(match &files.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert)?;
            // The parser's error is dropped on purpose: it could quote the file's bytes.
            let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|_| pem(key, "no readable private key"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::Config {
                    what: "client certificate and key",
                    reason: e.to_string(),
                })?
        }
    })
}

type Stamp = Vec<Option<(u64, u64, u64, SystemTime)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .paths()
        .into_iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                (m.dev(), m.ino(), m.len(), mtime)
            })
        })
        .collect()
}

struct Loaded {
    stamp: Stamp,
    config: Arc<ClientConfig>,
    failed: Option<Stamp>,
}

/// TLS settings of a volume's connections: the config follows its files.
pub struct ClientTls {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish()
    }
}

impl ClientTls {
    /// Loads the files; fails when they do not make a valid config.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let st = stamp(&files);
        let config = Arc::new(build_client_config(&files)?);
        Ok(Self {
            files,
            state: Mutex::new(Loaded {
                stamp: st,
                config,
                failed: None,
            }),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config for a new connection (reloaded when the files changed).
    pub fn current(&self) -> Arc<ClientConfig> {
        let now = stamp(&self.files);
        // A poisoned lock still holds a complete config: every update is one assignment.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now == st.stamp || st.failed.as_ref() == Some(&now) {
            return st.config.clone();
        }
        match build_client_config(&self.files) {
            Ok(config) => {
                tracing::info!(ca = %self.files.ca.display(), "TLS files changed: reloaded");
                st.config = Arc::new(config);
                st.stamp = now;
                st.failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                st.failed = Some(now);
            }
        }
        st.config.clone()
    }
}
