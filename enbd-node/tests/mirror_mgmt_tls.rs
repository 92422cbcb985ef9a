//! A mirror whose replicas' management APIs require mutual TLS (`--mgmt-tls require`): the
//! node certificate (CN enbd-node) is enough for everything the mirror calls (GetVolume,
//! Get/SetMembership, dirty regions), and without the node's TLS files the mirror does not
//! open. Real enbd-server processes on 127.0.0.1, certificates made in the test.

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
    let pair = ca.server(id);
    let cert = write(dir, &format!("{id}.crt"), &pair.cert);
    let key = write(dir, &format!("{id}.key"), &pair.key);
    let client_ca = write(dir, "ca.crt", &ca.pem());
    let (child, ready) = spawn_until_ready(
        Command::new(enbd_server_bin())
            .args(["--demo", "--listen=127.0.0.1:0"])
            .arg(format!("--server-id={id}"))
            .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg(format!("--data-dir={}", dir.join(id).display()))
            .arg("--mgmt-tls=require")
            .arg(format!("--tls-cert={}", cert.display()))
            .arg(format!("--tls-key={}", key.display()))
            .arg(format!("--mgmt-client-ca={}", client_ca.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Server(child, ready)
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
    let node = ca.client("enbd-node");
    let files = MgmtTlsFiles {
        ca: write(dir.path(), "trust.crt", &ca.pem()),
        cert: write(dir.path(), "node.crt", &node.cert),
        key: write(dir.path(), "node.key", &node.key),
    };

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
