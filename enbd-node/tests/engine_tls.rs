//! The engine over TLS (NBD_OPT_STARTTLS): against nbdkit with x509 certificates and against
//! enbd-server requiring TLS and client certificates; data written and read back; reconnects
//! redo TLS; an untrusted server, a client certificate from another CA and a server without
//! TLS (a downgrade) are all refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::testcerts::{Ca, ToolDir, Usage};
use enbd_node::engine::tls::{ClientTls, TlsFiles};
use enbd_node::engine::{ChannelState, Client, ClientConfig, EngineError};
use engine_support::{Peer, sparse_file, start_enbd_server_with, start_nbdkit_tls};

const SIZE: u64 = 64 << 20;

fn tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientTls> {
    Arc::new(
        ClientTls::new(TlsFiles {
            ca: ca.to_owned(),
            identity: identity.map(|(c, k)| (c.to_owned(), k.to_owned())),
        })
        .expect("client TLS files"),
    )
}

fn config(peer: &Peer, tls: Option<Arc<ClientTls>>) -> ClientConfig {
    let mut cfg = ClientConfig::new(peer.server(), &peer.export);
    cfg.tls = tls;
    cfg.connect_timeout = Duration::from_secs(5);
    cfg
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

/// Writes a few regions (one with FUA), flushes, reads them back.
async fn write_and_read_back(client: &Client) -> Vec<(u64, Bytes)> {
    let regions: Vec<(u64, Bytes)> = [(0u64, 4096usize), (1 << 20, 65536), (5 << 20, 1 << 20)]
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| (off, pattern(i as u8 + 1, len)))
        .collect();
    for (i, (off, data)) in regions.iter().enumerate() {
        client
            .write(*off, data.clone(), i == 0)
            .await
            .expect("write");
    }
    client.flush().await.expect("flush");
    for (off, data) in &regions {
        let got = client.read(*off, data.len() as u32).await.expect("read");
        assert!(got == *data, "read at {off} differs from what was written");
    }
    regions
}

async fn connect_err(cfg: ClientConfig) -> EngineError {
    match Client::connect(cfg).await {
        Ok(_) => panic!("connection accepted"),
        Err(e) => {
            println!("refused as expected: {e}");
            e
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_over_tls_against_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&dir.path().join("pki"));
    let disk = sparse_file(dir.path(), SIZE);
    let peer = start_nbdkit_tls(&disk, &certs.dir);

    let client = Client::connect(config(&peer, Some(tls(&certs.ca.cert, None))))
        .await
        .expect("TLS connect to nbdkit");
    let written = write_and_read_back(&client).await;
    client.shutdown().await;
    // The bytes went through TLS to nbdkit's file.
    let on_disk = std::fs::read(&disk).unwrap();
    for (off, data) in &written {
        assert!(on_disk[*off as usize..*off as usize + data.len()] == data[..]);
    }

    // Without TLS, nbdkit refuses the export; the engine says TLS is what is missing.
    let e = connect_err(config(&peer, None)).await;
    assert!(matches!(e, EngineError::Tls { .. }), "{e:?}");

    // A server certificate from a CA the engine does not trust: refused.
    let other = Ca::new(dir.path(), "other-ca");
    let e = connect_err(config(&peer, Some(tls(&other.cert, None)))).await;
    assert!(matches!(e, EngineError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_over_tls_with_a_client_certificate_against_enbd_server_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&dir.path().join("pki"));
    let data = dir.path().join("data");
    let peer = start_enbd_server_with(
        &data,
        &[
            "--tls=require".into(),
            format!("--tls-cert={}", certs.server.cert.display()),
            format!("--tls-key={}", certs.server.key.display()),
            format!("--tls-client-ca={}", certs.ca.cert.display()),
        ],
    );
    let ours = tls(
        &certs.ca.cert,
        Some((&certs.client.cert, &certs.client.key)),
    );
    let mut cfg = config(&peer, Some(ours));
    cfg.channels = 2;
    let client = Client::connect(cfg).await.expect("TLS connect");
    let written = write_and_read_back(&client).await;

    // A reset channel reconnects (a new TLS session) and serves reads again.
    let before = client.status().channels[0].connects;
    client.reset_channel(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ch = &client.status().channels[0];
        if ch.connects > before && ch.state == ChannelState::Up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "channel 0 did not come back: {ch:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (off, data) in &written {
        assert!(client.read(*off, data.len() as u32).await.unwrap() == *data);
    }
    client.shutdown().await;

    // No client certificate: the server refuses.
    let e = connect_err(config(&peer, Some(tls(&certs.ca.cert, None)))).await;
    assert!(
        matches!(e, EngineError::Tls { .. } | EngineError::Handshake { .. }),
        "{e:?}"
    );
    // A client certificate from another CA: the server refuses it.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = Ca::new(&other_dir, "other-ca");
    let stranger = other.issue(&other_dir, "stranger", Usage::Client);
    let e = connect_err(config(
        &peer,
        Some(tls(&certs.ca.cert, Some((&stranger.cert, &stranger.key)))),
    ))
    .await;
    assert!(
        matches!(e, EngineError::Tls { .. } | EngineError::Handshake { .. }),
        "{e:?}"
    );
    let msg = e.to_string().to_lowercase();
    assert!(
        msg.contains("alert") || msg.contains("certificate"),
        "{msg}"
    );
    // The key never shows up in an error.
    let key = std::fs::read_to_string(&stranger.key).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!e.to_string().contains(&body[..16]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_never_used_in_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ToolDir::new(&dir.path().join("pki"));
    let peer = start_enbd_server_with(&dir.path().join("data"), &[]);
    let e = connect_err(config(&peer, Some(tls(&certs.ca.cert, None)))).await;
    match &e {
        EngineError::Tls { reason, .. } => {
            assert!(reason.contains("refused NBD_OPT_STARTTLS"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}
