//! The mirror's activity log and its `Waiting` status against real enbd-server processes on
//! 127.0.0.1 (each behind fault proxies, as in `engine_mirror.rs`). The node side "crashes"
//! by dropping the runtime the mirror runs on with writes in flight: no clean close, no
//! task gets to run again, every socket is closed. Replica content is checked in the
//! servers' data files.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::faultproxy::{FaultProxy, Kill};
use enbd_node::engine::mirror::activity::ActivityConfig;
use enbd_node::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig};
use enbd_node::engine::status::{MirrorState, ReplicaHealth};
use enbd_test_harness::EnbdServer;
use rand::{Rng, SeedableRng};

const VOLUME: &str = "demo";
const MIB: u64 = 1 << 20;

struct Replica {
    id: String,
    _server: EnbdServer,
    nbd: FaultProxy,
    mgmt: FaultProxy,
    dir: PathBuf,
}

impl Replica {
    async fn start(id: &str) -> Replica {
        let server = EnbdServer::builder().id(id).demo().start();
        let any = "127.0.0.1:0".parse().expect("addr");
        let nbd = FaultProxy::start(any, server.nbd()).await.expect("proxy");
        let mgmt = FaultProxy::start(any, server.mgmt()).await.expect("proxy");
        let dir = server.data_dir().join("volumes").join(VOLUME);
        Replica {
            id: id.to_owned(),
            _server: server,
            nbd,
            mgmt,
            dir,
        }
    }

    fn config(&self) -> ReplicaConfig {
        ReplicaConfig {
            id: self.id.clone(),
            nbd: self.nbd.local_addr().to_string(),
            mgmt: self.mgmt.local_addr().to_string(),
        }
    }

    /// Every connection reset and ended, new ones refused (see `FaultProxy::cut_off`).
    async fn cut(&self) {
        for p in [&self.nbd, &self.mgmt] {
            assert!(
                p.cut_off(Kill::Reset, Duration::from_secs(10)).await,
                "connections still live 10 s after the cut"
            );
        }
    }

    fn restore(&self) {
        for p in [&self.nbd, &self.mgmt] {
            p.refuse(false);
        }
    }

    fn read_file(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.dir.join("data")).expect("data file");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read data file");
        buf
    }

    /// Regions set in the server's activity log file (format of `store::bitmap`).
    fn activity_file(&self) -> Vec<u64> {
        let Ok(b) = std::fs::read(self.dir.join("activity.bitmap")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, byte) in b[16..].iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }
}

async fn replicas(n: usize) -> Vec<Replica> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Replica::start(&format!("srv-{i}")).await);
    }
    v
}

fn mirror_config(rs: &[Replica]) -> MirrorConfig {
    let mut c = MirrorConfig::new(VOLUME, rs.iter().map(Replica::config).collect());
    c.replica_timeout = Duration::from_secs(1);
    c.probe_interval = Duration::from_millis(100);
    c.client.connect_timeout = Duration::from_secs(1);
    c.client.reconnect_max = Duration::from_millis(200);
    c.client.channels = 2;
    c.activity = ActivityConfig {
        capacity: 1024,
        idle: Duration::from_millis(300),
        enabled: true,
    };
    c
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regions 20..24 (1 MiB each) get one 256 KiB write each at this offset within the region.
const HOT: std::ops::Range<u64> = 20..24;
const AT: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclean_stop_resyncs_the_logged_regions_only_before_reads_balance() {
    let rs = replicas(2).await;
    let mut cfg = mirror_config(&rs);
    // Room for the "crash" while srv-1's writes are held back: nothing may be dropped.
    cfg.replica_timeout = Duration::from_secs(20);

    // The node side, on a runtime of its own that is dropped with writes in flight.
    let node = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let m = node
        .spawn({
            let cfg = cfg.clone();
            async move { Mirror::open(cfg).await.expect("open") }
        })
        .await
        .expect("task");
    let old = pattern(1, 256 << 10);
    {
        let m = m.clone();
        let old = old.clone();
        node.spawn(async move {
            // Old content everywhere in the hot regions, and in region 10 (written, then idle).
            for r in HOT.chain([10]) {
                m.write(r * MIB + AT, old.clone(), false)
                    .await
                    .expect("write");
            }
            m.flush().await.expect("flush");
        })
        .await
        .expect("task");
    }
    wait_until("idle regions to leave the activity log", 20, || {
        m.status().activity.active_regions == 0 && rs.iter().all(|r| r.activity_file().is_empty())
    })
    .await;

    // srv-1's data path is held back: the new writes land on srv-0 only.
    rs[1].nbd.stall();
    let new = pattern(2, 256 << 10);
    for r in HOT {
        let m = m.clone();
        let new = new.clone();
        node.spawn(async move {
            let _ = m.write(r * MIB + AT, new, false).await;
        });
    }
    wait_until("the writes to land on srv-0", 20, || {
        HOT.clone()
            .all(|r| rs[0].read_file(r * MIB + AT, new.len()) == new)
    })
    .await;
    // Logged on both servers before anything was sent.
    for r in &rs {
        assert_eq!(r.activity_file(), HOT.collect::<Vec<_>>(), "{}", r.id);
    }
    // The crash: the node side is gone; srv-1 never gets the held-back writes.
    drop(m);
    node.shutdown_background();
    rs[1].nbd.kill_all(Kill::Reset);
    rs[1].nbd.resume();
    for r in HOT {
        assert_eq!(
            rs[1].read_file(r * MIB + AT, old.len()),
            old,
            "srv-1 region {r}"
        );
    }

    // Reopen: the log names the four regions; they are copied from srv-0 (same generation,
    // lowest id) before a read of them is served.
    let m = Mirror::open(cfg.clone()).await.expect("reopen");
    eprintln!("reopened: {:?} {:?}", m.status().state, m.status().waiting);
    wait_until("the reopened mirror to serve", 30, || {
        m.status().state != MirrorState::Waiting
    })
    .await;
    let st = m.status().activity;
    assert_eq!(st.found_at_open, HOT.count() as u64, "{st:?}");
    let first = HOT.start;
    let got = m
        .read(first * MIB + AT, new.len() as u32)
        .await
        .expect("read");
    assert_eq!(got, new, "the source's version is served");
    assert_eq!(
        rs[1].read_file(first * MIB + AT, new.len()),
        new,
        "a read of a logged region returned before the region was synced"
    );
    wait_until("the activity-log sync", 30, || {
        m.status().activity.unsynced_regions == 0
    })
    .await;
    let st = m.status().activity;
    assert_eq!(st.synced_regions, HOT.count() as u64, "{st:?}");
    assert_eq!(
        st.synced_bytes,
        HOT.count() as u64 * MIB,
        "only the logged regions are copied: {st:?}"
    );
    for r in HOT {
        assert_eq!(
            rs[0].read_file(r * MIB, MIB as usize),
            rs[1].read_file(r * MIB, MIB as usize),
            "region {r}"
        );
        for _ in 0..8 {
            assert_eq!(
                m.read(r * MIB + AT, 4096).await.expect("read"),
                new.slice(..4096)
            );
        }
    }
    // Never logged at the crash: not copied, and equal anyway.
    assert_eq!(rs[1].read_file(10 * MIB + AT, old.len()), old);
    assert_eq!(
        m.status().resync_bytes_copied,
        0,
        "no bitmap resync: nobody was OUT"
    );
    assert_eq!(m.status().state, MirrorState::Healthy);

    // A clean close empties the log: the next open copies nothing.
    m.shutdown().await;
    for r in &rs {
        assert!(
            r.activity_file().is_empty(),
            "{} logs {:?} after a clean close",
            r.id,
            r.activity_file()
        );
    }
    let m = Mirror::open(cfg).await.expect("reopen after a clean close");
    assert_eq!(m.status().activity.found_at_open, 0);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_last_in_sync_replica_under_io_says_waiting() {
    let rs = replicas(2).await;
    let m = Mirror::open(mirror_config(&rs)).await.expect("open");
    m.write(0, pattern(3, 4096), true).await.expect("write");
    rs[1].cut().await;
    m.write(0, pattern(4, 4096), true)
        .await
        .expect("write acknowledged with srv-1 gone");
    wait_until("srv-1 OUT", 20, || {
        let st = m.status();
        st.state == MirrorState::Degraded && st.replicas[1].health != ReplicaHealth::InSync
    })
    .await;
    // The last in-sync replica goes while a write is in flight: IO waits, and says why.
    rs[0].cut().await;
    let w = {
        let m = m.clone();
        tokio::spawn(async move { m.write(MIB, pattern(5, 4096), true).await })
    };
    wait_until("Waiting", 20, || m.status().state == MirrorState::Waiting).await;
    let st = m.status();
    let why = st.waiting.clone().expect("a reason");
    eprintln!("waiting: {why}");
    assert!(why.starts_with("no in-sync replica reachable"), "{why}");
    assert!(why.contains("srv-0 down"), "{why}");
    assert!(why.contains("srv-1"), "{why}");
    assert!(!w.is_finished(), "the write did not wait");
    // srv-0 back: the write completes, the volume serves again, degraded then healthy.
    rs[0].restore();
    tokio::time::timeout(Duration::from_secs(30), w)
        .await
        .expect("write finished")
        .expect("task")
        .expect("write");
    assert_ne!(m.status().state, MirrorState::Waiting);
    rs[1].restore();
    wait_until("healthy", 60, || m.status().state == MirrorState::Healthy).await;
    m.shutdown().await;
}
