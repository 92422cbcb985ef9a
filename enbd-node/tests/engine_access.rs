//! The engine with node-scoped access against a real enbd-server (`--access published`,
//! `--tls require`): without a grant the export is refused, with the token it opens and
//! serves IO, revoking the grant drops the engine's channels (IO waits, per the brownout
//! policy, and fails under `fail-after`), granting again lets it reconnect; the token is never
//! sent in plain text unless allowed, and never shows in an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::testcerts::ToolDir;
use enbd_node::engine::access::AccessCredential;
use enbd_node::engine::tls::{ClientTls, TlsFiles};
use enbd_node::engine::{BrownoutPolicy, ChannelState, Client, ClientConfig, EngineError};
use enbd_proto::enbd as pb;
use engine_support::{Peer, start_enbd_server_with};

fn tls(ca: &Path) -> Arc<ClientTls> {
    Arc::new(
        ClientTls::new(TlsFiles {
            ca: ca.to_owned(),
            identity: None,
        })
        .expect("client TLS files"),
    )
}

fn config(peer: &Peer, tls: Option<Arc<ClientTls>>, token: Option<&str>) -> ClientConfig {
    let mut cfg = ClientConfig::new(peer.server(), &peer.export);
    cfg.tls = tls;
    cfg.access = token.map(|t| Arc::new(AccessCredential::new(t, false).unwrap()));
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.reconnect_max = Duration::from_millis(200);
    cfg
}

fn published(dir: &Path, certs: &ToolDir) -> Peer {
    start_enbd_server_with(
        &dir.join("data"),
        &[
            "--access=published".into(),
            "--tls=require".into(),
            format!("--tls-cert={}", certs.server.cert.display()),
            format!("--tls-key={}", certs.server.key.display()),
        ],
    )
}

async fn grant(peer: &Peer, node: &str) -> String {
    let mut c = peer.enbd().unwrap().mgmt_client().await;
    c.grant_access(pb::GrantAccessRequest {
        volume: peer.export.clone(),
        node_id: node.into(),
        token: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

async fn revoke(peer: &Peer, node: &str) -> u32 {
    let mut c = peer.enbd().unwrap().mgmt_client().await;
    c.revoke_access(pb::RevokeAccessRequest {
        volume: peer.export.clone(),
        node_id: node.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .closed_connections
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_opens_only_while_granted_and_loses_the_volume_on_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&dir.path().join("pki"));
    let peer = published(dir.path(), &certs);
    let ca = tls(&certs.ca.cert);

    // No token, and a token nobody granted: refused.
    let e = Client::connect(config(&peer, Some(ca.clone()), None))
        .await
        .err()
        .expect("opened without a grant");
    assert!(matches!(e, EngineError::ExportRefused { .. }), "{e:?}");
    let fake = "0".repeat(64);
    let e = Client::connect(config(&peer, Some(ca.clone()), Some(&fake)))
        .await
        .err()
        .expect("opened with a made-up token");
    assert!(matches!(e, EngineError::ExportRefused { .. }), "{e:?}");
    assert!(
        !e.to_string().contains(&fake),
        "the error names the token: {e}"
    );

    // Granted: opens on two channels, IO works.
    let token = grant(&peer, "node-1").await;
    let mut cfg = config(&peer, Some(ca.clone()), Some(&token));
    cfg.channels = 2;
    cfg.brownout = BrownoutPolicy::FailAfter(Duration::from_secs(1));
    let client = Client::connect(cfg).await.expect("connect with the grant");
    let data = Bytes::from(vec![0x5au8; 65536]);
    client.write(0, data.clone(), true).await.unwrap();
    assert!(client.read(0, 65536).await.unwrap() == data);
    wait_until("both channels up", || {
        client
            .status()
            .channels
            .iter()
            .all(|c| c.state == ChannelState::Up)
    })
    .await;

    // Unpublished: the server closes both connections and refuses the reconnects, so IO
    // fails once the brownout allowance is over.
    assert_eq!(revoke(&peer, "node-1").await, 2);
    wait_until("the channels to drop", || {
        client
            .status()
            .channels
            .iter()
            .all(|c| c.state != ChannelState::Up)
    })
    .await;
    let e = client.read(0, 4096).await.expect_err("read after revoke");
    println!("IO after revoke failed as the brownout policy says: {e}");
    client.shutdown().await;

    // A new grant for the same node opens again (with its new token; the old one is dead).
    let again = grant(&peer, "node-1").await;
    assert_ne!(again, token);
    let e = Client::connect(config(&peer, Some(ca.clone()), Some(&token)))
        .await
        .err()
        .expect("the revoked token opened");
    assert!(matches!(e, EngineError::ExportRefused { .. }), "{e:?}");
    let client = Client::connect(config(&peer, Some(ca), Some(&again)))
        .await
        .expect("connect with the new grant");
    assert!(client.read(0, 65536).await.unwrap() == data);
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_brownout_wait_io_resumes_when_the_grant_returns() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&dir.path().join("pki"));
    let peer = published(dir.path(), &certs);
    let token = grant(&peer, "node-1").await;
    let client = Client::connect(config(&peer, Some(tls(&certs.ca.cert)), Some(&token)))
        .await
        .expect("connect");
    revoke(&peer, "node-1").await;
    wait_until("the channel to drop", || {
        client.status().channels[0].state != ChannelState::Up
    })
    .await;
    // IO waits (brownout `wait`) while the volume is not published ...
    let c2 = client.clone();
    let pending = tokio::spawn(async move { c2.read(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "IO completed while unpublished");
    // ... and completes once the same token is granted again (a controller re-publishing
    // with the token it handed out: GrantAccess with that token).
    let mut c = peer.enbd().unwrap().mgmt_client().await;
    c.grant_access(pb::GrantAccessRequest {
        volume: peer.export.clone(),
        node_id: "node-1".into(),
        token: token.clone(),
    })
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("IO still waiting after the grant returned")
        .unwrap()
        .expect("read");
    assert_eq!(got.len(), 4096);
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_never_sent_without_tls_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let peer = start_enbd_server_with(&dir.path().join("data"), &["--access=published".into()]);
    let token = grant(&peer, "node-1").await;
    let e = Client::connect(config(&peer, None, Some(&token)))
        .await
        .err()
        .expect("sent the token in plain text");
    assert!(matches!(e, EngineError::Tls { .. }), "{e:?}");
    assert!(!e.to_string().contains(&token));
    // A lab may allow it.
    let mut cfg = config(&peer, None, None);
    cfg.access = Some(Arc::new(AccessCredential::new(&token, true).unwrap()));
    let client = Client::connect(cfg)
        .await
        .expect("plain-text token allowed");
    client.read(0, 4096).await.unwrap();
    client.shutdown().await;
}
