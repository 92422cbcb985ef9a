//! Runs the controller: discovery, health probing, the grant reconciliation, metrics and the
//! CSI gRPC services on a unix socket, until the shutdown token fires.
//!
//! Shutdown order: stop accepting CSI calls and let in-flight ones finish
//! (tonic's graceful shutdown), wait for operations still running in their own
//! tasks, then stop discovery, probing and metrics, and remove the socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use enbd_proto::csi::controller_server::ControllerServer;
use enbd_proto::csi::identity_server::IdentityServer;
use enbd_proto::enbd::controller_admin_service_server::ControllerAdminServiceServer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::controller::{AdminService, ControllerService};
use crate::identity::IdentityService;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::servers::Servers;
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare the socket directory {path}: {source}")]
    SocketDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {path}: {source}")]
    StaleSocket {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("management TLS: {0}")]
    MgmtTls(crate::mgmt_tls::MgmtTlsError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("--events needs the Kubernetes API: {0}")]
    Events(#[source] kube::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Binds the unix socket, replacing a stale socket file left by a previous run.
fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::SocketDir {
            path: shown.clone(),
            source,
        })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServeError::StaleSocket {
                path: shown,
                source,
            });
        }
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: shown,
        source,
    })
}

/// Where the controller ended up listening (ports 0 resolved), for whoever
/// started it: `main` prints it as one machine-readable line.
#[derive(Debug, Clone)]
pub struct Ready {
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
}

pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServeError> {
    let tls = match &config.mgmt_tls {
        Some(files) => {
            Some(crate::mgmt_tls::MgmtTls::load(files.clone()).map_err(ServeError::MgmtTls)?)
        }
        None => None,
    };
    let tls_on = tls.is_some();
    let servers = Servers::with_tls(tls);
    let metrics = Metrics::new();
    if config.nodes.is_none() {
        tracing::info!("ControllerPublish checks nodes against CSINode objects (no --nodes)");
    }
    let nodes = Nodes::new(config.nodes.clone(), &config.driver_name);
    let state = State::new(
        config.driver_name.clone(),
        Arc::clone(&servers),
        nodes,
        Arc::clone(&metrics),
    );
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();

    let (targets_tx, targets_rx) = watch::channel(None);
    tasks.spawn({
        let cancel = background.clone();
        let discovery = config.discovery.clone();
        async move {
            if let Err(e) = crate::discovery::run(discovery, tls_on, targets_tx, cancel).await {
                tracing::error!(error = %e, "server discovery stopped; Probe will report not ready");
            }
        }
    });
    tasks.spawn(Arc::clone(&servers).run_prober(targets_rx, background.clone()));
    tasks.spawn(crate::controller::run_grant_reconciler(
        Arc::clone(&state),
        config.grant_reconcile_interval,
        background.clone(),
    ));
    if config.events {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                background.cancel();
                return Err(ServeError::Events(e));
            }
        };
        tracing::info!("recording Kubernetes Events on volume state changes");
        tasks.spawn(crate::events::run(
            client,
            config.driver_name.clone(),
            Arc::clone(&servers),
            background.clone(),
        ));
    }

    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_listen {
        let bound = enbd_proto::metrics::bind(addr).await;
        let (listener, local) = match bound {
            Ok(b) => b,
            Err(source) => {
                background.cancel();
                return Err(ServeError::Metrics {
                    addr: addr.to_string(),
                    source,
                });
            }
        };
        tracing::info!(%local, "metrics listening");
        metrics_addr = Some(local);
        let scrape = Arc::clone(&state);
        let render = Arc::new(move || scrape.metrics.render(&scrape.servers, &scrape.ops));
        tasks.spawn(enbd_proto::metrics::serve(
            listener,
            render,
            background.clone(),
        ));
    }

    let listener = match bind_socket(&config.socket_path) {
        Ok(l) => l,
        Err(e) => {
            background.cancel();
            return Err(e);
        }
    };
    on_ready(&Ready {
        socket: config.socket_path.clone(),
        metrics: metrics_addr,
    });
    tracing::info!(socket = %config.socket_path.display(), driver = config.driver_name, "CSI controller listening");
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(Arc::clone(
            &state,
        ))))
        .add_service(ControllerServer::new(ControllerService::new(Arc::clone(
            &state,
        ))))
        .add_service(ControllerAdminServiceServer::new(AdminService::new(
            Arc::clone(&state),
        )))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await;

    state.ops.drain().await;
    background.cancel();
    tasks.close();
    tasks.wait().await;
    let _ = std::fs::remove_file(&config.socket_path);
    tracing::info!("CSI controller stopped");
    result.map_err(ServeError::from)
}
