//! Snapshots: CreateSnapshot (of a mirrored volume on an in-sync replica), DeleteSnapshot,
//! ListSnapshots and GetSnapshot.

use std::sync::Arc;

use enbd_proto::csi::*;
use enbd_proto::enbd as pb;
use enbd_proto::ids::{ObjectName, ServerId, SnapshotId, VolumeId};

use super::{CALL_TIMEOUT, CREATE_TIMEOUT, paginate, required, to_i64};
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::names::{self};
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

impl State {
    pub(super) async fn create_snapshot(
        self: Arc<Self>,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, CsiError> {
        required(&req.name, "name")?;
        required(&req.source_volume_id, "source_volume_id")?;
        let name = names::object_name(&req.name)?;
        let mut unknown: Vec<&str> = req
            .parameters
            .keys()
            .map(String::as_str)
            .filter(|k| !enbd_proto::params::is_kubernetes_key(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(invalid(format!(
                "unknown snapshot parameter(s): {}",
                unknown.join(", ")
            )));
        }
        let not_found =
            || CsiError::NotFound(format!("source volume {} not found", req.source_volume_id));
        let source = VolumeId::parse(&req.source_volume_id).map_err(|_| not_found())?;
        let this = Arc::clone(&self);
        self.ops
            .run(format!("snapshot:{name}"), async move {
                if let Some((name, server, snap)) = this.find_snapshot_for(&req.name, &name).await?
                {
                    let id = SnapshotId::new(server.id.clone(), name.clone())
                        .map_err(|e| invalid(e.to_string()))?;
                    let same_server = server.id == *source.server()
                        || match this.servers.lookup(source.server()) {
                            Lookup::Live(home) => {
                                replicas::is_member(
                                    &this.servers,
                                    &home,
                                    source.name().as_str(),
                                    &server.id,
                                )
                                .await
                            }
                            _ => false,
                        };
                    if !same_server || snap.source_volume != source.name().as_str() {
                        return Err(CsiError::AlreadyExists(format!(
                            "snapshot {name} already exists with source volume {}/{}",
                            server.id, snap.source_volume
                        )));
                    }
                    return Ok(CreateSnapshotResponse {
                        snapshot: Some(csi_snapshot(&id, &snap)),
                    });
                }
                let home = replicas::acting_home(
                    &this.servers,
                    source.server(),
                    source.name().as_str(),
                    &format!("volume {source}"),
                )
                .await?
                .ok_or_else(|| CsiError::NotFound(format!("source volume {source} not found")))?;
                let server =
                    match replicas::snapshot_source(&this.servers, &home, source.name().as_str())
                        .await
                    {
                        Ok(s) => s,
                        Err(e) if e.is_not_found() => return Err(not_found_source(&source)),
                        Err(e) => return Err(e),
                    };
                let id = SnapshotId::new(server.id.clone(), name.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                let mut client = server.client.clone();
                let create = pb::CreateSnapshotRequest {
                    name: name.to_string(),
                    source_volume: source.name().to_string(),
                };
                tracing::info!(snapshot = %id, source = %source, "creating snapshot");
                let snap = mgmt::call(&server.id, CREATE_TIMEOUT, client.create_snapshot(create))
                    .await?
                    .snapshot
                    .ok_or_else(|| {
                        CsiError::Internal(format!(
                            "enbd-server {} returned no snapshot",
                            server.id
                        ))
                    })?;
                Ok(CreateSnapshotResponse {
                    snapshot: Some(csi_snapshot(&id, &snap)),
                })
            })
            .await
    }

    pub(super) async fn delete_snapshot(
        self: Arc<Self>,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, CsiError> {
        required(&req.snapshot_id, "snapshot_id")?;
        let Ok(id) = SnapshotId::parse(&req.snapshot_id) else {
            return Ok(DeleteSnapshotResponse {});
        };
        let Some(server) = self.holder(id.server(), &format!("snapshot {id}"))? else {
            tracing::warn!(snapshot_id = %id, "snapshot on an unknown enbd-server treated as already deleted");
            return Ok(DeleteSnapshotResponse {});
        };
        self.ops
            .run(format!("snapshot:{}", id.name()), async move {
                let mut client = server.client.clone();
                let req = pb::DeleteSnapshotRequest {
                    name: id.name().to_string(),
                };
                match mgmt::call(&server.id, CALL_TIMEOUT, client.delete_snapshot(req)).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(snapshot_id = %id, "snapshot deleted");
                Ok(DeleteSnapshotResponse {})
            })
            .await
    }

    pub(super) async fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse, CsiError> {
        if req.max_entries < 0 {
            return Err(invalid("max_entries must not be negative"));
        }
        // Filters narrow the servers to ask; a filter naming nothing of ours
        // matches nothing (an empty list, not an error).
        let mut name_filter = String::new();
        let mut source_filter = String::new();
        let mut server_filter: Option<ServerId> = None;
        if !req.snapshot_id.is_empty() {
            let Ok(id) = SnapshotId::parse(&req.snapshot_id) else {
                return Ok(ListSnapshotsResponse::default());
            };
            name_filter = id.name().to_string();
            server_filter = Some(id.server().clone());
        }
        if !req.source_volume_id.is_empty() {
            let Ok(vid) = VolumeId::parse(&req.source_volume_id) else {
                return Ok(ListSnapshotsResponse::default());
            };
            if server_filter.as_ref().is_some_and(|s| s != vid.server()) {
                return Ok(ListSnapshotsResponse::default());
            }
            source_filter = vid.name().to_string();
            server_filter = Some(vid.server().clone());
        }
        let servers: Vec<LiveServer> = match &server_filter {
            Some(id) => match self.servers.lookup(id) {
                Lookup::Live(s) => vec![s],
                _ => Vec::new(),
            },
            None => self.servers.live(),
        };
        let lists = futures::future::join_all(
            servers
                .iter()
                .map(|s| self.list_snapshots_on(s, &name_filter, &source_filter)),
        )
        .await;
        let mut items = Vec::new();
        for (server, list) in servers.iter().zip(lists) {
            match list {
                Ok(snaps) => items.extend(snaps.into_iter().filter_map(|snap| {
                    let id =
                        SnapshotId::new(server.id.clone(), ObjectName::parse(&snap.name).ok()?)
                            .ok()?;
                    Some((id.to_string(), csi_snapshot(&id, &snap)))
                })),
                Err(e) => {
                    tracing::warn!(server = %server.id, error = %e, "ListSnapshots left this server out")
                }
            }
        }
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token, |t| {
            SnapshotId::parse(t).is_ok()
        })?;
        let entries = page
            .into_iter()
            .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
            .collect();
        Ok(ListSnapshotsResponse {
            entries,
            next_token,
        })
    }

    pub(super) async fn get_snapshot(
        &self,
        req: GetSnapshotRequest,
    ) -> Result<GetSnapshotResponse, CsiError> {
        required(&req.snapshot_id, "snapshot_id")?;
        let not_found = || CsiError::NotFound(format!("snapshot {} not found", req.snapshot_id));
        let id = SnapshotId::parse(&req.snapshot_id).map_err(|_| not_found())?;
        let server = self
            .holder(id.server(), &format!("snapshot {id}"))?
            .ok_or_else(not_found)?;
        let snap = self
            .get_snapshot_on(&server, id.name())
            .await?
            .ok_or_else(not_found)?;
        Ok(GetSnapshotResponse {
            snapshot: Some(csi_snapshot(&id, &snap)),
        })
    }
}

pub(super) fn csi_snapshot(id: &SnapshotId, snap: &pb::Snapshot) -> Snapshot {
    let source_volume_id = ObjectName::parse(&snap.source_volume)
        .ok()
        .and_then(|n| VolumeId::new(id.server().clone(), n).ok())
        .map(|v| v.to_string())
        .unwrap_or_default();
    Snapshot {
        size_bytes: to_i64(snap.size_bytes),
        snapshot_id: id.to_string(),
        source_volume_id,
        creation_time: Some(prost_types::Timestamp {
            seconds: snap.created_at_unix,
            nanos: i32::try_from(snap.created_at_nanos).unwrap_or(0),
        }),
        ready_to_use: snap.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

fn not_found_source(source: &VolumeId) -> CsiError {
    CsiError::NotFound(format!("source volume {source} not found"))
}
