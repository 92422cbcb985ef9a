//! `enbd-node bench-resync`: how much a mirror's resync copies for what was written while a
//! replica was away, and how fast. Drives a real [`Mirror`] over real servers; the caller
//! (e2e/bench/mirror.sh) kills and restarts the dropped replica's server when told:
//!
//! 1. opens the mirror and waits until every replica is in sync;
//! 2. prints `kill <id>` and flushes until the mirror has dropped that replica (a flush
//!    dirties nothing, so nothing but the measured writes is recorded);
//! 3. writes the pattern (every write counted), prints `restart <id>`;
//! 4. waits until the mirror is healthy again and prints one JSON report: bytes written while
//!    degraded, bytes the resync copied, their ratio, and the copy's duration and rate.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::stream::{self, StreamExt};

use super::{ByteSize, Rng};
use crate::engine::mirror::Mirror;
use crate::engine::status::{MirrorState, ReplicaHealth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WritePattern {
    /// `--bs` writes at uniformly random aligned offsets in `--span` until `--write-bytes`
    /// have been written (overwrites included).
    Random,
    /// One `--bs` write at the start of every `--stride` bytes of `--span`.
    Scattered,
}

#[derive(Debug, Clone, Args)]
pub struct ResyncBenchArgs {
    /// ID@HOST:PORT@http://HOST:PORT per replica (2 or 3), as for `attach --replica`.
    #[arg(long = "replica", value_delimiter = ',', required = true)]
    pub replicas: Vec<String>,
    /// Export (volume) name on the servers.
    #[arg(long, default_value = "demo")]
    pub export: String,
    /// Id of the replica whose server the caller kills (default: the last one).
    #[arg(long)]
    pub drop: Option<String>,
    /// How the writes made while the replica is away are spread.
    #[arg(long, value_enum, default_value_t = WritePattern::Random)]
    pub pattern: WritePattern,
    /// Write size: bytes, or with a k/m suffix.
    #[arg(long, default_value = "4k")]
    pub bs: ByteSize,
    /// Bytes of the volume the writes fall in (from offset 0).
    #[arg(long, default_value = "64m")]
    pub span: ByteSize,
    /// Random pattern: bytes to write while the replica is away.
    #[arg(long, default_value = "64m")]
    pub write_bytes: ByteSize,
    /// Scattered pattern: distance between writes.
    #[arg(long, default_value = "1m")]
    pub stride: ByteSize,
    /// NBD connections per replica.
    #[arg(long, default_value_t = 2)]
    pub channels: u16,
    /// Writes in flight.
    #[arg(long, default_value_t = 32)]
    pub depth: usize,
    /// A replica silent this long is dropped (`500ms`, `1s`).
    #[arg(long, default_value = "1s")]
    pub replica_timeout: String,
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResyncReport {
    pub pattern: String,
    pub bs: u64,
    pub span: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub bytes_copied: u64,
    pub ratio: f64,
    /// From the first poll that saw the replica resyncing until the mirror was healthy.
    pub resync_seconds: f64,
    pub resync_bytes_per_sec: f64,
}

pub fn run(args: ResyncBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enbd-bench")
        .build()
        .context("starting the Tokio runtime")?;
    let report = rt.block_on(measure(&args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Waits until every replica is in sync.
pub async fn wait_healthy(m: &Mirror, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while m.status().state != MirrorState::Healthy {
        if t.elapsed() > limit {
            bail!("mirror not healthy after {limit:?}: {:?}", m.status());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn health_of(m: &Mirror, id: &str) -> Option<ReplicaHealth> {
    m.status()
        .replicas
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.health)
}

/// The write offsets of one run.
fn offsets(args: &ResyncBenchArgs) -> anyhow::Result<Vec<u64>> {
    let (bs, span) = (args.bs.0, args.span.0);
    if bs == 0 || bs > crate::engine::MAX_REQUEST_BYTES as u64 || span < bs {
        bail!("--bs must be positive, at most one request, and within --span");
    }
    Ok(match args.pattern {
        WritePattern::Random => {
            let slots = span / bs;
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            (0..args.write_bytes.0 / bs)
                .map(|_| rng.next() % slots * bs)
                .collect()
        }
        WritePattern::Scattered => {
            if args.stride.0 < bs {
                bail!("--stride must be at least --bs");
            }
            (0..span / args.stride.0)
                .map(|i| i * args.stride.0)
                .collect()
        }
    })
}

pub async fn measure(args: &ResyncBenchArgs) -> anyhow::Result<ResyncReport> {
    let offsets = offsets(args)?;
    let mut cfg = super::mirror_config(&args.export, &args.replicas, &args.replica_timeout)?;
    cfg.client.channels = args.channels;
    cfg.probe_interval = Duration::from_millis(100);
    cfg.client.connect_timeout = Duration::from_secs(1);
    cfg.client.reconnect_max = Duration::from_millis(200);
    let drop_id = match &args.drop {
        Some(id) => id.clone(),
        None => cfg
            .replicas
            .last()
            .map(|r| r.id.clone())
            .unwrap_or_default(),
    };
    if !cfg.replicas.iter().any(|r| r.id == drop_id) {
        bail!("--drop {drop_id}: no such replica");
    }
    let m = Mirror::open(cfg).await.context("opening the mirror")?;
    if m.geometry().size < args.span.0 {
        bail!("--span exceeds the volume ({} bytes)", m.geometry().size);
    }
    wait_healthy(&m, Duration::from_secs(120)).await?;

    println!("kill {drop_id}");
    let t = Instant::now();
    while health_of(&m, &drop_id) == Some(ReplicaHealth::InSync) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("replica {drop_id} still in sync 60 s after `kill` was printed");
        }
        m.flush().await.context("flush while dropping a replica")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copied_before = m.status().resync_bytes_copied;

    let payload = Bytes::from(vec![0x5au8; args.bs.0 as usize]);
    let written = stream::iter(offsets.iter().copied())
        .map(|off| {
            let (m, p) = (m.clone(), payload.clone());
            async move { m.write(off, p, false).await }
        })
        .buffer_unordered(args.depth.max(1))
        .fold(Ok(0u64), |acc, r| async move {
            match (acc, r) {
                (Ok(n), Ok(())) => Ok(n + 1),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        })
        .await
        .context("a write failed while degraded")?;
    m.flush().await.context("flush after the writes")?;
    let bytes_written = written * args.bs.0;
    println!("restart {drop_id}");

    // The resync starts when the replica is probed again (every 100 ms).
    let t = Instant::now();
    let mut started: Option<Instant> = None;
    loop {
        let s = m.status();
        if s.state == MirrorState::Healthy {
            break;
        }
        if started.is_none()
            && matches!(
                health_of(&m, &drop_id),
                Some(ReplicaHealth::Resyncing { .. })
            )
        {
            started = Some(Instant::now());
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("not healthy 600 s after `restart`: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let bytes_copied = m.status().resync_bytes_copied - copied_before;
    m.shutdown().await;
    Ok(ResyncReport {
        pattern: format!("{:?}", args.pattern).to_ascii_lowercase(),
        bs: args.bs.0,
        span: args.span.0,
        writes: written,
        bytes_written,
        bytes_copied,
        ratio: bytes_copied as f64 / bytes_written.max(1) as f64,
        resync_seconds: secs,
        resync_bytes_per_sec: if secs > 0.0 {
            bytes_copied as f64 / secs
        } else {
            0.0
        },
    })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ResyncBenchArgs,
    }

    fn args(extra: &[&str]) -> ResyncBenchArgs {
        let mut v = vec!["t", "--replica", "a@h:1@h:2", "--replica", "b@h:3@h:4"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).expect("parse").a
    }

    #[test]
    fn patterns_stay_aligned_inside_the_span() {
        let r = offsets(&args(&["--span", "8m", "--write-bytes", "1m"])).expect("random");
        assert_eq!(r.len(), 256);
        assert!(r.iter().all(|o| o % 4096 == 0 && *o < 8 << 20));
        let s = offsets(&args(&["--pattern", "scattered", "--span", "8m"])).expect("scattered");
        assert_eq!(s, (0..8).map(|i| i << 20).collect::<Vec<_>>());
        assert!(offsets(&args(&["--bs", "2m", "--span", "1m"])).is_err());
    }
}
