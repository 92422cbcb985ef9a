//! ControllerPublishVolume / ControllerUnpublishVolume: which nodes may open a volume,
//! recorded in [`crate::publish::Publications`].

use std::collections::HashMap;
use std::sync::Arc;

use enbd_proto::csi::*;
use enbd_proto::ids::VolumeId;

use super::{required, volume_key};
use crate::capability;
use crate::error::{CsiError, invalid};
use crate::state::State;

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
                let (id, _, _) = this.existing_volume(&req.volume_id).await?;
                this.nodes.check(&req.node_id).await?;
                this.publications.publish(&id.to_string(), &req.node_id, req.readonly, cap)?;
                tracing::info!(volume_id = %id, node_id = req.node_id, readonly = req.readonly, "volume published");
                Ok(ControllerPublishVolumeResponse { publish_context: HashMap::new() })
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
                this.publications.unpublish(&id.to_string(), node);
                tracing::info!(volume_id = %id, node_id = req.node_id, "volume unpublished");
                Ok(ControllerUnpublishVolumeResponse {})
            })
            .await
    }
}
