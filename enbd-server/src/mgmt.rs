//! The management gRPC services over the [`VolumeStore`]: `enbd.v1.VolumeService` here,
//! `enbd.v1.ReplicaService` (mirror membership) in [`replica`].
//!
//! Idempotent the CSI way: retried creates return the same object, conflicting ones are
//! AlreadyExists, deleting what is gone succeeds. Store work runs on the blocking pool as a
//! task of its own, so a caller whose deadline passes (tonic drops the handler future) never
//! leaves an operation half done. [`status_of`] is the one mapping from store errors to gRPC
//! codes.

use enbd_proto::enbd::volume_service_server::VolumeService;
use enbd_proto::enbd::{self as pb, content_source::Kind as PbSourceKind};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::{AccessError, Grants};

use crate::store::membership::ReplicaError;
use crate::store::{
    ContentSource, CopyProgress, SnapshotInfo, StoreError, VolumeInfo, VolumeStore,
};

pub mod auth;
pub mod replica;
pub mod scope;

/// Management service state: the store, the access grants and this server's identity.
#[derive(Clone)]
pub struct Mgmt {
    store: VolumeStore,
    grants: Option<Arc<Grants>>,
    /// Node callers need the volume's access token ([`scope`]): `--access published` with
    /// management TLS (without TLS there are no roles to scope).
    node_scope: bool,
    server_id: String,
    data_address: String,
}

impl Mgmt {
    pub fn new(store: VolumeStore, server_id: String, data_address: String) -> Self {
        Self {
            store,
            grants: None,
            node_scope: false,
            server_id,
            data_address,
        }
    }

    /// Serves GrantAccess/RevokeAccess over these grants (without: UNIMPLEMENTED).
    pub fn with_grants(mut self, grants: Arc<Grants>) -> Self {
        self.grants = Some(grants);
        self
    }

    /// Scopes node callers to the volumes granted to them (see [`scope`]); needs the grants.
    pub fn with_node_scope(mut self, on: bool) -> Self {
        self.node_scope = on;
        self
    }

    /// Refuses a node caller without `volume`'s access token when node scoping is on.
    fn check_node_access<T>(&self, req: &Request<T>, volume: &str) -> Result<(), Status> {
        match (&self.grants, self.node_scope) {
            (Some(grants), true) => scope::check_node_access(grants, req, volume),
            (None, true) => Err(Status::internal(
                "node scoping is on but no grants are kept",
            )),
            (_, false) => Ok(()),
        }
    }

    fn grants(&self) -> Result<Arc<Grants>, Status> {
        self.grants
            .clone()
            .ok_or_else(|| Status::unimplemented("this server keeps no access grants"))
    }

    /// Runs a store operation to completion on the blocking pool, even if the caller goes away.
    async fn run<T, F>(&self, op: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(VolumeStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || op(store)).await {
            Ok(r) => r.map_err(|e| status_of(&e)),
            Err(e) => Err(Status::internal(format!("store task failed: {e}"))),
        }
    }
}

/// The single mapping from store errors to gRPC status codes.
pub fn status_of(e: &StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::InvalidName { .. }
        | StoreError::InvalidSize(_)
        | StoreError::InvalidLabels(_) => Status::invalid_argument(msg),
        StoreError::NotFound { .. } => Status::not_found(msg),
        StoreError::AlreadyExists { .. } => Status::already_exists(msg),
        StoreError::InUse { .. } => Status::failed_precondition(msg),
        StoreError::Shrink { .. } | StoreError::SmallerThanSource { .. } => {
            Status::out_of_range(msg)
        }
        StoreError::Busy(_) => Status::aborted(msg),
        StoreError::NotReady { .. } => Status::failed_precondition(msg),
        StoreError::CopyFailed { no_space: true, .. } => Status::resource_exhausted(msg),
        StoreError::CopyFailed { .. } => Status::internal(msg),
        StoreError::Io { source, .. } | StoreError::Replica(ReplicaError::Io { source, .. }) => {
            match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Status::resource_exhausted(msg),
                _ => Status::internal(msg),
            }
        }
        StoreError::Replica(r) => match r {
            ReplicaError::Invalid(_) => Status::invalid_argument(msg),
            ReplicaError::Generation { .. } | ReplicaError::Precondition { .. } => {
                Status::failed_precondition(msg)
            }
            ReplicaError::NotFound(_) => Status::not_found(msg),
            ReplicaError::Damaged { .. } => Status::data_loss(msg),
            ReplicaError::Io { .. } => Status::internal(msg),
        },
    }
}

/// The mapping from access errors to gRPC status codes (never naming a token).
pub fn access_status(e: &AccessError) -> Status {
    match e {
        AccessError::BadToken | AccessError::BadNode => Status::invalid_argument(e.to_string()),
        AccessError::Io { .. } | AccessError::Random => Status::internal(e.to_string()),
    }
}

fn source_to_pb(s: &Option<ContentSource>) -> Option<pb::ContentSource> {
    s.as_ref().map(|s| pb::ContentSource {
        kind: Some(match s {
            ContentSource::Snapshot(n) => PbSourceKind::Snapshot(n.clone()),
            ContentSource::Volume(n) => PbSourceKind::Volume(n.clone()),
        }),
    })
}

fn source_from_pb(s: Option<pb::ContentSource>) -> Option<ContentSource> {
    match s.and_then(|s| s.kind) {
        Some(PbSourceKind::Snapshot(n)) => Some(ContentSource::Snapshot(n)),
        Some(PbSourceKind::Volume(n)) => Some(ContentSource::Volume(n)),
        None => None,
    }
}

fn volume_to_pb(v: VolumeInfo) -> pb::Volume {
    pb::Volume {
        source: source_to_pb(&v.source),
        name: v.name,
        size_bytes: v.size_bytes,
        created_at_unix: v.created_at_unix,
        export_name: v.export_name,
        open_connections: u32::try_from(v.open_connections).unwrap_or(u32::MAX),
        allocated_bytes: v.allocated_bytes,
        labels: v.labels.into_iter().collect(),
        copy: v.copy.map(progress_to_pb),
    }
}

fn progress_to_pb(p: CopyProgress) -> pb::CopyProgress {
    pb::CopyProgress {
        total_bytes: p.total_bytes,
        copied_bytes: p.copied_bytes,
    }
}

fn snapshot_to_pb(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name,
        source_volume: s.source_volume,
        size_bytes: s.size_bytes,
        created_at_unix: s.created_at_unix,
        created_at_nanos: s.created_at_nanos,
        export_name: s.export_name,
        ready_to_use: s.ready,
        copy: s.copy.map(progress_to_pb),
    }
}

/// One page of a name-sorted listing: entries after `token` (a name), at most `max`
/// (0 = all), and the token for the next page ("" when this is the last).
fn page<T>(
    items: Vec<T>,
    name: impl Fn(&T) -> &str,
    max: u32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    if !token.is_empty() && crate::store::VolumeName::parse(token).is_err() {
        return Err(Status::aborted(format!(
            "starting_token {token:?} is not one this server issued"
        )));
    }
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| token.is_empty() || name(i) > token)
        .collect();
    let mut next = String::new();
    if max > 0 && rest.len() > max as usize {
        rest.truncate(max as usize);
        next = rest.last().map(|i| name(i).to_owned()).unwrap_or_default();
    }
    Ok((rest, next))
}

#[tonic::async_trait]
impl VolumeService for Mgmt {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let source = source_from_pb(r.source);
        let labels = r.labels.into_iter().collect();
        let (v, _) = self
            .run(move |s| s.create_volume(&r.name, r.size_bytes, source, labels))
            .await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(volume_to_pb(v)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = r.name.clone();
        self.run(move |s| s.delete_volume(&r.name, r.force)).await?;
        // A volume created again under the same name starts with no grants.
        if let Some(g) = self.grants.clone() {
            tokio::task::spawn_blocking(move || g.revoke(&name, None))
                .await
                .map_err(|e| Status::internal(format!("grants task failed: {e}")))?
                .map_err(|e| access_status(&e))?;
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn expand_volume(
        &self,
        req: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self
            .run(move |s| s.expand_volume(&r.name, r.size_bytes))
            .await?;
        Ok(Response::new(pb::ExpandVolumeResponse {
            volume: Some(volume_to_pb(v)),
        }))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::GetVolumeResponse>, Status> {
        self.check_node_access(&req, &req.get_ref().name)?;
        let r = req.into_inner();
        let v = self.run(move |s| s.get_volume(&r.name)).await?;
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(volume_to_pb(v)),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let all = self.run(|s| s.list_volumes()).await?;
        let (items, next_token) = page(all, |v| &v.name, r.max_entries, &r.starting_token)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: items.into_iter().map(volume_to_pb).collect(),
            next_token,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let (snap, _) = self
            .run(move |s| s.create_snapshot(&r.name, &r.source_volume))
            .await?;
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(snapshot_to_pb(snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.delete_snapshot(&r.name)).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let all = self.run(|s| s.list_snapshots()).await?;
        let filtered: Vec<_> = all
            .into_iter()
            .filter(|s| r.name.is_empty() || s.name == r.name)
            .filter(|s| r.source_volume.is_empty() || s.source_volume == r.source_volume)
            .collect();
        let (items, next_token) = page(filtered, |s| &s.name, r.max_entries, &r.starting_token)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: items.into_iter().map(snapshot_to_pb).collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        _req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let c = self.run(|s| s.capacity()).await?;
        Ok(Response::new(pb::GetCapacityResponse {
            total_bytes: c.total_bytes,
            available_bytes: c.available_bytes,
            provisioned_bytes: c.provisioned_bytes,
        }))
    }

    async fn grant_access(
        &self,
        req: Request<pb::GrantAccessRequest>,
    ) -> Result<Response<pb::GrantAccessResponse>, Status> {
        let r = req.into_inner();
        let grants = self.grants()?;
        let name = r.volume.clone();
        // Only volumes: a snapshot is never opened by a node.
        self.run(move |s| s.get_volume(&name)).await?;
        let granted = tokio::task::spawn_blocking(move || {
            let token = Some(r.token.as_str()).filter(|t| !t.is_empty());
            grants.grant(&r.volume, &r.node_id, token)
        })
        .await
        .map_err(|e| Status::internal(format!("grants task failed: {e}")))?
        .map_err(|e| access_status(&e))?;
        Ok(Response::new(pb::GrantAccessResponse {
            token: granted.token,
            changed: granted.changed,
        }))
    }

    async fn revoke_access(
        &self,
        req: Request<pb::RevokeAccessRequest>,
    ) -> Result<Response<pb::RevokeAccessResponse>, Status> {
        let r = req.into_inner();
        let grants = self.grants()?;
        let revoked = tokio::task::spawn_blocking(move || {
            let node = Some(r.node_id.as_str()).filter(|n| !n.is_empty());
            grants.revoke(&r.volume, node)
        })
        .await
        .map_err(|e| Status::internal(format!("grants task failed: {e}")))?
        .map_err(|e| access_status(&e))?;
        Ok(Response::new(pb::RevokeAccessResponse {
            closed_connections: revoked.closed,
            revoked_grants: revoked.grants,
        }))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            server_id: self.server_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: true,
            data_address: self.data_address.clone(),
        }))
    }
}
