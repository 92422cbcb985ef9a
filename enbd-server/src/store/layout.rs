//! The store's on-disk layout: where entries live, how one is built in `staging/` and
//! committed by a rename, and how one is moved out of sight before it is removed.
//!
//! `ROOT/volumes/<name>/{data,meta.json}`, `ROOT/snapshots/<name>/{data,meta.json}`,
//! `ROOT/staging/` (work in progress). An entry exists iff its directory was renamed into
//! `volumes/` or `snapshots/` and that parent fsynced; everything in `staging/` is an
//! interrupted create or delete and is emptied on [`Layout::open`]. This module knows files
//! and renames only: which names are busy or open is the registry's business
//! ([`super::registry`]).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::meta::{self, SnapshotMeta, VolumeMeta};
use super::{StoreError, VolumeName, io_err};

const DATA_FILE: &str = "data";
const META_FILE: &str = "meta.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// The data directory, resolved, with the counter that keeps staging names unique.
pub(super) struct Layout {
    root: PathBuf,
    staging_seq: AtomicU64,
}

impl Layout {
    /// Creates the directories if needed and empties `staging/`: whatever is there is an
    /// interrupted create or delete.
    pub(super) fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["volumes", "snapshots", "staging"] {
            fs::create_dir_all(root.join(sub))
                .map_err(io_err(format!("creating {}", root.join(sub).display())))?;
        }
        let root =
            fs::canonicalize(root).map_err(io_err(format!("resolving {}", root.display())))?;
        let staging = root.join("staging");
        let mut cleaned = 0;
        for entry in fs::read_dir(&staging).map_err(io_err("scanning staging"))? {
            let path = entry.map_err(io_err("scanning staging"))?.path();
            let r = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(io_err(format!("removing leftover {}", path.display())))?;
            cleaned += 1;
        }
        if cleaned > 0 {
            meta::fsync_dir(&staging).map_err(io_err("syncing staging"))?;
            tracing::info!(cleaned, "removed leftovers of interrupted operations");
        }
        Ok(Self {
            root,
            staging_seq: AtomicU64::new(0),
        })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn dir_of(&self, kind: Kind) -> PathBuf {
        self.root.join(match kind {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        })
    }

    fn entry_dir(&self, kind: Kind, name: &VolumeName) -> PathBuf {
        self.dir_of(kind).join(name.as_str())
    }

    /// The committed entry's data file (its length is the entry's size).
    pub(super) fn data_path(&self, kind: Kind, name: &VolumeName) -> PathBuf {
        self.entry_dir(kind, name).join(DATA_FILE)
    }

    /// Every committed entry of `kind` whose directory name is a valid name, sorted.
    pub(super) fn names(&self, kind: Kind) -> Result<Vec<VolumeName>, StoreError> {
        let dir = self.dir_of(kind);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| VolumeName::parse(n).ok())
            {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The data file's metadata; a missing entry is [`StoreError::NotFound`].
    pub(super) fn data_stat(
        &self,
        kind: Kind,
        name: &VolumeName,
    ) -> Result<fs::Metadata, StoreError> {
        let path = self.data_path(kind, name);
        fs::metadata(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound {
                kind: kind.label(),
                name: name.to_string(),
            },
            _ => StoreError::Io {
                context: format!("stat {}", path.display()),
                source: e,
            },
        })
    }

    pub(super) fn volume_meta(&self, name: &VolumeName) -> Result<VolumeMeta, StoreError> {
        let path = self.entry_dir(Kind::Volume, name).join(META_FILE);
        meta::read_json(&path).map_err(io_err(format!("reading {}", path.display())))
    }

    pub(super) fn snapshot_meta(&self, name: &VolumeName) -> Result<SnapshotMeta, StoreError> {
        let path = self.entry_dir(Kind::Snapshot, name).join(META_FILE);
        meta::read_json(&path).map_err(io_err(format!("reading {}", path.display())))
    }

    /// A fresh, unique path in `staging/` for work on `name`.
    fn staging_path(&self, what: &str, name: &VolumeName) -> PathBuf {
        let seq = self.staging_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("staging")
            .join(format!("{what}-{name}-{}-{seq}", std::process::id()))
    }

    /// Creates an empty staging directory in which one entry is built.
    pub(super) fn new_stage(&self, what: &str, name: &VolumeName) -> Result<PathBuf, StoreError> {
        let stage = self.staging_path(what, name);
        fs::create_dir(&stage).map_err(io_err("creating staging directory"))?;
        Ok(stage)
    }

    /// Creates the (empty) data file of an entry being built in `stage`.
    pub(super) fn new_data_file(stage: &Path) -> io::Result<File> {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(stage.join(DATA_FILE))
    }

    /// Writes an entry's metadata into `stage` and makes the stage durable: after this,
    /// only [`Layout::commit`] is left.
    pub(super) fn seal_stage(
        stage: &Path,
        m: &impl serde::Serialize,
        what: &str,
    ) -> Result<(), StoreError> {
        meta::write_json(&stage.join(META_FILE), m)
            .map_err(io_err(format!("writing {what} metadata")))?;
        meta::fsync_dir(stage).map_err(io_err("syncing staging directory"))
    }

    /// Whether files in the data directory can be reflinked (FICLONE between two scratch
    /// files in `staging/`). Any failure counts as "no": copies then never try.
    pub(super) fn probe_reflink(&self) -> bool {
        let dir = self
            .root
            .join("staging")
            .join(format!("reflink-probe-{}", std::process::id()));
        let r = (|| {
            fs::create_dir(&dir)?;
            let a = Self::new_data_file(&dir)?;
            a.set_len(4096)?;
            let b = File::options()
                .write(true)
                .create_new(true)
                .open(dir.join("b"))?;
            crate::sys::reflink(&a, &b)
        })();
        let _ = fs::remove_dir_all(&dir);
        r.is_ok()
    }

    /// Removes a stage that was not committed (best effort: start-up empties staging anyway).
    pub(super) fn abandon(stage: &Path) {
        let _ = fs::remove_dir_all(stage);
    }

    /// Moves a fully built staging directory into place: the commit point.
    pub(super) fn commit(
        &self,
        stage: &Path,
        kind: Kind,
        name: &VolumeName,
    ) -> Result<(), StoreError> {
        let dst = self.entry_dir(kind, name);
        fs::rename(stage, &dst).map_err(io_err(format!("committing {}", dst.display())))?;
        meta::fsync_dir(&self.dir_of(kind)).map_err(io_err("syncing directory"))?;
        Ok(())
    }

    /// Moves an entry out of sight into `staging/`, durably; `None` if it was not there.
    /// The returned path is for [`Layout::discard`].
    pub(super) fn hide(
        &self,
        kind: Kind,
        name: &VolumeName,
    ) -> Result<Option<PathBuf>, StoreError> {
        let trash = self.staging_path("delete", name);
        match fs::rename(self.entry_dir(kind, name), &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io {
                    context: format!("deleting {name}"),
                    source: e,
                });
            }
        }
        meta::fsync_dir(&self.dir_of(kind)).map_err(io_err("syncing directory"))?;
        Ok(Some(trash))
    }

    /// Removes what [`Layout::hide`] moved away.
    pub(super) fn discard(trash: &Path) -> Result<(), StoreError> {
        fs::remove_dir_all(trash).map_err(io_err(format!("removing {}", trash.display())))
    }
}
