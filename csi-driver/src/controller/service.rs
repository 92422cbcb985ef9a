//! The tonic Controller service: each RPC hands its request to one operation on
//! [`State`] and turns the outcome into the reply through [`State::reply`], the
//! service's one error mapping (counted, logged once, never `Unknown`).

use std::sync::Arc;

use enbd_proto::csi::controller_server::Controller;
use enbd_proto::csi::controller_service_capability::{self, rpc};
use enbd_proto::csi::*;
use tonic::{Request, Response, Status};

use crate::error::CsiError;
use crate::state::State;

pub struct ControllerService {
    state: Arc<State>,
}

impl ControllerService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Rpc<CreateVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("CreateVolume", s.create_volume(req.into_inner()))
            .await
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Rpc<DeleteVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("DeleteVolume", s.delete_volume(req.into_inner()))
            .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Rpc<ControllerPublishVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("ControllerPublishVolume", s.publish(req.into_inner()))
            .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Rpc<ControllerUnpublishVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("ControllerUnpublishVolume", s.unpublish(req.into_inner()))
            .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Rpc<ValidateVolumeCapabilitiesResponse> {
        self.state
            .call(
                "ValidateVolumeCapabilities",
                self.state.validate(req.into_inner()),
            )
            .await
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Rpc<ListVolumesResponse> {
        self.state
            .call("ListVolumes", self.state.list_volumes(req.into_inner()))
            .await
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Rpc<GetCapacityResponse> {
        self.state
            .call("GetCapacity", self.state.get_capacity(req.into_inner()))
            .await
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
        self.state
            .call(
                "ControllerGetCapabilities",
                std::future::ready(Ok(ControllerGetCapabilitiesResponse { capabilities })),
            )
            .await
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Rpc<CreateSnapshotResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("CreateSnapshot", s.create_snapshot(req.into_inner()))
            .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Rpc<DeleteSnapshotResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("DeleteSnapshot", s.delete_snapshot(req.into_inner()))
            .await
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Rpc<ListSnapshotsResponse> {
        self.state
            .call("ListSnapshots", self.state.list_snapshots(req.into_inner()))
            .await
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Rpc<GetSnapshotResponse> {
        self.state
            .call("GetSnapshot", self.state.get_snapshot(req.into_inner()))
            .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Rpc<ControllerExpandVolumeResponse> {
        let s = Arc::clone(&self.state);
        self.state
            .call("ControllerExpandVolume", s.expand(req.into_inner()))
            .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Rpc<ControllerGetVolumeResponse> {
        self.state
            .call(
                "ControllerGetVolume",
                self.state.get_volume_status(req.into_inner()),
            )
            .await
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Rpc<ControllerModifyVolumeResponse> {
        self.state
            .call(
                "ControllerModifyVolume",
                std::future::ready(Err(CsiError::Unimplemented("ControllerModifyVolume"))),
            )
            .await
    }
}
