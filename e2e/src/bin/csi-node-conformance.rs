//! Conformance suite for the enbd-node CSI Identity and Node services.
//!
//! Drives a running `enbd-node daemon --csi-endpoint ...` over its unix socket through every
//! Node RPC, positive and negative, checking exact gRPC codes and the resulting system state
//! (mount table, files, device flags). Volumes are created on a running enbd-server through
//! its management API. Needs root and ublk, so it runs inside the VM suite
//! (e2e/vm/scenarios/50-csi-node.sh). Prints one `PASS`/`FAIL` line per check and exits
//! non-zero if any check failed.
//!
//! With `--grant-access` it stands in for the controller's publish step against a server with
//! `--access published`: each volume it creates is granted to the node (`GrantAccess`, which
//! needs the controller's certificate, `--mgmt-tls-*`) and the token goes to NodeStageVolume in
//! `publish_context`, as ControllerPublishVolume hands it over; one volume is never granted,
//! and staging it must be refused.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use enbd_proto::csi::identity_client::IdentityClient;
use enbd_proto::csi::node_client::NodeClient;
use enbd_proto::csi::node_service_capability::{Type as CapType, rpc::Type as RpcType};
use enbd_proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use enbd_proto::csi::volume_usage::Unit;
use enbd_proto::csi::*;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{
    CreateVolumeRequest, DeleteVolumeRequest, ExpandVolumeRequest, GrantAccessRequest,
    HealthRequest, HealthResponse,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "Conformance checks for the enbd-node CSI node plugin")]
struct Cli {
    /// CSI endpoint of the node plugin.
    #[arg(
        long,
        env = "ENBD_CSI_ENDPOINT",
        default_value = "unix:///run/enbd-csi/csi.sock"
    )]
    endpoint: String,
    /// enbd-server management API.
    #[arg(long, env = "ENBD_MGMT", default_value = "http://127.0.0.1:10810")]
    mgmt: String,
    /// Node id the plugin was started with.
    #[arg(long, env = "ENBD_NODE_ID")]
    node_id: String,
    /// Scratch directory for staging and target paths.
    #[arg(long, default_value = "/tmp/csi-conformance")]
    work_dir: PathBuf,
    /// The kernel supports online ublk resize (UPDATE_SIZE): expansion must grow the device.
    /// Without it, growing past the attached size must be refused with FAILED_PRECONDITION.
    #[arg(long)]
    online_resize: bool,
    /// How long to wait for the plugin socket to answer Probe.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// The server runs `--access published`: grant every volume to --node-id and stage it
    /// with the token, and check that a volume not granted cannot be staged.
    #[arg(long)]
    grant_access: bool,
    /// CA (PEM) of the server's management certificate; with --mgmt-tls-cert and
    /// --mgmt-tls-key, management calls use mutual TLS (an https:// --mgmt URL).
    #[arg(long, requires_all = ["mgmt_tls_cert", "mgmt_tls_key"])]
    mgmt_tls_ca: Option<PathBuf>,
    /// Management client certificate (PEM; CN enbd-controller: creating volumes and granting
    /// access are the controller's).
    #[arg(long, requires = "mgmt_tls_ca")]
    mgmt_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --mgmt-tls-cert.
    #[arg(long, requires = "mgmt_tls_ca")]
    mgmt_tls_key: Option<PathBuf>,
}

impl Cli {
    /// The management client's TLS settings, `None` without --mgmt-tls-ca.
    fn mgmt_tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let (Some(ca), Some(cert), Some(key)) =
            (&self.mgmt_tls_ca, &self.mgmt_tls_cert, &self.mgmt_tls_key)
        else {
            return Ok(None);
        };
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?)),
        ))
    }
}

/// Collects check results; every check prints one line.
#[derive(Default)]
struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            println!("FAIL {name}: {detail}");
            self.failed.push(name.to_string());
        }
    }

    fn code<T>(&mut self, name: &str, result: &Result<T, Status>, want: Code) -> bool {
        let got = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let detail = match result {
            Ok(_) => "call succeeded".to_string(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        let ok = got == want;
        self.check(name, ok, format!("expected {want:?}, got {detail}"));
        ok
    }

    fn ok<T>(&mut self, name: &str, result: &Result<T, Status>) -> bool {
        self.code(name, result, Code::Ok)
    }
}

async fn connect_unix(endpoint: &str) -> anyhow::Result<Channel> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    Ok(enbd_test_harness::unix_channel(path).await?)
}

/// Waits until the plugin's socket accepts connections and Probe says ready.
async fn wait_ready(endpoint: &str, limit: Duration) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match connect_unix(endpoint).await {
            Ok(ch) => match IdentityClient::new(ch.clone()).probe(ProbeRequest {}).await {
                Ok(r) if r.get_ref().ready != Some(false) => return Ok(ch),
                Ok(_) => last = "probe: not ready".into(),
                Err(s) => last = format!("probe: {s}"),
            },
            Err(e) => last = format!("connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("plugin at {endpoint} not ready after {limit:?}: {last}")
}

/// Waits until the server's management API answers Health.
async fn wait_server(
    url: &str,
    tls: Option<ClientTlsConfig>,
    limit: Duration,
) -> anyhow::Result<(VolumeServiceClient<Channel>, HealthResponse)> {
    let mut endpoint = Endpoint::from_shared(url.to_string())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let deadline = Instant::now() + limit;
    loop {
        let attempt = async {
            let mut c = VolumeServiceClient::new(endpoint.connect().await?);
            let h = c.health(HealthRequest {}).await?.into_inner();
            anyhow::Ok((c, h))
        };
        match attempt.await {
            Ok(ok) => return Ok(ok),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("enbd-server at {url}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn mount_cap(fs_type: &str, mode: Mode, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// One line of /proc/self/mountinfo, the fields the checks need.
#[derive(Debug, Clone)]
struct Mount {
    mount_point: String,
    options: String,
    fs_type: String,
    source: String,
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                mount_point: l.get(4)?.replace("\\040", " "),
                options: l.get(5)?.to_string(),
                fs_type: r.first()?.to_string(),
                source: r.get(1)?.to_string(),
            })
        })
        .collect()
}

fn mount_at(path: &Path) -> Option<Mount> {
    let p = path.to_string_lossy();
    mounts().into_iter().rev().find(|m| m.mount_point == p)
}

fn is_ro(m: &Mount) -> bool {
    m.options.split(',').any(|o| o == "ro")
}

/// The device number of the block device node at `path`, if it is one.
fn block_device_number(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev())))
}

/// Writes `data` at `offset` of a file or device and waits until it is stable.
fn write_synced_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Reads `len` bytes at `offset` of a file or device.
fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn label_of(dev: &Path, fs: &str) -> String {
    // ext4: s_volume_name at superblock (1024) + 120, 16 bytes; xfs: sb_fname at 108, 12 bytes.
    let (off, len) = if fs == "xfs" {
        (108, 12)
    } else {
        (1024 + 120, 16)
    };
    read_at(dev, off, len)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_else(|e| format!("<unreadable: {e}>"))
}

struct Suite {
    cli: Cli,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
    mgmt: VolumeServiceClient<Channel>,
    server_id: String,
    data_address: String,
    /// Access tokens of the volumes granted to the node (--grant-access), by volume name.
    tokens: HashMap<String, String>,
    r: Report,
}

impl Suite {
    fn dir(&self, name: &str) -> String {
        self.cli.work_dir.join(name).to_string_lossy().into_owned()
    }

    fn vid(&self, name: &str) -> String {
        format!("{}/{name}", self.server_id)
    }

    fn context(&self, export: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut ctx = HashMap::from([
            ("enbd.io/server".to_string(), self.data_address.clone()),
            ("enbd.io/export".to_string(), export.to_string()),
            ("channels".to_string(), "2".to_string()),
        ]);
        for (k, v) in extra {
            ctx.insert(k.to_string(), v.to_string());
        }
        ctx
    }

    async fn create_volume(&mut self, name: &str, size: u64) -> anyhow::Result<()> {
        // Leftovers from an earlier run would not be blank.
        self.mgmt
            .delete_volume(DeleteVolumeRequest {
                name: name.into(),
                force: true,
            })
            .await?;
        self.mgmt
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                source: None,
                labels: Default::default(),
            })
            .await
            .with_context(|| format!("create volume {name}"))?;
        if self.cli.grant_access {
            self.grant(name).await?;
        }
        Ok(())
    }

    /// What ControllerPublishVolume does on the server: a grant of `name` to the node, whose
    /// token NodeStageVolume gets in `publish_context`.
    async fn grant(&mut self, name: &str) -> anyhow::Result<()> {
        let token = self
            .mgmt
            .grant_access(GrantAccessRequest {
                volume: name.into(),
                node_id: self.cli.node_id.clone(),
                token: String::new(),
            })
            .await
            .with_context(|| format!("grant {name} to {}", self.cli.node_id))?
            .into_inner()
            .token;
        self.tokens.insert(name.to_string(), token);
        Ok(())
    }

    fn stage_req(
        &self,
        name: &str,
        staging: &str,
        cap: VolumeCapability,
        ctx: HashMap<String, String>,
    ) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: self.vid(name),
            staging_target_path: self.dir(staging),
            volume_capability: Some(cap),
            volume_context: ctx,
            // Never used by the node; present so a leak into messages or logs would show.
            secrets: HashMap::from([(
                "conformance-secret".to_string(),
                "do-not-log-me".to_string(),
            )]),
            publish_context: self
                .tokens
                .get(name)
                .map(|t| {
                    HashMap::from([(
                        enbd_proto::params::PUBLISH_ACCESS_TOKEN.to_string(),
                        t.clone(),
                    )])
                })
                .unwrap_or_default(),
        }
    }

    fn publish_req(
        &self,
        name: &str,
        staging: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
    ) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: self.vid(name),
            staging_target_path: self.dir(staging),
            target_path: self.dir(target),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }
    }

    fn unpublish_req(&self, name: &str, target: &str) -> NodeUnpublishVolumeRequest {
        NodeUnpublishVolumeRequest {
            volume_id: self.vid(name),
            target_path: self.dir(target),
        }
    }

    fn unstage_req(&self, name: &str, staging: &str) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest {
            volume_id: self.vid(name),
            staging_target_path: self.dir(staging),
        }
    }

    async fn identity(&mut self) {
        let info = self.identity.get_plugin_info(GetPluginInfoRequest {}).await;
        if self.r.ok("identity/GetPluginInfo", &info)
            && let Ok(info) = info
        {
            let info = info.into_inner();
            self.r.check(
                "identity/name",
                info.name == "csi.enbd.io",
                format!("name {:?}", info.name),
            );
            self.r.check(
                "identity/version",
                !info.vendor_version.is_empty(),
                "empty vendor_version",
            );
        }
        let caps = self
            .identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await;
        self.r.ok("identity/GetPluginCapabilities", &caps);
        let probe = self.identity.probe(ProbeRequest {}).await;
        let ready = probe.as_ref().map(|p| p.get_ref().ready).unwrap_or(None);
        self.r.check(
            "identity/Probe ready",
            ready == Some(true),
            format!("{probe:?}"),
        );
    }

    async fn node_info(&mut self) {
        let caps = self
            .node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await;
        if self.r.ok("node/GetCapabilities", &caps)
            && let Ok(caps) = caps
        {
            let have: Vec<i32> = caps
                .into_inner()
                .capabilities
                .iter()
                .filter_map(|c| c.r#type.map(|CapType::Rpc(rpc)| rpc.r#type))
                .collect();
            for want in [
                RpcType::StageUnstageVolume,
                RpcType::ExpandVolume,
                RpcType::GetVolumeStats,
                RpcType::VolumeCondition,
            ] {
                self.r.check(
                    &format!("node/capability {}", want.as_str_name()),
                    have.contains(&(want as i32)),
                    format!("{have:?}"),
                );
            }
        }
        let info = self.node.node_get_info(NodeGetInfoRequest {}).await;
        if self.r.ok("node/GetInfo", &info)
            && let Ok(info) = info
        {
            let info = info.into_inner();
            self.r.check(
                "node/GetInfo node_id",
                info.node_id == self.cli.node_id,
                format!("{:?}", info.node_id),
            );
            // Volumes are reachable from every node: no topology is reported.
            self.r.check(
                "node/GetInfo no topology",
                info.accessible_topology.is_none(),
                format!("{:?}", info.accessible_topology),
            );
            self.r.check(
                "node/GetInfo max_volumes",
                info.max_volumes_per_node >= 0,
                info.max_volumes_per_node,
            );
        }
    }

    async fn stage_arguments(&mut self) {
        let good = self.stage_req(
            "fs-ext4",
            "stage-ext4",
            mount_cap("ext4", Mode::SingleNodeWriter, &[]),
            self.context("fs-ext4", &[]),
        );
        let mut cases: Vec<(&str, NodeStageVolumeRequest, Code)> = vec![
            (
                "stage/missing volume_id",
                NodeStageVolumeRequest {
                    volume_id: String::new(),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/malformed volume_id",
                NodeStageVolumeRequest {
                    volume_id: "no-separator".into(),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/missing staging path",
                NodeStageVolumeRequest {
                    staging_target_path: String::new(),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/relative staging path",
                NodeStageVolumeRequest {
                    staging_target_path: "stage".into(),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/dot-dot staging path",
                NodeStageVolumeRequest {
                    staging_target_path: format!("{}/../escape", self.dir("x")),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/missing capability",
                NodeStageVolumeRequest {
                    volume_capability: None,
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/unsupported fs_type",
                NodeStageVolumeRequest {
                    volume_capability: Some(mount_cap("vfat", Mode::SingleNodeWriter, &[])),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/multi-node writer filesystem",
                NodeStageVolumeRequest {
                    volume_capability: Some(mount_cap("ext4", Mode::MultiNodeMultiWriter, &[])),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/refused mount option",
                NodeStageVolumeRequest {
                    volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter, &["bind"])),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/missing context",
                NodeStageVolumeRequest {
                    volume_context: HashMap::new(),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/malformed context",
                NodeStageVolumeRequest {
                    volume_context: self.context("fs-ext4", &[("channels", "0")]),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "stage/unknown context key",
                NodeStageVolumeRequest {
                    volume_context: self.context("fs-ext4", &[("colour", "blue")]),
                    ..good.clone()
                },
                Code::InvalidArgument,
            ),
        ];
        let unknown = self.stage_req(
            "no-such-volume",
            "stage-unknown",
            mount_cap("ext4", Mode::SingleNodeWriter, &[]),
            self.context("no-such-volume", &[]),
        );
        cases.push(("stage/unknown volume", unknown, Code::NotFound));
        for (name, req, want) in cases {
            let res = self.node.node_stage_volume(req).await;
            if let Err(s) = &res {
                self.r.check(
                    &format!("{name} (no secret in message)"),
                    !s.message().contains("do-not-log-me"),
                    s.message(),
                );
            }
            self.r.code(name, &res, want);
        }
        self.r.check(
            "stage/refusals mounted nothing",
            mount_at(Path::new(&self.dir("stage-ext4"))).is_none(),
            "staging path is mounted",
        );
    }

    async fn filesystem(&mut self) -> anyhow::Result<()> {
        self.create_volume("fs-ext4", 64 * MIB).await?;
        let cap = mount_cap("ext4", Mode::SingleNodeWriter, &["noatime"]);
        let ctx = self.context("fs-ext4", &[("mkfsOptions", "-L enbdconf")]);
        let stage = self.stage_req("fs-ext4", "stage-ext4", cap.clone(), ctx.clone());
        let staging = PathBuf::from(self.dir("stage-ext4"));

        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("fs/stage ext4", &res);
        let m = mount_at(&staging);
        self.r.check(
            "fs/staging mounted as ext4",
            m.as_ref().is_some_and(|m| m.fs_type == "ext4"),
            format!("{m:?}"),
        );
        let dev = PathBuf::from(m.as_ref().map(|m| m.source.clone()).unwrap_or_default());
        self.r.check(
            "fs/mkfsOptions applied (label)",
            label_of(&dev, "ext4") == "enbdconf",
            label_of(&dev, "ext4"),
        );
        self.r.check(
            "fs/mount flags applied (noatime)",
            m.as_ref().is_some_and(|m| m.options.contains("noatime")),
            format!("{m:?}"),
        );

        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("fs/stage again (idempotent)", &res);
        let res = self
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
                ..stage.clone()
            })
            .await;
        self.r
            .code("fs/stage again as block", &res, Code::AlreadyExists);
        let res = self
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_capability: Some(mount_cap("xfs", Mode::SingleNodeWriter, &[])),
                ..stage.clone()
            })
            .await;
        self.r
            .code("fs/stage again as xfs", &res, Code::AlreadyExists);

        // Publish: arguments first.
        let pubreq = self.publish_req(
            "fs-ext4",
            "stage-ext4",
            "target-ext4-rw",
            cap.clone(),
            false,
        );
        let cases: Vec<(&str, NodePublishVolumeRequest, Code)> = vec![
            (
                "publish/missing volume_id",
                NodePublishVolumeRequest {
                    volume_id: String::new(),
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/missing target",
                NodePublishVolumeRequest {
                    target_path: String::new(),
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/missing staging",
                NodePublishVolumeRequest {
                    staging_target_path: String::new(),
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/missing capability",
                NodePublishVolumeRequest {
                    volume_capability: None,
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/dot-dot target",
                NodePublishVolumeRequest {
                    target_path: format!("{}/../t", self.dir("a")),
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/block capability on filesystem stage",
                NodePublishVolumeRequest {
                    volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
                    ..pubreq.clone()
                },
                Code::InvalidArgument,
            ),
            (
                "publish/wrong staging path",
                NodePublishVolumeRequest {
                    staging_target_path: self.dir("stage-nothing"),
                    ..pubreq.clone()
                },
                Code::FailedPrecondition,
            ),
            (
                "publish/volume not staged",
                self.publish_req(
                    "fs-other",
                    "stage-other",
                    "target-other",
                    cap.clone(),
                    false,
                ),
                Code::FailedPrecondition,
            ),
        ];
        for (name, req, want) in cases {
            let res = self.node.node_publish_volume(req).await;
            self.r.code(name, &res, want);
        }

        let rw = PathBuf::from(self.dir("target-ext4-rw"));
        let ro = PathBuf::from(self.dir("target-ext4-ro"));
        let res = self.node.node_publish_volume(pubreq.clone()).await;
        self.r.ok("fs/publish rw", &res);
        let written = std::fs::write(rw.join("hello.txt"), b"enbd conformance")
            .and_then(|_| std::fs::read(rw.join("hello.txt")));
        self.r.check(
            "fs/write and read through rw target",
            written.as_deref().ok() == Some(b"enbd conformance".as_slice()),
            format!("{written:?}"),
        );
        let res = self.node.node_publish_volume(pubreq.clone()).await;
        self.r.ok("fs/publish again (idempotent)", &res);
        let res = self
            .node
            .node_publish_volume(NodePublishVolumeRequest {
                readonly: true,
                ..pubreq.clone()
            })
            .await;
        self.r
            .code("fs/publish again read-only", &res, Code::AlreadyExists);

        let ro_req = self.publish_req("fs-ext4", "stage-ext4", "target-ext4-ro", cap.clone(), true);
        let res = self.node.node_publish_volume(ro_req).await;
        self.r.ok("fs/publish read-only second target", &res);
        let m = mount_at(&ro);
        self.r.check(
            "fs/read-only target mounted ro",
            m.as_ref().is_some_and(is_ro),
            format!("{m:?}"),
        );
        let content = std::fs::read(ro.join("hello.txt"));
        self.r.check(
            "fs/read-only target sees the data",
            content.as_deref().ok() == Some(b"enbd conformance".as_slice()),
            format!("{content:?}"),
        );
        let w = std::fs::write(ro.join("nope.txt"), b"x");
        self.r.check(
            "fs/read-only target refuses writes (EROFS)",
            w.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EROFS),
            format!("{w:?}"),
        );

        // Stats.
        let stats = self
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: self.vid("fs-ext4"),
                volume_path: rw.to_string_lossy().into(),
                ..Default::default()
            })
            .await;
        if self.r.ok("fs/stats", &stats)
            && let Ok(stats) = stats
        {
            let s = stats.into_inner();
            let bytes = s.usage.iter().find(|u| u.unit == Unit::Bytes as i32);
            let inodes = s.usage.iter().find(|u| u.unit == Unit::Inodes as i32);
            self.r.check(
                "fs/stats bytes",
                bytes.is_some_and(|b| {
                    b.total > 0 && b.total <= (64 * MIB) as i64 && b.used > 0 && b.available > 0
                }),
                format!("{bytes:?}"),
            );
            self.r.check(
                "fs/stats inodes",
                inodes.is_some_and(|i| i.total > 0 && i.used > 0),
                format!("{inodes:?}"),
            );
            let cond = s.volume_condition;
            self.r.check(
                "fs/stats condition normal",
                cond.as_ref().is_some_and(|c| !c.abnormal),
                format!("{cond:?}"),
            );
        }
        let stats_cases = [
            (
                "stats/missing volume_id",
                NodeGetVolumeStatsRequest {
                    volume_id: String::new(),
                    volume_path: rw.to_string_lossy().into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            (
                "stats/missing path",
                NodeGetVolumeStatsRequest {
                    volume_id: self.vid("fs-ext4"),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            (
                "stats/unknown volume",
                NodeGetVolumeStatsRequest {
                    volume_id: self.vid("no-such-volume"),
                    volume_path: rw.to_string_lossy().into(),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                "stats/path does not exist",
                NodeGetVolumeStatsRequest {
                    volume_id: self.vid("fs-ext4"),
                    volume_path: self.dir("no-such-dir"),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                "stats/volume id not in our format",
                NodeGetVolumeStatsRequest {
                    volume_id: "some-volume-id".into(),
                    volume_path: rw.to_string_lossy().into(),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                "stats/relative path",
                NodeGetVolumeStatsRequest {
                    volume_id: self.vid("fs-ext4"),
                    volume_path: "some/path".into(),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                "stats/path is not the volume",
                NodeGetVolumeStatsRequest {
                    volume_id: self.vid("fs-ext4"),
                    volume_path: "/proc".into(),
                    ..Default::default()
                },
                Code::NotFound,
            ),
        ];
        for (name, req, want) in stats_cases {
            let res = self.node.node_get_volume_stats(req).await;
            self.r.code(name, &res, want);
        }

        self.expansion(&rw).await?;

        // Unstage while published is refused; unpublish is idempotent and cleans up.
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-ext4", "stage-ext4"))
            .await;
        self.r
            .code("fs/unstage while published", &res, Code::FailedPrecondition);
        self.r.check(
            "fs/refused unstage left the mount",
            mount_at(&staging).is_some(),
            "staging unmounted",
        );
        for (name, target) in [("rw", "target-ext4-rw"), ("ro", "target-ext4-ro")] {
            let res = self
                .node
                .node_unpublish_volume(self.unpublish_req("fs-ext4", target))
                .await;
            self.r.ok(&format!("fs/unpublish {name}"), &res);
            let res = self
                .node
                .node_unpublish_volume(self.unpublish_req("fs-ext4", target))
                .await;
            self.r
                .ok(&format!("fs/unpublish {name} again (idempotent)"), &res);
            let p = PathBuf::from(self.dir(target));
            self.r.check(
                &format!("fs/unpublish {name} removed the target"),
                !p.exists() && mount_at(&p).is_none(),
                p.display(),
            );
        }
        for req in [
            NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: self.dir("t"),
            },
            NodeUnpublishVolumeRequest {
                volume_id: self.vid("fs-ext4"),
                target_path: String::new(),
            },
        ] {
            let res = self.node.node_unpublish_volume(req).await;
            self.r
                .code("unpublish/missing argument", &res, Code::InvalidArgument);
        }

        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-ext4", "stage-ext4"))
            .await;
        self.r.ok("fs/unstage", &res);
        self.r.check(
            "fs/unstage unmounted staging",
            mount_at(&staging).is_none(),
            "still mounted",
        );
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-ext4", "stage-ext4"))
            .await;
        self.r.ok("fs/unstage again (idempotent)", &res);
        let stats = self
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: self.vid("fs-ext4"),
                volume_path: staging.to_string_lossy().into(),
                ..Default::default()
            })
            .await;
        self.r.code(
            "fs/detached after unstage (stats NotFound)",
            &stats,
            Code::NotFound,
        );
        for req in [
            NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: self.dir("s"),
            },
            NodeUnstageVolumeRequest {
                volume_id: self.vid("fs-ext4"),
                staging_target_path: String::new(),
            },
        ] {
            let res = self.node.node_unstage_volume(req).await;
            self.r
                .code("unstage/missing argument", &res, Code::InvalidArgument);
        }

        // Stage again: the filesystem is reused, never reformatted; then read-only access.
        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("fs/restage existing filesystem", &res);
        let res = self.node.node_publish_volume(pubreq.clone()).await;
        self.r.ok("fs/republish", &res);
        let content = std::fs::read(rw.join("hello.txt"));
        self.r.check(
            "fs/data survived unstage+restage (no reformat)",
            content.as_deref().ok() == Some(b"enbd conformance".as_slice()),
            format!("{content:?}"),
        );
        let res = self
            .node
            .node_unpublish_volume(self.unpublish_req("fs-ext4", "target-ext4-rw"))
            .await;
        self.r.ok("fs/unpublish after restage", &res);
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-ext4", "stage-ext4"))
            .await;
        self.r.ok("fs/unstage after restage", &res);

        let ro_stage = self.stage_req(
            "fs-ext4",
            "stage-ext4",
            mount_cap("", Mode::SingleNodeReaderOnly, &[]),
            ctx,
        );
        let res = self.node.node_stage_volume(ro_stage).await;
        self.r.ok("fs/stage reader-only", &res);
        let m = mount_at(&staging);
        self.r.check(
            "fs/reader-only stage mounted ro",
            m.as_ref().is_some_and(is_ro),
            format!("{m:?}"),
        );
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-ext4", "stage-ext4"))
            .await;
        self.r.ok("fs/unstage reader-only", &res);
        Ok(())
    }

    async fn expansion(&mut self, target: &Path) -> anyhow::Result<()> {
        let expand = |s: &Self, path: &Path, required: i64, limit: i64| NodeExpandVolumeRequest {
            volume_id: s.vid("fs-ext4"),
            volume_path: path.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            ..Default::default()
        };
        let cases = [
            (
                "expand/missing volume_id",
                NodeExpandVolumeRequest {
                    volume_id: String::new(),
                    ..expand(self, target, 0, 0)
                },
                Code::InvalidArgument,
            ),
            (
                "expand/missing path",
                NodeExpandVolumeRequest {
                    volume_path: String::new(),
                    ..expand(self, target, 0, 0)
                },
                Code::InvalidArgument,
            ),
            (
                "expand/unknown volume",
                NodeExpandVolumeRequest {
                    volume_id: self.vid("no-such-volume"),
                    ..expand(self, target, 0, 0)
                },
                Code::NotFound,
            ),
            (
                "expand/path does not exist",
                expand(self, Path::new(&self.dir("no-such-dir")), 0, 0),
                Code::NotFound,
            ),
            (
                "expand/required above limit",
                expand(self, target, (128 * MIB) as i64, (96 * MIB) as i64),
                Code::OutOfRange,
            ),
        ];
        for (name, req, want) in cases {
            let res = self.node.node_expand_volume(req).await;
            self.r.code(name, &res, want);
        }
        // Growing the filesystem to the device it already has works on every kernel.
        let res = self
            .node
            .node_expand_volume(expand(self, target, (64 * MIB) as i64, 0))
            .await;
        if self.r.ok("expand/to current size", &res)
            && let Ok(r) = res
        {
            let cap = r.into_inner().capacity_bytes;
            self.r.check(
                "expand/to current size capacity",
                cap == (64 * MIB) as i64,
                cap,
            );
        }
        // Grow the volume on the server, then on the node.
        self.mgmt
            .expand_volume(ExpandVolumeRequest {
                name: "fs-ext4".into(),
                size_bytes: 96 * MIB,
            })
            .await
            .context("server expand")?;
        let res = self
            .node
            .node_expand_volume(expand(self, target, (96 * MIB) as i64, 0))
            .await;
        if self.cli.online_resize {
            if self.r.ok("expand/online grow to 96 MiB", &res)
                && let Ok(r) = res
            {
                let cap = r.into_inner().capacity_bytes;
                self.r
                    .check("expand/capacity reported", cap >= (96 * MIB) as i64, cap);
                let total = nix_statvfs_total(target);
                self.r.check(
                    "expand/filesystem grew past 64 MiB",
                    total > 64 * MIB,
                    total,
                );
            }
            let res = self
                .node
                .node_expand_volume(expand(self, target, (1 << 30) as i64, 0))
                .await;
            self.r
                .code("expand/beyond the server's size", &res, Code::OutOfRange);
        } else {
            self.r.code(
                "expand/refused without kernel online resize",
                &res,
                Code::FailedPrecondition,
            );
        }
        Ok(())
    }

    async fn block(&mut self) -> anyhow::Result<()> {
        self.create_volume("blk", 32 * MIB).await?;
        let cap = block_cap(Mode::SingleNodeWriter);
        let stage = self.stage_req("blk", "stage-blk", cap.clone(), self.context("blk", &[]));
        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("block/stage", &res);
        let staged = PathBuf::from(self.dir("stage-blk")).join("device");
        let is_dev = std::fs::metadata(&staged)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        self.r
            .check("block/staged device node", is_dev, staged.display());
        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("block/stage again (idempotent)", &res);
        let res = self
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_capability: Some(mount_cap("", Mode::SingleNodeWriter, &[])),
                ..stage.clone()
            })
            .await;
        self.r
            .code("block/stage again as filesystem", &res, Code::AlreadyExists);
        let probe = read_at(&staged, 0, 4096).map(|b| b.iter().all(|x| *x == 0));
        self.r.check(
            "block/stage did not format",
            probe.as_ref().ok() == Some(&true),
            format!("{probe:?}"),
        );

        let rw_target = PathBuf::from(self.dir("pub-blk/rw"));
        let res = self
            .node
            .node_publish_volume(self.publish_req(
                "blk",
                "stage-blk",
                "pub-blk/rw",
                mount_cap("", Mode::SingleNodeWriter, &[]),
                false,
            ))
            .await;
        self.r.code(
            "block/publish with mount capability",
            &res,
            Code::InvalidArgument,
        );
        let rw_req = self.publish_req("blk", "stage-blk", "pub-blk/rw", cap.clone(), false);
        let res = self.node.node_publish_volume(rw_req.clone()).await;
        self.r.ok("block/publish rw", &res);
        let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        let io = write_synced_at(&rw_target, 4 * MIB, &pattern)
            .and_then(|_| read_at(&rw_target, 4 * MIB, pattern.len()));
        self.r.check(
            "block/write and read through target",
            io.as_ref().ok() == Some(&pattern),
            "data mismatch or IO error",
        );
        let res = self.node.node_publish_volume(rw_req.clone()).await;
        self.r.ok("block/publish again (idempotent)", &res);
        // Kubernetes publishes one volume read-write to one pod and read-only to another
        // on the same node: both work, each with its own access.
        let ro_req = self.publish_req("blk", "stage-blk", "pub-blk/ro", cap.clone(), true);
        let res = self.node.node_publish_volume(ro_req.clone()).await;
        self.r.ok("block/read-only publish beside a rw one", &res);
        let ro_target = PathBuf::from(self.dir("pub-blk/ro"));
        let w = OpenOptions::new()
            .write(true)
            .open(&ro_target)
            .and_then(|mut f| f.write_all(b"x"));
        self.r.check(
            "block/read-only target beside a rw one refuses writes",
            w.is_err(),
            "write succeeded",
        );
        // New data at another offset, written after the read-only publish, so the read
        // below cannot be satisfied by anything read before it.
        let fresh: Vec<u8> = pattern.iter().rev().copied().collect();
        let w = write_synced_at(&rw_target, 8 * MIB, &fresh);
        self.r.check(
            "block/rw target beside a read-only one still writes",
            w.is_ok(),
            format!("{w:?}"),
        );
        let data = read_at(&ro_target, 8 * MIB, fresh.len());
        self.r.check(
            "block/read-only target beside a rw one reads the rw target's data",
            data.as_ref().ok() == Some(&fresh),
            "mismatch or IO error",
        );
        let res = self.node.node_publish_volume(ro_req).await;
        self.r
            .ok("block/read-only publish again (idempotent)", &res);
        let ro_loop = block_device_number(&ro_target);
        let res = self
            .node
            .node_unpublish_volume(self.unpublish_req("blk", "pub-blk/ro"))
            .await;
        self.r.ok("block/unpublish read-only beside a rw one", &res);
        self.r.check(
            "block/unpublish detached the read-only target's loop device",
            ro_loop.is_some_and(|(major, minor)| {
                !Path::new(&format!("/sys/dev/block/{major}:{minor}/loop")).exists()
            }),
            format!("{ro_loop:?}"),
        );

        let stats = self
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: self.vid("blk"),
                volume_path: rw_target.to_string_lossy().into(),
                ..Default::default()
            })
            .await;
        if self.r.ok("block/stats", &stats)
            && let Ok(s) = stats
        {
            let s = s.into_inner();
            let total = s
                .usage
                .iter()
                .find(|u| u.unit == Unit::Bytes as i32)
                .map(|u| u.total);
            self.r.check(
                "block/stats total bytes",
                total == Some((32 * MIB) as i64),
                format!("{:?}", s.usage),
            );
            self.r.check(
                "block/stats condition normal",
                s.volume_condition.is_some_and(|c| !c.abnormal),
                "abnormal",
            );
        }
        let res = self
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: self.vid("blk"),
                volume_path: rw_target.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: (32 * MIB) as i64,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await;
        self.r.ok("block/expand to current size", &res);

        let res = self
            .node
            .node_unpublish_volume(self.unpublish_req("blk", "pub-blk/rw"))
            .await;
        self.r.ok("block/unpublish rw", &res);
        self.r.check(
            "block/unpublish removed the target file",
            !rw_target.exists(),
            rw_target.display(),
        );

        let res = self
            .node
            .node_publish_volume(self.publish_req(
                "blk",
                "stage-blk",
                "pub-blk/ro",
                cap.clone(),
                true,
            ))
            .await;
        self.r.ok("block/publish read-only", &res);
        let w = OpenOptions::new()
            .write(true)
            .open(&ro_target)
            .and_then(|mut f| f.write_all(b"x"));
        self.r.check(
            "block/read-only target refuses writes",
            w.is_err(),
            "write succeeded",
        );
        let data = read_at(&ro_target, 4 * MIB, pattern.len());
        self.r.check(
            "block/read-only target reads the data",
            data.as_ref().ok() == Some(&pattern),
            "mismatch",
        );
        let res = self
            .node
            .node_unpublish_volume(self.unpublish_req("blk", "pub-blk/ro"))
            .await;
        self.r.ok("block/unpublish read-only", &res);
        let w = OpenOptions::new().write(true).open(&staged).map(drop);
        self.r.check(
            "block/device writable again after read-only unpublish",
            w.is_ok(),
            format!("{w:?}"),
        );

        let res = self
            .node
            .node_unstage_volume(self.unstage_req("blk", "stage-blk"))
            .await;
        self.r.ok("block/unstage", &res);
        self.r.check(
            "block/unstage removed the device file",
            !staged.exists(),
            staged.display(),
        );
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("blk", "stage-blk"))
            .await;
        self.r.ok("block/unstage again (idempotent)", &res);
        Ok(())
    }

    async fn xfs(&mut self) -> anyhow::Result<()> {
        // mkfs.xfs refuses filesystems smaller than 300 MiB.
        self.create_volume("fs-xfs", 320 * MIB).await?;
        let stage = self.stage_req(
            "fs-xfs",
            "stage-xfs",
            mount_cap("xfs", Mode::SingleNodeWriter, &[]),
            self.context("fs-xfs", &[("mkfsOptions", "-K -L enbdxfs")]),
        );
        let res = self.node.node_stage_volume(stage.clone()).await;
        self.r.ok("xfs/stage", &res);
        let m = mount_at(Path::new(&self.dir("stage-xfs")));
        self.r.check(
            "xfs/staging mounted as xfs",
            m.as_ref().is_some_and(|m| m.fs_type == "xfs"),
            format!("{m:?}"),
        );
        let dev = PathBuf::from(m.map(|m| m.source).unwrap_or_default());
        self.r.check(
            "xfs/mkfsOptions applied (label)",
            label_of(&dev, "xfs") == "enbdxfs",
            label_of(&dev, "xfs"),
        );
        let res = self
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter, &[])),
                ..stage
            })
            .await;
        self.r
            .code("xfs/stage again as ext4", &res, Code::AlreadyExists);
        let res = self
            .node
            .node_unstage_volume(self.unstage_req("fs-xfs", "stage-xfs"))
            .await;
        self.r.ok("xfs/unstage", &res);
        Ok(())
    }

    /// SINGLE_NODE_SINGLE_WRITER: one target path at a time, and a refused second publish
    /// leaves nothing behind (a leftover mount there broke every later test's set-up).
    async fn single_writer(&mut self) -> anyhow::Result<()> {
        self.create_volume("fs-snsw", 64 * MIB).await?;
        for (kind, cap) in [
            ("fs", mount_cap("ext4", Mode::SingleNodeSingleWriter, &[])),
            ("block", block_cap(Mode::SingleNodeSingleWriter)),
        ] {
            let staging = format!("stage-snsw-{kind}");
            let (first, second) = (format!("snsw-{kind}-1"), format!("snsw-{kind}-2"));
            let ctx = self.context("fs-snsw", &[]);
            let res = self
                .node
                .node_stage_volume(self.stage_req("fs-snsw", &staging, cap.clone(), ctx))
                .await;
            self.r.ok(&format!("snsw/{kind} stage"), &res);
            let req = self.publish_req("fs-snsw", &staging, &first, cap.clone(), false);
            let res = self.node.node_publish_volume(req.clone()).await;
            self.r
                .ok(&format!("snsw/{kind} publish first target"), &res);
            let res = self.node.node_publish_volume(req.clone()).await;
            self.r
                .ok(&format!("snsw/{kind} publish first target again"), &res);
            let res = self
                .node
                .node_publish_volume(NodePublishVolumeRequest {
                    target_path: self.dir(&second),
                    ..req
                })
                .await;
            self.r.code(
                &format!("snsw/{kind} publish second target"),
                &res,
                Code::FailedPrecondition,
            );
            let second_path = PathBuf::from(self.dir(&second));
            self.r.check(
                &format!("snsw/{kind} refused publish left nothing"),
                mount_at(&second_path).is_none() && !second_path.exists(),
                format!(
                    "mount {:?}, exists {}",
                    mount_at(&second_path),
                    second_path.exists()
                ),
            );
            let res = self
                .node
                .node_unpublish_volume(self.unpublish_req("fs-snsw", &first))
                .await;
            self.r.ok(&format!("snsw/{kind} unpublish"), &res);
            let res = self
                .node
                .node_unstage_volume(self.unstage_req("fs-snsw", &staging))
                .await;
            self.r.ok(&format!("snsw/{kind} unstage"), &res);
        }
        Ok(())
    }

    /// A volume that exists but was never granted to this node: the server refuses to open
    /// it, so staging is NOT_FOUND (the server says the same for a volume that does not
    /// exist) and leaves nothing mounted.
    async fn not_published(&mut self) -> anyhow::Result<()> {
        self.cli.grant_access = false;
        let created = self.create_volume("fs-unpublished", 32 * MIB).await;
        self.cli.grant_access = true;
        created?;
        let stage = self.stage_req(
            "fs-unpublished",
            "stage-unpublished",
            mount_cap("ext4", Mode::SingleNodeWriter, &[]),
            self.context("fs-unpublished", &[]),
        );
        let res = self.node.node_stage_volume(stage).await;
        if self.r.code(
            "access/stage of a volume not published",
            &res,
            Code::NotFound,
        ) && let Err(s) = &res
        {
            self.r.check(
                "access/refusal names the server's refusal",
                s.message().contains("refused export"),
                s.message(),
            );
        }
        self.r.check(
            "access/refused stage mounted nothing",
            mount_at(Path::new(&self.dir("stage-unpublished"))).is_none(),
            "staging path is mounted",
        );
        Ok(())
    }
}

fn nix_statvfs_total(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid C string and a writable statvfs buffer.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: statvfs succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    let [blocks, frsize] = [st.f_blocks, st.f_frsize].map(u64::from);
    blocks * frsize
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.work_dir)
        .with_context(|| format!("create {}", cli.work_dir.display()))?;
    let channel = wait_ready(&cli.endpoint, Duration::from_secs(cli.wait_secs)).await?;
    let (mgmt, health) = wait_server(
        &cli.mgmt,
        cli.mgmt_tls()?,
        Duration::from_secs(cli.wait_secs),
    )
    .await?;
    println!(
        "server {} at {} (mgmt {})",
        health.server_id, health.data_address, cli.mgmt
    );
    let mut suite = Suite {
        node: NodeClient::new(channel.clone()),
        identity: IdentityClient::new(channel),
        mgmt,
        server_id: health.server_id,
        data_address: health.data_address,
        cli,
        tokens: HashMap::new(),
        r: Report::default(),
    };
    suite.identity().await;
    suite.node_info().await;
    suite.stage_arguments().await;
    let mut fatal = Vec::new();
    if let Err(e) = suite.filesystem().await {
        fatal.push(format!("filesystem: {e:#}"));
    }
    if let Err(e) = suite.block().await {
        fatal.push(format!("block: {e:#}"));
    }
    if let Err(e) = suite.xfs().await {
        fatal.push(format!("xfs: {e:#}"));
    }
    if let Err(e) = suite.single_writer().await {
        fatal.push(format!("single writer: {e:#}"));
    }
    if suite.cli.grant_access
        && let Err(e) = suite.not_published().await
    {
        fatal.push(format!("not published: {e:#}"));
    }
    for f in &fatal {
        println!("FAIL setup {f}");
    }
    let failed = suite.r.failed.len() + fatal.len();
    println!(
        "csi-node-conformance: {} passed, {failed} failed",
        suite.r.passed
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
