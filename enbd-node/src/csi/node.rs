//! The CSI Node service: stage (attach, format if blank, mount), publish (bind mount),
//! their inverses, expansion, stats and node facts.
//!
//! Every handler checks its arguments first and changes nothing when they are bad. Work
//! that changes state runs in a task of its own holding the volume's guard, so a caller
//! that gives up (deadline) never leaves a half-done stage behind, and a concurrent call
//! on the same volume gets `Aborted`. State is read back from the mount table and the
//! device layer on every call, so repeated calls are answered from reality: the same
//! request twice succeeds twice, an incompatible one gets `AlreadyExists`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use enbd_proto::csi::node_server::Node;
use enbd_proto::csi::node_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use enbd_proto::csi::volume_capability::access_mode::Mode;
use enbd_proto::csi::volume_usage::Unit;
use enbd_proto::csi::*;
use enbd_proto::ids::VolumeId;
use enbd_proto::params::{FsType, VolumeContext};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::mount::{self, MountTable};

use super::NodeConfig;
use super::attacher::{AttachSpec, AttachedDevice, Attacher};
use super::error::NodeError;
use super::layout::{self, DevNum, STAGED_DEVICE_FILE, Staged};
use super::locks::{VolumeGuard, VolumeLocks};
use super::validate::{self, Access, Capability};

pub struct NodeService<A> {
    inner: Arc<Inner<A>>,
}

struct Inner<A> {
    config: NodeConfig,
    attacher: Arc<A>,
    locks: VolumeLocks,
}

impl<A: Attacher> NodeService<A> {
    pub fn new(config: NodeConfig, attacher: Arc<A>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                attacher,
                locks: VolumeLocks::default(),
            }),
        }
    }

    /// Runs `work` in its own task holding `guard` until it finishes, whether or not the
    /// caller is still waiting.
    async fn run<T, F>(
        &self,
        guard: VolumeGuard,
        work: impl FnOnce(Arc<Inner<A>>) -> F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, NodeError>> + Send + 'static,
    {
        let fut = work(self.inner.clone());
        let task = tokio::spawn(async move {
            let result = fut.await;
            drop(guard);
            result
        });
        match task.await {
            Ok(result) => result.map_err(Status::from),
            Err(e) => Err(NodeError::from(e).into()),
        }
    }
}

/// Runs blocking mount-table and syscall work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await?
}

fn attached<A: Attacher>(inner: &Inner<A>, id: &VolumeId) -> Result<AttachedDevice, NodeError> {
    inner
        .attacher
        .get(id)
        .ok_or_else(|| NodeError::NotFound(format!("volume {id} is not attached on this node")))
}

// ---- stage / unstage ----

struct StageRequest {
    volume_id: VolumeId,
    staging: PathBuf,
    cap: Capability,
    context: VolumeContext,
    access_token: Option<crate::secret::Secret>,
}

async fn stage<A: Attacher>(inner: Arc<Inner<A>>, req: StageRequest) -> Result<(), NodeError> {
    let existing = inner.attacher.get(&req.volume_id);
    let staging = req.staging.clone();
    let state = blocking(move || layout::inspect_staging(&MountTable::read()?, &staging)).await?;
    if state != Staged::Nothing {
        let dev = existing.ok_or_else(|| {
            NodeError::AlreadyExists(format!(
                "{} already holds a mount, but volume {} is not attached here",
                req.staging.display(),
                req.volume_id
            ))
        })?;
        let dev_num = layout::device_number(&dev.dev_path)?;
        return check_restage(&state, dev_num, &req);
    }

    let was_attached = existing.is_some();
    let max = inner.config.max_volumes;
    if !was_attached && max > 0 && inner.attacher.attached_count() as u64 >= max {
        return Err(NodeError::ResourceExhausted(format!(
            "this node already has its maximum of {max} volumes"
        )));
    }
    let read_only = req.cap.reader_only();
    let dev = inner
        .attacher
        .attach(AttachSpec {
            volume_id: req.volume_id.clone(),
            context: req.context.clone(),
            read_only,
            access_token: req.access_token.clone(),
        })
        .await?;
    info!(volume_id = %req.volume_id, device = %dev.dev_path.display(), "attached");

    let dev_path = dev.dev_path.clone();
    let staging = req.staging.clone();
    let default_fs = req.context.params.fs_type;
    let mkfs_options = req.context.params.mkfs_options.clone();
    let access = req.cap.access.clone();
    let result = blocking(move || {
        // Whatever the device layer hands back must be a block device before anything is
        // formatted or bound.
        layout::device_number(&dev_path)?;
        match access {
            Access::Block => stage_block(&dev_path, &staging),
            Access::Mount {
                fs_type,
                mount_flags,
            } => stage_filesystem(
                &dev_path,
                &staging,
                fs_type,
                default_fs,
                &mkfs_options,
                &mount_flags,
                read_only,
            ),
        }
    })
    .await;
    if let Err(err) = &result {
        warn!(volume_id = %req.volume_id, error = %err, "stage failed");
        // A device we attached for a stage that failed would otherwise leak: nothing tells
        // the CO to unstage a volume whose stage never succeeded.
        if !was_attached && let Err(e) = inner.attacher.detach(&req.volume_id).await {
            warn!(volume_id = %req.volume_id, error = %e, "detach after failed stage");
        }
    } else {
        info!(volume_id = %req.volume_id, staging = %req.staging.display(), block = req.cap.is_block(), "staged");
    }
    result
}

/// A repeated stage: success if what is staged matches the request, `AlreadyExists` if not.
fn check_restage(state: &Staged, dev_num: DevNum, req: &StageRequest) -> Result<(), NodeError> {
    let conflict = |what: String| {
        NodeError::AlreadyExists(format!("{} is staged {what}", req.staging.display()))
    };
    match (state, &req.cap.access) {
        (Staged::Filesystem(entry), Access::Mount { fs_type, .. }) => {
            if (entry.major, entry.minor) != dev_num {
                return Err(conflict(format!(
                    "with device {}:{}, not volume {}",
                    entry.major, entry.minor, req.volume_id
                )));
            }
            if let Some(fs) = fs_type
                && entry.fs_type != fs.as_str()
            {
                return Err(conflict(format!(
                    "as {}, the capability asks for {fs}",
                    entry.fs_type
                )));
            }
            if entry.is_read_only() != req.cap.reader_only() {
                return Err(conflict(format!("with read_only={}", entry.is_read_only())));
            }
            Ok(())
        }
        (Staged::Block { dev, .. }, Access::Block) => {
            if *dev != dev_num {
                return Err(conflict(format!(
                    "with device {}:{}, not volume {}",
                    dev.0, dev.1, req.volume_id
                )));
            }
            Ok(())
        }
        (Staged::Filesystem(_), Access::Block) => Err(conflict(
            "as a filesystem, the capability asks for block".into(),
        )),
        (Staged::Block { .. }, Access::Mount { .. }) => Err(conflict(
            "as block, the capability asks for a filesystem".into(),
        )),
        (Staged::Nothing, _) => Ok(()),
    }
}

fn stage_block(dev: &Path, staging: &Path) -> Result<(), NodeError> {
    let file = staging.join(STAGED_DEVICE_FILE);
    layout::ensure_file(&file)?;
    mount::bind_mount(dev, &file, 0)?;
    Ok(())
}

fn stage_filesystem(
    dev: &Path,
    staging: &Path,
    requested: Option<FsType>,
    default_fs: FsType,
    mkfs_options: &[String],
    mount_flags: &[String],
    read_only: bool,
) -> Result<(), NodeError> {
    // Options are checked before anything is written to the device.
    let opts = mount::options::parse(mount_flags, read_only)?;
    layout::ensure_dir(staging)?;
    let fs = match mount::probe_device(dev)? {
        mount::Content::Blank => {
            if read_only {
                return Err(NodeError::FailedPrecondition(
                    "the volume is blank and its access mode is read-only: there is no filesystem to mount".into(),
                ));
            }
            let fs = requested.unwrap_or(default_fs);
            info!(device = %dev.display(), fs = %fs, "formatting blank volume");
            mount::format(dev, fs, mkfs_options)?;
            fs
        }
        mount::Content::Filesystem(found) => {
            if let Some(want) = requested
                && want != found
            {
                return Err(NodeError::FailedPrecondition(format!(
                    "the volume already holds {found}, the capability asks for {want}; refusing to reformat"
                )));
            }
            found
        }
        mount::Content::Foreign(name) => {
            return Err(NodeError::FailedPrecondition(format!(
                "the volume holds {name}, which this node does not mount; refusing to format it"
            )));
        }
        mount::Content::UnknownData => {
            return Err(NodeError::FailedPrecondition(
                "the volume holds data with no recognised filesystem; refusing to format it".into(),
            ));
        }
    };
    mount::mount_filesystem(dev, staging, fs, &opts)?;
    Ok(())
}

/// What an unstage has to take down once its checks passed.
enum Unstage {
    Nothing,
    /// The staged filesystem's mount point.
    Unmount(PathBuf),
    /// The staged device file of a block volume.
    RemoveFile(PathBuf),
}

async fn unstage<A: Attacher>(
    inner: Arc<Inner<A>>,
    volume_id: VolumeId,
    staging: PathBuf,
) -> Result<(), NodeError> {
    let dev = inner.attacher.get(&volume_id);
    let dev_info = match &dev {
        Some(d) => Some((d.dev_path.clone(), layout::device_number(&d.dev_path)?)),
        None => None,
    };
    let staging_c = staging.clone();
    let id = volume_id.clone();
    // Checks first (nothing changes when one fails), then the unmount.
    let plan = blocking(move || {
        let table = MountTable::read()?;
        match layout::inspect_staging(&table, &staging_c)? {
            Staged::Nothing => Ok(Unstage::Nothing),
            Staged::Filesystem(entry) => {
                let num = (entry.major, entry.minor);
                if let Some((_, dev_num)) = &dev_info
                    && *dev_num != num
                {
                    return Err(NodeError::FailedPrecondition(format!(
                        "{} holds device {}:{}, not volume {id}",
                        staging_c.display(),
                        num.0,
                        num.1
                    )));
                }
                let users = layout::filesystem_binds(&table, num, &staging_c);
                if let Some(user) = users.first() {
                    return Err(NodeError::FailedPrecondition(format!(
                        "volume {id} is still published at {} ({} mount(s)); unpublish first",
                        user.mount_point.display(),
                        users.len()
                    )));
                }
                Ok(Unstage::Unmount(layout::resolve(&staging_c)))
            }
            Staged::Block {
                device_file,
                dev: num,
            } => {
                if let Some((dev_path, dev_num)) = &dev_info {
                    if *dev_num != num {
                        return Err(NodeError::FailedPrecondition(format!(
                            "{} holds device {}:{}, not volume {id}",
                            device_file.display(),
                            num.0,
                            num.1
                        )));
                    }
                    let users = layout::device_node_binds(&table, dev_path, num, &device_file);
                    if let Some(user) = users.first() {
                        return Err(NodeError::FailedPrecondition(format!(
                            "volume {id} is still published at {}; unpublish first",
                            user.mount_point.display()
                        )));
                    }
                }
                Ok(Unstage::RemoveFile(device_file))
            }
        }
    })
    .await?;
    // A device still being taken over holds its IO until its server answers; unmounting
    // first could wait for that forever. The CO wants the volume gone: remove the device
    // first (the takeover is cancelled, the held IO fails), then unmount.
    let recovering = dev.as_ref().is_some_and(|d| d.recovering);
    if recovering {
        warn!(volume_id = %volume_id, "unstaging a volume still being taken over: removing its device first");
        inner.attacher.detach(&volume_id).await?;
    }
    blocking(move || match plan {
        Unstage::Nothing => Ok(()),
        Unstage::Unmount(path) => {
            mount::unmount(&path)?;
            Ok(())
        }
        Unstage::RemoveFile(file) => layout::unmount_and_remove(&file),
    })
    .await?;
    if dev.is_some() && !recovering {
        inner.attacher.detach(&volume_id).await?;
        info!(volume_id = %volume_id, "detached");
    }
    info!(volume_id = %volume_id, staging = %staging.display(), "unstaged");
    Ok(())
}

// ---- publish / unpublish ----

struct PublishRequest {
    volume_id: VolumeId,
    staging: PathBuf,
    target: PathBuf,
    cap: Capability,
    read_only: bool,
}

async fn publish<A: Attacher>(inner: Arc<Inner<A>>, req: PublishRequest) -> Result<(), NodeError> {
    let dev = inner.attacher.get(&req.volume_id).ok_or_else(|| {
        NodeError::FailedPrecondition(format!(
            "volume {} is not staged on this node: NodeStageVolume must succeed first",
            req.volume_id
        ))
    })?;
    let id = req.volume_id.clone();
    blocking(move || publish_blocking(&dev, &req)).await?;
    info!(volume_id = %id, "published");
    Ok(())
}

fn publish_blocking(dev: &AttachedDevice, req: &PublishRequest) -> Result<(), NodeError> {
    let dev_num = layout::device_number(&dev.dev_path)?;
    let table = MountTable::read()?;
    let not_ours = |path: &Path| {
        NodeError::FailedPrecondition(format!(
            "{} holds another device, not volume {}",
            path.display(),
            req.volume_id
        ))
    };
    let source = match (
        layout::inspect_staging(&table, &req.staging)?,
        &req.cap.access,
    ) {
        (Staged::Nothing, _) => {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is not staged at {}",
                req.volume_id,
                req.staging.display()
            )));
        }
        (Staged::Filesystem(entry), Access::Mount { .. }) => {
            if (entry.major, entry.minor) != dev_num {
                return Err(not_ours(&req.staging));
            }
            layout::resolve(&req.staging)
        }
        (Staged::Block { device_file, dev }, Access::Block) => {
            if dev != dev_num {
                return Err(not_ours(&device_file));
            }
            device_file
        }
        (Staged::Filesystem(_), Access::Block) => {
            return Err(NodeError::InvalidArgument(format!(
                "volume {} is staged as a filesystem; a block capability cannot publish it",
                req.volume_id
            )));
        }
        (Staged::Block { .. }, Access::Mount { .. }) => {
            return Err(NodeError::InvalidArgument(format!(
                "volume {} is staged as a block device; a mount capability cannot publish it",
                req.volume_id
            )));
        }
    };

    let target = layout::resolve(&req.target);
    if let Some(entry) = table.at(&target) {
        let same = match req.cap.access {
            Access::Mount { .. } => (entry.major, entry.minor) == dev_num,
            Access::Block => layout::publishes_device(&target, dev_num),
        };
        if !same {
            return Err(NodeError::AlreadyExists(format!(
                "{} already has another mount",
                req.target.display()
            )));
        }
        if entry.is_read_only() != req.read_only {
            return Err(NodeError::AlreadyExists(format!(
                "volume {} is already published at {} with readonly={}",
                req.volume_id,
                req.target.display(),
                entry.is_read_only()
            )));
        }
        return Ok(());
    }

    if req.cap.mode == Mode::SingleNodeSingleWriter {
        // Checked before the target is created, so a refused publish leaves nothing behind.
        let others = match req.cap.access {
            Access::Mount { .. } => layout::filesystem_binds(&table, dev_num, &req.staging),
            Access::Block => layout::device_node_binds(&table, &dev.dev_path, dev_num, &source),
        };
        if let Some(other) = others.first() {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is already published at {}; its access mode SINGLE_NODE_SINGLE_WRITER \
                 allows one target_path",
                req.volume_id,
                other.mount_point.display()
            )));
        }
    }

    match &req.cap.access {
        Access::Mount { mount_flags, .. } => {
            let flags = mount::options::parse(mount_flags, req.read_only)?.bind_flags();
            layout::ensure_dir(&req.target)?;
            mount::bind_mount(&source, &req.target, flags)?;
        }
        Access::Block => publish_block(dev, &source, req)?,
    }
    Ok(())
}

/// A raw block publish bind-mounts the staged device node onto the target. A read-only
/// one gets a read-only loop device over the volume's device instead: a read-only bind
/// mount does not stop writes through a device node, and the device-wide read-only flag
/// would also stop the read-write publishes of other pods on this node, which Kubernetes
/// makes side by side with read-only ones.
fn publish_block(
    dev: &AttachedDevice,
    staged_file: &Path,
    req: &PublishRequest,
) -> Result<(), NodeError> {
    if !dev.read_only && mount::device_read_only(&dev.dev_path)? {
        // Left over from an earlier daemon that marked the whole device read-only for
        // its read-only publishes: nothing relies on it any more.
        mount::set_device_read_only(&dev.dev_path, false)?;
    }
    layout::ensure_file(&req.target)?;
    // A volume attached read-only is read-only everywhere already.
    let read_only_loop = req.read_only && !dev.read_only;
    let source = if read_only_loop {
        mount::loopdev::attach_read_only(&dev.dev_path, &loop_label(&req.volume_id))?
    } else {
        staged_file.to_path_buf()
    };
    let flags = if req.read_only { libc::MS_RDONLY } else { 0 };
    if let Err(e) = mount::bind_mount(&source, &req.target, flags) {
        if read_only_loop && let Ok(Some(n)) = mount::block_device_number(&source) {
            let _ = mount::loopdev::detach(n);
        }
        return Err(e.into());
    }
    Ok(())
}

/// The name a read-only raw publish's loop device carries: `losetup -l` shows whose it is,
/// and an unpublish with the volume no longer attached still recognises it.
fn loop_label(volume_id: &VolumeId) -> String {
    format!("enbd:{volume_id}")
}

async fn unpublish<A: Attacher>(
    inner: Arc<Inner<A>>,
    volume_id: VolumeId,
    target: PathBuf,
) -> Result<(), NodeError> {
    let dev = inner.attacher.get(&volume_id);
    let id = volume_id.clone();
    blocking(move || {
        let resolved = layout::resolve(&target);
        let dev_num = match &dev {
            Some(dev) => Some(layout::device_number(&dev.dev_path)?),
            None => None,
        };
        let table = MountTable::read()?;
        let mut read_only_loop = None;
        if let Some(entry) = table.at(&resolved) {
            let published = mount::block_device_number(&resolved).ok().flatten();
            if let Some(n) = published
                && let Ok(Some(status)) = mount::loopdev::status(n)
                && (Some(status.backing) == dev_num || status.label == loop_label(&id))
            {
                read_only_loop = Some(n);
            }
            if let Some(dev_num) = dev_num {
                let ours = (entry.major, entry.minor) == dev_num
                    || published == Some(dev_num)
                    || read_only_loop.is_some();
                if !ours {
                    return Err(NodeError::FailedPrecondition(format!(
                        "{} holds another device, not volume {id}",
                        target.display()
                    )));
                }
            }
        }
        layout::unmount_and_remove(&target)?;
        if let Some(n) = read_only_loop {
            mount::loopdev::detach(n)?;
        }
        // An earlier daemon marked the whole device read-only for its read-only raw
        // publishes; the last of those gone, the flag goes too (unless the volume itself is
        // attached read-only).
        if let (Some(dev), Some(dev_num)) = (&dev, dev_num)
            && !dev.read_only
            && mount::device_read_only(&dev.dev_path)?
        {
            let name = dev.dev_path.file_name();
            let table = MountTable::read()?;
            let ro_left = layout::device_node_binds(&table, &dev.dev_path, dev_num, Path::new(""))
                .iter()
                .any(|e| e.is_read_only() && e.root.file_name() == name);
            if !ro_left {
                mount::set_device_read_only(&dev.dev_path, false)?;
            }
        }
        Ok(())
    })
    .await?;
    info!(volume_id = %volume_id, "unpublished");
    Ok(())
}

// ---- expand / stats ----

async fn expand<A: Attacher>(
    inner: Arc<Inner<A>>,
    volume_id: VolumeId,
    volume_path: PathBuf,
    required: u64,
    limit: u64,
    block_cap: bool,
) -> Result<u64, NodeError> {
    let dev = attached(&inner, &volume_id)?;
    let path = volume_path.clone();
    let is_block = blocking(move || match std::fs::metadata(&path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            Ok(meta.file_type().is_block_device())
        }
        Err(_) => Err(NodeError::NotFound(format!(
            "volume_path {} does not exist",
            path.display()
        ))),
    })
    .await?;
    // The device is re-sized only when it is too small for the request (or no size was
    // asked for): a grow of the filesystem to the device it already has needs no
    // round-trip to the server, and works on kernels without online device resize.
    let size = if required > 0 && required <= dev.size_bytes {
        dev.size_bytes
    } else {
        inner.attacher.resize(&volume_id).await?
    };
    if size < required {
        return Err(NodeError::OutOfRange(format!(
            "volume {volume_id} is {size} bytes on its server, less than the {required} bytes required; \
             expand it on the controller first"
        )));
    }
    if limit > 0 && size > limit {
        return Err(NodeError::OutOfRange(format!(
            "volume {volume_id} is {size} bytes on its server, more than the {limit} bytes limit"
        )));
    }
    if is_block || block_cap {
        info!(volume_id = %volume_id, size, "block device grown");
        return Ok(size);
    }
    let dev_path = dev.dev_path.clone();
    blocking(move || {
        let dev_num = layout::device_number(&dev_path)?;
        let table = MountTable::read()?;
        let resolved = layout::resolve(&volume_path);
        let entry = table
            .at(&resolved)
            .filter(|e| (e.major, e.minor) == dev_num)
            .ok_or_else(|| {
                NodeError::NotFound(format!(
                    "volume {volume_id} is not mounted at {}",
                    volume_path.display()
                ))
            })?;
        let fs: FsType = entry.fs_type.parse().map_err(|_| {
            NodeError::FailedPrecondition(format!("cannot grow a {} filesystem", entry.fs_type))
        })?;
        mount::grow_filesystem(&dev_path, &resolved, fs)?;
        info!(volume_id = %volume_id, size, fs = %fs, "filesystem grown");
        Ok(size)
    })
    .await
}

fn stats_blocking(
    dev: &AttachedDevice,
    volume_id: &VolumeId,
    path: &Path,
) -> Result<Vec<VolumeUsage>, NodeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|_| {
        NodeError::NotFound(format!("volume_path {} does not exist", path.display()))
    })?;
    let dev_num = layout::device_number(&dev.dev_path)?;
    let not_here =
        || NodeError::NotFound(format!("volume {volume_id} is not at {}", path.display()));
    if meta.file_type().is_block_device() {
        if mount::block_device_number(path)? != Some(dev_num) {
            return Err(not_here());
        }
        let total = mount::block_device_size(path)?;
        return Ok(vec![VolumeUsage {
            total: clamp(total),
            unit: Unit::Bytes as i32,
            ..Default::default()
        }]);
    }
    if mount::containing_device(path)? != dev_num {
        return Err(not_here());
    }
    let u = mount::fs_usage(path)?;
    Ok(vec![
        VolumeUsage {
            available: clamp(u.available_bytes),
            total: clamp(u.total_bytes),
            used: clamp(u.used_bytes),
            unit: Unit::Bytes as i32,
        },
        VolumeUsage {
            available: clamp(u.free_inodes),
            total: clamp(u.total_inodes),
            used: clamp(u.used_inodes),
            unit: Unit::Inodes as i32,
        },
    ])
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn non_negative(field: &str, v: i64) -> Result<u64, NodeError> {
    u64::try_from(v)
        .map_err(|_| NodeError::InvalidArgument(format!("{field} must not be negative")))
}

fn rpc_cap(t: RpcType) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl<A: Attacher> Node for NodeService<A> {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?;
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let cap = validate::capability(r.volume_capability.as_ref())?;
        let context = VolumeContext::from_context(&r.volume_context).map_err(NodeError::from)?;
        let guard = self.inner.locks.try_lock(&r.volume_id)?;
        let access_token = r
            .publish_context
            .get(enbd_proto::params::PUBLISH_ACCESS_TOKEN)
            .filter(|t| !t.is_empty())
            .map(|t| crate::secret::Secret::new(t.clone()));
        let req = StageRequest {
            volume_id,
            staging,
            cap,
            context,
            access_token,
        };
        self.run(guard, move |inner| stage(inner, req)).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?;
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let guard = self.inner.locks.try_lock(&r.volume_id)?;
        self.run(guard, move |inner| unstage(inner, volume_id, staging))
            .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?;
        let target = validate::path("target_path", &r.target_path)?;
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let cap = validate::capability(r.volume_capability.as_ref())?;
        if target == staging || target.starts_with(&staging) || staging.starts_with(&target) {
            return Err(NodeError::InvalidArgument(
                "target_path and staging_target_path must not nest".into(),
            )
            .into());
        }
        let read_only = r.readonly || cap.reader_only();
        let guard = self.inner.locks.try_lock(&r.volume_id)?;
        let req = PublishRequest {
            volume_id,
            staging,
            target,
            cap,
            read_only,
        };
        self.run(guard, move |inner| publish(inner, req)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?;
        let target = validate::path("target_path", &r.target_path)?;
        let guard = self.inner.locks.try_lock(&r.volume_id)?;
        self.run(guard, move |inner| unpublish(inner, volume_id, target))
            .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        // Missing arguments first: a call without a path is malformed whatever its id says.
        validate::present("volume_path", &r.volume_path)?;
        let volume_id = validate::existing_volume_id(&r.volume_id)?;
        let path = validate::existing_path("volume_path", &r.volume_path)?;
        validate::optional_path("staging_target_path", &r.staging_target_path)?;
        let dev = attached(&self.inner, &volume_id)?;
        let health = dev.health.clone();
        let usage = blocking(move || stats_blocking(&dev, &volume_id, &path)).await?;
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: health.abnormal,
                message: health.message,
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        validate::present("volume_path", &r.volume_path)?;
        let volume_id = validate::existing_volume_id(&r.volume_id)?;
        let path = validate::path("volume_path", &r.volume_path)?;
        validate::optional_path("staging_target_path", &r.staging_target_path)?;
        let block_cap = match r.volume_capability.as_ref() {
            Some(cap) => validate::capability(Some(cap))?.is_block(),
            None => false,
        };
        let (required, limit) = match r.capacity_range {
            Some(range) => (
                non_negative("required_bytes", range.required_bytes)?,
                non_negative("limit_bytes", range.limit_bytes)?,
            ),
            None => (0, 0),
        };
        if limit > 0 && required > limit {
            return Err(NodeError::OutOfRange(format!(
                "required_bytes {required} exceeds limit_bytes {limit}"
            ))
            .into());
        }
        let guard = self.inner.locks.try_lock(&r.volume_id)?;
        let size = self
            .run(guard, move |inner| {
                expand(inner, volume_id, path, required, limit, block_cap)
            })
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: clamp(size),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc_cap(RpcType::StageUnstageVolume),
                rpc_cap(RpcType::ExpandVolume),
                rpc_cap(RpcType::GetVolumeStats),
                rpc_cap(RpcType::VolumeCondition),
                // Several pods on this node share the one staged mount through bind mounts.
                rpc_cap(RpcType::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let c = &self.inner.config;
        Ok(Response::new(NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            max_volumes_per_node: i64::try_from(c.max_volumes).unwrap_or(i64::MAX),
            // Reachable from every node: no topology segments (README: "Topology").
            accessible_topology: None,
        }))
    }
}
