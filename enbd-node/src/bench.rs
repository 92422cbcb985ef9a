//! `enbd-node bench`: drives the client engine directly (no ublk device) against an NBD
//! server — or, with `--replica`, a mirror over several — with a fixed number of requests in
//! flight, and reports IOPS, bandwidth, latency percentiles and the engine's own CPU time per
//! request: the numbers e2e/bench/engine.sh sets next to fio's nbd engine (libnbd) run with
//! the same connections and depth, and e2e/bench/mirror.sh per replica count.

pub mod resync;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};

use crate::backing::{Backing, EngineTarget};
use crate::device::{BlockRequest, BlockTarget};
use crate::engine::mirror::{Mirror, MirrorConfig, ReplicaConfig};
use crate::engine::{Client, ClientConfig};
use crate::metrics::{VolumeIo, VolumeView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    Randread,
    Randwrite,
    /// 70 % reads, 30 % writes.
    Randrw,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// NBD server HOST:PORT.
    #[arg(
        long,
        env = "ENBD_SERVER",
        required_unless_present = "replicas",
        default_value = ""
    )]
    pub server: String,
    /// A mirror instead of one server: ID@HOST:PORT@http://HOST:PORT per replica (2 or 3),
    /// as for `attach --replica`; `--channels` is then per replica.
    #[arg(long = "replica", value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Mirror only: a replica silent this long is dropped.
    #[arg(long, default_value = "5s")]
    pub replica_timeout: String,
    /// Mirror only, for measuring its cost: run without the activity log (a node crash
    /// with writes in flight may then leave the replicas differing). Never for real data.
    #[arg(long)]
    pub no_activity_log: bool,
    /// Export (volume) name on the server.
    #[arg(long, env = "ENBD_EXPORT", default_value = "demo")]
    pub export: String,
    /// Connections (used only if the server advertises CAN_MULTI_CONN, else 1).
    #[arg(long, env = "ENBD_CHANNELS", default_value_t = 4)]
    pub channels: u16,
    /// Requests in flight per channel (total in flight = channels × depth).
    #[arg(long, env = "ENBD_DEPTH", default_value_t = 16)]
    pub depth: u16,
    /// Access pattern.
    #[arg(long, env = "ENBD_RW", value_enum, default_value_t = Pattern::Randread)]
    pub rw: Pattern,
    /// Request size: bytes, or with a k/m suffix.
    #[arg(long, env = "ENBD_BS", default_value = "4k")]
    pub bs: ByteSize,
    /// Bytes of the export to spread requests over (default: all of it).
    #[arg(long, env = "ENBD_RANGE")]
    pub range: Option<ByteSize>,
    /// Measured seconds.
    #[arg(long, env = "ENBD_SECONDS", default_value_t = 10.0)]
    pub seconds: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, env = "ENBD_RAMP", default_value_t = 1.0)]
    pub ramp: f64,
    /// Print one JSON object instead of text.
    #[arg(long, env = "ENBD_JSON")]
    pub json: bool,
    /// Serve Prometheus metrics here while the benchmark runs (the volume's series as the
    /// daemon exports them); IO then goes through the device's target, metrics included, as
    /// on a real device. Prints `enbd-node bench ready metrics=ADDR` on stdout once listening.
    #[arg(long, env = "ENBD_BENCH_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub tls: crate::cli::TlsClientArgs,
}

/// A byte count written as `4096`, `4k`, `1m`, `1g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let (num, mult) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1u64 << 10),
            Some('m') => (&t[..t.len() - 1], 1 << 20),
            Some('g') => (&t[..t.len() - 1], 1 << 30),
            _ => (&t[..], 1),
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 1m)"))
    }
}

/// Result of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub rw: String,
    pub bs: u64,
    pub channels: usize,
    pub depth: u16,
    pub seconds: f64,
    pub ops: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub cpu_seconds: f64,
    pub cpu_us_per_op: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// CPU seconds (user + system) this process used so far.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    // Linux reports these in USER_HZ, which is 100 on every architecture we build for.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// xorshift64*: cheap per-worker offsets, no shared RNG on the hot path.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The engine under test: one `Client`, or a `Mirror` when replicas are given (it waits until
/// every replica is in sync, so the numbers are those of the full write fan-out).
async fn open(args: &BenchArgs) -> anyhow::Result<Backing> {
    let mut cfg = ClientConfig::new(&args.server, &args.export);
    cfg.channels = args.channels;
    cfg.queue_depth = args.depth.max(1);
    cfg.tls = args.tls.client_tls()?;
    if args.replicas.is_empty() {
        let client = Client::connect(cfg)
            .await
            .with_context(|| format!("connecting to {}", args.server))?;
        return Ok(Backing::Single(client));
    }
    let mut m = mirror_config(&args.export, &args.replicas, &args.replica_timeout)?;
    m.client.channels = cfg.channels;
    m.client.queue_depth = cfg.queue_depth;
    m.client.tls = cfg.tls;
    m.activity.enabled = !args.no_activity_log;
    let mirror = Mirror::open(m).await.context("opening the mirror")?;
    resync::wait_healthy(&mirror, Duration::from_secs(120)).await?;
    Ok(Backing::Mirror(mirror))
}

/// A mirror configuration from `--replica` specs.
pub(crate) fn mirror_config(
    export: &str,
    replicas: &[String],
    replica_timeout: &str,
) -> anyhow::Result<MirrorConfig> {
    if replicas.len() < 2 {
        bail!("a mirror needs at least two --replica");
    }
    let replicas = replicas
        .iter()
        .map(|s| {
            crate::backing::parse_replica(s).map(|r| ReplicaConfig {
                id: r.id,
                nbd: r.nbd,
                mgmt: r.mgmt,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let mut m = MirrorConfig::new(export, replicas);
    m.replica_timeout = crate::engine::config::parse_duration(replica_timeout)
        .map_err(|e| anyhow::anyhow!("--replica-timeout: {e}"))?;
    Ok(m)
}

/// Serves the bench volume's metrics on `addr` until `stop`; returns the device target the
/// workers submit through.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    export: &str,
    client: &Backing,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<EngineTarget>> {
    let (listener, bound) = enbd_proto::metrics::bind(addr)
        .await
        .with_context(|| format!("metrics listener on {addr}"))?;
    let io = VolumeIo::new();
    let target = Arc::new(EngineTarget::new(client.clone(), io.clone()));
    let (client, volume) = (client.clone(), export.to_owned());
    let render = Arc::new(move || {
        crate::metrics::render(vec![VolumeView {
            volume: volume.clone(),
            device: String::new(),
            attached: true,
            size_bytes: client.geometry().size,
            backing: Some(client.status()),
            io: Some(io.clone()),
        }])
    });
    tokio::spawn(enbd_proto::metrics::serve(listener, render, stop.clone()));
    // A readiness line (tests wait for it); the report still comes last.
    println!("enbd-node bench ready metrics={bound}");
    Ok(target)
}

/// Runs the benchmark on its own Tokio runtime and prints the report.
pub fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enbd-bench")
        .build()
        .context("starting the Tokio runtime")?;
    let report = rt.block_on(bench(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "engine {} bs={} channels={} depth={}: {:.0} IOPS, {:.1} MB/s, latency p50 {} us p99 {} us, \
             CPU {:.2} s = {:.1} us/op ({} ops in {:.1} s)",
            report.rw,
            report.bs,
            report.channels,
            report.depth,
            report.iops,
            report.mb_per_s,
            report.p50_us,
            report.p99_us,
            report.cpu_seconds,
            report.cpu_us_per_op,
            report.ops,
            report.seconds
        );
    }
    Ok(())
}

pub async fn bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let bs = args.bs.0;
    if bs == 0 || bs > crate::engine::MAX_REQUEST_BYTES as u64 {
        bail!(
            "--bs must be between 1 byte and {} bytes",
            crate::engine::MAX_REQUEST_BYTES
        );
    }
    if args.depth == 0 || args.seconds <= 0.0 {
        bail!("--depth and --seconds must be positive");
    }
    let client = open(args).await?;
    let g = client.geometry();
    let range = args.range.map_or(g.size, |r| r.0.min(g.size));
    let slots = range / bs;
    if slots == 0 {
        bail!("the export ({} bytes) is smaller than one request", range);
    }
    let channels = match &client {
        Backing::Single(c) => c.status().channels.len(),
        Backing::Mirror(_) => usize::from(args.channels),
    };
    let workers = channels * args.depth as usize;
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    let target = match args.metrics_listen {
        None => None,
        Some(addr) => Some(serve_metrics(addr, &args.export, &client, &metrics_stop).await?),
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![0xa5u8; bs as usize]);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let (client, measuring, stop, payload, target) = (
            client.clone(),
            measuring.clone(),
            stop.clone(),
            payload.clone(),
            target.clone(),
        );
        let rw = args.rw;
        tasks.push(tokio::spawn(async move {
            let mut rng =
                Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                let offset = (r % slots) * bs;
                let write = match rw {
                    Pattern::Randread => false,
                    Pattern::Randwrite => true,
                    Pattern::Randrw => (r >> 56) % 10 < 3,
                };
                let t = Instant::now();
                if let Some(target) = &target {
                    let req = if write {
                        BlockRequest::Write {
                            offset,
                            data: payload.clone(),
                            fua: false,
                        }
                    } else {
                        BlockRequest::Read {
                            offset,
                            len: bs as u32,
                        }
                    };
                    target.submit(req).await.map_err(|errno| {
                        crate::engine::IoError::EngineFailed(format!("errno {errno}"))
                    })?;
                } else {
                    match (&client, write) {
                        (Backing::Single(c), true) => {
                            c.write(offset, payload.clone(), false).await?
                        }
                        (Backing::Mirror(m), true) => {
                            m.write(offset, payload.clone(), false).await?
                        }
                        (Backing::Single(c), false) => drop(c.read(offset, bs as u32).await?),
                        (Backing::Mirror(m), false) => drop(m.read(offset, bs as u32).await?),
                    }
                }
                if measuring.load(Ordering::Relaxed) {
                    lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Ok::<_, crate::engine::IoError>(lat_us)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.ramp.max(0.0))).await;
    let cpu0 = cpu_seconds()?;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    for t in tasks {
        lat.extend(
            t.await
                .context("bench worker panicked")?
                .context("IO failed during the benchmark")?,
        );
    }
    metrics_stop.cancel();
    client.shutdown().await;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().saturating_sub(1)) as f64 * p) as usize)
            .copied()
            .unwrap_or(0) as u64
    };
    let ops = lat.len() as u64;
    Ok(BenchReport {
        rw: format!("{:?}", args.rw).to_ascii_lowercase(),
        bs,
        channels,
        depth: args.depth,
        seconds: elapsed,
        ops,
        iops: ops as f64 / elapsed,
        mb_per_s: (ops * bs) as f64 / elapsed / 1e6,
        cpu_seconds: cpu,
        cpu_us_per_op: if ops > 0 { cpu / ops as f64 * 1e6 } else { 0.0 },
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("4k".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("1M".parse::<ByteSize>(), Ok(ByteSize(1 << 20)));
        assert_eq!("2g".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
        assert!("x".parse::<ByteSize>().is_err());
        assert!("k".parse::<ByteSize>().is_err());
    }

    #[test]
    fn cpu_clock_reads() {
        assert!(cpu_seconds().expect("cpu") >= 0.0);
    }
}
