//! Fault injection: the checksummed workload runs against enbd-server through one fault
//! proxy connection per channel while channels are reset, the network stalls for 10 s, and
//! the server is killed and restarted on the same data. With `wait` there must be no error
//! and no lost acknowledged write; with `fail-after` errors may only come after the deadline
//! and still no acknowledged write may be lost. Each test prints the counts it checked.

mod engine_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use enbd_e2e::faultproxy::{FaultProxy, Kill};
use enbd_node::engine::{BrownoutPolicy, ChannelState, Client, EngineState};
use engine_support::workload::{Counts, Sweep, Workload, percentile};
use engine_support::{Peer, proxied_enbd_server, start_enbd_server};

const BLOCKS: u64 = 4096;
const WORKERS: usize = 32;
const CHANNELS: u16 = 4;

struct Rig {
    peer: Option<Peer>,
    dir: tempfile::TempDir,
    proxy: FaultProxy,
    client: Client,
    work: Arc<Workload>,
}

async fn rig(brownout: BrownoutPolicy, io_timeout: Option<Duration>) -> Rig {
    let (dir, peer, proxy, mut cfg) = proxied_enbd_server().await;
    cfg.channels = CHANNELS;
    cfg.brownout = brownout;
    cfg.io_timeout = io_timeout;
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.reconnect_min = Duration::from_millis(20);
    cfg.reconnect_max = Duration::from_millis(400);
    let client = Client::connect(cfg).await.expect("connect");
    assert_eq!(
        client.status().state,
        EngineState::Healthy,
        "{:?}",
        client.status()
    );
    assert!(
        proxy
            .wait_connections(CHANNELS as usize, Duration::from_secs(5))
            .await
    );
    let deadline = match brownout {
        BrownoutPolicy::Wait => None,
        BrownoutPolicy::FailAfter(d) => Some(d),
    };
    let work = Workload::new(client.clone(), BLOCKS, deadline);
    Rig {
        peer: Some(peer),
        dir,
        proxy,
        client,
        work,
    }
}

async fn wait_state(client: &Client, want: EngineState, within: Duration) {
    let deadline = Instant::now() + within;
    while client.status().state != want {
        assert!(
            Instant::now() < deadline,
            "state {want:?} not reached: {:?}",
            client.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn errors(c: &Counts) -> u64 {
    c.writes_failed + c.reads_failed + c.flushes_failed
}

fn report(name: &str, rig: &Rig, c: &Counts, s: &Sweep) {
    let st = rig.client.status();
    let reissued: u64 = st.channels.iter().map(|c| c.reissued).sum();
    let connects: u64 = st.channels.iter().map(|c| c.connects).sum();
    println!(
        "SCENARIO {name}: writes_ok={} writes_failed={} reads_ok={} reads_failed={} flushes_ok={} \
         flushes_failed={} bad_reads={} early_errors={} first_error_after={:?} reissued={reissued} \
         connects={connects} | sweep: blocks_checked={} acked_blocks_checked={} lost_acked_writes={} corrupt={}",
        c.writes_ok,
        c.writes_failed,
        c.reads_ok,
        c.reads_failed,
        c.flushes_ok,
        c.flushes_failed,
        c.bad_reads,
        c.early_errors,
        c.first_error_after,
        s.blocks_checked,
        s.acked_blocks_checked,
        s.lost_acked_writes,
        s.corrupt
    );
}

fn assert_no_loss(c: &Counts, s: &Sweep) {
    assert!(
        c.writes_ok > 0 && c.reads_ok > 0 && c.flushes_ok > 0,
        "workload did too little: {c:?}"
    );
    assert_eq!(c.bad_reads, 0, "reads saw wrong data");
    assert_eq!(s.lost_acked_writes, 0, "acknowledged writes lost");
    assert_eq!(s.corrupt, 0, "corrupt blocks");
    assert_eq!(s.blocks_checked, BLOCKS);
}

fn local_addr(client: &Client, idx: usize) -> SocketAddr {
    client.status().channels[idx]
        .local_addr
        .expect("channel up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_one_channel_reset() {
    let rig = rig(BrownoutPolicy::Wait, None).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rig.proxy
            .kill_client(local_addr(&rig.client, 1), Kill::Reset),
        "channel 1 not found in proxy"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.work.stop_and_join(h).await;
    let st = rig.client.status();
    assert_eq!(st.channels[1].disconnects, 1, "{st:?}");
    assert!(
        st.channels[1].connects >= 2,
        "channel 1 did not reconnect: {st:?}"
    );
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("one-channel-reset", &rig, &c, &s);
    assert_eq!(errors(&c), 0);
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_all_channels_reset() {
    let rig = rig(BrownoutPolicy::Wait, None).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Reset everything and keep refusing for a while: IO must wait, not fail.
    rig.proxy.refuse(true);
    assert_eq!(rig.proxy.kill_all(Kill::Reset), CHANNELS as usize);
    wait_state(&rig.client, EngineState::Waiting, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = rig.client.status();
    assert_eq!(st.state, EngineState::Waiting);
    let waiting = st
        .waiting_for
        .expect("waiting_for set while no channel is up");
    println!(
        "while refused: state={:?} waiting_for={waiting:?} journal_requests={}",
        st.state, st.journal_requests
    );
    assert!(
        st.journal_requests > 0,
        "nothing journalled during the outage"
    );
    rig.proxy.refuse(false);
    wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.work.stop_and_join(h).await;
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("all-channels-reset", &rig, &c, &s);
    assert_eq!(errors(&c), 0);
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_stall_10s() {
    // The io timeout (3 s) fires inside the stall: channels are torn down and their requests
    // re-issued after reconnecting, which itself waits for the network to heal.
    let rig = rig(BrownoutPolicy::Wait, Some(Duration::from_secs(3))).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rig.proxy.stall();
    let stalled_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = rig.work.counts();
    rig.proxy.resume();
    wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(10)).await;
    println!(
        "healthy again {:?} after the stall began",
        stalled_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.work.stop_and_join(h).await;
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("stall-10s", &rig, &c, &s);
    assert!(
        c.writes_ok > during.writes_ok,
        "no progress after the stall"
    );
    assert_eq!(errors(&c), 0);
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_server_kill_restart() {
    server_restart("server-kill-restart", |peer| peer.kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_server_graceful_restart() {
    // SIGTERM: the server answers what it can, may answer the rest with ESHUTDOWN, and
    // closes; the engine re-issues whatever was not acknowledged.
    server_restart("server-sigterm-restart", |peer| peer.terminate()).await;
}

async fn server_restart(name: &str, stop: impl FnOnce(Peer) + Send + 'static) {
    let mut rig = rig(BrownoutPolicy::Wait, None).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = rig.work.counts();
    let peer = rig.peer.take().expect("peer");
    tokio::task::spawn_blocking(move || stop(peer))
        .await
        .expect("stop server");
    wait_state(&rig.client, EngineState::Waiting, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Same data directory, new process (and port): point the proxy at it.
    let peer = start_enbd_server(rig.dir.path());
    rig.proxy.set_upstream(peer.addr);
    rig.peer = Some(peer);
    wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.work.stop_and_join(h).await;
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report(name, &rig, &c, &s);
    assert!(
        c.writes_ok > before.writes_ok,
        "no progress after the restart"
    );
    assert_eq!(errors(&c), 0);
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_fail_after_stall() {
    let deadline = Duration::from_secs(2);
    let rig = rig(BrownoutPolicy::FailAfter(deadline), None).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = rig.work.counts();
    assert_eq!(errors(&before), 0, "errors before any fault");
    rig.proxy.stall();
    tokio::time::sleep(Duration::from_secs(5)).await;
    rig.proxy.resume();
    wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.work.stop_and_join(h).await;
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("fail-after-2s-stall-5s", &rig, &c, &s);
    assert!(
        errors(&c) > 0,
        "a 5 s stall with fail-after=2s produced no error"
    );
    assert_eq!(c.early_errors, 0, "errors before the deadline");
    assert!(c.first_error_after.expect("an error") >= deadline);
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_fault_fail_after_outage() {
    // The server is unreachable (every connection refused) longer than the deadline.
    let deadline = Duration::from_millis(1500);
    let rig = rig(BrownoutPolicy::FailAfter(deadline), None).await;
    let h = rig.work.spawn(WORKERS);
    tokio::time::sleep(Duration::from_millis(800)).await;
    rig.proxy.refuse(true);
    rig.proxy.kill_all(Kill::Reset);
    wait_state(&rig.client, EngineState::Waiting, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.proxy.refuse(false);
    wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rig.work.stop_and_join(h).await;
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("fail-after-1.5s-outage-4s", &rig, &c, &s);
    assert!(
        errors(&c) > 0,
        "a 4 s outage with fail-after=1.5s produced no error"
    );
    assert_eq!(c.early_errors, 0, "errors before the deadline");
    assert_no_loss(&c, &s);
    rig.client.shutdown().await;
}

/// Failover latency: while the workload runs on 4 channels, one channel at a time is reset
/// (RST) 40 times. For each reset, the stall is how long the IO caught in flight at that
/// moment took to complete after it (its re-issue on a surviving channel included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_failover_latency() {
    let rig = rig(BrownoutPolicy::Wait, None).await;
    let h = rig.work.spawn(16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resets = Vec::new();
    for i in 0..40usize {
        let idx = i % CHANNELS as usize;
        wait_state(&rig.client, EngineState::Healthy, Duration::from_secs(5)).await;
        let addr = local_addr(&rig.client, idx);
        let at = Instant::now();
        assert!(rig.proxy.kill_client(addr, Kill::Reset));
        resets.push(at);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.work.stop_and_join(h).await;
    let lat = rig.work.latencies();
    let mut stalls = Vec::new();
    for &t in &resets {
        let worst = lat
            .iter()
            .filter(|(start, l)| *start <= t && *start + *l > t)
            .map(|(start, l)| *start + *l - t)
            .max()
            .unwrap_or_default();
        stalls.push(worst);
    }
    let mut baseline: Vec<Duration> = lat
        .iter()
        .filter(|(start, l)| {
            resets
                .iter()
                .all(|&t| *start + *l < t || *start > t + Duration::from_millis(50))
        })
        .map(|(_, l)| *l)
        .collect();
    let (c, s) = (rig.work.counts(), rig.work.sweep().await);
    report("failover-latency", &rig, &c, &s);
    let reissued: u64 = rig
        .client
        .status()
        .channels
        .iter()
        .map(|c| c.reissued)
        .sum();
    println!(
        "FAILOVER resets={} reissued={reissued} stall p50={:?} p99={:?} max={:?} | IO latency without a reset: p50={:?} p99={:?} (n={})",
        resets.len(),
        percentile(&mut stalls, 50.0),
        percentile(&mut stalls, 99.0),
        percentile(&mut stalls, 100.0),
        percentile(&mut baseline, 50.0),
        percentile(&mut baseline, 99.0),
        baseline.len()
    );
    assert_eq!(errors(&c), 0);
    assert_no_loss(&c, &s);
    assert!(
        rig.client
            .status()
            .channels
            .iter()
            .all(|c| c.state == ChannelState::Up || c.connects > 1)
    );
    rig.client.shutdown().await;
}
