//! Proves the generated CSI code is complete: every CSI service of the spec is
//! implemented as a tonic server (trivial bodies), served on a real unix socket,
//! and reached through the generated clients with one RPC per service. A missing
//! message, field or RPC in `csi.proto` fails to compile here.
#![allow(clippy::expect_used)]

use std::path::Path;

use enbd_proto::csi::controller_client::ControllerClient;
use enbd_proto::csi::controller_server::{Controller, ControllerServer};
use enbd_proto::csi::group_controller_client::GroupControllerClient;
use enbd_proto::csi::group_controller_server::{GroupController, GroupControllerServer};
use enbd_proto::csi::identity_client::IdentityClient;
use enbd_proto::csi::identity_server::{Identity, IdentityServer};
use enbd_proto::csi::node_client::NodeClient;
use enbd_proto::csi::node_server::{Node, NodeServer};
use enbd_proto::csi::snapshot_metadata_client::SnapshotMetadataClient;
use enbd_proto::csi::snapshot_metadata_server::{SnapshotMetadata, SnapshotMetadataServer};
use enbd_proto::csi::*;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

type Rpc<T> = Result<Response<T>, Status>;

struct Plugin;

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Rpc<GetPluginInfoResponse> {
        Ok(Response::new(GetPluginInfoResponse {
            name: "csi.example.test".into(),
            vendor_version: "0.0.1".into(),
            manifest: Default::default(),
        }))
    }
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Rpc<GetPluginCapabilitiesResponse> {
        Ok(Response::new(GetPluginCapabilitiesResponse::default()))
    }
    async fn probe(&self, _: Request<ProbeRequest>) -> Rpc<ProbeResponse> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Controller for Plugin {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Rpc<CreateVolumeResponse> {
        let req = req.into_inner();
        let capacity_bytes = req.capacity_range.map_or(0, |r| r.required_bytes);
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes,
                volume_id: format!("srv/{}", req.name),
                volume_context: req.parameters,
                content_source: req.volume_content_source,
                accessible_topology: req
                    .accessibility_requirements
                    .map(|a| a.requisite)
                    .unwrap_or_default(),
            }),
        }))
    }
    async fn delete_volume(&self, _: Request<DeleteVolumeRequest>) -> Rpc<DeleteVolumeResponse> {
        Ok(Response::new(DeleteVolumeResponse {}))
    }
    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Rpc<ControllerPublishVolumeResponse> {
        Ok(Response::new(ControllerPublishVolumeResponse::default()))
    }
    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Rpc<ControllerUnpublishVolumeResponse> {
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }
    async fn validate_volume_capabilities(
        &self,
        _: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Rpc<ValidateVolumeCapabilitiesResponse> {
        Ok(Response::new(ValidateVolumeCapabilitiesResponse::default()))
    }
    async fn list_volumes(&self, _: Request<ListVolumesRequest>) -> Rpc<ListVolumesResponse> {
        Ok(Response::new(ListVolumesResponse::default()))
    }
    async fn get_capacity(&self, _: Request<GetCapacityRequest>) -> Rpc<GetCapacityResponse> {
        Ok(Response::new(GetCapacityResponse::default()))
    }
    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Rpc<ControllerGetCapabilitiesResponse> {
        Ok(Response::new(ControllerGetCapabilitiesResponse::default()))
    }
    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Rpc<CreateSnapshotResponse> {
        Ok(Response::new(CreateSnapshotResponse::default()))
    }
    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Rpc<DeleteSnapshotResponse> {
        Ok(Response::new(DeleteSnapshotResponse {}))
    }
    async fn list_snapshots(&self, _: Request<ListSnapshotsRequest>) -> Rpc<ListSnapshotsResponse> {
        Ok(Response::new(ListSnapshotsResponse::default()))
    }
    async fn get_snapshot(&self, _: Request<GetSnapshotRequest>) -> Rpc<GetSnapshotResponse> {
        Ok(Response::new(GetSnapshotResponse::default()))
    }
    async fn controller_expand_volume(
        &self,
        _: Request<ControllerExpandVolumeRequest>,
    ) -> Rpc<ControllerExpandVolumeResponse> {
        Ok(Response::new(ControllerExpandVolumeResponse::default()))
    }
    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Rpc<ControllerGetVolumeResponse> {
        Ok(Response::new(ControllerGetVolumeResponse::default()))
    }
    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Rpc<ControllerModifyVolumeResponse> {
        Ok(Response::new(ControllerModifyVolumeResponse::default()))
    }
}

#[tonic::async_trait]
impl GroupController for Plugin {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Rpc<GroupControllerGetCapabilitiesResponse> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot
                            as i32,
                    },
                )),
            }],
        }))
    }
    async fn create_volume_group_snapshot(
        &self,
        _: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Rpc<CreateVolumeGroupSnapshotResponse> {
        Ok(Response::new(CreateVolumeGroupSnapshotResponse::default()))
    }
    async fn delete_volume_group_snapshot(
        &self,
        _: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Rpc<DeleteVolumeGroupSnapshotResponse> {
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }
    async fn get_volume_group_snapshot(
        &self,
        _: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Rpc<GetVolumeGroupSnapshotResponse> {
        Ok(Response::new(GetVolumeGroupSnapshotResponse::default()))
    }
}

type Stream<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

#[tonic::async_trait]
impl SnapshotMetadata for Plugin {
    type GetMetadataAllocatedStream = Stream<GetMetadataAllocatedResponse>;
    async fn get_metadata_allocated(
        &self,
        _: Request<GetMetadataAllocatedRequest>,
    ) -> Rpc<Self::GetMetadataAllocatedStream> {
        let item = GetMetadataAllocatedResponse {
            block_metadata_type: BlockMetadataType::FixedLength as i32,
            volume_capacity_bytes: 1 << 20,
            block_metadata: vec![BlockMetadata {
                byte_offset: 0,
                size_bytes: 4096,
            }],
        };
        Ok(Response::new(tokio_stream::iter(vec![Ok(item)])))
    }
    type GetMetadataDeltaStream = Stream<GetMetadataDeltaResponse>;
    async fn get_metadata_delta(
        &self,
        _: Request<GetMetadataDeltaRequest>,
    ) -> Rpc<Self::GetMetadataDeltaStream> {
        Ok(Response::new(tokio_stream::iter(Vec::new())))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Rpc<NodeStageVolumeResponse> {
        Ok(Response::new(NodeStageVolumeResponse {}))
    }
    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Rpc<NodeUnstageVolumeResponse> {
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }
    async fn node_publish_volume(
        &self,
        _: Request<NodePublishVolumeRequest>,
    ) -> Rpc<NodePublishVolumeResponse> {
        Ok(Response::new(NodePublishVolumeResponse {}))
    }
    async fn node_unpublish_volume(
        &self,
        _: Request<NodeUnpublishVolumeRequest>,
    ) -> Rpc<NodeUnpublishVolumeResponse> {
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }
    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Rpc<NodeGetVolumeStatsResponse> {
        Ok(Response::new(NodeGetVolumeStatsResponse::default()))
    }
    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Rpc<NodeExpandVolumeResponse> {
        Ok(Response::new(NodeExpandVolumeResponse::default()))
    }
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Rpc<NodeGetCapabilitiesResponse> {
        Ok(Response::new(NodeGetCapabilitiesResponse::default()))
    }
    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Rpc<NodeGetInfoResponse> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: "node-a".into(),
            max_volumes_per_node: 8,
            accessible_topology: None,
        }))
    }
}

async fn unix_channel(path: &Path) -> Channel {
    enbd_test_harness::unix_channel(path)
        .await
        .expect("connect to the unix socket")
}

#[tokio::test]
async fn every_csi_service_serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("csi.sock");
    // Bound before the server task starts, so the client never races the bind.
    let listener = UnixListener::bind(&sock).expect("bind unix socket");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(IdentityServer::new(Plugin))
            .add_service(ControllerServer::new(Plugin))
            .add_service(GroupControllerServer::new(Plugin))
            .add_service(SnapshotMetadataServer::new(Plugin))
            .add_service(NodeServer::new(Plugin))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );

    let channel = unix_channel(&sock).await;

    let info = IdentityClient::new(channel.clone())
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, "csi.example.test");
    assert_eq!(info.vendor_version, "0.0.1");

    let created = ControllerClient::new(channel.clone())
        .create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            parameters: [("fsType".to_string(), "xfs".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume in response");
    assert_eq!(created.volume_id, "srv/pvc-1");
    assert_eq!(created.capacity_bytes, 1 << 30);
    assert_eq!(
        created.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );

    let caps = GroupControllerClient::new(channel.clone())
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .expect("GroupControllerGetCapabilities")
        .into_inner();
    assert_eq!(caps.capabilities.len(), 1);

    let mut stream = SnapshotMetadataClient::new(channel.clone())
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: "srv/snap".into(),
            ..Default::default()
        })
        .await
        .expect("GetMetadataAllocated")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("stream item")
        .expect("one item");
    assert_eq!(first.volume_capacity_bytes, 1 << 20);
    assert_eq!(first.block_metadata.len(), 1);
    assert!(stream.message().await.expect("stream end").is_none());

    let node = NodeClient::new(channel)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(node.node_id, "node-a");
    assert_eq!(node.max_volumes_per_node, 8);

    stop_tx.send(()).expect("server still running");
    server
        .await
        .expect("server task")
        .expect("server exits cleanly");
}

/// Field numbers are the spec's: a message encoded here decodes the same way in
/// any other CSI implementation. Spot-check a few tags byte for byte.
#[test]
fn wire_tags_match_the_spec() {
    use prost::Message;
    // CreateVolumeRequest.name = 1 (string, wire type 2).
    let bytes = CreateVolumeRequest {
        name: "a".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(bytes, [0x0a, 0x01, b'a']);
    // NodeStageVolumeRequest.staging_target_path = 3.
    let bytes = NodeStageVolumeRequest {
        staging_target_path: "/s".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(bytes, [0x1a, 0x02, b'/', b's']);
    // ProbeResponse.ready is google.protobuf.BoolValue at field 1: an embedded
    // message whose own field 1 is the bool.
    let bytes = ProbeResponse { ready: Some(true) }.encode_to_vec();
    assert_eq!(bytes, [0x0a, 0x02, 0x08, 0x01]);
    // ControllerExpandVolumeResponse.node_expansion_required = 2 (varint).
    let bytes = ControllerExpandVolumeResponse {
        capacity_bytes: 0,
        node_expansion_required: true,
    }
    .encode_to_vec();
    assert_eq!(bytes, [0x10, 0x01]);
    // Snapshot.creation_time = 4 is a google.protobuf.Timestamp.
    let bytes = Snapshot {
        creation_time: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(bytes, [0x22, 0x02, 0x08, 0x01]);
}
