//! The snapshot stall measurement (run by `e2e/bench/snapshot-stall.sh`): against a running
//! enbd-server, fills a volume densely, starts writers of sequence-numbered 4 KiB blocks,
//! takes a snapshot while they write, polls until it is ready, and prints one table row:
//! how long the call took, how long the copy took, and the writers' latency (p50, p99, max)
//! before the snapshot and while it was being copied. Then checks the snapshot holds exactly
//! the writes acknowledged before its instant (exit status 1 if not). Not a timed test:
//! nothing here judges the numbers.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use enbd_proto::enbd::{self as pb, volume_service_client::VolumeServiceClient};
use enbd_test_harness::pit;

#[derive(Debug, Parser)]
#[command(about = "Write stalls while a snapshot of a busy volume is taken")]
struct Cli {
    /// The server's NBD address.
    #[arg(long)]
    nbd: SocketAddr,
    /// The server's management URL (plain gRPC).
    #[arg(long)]
    mgmt: String,
    /// Volume size in MiB (filled densely before the measurement).
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Concurrent writers (one NBD connection each, one 4 KiB write in flight each).
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// Seconds of writing before the snapshot (the baseline).
    #[arg(long, default_value_t = 3)]
    baseline_secs: u64,
    /// Label of the row (the filesystem).
    #[arg(long, default_value = "?")]
    label: String,
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut m = VolumeServiceClient::connect(cli.mgmt.clone())
        .await
        .context("connecting to the management API")?;
    let (vol, snap) = ("stall-bench", "stall-bench-snap");
    m.create_volume(pb::CreateVolumeRequest {
        name: vol.into(),
        size_bytes: cli.size_mib << 20,
        source: None,
        labels: Default::default(),
    })
    .await?;
    let addr = cli.nbd;
    let t = Instant::now();
    tokio::task::spawn_blocking(move || pit::fill(addr, vol)).await?;
    eprintln!(
        "filled {} MiB in {:.1} s",
        cli.size_mib,
        t.elapsed().as_secs_f64()
    );

    let started = SystemTime::now();
    let writers = pit::Writers::start(addr, vol, cli.writers);
    tokio::time::sleep(Duration::from_secs(cli.baseline_secs)).await;
    let call = Instant::now();
    let call_wall = SystemTime::now();
    let first = m
        .create_snapshot(pb::CreateSnapshotRequest {
            name: snap.into(),
            source_volume: vol.into(),
        })
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot in the answer")?;
    let call_took = call.elapsed();
    let instant = pit::instant_of(first.created_at_unix, first.created_at_nanos);
    let mut ready = first.ready_to_use;
    while !ready {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = m
            .create_snapshot(pb::CreateSnapshotRequest {
                name: snap.into(),
                source_volume: vol.into(),
            })
            .await?
            .into_inner()
            .snapshot
            .is_some_and(|s| s.ready_to_use);
    }
    let ready_at = SystemTime::now();
    let copy_took = ready_at.duration_since(instant).unwrap_or_default();
    // A little more writing after the copy, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = writers.stop();

    let (n0, p50_0, p99_0, max_0) = pit::latencies(&writes, started, call_wall);
    // The window the snapshot could stall: from the call to ready.
    let (n1, p50_1, p99_1, max_1) = pit::latencies(&writes, call_wall, ready_at);

    let content =
        tokio::task::spawn_blocking(move || pit::read_blocks(addr, &format!("snapshot/{snap}")))
            .await?;
    let check = pit::check_point_in_time(&content, &writes, instant);
    let verdict = match &check {
        Ok(r) => format!("ok ({} in flight)", r.ambiguous_blocks),
        Err(_) => "WRONG".to_owned(),
    };
    println!(
        "| {} | {} MiB | {} | {} | {:.2} s | {} | {} / {} / {} | {} | {} / {} / {} | {} |",
        cli.label,
        cli.size_mib,
        if first.ready_to_use {
            "reflink"
        } else {
            "copy-before-write"
        },
        ms(call_took),
        copy_took.as_secs_f64(),
        n0,
        ms(p50_0),
        ms(p99_0),
        ms(max_0),
        n1,
        ms(p50_1),
        ms(p99_1),
        ms(max_1),
        verdict
    );

    m.delete_snapshot(pb::DeleteSnapshotRequest { name: snap.into() })
        .await?;
    m.delete_volume(pb::DeleteVolumeRequest {
        name: vol.into(),
        force: true,
    })
    .await?;
    if let Err(e) = check {
        bail!("the snapshot is not the volume at its instant: {e}");
    }
    Ok(())
}
