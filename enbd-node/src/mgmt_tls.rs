//! The node's management-API client certificate (`--tls-ca`, `--tls-cert`, `--tls-key`, the
//! files it shares with the data path): used by a mirrored volume's calls to each replica's
//! `ReplicaService` when the controller hands out `https://` management URLs.
//!
//! Invariant: the files are read each time a mirrored volume is opened (attach, takeover,
//! reconnect after a restart), so a rotated certificate is taken without restarting the
//! daemon; errors name the files, never their contents.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The three files, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl MgmtTlsFiles {
    /// All three or none; anything else is a configuration error naming what is missing.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Self { ca, cert, key })),
            (ca, cert, _) => Err(format!(
                "--tls-ca, --tls-cert and --tls-key go together (missing {})",
                if ca.is_none() {
                    "--tls-ca"
                } else if cert.is_none() {
                    "--tls-cert"
                } else {
                    "--tls-key"
                }
            )),
        }
    }

    /// Reads the files into a client configuration (server CA + client identity).
    pub fn load(&self) -> Result<ClientTlsConfig, String> {
        let read = |p: &PathBuf, what: &str| {
            let b = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            if !String::from_utf8_lossy(&b).contains(&format!("{what}-----")) {
                return Err(format!("{}: no PEM {what} block", p.display()));
            }
            Ok(b)
        };
        let ca = read(&self.ca, "CERTIFICATE")?;
        let cert = read(&self.cert, "CERTIFICATE")?;
        let key = read(&self.key, "PRIVATE KEY")?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_together_and_bad_files_are_named_not_quoted() {
        assert_eq!(MgmtTlsFiles::from_flags(None, None, None), Ok(None));
        let e = MgmtTlsFiles::from_flags(Some("/ca".into()), None, Some("/k".into()));
        assert!(e.unwrap_err().contains("--tls-cert"));
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(p("ca"), cert).unwrap();
        std::fs::write(p("crt"), cert).unwrap();
        std::fs::write(p("key"), "hunter2").unwrap();
        let files = MgmtTlsFiles::from_flags(Some(p("ca")), Some(p("crt")), Some(p("key")))
            .unwrap()
            .unwrap();
        let e = files.load().unwrap_err();
        assert!(e.contains("key") && !e.contains("hunter2"), "{e}");
    }
}
