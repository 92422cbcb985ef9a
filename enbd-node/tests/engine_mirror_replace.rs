//! Changing a mirror's replica set and size against real enbd-server processes on 127.0.0.1:
//! replacing a replica whose server is gone for good (full copy, throttled, resumed after the
//! node side restarts, found again from the servers' records), and online growth. Replica
//! content is checked in the servers' data files themselves.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod engine_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_e2e::faultproxy::FaultProxy;
use enbd_node::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig};
use enbd_node::engine::status::{MirrorState, ReplicaHealth};
use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_proto::enbd::{
    CreateVolumeRequest, ExpandVolumeRequest, GetMembershipRequest, GetVolumeRequest, Membership,
};
use enbd_test_harness::EnbdServer;
use rand::{Rng, SeedableRng};

const VOLUME: &str = "rep";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

/// One enbd-server with its own data directory, behind an NBD and a management proxy.
struct Server {
    id: String,
    server: EnbdServer,
    nbd: FaultProxy,
    mgmt: FaultProxy,
}

impl Server {
    async fn start(id: &str) -> Server {
        let server = EnbdServer::builder().id(id).start();
        let any = "127.0.0.1:0".parse().expect("addr");
        let nbd = FaultProxy::start(any, server.nbd()).await.expect("proxy");
        let mgmt = FaultProxy::start(any, server.mgmt()).await.expect("proxy");
        Server {
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

    async fn volumes(&self) -> VolumeServiceClient<tonic::transport::Channel> {
        VolumeServiceClient::connect(format!("http://{}", self.server.mgmt()))
            .await
            .expect("mgmt connect")
    }

    async fn create(&self, size: u64) {
        self.volumes()
            .await
            .create_volume(CreateVolumeRequest {
                name: VOLUME.into(),
                size_bytes: size,
                source: None,
                labels: [("csi-name".to_owned(), "pvc-rep".to_owned())].into(),
            })
            .await
            .expect("create volume");
    }

    async fn expand(&self, size: u64) {
        self.volumes()
            .await
            .expand_volume(ExpandVolumeRequest {
                name: VOLUME.into(),
                size_bytes: size,
            })
            .await
            .expect("expand volume");
    }

    /// The membership record its server holds, asked directly (not through the proxy).
    async fn record(&self) -> Membership {
        ReplicaServiceClient::connect(format!("http://{}", self.server.mgmt()))
            .await
            .expect("mgmt connect")
            .get_membership(GetMembershipRequest {
                volume: VOLUME.into(),
            })
            .await
            .expect("GetMembership")
            .into_inner()
            .membership
            .unwrap_or_default()
    }

    /// Gone for good: the process is killed and its proxies refuse.
    fn destroy(&mut self) {
        for p in [&self.nbd, &self.mgmt] {
            p.refuse(true);
            p.kill_all(enbd_e2e::faultproxy::Kill::Reset);
        }
        // Killed, but its data directory stays readable for the checks that follow.
        self.server.kill();
    }

    fn data_file(&self) -> PathBuf {
        self.server
            .data_dir()
            .join("volumes")
            .join(VOLUME)
            .join("data")
    }
}

fn mirror_config(replicas: Vec<ReplicaConfig>) -> MirrorConfig {
    let mut c = MirrorConfig::new(VOLUME, replicas);
    c.replica_timeout = Duration::from_secs(1);
    c.probe_interval = Duration::from_millis(100);
    c.client.connect_timeout = Duration::from_secs(1);
    c.client.reconnect_max = Duration::from_millis(200);
    c.client.channels = 2;
    c.resync_batch = 2;
    c
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

/// Byte-for-byte equality of two servers' data files (same length too).
fn assert_same_file(a: &Server, b: &Server) {
    let x = std::fs::read(a.data_file()).expect("read a");
    let y = std::fs::read(b.data_file()).expect("read b");
    assert_eq!(x.len(), y.len(), "{} and {} differ in length", a.id, b.id);
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} differs from {} at byte {at}", b.id, a.id);
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

fn ids(m: &Membership) -> Vec<String> {
    m.members.iter().map(|x| x.replica_id.clone()).collect()
}

/// Two servers with a fresh volume, a spare without it, and a mirror over the first two
/// with content written while both were in sync; then the second server is destroyed and a
/// write makes the mirror drop it.
async fn degraded_pair() -> (Vec<Server>, Mirror, MirrorConfig) {
    let rs = vec![
        Server::start("srv-a").await,
        Server::start("srv-b").await,
        Server::start("srv-c").await,
    ];
    rs[0].create(SIZE).await;
    rs[1].create(SIZE).await;
    let cfg = mirror_config(vec![rs[0].config(), rs[1].config()]);
    let m = Mirror::open(cfg.clone()).await.expect("open");
    for k in 0..SIZE / MIB {
        m.write(k * MIB, pattern(k, MIB as usize), false)
            .await
            .expect("write");
    }
    (rs, m, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_with_writes_in_flight_gives_the_new_replica_a_full_copy() {
    let (mut rs, m, _) = degraded_pair().await;
    rs[1].destroy();
    m.write(3 * MIB, pattern(100, 8192), true)
        .await
        .expect("write while srv-b is lost");
    assert!(matches!(
        m.status().replicas[1].health,
        ReplicaHealth::Out | ReplicaHealth::Down
    ));
    let g_before = rs[0].record().await.generation;

    // A writer keeps going during the replacement and the copy.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (m, stop, written) = (m.clone(), stop.clone(), written.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = 4096 * rng.random_range(1..=16u64);
                let off = rng.random_range(0..(SIZE - len) / 4096) * 4096;
                m.write(off, pattern(1000 + n, len as usize), n.is_multiple_of(7))
                    .await
                    .expect("application write during the replacement");
                written.fetch_add(len, Ordering::Relaxed);
                n += 1;
            }
            n
        })
    };
    wait_until("the writer under way", 10, || {
        written.load(Ordering::Relaxed) > 0
    })
    .await;
    let done = m.replace("srv-b", rs[2].config()).await.expect("replace");
    assert!(done.created, "the new server had no copy: it was created");
    assert!(done.record.generation > g_before);
    assert_eq!(
        m.replica_configs()
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec!["srv-a", "srv-c"],
        "the new replica takes the old one's place"
    );
    // A second replacement by the same server is refused (already a member).
    assert!(m.replace("srv-b", rs[2].config()).await.is_err());
    healthy(&m, 120).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer");
    m.flush().await.expect("flush");
    let st = m.status();
    eprintln!(
        "replace: {writes} writes ({} bytes) in flight, {} bytes copied, generation {g_before} -> {}",
        written.load(Ordering::Relaxed),
        st.resync_bytes_copied,
        st.generation
    );
    assert!(
        st.resync_bytes_copied >= SIZE,
        "a full copy is the whole volume"
    );
    // The new replica's data file equals the survivor's; the old one is no longer a member.
    assert_same_file(&rs[0], &rs[2]);
    for s in [&rs[0], &rs[2]] {
        let rec = s.record().await;
        assert_eq!(ids(&rec), vec!["srv-a", "srv-c"], "{}", s.id);
        assert_eq!(rec.generation, st.generation, "{}", s.id);
        let c = rec
            .members
            .iter()
            .find(|x| x.replica_id == "srv-c")
            .expect("srv-c");
        assert_eq!(
            c.data_address,
            rs[2].config().nbd,
            "the record names srv-c's endpoint"
        );
        assert_eq!(c.mgmt_url, format!("http://{}", rs[2].config().mgmt));
    }
    // The new copy carries the volume's labels, so the controller sees it as the same volume.
    let labels = rs[2]
        .volumes()
        .await
        .get_volume(GetVolumeRequest {
            name: VOLUME.into(),
        })
        .await
        .expect("get volume")
        .into_inner()
        .volume
        .expect("volume")
        .labels;
    assert_eq!(labels.get("csi-name").map(String::as_str), Some("pvc-rep"));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_copy_is_throttled_and_resumes_after_the_node_side_restarts() {
    let (mut rs, m, old_cfg) = degraded_pair().await;
    rs[1].destroy();
    m.write(0, pattern(200, 4096), true)
        .await
        .expect("write while srv-b is lost");
    const LIMIT: u64 = 8 * MIB;
    m.set_resync_limit(Some(LIMIT));
    m.replace("srv-b", rs[2].config()).await.expect("replace");
    let t0 = Instant::now();
    wait_until("part of the copy", 60, || {
        m.status().resync_bytes_copied >= 16 * MIB
    })
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let first = m.status().resync_bytes_copied;
    let rate = first as f64 / elapsed;
    eprintln!(
        "throttle: {first} bytes in {elapsed:.2}s = {:.2} MiB/s (limit {} MiB/s)",
        rate / MIB as f64,
        LIMIT / MIB
    );
    // The limit paces each region's start: n regions take at least (n-1)/limit.
    let floor = (first - MIB) as f64 / LIMIT as f64;
    assert!(
        elapsed >= floor * 0.9,
        "limit ignored: {first} bytes in {elapsed:.2}s"
    );
    assert!(rate <= 1.5 * LIMIT as f64, "rate {rate}");
    match m.status().replicas[1].health {
        ReplicaHealth::Resyncing { to_copy, .. } => assert_eq!(to_copy, SIZE),
        ref h => panic!("srv-c is {h:?} mid-copy"),
    }
    // The node side goes away mid-copy, and comes back with the *old* replica list (as the
    // volume context still has it): the servers' records lead it to the new set.
    m.shutdown().await;
    drop(m);
    let m = Mirror::open(old_cfg)
        .await
        .expect("reopen from the old list");
    assert_eq!(
        m.replica_configs()
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec!["srv-a", "srv-c"],
        "followed the newest record"
    );
    healthy(&m, 120).await;
    let second = m.status().resync_bytes_copied;
    eprintln!("resume: first mirror copied {first}, second {second} of {SIZE}");
    assert!(
        second <= SIZE - first + 2 * MIB,
        "the second mirror copied {second}: it did not resume (first copied {first})"
    );
    m.flush().await.expect("flush");
    assert_same_file(&rs[0], &rs[2]);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replacements_are_refused_and_change_nothing() {
    let (mut rs, m, cfg) = degraded_pair().await;
    // Healthy pair: replacing the only other in-sync member leaves srv-a, fine; but an
    // unknown member or a member as its own replacement is refused.
    assert!(m.replace("srv-x", rs[2].config()).await.is_err());
    assert!(m.replace("srv-b", rs[0].config()).await.is_err());
    // A new server whose volume exists with another size is refused, changing nothing.
    rs[2].create(SIZE / 2).await;
    let g = m.status().generation;
    let e = m
        .replace("srv-b", rs[2].config())
        .await
        .expect_err("size mismatch");
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(m.status().generation, g);
    assert_eq!(rs[0].record().await.generation, g);
    // Reopened while srv-b (in sync) does not answer, IO waits: it might hold writes srv-a
    // lacks, so replacing it is refused until a survivor is promoted.
    m.shutdown().await;
    drop(m);
    rs[1].destroy();
    let m = Mirror::open(cfg).await.expect("open, waiting");
    assert_eq!(m.status().state, MirrorState::Waiting);
    let e = m
        .replace("srv-b", rs[2].config())
        .await
        .expect_err("IO waits");
    assert!(e.to_string().contains("promote a survivor first"), "{e}");
    assert_eq!(rs[0].record().await.generation, g);
    m.promote("srv-a").await.expect("promote");
    let e = m
        .replace("srv-b", rs[2].config())
        .await
        .expect_err("srv-c still has the wrong size");
    assert!(e.to_string().contains("already exists"), "{e}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_mirror_grows_online_once_every_replica_grew() {
    let rs = vec![Server::start("srv-a").await, Server::start("srv-b").await];
    const OLD: u64 = 16 * MIB;
    const NEW: u64 = 32 * MIB;
    for s in &rs {
        s.create(OLD).await;
    }
    let m = Mirror::open(mirror_config(vec![rs[0].config(), rs[1].config()]))
        .await
        .expect("open");
    m.write(OLD - 4096, pattern(1, 4096), false)
        .await
        .expect("write at the old end");
    assert!(
        m.read(OLD, 4096).await.is_err(),
        "past the end before growth"
    );
    // Only one replica grew: the mirror keeps its size and says why.
    rs[0].expand(NEW).await;
    let e = m.refresh_size().await.expect_err("replicas disagree");
    assert!(e.to_string().contains("do not agree"), "{e}");
    assert_eq!(m.geometry().size, OLD);
    rs[1].expand(NEW).await;
    assert_eq!(m.refresh_size().await.expect("grow"), NEW);
    assert_eq!(m.geometry().size, NEW);
    let tail = pattern(2, 64 << 10);
    m.write(NEW - (64 << 10), tail.clone(), true)
        .await
        .expect("write past the old end");
    assert_eq!(
        m.read(NEW - (64 << 10), 64 << 10).await.expect("read"),
        tail
    );
    assert_eq!(
        m.read(OLD - 4096, 4096).await.expect("read"),
        pattern(1, 4096)
    );
    // A second refresh changes nothing.
    assert_eq!(m.refresh_size().await.expect("again"), NEW);
    m.flush().await.expect("flush");
    assert_eq!(m.status().state, MirrorState::Healthy);
    assert_same_file(&rs[0], &rs[1]);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_replacement_changes_the_records_and_the_next_open_copies() {
    use enbd_node::engine::mirror::promote;
    use enbd_node::engine::mirror::replace::replace_detached;
    let (mut rs, m, old_cfg) = degraded_pair().await;
    m.flush().await.expect("flush");
    m.shutdown().await;
    drop(m);
    rs[1].destroy();
    // srv-b is still in sync in the record and does not answer: it might hold writes srv-a
    // lacks, so the replacement is refused until a survivor is promoted.
    let e = replace_detached(&old_cfg, "srv-b", rs[2].config())
        .await
        .expect_err("in-sync replica unreachable");
    assert!(e.to_string().contains("promote"), "{e}");
    promote(&old_cfg, "srv-a").await.expect("promote srv-a");
    let done = replace_detached(&old_cfg, "srv-b", rs[2].config())
        .await
        .expect("replace");
    assert!(done.created);
    // A retry (the same command again) completes or confirms it, changing nothing.
    let again = replace_detached(&old_cfg, "srv-b", rs[2].config())
        .await
        .expect("retry");
    assert_eq!(again.record.generation, done.record.generation);
    for s in [&rs[0], &rs[2]] {
        let rec = s.record().await;
        assert_eq!(ids(&rec), vec!["srv-a", "srv-c"], "{}", s.id);
        assert_eq!(rec.generation, done.record.generation, "{}", s.id);
    }
    // The next open, from the old list, follows the records and copies everything.
    let m = Mirror::open(old_cfg).await.expect("open");
    healthy(&m, 120).await;
    assert!(m.status().resync_bytes_copied >= SIZE);
    m.flush().await.expect("flush");
    assert_same_file(&rs[0], &rs[2]);
    m.shutdown().await;
}
