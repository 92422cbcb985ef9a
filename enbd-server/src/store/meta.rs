//! On-disk metadata of volumes and snapshots (`meta.json` beside each `data` file), and the
//! crash-safe way to write it.
//!
//! Invariant: a metadata file is written once, in the staging area, fsynced before its
//! directory is renamed into place, and never modified afterwards. A volume's size is not
//! metadata: it is the data file's length, which `ftruncate` changes atomically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub format: u32,
    pub source: Option<ContentSource>,
    pub created_at_unix: i64,
    /// The creator's labels (absent in metadata written before labels existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    pub source_volume: String,
    /// The snapshot's instant (taken with the source's writes paused), seconds and
    /// nanoseconds since the Unix epoch (nanoseconds absent in older metadata).
    pub created_at_unix: i64,
    #[serde(default)]
    pub created_at_nanos: u32,
}

pub const FORMAT: u32 = 1;

/// Writes `value` as JSON to `path` and fsyncs the file (not its directory: the caller
/// renames the enclosing directory and fsyncs that parent).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut f = File::create(path)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Makes a rename or unlink inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Now since the Unix epoch: (seconds, nanoseconds).
pub fn now_unix_nanos() -> (i64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or((0, 0))
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
