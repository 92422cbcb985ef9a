//! Interop: the engine reads and writes correctly against real NBD servers — enbd-server,
//! qemu-nbd, nbdkit and nbd-server (the last one speaks only simple replies) — with several
//! channels, pipelined requests of mixed sizes, FUA, FLUSH, TRIM, WRITE_ZEROES, and the data
//! checked on the server's disk file too.

mod engine_support;

use std::time::Duration;

use bytes::Bytes;
use enbd_node::engine::{ChannelState, Client, ClientConfig, EngineState, IoError};
use engine_support::{Peer, PeerKind, sparse_file, start_enbd_server, start_peer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn random_bytes(rng: &mut StdRng, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

async fn exercise(peer: &Peer, channels: u16) {
    let mut cfg = ClientConfig::new(peer.server(), &peer.export);
    cfg.channels = channels;
    let client = Client::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("{:?}: connect: {e}", peer.kind));
    let g = client.geometry();
    println!("{:?}: geometry {g:?}", peer.kind);
    assert!(g.size >= SIZE, "export too small: {}", g.size);
    assert!(!g.read_only);
    let st = client.status();
    let expected_channels = if g.multi_conn { channels as usize } else { 1 };
    assert_eq!(st.channels.len(), expected_channels);
    assert_eq!(st.state, EngineState::Healthy, "{st:?}");
    assert!(st.channels.iter().all(|c| c.state == ChannelState::Up));

    // Pipelined writes of mixed sizes into distinct 1 MiB regions, all in flight at once.
    let mut rng = StdRng::seed_from_u64(42);
    let sizes = [512usize, 4096, 65536, 1 << 20, 12288, 4096 * 3 + 512];
    let mut expected = Vec::new();
    for region in 0..48u64 {
        let len = sizes[region as usize % sizes.len()];
        let within = rng.random_range(0..=(MIB as usize - len) / 512) as u64 * 512;
        expected.push((region * MIB + within, random_bytes(&mut rng, len)));
    }
    let mut set = JoinSet::new();
    for (i, (off, data)) in expected.iter().cloned().enumerate() {
        let c = client.clone();
        set.spawn(async move { c.write(off, data, i % 5 == 0).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("join").expect("write");
    }
    client.flush().await.expect("flush");

    let mut set = JoinSet::new();
    for (off, data) in expected.iter().cloned() {
        let c = client.clone();
        set.spawn(async move { (off, data.clone(), c.read(off, data.len() as u32).await) });
    }
    let mut checked = 0;
    while let Some(r) = set.join_next().await {
        let (off, data, got) = r.expect("join");
        let got = got.expect("read");
        assert!(
            got == data,
            "{:?}: read at {off} differs from what was written",
            peer.kind
        );
        checked += 1;
    }

    // The bytes really are where they belong on the server's disk.
    let on_disk = match peer.kind {
        PeerKind::EnbdServer => None,
        _ => Some(std::fs::read(&peer.data).expect("read backing file")),
    };
    if let Some(disk) = &on_disk {
        for (off, data) in &expected {
            assert!(
                disk[*off as usize..*off as usize + data.len()] == data[..],
                "{:?}: disk differs at {off}",
                peer.kind
            );
        }
    }

    // A read spanning several regions sees writes and untouched (zero) space alike.
    let span = client.read(0, (4 * MIB) as u32).await.expect("big read");
    assert_eq!(span.len(), (4 * MIB) as usize);
    for (off, data) in expected
        .iter()
        .filter(|(o, d)| o + d.len() as u64 <= 4 * MIB)
    {
        assert!(span[*off as usize..*off as usize + data.len()] == data[..]);
    }

    // WRITE_ZEROES (native or emulated) and TRIM.
    let zoff = expected[3].0;
    client
        .write_zeroes(zoff, 8192, false)
        .await
        .expect("write_zeroes");
    let z = client.read(zoff, 8192).await.expect("read zeroes");
    assert!(
        z.iter().all(|&b| b == 0),
        "{:?}: WRITE_ZEROES left data",
        peer.kind
    );
    if g.can_trim {
        client.trim(60 * MIB, MIB as u32).await.expect("trim");
    } else {
        assert_eq!(
            client.trim(60 * MIB, 4096).await,
            Err(IoError::Unsupported("TRIM"))
        );
    }

    // Requests outside the export are refused locally with EINVAL, the engine stays healthy.
    let err = client
        .read(g.size - 512, 4096)
        .await
        .expect_err("read past the end");
    assert_eq!(err.errno(), 22);

    let st = client.status();
    let completed: u64 = st.channels.iter().map(|c| c.completed).sum();
    assert_eq!(st.journal_requests, 0, "journal not empty: {st:?}");
    assert_eq!(st.state, EngineState::Healthy);
    println!(
        "{:?}: channels={}, {} writes + {checked} reads verified, {} requests completed, per channel {:?}",
        peer.kind,
        st.channels.len(),
        expected.len(),
        completed,
        st.channels.iter().map(|c| c.completed).collect::<Vec<_>>()
    );
    if g.multi_conn && channels > 1 {
        assert!(
            st.channels.iter().all(|c| c.completed > 0),
            "some channel carried no IO: {st:?}"
        );
    }
    client.shutdown().await;
}

async fn interop(kind: PeerKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = match kind {
        PeerKind::EnbdServer => start_enbd_server(dir.path()),
        _ => start_peer(kind, &sparse_file(dir.path(), SIZE)),
    };
    exercise(&peer, 1).await;
    exercise(&peer, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_interop_enbd_server() {
    interop(PeerKind::EnbdServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_interop_qemu_nbd() {
    interop(PeerKind::QemuNbd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_interop_nbdkit() {
    interop(PeerKind::Nbdkit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_interop_nbd_server() {
    interop(PeerKind::NbdServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refuses_unknown_export_and_dead_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = start_peer(PeerKind::QemuNbd, &sparse_file(dir.path(), SIZE));
    let err = Client::connect(ClientConfig::new(peer.server(), "nope"))
        .await
        .err()
        .expect("unknown export accepted");
    println!("unknown export: {err}");
    assert!(err.to_string().contains("nope"), "{err}");
    // Nothing listens on the peer's port once it is gone.
    let addr = peer.server();
    peer.kill();
    let mut cfg = ClientConfig::new(addr, "disk");
    cfg.connect_timeout = Duration::from_secs(2);
    let err = Client::connect(cfg)
        .await
        .err()
        .expect("dead address accepted");
    println!("dead address: {err}");
}
