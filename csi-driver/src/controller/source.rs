//! Volume content sources (a snapshot or another volume): parsed from a request,
//! read back from what the server recorded, and resolved to the server holding them.

use enbd_proto::csi::volume_content_source::{self, SnapshotSource, VolumeSource};
use enbd_proto::csi::{CapacityRange, VolumeContentSource};
use enbd_proto::enbd::{self as pb, content_source::Kind as PbSource};
use enbd_proto::ids::{ObjectName, ServerId, SnapshotId, VolumeId};

use super::required;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::servers::LiveServer;
use crate::state::State;

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
    /// size, and the source as the server names it. Without a source: no holder.
    pub(super) async fn resolve_source(
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
