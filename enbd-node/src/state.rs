//! Attachment state that survives a daemon restart: which volume is served by which ublk
//! device, and how to reach its server(s).
//!
//! One JSON file in the state directory, replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory): after a crash the file holds either the old or the new list,
//! never a torn one. A lock file (`flock`) keeps a second daemon off the same state.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

const STATE_FILE: &str = "attachments.json";
const LOCK_FILE: &str = "lock";
const FORMAT_VERSION: u32 = 1;

/// Everything needed to serve one attached volume again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub volume_id: String,
    pub dev_id: u32,
    pub servers: Vec<String>,
    pub export: String,
    pub channels: u16,
    pub queues: u16,
    pub queue_depth: u16,
    /// `wait` or `fail-after=<duration>`.
    pub brownout: String,
    pub read_only: bool,
    pub size_bytes: u64,
    /// Replicas of a mirrored volume (two or more); empty for a single copy, and absent
    /// from records written before mirroring.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaRecord>,
    /// How long a replica may take to acknowledge before it is dropped (mirrored volumes;
    /// 0: the default).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replica_timeout_ms: u64,
    /// Connections use TLS (the policy settled at attach time, so a takeover after a
    /// restart redoes TLS whatever the daemon's default is then); absent in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Mirrored volumes: resync copy limit in bytes per second (0: unlimited).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resync_bytes_per_sec: u64,
    /// The access token from the volume's `publish_context`, presented to every server
    /// (kept so a takeover after a restart reopens); absent when the volume has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// The token may travel without TLS (the daemon's lab setting at attach time).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_plaintext: bool,
}

pub use crate::secret::Secret;

/// One replica of a mirrored volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The holding server's `--server-id`.
    pub id: String,
    /// NBD data address `HOST:PORT`.
    pub nbd: String,
    /// Management gRPC address `HOST:PORT`.
    pub mgmt: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl AttachmentRecord {
    /// A mirrored record must list at least two distinct replicas: anything else was not
    /// written by this daemon and cannot be served as a mirror.
    pub fn check_replicas(&self) -> Result<(), String> {
        let n = self.replicas.len();
        if n == 0 {
            return Ok(());
        }
        if n < 2 {
            return Err(format!(
                "mirrored volume {} lists {n} replica; a mirror needs at least 2",
                self.volume_id
            ));
        }
        let mut ids: Vec<&str> = self.replicas.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "mirrored volume {} lists replica {} twice",
                self.volume_id, w[0]
            ));
        }
        Ok(())
    }
}

impl AttachmentRecord {
    /// What makes this record unusable for a takeover, if anything. A record the daemon wrote
    /// itself always passes; one edited by hand or written by a buggy version may not, and
    /// must be reported instead of tripping the takeover (which indexes the server list).
    pub fn problem(&self) -> Option<String> {
        if self.volume_id.is_empty() || self.volume_id.chars().any(char::is_control) {
            return Some(format!(
                "volume id {:?} is empty or not printable",
                self.volume_id
            ));
        }
        if self.servers.is_empty() || self.servers.iter().any(|s| s.trim().is_empty()) {
            return Some(format!(
                "server list {:?} names no usable server",
                self.servers
            ));
        }
        if self.export.is_empty() {
            return Some("export name is empty".into());
        }
        if self.channels == 0 || self.queues == 0 || self.queue_depth == 0 {
            return Some(format!(
                "channels {}, queues {} and queue depth {} must all be at least 1",
                self.channels, self.queues, self.queue_depth
            ));
        }
        if let Err(e) = self.brownout.parse::<crate::engine::BrownoutPolicy>() {
            return Some(format!("brownout policy {:?}: {e}", self.brownout));
        }
        self.check_replicas().err()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    attachments: Vec<AttachmentRecord>,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {0} is in use by another enbd-node daemon")]
    Locked(PathBuf),
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "state file {path} has format version {found}; this enbd-node reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state directory, locked for this process while the value lives.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: File,
}

impl StateStore {
    /// Creates the directory if needed and takes its lock (fails at once if another daemon
    /// holds it).
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                StateError::Locked(dir.to_path_buf())
            } else {
                StateError::Io {
                    path: lock_path,
                    source: e,
                }
            });
        }
        Ok(StateStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved attachments; none if the daemon never saved any.
    pub fn load(&self) -> Result<Vec<AttachmentRecord>, StateError> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::Io { path, source: e }),
        };
        let file: StateFile =
            serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if file.version != FORMAT_VERSION {
            return Err(StateError::Version {
                path,
                found: file.version,
            });
        }
        Ok(file.attachments)
    }

    /// Replaces the saved list atomically and durably.
    pub fn save(&self, attachments: &[AttachmentRecord]) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(&StateFile {
            version: FORMAT_VERSION,
            attachments: attachments.to_vec(),
        })
        .map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        {
            // 0600: records may carry access tokens.
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(id: &str, dev_id: u32) -> AttachmentRecord {
        AttachmentRecord {
            tls: false,
            volume_id: id.into(),
            dev_id,
            servers: vec!["127.0.0.1:10809".into()],
            export: id.into(),
            channels: 2,
            queues: 1,
            queue_depth: 64,
            brownout: "wait".into(),
            read_only: false,
            size_bytes: 1 << 30,
            replicas: Vec::new(),
            replica_timeout_ms: 0,
            resync_bytes_per_sec: 0,
            access_token: None,
            access_plaintext: false,
        }
    }

    fn replica(id: &str) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            nbd: format!("{id}:10809"),
            mgmt: format!("{id}:9100"),
        }
    }

    #[test]
    fn mirrored_records_round_trip_and_old_records_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let mirrored = AttachmentRecord {
            replicas: vec![replica("a"), replica("b")],
            replica_timeout_ms: 2000,
            resync_bytes_per_sec: 4 << 20,
            access_token: None,
            access_plaintext: false,
            ..record("m", 1)
        };
        store
            .save(&[record("s", 0), mirrored.clone()])
            .expect("save");
        let text = fs::read_to_string(dir.path().join(STATE_FILE)).expect("read");
        // A single-copy record is written exactly as before mirroring existed.
        assert_eq!(text.matches("replicas").count(), 1, "{text}");
        assert_eq!(text.matches("resync_bytes_per_sec").count(), 1, "{text}");
        assert_eq!(store.load().expect("load"), vec![record("s", 0), mirrored]);
        // A record from before mirroring (no replica fields at all).
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"version":1,"attachments":[{"volume_id":"old","dev_id":2,
               "servers":["127.0.0.1:10809"],"export":"old","channels":2,"queues":1,
               "queue_depth":64,"brownout":"wait","read_only":false,"size_bytes":1073741824}]}"#,
        )
        .expect("write");
        assert_eq!(store.load().expect("load old"), vec![record("old", 2)]);
    }

    #[test]
    fn malformed_mirrored_records_are_reported() {
        assert_eq!(record("s", 0).check_replicas(), Ok(()));
        let one = AttachmentRecord {
            replicas: vec![replica("a")],
            ..record("m", 1)
        };
        assert_eq!(
            one.check_replicas(),
            Err("mirrored volume m lists 1 replica; a mirror needs at least 2".into())
        );
        let twice = AttachmentRecord {
            replicas: vec![replica("a"), replica("b"), replica("a")],
            ..record("m", 1)
        };
        assert_eq!(
            twice.check_replicas(),
            Err("mirrored volume m lists replica a twice".into())
        );
    }

    #[test]
    fn save_load_round_trip_and_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        assert!(store.load().expect("empty load").is_empty());
        store.save(&[record("a", 0), record("b", 3)]).expect("save");
        assert_eq!(
            store.load().expect("load"),
            vec![record("a", 0), record("b", 3)]
        );
        store.save(&[record("b", 3)]).expect("save again");
        assert_eq!(store.load().expect("load"), vec![record("b", 3)]);
        assert!(!dir.path().join("attachments.json.tmp").exists());
    }

    #[test]
    fn bad_records_are_named() {
        assert_eq!(record("a", 0).problem(), None);
        let bad = [
            AttachmentRecord {
                servers: vec![],
                ..record("a", 0)
            },
            AttachmentRecord {
                servers: vec![" ".into()],
                ..record("a", 0)
            },
            AttachmentRecord {
                volume_id: String::new(),
                ..record("a", 0)
            },
            AttachmentRecord {
                export: String::new(),
                ..record("a", 0)
            },
            AttachmentRecord {
                queues: 0,
                ..record("a", 0)
            },
            AttachmentRecord {
                brownout: "sometimes".into(),
                ..record("a", 0)
            },
        ];
        for r in bad {
            assert!(r.problem().is_some(), "{r:?}");
        }
        let msg = AttachmentRecord {
            servers: vec![],
            ..record("a", 0)
        }
        .problem()
        .unwrap_or_default();
        assert!(msg.contains("server list"), "{msg}");
    }

    #[test]
    fn second_daemon_is_locked_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = StateStore::open(dir.path()).expect("open");
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(StateError::Locked(_))
        ));
    }

    #[test]
    fn corrupt_or_foreign_files_are_reported_not_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        fs::write(dir.path().join(STATE_FILE), b"{not json").expect("write");
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"version":9,"attachments":[]}"#,
        )
        .expect("write");
        assert!(matches!(
            store.load(),
            Err(StateError::Version { found: 9, .. })
        ));
    }
}
