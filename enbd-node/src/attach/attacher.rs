//! The attachment manager as the CSI node service sees it: [`Attacher`] implemented over
//! [`AttachmentManager`], translating CSI volume contexts into attach requests, attachment
//! status into CSI volume health, and attach errors into the kinds the CSI layer answers with.
//! This is the one place that knows both sides, so `csi/` never sees engine or device types.

use enbd_proto::ids::VolumeId;
use enbd_proto::params::{Brownout, VolumeContext};

use super::{AttachError, AttachRequest, AttachmentManager, AttachmentStatus, Phase};
use crate::csi::{AttachSpec, AttachedDevice, Attacher, AttacherError, VolumeHealth};
use crate::device::DeviceError;
use crate::engine::mirror::MirrorError;
use crate::engine::{BrownoutPolicy, EngineError, EngineState};
use crate::state::ReplicaRecord;

/// The real device layer: ublk devices served by the client engine.
impl Attacher for AttachmentManager {
    async fn attach(&self, spec: AttachSpec) -> Result<AttachedDevice, AttacherError> {
        let p = &spec.context.params;
        let replicas = replica_records(&spec.context).map_err(AttacherError::Invalid)?;
        let servers = match replicas.is_empty() {
            true => vec![spec.context.server.clone()],
            false => replicas.iter().map(|r| r.nbd.clone()).collect(),
        };
        let req = AttachRequest {
            volume_id: spec.volume_id.to_string(),
            servers,
            export: spec.context.export.clone(),
            channels: p.channels,
            queues: p.queues,
            queue_depth: p.queue_depth,
            brownout: match p.brownout {
                Brownout::Wait => BrownoutPolicy::Wait,
                Brownout::FailAfter(d) => BrownoutPolicy::FailAfter(d),
            },
            read_only: spec.read_only,
            replicas,
            replica_timeout: p.replica_timeout,
            tls: p.tls,
            resync_bytes_per_sec: p.resync_bandwidth,
            access_token: spec.access_token.clone(),
        };
        AttachmentManager::attach(self, req)
            .await
            .map_err(classify)?;
        // The status carries the engine's health as well as the device.
        AttachmentManager::get(self, &spec.volume_id.to_string())
            .map(|s| device_of(&s))
            .ok_or_else(|| {
                AttacherError::Internal(format!(
                    "volume {} vanished right after attaching",
                    spec.volume_id
                ))
            })
    }

    async fn detach(&self, volume_id: &VolumeId) -> Result<(), AttacherError> {
        match AttachmentManager::detach(self, &volume_id.to_string()).await {
            Ok(()) | Err(AttachError::NotAttached(_)) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    fn get(&self, volume_id: &VolumeId) -> Option<AttachedDevice> {
        AttachmentManager::get(self, &volume_id.to_string()).map(|s| device_of(&s))
    }

    fn attached_count(&self) -> usize {
        self.list().len()
    }

    async fn resize(&self, volume_id: &VolumeId) -> Result<u64, AttacherError> {
        AttachmentManager::resize(self, &volume_id.to_string())
            .await
            .map_err(classify)
    }

    fn ready(&self) -> Result<(), String> {
        AttachmentManager::ready(self)
    }
}

/// The replicas of a mirrored volume's context, as the attachment records them.
fn replica_records(ctx: &VolumeContext) -> Result<Vec<ReplicaRecord>, String> {
    ctx.replicas
        .iter()
        .map(|r| {
            Ok(ReplicaRecord {
                id: r.id.to_string(),
                nbd: r.data.clone(),
                mgmt: crate::backing::mgmt_host_port(&r.mgmt)
                    .map_err(|why| format!("replica {}: {why}", r.id))?,
            })
        })
        .collect()
}

fn device_of(s: &AttachmentStatus) -> AttachedDevice {
    AttachedDevice {
        dev_path: s.dev_path.clone(),
        size_bytes: s.size_bytes,
        read_only: s.read_only,
        health: health_of(s),
        recovering: s.phase == Phase::Recovering,
    }
}

/// Abnormal whenever IO is not flowing on every channel: a degraded volume still works,
/// but it has lost redundancy an operator should know about.
fn health_of(s: &AttachmentStatus) -> VolumeHealth {
    let abnormal = |message: String| VolumeHealth {
        abnormal: true,
        message,
    };
    if let (Phase::Attached, Some(m)) = (&s.phase, &s.mirror) {
        // A mirror that lost a replica still serves IO, without the redundancy asked for.
        return match crate::backing::mirror_problem(m) {
            Some(problem) => abnormal(problem),
            None => VolumeHealth {
                abnormal: false,
                message: format!("{} replicas in sync", m.replicas.len()),
            },
        };
    }
    match (&s.phase, &s.engine) {
        (Phase::Failed(why), _) => abnormal(format!("device failed: {why}")),
        (Phase::Recovering, _) => {
            abnormal("device is being taken over after a daemon restart; IO waits".into())
        }
        (Phase::Attached, None) => abnormal("not connected to the server yet; IO waits".into()),
        (Phase::Attached, Some(e)) => {
            let up = e
                .channels
                .iter()
                .filter(|c| c.state == crate::engine::ChannelState::Up)
                .count();
            let total = e.channels.len();
            match e.state {
                EngineState::Healthy => VolumeHealth {
                    abnormal: false,
                    message: format!("{up}/{total} channels up"),
                },
                EngineState::Degraded => abnormal(format!(
                    "{}/{total} channels down; IO continues on the others",
                    total - up
                )),
                EngineState::Waiting => abnormal(match e.waiting_for {
                    Some(d) => format!(
                        "no channel up for {:.1}s; IO waits (brownout policy {})",
                        d.as_secs_f64(),
                        s.brownout
                    ),
                    None => format!("no channel up; IO waits (brownout policy {})", s.brownout),
                }),
                EngineState::Failed => abnormal(format!(
                    "engine failed: {}",
                    e.failure.as_deref().unwrap_or("no reason recorded")
                )),
            }
        }
    }
}

/// The device layer's errors, sorted into the kinds the CSI layer answers with.
fn classify(e: AttachError) -> AttacherError {
    let msg = e.to_string();
    match e {
        AttachError::Invalid(_) | AttachError::ReadOnlyExport(_) => AttacherError::Invalid(msg),
        AttachError::NotAttached(_) => AttacherError::NotFound(msg),
        AttachError::Conflict { .. } => AttacherError::Conflict(msg),
        AttachError::Busy { .. } => AttacherError::Busy(msg),
        AttachError::InProgress(_) | AttachError::Cancelled(_) => AttacherError::InProgress(msg),
        AttachError::LimitReached(_) => AttacherError::Exhausted(msg),
        AttachError::ResizeUnsupported(_) => AttacherError::Unsupported(msg),
        AttachError::Engine(engine) => match engine {
            EngineError::ExportRefused { .. } => AttacherError::NotFound(msg),
            EngineError::Connect { .. }
            | EngineError::ConnectTimeout { .. }
            | EngineError::Handshake { .. }
            // A certificate problem can be fixed without touching the volume (rotation).
            | EngineError::Tls { .. } => AttacherError::Unavailable(msg),
            EngineError::Config(_) => AttacherError::Invalid(msg),
            EngineError::IdentityChanged { .. } => AttacherError::Internal(msg),
        },
        AttachError::Mirror(m) => match m {
            MirrorError::Config(_) => AttacherError::Invalid(msg),
            MirrorError::Refused { .. } | MirrorError::Replica { .. } => {
                AttacherError::Unavailable(msg)
            }
        },
        AttachError::Device(DeviceError::ResizeUnsupported | DeviceError::Unavailable(_)) => {
            AttacherError::Unsupported(msg)
        }
        AttachError::Device(_) | AttachError::State(_) | AttachError::Internal(_) => {
            AttacherError::Internal(msg)
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::status::{MirrorState, MirrorStatus, ReplicaHealth, ReplicaStatus};

    fn mirrored(state: MirrorState, b: ReplicaHealth) -> AttachmentStatus {
        let replica = |id: &str, health| ReplicaStatus {
            id: id.into(),
            address: format!("{id}:10809"),
            mgmt_address: format!("{id}:9100"),
            generation: 2,
            health,
            reads: 0,
            writes: 0,
            last_error: None,
            engine: None,
        };
        AttachmentStatus {
            volume_id: "v".into(),
            dev_id: 0,
            dev_path: "/dev/ublkb0".into(),
            size_bytes: 1 << 30,
            servers: vec!["a:10809".into(), "b:10809".into()],
            export: "v".into(),
            read_only: false,
            brownout: "wait".into(),
            phase: Phase::Attached,
            engine: None,
            replicas: Vec::new(),
            mirror: Some(MirrorStatus {
                state,
                generation: 2,
                replicas: vec![replica("a", ReplicaHealth::InSync), replica("b", b)],
                waiting: None,
                resync_bytes_copied: 0,
            }),
        }
    }

    #[test]
    fn a_degraded_mirror_is_an_abnormal_volume() {
        let ok = health_of(&mirrored(MirrorState::Healthy, ReplicaHealth::InSync));
        assert_eq!(
            ok,
            VolumeHealth {
                abnormal: false,
                message: "2 replicas in sync".into()
            }
        );
        let out = health_of(&mirrored(MirrorState::Degraded, ReplicaHealth::Out));
        assert!(out.abnormal);
        assert_eq!(
            out.message,
            "degraded (generation 2): b out; IO continues on the in-sync replicas"
        );
    }

    #[test]
    fn context_replicas_become_records_with_their_mgmt_addresses() {
        let ctx = VolumeContext {
            server: "h1:10809".into(),
            export: "v".into(),
            params: Default::default(),
            replicas: vec![
                "a@h1:10809@http://h1:9100".parse().expect("a"),
                "b@h2:10809@https://h2:9100".parse().expect("b"),
            ],
        };
        // Plain text: HOST:PORT; TLS keeps its scheme, so the mirror's calls use the node's
        // management certificate.
        assert_eq!(
            replica_records(&ctx).expect("records"),
            vec![
                ReplicaRecord {
                    id: "a".into(),
                    nbd: "h1:10809".into(),
                    mgmt: "h1:9100".into()
                },
                ReplicaRecord {
                    id: "b".into(),
                    nbd: "h2:10809".into(),
                    mgmt: "https://h2:9100".into()
                }
            ]
        );
    }
}
