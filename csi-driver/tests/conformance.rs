//! Controller conformance suite: the real `csi-driver` binary over its unix
//! socket, against real `enbd-server` binaries on 127.0.0.1 (ports 0, temp data
//! directories). Every Identity and Controller RPC is covered with positive and
//! negative cases, checking exact gRPC codes.
//!
//! The enbd-server binary is looked up in the target directory of this test (a
//! workspace test build produces it) or at `$ENBD_SERVER_BIN`; if it is
//! missing the suite fails and says how to build it (enbd-test-harness).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use enbd_proto::csi::controller_client::ControllerClient;
use enbd_proto::csi::controller_service_capability::rpc::Type as RpcType;
use enbd_proto::csi::identity_client::IdentityClient;
use enbd_proto::csi::volume_capability::access_mode::Mode;
use enbd_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use enbd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use enbd_proto::csi::*;
use enbd_test_harness::lines::{field, wait_for_line};
use enbd_test_harness::{EnbdServer, unix_channel};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: i64 = 1 << 20;

// ---------------------------------------------------------------- harness

/// An enbd-server with id `id` on a fresh data directory (see [`enbd_test_harness::server`]).
fn start_server(id: &str) -> EnbdServer {
    EnbdServer::builder().id(id).start()
}

/// The server's entry in the driver's static `--servers` list.
fn entry(server: &EnbdServer) -> String {
    format!("{}={}", server.id(), server.mgmt_url())
}

struct Driver {
    child: Child,
    socket: PathBuf,
    metrics: SocketAddr,
    channel: Channel,
    _dir: tempfile::TempDir,
}

impl Driver {
    /// Starts the driver with a static server list; waits for its socket.
    async fn start_with(servers: &[String]) -> Self {
        // The nodes the publish tests use; any other node id is NOT_FOUND.
        let args = [
            "--discovery",
            "static",
            "--servers",
            &servers.join(","),
            "--nodes",
            "node-1,node-2,node-3",
        ];
        Self::spawn(&args, &[]).await
    }

    /// Starts the driver with extra arguments and environment; waits for its socket.
    async fn spawn(args: &[&str], envs: &[(&str, &Path)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("csi.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_csi-driver"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn csi-driver");
        let line = wait_for_line(&mut child, "csi-driver ready", READY_TIMEOUT).await;
        let metrics = field(&line, "metrics").parse().expect("metrics address");
        let channel = unix_channel(&socket)
            .await
            .expect("connect to the CSI socket");
        Self {
            child,
            socket,
            metrics,
            channel,
            _dir: dir,
        }
    }

    /// Starts the driver and waits until Probe reports ready.
    async fn start(servers: &[&EnbdServer]) -> Self {
        let entries: Vec<String> = servers.iter().map(|s| entry(s)).collect();
        let d = Self::start_with(&entries).await;
        d.wait_until(|| async { d.probe().await }, "Probe ready")
            .await;
        d
    }

    async fn probe(&self) -> bool {
        let resp = self
            .identity()
            .probe(ProbeRequest {})
            .await
            .expect("Probe")
            .into_inner();
        resp.ready == Some(true)
    }

    /// Polls a readiness condition (never a fixed sleep) with a deadline.
    async fn wait_until<F, Fut>(&self, mut cond: F, what: &str)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    async fn create(&self, name: &str, bytes: i64) -> Volume {
        self.ctl()
            .create_volume(create_req(name, bytes))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
            .into_inner()
            .volume
            .expect("volume")
    }

    async fn snapshot(&self, name: &str, source: &str) -> Snapshot {
        self.ctl()
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("CreateSnapshot {name}: {s}"))
            .into_inner()
            .snapshot
            .expect("snapshot")
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn range(required: i64, limit: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn create_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(bytes, 0),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

fn params(entries: &[(&str, &str)]) -> HashMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
) -> String {
    match result {
        Ok(r) => panic!("expected {code:?}, got OK: {:?}", r.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "message: {}", s.message());
            s.message().to_owned()
        }
    }
}

// ---------------------------------------------------------------- identity

#[tokio::test]
async fn identity_reports_name_capabilities_and_readiness() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let info = d
        .identity()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.enbd.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = d
        .identity()
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use plugin_capability::{Type, service, volume_expansion};
    let has_controller = caps.iter().any(|c| {
        matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == service::Type::ControllerService as i32)
    });
    let has_online = caps.iter().any(|c| {
        matches!(&c.r#type, Some(Type::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)
    });
    assert!(has_controller && has_online, "{caps:?}");
    let has_topology = caps.iter().any(|c| {
        matches!(&c.r#type, Some(Type::Service(s))
            if s.r#type == service::Type::VolumeAccessibilityConstraints as i32)
    });
    assert!(!has_topology, "volumes are reachable from every node");
    assert!(d.probe().await);
}

#[tokio::test]
async fn probe_is_not_ready_without_a_live_server() {
    // Port 1 on loopback refuses connections: the only server is down.
    let d = Driver::start_with(&["dead=http://127.0.0.1:1".to_owned()]).await;
    assert!(!d.probe().await);
    // And nothing can be placed.
    assert_code(
        d.ctl().create_volume(create_req("v", MIB)).await,
        Code::Unavailable,
    );
}

// ---------------------------------------------------------------- capabilities

#[tokio::test]
async fn controller_capabilities_are_exact() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let caps = d
        .ctl()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut got: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    got.sort_unstable();
    let mut want: Vec<i32> = [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::ListVolumes,
        RpcType::GetCapacity,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::CloneVolume,
        RpcType::PublishReadonly,
        RpcType::ExpandVolume,
        RpcType::ListVolumesPublishedNodes,
        RpcType::VolumeCondition,
        RpcType::GetVolume,
        RpcType::SingleNodeMultiWriter,
        RpcType::GetSnapshot,
    ]
    .into_iter()
    .map(|t| t as i32)
    .collect();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_code(
        d.ctl()
            .controller_modify_volume(ControllerModifyVolumeRequest::default())
            .await,
        Code::Unimplemented,
    );
}

// ---------------------------------------------------------------- create / delete

#[tokio::test]
async fn create_volume_positive_and_idempotent() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;

    let mut req = create_req("pvc-a", 4097);
    req.parameters = params(&[
        ("fsType", "xfs"),
        ("channels", "2"),
        ("brownout", "fail-after=30s"),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ]);
    let v = d
        .ctl()
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "s0/pvc-a");
    assert_eq!(
        v.capacity_bytes, 300_003_328,
        "an xfs class: raised to mkfs.xfs's 300 MB floor, in whole 4 KiB blocks"
    );
    assert!(v.accessible_topology.is_empty());
    let ctx =
        enbd_proto::params::VolumeContext::from_context(&v.volume_context).expect("context parses");
    assert_eq!(ctx.export, "pvc-a");
    assert!(ctx.server.starts_with("127.0.0.1:"), "{}", ctx.server);
    assert_eq!(ctx.params.channels, 2);
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    assert_eq!(
        v.volume_context.get("brownout").map(String::as_str),
        Some("fail-after=30s")
    );

    // The same request again returns the same volume.
    let again = d
        .ctl()
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);

    // The provisioner's --extra-create-metadata is stored with the volume on its server,
    // and not compared: the same request without it is still the same volume.
    let labels = server
        .mgmt_client()
        .await
        .get_volume(enbd_proto::enbd::GetVolumeRequest {
            name: "pvc-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .labels;
    assert_eq!(
        labels
            .get("csi.storage.k8s.io/pvc/name")
            .map(String::as_str),
        Some("data"),
        "{labels:?}"
    );
    let mut bare = req.clone();
    bare.parameters
        .retain(|k, _| !k.starts_with("csi.storage.k8s.io/"));
    let same = d
        .ctl()
        .create_volume(bare)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(same.volume_id, v.volume_id);

    // Same name, incompatible capacity.
    let mut bigger = req.clone();
    bigger.capacity_range = range(1 << 30, 0);
    assert_code(d.ctl().create_volume(bigger).await, Code::AlreadyExists);

    // Same name and capacity, other parameters: AlreadyExists, naming what differs.
    let mut other_params = req.clone();
    other_params.parameters = params(&[
        ("fsType", "xfs"),
        ("channels", "4"),
        ("brownout", "fail-after=30s"),
    ]);
    let msg = assert_code(
        d.ctl().create_volume(other_params).await,
        Code::AlreadyExists,
    );
    assert!(msg.contains("channels") && !msg.contains("fsType"), "{msg}");
    // Parameters that are not ours (the provisioner's pvc/name) do not count.
    let mut same_params = req.clone();
    same_params.parameters.remove("csi.storage.k8s.io/pvc/name");
    assert_eq!(
        d.ctl()
            .create_volume(same_params)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        v
    );

    // No capacity range: the default size.
    let dflt = d
        .ctl()
        .create_volume(CreateVolumeRequest {
            capacity_range: None,
            ..create_req("pvc-default", 0)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(dflt.capacity_bytes, 1 << 30);

    // Only a limit: the largest whole-block size within it.
    let lim = d
        .ctl()
        .create_volume(CreateVolumeRequest {
            capacity_range: range(0, 10_000),
            ..create_req("pvc-lim", 0)
        })
        .await;
    assert_eq!(
        lim.unwrap().into_inner().volume.unwrap().capacity_bytes,
        8192
    );

    // Block volumes may be multi-node writers.
    let mut block = create_req("pvc-rwx-block", MIB);
    block.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    d.ctl().create_volume(block).await.expect("RWX block");
}

/// The spec allows names of 128 characters; `<server-id>/<name>` must still fit in 128 bytes,
/// and idempotency by name must hold across a controller restart.
#[tokio::test]
async fn longest_names_yield_valid_ids_and_stay_idempotent() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let long = format!("pvc-{}", "a".repeat(124));
    assert_eq!(long.len(), 128);
    let v = d.create(&long, MIB).await;
    assert!(v.volume_id.len() <= 128, "{}", v.volume_id);
    let again = d.create(&long, MIB).await;
    assert_eq!(again.volume_id, v.volume_id, "same name, same volume");
    let other = d.create(&format!("pvc-{}b", "a".repeat(123)), MIB).await;
    assert_ne!(other.volume_id, v.volume_id, "names differing at the end");
    // Another size under the same name is still recognised as that volume.
    assert_code(
        d.ctl().create_volume(create_req(&long, 2 * MIB)).await,
        Code::AlreadyExists,
    );

    let snap_name = format!("snapshot-{}", "b".repeat(119));
    assert_eq!(snap_name.len(), 128);
    let snap = d.snapshot(&snap_name, &v.volume_id).await;
    assert!(snap.snapshot_id.len() <= 128, "{}", snap.snapshot_id);
    let snap_again = d.snapshot(&snap_name, &v.volume_id).await;
    assert_eq!(snap_again.snapshot_id, snap.snapshot_id);

    // Any string is a CSI name; one a store name cannot hold maps to a derived, stable name.
    let odd = d.create("bad/name", MIB).await;
    let (server_id, name) = odd.volume_id.split_once('/').expect("id");
    assert_eq!(server_id, "s0");
    assert!(name.starts_with("bad-name-"), "{name}");
    assert_eq!(d.create("bad/name", MIB).await.volume_id, odd.volume_id);

    // A restarted controller derives the same names.
    drop(d);
    let d = Driver::start(&[&server]).await;
    assert_eq!(d.create(&long, MIB).await.volume_id, v.volume_id);
    assert_eq!(
        d.snapshot(&snap_name, &v.volume_id).await.snapshot_id,
        snap.snapshot_id
    );
}

#[tokio::test]
async fn create_volume_negative() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let ctl = || d.ctl();

    assert!(
        assert_code(
            ctl().create_volume(create_req("", MIB)).await,
            Code::InvalidArgument
        )
        .contains("name")
    );
    let mut no_caps = create_req("v", MIB);
    no_caps.volume_capabilities.clear();
    assert_code(ctl().create_volume(no_caps).await, Code::InvalidArgument);
    let mut no_access_type = create_req("v", MIB);
    no_access_type.volume_capabilities[0].access_type = None;
    assert_code(
        ctl().create_volume(no_access_type).await,
        Code::InvalidArgument,
    );
    let mut rwx_fs = create_req("v", MIB);
    rwx_fs.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    assert_code(ctl().create_volume(rwx_fs).await, Code::InvalidArgument);
    let mut btrfs = create_req("v", MIB);
    btrfs.volume_capabilities[0].access_type = Some(AccessType::Mount(MountVolume {
        fs_type: "btrfs".into(),
        ..Default::default()
    }));
    assert!(assert_code(ctl().create_volume(btrfs).await, Code::InvalidArgument).contains("btrfs"));

    for (key, value) in [
        ("channels", "0"),
        ("queueDepth", "5000"),
        ("brownout", "sometimes"),
        ("fsType", "ntfs"),
        ("replicas", "4"),
        ("replicaTimeout", "forever"),
    ] {
        let mut req = create_req("v", MIB);
        req.parameters = params(&[(key, value)]);
        let msg = assert_code(ctl().create_volume(req).await, Code::InvalidArgument);
        assert!(msg.contains(key), "{key}: {msg}");
    }
    // Two replicas need two servers; this suite runs one.
    let mut mirrored = create_req("v", MIB);
    mirrored.parameters = params(&[("replicas", "2")]);
    let msg = assert_code(ctl().create_volume(mirrored).await, Code::ResourceExhausted);
    assert!(msg.contains("2 distinct"), "{msg}");
    let mut mutable = create_req("v", MIB);
    mutable.mutable_parameters = params(&[("iops", "100")]);
    assert_code(ctl().create_volume(mutable).await, Code::InvalidArgument);
    let mut unknown = create_req("v", MIB);
    unknown.parameters = params(&[("colour", "blue"), ("channels", "2")]);
    let msg = assert_code(ctl().create_volume(unknown).await, Code::InvalidArgument);
    assert!(msg.contains("colour"), "{msg}");

    let mut neg = create_req("v", MIB);
    neg.capacity_range = range(-1, 0);
    assert_code(ctl().create_volume(neg).await, Code::InvalidArgument);
    let mut inverted = create_req("v", MIB);
    inverted.capacity_range = range(2 * MIB, MIB);
    assert_code(ctl().create_volume(inverted).await, Code::OutOfRange);
    let mut rounding = create_req("v", MIB);
    rounding.capacity_range = range(4097, 5000);
    assert_code(ctl().create_volume(rounding).await, Code::OutOfRange);
    // A petabyte fits on no test machine.
    let msg = assert_code(
        ctl().create_volume(create_req("huge", 1 << 50)).await,
        Code::ResourceExhausted,
    );
    assert!(msg.contains("s0"), "{msg}");

    // Nothing above was created.
    let listed = ctl()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{:?}", listed.entries);

    // Unknown content sources.
    let mut from_snap = create_req("v", MIB);
    from_snap.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "s0/no-such-snap".into(),
        })),
    });
    assert_code(ctl().create_volume(from_snap).await, Code::NotFound);
    let mut from_vol = create_req("v", MIB);
    from_vol.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: "other-server/vol".into(),
        })),
    });
    assert_code(ctl().create_volume(from_vol).await, Code::NotFound);
    let mut empty_src = create_req("v", MIB);
    empty_src.volume_content_source = Some(VolumeContentSource { r#type: None });
    assert_code(ctl().create_volume(empty_src).await, Code::InvalidArgument);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_agree() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let calls = (0..8).map(|_| {
        let mut ctl = d.ctl();
        async move { ctl.create_volume(create_req("pvc-race", 64 * MIB)).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut volumes = Vec::new();
    for r in results {
        match r {
            Ok(v) => volumes.push(v.into_inner().volume.unwrap()),
            // The operation guard: a concurrent call on the same volume.
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{}", s.message()),
        }
    }
    assert!(!volumes.is_empty());
    assert!(volumes.iter().all(|v| *v == volumes[0]));
    let listed = d
        .ctl()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
}

#[tokio::test]
async fn delete_volume() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-del", MIB).await;
    let del = |id: &str| {
        let mut ctl = d.ctl();
        let req = DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        };
        async move { ctl.delete_volume(req).await }
    };
    del(&v.volume_id).await.expect("delete");
    del(&v.volume_id).await.expect("deleting again succeeds");
    del("s0/never-existed").await.expect("unknown volume");
    del("not-an-id").await.expect("malformed id cannot exist");
    del("other-server/x").await.expect("unknown server");
    assert_code(del("").await, Code::InvalidArgument);
    let listed = d
        .ctl()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

// ---------------------------------------------------------------- publish

#[tokio::test]
async fn publish_enforces_single_node_access() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-pub", MIB).await;
    let publish = |node: &str, mode: Mode, readonly: bool| {
        let mut ctl = d.ctl();
        let req = ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(mount_cap(mode)),
            readonly,
            ..Default::default()
        };
        async move { ctl.controller_publish_volume(req).await }
    };
    let unpublish = |node: &str| {
        let mut ctl = d.ctl();
        let req = ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.into(),
            ..Default::default()
        };
        async move { ctl.controller_unpublish_volume(req).await }
    };

    // A node the controller cannot know about is NOT_FOUND, and nothing is recorded.
    let msg = assert_code(
        publish("some-fake-node-id", Mode::SingleNodeWriter, false).await,
        Code::NotFound,
    );
    assert!(msg.contains("some-fake-node-id"), "{msg}");
    publish("node-1", Mode::SingleNodeWriter, false)
        .await
        .expect("publish");
    publish("node-1", Mode::SingleNodeWriter, false)
        .await
        .expect("repeat publish");
    assert_code(
        publish("node-1", Mode::SingleNodeWriter, true).await,
        Code::AlreadyExists,
    );
    let msg = assert_code(
        publish("node-2", Mode::SingleNodeWriter, false).await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("node-1"), "{msg}");
    assert_code(
        publish("node-2", Mode::SingleNodeSingleWriter, false).await,
        Code::FailedPrecondition,
    );

    // The record shows in ListVolumes and ControllerGetVolume.
    let listed = d
        .ctl()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0]
            .status
            .as_ref()
            .unwrap()
            .published_node_ids,
        ["node-1"]
    );
    let got = d
        .ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, ["node-1"]);

    // A published volume cannot be deleted.
    let del = d
        .ctl()
        .delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_code(del, Code::FailedPrecondition);

    unpublish("node-1").await.expect("unpublish");
    unpublish("node-1").await.expect("repeat unpublish");
    publish("node-2", Mode::SingleNodeWriter, false)
        .await
        .expect("now node-2 may attach");
    unpublish("").await.expect("unpublish from all nodes");

    // Read-only many: several nodes at once.
    publish("node-1", Mode::MultiNodeReaderOnly, true)
        .await
        .expect("ROX node-1");
    publish("node-2", Mode::MultiNodeReaderOnly, true)
        .await
        .expect("ROX node-2");
    unpublish("").await.unwrap();

    // Raw block read-write-many: several writers on several nodes.
    let mut rwx = create_req("pvc-rwx", MIB);
    rwx.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    let rwx = d
        .ctl()
        .create_volume(rwx)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    for node in ["node-1", "node-2", "node-3"] {
        d.ctl()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: rwx.volume_id.clone(),
                node_id: node.into(),
                volume_capability: Some(block_cap(Mode::MultiNodeMultiWriter)),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("RWX block on {node}: {s}"));
    }
    let got = d
        .ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: rwx.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids.len(), 3);

    // Negative cases.
    let mut ctl = d.ctl();
    let base = ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-1".into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: String::new(),
            ..base.clone()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            node_id: String::new(),
            ..base.clone()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_capability: None,
            ..base.clone()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "s0/no-such-volume".into(),
            ..base.clone()
        })
        .await,
        Code::NotFound,
    );
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: "garbage".into(),
            ..base.clone()
        })
        .await,
        Code::NotFound,
    );
    assert_code(
        ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
    );
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "s0/no-such-volume".into(),
        node_id: "node-1".into(),
        ..Default::default()
    })
    .await
    .expect("unpublishing what is not there succeeds");
}

// ---------------------------------------------------------------- validate

#[tokio::test]
async fn validate_volume_capabilities() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-val", MIB).await;
    let validate = |caps: Vec<VolumeCapability>, id: &str, p: HashMap<String, String>| {
        let mut ctl = d.ctl();
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            parameters: p,
            ..Default::default()
        };
        async move { ctl.validate_volume_capabilities(req).await }
    };
    let ok = validate(
        vec![
            mount_cap(Mode::SingleNodeWriter),
            block_cap(Mode::MultiNodeMultiWriter),
        ],
        &v.volume_id,
        HashMap::new(),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);

    let unsupported = validate(
        vec![mount_cap(Mode::MultiNodeSingleWriter)],
        &v.volume_id,
        HashMap::new(),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(unsupported.confirmed.is_none());
    assert!(
        unsupported.message.contains("MULTI_NODE_SINGLE_WRITER"),
        "{}",
        unsupported.message
    );

    let bad_params = validate(
        vec![mount_cap(Mode::SingleNodeWriter)],
        &v.volume_id,
        params(&[("queues", "99")]),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(bad_params.confirmed.is_none());
    assert!(bad_params.message.contains("queues"));

    assert_code(
        validate(vec![], &v.volume_id, HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert_code(
        validate(vec![mount_cap(Mode::SingleNodeWriter)], "", HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert_code(
        validate(
            vec![mount_cap(Mode::SingleNodeWriter)],
            "s0/missing",
            HashMap::new(),
        )
        .await,
        Code::NotFound,
    );
}

// ---------------------------------------------------------------- list / capacity / placement

#[tokio::test]
async fn list_volumes_pages_across_servers() {
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let d = Driver::start(&[&a, &b]).await;
    for name in ["v1", "v2", "v3"] {
        d.create(name, MIB).await;
    }
    // A volume made directly on the second server: ListVolumes spans servers.
    b.mgmt_client()
        .await
        .create_volume(enbd_proto::enbd::CreateVolumeRequest {
            name: "direct".into(),
            size_bytes: MIB as u64,
            source: None,
            labels: Default::default(),
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let resp = d
            .ctl()
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(resp.entries.len() <= 3);
        pages += 1;
        seen.extend(
            resp.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if resp.next_token.is_empty() {
            break;
        }
        token = resp.next_token;
    }
    assert_eq!(pages, 2);
    seen.sort();
    let servers: std::collections::BTreeSet<&str> = seen
        .iter()
        .map(|id| id.split('/').next().unwrap())
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.contains(&"srv-b/direct".to_owned()), "{seen:?}");
    assert_eq!(servers.len(), 2, "{seen:?}");

    assert_code(
        d.ctl()
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        d.ctl()
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "bogus".into(),
            })
            .await,
        Code::Aborted,
    );
}

#[tokio::test]
async fn placement_skips_servers_that_are_down() {
    let live = start_server("zz-live");
    // "aa-dead" sorts first and would win ties; it must never be chosen.
    let d = Driver::start_with(&["aa-dead=http://127.0.0.1:1".to_owned(), entry(&live)]).await;
    d.wait_until(|| async { d.probe().await }, "Probe ready")
        .await;
    for i in 0..3 {
        let v = d.create(&format!("p{i}"), MIB).await;
        assert!(v.volume_id.starts_with("zz-live/"), "{}", v.volume_id);
    }
    // Operations on a volume of the down server are Unavailable, not NotFound.
    let expand = d
        .ctl()
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "aa-dead/v".into(),
            capacity_range: range(2 * MIB, 0),
            ..Default::default()
        })
        .await;
    assert_code(expand, Code::Unavailable);
    let del = d
        .ctl()
        .delete_volume(DeleteVolumeRequest {
            volume_id: "aa-dead/v".into(),
            ..Default::default()
        })
        .await;
    assert_code(del, Code::Unavailable);
}

#[tokio::test]
async fn get_capacity() {
    let a = start_server("s0");
    let d = Driver::start(&[&a]).await;
    let cap = d
        .ctl()
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
    assert!(cap.maximum_volume_size.unwrap() > 0);
    assert_eq!(cap.minimum_volume_size, Some(4096));

    let with_caps = d
        .ctl()
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
            parameters: params(&[("channels", "8")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(with_caps.available_capacity > 0);

    let unsupported = d
        .ctl()
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsupported.available_capacity, 0);

    let bad = d
        .ctl()
        .get_capacity(GetCapacityRequest {
            parameters: params(&[("nope", "1")]),
            ..Default::default()
        })
        .await;
    assert!(assert_code(bad, Code::InvalidArgument).contains("nope"));
}

// ---------------------------------------------------------------- expansion

#[tokio::test]
async fn expand_volume() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-grow", MIB).await;
    let expand = |id: &str, r: Option<CapacityRange>, cap: Option<VolumeCapability>| {
        let mut ctl = d.ctl();
        let req = ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: r,
            volume_capability: cap,
            ..Default::default()
        };
        async move { ctl.controller_expand_volume(req).await }
    };
    let fs = expand(
        &v.volume_id,
        range(2 * MIB + 1, 0),
        Some(mount_cap(Mode::SingleNodeWriter)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(fs.capacity_bytes, 2 * MIB + 4096);
    assert!(
        fs.node_expansion_required,
        "a filesystem is grown on the node"
    );

    let blk = expand(
        &v.volume_id,
        range(4 * MIB, 0),
        Some(block_cap(Mode::SingleNodeWriter)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(blk.capacity_bytes, 4 * MIB);
    assert!(
        !blk.node_expansion_required,
        "a raw block volume needs no node step"
    );

    // Already large enough: success, size unchanged (no shrinking).
    let same = expand(
        &v.volume_id,
        range(MIB, 0),
        Some(block_cap(Mode::SingleNodeWriter)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(same.capacity_bytes, 4 * MIB);

    assert_code(
        expand(&v.volume_id, None, None).await,
        Code::InvalidArgument,
    );
    assert_code(expand("", range(MIB, 0), None).await, Code::InvalidArgument);
    assert_code(
        expand(&v.volume_id, range(8 * MIB + 1, 8 * MIB + 2), None).await,
        Code::OutOfRange,
    );
    assert_code(
        expand("s0/missing", range(8 * MIB, 0), None).await,
        Code::NotFound,
    );
    assert_code(
        expand("garbage", range(8 * MIB, 0), None).await,
        Code::NotFound,
    );
    let msg = assert_code(
        expand(&v.volume_id, range(1 << 50, 0), None).await,
        Code::ResourceExhausted,
    );
    assert!(msg.contains("s0"), "{msg}");
}

// ---------------------------------------------------------------- snapshots and clones

#[tokio::test]
async fn snapshots_and_restores() {
    let server = start_server("s0");
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-src", 2 * MIB).await;
    let other = d.create("pvc-other", MIB).await;

    let s1 = d.snapshot("snap-1", &v.volume_id).await;
    assert_eq!(s1.snapshot_id, "s0/snap-1");
    assert_eq!(s1.source_volume_id, v.volume_id);
    assert_eq!(s1.size_bytes, 2 * MIB);
    assert!(s1.ready_to_use);
    assert!(s1.creation_time.is_some());
    assert_eq!(
        d.snapshot("snap-1", &v.volume_id).await,
        s1,
        "repeat returns the same snapshot"
    );
    d.snapshot("snap-2", &v.volume_id).await;
    d.snapshot("snap-3", &other.volume_id).await;

    let create_snap = |name: &str, source: &str, p: HashMap<String, String>| {
        let mut ctl = d.ctl();
        let req = CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            parameters: p,
            ..Default::default()
        };
        async move { ctl.create_snapshot(req).await }
    };
    assert_code(
        create_snap("snap-1", &other.volume_id, HashMap::new()).await,
        Code::AlreadyExists,
    );
    assert_code(
        create_snap("", &v.volume_id, HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert_code(
        create_snap("x", "", HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert_code(
        create_snap("x", "s0/missing", HashMap::new()).await,
        Code::NotFound,
    );
    assert_code(
        create_snap("x", "garbage", HashMap::new()).await,
        Code::NotFound,
    );
    let msg = assert_code(
        create_snap("x", &v.volume_id, params(&[("speed", "fast")])).await,
        Code::InvalidArgument,
    );
    assert!(msg.contains("speed"));

    // ListSnapshots: everything, paged.
    let list = |req: ListSnapshotsRequest| {
        let mut ctl = d.ctl();
        async move { ctl.list_snapshots(req).await }
    };
    let p1 = list(ListSnapshotsRequest {
        max_entries: 2,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    let p2 = list(ListSnapshotsRequest {
        max_entries: 2,
        starting_token: p1.next_token,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    // Filters.
    let by_id = list(ListSnapshotsRequest {
        snapshot_id: "s0/snap-2".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let by_src = list(ListSnapshotsRequest {
        source_volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_src.entries.len(), 2);
    let unknown = list(ListSnapshotsRequest {
        snapshot_id: "s0/none".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert!(unknown.entries.is_empty());
    let malformed = list(ListSnapshotsRequest {
        snapshot_id: "garbage".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert!(malformed.entries.is_empty());
    assert_code(
        list(ListSnapshotsRequest {
            starting_token: "bogus".into(),
            ..Default::default()
        })
        .await,
        Code::Aborted,
    );
    assert_code(
        list(ListSnapshotsRequest {
            max_entries: -5,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );

    // GetSnapshot.
    let got = d
        .ctl()
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(got.unwrap().into_inner().snapshot.unwrap(), s1);
    assert_code(
        d.ctl()
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: "s0/none".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        d.ctl().get_snapshot(GetSnapshotRequest::default()).await,
        Code::InvalidArgument,
    );

    // Restore from the snapshot: the source is echoed and the size is at least the snapshot's.
    let snap_source = VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: s1.snapshot_id.clone(),
        })),
    };
    let mut restore = create_req("pvc-restored", 0);
    restore.capacity_range = None;
    restore.volume_content_source = Some(snap_source.clone());
    let r = d
        .ctl()
        .create_volume(restore.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(r.capacity_bytes, 2 * MIB);
    assert_eq!(r.content_source, Some(snap_source.clone()));
    assert_eq!(
        d.ctl()
            .create_volume(restore.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        r
    );
    // Same name, different source: conflict.
    let mut conflicting = restore.clone();
    conflicting.volume_content_source = None;
    assert_code(
        d.ctl().create_volume(conflicting).await,
        Code::AlreadyExists,
    );
    // Smaller than the snapshot: out of range.
    let mut too_small = create_req("pvc-small", MIB);
    too_small.capacity_range = range(MIB, MIB);
    too_small.volume_content_source = Some(snap_source);
    assert_code(d.ctl().create_volume(too_small).await, Code::OutOfRange);

    // Clone a volume.
    let vol_source = VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: v.volume_id.clone(),
        })),
    };
    let mut clone = create_req("pvc-clone", 3 * MIB);
    clone.volume_content_source = Some(vol_source.clone());
    let c = d
        .ctl()
        .create_volume(clone)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(c.capacity_bytes, 3 * MIB);
    assert_eq!(c.content_source, Some(vol_source));
    assert!(
        c.volume_id.starts_with("s0/"),
        "clones live beside their source"
    );

    // Delete snapshots: idempotent, unknown and malformed IDs succeed.
    let del = |id: &str| {
        let mut ctl = d.ctl();
        let req = DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        };
        async move { ctl.delete_snapshot(req).await }
    };
    del(&s1.snapshot_id).await.expect("delete");
    del(&s1.snapshot_id).await.expect("delete again");
    del("s0/never").await.expect("unknown snapshot");
    del("garbage").await.expect("malformed snapshot id");
    assert_code(del("").await, Code::InvalidArgument);
    let left = list(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(left.entries.len(), 2);
    // The restored volume outlives its snapshot.
    d.ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: r.volume_id.clone(),
        })
        .await
        .expect("restored volume still there");
}

/// A server without reflink copies snapshots in the background (paced here to 4 MiB/s, so a
/// 16 MiB volume takes about four seconds): CreateSnapshot answers not ready, then ready as
/// the snapshotter polls; a restore from it is refused until then; a clone waits out its copy.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_not_ready_until_copied_refuses_restores() {
    let server = EnbdServer::builder()
        .id("s0")
        .args(["--copy-rate-bytes=4194304"])
        .start();
    let d = Driver::start(&[&server]).await;
    let v = d.create("pvc-src", 16 * MIB).await;
    let s1 = d.snapshot("snap-1", &v.volume_id).await;
    assert!(!s1.ready_to_use, "a 4 s copy is not ready at once");
    let listed = d
        .ctl()
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.entries[0].snapshot.as_ref().unwrap().ready_to_use);

    let snap_source = VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: s1.snapshot_id.clone(),
        })),
    };
    let mut restore = create_req("pvc-restore", 16 * MIB);
    restore.volume_content_source = Some(snap_source);
    let msg = assert_code(
        d.ctl().create_volume(restore.clone()).await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("not ready"), "{msg}");

    // A clone copies the same way; CreateVolume waits for it (it is well under 20 s).
    let mut clone = create_req("pvc-clone", 16 * MIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: v.volume_id.clone(),
        })),
    });
    let c = d.ctl().create_volume(clone).await.unwrap().into_inner();
    assert!(c.volume.unwrap().content_source.is_some());

    let mut polls = 0;
    loop {
        let s = d.snapshot("snap-1", &v.volume_id).await;
        assert_eq!(s.snapshot_id, s1.snapshot_id);
        assert_eq!(
            s.creation_time, s1.creation_time,
            "the instant does not move"
        );
        if s.ready_to_use {
            break;
        }
        polls += 1;
        assert!(polls < 600, "the snapshot never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.ctl().create_volume(restore).await.unwrap();
}

// ---------------------------------------------------------------- volume condition

#[tokio::test]
async fn controller_get_volume_reports_condition() {
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let d = Driver::start(&[&a, &b]).await;
    let v = d.create("pvc-cond", MIB).await;
    let get = |id: &str| {
        let mut ctl = d.ctl();
        let req = ControllerGetVolumeRequest {
            volume_id: id.into(),
        };
        async move { ctl.controller_get_volume(req).await }
    };
    let ok = get(&v.volume_id).await.unwrap().into_inner();
    assert_eq!(ok.volume.as_ref().unwrap().capacity_bytes, MIB);
    assert!(!ok.status.unwrap().volume_condition.unwrap().abnormal);
    assert_code(get("srv-a/none").await, Code::NotFound);
    assert_code(get("unknown-server/x").await, Code::NotFound);
    assert_code(get("garbage").await, Code::NotFound);
    assert_code(get("").await, Code::InvalidArgument);

    // Stop the server holding the volume: the condition turns abnormal.
    let holder = v.volume_id.split('/').next().unwrap().to_owned();
    let (down, up) = if holder == "srv-a" { (a, b) } else { (b, a) };
    drop(down);
    let abnormal = || async {
        match get(&v.volume_id).await {
            Ok(r) => {
                r.into_inner()
                    .status
                    .unwrap()
                    .volume_condition
                    .unwrap()
                    .abnormal
            }
            Err(_) => false,
        }
    };
    d.wait_until(abnormal, "abnormal volume condition").await;
    let r = get(&v.volume_id).await.unwrap().into_inner();
    let cond = r.status.unwrap().volume_condition.unwrap();
    assert!(cond.message.contains(&holder), "{}", cond.message);
    // The other server keeps serving: still ready, new volumes go there.
    assert!(d.probe().await);
    let w = d.create("pvc-after", MIB).await;
    assert!(
        w.volume_id.starts_with(&format!("{}/", up.id())),
        "{}",
        w.volume_id
    );
}

// ---------------------------------------------------------------- process behaviour

#[tokio::test]
async fn metrics_and_graceful_shutdown() {
    let server = start_server("s0");
    let mut d = Driver::start(&[&server]).await;
    d.create("pvc-m", MIB).await;

    let mut conn = tokio::net::TcpStream::connect(d.metrics).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("enbd_csi_controller_rpcs_total{method=\"CreateVolume\",code=\"OK\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("enbd_csi_controller_server_up{server=\"s0\"} 1"),
        "{body}"
    );

    let pid = d.child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(READY_TIMEOUT, d.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
}

// ---------------------------------------------------------------- Kubernetes discovery

/// A minimal Kubernetes API server on loopback: answers the pod list with the
/// given pods and streams watch events pushed by the test. Records request
/// paths so the test can check the label selector and namespace.
struct FakeApiServer {
    addr: SocketAddr,
    events: tokio::sync::broadcast::Sender<String>,
    paths: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn pod_json(name: &str, mgmt_port: u16) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "storage", "resourceVersion": "2",
                     "labels": {"app.kubernetes.io/component": "enbd-server"}},
        "spec": {"containers": [{"name": "enbd-server", "ports": [
            {"name": "nbd", "containerPort": 10809},
            {"name": "mgmt", "containerPort": mgmt_port}
        ]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"}
    })
}

impl FakeApiServer {
    async fn start(pods: Vec<serde_json::Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = tokio::sync::broadcast::channel::<String>(16);
        let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let list = serde_json::json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "2"}, "items": pods
        })
        .to_string();
        let (tx, seen) = (events.clone(), paths.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (list, tx, seen) = (list.clone(), tx.clone(), seen.clone());
                tokio::spawn(async move { Self::serve(conn, &list, tx, seen).await });
            }
        });
        Self {
            addr,
            events,
            paths,
        }
    }

    async fn serve(
        conn: tokio::net::TcpStream,
        list: &str,
        tx: tokio::sync::broadcast::Sender<String>,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let mut conn = BufReader::new(conn);
        loop {
            // Request line and headers; no request here has a body.
            let mut request_line = String::new();
            if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                return;
            }
            loop {
                let mut header = String::new();
                if conn.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            seen.lock().unwrap().push(path.clone());
            let stream = conn.get_mut();
            if path.contains("watch=true") {
                let mut rx = tx.subscribe();
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                while let Ok(line) = rx.recv().await {
                    let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
                list.len()
            );
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

#[tokio::test]
async fn kubernetes_discovery_follows_the_pod_watch() {
    let server = start_server("enbd-server-0");
    let api = FakeApiServer::start(vec![pod_json("enbd-server-0", server.mgmt().port())]).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let d = Driver::spawn(
        &["--discovery", "kubernetes", "--namespace", "storage"],
        &[("KUBECONFIG", kubeconfig.as_path())],
    )
    .await;
    d.wait_until(
        || async { d.probe().await },
        "Probe ready through pod discovery",
    )
    .await;

    // The pod name is the server id; the volume context names the server's data address.
    let v = d.create("pvc-k8s", MIB).await;
    assert_eq!(v.volume_id, "enbd-server-0/pvc-k8s");
    let paths = api.paths.lock().unwrap().clone();
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("/api/v1/namespaces/storage/pods?")
                && p.contains("labelSelector=app.kubernetes.io%2Fcomponent%3Denbd-server")),
        "{paths:?}"
    );

    // The pod goes away: the server is forgotten, nothing is live, Probe says so.
    let deleted = serde_json::json!({
        "type": "DELETED",
        "object": pod_json("enbd-server-0", server.mgmt().port())
    });
    // A watch connection may not be open yet when we send; resend until seen.
    d.wait_until(
        || async {
            let _ = api.events.send(deleted.to_string());
            !d.probe().await
        },
        "Probe not ready after the pod was deleted",
    )
    .await;
    // Its volumes are now on an unknown server: treated as gone.
    assert_code(
        d.ctl()
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await,
        Code::NotFound,
    );
}

/// Membership record a server keeps for `name`.
async fn membership_on(server: &EnbdServer, name: &str) -> enbd_proto::enbd::Membership {
    server
        .replica_client()
        .await
        .get_membership(enbd_proto::enbd::GetMembershipRequest {
            volume: name.into(),
        })
        .await
        .expect("GetMembership")
        .into_inner()
        .membership
        .unwrap_or_default()
}

async fn exists_on(server: &EnbdServer, name: &str) -> Option<u64> {
    server
        .mgmt_client()
        .await
        .get_volume(enbd_proto::enbd::GetVolumeRequest { name: name.into() })
        .await
        .ok()
        .and_then(|r| r.into_inner().volume)
        .map(|v| v.size_bytes)
}

#[tokio::test]
async fn mirrored_volume_lifecycle_on_distinct_servers() {
    use enbd_proto::enbd::ReplicaState;
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let c = start_server("srv-c");
    let d = Driver::start(&[&a, &b, &c]).await;

    let mut req = create_req("mirror", 4 * MIB);
    req.parameters = params(&[("replicas", "2"), ("replicaTimeout", "2s")]);
    let vol = d
        .ctl()
        .create_volume(req.clone())
        .await
        .expect("create mirrored")
        .into_inner()
        .volume
        .expect("volume");
    let ctx = enbd_proto::params::VolumeContext::from_context(&vol.volume_context)
        .expect("the node accepts the context");
    assert_eq!(ctx.replicas.len(), 2);
    assert_eq!(ctx.params.replica_timeout, Duration::from_secs(2));
    let holders: Vec<&EnbdServer> = {
        let mut h = Vec::new();
        for s in [&a, &b, &c] {
            if exists_on(s, "mirror").await.is_some() {
                h.push(s);
            }
        }
        h
    };
    assert_eq!(holders.len(), 2, "exactly two servers hold a replica");
    let home = vol.volume_id.split('/').next().unwrap().to_owned();
    assert!(
        holders.iter().any(|s| s.id() == home),
        "the id names a holder"
    );
    for s in &holders {
        let m = membership_on(s, "mirror").await;
        assert_eq!(m.generation, 1, "{}", s.id());
        assert_eq!(m.members.len(), 2);
        assert_eq!(
            m.members[0].replica_id, home,
            "the home is the first member"
        );
        assert!(
            m.members
                .iter()
                .all(|r| r.state == ReplicaState::InSync as i32)
        );
    }

    // A retry is the same volume; other parameters are AlreadyExists.
    let again = d
        .ctl()
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.volume.unwrap().volume_id, vol.volume_id);
    let mut other = req.clone();
    other.parameters = params(&[("replicas", "2"), ("replicaTimeout", "3s")]);
    assert_code(d.ctl().create_volume(other).await, Code::AlreadyExists);

    // Healthy: the condition is normal.
    let got = d
        .ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal, "{}", cond.message);

    // Expansion grows every replica.
    d.ctl()
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 8 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("expand");
    for s in &holders {
        assert_eq!(
            exists_on(s, "mirror").await,
            Some(8 * MIB as u64),
            "{}",
            s.id()
        );
    }

    // Three replicas on three servers; four cannot be placed.
    let mut three = create_req("three", MIB);
    three.parameters = params(&[("replicas", "3")]);
    d.ctl().create_volume(three).await.expect("three replicas");
    for s in [&a, &b, &c] {
        assert!(exists_on(s, "three").await.is_some(), "{}", s.id());
    }

    // Delete removes every replica.
    d.ctl()
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    for s in [&a, &b, &c] {
        assert_eq!(exists_on(s, "mirror").await, None, "{}", s.id());
    }
}

#[tokio::test]
async fn mirrored_restore_starts_with_the_content_holder_in_sync() {
    use enbd_proto::enbd::ReplicaState;
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let d = Driver::start(&[&a, &b]).await;
    let src = d.create("src", 2 * MIB).await;
    let snap = d.snapshot("snap", &src.volume_id).await;
    let snap_home = snap.snapshot_id.split('/').next().unwrap().to_owned();

    let mut req = create_req("restored", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("restore")
        .into_inner()
        .volume
        .unwrap();
    assert!(vol.volume_id.starts_with(&format!("{snap_home}/")));
    let home = if a.id() == snap_home { &a } else { &b };
    let m = membership_on(home, "restored").await;
    assert_eq!(m.generation, 1);
    for r in &m.members {
        let want = if r.replica_id == snap_home {
            ReplicaState::InSync
        } else {
            ReplicaState::Out
        };
        assert_eq!(r.state, want as i32, "{}", r.replica_id);
    }
    // The copy still to be made is the condition's news.
    let got = d
        .ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("out of sync"),
        "{}",
        cond.message
    );
}

#[tokio::test]
async fn mirrored_snapshot_is_taken_on_an_in_sync_replica() {
    use enbd_proto::enbd::{Membership, ReplicaMember, ReplicaState, SetMembershipRequest};
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let d = Driver::start(&[&a, &b]).await;
    let mut req = create_req("m", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let home = vol.volume_id.split('/').next().unwrap().to_owned();
    let (home_srv, other) = if a.id() == home { (&a, &b) } else { (&b, &a) };

    // The node's mirror dropped the home: generation 2, home OUT, recorded on the survivor.
    let first = membership_on(other, "m").await;
    let record = Membership {
        generation: 2,
        members: first
            .members
            .iter()
            .map(|m| ReplicaMember {
                replica_id: m.replica_id.clone(),
                state: if m.replica_id == home {
                    ReplicaState::Out as i32
                } else {
                    ReplicaState::InSync as i32
                },
                ..Default::default()
            })
            .collect(),
        region_bytes: first.region_bytes,
    };
    other
        .replica_client()
        .await
        .set_membership(SetMembershipRequest {
            volume: "m".into(),
            membership: Some(record),
            extra_dirty: Vec::new(),
        })
        .await
        .expect("drop the home");
    assert_eq!(
        membership_on(home_srv, "m").await.generation,
        1,
        "the home is stale"
    );

    let snap = d.snapshot("s", &vol.volume_id).await;
    assert!(
        snap.snapshot_id.starts_with(&format!("{}/", other.id())),
        "taken on the in-sync replica, not the stale home: {}",
        snap.snapshot_id
    );
    // Idempotent: the same request finds it.
    let again = d.snapshot("s", &vol.volume_id).await;
    assert_eq!(again.snapshot_id, snap.snapshot_id);
}

/// After a node replaced the home replica (its server gone for good): expansion and
/// snapshots reach the new replica through the servers' records, and DeleteVolume removes
/// every member without waiting for the gone home.
#[tokio::test]
async fn mirrored_volume_follows_a_replacement_of_its_gone_home() {
    use enbd_proto::enbd::{Membership, ReplicaMember, ReplicaState, SetMembershipRequest};
    let a = start_server("srv-a");
    let b = start_server("srv-b");
    let c = start_server("srv-c");
    let d = Driver::start(&[&a, &b, &c]).await;
    let mut req = create_req("rep", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let home_id = vol.volume_id.split('/').next().unwrap().to_owned();
    let mut servers = vec![a, b, c];
    let mut holders = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        if exists_on(s, "rep").await.is_some() {
            holders.push(i);
        }
    }
    let spare_i = (0..3).find(|i| !holders.contains(i)).unwrap();
    let home_i = holders
        .iter()
        .copied()
        .find(|&i| servers[i].id() == home_id)
        .unwrap();
    let other_i = holders.iter().copied().find(|&i| i != home_i).unwrap();

    // What `enbd-node replace` does: the volume on the spare, then generation 2 with the
    // spare OUT in the home's place, on the survivor and the spare.
    let labels = servers[other_i]
        .mgmt_client()
        .await
        .get_volume(enbd_proto::enbd::GetVolumeRequest { name: "rep".into() })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .labels;
    servers[spare_i]
        .mgmt_client()
        .await
        .create_volume(enbd_proto::enbd::CreateVolumeRequest {
            name: "rep".into(),
            size_bytes: 2 * MIB as u64,
            source: None,
            labels,
        })
        .await
        .expect("create on the spare");
    let first = membership_on(&servers[other_i], "rep").await;
    let record = Membership {
        generation: 2,
        members: first
            .members
            .iter()
            .map(|m| {
                if m.replica_id == home_id {
                    ReplicaMember {
                        replica_id: servers[spare_i].id().to_owned(),
                        state: ReplicaState::Out as i32,
                        ..Default::default()
                    }
                } else {
                    m.clone()
                }
            })
            .collect(),
        region_bytes: first.region_bytes,
    };
    for i in [other_i, spare_i] {
        servers[i]
            .replica_client()
            .await
            .set_membership(SetMembershipRequest {
                volume: "rep".into(),
                membership: Some(record.clone()),
                extra_dirty: Vec::new(),
            })
            .await
            .expect("replacement record");
    }
    // The home's server is gone for good.
    let home = servers.remove(home_i);
    let (other_i, spare_i) = (
        other_i - usize::from(other_i > home_i),
        spare_i - usize::from(spare_i > home_i),
    );
    drop(home);
    let expand_req = ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 4 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    // Once the prober marks the home down, the survivor answers for the volume.
    d.wait_until(
        || async {
            d.ctl()
                .controller_expand_volume(expand_req.clone())
                .await
                .is_ok()
        },
        "expansion never reached the replicas while the home is gone",
    )
    .await;
    for i in [other_i, spare_i] {
        assert_eq!(
            exists_on(&servers[i], "rep").await,
            Some(4 * MIB as u64),
            "{} grew",
            servers[i].id()
        );
    }
    // The condition comes from the survivor's record: the new replica is behind (OUT).
    let cond = d
        .ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .expect("get volume with the home gone")
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(cond.abnormal);
    assert!(
        cond.message.contains(servers[spare_i].id()) && !cond.message.contains(&home_id),
        "{}",
        cond.message
    );
    let snap = d.snapshot("rep-snap", &vol.volume_id).await;
    assert!(
        snap.snapshot_id
            .starts_with(&format!("{}/", servers[other_i].id())),
        "the snapshot is taken on the in-sync survivor: {}",
        snap.snapshot_id
    );
    d.ctl()
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete snapshot");
    d.ctl()
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete with the replaced home gone");
    for s in &servers {
        assert_eq!(exists_on(s, "rep").await, None, "{} still holds it", s.id());
    }
}

// ---------------------------------------------------------------- node-scoped access

/// ENBD_OPT_ACCESS with `token` on `server`'s NBD port; true if it was acknowledged
/// (written from the protocol, independent of the codec).
async fn token_opens(server: &EnbdServer, token: &str) -> bool {
    use tokio::net::TcpStream;
    let mut s = TcpStream::connect(server.nbd()).await.expect("connect");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.expect("greeting");
    let mut out = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    out.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    out.extend(0x454e_4244u32.to_be_bytes());
    out.extend((token.len() as u32).to_be_bytes());
    out.extend(token.as_bytes());
    s.write_all(&out).await.expect("send");
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("reply");
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    ty == 1
}

#[tokio::test]
async fn publish_grants_access_on_every_replica_and_unpublish_revokes_it() {
    let published = |id: &str| {
        EnbdServer::builder()
            .id(id)
            .args(["--access=published"])
            .start()
    };
    let (a, b, c) = (published("srv-a"), published("srv-b"), published("srv-c"));
    let mut d = Driver::start(&[&a, &b, &c]).await;
    let mut req = create_req("guarded", 4 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner()
        .volume
        .unwrap();
    let publish_req = ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "node-1".into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    let ctx = d
        .ctl()
        .controller_publish_volume(publish_req.clone())
        .await
        .expect("publish")
        .into_inner()
        .publish_context;
    let token = ctx
        .get(enbd_proto::params::PUBLISH_ACCESS_TOKEN)
        .expect("the token is in publish_context")
        .clone();
    assert_eq!(token.len(), 64);

    let mut holders = Vec::new();
    for s in [&a, &b, &c] {
        if exists_on(s, "guarded").await.is_some() {
            holders.push(s);
        }
    }
    assert_eq!(holders.len(), 2);
    for s in &holders {
        assert!(token_opens(s, &token).await, "{} refused the token", s.id());
    }
    let outsider = [&a, &b, &c]
        .into_iter()
        .find(|s| !holders.iter().any(|h| h.id() == s.id()))
        .unwrap();
    assert!(
        !token_opens(outsider, &token).await,
        "a server without the volume"
    );

    // The attacher's retry and a restarted controller hand out the same token.
    let again = d
        .ctl()
        .controller_publish_volume(publish_req.clone())
        .await
        .expect("repeat publish")
        .into_inner()
        .publish_context;
    assert_eq!(
        again.get(enbd_proto::params::PUBLISH_ACCESS_TOKEN),
        Some(&token)
    );
    drop(d);
    d = Driver::start(&[&a, &b, &c]).await;
    let after_restart = d
        .ctl()
        .controller_publish_volume(publish_req.clone())
        .await
        .expect("publish after a controller restart")
        .into_inner()
        .publish_context;
    assert_eq!(
        after_restart.get(enbd_proto::params::PUBLISH_ACCESS_TOKEN),
        Some(&token)
    );

    // Unpublish revokes on every replica; repeating it succeeds.
    let unpublish = ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: "node-1".into(),
        ..Default::default()
    };
    d.ctl()
        .controller_unpublish_volume(unpublish.clone())
        .await
        .expect("unpublish");
    for s in &holders {
        assert!(
            !token_opens(s, &token).await,
            "{} still takes the token",
            s.id()
        );
    }
    d.ctl()
        .controller_unpublish_volume(unpublish)
        .await
        .expect("repeat unpublish");
}

// ---------------------------------------------------------------- grants follow the replicas

/// A TCP forwarder to `target` that the test opens and closes: closed, it cuts every
/// connection through it and drops new ones, so the controller (dialing through it) sees
/// the server down while the test still reaches the server directly.
struct Gate {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn to(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue;
                }
                let mut closed = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Self { addr, open, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn published_server(id: &str) -> EnbdServer {
    EnbdServer::builder()
        .id(id)
        .args(["--access=published"])
        .start()
}

/// The driver over `entries` (`ID=URL`) with extra arguments; waits until Probe is ready.
async fn driver_with(entries: &[String], extra: &[&str]) -> Driver {
    let servers = entries.join(",");
    let mut args = vec![
        "--discovery",
        "static",
        "--servers",
        &servers,
        "--nodes",
        "node-1,node-2,node-3",
    ];
    args.extend_from_slice(extra);
    let d = Driver::spawn(&args, &[]).await;
    d.wait_until(|| async { d.probe().await }, "Probe ready")
        .await;
    d
}

async fn condition_of(d: &Driver, volume_id: &str) -> VolumeCondition {
    d.ctl()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume_id.into(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
}

fn reconciled(d: &Driver, action: &str) -> f64 {
    enbd_test_harness::prom::scrape_parsed(d.metrics).value(
        "enbd_csi_controller_grant_reconcile_changes_total",
        &[("action", action)],
    )
}

/// A replica whose server was unreachable at publish gets the node's grant (the same
/// token) once the controller sees the server again, without another publish.
#[tokio::test]
async fn a_replica_down_at_publish_is_granted_when_its_server_is_back() {
    let servers = [published_server("srv-a"), published_server("srv-b")];
    let gates = [
        Gate::to(servers[0].mgmt()).await,
        Gate::to(servers[1].mgmt()).await,
    ];
    // A period far beyond the test's deadline: only the server coming back can grant.
    let d = driver_with(
        &[
            format!("srv-a={}", gates[0].url()),
            format!("srv-b={}", gates[1].url()),
        ],
        &["--grant-reconcile-interval", "1h"],
    )
    .await;
    let mut req = create_req("late", 4 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner();
    let vol = vol.volume.unwrap();
    for s in &servers {
        assert!(
            exists_on(s, "late").await.is_some(),
            "{} holds a replica",
            s.id()
        );
    }
    // The replica that is not the home goes out of the controller's reach (with the home
    // down, publishing itself would be Unavailable).
    let home_id = vol.volume_id.split('/').next().unwrap();
    let (home, other) = if servers[0].id() == home_id {
        (0, 1)
    } else {
        (1, 0)
    };
    let (home, other, gate) = (&servers[home], &servers[other], &gates[other]);

    gate.set_open(false);
    let unreachable = format!("enbd-server {} is unreachable", other.id());
    d.wait_until(
        || async {
            condition_of(&d, &vol.volume_id)
                .await
                .message
                .contains(&unreachable)
        },
        "the controller to see the other replica's server down",
    )
    .await;
    let ctx = d
        .ctl()
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "node-1".into(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .expect("publish with one replica's server down")
        .into_inner()
        .publish_context;
    let token = ctx[enbd_proto::params::PUBLISH_ACCESS_TOKEN].clone();
    assert!(
        token_opens(home, &token).await,
        "the live replica is granted"
    );
    assert!(
        !token_opens(other, &token).await,
        "unreachable at publish: no grant there yet"
    );
    assert_eq!(reconciled(&d, "granted"), 0.0);

    gate.set_open(true);
    d.wait_until(
        || async { token_opens(other, &token).await },
        "the grant on the other replica once the controller reaches its server again",
    )
    .await;
    assert!(token_opens(home, &token).await);
    assert_eq!(
        reconciled(&d, "granted"),
        1.0,
        "one grant made, counted once"
    );
    assert_eq!(reconciled(&d, "revoked"), 0.0);
}

/// After a replacement (what `enbd-node replace` records), the new member's server gets
/// the node's grant and the replaced member's server loses it.
#[tokio::test]
async fn grants_follow_a_replacement_to_the_new_member() {
    let servers = [
        published_server("srv-a"),
        published_server("srv-b"),
        published_server("srv-c"),
    ];
    let entries: Vec<String> = servers.iter().map(entry).collect();
    let d = driver_with(&entries, &["--grant-reconcile-interval", "200ms"]).await;
    let mut req = create_req("moved", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner();
    let vol = vol.volume.unwrap();
    let home_id = vol.volume_id.split('/').next().unwrap().to_owned();
    let token = publish_to_node_1(&d, &vol.volume_id).await;
    let (home, old, spare) = replica_roles(&servers, "moved", &home_id).await;
    assert!(token_opens(old, &token).await);
    assert!(!token_opens(spare, &token).await);

    // The replacement: the volume on the spare, then generation 2 with the spare OUT in
    // the old member's place, on the home and the spare (never on the replaced one).
    let labels = home
        .mgmt_client()
        .await
        .get_volume(enbd_proto::enbd::GetVolumeRequest {
            name: "moved".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .labels;
    spare
        .mgmt_client()
        .await
        .create_volume(enbd_proto::enbd::CreateVolumeRequest {
            name: "moved".into(),
            size_bytes: 2 * MIB as u64,
            source: None,
            labels,
        })
        .await
        .expect("create on the spare");
    record_replacement(home, old, spare, "moved").await;

    d.wait_until(
        || async { token_opens(spare, &token).await && !token_opens(old, &token).await },
        "the grant to move from the replaced member to the new one",
    )
    .await;
    assert!(token_opens(home, &token).await, "the home keeps its grant");
    assert_eq!(reconciled(&d, "granted"), 1.0);
    assert_eq!(reconciled(&d, "revoked"), 1.0);

    // Unpublishing revokes on the current members.
    d.ctl()
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .expect("unpublish");
    for s in [home, spare] {
        assert!(!token_opens(s, &token).await, "{} still takes it", s.id());
    }
}

/// Publishes the volume to node-1 (mount, single writer); the access token it was given.
async fn publish_to_node_1(d: &Driver, volume_id: &str) -> String {
    d.ctl()
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: "node-1".into(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .expect("publish")
        .into_inner()
        .publish_context[enbd_proto::params::PUBLISH_ACCESS_TOKEN]
        .clone()
}

/// Of three servers and a two-replica volume `name` whose home is `home_id`: the home, the
/// other replica's server, and the one holding no copy.
async fn replica_roles<'a>(
    servers: &'a [EnbdServer],
    name: &str,
    home_id: &str,
) -> (&'a EnbdServer, &'a EnbdServer, &'a EnbdServer) {
    let mut holders = Vec::new();
    for s in servers {
        if exists_on(s, name).await.is_some() {
            holders.push(s);
        }
    }
    let home = *holders.iter().find(|s| s.id() == home_id).unwrap();
    let old = *holders.iter().find(|s| s.id() != home_id).unwrap();
    let spare = servers
        .iter()
        .find(|s| s.id() != home.id() && s.id() != old.id())
        .unwrap();
    (home, old, spare)
}

/// What `enbd-node replace` records: generation 2 with `spare` OUT in `old`'s place, written
/// on the home and the spare (never on the replaced member).
async fn record_replacement(home: &EnbdServer, old: &EnbdServer, spare: &EnbdServer, name: &str) {
    use enbd_proto::enbd::{Membership, ReplicaMember, ReplicaState, SetMembershipRequest};
    let first = membership_on(home, name).await;
    let record = Membership {
        generation: 2,
        members: first
            .members
            .iter()
            .map(|m| {
                if m.replica_id == old.id() {
                    ReplicaMember {
                        replica_id: spare.id().to_owned(),
                        state: ReplicaState::Out as i32,
                        ..Default::default()
                    }
                } else {
                    m.clone()
                }
            })
            .collect(),
        region_bytes: first.region_bytes,
    };
    for s in [spare, home] {
        s.replica_client()
            .await
            .set_membership(SetMembershipRequest {
                volume: name.into(),
                membership: Some(record.clone()),
                extra_dirty: Vec::new(),
            })
            .await
            .expect("replacement record");
    }
}

async fn labels_on(server: &EnbdServer, name: &str) -> HashMap<String, String> {
    server
        .mgmt_client()
        .await
        .get_volume(enbd_proto::enbd::GetVolumeRequest { name: name.into() })
        .await
        .expect("GetVolume")
        .into_inner()
        .volume
        .expect("volume")
        .labels
}

/// A claim smaller than its filesystem can be made on (xfs: 300 MB, mkfs.xfs refuses less)
/// gets a volume of that floor, named by the capability or by the class's `fsType`; ext4 and
/// raw block keep the size asked for; a limit below the floor is OutOfRange, nothing created.
#[tokio::test]
async fn an_xfs_volume_is_created_at_least_as_large_as_mkfs_xfs_needs() {
    let server = start_server("srv-a");
    let d = Driver::start(&[&server]).await;
    let xfs_cap = VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "xfs".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    let floor = 300_000_000u64.next_multiple_of(4096) as i64;
    let mut by_cap = create_req("small-xfs", MIB);
    by_cap.volume_capabilities = vec![xfs_cap.clone()];
    let mut by_class = create_req("small-xfs-class", MIB);
    by_class.parameters = params(&[("fsType", "xfs")]);
    for req in [by_cap, by_class] {
        let name = req.name.clone();
        let vol = d.ctl().create_volume(req).await.expect(&name).into_inner();
        assert_eq!(vol.volume.unwrap().capacity_bytes, floor, "{name}");
        assert_eq!(
            exists_on(&server, &name).await,
            Some(floor as u64),
            "{name}"
        );
    }
    let ext4 = d.create("small-ext4", MIB).await;
    assert_eq!(ext4.capacity_bytes, MIB);
    let mut block = create_req("small-block", MIB);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    block.parameters = params(&[("fsType", "xfs")]);
    let block = d
        .ctl()
        .create_volume(block)
        .await
        .expect("block")
        .into_inner();
    assert_eq!(
        block.volume.unwrap().capacity_bytes,
        MIB,
        "raw block formats nothing"
    );

    let mut capped = create_req("capped-xfs", MIB);
    capped.volume_capabilities = vec![xfs_cap];
    capped.capacity_range = range(MIB, 100 * MIB);
    let msg = assert_code(d.ctl().create_volume(capped).await, Code::OutOfRange);
    assert!(msg.contains("xfs") && msg.contains("300000000"), "{msg}");
    assert!(exists_on(&server, "capped-xfs").await.is_none());
}

/// `csi-driver prepare-replacement`, the CLI a person runs in the controller's pod, against
/// the running driver at `d`: its exit status, stdout and stderr.
async fn prepare_cli(d: &Driver, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_csi-driver"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .arg("prepare-replacement")
        .args(args)
        .output()
        .await
        .expect("run csi-driver prepare-replacement");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The controller's half of a replacement: refused with the exact code while it cannot be
/// made; then the new copy is created on the one server outside the set with the volume's
/// size and labels, the published node's token opens it, the grant reconciliation leaves
/// that grant alone although the server is no member yet, a retry changes nothing, and once
/// the node's record names the new member the replaced one loses the grant.
#[tokio::test]
async fn a_prepared_replacement_is_created_granted_and_held_until_recorded() {
    use enbd_proto::enbd::PrepareReplacementRequest;
    use enbd_proto::enbd::controller_admin_service_client::ControllerAdminServiceClient;
    let servers = [
        published_server("srv-a"),
        published_server("srv-b"),
        published_server("srv-c"),
    ];
    let entries: Vec<String> = servers.iter().map(entry).collect();
    let d = driver_with(&entries, &["--grant-reconcile-interval", "200ms"]).await;
    let admin = || ControllerAdminServiceClient::new(d.channel.clone());
    let prepare = |volume_id: &str, replica: &str, target: &str| PrepareReplacementRequest {
        volume_id: volume_id.into(),
        replica: replica.into(),
        target: target.into(),
    };
    let mut req = create_req("swap", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner();
    let vol = vol.volume.unwrap();
    let home_id = vol.volume_id.split('/').next().unwrap().to_owned();
    let (home, old, spare) = replica_roles(&servers, "swap", &home_id).await;

    // Not attached anywhere: the CLI fails, saying why.
    let (ok, _, err) =
        prepare_cli(&d, &["--volume-id", &vol.volume_id, "--replica", old.id()]).await;
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("published to no node"),
        "{err}"
    );
    assert!(
        exists_on(spare, "swap").await.is_none(),
        "created before refusing"
    );

    let token = publish_to_node_1(&d, &vol.volume_id).await;

    let refused = [
        (prepare("not an id", old.id(), ""), Code::InvalidArgument),
        (prepare(&vol.volume_id, "", ""), Code::InvalidArgument),
        (
            prepare(&format!("{home_id}/nope"), old.id(), ""),
            Code::NotFound,
        ),
        (
            prepare(&vol.volume_id, spare.id(), ""),
            Code::FailedPrecondition,
        ),
        (
            prepare(&vol.volume_id, old.id(), home.id()),
            Code::FailedPrecondition,
        ),
        (prepare(&vol.volume_id, old.id(), "srv-z"), Code::NotFound),
    ];
    for (r, code) in refused {
        let shown = format!("{r:?}");
        let got = admin().prepare_replacement(r).await.expect_err(&shown);
        assert_eq!(got.code(), code, "{shown}: {}", got.message());
    }
    assert!(
        exists_on(spare, "swap").await.is_none(),
        "a refusal created something"
    );

    // The CLI makes it: the new copy on the spare, granted with the node's token.
    let (ok, out, err) =
        prepare_cli(&d, &["--volume-id", &vol.volume_id, "--replica", old.id()]).await;
    assert!(ok, "prepare-replacement failed: {err}");
    let spec = out.lines().last().unwrap_or_default().to_owned();
    assert_eq!(
        spec,
        format!("{}@{}@{}", spare.id(), spare.nbd(), spare.mgmt_url()),
        "{out}"
    );
    assert!(
        out.contains("volume created there") && out.contains("node-1"),
        "{out}"
    );
    assert_eq!(exists_on(spare, "swap").await, Some(2 * MIB as u64));
    assert_eq!(
        labels_on(spare, "swap").await,
        labels_on(home, "swap").await,
        "the labels are copied"
    );
    assert!(
        token_opens(spare, &token).await,
        "the node's token opens the new copy"
    );

    // Held: several reconciliation passes later the grant is still there.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        token_opens(spare, &token).await,
        "the reconciliation revoked a prepared grant"
    );
    assert_eq!(reconciled(&d, "revoked"), 0.0);

    // A retry finds it (nothing created twice); no other server is left, so a volume whose
    // set uses all three has nowhere to go.
    let again = admin()
        .prepare_replacement(prepare(&vol.volume_id, old.id(), ""))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        (again.server_id.as_str(), again.created),
        (spare.id(), false)
    );
    let mut wide = create_req("wide", MIB);
    wide.parameters = params(&[("replicas", "3")]);
    let wide = d
        .ctl()
        .create_volume(wide)
        .await
        .expect("create")
        .into_inner()
        .volume
        .unwrap();
    publish_to_node_1(&d, &wide.volume_id).await;
    let none = admin()
        .prepare_replacement(prepare(&wide.volume_id, old.id(), ""))
        .await
        .expect_err("placed a fourth replica on three servers");
    assert_eq!(none.code(), Code::ResourceExhausted, "{}", none.message());

    // The node's mirror records the swap (generation 2, the spare OUT in the old one's
    // place, written on the home and the spare): the replaced member loses the grant.
    record_replacement(home, old, spare, "swap").await;
    d.wait_until(
        || async { token_opens(spare, &token).await && !token_opens(old, &token).await },
        "the replaced member to lose the grant while the new one keeps it",
    )
    .await;
}

/// A copy prepared for a replacement that the node never swapped in is the controller's own
/// making: deleting the volume deletes it too, not only the members' copies.
#[tokio::test]
async fn a_prepared_replacement_never_recorded_goes_with_the_volume() {
    use enbd_proto::enbd::PrepareReplacementRequest;
    use enbd_proto::enbd::controller_admin_service_client::ControllerAdminServiceClient;
    let servers = [
        published_server("srv-a"),
        published_server("srv-b"),
        published_server("srv-c"),
    ];
    let entries: Vec<String> = servers.iter().map(entry).collect();
    let d = driver_with(&entries, &[]).await;
    let mut req = create_req("left", MIB);
    req.parameters = params(&[("replicas", "2")]);
    let vol = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner();
    let vol = vol.volume.unwrap();
    let home_id = vol.volume_id.split('/').next().unwrap().to_owned();
    publish_to_node_1(&d, &vol.volume_id).await;
    let (_, old, _) = replica_roles(&servers, "left", &home_id).await;
    let prepared = ControllerAdminServiceClient::new(d.channel.clone())
        .prepare_replacement(PrepareReplacementRequest {
            volume_id: vol.volume_id.clone(),
            replica: old.id().to_owned(),
            target: String::new(),
        })
        .await
        .expect("prepare")
        .into_inner();
    let spare = servers
        .iter()
        .find(|s| s.id() == prepared.server_id)
        .unwrap();
    assert_eq!(exists_on(spare, "left").await, Some(MIB as u64));

    d.ctl()
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .expect("unpublish");
    d.ctl()
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    for s in &servers {
        assert!(
            exists_on(s, "left").await.is_none(),
            "{} still holds a copy",
            s.id()
        );
    }
}

// ---------------------------------------------------------------- ListVolumes and mirrors

async fn listed(d: &Driver) -> Vec<list_volumes_response::Entry> {
    d.ctl()
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner()
        .entries
}

/// A mirrored volume is one ListVolumes entry under the id CreateVolume returned (its
/// replicas on other servers are not volumes of their own), with the replica set's
/// condition; it stays so while its home is down and another replica lists it.
#[tokio::test]
async fn list_volumes_lists_a_mirror_once_under_its_id() {
    let mut servers = vec![start_server("srv-a"), start_server("srv-b")];
    let d = Driver::start(&[&servers[0], &servers[1]]).await;
    let single = d.create("single", MIB).await;
    let mut req = create_req("mirror", 2 * MIB);
    req.parameters = params(&[("replicas", "2")]);
    let mirror = d
        .ctl()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner();
    let mirror = mirror.volume.unwrap();
    for s in &servers {
        assert!(
            exists_on(s, "mirror").await.is_some(),
            "{} holds a replica",
            s.id()
        );
    }

    let entries = listed(&d).await;
    let mut ids: Vec<String> = entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    let mut want = vec![single.volume_id.clone(), mirror.volume_id.clone()];
    want.sort();
    assert_eq!(ids, want, "one entry per volume, none per replica");
    let m = entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == mirror.volume_id)
        .unwrap();
    assert_eq!(m.volume.as_ref().unwrap().capacity_bytes, 2 * MIB);
    let cond = m
        .status
        .as_ref()
        .unwrap()
        .volume_condition
        .as_ref()
        .unwrap();
    assert!(!cond.abnormal, "{}", cond.message);

    // The home's server goes away: the other replica lists the volume, still once and
    // under the same id, and the condition says what is wrong.
    let home_id = mirror.volume_id.split('/').next().unwrap().to_owned();
    let home_i = servers.iter().position(|s| s.id() == home_id).unwrap();
    servers[home_i].kill();
    let condition = |entries: &[list_volumes_response::Entry]| {
        entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == mirror.volume_id)
            .and_then(|e| e.status.as_ref()?.volume_condition.clone())
    };
    let unreachable = format!("enbd-server {home_id} is unreachable");
    d.wait_until(
        || async { condition(&listed(&d).await).is_some_and(|c| c.message.contains(&unreachable)) },
        "the mirror to be listed with its home's server unreachable",
    )
    .await;
    let entries = listed(&d).await;
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.as_str())
        .collect();
    let single_on_survivor = single.volume_id.starts_with(servers[1 - home_i].id());
    assert_eq!(
        ids.iter().filter(|i| **i == mirror.volume_id).count(),
        1,
        "{ids:?}"
    );
    assert_eq!(ids.len(), 1 + usize::from(single_on_survivor), "{ids:?}");
    let cond = condition(&entries).unwrap();
    assert!(
        cond.abnormal && cond.message.starts_with("degraded"),
        "{}",
        cond.message
    );
}
