//! Volume content sources (a snapshot or another volume): parsed from a request,
//! read back from what the server recorded, and resolved to the server holding them.

use enbd_proto::csi::volume_content_source::{self, SnapshotSource, VolumeSource};
use enbd_proto::csi::{CapacityRange, VolumeContentSource};
use enbd_proto::enbd::{self as pb, content_source::Kind as PbSource};
use enbd_proto::ids::{ObjectName, ServerId, SnapshotId, VolumeId};
use enbd_proto::params::FsType;

use std::time::{Duration, Instant};

use super::{CREATE_TIMEOUT, required};
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::servers::LiveServer;
use crate::state::State;

/// How long CreateVolume waits for a clone's or restore's background copy on the server
/// before answering ABORTED ("operation pending"; the provisioner retries, and the retry
/// finds the same copy, so a large clone costs a few retries, never a second copy).
const CONTENT_WAIT: Duration = Duration::from_secs(20);

/// Creates a volume on `server` (idempotently: repeating the call is how progress is
/// read). Without a source, or once its content is copied, that is the volume; while the
/// server still copies it, the volume is not usable yet: waits up to [`CONTENT_WAIT`],
/// then [`CsiError::Aborted`] with the progress.
pub(super) async fn create_on(
    server: &LiveServer,
    create: pb::CreateVolumeRequest,
) -> Result<pb::Volume, CsiError> {
    let deadline = Instant::now() + CONTENT_WAIT;
    let mut delay = Duration::from_millis(50);
    loop {
        let mut client = server.client.clone();
        let vol = mgmt::call(
            &server.id,
            CREATE_TIMEOUT,
            client.create_volume(create.clone()),
        )
        .await?
        .volume
        .ok_or_else(|| {
            CsiError::Internal(format!("enbd-server {} returned no volume", server.id))
        })?;
        let Some(p) = vol.copy else {
            return Ok(vol);
        };
        if Instant::now() >= deadline {
            return Err(CsiError::Aborted(format!(
                "volume {} (its content is still being copied on {}: {} of {} bytes)",
                create.name, server.id, p.copied_bytes, p.total_bytes
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// A requested content source, already resolved to our IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

pub(super) fn parse_source(src: Option<&VolumeContentSource>) -> Result<Option<Source>, CsiError> {
    let Some(src) = src else { return Ok(None) };
    match &src.r#type {
        None => Err(invalid(
            "volume_content_source names neither a snapshot nor a volume",
        )),
        Some(volume_content_source::Type::Snapshot(s)) => {
            required(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?;
            SnapshotId::parse(&s.snapshot_id)
                .map(|id| Some(Source::Snapshot(id)))
                .map_err(|e| CsiError::NotFound(format!("source snapshot not found: {e}")))
        }
        Some(volume_content_source::Type::Volume(v)) => {
            required(&v.volume_id, "volume_content_source.volume.volume_id")?;
            VolumeId::parse(&v.volume_id)
                .map(|id| Some(Source::Volume(id)))
                .map_err(|e| CsiError::NotFound(format!("source volume not found: {e}")))
        }
    }
}

/// The content source of a volume as the server recorded it, in CSI terms.
pub(super) fn source_of(server: &ServerId, vol: &pb::Volume) -> Option<Source> {
    match vol.source.as_ref().and_then(|s| s.kind.as_ref())? {
        PbSource::Snapshot(name) => {
            let name = ObjectName::parse(name).ok()?;
            SnapshotId::new(server.clone(), name)
                .ok()
                .map(Source::Snapshot)
        }
        PbSource::Volume(name) => {
            let name = ObjectName::parse(name).ok()?;
            VolumeId::new(server.clone(), name).ok().map(Source::Volume)
        }
    }
}

pub(super) fn csi_source(src: &Source) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(match src {
            Source::Snapshot(id) => volume_content_source::Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            Source::Volume(id) => volume_content_source::Type::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    }
}

impl State {
    /// For a volume made from `source`: the live server holding the source, the new volume's
    /// size (at least `floor`, its filesystem's smallest device), and the source as the
    /// server names it. Without a source: no holder.
    pub(super) async fn resolve_source(
        &self,
        source: Option<&Source>,
        range: Option<&CapacityRange>,
        floor: Option<(FsType, u64)>,
    ) -> Result<(Option<LiveServer>, u64, Option<PbSource>), CsiError> {
        let (holder, size, source) = self.resolve_source_sized(source, range).await?;
        Ok((holder, capacity::with_floor(size, floor, range)?, source))
    }

    async fn resolve_source_sized(
        &self,
        source: Option<&Source>,
        range: Option<&CapacityRange>,
    ) -> Result<(Option<LiveServer>, u64, Option<PbSource>), CsiError> {
        Ok(match source {
            Some(Source::Snapshot(sid)) => {
                let Some(server) = self.holder(sid.server(), &format!("snapshot {sid}"))? else {
                    return Err(CsiError::NotFound(format!(
                        "source snapshot {sid} not found"
                    )));
                };
                let snap = self
                    .get_snapshot_on(&server, sid.name())
                    .await?
                    .ok_or_else(|| {
                        CsiError::NotFound(format!("source snapshot {sid} not found"))
                    })?;
                // The spec: ready_to_use "indicates if a snapshot is ready to use as a
                // `volume_content_source` in a `CreateVolumeRequest`". Until then, refuse.
                if !snap.ready_to_use {
                    let (done, total) = snap
                        .copy
                        .map_or((0, snap.size_bytes), |p| (p.copied_bytes, p.total_bytes));
                    return Err(CsiError::FailedPrecondition(format!(
                        "source snapshot {sid} is not ready to use yet ({done} of {total} bytes copied)"
                    )));
                }
                let size = capacity::for_create(range, snap.size_bytes)?;
                (
                    Some(server),
                    size,
                    Some(PbSource::Snapshot(sid.name().to_string())),
                )
            }
            Some(Source::Volume(vid)) => {
                let Some(server) = self.holder(vid.server(), &format!("volume {vid}"))? else {
                    return Err(CsiError::NotFound(format!("source volume {vid} not found")));
                };
                let vol = self
                    .get_volume(&server, vid.name())
                    .await?
                    .ok_or_else(|| CsiError::NotFound(format!("source volume {vid} not found")))?;
                let size = capacity::for_create(range, vol.size_bytes)?;
                (
                    Some(server),
                    size,
                    Some(PbSource::Volume(vid.name().to_string())),
                )
            }
            None => (None, capacity::for_create(range, 0)?, None),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn source_parsing() {
        assert_eq!(parse_source(None).unwrap(), None);
        let bad = VolumeContentSource { r#type: None };
        assert!(matches!(
            parse_source(Some(&bad)),
            Err(CsiError::InvalidArgument(_))
        ));
        let snap = csi_source(&Source::Snapshot(SnapshotId::parse("s/x").unwrap()));
        assert_eq!(
            parse_source(Some(&snap)).unwrap(),
            Some(Source::Snapshot(SnapshotId::parse("s/x").unwrap()))
        );
        let malformed = VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(VolumeSource {
                volume_id: "nope".into(),
            })),
        };
        assert!(matches!(
            parse_source(Some(&malformed)),
            Err(CsiError::NotFound(_))
        ));
    }
}
