//! A mirror whose replicas' management APIs require mutual TLS (`--mgmt-tls require`): the
//! node certificate (CN enbd-node) is enough for everything the mirror calls (GetVolume,
//! Get/SetMembership, dirty regions), and without the node's TLS files the mirror does not
//! open. At `--access published` the node certificate alone opens nothing: the mirror sends the
//! volume's access token on its management calls too. Real enbd-server processes on
//! 127.0.0.1, certificates made in the test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../enbd-server/tests/common/pki.rs"]
mod pki;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use enbd_node::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig};
use enbd_node::engine::status::MirrorState;
use enbd_node::mgmt_tls::MgmtTlsFiles;
use enbd_server::ready::{ReadyLine, spawn_until_ready};
use pki::{Ca, write};

fn enbd_server_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ENBD_SERVER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("enbd-server");
    assert!(
        bin.exists(),
        "build enbd-server first (cargo build -p enbd-server): {}",
        bin.display()
    );
    bin
}

struct Server(Child, ReadyLine);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path, id: &str, ca: &Ca) -> Server {
    start_with(dir, id, ca, &[])
}

fn start_with(dir: &std::path::Path, id: &str, ca: &Ca, extra: &[&str]) -> Server {
    spawn(dir, id, ca, true, extra)
}

/// A server with no volume at all (no `--demo`).
fn start_empty(dir: &std::path::Path, id: &str, ca: &Ca, extra: &[&str]) -> Server {
    spawn(dir, id, ca, false, extra)
}

fn spawn(dir: &std::path::Path, id: &str, ca: &Ca, demo: bool, extra: &[&str]) -> Server {
    let pair = ca.server(id);
    let cert = write(dir, &format!("{id}.crt"), &pair.cert);
    let key = write(dir, &format!("{id}.key"), &pair.key);
    let client_ca = write(dir, "ca.crt", &ca.pem());
    let (child, ready) = spawn_until_ready(
        Command::new(enbd_server_bin())
            .args(demo.then_some("--demo"))
            .arg("--listen=127.0.0.1:0")
            .arg(format!("--server-id={id}"))
            .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg(format!("--data-dir={}", dir.join(id).display()))
            .arg("--mgmt-tls=require")
            .arg(format!("--tls-cert={}", cert.display()))
            .arg(format!("--tls-key={}", key.display()))
            .arg(format!("--mgmt-client-ca={}", client_ca.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Server(child, ready)
}

/// The node's management TLS files: the CA it trusts, and a certificate of the node role.
fn node_files(dir: &std::path::Path, ca: &Ca) -> MgmtTlsFiles {
    let node = ca.client("enbd-node");
    MgmtTlsFiles {
        ca: write(dir, "trust.crt", &ca.pem()),
        cert: write(dir, "node.crt", &node.cert),
        key: write(dir, "node.key", &node.key),
    }
}

fn config(servers: &[(&str, &Server)]) -> MirrorConfig {
    let replicas = servers
        .iter()
        .map(|(id, s)| ReplicaConfig {
            id: id.to_string(),
            nbd: s.1.nbd.to_string(),
            mgmt: format!("https://localhost:{}", s.1.mgmt.port()),
        })
        .collect();
    let mut c = MirrorConfig::new("demo", replicas);
    c.replica_timeout = Duration::from_secs(2);
    c.client.connect_timeout = Duration::from_secs(2);
    c.client.channels = 1;
    c
}

#[tokio::test]
async fn a_node_certificate_is_enough_for_the_mirror_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("enbd test CA");
    let a = start(dir.path(), "srv-a", &ca);
    let b = start(dir.path(), "srv-b", &ca);
    let files = node_files(dir.path(), &ca);

    // Without the node's TLS files: an https management address is refused up front.
    let err = Mirror::open(config(&[("srv-a", &a), ("srv-b", &b)]))
        .await
        .err()
        .expect("opened without TLS");
    assert!(err.to_string().contains("--tls-ca"), "{err}");

    // With a certificate of the wrong role (an unknown CN), the servers refuse the calls.
    let stranger = ca.client("someone");
    let mut cfg = config(&[("srv-a", &a), ("srv-b", &b)]);
    cfg.mgmt_tls = Some(
        MgmtTlsFiles {
            cert: write(dir.path(), "stranger.crt", &stranger.cert),
            key: write(dir.path(), "stranger.key", &stranger.key),
            ..files.clone()
        }
        .load()
        .unwrap(),
    );
    let err = Mirror::open(cfg)
        .await
        .err()
        .expect("opened with a roleless certificate");
    assert!(
        err.to_string().contains("PermissionDenied")
            && err.to_string().contains("no management role"),
        "{err}"
    );

    // With the node certificate: opens, writes to both, reads back.
    let mut cfg = config(&[("srv-a", &a), ("srv-b", &b)]);
    cfg.mgmt_tls = Some(files.load().unwrap());
    let m = Mirror::open(cfg).await.expect("mirror over mTLS");
    let data = Bytes::from(vec![0x5a; 4096]);
    m.write(8192, data.clone(), true).await.unwrap();
    assert_eq!(m.read(8192, 4096).await.unwrap(), data);
    let s = m.status();
    assert_eq!(s.state, MirrorState::Healthy, "{s:?}");
    assert!(s.generation >= 1, "{s:?}");
    m.shutdown().await;
}

/// The management client of `server` with the controller's certificate.
async fn as_controller(
    server: &Server,
    ca: &Ca,
) -> enbd_proto::enbd::volume_service_client::VolumeServiceClient<tonic::transport::Channel> {
    use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let controller = ca.client("enbd-controller");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(Identity::from_pem(&controller.cert, &controller.key))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{}", server.1.mgmt.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    VolumeServiceClient::new(ch)
}

/// Grants `volume` to `node` on `server` as the controller does; returns the token.
async fn grant(server: &Server, ca: &Ca, volume: &str, node: &str, token: &str) -> String {
    use enbd_proto::enbd::GrantAccessRequest;
    as_controller(server, ca)
        .await
        .grant_access(GrantAccessRequest {
            volume: volume.into(),
            node_id: node.into(),
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

#[tokio::test]
async fn at_access_published_the_mirror_sends_the_volume_token_to_the_management_api() {
    use enbd_node::engine::access::AccessCredential;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("enbd test CA");
    let a = start_with(dir.path(), "srv-a", &ca, &["--access=published"]);
    let b = start_with(dir.path(), "srv-b", &ca, &["--access=published"]);
    let files = node_files(dir.path(), &ca);
    let token = grant(&a, &ca, "demo", "node-1", "").await;
    grant(&b, &ca, "demo", "node-1", &token).await;
    // The data path runs without TLS in this test, so the token may go in plain text there;
    // on the management calls it goes only over TLS, which they have.
    let credential = |t: &str| Some(Arc::new(AccessCredential::new(t, true).unwrap()));

    // A token of no grant opens nothing (the servers refuse it on both ports), and the error
    // does not name it.
    let mut cfg = config(&[("srv-a", &a), ("srv-b", &b)]);
    cfg.mgmt_tls = Some(files.load().unwrap());
    let made_up = "0".repeat(64);
    cfg.client.access = credential(&made_up);
    let err = Mirror::open(cfg)
        .await
        .err()
        .expect("opened with a made-up token");
    assert!(
        !err.to_string().contains(&made_up),
        "an error never names a token: {err}"
    );

    // The granted token opens the mirror: every management call it makes (GetVolume,
    // Get/SetMembership, the activity log) passed the servers' token check, which refuses a
    // node certificate without it (enbd-server/tests/mgmt_tls.rs).
    let mut cfg = config(&[("srv-a", &a), ("srv-b", &b)]);
    cfg.mgmt_tls = Some(files.load().unwrap());
    cfg.client.access = credential(&token);
    let m = Mirror::open(cfg)
        .await
        .expect("mirror with the volume's token");
    let data = Bytes::from(vec![0xa5; 4096]);
    m.write(4096, data.clone(), true).await.unwrap();
    assert_eq!(m.read(4096, 4096).await.unwrap(), data);
    let s = m.status();
    assert_eq!(s.state, MirrorState::Healthy, "{s:?}");
    m.shutdown().await;
}

/// Replacing a replica under the chart's management settings (mutual TLS, `--access
/// published`): the node's role may not create the new replica's volume, so `replace` refuses
/// with the way forward and changes nothing; once the controller created it and granted the
/// node (what `csi-driver prepare-replacement` does), the same call swaps it in and the
/// resync gives it a full copy, checked in the new server's data file.
#[tokio::test]
async fn under_management_tls_the_node_replaces_onto_a_volume_the_controller_prepared() {
    use enbd_node::engine::access::AccessCredential;
    use enbd_proto::enbd::{CreateVolumeRequest, GetVolumeRequest};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("enbd test CA");
    let a = start_with(dir.path(), "srv-a", &ca, &["--access=published"]);
    let b = start_with(dir.path(), "srv-b", &ca, &["--access=published"]);
    let c = start_empty(dir.path(), "srv-c", &ca, &["--access=published"]);
    let files = node_files(dir.path(), &ca);
    let token = grant(&a, &ca, "demo", "node-1", "").await;
    grant(&b, &ca, "demo", "node-1", &token).await;
    let mut cfg = config(&[("srv-a", &a), ("srv-b", &b)]);
    cfg.mgmt_tls = Some(files.load().unwrap());
    cfg.client.access = Some(Arc::new(AccessCredential::new(&token, true).unwrap()));
    let m = Mirror::open(cfg).await.expect("mirror");
    let data = Bytes::from(
        (0..64 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    for at in [0u64, 1 << 20, 3 << 20] {
        m.write(at, data.clone(), true).await.unwrap();
    }
    let new_replica = ReplicaConfig {
        id: "srv-c".into(),
        nbd: c.1.nbd.to_string(),
        mgmt: format!("https://localhost:{}", c.1.mgmt.port()),
    };
    let volume_on_c = || async {
        as_controller(&c, &ca)
            .await
            .get_volume(GetVolumeRequest {
                name: "demo".into(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().volume)
    };

    // Unprepared: refused with the controller command to run, nothing created or changed.
    let err = m
        .replace("srv-b", new_replica.clone())
        .await
        .expect_err("the node created a volume under management TLS");
    assert!(
        err.to_string().contains("csi-driver prepare-replacement"),
        "{err}"
    );
    assert!(
        volume_on_c().await.is_none(),
        "something was created on srv-c"
    );
    let ids: Vec<String> = m.replica_configs().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["srv-a", "srv-b"]);

    // The controller's half: the volume with an in-sync member's size and labels, and the
    // node's grant with its token.
    let template = as_controller(&a, &ca)
        .await
        .get_volume(GetVolumeRequest {
            name: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    as_controller(&c, &ca)
        .await
        .create_volume(CreateVolumeRequest {
            name: "demo".into(),
            size_bytes: template.size_bytes,
            source: None,
            labels: template.labels.clone(),
        })
        .await
        .expect("create as the controller");
    grant(&c, &ca, "demo", "node-1", &token).await;

    let done = m.replace("srv-b", new_replica).await.expect("replace");
    assert!(
        !done.created,
        "the prepared volume is used, not created again"
    );
    assert!(done.record.state_of("srv-b").is_none(), "{:?}", done.record);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while m.status().state != MirrorState::Healthy {
        assert!(
            std::time::Instant::now() < deadline,
            "no full copy to srv-c: {:#?}",
            m.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.flush().await.unwrap();
    let file =
        |id: &str| std::fs::read(dir.path().join(id).join("volumes/demo/data")).expect("data file");
    let (on_a, on_c) = (file("srv-a"), file("srv-c"));
    assert_eq!(on_a.len(), on_c.len());
    assert!(on_a == on_c, "srv-c's copy differs from srv-a's");
    assert_eq!(&on_c[3 << 20..(3 << 20) + data.len()], &data[..]);
    m.shutdown().await;
}
