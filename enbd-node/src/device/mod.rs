//! The ublk device layer: one `/dev/ublkbN` per attached volume, served by a [`BlockTarget`].
//!
//! libublk is used only inside this module. Each device has a control thread (running
//! libublk's `run_target`) and one thread per queue; queue threads talk to the Tokio runtime
//! through [`bridge`] only. Devices are created with user recovery (re-issue mode) when the
//! kernel has it, so a daemon that dies leaves its devices QUIESCED, holding their IO, until
//! a new daemon takes them over with [`Start::Recover`]. Every call here blocks: async callers
//! run them on a blocking thread.

mod bridge;
mod params;
mod queue;
mod request;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::{UblkError, UblkFlags, sys};
use thiserror::Error;
use tokio::runtime::Handle;

pub use params::DeviceGeometry;
pub use request::{BlockRequest, BlockTarget};

/// How long a new or recovered device may take to come up (≈2 s measured under TCG).
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("ublk is not available ({0}): is the ublk_drv kernel module loaded?")]
    Unavailable(String),
    #[error("creating the ublk device failed: {0}")]
    Create(String),
    #[error("ublk device {dev_id}: {what} failed: {error}")]
    Control {
        dev_id: u32,
        what: &'static str,
        error: String,
    },
    #[error("ublk device {0} does not exist")]
    NotFound(u32),
    #[error("ublk device {dev_id} cannot be taken over: it is {state}")]
    NotRecoverable { dev_id: u32, state: DeviceState },
    #[error(
        "online resize is not supported by this kernel's ublk driver (needs UPDATE_SIZE, \
         Linux 6.16 or later)"
    )]
    ResizeUnsupported,
    #[error("ublk device {dev_id} cannot shrink from {from} to {to} bytes")]
    Shrink { dev_id: u32, from: u64, to: u64 },
    #[error("ublk device did not come up within {0:?}")]
    StartTimeout(Duration),
    #[error("ublk device setup: {0}")]
    Io(#[from] std::io::Error),
}

/// The kernel's view of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Dead,
    Live,
    /// Its server is gone; IO is held until a new server recovers it.
    Quiesced,
    FailIo,
    Other(u16),
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Dead => f.write_str("DEAD"),
            DeviceState::Live => f.write_str("LIVE"),
            DeviceState::Quiesced => f.write_str("QUIESCED"),
            DeviceState::FailIo => f.write_str("FAIL_IO"),
            DeviceState::Other(s) => write!(f, "state {s}"),
        }
    }
}

impl From<u16> for DeviceState {
    fn from(s: u16) -> Self {
        match u32::from(s) {
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Other(s),
        }
    }
}

/// What the loaded ublk driver can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// Both user recovery and re-issue of in-flight IO: a daemon restart is invisible.
    pub fn recovery(self) -> bool {
        let want = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        self.0 & want == want
    }
    pub fn update_size(self) -> bool {
        self.0 & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0
    }
}

/// Queries the driver's features (needs `/dev/ublk-control`).
pub fn features() -> Result<Features, DeviceError> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(DeviceError::Unavailable(
            "/dev/ublk-control is missing".into(),
        ));
    }
    UblkCtrl::get_features().map(Features).ok_or_else(|| {
        DeviceError::Unavailable("GET_FEATURES failed (kernel older than 6.5?)".into())
    })
}

/// Device shape; the geometry comes from the server.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub queues: u16,
    pub queue_depth: u16,
    pub geometry: DeviceGeometry,
}

/// Create a device (optionally with a wanted id), or take over a QUIESCED one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    New { dev_id: Option<u32> },
    Recover { dev_id: u32 },
}

/// A running device. Dropping it leaves the device in place (so a daemon that exits hands its
/// devices to its successor); [`Device::stop`] removes it.
pub struct Device {
    dev_id: u32,
    recoverable: bool,
    /// Size the queues check requests against; grown by [`Device::resize`].
    size: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

pub fn bdev_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

fn describe(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(code) | UblkError::UringIOError(code) => {
            format!(
                "{} (errno {})",
                std::io::Error::from_raw_os_error(code.abs()),
                code.abs()
            )
        }
        UblkError::IOError(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

fn is_no_device(e: &UblkError) -> bool {
    match e {
        UblkError::OtherError(c) | UblkError::UringIOError(c) => {
            matches!(c.abs(), libc::ENODEV | libc::ENOENT)
        }
        UblkError::IOError(io) => matches!(io.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)),
        _ => false,
    }
}

fn open_ctrl(dev_id: u32) -> Result<UblkCtrl, DeviceError> {
    let id = i32::try_from(dev_id).map_err(|_| DeviceError::NotFound(dev_id))?;
    UblkCtrl::new_simple(id).map_err(|e| {
        if is_no_device(&e) {
            DeviceError::NotFound(dev_id)
        } else {
            DeviceError::Control {
                dev_id,
                what: "GET_DEV_INFO",
                error: describe(&e),
            }
        }
    })
}

/// Grows a live device; cheap to clone, independent of the [`Device`]'s lifetime.
#[derive(Clone)]
pub struct Resizer {
    dev_id: u32,
    size: Arc<AtomicU64>,
}

impl Resizer {
    /// Grows the device to `size_bytes` (its target must already serve that much). The
    /// queues accept the new range first, so the kernel never sends a request they would
    /// refuse; if the kernel then refuses, the larger bound is harmless. Shrinking is refused;
    /// the same size is a no-op.
    pub fn resize(&self, size_bytes: u64) -> Result<(), DeviceError> {
        let now = self.size.load(Ordering::Acquire);
        if size_bytes < now {
            return Err(DeviceError::Shrink {
                dev_id: self.dev_id,
                from: now,
                to: size_bytes,
            });
        }
        if size_bytes == now {
            return Ok(());
        }
        if !features()?.update_size() {
            return Err(DeviceError::ResizeUnsupported);
        }
        self.size.fetch_max(size_bytes, Ordering::AcqRel);
        resize(self.dev_id, size_bytes)
    }
}

/// The kernel's state of a device.
pub fn state(dev_id: u32) -> Result<DeviceState, DeviceError> {
    Ok(DeviceState::from(open_ctrl(dev_id)?.dev_info().state))
}

/// Waits until a device whose server died is ready to be taken over. Right after a kill the
/// kernel still says LIVE for a moment, so LIVE is polled until `timeout`.
pub fn wait_recoverable(dev_id: u32, timeout: Duration) -> Result<DeviceState, DeviceError> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = state(dev_id)?;
        if s != DeviceState::Live || Instant::now() >= deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Changes the size of a live device (the filesystem above may then grow).
pub fn resize(dev_id: u32, size_bytes: u64) -> Result<(), DeviceError> {
    if !features()?.update_size() {
        return Err(DeviceError::ResizeUnsupported);
    }
    open_ctrl(dev_id)?
        .update_size(size_bytes)
        .map(|_| ())
        .map_err(|e| DeviceError::Control {
            dev_id,
            what: "UPDATE_SIZE",
            error: describe(&e),
        })
}

/// Removes a device that has no running server here (e.g. its volume is gone). Without a
/// ublk driver there is no device to remove, which is success.
pub fn delete(dev_id: u32) -> Result<(), DeviceError> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Ok(());
    }
    let ctrl = match open_ctrl(dev_id) {
        Err(DeviceError::NotFound(_)) => return Ok(()),
        other => other?,
    };
    match ctrl.del_dev() {
        Ok(_) => Ok(()),
        Err(e) if is_no_device(&e) => Ok(()),
        Err(e) => Err(DeviceError::Control {
            dev_id,
            what: "DEL_DEV",
            error: describe(&e),
        }),
    }
}

/// Removes a device this daemon does not serve (a takeover that was cancelled or failed),
/// even while a filesystem is still mounted on it: STOP_DEV fails the IO the kernel holds
/// and removes the disk, then the asynchronous DEL_DEV frees the id without waiting for the
/// last opener (the synchronous one would wait for the unmount, i.e. forever for a caller
/// that unmounts afterwards). Without a ublk driver there is nothing to remove.
pub fn abandon(dev_id: u32) -> Result<(), DeviceError> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Ok(());
    }
    let ctrl = match open_ctrl(dev_id) {
        Err(DeviceError::NotFound(_)) => return Ok(()),
        other => other?,
    };
    match ctrl.kill_dev() {
        Ok(_) => {}
        Err(e) if is_no_device(&e) => return Ok(()),
        Err(e) => {
            return Err(DeviceError::Control {
                dev_id,
                what: "STOP_DEV",
                error: describe(&e),
            });
        }
    }
    match ctrl.del_dev_async() {
        Ok(_) => Ok(()),
        Err(e) if is_no_device(&e) => Ok(()),
        Err(e) => Err(DeviceError::Control {
            dev_id,
            what: "DEL_DEV_ASYNC",
            error: describe(&e),
        }),
    }
}

impl Device {
    /// Creates or recovers a device and returns once `/dev/ublkbN` serves IO.
    pub fn start<T: BlockTarget>(
        opts: &DeviceOptions,
        start: Start,
        target: Arc<T>,
        rt: Handle,
    ) -> Result<Device, DeviceError> {
        let features = features()?;
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Progress>(4);
        let opts = opts.clone();
        let size = Arc::new(AtomicU64::new(opts.geometry.size_bytes));
        let queue_size = size.clone();
        let thread = std::thread::Builder::new()
            .name("ublk-dev".into())
            .spawn(move || serve_device(opts, start, features, target, rt, queue_size, ready_tx))?;
        let known = match start {
            Start::Recover { dev_id } => Some(dev_id),
            Start::New { .. } => None,
        };
        let (dev_id, thread) = await_start(ready_rx, thread, START_TIMEOUT, known, remove_now)?;
        Ok(Device {
            dev_id,
            recoverable: features.recovery(),
            size,
            thread: Some(thread),
        })
    }

    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    pub fn path(&self) -> PathBuf {
        bdev_path(self.dev_id)
    }

    /// The size the device serves now.
    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A handle that can grow this device from a blocking thread (see [`Resizer::resize`]).
    pub fn resizer(&self) -> Resizer {
        Resizer {
            dev_id: self.dev_id,
            size: self.size.clone(),
        }
    }

    /// Whether a daemon restart can take this device over.
    pub fn recoverable(&self) -> bool {
        self.recoverable
    }

    /// Stops and removes the device. The caller has made sure nothing has it mounted.
    pub fn stop(mut self) -> Result<(), DeviceError> {
        let dev_id = self.dev_id;
        let ctrl = open_ctrl(dev_id)?;
        ctrl.kill_dev().map_err(|e| DeviceError::Control {
            dev_id,
            what: "STOP_DEV",
            error: describe(&e),
        })?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        delete(dev_id)
    }
}

/// What a device's control thread reports while it brings the device up.
#[derive(Debug)]
enum Progress {
    /// The kernel has the device (ADD_DEV or START_USER_RECOVERY done); not serving yet.
    Added(u32),
    /// `/dev/ublkbN` serves IO.
    Started(u32),
    Failed(DeviceError),
}

/// Stops and removes a device this process gave up on (best effort: it is already an error
/// path). Stopping it also ends its control thread's `run_target`.
fn remove_now(dev_id: u32) {
    if let Ok(ctrl) = open_ctrl(dev_id)
        && let Err(e) = ctrl.kill_dev()
    {
        tracing::warn!(dev_id, error = %describe(&e), "stopping an abandoned ublk device");
    }
    if let Err(e) = delete(dev_id) {
        tracing::warn!(dev_id, error = %e, "removing an abandoned ublk device");
    }
}

/// Waits for the control thread to report the device started. On a timeout the device is
/// not left behind unrecorded: a device the kernel already has is removed at once, and a
/// reaper thread removes one that comes up later and joins the control thread, so neither a
/// serving device nor its threads outlive the error.
fn await_start(
    ready: mpsc::Receiver<Progress>,
    thread: JoinHandle<()>,
    timeout: Duration,
    known: Option<u32>,
    remove: impl Fn(u32) + Send + 'static,
) -> Result<(u32, JoinHandle<()>), DeviceError> {
    let deadline = Instant::now() + timeout;
    let mut added = known;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match ready.recv_timeout(wait) {
            Ok(Progress::Added(id)) => added = Some(id),
            Ok(Progress::Started(id)) => return Ok((id, thread)),
            Ok(Progress::Failed(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(dev_id = ?added, ?timeout,
                    "ublk device did not come up in time; removing it");
                if let Some(id) = added {
                    remove(id);
                }
                let reaper =
                    std::thread::Builder::new()
                        .name("ublk-reap".into())
                        .spawn(move || {
                            let mut removed: Vec<u32> = added.into_iter().collect();
                            for p in ready.iter() {
                                if let Progress::Started(id) | Progress::Added(id) = p
                                    && !removed.contains(&id)
                                {
                                    remove(id);
                                    removed.push(id);
                                }
                            }
                            let _ = thread.join();
                        });
                if let Err(e) = reaper {
                    tracing::warn!(error = %e, "no reaper thread for an abandoned ublk device");
                }
                return Err(DeviceError::StartTimeout(timeout));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                return Err(DeviceError::Create(
                    "device thread ended before the device started".into(),
                ));
            }
        }
    }
}

/// Body of a device's control thread: build, start, serve until stopped.
fn serve_device<T: BlockTarget>(
    opts: DeviceOptions,
    start: Start,
    features: Features,
    target: Arc<T>,
    rt: Handle,
    size: Arc<AtomicU64>,
    ready: mpsc::SyncSender<Progress>,
) {
    let ctrl = match build_ctrl(&opts, start, features) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Progress::Failed(e));
            return;
        }
    };
    let info = ctrl.dev_info();
    let dev_id = info.dev_id;
    let _ = ready.send(Progress::Added(dev_id));
    let depth = info.queue_depth;
    let links = match (0..info.nr_hw_queues)
        .map(|_| bridge::spawn_queue(&rt, target.clone(), depth))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(l) => Arc::new(l),
        Err(e) => {
            let _ = ready.send(Progress::Failed(e.into()));
            return;
        }
    };
    let geometry = opts.geometry;
    let initial_size = geometry.size_bytes;
    let started = ready.clone();
    let result = ctrl.run_target(
        move |dev| {
            let io_buf = dev.dev_info.max_io_buf_bytes;
            dev.set_default_params(initial_size);
            dev.tgt.params = params::ublk_params(&geometry, io_buf);
            // One extra submission for the doorbell read; completions get headroom.
            dev.tgt.sq_depth = depth.saturating_add(1);
            dev.tgt.cq_depth = depth.saturating_mul(2).saturating_add(2);
            Ok(())
        },
        move |qid, dev| {
            if let Some(link) = links.get(usize::from(qid)) {
                queue::run(qid, dev, link.clone(), size.clone());
            }
        },
        move |ctrl| {
            tracing::info!(dev_id = ctrl.dev_info().dev_id, "ublk device started");
            let _ = started.send(Progress::Started(ctrl.dev_info().dev_id));
        },
    );
    match result {
        Ok(_) => tracing::info!(dev_id, "ublk device stopped"),
        Err(e) => {
            let err = DeviceError::Control {
                dev_id,
                what: "START_DEV",
                error: describe(&e),
            };
            tracing::error!(dev_id, error = %err, "ublk device failed");
            let _ = ready.send(Progress::Failed(err));
        }
    }
}

fn build_ctrl(
    opts: &DeviceOptions,
    start: Start,
    features: Features,
) -> Result<UblkCtrl, DeviceError> {
    let io_buf = params::io_buf_bytes(&opts.geometry);
    let builder = UblkCtrlBuilder::default()
        .name("enbd")
        .nr_queues(opts.queues.max(1))
        .depth(opts.queue_depth.max(1))
        .io_buf_bytes(io_buf);
    match start {
        Start::New { dev_id } => {
            let mut flags = 0u64;
            if features.recovery() {
                flags |= u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
            }
            if features.update_size() {
                flags |= u64::from(sys::UBLK_F_UPDATE_SIZE);
            }
            let id = dev_id.and_then(|d| i32::try_from(d).ok()).unwrap_or(-1);
            builder
                .id(id)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| DeviceError::Create(describe(&e)))
        }
        Start::Recover { dev_id } => {
            let old = open_ctrl(dev_id)?;
            let state = DeviceState::from(old.dev_info().state);
            if state != DeviceState::Quiesced {
                return Err(DeviceError::NotRecoverable { dev_id, state });
            }
            old.start_user_recover().map_err(|e| DeviceError::Control {
                dev_id,
                what: "START_USER_RECOVERY",
                error: describe(&e),
            })?;
            let info = old.dev_info();
            drop(old);
            builder
                .id(dev_id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| DeviceError::Control {
                    dev_id,
                    what: "recover",
                    error: describe(&e),
                })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A control thread that comes up too late: `Added` in time, `Started` after the deadline.
    #[test]
    fn a_start_that_times_out_removes_the_device_and_reaps_its_thread() {
        let (tx, rx) = mpsc::sync_channel(4);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (removed_tx, removed) = mpsc::channel::<u32>();
        let thread = std::thread::spawn(move || {
            tx.send(Progress::Added(41)).unwrap();
            go_rx.recv().unwrap();
            let _ = tx.send(Progress::Started(41));
            // A second device id would be a bug, but must not escape either.
            let _ = tx.send(Progress::Started(42));
        });
        let remove = move |id| removed_tx.send(id).unwrap();
        let err = await_start(rx, thread, Duration::from_millis(50), None, remove)
            .map(|(id, _)| id)
            .expect_err("must time out");
        assert!(matches!(err, DeviceError::StartTimeout(_)), "{err}");
        let wait = Duration::from_secs(10);
        assert_eq!(removed.recv_timeout(wait), Ok(41), "removed at the timeout");
        go_tx.send(()).unwrap();
        // The reaper sees the late reports: 41 again is not removed twice, 42 is.
        assert_eq!(removed.recv_timeout(wait), Ok(42));
        // The reaper ends (dropping the remover) once the control thread is gone.
        assert_eq!(
            removed.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn start_reports_success_and_failure() {
        let (tx, rx) = mpsc::sync_channel(4);
        let thread = std::thread::spawn(move || {
            tx.send(Progress::Added(3)).unwrap();
            tx.send(Progress::Started(3)).unwrap();
        });
        let (id, t) = await_start(rx, thread, Duration::from_secs(10), None, |_| {
            unreachable!("nothing to remove")
        })
        .expect("started");
        assert_eq!(id, 3);
        t.join().unwrap();

        let (tx, rx) = mpsc::sync_channel(4);
        let thread = std::thread::spawn(move || {
            tx.send(Progress::Failed(DeviceError::Create("no".into())))
                .unwrap();
        });
        let err = await_start(rx, thread, Duration::from_secs(10), None, |_| {
            unreachable!("nothing to remove")
        })
        .map(|(id, _)| id)
        .expect_err("failed");
        assert!(matches!(err, DeviceError::Create(_)));
    }
}
