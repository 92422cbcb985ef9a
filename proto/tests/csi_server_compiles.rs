//! Proves the generated CSI code is complete and speaks the spec on the wire: every CSI
//! service of the spec is implemented as a tonic server (trivial bodies; a missing message,
//! field or RPC in `csi.proto` fails to compile here), served on a real unix socket, and
//! called the way a client built from the spec calls it: by the spec's gRPC paths, with
//! messages declared below by hand from the spec's field numbers (module `spec`), not from
//! `csi.proto`. A path or field number that drifted from the spec fails here at run time.
//! (`csi_spec.rs` checks every field; this checks that the generated services agree.)
#![allow(clippy::expect_used)]

use std::path::Path;

use enbd_proto::csi::controller_server::{Controller, ControllerServer};
use enbd_proto::csi::group_controller_server::{GroupController, GroupControllerServer};
use enbd_proto::csi::identity_server::{Identity, IdentityServer};
use enbd_proto::csi::node_server::{Node, NodeServer};
use enbd_proto::csi::snapshot_metadata_server::{SnapshotMetadata, SnapshotMetadataServer};
use enbd_proto::csi::*;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::http::uri::PathAndQuery;
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
    /// Accepts exactly the request `spec_client_reaches_every_service` sends, so a field that
    /// decodes into the wrong place is an error the client sees.
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Rpc<NodeStageVolumeResponse> {
        let req = req.into_inner();
        let cap = req.volume_capability.clone().unwrap_or_default();
        let mount = match cap.access_type {
            Some(volume_capability::AccessType::Mount(m)) => Some(m),
            _ => None,
        };
        let ok = req.volume_id == "vol-1"
            && req.staging_target_path == "/stage/vol-1"
            && req.publish_context.is_empty()
            && mount.is_some_and(|m| m.fs_type == "xfs" && m.mount_flags == ["noatime"])
            && cap.access_mode.map(|a| a.mode)
                == Some(volume_capability::access_mode::Mode::SingleNodeWriter as i32);
        if ok {
            Ok(Response::new(NodeStageVolumeResponse {}))
        } else {
            Err(Status::invalid_argument(format!("decoded as {req:?}")))
        }
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

/// Messages as a client written from the CSI spec encodes them: field numbers copied from the
/// spec's message definitions, independent of `csi.proto`. A oneof member is an ordinary
/// optional field on the wire.
mod spec {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetPluginInfoResponse {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub vendor_version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CapacityRange {
        #[prost(int64, tag = "1")]
        pub required_bytes: i64,
        #[prost(int64, tag = "2")]
        pub limit_bytes: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateVolumeRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub capacity_range: Option<CapacityRange>,
        #[prost(map = "string, string", tag = "4")]
        pub parameters: HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Volume {
        #[prost(int64, tag = "1")]
        pub capacity_bytes: i64,
        #[prost(string, tag = "2")]
        pub volume_id: String,
        #[prost(map = "string, string", tag = "3")]
        pub volume_context: HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateVolumeResponse {
        #[prost(message, optional, tag = "1")]
        pub volume: Option<Volume>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MountVolume {
        #[prost(string, tag = "1")]
        pub fs_type: String,
        #[prost(string, repeated, tag = "2")]
        pub mount_flags: Vec<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AccessMode {
        /// SINGLE_NODE_WRITER = 1.
        #[prost(int32, tag = "1")]
        pub mode: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VolumeCapability {
        #[prost(message, optional, tag = "2")]
        pub mount: Option<MountVolume>,
        #[prost(message, optional, tag = "3")]
        pub access_mode: Option<AccessMode>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeStageVolumeRequest {
        #[prost(string, tag = "1")]
        pub volume_id: String,
        #[prost(string, tag = "3")]
        pub staging_target_path: String,
        #[prost(message, optional, tag = "4")]
        pub volume_capability: Option<VolumeCapability>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeGetInfoResponse {
        #[prost(string, tag = "1")]
        pub node_id: String,
        #[prost(int64, tag = "2")]
        pub max_volumes_per_node: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetadataAllocatedRequest {
        #[prost(string, tag = "1")]
        pub snapshot_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BlockMetadata {
        #[prost(int64, tag = "1")]
        pub byte_offset: i64,
        #[prost(int64, tag = "2")]
        pub size_bytes: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetadataAllocatedResponse {
        /// FIXED_LENGTH = 1.
        #[prost(int32, tag = "1")]
        pub block_metadata_type: i32,
        #[prost(int64, tag = "2")]
        pub volume_capacity_bytes: i64,
        #[prost(message, repeated, tag = "3")]
        pub block_metadata: Vec<BlockMetadata>,
    }
}

/// One unary call by gRPC path, as any client built from the spec makes it.
async fn call<Req, Resp>(channel: &Channel, path: &'static str, req: Req) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(Request::new(req), PathAndQuery::from_static(path), codec)
        .await
        .map(Response::into_inner)
}

#[tokio::test]
async fn spec_client_reaches_every_service() {
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

    // Identity: the response's fields land where the spec puts them.
    let info: spec::GetPluginInfoResponse =
        call(&channel, "/csi.v1.Identity/GetPluginInfo", spec::Empty {})
            .await
            .expect("GetPluginInfo by the spec's path");
    assert_eq!(
        (info.name.as_str(), info.vendor_version.as_str()),
        ("csi.example.test", "0.0.1")
    );

    // Controller: the request's fields reach the service (it echoes them), the response's
    // nested fields come back by the spec's numbers.
    let created: spec::CreateVolumeResponse = call(
        &channel,
        "/csi.v1.Controller/CreateVolume",
        spec::CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(spec::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            parameters: [("fsType".to_string(), "xfs".to_string())].into(),
        },
    )
    .await
    .expect("CreateVolume by the spec's path");
    let volume = created.volume.expect("volume in response");
    assert_eq!(volume.volume_id, "srv/pvc-1");
    assert_eq!(volume.capacity_bytes, 1 << 30);
    assert_eq!(
        volume.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );

    // Node: the service accepts only a request it decoded field for field.
    call::<_, spec::Empty>(
        &channel,
        "/csi.v1.Node/NodeStageVolume",
        spec::NodeStageVolumeRequest {
            volume_id: "vol-1".into(),
            staging_target_path: "/stage/vol-1".into(),
            volume_capability: Some(spec::VolumeCapability {
                mount: Some(spec::MountVolume {
                    fs_type: "xfs".into(),
                    mount_flags: vec!["noatime".into()],
                }),
                access_mode: Some(spec::AccessMode { mode: 1 }),
            }),
        },
    )
    .await
    .expect("NodeStageVolume decoded as the spec encodes it");
    let node: spec::NodeGetInfoResponse =
        call(&channel, "/csi.v1.Node/NodeGetInfo", spec::Empty {})
            .await
            .expect("NodeGetInfo by the spec's path");
    assert_eq!(
        (node.node_id.as_str(), node.max_volumes_per_node),
        ("node-a", 8)
    );

    // GroupController: reachable at the spec's path.
    call::<_, spec::Empty>(
        &channel,
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
        spec::Empty {},
    )
    .await
    .expect("GroupControllerGetCapabilities by the spec's path");

    // SnapshotMetadata: a server stream, decoded by the spec's numbers.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut stream = grpc
        .server_streaming(
            Request::new(spec::GetMetadataAllocatedRequest {
                snapshot_id: "srv/snap".into(),
            }),
            PathAndQuery::from_static("/csi.v1.SnapshotMetadata/GetMetadataAllocated"),
            tonic_prost::ProstCodec::<
                spec::GetMetadataAllocatedRequest,
                spec::GetMetadataAllocatedResponse,
            >::default(),
        )
        .await
        .expect("GetMetadataAllocated by the spec's path")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("stream item")
        .expect("one item");
    assert_eq!(first.block_metadata_type, 1, "FIXED_LENGTH");
    assert_eq!(first.volume_capacity_bytes, 1 << 20);
    assert_eq!(
        first.block_metadata,
        [spec::BlockMetadata {
            byte_offset: 0,
            size_bytes: 4096
        }]
    );
    assert!(stream.message().await.expect("stream end").is_none());

    // And a path the spec does not define is refused, so the calls above proved something.
    let err = call::<_, spec::Empty>(&channel, "/csi.v1.Node/NodeStageVolumes", spec::Empty {})
        .await
        .expect_err("no such RPC");
    assert_eq!(err.code(), tonic::Code::Unimplemented);

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
