//! What the CSI node service needs from the device layer: attach a volume as a local block
//! device, detach it, look it up, grow it. The CSI layer sees only these types, never the
//! device layer's own, so either side can change without touching the other. The real
//! implementation lives with the attachment manager, outside this module; the tests use a
//! fake.
//!
//! Invariants every implementation keeps: `attach` is idempotent per volume id (a second
//! call returns the existing device); `detach` of an unknown volume succeeds, and `detach`
//! of a volume still being taken over after a restart cancels the takeover and removes the
//! device; `get` never blocks on the network.

use std::future::Future;
use std::path::PathBuf;

use enbd_proto::ids::VolumeId;
use enbd_proto::params::VolumeContext;

/// Everything needed to attach one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub volume_id: VolumeId,
    /// Where the data lives and how to connect (validated volume context).
    pub context: VolumeContext,
    /// Expose the device read-only (reader-only access modes).
    pub read_only: bool,
    /// The access token from `publish_context` (a secret: never logged).
    pub access_token: Option<crate::secret::Secret>,
}

/// A volume attached on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDevice {
    /// The block device node, e.g. `/dev/ublkb0`.
    pub dev_path: PathBuf,
    pub size_bytes: u64,
    pub read_only: bool,
    pub health: VolumeHealth,
    /// A restarted daemon is still taking the device over: its IO waits in the kernel, and
    /// a detach cancels the takeover and fails that IO.
    pub recovering: bool,
}

/// Volume condition as CSI reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeHealth {
    /// True while channels are down, IO is waiting out a brownout, or the engine failed.
    pub abnormal: bool,
    pub message: String,
}

/// Why the device layer refused or failed. Each kind maps to one CSI status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttacherError {
    /// The server does not have this export.
    #[error("volume not found: {0}")]
    NotFound(String),
    /// The server could not be reached or refused the connection for now.
    #[error("volume server unavailable: {0}")]
    Unavailable(String),
    /// The device is still in use (mounted or open).
    #[error("device busy: {0}")]
    Busy(String),
    /// Already attached here with other settings (export, server, read-only).
    #[error("{0}")]
    Conflict(String),
    /// The device layer is still busy with this volume (e.g. taking it over after a restart).
    #[error("{0}")]
    InProgress(String),
    /// The request itself is wrong (bad geometry, read-only mismatch, ...).
    #[error("invalid attach request: {0}")]
    Invalid(String),
    /// This node or kernel cannot do it (e.g. online resize without ublk UPDATE_SIZE).
    #[error("not supported on this node: {0}")]
    Unsupported(String),
    /// Out of device slots or memory.
    #[error("node resources exhausted: {0}")]
    Exhausted(String),
    #[error("device layer failure: {0}")]
    Internal(String),
}

/// The device layer as the CSI node service uses it.
pub trait Attacher: Send + Sync + 'static {
    fn attach(
        &self,
        spec: AttachSpec,
    ) -> impl Future<Output = Result<AttachedDevice, AttacherError>> + Send;
    fn detach(
        &self,
        volume_id: &VolumeId,
    ) -> impl Future<Output = Result<(), AttacherError>> + Send;
    fn get(&self, volume_id: &VolumeId) -> Option<AttachedDevice>;
    /// Number of volumes attached now (for `max_volumes`).
    fn attached_count(&self) -> usize;
    /// Re-reads the volume's size from the server and grows the device; returns the new size.
    fn resize(
        &self,
        volume_id: &VolumeId,
    ) -> impl Future<Output = Result<u64, AttacherError>> + Send;
    /// Whether the device layer can attach volumes at all (kernel support present).
    fn ready(&self) -> Result<(), String>;
}
