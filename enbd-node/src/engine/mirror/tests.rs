//! The mirror's rules against in-memory replicas (see `fake`): fan-out, balancing, drops,
//! resync of dirty regions only, waiting instead of guessing, and promote.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::fake::FakeServer;
use super::membership::MemberState;
use super::*;

const SIZE: usize = 8 << 20;
const RB: u32 = 64 << 10;

fn cfg(n: usize) -> MirrorConfig {
    let replicas = (0..n)
        .map(|i| ReplicaConfig {
            id: format!("r{i}"),
            nbd: format!("127.0.0.1:{}", 1000 + i),
            mgmt: format!("127.0.0.1:{}", 2000 + i),
        })
        .collect();
    let mut c = MirrorConfig::new("vol", replicas);
    c.region_bytes = RB;
    c.probe_interval = Duration::from_millis(10);
    c.brownout = BrownoutPolicy::FailAfter(Duration::from_millis(300));
    c
}

fn servers(n: usize) -> Vec<FakeServer> {
    (0..n)
        .map(|i| FakeServer::new(&format!("r{i}"), SIZE))
        .collect()
}

async fn open(c: &MirrorConfig, s: &[FakeServer]) -> Mirror {
    Mirror::open_with(c.clone(), s.iter().map(FakeServer::backend).collect())
        .await
        .expect("open")
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add(i as u8))
            .collect::<Vec<u8>>(),
    )
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn fresh_replicas_get_a_first_record_and_every_write() {
    let s = servers(3);
    let m = open(&cfg(3), &s).await;
    assert_eq!(m.status().generation, 1);
    assert_eq!(m.status().state, MirrorState::Healthy);
    m.write(4096, pattern(7, 8192), false).await.expect("write");
    m.write_zeroes(0, 4096, false).await.expect("zeroes");
    m.flush().await.expect("flush");
    for srv in &s {
        let st = srv.lock();
        assert_eq!(st.record.generation, 1);
        assert_eq!(&st.data[4096..12288], &pattern(7, 8192)[..]);
    }
    for _ in 0..30 {
        m.read(4096, 4096).await.expect("read");
    }
    for srv in &s {
        let n = srv.reads.load(Ordering::Relaxed);
        assert!(n >= 5, "reads not balanced: {n} of 30 on {}", srv.lock().id);
    }
}

#[tokio::test]
async fn first_record_is_refused_unless_all_fresh() {
    let s = servers(2);
    s[1].lock().written = true;
    let err = Mirror::open_with(cfg(2), s.iter().map(FakeServer::backend).collect())
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("not a fresh"), "{err}");
    let s = servers(2);
    s[1].set_up(false);
    let err = Mirror::open_with(cfg(2), s.iter().map(FakeServer::backend).collect())
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[tokio::test]
async fn failed_replica_is_dropped_before_the_ack_and_never_read() {
    let s = servers(2);
    let mut c = cfg(2);
    // No resync while this test looks at the degraded state.
    c.probe_interval = Duration::from_secs(3600);
    let m = open(&c, &s).await;
    m.write(0, pattern(1, 4096), false).await.expect("write");
    s[1].set_up(false);
    m.write(RB as u64 * 3, pattern(2, 4096), false)
        .await
        .expect("write with one replica down is acknowledged");
    // The survivor holds the record that drops r1, with the write's region dirty.
    {
        let st = s[0].lock();
        assert_eq!(st.record.generation, 2);
        assert_eq!(st.record.state_of("r1"), Some(MemberState::Out));
        assert!(st.bitmaps["r1"].contains(&3), "{:?}", st.bitmaps);
    }
    s[1].set_up(true);
    let before = s[1].reads.load(Ordering::Relaxed);
    for _ in 0..20 {
        let b = m.read(RB as u64 * 3, 4096).await.expect("read");
        assert_eq!(b, pattern(2, 4096), "stale read");
    }
    assert_eq!(
        s[1].reads.load(Ordering::Relaxed),
        before,
        "an OUT replica was read"
    );
    let st = m.status();
    assert_eq!(st.state, MirrorState::Degraded);
    assert_eq!(st.replicas[1].health, ReplicaHealth::Out);
}

#[tokio::test]
async fn returning_replica_is_resynced_with_only_dirty_regions() {
    let s = servers(2);
    let m = open(&cfg(2), &s).await;
    s[1].set_up(false);
    // 8 regions written densely while r1 is away.
    let mut written = 0u64;
    for k in 0..(8 * RB as u64 / 4096) {
        m.write(RB as u64 * 10 + k * 4096, pattern(k as u8, 4096), false)
            .await
            .expect("write");
        written += 4096;
    }
    assert_eq!(s[0].lock().record.state_of("r1"), Some(MemberState::Out));
    s[1].set_up(true);
    wait_for("resync to finish", || {
        m.status().state == MirrorState::Healthy
    })
    .await;
    let copied = m.status().resync_bytes_copied;
    assert_eq!(copied, written, "copied {copied} for {written} written");
    assert_eq!(s[0].lock().data, s[1].lock().data);
    let g = s[0].lock().record.generation;
    assert_eq!(g, 4, "drop, resyncing, in sync");
    assert_eq!(s[1].lock().record.generation, g);
    assert!(s[0].lock().bitmaps.is_empty());
}

#[tokio::test]
async fn resync_orders_copies_against_application_writes() {
    let s = servers(2);
    let m = open(&cfg(2), &s).await;
    s[1].set_up(false);
    for k in 0..64u64 {
        m.write(k * RB as u64, pattern(k as u8, RB as usize), false)
            .await
            .expect("write");
    }
    s[1].set_up(true);
    // Application writes race the copy over the same regions.
    let mut k = 0u64;
    while m.status().state != MirrorState::Healthy {
        m.write((k % 64) * RB as u64 + 512, pattern(200, 1024), false)
            .await
            .expect("write during resync");
        k += 1;
        tokio::task::yield_now().await;
    }
    assert_eq!(
        s[0].lock().data,
        s[1].lock().data,
        "replicas differ after resync"
    );
}

#[tokio::test]
async fn last_in_sync_replica_failing_blocks_io_and_is_not_dropped() {
    let s = servers(2);
    let mut c = cfg(2);
    c.probe_interval = Duration::from_secs(3600);
    let m = open(&c, &s).await;
    s[1].set_up(false);
    m.write(0, pattern(3, 4096), false).await.expect("write");
    s[0].set_up(false);
    let e = m.write(0, pattern(4, 4096), false).await.err();
    assert!(matches!(e, Some(IoError::BrownoutTimeout(_))), "{e:?}");
    // r0 is still the in-sync one; r1 (stale) serves nothing even though it is back.
    s[1].set_up(true);
    let e = m.read(0, 4096).await.err();
    assert!(matches!(e, Some(IoError::BrownoutTimeout(_))), "{e:?}");
    assert_eq!(s[1].reads.load(Ordering::Relaxed), 0);
    assert_eq!(m.status().generation, 2);
    s[0].set_up(true);
    assert_eq!(m.read(0, 4096).await.expect("read"), pattern(3, 4096));
}

#[tokio::test]
async fn open_waits_for_an_unreachable_in_sync_member_then_promote() {
    let s = servers(2);
    let mut c = cfg(2);
    {
        let m = open(&c, &s).await;
        s[1].set_up(false);
        m.write(0, pattern(9, 4096), false).await.expect("write");
        m.shutdown().await;
    }
    // Node restarts while the only in-sync replica is away: r1 is reachable but stale.
    s[0].set_up(false);
    s[1].set_up(true);
    c.probe_interval = Duration::from_millis(10);
    let m = open(&c, &s).await;
    let st = m.status();
    assert_eq!(st.state, MirrorState::Waiting);
    assert!(st.waiting.as_deref().unwrap_or("").contains("r0"), "{st:?}");
    let e = m.read(0, 4096).await.err();
    assert!(matches!(e, Some(IoError::BrownoutTimeout(_))), "{e:?}");
    assert_eq!(s[1].reads.load(Ordering::Relaxed), 0, "stale replica read");
    // The operator accepts the loss.
    let rec = m.promote("r1").await.expect("promote");
    assert_eq!(rec.generation, 1 + PROMOTE_STRIDE);
    assert_eq!(rec.state_of("r1"), Some(MemberState::InSync));
    assert_eq!(
        m.read(0, 4096).await.expect("read"),
        Bytes::from(vec![0u8; 4096])
    );
    // r0 returns: it is OUT (whole volume dirty) and resynced from r1.
    s[0].set_up(true);
    wait_for("full resync", || m.status().state == MirrorState::Healthy).await;
    assert_eq!(s[0].lock().data, s[1].lock().data);
    assert_eq!(m.status().resync_bytes_copied, SIZE as u64);
}

#[tokio::test]
async fn stale_in_sync_member_is_recorded_out_with_everything_dirty() {
    let s = servers(2);
    let c = cfg(2);
    drop(open(&c, &s).await);
    // r0 got a generation r1 never saw, which still lists r1 in sync (a node died between
    // the two SetMembership calls).
    {
        let mut st = s[0].lock();
        st.record.generation = 5;
    }
    let mut c2 = c.clone();
    c2.probe_interval = Duration::from_secs(3600);
    let m = open(&c2, &s).await;
    let st = s[0].lock();
    assert_eq!(st.record.generation, 6);
    assert_eq!(st.record.state_of("r1"), Some(MemberState::Out));
    assert_eq!(st.bitmaps["r1"].len(), SIZE / RB as usize);
    drop(st);
    drop(m);
}

#[tokio::test]
async fn a_full_copy_sends_unwritten_regions_as_write_zeroes() {
    let s = servers(2);
    let c = cfg(2);
    let m = open(&c, &s).await;
    // Data in two regions; the rest of the volume never written.
    m.write(3 * RB as u64, pattern(1, RB as usize), false)
        .await
        .expect("write");
    m.write(9 * RB as u64 + 4096, pattern(2, 4096), false)
        .await
        .expect("write");
    drop(m);
    // r1 holds stale bytes everywhere, and r0 a generation r1 never saw (everything dirty).
    {
        let mut st = s[1].lock();
        st.data.fill(0xa5);
        st.data_bytes_in = 0;
    }
    s[0].lock().record.generation += 1;
    let m = open(&c, &s).await;
    wait_for("the full copy to finish", || {
        m.status().state == MirrorState::Healthy
    })
    .await;
    assert_eq!(
        s[0].lock().data,
        s[1].lock().data,
        "the stale bytes are gone"
    );
    assert_eq!(m.status().resync_bytes_copied, SIZE as u64);
    let st = s[1].lock();
    assert_eq!(
        st.data_bytes_in,
        2 * RB as u64,
        "only the two written regions as data"
    );
    assert_eq!(st.zeroes_bytes_in, SIZE as u64 - 2 * RB as u64);
}

#[tokio::test]
async fn three_replicas_lose_two_in_turn() {
    let s = servers(3);
    let m = open(&cfg(3), &s).await;
    m.write(0, pattern(1, 8192), true).await.expect("write");
    s[0].set_up(false);
    m.write(RB as u64, pattern(2, 8192), false)
        .await
        .expect("write");
    s[1].set_up(false);
    m.write(2 * RB as u64, pattern(3, 8192), false)
        .await
        .expect("write");
    let rec = s[2].lock().record.clone();
    assert_eq!(rec.ids_in(MemberState::InSync), vec!["r2".to_owned()]);
    for (k, seed) in [(0u64, 1u8), (1, 2), (2, 3)] {
        assert_eq!(
            m.read(k * RB as u64, 8192).await.expect("read"),
            pattern(seed, 8192)
        );
    }
    s[0].set_up(true);
    s[1].set_up(true);
    wait_for("both back in sync", || {
        m.status().state == MirrorState::Healthy
    })
    .await;
    let d = s[2].lock().data.clone();
    assert_eq!(s[0].lock().data, d);
    assert_eq!(s[1].lock().data, d);
}

#[tokio::test]
async fn resync_source_failing_mid_copy_is_replaced_by_another_in_sync_one() {
    let s = servers(3);
    let m = open(&cfg(3), &s).await;
    s[2].set_up(false);
    for k in 0..32u64 {
        m.write(k * RB as u64, pattern(k as u8 + 50, RB as usize), false)
            .await
            .expect("write");
    }
    // r0 serves three more reads, then fails every read; r1 must take over the copy.
    {
        let n = s[0].reads.load(Ordering::Relaxed);
        s[0].lock().fail_reads_after = Some(n + 3);
    }
    s[2].set_up(true);
    wait_for("r2 in sync", || {
        m.status().replicas[2].health == ReplicaHealth::InSync
    })
    .await;
    assert_eq!(
        s[1].lock().data,
        s[2].lock().data,
        "r2 differs from r1 after resync"
    );
    assert!(
        s[1].reads.load(Ordering::Relaxed) > 0,
        "r1 never served the copy"
    );
    // The failing source was dropped meanwhile; once it reads again it is resynced too.
    s[0].lock().fail_reads_after = None;
    wait_for("r0 back in sync", || {
        m.status().state == MirrorState::Healthy
    })
    .await;
    assert_eq!(s[0].lock().data, s[2].lock().data);
}
