//! `enbd-node daemon`: owns every ublk device on the node.
//!
//! Start: lock the state directory, take over the devices a previous daemon left (user
//! recovery), then serve the control socket, the metrics endpoint and any extra services
//! (the CSI node service plugs in here). Stop (SIGTERM/SIGINT): the services end, the devices
//! stay: the process exits with its devices QUIESCED so the next daemon takes them over and
//! no IO fails in between. Only `detach` removes a device.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attach::{AttachmentManager, ManagerConfig, Phase};
use crate::control;

/// The daemon's settings, validated from the command line.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub node_id: String,
    pub csi_endpoint: Option<String>,
    pub driver_name: String,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub max_volumes: u64,
    pub metrics_listen: SocketAddr,
    pub journal_bytes: usize,
    /// TLS for volumes that do not say.
    pub tls_default: crate::attach::TlsPolicy,
    /// Trust root and client certificate for TLS connections.
    pub tls_files: Option<crate::engine::tls::TlsFiles>,
    /// `--tls-ca/--tls-cert/--tls-key`: management calls of mirrored volumes.
    pub mgmt_tls: Option<crate::mgmt_tls::MgmtTlsFiles>,
}

/// A service run beside the control socket, sharing the attachment manager; it must return
/// once the token is cancelled.
pub type ExtraService = Box<
    dyn FnOnce(
            AttachmentManager,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
        + Send,
>;

/// Runs the daemon until a signal or a service failure.
pub async fn run_daemon(cfg: DaemonConfig, extra: Vec<ExtraService>) -> anyhow::Result<()> {
    let mgr = AttachmentManager::new(
        ManagerConfig {
            state_dir: cfg.state_dir.clone(),
            max_volumes: usize::try_from(cfg.max_volumes).unwrap_or(usize::MAX),
            journal_bytes: cfg.journal_bytes,
            tls_default: cfg.tls_default,
            tls: match &cfg.tls_files {
                None if cfg.tls_default == crate::attach::TlsPolicy::Require => {
                    anyhow::bail!("--tls require needs --tls-ca")
                }
                None => None,
                Some(files) => Some(std::sync::Arc::new(
                    crate::engine::tls::ClientTls::new(files.clone())
                        .context("loading the TLS files")?,
                )),
            },
        },
        tokio::runtime::Handle::current(),
    )
    .with_context(|| format!("opening state directory {}", cfg.state_dir.display()))?;
    if let Some(files) = cfg.mgmt_tls.clone() {
        // Checked now so a wrong path fails the start, not the first mirrored attach.
        files
            .load()
            .map_err(|e| anyhow::anyhow!("management TLS: {e}"))?;
        mgr.set_mgmt_tls(files);
    }
    if let Err(why) = mgr.ready() {
        tracing::warn!(reason = %why, "ublk unavailable: attaching will fail until the module is loaded");
    }
    let restored = mgr.restore().context("reading attachment state")?;
    tracing::info!(node_id = %cfg.node_id, restored, state_dir = %cfg.state_dir.display(), "enbd-node daemon started");

    let stop = CancellationToken::new();
    let mut services: JoinSet<anyhow::Result<()>> = JoinSet::new();
    {
        let (path, mgr, stop) = (cfg.control_socket.clone(), mgr.clone(), stop.clone());
        services.spawn(async move { control::serve(&path, mgr, stop).await.map_err(Into::into) });
    }
    {
        let listener = TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("metrics listener on {}", cfg.metrics_listen))?;
        let (mgr, stop) = (mgr.clone(), stop.clone());
        services.spawn(async move { serve_metrics(listener, mgr, stop).await });
    }
    for service in extra {
        services.spawn(service(mgr.clone(), stop.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        done = services.join_next() => match done {
            Some(Ok(Ok(()))) => Err(anyhow::anyhow!("a daemon service ended unexpectedly")),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("a daemon service panicked: {e}")),
            None => Ok(()),
        },
    };
    stop.cancel();
    while services.join_next().await.is_some() {}
    let kept = mgr.list().len();
    tracing::info!(
        devices_kept = kept,
        "enbd-node daemon exiting; devices stay for the next daemon"
    );
    result
}

/// A minimal Prometheus text endpoint: every request gets the current metrics.
async fn serve_metrics(
    listener: TcpListener,
    mgr: AttachmentManager,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { tracing::warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let body = render_metrics(&mgr);
        tokio::spawn(async move {
            // Read (and ignore) the request head: every path serves the metrics.
            let mut buf = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

fn render_metrics(mgr: &AttachmentManager) -> String {
    use std::fmt::Write;
    let vols = mgr.list();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# TYPE enbd_node_volumes gauge\nenbd_node_volumes {}",
        vols.len()
    );
    let _ = writeln!(out, "# TYPE enbd_node_volume_attached gauge");
    for v in &vols {
        let _ = writeln!(
            out,
            "enbd_node_volume_attached{{volume=\"{}\",device=\"{}\"}} {}",
            v.volume_id,
            v.dev_path.display(),
            u8::from(v.phase == Phase::Attached)
        );
    }
    let _ = writeln!(
        out,
        "# TYPE enbd_node_channel_up gauge\n# TYPE enbd_node_channel_completed_total counter\n# TYPE enbd_node_channel_reissued_total counter"
    );
    for v in &vols {
        let Some(e) = &v.engine else { continue };
        for c in &e.channels {
            let labels = format!("volume=\"{}\",channel=\"{}\"", v.volume_id, c.index);
            let up = u8::from(format!("{:?}", c.state) == "Up");
            let _ = writeln!(out, "enbd_node_channel_up{{{labels}}} {up}");
            let _ = writeln!(
                out,
                "enbd_node_channel_completed_total{{{labels}}} {}",
                c.completed
            );
            let _ = writeln!(
                out,
                "enbd_node_channel_reissued_total{{{labels}}} {}",
                c.reissued
            );
        }
        let _ = writeln!(
            out,
            "enbd_node_journal_requests{{volume=\"{}\"}} {}",
            v.volume_id, e.journal_requests
        );
    }
    render_replicas(&mut out, &vols);
    out
}

/// Mirrored volumes: one gauge per replica for being in sync, and the bytes a resync still
/// has to copy.
fn render_replicas(out: &mut String, vols: &[crate::attach::AttachmentStatus]) {
    use crate::engine::status::ReplicaHealth;
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# TYPE enbd_node_replica_in_sync gauge\n# TYPE enbd_node_replica_resync_remaining_bytes gauge"
    );
    for v in vols {
        let Some(m) = &v.mirror else { continue };
        for r in &m.replicas {
            let labels = format!("volume=\"{}\",replica=\"{}\"", v.volume_id, r.id);
            let in_sync = u8::from(r.health == ReplicaHealth::InSync);
            let _ = writeln!(out, "enbd_node_replica_in_sync{{{labels}}} {in_sync}");
            if let ReplicaHealth::Resyncing {
                to_copy, copied, ..
            } = r.health
            {
                let left = to_copy.saturating_sub(copied);
                let _ = writeln!(
                    out,
                    "enbd_node_replica_resync_remaining_bytes{{{labels}}} {left}"
                );
            }
        }
    }
}
