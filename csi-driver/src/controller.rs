//! CSI Controller service: volumes, snapshots, expansion and publication over
//! the enbd-servers' management API.
//!
//! Every RPC checks its arguments first (InvalidArgument, nothing touched),
//! then resolves the server from the ID (`<server-id>/<name>`), then works under
//! the per-object operation guard. IDs that cannot be ours are "not found" (and
//! deleting them succeeds); IDs naming a known server that is down are
//! `Unavailable`, so the sidecars retry instead of concluding the object is gone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use enbd_proto::csi::controller_server::Controller;
use enbd_proto::csi::controller_service_capability::{self, rpc};
use enbd_proto::csi::volume_content_source::{self, SnapshotSource, VolumeSource};
use enbd_proto::csi::*;
use enbd_proto::enbd::{self as pb, content_source::Kind as PbSource};
use enbd_proto::ids::{ObjectName, ServerId, SnapshotId, VolumeId};
use enbd_proto::params::{CTX_REPLICAS, VolumeContext, VolumeParams};
use tonic::{Request, Response, Status};

use crate::capability;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::names::{self, NAME_LABEL};
use crate::placement;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

/// Creating may copy a whole snapshot or volume on the server.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Every other management call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ControllerService {
    state: Arc<State>,
}

impl ControllerService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// Awaits one management call with a deadline, classifying the failure.
async fn mgmt<T>(
    server: &ServerId,
    timeout: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, CsiError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(CsiError::Unavailable(format!(
            "enbd-server {server} did not answer within {}s",
            timeout.as_secs()
        ))),
        Ok(Err(status)) => Err(CsiError::server(server, status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn required(value: &str, field: &str) -> Result<(), CsiError> {
    if value.is_empty() {
        Err(invalid(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// A requested content source, already resolved to our IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

fn parse_source(src: Option<&VolumeContentSource>) -> Result<Option<Source>, CsiError> {
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
fn source_of(server: &ServerId, vol: &pb::Volume) -> Option<Source> {
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

fn csi_source(src: &Source) -> VolumeContentSource {
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

fn csi_snapshot(id: &SnapshotId, snap: &pb::Snapshot) -> Snapshot {
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
            nanos: 0,
        }),
        ready_to_use: snap.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

fn not_found_source(source: &VolumeId) -> CsiError {
    CsiError::NotFound(format!("source volume {source} not found"))
}

fn normal(server: &ServerId) -> VolumeCondition {
    VolumeCondition {
        abnormal: false,
        message: format!("enbd-server {server} is serving the volume"),
    }
}

/// First entry at or after `token` and the next page's token. Tokens are the
/// ID of the first entry of the next page; anything that is not an ID we could
/// have issued is `Aborted`, as the spec asks for an invalid starting_token.
fn paginate<T>(
    mut items: Vec<(String, T)>,
    max_entries: i32,
    token: &str,
    valid_token: impl Fn(&str) -> bool,
) -> Result<(Vec<T>, String), CsiError> {
    let max =
        usize::try_from(max_entries).map_err(|_| invalid("max_entries must not be negative"))?;
    if !token.is_empty() && !valid_token(token) {
        return Err(CsiError::Aborted(format!(
            "starting_token {token:?} (not a token this driver issued)"
        )));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rest: Vec<(String, T)> = items
        .into_iter()
        .filter(|(id, _)| token.is_empty() || id.as_str() >= token)
        .collect();
    let mut next = String::new();
    if max > 0 && rest.len() > max {
        next = rest[max].0.clone();
        rest.truncate(max);
    }
    Ok((rest.into_iter().map(|(_, v)| v).collect(), next))
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

impl State {
    /// The live server holding an object, `None` if the server is unknown, or
    /// `Unavailable` if it is known but down.
    fn holder(&self, server: &ServerId, what: &str) -> Result<Option<LiveServer>, CsiError> {
        match self.servers.lookup(server) {
            Lookup::Live(s) => Ok(Some(s)),
            Lookup::Down(reason) => Err(CsiError::Unavailable(format!(
                "enbd-server {server} holding {what} is unavailable: {reason}"
            ))),
            Lookup::Unknown => Ok(None),
        }
    }

    async fn get_volume(
        &self,
        server: &LiveServer,
        name: &ObjectName,
    ) -> Result<Option<pb::Volume>, CsiError> {
        let mut client = server.client.clone();
        let req = pb::GetVolumeRequest {
            name: name.to_string(),
        };
        match mgmt(&server.id, CALL_TIMEOUT, client.get_volume(req)).await {
            Ok(resp) => Ok(resp.volume),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_snapshots_on(
        &self,
        server: &LiveServer,
        name: &str,
        source_volume: &str,
    ) -> Result<Vec<pb::Snapshot>, CsiError> {
        let mut client = server.client.clone();
        let req = pb::ListSnapshotsRequest {
            max_entries: 0,
            starting_token: String::new(),
            name: name.to_owned(),
            source_volume: source_volume.to_owned(),
        };
        Ok(mgmt(&server.id, CALL_TIMEOUT, client.list_snapshots(req))
            .await?
            .snapshots)
    }

    /// The volume a CSI name stands for on any live server: under its name (see
    /// [`names`]), or under the name an earlier version gave it.
    async fn find_volume_for(
        &self,
        csi_name: &str,
        name: &ObjectName,
    ) -> Result<Option<(ObjectName, LiveServer, pb::Volume)>, CsiError> {
        if let Some((server, vol)) = self.find_volume(name).await? {
            return Ok(Some((name.clone(), server, vol)));
        }
        if let Some(old) = names::legacy_name(csi_name)
            && let Some((server, vol)) = self.find_volume(&old).await?
            && VolumeId::new(server.id.clone(), old.clone()).is_ok()
        {
            return Ok(Some((old, server, vol)));
        }
        Ok(None)
    }

    /// The snapshot a CSI name stands for on any live server (see [`Self::find_volume_for`]).
    async fn find_snapshot_for(
        &self,
        csi_name: &str,
        name: &ObjectName,
    ) -> Result<Option<(ObjectName, LiveServer, pb::Snapshot)>, CsiError> {
        if let Some((server, snap)) = self.find_snapshot(name).await? {
            return Ok(Some((name.clone(), server, snap)));
        }
        if let Some(old) = names::legacy_name(csi_name)
            && let Some((server, snap)) = self.find_snapshot(&old).await?
            && SnapshotId::new(server.id.clone(), old.clone()).is_ok()
        {
            return Ok(Some((old, server, snap)));
        }
        Ok(None)
    }

    /// A volume named `name` on any live server (CreateVolume's idempotency).
    async fn find_volume(
        &self,
        name: &ObjectName,
    ) -> Result<Option<(LiveServer, pb::Volume)>, CsiError> {
        let live = self.servers.live();
        let found = futures::future::join_all(live.iter().map(|s| self.get_volume(s, name))).await;
        for (server, result) in live.into_iter().zip(found) {
            if let Some(vol) = result? {
                return Ok(Some((server, vol)));
            }
        }
        Ok(None)
    }

    /// A snapshot named `name` on any live server (CreateSnapshot's idempotency).
    async fn find_snapshot(
        &self,
        name: &ObjectName,
    ) -> Result<Option<(LiveServer, pb::Snapshot)>, CsiError> {
        let live = self.servers.live();
        let found = futures::future::join_all(
            live.iter()
                .map(|s| self.list_snapshots_on(s, name.as_str(), "")),
        )
        .await;
        for (server, result) in live.into_iter().zip(found) {
            if let Some(snap) = result?.into_iter().find(|s| s.name == name.as_str()) {
                return Ok(Some((server, snap)));
            }
        }
        Ok(None)
    }

    fn volume_response(
        &self,
        server: &LiveServer,
        name: &ObjectName,
        vol: &pb::Volume,
        params: VolumeParams,
        source: Option<&Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        let id =
            VolumeId::new(server.id.clone(), name.clone()).map_err(|e| invalid(e.to_string()))?;
        let export = if vol.export_name.is_empty() {
            vol.name.clone()
        } else {
            vol.export_name.clone()
        };
        let context = VolumeContext {
            server: server.data_address.clone(),
            export,
            params,
            replicas: Vec::new(),
        };
        Ok(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: to_i64(vol.size_bytes),
                volume_id: id.to_string(),
                volume_context: context.to_context(),
                content_source: source.map(csi_source),
                // Empty: reachable from every node (no topology constraints).
                accessible_topology: Vec::new(),
            }),
        })
    }

    async fn create_volume(
        self: Arc<Self>,
        req: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, CsiError> {
        required(&req.name, "name")?;
        let name = names::object_name(&req.name)?;
        capability::check_all(&req.volume_capabilities).map_err(invalid)?;
        let params = VolumeParams::from_map(&req.parameters).map_err(|e| invalid(e.to_string()))?;
        if !req.mutable_parameters.is_empty() {
            return Err(invalid(
                "mutable_parameters are not supported by this driver",
            ));
        }
        let source = parse_source(req.volume_content_source.as_ref())?;
        // Refuse a bad range before looking anything up.
        capacity::for_create(req.capacity_range.as_ref(), 0).or_else(|e| match e {
            // A range below the source's size is judged once the source is known.
            CsiError::OutOfRange(_) if source.is_some() => Ok(0),
            e => Err(e),
        })?;
        let this = Arc::clone(&self);
        let key = format!("volume:{name}");
        self.ops
            .run(key, async move {
                this.create_volume_locked(name, req, params, source).await
            })
            .await
    }

    async fn create_volume_locked(
        &self,
        name: ObjectName,
        req: CreateVolumeRequest,
        params: VolumeParams,
        source: Option<Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        if params.replicas > 1 {
            return self.create_replicated(name, req, params, source).await;
        }
        let range = req.capacity_range.as_ref();
        if let Some((name, server, vol)) = self.find_volume_for(&req.name, &name).await? {
            if let Some(owner) = vol.labels.get(NAME_LABEL)
                && *owner != req.name
            {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} on {} belongs to CSI name {owner:?}, not {:?} (name hash collision)",
                    server.id, req.name
                )));
            }
            if !capacity::satisfies(vol.size_bytes, range) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists on {} with {} bytes, outside the requested capacity range",
                    server.id, vol.size_bytes
                )));
            }
            if source_of(&server.id, &vol) != source {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists on {} with a different content source",
                    server.id
                )));
            }
            // Volumes made before parameters were recorded carry none: nothing to compare.
            // The CSI name label is not a parameter (and older volumes lack it).
            let wanted = params.to_context();
            let mut have = vol.labels.clone();
            have.remove(NAME_LABEL);
            if !have.is_empty() && have != wanted {
                let mut differ: Vec<&str> = wanted
                    .keys()
                    .chain(have.keys())
                    .filter(|k| wanted.get(*k) != have.get(*k))
                    .map(String::as_str)
                    .collect();
                differ.sort_unstable();
                differ.dedup();
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists on {} with other parameters ({})",
                    server.id,
                    differ.join(", ")
                )));
            }
            return self.volume_response(&server, &name, &vol, params, source.as_ref());
        }

        let (holder, size, pb_source) = self.resolve_source(source.as_ref(), range).await?;
        let server = match holder {
            Some(server) => server,
            None => placement::place(&self.servers.live(), size).await?,
        };
        // Check the ID fits before creating anything.
        VolumeId::new(server.id.clone(), name.clone()).map_err(|e| invalid(e.to_string()))?;
        tracing::info!(volume = %name, server = %server.id, size, "creating volume");
        let mut client = server.client.clone();
        // The validated parameters (defaults filled in), so that a repeated CreateVolume
        // with other parameters is told AlreadyExists, as the CSI spec requires; and the CSI
        // name, so that a derived name's owner can be confirmed.
        let mut labels = params.to_context();
        labels.insert(NAME_LABEL.to_owned(), req.name.clone());
        let create = pb::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            source: pb_source.map(|kind| pb::ContentSource { kind: Some(kind) }),
            labels,
        };
        let vol = mgmt(&server.id, CREATE_TIMEOUT, client.create_volume(create))
            .await?
            .volume
            .ok_or_else(|| {
                CsiError::Internal(format!("enbd-server {} returned no volume", server.id))
            })?;
        self.volume_response(&server, &name, &vol, params, source.as_ref())
    }

    /// For a volume made from `source`: the live server holding the source, the new volume's
    /// size, and the source as the server names it. Without a source: no holder.
    async fn resolve_source(
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
                    .list_snapshots_on(&server, sid.name().as_str(), "")
                    .await?
                    .into_iter()
                    .find(|s| s.name == sid.name().as_str())
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

    /// CreateVolume for `replicas` > 1 (see `replicas`): an existing complete set is judged
    /// like a single volume, a partial one (an interrupted earlier attempt) is completed, and
    /// otherwise the replicas are placed on distinct servers, the home first.
    async fn create_replicated(
        &self,
        name: ObjectName,
        req: CreateVolumeRequest,
        params: VolumeParams,
        source: Option<Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        let range = req.capacity_range.as_ref();
        // As for a single copy: the full CSI name is recorded, so a (hashed) long name that
        // collides with another CSI name is AlreadyExists rather than the other's volume.
        let mut labels = params.to_context();
        labels.insert(NAME_LABEL.to_owned(), req.name.clone());
        let n = params.replicas as usize;
        let (record, holders) = replicas::find(&self.servers, name.as_str()).await?;
        for (server, vol) in &holders {
            let differs = if !capacity::satisfies(vol.size_bytes, range) {
                Some("a size outside the requested capacity range")
            } else if vol.labels != labels {
                Some("other parameters")
            } else {
                None
            };
            if let Some(what) = differs {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists on {} with {what}",
                    server.id
                )));
            }
        }
        if let Some(record) = record {
            let members = replicas::member_servers(&self.servers, name.as_str(), &record)?;
            let Some((_, vol)) = members
                .first()
                .and_then(|home| holders.iter().find(|(s, _)| s.id == home.id))
            else {
                return Err(CsiError::Unavailable(format!(
                    "volume {name}: the home replica did not answer"
                )));
            };
            if source_of(&members[0].id, vol) != source {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} already exists with a different content source"
                )));
            }
            return self.replicated_response(&members, &name, vol, params, source.as_ref());
        }

        let (content, size, pb_source) = self.resolve_source(source.as_ref(), range).await?;
        // The home: the source's server (it holds the content), else a partial set's copy.
        let home = content.or_else(|| {
            let mut partial: Vec<_> = holders.iter().map(|(s, _)| s.clone()).collect();
            partial.sort_by(|a, b| a.id.cmp(&b.id));
            partial.into_iter().next()
        });
        let mut fixed: Vec<LiveServer> = home.into_iter().collect();
        for (server, _) in &holders {
            if fixed.iter().all(|f| f.id != server.id) && fixed.len() < n {
                fixed.push(server.clone());
            }
        }
        let placed = placement::place_replicas(&self.servers.live(), size, n, &fixed).await?;
        let home = &placed[0];
        VolumeId::new(home.id.clone(), name.clone()).map_err(|e| invalid(e.to_string()))?;
        tracing::info!(volume = %name, home = %home.id, replicas = n, size, "creating mirrored volume");
        let mut client = home.client.clone();
        let create = pb::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            source: pb_source
                .clone()
                .map(|kind| pb::ContentSource { kind: Some(kind) }),
            labels: labels.clone(),
        };
        let vol = mgmt(&home.id, CREATE_TIMEOUT, client.create_volume(create))
            .await?
            .volume
            .ok_or_else(|| {
                CsiError::Internal(format!("enbd-server {} returned no volume", home.id))
            })?;
        replicas::complete_set(
            &placed,
            name.as_str(),
            vol.size_bytes,
            &labels,
            pb_source.is_some(),
        )
        .await?;
        self.replicated_response(&placed, &name, &vol, params, source.as_ref())
    }

    /// The response for a mirrored volume: the home's id and context, plus every replica.
    fn replicated_response(
        &self,
        members: &[LiveServer],
        name: &ObjectName,
        vol: &pb::Volume,
        params: VolumeParams,
        source: Option<&Source>,
    ) -> Result<CreateVolumeResponse, CsiError> {
        let mut resp = self.volume_response(&members[0], name, vol, params, source)?;
        if let Some(v) = resp.volume.as_mut() {
            let list: Vec<String> = members
                .iter()
                .map(|m| replicas::endpoint(m).to_string())
                .collect();
            v.volume_context
                .insert(CTX_REPLICAS.to_owned(), list.join(","));
        }
        Ok(resp)
    }

    async fn delete_volume(
        self: Arc<Self>,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let Ok(id) = VolumeId::parse(&req.volume_id) else {
            // Not an ID this driver issues, so no such volume exists.
            return Ok(DeleteVolumeResponse {});
        };
        let Some(server) = self.holder(id.server(), &format!("volume {id}"))? else {
            tracing::warn!(volume_id = %id, "volume on an unknown enbd-server treated as already deleted");
            return Ok(DeleteVolumeResponse {});
        };
        let this = Arc::clone(&self);
        self.ops
            .run(format!("volume:{}", id.name()), async move {
                let nodes = this.publications.nodes(&id.to_string());
                if !nodes.is_empty() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is still published to node(s) {}",
                        nodes.join(", ")
                    )));
                }
                match replicas::membership(&server, id.name().as_str()).await {
                    Ok(record) if record.generation > 0 => {
                        replicas::delete_all(&this.servers, &server, id.name().as_str()).await?;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                let mut client = server.client.clone();
                let req = pb::DeleteVolumeRequest {
                    name: id.name().to_string(),
                    force: false,
                };
                match mgmt(&server.id, CALL_TIMEOUT, client.delete_volume(req)).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(volume_id = %id, "volume deleted");
                Ok(DeleteVolumeResponse {})
            })
            .await
    }

    /// The live server and volume for an existing-volume RPC; unknown or
    /// malformed IDs are NotFound.
    async fn existing_volume(
        &self,
        volume_id: &str,
    ) -> Result<(VolumeId, LiveServer, pb::Volume), CsiError> {
        required(volume_id, "volume_id")?;
        let not_found = || CsiError::NotFound(format!("volume {volume_id} not found"));
        let id = VolumeId::parse(volume_id).map_err(|_| not_found())?;
        let server = self
            .holder(id.server(), &format!("volume {id}"))?
            .ok_or_else(not_found)?;
        let vol = self
            .get_volume(&server, id.name())
            .await?
            .ok_or_else(not_found)?;
        Ok((id, server, vol))
    }

    async fn publish(
        self: Arc<Self>,
        req: ControllerPublishVolumeRequest,
    ) -> Result<ControllerPublishVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        required(&req.node_id, "node_id")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        let cap = capability::check(cap).map_err(invalid)?;
        let this = Arc::clone(&self);
        let key = format!(
            "volume:{}",
            VolumeId::parse(&req.volume_id)
                .map(|i| i.name().to_string())
                .unwrap_or_default()
        );
        self.ops
            .run(key, async move {
                let (id, _, _) = this.existing_volume(&req.volume_id).await?;
                this.nodes.check(&req.node_id).await?;
                this.publications.publish(&id.to_string(), &req.node_id, req.readonly, cap)?;
                tracing::info!(volume_id = %id, node_id = req.node_id, readonly = req.readonly, "volume published");
                Ok(ControllerPublishVolumeResponse { publish_context: HashMap::new() })
            })
            .await
    }

    async fn unpublish(
        self: Arc<Self>,
        req: ControllerUnpublishVolumeRequest,
    ) -> Result<ControllerUnpublishVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let Ok(id) = VolumeId::parse(&req.volume_id) else {
            return Ok(ControllerUnpublishVolumeResponse {});
        };
        let this = Arc::clone(&self);
        self.ops
            .run(format!("volume:{}", id.name()), async move {
                let node = Some(req.node_id.as_str()).filter(|n| !n.is_empty());
                this.publications.unpublish(&id.to_string(), node);
                tracing::info!(volume_id = %id, node_id = req.node_id, "volume unpublished");
                Ok(ControllerUnpublishVolumeResponse {})
            })
            .await
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        self.existing_volume(&req.volume_id).await?;
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if let Err(e) = VolumeParams::from_map(&req.parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        if !req.mutable_parameters.is_empty() {
            return Ok(unconfirmed(
                "mutable_parameters are not supported by this driver".into(),
            ));
        }
        if let Err(reason) = capability::check_all(&req.volume_capabilities) {
            return Ok(unconfirmed(reason));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    /// Every volume on every live server, keyed by volume ID. A server that
    /// fails to list is left out (and logged): a partial answer during an
    /// outage beats none, and the attacher only re-publishes what is missing.
    async fn all_volumes(&self) -> Vec<(VolumeId, pb::Volume)> {
        let live = self.servers.live();
        let lists = futures::future::join_all(live.iter().map(|s| {
            let mut client = s.client.clone();
            async move {
                let req = pb::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: String::new(),
                };
                mgmt(&s.id, CALL_TIMEOUT, client.list_volumes(req)).await
            }
        }))
        .await;
        let mut out = Vec::new();
        for (server, list) in live.iter().zip(lists) {
            match list {
                Ok(list) => out.extend(list.volumes.into_iter().filter_map(|v| {
                    let name = ObjectName::parse(&v.name).ok()?;
                    Some((VolumeId::new(server.id.clone(), name).ok()?, v))
                })),
                Err(e) => {
                    tracing::warn!(server = %server.id, error = %e, "ListVolumes left this server out")
                }
            }
        }
        out
    }

    async fn list_volumes(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse, CsiError> {
        if req.max_entries < 0 {
            return Err(invalid("max_entries must not be negative"));
        }
        let items = self
            .all_volumes()
            .await
            .into_iter()
            .map(|(id, v)| (id.to_string(), (id, v)))
            .collect();
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token, |t| {
            VolumeId::parse(t).is_ok()
        })?;
        let entries = page
            .into_iter()
            .map(|(id, v)| list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: to_i64(v.size_bytes),
                    volume_id: id.to_string(),
                    volume_context: HashMap::new(),
                    content_source: source_of(id.server(), &v).as_ref().map(csi_source),
                    accessible_topology: Vec::new(),
                }),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: self.publications.nodes(&id.to_string()),
                    volume_condition: Some(normal(id.server())),
                }),
            })
            .collect();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse, CsiError> {
        VolumeParams::from_map(&req.parameters).map_err(|e| invalid(e.to_string()))?;
        if !req.volume_capabilities.is_empty()
            && capability::check_all(&req.volume_capabilities).is_err()
        {
            // No storage can hold a volume with capabilities we do not support.
            return Ok(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            });
        }
        let free = placement::free_space(&self.servers.live()).await;
        let total: u64 = free.iter().map(|(_, f)| *f).sum();
        let largest = free.iter().map(|(_, f)| *f).max().unwrap_or(0);
        Ok(GetCapacityResponse {
            available_capacity: to_i64(total),
            maximum_volume_size: Some(to_i64(largest - largest % capacity::BLOCK)),
            minimum_volume_size: Some(to_i64(capacity::BLOCK)),
        })
    }

    async fn create_snapshot(
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
            .filter(|k| !k.starts_with(enbd_proto::params::KUBERNETES_PREFIX))
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
                                replicas::is_member(&home, source.name().as_str(), &server.id).await
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
                let home = this
                    .holder(source.server(), &format!("volume {source}"))?
                    .ok_or_else(|| {
                        CsiError::NotFound(format!("source volume {source} not found"))
                    })?;
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
                let snap = mgmt(&server.id, CREATE_TIMEOUT, client.create_snapshot(create))
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

    async fn delete_snapshot(
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
                match mgmt(&server.id, CALL_TIMEOUT, client.delete_snapshot(req)).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(snapshot_id = %id, "snapshot deleted");
                Ok(DeleteSnapshotResponse {})
            })
            .await
    }

    async fn list_snapshots(
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

    async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse, CsiError> {
        required(&req.snapshot_id, "snapshot_id")?;
        let not_found = || CsiError::NotFound(format!("snapshot {} not found", req.snapshot_id));
        let id = SnapshotId::parse(&req.snapshot_id).map_err(|_| not_found())?;
        let server = self
            .holder(id.server(), &format!("snapshot {id}"))?
            .ok_or_else(not_found)?;
        let snap = self
            .list_snapshots_on(&server, id.name().as_str(), "")
            .await?
            .into_iter()
            .find(|s| s.name == id.name().as_str())
            .ok_or_else(not_found)?;
        Ok(GetSnapshotResponse {
            snapshot: Some(csi_snapshot(&id, &snap)),
        })
    }

    async fn expand(
        self: Arc<Self>,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let size = capacity::for_expand(req.capacity_range.as_ref())?;
        let block = match req.volume_capability.as_ref() {
            Some(cap) => capability::check(cap).map_err(invalid)?.block,
            None => false,
        };
        let key = format!(
            "volume:{}",
            VolumeId::parse(&req.volume_id)
                .map(|i| i.name().to_string())
                .unwrap_or_default()
        );
        let this = Arc::clone(&self);
        self.ops
            .run(key, async move {
                let (id, server, vol) = this.existing_volume(&req.volume_id).await?;
                // A raw block device needs nothing on the node beyond the new
                // size; a filesystem must be grown there (NodeExpandVolume).
                let node_expansion_required = !block;
                if vol.size_bytes >= size {
                    return Ok(ControllerExpandVolumeResponse {
                        capacity_bytes: to_i64(vol.size_bytes),
                        node_expansion_required,
                    });
                }
                // The same rule as placement: the growth must fit in the
                // server's free space today, or it could never be written.
                let mut client = server.client.clone();
                let free = mgmt(&server.id, CALL_TIMEOUT, client.get_capacity(pb::GetCapacityRequest {}))
                    .await?
                    .available_bytes;
                let growth = size - vol.size_bytes;
                if growth > free {
                    return Err(CsiError::ResourceExhausted(format!(
                        "growing volume {id} by {growth} bytes needs more than the {free} bytes free on enbd-server {}",
                        server.id
                    )));
                }
                // Every replica grows before any node can learn the new size.
                if replicas::membership(&server, id.name().as_str()).await?.generation > 0 {
                    let now = replicas::expand_all(&this.servers, &server, id.name().as_str(), size).await?;
                    tracing::info!(volume_id = %id, size = now, "mirrored volume expanded on every replica");
                    return Ok(ControllerExpandVolumeResponse { capacity_bytes: to_i64(now), node_expansion_required });
                }
                let req = pb::ExpandVolumeRequest { name: id.name().to_string(), size_bytes: size };
                let vol = mgmt(&server.id, CALL_TIMEOUT, client.expand_volume(req))
                    .await?
                    .volume
                    .ok_or_else(|| CsiError::Internal(format!("enbd-server {} returned no volume", server.id)))?;
                tracing::info!(volume_id = %id, size = vol.size_bytes, "volume expanded");
                Ok(ControllerExpandVolumeResponse { capacity_bytes: to_i64(vol.size_bytes), node_expansion_required })
            })
            .await
    }

    async fn get_volume_status(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let not_found = || CsiError::NotFound(format!("volume {} not found", req.volume_id));
        let id = VolumeId::parse(&req.volume_id).map_err(|_| not_found())?;
        let published_node_ids = self.publications.nodes(&id.to_string());
        let (vol, condition) = match self.servers.lookup(id.server()) {
            Lookup::Unknown => return Err(not_found()),
            // The point of a volume condition: say so when the server holding it is gone.
            Lookup::Down(reason) => (
                Volume {
                    volume_id: id.to_string(),
                    ..Default::default()
                },
                VolumeCondition {
                    abnormal: true,
                    message: format!("enbd-server {} is unreachable: {reason}", id.server()),
                },
            ),
            Lookup::Live(server) => {
                let v = self
                    .get_volume(&server, id.name())
                    .await?
                    .ok_or_else(not_found)?;
                let vol = Volume {
                    capacity_bytes: to_i64(v.size_bytes),
                    volume_id: id.to_string(),
                    volume_context: HashMap::new(),
                    content_source: source_of(id.server(), &v).as_ref().map(csi_source),
                    accessible_topology: Vec::new(),
                };
                let condition =
                    match replicas::abnormal(&self.servers, &server, id.name().as_str()).await {
                        Some(message) => VolumeCondition {
                            abnormal: true,
                            message,
                        },
                        None => normal(id.server()),
                    };
                (vol, condition)
            }
        };
        Ok(ControllerGetVolumeResponse {
            volume: Some(vol),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Rpc<CreateVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("CreateVolume", s.create_volume(req.into_inner()).await)
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Rpc<DeleteVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("DeleteVolume", s.delete_volume(req.into_inner()).await)
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Rpc<ControllerPublishVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("ControllerPublishVolume", s.publish(req.into_inner()).await)
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Rpc<ControllerUnpublishVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state.reply(
            "ControllerUnpublishVolume",
            s.unpublish(req.into_inner()).await,
        )
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Rpc<ValidateVolumeCapabilitiesResponse> {
        self.state.reply(
            "ValidateVolumeCapabilities",
            self.state.validate(req.into_inner()).await,
        )
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Rpc<ListVolumesResponse> {
        self.state.reply(
            "ListVolumes",
            self.state.list_volumes(req.into_inner()).await,
        )
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Rpc<GetCapacityResponse> {
        self.state.reply(
            "GetCapacity",
            self.state.get_capacity(req.into_inner()).await,
        )
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Rpc<ControllerGetCapabilitiesResponse> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::PublishUnpublishVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::PublishReadonly,
            rpc::Type::ExpandVolume,
            rpc::Type::ListVolumesPublishedNodes,
            rpc::Type::VolumeCondition,
            rpc::Type::GetVolume,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::GetSnapshot,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        self.state.reply(
            "ControllerGetCapabilities",
            Ok(ControllerGetCapabilitiesResponse { capabilities }),
        )
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Rpc<CreateSnapshotResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("CreateSnapshot", s.create_snapshot(req.into_inner()).await)
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Rpc<DeleteSnapshotResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("DeleteSnapshot", s.delete_snapshot(req.into_inner()).await)
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Rpc<ListSnapshotsResponse> {
        self.state.reply(
            "ListSnapshots",
            self.state.list_snapshots(req.into_inner()).await,
        )
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Rpc<GetSnapshotResponse> {
        self.state.reply(
            "GetSnapshot",
            self.state.get_snapshot(req.into_inner()).await,
        )
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Rpc<ControllerExpandVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .reply("ControllerExpandVolume", s.expand(req.into_inner()).await)
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Rpc<ControllerGetVolumeResponse> {
        self.state.reply(
            "ControllerGetVolume",
            self.state.get_volume_status(req.into_inner()).await,
        )
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Rpc<ControllerModifyVolumeResponse> {
        self.state.reply(
            "ControllerModifyVolume",
            Err(CsiError::Unimplemented("ControllerModifyVolume")),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn items(ids: &[&str]) -> Vec<(String, String)> {
        ids.iter().map(|i| (i.to_string(), i.to_string())).collect()
    }

    #[test]
    fn pagination_walks_everything_once() {
        let all = items(&["s/c", "s/a", "t/a", "s/b"]);
        let ok = |t: &str| VolumeId::parse(t).is_ok();
        let (p1, t1) = paginate(all.clone(), 2, "", ok).unwrap();
        assert_eq!(p1, ["s/a", "s/b"]);
        assert_eq!(t1, "s/c");
        let (p2, t2) = paginate(all.clone(), 2, &t1, ok).unwrap();
        assert_eq!(p2, ["s/c", "t/a"]);
        assert_eq!(t2, "");
        let (p, t) = paginate(all.clone(), 0, "", ok).unwrap();
        assert_eq!((p.len(), t.as_str()), (4, ""));
        assert!(matches!(
            paginate(all.clone(), 1, "garbage", ok),
            Err(CsiError::Aborted(_))
        ));
        assert!(matches!(
            paginate(all, -1, "", ok),
            Err(CsiError::InvalidArgument(_))
        ));
    }

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
