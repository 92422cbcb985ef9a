//! The mirror against real enbd-server processes on 127.0.0.1: each replica is a server with
//! its own data directory and `--server-id`, reached through two fault proxies (NBD and
//! management) so a test can cut a replica off or restart its server behind a fixed address.
//! Replica content is checked in the servers' data files themselves.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::faultproxy::{FaultProxy, Kill};
use enbd_node::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig, promote};
use enbd_node::engine::status::{MirrorState, ReplicaHealth};
use enbd_node::engine::{BrownoutPolicy, IoError};
use enbd_proto::enbd::GetMembershipRequest;
use enbd_test_harness::EnbdServer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const VOLUME: &str = "demo";
const MIB: u64 = 1 << 20;

struct Replica {
    id: String,
    server: EnbdServer,
    nbd: FaultProxy,
    mgmt: FaultProxy,
}

impl Replica {
    async fn start(id: &str) -> Replica {
        let server = EnbdServer::builder().id(id).demo().start();
        let any = "127.0.0.1:0".parse().expect("addr");
        let nbd = FaultProxy::start(any, server.nbd()).await.expect("proxy");
        let mgmt = FaultProxy::start(any, server.mgmt()).await.expect("proxy");
        Replica {
            id: id.to_owned(),
            server,
            nbd,
            mgmt,
        }
    }

    fn config(&self) -> ReplicaConfig {
        ReplicaConfig {
            id: self.id.clone(),
            nbd: self.nbd.local_addr().to_string(),
            mgmt: self.mgmt.local_addr().to_string(),
        }
    }

    /// Cuts the replica off: every connection reset and ended, new ones refused (data and
    /// management). CI once saw a write sent right after a cut that did not wait reach the
    /// "stale" copy.
    async fn cut(&self) {
        for p in [&self.nbd, &self.mgmt] {
            assert!(
                p.cut_off(Kill::Reset, Duration::from_secs(10)).await,
                "{}: connections still live 10 s after the cut",
                self.id
            );
        }
    }

    fn restore(&self) {
        for p in [&self.nbd, &self.mgmt] {
            p.refuse(false);
        }
    }

    /// SIGKILL, then a new server on the same data directory behind the same proxies.
    fn restart(&mut self) {
        self.server.restart();
        self.nbd.set_upstream(self.server.nbd());
        self.mgmt.set_upstream(self.server.mgmt());
        self.nbd.kill_all(Kill::Reset);
        self.mgmt.kill_all(Kill::Reset);
    }

    fn data_file(&self) -> PathBuf {
        self.server
            .data_dir()
            .join("volumes")
            .join(VOLUME)
            .join("data")
    }

    fn read_file(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.data_file()).expect("data file");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read data file");
        buf
    }

    /// The generation its server holds, asked directly (not through the proxy).
    async fn generation(&self) -> u64 {
        let mut c = self.server.replica_client().await;
        c.get_membership(GetMembershipRequest {
            volume: VOLUME.into(),
        })
        .await
        .expect("GetMembership")
        .into_inner()
        .membership
        .map_or(0, |m| m.generation)
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
    c
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

/// Every replica's data file equals the first one's, chunk by chunk.
fn assert_identical(rs: &[Replica]) {
    use std::io::Read;
    let open = |r: &Replica| std::fs::File::open(r.data_file()).expect("data file");
    let mut first = open(&rs[0]);
    let mut others: Vec<_> = rs[1..].iter().map(open).collect();
    let mut a = vec![0u8; 4 << 20];
    let mut b = vec![0u8; 4 << 20];
    let mut off = 0u64;
    loop {
        let n = first.read(&mut a).expect("read");
        if n == 0 {
            break;
        }
        for (k, f) in others.iter_mut().enumerate() {
            f.read_exact(&mut b[..n]).expect("read");
            if a[..n] != b[..n] {
                let at = a[..n]
                    .iter()
                    .zip(&b[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                panic!(
                    "{} differs from {} at byte {}",
                    rs[k + 1].id,
                    rs[0].id,
                    off + at as u64
                );
            }
        }
        off += n as u64;
    }
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

async fn healthy(m: &Mirror, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while m.status().state != MirrorState::Healthy {
        assert!(
            Instant::now() < deadline,
            "mirror not healthy after {secs}s: {:#?}",
            m.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn degraded_with_out(m: &Mirror, idx: usize) {
    wait_until("replica OUT", 20, || {
        let st = m.status();
        st.state == MirrorState::Degraded
            && !matches!(st.replicas[idx].health, ReplicaHealth::InSync)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_replica_and_reads_balance() {
    let rs = replicas(3).await;
    let m = Mirror::open(mirror_config(&rs)).await.expect("open");
    assert_eq!(m.status().generation, 1);
    for (k, r) in rs.iter().enumerate() {
        assert_eq!(r.generation().await, 1, "replica {k}");
    }
    let data = pattern(1, 256 << 10);
    m.write(3 * MIB, data.clone(), false).await.expect("write");
    m.write(7 * MIB, data.clone(), true)
        .await
        .expect("fua write");
    m.flush().await.expect("flush");
    for r in &rs {
        assert_eq!(r.read_file(3 * MIB, data.len()), data, "{}", r.id);
        assert_eq!(r.read_file(7 * MIB, data.len()), data, "{}", r.id);
    }
    for _ in 0..60 {
        assert_eq!(
            m.read(3 * MIB, 4096).await.expect("read"),
            data.slice(..4096)
        );
    }
    let reads: Vec<u64> = m.status().replicas.iter().map(|r| r.reads).collect();
    eprintln!("reads per replica: {reads:?}");
    assert!(
        reads.iter().all(|&n| n >= 10),
        "reads not balanced: {reads:?}"
    );
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_replica_is_older_and_never_read() {
    let rs = replicas(2).await;
    let mut c = mirror_config(&rs);
    c.probe_interval = Duration::from_millis(100);
    let m = Mirror::open(c).await.expect("open");
    let old = pattern(2, 64 << 10);
    m.write(0, old.clone(), true).await.expect("write");
    rs[1].cut().await;
    let new = pattern(3, 64 << 10);
    m.write(0, new.clone(), true)
        .await
        .expect("write acknowledged with one replica gone");
    degraded_with_out(&m, 1).await;
    let (g0, g1) = (rs[0].generation().await, rs[1].generation().await);
    assert!(g1 < g0, "dropped replica generation {g1}, survivor {g0}");
    // The stale copy is really there, and never served.
    assert_eq!(rs[1].read_file(0, old.len()), old);
    let before = m.status().replicas[1].reads;
    for _ in 0..40 {
        assert_eq!(m.read(0, 64 << 10).await.expect("read"), new, "stale read");
    }
    assert_eq!(
        m.status().replicas[1].reads,
        before,
        "an OUT replica served reads"
    );
    // Back: resynced, then identical.
    rs[1].restore();
    healthy(&m, 60).await;
    m.flush().await.expect("flush");
    assert_eq!(rs[1].read_file(0, new.len()), new);
    m.shutdown().await;
}

/// Writes every 4 KiB block of `span` bytes at `base` once, in random order; returns bytes.
async fn dense_writes(m: &Mirror, base: u64, span: u64, seed: u64) -> u64 {
    let mut blocks: Vec<u64> = (0..span / 4096).collect();
    blocks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    for (k, b) in blocks.iter().enumerate() {
        m.write(base + b * 4096, pattern(seed + k as u64, 4096), false)
            .await
            .expect("write");
    }
    span
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_copies_only_dirty_regions() {
    let rs = replicas(2).await;
    let m = Mirror::open(mirror_config(&rs)).await.expect("open");
    rs[1].cut().await;
    // Dense: 8 MiB of 4 KiB writes in random order, covering their regions (the first one
    // finds srv-1 gone and drops it).
    let written = dense_writes(&m, 100 * MIB, 8 * MIB, 10).await;
    degraded_with_out(&m, 1).await;
    let before = m.status().resync_bytes_copied;
    rs[1].restore();
    healthy(&m, 120).await;
    let copied = m.status().resync_bytes_copied - before;
    let ratio = copied as f64 / written as f64;
    eprintln!("dense: written {written} bytes, resync copied {copied} bytes, ratio {ratio:.3}");
    assert!(
        copied as f64 <= 1.1 * written as f64,
        "copied {copied} for {written} written"
    );
    assert!(copied >= 8 * MIB, "copied {copied}: less than was written");
    m.flush().await.expect("flush");
    assert_identical(&rs);

    // Scattered: 32 random 4 KiB writes over the whole volume.
    rs[1].cut().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let size = m.geometry().size;
    let mut written = 0;
    for k in 0..32u64 {
        let off = rng.random_range(0..size / 4096) * 4096;
        m.write(off, pattern(100 + k, 4096), false)
            .await
            .expect("write");
        written += 4096;
    }
    degraded_with_out(&m, 1).await;
    let before = m.status().resync_bytes_copied;
    rs[1].restore();
    healthy(&m, 180).await;
    let copied = m.status().resync_bytes_copied - before;
    eprintln!(
        "scattered: written {written} bytes, resync copied {copied} bytes, ratio {:.1}",
        copied as f64 / written as f64
    );
    assert!(
        copied <= 32 * MIB,
        "copied {copied}: more than the touched regions"
    );
    m.flush().await.expect("flush");
    assert_identical(&rs);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_resumes_after_the_mirror_is_reopened() {
    let rs = replicas(2).await;
    let mut c = mirror_config(&rs);
    c.resync_bytes_per_sec = Some(4 * MIB);
    c.resync_batch = 2;
    let m = Mirror::open(c.clone()).await.expect("open");
    rs[1].cut().await;
    let mut written = 0;
    for k in 0..32u64 {
        m.write(k * MIB, pattern(200 + k, MIB as usize), false)
            .await
            .expect("write");
        written += MIB;
    }
    degraded_with_out(&m, 1).await;
    rs[1].restore();
    let t0 = Instant::now();
    wait_until("part of the resync", 60, || {
        m.status().resync_bytes_copied >= 6 * MIB
    })
    .await;
    // The copy honours its 4 MiB/s limit: 6 regions start no sooner than 5/4 s apart.
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "limit ignored: {:?}",
        t0.elapsed()
    );
    match m.status().replicas[1].health {
        ReplicaHealth::Resyncing {
            bytes_per_sec,
            to_copy,
            ..
        } => {
            assert!(bytes_per_sec <= 8.0 * MIB as f64, "rate {bytes_per_sec}");
            assert_eq!(to_copy, written);
        }
        ref h => panic!("srv-1 is {h:?} mid-resync"),
    }
    let first = m.status().resync_bytes_copied;
    // The node side goes away mid-resync.
    m.shutdown().await;
    drop(m);
    c.resync_bytes_per_sec = None;
    let m = Mirror::open(c).await.expect("reopen");
    healthy(&m, 120).await;
    let second = m.status().resync_bytes_copied;
    eprintln!("resume: {written} dirty, first mirror copied {first}, second {second}");
    assert!(
        second <= written - first + 2 * MIB,
        "the second mirror copied {second}: it did not resume (first copied {first})"
    );
    m.flush().await.expect("flush");
    assert_identical(&rs);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_survives_a_server_restart() {
    let mut rs = replicas(2).await;
    let mut c = mirror_config(&rs);
    c.resync_bytes_per_sec = Some(4 * MIB);
    c.resync_batch = 2;
    let m = Mirror::open(c).await.expect("open");
    rs[1].cut().await;
    for k in 0..24u64 {
        m.write(k * MIB, pattern(300 + k, MIB as usize), false)
            .await
            .expect("write");
    }
    degraded_with_out(&m, 1).await;
    rs[1].restore();
    wait_until("part of the resync", 60, || {
        m.status().resync_bytes_copied >= 4 * MIB
    })
    .await;
    // The target's server restarts mid-copy; application writes go on.
    rs[1].restart();
    for k in 0..8u64 {
        m.write(k * 3 * MIB + 4096, pattern(400 + k, 8192), false)
            .await
            .expect("write during the restart");
    }
    // Then the source's (the only in-sync replica's) server restarts: IO and the copy wait
    // for it and go on.
    let at = m.status().resync_bytes_copied;
    wait_until("more of the resync", 60, || {
        m.status().resync_bytes_copied >= at + 2 * MIB || m.status().state == MirrorState::Healthy
    })
    .await;
    rs[0].restart();
    let probe = pattern(500, 4096);
    m.write(5 * MIB, probe.clone(), true)
        .await
        .expect("write across the source's restart");
    assert_eq!(m.read(5 * MIB, 4096).await.expect("read"), probe);
    healthy(&m, 120).await;
    m.flush().await.expect("flush");
    assert_identical(&rs);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_two_in_turn() {
    let rs = replicas(3).await;
    let m = Mirror::open(mirror_config(&rs)).await.expect("open");
    let a = pattern(20, 128 << 10);
    let b = pattern(21, 128 << 10);
    let d = pattern(22, 128 << 10);
    m.write(0, a.clone(), false).await.expect("write");
    rs[0].cut().await;
    m.write(MIB, b.clone(), false).await.expect("write");
    degraded_with_out(&m, 0).await;
    rs[1].cut().await;
    m.write(2 * MIB, d.clone(), true).await.expect("write");
    degraded_with_out(&m, 1).await;
    for (off, want) in [(0, &a), (MIB, &b), (2 * MIB, &d)] {
        assert_eq!(&m.read(off, want.len() as u32).await.expect("read"), want);
    }
    let st = m.status();
    assert_eq!(st.replicas[2].health, ReplicaHealth::InSync);
    assert!(rs[0].generation().await < rs[2].generation().await);
    assert!(rs[1].generation().await < rs[2].generation().await);
    rs[0].restore();
    rs[1].restore();
    healthy(&m, 120).await;
    m.flush().await.expect("flush");
    assert_identical(&rs);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_in_sync_replica_gone_waits_until_promoted() {
    let rs = replicas(2).await;
    let mut c = mirror_config(&rs);
    // No resync: the stale replica must stay stale for this test.
    c.probe_interval = Duration::from_secs(3600);
    let m = Mirror::open(c.clone()).await.expect("open");
    let old = pattern(30, 64 << 10);
    let new = pattern(31, 64 << 10);
    m.write(0, old.clone(), true).await.expect("write");
    rs[1].cut().await;
    m.write(0, new.clone(), true).await.expect("write");
    degraded_with_out(&m, 1).await;
    m.shutdown().await;
    drop(m);
    // The node restarts while the only in-sync replica is away; the stale one is back.
    rs[0].cut().await;
    rs[1].restore();
    c.brownout = BrownoutPolicy::FailAfter(Duration::from_secs(2));
    c.probe_interval = Duration::from_millis(100);
    let m = Mirror::open(c.clone())
        .await
        .expect("open in the waiting state");
    let st = m.status();
    assert_eq!(st.state, MirrorState::Waiting, "{st:#?}");
    assert!(
        st.waiting.as_deref().unwrap_or("").contains("srv-0"),
        "{st:#?}"
    );
    let e = m.read(0, 4096).await.err();
    assert!(matches!(e, Some(IoError::BrownoutTimeout(_))), "{e:?}");
    let e = m.write(0, pattern(32, 4096), false).await.err();
    assert!(matches!(e, Some(IoError::BrownoutTimeout(_))), "{e:?}");
    assert_eq!(
        m.status().replicas[1].reads,
        0,
        "the stale replica served a read"
    );
    m.shutdown().await;
    drop(m);
    // The operator gives up on srv-0 and accepts the loss of `new`.
    let rec = promote(&c, "srv-1").await.expect("promote");
    assert!(rec.generation > 2);
    // From here on the test is about data, not timing: the 2 s brownout bound above could
    // fail a read while srv-1's channels still connect on a loaded machine, so reads wait
    // (bounded by the timeout below, which names the step that hung).
    c.brownout = BrownoutPolicy::Wait;
    let m = Mirror::open(c).await.expect("open after promote");
    let first = tokio::time::timeout(Duration::from_secs(60), m.read(0, old.len() as u32))
        .await
        .expect("the read after promote hung for 60 s");
    assert_eq!(first.expect("read after promote"), old);
    // srv-0 returns: it is OUT now (whole volume dirty, resynced from srv-1 in the
    // background) and never read.
    rs[0].restore();
    for _ in 0..20 {
        assert_eq!(m.read(0, old.len() as u32).await.expect("read"), old);
    }
    assert_eq!(
        m.status().replicas[0].reads,
        0,
        "the superseded replica served a read"
    );
    assert_ne!(m.status().replicas[0].health, ReplicaHealth::InSync);
    m.shutdown().await;
}

/// The attach layer's side of a mirrored volume, without a ublk device: a state record with
/// two replicas opens a `Mirror` behind the device target; IO through the target continues
/// with one replica cut off (the condition says which one is behind); after the record went
/// through the state file and the mirror was closed, reopening from it (a daemon restart's
/// takeover) resyncs the replica and the servers' data files end up identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_backing_serves_a_mirror_from_its_state_record_and_reopens_it() {
    use enbd_node::backing::{Backing, BackingStatus, EngineTarget, mirror_problem};
    use enbd_node::device::{BlockRequest, BlockTarget};
    use enbd_node::state::{AttachmentRecord, ReplicaRecord, StateStore};

    let rs = replicas(2).await;
    let record = AttachmentRecord {
        tls: false,
        access_token: None,
        access_plaintext: false,
        volume_id: "pvc-demo".into(),
        dev_id: 0,
        servers: rs.iter().map(|r| r.config().nbd).collect(),
        export: VOLUME.into(),
        channels: 2,
        queues: 1,
        queue_depth: 64,
        brownout: "wait".into(),
        read_only: false,
        size_bytes: 0,
        replicas: rs
            .iter()
            .map(|r| {
                let c = r.config();
                ReplicaRecord {
                    id: c.id,
                    nbd: c.nbd,
                    mgmt: c.mgmt,
                }
            })
            .collect(),
        replica_timeout_ms: 1000,
        resync_bytes_per_sec: 0,
    };
    let mirror_of = |b: &Backing| match b {
        Backing::Mirror(m) => m.clone(),
        Backing::Single(_) => panic!("a mirrored record opened a single-copy client"),
    };
    let b = Backing::connect(&record, BrownoutPolicy::Wait, 64 << 20, None, None)
        .await
        .expect("open mirror");
    let m = mirror_of(&b);
    healthy(&m, 20).await;
    let target = EngineTarget::new(b.clone(), enbd_node::metrics::VolumeIo::new());
    let write = |offset: u64, seed: u64| BlockRequest::Write {
        offset,
        data: pattern(seed, 256 << 10),
        fua: true,
    };
    target
        .submit(write(0, 1))
        .await
        .expect("write, both in sync");
    let back = target
        .submit(BlockRequest::Read {
            offset: 0,
            len: 256 << 10,
        })
        .await
        .expect("read");
    assert_eq!(back, pattern(1, 256 << 10));

    rs[1].cut().await;
    for i in 0..8u64 {
        target
            .submit(write(MIB * (4 + i), 10 + i))
            .await
            .expect("write with one replica cut off");
    }
    target.submit(BlockRequest::Flush).await.expect("flush");
    degraded_with_out(&m, 1).await;
    let BackingStatus::Mirror(st) = b.status() else {
        panic!("not a mirror status")
    };
    let problem = mirror_problem(&st).expect("degraded is a problem");
    assert!(problem.contains("srv-1"), "{problem}");
    b.shutdown().await;

    // The takeover path: the record as the state file returns it, reopened.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(dir.path()).expect("store");
    store.save(std::slice::from_ref(&record)).expect("save");
    let loaded = store.load().expect("load").pop().expect("one record");
    assert_eq!(loaded, record);
    rs[1].restore();
    let b = Backing::connect(&loaded, BrownoutPolicy::Wait, 64 << 20, None, None)
        .await
        .expect("reopen mirror");
    let m = mirror_of(&b);
    healthy(&m, 60).await;
    assert!(mirror_problem(&m.status()).is_none());
    b.shutdown().await;
    assert_identical(&rs);
    assert_eq!(rs[1].read_file(4 * MIB, 256 << 10), pattern(10, 256 << 10));
}
