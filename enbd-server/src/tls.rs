//! Certificates from PEM files for the server's TLS listeners, reloaded when the files change
//! (rotation without a restart).
//!
//! Invariants: a handshake always sees a complete, consistent (certificate, key) pair or CA
//! set — a reload that fails to parse keeps the previous one and logs the path (never the file's
//! contents); files are looked at, at most, once per [`CHECK_INTERVAL`], by their metadata
//! (mtime, length, inode: a Kubernetes Secret volume's atomic symlink swap changes them).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// How often the files are checked for a change (on the next handshake after it).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Parse { path: PathBuf, what: String },
    #[error("{0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Parse {
            path: path.to_owned(),
            what: format!("not PEM certificates ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            path: path.to_owned(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1). Errors never quote the file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Parse {
        path: path.to_owned(),
        what: "no usable PRIVATE KEY block".into(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, &provider()).map_err(|e| {
        TlsError::Parse {
            path: key.to_owned(),
            what: format!("key does not fit {}: {e}", cert.display()),
        }
    })
}

/// A trust store from a PEM file of CA certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::Parse {
            path: path.to_owned(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

struct State<T> {
    stamps: Vec<Stamp>,
    value: Arc<T>,
    checked: Instant,
}

/// A value built from files, rebuilt when any of them changes.
struct Watched<T> {
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T, TlsError>,
    state: Mutex<State<T>>,
}

impl<T> Watched<T> {
    fn new(
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = Arc::new(load(&paths)?);
        Ok(Self {
            paths,
            load,
            state: Mutex::new(State {
                stamps,
                value,
                checked: Instant::now(),
            }),
        })
    }

    fn get(&self) -> Arc<T> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.checked.elapsed() >= CHECK_INTERVAL {
            s.checked = Instant::now();
            let stamps: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
            if stamps != s.stamps {
                match (self.load)(&self.paths) {
                    Ok(v) => {
                        tracing::info!(files = ?self.paths, "TLS files changed: reloaded");
                        s.value = Arc::new(v);
                        s.stamps = stamps;
                    }
                    // Mid-rotation (one file written, not the other) or broken: keep serving
                    // the old one and look again next time.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the previous ones")
                    }
                }
            }
        }
        s.value.clone()
    }
}

/// The server certificate (`--tls-cert`, `--tls-key`), reloaded on change.
pub struct ReloadingCert(Watched<CertifiedKey>);

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self(Watched::new(
            vec![cert.to_owned(), key.to_owned()],
            |p| load_certified_key(&p[0], &p[1]),
        )?)))
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.0.paths)
            .finish()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// Client certificates checked against a CA file (reloaded on change). A client may also
/// connect without one (`mandatory == false`): the caller then decides per request what an
/// anonymous client may do.
pub struct ReloadingClientVerifier {
    verifier: Watched<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
}

impl ReloadingClientVerifier {
    pub fn new(ca: &Path, mandatory: bool) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            verifier: Watched::new(vec![ca.to_owned()], |p| {
                let roots = Arc::new(load_roots(&p[0])?);
                WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", p[0].display())))
            })?,
            mandatory,
        }))
    }
}

impl fmt::Debug for ReloadingClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingClientVerifier")
            .field("ca", &self.verifier.paths)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    // Hints are optional in TLS 1.3 and cannot be borrowed across a reload; clients send the
    // one certificate they have.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier
            .get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .get()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .get()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.get().supported_verify_schemes()
    }
}

/// A TLS 1.3 server configuration over reloading files: `client_ca` turns on client
/// certificates (`mandatory`: refused at the handshake without one).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<(&Path, bool)>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some((ca, mandatory)) => {
            builder.with_client_cert_verifier(ReloadingClientVerifier::new(ca, mandatory)?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(ReloadingCert::new(cert, key)?);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}
