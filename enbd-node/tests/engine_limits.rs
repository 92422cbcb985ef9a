//! The journal's memory bound and the identity check on reconnect, against real servers
//! through the fault proxy.

mod engine_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::faultproxy::{FaultProxy, Kill};
use enbd_node::engine::{Client, ClientConfig, EngineState, IoError, MAX_REQUEST_BYTES};
use engine_support::{PeerKind, proxied_enbd_server, sparse_file, start_peer};
use tokio::task::JoinSet;

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A full journal makes new IO wait instead of growing memory: with the network stalled,
/// 48 one-MiB writes against a journal of 32 MiB + a little leave 16 of them waiting for
/// admission; after the stall every one completes and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_journal_full_makes_io_wait() {
    let (_dir, _peer, proxy, mut cfg) = proxied_enbd_server().await;
    cfg.channels = 2;
    cfg.journal_bytes = MAX_REQUEST_BYTES + 4096;
    let capacity = cfg.journal_bytes as u64;
    let client = Client::connect(cfg).await.expect("connect");
    proxy.stall();
    let mut set = JoinSet::new();
    for i in 0..48u64 {
        let c = client.clone();
        set.spawn(async move {
            let data = Bytes::from(vec![i as u8 + 1; 1 << 20]);
            c.write(i << 20, data, false).await
        });
    }
    wait_for("the journal to fill", Duration::from_secs(5), || {
        client.status().journal_requests >= 32
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = client.status();
    println!(
        "stalled: journal_requests={} journal_bytes={} capacity={capacity}",
        st.journal_requests, st.journal_bytes
    );
    assert_eq!(
        st.journal_requests, 32,
        "admitted more than the journal holds"
    );
    assert!(st.journal_bytes <= capacity);
    assert!(
        set.try_join_next().is_none(),
        "a write completed while the network was stalled"
    );
    proxy.resume();
    let mut done = 0;
    while let Some(r) = set.join_next().await {
        r.expect("join").expect("write");
        done += 1;
    }
    for i in 0..48u64 {
        let got = client.read(i << 20, 1 << 20).await.expect("read");
        assert!(got.iter().all(|&b| b == i as u8 + 1), "block {i} wrong");
    }
    let st = client.status();
    println!(
        "after resume: {done} writes completed and verified, journal_bytes={}",
        st.journal_bytes
    );
    assert_eq!(st.journal_bytes, 0);
    client.shutdown().await;
}

/// A server that comes back with another size is refused loudly: the engine fails, IO gets
/// EIO naming the reason, nothing is written to what may be another disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refuses_changed_identity_on_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start_peer(PeerKind::QemuNbd, &sparse_file(dir.path(), 64 << 20));
    let proxy = FaultProxy::start("127.0.0.1:0".parse().expect("addr"), first.addr)
        .await
        .expect("proxy");
    let mut cfg = ClientConfig::new(proxy.local_addr().to_string(), &first.export);
    cfg.reconnect_min = Duration::from_millis(20);
    let client = Client::connect(cfg).await.expect("connect");
    client
        .write(0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");

    let other_dir = tempfile::tempdir().expect("tempdir");
    let second = start_peer(PeerKind::QemuNbd, &sparse_file(other_dir.path(), 32 << 20));
    proxy.set_upstream(second.addr);
    proxy.kill_all(Kill::Reset);
    first.kill();
    wait_for("the engine to fail", Duration::from_secs(10), || {
        client.status().state == EngineState::Failed
    })
    .await;
    let st = client.status();
    let reason = st.failure.clone().expect("failure reason");
    println!("engine state={:?} failure={reason}", st.state);
    assert!(
        reason.contains("changed identity") && reason.contains("size"),
        "{reason}"
    );
    let err = client
        .write(0, Bytes::from(vec![9u8; 4096]), false)
        .await
        .expect_err("IO after failure");
    assert!(matches!(err, IoError::EngineFailed(_)), "{err:?}");
    assert_eq!(err.errno(), 5);
    // The replacement disk was never written to.
    let data = std::fs::read(&second.data).expect("read");
    assert!(data[..4096].iter().all(|&b| b == 0));
    client.shutdown().await;
}

/// Dropping every clone of a client closes its connections (no leaked channel tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_drop_closes_channels() {
    let (_dir, _peer, proxy, mut cfg) = proxied_enbd_server().await;
    cfg.channels = 3;
    let client = Client::connect(cfg).await.expect("connect");
    let other = client.clone();
    assert!(proxy.wait_connections(3, Duration::from_secs(5)).await);
    drop(client);
    other
        .read(0, 4096)
        .await
        .expect("a remaining clone still works");
    drop(other);
    assert!(
        proxy.wait_connections(0, Duration::from_secs(5)).await,
        "connections left open after drop"
    );
    println!("all 3 channels closed after the last clone was dropped");
}
