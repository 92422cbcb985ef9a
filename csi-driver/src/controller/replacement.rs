//! The controller's half of replacing a mirrored volume's replica (`PrepareReplacement`, an
//! operator action through `csi-driver prepare-replacement`): the new replica's volume and
//! its access grant, made with the controller's management identity.
//!
//! The node's mirror owns the membership record of an attached volume (it is the only
//! writer while it serves IO, see [`crate::replicas`]), so the swap itself stays with
//! `enbd-node replace`; what the node may not do under management TLS is create a volume
//! or grant access (its role reads and writes mirror state only). So the controller does
//! those first:
//! - the new copy has the same name, size and labels as an in-sync member (the labels carry
//!   the volume's home; the size is what the node's replace checks);
//! - every node the volume is published to gets its own token granted there, so that the
//!   node's replace can read the volume (a management call scoped by that token) and open its
//!   data path before it writes the record;
//! - the server is held against the grant reconciliation ([`crate::pending`]), which would
//!   otherwise revoke a grant on a server that holds a copy but is no member, until a record
//!   names it.
//!
//! Nothing here changes the record: until the node replaces, the volume is exactly as it was.

use std::sync::Arc;

use enbd_proto::enbd::{self as pb, ReplicaState};
use enbd_proto::ids::{ServerId, VolumeId};

use super::publication::grant;
use super::{CALL_TIMEOUT, required, volume_key};
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::placement;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

fn server_arg(value: &str, field: &str) -> Result<ServerId, CsiError> {
    ServerId::parse(value).map_err(|e| invalid(format!("{field} {value:?}: {e}")))
}

/// The member ids of `record`, in record order.
fn member_ids(record: &pb::Membership) -> Vec<ServerId> {
    record
        .members
        .iter()
        .filter_map(|m| ServerId::parse(&m.replica_id).ok())
        .collect()
}

fn in_sync(record: &pb::Membership, id: &ServerId) -> bool {
    record
        .members
        .iter()
        .any(|m| m.replica_id == id.as_str() && m.state == ReplicaState::InSync as i32)
}

impl State {
    pub async fn prepare_replacement(
        self: Arc<Self>,
        req: pb::PrepareReplacementRequest,
    ) -> Result<pb::PrepareReplacementResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        required(&req.replica, "replica")?;
        let id = VolumeId::parse(&req.volume_id)
            .map_err(|e| invalid(format!("volume_id {:?}: {e}", req.volume_id)))?;
        let old = server_arg(&req.replica, "replica")?;
        let target = match req.target.as_str() {
            "" => None,
            t => Some(server_arg(t, "target")?),
        };
        let this = Arc::clone(&self);
        self.ops
            .run(volume_key(&req.volume_id), async move {
                this.prepare_locked(&id, &old, target.as_ref()).await
            })
            .await
    }

    async fn prepare_locked(
        &self,
        id: &VolumeId,
        old: &ServerId,
        target: Option<&ServerId>,
    ) -> Result<pb::PrepareReplacementResponse, CsiError> {
        let name = id.name().as_str();
        let (record, holders) = replicas::find(&self.servers, name).await?;
        if holders.is_empty() {
            return Err(CsiError::NotFound(format!(
                "volume {id} is on no live enbd-server"
            )));
        }
        let Some(record) = record.filter(|r| r.generation > 0) else {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is a single copy: only a mirrored volume's replica can be replaced"
            )));
        };
        let members = member_ids(&record);
        let listed = members
            .iter()
            .map(ServerId::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if !members.contains(old) {
            return Err(CsiError::FailedPrecondition(format!(
                "{old} is not a replica of {id} (generation {}: {listed})",
                record.generation
            )));
        }
        let (template, template_volume) = holders
            .iter()
            .find(|(s, _)| s.id != *old && in_sync(&record, &s.id))
            .ok_or_else(|| {
                CsiError::FailedPrecondition(format!(
                    "no replica of {id} other than {old} is in sync and reachable at generation {}: \
                     nothing to copy from (if the in-sync one is lost for good, promote a survivor \
                     first: enbd-node promote)",
                    record.generation
                ))
            })?;
        let size = template_volume.size_bytes;
        let nodes = self.publications.granted(&id.to_string());
        if nodes.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to no node this controller holds a token for: the \
                 replacement is made by the mirror of the node it is attached to, so attach it \
                 first (a restarted controller knows the token again at the volume's next \
                 ControllerPublish)"
            )));
        }
        let chosen = match target {
            Some(t) => self.named_target(id, &members, t)?,
            None => {
                self.placed_target(id, &members, old, &holders, size)
                    .await?
            }
        };
        let created = match holders.iter().find(|(s, _)| s.id == chosen.id) {
            Some((_, v)) if v.size_bytes == size => false,
            Some((_, v)) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "{} already holds a copy of {name} with {} bytes, not the volume's {size}: \
                     delete it there or choose another target",
                    chosen.id, v.size_bytes
                )));
            }
            None => {
                let mut client = chosen.client.clone();
                let create = pb::CreateVolumeRequest {
                    name: name.to_owned(),
                    size_bytes: size,
                    source: None,
                    labels: template_volume.labels.clone(),
                };
                mgmt::call(&chosen.id, CALL_TIMEOUT, client.create_volume(create)).await?;
                true
            }
        };
        let mut granted_nodes = Vec::with_capacity(nodes.len());
        for node in &nodes {
            grant(&chosen, name, &node.node_id, node.token.as_str()).await?;
            granted_nodes.push(node.node_id.clone());
        }
        self.replacements.hold(&id.to_string(), &chosen.id);
        let replica_spec = format!("{}@{}@{}", chosen.id, chosen.data_address, chosen.mgmt_url);
        tracing::info!(volume_id = %id, replaced = %old, new = %chosen.id, template = %template.id,
            size, created, nodes = granted_nodes.len(),
            "replacement replica prepared: the node's enbd-node replace records it");
        Ok(pb::PrepareReplacementResponse {
            server_id: chosen.id.to_string(),
            data_address: chosen.data_address.clone(),
            mgmt_url: chosen.mgmt_url.clone(),
            replica_spec,
            created,
            granted_nodes,
        })
    }

    /// Deletes the copies prepared for `id` that no record took (the volume is being deleted):
    /// a prepared replacement is the controller's own making, so it goes with the volume. A
    /// held server that is not live keeps its copy (logged; the hold lapses).
    pub(super) async fn delete_prepared(&self, id: &VolumeId) -> Result<(), CsiError> {
        let volume_id = id.to_string();
        for held in self.replacements.held(&volume_id) {
            let Lookup::Live(server) = self.servers.lookup(&held) else {
                tracing::warn!(volume_id, server = %held,
                    "a prepared replacement's server is unavailable: its copy stays there");
                continue;
            };
            let mut client = server.client.clone();
            let req = pb::DeleteVolumeRequest {
                name: id.name().to_string(),
                force: false,
            };
            match mgmt::call(&server.id, CALL_TIMEOUT, client.delete_volume(req)).await {
                Ok(_) => tracing::info!(volume_id, server = %held,
                    "prepared replacement never recorded: its copy deleted with the volume"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            self.replacements.release(&volume_id, &held);
        }
        Ok(())
    }

    /// The server an operator named, if it may take the replica.
    fn named_target(
        &self,
        id: &VolumeId,
        members: &[ServerId],
        target: &ServerId,
    ) -> Result<LiveServer, CsiError> {
        if members.contains(target) {
            return Err(CsiError::FailedPrecondition(format!(
                "{target} is already a replica of {id}"
            )));
        }
        match self.servers.lookup(target) {
            Lookup::Live(s) => Ok(s),
            Lookup::Down(why) => Err(CsiError::Unavailable(format!(
                "enbd-server {target} is unavailable: {why}"
            ))),
            Lookup::Unknown => Err(CsiError::NotFound(format!(
                "no enbd-server {target} is among the discovered ones"
            ))),
        }
    }

    /// A server for the new replica: the one an earlier call prepared (a retry), else a live
    /// non-member without a copy, with room, preferring a zone no surviving member uses.
    async fn placed_target(
        &self,
        id: &VolumeId,
        members: &[ServerId],
        old: &ServerId,
        holders: &[(LiveServer, pb::Volume)],
        size: u64,
    ) -> Result<LiveServer, CsiError> {
        let held = self.replacements.held(&id.to_string());
        if let Some((s, _)) = holders
            .iter()
            .find(|(s, _)| held.contains(&s.id) && !members.contains(&s.id))
        {
            return Ok(s.clone());
        }
        let others: Vec<LiveServer> = self
            .servers
            .live()
            .into_iter()
            .filter(|s| !members.contains(&s.id) && holders.iter().all(|(h, _)| h.id != s.id))
            .collect();
        let answered = placement::free_space(&others).await;
        let candidates: Vec<(ServerId, u64, Option<String>)> = answered
            .iter()
            .map(|(s, free)| (s.id.clone(), *free, s.zone.clone()))
            .collect();
        let taken: Vec<Option<String>> = holders
            .iter()
            .filter(|(s, _)| s.id != *old && members.contains(&s.id))
            .map(|(s, _)| s.zone.clone())
            .collect();
        let Some(chosen) = placement::pick_spread(&candidates, size, 1, &taken) else {
            return Err(CsiError::ResourceExhausted(format!(
                "no live enbd-server outside {id}'s replica set has room for {size} bytes \
                 ({} such servers answered)",
                answered.len()
            )));
        };
        Ok(answered[chosen[0]].0.clone())
    }
}
