//! Certificates for the server's TLS endpoints (NBD STARTTLS on the data path; the management
//! API may use the same files): PEM files turned into a rustls [`ServerConfig`] that is
//! rebuilt when the files change, so rotating a certificate is replacing its files — no
//! restart, and the next connection's handshake uses the new one.
//!
//! Invariants: TLS 1.3 only. A new config is built only from a consistent set of files (the
//! chain's leaf matches the key; the client CA parses); while the files are unreadable or
//! inconsistent (say, half-way through a copy) the last good config stays in use, and the
//! failure is logged once per change of the files. Key material never appears in a log line
//! or an error: errors name the file and the kind of problem only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
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

/// The PEM files a TLS endpoint is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate that chains to one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client without a certificate still completes the handshake
    /// (the management API then authorises per method; its health service needs none).
    /// A certificate that is presented must still chain to `client_ca`.
    pub client_cert_optional: bool,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(self.cert.as_path()), Some(self.key.as_path())]
            .into_iter()
            .chain(std::iter::once(self.client_ca.as_deref()))
            .flatten()
    }
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem(path, "malformed PEM certificate"))?;
    if certs.is_empty() {
        return Err(pem(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    // The parser's error is dropped on purpose: it could quote the file's bytes.
    PrivateKeyDer::from_pem_slice(&data).map_err(|_| pem(path, "no readable private key"))
}

/// Reads a PEM file of CA certificates into a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|_| pem(path, "a CA certificate is not a valid X.509 certificate"))?;
    }
    Ok(roots)
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

/// Builds a TLS 1.3 server config from the files as they are now.
pub fn build_server_config(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            what: "TLS versions",
            reason: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider);
            if files.client_cert_optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| TlsError::Config {
                what: "client CA",
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    // rustls checks that the key matches the leaf; its error names no key bytes.
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config {
            what: "certificate and key",
            reason: e.to_string(),
        })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// What identifies one version of the files: a replaced or rewritten file changes it
/// (Kubernetes swaps a secret volume's symlink; `cp` rewrites in place).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(u64, u64, u64, SystemTime)>>);

impl Stamp {
    fn of(files: &TlsFiles) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self(
            files
                .paths()
                .map(|p| {
                    std::fs::metadata(p).ok().map(|m| {
                        (
                            m.dev(),
                            m.ino(),
                            m.len(),
                            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        )
                    })
                })
                .collect(),
        )
    }
}

struct Loaded {
    stamp: Stamp,
    config: Arc<ServerConfig>,
    /// The stamp of files that failed to load, so the failure is logged once.
    failed: Option<Stamp>,
}

/// A server config that follows its files: [`ReloadingConfig::current`] rebuilds it when
/// they changed since the last build.
pub struct ReloadingConfig {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    state: Mutex<Loaded>,
}

impl ReloadingConfig {
    /// Loads the files; fails (at start-up) when they do not make a valid config.
    pub fn new(files: TlsFiles, alpn: Vec<Vec<u8>>) -> Result<Self, TlsError> {
        let stamp = Stamp::of(&files);
        let config = Arc::new(build_server_config(&files, &alpn)?);
        Ok(Self {
            files,
            alpn,
            state: Mutex::new(Loaded {
                stamp,
                config,
                failed: None,
            }),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config for a new connection: the files' current contents, or the last good ones
    /// while the current ones do not load. A few `stat` calls when nothing changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let stamp = Stamp::of(&self.files);
        // A poisoned lock still holds a complete config: every update is one assignment.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if stamp == st.stamp || st.failed.as_ref() == Some(&stamp) {
            return st.config.clone();
        }
        match build_server_config(&self.files, &self.alpn) {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed: reloaded");
                st.config = Arc::new(config);
                st.stamp = stamp;
                st.failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the previous ones");
                st.failed = Some(stamp);
            }
        }
        st.config.clone()
    }
}
