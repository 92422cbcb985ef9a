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

pub mod bitmap;
mod layout;
pub mod membership;
pub mod meta;
pub mod name;
mod registry;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use enbd_proto::ids::ServerId;

use crate::export::file::FrozenBackend;
use crate::export::{Backend, Export, ExportEntry, ExportProvider, FileBackend, OpenError};
use crate::sys;
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub source_volume: String,
    pub size_bytes: u64,
    pub created_at_unix: i64,
    pub export_name: String,
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
}

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
        let store = Self {
            inner: Arc::new(Inner {
                layout,
                registry: Arc::default(),
                default_export,
                mirrors: Mirrors::new(volumes, server_id),
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
            export_name: format!("{SNAPSHOT_EXPORT_PREFIX}{name}"),
        })
    }

    pub fn get_volume(&self, name: &str) -> Result<VolumeInfo, StoreError> {
        self.volume_info(&parse_name(name)?)
    }

    pub fn get_snapshot(&self, name: &str) -> Result<SnapshotInfo, StoreError> {
        self.snapshot_info(&parse_name(name)?)
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

    /// All snapshots, sorted by name.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        Ok(self
            .inner
            .layout
            .names(Kind::Snapshot)?
            .iter()
            .filter_map(|n| self.snapshot_info(n).ok())
            .collect())
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
    /// source means "the source's size". Returns the volume and whether this call created it.
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

        let stage = self.inner.layout.new_stage("create", &name)?;
        let result = self.build_volume(
            &stage,
            &name,
            requested,
            source_ref.as_ref(),
            source.clone(),
            labels,
        );
        if let Err(e) = result {
            Layout::abandon(&stage);
            return Err(e);
        }
        self.inner.layout.commit(&stage, Kind::Volume, &name)?;
        tracing::info!(volume = %name, "volume created");
        Ok((self.volume_info(&name)?, true))
    }

    fn build_volume(
        &self,
        stage: &Path,
        name: &VolumeName,
        requested: Option<u64>,
        source_ref: Option<&(Kind, VolumeName)>,
        source: Option<ContentSource>,
        labels: BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let data = Layout::new_data_file(stage).map_err(io_err("creating data file"))?;
        let size = match source_ref {
            None => {
                let size = requested.unwrap_or(SIZE_ALIGN);
                data.set_len(size).map_err(io_err("sizing data file"))?;
                size
            }
            Some((kind, src)) => {
                let copied = self.copy_entry(*kind, src, &data)?;
                let size = requested.unwrap_or(copied);
                if size < copied {
                    return Err(StoreError::SmallerThanSource {
                        requested: size,
                        source_size: copied,
                    });
                }
                data.set_len(size).map_err(io_err("sizing data file"))?;
                size
            }
        };
        data.sync_all().map_err(io_err("syncing data file"))?;
        let m = VolumeMeta {
            format: meta::FORMAT,
            source,
            created_at_unix: meta::now_unix(),
            labels,
        };
        Layout::seal_stage(stage, &m, "volume")?;
        tracing::debug!(volume = %name, size, "volume built in staging");
        Ok(())
    }

    /// Copies a volume or snapshot's content into `dst` (reflink if the filesystem can,
    /// else a sparse copy). A volume open over NBD has its writes paused for the copy, so the
    /// copy is a point in time with respect to acknowledged writes. Returns the source size.
    fn copy_entry(&self, kind: Kind, src: &VolumeName, dst: &File) -> Result<u64, StoreError> {
        // Holding a lease keeps every connection (including ones opened meanwhile) on the
        // backend we freeze.
        let lease = self.lease_entry(kind, src).map_err(|e| match e {
            OpenError::NotFound(_) => StoreError::NotFound {
                kind: kind.label(),
                name: src.to_string(),
            },
            OpenError::Unavailable(n) => StoreError::Busy(n),
            OpenError::Io { name, source } => StoreError::Io {
                context: format!("opening {name}"),
                source,
            },
        })?;
        let _frozen = lease.backend().freeze();
        let src_file = lease.backend().inner_file();
        let size = src_file.metadata().map_err(io_err("stat source"))?.len();
        match sys::reflink(src_file, dst) {
            Ok(()) => tracing::debug!(source = %src, "reflinked"),
            Err(e) => {
                tracing::debug!(source = %src, error = %e, "reflink unavailable, sparse copy");
                sys::copy_sparse(src_file, dst, size).map_err(io_err(format!("copying {src}")))?;
            }
        }
        Ok(size)
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
    /// `force`, which closes them.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let name = parse_name(name)?;
        let _busy = self.claim(Kind::Volume, &name)?;
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

    /// Takes a read-only point-in-time copy of a volume; idempotent for the same source.
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
        self.volume_info(&source)?;
        let stage = self.inner.layout.new_stage("snapshot", &name)?;
        let built = (|| {
            let data = Layout::new_data_file(&stage).map_err(io_err("creating snapshot file"))?;
            self.copy_entry(Kind::Volume, &source, &data)?;
            data.sync_all().map_err(io_err("syncing snapshot file"))?;
            let m = SnapshotMeta {
                format: meta::FORMAT,
                source_volume: source.to_string(),
                created_at_unix: meta::now_unix(),
            };
            Layout::seal_stage(&stage, &m, "snapshot")
        })();
        if let Err(e) = built {
            Layout::abandon(&stage);
            return Err(e);
        }
        self.inner.layout.commit(&stage, Kind::Snapshot, &name)?;
        tracing::info!(snapshot = %name, volume = %source, "snapshot created");
        Ok((self.snapshot_info(&name)?, true))
    }

    /// Deletes a snapshot; missing is success; refused while NBD clients read it.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), StoreError> {
        let name = parse_name(name)?;
        let _busy = self.claim(Kind::Snapshot, &name)?;
        self.remove_entry(Kind::Snapshot, &name, false)?;
        tracing::info!(snapshot = %name, "snapshot deleted");
        Ok(())
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

    /// Applies an UpdateActivity call; returns how many regions stay active.
    pub fn update_activity(
        &self,
        name: &str,
        region_bytes: u32,
        mark: &[u64],
        clear: &[u64],
    ) -> Result<u64, StoreError> {
        Ok(self
            .mirror(&parse_name(name)?)?
            .update_activity(region_bytes, mark, clear)?)
    }

    /// `(region_bytes, region_count, bitmap)` of the volume's activity log.
    pub fn activity(&self, name: &str) -> Result<(u32, u64, Vec<u8>), StoreError> {
        Ok(self.mirror(&parse_name(name)?)?.activity()?)
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
