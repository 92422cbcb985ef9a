//! The checksummed workload: random writes of self-describing 4 KiB blocks (magic, offset,
//! generation, pseudo-random fill, checksum), reads that verify what they see, and FLUSHes,
//! from many concurrent workers. A model records, per block, the last acknowledged
//! generation and the generations of writes that failed since (their content is undefined:
//! a failed write may or may not have landed). Overlapping writes are never concurrent, as a
//! filesystem would not issue them.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use enbd_node::engine::{Client, IoError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"ENBDBLK1";

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The block written at `offset` in generation `generation`.
pub fn make_block(offset: u64, generation: u64) -> Bytes {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&offset.to_be_bytes());
    b[16..24].copy_from_slice(&generation.to_be_bytes());
    let mut x = offset ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in b[24..BLOCK - 8].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let sum = fnv(&b[..BLOCK - 8]);
    b[BLOCK - 8..].copy_from_slice(&sum.to_be_bytes());
    Bytes::from(b)
}

/// The generation a block read back carries (0 for a never-written, all-zero block), or why
/// it is not a valid block for `offset`.
pub fn block_generation(offset: u64, data: &[u8]) -> Result<u64, String> {
    if data.len() != BLOCK {
        return Err(format!("read returned {} bytes", data.len()));
    }
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if &data[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let sum = u64::from_be_bytes(data[BLOCK - 8..].try_into().map_err(|_| "short")?);
    if sum != fnv(&data[..BLOCK - 8]) {
        return Err("checksum mismatch (torn or corrupt block)".into());
    }
    let at = u64::from_be_bytes(data[8..16].try_into().map_err(|_| "short")?);
    if at != offset {
        return Err(format!(
            "block for offset {at} found at {offset} (misdirected write)"
        ));
    }
    Ok(u64::from_be_bytes(
        data[16..24].try_into().map_err(|_| "short")?,
    ))
}

#[derive(Default)]
struct Model {
    acked: Vec<u64>,
    /// Generations of failed writes since the last acknowledged one.
    uncertain: Vec<Vec<u64>>,
    busy: Vec<bool>,
}

/// What a run did and found.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub flushes_ok: u64,
    pub flushes_failed: u64,
    /// Reads during the run whose content matched no acceptable generation.
    pub bad_reads: u64,
    /// Errors that came back sooner than the brownout deadline allows.
    pub early_errors: u64,
    pub first_error_after: Option<Duration>,
}

/// Result of the final sweep over every block.
#[derive(Debug, Default, Clone)]
pub struct Sweep {
    pub blocks_checked: u64,
    pub acked_blocks_checked: u64,
    pub lost_acked_writes: u64,
    pub corrupt: u64,
}

pub struct Workload {
    client: Client,
    blocks: u64,
    model: Mutex<Model>,
    generation: AtomicU64,
    counts: Mutex<Counts>,
    /// With `fail-after`: errors earlier than this are violations.
    pub deadline: Option<Duration>,
    /// Every completed read and write: (start, latency). FLUSHes are left out: their time is
    /// the server's fsync, which would drown the failover stall this measures.
    latencies: Mutex<Vec<(Instant, Duration)>>,
    pub stop: AtomicBool,
}

impl Workload {
    pub fn new(client: Client, blocks: u64, deadline: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            client,
            blocks,
            model: Mutex::new(Model {
                acked: vec![0; blocks as usize],
                uncertain: vec![Vec::new(); blocks as usize],
                busy: vec![false; blocks as usize],
            }),
            generation: AtomicU64::new(1),
            counts: Mutex::new(Counts::default()),
            deadline,
            latencies: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }

    pub fn latencies(&self) -> Vec<(Instant, Duration)> {
        self.latencies.lock().unwrap().clone()
    }

    /// Starts `workers` tasks; they run until `stop` is set.
    pub fn spawn(self: &Arc<Self>, workers: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..workers)
            .map(|i| {
                let w = self.clone();
                tokio::spawn(async move { w.worker(i as u64).await })
            })
            .collect()
    }

    pub async fn stop_and_join(&self, handles: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        for h in handles {
            h.await.expect("worker panicked");
        }
    }

    fn claim(&self, rng: &mut StdRng) -> u64 {
        loop {
            let b = rng.random_range(0..self.blocks);
            let mut m = self.model.lock().unwrap();
            if !m.busy[b as usize] {
                m.busy[b as usize] = true;
                return b;
            }
        }
    }

    fn error(&self, started: Instant, e: &IoError, c: &mut Counts) {
        let after = started.elapsed();
        c.first_error_after.get_or_insert(after);
        match self.deadline {
            Some(d) if after >= d => {}
            _ => {
                c.early_errors += 1;
                eprintln!("error after {after:?} (deadline {:?}): {e}", self.deadline);
            }
        }
    }

    async fn worker(&self, seed: u64) {
        let mut rng = StdRng::seed_from_u64(0x5eed ^ seed);
        while !self.stop.load(Ordering::Relaxed) {
            let dice = rng.random_range(0..100u32);
            let started = Instant::now();
            if dice < 3 {
                let r = self.client.flush().await;
                let mut c = self.counts.lock().unwrap();
                match r {
                    Ok(()) => c.flushes_ok += 1,
                    Err(e) => {
                        c.flushes_failed += 1;
                        self.error(started, &e, &mut c);
                    }
                }
                continue;
            }
            let b = self.claim(&mut rng);
            let offset = b * BLOCK as u64;
            if dice < 60 {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                let fua = dice < 8;
                let r = self
                    .client
                    .write(offset, make_block(offset, generation), fua)
                    .await;
                let mut m = self.model.lock().unwrap();
                let mut c = self.counts.lock().unwrap();
                match r {
                    Ok(()) => {
                        m.acked[b as usize] = generation;
                        m.uncertain[b as usize].clear();
                        c.writes_ok += 1;
                    }
                    Err(e) => {
                        m.uncertain[b as usize].push(generation);
                        c.writes_failed += 1;
                        self.error(started, &e, &mut c);
                    }
                }
                m.busy[b as usize] = false;
            } else {
                let r = self.client.read(offset, BLOCK as u32).await;
                let mut m = self.model.lock().unwrap();
                let mut c = self.counts.lock().unwrap();
                match r {
                    Ok(data) => {
                        c.reads_ok += 1;
                        match check(&mut m, b, offset, &data) {
                            Ok(()) => {}
                            Err(why) => {
                                c.bad_reads += 1;
                                eprintln!("bad read of block {b}: {why}");
                            }
                        }
                    }
                    Err(e) => {
                        c.reads_failed += 1;
                        self.error(started, &e, &mut c);
                    }
                }
                m.busy[b as usize] = false;
            }
            self.latencies
                .lock()
                .unwrap()
                .push((started, started.elapsed()));
        }
    }

    /// Reads every block back and checks it against the model. Call with the workers stopped.
    pub async fn sweep(&self) -> Sweep {
        let mut s = Sweep::default();
        for b in 0..self.blocks {
            let offset = b * BLOCK as u64;
            let data = self
                .client
                .read(offset, BLOCK as u32)
                .await
                .expect("sweep read failed");
            let mut m = self.model.lock().unwrap();
            s.blocks_checked += 1;
            if m.acked[b as usize] != 0 {
                s.acked_blocks_checked += 1;
            }
            if let Err(why) = check(&mut m, b, offset, &data) {
                eprintln!("sweep: block {b}: {why}");
                if why.starts_with("lost") {
                    s.lost_acked_writes += 1;
                } else {
                    s.corrupt += 1;
                }
            }
        }
        s
    }
}

/// Checks a read of block `b` against the model; reading a failed write's content settles
/// that block's uncertainty.
fn check(m: &mut Model, b: u64, offset: u64, data: &[u8]) -> Result<(), String> {
    let seen = block_generation(offset, data)?;
    let i = b as usize;
    if seen == m.acked[i] {
        return Ok(());
    }
    if m.uncertain[i].contains(&seen) {
        m.acked[i] = seen;
        m.uncertain[i].clear();
        return Ok(());
    }
    Err(format!(
        "lost acknowledged write: expected generation {} (or one of {:?}), read {seen}",
        m.acked[i], m.uncertain[i]
    ))
}

/// p-th percentile (0..=100) of `v` (sorted in place).
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}
