//! Volumes: CreateVolume for a single copy (idempotent against what an earlier call made),
//! DeleteVolume, ValidateVolumeCapabilities, ListVolumes and ControllerGetVolume.

use std::collections::HashMap;
use std::sync::Arc;

use enbd_proto::csi::*;
use enbd_proto::enbd as pb;
use enbd_proto::ids::{ObjectName, ServerId, VolumeId};
use enbd_proto::params::{VolumeContext, VolumeParams};

use super::source::{Source, csi_source, parse_source, source_of};
use super::{CALL_TIMEOUT, listing, paginate, required, to_i64};
use crate::capability;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::names::{self, NAME_LABEL};
use crate::placement;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

impl State {
    pub(super) fn volume_response(
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

    pub(super) async fn create_volume(
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

    pub(super) async fn create_volume_locked(
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
            let mut have = names::comparable_labels(&vol.labels);
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

        let (holder, size, pb_source) = self
            .resolve_source(
                source.as_ref(),
                range,
                capability::fs_floor(&req.volume_capabilities, params.fs_type),
            )
            .await?;
        let server = match holder {
            Some(server) => server,
            None => placement::place(&self.servers.live(), size).await?,
        };
        // Check the ID fits before creating anything.
        VolumeId::new(server.id.clone(), name.clone()).map_err(|e| invalid(e.to_string()))?;
        tracing::info!(volume = %name, server = %server.id, size, "creating volume");
        // The validated parameters (defaults filled in), so that a repeated CreateVolume
        // with other parameters is told AlreadyExists, as the CSI spec requires; and the CSI
        // name, so that a derived name's owner can be confirmed.
        // And the claim's names (--extra-create-metadata), for operators.
        let labels = names::volume_labels(params.to_context(), &req.name, &req.parameters);
        let create = pb::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            source: pb_source.map(|kind| pb::ContentSource { kind: Some(kind) }),
            labels,
        };
        let vol = super::source::create_on(&server, create).await?;
        self.volume_response(&server, &name, &vol, params, source.as_ref())
    }

    pub(super) async fn delete_volume(
        self: Arc<Self>,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let Ok(id) = VolumeId::parse(&req.volume_id) else {
            // Not an ID this driver issues, so no such volume exists.
            return Ok(DeleteVolumeResponse {});
        };
        // The home, or (replaced away and gone) the in-sync replica that answers for it: a
        // gone home that is no longer a member never holds the delete up.
        let home = replicas::acting_home(
            &self.servers,
            id.server(),
            id.name().as_str(),
            &format!("volume {id}"),
        )
        .await?;
        let Some(server) = home else {
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
                // Before the members: a record may name a held server by now, and then the
                // members' delete below finds its copy gone, which is success.
                this.delete_prepared(&id).await?;
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
                match mgmt::call(&server.id, CALL_TIMEOUT, client.delete_volume(req)).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(volume_id = %id, "volume deleted");
                Ok(DeleteVolumeResponse {})
            })
            .await
    }

    pub(super) async fn validate(
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

    pub(super) async fn list_volumes(
        &self,
        req: ListVolumesRequest,
    ) -> Result<ListVolumesResponse, CsiError> {
        if req.max_entries < 0 {
            return Err(invalid("max_entries must not be negative"));
        }
        let servers = &self.servers;
        let listed = listing::one_per_volume(self.all_volumes().await, |name, copies| {
            listing::home_from_records(servers, name, copies)
        })
        .await;
        let items = listed.into_iter().map(|l| (l.id.to_string(), l)).collect();
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token, |t| {
            VolumeId::parse(t).is_ok()
        })?;
        let mut entries = Vec::with_capacity(page.len());
        for listed in page {
            let (id, v) = (&listed.id, &listed.volume);
            // A mirror's condition is its replica set's (the health monitor reads it here:
            // it prefers ListVolumes to ControllerGetVolume), read from the home when it is
            // live, else from a replica that listed it; a single copy listed by its live
            // server is serving.
            let start = std::iter::once(id.server())
                .chain(&listed.copies)
                .find_map(|s| match self.servers.lookup(s) {
                    Lookup::Live(server) => Some(server),
                    _ => None,
                });
            let condition = match start {
                Some(server) if listed.mirrored() => {
                    match replicas::abnormal(&self.servers, &server, id.name().as_str()).await {
                        Some(message) => VolumeCondition {
                            abnormal: true,
                            message,
                        },
                        None => normal(id.server()),
                    }
                }
                _ => normal(id.server()),
            };
            entries.push(list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: to_i64(v.size_bytes),
                    volume_id: id.to_string(),
                    volume_context: HashMap::new(),
                    content_source: source_of(id.server(), v).as_ref().map(csi_source),
                    accessible_topology: Vec::new(),
                }),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: self.publications.nodes(&id.to_string()),
                    volume_condition: Some(condition),
                }),
            });
        }
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    pub(super) async fn get_volume_status(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let not_found = || CsiError::NotFound(format!("volume {} not found", req.volume_id));
        let id = VolumeId::parse(&req.volume_id).map_err(|_| not_found())?;
        let published_node_ids = self.publications.nodes(&id.to_string());
        let mut lookup = self.servers.lookup(id.server());
        if !matches!(lookup, Lookup::Live(_)) {
            // A home replaced away: the replica answering for it reports the condition.
            let what = format!("volume {id}");
            if let Ok(Some(s)) =
                replicas::acting_home(&self.servers, id.server(), id.name().as_str(), &what).await
            {
                lookup = Lookup::Live(s);
            }
        }
        let (vol, condition) = match lookup {
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

fn normal(server: &ServerId) -> VolumeCondition {
    VolumeCondition {
        abnormal: false,
        message: format!("enbd-server {server} is serving the volume"),
    }
}
