//! Node service tests with an in-memory attacher: argument checks, spec error codes,
//! idempotency of the inverse operations, the per-volume guard, and cleanup after a failed
//! stage. Real devices and mounts are exercised by the VM conformance suite.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use enbd_proto::csi::identity_server::Identity;
use enbd_proto::csi::node_server::Node;
use enbd_proto::csi::node_service_capability::{Type as CapType, rpc::Type as RpcType};
use enbd_proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use enbd_proto::csi::*;
use enbd_proto::ids::VolumeId;
use enbd_proto::params::{CTX_EXPORT, CTX_SERVER};
use tokio::sync::Notify;
use tonic::{Code, Request};

use super::*;

/// Device layer stand-in: "devices" are sparse files; only exports in `exports` exist.
struct FakeAttacher {
    dir: PathBuf,
    exports: HashSet<String>,
    attached: Mutex<HashMap<VolumeId, AttachedDevice>>,
    calls: Mutex<Vec<String>>,
    /// The access token each attach carried.
    tokens: Mutex<Vec<Option<String>>>,
    /// When set, attach waits for one notification (to hold an operation open).
    gate: Option<Arc<Notify>>,
    not_ready: Option<String>,
}

impl FakeAttacher {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            exports: HashSet::from(["vol-a".to_string(), "vol-b".to_string()]),
            attached: Mutex::default(),
            calls: Mutex::default(),
            tokens: Mutex::default(),
            gate: None,
            not_ready: None,
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls").clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().expect("calls").push(call);
    }
}

impl Attacher for FakeAttacher {
    async fn attach(&self, spec: AttachSpec) -> Result<AttachedDevice, AttacherError> {
        self.record(format!("attach {}", spec.volume_id));
        self.tokens
            .lock()
            .expect("tokens")
            .push(spec.access_token.as_ref().map(|t| t.expose().to_owned()));
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        if let Some(dev) = self.attached.lock().expect("attached").get(&spec.volume_id) {
            return Ok(dev.clone());
        }
        if !self.exports.contains(&spec.context.export) {
            return Err(AttacherError::NotFound(format!(
                "export {} on {}",
                spec.context.export, spec.context.server
            )));
        }
        let dev_path = self.dir.join(format!("dev-{}", spec.context.export));
        std::fs::File::create(&dev_path)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| AttacherError::Internal(e.to_string()))?;
        let dev = AttachedDevice {
            dev_path,
            size_bytes: 64 << 20,
            read_only: spec.read_only,
            health: VolumeHealth::default(),
            recovering: false,
        };
        self.attached
            .lock()
            .expect("attached")
            .insert(spec.volume_id, dev.clone());
        Ok(dev)
    }

    async fn detach(&self, volume_id: &VolumeId) -> Result<(), AttacherError> {
        self.record(format!("detach {volume_id}"));
        self.attached.lock().expect("attached").remove(volume_id);
        Ok(())
    }

    fn get(&self, volume_id: &VolumeId) -> Option<AttachedDevice> {
        self.attached
            .lock()
            .expect("attached")
            .get(volume_id)
            .cloned()
    }

    fn attached_count(&self) -> usize {
        self.attached.lock().expect("attached").len()
    }

    async fn resize(&self, volume_id: &VolumeId) -> Result<u64, AttacherError> {
        self.record(format!("resize {volume_id}"));
        self.get(volume_id)
            .map(|d| d.size_bytes)
            .ok_or_else(|| AttacherError::NotFound(volume_id.to_string()))
    }

    fn ready(&self) -> Result<(), String> {
        match &self.not_ready {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
}

fn config(max_volumes: u64) -> NodeConfig {
    NodeConfig {
        node_id: "node-1".into(),
        driver_name: "csi.enbd.io".into(),
        max_volumes,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    attacher: Arc<FakeAttacher>,
    node: NodeService<FakeAttacher>,
}

fn fixture_with(max_volumes: u64, tweak: impl FnOnce(&mut FakeAttacher)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeAttacher::new(dir.path());
    tweak(&mut fake);
    let attacher = Arc::new(fake);
    let node = NodeService::new(config(max_volumes), attacher.clone());
    Fixture {
        dir,
        attacher,
        node,
    }
}

fn fixture() -> Fixture {
    fixture_with(0, |_| {})
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn context(export: &str) -> HashMap<String, String> {
    HashMap::from([
        (CTX_SERVER.to_string(), "127.0.0.1:10809".to_string()),
        (CTX_EXPORT.to_string(), export.to_string()),
    ])
}

fn stage_req(f: &Fixture, id: &str, export: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: f.path("staging"),
        volume_capability: Some(mount_cap()),
        volume_context: context(export),
        secrets: HashMap::from([("token".to_string(), "s3cret".to_string())]),
        ..Default::default()
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().contains("s3cret"), "secret leaked into {s:?}");
            s.code()
        }
    }
}

#[tokio::test]
async fn stage_checks_arguments_before_attaching() {
    let f = fixture();
    let good = stage_req(&f, "server-0/vol-a", "vol-a");
    let cases: Vec<(&str, NodeStageVolumeRequest, Code)> = vec![
        (
            "missing volume id",
            NodeStageVolumeRequest {
                volume_id: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "malformed volume id",
            NodeStageVolumeRequest {
                volume_id: "no-slash".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "missing staging path",
            NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "relative staging path",
            NodeStageVolumeRequest {
                staging_target_path: "staging".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "dot-dot staging path",
            NodeStageVolumeRequest {
                staging_target_path: format!("{}/../x", f.path("a")),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "missing capability",
            NodeStageVolumeRequest {
                volume_capability: None,
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "unsupported fs type",
            NodeStageVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_type: Some(AccessType::Mount(MountVolume {
                        fs_type: "ntfs".into(),
                        ..Default::default()
                    })),
                    ..mount_cap()
                }),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "multi-node writer on a filesystem",
            NodeStageVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_mode: Some(AccessMode {
                        mode: Mode::MultiNodeMultiWriter as i32,
                    }),
                    ..mount_cap()
                }),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "empty volume context",
            NodeStageVolumeRequest {
                volume_context: HashMap::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "unknown context key",
            NodeStageVolumeRequest {
                volume_context: {
                    let mut c = context("vol-a");
                    c.insert("surprise".into(), "1".into());
                    c
                },
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
    ];
    for (name, req, want) in cases {
        assert_eq!(
            code(f.node.node_stage_volume(Request::new(req)).await),
            want,
            "{name}"
        );
    }
    assert!(
        f.attacher.calls().is_empty(),
        "bad arguments must change nothing: {:?}",
        f.attacher.calls()
    );
}

#[tokio::test]
async fn stage_of_unknown_volume_is_not_found_and_leaves_nothing() {
    let f = fixture();
    let r = f
        .node
        .node_stage_volume(Request::new(stage_req(&f, "server-0/missing", "missing")))
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert_eq!(f.attacher.attached_count(), 0);
}

#[tokio::test]
async fn failed_stage_detaches_what_it_attached() {
    let f = fixture();
    // The fake "device" is a regular file, which the node refuses after attaching: the
    // failed stage must not leak the attachment.
    let r = f
        .node
        .node_stage_volume(Request::new(stage_req(&f, "server-0/vol-a", "vol-a")))
        .await;
    assert_ne!(code(r), Code::Ok);
    assert_eq!(
        f.attacher.calls(),
        vec!["attach server-0/vol-a", "detach server-0/vol-a"]
    );
    assert_eq!(f.attacher.attached_count(), 0);
}

#[tokio::test]
async fn max_volumes_is_resource_exhausted() {
    let f = fixture_with(1, |_| {});
    f.attacher
        .attach(AttachSpec {
            volume_id: VolumeId::parse("server-0/vol-b").expect("id"),
            context: enbd_proto::params::VolumeContext::from_context(&context("vol-b"))
                .expect("ctx"),
            read_only: false,
            access_token: None,
        })
        .await
        .expect("attach");
    let r = f
        .node
        .node_stage_volume(Request::new(stage_req(&f, "server-0/vol-a", "vol-a")))
        .await;
    assert_eq!(code(r), Code::ResourceExhausted);
}

#[tokio::test]
async fn concurrent_operation_on_one_volume_is_aborted() {
    let gate = Arc::new(Notify::new());
    let f = fixture_with(0, |a| a.gate = Some(gate.clone()));
    let node = Arc::new(f.node);
    let first = {
        let node = node.clone();
        let req = NodeStageVolumeRequest {
            staging_target_path: f.dir.path().join("staging").to_string_lossy().into_owned(),
            volume_capability: Some(mount_cap()),
            volume_id: "server-0/vol-a".into(),
            volume_context: context("vol-a"),
            ..Default::default()
        };
        tokio::spawn(async move { node.node_stage_volume(Request::new(req)).await })
    };
    // Wait until the first call holds the volume (it is parked in attach).
    while f.attacher.calls().is_empty() {
        tokio::task::yield_now().await;
    }
    let unstage = NodeUnstageVolumeRequest {
        volume_id: "server-0/vol-a".into(),
        staging_target_path: f.dir.path().join("staging").to_string_lossy().into_owned(),
    };
    assert_eq!(
        code(
            node.node_unstage_volume(Request::new(unstage.clone()))
                .await
        ),
        Code::Aborted
    );
    // Another volume is not blocked.
    let other = NodeUnpublishVolumeRequest {
        volume_id: "server-0/vol-b".into(),
        target_path: f.dir.path().join("t-b").to_string_lossy().into_owned(),
    };
    assert_eq!(
        code(node.node_unpublish_volume(Request::new(other)).await),
        Code::Ok
    );
    gate.notify_one();
    let _ = first.await.expect("join");
    // Guard released once the first operation finished.
    assert_eq!(
        code(node.node_unstage_volume(Request::new(unstage)).await),
        Code::Ok
    );
}

#[tokio::test]
async fn cancelled_caller_does_not_release_the_guard_early() {
    let gate = Arc::new(Notify::new());
    let f = fixture_with(0, |a| a.gate = Some(gate.clone()));
    let node = Arc::new(f.node);
    let req = stage_req_for(f.dir.path(), "server-0/vol-a", "vol-a");
    // The caller gives up while attach is in progress.
    let r = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        node.node_stage_volume(Request::new(req)),
    )
    .await;
    assert!(r.is_err(), "call should have timed out");
    let again = stage_req_for(f.dir.path(), "server-0/vol-a", "vol-a");
    assert_eq!(
        code(node.node_stage_volume(Request::new(again)).await),
        Code::Aborted
    );
    gate.notify_one();
    // The abandoned task still runs to completion and cleans up after its failed mount.
    loop {
        if f.attacher.calls().iter().any(|c| c.starts_with("detach")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn stage_req_for(dir: &Path, id: &str, export: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: dir.join("staging").to_string_lossy().into_owned(),
        volume_capability: Some(mount_cap()),
        volume_context: context(export),
        ..Default::default()
    }
}

#[tokio::test]
async fn unstage_and_unpublish_of_what_is_gone_succeed_repeatedly() {
    let f = fixture();
    std::fs::create_dir(f.dir.path().join("staging")).expect("mkdir");
    let unstage = NodeUnstageVolumeRequest {
        volume_id: "server-0/vol-a".into(),
        staging_target_path: f.path("staging"),
    };
    for _ in 0..2 {
        assert_eq!(
            code(
                f.node
                    .node_unstage_volume(Request::new(unstage.clone()))
                    .await
            ),
            Code::Ok
        );
    }
    // Unknown volume: nothing to detach.
    assert!(f.attacher.calls().is_empty());

    let target = f.dir.path().join("target");
    std::fs::create_dir(&target).expect("mkdir");
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: "server-0/vol-a".into(),
        target_path: f.path("target"),
    };
    for _ in 0..2 {
        assert_eq!(
            code(
                f.node
                    .node_unpublish_volume(Request::new(unpublish.clone()))
                    .await
            ),
            Code::Ok
        );
    }
    assert!(!target.exists(), "the target directory must be removed");
}

#[tokio::test]
async fn unstage_unpublish_check_arguments() {
    let f = fixture();
    let bad_unstage = [
        NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: f.path("s"),
        },
        NodeUnstageVolumeRequest {
            volume_id: "server-0/v".into(),
            staging_target_path: String::new(),
        },
        NodeUnstageVolumeRequest {
            volume_id: "server-0/v".into(),
            staging_target_path: "/".into(),
        },
    ];
    for req in bad_unstage {
        assert_eq!(
            code(f.node.node_unstage_volume(Request::new(req)).await),
            Code::InvalidArgument
        );
    }
    let bad_unpublish = [
        NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: f.path("t"),
        },
        NodeUnpublishVolumeRequest {
            volume_id: "server-0/v".into(),
            target_path: String::new(),
        },
        NodeUnpublishVolumeRequest {
            volume_id: "server-0/v".into(),
            target_path: "rel/t".into(),
        },
    ];
    for req in bad_unpublish {
        assert_eq!(
            code(f.node.node_unpublish_volume(Request::new(req)).await),
            Code::InvalidArgument
        );
    }
}

#[tokio::test]
async fn publish_requires_stage_and_valid_arguments() {
    let f = fixture();
    let good = NodePublishVolumeRequest {
        volume_id: "server-0/vol-a".into(),
        staging_target_path: f.path("staging"),
        target_path: f.path("target"),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    assert_eq!(
        code(f.node.node_publish_volume(Request::new(good.clone())).await),
        Code::FailedPrecondition
    );
    let cases = [
        NodePublishVolumeRequest {
            volume_id: String::new(),
            ..good.clone()
        },
        NodePublishVolumeRequest {
            target_path: String::new(),
            ..good.clone()
        },
        NodePublishVolumeRequest {
            staging_target_path: String::new(),
            ..good.clone()
        },
        NodePublishVolumeRequest {
            volume_capability: None,
            ..good.clone()
        },
        NodePublishVolumeRequest {
            target_path: format!("{}/inside", f.path("staging")),
            ..good.clone()
        },
        NodePublishVolumeRequest {
            target_path: "/a/../etc".into(),
            ..good.clone()
        },
    ];
    for req in cases {
        assert_eq!(
            code(f.node.node_publish_volume(Request::new(req)).await),
            Code::InvalidArgument
        );
    }
    assert!(
        !f.dir.path().join("target").exists(),
        "a refused publish creates nothing"
    );
}

#[tokio::test]
async fn stats_and_expand_codes() {
    let f = fixture();
    let stats = |id: &str, path: String| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path,
        ..Default::default()
    };
    assert_eq!(
        code(
            f.node
                .node_get_volume_stats(Request::new(stats("server-0/vol-a", f.path("t"))))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            f.node
                .node_get_volume_stats(Request::new(stats("", f.path("t"))))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            f.node
                .node_get_volume_stats(Request::new(stats("server-0/vol-a", String::new())))
                .await
        ),
        Code::InvalidArgument
    );
    // A missing path is InvalidArgument even with an id we never issued (csi-sanity's case).
    assert_eq!(
        code(
            f.node
                .node_get_volume_stats(Request::new(stats("fake-vol-id", String::new())))
                .await
        ),
        Code::InvalidArgument
    );

    // An id we never issue, or a path no volume can be at, is an unknown volume: NotFound.
    for (id, path) in [
        ("some-id", f.path("t")),
        ("Server/x", f.path("t")),
        ("server-0/vol-a", "some/path".to_string()),
        ("server-0/vol-a", format!("{}/../t", f.path("a"))),
    ] {
        assert_eq!(
            code(
                f.node
                    .node_get_volume_stats(Request::new(stats(id, path.clone())))
                    .await
            ),
            Code::NotFound,
            "stats {id} {path}"
        );
    }

    let expand = |id: &str, path: String, range: Option<CapacityRange>| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path,
        capacity_range: range,
        ..Default::default()
    };
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand("server-0/vol-a", f.path("t"), None)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand("", f.path("t"), None)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand("server-0/vol-a", String::new(), None)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand("some-id", f.path("t"), None)))
                .await
        ),
        Code::NotFound
    );
    let negative = Some(CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand(
                    "server-0/vol-a",
                    f.path("t"),
                    negative
                )))
                .await
        ),
        Code::InvalidArgument
    );
    let inverted = Some(CapacityRange {
        required_bytes: 10 << 20,
        limit_bytes: 1 << 20,
    });
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand(
                    "server-0/vol-a",
                    f.path("t"),
                    inverted
                )))
                .await
        ),
        Code::OutOfRange
    );

    // Attached, but the path does not exist: NotFound, and the device is not resized.
    let id = VolumeId::parse("server-0/vol-a").expect("id");
    f.attacher
        .attach(AttachSpec {
            volume_id: id,
            context: enbd_proto::params::VolumeContext::from_context(&context("vol-a"))
                .expect("ctx"),
            read_only: false,
            access_token: None,
        })
        .await
        .expect("attach");
    assert_eq!(
        code(
            f.node
                .node_get_volume_stats(Request::new(stats("server-0/vol-a", f.path("t"))))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            f.node
                .node_expand_volume(Request::new(expand("server-0/vol-a", f.path("t"), None)))
                .await
        ),
        Code::NotFound
    );
    assert!(!f.attacher.calls().iter().any(|c| c.starts_with("resize")));
}

#[tokio::test]
async fn block_stage_on_non_device_is_refused_and_cleaned_up() {
    let f = fixture();
    let req = NodeStageVolumeRequest {
        volume_capability: Some(block_cap()),
        ..stage_req(&f, "server-0/vol-a", "vol-a")
    };
    // The fake device is a regular file, which the node must refuse before binding it.
    let r = f.node.node_stage_volume(Request::new(req)).await;
    assert_eq!(code(r), Code::Internal);
    assert!(!f.dir.path().join("staging/device").exists());
    assert_eq!(f.attacher.attached_count(), 0);
}

#[tokio::test]
async fn info_and_capabilities() {
    let f = fixture_with(16, |_| {});
    let info = f
        .node
        .node_get_info(Request::new(NodeGetInfoRequest {}))
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(info.max_volumes_per_node, 16);
    assert_eq!(
        info.accessible_topology, None,
        "volumes are reachable from every node"
    );

    let caps = f
        .node
        .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
        .await
        .expect("caps")
        .into_inner();
    let mut kinds: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.map(|CapType::Rpc(rpc)| rpc.r#type))
        .collect();
    kinds.sort();
    let mut want = vec![
        RpcType::StageUnstageVolume as i32,
        RpcType::GetVolumeStats as i32,
        RpcType::ExpandVolume as i32,
        RpcType::VolumeCondition as i32,
        RpcType::SingleNodeMultiWriter as i32,
    ];
    want.sort();
    assert_eq!(kinds, want);
}

#[tokio::test]
async fn identity_reports_name_and_readiness() {
    let f = fixture();
    let id = IdentityService::new(&config(0), f.attacher.clone());
    let info = id
        .get_plugin_info(Request::new(GetPluginInfoRequest {}))
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "csi.enbd.io");
    assert!(!info.vendor_version.is_empty());
    let probe = id
        .probe(Request::new(ProbeRequest {}))
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = id
        .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
        .await
        .expect("caps")
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "no VOLUME_ACCESSIBILITY_CONSTRAINTS: {:?}",
        caps.capabilities
    );

    let broken = fixture_with(0, |a| a.not_ready = Some("ublk_drv not loaded".into()));
    let id = IdentityService::new(&config(0), broken.attacher.clone());
    let err = id
        .probe(Request::new(ProbeRequest {}))
        .await
        .expect_err("not ready");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("ublk_drv"));
}

#[test]
fn endpoints() {
    assert_eq!(
        endpoint_path("unix:///csi/csi.sock").expect("ok"),
        PathBuf::from("/csi/csi.sock")
    );
    assert_eq!(
        endpoint_path("/run/x.sock").expect("ok"),
        PathBuf::from("/run/x.sock")
    );
    assert!(endpoint_path("unix://relative.sock").is_err());
    assert!(endpoint_path("tcp://127.0.0.1:1").is_err());
}

#[test]
fn bind_endpoint_replaces_stale_socket_but_not_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("sub/csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        drop(bind_endpoint(&endpoint).expect("first bind"));
        // The socket file is left behind, as after a crash: binding again must work.
        drop(bind_endpoint(&endpoint).expect("rebind over stale socket"));
    });
    let file = dir.path().join("plain");
    std::fs::write(&file, b"keep").expect("write");
    let err = rt.block_on(async { bind_endpoint(&format!("unix://{}", file.display())).map(drop) });
    assert!(err.is_err());
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep");
}

/// The served stack end to end over a real unix socket: readiness, a positive and a negative
/// call with its exact code crossing the wire, and a clean stop on cancellation.
#[tokio::test]
async fn serves_over_a_unix_socket_and_stops_on_cancel() {
    use enbd_proto::csi::identity_client::IdentityClient;
    use enbd_proto::csi::node_client::NodeClient;

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("csi/csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let attacher = Arc::new(FakeAttacher::new(dir.path()));
    let stop = tokio_util::sync::CancellationToken::new();
    // Bound before serving starts, so a client can connect as soon as this returns.
    let listener = bind_endpoint(&endpoint).expect("bind");
    let server = tokio::spawn(serve_on(listener, config(8), attacher, stop.clone()));

    let channel = enbd_test_harness::unix_channel(&sock)
        .await
        .expect("connect");
    let probe = IdentityClient::new(channel.clone())
        .probe(ProbeRequest {})
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let mut node = NodeClient::new(channel);
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(
        (info.node_id.as_str(), info.max_volumes_per_node),
        ("node-1", 8)
    );
    let err = node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "server-0/v".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing target path");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("target_path"), "{}", err.message());

    stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("server stops after cancel")
        .expect("join")
        .expect("serve result");
}

#[tokio::test]
async fn stage_hands_the_publish_context_token_to_the_attacher_and_never_echoes_it() {
    let f = fixture_with(0, |_| {});
    let token = "cd".repeat(32);
    let mut req = stage_req(&f, "server-0/vol-a", "vol-a");
    req.publish_context = HashMap::from([(
        enbd_proto::params::PUBLISH_ACCESS_TOKEN.to_string(),
        token.clone(),
    )]);
    // Whether the mount that follows works here does not matter: the attach came first.
    if let Err(s) = f.node.node_stage_volume(Request::new(req)).await {
        assert!(!s.message().contains(&token), "token leaked into {s:?}");
    }
    let mut no_token = stage_req(&f, "server-0/vol-b", "vol-b");
    no_token.staging_target_path = f.path("staging-b");
    let _ = f.node.node_stage_volume(Request::new(no_token)).await;
    assert_eq!(
        *f.attacher.tokens.lock().expect("tokens"),
        vec![Some(token), None]
    );
}
