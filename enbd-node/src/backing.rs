//! What serves an attachment's IO: one engine [`Client`] (a single-copy volume) or a
//! [`Mirror`] over two or more replicas. The attachment manager and the device target see
//! only [`Backing`]; the CSI layer sees neither (it gets [`crate::attach::AttachmentStatus`]).
//!
//! Invariants:
//! - a record with replicas is always served by a `Mirror`, one without by a `Client`: the
//!   choice is made from the record alone, so a daemon restart reopens the same kind (and a
//!   `Mirror` reopened this way resumes a resync in progress from the servers' records);
//! - a mirrored record is checked ([`AttachmentRecord::check_replicas`]) before anything
//!   connects: fewer than two replicas or duplicate ids are refused with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::attach::{AttachError, client_config};
use crate::device::{BlockRequest, BlockTarget};
use crate::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig};
use crate::engine::status::{MirrorStatus, ReplicaHealth};
use crate::engine::tls::ClientTls;
use crate::engine::{BrownoutPolicy, Client, EngineStatus, Geometry, IoError};
use crate::metrics::VolumeIo;
use crate::mgmt_tls::MgmtTlsFiles;
use crate::state::{AttachmentRecord, ReplicaRecord};

/// Most replicas a mirrored volume may have (the StorageClass allows 1..=3).
pub const MAX_REPLICAS: usize = 3;
/// Replica timeout when a record predates the field.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(5);

/// The engine side of one attachment. Cheap to clone (both kinds are handles).
#[derive(Clone)]
pub enum Backing {
    Single(Client),
    Mirror(Mirror),
}

/// Status of whichever engine serves the volume.
#[derive(Debug, Clone)]
pub enum BackingStatus {
    Single(EngineStatus),
    Mirror(MirrorStatus),
}

impl From<ReplicaRecord> for ReplicaConfig {
    fn from(r: ReplicaRecord) -> Self {
        ReplicaConfig {
            id: r.id,
            nbd: r.nbd,
            mgmt: r.mgmt,
        }
    }
}

impl Backing {
    /// Connects what `r` describes: a `Client` to its server, or a `Mirror` over its replicas.
    /// `tls` secures the data path; `mgmt_tls` are the node's management TLS files, for
    /// mirrored volumes whose replicas have `https://` management addresses (read on every
    /// open).
    pub async fn connect(
        r: &AttachmentRecord,
        brownout: BrownoutPolicy,
        journal_bytes: usize,
        tls: Option<&Arc<ClientTls>>,
        mgmt_tls: Option<&MgmtTlsFiles>,
    ) -> Result<Backing, AttachError> {
        if r.replicas.is_empty() {
            let c = Client::connect(client_config(r, brownout, journal_bytes, tls)?).await?;
            return Ok(Backing::Single(c));
        }
        r.check_replicas().map_err(AttachError::Invalid)?;
        let mut cfg = mirror_config(r, brownout, journal_bytes, tls)?;
        if let Some(files) = mgmt_tls {
            cfg.mgmt_tls = Some(
                files
                    .load()
                    .map_err(|e| AttachError::Invalid(format!("management TLS: {e}")))?,
            );
        }
        let m = Mirror::open(cfg).await?;
        Ok(Backing::Mirror(m))
    }

    pub fn geometry(&self) -> Geometry {
        match self {
            Backing::Single(c) => c.geometry(),
            Backing::Mirror(m) => m.geometry(),
        }
    }

    pub fn status(&self) -> BackingStatus {
        match self {
            Backing::Single(c) => BackingStatus::Single(c.status()),
            Backing::Mirror(m) => BackingStatus::Mirror(m.status()),
        }
    }

    /// The single-copy client (channel resets and online resize exist only there).
    pub fn client(&self) -> Option<&Client> {
        match self {
            Backing::Single(c) => Some(c),
            Backing::Mirror(_) => None,
        }
    }

    /// Re-reads the size (every in-sync replica's, for a mirror) and serves up to it; only
    /// grows. Returns the size now in force.
    pub async fn refresh_size(&self) -> Result<u64, AttachError> {
        Ok(match self {
            Backing::Single(c) => c.refresh_size().await?,
            Backing::Mirror(m) => m.refresh_size().await?,
        })
    }

    /// Makes a mirrored record list the replica set the mirror serves (it follows the
    /// servers' membership records, which a replacement changes); a no-op for a single copy.
    pub fn follow_into(&self, r: &mut AttachmentRecord) {
        let Backing::Mirror(m) = self else { return };
        let set: Vec<ReplicaRecord> = m
            .replica_configs()
            .into_iter()
            .map(|c| ReplicaRecord {
                id: c.id,
                nbd: c.nbd,
                mgmt: c.mgmt,
            })
            .collect();
        if set != r.replicas {
            tracing::info!(volume_id = %r.volume_id,
                replicas = ?set.iter().map(|x| &x.id).collect::<Vec<_>>(),
                "the mirror's replica set differs from the record's: recording the one in force");
            r.servers = set.iter().map(|x| x.nbd.clone()).collect();
            r.replicas = set;
        }
    }

    pub async fn shutdown(&self) {
        match self {
            Backing::Single(c) => c.shutdown().await,
            Backing::Mirror(m) => m.shutdown().await,
        }
    }

    async fn serve(&self, req: BlockRequest) -> Result<Bytes, IoError> {
        let empty = |r: Result<(), IoError>| r.map(|()| Bytes::new());
        match (self, req) {
            (Backing::Single(c), BlockRequest::Read { offset, len }) => c.read(offset, len).await,
            (Backing::Mirror(m), BlockRequest::Read { offset, len }) => m.read(offset, len).await,
            (Backing::Single(c), BlockRequest::Write { offset, data, fua }) => {
                empty(c.write(offset, data, fua).await)
            }
            (Backing::Mirror(m), BlockRequest::Write { offset, data, fua }) => {
                empty(m.write(offset, data, fua).await)
            }
            (Backing::Single(c), BlockRequest::Flush) => empty(c.flush().await),
            (Backing::Mirror(m), BlockRequest::Flush) => empty(m.flush().await),
            (Backing::Single(c), BlockRequest::Discard { offset, len }) => {
                empty(c.trim(offset, len).await)
            }
            (Backing::Mirror(m), BlockRequest::Discard { offset, len }) => {
                empty(m.trim(offset, len).await)
            }
            (
                Backing::Single(c),
                BlockRequest::WriteZeroes {
                    offset,
                    len,
                    no_hole,
                },
            ) => empty(c.write_zeroes(offset, len, no_hole).await),
            (
                Backing::Mirror(m),
                BlockRequest::WriteZeroes {
                    offset,
                    len,
                    no_hole,
                },
            ) => empty(m.write_zeroes(offset, len, no_hole).await),
        }
    }
}

/// Serves a device from the engine, counting each request in the volume's [`VolumeIo`].
pub struct EngineTarget {
    backing: Backing,
    io: Arc<VolumeIo>,
}

impl EngineTarget {
    pub fn new(backing: Backing, io: Arc<VolumeIo>) -> Self {
        EngineTarget { backing, io }
    }
}

impl BlockTarget for EngineTarget {
    async fn submit(&self, req: BlockRequest) -> Result<Bytes, i32> {
        let (op, bytes) = crate::metrics::op_of(&req);
        self.io.started();
        let t = Instant::now();
        let r = self.backing.serve(req).await.map_err(|e| {
            tracing::warn!(error = %e, "block request failed");
            e.errno()
        });
        self.io
            .finished(op, bytes, t.elapsed(), r.as_ref().err().copied());
        r
    }
}

/// The mirror configuration of a mirrored record: the single-copy client settings (channels,
/// queue depth, journal) as every replica's template, the volume's brownout policy, and the
/// replica timeout (default when the record has none).
pub fn mirror_config(
    r: &AttachmentRecord,
    brownout: BrownoutPolicy,
    journal_bytes: usize,
    tls: Option<&Arc<ClientTls>>,
) -> Result<MirrorConfig, AttachError> {
    let replicas = r
        .replicas
        .iter()
        .map(|x| ReplicaConfig {
            id: x.id.clone(),
            nbd: x.nbd.clone(),
            mgmt: x.mgmt.clone(),
        })
        .collect();
    let mut m = MirrorConfig::new(r.export.clone(), replicas);
    m.client = client_config(r, brownout, journal_bytes, tls)?;
    m.brownout = brownout;
    m.replica_timeout = match r.replica_timeout_ms {
        0 => DEFAULT_REPLICA_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    m.resync_bytes_per_sec = Some(r.resync_bytes_per_sec).filter(|b| *b > 0);
    Ok(m)
}

/// Parses `ID@HOST:PORT@MGMT`, where MGMT is `HOST:PORT`, `http://HOST:PORT` or
/// `https://HOST:PORT` (the forms the controller puts in the volume context).
pub fn parse_replica(s: &str) -> Result<ReplicaRecord, String> {
    let bad = |why: &str| format!("replica {s:?}: {why} (expected ID@HOST:PORT@http://HOST:PORT)");
    let mut parts = s.split('@');
    let (Some(id), Some(nbd), Some(mgmt), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("three @-separated parts needed"));
    };
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("empty or unprintable id"));
    }
    Ok(ReplicaRecord {
        id: id.to_owned(),
        nbd: host_port(nbd).ok_or_else(|| bad("data address is not HOST:PORT"))?,
        mgmt: mgmt_host_port(mgmt).map_err(|why| bad(&why))?,
    })
}

/// The management address as the engine dials it, from a URL or an address: `HOST:PORT` for
/// plain text, `https://HOST:PORT` (scheme kept) for TLS.
pub fn mgmt_host_port(mgmt: &str) -> Result<String, String> {
    if let Some(rest) = mgmt.strip_prefix("https://") {
        return host_port(rest.trim_end_matches('/'))
            .map(|hp| format!("https://{hp}"))
            .ok_or_else(|| "management address is not https://HOST:PORT".into());
    }
    let bare = mgmt.strip_prefix("http://").unwrap_or(mgmt);
    host_port(bare.trim_end_matches('/'))
        .ok_or_else(|| "management address is not HOST:PORT".into())
}

fn host_port(s: &str) -> Option<String> {
    let (host, port) = s.rsplit_once(':')?;
    let ok = !host.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c == '/' || c == '@')
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    ok.then(|| s.to_owned())
}

/// One word for a replica's state, as `list` and the volume condition show it.
pub fn health_word(h: &ReplicaHealth) -> &'static str {
    match h {
        ReplicaHealth::InSync => "in-sync",
        ReplicaHealth::Out => "out",
        ReplicaHealth::Resyncing { .. } => "resyncing",
        ReplicaHealth::Down => "down",
    }
}

/// A replica's state with its resync progress, e.g. `resyncing 12.0/100.0 MiB at 3.2 MiB/s`.
pub fn health_text(h: &ReplicaHealth) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    match h {
        ReplicaHealth::Resyncing {
            to_copy,
            copied,
            bytes_per_sec,
        } => format!(
            "resyncing {:.1}/{:.1} MiB at {:.1} MiB/s",
            *copied as f64 / MIB,
            *to_copy as f64 / MIB,
            bytes_per_sec / MIB
        ),
        other => health_word(other).to_owned(),
    }
}

/// What the volume condition says about a mirror: None when every replica is in sync.
pub fn mirror_problem(m: &MirrorStatus) -> Option<String> {
    use crate::engine::status::MirrorState;
    let behind: Vec<String> = m
        .replicas
        .iter()
        .filter(|r| r.health != ReplicaHealth::InSync)
        .map(|r| format!("{} {}", r.id, health_text(&r.health)))
        .collect();
    match m.state {
        MirrorState::Healthy if behind.is_empty() => None,
        MirrorState::Waiting => Some(format!(
            "mirror IO waits: {}",
            m.waiting.as_deref().unwrap_or("no in-sync replica answers")
        )),
        MirrorState::Stopped => Some("mirror stopped".into()),
        _ => Some(format!(
            "degraded (generation {}): {}; IO continues on the in-sync replicas",
            m.generation,
            behind.join(", ")
        )),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::status::{MirrorState, ReplicaStatus};

    pub(crate) fn mirrored_record() -> AttachmentRecord {
        AttachmentRecord {
            tls: false,
            volume_id: "vol".into(),
            dev_id: 3,
            servers: vec!["10.0.0.1:10809".into(), "10.0.0.2:10809".into()],
            export: "pvc-1".into(),
            channels: 2,
            queues: 1,
            queue_depth: 128,
            brownout: "fail-after=30s".into(),
            read_only: false,
            size_bytes: 1 << 30,
            replicas: vec![
                parse_replica("a@10.0.0.1:10809@http://10.0.0.1:9100").expect("a"),
                parse_replica("b@10.0.0.2:10809@10.0.0.2:9100").expect("b"),
            ],
            replica_timeout_ms: 2500,
            resync_bytes_per_sec: 0,
            access_token: None,
            access_plaintext: false,
        }
    }

    #[test]
    fn replica_specs_parse_and_bad_ones_say_why() {
        let r = parse_replica("srv-1@host:10809@http://host:9100/").expect("parse");
        assert_eq!(
            r,
            ReplicaRecord {
                id: "srv-1".into(),
                nbd: "host:10809".into(),
                mgmt: "host:9100".into()
            }
        );
        let tls = parse_replica("srv-1@host:10809@https://srv-1.enbd.ns.svc:10810/").unwrap();
        assert_eq!(tls.mgmt, "https://srv-1.enbd.ns.svc:10810");
        for bad in [
            "a@host:1",
            "a@host@http://h:2",
            "@h:1@h:2",
            "a@h:1@https://h",
            "a@h:0@h:2",
            "a@h:1@h:2@x",
        ] {
            let e = parse_replica(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn mirror_config_comes_from_the_record() {
        let r = mirrored_record();
        let m = mirror_config(
            &r,
            BrownoutPolicy::FailAfter(Duration::from_secs(30)),
            1 << 20,
            None,
        )
        .expect("config");
        assert_eq!(m.volume, "pvc-1");
        assert_eq!(
            m.replicas
                .iter()
                .map(|x| (x.id.as_str(), x.nbd.as_str(), x.mgmt.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("a", "10.0.0.1:10809", "10.0.0.1:9100"),
                ("b", "10.0.0.2:10809", "10.0.0.2:9100")
            ]
        );
        assert_eq!(m.replica_timeout, Duration::from_millis(2500));
        assert_eq!(m.resync_bytes_per_sec, None, "0 in the record: unlimited");
        let limited = mirror_config(
            &AttachmentRecord {
                resync_bytes_per_sec: 1 << 20,
                access_token: None,
                access_plaintext: false,
                ..mirrored_record()
            },
            BrownoutPolicy::Wait,
            1 << 20,
            None,
        )
        .expect("config");
        assert_eq!(limited.resync_bytes_per_sec, Some(1 << 20));
        assert_eq!(
            m.brownout,
            BrownoutPolicy::FailAfter(Duration::from_secs(30))
        );
        assert_eq!(m.client.channels, 2);
        assert_eq!(m.client.journal_bytes, 1 << 20);
        // Each replica's client dials only its own server and fails fast (the mirror drops it).
        let c = m.client_config(&m.replicas[1]);
        assert_eq!(c.servers, vec!["10.0.0.2:10809".to_string()]);
        assert_eq!(
            c.brownout,
            BrownoutPolicy::FailAfter(Duration::from_millis(2500))
        );
        let old = AttachmentRecord {
            replica_timeout_ms: 0,
            resync_bytes_per_sec: 0,
            access_token: None,
            access_plaintext: false,
            ..r
        };
        assert_eq!(
            mirror_config(&old, BrownoutPolicy::Wait, 1 << 20, None)
                .expect("config")
                .replica_timeout,
            DEFAULT_REPLICA_TIMEOUT
        );
    }

    #[tokio::test]
    async fn a_bad_mirrored_record_is_refused_before_connecting() {
        let mut r = mirrored_record();
        r.replicas.truncate(1);
        let Err(e) = Backing::connect(&r, BrownoutPolicy::Wait, 1 << 20, None, None).await else {
            panic!("one replica accepted");
        };
        assert!(e.to_string().contains("at least 2"), "{e}");
    }

    fn replica(id: &str, health: ReplicaHealth) -> ReplicaStatus {
        ReplicaStatus {
            id: id.into(),
            address: format!("{id}:10809"),
            mgmt_address: format!("{id}:9100"),
            generation: 4,
            health,
            reads: 0,
            writes: 0,
            last_error: None,
            engine: None,
        }
    }

    #[test]
    fn the_condition_names_every_replica_behind() {
        let mut m = MirrorStatus {
            state: MirrorState::Healthy,
            generation: 4,
            replicas: vec![
                replica("a", ReplicaHealth::InSync),
                replica("b", ReplicaHealth::InSync),
            ],
            waiting: None,
            resync_bytes_copied: 0,
            activity: Default::default(),
        };
        assert_eq!(mirror_problem(&m), None);
        m.state = MirrorState::Degraded;
        m.replicas[1].health = ReplicaHealth::Resyncing {
            to_copy: 100 << 20,
            copied: 25 << 20,
            bytes_per_sec: (5 << 20) as f64,
        };
        assert_eq!(
            mirror_problem(&m).as_deref(),
            Some(
                "degraded (generation 4): b resyncing 25.0/100.0 MiB at 5.0 MiB/s; \
                 IO continues on the in-sync replicas"
            )
        );
        m.replicas[1].health = ReplicaHealth::Down;
        assert!(mirror_problem(&m).is_some_and(|p| p.contains("b down")));
        m.state = MirrorState::Waiting;
        m.waiting = Some("no in-sync replica reachable".into());
        assert_eq!(
            mirror_problem(&m).as_deref(),
            Some("mirror IO waits: no in-sync replica reachable")
        );
    }
}
