//! The CSI Identity service of the node plugin: who we are, what we offer, whether we are
//! ready. Readiness is the device layer's own answer (kernel support present), not a
//! constant.

use std::collections::HashMap;
use std::sync::Arc;

use enbd_proto::csi::identity_server::Identity;
use enbd_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};
use tracing::warn;

use super::NodeConfig;
use super::attacher::Attacher;

pub struct IdentityService<A> {
    driver_name: String,
    attacher: Arc<A>,
}

impl<A: Attacher> IdentityService<A> {
    pub fn new(config: &NodeConfig, attacher: Arc<A>) -> Self {
        Self {
            driver_name: config.driver_name.clone(),
            attacher,
        }
    }
}

#[tonic::async_trait]
impl<A: Attacher> Identity for IdentityService<A> {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::from([("component".to_string(), "enbd-node".to_string())]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // The node plugin serves no controller, and volumes are reachable over the network
        // from every node: no VOLUME_ACCESSIBILITY_CONSTRAINTS (README: "Topology").
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        match self.attacher.ready() {
            Ok(()) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Err(reason) => {
                warn!(%reason, "probe: device layer not ready");
                Err(Status::failed_precondition(format!(
                    "device layer not ready: {reason}"
                )))
            }
        }
    }
}
