//! Hostile clients that pipeline requests and never read a reply: the server's memory stays
//! bounded (resident set sampled from `/proc/<pid>/status` every 0.5 s, asserted under idle +
//! [`RSS_BOUND`]), a second, well-behaved client keeps getting served meanwhile, and after the
//! hostile client is gone a new client is served.
//!
//! The bound: per connection at most 32 MiB of request data in flight (replies queued but not
//! yet written included) plus bookkeeping; 64 MiB leaves room for the allocator, the
//! well-behaved client and the IO threads' buffers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestServer;
use raw::*;

/// How far above idle the server's resident set may grow while hostile clients run.
const RSS_BOUND: u64 = 64 << 20;
/// How long each hostile client keeps pushing.
const HOSTILE_FOR: Duration = Duration::from_secs(20);
/// Fewer completed write+read+verify rounds than this in 20 s means the good client was
/// starved (unloaded it does thousands per second).
const MIN_GOOD_ROUNDS: u64 = 200;
const NBD_OPT_LIST: u32 = 3;

/// Resident set of `pid` in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

/// What a hostile client sends, over and over.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// READs beyond the export's end: each one is refused with EINVAL.
    RefusedReads,
    /// Valid 1 MiB READs.
    BigReads,
    /// NBD_OPT_LIST options, never getting to transmission.
    Options,
}

struct FloodResult {
    sent_bytes: u64,
    /// The server closed the connection (write failed with reset or broken pipe).
    closed_by_server: bool,
}

/// Connects, negotiates (except for `Options`), then writes `kind`'s requests as fast as the
/// socket takes them until `until`, never reading a byte.
fn flood(addr: SocketAddr, kind: Flood, until: Instant) -> FloodResult {
    let mut batch = Vec::new();
    let mut c = match kind {
        Flood::Options => {
            let mut c = Raw::connect(addr);
            c.send(&3u32.to_be_bytes());
            for _ in 0..1024 {
                batch.extend(IHAVEOPT.to_be_bytes());
                batch.extend(NBD_OPT_LIST.to_be_bytes());
                batch.extend(0u32.to_be_bytes());
            }
            c
        }
        Flood::RefusedReads | Flood::BigReads => {
            let (c, size) = Raw::open(addr, "demo");
            for i in 0..1024u64 {
                let (offset, len) = match kind {
                    Flood::RefusedReads => (size + (i << 12), 4096u32),
                    _ => ((i << 20) % (size - (1 << 20)), 1 << 20),
                };
                batch.extend(REQUEST_MAGIC.to_be_bytes());
                batch.extend(0u16.to_be_bytes());
                batch.extend(CMD_READ.to_be_bytes());
                batch.extend(i.to_be_bytes());
                batch.extend(offset.to_be_bytes());
                batch.extend(len.to_be_bytes());
            }
            c
        }
    };
    c.s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pos = 0;
    let mut sent_bytes = 0u64;
    while Instant::now() < until {
        match c.s.write(&batch[pos..]) {
            Ok(0) => {
                return FloodResult {
                    sent_bytes,
                    closed_by_server: true,
                };
            }
            Ok(n) => {
                sent_bytes += n as u64;
                pos = (pos + n) % batch.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => {}
            Err(_) => {
                return FloodResult {
                    sent_bytes,
                    closed_by_server: true,
                };
            }
        }
    }
    FloodResult {
        sent_bytes,
        closed_by_server: false,
    }
}

struct GoodResult {
    rounds: u64,
    max_latency: Duration,
}

/// 4 KiB write + read-back + verify rounds in its own region, until `stop`. A request that
/// gets no reply within the raw client's 10 s read timeout fails the test.
fn good_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> GoodResult {
    let (mut c, _) = Raw::open(addr, "demo");
    let mut rounds = 0u64;
    let mut max_latency = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let offset = (512 << 20) + (rounds % 4096) * 4096;
        let block: Vec<u8> = (0..4096u32)
            .map(|i| (i as u64 ^ rounds.wrapping_mul(31)) as u8)
            .collect();
        let t = Instant::now();
        c.request(0, CMD_WRITE, 2 * rounds, offset, 4096, &block);
        assert_eq!(c.simple_reply(), (0, 2 * rounds));
        assert_eq!(
            c.read(2 * rounds + 1, offset, 4096),
            block,
            "round {rounds}"
        );
        max_latency = max_latency.max(t.elapsed());
        rounds += 1;
    }
    GoodResult {
        rounds,
        max_latency,
    }
}

/// A new client after the storm: handshake, write, read back.
fn still_serving(addr: SocketAddr) {
    let (mut c, _) = Raw::open(addr, "demo");
    c.request(0, CMD_WRITE, 1, 4096, 4, b"live");
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read(2, 4096, 4), b"live");
}

/// Runs `hostile` flooding clients of `kind` next to one good client for `time`, sampling
/// the server's RSS every 0.5 s; asserts it stays under idle + `bound`, that the good client
/// completed at least `min_rounds`, and that a new client is served afterwards.
fn storm(
    s: &TestServer,
    kind: Flood,
    hostile: usize,
    time: Duration,
    bound: u64,
    min_rounds: u64,
) -> Vec<FloodResult> {
    // Idle: the server has started, served one client and is quiet again.
    still_serving(s.nbd());
    let idle = rss(s.pid());
    let until = Instant::now() + time;
    let floods: Vec<_> = (0..hostile)
        .map(|_| {
            let addr = s.nbd();
            std::thread::spawn(move || flood(addr, kind, until))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (addr, stop) = (s.nbd(), stop.clone());
        std::thread::spawn(move || good_client(addr, stop))
    };
    let mut peak = idle;
    let mut samples = Vec::new();
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss(s.pid());
        samples.push(mib(now));
        peak = peak.max(now);
    }
    let floods: Vec<FloodResult> = floods.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let good = good.join().expect("good client");
    eprintln!(
        "{kind:?} x{hostile}: idle {:.1} MiB, peak {:.1} MiB (+{:.1}), samples {samples:.0?}; \
         hostile sent {:?} bytes; good client {} rounds, max latency {:?}",
        mib(idle),
        mib(peak),
        mib(peak.saturating_sub(idle)),
        floods.iter().map(|f| f.sent_bytes).collect::<Vec<_>>(),
        good.rounds,
        good.max_latency,
    );
    assert!(
        peak < idle + bound,
        "{kind:?}: RSS grew from {:.1} MiB to {:.1} MiB, more than {:.0} MiB above idle",
        mib(idle),
        mib(peak),
        mib(bound)
    );
    assert!(
        good.rounds >= min_rounds,
        "{kind:?}: the good client completed only {} rounds in {time:?}",
        good.rounds
    );
    still_serving(s.nbd());
    floods
}

/// Logs at info: a debug line per refused request would make stderr the bottleneck.
fn quiet_server(extra: &[&str]) -> TestServer {
    common::start_with_log(extra, "enbd_server=info")
}

#[test]
fn hostile_refused_requests_without_reading_replies() {
    let s = quiet_server(&[]);
    let floods = storm(
        &s,
        Flood::RefusedReads,
        1,
        HOSTILE_FOR,
        RSS_BOUND,
        MIN_GOOD_ROUNDS,
    );
    assert!(floods[0].sent_bytes > 0);
}

#[test]
fn hostile_big_reads_without_reading_replies() {
    let s = quiet_server(&[]);
    storm(
        &s,
        Flood::BigReads,
        1,
        HOSTILE_FOR,
        RSS_BOUND,
        MIN_GOOD_ROUNDS,
    );
}

#[test]
fn hostile_endless_option_phase() {
    // Whichever comes first closes the flooding connection well within the 20 s: the option
    // count limit (while the kernel's socket buffers still take the small LIST replies) or
    // the handshake timeout (once they are full and the server stopped reading).
    let s = quiet_server(&["--handshake-timeout-secs=5"]);
    let floods = storm(
        &s,
        Flood::Options,
        1,
        HOSTILE_FOR,
        RSS_BOUND,
        MIN_GOOD_ROUNDS,
    );
    assert!(
        floods[0].closed_by_server,
        "the server never closed a connection stuck in the option phase"
    );
}

/// Three clients that never read, each allowed 32 MiB of its own, share a 4 MiB server-wide
/// cap: the server holds about 4 MiB + one request per connection, and the good client,
/// with nothing else in flight, always gets its request through.
#[test]
fn hostile_clients_share_the_global_cap_and_never_stall_others() {
    let s = quiet_server(&[
        "--max-request-bytes=1048576",
        "--max-inflight-bytes=4194304",
    ]);
    storm(
        &s,
        Flood::BigReads,
        3,
        Duration::from_secs(6),
        16 << 20,
        MIN_GOOD_ROUNDS / 4,
    );
}

/// A client that connects and sends nothing is dropped when the handshake timeout passes.
#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let s = quiet_server(&["--handshake-timeout-secs=1"]);
    let t = Instant::now();
    let mut c = Raw::connect(s.nbd());
    assert!(c.is_closed());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}, expected about 1 s"
    );
    still_serving(s.nbd());
}
