//! The management API under `--mgmt-tls require`, against the real binary on 127.0.0.1:
//! who may call what (client certificate roles), health without a certificate, and
//! rotation of the server certificate and the client CA by rewriting the files.

#[path = "common/pki.rs"]
mod pki;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{
    ACCESS_TOKEN_METADATA, CreateVolumeRequest, DeleteVolumeRequest, GetMembershipRequest,
    GetVolumeRequest, GrantAccessRequest, ListVolumesRequest, RevokeAccessRequest,
};
use enbd_server::ready::{ReadyLine, spawn_until_ready};
use pki::{Ca, Pair, write};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Server {
    child: Child,
    ready: ReadyLine,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the CA and a server certificate into `dir` and starts the server with mgmt TLS.
fn start(dir: tempfile::TempDir, ca: &Ca) -> Server {
    start_with(dir, ca, &[])
}

fn start_with(dir: tempfile::TempDir, ca: &Ca, extra: &[&str]) -> Server {
    let p = dir.path();
    let server = ca.server("enbd-server");
    write(p, "tls.crt", &server.cert);
    write(p, "tls.key", &server.key);
    write(p, "client-ca.crt", &ca.pem());
    let data = p.join("data");
    let (child, ready) = spawn_until_ready(
        Command::new(env!("CARGO_BIN_EXE_enbd-server"))
            .args(["--demo", "--server-id=tls-server", "--listen=127.0.0.1:0"])
            .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg("--health-listen=127.0.0.1:0")
            .arg(format!("--data-dir={}", data.display()))
            .arg("--mgmt-tls=require")
            .arg(format!("--tls-cert={}", p.join("tls.crt").display()))
            .arg(format!("--tls-key={}", p.join("tls.key").display()))
            .arg(format!(
                "--mgmt-client-ca={}",
                p.join("client-ca.crt").display()
            ))
            .args(extra)
            .env("RUST_LOG", "enbd_server=debug")
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Server {
        child,
        ready,
        _dir: dir,
    }
}

/// A fresh TLS connection to the management port, trusting `trust`, showing `me` if given.
async fn channel(s: &Server, trust: &str, me: Option<&Pair>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust))
        .domain_name("localhost");
    if let Some(me) = me {
        tls = tls.identity(Identity::from_pem(&me.cert, &me.key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", s.ready.mgmt.port()))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn create(ch: Channel, name: &str) -> Result<(), tonic::Status> {
    VolumeServiceClient::new(ch)
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn membership(ch: Channel) -> Result<(), tonic::Status> {
    membership_of(ch, "demo", None).await
}

/// GetMembership of `volume`, with `token` in the access-token metadata if given.
async fn membership_of(
    ch: Channel,
    volume: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(GetMembershipRequest {
        volume: volume.into(),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert(ACCESS_TOKEN_METADATA, t.parse().unwrap());
    }
    ReplicaServiceClient::new(ch)
        .get_membership(req)
        .await
        .map(|_| ())
}

async fn health(ch: Channel) -> ServingStatus {
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "enbd.v1.VolumeService".into(),
        })
        .await
        .expect("health check");
    r.into_inner().status()
}

/// Creating `name` with this identity fails, at the handshake or at the call.
async fn create_fails(s: &Server, trust: &str, me: Option<&Pair>, name: &str) -> String {
    match channel(s, trust, me).await {
        Err(e) => e,
        Ok(ch) => match create(ch, name).await {
            Ok(()) => panic!("{name}: created by a client that should have been refused"),
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        },
    }
}

#[tokio::test]
async fn mgmt_refuses_clients_without_the_right_certificate() {
    let ca = Ca::new("enbd test CA");
    let s = start(tempfile::tempdir().unwrap(), &ca);
    let trust = ca.pem();
    let controller = ca.client("enbd-controller");
    let node = ca.client("enbd-node");

    // No client certificate: the TLS session is allowed (for health), every call refused.
    let anon = channel(&s, &trust, None).await.unwrap();
    let e = create(anon.clone(), "anon").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("client certificate"), "{e:?}");
    let e = membership(anon.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(health(anon).await, ServingStatus::Serving);

    // The plain-text health listener answers without TLS.
    let plain = Endpoint::from_shared(format!("http://{}", s.ready.health.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health(plain).await, ServingStatus::Serving);

    // A node certificate: the replica service and read-only calls, nothing that changes volumes.
    let n = channel(&s, &trust, Some(&node)).await.unwrap();
    membership(n.clone()).await.unwrap();
    VolumeServiceClient::new(n.clone())
        .get_volume(GetVolumeRequest {
            name: "demo".into(),
        })
        .await
        .unwrap();
    let e = create(n.clone(), "by-node").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("enbd-node") && e.message().contains("CreateVolume"),
        "{e:?}"
    );
    let e = VolumeServiceClient::new(n.clone())
        .delete_volume(DeleteVolumeRequest {
            name: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A certificate from the right CA with no role.
    let e = create_fails(&s, &trust, Some(&ca.client("mallory")), "by-mallory").await;
    assert!(e.starts_with("PermissionDenied"), "{e}");

    // A controller certificate from another CA: refused at the handshake.
    let other = Ca::new("someone else's CA");
    let e = create_fails(
        &s,
        &trust,
        Some(&other.client("enbd-controller")),
        "by-stranger",
    )
    .await;
    assert!(!e.is_empty());

    // Plain text to the TLS port gets nothing.
    let plain = Endpoint::from_shared(format!("http://{}", s.ready.mgmt))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(create(ch, "by-plain").await.is_err());
    }

    // The controller may do everything; none of the refused creates happened.
    let c = channel(&s, &trust, Some(&controller)).await.unwrap();
    create(c.clone(), "by-controller").await.unwrap();
    let admin = channel(&s, &trust, Some(&ca.client("enbd-admin")))
        .await
        .unwrap();
    let names: Vec<String> = VolumeServiceClient::new(admin)
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(names.contains(&"by-controller".to_owned()), "{names:?}");
    for refused in ["anon", "by-node", "by-mallory", "by-stranger", "by-plain"] {
        assert!(
            !names.contains(&refused.to_owned()),
            "{refused} exists: {names:?}"
        );
    }
}

/// At `--access published` a node certificate alone opens no volume's replica state: the
/// caller must send the access token granted for the volume it names, as on the data path.
#[tokio::test]
async fn node_calls_need_the_token_of_the_volume_at_access_published() {
    let ca = Ca::new("enbd test CA");
    let s = start_with(tempfile::tempdir().unwrap(), &ca, &["--access=published"]);
    let trust = ca.pem();
    let c = channel(&s, &trust, Some(&ca.client("enbd-controller")))
        .await
        .unwrap();
    create(c.clone(), "other").await.unwrap();
    let token = VolumeServiceClient::new(c.clone())
        .grant_access(GrantAccessRequest {
            volume: "demo".into(),
            node_id: "node-1".into(),
            token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let n = channel(&s, &trust, Some(&ca.client("enbd-node")))
        .await
        .unwrap();

    membership_of(n.clone(), "demo", Some(&token))
        .await
        .unwrap();
    let mut get = tonic::Request::new(GetVolumeRequest {
        name: "demo".into(),
    });
    get.metadata_mut()
        .insert(ACCESS_TOKEN_METADATA, token.parse().unwrap());
    VolumeServiceClient::new(n.clone())
        .get_volume(get)
        .await
        .unwrap();

    let made_up = "0".repeat(64);
    for (volume, sent) in [
        ("demo", None),
        ("demo", Some(made_up.as_str())),
        ("other", Some(token.as_str())),
    ] {
        let e = membership_of(n.clone(), volume, sent).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{volume}: {e:?}");
        assert!(e.message().contains(volume), "{e:?}");
        assert!(
            !e.message().contains(&token),
            "a refusal never names a token: {e:?}"
        );
    }
    let e = VolumeServiceClient::new(n.clone())
        .get_volume(GetVolumeRequest {
            name: "demo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The control plane is not scoped.
    membership_of(c.clone(), "other", None).await.unwrap();

    // Revoked: the same token opens nothing from the next call on.
    VolumeServiceClient::new(c)
        .revoke_access(RevokeAccessRequest {
            volume: "demo".into(),
            node_id: "node-1".into(),
        })
        .await
        .unwrap();
    let e = membership_of(n, "demo", Some(&token)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

/// Polls `f` (a fresh connection each time) until it succeeds, for at most 20 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: still failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn mgmt_certificates_reload_when_the_files_change() {
    let old = Ca::new("old CA");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let s = start(dir, &old);
    let old_controller = old.client("enbd-controller");
    create(
        channel(&s, &old.pem(), Some(&old_controller))
            .await
            .unwrap(),
        "before",
    )
    .await
    .unwrap();

    // Clients of a new CA are refused until the files change...
    let new = Ca::new("new CA");
    let new_controller = new.client("enbd-controller");
    create_fails(&s, &new.pem(), Some(&new_controller), "too-early").await;

    // ...then the server certificate and the client CA are rotated in place. The key is
    // written after the certificate: in between the pair does not match and the server must
    // keep serving with the old one.
    let rotate = |dir: &Path| {
        let pair = new.server("enbd-server");
        write(dir, "tls.crt", &pair.cert);
        write(dir, "tls.key", &pair.key);
        write(dir, "client-ca.crt", &new.pem());
    };
    rotate(&path);
    eventually("a new-CA client after rotation", || {
        let s = &s;
        let (trust, me) = (new.pem(), new_controller.clone());
        async move {
            let ch = channel(s, &trust, Some(&me)).await?;
            create(ch, "after").await.map_err(|e| e.to_string())
        }
    })
    .await;
    // The old CA is no longer trusted for new connections, in either direction.
    create_fails(&s, &old.pem(), Some(&old_controller), "old-after").await;
    create_fails(&s, &new.pem(), Some(&old_controller), "old-client-after").await;
}

#[test]
fn mgmt_tls_with_unreadable_files_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let err = spawn_until_ready(
        Command::new(env!("CARGO_BIN_EXE_enbd-server"))
            .args(["--demo", "--server-id=x", "--listen=127.0.0.1:0"])
            .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
            .arg(format!("--data-dir={}", dir.path().display()))
            .args(["--mgmt-tls=require", "--tls-cert=/nonexistent/tls.crt"])
            .args([
                "--tls-key=/nonexistent/tls.key",
                "--mgmt-client-ca=/nonexistent/ca.crt",
            ])
            .stderr(Stdio::null()),
    )
    .expect_err("the server must not become ready");
    assert!(!err.is_empty());
}
