//! Point-in-time checks for snapshots taken under writes: a small blocking NBD client,
//! writers that put sequence-numbered blocks on a volume while recording when each write
//! was sent and acknowledged, and the check that a snapshot holds exactly the writes
//! acknowledged before the snapshot call and none sent after it returned.
//!
//! Every 4 KiB block carries `(seq, offset)` repeated, so a block read back names the write
//! that put it there (seq 0: the initial fill) and a torn block is detected. Shared by the
//! enbd-server snapshot tests and the snapshot stall benchmark (`e2e/bench/snapshot-stall.sh`).
//! Panics on protocol errors: this is test code.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

pub const BLOCK: u64 = 4096;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

/// One NBD connection (fixed newstyle, OPT_GO, simple replies), one request at a time.
pub struct Nbd {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl Nbd {
    /// Opens `export`, or returns the option error reply type the server answered.
    pub fn open(addr: SocketAddr, export: &str) -> Result<Self, u32> {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true)
            .unwrap_or_else(|e| panic!("nodelay: {e}"));
        let mut g = [0u8; 18];
        s.read_exact(&mut g)
            .unwrap_or_else(|e| panic!("greeting: {e}"));
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes())
            .unwrap_or_else(|e| panic!("client flags: {e}"));
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend(export.as_bytes());
        d.extend(0u16.to_be_bytes());
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend(OPT_GO.to_be_bytes());
        b.extend((d.len() as u32).to_be_bytes());
        b.extend(d);
        s.write_all(&b).unwrap_or_else(|e| panic!("OPT_GO: {e}"));
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)
                .unwrap_or_else(|e| panic!("option reply: {e}"));
            assert_eq!(
                u64::from_be_bytes(h[..8].try_into().unwrap_or_default()),
                REP_MAGIC
            );
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)
                .unwrap_or_else(|e| panic!("option data: {e}"));
            match ty {
                REP_INFO if len >= 10 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(
                        data[2..10].try_into().unwrap_or_default(),
                    ));
                }
                REP_INFO => {}
                REP_ACK => {
                    return Ok(Self {
                        s,
                        size: size.unwrap_or_else(|| panic!("NBD_INFO_EXPORT before ACK")),
                        cookie: 0,
                    });
                }
                err => return Err(err),
            }
        }
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend(REQUEST_MAGIC.to_be_bytes());
        b.extend(0u16.to_be_bytes());
        b.extend(cmd.to_be_bytes());
        b.extend(self.cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.s
            .write_all(&b)
            .unwrap_or_else(|e| panic!("send request: {e}"));
        let mut h = [0u8; 16];
        self.s
            .read_exact(&mut h)
            .unwrap_or_else(|e| panic!("reply: {e}"));
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap_or_default()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap_or_default());
        assert_eq!(err, 0, "NBD error {err} at offset {offset}");
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
            self.cookie
        );
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, offset, data.len() as u32, data);
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, offset, len, &[]);
        let mut b = vec![0u8; len as usize];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("read data: {e}"));
        b
    }
}

/// The content of the block at `offset` written by write `seq`.
pub fn block(seq: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK as usize);
    for _ in 0..BLOCK / 16 {
        b.extend(seq.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b
}

/// Writes every block of the export with seq 0, 1 MiB at a time (dense: real data to copy).
pub fn fill(addr: SocketAddr, export: &str) {
    let mut c = Nbd::open(addr, export).unwrap_or_else(|e| panic!("open {export}: {e:#x}"));
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < c.size {
        let n = chunk.min(c.size - off);
        let mut buf = Vec::with_capacity(n as usize);
        for b in (off..off + n).step_by(BLOCK as usize) {
            buf.extend(block(0, b));
        }
        c.write(off, &buf);
        off += n;
    }
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub seq: u64,
    pub offset: u64,
    /// Wall-clock times, comparable with the instant the server reports for a snapshot.
    pub sent: SystemTime,
    pub acked: SystemTime,
}

/// Writers running on their own connections until stopped.
pub struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Written>>>,
}

impl Writers {
    /// `n` writers putting one block at a time at pseudo-random offsets; seqs are unique
    /// across writers (writer `w` uses `w + 1`, `w + 1 + n`, ...).
    pub fn start(addr: SocketAddr, export: &str, n: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|w| {
                let stop = stop.clone();
                let export = export.to_owned();
                std::thread::spawn(move || {
                    let mut c = Nbd::open(addr, &export)
                        .unwrap_or_else(|e| panic!("open {export}: {e:#x}"));
                    let blocks = c.size / BLOCK;
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
                    let mut seq = w + 1;
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let offset = (x % blocks) * BLOCK;
                        let data = block(seq, offset);
                        let sent = SystemTime::now();
                        c.write(offset, &data);
                        out.push(Written {
                            seq,
                            offset,
                            sent,
                            acked: SystemTime::now(),
                        });
                        seq += n;
                    }
                    out
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the writers and returns every write they made, in no particular order.
    pub fn stop(self) -> Vec<Written> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_else(|_| panic!("writer panicked")))
            .collect()
    }
}

/// Reads the whole export: the `(seq, offset)` of every block, checking none is torn.
pub fn read_blocks(addr: SocketAddr, export: &str) -> Vec<(u64, u64)> {
    let mut c = Nbd::open(addr, export).unwrap_or_else(|e| panic!("open {export}: {e:#x}"));
    let mut out = Vec::with_capacity((c.size / BLOCK) as usize);
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < c.size {
        let n = chunk.min(c.size - off);
        let data = c.read(off, n as u32);
        for (i, b) in data.chunks(BLOCK as usize).enumerate() {
            let at = off + i as u64 * BLOCK;
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let o = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
            assert!(
                b.chunks(16).all(|r| r == &b[..16]),
                "{export}: block at {at} is torn"
            );
            out.push((seq, o));
        }
        off += n;
    }
    out
}

/// What [`check_point_in_time`] found.
#[derive(Debug, Clone, Copy)]
pub struct PitReport {
    /// Blocks whose content was decided by a write in flight at the instant.
    pub ambiguous_blocks: usize,
    /// Writes acknowledged before the instant (all must be in the snapshot).
    pub before: usize,
    /// Writes sent after the instant (none may be in the snapshot).
    pub after: usize,
}

/// The instant a snapshot reports, as a wall-clock time.
pub fn instant_of(created_at_unix: i64, created_at_nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(created_at_unix).unwrap_or(0),
            created_at_nanos,
        )
}

/// Checks that `snapshot` (every block's `(seq, offset)`) holds, for each block, the last
/// write acknowledged before `instant` (the snapshot's point in time, as the server
/// reported it), or one of the writes in flight at it (sent before, acknowledged after),
/// and never a write sent after it. Returns the counts, or the first violation.
pub fn check_point_in_time(
    snapshot: &[(u64, u64)],
    writes: &[Written],
    instant: SystemTime,
) -> Result<PitReport, String> {
    let (called, returned) = (instant, instant);
    let mut pre: HashMap<u64, Vec<&Written>> = HashMap::new();
    let mut in_flight: HashMap<u64, Vec<u64>> = HashMap::new();
    let (mut before, mut after) = (0, 0);
    for w in writes {
        if w.acked < called {
            before += 1;
            pre.entry(w.offset).or_default().push(w);
        } else if w.sent < returned {
            in_flight.entry(w.offset).or_default().push(w.seq);
        } else {
            after += 1;
        }
    }
    // Of the writes acknowledged before the call, the ones no other write to the block
    // certainly followed (one sent after it was acknowledged); usually exactly one.
    let last_before: HashMap<u64, Vec<u64>> = pre
        .into_iter()
        .map(|(off, ws)| {
            let newest_sent = ws.iter().map(|w| w.sent).max().unwrap_or(instant);
            let ok = ws
                .iter()
                .filter(|w| w.acked >= newest_sent)
                .map(|w| w.seq)
                .collect();
            (off, ok)
        })
        .collect();
    let mut ambiguous_blocks = 0;
    for (i, &(seq, off)) in snapshot.iter().enumerate() {
        let at = i as u64 * BLOCK;
        // Every block was filled, so a block naming another offset (or zeroes) is wrong.
        if off != at {
            return Err(format!(
                "block at {at} holds ({seq}, {off}): another block's write, or zeroes"
            ));
        }
        let want = last_before.get(&at).cloned().unwrap_or_else(|| vec![0]);
        let maybe = in_flight.get(&at);
        if maybe.is_some() {
            ambiguous_blocks += 1;
        }
        if !want.contains(&seq) && !maybe.is_some_and(|m| m.contains(&seq)) {
            let w = writes.iter().find(|w| w.seq == seq);
            return Err(format!(
                "block at {at} holds write {seq} ({}), want {want:?} (the last acknowledged \
                 before the instant) or one in flight at it ({maybe:?})",
                match w {
                    Some(w) if w.sent >= returned => "sent after the snapshot's instant",
                    Some(_) => "acknowledged before the instant, but not the last",
                    None => "never written",
                }
            ));
        }
    }
    Ok(PitReport {
        ambiguous_blocks,
        before,
        after,
    })
}

/// Latency percentiles of the writes acknowledged in `[from, to)`: (count, p50, p99, max).
pub fn latencies(
    writes: &[Written],
    from: SystemTime,
    to: SystemTime,
) -> (usize, Duration, Duration, Duration) {
    let mut l: Vec<Duration> = writes
        .iter()
        .filter(|w| w.acked >= from && w.acked < to)
        .map(|w| w.acked.duration_since(w.sent).unwrap_or_default())
        .collect();
    if l.is_empty() {
        return (0, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    l.sort_unstable();
    let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
    (l.len(), at(0.5), at(0.99), l[l.len() - 1])
}
