//! Prometheus metrics of the node: per volume, IO as the block device sees it (requests,
//! bytes, errors, EIO, latency, in flight, by operation), the engine's journal, channels,
//! reconnects, re-issued requests and brownout time, and per replica of a mirrored volume its
//! state, generation and resync progress. Served on `--metrics-listen` by the shared endpoint
//! (`enbd_proto::metrics`).
//!
//! Hot-path cost: [`VolumeIo`] is created once per attachment and held by the device's
//! target; each request adds relaxed atomics (in flight, a counter, bytes, a histogram
//! bucket) and one clock read. Everything else is read from the engine's status at scrape
//! time, which the engine already keeps in atomics.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use enbd_proto::metrics::prometheus_client::collector::Collector;
use enbd_proto::metrics::prometheus_client::encoding::DescriptorEncoder;
use enbd_proto::metrics::prometheus_client::registry::Registry;
use enbd_proto::metrics::{self as prom, Histogram, Labels};

use crate::attach::{AttachmentStatus, Phase};
use crate::backing::BackingStatus;
use crate::device::BlockRequest;
use crate::engine::status::{MirrorState, ReplicaHealth};
use crate::engine::{ChannelState, EngineState, EngineStatus};

/// Block operations (`op` label).
pub const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// The operation index and the bytes it covers.
pub fn op_of(req: &BlockRequest) -> (usize, u64) {
    match req {
        BlockRequest::Read { len, .. } => (0, u64::from(*len)),
        BlockRequest::Write { data, .. } => (1, data.len() as u64),
        BlockRequest::Flush => (2, 0),
        BlockRequest::Discard { len, .. } => (3, u64::from(*len)),
        BlockRequest::WriteZeroes { len, .. } => (4, u64::from(*len)),
    }
}

/// One volume's device-side IO counters. Lives as long as the attachment (a daemon restart
/// starts them again from zero, as Prometheus counters may).
pub struct VolumeIo {
    requests: [AtomicU64; OPS.len()],
    bytes: [AtomicU64; OPS.len()],
    errors: [AtomicU64; OPS.len()],
    eio: AtomicU64,
    in_flight: AtomicU64,
    latency: [Histogram; OPS.len()],
}

impl Default for VolumeIo {
    fn default() -> Self {
        VolumeIo {
            requests: Default::default(),
            bytes: Default::default(),
            errors: Default::default(),
            eio: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency: std::array::from_fn(|_| Histogram::latency()),
        }
    }
}

impl fmt::Debug for VolumeIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeIo").finish_non_exhaustive()
    }
}

impl VolumeIo {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A request reached the device's target.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// It completed after `took`; `errno` when it failed (bytes count only on success).
    pub fn finished(&self, op: usize, bytes: u64, took: Duration, errno: Option<i32>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.requests[op].fetch_add(1, Ordering::Relaxed);
        match errno {
            None => {
                self.bytes[op].fetch_add(bytes, Ordering::Relaxed);
            }
            Some(e) => {
                self.errors[op].fetch_add(1, Ordering::Relaxed);
                if e == libc::EIO {
                    self.eio.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.latency[op].observe(took);
    }
}

/// What one volume's series are made of.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub volume: String,
    pub device: String,
    /// The device serves IO (not being taken over, not failed).
    pub attached: bool,
    pub size_bytes: u64,
    pub backing: Option<BackingStatus>,
    pub io: Option<Arc<VolumeIo>>,
}

impl VolumeView {
    pub fn from_status(s: &AttachmentStatus, io: Option<Arc<VolumeIo>>) -> Self {
        let backing = match (&s.engine, &s.mirror) {
            (Some(e), _) => Some(BackingStatus::Single(e.clone())),
            (None, Some(m)) => Some(BackingStatus::Mirror(m.clone())),
            (None, None) => None,
        };
        VolumeView {
            volume: s.volume_id.clone(),
            device: s.dev_path.display().to_string(),
            attached: s.phase == Phase::Attached,
            size_bytes: s.size_bytes,
            backing,
            io,
        }
    }
}

/// Renders the node's exposition from a list of volumes (the daemon passes its
/// attachments, `enbd-node bench` its one engine).
pub fn render(volumes: Vec<VolumeView>) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Scrape(volumes)));
    prom::render(&reg)
}

#[derive(Debug)]
struct Scrape(Vec<VolumeView>);

/// One engine's series: a single-copy volume's engine, or one replica's data path.
struct EngineRow<'a> {
    labels: Labels,
    e: &'a EngineStatus,
}

fn engine_state(s: EngineState) -> &'static str {
    match s {
        EngineState::Healthy => "healthy",
        EngineState::Degraded => "degraded",
        EngineState::Waiting => "waiting",
        EngineState::Failed => "failed",
    }
}

const ENGINE_STATES: [&str; 4] = ["healthy", "degraded", "waiting", "failed"];
const CHANNEL_STATES: [&str; 4] = ["connecting", "up", "down", "stopped"];
const REPLICA_STATES: [&str; 4] = ["in_sync", "out", "resyncing", "down"];
const MIRROR_STATES: [&str; 4] = ["healthy", "degraded", "waiting", "stopped"];

fn channel_state(s: ChannelState) -> &'static str {
    match s {
        ChannelState::Connecting => "connecting",
        ChannelState::Up => "up",
        ChannelState::Down => "down",
        ChannelState::Stopped => "stopped",
    }
}

fn with(mut l: Labels, k: &'static str, v: impl Into<String>) -> Labels {
    l.push((k, v.into()));
    l
}

/// One-hot state rows: `1` for the state in force, `0` for the others.
fn one_hot(base: &Labels, states: &[&str], now: &str) -> Vec<(Labels, u64)> {
    states
        .iter()
        .map(|s| (with(base.clone(), "state", *s), u64::from(*s == now)))
        .collect()
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let vols = &self.0;
        let vl = |v: &VolumeView| -> Labels { vec![("volume", v.volume.clone())] };
        prom::gauges(
            &mut enc,
            "enbd_node_volumes",
            "Volumes attached to this node (any phase).",
            [(Labels::new(), vols.len() as u64)],
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_volume_attached",
            "1 while the volume's device serves IO, 0 while it is taken over or failed.",
            vols.iter().map(|v| {
                (
                    with(vl(v), "device", v.device.clone()),
                    u64::from(v.attached),
                )
            }),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_volume_size_bytes",
            "Size of the volume's block device.",
            vols.iter().map(|v| (vl(v), v.size_bytes)),
        )?;

        // Device-side IO.
        let ios: Vec<(&VolumeView, &VolumeIo)> = vols
            .iter()
            .filter_map(|v| v.io.as_deref().map(|io| (v, io)))
            .collect();
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_op = |f: &dyn Fn(&VolumeIo, usize) -> u64| {
            let mut rows = Vec::new();
            for (v, io) in &ios {
                for (i, op) in OPS.iter().enumerate() {
                    rows.push((with(vl(v), "op", *op), f(io, i)));
                }
            }
            rows
        };
        prom::counters(
            &mut enc,
            "enbd_node_volume_requests",
            "Block requests completed, by volume and operation (as the block device sees them).",
            per_op(&|io, i| r(&io.requests[i])),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_volume_bytes",
            "Bytes of block requests completed successfully, by volume and operation.",
            per_op(&|io, i| r(&io.bytes[i])),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_volume_errors",
            "Block requests completed with an error, by volume and operation.",
            per_op(&|io, i| r(&io.errors[i])),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_volume_eio",
            "Block requests completed with EIO (brownout deadline, engine failed, server EIO).",
            ios.iter().map(|(v, io)| (vl(v), r(&io.eio))),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_volume_in_flight_requests",
            "Block requests submitted by the device and not yet completed.",
            ios.iter().map(|(v, io)| (vl(v), r(&io.in_flight))),
        )?;
        let mut lat = Vec::new();
        for (v, io) in &ios {
            for (i, op) in OPS.iter().enumerate() {
                if io.latency[i].count() > 0 {
                    lat.push((with(vl(v), "op", *op), &io.latency[i]));
                }
            }
        }
        prom::histograms(
            &mut enc,
            "enbd_node_volume_request_duration_seconds",
            "Block request latency from the device's submission to completion, by volume and \
             operation (brownout waits included).",
            lat,
        )?;

        // Engines: a single copy's, or each replica's data path (label `replica`).
        let mut engines: Vec<EngineRow> = Vec::new();
        for v in vols {
            match &v.backing {
                Some(BackingStatus::Single(e)) => engines.push(EngineRow { labels: vl(v), e }),
                Some(BackingStatus::Mirror(m)) => {
                    for rep in &m.replicas {
                        if let Some(e) = &rep.engine {
                            engines.push(EngineRow {
                                labels: with(vl(v), "replica", rep.id.clone()),
                                e,
                            });
                        }
                    }
                }
                None => {}
            }
        }
        prom::gauges(
            &mut enc,
            "enbd_node_engine_state",
            "State of a volume's (or replica's) connection: 1 for the state in force.",
            engines
                .iter()
                .flat_map(|x| one_hot(&x.labels, &ENGINE_STATES, engine_state(x.e.state))),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_journal_requests",
            "Requests held in the journal (queued or in flight, not yet acknowledged).",
            engines
                .iter()
                .map(|x| (x.labels.clone(), x.e.journal_requests)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_journal_bytes",
            "Bytes held in the journal, payloads included.",
            engines
                .iter()
                .map(|x| (x.labels.clone(), x.e.journal_bytes)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_journal_capacity_bytes",
            "The journal's byte budget: at it, new IO waits for acknowledgements.",
            engines
                .iter()
                .map(|x| (x.labels.clone(), x.e.journal_capacity_bytes)),
        )?;
        prom::seconds_counters(
            &mut enc,
            "enbd_node_brownout_seconds",
            "Time spent with no channel up (IO waiting in the journal), the current outage included.",
            engines
                .iter()
                .map(|x| (x.labels.clone(), x.e.outage_total.as_secs_f64())),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_brownout_current_seconds",
            "How long the current outage has lasted (0 while some channel is up).",
            engines.iter().map(|x| {
                let w = x.e.waiting_for.unwrap_or_default().as_secs_f64();
                (x.labels.clone(), w)
            }),
        )?;
        let chans = |f: &dyn Fn(&crate::engine::ChannelStatus) -> u64| {
            let mut rows = Vec::new();
            for x in &engines {
                for c in &x.e.channels {
                    rows.push((with(x.labels.clone(), "channel", c.index.to_string()), f(c)));
                }
            }
            rows
        };
        let mut states = Vec::new();
        for x in &engines {
            for c in &x.e.channels {
                let l = with(x.labels.clone(), "channel", c.index.to_string());
                states.extend(one_hot(&l, &CHANNEL_STATES, channel_state(c.state)));
            }
        }
        prom::gauges(
            &mut enc,
            "enbd_node_channel_state",
            "State of one channel (one NBD connection slot): 1 for the state in force.",
            states,
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_channel_in_flight_requests",
            "Requests sent on the channel and not yet answered.",
            chans(&|c| c.in_flight),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_completed_requests",
            "Requests the channel completed.",
            chans(&|c| c.completed),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_read_bytes",
            "Bytes read over the channel.",
            chans(&|c| c.bytes_read),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_written_bytes",
            "Bytes written over the channel.",
            chans(&|c| c.bytes_written),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_reissued_requests",
            "Requests moved off the channel when its connection broke, to be sent again.",
            chans(&|c| c.reissued),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_connects",
            "Connections the channel made (the first one included: reconnects are this minus 1).",
            chans(&|c| c.connects),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_channel_disconnects",
            "Connections of the channel that broke or were reset.",
            chans(&|c| c.disconnects),
        )?;

        // Mirrors.
        let mirrors: Vec<_> = vols
            .iter()
            .filter_map(|v| match &v.backing {
                Some(BackingStatus::Mirror(m)) => Some((v, m)),
                _ => None,
            })
            .collect();
        prom::gauges(
            &mut enc,
            "enbd_node_mirror_state",
            "State of a mirrored volume: 1 for the state in force.",
            mirrors.iter().flat_map(|(v, m)| {
                let now = match m.state {
                    MirrorState::Healthy => "healthy",
                    MirrorState::Degraded => "degraded",
                    MirrorState::Waiting => "waiting",
                    MirrorState::Stopped => "stopped",
                };
                one_hot(&vl(v), &MIRROR_STATES, now)
            }),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_mirror_generation",
            "Generation of the membership record in force.",
            mirrors.iter().map(|(v, m)| (vl(v), m.generation)),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_mirror_resync_copied_bytes",
            "Bytes resync copied since the mirror was opened.",
            mirrors.iter().map(|(v, m)| (vl(v), m.resync_bytes_copied)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_mirror_activity_regions",
            "Regions in the activity log (written recently or with writes in flight).",
            mirrors
                .iter()
                .map(|(v, m)| (vl(v), m.activity.active_regions)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_mirror_activity_unsynced_regions",
            "Logged regions that may differ between replicas until copied from one in-sync replica.",
            mirrors
                .iter()
                .map(|(v, m)| (vl(v), m.activity.unsynced_regions)),
        )?;
        let reps: Vec<(Labels, &crate::engine::status::ReplicaStatus)> = mirrors
            .iter()
            .flat_map(|(v, m)| {
                m.replicas
                    .iter()
                    .map(move |rep| (with(vl(v), "replica", rep.id.clone()), rep))
            })
            .collect();
        prom::gauges(
            &mut enc,
            "enbd_node_replica_state",
            "State of one replica of a mirrored volume: 1 for the state in force.",
            reps.iter().flat_map(|(l, rep)| {
                let now = match rep.health {
                    ReplicaHealth::InSync => "in_sync",
                    ReplicaHealth::Out => "out",
                    ReplicaHealth::Resyncing { .. } => "resyncing",
                    ReplicaHealth::Down => "down",
                };
                one_hot(l, &REPLICA_STATES, now)
            }),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_replica_generation",
            "Generation the replica's server last reported (0: never answered).",
            reps.iter().map(|(l, rep)| (l.clone(), rep.generation)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_replica_resync_remaining_bytes",
            "Bytes the current resync pass still has to copy to the replica (0 when not resyncing).",
            reps.iter().map(|(l, rep)| {
                let left = match rep.health {
                    ReplicaHealth::Resyncing {
                        to_copy, copied, ..
                    } => to_copy.saturating_sub(copied),
                    _ => 0,
                };
                (l.clone(), left)
            }),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_node_replica_resync_rate_bytes_per_second",
            "Copy rate of the current resync pass (0 when not resyncing).",
            reps.iter().map(|(l, rep)| {
                let rate = match rep.health {
                    ReplicaHealth::Resyncing { bytes_per_sec, .. } => bytes_per_sec,
                    _ => 0.0,
                };
                (l.clone(), rate)
            }),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_replica_reads",
            "Reads the replica served.",
            reps.iter().map(|(l, rep)| (l.clone(), rep.reads)),
        )?;
        prom::counters(
            &mut enc,
            "enbd_node_replica_writes",
            "Writes sent to the replica.",
            reps.iter().map(|(l, rep)| (l.clone(), rep.writes)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::status::{MirrorStatus, ReplicaStatus};
    use enbd_test_harness::prom;

    fn replica(id: &str, health: ReplicaHealth, generation: u64) -> ReplicaStatus {
        ReplicaStatus {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            mgmt_address: "127.0.0.1:2".into(),
            generation,
            health,
            reads: 3,
            writes: 5,
            last_error: None,
            engine: None,
        }
    }

    /// A mirrored volume with one replica in sync and one resyncing: the replica series
    /// are well formed and say what the status says.
    #[test]
    fn mirror_and_replica_series() {
        let io = VolumeIo::new();
        io.started();
        io.finished(0, 4096, Duration::from_micros(200), None);
        io.started();
        io.finished(1, 4096, Duration::from_millis(3), Some(libc::EIO));
        let view = VolumeView {
            volume: "pvc-1".into(),
            device: "/dev/ublkb0".into(),
            attached: true,
            size_bytes: 1 << 20,
            backing: Some(BackingStatus::Mirror(MirrorStatus {
                state: MirrorState::Degraded,
                generation: 7,
                replicas: vec![
                    replica("a", ReplicaHealth::InSync, 7),
                    replica(
                        "b",
                        ReplicaHealth::Resyncing {
                            to_copy: 10 << 20,
                            copied: 4 << 20,
                            bytes_per_sec: 1.5e6,
                        },
                        6,
                    ),
                ],
                waiting: None,
                resync_bytes_copied: 4 << 20,
                activity: crate::engine::status::ActivityStatus {
                    active_regions: 3,
                    unsynced_regions: 1,
                    ..Default::default()
                },
            })),
            io: Some(io),
        };
        let body = render(vec![view]);
        let e = prom::parse(&body).unwrap_or_else(|err| panic!("{err}\n{body}"));
        let v = ("volume", "pvc-1");
        assert_eq!(
            e.value("enbd_node_mirror_state", &[v, ("state", "degraded")]),
            1.0
        );
        assert_eq!(e.sum("enbd_node_mirror_state", &[v]), 1.0);
        assert_eq!(e.value("enbd_node_mirror_generation", &[v]), 7.0);
        assert_eq!(e.value("enbd_node_mirror_activity_regions", &[v]), 3.0);
        assert_eq!(
            e.value("enbd_node_mirror_activity_unsynced_regions", &[v]),
            1.0
        );
        let b = [v, ("replica", "b")];
        assert_eq!(
            e.value(
                "enbd_node_replica_state",
                &[b[0], b[1], ("state", "resyncing")]
            ),
            1.0
        );
        assert_eq!(e.value("enbd_node_replica_generation", &b), 6.0);
        assert_eq!(
            e.value("enbd_node_replica_resync_remaining_bytes", &b),
            (6u64 << 20) as f64
        );
        assert_eq!(
            e.value("enbd_node_replica_resync_rate_bytes_per_second", &b),
            1.5e6
        );
        assert_eq!(
            e.value(
                "enbd_node_replica_resync_remaining_bytes",
                &[v, ("replica", "a")]
            ),
            0.0
        );
        assert_eq!(e.value("enbd_node_replica_writes_total", &b), 5.0);
        // Device-side IO: the failed write counts as a request, an error and an EIO, not bytes.
        assert_eq!(
            e.value("enbd_node_volume_requests_total", &[v, ("op", "write")]),
            1.0
        );
        assert_eq!(
            e.value("enbd_node_volume_bytes_total", &[v, ("op", "write")]),
            0.0
        );
        assert_eq!(
            e.value("enbd_node_volume_bytes_total", &[v, ("op", "read")]),
            4096.0
        );
        assert_eq!(e.value("enbd_node_volume_eio_total", &[v]), 1.0);
        assert_eq!(e.value("enbd_node_volume_in_flight_requests", &[v]), 0.0);
        assert_eq!(
            e.value(
                "enbd_node_volume_request_duration_seconds_bucket",
                &[v, ("op", "write"), ("le", "0.0025")]
            ),
            0.0
        );
        assert_eq!(
            e.value(
                "enbd_node_volume_request_duration_seconds_bucket",
                &[v, ("op", "write"), ("le", "0.005")]
            ),
            1.0
        );
    }
}
