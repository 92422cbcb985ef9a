//! The controller's side of management mTLS: the CA that signs enbd-server certificates and
//! the controller's own client certificate (`--mgmt-tls-ca`, `--mgmt-tls-cert`,
//! `--mgmt-tls-key`), re-read when the files change.
//!
//! Invariants: the files are read whole and checked to parse before a new configuration
//! replaces the old one (a half-written rotation keeps the previous one); errors name paths,
//! never file contents.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum MgmtTlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no PEM {1} block")]
    Pem(PathBuf, &'static str),
}

/// The three files, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn read_pem(path: &Path, label: &'static str) -> Result<Vec<u8>, MgmtTlsError> {
    let bytes = std::fs::read(path).map_err(|source| MgmtTlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    // A cheap structural check so a truncated file is not taken: the real parse happens in
    // rustls when a connection is made.
    let text = String::from_utf8_lossy(&bytes);
    let ok = text.contains("-----BEGIN ")
        && text.contains("-----END ")
        && (label != "CERTIFICATE" || text.contains("CERTIFICATE-----"))
        && (label != "PRIVATE KEY" || text.contains("PRIVATE KEY-----"));
    if !ok {
        return Err(MgmtTlsError::Pem(path.to_owned(), label));
    }
    Ok(bytes)
}

fn load(files: &MgmtTlsFiles) -> Result<ClientTlsConfig, MgmtTlsError> {
    let ca = read_pem(&files.ca, "CERTIFICATE")?;
    let cert = read_pem(&files.cert, "CERTIFICATE")?;
    let key = read_pem(&files.key, "PRIVATE KEY")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

/// The current client TLS configuration, rebuilt when a file changes.
pub struct MgmtTls {
    files: MgmtTlsFiles,
    state: Mutex<(Vec<Stamp>, ClientTlsConfig)>,
}

impl MgmtTls {
    pub fn load(files: MgmtTlsFiles) -> Result<Self, MgmtTlsError> {
        let stamps = Self::stamps(&files);
        let config = load(&files)?;
        Ok(Self {
            files,
            state: Mutex::new((stamps, config)),
        })
    }

    fn stamps(f: &MgmtTlsFiles) -> Vec<Stamp> {
        [&f.ca, &f.cert, &f.key].iter().map(|p| stamp(p)).collect()
    }

    pub fn config(&self) -> ClientTlsConfig {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Re-reads the files if any changed; true when a new configuration was taken.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = Self::stamps(&self.files);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if stamps == s.0 {
            return false;
        }
        match load(&self.files) {
            Ok(c) => {
                *s = (stamps, c);
                tracing::info!(files = ?self.files, "management TLS files changed: reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "management TLS files changed but cannot be loaded; keeping the previous ones");
                false
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_non_pem_files_are_refused_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let files = MgmtTlsFiles {
            ca: p("ca.crt"),
            cert: p("tls.crt"),
            key: p("tls.key"),
        };
        assert!(matches!(
            MgmtTls::load(files.clone()),
            Err(MgmtTlsError::Read { .. })
        ));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(p("ca.crt"), cert).unwrap();
        std::fs::write(p("tls.crt"), cert).unwrap();
        std::fs::write(p("tls.key"), "secret bytes, not PEM").unwrap();
        let e = MgmtTls::load(files.clone()).err().unwrap().to_string();
        assert!(e.contains("tls.key") && !e.contains("secret"), "{e}");
        std::fs::write(
            p("tls.key"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let tls = MgmtTls::load(files).unwrap();
        assert!(!tls.reload_if_changed());
        std::fs::write(p("tls.crt"), format!("{cert}{cert}")).unwrap();
        assert!(tls.reload_if_changed());
        assert!(!tls.reload_if_changed());
    }
}
