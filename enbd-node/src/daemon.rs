//! `enbd-node daemon`: owns every ublk device on the node.
//!
//! Start: lock the state directory, take over the devices a previous daemon left (user
//! recovery), then serve the control socket, the metrics endpoint and any extra services
//! (the CSI node service plugs in here). Stop (SIGTERM/SIGINT): the services end, the devices
//! stay: the process exits with its devices QUIESCED so the next daemon takes them over and
//! no IO fails in between — nothing that serves a device is dropped on the way out, so a
//! request in flight is never answered with an error; the kernel holds it for the next
//! daemon. Only `detach` removes a device.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attach::{AttachmentManager, ManagerConfig};
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
    /// `--access-token-plaintext`: volumes without TLS may still send their access token.
    pub access_plaintext: bool,
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
            access_plaintext: cfg.access_plaintext,
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
        let (listener, _) = enbd_proto::metrics::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("metrics listener on {}", cfg.metrics_listen))?;
        let (mgr, stop) = (mgr.clone(), stop.clone());
        let render = Arc::new(move || crate::metrics::render(mgr.metrics_views()));
        services.spawn(async move {
            enbd_proto::metrics::serve(listener, render, stop).await;
            Ok(())
        });
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
    // Kept alive until the process ends (see main's run_daemon): dropping the manager would
    // drop the devices' engines while IO is in flight.
    std::mem::forget(mgr);
    result
}
