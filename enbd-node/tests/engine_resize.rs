//! Online growth against the real enbd-server: a volume expanded through the management API
//! becomes usable past its old end after `Client::refresh_size`, on the same connected engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use enbd_node::engine::{Client, ClientConfig, IoError};
use enbd_proto::enbd::{CreateVolumeRequest, ExpandVolumeRequest};
use enbd_test_harness::EnbdServer;

const OLD: u64 = 8 << 20;
const NEW: u64 = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refresh_size_serves_a_grown_export() {
    let server = EnbdServer::builder().id("resize-test").start();
    let mut mgmt = server.mgmt_client().await;
    mgmt.create_volume(CreateVolumeRequest {
        name: "grow".into(),
        size_bytes: OLD,
        source: None,
        labels: Default::default(),
    })
    .await
    .expect("create volume");

    let mut cfg = ClientConfig::new(server.nbd().to_string(), "grow");
    cfg.channels = 2;
    let client = Client::connect(cfg).await.expect("connect");
    assert_eq!(client.geometry().size, OLD);
    let before_end = Bytes::from(vec![0x5a; 4096]);
    client
        .write(OLD - 4096, before_end.clone(), false)
        .await
        .expect("write at the old end");

    // Nothing changed yet: refreshing is a no-op and the old end is still enforced.
    assert_eq!(client.refresh_size().await.expect("refresh"), OLD);
    match client.read(OLD, 4096).await {
        Err(IoError::OutOfRange { size, .. }) => assert_eq!(size, OLD),
        other => panic!("read past the end before growth: {other:?}"),
    }

    let grown = mgmt
        .expand_volume(ExpandVolumeRequest {
            name: "grow".into(),
            size_bytes: NEW,
        })
        .await
        .expect("expand volume")
        .into_inner();
    assert_eq!(grown.volume.expect("volume").size_bytes, NEW);
    // The engine keeps its size until told to look.
    assert_eq!(client.geometry().size, OLD);
    assert!(client.read(OLD, 4096).await.is_err());

    assert_eq!(client.refresh_size().await.expect("refresh"), NEW);
    let g = client.geometry();
    assert_eq!(g.size, NEW);

    // Past the old end, up to the new one, on the engine's existing channels.
    let tail = Bytes::from((0..8192u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    client
        .write(NEW - 8192, tail.clone(), true)
        .await
        .expect("write at the new end");
    let mid = Bytes::from(vec![0xc3; 65536]);
    client
        .write(OLD, mid.clone(), false)
        .await
        .expect("write right after the old end");
    client.flush().await.expect("flush");
    assert_eq!(
        client.read(NEW - 8192, 8192).await.expect("read new end"),
        tail
    );
    assert_eq!(
        client.read(OLD, 65536).await.expect("read old end + 0"),
        mid
    );
    assert_eq!(
        client
            .read(OLD - 4096, 4096)
            .await
            .expect("read before old end"),
        before_end
    );
    match client.read(NEW, 512).await {
        Err(IoError::OutOfRange { size, .. }) => assert_eq!(size, NEW),
        other => panic!("read past the new end: {other:?}"),
    }

    // A second engine sees the same bytes: they are on the server, not in a cache.
    let other = Client::connect(ClientConfig::new(server.nbd().to_string(), "grow"))
        .await
        .expect("connect");
    assert_eq!(other.geometry().size, NEW);
    assert_eq!(
        other
            .read(NEW - 8192, 8192)
            .await
            .expect("read by another client"),
        tail
    );
    other.shutdown().await;
    client.shutdown().await;
}
