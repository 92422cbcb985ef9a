//! The attachment manager: volumes attached on this node, each an engine [`Client`] (or a
//! [`Mirror`](crate::engine::mirror::Mirror) over replicas, see [`crate::backing`]) serving
//! one ublk [`Device`]. Used by the control socket (CLI) and the CSI node service. Taking
//! over the devices a previous daemon left behind is in [`takeover`].
//!
//! Invariants:
//! - the state file lists every device this daemon serves, so a restarted daemon can take each
//!   one over ([`AttachmentManager::restore`]); it is saved after a device is up and after it
//!   is gone;
//! - attach and detach are serialised (one at a time, per node), and `attach` is idempotent
//!   per volume id;
//! - a device that is mounted or open exclusively is never detached, except one still being
//!   taken over: detaching that cancels the takeover and removes the device, so the IO the
//!   kernel holds fails with EIO (the operator gave up on its server);
//! - no lock is held across an `.await`, and device calls (which block) run on blocking
//!   threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::runtime::Handle;

use crate::backing::{Backing, BackingStatus, EngineTarget, MAX_REPLICAS};
use crate::device::{self, Device, DeviceError, DeviceGeometry, DeviceOptions, Start};
use crate::engine::access::AccessCredential;
use crate::engine::mirror::MirrorError;
use crate::engine::status::MirrorStatus;
use crate::engine::tls::ClientTls;
use crate::engine::{
    BrownoutPolicy, ClientConfig, EngineError, EngineStatus, Geometry, MAX_REQUEST_BYTES,
};
use crate::metrics::{VolumeIo, VolumeView};
use crate::state::{AttachmentRecord, ReplicaRecord, StateError, StateStore};
pub use enbd_proto::params::TlsPolicy;

mod attacher;
mod takeover;

use takeover::Takeover;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub volume_id: String,
    pub servers: Vec<String>,
    pub export: String,
    pub channels: u16,
    pub queues: u16,
    pub queue_depth: u16,
    pub brownout: BrownoutPolicy,
    pub read_only: bool,
    /// Two or more for a mirrored volume (`servers` then lists their data addresses);
    /// empty for a single copy.
    pub replicas: Vec<ReplicaRecord>,
    /// Mirrored volumes: how long a replica may take before it is dropped.
    pub replica_timeout: Duration,
    /// TLS for this volume; `None`: the manager's default.
    pub tls: Option<TlsPolicy>,
    /// Mirrored volumes: resync copy limit in bytes per second (`None`: unlimited).
    pub resync_bytes_per_sec: Option<u64>,
    /// The access token from `publish_context`, presented to every server.
    pub access_token: Option<crate::secret::Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub volume_id: String,
    pub dev_id: u32,
    pub dev_path: PathBuf,
    pub size_bytes: u64,
}

/// Where a volume is in its life on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The device serves IO.
    Attached,
    /// A restarted daemon is taking the device over; its IO waits in the kernel meanwhile.
    Recovering,
    /// Taking over or stopping failed; the reason is kept for `list`.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct AttachmentStatus {
    pub volume_id: String,
    pub dev_id: u32,
    pub dev_path: PathBuf,
    pub size_bytes: u64,
    pub servers: Vec<String>,
    pub export: String,
    pub read_only: bool,
    pub brownout: String,
    pub phase: Phase,
    /// None until the engine is connected (a volume being taken over), and for mirrors.
    pub engine: Option<EngineStatus>,
    /// Configured replicas of a mirrored volume (empty: single copy).
    pub replicas: Vec<ReplicaRecord>,
    /// A mirrored volume's state, once its mirror is open.
    pub mirror: Option<MirrorStatus>,
}

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("invalid attach request: {0}")]
    Invalid(String),
    #[error("volume {0} is not attached on this node")]
    NotAttached(String),
    #[error("volume {volume_id} is already attached as {dev_path} with other settings ({what})")]
    Conflict {
        volume_id: String,
        dev_path: PathBuf,
        what: String,
    },
    #[error("device {dev_path} of volume {volume_id} is in use ({users}): unmount it first")]
    Busy {
        volume_id: String,
        dev_path: PathBuf,
        users: String,
    },
    #[error("volume {0} is being taken over by this daemon; retry in a moment")]
    InProgress(String),
    #[error("this node already has {0} volumes attached (--max-volumes)")]
    LimitReached(usize),
    #[error("export {0} is read-only on its server: attach it read-only")]
    ReadOnlyExport(String),
    #[error("connecting to the volume: {0}")]
    Engine(#[from] EngineError),
    #[error("opening the mirrored volume: {0}")]
    Mirror(#[from] MirrorError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("saving attachment state: {0}")]
    State(#[from] StateError),
    #[error("taking over volume {0} was cancelled (it is being detached)")]
    Cancelled(String),
    #[error("online resize: {0}")]
    ResizeUnsupported(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub struct ManagerConfig {
    pub state_dir: PathBuf,
    /// 0 = no limit.
    pub max_volumes: usize,
    /// Journal budget per volume (bytes of payload held until acknowledged).
    pub journal_bytes: usize,
    /// TLS for volumes whose request does not say.
    pub tls_default: TlsPolicy,
    /// The node's trust root and client certificate (`--tls-ca`, ...), if configured.
    pub tls: Option<Arc<ClientTls>>,
    /// Access tokens may be sent without TLS (`--access-token-plaintext`, a lab only).
    pub access_plaintext: bool,
}

struct Volume {
    record: AttachmentRecord,
    phase: Phase,
    client: Option<Backing>,
    device: Option<Device>,
    /// The running takeover of a restored volume, so that a detach can cancel it.
    takeover: Option<Takeover>,
}

impl Volume {
    fn new(record: AttachmentRecord, phase: Phase) -> Self {
        Volume {
            record,
            phase,
            client: None,
            device: None,
            takeover: None,
        }
    }
}

/// Cheap to clone; every clone manages the same volumes.
#[derive(Clone)]
pub struct AttachmentManager {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Handle,
    store: StateStore,
    max_volumes: usize,
    journal_bytes: usize,
    tls_default: TlsPolicy,
    tls: Option<Arc<ClientTls>>,
    access_plaintext: bool,
    /// The node's management TLS files (mirrored volumes with `https://` replicas); set once
    /// at start-up by [`AttachmentManager::set_mgmt_tls`].
    mgmt_tls: std::sync::OnceLock<crate::mgmt_tls::MgmtTlsFiles>,
    /// Serialises attach/detach/resize: each is seconds of work that must not interleave.
    ops: tokio::sync::Mutex<()>,
    volumes: Mutex<HashMap<String, Volume>>,
    /// Device-side IO counters per volume (metrics), kept apart from `volumes` so the device
    /// target holds its own handle and never touches this table on the IO path.
    io: Mutex<HashMap<String, Arc<VolumeIo>>>,
}

/// The device's shape from what the server reported in its handshake.
pub fn device_geometry(g: &Geometry, read_only: bool) -> DeviceGeometry {
    DeviceGeometry {
        size_bytes: g.size,
        logical_block: g.min_block,
        physical_block: g.pref_block,
        max_io_bytes: g.max_block,
        // The engine refuses any longer request (EINVAL): the block layer must split.
        max_discard_bytes: u32::try_from(MAX_REQUEST_BYTES).unwrap_or(u32::MAX),
        read_only: read_only || g.read_only,
        flush: g.can_flush,
        fua: g.can_fua,
        discard: g.can_trim,
        write_zeroes: true, // the engine emulates it with a write when the server lacks it
    }
}

pub(crate) fn client_config(
    r: &AttachmentRecord,
    brownout: BrownoutPolicy,
    journal_bytes: usize,
    tls: Option<&Arc<ClientTls>>,
) -> Result<ClientConfig, AttachError> {
    let first = r.servers.first().ok_or_else(|| {
        AttachError::Invalid(format!("volume {} has no server address", r.volume_id))
    })?;
    let mut cfg = ClientConfig::new(first.clone(), r.export.clone());
    cfg.servers = r.servers.clone();
    cfg.channels = r.channels;
    cfg.brownout = brownout;
    cfg.journal_bytes = journal_bytes;
    cfg.queue_depth = cfg.queue_depth.max(r.queue_depth);
    if r.tls {
        let tls = tls.ok_or_else(|| {
            AttachError::Invalid(format!(
                "volume {} requires TLS but this node has no --tls-ca",
                r.volume_id
            ))
        })?;
        cfg.tls = Some(tls.clone());
    }
    if let Some(token) = &r.access_token {
        let access = AccessCredential::new(token.expose(), r.access_plaintext)
            .map_err(|e| AttachError::Invalid(format!("volume {}: {e}", r.volume_id)))?;
        cfg.access = Some(Arc::new(access));
    }
    Ok(cfg)
}

impl Attachment {
    fn from_record(r: &AttachmentRecord) -> Self {
        Attachment {
            volume_id: r.volume_id.clone(),
            dev_id: r.dev_id,
            dev_path: device::bdev_path(r.dev_id),
            size_bytes: r.size_bytes,
        }
    }
}

impl AttachmentManager {
    /// Opens (and locks) the state directory. Call [`restore`](Self::restore) next.
    pub fn new(cfg: ManagerConfig, rt: Handle) -> Result<Self, AttachError> {
        let store = StateStore::open(&cfg.state_dir)?;
        Ok(AttachmentManager {
            inner: Arc::new(Inner {
                rt,
                store,
                max_volumes: cfg.max_volumes,
                journal_bytes: cfg.journal_bytes,
                tls_default: cfg.tls_default,
                tls: cfg.tls,
                access_plaintext: cfg.access_plaintext,
                mgmt_tls: std::sync::OnceLock::new(),
                ops: tokio::sync::Mutex::new(()),
                volumes: Mutex::new(HashMap::new()),
                io: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Sets the management TLS files mirrored volumes use (start-up only: a second call is
    /// ignored and reported as false).
    pub fn set_mgmt_tls(&self, files: crate::mgmt_tls::MgmtTlsFiles) -> bool {
        self.inner.mgmt_tls.set(files).is_ok()
    }

    /// Whether this kernel can host devices at all.
    pub fn ready(&self) -> Result<(), String> {
        device::features().map(|_| ()).map_err(|e| e.to_string())
    }

    /// The volume table (poisoning recovered, see [`crate::sync`]).
    /// The volume's device-side IO counters, created on first use (attach or takeover).
    pub(crate) fn io_metrics(&self, volume_id: &str) -> Arc<VolumeIo> {
        let mut io = crate::sync::lock(&self.inner.io, "volume IO metrics");
        Arc::clone(io.entry(volume_id.to_owned()).or_default())
    }

    /// Every volume as the metrics endpoint shows it.
    pub fn metrics_views(&self) -> Vec<VolumeView> {
        let list = self.list();
        let io = crate::sync::lock(&self.inner.io, "volume IO metrics");
        list.iter()
            .map(|s| VolumeView::from_status(s, io.get(&s.volume_id).cloned()))
            .collect()
    }

    fn lock_volumes(&self) -> MutexGuard<'_, HashMap<String, Volume>> {
        crate::sync::lock(&self.inner.volumes, "attachment volume table")
    }

    fn records(&self) -> Vec<AttachmentRecord> {
        self.lock_volumes()
            .values()
            .map(|v| v.record.clone())
            .collect()
    }

    /// Attaches a volume and returns its device; a second call for the same volume returns
    /// the existing device.
    pub async fn attach(&self, req: AttachRequest) -> Result<Attachment, AttachError> {
        validate(&req)?;
        let _g = self.inner.ops.lock().await;
        {
            let vols = self.lock_volumes();
            if let Some(v) = vols.get(&req.volume_id) {
                let r = &v.record;
                // A mirror follows its membership records, which a replacement changes after
                // the caller's list was written: its replica set is not the caller's to judge.
                let mirrored = !r.replicas.is_empty() && !req.replicas.is_empty();
                if r.export != req.export
                    || (!mirrored && (r.servers != req.servers || r.replicas != req.replicas))
                    || r.read_only != req.read_only
                {
                    return Err(AttachError::Conflict {
                        volume_id: req.volume_id.clone(),
                        dev_path: device::bdev_path(r.dev_id),
                        what: format!("export {} on {}", r.export, r.servers.join(",")),
                    });
                }
                return Ok(Attachment::from_record(r));
            }
            if self.inner.max_volumes > 0 && vols.len() >= self.inner.max_volumes {
                return Err(AttachError::LimitReached(vols.len()));
            }
        }
        let mut record = AttachmentRecord {
            volume_id: req.volume_id.clone(),
            dev_id: 0,
            servers: req.servers.clone(),
            export: req.export.clone(),
            channels: req.channels,
            queues: req.queues,
            queue_depth: req.queue_depth,
            brownout: req.brownout.to_string(),
            read_only: req.read_only,
            size_bytes: 0,
            replicas: req.replicas.clone(),
            replica_timeout_ms: u64::try_from(req.replica_timeout.as_millis()).unwrap_or(u64::MAX),
            tls: req.tls.unwrap_or(self.inner.tls_default) == TlsPolicy::Require,
            resync_bytes_per_sec: req.resync_bytes_per_sec.unwrap_or(0),
            access_token: req.access_token.clone(),
            access_plaintext: self.inner.access_plaintext,
        };
        let client = Backing::connect(
            &record,
            req.brownout,
            self.inner.journal_bytes,
            self.inner.tls.as_ref(),
            self.inner.mgmt_tls.get(),
        )
        .await?;
        client.follow_into(&mut record);
        let g = client.geometry();
        if g.read_only && !req.read_only {
            client.shutdown().await;
            return Err(AttachError::ReadOnlyExport(req.export));
        }
        let opts = DeviceOptions {
            queues: req.queues,
            queue_depth: req.queue_depth,
            geometry: device_geometry(&g, req.read_only),
        };
        let target = Arc::new(EngineTarget::new(
            client.clone(),
            self.io_metrics(&req.volume_id),
        ));
        let rt = self.inner.rt.clone();
        let device =
            match blocking(move || Device::start(&opts, Start::New { dev_id: None }, target, rt))
                .await?
            {
                Ok(d) => d,
                Err(e) => {
                    client.shutdown().await;
                    return Err(e.into());
                }
            };
        record.dev_id = device.dev_id();
        record.size_bytes = g.size;
        if !device.recoverable() {
            tracing::warn!(volume_id = %req.volume_id,
                "kernel lacks ublk user recovery: a daemon restart will fail this device's IO");
        }
        let attachment = Attachment::from_record(&record);
        let records = {
            let mut vols = self.lock_volumes();
            let mut v = Volume::new(record, Phase::Attached);
            v.client = Some(client);
            v.device = Some(device);
            vols.insert(req.volume_id.clone(), v);
            vols.values().map(|v| v.record.clone()).collect::<Vec<_>>()
        };
        if let Err(e) = self.inner.store.save(&records) {
            // A device the state file does not list would be orphaned by a restart: undo.
            tracing::error!(volume_id = %req.volume_id, error = %e, "state not saved; detaching again");
            let _ = self.remove(&req.volume_id).await;
            return Err(e.into());
        }
        tracing::info!(volume_id = %req.volume_id, dev = %attachment.dev_path.display(),
            size = attachment.size_bytes, "volume attached");
        Ok(attachment)
    }

    /// Detaches a volume: refuses while its device is in use; unknown volumes are
    /// [`AttachError::NotAttached`] (the CSI layer treats that as done). A volume still being
    /// taken over after a restart is removed even if mounted: the takeover is cancelled and
    /// the IO the kernel held for it fails with EIO.
    pub async fn detach(&self, volume_id: &str) -> Result<(), AttachError> {
        let _g = self.inner.ops.lock().await;
        let (dev_path, takeover) = {
            let mut vols = self.lock_volumes();
            let v = vols
                .get_mut(volume_id)
                .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
            let takeover = if v.phase == Phase::Recovering {
                v.takeover.take()
            } else {
                None
            };
            (device::bdev_path(v.record.dev_id), takeover)
        };
        if let Some(t) = takeover {
            tracing::warn!(volume_id, dev = %dev_path.display(),
                "detaching a volume that is still being taken over: its held IO fails");
            t.cancel.cancel();
            // Bounded: the task is between connect attempts, in a bounded device call, or
            // waiting for `ops`, which it gives up on once cancelled.
            if let Err(e) = t.task.await {
                tracing::warn!(volume_id, error = %e, "takeover task ended abnormally");
            }
            let adopted = self
                .lock_volumes()
                .get(volume_id)
                .is_some_and(|v| v.phase == Phase::Attached);
            if !adopted {
                self.remove(volume_id).await?;
                tracing::info!(volume_id, dev = %dev_path.display(), "takeover cancelled; device removed");
                return Ok(());
            }
        }
        if let Some(users) = device_users(&dev_path) {
            return Err(AttachError::Busy {
                volume_id: volume_id.to_string(),
                dev_path,
                users,
            });
        }
        self.remove(volume_id).await?;
        tracing::info!(volume_id, dev = %dev_path.display(), "volume detached");
        Ok(())
    }

    /// Stops the device and the engine and forgets the volume. Caller holds `ops`.
    async fn remove(&self, volume_id: &str) -> Result<(), AttachError> {
        let (device, client, dev_id) = {
            let mut vols = self.lock_volumes();
            let v = vols
                .get_mut(volume_id)
                .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
            (v.device.take(), v.client.take(), v.record.dev_id)
        };
        let stopped = match device {
            Some(d) => blocking(move || d.stop()).await?,
            // Never came up here (failed or cancelled takeover): remove whatever the kernel
            // still has, without waiting for a filesystem on it to be unmounted.
            None => blocking(move || device::abandon(dev_id)).await?,
        };
        if let Some(c) = client {
            c.shutdown().await;
        }
        if let Err(e) = stopped {
            if let Some(v) = self.lock_volumes().get_mut(volume_id) {
                v.phase = Phase::Failed(format!("stopping the device: {e}"));
            }
            return Err(e.into());
        }
        self.lock_volumes().remove(volume_id);
        crate::sync::lock(&self.inner.io, "volume IO metrics").remove(volume_id);
        self.inner.store.save(&self.records())?;
        Ok(())
    }

    pub fn get(&self, volume_id: &str) -> Option<AttachmentStatus> {
        self.lock_volumes().get(volume_id).map(status_of)
    }

    pub fn list(&self) -> Vec<AttachmentStatus> {
        let vols = self.lock_volumes();
        let mut all: Vec<_> = vols.values().map(status_of).collect();
        all.sort_by_key(|s| s.dev_id);
        all
    }

    /// The volume whose device is `/dev/ublkbN` (or `ublkbN`).
    pub fn volume_of_device(&self, dev: &str) -> Option<String> {
        let name = Path::new(dev).file_name()?.to_str()?;
        let id: u32 = name.strip_prefix("ublkb")?.parse().ok()?;
        self.list()
            .into_iter()
            .find(|s| s.dev_id == id)
            .map(|s| s.volume_id)
    }

    /// Drops one channel's connection (operators, fault tests): its requests are re-issued.
    pub fn reset_channel(&self, volume_id: &str, channel: usize) -> Result<(), AttachError> {
        let vols = self.lock_volumes();
        let v = vols
            .get(volume_id)
            .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
        let c = v
            .client
            .as_ref()
            .ok_or_else(|| AttachError::InProgress(volume_id.to_string()))?
            .client()
            .ok_or_else(|| {
                AttachError::Invalid(format!(
                    "volume {volume_id} is mirrored: its channels belong to its replicas"
                ))
            })?;
        if channel >= c.status().channels.len() {
            return Err(AttachError::Invalid(format!(
                "volume {volume_id} has no channel {channel}"
            )));
        }
        c.reset_channel(channel);
        Ok(())
    }

    /// Operator action on an attached mirrored volume: makes `replica` the only in-sync copy
    /// (see [`Mirror::promote`](crate::engine::mirror::Mirror::promote) for what is lost).
    /// Returns the generation of the new record.
    pub async fn promote(&self, volume_id: &str, replica: &str) -> Result<u64, AttachError> {
        let _g = self.inner.ops.lock().await;
        let mirror = {
            let vols = self.lock_volumes();
            let v = vols
                .get(volume_id)
                .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
            match &v.client {
                Some(Backing::Mirror(m)) => m.clone(),
                Some(Backing::Single(_)) => {
                    return Err(AttachError::Invalid(format!(
                        "volume {volume_id} is not mirrored"
                    )));
                }
                None if !v.record.replicas.is_empty() => {
                    return Err(AttachError::InProgress(volume_id.to_string()));
                }
                None => {
                    return Err(AttachError::Invalid(format!(
                        "volume {volume_id} is not mirrored"
                    )));
                }
            }
        };
        let rec = mirror.promote(replica).await?;
        tracing::warn!(
            volume_id,
            replica,
            generation = rec.generation,
            "replica promoted by the operator; writes it lacked are lost"
        );
        Ok(rec.generation)
    }

    /// Operator action on an attached mirrored volume: replaces replica `old` (its server
    /// gone for good) by `new` (see [`Mirror::replace`](crate::engine::mirror::Mirror::replace)),
    /// optionally setting the resync limit for its full copy first, and records the new
    /// replica set so that a restarted daemon reopens it.
    pub async fn replace(
        &self,
        volume_id: &str,
        old: &str,
        new: ReplicaRecord,
        resync_bytes_per_sec: Option<u64>,
    ) -> Result<crate::engine::mirror::replace::Replaced, AttachError> {
        let _g = self.inner.ops.lock().await;
        let mirror = {
            let vols = self.lock_volumes();
            let v = vols
                .get(volume_id)
                .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
            match &v.client {
                Some(Backing::Mirror(m)) => m.clone(),
                Some(Backing::Single(_)) => {
                    return Err(AttachError::Invalid(format!(
                        "volume {volume_id} is not mirrored"
                    )));
                }
                None => return Err(AttachError::InProgress(volume_id.to_string())),
            }
        };
        if resync_bytes_per_sec.is_some() {
            mirror.set_resync_limit(resync_bytes_per_sec);
        }
        let done = mirror.replace(old, new.into()).await?;
        let records = {
            let mut vols = self.lock_volumes();
            if let Some(v) = vols.get_mut(volume_id) {
                Backing::Mirror(mirror).follow_into(&mut v.record);
                if let Some(b) = resync_bytes_per_sec {
                    v.record.resync_bytes_per_sec = b;
                }
            }
            vols.values().map(|v| v.record.clone()).collect::<Vec<_>>()
        };
        self.inner.store.save(&records)?;
        Ok(done)
    }

    /// Re-reads the volume's size from its server and grows the device online.
    pub async fn resize(&self, volume_id: &str) -> Result<u64, AttachError> {
        let _g = self.inner.ops.lock().await;
        let (client, resizer, size_now) = {
            let vols = self.lock_volumes();
            let v = vols
                .get(volume_id)
                .ok_or_else(|| AttachError::NotAttached(volume_id.to_string()))?;
            match (&v.client, &v.device) {
                (Some(c), Some(d)) => (c.clone(), d.resizer(), v.record.size_bytes),
                _ => return Err(AttachError::InProgress(volume_id.to_string())),
            }
        };
        let features = blocking(device::features).await??;
        if !features.update_size() {
            return Err(DeviceError::ResizeUnsupported.into());
        }
        // The engine first (it must serve the new end before the kernel may ask for it),
        // then the kernel, then the record.
        let size = client.refresh_size().await?;
        if size == size_now {
            return Ok(size);
        }
        blocking(move || resizer.resize(size)).await??;
        let records = {
            let mut vols = self.lock_volumes();
            let v = vols
                .get_mut(volume_id)
                .ok_or_else(|| AttachError::Internal("volume vanished during resize".into()))?;
            v.record.size_bytes = size;
            vols.values().map(|v| v.record.clone()).collect::<Vec<_>>()
        };
        self.inner.store.save(&records)?;
        tracing::info!(
            volume_id,
            old = size_now,
            new = size,
            "volume resized online"
        );
        Ok(size)
    }
}

fn status_of(v: &Volume) -> AttachmentStatus {
    let r = &v.record;
    let (engine, mirror) = match v.client.as_ref().map(Backing::status) {
        Some(BackingStatus::Single(e)) => (Some(e), None),
        Some(BackingStatus::Mirror(m)) => (None, Some(m)),
        None => (None, None),
    };
    AttachmentStatus {
        volume_id: r.volume_id.clone(),
        dev_id: r.dev_id,
        dev_path: device::bdev_path(r.dev_id),
        size_bytes: r.size_bytes,
        servers: r.servers.clone(),
        export: r.export.clone(),
        read_only: r.read_only,
        brownout: r.brownout.clone(),
        phase: v.phase.clone(),
        engine,
        replicas: r.replicas.clone(),
        mirror,
    }
}

fn validate(req: &AttachRequest) -> Result<(), AttachError> {
    let bad = |m: &str| Err(AttachError::Invalid(m.to_string()));
    if req.volume_id.is_empty()
        || req.volume_id.len() > 256
        || req.volume_id.chars().any(char::is_control)
    {
        return bad("volume id must be 1 to 256 printable characters");
    }
    if req.servers.is_empty() {
        return bad("at least one server address is needed");
    }
    if req.queues == 0 || req.queues > 64 {
        return bad("queues must be between 1 and 64");
    }
    if req.queue_depth == 0 || req.queue_depth > 4096 {
        return bad("queue depth must be between 1 and 4096");
    }
    if req.channels == 0 {
        return bad("channels must be at least 1");
    }
    if !req.replicas.is_empty() {
        if req.replicas.len() < 2 || req.replicas.len() > MAX_REPLICAS {
            return bad("a mirrored volume needs 2 to 3 replicas");
        }
        if req.replica_timeout.is_zero() {
            return bad("the replica timeout must be positive");
        }
        if req.resync_bytes_per_sec == Some(0) {
            return bad("the resync bandwidth limit must be positive (omit it for no limit)");
        }
        let mut ids: Vec<&str> = req.replicas.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("replica ids must be distinct");
        }
    }
    Ok(())
}

/// Who keeps a block device busy: its mount points, or "open" when it is held exclusively
/// without a mount. None when it is free.
pub fn device_users(dev_path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (major, minor) = crate::mount::block_device_number(dev_path).ok().flatten()?;
    let mounts = mount_points(major, minor);
    if !mounts.is_empty() {
        return Some(format!("mounted on {}", mounts.join(", ")));
    }
    // O_EXCL on a block device fails with EBUSY while anyone holds it exclusively
    // (a mount in another namespace, a device mapper, a RAID member, ...).
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev_path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some("held open exclusively".into()),
        _ => None,
    }
}

/// Mount points of device `major:minor` in this mount namespace. A mount table that cannot
/// be read names none; the exclusive-open probe in [`device_users`] still sees the mount.
fn mount_points(major: u32, minor: u32) -> Vec<String> {
    crate::mount::MountTable::read()
        .map(|t| mounts_of(&t, major, minor))
        .unwrap_or_default()
}

fn mounts_of(table: &crate::mount::MountTable, major: u32, minor: u32) -> Vec<String> {
    table
        .entries()
        .iter()
        .filter(|e| (e.major, e.minor) == (major, minor))
        .map(|e| e.mount_point.display().to_string())
        .collect()
}

/// Runs blocking device work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AttachError::Internal(format!("device task failed: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn req() -> AttachRequest {
        AttachRequest {
            tls: None,
            volume_id: "vol".into(),
            servers: vec!["127.0.0.1:10809".into()],
            export: "vol".into(),
            channels: 2,
            queues: 1,
            queue_depth: 64,
            brownout: BrownoutPolicy::Wait,
            read_only: false,
            replicas: Vec::new(),
            replica_timeout: Duration::from_secs(5),
            resync_bytes_per_sec: None,
            access_token: None,
        }
    }

    #[test]
    fn requests_are_validated() {
        assert!(validate(&req()).is_ok());
        assert!(
            validate(&AttachRequest {
                servers: vec![],
                ..req()
            })
            .is_err()
        );
        assert!(validate(&AttachRequest { queues: 0, ..req() }).is_err());
        assert!(
            validate(&AttachRequest {
                queue_depth: 5000,
                ..req()
            })
            .is_err()
        );
        assert!(
            validate(&AttachRequest {
                volume_id: String::new(),
                ..req()
            })
            .is_err()
        );
    }

    #[test]
    fn mount_points_of_a_device_come_from_the_mount_table() {
        let table = crate::mount::MountTable::parse(
            "22 1 259:1 / / rw - ext4 /dev/nvme0n1p1 rw\n\
             40 22 259:3 / /var/lib/kubelet/a\\040b rw - ext4 /dev/ublkb0 rw\n\
             41 22 259:3 /sub /pods/x rw - ext4 /dev/ublkb0 rw\n",
        )
        .expect("parse");
        assert_eq!(
            mounts_of(&table, 259, 3),
            vec!["/var/lib/kubelet/a b".to_string(), "/pods/x".into()]
        );
        assert!(mounts_of(&table, 259, 9).is_empty());
    }

    #[test]
    fn a_plain_file_has_no_users() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        assert_eq!(device_users(f.path()), None);
        assert_eq!(device_users(Path::new("/nonexistent/ublkb9")), None);
    }

    pub(super) fn manager_with(dir: &Path, records: &[AttachmentRecord]) -> AttachmentManager {
        // Written as a previous daemon would have left it; its lock is released on drop.
        StateStore::open(dir)
            .and_then(|s| s.save(records))
            .expect("seed state");
        let cfg = ManagerConfig {
            tls_default: TlsPolicy::Off,
            tls: None,
            access_plaintext: false,
            state_dir: dir.into(),
            max_volumes: 0,
            journal_bytes: 1 << 20,
        };
        AttachmentManager::new(cfg, Handle::current()).expect("manager")
    }

    pub(super) fn stored(id: &str, server: &str, dev_id: u32) -> AttachmentRecord {
        AttachmentRecord {
            tls: false,
            volume_id: id.into(),
            // An id far above what the tests' kernels hand out: never a real device.
            dev_id,
            servers: vec![server.into()],
            export: id.into(),
            channels: 1,
            queues: 1,
            queue_depth: 64,
            brownout: "wait".into(),
            read_only: false,
            size_bytes: 1 << 20,
            replicas: Vec::new(),
            replica_timeout_ms: 0,
            resync_bytes_per_sec: 0,
            access_token: None,
            access_plaintext: false,
        }
    }

    #[test]
    fn a_volume_that_requires_tls_gets_the_nodes_tls_or_a_clear_error() {
        let mut r = stored("vol", "127.0.0.1:10809", 1);
        let plain = client_config(&r, BrownoutPolicy::Wait, 64 << 20, None).unwrap();
        assert!(plain.tls.is_none());
        r.tls = true;
        let e = client_config(&r, BrownoutPolicy::Wait, 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("requires TLS"), "{e}");
        // The record keeps the policy across a state-file round trip.
        let json = serde_json::to_string(&r).unwrap();
        let back: AttachmentRecord = serde_json::from_str(&json).unwrap();
        assert!(back.tls);
        // Records written before TLS read as plain text.
        let old = serde_json::to_string(&stored("old", "127.0.0.1:10809", 2)).unwrap();
        assert!(!old.contains("tls"));
    }

    #[test]
    fn the_access_token_is_kept_for_a_takeover_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = stored("vol", "127.0.0.1:10809", 1);
        let token = "ab".repeat(32);
        r.access_token = Some(crate::secret::Secret::new(token.clone()));
        // The state file keeps it (mode 0600), so a restarted daemon presents it again.
        let store = StateStore::open(dir.path()).unwrap();
        store.save(std::slice::from_ref(&r)).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back[0].access_token, r.access_token);
        let meta = std::fs::metadata(dir.path().join("attachments.json")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Debug output (logs, `enbd-node list` diagnostics) never shows it.
        assert!(!format!("{r:?}").contains(&token));
        // The engine gets it; without the lab setting it refuses to send it in plain text
        // (tests/engine_access.rs).
        let cfg = client_config(&r, BrownoutPolicy::Wait, 64 << 20, None).unwrap();
        let access = cfg.access.expect("the engine gets the token");
        assert!(!access.allow_plaintext);
        assert!(!format!("{access:?}").contains(&token));
    }

    pub(super) fn saved_volumes(dir: &Path) -> Vec<String> {
        let text = std::fs::read(dir.join("attachments.json")).expect("state file");
        let v: serde_json::Value = serde_json::from_slice(&text).expect("json");
        v["attachments"]
            .as_array()
            .expect("list")
            .iter()
            .map(|a| a["volume_id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// A server that refuses connections: the port of a listener that is gone.
    pub(super) fn dead_server() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        addr.to_string()
    }

    #[tokio::test]
    async fn a_poisoned_volume_table_still_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = AttachmentRecord {
            servers: vec![],
            ..stored("bad", "unused", 4003)
        };
        let mgr = manager_with(dir.path(), &[bad]);
        mgr.restore().expect("restore");
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _g = mgr.inner.volumes.lock();
                panic!("poison the volume table");
            })
            .join()
        });
        assert!(mgr.inner.volumes.is_poisoned());
        assert_eq!(mgr.list().len(), 1, "list still sees the volume");
        assert!(mgr.get("bad").is_some());
        mgr.detach("bad").await.expect("detach still works");
    }

    #[test]
    fn mirrored_requests_are_validated() {
        let r = |id: &str| crate::backing::parse_replica(&format!("{id}@h:1@h:2")).expect("r");
        let mirrored = AttachRequest {
            replicas: vec![r("a"), r("b")],
            ..req()
        };
        assert!(validate(&mirrored).is_ok());
        for (bad, why) in [
            (vec![r("a")], "2 to 3"),
            (vec![r("a"), r("b"), r("c"), r("d")], "2 to 3"),
            (vec![r("a"), r("a")], "distinct"),
        ] {
            let e = validate(&AttachRequest {
                replicas: bad,
                ..req()
            })
            .expect_err(why);
            assert!(e.to_string().contains(why), "{e}");
        }
        assert!(
            validate(&AttachRequest {
                replica_timeout: Duration::ZERO,
                ..mirrored.clone()
            })
            .is_err()
        );
        let e = validate(&AttachRequest {
            resync_bytes_per_sec: Some(0),
            ..mirrored
        })
        .expect_err("zero bandwidth");
        assert!(e.to_string().contains("bandwidth"), "{e}");
    }

    #[tokio::test]
    async fn unknown_volumes_are_reported_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ManagerConfig {
            tls_default: TlsPolicy::Off,
            tls: None,
            access_plaintext: false,
            state_dir: dir.path().into(),
            max_volumes: 0,
            journal_bytes: 1 << 20,
        };
        let mgr = AttachmentManager::new(cfg, Handle::current()).expect("manager");
        assert_eq!(mgr.restore().expect("restore"), 0);
        let err = mgr.detach("nope").await.expect_err("unknown volume");
        assert_eq!(err.to_string(), "volume nope is not attached on this node");
        assert!(mgr.list().is_empty());
        assert!(mgr.get("nope").is_none());
    }
}
