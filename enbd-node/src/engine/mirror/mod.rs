//! The mirror: one volume over several replicas, each a [`Client`](crate::engine::Client)
//! (channels + journal) on its own enbd-server, with the same IO API as a single `Client`.
//!
//! Membership lives with the data: every replica's server keeps the volume's membership
//! record (generation + member states) and, for members that are OUT, a write-intent bitmap
//! of the regions written meanwhile. This layer is the only writer of those records; the
//! rules are in [`membership`], the copy of missed regions in [`resync`], the ordering of
//! copies against application writes in [`regions`].
//!
//! Invariants:
//! - a write (TRIM, WRITE_ZEROES) is acknowledged upward only when every in-sync replica
//!   acknowledged it, or when the replicas that did not are recorded OUT — with the ranges
//!   they may have missed marked dirty — durably on every surviving in-sync replica;
//! - reads are served by in-sync replicas only; a replica reporting an older generation
//!   than the record in force is never read and never a resync source;
//! - the last in-sync replica is never dropped: if every in-sync replica fails, IO waits
//!   (brownout `Wait`) or fails with EIO (`FailAfter`);
//! - every membership change excludes in-flight writes (the `membership` lock): a write is
//!   fanned out entirely under one record, so a server's bitmap never misses a write that
//!   a member did not receive.
//!
//! - a region is in the activity log ([`activity`]) on every replica receiving writes
//!   before a mutation of it is sent; regions where replicas may differ (the log found at
//!   an open after an unclean stop, a mutation that failed everywhere) are read from one
//!   replica only until copied from it to the others.
//!
//! The size grows online only ([`grow`]); the replica set
//! changes only by an operator's replacement ([`replace`]), which keeps each member's slot.

pub mod activity;
pub mod backend;
pub mod grow;
pub mod membership;
pub mod regions;
pub mod replace;
pub mod resync;

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod fake;
#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use thiserror::Error;
use tokio::sync::{RwLock, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::activity::{ActivityConfig, ActivityLog, Batch};
use self::backend::{
    ClientConnector, ControlError, DataConnector, ExtraDirty, GrpcControl, ReplicaControl,
    ReplicaData,
};
use self::membership::{Endpoint, MemberState, OpenPlan, Probe, Record, Report};
use self::regions::RegionLocks;
use super::status::{MirrorState, MirrorStatus, ReplicaHealth, ReplicaStatus};
use super::{BrownoutPolicy, ClientConfig, Geometry, IoError};

/// Most `extra_dirty` ranges a server takes in one SetMembership call.
const MAX_EXTRA_RANGES: usize = 65536;

/// One replica as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Stable identity: the `--server-id` of the enbd-server holding it.
    pub id: String,
    /// NBD data address, `HOST:PORT`.
    pub nbd: String,
    /// Management gRPC address, `HOST:PORT`.
    pub mgmt: String,
}

/// Everything a mirror needs to serve one volume.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Volume name (its NBD export name) on every replica's server.
    pub volume: String,
    pub replicas: Vec<ReplicaConfig>,
    /// Template for each replica's `Client` (channels, journal, timeouts); its `servers`,
    /// `export` and `brownout` are set per replica.
    pub client: ClientConfig,
    /// Volume-level policy when no in-sync replica can take IO.
    pub brownout: BrownoutPolicy,
    /// A replica that does not acknowledge within this time has failed (each replica's
    /// Client runs with `FailAfter(replica_timeout)`).
    pub replica_timeout: Duration,
    /// Bitmap granularity written into the first record.
    pub region_bytes: u32,
    /// Resync copy limit in bytes per second (`None`: unlimited).
    pub resync_bytes_per_sec: Option<u64>,
    /// Regions copied between a flush of the target and the clearing of their bits.
    pub resync_batch: usize,
    /// How often absent replicas are looked for.
    pub probe_interval: Duration,
    /// Client TLS for `https://` management addresses (CA + the node's certificate).
    pub mgmt_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The activity log's capacity and idle time.
    pub activity: ActivityConfig,
}

impl MirrorConfig {
    /// The management client of the replica whose server is at `mgmt`, with this volume's
    /// TLS and access token.
    pub(crate) fn control(&self, mgmt: &str) -> Result<GrpcControl, ControlError> {
        GrpcControl::new(
            mgmt,
            &self.volume,
            self.replica_timeout,
            self.mgmt_tls.as_ref(),
            self.client.access.as_deref(),
        )
    }

    pub fn new(volume: impl Into<String>, replicas: Vec<ReplicaConfig>) -> Self {
        let volume = volume.into();
        Self {
            client: ClientConfig::new("127.0.0.1:1", volume.clone()),
            volume,
            replicas,
            brownout: BrownoutPolicy::Wait,
            replica_timeout: Duration::from_secs(5),
            region_bytes: 1 << 20,
            resync_bytes_per_sec: None,
            resync_batch: 16,
            probe_interval: Duration::from_secs(1),
            mgmt_tls: None,
            activity: ActivityConfig::default(),
        }
    }

    fn validate(&self) -> Result<(), MirrorError> {
        if self.replicas.is_empty() {
            return Err(MirrorError::Config("no replicas configured".into()));
        }
        let mut ids: Vec<&str> = self.replicas.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(MirrorError::Config(format!(
                "replica ids must be distinct: {ids:?}"
            )));
        }
        if !self.region_bytes.is_power_of_two() || !(4096..=64 << 20).contains(&self.region_bytes) {
            return Err(MirrorError::Config(format!(
                "region_bytes {} must be a power of two from 4 KiB to 64 MiB",
                self.region_bytes
            )));
        }
        if self.replica_timeout.is_zero() || self.resync_batch == 0 || self.activity.capacity == 0 {
            return Err(MirrorError::Config(
                "replica_timeout, resync_batch and the activity log's capacity must be positive"
                    .into(),
            ));
        }
        self.client
            .validate()
            .map_err(|e| MirrorError::Config(e.to_string()))
    }

    /// The Client configuration of replica `r`.
    pub fn client_config(&self, r: &ReplicaConfig) -> ClientConfig {
        let mut c = self.client.clone();
        c.servers = vec![r.nbd.clone()];
        c.export = self.volume.clone();
        c.brownout = BrownoutPolicy::FailAfter(self.replica_timeout);
        c
    }
}

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error("invalid mirror configuration: {0}")]
    Config(String),
    #[error("volume {volume} cannot be opened: {why}")]
    Refused { volume: String, why: String },
    #[error("replica {id}: {why}")]
    Replica { id: String, why: String },
}

/// The pieces of one replica the mirror talks to.
pub struct Backend {
    pub control: Arc<dyn ReplicaControl>,
    pub connector: Arc<dyn DataConnector>,
}

/// A mirrored volume. Cheap to clone; the last clone's drop stops the background tasks.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
    _stop_on_drop: Arc<tokio_util::sync::DropGuard>,
}

/// What the mirror currently holds to be true.
struct View {
    record: Record,
    /// IO waits while set: why.
    blocked: Option<String>,
}

pub(crate) struct Replica {
    pub cfg: ReplicaConfig,
    pub control: Arc<dyn ReplicaControl>,
    connector: Arc<dyn DataConnector>,
    data: Mutex<Option<Arc<dyn ReplicaData>>>,
    /// Writes sent to it and not acknowledged by it: seq → (offset, length).
    pending: Mutex<HashMap<u64, (u64, u64)>>,
    /// Regions of writes it acknowledged since its last successful flush (a server crash may
    /// still lose them).
    unflushed: Mutex<BTreeSet<u64>>,
    reported_generation: AtomicU64,
    reachable: AtomicBool,
    reads: AtomicU64,
    reads_in_flight: AtomicU64,
    writes: AtomicU64,
    last_error: Mutex<Option<String>>,
    pub resync: resync::Progress,
}

impl Replica {
    fn new(cfg: ReplicaConfig, b: Backend) -> Self {
        Replica {
            cfg,
            control: b.control,
            connector: b.connector,
            data: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            unflushed: Mutex::new(BTreeSet::new()),
            reported_generation: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            reads_in_flight: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            last_error: Mutex::new(None),
            resync: resync::Progress::default(),
        }
    }

    pub(crate) fn data(&self) -> Option<Arc<dyn ReplicaData>> {
        lock(&self.data).clone()
    }

    fn set_error(&self, e: impl ToString) {
        *lock(&self.last_error) = Some(e.to_string());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain field update: a poisoned value is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Inner {
    /// `cfg.replicas` is the set the mirror was opened with; the set in force is `slots`.
    pub cfg: MirrorConfig,
    /// One per replica, in record order. A slot changes hands only by a replacement, made
    /// under the exclusive `membership` lock, so a fan-out (which holds it shared) sees one
    /// replica per slot throughout; an index held across that lock may name the successor,
    /// whose state in the record is then checked afresh.
    slots: Vec<Mutex<Arc<Replica>>>,
    /// The geometry at open; its size is superseded by `size` (online growth).
    geometry: Geometry,
    size: AtomicU64,
    /// Resync copy limit in bytes per second; 0 = unlimited. Starts as configured.
    resync_limit: AtomicU64,
    /// Writes hold it shared across their fan-out; membership changes hold it exclusively.
    pub membership: RwLock<()>,
    view: Mutex<View>,
    /// Bumped on every view change (waiters re-check).
    changed: watch::Sender<u64>,
    pub regions: RegionLocks,
    /// The highest generation ever attempted; new records use more.
    top_generation: AtomicU64,
    seq: AtomicU64,
    rr: AtomicUsize,
    pub resync_copied: AtomicU64,
    pub(crate) al: ActivityLog,
    /// Requests held because no in-sync replica could take them (the `Waiting` state).
    held: AtomicUsize,
    cancel: CancellationToken,
    tasks: TaskTracker,
    stopped: AtomicBool,
}

/// A mutating request, fanned out to every replica that receives writes.
#[derive(Clone)]
enum Mutation {
    Write { data: Bytes, fua: bool },
    Trim,
    WriteZeroes { no_hole: bool },
    Flush,
}

/// The outcome of one leg (one replica) of a fan-out.
enum Leg {
    Ok,
    Fault,
    /// The caller's mistake (range, read-only, unsupported): no replica is to blame.
    Refused(IoError),
}

/// Failures that say the replica is unhealthy, as opposed to a bad request.
fn is_fault(e: &IoError) -> bool {
    !matches!(
        e,
        IoError::OutOfRange { .. }
            | IoError::Invalid { .. }
            | IoError::ReadOnly
            | IoError::Unsupported(_)
    )
}

impl Mirror {
    /// Opens the volume on real servers: a `GrpcControl` and a `Client` per replica.
    pub async fn open(cfg: MirrorConfig) -> Result<Mirror, MirrorError> {
        cfg.validate()?;
        // The set in force may differ from the one given (a replacement since).
        let mut cfg = cfg;
        cfg.replicas = replace::follow(&cfg).await?;
        cfg.validate()?;
        let mut backends = Vec::with_capacity(cfg.replicas.len());
        for r in &cfg.replicas {
            let control = cfg.control(&r.mgmt).map_err(|e| MirrorError::Replica {
                id: r.id.clone(),
                why: e.0,
            })?;
            backends.push(Backend {
                control: Arc::new(control),
                connector: Arc::new(ClientConnector(cfg.client_config(r))),
            });
        }
        Self::open_with(cfg, backends).await
    }

    /// Opens the volume over the given backends (one per `cfg.replicas` entry, same order).
    ///
    /// Asks every replica for its record and applies [`membership::plan_open`]: a first
    /// record for fresh volumes, the newest record otherwise; a mirror whose in-sync members
    /// cannot all be asked opens in the waiting state (IO waits, `status().waiting` says
    /// why) and serves once they answer. Members that are OUT or RESYNCING and reachable
    /// are resynced in the background.
    pub async fn open_with(
        cfg: MirrorConfig,
        backends: Vec<Backend>,
    ) -> Result<Mirror, MirrorError> {
        cfg.validate()?;
        if backends.len() != cfg.replicas.len() {
            return Err(MirrorError::Config(format!(
                "{} backends for {} replicas",
                backends.len(),
                cfg.replicas.len()
            )));
        }
        let replicas: Vec<Replica> = cfg
            .replicas
            .iter()
            .zip(backends)
            .map(|(rc, b)| Replica::new(rc.clone(), b))
            .collect();
        // Data paths first: the geometry comes from the first that connects.
        let timeout = cfg.client.connect_timeout + cfg.replica_timeout;
        let conns =
            join_all(replicas.iter().map(|r| async move {
                tokio::time::timeout(timeout, r.connector.connect()).await
            }))
            .await;
        let mut geometry: Option<Geometry> = None;
        for (r, c) in replicas.iter().zip(conns) {
            match c {
                Ok(Ok(d)) => {
                    let g = d.geometry();
                    match geometry {
                        None => geometry = Some(g),
                        Some(first) if first.size != g.size => {
                            r.set_error(format!(
                                "export size {} differs from the other replicas' {}",
                                g.size, first.size
                            ));
                            d.shutdown().await;
                            continue;
                        }
                        Some(_) => {}
                    }
                    *lock(&r.data) = Some(d);
                }
                Ok(Err(e)) => r.set_error(e),
                Err(_) => r.set_error("data connection timed out"),
            }
        }
        let geometry = geometry.ok_or_else(|| MirrorError::Refused {
            volume: cfg.volume.clone(),
            why: "no replica's data path could be connected".into(),
        })?;
        let region_bytes = cfg.region_bytes;
        let activity_cfg = cfg.activity;
        let resync_limit = AtomicU64::new(cfg.resync_bytes_per_sec.unwrap_or(0));
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            regions: RegionLocks::new(region_bytes),
            cfg,
            slots: replicas
                .into_iter()
                .map(|r| Mutex::new(Arc::new(r)))
                .collect(),
            size: AtomicU64::new(geometry.size),
            resync_limit,
            geometry,
            membership: RwLock::new(()),
            view: Mutex::new(View {
                record: Record::none(),
                blocked: Some("opening".into()),
            }),
            changed,
            top_generation: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            rr: AtomicUsize::new(0),
            resync_copied: AtomicU64::new(0),
            al: ActivityLog::new(activity_cfg),
            held: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stopped: AtomicBool::new(false),
        });
        {
            let _w = inner.membership.write().await;
            if let Err(why) = inner.replan().await {
                return Err(MirrorError::Refused {
                    volume: inner.cfg.volume.clone(),
                    why,
                });
            }
        }
        inner.tasks.spawn(supervise(inner.clone()));
        let stop = Arc::new(inner.cancel.clone().drop_guard());
        Ok(Mirror {
            inner,
            _stop_on_drop: stop,
        })
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.inner.size(),
            ..self.inner.geometry
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.inner.check_range(offset, u64::from(len))?;
        let deadline = self.inner.deadline();
        if self.inner.al.any_unsynced(offset, u64::from(len)) {
            // Bring the replicas together first; if that cannot be done now, the read is
            // served by the source alone (`read_candidates`).
            self.inner.wait_unblocked(deadline).await?;
            let regions = self
                .inner
                .al
                .unsynced(Some(self.inner.al.span(offset, u64::from(len))));
            if let Err(why) = self.inner.al_sync(&regions).await {
                tracing::warn!(volume = %self.inner.cfg.volume, %why,
                    "activity-log regions not synced before a read: read from the source only");
            }
        }
        self.inner.read(offset, len, deadline).await
    }

    /// Writes `data` at `offset` on every replica that receives writes; with `fua` it is
    /// durable on every in-sync replica when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.inner.check_range(offset, len)?;
        self.inner
            .mutate(offset, len, Mutation::Write { data, fua })
            .await
    }

    /// Makes every write completed before this call durable on every in-sync replica.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.inner.mutate(0, 0, Mutation::Flush).await
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.inner.check_range(offset, u64::from(len))?;
        self.inner
            .mutate(offset, u64::from(len), Mutation::Trim)
            .await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), IoError> {
        self.inner.check_range(offset, u64::from(len))?;
        self.inner
            .mutate(offset, u64::from(len), Mutation::WriteZeroes { no_hole })
            .await
    }

    pub fn status(&self) -> MirrorStatus {
        self.inner.status()
    }

    /// Operator action: make `replica_id` the only in-sync replica, at a generation above
    /// every one the reachable replicas report (by [`PROMOTE_STRIDE`]), and every other member OUT with the whole
    /// volume dirty (they are fully resynced from it when they return).
    ///
    /// **What is lost**: every write that the promoted replica did not receive — everything
    /// acknowledged after it was dropped, if it was OUT or stale — is gone for good, on all
    /// replicas, once they are resynced from it. A replica that cannot be reached now and
    /// holds a generation above the promoted one would, when it returns, still win (hence the
    /// stride); promote only when the others are really lost. Nothing calls this automatically.
    pub async fn promote(&self, replica_id: &str) -> Result<Record, MirrorError> {
        let inner = &self.inner;
        let _w = inner.membership.write().await;
        let replicas = inner.replicas();
        let backends: Vec<&dyn ReplicaControl> =
            replicas.iter().map(|r| r.control.as_ref()).collect();
        let rec = promote_on(&inner.current_cfg(), &backends, replica_id, inner.size()).await?;
        inner
            .top_generation
            .fetch_max(rec.generation, Ordering::AcqRel);
        // A mirror that never served (it waited from its open) has not read the activity
        // log yet: the promoted replica's comes first, or IO keeps waiting until it can.
        match inner.al_load(&rec).await {
            Ok(()) => inner.set_view(rec.clone(), None),
            Err(why) => inner.set_view(rec.clone(), Some(why)),
        }
        Ok(rec)
    }

    /// Stops the background tasks and closes every replica's data path. Callers should stop
    /// submitting and wait for their IO first.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        // A clean close empties the activity log of every region with nothing in flight
        // and nothing unsynced, so the next open copies nothing.
        if inner.al.is_loaded() && lock(&inner.view).blocked.is_none() {
            inner.al_evict(Duration::ZERO).await;
        }
        inner.stopped.store(true, Ordering::Release);
        inner.cancel.cancel();
        inner.tasks.close();
        inner.tasks.wait().await;
        for r in &inner.replicas() {
            let d = lock(&r.data).take();
            if let Some(d) = d {
                d.shutdown().await;
            }
        }
        inner.changed.send_modify(|v| *v += 1);
    }
}

/// Operator action without an open mirror: see [`Mirror::promote`], whose warning applies.
pub async fn promote(cfg: &MirrorConfig, replica_id: &str) -> Result<Record, MirrorError> {
    cfg.validate()?;
    let mut controls = Vec::with_capacity(cfg.replicas.len());
    for r in &cfg.replicas {
        controls.push(cfg.control(&r.mgmt).map_err(|e| MirrorError::Replica {
            id: r.id.clone(),
            why: e.0,
        })?);
    }
    let refs: Vec<&dyn ReplicaControl> =
        controls.iter().map(|c| c as &dyn ReplicaControl).collect();
    let idx = cfg
        .replicas
        .iter()
        .position(|r| r.id == replica_id)
        .ok_or_else(|| MirrorError::Config(format!("{replica_id} is not a replica")))?;
    let size = refs[idx]
        .volume()
        .await
        .map_err(|e| MirrorError::Replica {
            id: replica_id.to_owned(),
            why: e.0,
        })?
        .size;
    promote_on(cfg, &refs, replica_id, size).await
}

/// How far above the highest generation seen a promotion writes its record: replicas that
/// could not be asked may hold a higher generation than any reachable one; this margin makes
/// the operator's decision win unless such a replica saw that many changes since.
pub const PROMOTE_STRIDE: u64 = 1 << 20;

/// Shared body of both promotes: writes the promoting record on the chosen replica (with the
/// whole volume dirty for every other member), then, best effort, on the others.
pub async fn promote_on(
    cfg: &MirrorConfig,
    controls: &[&dyn ReplicaControl],
    replica_id: &str,
    size: u64,
) -> Result<Record, MirrorError> {
    let ids: Vec<String> = cfg.replicas.iter().map(|r| r.id.clone()).collect();
    let idx = ids
        .iter()
        .position(|r| r == replica_id)
        .ok_or_else(|| MirrorError::Config(format!("{replica_id} is not a replica")))?;
    let records = join_all(controls.iter().map(|c| c.get_membership())).await;
    let chosen = records[idx].clone().map_err(|e| MirrorError::Replica {
        id: replica_id.to_owned(),
        why: format!("cannot promote an unreachable replica: {e}"),
    })?;
    let top = records
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.generation)
        .max()
        .unwrap_or(0);
    let region_bytes = if chosen.region_bytes != 0 {
        chosen.region_bytes
    } else {
        cfg.region_bytes
    };
    let mut rec = membership::promote(&ids, replica_id, top + PROMOTE_STRIDE, region_bytes);
    rec.endpoints = endpoints_of(&cfg.replicas);
    let extra: ExtraDirty = ids
        .iter()
        .filter(|m| *m != replica_id)
        .map(|m| (m.clone(), vec![(0, size)]))
        .collect();
    controls[idx]
        .set_membership(rec.clone(), extra)
        .await
        .map_err(|e| MirrorError::Replica {
            id: replica_id.to_owned(),
            why: format!("writing the promoting record: {e}"),
        })?;
    tracing::warn!(volume = %cfg.volume, replica = replica_id, generation = rec.generation,
        "promoted by operator: writes the other replicas held beyond it are discarded");
    for (i, c) in controls.iter().enumerate() {
        if i == idx {
            continue;
        }
        if let Err(e) = c.set_membership(rec.clone(), Vec::new()).await {
            tracing::warn!(volume = %cfg.volume, replica = %ids[i], error = %e,
                "could not tell a replica of the promotion (it is OUT all the same)");
        }
    }
    Ok(rec)
}

/// The endpoints a record written by this mirror names for its members.
fn endpoints_of(replicas: &[ReplicaConfig]) -> BTreeMap<String, Endpoint> {
    replicas
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                Endpoint {
                    nbd: r.nbd.clone(),
                    mgmt: r.mgmt.clone(),
                },
            )
        })
        .collect()
}

impl Inner {
    /// The configuration with the replica set in force.
    pub(crate) fn current_cfg(&self) -> MirrorConfig {
        let mut c = self.cfg.clone();
        c.replicas = self.replicas().iter().map(|r| r.cfg.clone()).collect();
        c
    }

    pub(crate) fn replica(&self, i: usize) -> Arc<Replica> {
        lock(&self.slots[i]).clone()
    }

    /// The replicas in force, in slot order.
    pub(crate) fn replicas(&self) -> Vec<Arc<Replica>> {
        self.slots.iter().map(|s| lock(s).clone()).collect()
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn resync_limit(&self) -> Option<u64> {
        Some(self.resync_limit.load(Ordering::Relaxed)).filter(|b| *b > 0)
    }

    pub(crate) fn set_resync_limit(&self, bytes_per_sec: Option<u64>) {
        self.resync_limit
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    fn deadline(&self) -> Option<Instant> {
        match self.cfg.brownout {
            BrownoutPolicy::Wait => None,
            BrownoutPolicy::FailAfter(d) => Some(Instant::now() + d),
        }
    }

    fn timeout_error(&self) -> IoError {
        match self.cfg.brownout {
            BrownoutPolicy::FailAfter(d) => IoError::BrownoutTimeout(d),
            BrownoutPolicy::Wait => IoError::Shutdown,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let size = self.size();
        if len as usize > super::MAX_REQUEST_BYTES {
            return Err(IoError::Invalid {
                len,
                why: "larger than the engine's request limit",
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::OutOfRange { offset, len, size }),
        }
    }

    pub(crate) fn record(&self) -> Record {
        lock(&self.view).record.clone()
    }

    pub(crate) fn state_of(&self, idx: usize) -> Option<MemberState> {
        lock(&self.view).record.state_of(&self.replica(idx).cfg.id)
    }

    fn set_view(&self, record: Record, blocked: Option<String>) {
        {
            let mut v = lock(&self.view);
            v.record = record;
            v.blocked = blocked;
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn next_generation(&self, current: u64) -> u64 {
        let g = self
            .top_generation
            .fetch_max(current, Ordering::AcqRel)
            .max(current)
            + 1;
        self.top_generation.fetch_max(g, Ordering::AcqRel);
        g
    }

    /// Waits until IO may proceed (no blocking reason), or the deadline.
    async fn wait_unblocked(&self, deadline: Option<Instant>) -> Result<(), IoError> {
        let mut rx = self.changed.subscribe();
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Err(IoError::Shutdown);
            }
            if lock(&self.view).blocked.is_none() {
                return Ok(());
            }
            match deadline {
                None => {
                    let _ = rx.changed().await;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.timeout_error());
                    }
                    let _ = tokio::time::timeout(left, rx.changed()).await;
                }
            }
        }
    }

    /// Pause between attempts when no in-sync replica could take a request.
    async fn pause(&self, deadline: Option<Instant>) -> Result<(), IoError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(IoError::Shutdown);
        }
        let step = Duration::from_millis(50);
        match deadline {
            Some(d) if Instant::now() >= d => Err(self.timeout_error()),
            Some(d) => {
                tokio::time::sleep(step.min(d.saturating_duration_since(Instant::now()))).await;
                Ok(())
            }
            None => {
                tokio::time::sleep(step).await;
                Ok(())
            }
        }
    }

    /// In-sync replicas with a data path, least-loaded first (ties broken round-robin); only
    /// the activity log's source while the range has unsynced regions.
    fn read_candidates(&self, offset: u64, len: u64) -> Vec<(usize, Arc<dyn ReplicaData>)> {
        if self.al.any_unsynced(offset, len) {
            return self
                .al_source()
                .and_then(|i| self.replica(i).data().map(|d| vec![(i, d)]))
                .unwrap_or_default();
        }
        let rec = self.record();
        let n = self.slots.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut c: Vec<(usize, Arc<dyn ReplicaData>)> = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| rec.state_of(&self.replica(i).cfg.id) == Some(MemberState::InSync))
            .filter_map(|i| self.replica(i).data().map(|d| (i, d)))
            .collect();
        c.sort_by_key(|(i, _)| self.replica(*i).reads_in_flight.load(Ordering::Relaxed));
        c
    }

    /// Reads from an in-sync replica, trying the next one on a failure; replicas that failed
    /// while another served the read are dropped (in the background).
    pub(crate) async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        deadline: Option<Instant>,
    ) -> Result<Bytes, IoError> {
        let mut held = Held::new(&self.held);
        loop {
            self.wait_unblocked(deadline).await?;
            let mut failed = Vec::new();
            for (i, d) in self.read_candidates(offset, u64::from(len)) {
                let r = self.replica(i);
                r.reads_in_flight.fetch_add(1, Ordering::Relaxed);
                let res = d.read(offset, len).await;
                r.reads_in_flight.fetch_sub(1, Ordering::Relaxed);
                match res {
                    Ok(b) => {
                        r.reads.fetch_add(1, Ordering::Relaxed);
                        if !failed.is_empty() {
                            let me = self.clone();
                            self.tasks.spawn(async move {
                                let _ = me.drop_replicas(failed).await;
                            });
                        }
                        return Ok(b);
                    }
                    Err(e) if !is_fault(&e) => return Err(e),
                    Err(e) => {
                        tracing::warn!(volume = %self.cfg.volume, replica = %r.cfg.id, error = %e,
                            "read failed: trying another in-sync replica");
                        r.set_error(&e);
                        failed.push(i);
                    }
                }
            }
            held.set();
            self.pause(deadline).await?;
        }
    }

    async fn mutate(self: &Arc<Self>, offset: u64, len: u64, m: Mutation) -> Result<(), IoError> {
        if self.geometry.read_only && !matches!(m, Mutation::Flush) {
            return Err(IoError::ReadOnly);
        }
        let deadline = self.deadline();
        // Ordered against resync copies of the same regions for the whole attempt.
        let _regions = self.regions.write_range(offset, len).await;
        // One key for every attempt: a replica that takes a retry clears what it missed.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // In the activity log from the first attempt until this returns (or is dropped).
        let mut hold = AlHold {
            al: &self.al,
            regions: None,
            clean: false,
        };
        let mut held = Held::new(&self.held);
        loop {
            self.wait_unblocked(deadline).await?;
            if hold.regions.is_none() && self.cfg.activity.enabled && !matches!(m, Mutation::Flush)
            {
                let regions = self.al.span(offset, len);
                // Counted in flight before marking: no eviction can undo our marks.
                self.al.enter(regions.clone());
                hold.regions = Some(regions);
            }
            if let Some(regions) = hold.regions.clone()
                && !self.al.durable(regions.clone())
            {
                let marked = {
                    let _shared = self.membership.read().await;
                    self.al_mark(regions).await
                };
                if let Err(failed) = marked {
                    // A replica that cannot log activity cannot take writes safely: drop it
                    // (nothing of this write was sent yet); the last in-sync one waits.
                    if let Err(why) = self.drop_replicas(failed).await {
                        tracing::warn!(volume = %self.cfg.volume, %why,
                            "activity log not durable on every replica: retrying");
                        held.set();
                        self.pause(deadline).await?;
                    }
                    continue;
                }
            }
            let (legs, in_sync_ok, faulted, indexes) = {
                let _shared = self.membership.read().await;
                let rec = self.record();
                let targets: Vec<(usize, MemberState)> = self
                    .replicas()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| match rec.state_of(&r.cfg.id) {
                        Some(s @ (MemberState::InSync | MemberState::Resyncing)) => Some((i, s)),
                        _ => None,
                    })
                    .collect();
                let legs = join_all(
                    targets
                        .iter()
                        .map(|&(i, _)| self.leg(i, seq, offset, len, m.clone())),
                )
                .await;
                let mut in_sync_ok = 0usize;
                let mut faulted = Vec::new();
                for (&(i, s), leg) in targets.iter().zip(&legs) {
                    match leg {
                        Leg::Ok if s == MemberState::InSync => in_sync_ok += 1,
                        Leg::Fault => faulted.push(i),
                        _ => {}
                    }
                }
                let indexes: Vec<usize> = targets.iter().map(|&(i, _)| i).collect();
                (legs, in_sync_ok, faulted, indexes)
            };
            let mut refused = Vec::new();
            let mut first_refusal = None;
            for (&i, leg) in indexes.iter().zip(&legs) {
                if let Leg::Refused(e) = leg {
                    refused.push(i);
                    first_refusal.get_or_insert_with(|| e.clone());
                }
            }
            let applied = legs.iter().any(|l| matches!(l, Leg::Ok));
            if let Some(e) = first_refusal.filter(|_| !applied) {
                for &i in &indexes {
                    lock(&self.replica(i).pending).remove(&seq);
                }
                hold.clean = true;
                return Err(e);
            }
            // Refused by some replicas but applied by others: those that refused now differ,
            // which is a fault like any other.
            let mut faulted = faulted;
            faulted.extend(refused);
            if faulted.is_empty() {
                hold.clean = true;
                return Ok(());
            }
            if in_sync_ok > 0 {
                // Durable OUT records for the failed replicas before the acknowledgement.
                match self.drop_replicas(faulted).await {
                    Ok(()) => {
                        hold.clean = true;
                        return Ok(());
                    }
                    Err(why) => {
                        tracing::warn!(volume = %self.cfg.volume, %why, "could not record a drop: retrying the write");
                    }
                }
            }
            // No in-sync replica took it: nobody is dropped; the volume's policy decides.
            held.set();
            self.pause(deadline).await?;
        }
    }

    /// One replica's part of a fan-out, with its pending-write bookkeeping.
    async fn leg(&self, i: usize, seq: u64, offset: u64, len: u64, m: Mutation) -> Leg {
        let r = self.replica(i);
        let tracked = !matches!(m, Mutation::Flush);
        if tracked {
            lock(&r.pending).insert(seq, (offset, len));
        }
        let flushing = if matches!(m, Mutation::Flush) {
            std::mem::take(&mut *lock(&r.unflushed))
        } else {
            BTreeSet::new()
        };
        let Some(d) = r.data() else {
            if !flushing.is_empty() {
                lock(&r.unflushed).extend(flushing);
            }
            r.set_error("data path not connected");
            return Leg::Fault;
        };
        let len32 = len as u32;
        let res = match &m {
            Mutation::Write { data, fua } => d.write(offset, data.clone(), *fua).await,
            Mutation::Trim => d.trim(offset, len32).await,
            Mutation::WriteZeroes { no_hole } => d.write_zeroes(offset, len32, *no_hole).await,
            Mutation::Flush => d.flush().await,
        };
        match res {
            Ok(()) => {
                if tracked {
                    lock(&r.pending).remove(&seq);
                    let durable = matches!(m, Mutation::Write { fua: true, .. });
                    if !durable {
                        lock(&r.unflushed).extend(self.regions.span(offset, len));
                    }
                    r.writes.fetch_add(1, Ordering::Relaxed);
                }
                Leg::Ok
            }
            Err(e) if !is_fault(&e) => {
                // Still pending: if other replicas applied it, this one is dropped for it.
                lock(&r.unflushed).extend(flushing);
                Leg::Refused(e)
            }
            Err(e) => {
                // Stays pending: the drop marks its range dirty.
                lock(&r.unflushed).extend(flushing);
                r.set_error(&e);
                tracing::warn!(volume = %self.cfg.volume, replica = %r.cfg.id, error = %e, "replica failed a write");
                Leg::Fault
            }
        }
    }

    /// What replica `i` may have missed or may lose: its unacknowledged writes and the
    /// regions it acknowledged since its last flush, as region-aligned byte ranges (merged;
    /// the whole volume if there are more than a server takes in one call).
    fn suspect_ranges(&self, i: usize) -> Vec<(u64, u64)> {
        let r = self.replica(i);
        let mut regions: BTreeSet<u64> = lock(&r.unflushed).clone();
        for &(o, l) in lock(&r.pending).values() {
            regions.extend(self.regions.span(o, l));
        }
        // Regions where replicas may differ: whichever version the survivors keep, this
        // one must be brought to it.
        let arb = self.al.region_bytes();
        for u in self.al.unsynced(None) {
            regions.extend(self.regions.span(u * arb, arb));
        }
        let rb = u64::from(self.cfg.region_bytes);
        let size = self.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for reg in regions {
            match out.last_mut() {
                Some((o, l)) if *o + *l == reg * rb => *l += rb,
                _ => out.push((reg * rb, rb)),
            }
        }
        if out.len() > MAX_EXTRA_RANGES {
            return vec![(0, size)];
        }
        for (o, l) in &mut out {
            *l = (*l).min(size.saturating_sub(*o));
        }
        out.retain(|(_, l)| *l > 0);
        out
    }

    /// Records `failed` OUT (those still in sync or resyncing), with what they may have
    /// missed marked dirty, durably on every surviving in-sync and resyncing replica.
    /// Survivors that cannot take the record are dropped with them (at a higher generation).
    pub(crate) async fn drop_replicas(&self, failed: Vec<usize>) -> Result<(), String> {
        let _w = self.membership.write().await;
        self.drop_locked(failed).await
    }

    /// `drop_replicas` with the membership lock already held.
    pub(crate) async fn drop_locked(&self, failed: Vec<usize>) -> Result<(), String> {
        let mut set: BTreeSet<usize> = failed.into_iter().collect();
        loop {
            let rec = self.record();
            set.retain(|&i| {
                matches!(
                    rec.state_of(&self.replica(i).cfg.id),
                    Some(MemberState::InSync | MemberState::Resyncing)
                )
            });
            if set.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = set
                .iter()
                .map(|&i| self.replica(i).cfg.id.clone())
                .collect();
            let generation = self.next_generation(rec.generation);
            let next =
                membership::drop_members(&rec, &ids, generation).map_err(|e| e.to_string())?;
            let extra: ExtraDirty = set
                .iter()
                .map(|&i| (self.replica(i).cfg.id.clone(), self.suspect_ranges(i)))
                .collect();
            let failures = self.publish(&next, &extra, &[]).await;
            if failures.is_empty() {
                tracing::warn!(volume = %self.cfg.volume, dropped = ?ids, generation,
                    "replicas dropped: recorded OUT on every surviving replica");
                for &i in &set {
                    lock(&self.replica(i).pending).clear();
                    lock(&self.replica(i).unflushed).clear();
                }
                self.set_view(next, None);
                return Ok(());
            }
            set.extend(failures);
        }
    }

    /// Writes `record` (with `extra` dirty ranges) to every member it lists in sync or
    /// resyncing, plus `also`. Returns the indexes that failed to take it.
    pub(crate) async fn publish(
        &self,
        record: &Record,
        extra: &ExtraDirty,
        also: &[usize],
    ) -> Vec<usize> {
        // Every record this mirror writes names where its members are reached.
        let mut record = record.clone();
        record.endpoints = endpoints_of(&self.current_cfg().replicas);
        let record = &record;
        let targets: Vec<usize> = self
            .replicas()
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                also.contains(i)
                    || matches!(
                        record.state_of(&r.cfg.id),
                        Some(MemberState::InSync | MemberState::Resyncing)
                    )
            })
            .map(|(i, _)| i)
            .collect();
        self.top_generation
            .fetch_max(record.generation, Ordering::AcqRel);
        let results = join_all(targets.iter().map(|&i| {
            let r = self.replica(i);
            let rec = record.clone();
            let extra = extra.clone();
            async move {
                match tokio::time::timeout(
                    self.cfg.replica_timeout,
                    r.control.set_membership(rec, extra),
                )
                .await
                {
                    Ok(res) => res,
                    Err(_) => Err(ControlError("SetMembership timed out".into())),
                }
            }
        }))
        .await;
        let mut failed = Vec::new();
        for (&i, res) in targets.iter().zip(results) {
            let r = self.replica(i);
            match res {
                Ok(_) => {
                    r.reported_generation
                        .store(record.generation, Ordering::Release);
                    r.reachable.store(true, Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(volume = %self.cfg.volume, replica = %r.cfg.id, error = %e,
                        generation = record.generation, "replica did not take a membership record");
                    r.set_error(format!("SetMembership: {e}"));
                    r.reachable.store(false, Ordering::Release);
                    failed.push(i);
                }
            }
        }
        failed
    }

    /// Asks every replica for its record and volume facts.
    async fn probe_all(&self) -> Vec<Probe> {
        let t = self.cfg.replica_timeout;
        join_all(self.replicas().iter().map(|r| async move {
            let asked = tokio::time::timeout(t, async {
                let rec = r.control.get_membership().await?;
                let facts = r.control.volume().await?;
                Ok::<_, ControlError>(Report {
                    record: rec,
                    size: facts.size,
                    fresh: facts.fresh,
                })
            })
            .await;
            let probe = match asked {
                Ok(Ok(rep)) => {
                    r.reported_generation
                        .store(rep.record.generation, Ordering::Release);
                    r.reachable.store(true, Ordering::Release);
                    Probe::Reached(rep)
                }
                Ok(Err(e)) => Probe::Unreachable(e.0),
                Err(_) => Probe::Unreachable("management call timed out".into()),
            };
            if let Probe::Unreachable(why) = &probe {
                r.reachable.store(false, Ordering::Release);
                r.set_error(why);
            }
            probe
        }))
        .await
    }

    /// Decides (again) what record is in force from what the replicas say, writes what the
    /// decision needs, and sets the view. Called with the membership lock held. `Err` only
    /// for a refusal; a wait is `Ok` with the view blocked.
    async fn replan(&self) -> Result<(), String> {
        let probes = self.probe_all().await;
        let ids: Vec<String> = self.replicas().iter().map(|r| r.cfg.id.clone()).collect();
        let size = self.size();
        for (r, p) in self.replicas().iter().zip(&probes) {
            if let Probe::Reached(rep) = p
                && rep.size != size
            {
                return Err(format!(
                    "replica {} has size {}, the data path says {size}",
                    r.cfg.id, rep.size
                ));
            }
        }
        match membership::plan_open(&ids, &probes, self.cfg.region_bytes) {
            OpenPlan::Refuse(why) => Err(why),
            OpenPlan::Wait { record, why } => {
                tracing::warn!(volume = %self.cfg.volume, %why, "mirror waits");
                self.top_generation
                    .fetch_max(record.generation, Ordering::AcqRel);
                self.set_view(record, Some(why));
                Ok(())
            }
            OpenPlan::Create(record) => {
                let all: Vec<usize> = (0..self.slots.len()).collect();
                let failed = self.publish(&record, &Vec::new(), &all).await;
                if !failed.is_empty() {
                    return Err(format!(
                        "the first membership record could not be written to {:?}",
                        failed
                            .iter()
                            .map(|&i| self.replica(i).cfg.id.clone())
                            .collect::<Vec<_>>()
                    ));
                }
                tracing::info!(volume = %self.cfg.volume, replicas = ?ids, "first membership record written: all in sync");
                if !self.al.is_loaded() {
                    // A first record: nothing was ever written through a mirror.
                    self.al.load(record.region_bytes, &BTreeSet::new());
                }
                self.set_view(record, None);
                self.drop_disconnected().await
            }
            OpenPlan::Serve {
                record,
                rewrite,
                full_dirty,
            } => {
                self.top_generation
                    .fetch_max(record.generation, Ordering::AcqRel);
                let record = match rewrite {
                    None => record,
                    Some(rw) => {
                        let rw = Record {
                            generation: self.next_generation(record.generation),
                            ..rw
                        };
                        let extra: ExtraDirty = full_dirty
                            .iter()
                            .map(|m| (m.clone(), vec![(0, size)]))
                            .collect();
                        let failed = self.publish(&rw, &extra, &[]).await;
                        if !failed.is_empty() {
                            let why = format!(
                                "recording stale replicas {full_dirty:?} OUT failed on some in-sync replica; retrying"
                            );
                            self.set_view(record, Some(why));
                            return Ok(());
                        }
                        tracing::warn!(volume = %self.cfg.volume, stale = ?full_dirty,
                            generation = rw.generation, "stale replicas recorded OUT, whole volume dirty for them");
                        rw
                    }
                };
                if let Err(why) = self.al_load(&record).await {
                    self.set_view(record, Some(why));
                    return Ok(());
                }
                self.set_view(record, None);
                self.drop_disconnected().await
            }
        }
    }

    /// In-sync members whose data path is not connected cannot take writes: drop them while
    /// another in-sync member can; if none can, IO waits.
    async fn drop_disconnected(&self) -> Result<(), String> {
        let rec = self.record();
        let mut without = Vec::new();
        let mut with = 0;
        for (i, r) in self.replicas().iter().enumerate() {
            if rec.state_of(&r.cfg.id) == Some(MemberState::InSync) {
                if r.data().is_some() {
                    with += 1;
                } else {
                    without.push(i);
                }
            }
        }
        if without.is_empty() {
            return Ok(());
        }
        if with == 0 {
            let why = "no in-sync replica's data path is connected".to_owned();
            self.set_view(rec, Some(why));
            return Ok(());
        }
        if let Err(why) = self.drop_locked(without).await {
            self.set_view(self.record(), Some(why));
        }
        Ok(())
    }

    fn status(&self) -> MirrorStatus {
        let (record, blocked) = {
            let v = lock(&self.view);
            (v.record.clone(), v.blocked.clone())
        };
        let replicas: Vec<ReplicaStatus> = self
            .replicas()
            .iter()
            .map(|r| {
                let data = r.data();
                let up = data.as_ref().is_some_and(|d| d.is_up());
                let reachable = r.reachable.load(Ordering::Acquire);
                let health = match record.state_of(&r.cfg.id) {
                    _ if !up || !reachable => ReplicaHealth::Down,
                    Some(MemberState::InSync) => ReplicaHealth::InSync,
                    Some(MemberState::Resyncing) => r.resync.health(),
                    _ => ReplicaHealth::Out,
                };
                ReplicaStatus {
                    id: r.cfg.id.clone(),
                    address: r.cfg.nbd.clone(),
                    mgmt_address: r.cfg.mgmt.clone(),
                    generation: r.reported_generation.load(Ordering::Acquire),
                    health,
                    reads: r.reads.load(Ordering::Relaxed),
                    writes: r.writes.load(Ordering::Relaxed),
                    last_error: lock(&r.last_error).clone(),
                    engine: data.and_then(|d| d.engine_status()),
                }
            })
            .collect();
        // IO is held, or would be: no in-sync replica can take it.
        let no_in_sync = !replicas.iter().any(|r| r.health == ReplicaHealth::InSync);
        let held = self.held.load(Ordering::Relaxed) > 0;
        let blocked = blocked.or_else(|| {
            (no_in_sync || held).then(|| {
                let parts: Vec<String> = replicas
                    .iter()
                    .map(|r| match &r.health {
                        ReplicaHealth::InSync => format!(
                            "{} in sync but failing IO ({})",
                            r.id,
                            r.last_error.as_deref().unwrap_or("no answer")
                        ),
                        ReplicaHealth::Down => format!("{} down", r.id),
                        ReplicaHealth::Out => format!("{} out", r.id),
                        ReplicaHealth::Resyncing {
                            to_copy, copied, ..
                        } => format!(
                            "{} resyncing {}%",
                            r.id,
                            if *to_copy == 0 {
                                0
                            } else {
                                copied.saturating_mul(100) / to_copy
                            }
                        ),
                    })
                    .collect();
                format!("no in-sync replica reachable: {}", parts.join("; "))
            })
        });
        let state = if self.stopped.load(Ordering::Acquire) {
            MirrorState::Stopped
        } else if blocked.is_some() {
            MirrorState::Waiting
        } else if replicas.iter().all(|r| r.health == ReplicaHealth::InSync) {
            MirrorState::Healthy
        } else {
            MirrorState::Degraded
        };
        MirrorStatus {
            state,
            generation: record.generation,
            replicas,
            waiting: blocked,
            resync_bytes_copied: self.resync_copied.load(Ordering::Relaxed),
            activity: self.al.status(),
        }
    }
}

/// Background work: re-plans while IO waits, reconnects absent data paths, and resyncs
/// members that are OUT or RESYNCING once they are reachable.
async fn supervise(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(inner.cfg.probe_interval) => {}
        }
        reconnect_data(&inner).await;
        if lock(&inner.view).blocked.is_some() {
            let _w = inner.membership.write().await;
            if let Err(why) = inner.replan().await {
                let rec = inner.record();
                inner.set_view(rec, Some(why));
            }
            continue;
        }
        // Regions where replicas may differ first: reads of them are not balanced until then.
        let unsynced = inner.al.unsynced(None);
        if !unsynced.is_empty()
            && let Err(why) = inner.al_sync(&unsynced).await
        {
            tracing::warn!(volume = %inner.cfg.volume, %why, "activity-log sync stopped early");
        }
        inner.al_evict(inner.cfg.activity.idle).await;
        // One member at a time: each pass copies from the in-sync ones.
        let candidates: Vec<usize> = (0..inner.slots.len())
            .filter(|&i| {
                matches!(
                    inner.state_of(i),
                    Some(MemberState::Out | MemberState::Resyncing)
                )
            })
            .collect();
        for i in candidates {
            if inner.cancel.is_cancelled() {
                return;
            }
            let r = inner.replica(i);
            let Some(d) = r.data() else { continue };
            if !d.is_up() {
                continue;
            }
            let t = inner.cfg.replica_timeout;
            match tokio::time::timeout(t, r.control.get_membership()).await {
                Ok(Ok(rec)) => {
                    r.reported_generation
                        .store(rec.generation, Ordering::Release);
                    r.reachable.store(true, Ordering::Release);
                }
                _ => {
                    r.reachable.store(false, Ordering::Release);
                    continue;
                }
            }
            tokio::select! {
                _ = inner.cancel.cancelled() => return,
                res = resync::run(&inner, i) => {
                    if let Err(why) = res {
                        tracing::warn!(volume = %inner.cfg.volume, replica = %r.cfg.id, %why, "resync pass ended early");
                        r.set_error(format!("resync: {why}"));
                    }
                }
            }
        }
    }
}

/// Connects data paths that are absent or whose engine has failed for good.
async fn reconnect_data(inner: &Inner) {
    for r in &inner.replicas() {
        let dead = r
            .data()
            .is_some_and(|d| d.engine_status().is_some_and(|s| s.failure.is_some()));
        if dead {
            let old = lock(&r.data).take();
            if let Some(old) = old {
                old.shutdown().await;
            }
        }
        if r.data().is_some() {
            continue;
        }
        let t = inner.cfg.client.connect_timeout + inner.cfg.replica_timeout;
        match tokio::time::timeout(t, r.connector.connect()).await {
            Ok(Ok(d)) if d.geometry().size == inner.size() => {
                *lock(&r.data) = Some(d);
            }
            Ok(Ok(d)) => {
                r.set_error(format!(
                    "export size {} differs from the mirror's {}",
                    d.geometry().size,
                    inner.size()
                ));
                d.shutdown().await;
            }
            Ok(Err(e)) => r.set_error(e),
            Err(_) => r.set_error("data connection timed out"),
        }
    }
}

/// A mutation's regions in the activity log, released (clean or not) when it ends or is
/// dropped: an abandoned mutation may have reached some replicas only.
struct AlHold<'a> {
    al: &'a ActivityLog,
    regions: Option<std::ops::Range<u64>>,
    clean: bool,
}

impl Drop for AlHold<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.regions.take() {
            self.al.leave(r, self.clean);
        }
    }
}

/// Counts a request in `Inner::held` from its first pause to its end.
struct Held<'a> {
    count: &'a AtomicUsize,
    set: bool,
}

impl<'a> Held<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        Self { count, set: false }
    }

    fn set(&mut self) {
        if !self.set {
            self.set = true;
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.set {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Inner {
    /// Replicas receiving writes (in sync or resyncing) under the record in force.
    fn writers(&self) -> Vec<usize> {
        let rec = self.record();
        (0..self.slots.len())
            .filter(|&i| {
                matches!(
                    rec.state_of(&self.replica(i).cfg.id),
                    Some(MemberState::InSync | MemberState::Resyncing)
                )
            })
            .collect()
    }

    /// The replica unsynced activity-log regions are read from and copied from: the in-sync
    /// replica with a data path that reported the highest generation, then the lowest id.
    pub(crate) fn al_source(&self) -> Option<usize> {
        let rec = self.record();
        (0..self.slots.len())
            .filter(|&i| {
                let r = self.replica(i);
                rec.state_of(&r.cfg.id) == Some(MemberState::InSync) && r.data().is_some()
            })
            .max_by(|&a, &b| {
                let (ra, rb) = (self.replica(a), self.replica(b));
                ra.reported_generation
                    .load(Ordering::Acquire)
                    .cmp(&rb.reported_generation.load(Ordering::Acquire))
                    .then_with(|| rb.cfg.id.cmp(&ra.cfg.id))
            })
    }

    /// Sends one activity-log batch to `targets`; returns those that did not take it.
    async fn al_send(&self, batch: &Batch, targets: &[usize]) -> Vec<usize> {
        self.al_send_in(self.al.region_bytes() as u32, batch, targets)
            .await
    }

    /// [`Self::al_send`] in `rb`-byte regions (before the log is loaded).
    async fn al_send_in(&self, rb: u32, batch: &Batch, targets: &[usize]) -> Vec<usize> {
        let results = join_all(targets.iter().map(|&i| {
            let r = self.replica(i);
            let (mark, clear) = (batch.mark.clone(), batch.clear.clone());
            async move {
                match tokio::time::timeout(
                    self.cfg.replica_timeout,
                    r.control.update_activity(rb, mark, clear),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.0),
                    Err(_) => Err("UpdateActivity timed out".into()),
                }
            }
        }))
        .await;
        let mut failed = Vec::new();
        for (&i, res) in targets.iter().zip(results) {
            if let Err(e) = res {
                let r = self.replica(i);
                tracing::warn!(volume = %self.cfg.volume, replica = %r.cfg.id, error = %e,
                    "replica did not take an activity-log update");
                r.set_error(format!("UpdateActivity: {e}"));
                failed.push(i);
            }
        }
        failed
    }

    /// Makes `regions` (entered) durable in the activity log of every replica receiving
    /// writes, batched with every other writer waiting. With the membership lock shared.
    /// `Err` names the replicas that did not take the batch.
    async fn al_mark(&self, regions: std::ops::Range<u64>) -> Result<(), Vec<usize>> {
        let _m = self.al.marker.lock().await;
        if self.al.durable(regions) {
            return Ok(());
        }
        let batch = self.al.take_batch();
        let failed = self.al_send(&batch, &self.writers()).await;
        if failed.is_empty() {
            self.al.batch_done(&batch);
            Ok(())
        } else {
            self.al.batch_failed(&batch);
            Err(failed)
        }
    }

    /// Clears the regions idle for `idle` from the activity log on every replica receiving
    /// writes (a replica that misses the clear keeps them: at worst copied once for nothing).
    pub(crate) async fn al_evict(&self, idle: Duration) {
        let _shared = self.membership.read().await;
        let _m = self.al.marker.lock().await;
        let clear = self.al.take_idle(idle);
        if clear.is_empty() {
            return;
        }
        let batch = Batch {
            mark: Vec::new(),
            clear,
        };
        let failed = self.al_send(&batch, &self.writers()).await;
        if !failed.is_empty() {
            self.al.batch_failed(&batch);
        }
    }

    /// Makes a replica about to receive writes hold every region that is durably in the
    /// log. With the membership lock held exclusively (no mark can run meanwhile).
    pub(crate) async fn al_join(&self, i: usize) -> Result<(), String> {
        let regions = self.al.durable_regions();
        if regions.is_empty() || !self.al.is_loaded() {
            return Ok(());
        }
        let batch = Batch {
            mark: regions,
            clear: Vec::new(),
        };
        if self.al_send(&batch, &[i]).await.is_empty() {
            Ok(())
        } else {
            Err("the activity log could not be written to the target".into())
        }
    }

    /// At the first open that serves: reads the activity log of every replica receiving
    /// writes under `record`; what they hold (a stop without a clean close) is made
    /// durable on all of them and becomes unsynced. With the membership lock held
    /// exclusively. `Err` (IO waits, retried) if an in-sync member cannot be asked.
    async fn al_load(&self, record: &Record) -> Result<(), String> {
        if self.al.is_loaded() {
            return Ok(());
        }
        if !self.cfg.activity.enabled {
            self.al.load(record.region_bytes, &BTreeSet::new());
            return Ok(());
        }
        let targets: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                matches!(
                    record.state_of(&self.replica(i).cfg.id),
                    Some(MemberState::InSync | MemberState::Resyncing)
                )
            })
            .collect();
        let rb = u64::from(record.region_bytes);
        let answers =
            join_all(
                targets.iter().map(|&i| {
                    let r = self.replica(i);
                    async move {
                        tokio::time::timeout(self.cfg.replica_timeout, r.control.activity()).await
                    }
                }),
            )
            .await;
        let mut found = BTreeSet::new();
        for (&i, a) in targets.iter().zip(answers) {
            let r = self.replica(i);
            let in_sync = record.state_of(&r.cfg.id) == Some(MemberState::InSync);
            match a {
                Ok(Ok((srb, regions))) => {
                    let srb = u64::from(srb);
                    for reg in regions {
                        // Another granularity (not written by this code): cover its bytes.
                        found.extend(span_of(reg * srb, srb, rb));
                    }
                }
                Ok(Err(e)) if in_sync => {
                    return Err(format!("reading the activity log of {}: {e}", r.cfg.id));
                }
                Err(_) if in_sync => {
                    return Err(format!(
                        "reading the activity log of {}: timed out",
                        r.cfg.id
                    ));
                }
                _ => {}
            }
        }
        let regions = bitmap_limit(found, self.size(), rb);
        if !regions.is_empty() {
            let batch = Batch {
                mark: regions.iter().copied().collect(),
                clear: Vec::new(),
            };
            let failed = self.al_send_in(record.region_bytes, &batch, &targets).await;
            if failed
                .iter()
                .any(|&i| record.state_of(&self.replica(i).cfg.id) == Some(MemberState::InSync))
            {
                return Err(
                    "writing the activity log found at open back failed on an in-sync replica"
                        .into(),
                );
            }
            tracing::warn!(volume = %self.cfg.volume, regions = regions.len(),
                "stopped without a clean close: the activity log's regions are copied from one in-sync replica to the others before reads of them are balanced");
        }
        self.al.load(record.region_bytes, &regions);
        Ok(())
    }

    /// Copies each of `regions` that is still unsynced from the source to every other
    /// replica receiving writes, holding the region against application writes. Replicas
    /// that fail are dropped (the region dirty for them); `Err` if no source is left.
    pub(crate) async fn al_sync(&self, regions: &[u64]) -> Result<(), String> {
        let rb = self.al.region_bytes();
        let size = self.size();
        for &reg in regions {
            let offset = reg * rb;
            let len = rb.min(size.saturating_sub(offset));
            if len == 0 {
                self.al.synced(reg, 0);
                continue;
            }
            let _g = self.regions.copy_range(offset, len).await;
            while self.al.is_unsynced(reg) {
                if self.stopped.load(Ordering::Acquire) {
                    return Err("mirror stopped".into());
                }
                let src = self
                    .al_source()
                    .ok_or("no in-sync replica with a data path to copy from")?;
                let others: Vec<usize> = self.writers().into_iter().filter(|&i| i != src).collect();
                if others.is_empty() {
                    // One replica receives writes: nothing can differ from it.
                    self.al.synced(reg, 0);
                    break;
                }
                let s = self.replica(src);
                let data = match s.data() {
                    Some(d) => d.read(offset, len as u32).await,
                    None => continue,
                };
                let data = match data {
                    Ok(d) => d,
                    Err(e) => {
                        s.set_error(&e);
                        // The region stays unsynced: it is dirty for the source when dropped.
                        self.drop_replicas(vec![src]).await?;
                        continue;
                    }
                };
                let mut failed = Vec::new();
                for &t in &others {
                    let r = self.replica(t);
                    let res = match r.data() {
                        Some(d) => d.write(offset, data.clone(), false).await,
                        None => Err(IoError::Shutdown),
                    };
                    match res {
                        Ok(()) => lock(&r.unflushed).extend(self.regions.span(offset, len)),
                        Err(e) => {
                            r.set_error(&e);
                            failed.push(t);
                        }
                    }
                }
                if !failed.is_empty() {
                    // Still unsynced here, so the drop marks this region dirty for them.
                    self.drop_replicas(failed).await?;
                }
                self.al.synced(reg, len);
                tracing::debug!(volume = %self.cfg.volume, region = reg, source = %s.cfg.id, "activity-log region synced");
            }
        }
        Ok(())
    }
}

/// Regions of `rb` bytes covering `[offset, offset + len)`.
fn span_of(offset: u64, len: u64, rb: u64) -> std::ops::Range<u64> {
    if len == 0 || rb == 0 {
        return 0..0;
    }
    offset / rb..(offset + len - 1) / rb + 1
}

/// `found` without regions past the volume's end.
fn bitmap_limit(found: BTreeSet<u64>, size: u64, rb: u64) -> BTreeSet<u64> {
    let regions = size.div_ceil(rb.max(1));
    found.into_iter().filter(|&r| r < regions).collect()
}
