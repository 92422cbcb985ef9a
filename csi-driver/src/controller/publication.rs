//! ControllerPublishVolume / ControllerUnpublishVolume: which nodes may open a volume,
//! recorded in [`crate::publish::Publications`] and enforced by the servers: publishing
//! grants the node access on every replica's server (`GrantAccess`, one token for all of
//! them, handed to the node in `publish_context`), unpublishing revokes it there
//! (`RevokeAccess`, which also closes the node's open connections).
//!
//! Both are idempotent on the servers, so the attacher's retries and a restarted controller
//! change nothing: the home's existing token is returned and set again on the others.
//! Publishing skips a replica whose server is down (the volume stays usable on the others;
//! the grant reconciliation, [`super::grants`], grants that replica once its server is live
//! again); unpublishing does not: a grant left on a server that comes back would outlive the
//! publication, so it is `Unavailable` until every member answered.

use std::collections::HashMap;
use std::sync::Arc;

use enbd_proto::csi::*;
use enbd_proto::enbd as pb;
use enbd_proto::ids::{ServerId, VolumeId};
use enbd_proto::params::PUBLISH_ACCESS_TOKEN;

use super::{CALL_TIMEOUT, required, volume_key};
use crate::capability;
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::publish::Token;
use crate::replicas;
use crate::servers::{LiveServer, Lookup};
use crate::state::State;

/// The servers holding a copy of a volume whose acting home is `home`: the home alone for a
/// single copy, every member of the newest membership record for a mirror (home first).
/// Members whose servers are not live come back by id in the second list.
async fn holders(
    state: &State,
    home: LiveServer,
    name: &str,
) -> Result<(Vec<LiveServer>, Vec<ServerId>), CsiError> {
    let record = replicas::newest(&state.servers, &home, name).await?;
    if record.generation == 0 {
        return Ok((vec![home], Vec::new()));
    }
    let mut live = vec![home.clone()];
    let mut down = Vec::new();
    for m in &record.members {
        let Ok(id) = ServerId::parse(&m.replica_id) else {
            continue;
        };
        if id == home.id {
            continue;
        }
        match state.servers.lookup(&id) {
            Lookup::Live(s) => live.push(s),
            Lookup::Down(_) | Lookup::Unknown => down.push(id),
        }
    }
    Ok((live, down))
}

/// Grants `node_id` access to `volume` on `server` with `token` (empty: the server's existing
/// token or a new one).
pub(super) async fn grant(
    server: &LiveServer,
    volume: &str,
    node_id: &str,
    token: &str,
) -> Result<pb::GrantAccessResponse, CsiError> {
    let mut client = server.client.clone();
    let req = pb::GrantAccessRequest {
        volume: volume.to_owned(),
        node_id: node_id.to_owned(),
        token: token.to_owned(),
    };
    mgmt::call(&server.id, CALL_TIMEOUT, client.grant_access(req)).await
}

/// Withdraws `node_id`'s grant on `volume` on `server` (closing its connections).
pub(super) async fn revoke(
    server: &LiveServer,
    volume: &str,
    node_id: &str,
) -> Result<pb::RevokeAccessResponse, CsiError> {
    let mut client = server.client.clone();
    let req = pb::RevokeAccessRequest {
        volume: volume.to_owned(),
        node_id: node_id.to_owned(),
    };
    mgmt::call(&server.id, CALL_TIMEOUT, client.revoke_access(req)).await
}

impl State {
    pub(super) async fn publish(
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
        let key = volume_key(&req.volume_id);
        self.ops
            .run(key, async move {
                let (id, home, _) = this.existing_volume(&req.volume_id).await?;
                this.nodes.check(&req.node_id).await?;
                this.publications
                    .publish(&id.to_string(), &req.node_id, req.readonly, cap)?;
                let name = id.name().as_str();
                let (live, down) = holders(&this, home, name).await?;
                // The home's token (existing or new) is the one every replica gets.
                let mut token = String::new();
                for server in &live {
                    token = grant(server, name, &req.node_id, &token).await?.token;
                }
                this.publications.set_token(
                    &id.to_string(),
                    &req.node_id,
                    Token::new(token.clone()),
                );
                for id in &down {
                    tracing::warn!(volume = name, server = %id, node_id = req.node_id,
                        "replica's server is down: not granted now (the grant reconciliation \
                         grants it once the server is live)");
                }
                tracing::info!(volume_id = %id, node_id = req.node_id, readonly = req.readonly,
                    servers = live.len(), "volume published");
                Ok(ControllerPublishVolumeResponse {
                    publish_context: HashMap::from([(PUBLISH_ACCESS_TOKEN.to_owned(), token)]),
                })
            })
            .await
    }

    pub(super) async fn unpublish(
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
                let name = id.name().as_str();
                let home = replicas::acting_home(
                    &this.servers,
                    id.server(),
                    name,
                    &format!("volume {id}"),
                )
                .await?;
                // No server knows the volume: nothing can be open, nothing is granted.
                let found = match home {
                    Some(home) => match holders(&this, home, name).await {
                        Ok(h) => Some(h),
                        Err(e) if e.is_not_found() => None,
                        Err(e) => return Err(e),
                    },
                    None => None,
                };
                if let Some((live, down)) = found {
                    if let Some(d) = down.first() {
                        return Err(CsiError::Unavailable(format!(
                            "volume {id}: replica server {d} is unavailable; its access grant for \
                             node {} cannot be revoked yet",
                            req.node_id
                        )));
                    }
                    for server in &live {
                        match revoke(server, name, &req.node_id)
                            .await
                            .map(|r| r.closed_connections)
                        {
                            Ok(closed) if closed > 0 => {
                                tracing::info!(volume_id = %id, server = %server.id,
                                node_id = req.node_id, closed, "access revoked; connections closed")
                            }
                            Ok(_) => {}
                            // Deleted meanwhile: nothing to revoke.
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                this.publications.unpublish(&id.to_string(), node);
                tracing::info!(volume_id = %id, node_id = req.node_id, "volume unpublished");
                Ok(ControllerUnpublishVolumeResponse {})
            })
            .await
    }
}
