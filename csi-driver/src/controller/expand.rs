//! ControllerExpandVolume: grow a volume (every replica of a mirrored one) within the
//! server's free space.

use std::sync::Arc;

use enbd_proto::csi::*;
use enbd_proto::enbd as pb;

use super::{CALL_TIMEOUT, required, to_i64, volume_key};
use crate::capability;
use crate::capacity;
use crate::error::{CsiError, invalid};
use crate::mgmt;
use crate::replicas;
use crate::state::State;

impl State {
    pub(super) async fn expand(
        self: Arc<Self>,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let size = capacity::for_expand(req.capacity_range.as_ref())?;
        let block = match req.volume_capability.as_ref() {
            Some(cap) => capability::check(cap).map_err(invalid)?.block,
            None => false,
        };
        let key = volume_key(&req.volume_id);
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
                let free = mgmt::call(&server.id, CALL_TIMEOUT, client.get_capacity(pb::GetCapacityRequest {}))
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
                let vol = mgmt::call(&server.id, CALL_TIMEOUT, client.expand_volume(req))
                    .await?
                    .volume
                    .ok_or_else(|| CsiError::Internal(format!("enbd-server {} returned no volume", server.id)))?;
                tracing::info!(volume_id = %id, size = vol.size_bytes, "volume expanded");
                Ok(ControllerExpandVolumeResponse { capacity_bytes: to_i64(vol.size_bytes), node_expansion_required })
            })
            .await
    }
}
