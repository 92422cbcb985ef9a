//! The volume store: volumes and snapshots as sparse files in a data directory, and the
//! registry of volumes open over NBD.
//!
//! The store's operations live here; [`layout`] owns the files (paths, staging and the
//! rename that commits, the volume and snapshot files) and [`registry`] owns who is using a
//! name (the one management operation per name, the NBD connections sharing a backend).
//! Invariants:
//! - An entry exists iff its directory was renamed into `volumes/` or `snapshots/`; that
//!   rename, followed by an fsync of the parent, is the commit point of a create. Everything
//!   is built and fsynced in `staging/` first, and a delete renames the entry back into
//!   `staging/` before removing it. So kill -9 at any instant leaves each entry either fully
//!   there or absent, and the start-up scan only has to empty `staging/`.
//! - A volume's size is its data file's length, always a multiple of 4 KiB.
//! - Every name is a [`VolumeName`], so no path built here leaves the data directory.
//! - One management operation at a time per name (others get [`StoreError::Busy`]); opening
//!   and deleting serialize on the open-volume registry, so a delete never races a new
//!   connection.
//! - Mirror metadata (`membership.json`, `dirty-*.bitmap` beside `data`; see [`membership`])
//!   belongs to the volume: deleted with it, grown with it, never copied into snapshots or
//!   clones. Every open volume's writes go through its write intent.
//! - A snapshot or clone is a point in time with respect to acknowledged writes: taken with
//!   the source's writes paused and drained for an instant, then either reflinked (instant)
//!   or copied in the background with copy-before-write ([`copy`]) while the source's writes
//!   go on. Until its copy has finished it lives in `staging/` only: listed as not ready,
//!   never served, never a source, gone after a restart.

pub mod bitmap;
pub mod copy;
mod layout;
pub mod membership;
pub mod meta;
pub mod name;
mod registry;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enbd_proto::ids::ServerId;

use crate::export::file::FrozenBackend;
use crate::export::{
    Backend, Export, ExportEntry, ExportProvider, FileBackend, OpenError, PreWrite,
};
use crate::sys;
pub use copy::CopyProgress;
use copy::{CopyJob, CopyState, Target};
use layout::{Kind, Layout};
use membership::{Membership, Mirror, Mirrors, ReplicaError, SetRequest};
pub use meta::ContentSource;
use meta::{SnapshotMeta, VolumeMeta};
pub use name::{NameError, VolumeName};
use registry::{BusyGuard, Lease, Registry};

/// Volume sizes are rounded up to this.
pub const SIZE_ALIGN: u64 = 4096;
/// Export-name prefix under which snapshots are served read-only.
pub const SNAPSHOT_EXPORT_PREFIX: &str = "snapshot/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid name {name:?}: {source}")]
    InvalidName { name: String, source: NameError },
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("invalid labels: {0}")]
    InvalidLabels(String),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists with different parameters")]
    AlreadyExists { kind: &'static str, name: String },
    #[error(
        "volume {name:?} has {connections} open NBD connection(s); delete with force to close them"
    )]
    InUse { name: String, connections: u64 },
    #[error("volume {name:?} is {current} bytes; cannot shrink to {requested}")]
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },
    #[error("size {requested} is smaller than the source's {source_size} bytes")]
    SmallerThanSource { requested: u64, source_size: u64 },
    #[error("another operation on {0:?} is in progress")]
    Busy(String),
    #[error("{kind} {name:?} is still being copied ({done} of {total} bytes); not usable yet")]
    NotReady {
        kind: &'static str,
        name: String,
        done: u64,
        total: u64,
    },
    #[error("copying {kind} {name:?} failed: {reason}; it was removed, a retry makes it anew")]
    CopyFailed {
        kind: &'static str,
        name: String,
        reason: String,
        /// The data directory's filesystem was full.
        no_space: bool,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Most labels one volume may carry, and their sizes: they live in the volume's metadata file.
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 253;
const MAX_LABEL_VALUE: usize = 4096;

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
    if labels.len() > MAX_LABELS {
        return Err(StoreError::InvalidLabels(format!(
            "{} labels, at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY {
            return Err(StoreError::InvalidLabels(format!(
                "key {k:?} must be 1 to {MAX_LABEL_KEY} bytes"
            )));
        }
        if v.len() > MAX_LABEL_VALUE {
            return Err(StoreError::InvalidLabels(format!(
                "value of {k:?} is {} bytes, at most {MAX_LABEL_VALUE}",
                v.len()
            )));
        }
    }
    Ok(())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io {
        context: context.into(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    pub source: Option<ContentSource>,
    pub created_at_unix: i64,
    pub export_name: String,
    pub open_connections: u64,
    pub allocated_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// `Some` while a clone is still being copied: not yet a volume anyone can open.
    pub copy: Option<CopyProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub source_volume: String,
    pub size_bytes: u64,
    pub created_at_unix: i64,
    /// The instant's nanoseconds (within `created_at_unix`).
    pub created_at_nanos: u32,
    pub export_name: String,
    /// Its copy has finished: it can be read and restored from.
    pub ready: bool,
    /// `Some` while its copy runs in the background.
    pub copy: Option<CopyProgress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub provisioned_bytes: u64,
}

struct Inner {
    layout: Layout,
    registry: Arc<Registry>,
    default_export: Option<String>,
    mirrors: Mirrors,
    /// Snapshots and clones whose copy is running (or failed and not yet reported).
    copies: Mutex<HashMap<(Kind, String), Arc<CopyJob>>>,
    /// Background copy rate limit, bytes per second (0: none).
    copy_rate: AtomicU64,
    /// The data directory's filesystem can reflink (probed at open).
    reflink: bool,
}

/// How long a create waits for its copy before answering "not ready yet": long enough that a
/// small or reflinked copy answers ready at once, short against a client's deadline.
pub const READY_GRACE: Duration = Duration::from_millis(500);

/// Handle on the store; cheap to clone.
#[derive(Clone)]
pub struct VolumeStore {
    inner: Arc<Inner>,
}

fn parse_name(name: &str) -> Result<VolumeName, StoreError> {
    VolumeName::parse(name).map_err(|source| StoreError::InvalidName {
        name: name.to_owned(),
        source,
    })
}

/// Rounds a requested size up to [`SIZE_ALIGN`].
pub fn round_size(size: u64) -> Result<u64, StoreError> {
    if size == 0 {
        return Err(StoreError::InvalidSize(
            "size must be greater than zero".into(),
        ));
    }
    size.checked_next_multiple_of(SIZE_ALIGN)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| StoreError::InvalidSize(format!("{size} bytes is too large")))
}

impl VolumeStore {
    /// Opens (creating if needed) the store in `root` and empties its staging area: whatever
    /// is there is an interrupted create or delete.
    pub fn open(root: &Path, default_export: Option<String>) -> Result<Self, StoreError> {
        Self::open_as(root, default_export, None)
    }

    /// [`VolumeStore::open`] for the server `server_id`: mirror records must name it, and it
    /// keeps no dirty-region bitmap for itself. Loads every volume's mirror metadata.
    pub fn open_as(
        root: &Path,
        default_export: Option<String>,
        server_id: Option<ServerId>,
    ) -> Result<Self, StoreError> {
        let layout = Layout::open(root)?;
        let volumes = layout.dir_of(Kind::Volume);
        let reflink = layout.probe_reflink();
        tracing::info!(
            reflink,
            "snapshots and clones: {}",
            if reflink {
                "reflink"
            } else {
                "background copy with copy-before-write"
            }
        );
        let store = Self {
            inner: Arc::new(Inner {
                layout,
                registry: Arc::default(),
                default_export,
                mirrors: Mirrors::new(volumes, server_id),
                copies: Mutex::default(),
                copy_rate: AtomicU64::new(0),
                reflink,
            }),
        };
        for kind in [Kind::Volume, Kind::Snapshot] {
            for name in store.inner.layout.names(kind)? {
                if let Err(e) = store.check_entry(kind, &name) {
                    tracing::warn!(kind = kind.label(), name = %name, error = %e, "skipping damaged entry");
                } else if kind == Kind::Volume {
                    // Loads (and reports) its mirror metadata now rather than at first use.
                    store.inner.mirrors.get(name.as_str());
                }
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }

    /// Limits background snapshot and clone copies to `bytes_per_sec` each (0: no limit).
    /// Copy-before-write copies done for a source's writes are never held back.
    pub fn set_copy_rate(&self, bytes_per_sec: u64) {
        self.inner.copy_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    fn claim(&self, kind: Kind, name: &VolumeName) -> Result<BusyGuard, StoreError> {
        self.inner.registry.claim(kind, name)
    }

    fn check_entry(&self, kind: Kind, name: &VolumeName) -> Result<(), StoreError> {
        match kind {
            Kind::Volume => self.volume_info(name).map(|_| ()),
            Kind::Snapshot => self.snapshot_info(name).map(|_| ()),
        }
    }

    fn volume_info(&self, name: &VolumeName) -> Result<VolumeInfo, StoreError> {
        let st = self.inner.layout.data_stat(Kind::Volume, name)?;
        let m = self.inner.layout.volume_meta(name)?;
        Ok(VolumeInfo {
            name: name.to_string(),
            size_bytes: st.len(),
            source: m.source,
            created_at_unix: m.created_at_unix,
            export_name: name.to_string(),
            open_connections: self.inner.registry.connections(Kind::Volume, name),
            allocated_bytes: st.blocks() * 512,
            labels: m.labels,
            copy: None,
        })
    }

    fn snapshot_info(&self, name: &VolumeName) -> Result<SnapshotInfo, StoreError> {
        let st = self.inner.layout.data_stat(Kind::Snapshot, name)?;
        let m = self.inner.layout.snapshot_meta(name)?;
        Ok(SnapshotInfo {
            name: name.to_string(),
            source_volume: m.source_volume,
            size_bytes: st.len(),
            created_at_unix: m.created_at_unix,
            created_at_nanos: m.created_at_nanos,
            export_name: format!("{SNAPSHOT_EXPORT_PREFIX}{name}"),
            ready: true,
            copy: None,
        })
    }

    pub fn get_volume(&self, name: &str) -> Result<VolumeInfo, StoreError> {
        self.volume_info(&parse_name(name)?)
    }

    /// A snapshot, ready or still copying.
    pub fn get_snapshot(&self, name: &str) -> Result<SnapshotInfo, StoreError> {
        let name = parse_name(name)?;
        match self.snapshot_info(&name) {
            Err(StoreError::NotFound { .. }) => self
                .job(Kind::Snapshot, &name)
                .map(|j| copying_snapshot(&j))
                .ok_or_else(|| StoreError::NotFound {
                    kind: "snapshot",
                    name: name.to_string(),
                }),
            r => r,
        }
    }

    /// All volumes, sorted by name. Damaged entries are logged and left out.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, StoreError> {
        Ok(self
            .inner
            .layout
            .names(Kind::Volume)?
            .iter()
            .filter_map(|n| self.volume_info(n).ok())
            .collect())
    }

    /// All snapshots, ready or still copying, sorted by name.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut all: BTreeMap<String, SnapshotInfo> = self
            .inner
            .layout
            .names(Kind::Snapshot)?
            .iter()
            .filter_map(|n| self.snapshot_info(n).ok())
            .map(|s| (s.name.clone(), s))
            .collect();
        let jobs: Vec<Arc<CopyJob>> = self.lock_copies().values().cloned().collect();
        for j in jobs {
            if j.target.kind() == Kind::Snapshot {
                all.entry(j.name.to_string())
                    .or_insert_with(|| copying_snapshot(&j));
            }
        }
        Ok(all.into_values().collect())
    }

    pub fn capacity(&self) -> Result<Capacity, StoreError> {
        let (total_bytes, available_bytes) = sys::statvfs(self.inner.layout.root())
            .map_err(io_err("statvfs on the data directory"))?;
        let provisioned_bytes = self.list_volumes()?.iter().map(|v| v.size_bytes).sum();
        Ok(Capacity {
            total_bytes,
            available_bytes,
            provisioned_bytes,
        })
    }

    /// Creates a volume, or returns the existing one if it has the same size, source and labels
    /// (idempotent retry); anything else under that name is AlreadyExists. `size == 0` with a
    /// source means "the source's size". A volume with a source is a clone: reflinked where
    /// the filesystem can, else copied in the background ([`copy`]) without pausing the
    /// source's writes. While that copy runs the answer carries `copy: Some(progress)`, the
    /// volume cannot be opened or listed, and a retry reports the progress; a snapshot source
    /// that is itself still copying is [`StoreError::NotReady`]. Returns the volume and
    /// whether this call created (or started) it.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        source: Option<ContentSource>,
        labels: BTreeMap<String, String>,
    ) -> Result<(VolumeInfo, bool), StoreError> {
        let name = parse_name(name)?;
        check_labels(&labels)?;
        let source_ref = match &source {
            None => None,
            Some(ContentSource::Snapshot(s)) => Some((Kind::Snapshot, parse_name(s)?)),
            Some(ContentSource::Volume(v)) => Some((Kind::Volume, parse_name(v)?)),
        };
        let requested = if size == 0 && source_ref.is_some() {
            None
        } else {
            Some(round_size(size)?)
        };
        let _busy = self.claim(Kind::Volume, &name)?;

        match self.volume_info(&name) {
            Ok(existing) => {
                let same_size = requested.is_none_or(|r| r == existing.size_bytes);
                return if same_size && existing.source == source && existing.labels == labels {
                    Ok((existing, false))
                } else {
                    Err(StoreError::AlreadyExists {
                        kind: "volume",
                        name: name.to_string(),
                    })
                };
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(job) = self.job(Kind::Volume, &name) {
            let same = matches!(&job.target, Target::Volume { meta, size }
                if meta.source == source && meta.labels == labels
                    && requested.is_none_or(|r| r == *size));
            if !same {
                return Err(StoreError::AlreadyExists {
                    kind: "volume",
                    name: name.to_string(),
                });
            }
            return self.volume_answer(&job, Duration::ZERO).map(|v| (v, false));
        }

        let Some((src_kind, src)) = source_ref else {
            let stage = self.inner.layout.new_stage("create", &name)?;
            let size = requested.unwrap_or(SIZE_ALIGN);
            if let Err(e) = build_empty(&stage, size, labels) {
                Layout::abandon(&stage);
                return Err(e);
            }
            self.inner.layout.commit(&stage, Kind::Volume, &name)?;
            tracing::info!(volume = %name, size, "volume created");
            return Ok((self.volume_info(&name)?, true));
        };
        let target = |src_size: u64| {
            let size = requested.unwrap_or(src_size);
            if size < src_size {
                return Err(StoreError::SmallerThanSource {
                    requested: size,
                    source_size: src_size,
                });
            }
            Ok(Target::Volume {
                meta: VolumeMeta {
                    format: meta::FORMAT,
                    source: source.clone(),
                    created_at_unix: meta::now_unix(),
                    labels: labels.clone(),
                },
                size,
            })
        };
        match self.start_copy(src_kind, &src, &name, "clone", target)? {
            Started::Done => {
                tracing::info!(volume = %name, source = %src, "volume cloned (reflink)");
                Ok((self.volume_info(&name)?, true))
            }
            Started::Copying(job) => self.volume_answer(&job, READY_GRACE).map(|v| (v, true)),
        }
    }

    /// Moves an entry out of sight (into staging), durably, then removes it. The registry
    /// stays locked while moving, which makes the check-then-delete atomic against new
    /// connections.
    fn remove_entry(&self, kind: Kind, name: &VolumeName, force: bool) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        let hidden = self
            .inner
            .registry
            .close(kind, name, force, || layout.hide(kind, name))?;
        match hidden {
            Some(trash) => Layout::discard(&trash),
            None => Ok(()),
        }
    }

    /// Deletes a volume; a missing volume is success. Open connections block it unless
    /// `force`, which closes them. A clone still being copied is cancelled; a snapshot or
    /// clone being copied *from* it goes on (it reads the file it holds open).
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let name = parse_name(name)?;
        let _busy = self.claim(Kind::Volume, &name)?;
        self.cancel_copy(Kind::Volume, &name);
        self.inner.mirrors.delete(name.as_str(), || {
            self.remove_entry(Kind::Volume, &name, force)
        })?;
        tracing::info!(volume = %name, force, "volume deleted");
        Ok(())
    }

    /// Grows a volume (rounded up to 4 KiB). The same or a smaller-rounded-to-same size is a
    /// no-op; shrinking is refused. Connections see the new size when they reconnect.
    pub fn expand_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, StoreError> {
        let name = parse_name(name)?;
        let size = round_size(size)?;
        let _busy = self.claim(Kind::Volume, &name)?;
        let current = self.volume_info(&name)?;
        if size < current.size_bytes {
            return Err(StoreError::Shrink {
                name: name.to_string(),
                current: current.size_bytes,
                requested: size,
            });
        }
        if size > current.size_bytes {
            let path = self.inner.layout.data_path(Kind::Volume, &name);
            let grow_data = || {
                let f = File::options().write(true).open(&path)?;
                f.set_len(size)?;
                f.sync_all()
            };
            self.mirror(&name)?
                .grow(size, || self.pause_writes(&name), grow_data)?;
            tracing::info!(volume = %name, size, "volume expanded");
        }
        self.volume_info(&name)
    }

    /// Takes a read-only point-in-time copy of a volume; idempotent for the same source. The
    /// point in time is this call's (writes acknowledged before it are in, later ones are
    /// not). Reflinked where the filesystem can (ready at once), else copied in the
    /// background: the answer is then `ready: false` with progress until the copy finished,
    /// which a retry (or a get) reports. A copy that failed is reported once by the next
    /// call, then forgotten, so the call after that takes the snapshot anew.
    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
    ) -> Result<(SnapshotInfo, bool), StoreError> {
        let name = parse_name(name)?;
        let source = parse_name(source_volume)?;
        let _busy = self.claim(Kind::Snapshot, &name)?;
        match self.snapshot_info(&name) {
            Ok(existing) if existing.source_volume == source.as_str() => {
                return Ok((existing, false));
            }
            Ok(_) => {
                return Err(StoreError::AlreadyExists {
                    kind: "snapshot",
                    name: name.to_string(),
                });
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(job) = self.job(Kind::Snapshot, &name) {
            if job.target.source() != ContentSource::Volume(source.to_string()) {
                return Err(StoreError::AlreadyExists {
                    kind: "snapshot",
                    name: name.to_string(),
                });
            }
            return self
                .snapshot_answer(&job, Duration::ZERO)
                .map(|s| (s, false));
        }
        self.volume_info(&source)?;
        let target = |_size: u64| {
            let (created_at_unix, created_at_nanos) = meta::now_unix_nanos();
            Ok(Target::Snapshot(SnapshotMeta {
                format: meta::FORMAT,
                source_volume: source.to_string(),
                created_at_unix,
                created_at_nanos,
            }))
        };
        match self.start_copy(Kind::Volume, &source, &name, "snapshot", target)? {
            Started::Done => {
                tracing::info!(snapshot = %name, volume = %source, "snapshot created (reflink)");
                Ok((self.snapshot_info(&name)?, true))
            }
            Started::Copying(job) => self.snapshot_answer(&job, READY_GRACE).map(|s| (s, true)),
        }
    }

    /// Deletes a snapshot; missing is success; refused while NBD clients read it. One still
    /// being copied has its copy cancelled (and its staging removed) first.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), StoreError> {
        let name = parse_name(name)?;
        let _busy = self.claim(Kind::Snapshot, &name)?;
        self.cancel_copy(Kind::Snapshot, &name);
        self.remove_entry(Kind::Snapshot, &name, false)?;
        tracing::info!(snapshot = %name, "snapshot deleted");
        Ok(())
    }

    fn lock_copies(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, String), Arc<CopyJob>>> {
        self.inner.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn job(&self, kind: Kind, name: &VolumeName) -> Option<Arc<CopyJob>> {
        self.lock_copies().get(&(kind, name.to_string())).cloned()
    }

    /// Forgets `job` if it is still the one registered under its name.
    fn forget_job(&self, job: &Arc<CopyJob>) {
        let mut copies = self.lock_copies();
        let key = (job.target.kind(), job.name.to_string());
        if copies.get(&key).is_some_and(|j| Arc::ptr_eq(j, job)) {
            copies.remove(&key);
        }
    }

    /// Cancels a copy in flight under `name` and waits for its thread to have let go.
    fn cancel_copy(&self, kind: Kind, name: &VolumeName) {
        if let Some(job) = self.job(kind, name) {
            job.cancel();
            let state = job.wait(None);
            self.forget_job(&job);
            if state != CopyState::Done {
                Layout::abandon(&job.stage);
            }
            tracing::info!(name = %name, kind = kind.label(), ?state, "background copy cancelled");
        }
    }

    /// The answer for a snapshot whose copy was started: after up to `grace`, ready, still
    /// copying, or its failure (reported once).
    fn snapshot_answer(
        &self,
        job: &Arc<CopyJob>,
        grace: Duration,
    ) -> Result<SnapshotInfo, StoreError> {
        match job.wait(Some(grace)) {
            CopyState::Copying => Ok(copying_snapshot(job)),
            CopyState::Done => self.snapshot_info(&job.name),
            state => Err(self.copy_ended(job, state)),
        }
    }

    fn volume_answer(&self, job: &Arc<CopyJob>, grace: Duration) -> Result<VolumeInfo, StoreError> {
        match job.wait(Some(grace)) {
            CopyState::Copying => Ok(copying_volume(job)),
            CopyState::Done => self.volume_info(&job.name),
            state => Err(self.copy_ended(job, state)),
        }
    }

    fn copy_ended(&self, job: &Arc<CopyJob>, state: CopyState) -> StoreError {
        self.forget_job(job);
        let kind = job.target.kind().label();
        match state {
            CopyState::Failed(reason) => StoreError::CopyFailed {
                kind,
                name: job.name.to_string(),
                reason,
                no_space: job.out_of_space(),
            },
            _ => StoreError::NotFound {
                kind,
                name: job.name.to_string(),
            },
        }
    }

    /// Starts copying `src` (a volume or a ready snapshot) into the new entry `name`:
    /// `target(source_size)` says what it becomes. Reflinks if the filesystem can and commits
    /// at once ([`Started::Done`]); otherwise starts a background copy, with a
    /// copy-before-write hook on a volume source attached while its writes are paused.
    fn start_copy(
        &self,
        src_kind: Kind,
        src: &VolumeName,
        name: &VolumeName,
        what: &str,
        target: impl FnOnce(u64) -> Result<Target, StoreError>,
    ) -> Result<Started, StoreError> {
        if src_kind == Kind::Snapshot
            && let Err(StoreError::NotFound { .. }) = self.snapshot_info(src)
            && let Some(job) = self.job(Kind::Snapshot, src)
        {
            let p = job.progress();
            return Err(StoreError::NotReady {
                kind: "snapshot",
                name: src.to_string(),
                done: p.copied_bytes,
                total: p.total_bytes,
            });
        }
        let stage = self.inner.layout.new_stage(what, name)?;
        let r = self.start_copy_in(&stage, src_kind, src, name, target);
        if r.is_err() {
            Layout::abandon(&stage);
        }
        r
    }

    fn start_copy_in(
        &self,
        stage: &Path,
        src_kind: Kind,
        src: &VolumeName,
        name: &VolumeName,
        target: impl FnOnce(u64) -> Result<Target, StoreError>,
    ) -> Result<Started, StoreError> {
        let dst = Layout::new_data_file(stage).map_err(io_err("creating data file"))?;
        let rate = self.inner.copy_rate.load(Ordering::Relaxed);
        if src_kind == Kind::Snapshot {
            // Snapshots never change: no hook, no pause.
            self.snapshot_info(src)?;
            let path = self.inner.layout.data_path(Kind::Snapshot, src);
            let file = File::open(&path).map_err(io_err(format!("opening snapshot {src}")))?;
            let size = file.metadata().map_err(io_err("stat source"))?.len();
            let target = target(size)?;
            if self.inner.reflink && sys::reflink(&file, &dst).is_ok() {
                self.commit_now(stage, &dst, &target, name)?;
                return Ok(Started::Done);
            }
            dst.set_len(size).map_err(io_err("sizing data file"))?;
            let job = Arc::new(CopyJob::new(
                name.clone(),
                target,
                stage.to_owned(),
                file,
                dst,
                size,
                rate,
            ));
            self.spawn_copy(&job, None)?;
            return Ok(Started::Copying(job));
        }

        // Holding a lease keeps every connection (including ones opened meanwhile) on the
        // backend the hook is attached to.
        let lease = self
            .inner
            .registry
            .lease_internal(Kind::Volume, src, || self.open_backend(Kind::Volume, src))
            .map_err(|e| open_error(Kind::Volume, src, e))?;
        let backend = lease.backend().clone();
        // A reflink first writes back the source's dirty pages: most of that now, before the
        // pause rather than inside it.
        // A reflink first writes back the source's dirty pages: most of that now, before the
        // pause rather than inside it. (A copy needs no writeback.)
        // Repeated while writes keep dirtying it: each round has less left to write back.
        let t = std::time::Instant::now();
        if self.inner.reflink {
            for _ in 0..4 {
                let round = std::time::Instant::now();
                if let Err(e) = sys::fdatasync(backend.inner_file()) {
                    tracing::debug!(source = %src, error = %e, "fdatasync before snapshot failed");
                    break;
                }
                if round.elapsed() < Duration::from_millis(20) {
                    break;
                }
            }
        }
        let synced = t.elapsed();
        let file = backend
            .inner_file()
            .try_clone()
            .map_err(io_err(format!("opening {src}")))?;
        let t = std::time::Instant::now();
        let frozen = backend.freeze();
        let drained = t.elapsed();
        let size = file.metadata().map_err(io_err("stat source"))?.len();
        let target = target(size)?;
        let paused = |how: &str| {
            tracing::info!(
                source = %src,
                name = %name,
                how,
                sync_ms = synced.as_secs_f64() * 1e3,
                drain_ms = drained.as_secs_f64() * 1e3,
                paused_ms = t.elapsed().saturating_sub(drained).as_secs_f64() * 1e3,
                "point in time taken"
            )
        };
        let reflinked = match self.inner.reflink {
            true => sys::reflink(&file, &dst),
            false => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        };
        match reflinked {
            Ok(()) => {
                drop(frozen);
                paused("reflink");
                self.commit_now(stage, &dst, &target, name)?;
                Ok(Started::Done)
            }
            Err(e) => {
                tracing::debug!(source = %src, error = %e, "no reflink: copy-before-write");
                dst.set_len(size).map_err(io_err("sizing data file"))?;
                let job = Arc::new(CopyJob::new(
                    name.clone(),
                    target,
                    stage.to_owned(),
                    file,
                    dst,
                    size,
                    rate,
                ));
                let hook: Arc<dyn PreWrite> = job.clone();
                backend.attach_pre_write(&frozen, hook.clone());
                drop(frozen);
                paused("copy-before-write");
                if let Err(e) = self.spawn_copy(&job, Some((backend.clone(), lease))) {
                    backend.detach_pre_write(&hook);
                    return Err(e);
                }
                Ok(Started::Copying(job))
            }
        }
    }

    fn commit_now(
        &self,
        stage: &Path,
        dst: &File,
        target: &Target,
        name: &VolumeName,
    ) -> Result<(), StoreError> {
        finalize(stage, dst, target)?;
        self.inner.layout.commit(stage, target.kind(), name)
    }

    /// Registers `job` and runs its background copy on a thread of its own.
    fn spawn_copy(
        &self,
        job: &Arc<CopyJob>,
        source: Option<(Arc<FileBackend>, Lease)>,
    ) -> Result<(), StoreError> {
        self.lock_copies()
            .insert((job.target.kind(), job.name.to_string()), job.clone());
        let store = self.clone();
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("copy-{}", job.name))
            .spawn(move || store.run_copy(j, source));
        if let Err(e) = spawned {
            self.forget_job(job);
            return Err(io_err("starting the copy thread")(e));
        }
        tracing::info!(name = %job.name, kind = job.target.kind().label(), bytes = job.size(), "background copy started");
        Ok(())
    }

    fn run_copy(&self, job: Arc<CopyJob>, source: Option<(Arc<FileBackend>, Lease)>) {
        let started = std::time::Instant::now();
        job.copy_all();
        // Every region is copied (or the job is over): the source's writes need no hook.
        if let Some((backend, lease)) = source {
            let hook: Arc<dyn PreWrite> = job.clone();
            backend.detach_pre_write(&hook);
            drop(lease);
        }
        if !job.is_cancelled()
            && job.error().is_none()
            && let Err(e) = finalize(&job.stage, &job.dst, &job.target)
        {
            match &e {
                StoreError::Io { context, source } => job.fail_io(context.clone(), source),
                other => job.fail_io("finishing".into(), &io::Error::other(other.to_string())),
            }
        }
        let layout = &self.inner.layout;
        let state = job.end(|| {
            layout
                .commit(&job.stage, job.target.kind(), &job.name)
                .map_err(|e| e.to_string())
        });
        match &state {
            CopyState::Done => self.forget_job(&job),
            CopyState::Cancelled => {
                self.forget_job(&job);
                Layout::abandon(&job.stage);
            }
            // Kept registered, so the next create reports it.
            _ => Layout::abandon(&job.stage),
        }
        tracing::info!(
            name = %job.name,
            kind = job.target.kind().label(),
            ?state,
            data_bytes = job.data_bytes(),
            secs = started.elapsed().as_secs_f64(),
            "background copy ended"
        );
    }

    /// Registers one more user of a volume or snapshot, opening its file if nobody has it open.
    fn lease_entry(&self, kind: Kind, name: &VolumeName) -> Result<Lease, OpenError> {
        self.inner
            .registry
            .lease(kind, name, || self.open_backend(kind, name))
    }

    /// Opens an entry's data file as the backend its connections will share, behind the
    /// volume's write intent if it is a mirror member.
    fn open_backend(&self, kind: Kind, name: &VolumeName) -> Result<FileBackend, OpenError> {
        let path = self.inner.layout.data_path(kind, name);
        let read_only = kind == Kind::Snapshot;
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    OpenError::NotFound(name.to_string())
                } else {
                    OpenError::Io {
                        name: name.to_string(),
                        source: e,
                    }
                }
            })?;
        if let Err(e) = sys::advise_random(&file) {
            tracing::debug!(error = %e, volume = %name, "posix_fadvise(RANDOM) refused");
        }
        let intent = match kind {
            Kind::Volume => self.inner.mirrors.get(name.as_str()),
            Kind::Snapshot => None,
        };
        match intent.map(|m| m.intent()) {
            None => Ok(FileBackend::new(file, read_only)),
            Some(Ok(intent)) => Ok(FileBackend::with_intent(file, read_only, intent)),
            Some(Err(e)) => Err(OpenError::Io {
                name: name.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            }),
        }
    }

    fn open_entry(&self, kind: Kind, name: &VolumeName) -> Result<Export, OpenError> {
        let lease = self.lease_entry(kind, name)?;
        let backend = lease.backend().clone();
        let size = backend
            .inner_file()
            .metadata()
            .map_err(|e| OpenError::Io {
                name: name.to_string(),
                source: e,
            })?
            .len();
        let export_name = match kind {
            Kind::Volume => name.to_string(),
            Kind::Snapshot => format!("{SNAPSHOT_EXPORT_PREFIX}{name}"),
        };
        Ok(Export {
            name: export_name,
            size,
            read_only: kind == Kind::Snapshot,
            backend: backend as Arc<dyn Backend>,
            closed: lease.closed(),
            lease: Some(Box::new(lease)),
        })
    }
}

/// What [`VolumeStore::start_copy`] did.
enum Started {
    /// Reflinked and committed.
    Done,
    /// Copying in the background.
    Copying(Arc<CopyJob>),
}

fn open_error(kind: Kind, name: &VolumeName, e: OpenError) -> StoreError {
    match e {
        OpenError::NotFound(_) => StoreError::NotFound {
            kind: kind.label(),
            name: name.to_string(),
        },
        OpenError::Unavailable(n) => StoreError::Busy(n),
        OpenError::Io { name, source } => StoreError::Io {
            context: format!("opening {name}"),
            source,
        },
    }
}

/// Builds an empty volume of `size` bytes in `stage`.
fn build_empty(
    stage: &Path,
    size: u64,
    labels: BTreeMap<String, String>,
) -> Result<(), StoreError> {
    let data = Layout::new_data_file(stage).map_err(io_err("creating data file"))?;
    data.set_len(size).map_err(io_err("sizing data file"))?;
    data.sync_all().map_err(io_err("syncing data file"))?;
    let m = VolumeMeta {
        format: meta::FORMAT,
        source: None,
        created_at_unix: meta::now_unix(),
        labels,
    };
    Layout::seal_stage(stage, &m, "volume")
}

/// Makes a copied entry durable in its stage: a clone gets its size, the data is fsynced,
/// the metadata written. After this only the commit is left.
fn finalize(stage: &Path, dst: &File, target: &Target) -> Result<(), StoreError> {
    if let Target::Volume { size, .. } = target {
        dst.set_len(*size).map_err(io_err("sizing data file"))?;
    }
    dst.sync_all().map_err(io_err("syncing data file"))?;
    match target {
        Target::Snapshot(m) => Layout::seal_stage(stage, m, "snapshot"),
        Target::Volume { meta, .. } => Layout::seal_stage(stage, meta, "volume"),
    }
}

fn copying_snapshot(job: &CopyJob) -> SnapshotInfo {
    let (source_volume, created_at_unix, created_at_nanos) = match &job.target {
        Target::Snapshot(m) => (
            m.source_volume.clone(),
            m.created_at_unix,
            m.created_at_nanos,
        ),
        Target::Volume { meta, .. } => (String::new(), meta.created_at_unix, 0),
    };
    SnapshotInfo {
        name: job.name.to_string(),
        source_volume,
        size_bytes: job.size(),
        created_at_unix,
        created_at_nanos,
        export_name: format!("{SNAPSHOT_EXPORT_PREFIX}{}", job.name),
        ready: false,
        copy: Some(job.progress()),
    }
}

fn copying_volume(job: &CopyJob) -> VolumeInfo {
    let (source, created_at_unix, labels, size_bytes) = match &job.target {
        Target::Volume { meta, size } => (
            meta.source.clone(),
            meta.created_at_unix,
            meta.labels.clone(),
            *size,
        ),
        Target::Snapshot(m) => (None, m.created_at_unix, BTreeMap::new(), job.size()),
    };
    VolumeInfo {
        name: job.name.to_string(),
        size_bytes,
        source,
        created_at_unix,
        export_name: job.name.to_string(),
        open_connections: 0,
        allocated_bytes: 0,
        labels,
        copy: Some(job.progress()),
    }
}

/// A volume's writes paused: every connection held on one backend, its write gate frozen.
/// Fields drop in order: writes resume, then the lease goes.
pub struct Paused {
    _frozen: FrozenBackend,
    _lease: Lease,
}

/// Mirror membership and dirty-region bitmaps (see [`membership`]).
impl VolumeStore {
    fn mirror(&self, name: &VolumeName) -> Result<Arc<Mirror>, StoreError> {
        self.inner
            .mirrors
            .get(name.as_str())
            .ok_or_else(|| StoreError::NotFound {
                kind: "volume",
                name: name.to_string(),
            })
    }

    fn pause_writes(&self, name: &VolumeName) -> Result<Paused, ReplicaError> {
        let lease = self.lease_entry(Kind::Volume, name).map_err(|e| match e {
            OpenError::NotFound(n) => ReplicaError::NotFound(n),
            other => ReplicaError::Io {
                context: format!("pausing writes to {name}"),
                source: io::Error::other(other.to_string()),
            },
        })?;
        Ok(Paused {
            _frozen: lease.backend().freeze_owned(),
            _lease: lease,
        })
    }

    /// The volume's record (generation 0 if it has none) and dirty regions per member.
    pub fn get_membership(
        &self,
        name: &str,
    ) -> Result<(Membership, BTreeMap<String, u64>), StoreError> {
        Ok(self.mirror(&parse_name(name)?)?.get()?)
    }

    /// Replaces the volume's record (see the contract in [`membership`]).
    pub fn set_membership(&self, name: &str, req: SetRequest) -> Result<Membership, StoreError> {
        let name = parse_name(name)?;
        let mirror = self.mirror(&name)?;
        Ok(mirror.set(self.inner.mirrors.self_id(), req, || {
            self.pause_writes(&name)
        })?)
    }

    /// `(region_bytes, region_count, bitmap)` of one member's dirty regions.
    pub fn dirty_regions(
        &self,
        name: &str,
        replica: &str,
    ) -> Result<(u32, u64, Vec<u8>), StoreError> {
        Ok(self.mirror(&parse_name(name)?)?.dirty_regions(replica)?)
    }

    /// Clears regions of a RESYNCING member's bitmap; returns how many stay set.
    pub fn clear_dirty_regions(
        &self,
        name: &str,
        replica: &str,
        regions: &[u64],
    ) -> Result<u64, StoreError> {
        Ok(self.mirror(&parse_name(name)?)?.clear(replica, regions)?)
    }

    /// Dirty regions over every volume and member (the metrics gauge).
    pub fn dirty_regions_total(&self) -> u64 {
        self.inner.mirrors.dirty_total()
    }
}

impl ExportProvider for VolumeStore {
    fn list(&self) -> Vec<ExportEntry> {
        let mut out = Vec::new();
        for v in self.list_volumes().unwrap_or_default() {
            out.push(ExportEntry {
                name: v.export_name,
                description: format!("volume {}", v.name),
            });
        }
        for s in self.list_snapshots().unwrap_or_default() {
            if !s.ready {
                continue;
            }
            out.push(ExportEntry {
                name: s.export_name,
                description: format!("snapshot {} of {} (read-only)", s.name, s.source_volume),
            });
        }
        out
    }

    fn open(&self, export: &str) -> Result<Export, OpenError> {
        let export = if export.is_empty() {
            self.inner
                .default_export
                .clone()
                .ok_or_else(|| OpenError::NotFound(String::new()))?
        } else {
            export.to_owned()
        };
        let (kind, name) = match export.strip_prefix(SNAPSHOT_EXPORT_PREFIX) {
            Some(s) => (Kind::Snapshot, s),
            None => (Kind::Volume, export.as_str()),
        };
        let name = VolumeName::parse(name).map_err(|_| OpenError::NotFound(export.clone()))?;
        self.open_entry(kind, &name)
    }

    fn default_export(&self) -> Option<String> {
        self.inner.default_export.clone()
    }
}

#[cfg(test)]
mod tests;
