//! Node-scoped access (`--access published`): which node may open which volume over NBD, as
//! per-attachment grants the controller makes at ControllerPublishVolume and withdraws at
//! ControllerUnpublishVolume (management `GrantAccess`/`RevokeAccess`).
//!
//! A grant is (volume, node id) → token: 256 random bits as 64 hex digits. A client presents
//! the token with `ENBD_OPT_ACCESS` in the handshake; the server then lists and opens only the
//! granted volume. Invariants:
//! - Grants are durable: `grants.json` in the data directory (mode 0600), replaced whole
//!   (written beside, fsynced, renamed over, directory fsynced) before a grant or revoke
//!   returns, so a server restart keeps exactly the grants that were acknowledged.
//! - Tokens are compared by their SHA-256 digests in constant time, never logged, never in
//!   an error message or a metric.
//! - Every session opened with a grant holds a child of the grant's cancellation token:
//!   revoking (or replacing the token) cancels it, so the session stops reading requests,
//!   answers those in flight and closes. A check and the cancellation serialize on one lock,
//!   so a session cannot slip in with a grant that is being revoked.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use enbd_proto::wire::AccessToken;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const GRANTS_FILE: &str = "grants.json";
const FORMAT: u32 = 1;
/// Hex digits of a token we issue (256 bits).
pub const TOKEN_HEX_LEN: usize = 64;

/// `--access`: who may open a volume over NBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessMode {
    /// Any client that gets through TLS opens any volume by name (a lab, `--demo`).
    Open,
    /// Only a client presenting a grant's token, and only the granted volume; without one
    /// LIST is empty and every open is refused.
    Published,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access token must be 64 lowercase hex digits")]
    BadToken,
    #[error("node id must be 1 to 256 printable characters")]
    BadNode,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("generating a token: the system's random source failed")]
    Random,
}

/// The file's form: volume → node id → token.
#[derive(Debug, Default, Serialize, Deserialize)]
struct GrantsFile {
    format: u32,
    grants: BTreeMap<String, BTreeMap<String, String>>,
}

struct Grant {
    token: String,
    digest: [u8; 32],
    /// Cancelled when the grant is revoked or its token replaced.
    revoked: CancellationToken,
    sessions: Arc<AtomicU32>,
}

/// What a session holds for a grant it was opened with.
pub struct Held {
    pub volume: String,
    /// Cancelled when the grant goes away.
    pub revoked: CancellationToken,
    sessions: Arc<AtomicU32>,
}

impl Held {
    /// Another hold on the same grant (cancelled with it).
    pub fn share(&self) -> Held {
        Held {
            volume: self.volume.clone(),
            revoked: self.revoked.child_token(),
            sessions: self.sessions.clone(),
        }
    }

    /// Counts the session against its grant until the returned guard drops.
    pub fn enter(&self) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.sessions.clone())
    }
}

/// One session counted against a grant.
pub struct SessionGuard(Arc<AtomicU32>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Grants::grant`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Granted {
    pub token: String,
    /// The grant is new or its token was replaced (false: it already held this token).
    pub changed: bool,
}

/// What [`Grants::revoke`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Grants withdrawn.
    pub grants: u32,
    /// Sessions that were open with them (now closing).
    pub closed: u32,
}

/// The grants of one server.
pub struct Grants {
    path: PathBuf,
    map: Mutex<BTreeMap<String, BTreeMap<String, Grant>>>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equal digests, in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn check_token(t: &str) -> Result<(), AccessError> {
    if t.len() == TOKEN_HEX_LEN && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(AccessError::BadToken)
    }
}

fn check_node(n: &str) -> Result<(), AccessError> {
    if n.is_empty() || n.len() > 256 || n.chars().any(char::is_control) {
        Err(AccessError::BadNode)
    } else {
        Ok(())
    }
}

/// A fresh token: 256 bits from the system's CSPRNG, as hex.
pub fn new_token() -> Result<String, AccessError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AccessError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> AccessError {
    move |source| AccessError::Io { context, source }
}

impl Grants {
    /// Loads `grants.json` from `dir` (none yet: no grants). A file that does not parse is an
    /// error: starting with no grants would lock every node out, and starting open would be
    /// worse.
    pub fn open(dir: &Path) -> Result<Self, AccessError> {
        let path = dir.join(GRANTS_FILE);
        let file: GrantsFile = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AccessError::Io {
                context: format!("reading {}", path.display()),
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => GrantsFile::default(),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let mut map = BTreeMap::new();
        for (volume, nodes) in file.grants {
            let mut m = BTreeMap::new();
            for (node, token) in nodes {
                if check_token(&token).is_err() || check_node(&node).is_err() {
                    tracing::warn!(volume = %volume, node_id = %node, file = %path.display(),
                        "ignoring a malformed grant");
                    continue;
                }
                m.insert(node, Grant::new(token));
            }
            map.insert(volume, m);
        }
        Ok(Self {
            path,
            map: Mutex::new(map),
        })
    }

    fn persist(&self, map: &BTreeMap<String, BTreeMap<String, Grant>>) -> Result<(), AccessError> {
        let file = GrantsFile {
            format: FORMAT,
            grants: map
                .iter()
                .filter(|(_, n)| !n.is_empty())
                .map(|(v, n)| {
                    let nodes = n
                        .iter()
                        .map(|(k, g)| (k.clone(), g.token.clone()))
                        .collect();
                    (v.clone(), nodes)
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| AccessError::Io {
            context: "encoding grants".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let ctx = || format!("writing {}", tmp.display());
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(ctx()))?;
        f.write_all(&bytes).map_err(io_err(ctx()))?;
        f.sync_all().map_err(io_err(ctx()))?;
        drop(f);
        fs::rename(&tmp, &self.path)
            .map_err(io_err(format!("replacing {}", self.path.display())))?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(format!("syncing {}", dir.display())))?;
        }
        Ok(())
    }

    /// Grants `node` access to `volume` and returns its token (see the module doc and
    /// `GrantAccess` in enbd.proto). The caller checked that the volume exists.
    pub fn grant(
        &self,
        volume: &str,
        node: &str,
        token: Option<&str>,
    ) -> Result<Granted, AccessError> {
        check_node(node)?;
        if let Some(t) = token {
            check_token(t)?;
        }
        let mut map = lock(&self.map);
        let existing = map.get(volume).and_then(|n| n.get(node));
        let unchanged = |g: &Grant| Granted {
            token: g.token.clone(),
            changed: false,
        };
        match (existing, token) {
            (Some(g), None) => return Ok(unchanged(g)),
            (Some(g), Some(t)) if same(&g.digest, &digest(t.as_bytes())) => {
                return Ok(unchanged(g));
            }
            _ => {}
        }
        let token = match token {
            Some(t) => t.to_owned(),
            None => new_token()?,
        };
        let old = map
            .entry(volume.to_owned())
            .or_default()
            .insert(node.to_owned(), Grant::new(token.clone()));
        if let Err(e) = self.persist(&map) {
            // Not durable, so not granted: put things back as they were.
            let nodes = map.entry(volume.to_owned()).or_default();
            match old {
                Some(o) => {
                    nodes.insert(node.to_owned(), o);
                }
                None => {
                    nodes.remove(node);
                }
            }
            return Err(e);
        }
        if let Some(old) = old {
            old.revoked.cancel();
            tracing::info!(
                volume,
                node_id = node,
                "access token replaced; old sessions closed"
            );
        } else {
            tracing::info!(volume, node_id = node, "access granted");
        }
        Ok(Granted {
            token,
            changed: true,
        })
    }

    /// Withdraws `node`'s grant on `volume` (every node's when `None`) and closes the sessions
    /// opened with it. Revoking nothing succeeds (and says so: no grants withdrawn).
    pub fn revoke(&self, volume: &str, node: Option<&str>) -> Result<Revoked, AccessError> {
        let mut map = lock(&self.map);
        let Some(nodes) = map.get_mut(volume) else {
            return Ok(Revoked::default());
        };
        let removed: Vec<(String, Grant)> = match node {
            Some(n) => nodes
                .remove(n)
                .map(|g| (n.to_owned(), g))
                .into_iter()
                .collect(),
            None => std::mem::take(nodes).into_iter().collect(),
        };
        if nodes.is_empty() {
            map.remove(volume);
        }
        if removed.is_empty() {
            return Ok(Revoked::default());
        }
        if let Err(e) = self.persist(&map) {
            // Still on disk, so still granted: keep serving it rather than lie.
            let nodes = map.entry(volume.to_owned()).or_default();
            for (n, g) in removed {
                nodes.insert(n, g);
            }
            return Err(e);
        }
        let mut done = Revoked::default();
        for (n, g) in removed {
            done.grants += 1;
            done.closed += g.sessions.load(Ordering::Acquire);
            g.revoked.cancel();
            tracing::info!(volume, node_id = %n, "access revoked");
        }
        Ok(done)
    }

    /// The grants a presented token opens (normally one volume), each with a cancellation
    /// token for the session. Every grant is compared, so the time taken does not depend on
    /// which one matches.
    pub fn check(&self, token: &AccessToken) -> Vec<Held> {
        let d = digest(token.as_bytes());
        let map = lock(&self.map);
        let mut out = Vec::new();
        for (volume, nodes) in map.iter() {
            for g in nodes.values() {
                if same(&g.digest, &d) {
                    out.push(Held {
                        volume: volume.clone(),
                        revoked: g.revoked.child_token(),
                        sessions: g.sessions.clone(),
                    });
                }
            }
        }
        out
    }

    /// Whether `token` is granted on `volume`, to any node. Every grant of the volume is
    /// compared, in constant time each.
    pub fn opens(&self, token: &AccessToken, volume: &str) -> bool {
        let d = digest(token.as_bytes());
        lock(&self.map).get(volume).is_some_and(|nodes| {
            nodes
                .values()
                .fold(false, |hit, g| hit | same(&g.digest, &d))
        })
    }

    /// Node ids holding a grant on `volume` (for tests and operators; never the tokens).
    pub fn nodes(&self, volume: &str) -> Vec<String> {
        lock(&self.map)
            .get(volume)
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl Grant {
    fn new(token: String) -> Self {
        Self {
            digest: digest(token.as_bytes()),
            token,
            revoked: CancellationToken::new(),
            sessions: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> AccessToken {
        AccessToken::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn grants_are_idempotent_durable_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let g = Grants::open(dir.path()).unwrap();
        let first = g.grant("vol", "node-a", None).unwrap();
        assert!(first.changed);
        let t = first.token;
        assert_eq!(t.len(), TOKEN_HEX_LEN);
        let unchanged = Granted {
            token: t.clone(),
            changed: false,
        };
        assert_eq!(
            g.grant("vol", "node-a", None).unwrap(),
            unchanged,
            "same token again"
        );
        assert_eq!(g.grant("vol", "node-a", Some(&t)).unwrap(), unchanged);
        let other = g.grant("vol", "node-b", None).unwrap().token;
        assert_ne!(other, t);
        let mode = fs::metadata(dir.path().join(GRANTS_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );

        let held = g.check(&tok(&t));
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].volume, "vol");
        assert!(g.check(&tok(&"0".repeat(64))).is_empty());

        // A restart keeps both grants with their tokens.
        drop(g);
        let g = Grants::open(dir.path()).unwrap();
        assert_eq!(g.nodes("vol"), vec!["node-a", "node-b"]);
        assert_eq!(g.grant("vol", "node-a", None).unwrap().token, t);
        let held = g.check(&tok(&t));
        let _session = held[0].enter();
        assert_eq!(
            g.revoke("vol", Some("node-a")).unwrap(),
            Revoked {
                grants: 1,
                closed: 1
            }
        );
        assert!(held[0].revoked.is_cancelled());
        assert!(g.check(&tok(&t)).is_empty());
        assert_eq!(
            g.revoke("vol", Some("node-a")).unwrap(),
            Revoked::default(),
            "idempotent"
        );
        drop(g);
        let g = Grants::open(dir.path()).unwrap();
        assert_eq!(g.nodes("vol"), vec!["node-b"]);
        assert_eq!(g.revoke("vol", None).unwrap().grants, 1);
        assert!(g.nodes("vol").is_empty());
    }

    #[test]
    fn setting_another_token_replaces_the_grant_and_closes_its_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let g = Grants::open(dir.path()).unwrap();
        let t = g.grant("vol", "n", None).unwrap().token;
        let held = g.check(&tok(&t));
        let t2 = "ab".repeat(32);
        assert_eq!(
            g.grant("vol", "n", Some(&t2)).unwrap(),
            Granted {
                token: t2.clone(),
                changed: true
            }
        );
        assert!(held[0].revoked.is_cancelled());
        assert!(g.check(&tok(&t)).is_empty());
        assert_eq!(g.check(&tok(&t2)).len(), 1);
        assert!(matches!(
            g.grant("vol", "n", Some("ABC")),
            Err(AccessError::BadToken)
        ));
        assert!(matches!(
            g.grant("vol", "", None),
            Err(AccessError::BadNode)
        ));
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let t = tok(&"cd".repeat(32));
        assert!(!format!("{t:?}").contains("cd"));
    }
}
