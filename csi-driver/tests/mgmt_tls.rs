//! The controller against an enbd-server with `--mgmt-tls require`: real binaries on
//! 127.0.0.1, certificates made in the test. With the controller certificate every call
//! works; with a node certificate the server refuses to create volumes for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../enbd-server/tests/common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use enbd_proto::csi::controller_client::ControllerClient;
use enbd_proto::csi::identity_client::IdentityClient;
use enbd_proto::csi::volume_capability::access_mode::Mode;
use enbd_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use enbd_proto::csi::*;
use hyper_util::rt::TokioIo;
use pki::{Ca, write};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint, Uri};

fn enbd_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENBD_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_csi-driver")).with_file_name("enbd-server");
    assert!(
        bin.exists(),
        "build enbd-server first (cargo build -p enbd-server): {}",
        bin.display()
    );
    bin
}

struct Server {
    child: std::process::Child,
    mgmt_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, ca: &Ca) -> Server {
    let pair = ca.server("enbd-server");
    let cert = write(dir, "server.crt", &pair.cert);
    let key = write(dir, "server.key", &pair.key);
    let client_ca = write(dir, "ca.crt", &ca.pem());
    let (child, ready) = enbd_server::ready::spawn_until_ready(
        std::process::Command::new(enbd_server_bin())
            .args(["--listen=127.0.0.1:0", "--mgmt-listen=127.0.0.1:0"])
            .args(["--metrics-listen=127.0.0.1:0", "--server-id=s0"])
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg("--mgmt-tls=require")
            .arg(format!("--tls-cert={}", cert.display()))
            .arg(format!("--tls-key={}", key.display()))
            .arg(format!("--mgmt-client-ca={}", client_ca.display()))
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Server {
        child,
        mgmt_port: ready.mgmt.port(),
    }
}

struct Driver {
    _child: Child,
    channel: Channel,
}

/// Starts csi-driver with the given client certificate; waits until Probe says ready.
async fn start_driver(dir: &Path, server: &Server, ca: &Ca, role: &str) -> Driver {
    let me = ca.client(role);
    let cert = write(dir, &format!("{role}.crt"), &me.cert);
    let key = write(dir, &format!("{role}.key"), &me.key);
    let trust = write(dir, "trust.crt", &ca.pem());
    let socket = dir.join(format!("{role}.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_csi-driver"))
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .args(["--discovery=static", "--nodes=node-1", "--metrics-listen="])
        .arg(format!(
            "--servers=s0=https://localhost:{}",
            server.mgmt_port
        ))
        .arg(format!("--mgmt-tls-ca={}", trust.display()))
        .arg(format!("--mgmt-tls-cert={}", cert.display()))
        .arg(format!("--mgmt-tls-key={}", key.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with("csi-driver ready") {
                return;
            }
        }
        panic!("csi-driver exited before it was ready");
    })
    .await
    .expect("csi-driver ready line");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let path = socket.clone();
    let channel = Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = IdentityClient::new(channel.clone())
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{role}: Probe never became ready over mTLS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver {
        _child: child,
        channel,
    }
}

fn create_req(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_certificate_may_create_and_node_certificate_may_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("enbd test CA");
    let server = start_server(dir.path(), &ca);

    let controller = start_driver(dir.path(), &server, &ca, "enbd-controller").await;
    let mut ctl = ControllerClient::new(controller.channel.clone());
    let vol = ctl
        .create_volume(create_req("pvc-tls"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // A driver holding a node certificate is live (Health is allowed to nodes) but the
    // server refuses what placement and creation need (GetCapacity, CreateVolume): the
    // driver finds no server to place on.
    let node = start_driver(dir.path(), &server, &ca, "enbd-node").await;
    let e = ControllerClient::new(node.channel.clone())
        .create_volume(create_req("pvc-by-node"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let listed = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
}
