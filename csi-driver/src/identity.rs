//! CSI Identity service of the controller. Probe reports ready only when
//! discovery has delivered a complete server list and at least one enbd-server
//! answers its health check: without one the controller can do nothing useful.

use std::sync::Arc;

use enbd_proto::csi::identity_server::Identity;
use enbd_proto::csi::plugin_capability::{self, service, volume_expansion};
use enbd_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::state::State;

pub struct IdentityService {
    state: Arc<State>,
}

impl IdentityService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn service_cap(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

fn expansion_cap(t: volume_expansion::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        self.state
            .call(
                "GetPluginInfo",
                std::future::ready(Ok(GetPluginInfoResponse {
                    name: self.state.driver_name.clone(),
                    vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                    manifest: Default::default(),
                })),
            )
            .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // No VOLUME_ACCESSIBILITY_CONSTRAINTS: a volume is reachable over the
        // network from every node, so there is no topology to honour.
        self.state
            .call(
                "GetPluginCapabilities",
                std::future::ready(Ok(GetPluginCapabilitiesResponse {
                    capabilities: vec![
                        service_cap(service::Type::ControllerService),
                        expansion_cap(volume_expansion::Type::Online),
                        expansion_cap(volume_expansion::Type::Offline),
                    ],
                })),
            )
            .await
    }

    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.state.servers.is_synced() && !self.state.servers.live().is_empty();
        self.state
            .call(
                "Probe",
                std::future::ready(Ok(ProbeResponse { ready: Some(ready) })),
            )
            .await
    }
}
