//! The running server: the NBD listener with its connection limit, the management gRPC
//! listener, the metrics listener, and graceful shutdown.
//!
//! Invariants: at most `max_connections` sessions run at once (a semaphore permit is taken
//! before `accept`, so excess clients wait in the kernel's accept queue); every session task is
//! tracked; on shutdown the listeners stop, each session stops reading and finishes the
//! requests it already started, and `run` returns once all sessions are done or the grace
//! period has passed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use enbd_proto::enbd::replica_service_server::ReplicaServiceServer;
use enbd_proto::enbd::volume_service_server::VolumeServiceServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{Config, IoEngineKind, TlsMode};
use crate::export::ExportProvider;
use crate::metrics::{self, Metrics};
use crate::mgmt::Mgmt;
use crate::session::{self, IoEngine, SessionConfig, SessionError};
use crate::store::{StoreError, VolumeStore};
use crate::tls::ReloadingConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("volume store: {0}")]
    Store(#[from] StoreError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the IO engine: {0}")]
    Uring(std::io::Error),
    #[error("management server: {0}")]
    Mgmt(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("access grants: {0}")]
    Access(#[from] crate::access::AccessError),
}

/// Addresses actually bound (port 0 resolved), reported once the server is ready.
#[derive(Debug, Clone)]
pub struct Bound {
    pub nbd: SocketAddr,
    pub mgmt: SocketAddr,
    pub metrics: SocketAddr,
    /// Plain-text grpc.health.v1 listener (`--health-listen`).
    pub health: Option<SocketAddr>,
    pub data_address: String,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn io_engine(kind: IoEngineKind, threads: usize) -> Result<IoEngine, ServerError> {
    Ok(match kind {
        IoEngineKind::Pool => IoEngine::pool(threads).map_err(ServerError::Uring)?,
        IoEngineKind::Uring => IoEngine::uring().map_err(ServerError::Uring)?,
    })
}

/// The data path's TLS settings; certificates that do not load stop start-up.
fn data_tls(cfg: &Config) -> Result<Option<session::DataTls>, ServerError> {
    let required = match cfg.tls {
        TlsMode::Off => return Ok(None),
        TlsMode::Optional => false,
        TlsMode::Require => true,
    };
    let Some(files) = &cfg.tls_files else {
        // `Cli::into_config` refuses this already; never fall back to plain text.
        return Err(ServerError::Tls(crate::tls::TlsError::Config {
            what: "--tls",
            reason: "no --tls-cert/--tls-key given".into(),
        }));
    };
    let config = ReloadingConfig::new(files.clone(), Vec::new())?;
    tracing::info!(mode = ?cfg.tls, cert = %files.cert.display(), client_ca = ?files.client_ca, "NBD TLS enabled");
    Ok(Some(session::DataTls {
        required,
        config: Arc::new(config),
    }))
}

/// Runs the server until `shutdown` is cancelled. `ready` is called once every listener is
/// bound and the store is open.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Bound),
) -> Result<(), ServerError> {
    let default_export = cfg.demo_volume.as_ref().map(|(name, _)| name.clone());
    let store = VolumeStore::open_as(&cfg.data_dir, default_export, Some(cfg.server_id.clone()))?;
    store.set_copy_rate(cfg.copy_rate_bytes);
    if let Some((name, size)) = &cfg.demo_volume {
        match store.create_volume(name, *size, None, Default::default()) {
            Ok((v, created)) => {
                tracing::info!(volume = %v.name, size = v.size_bytes, created, "demo volume")
            }
            // Someone resized the demo volume: keep it as it is.
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Kept whatever `--access` says, so that a server switched to `published` later already
    // holds the grants of the volumes published meanwhile.
    let grants = Arc::new(crate::access::Grants::open(store.root())?);
    let nbd = bind("NBD", cfg.listen).await?;
    let mgmt = bind("management gRPC", cfg.mgmt_listen).await?;
    let metrics_listener = bind("metrics", cfg.metrics_listen).await?;
    let health_listener = match cfg.health_listen {
        Some(a) => Some(bind("health gRPC", a).await?),
        None => None,
    };
    // The management API's certificate follows its files like the data path's does; client
    // certificates are checked at the handshake and authorised per method (auth.rs).
    let mgmt_tls = match &cfg.mgmt_tls {
        Some(t) => Some(Arc::new(ReloadingConfig::new(
            crate::tls::TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: Some(t.client_ca.clone()),
                client_cert_optional: true,
            },
            vec![b"h2".to_vec()],
        )?)),
        None => None,
    };
    let nbd_addr = nbd.local_addr().map_err(|source| ServerError::Bind {
        what: "NBD",
        addr: cfg.listen,
        source,
    })?;
    let bound = Bound {
        nbd: nbd_addr,
        mgmt: mgmt.local_addr().map_err(|source| ServerError::Bind {
            what: "mgmt",
            addr: cfg.mgmt_listen,
            source,
        })?,
        metrics: metrics_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                what: "metrics",
                addr: cfg.metrics_listen,
                source,
            })?,
        health: health_listener.as_ref().and_then(|l| l.local_addr().ok()),
        data_address: cfg
            .advertise_address
            .clone()
            .unwrap_or_else(|| nbd_addr.to_string()),
    };

    let metrics = Arc::new(Metrics::default());
    let gauge_store = store.clone();
    let _ = metrics
        .store
        .set(Box::new(move || metrics::store_view(&gauge_store)));
    let session_cfg = Arc::new(SessionConfig {
        max_request_bytes: cfg.max_request_bytes,
        io: io_engine(cfg.io_engine, cfg.io_threads)?,
        metrics: metrics.clone(),
        budget: Arc::new(session::budget::GlobalBudget::new(cfg.max_inflight_bytes)),
        handshake_timeout: cfg.handshake_timeout,
        tls: data_tls(&cfg)?,
        grants: (cfg.access == crate::access::AccessMode::Published).then(|| grants.clone()),
    });
    let mgmt_service = Mgmt::new(
        store.clone(),
        cfg.server_id.as_str().to_owned(),
        bound.data_address.clone(),
    )
    .with_grants(grants)
    .with_node_scope(cfg.access == crate::access::AccessMode::Published && cfg.mgmt_tls.is_some());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VolumeServiceServer<Mgmt>>()
        .await;
    health_reporter
        .set_serving::<ReplicaServiceServer<Mgmt>>()
        .await;
    let mgmt_stop = shutdown.clone();
    let enforce = mgmt_tls.is_some();
    let mgmt_task = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(crate::mgmt::auth::AuthLayer { enforce })
            .add_service(health_service.clone())
            .add_service(ReplicaServiceServer::new(mgmt_service.clone()))
            .add_service(VolumeServiceServer::new(mgmt_service))
            .serve_with_incoming_shutdown(
                crate::mgmt::auth::incoming(mgmt, mgmt_tls, shutdown.clone()),
                async move { mgmt_stop.cancelled().await },
            ),
    );
    let health_task = health_listener.map(|l| {
        let stop = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(l), async move {
                    stop.cancelled().await
                }),
        )
    });
    let scrape = metrics.clone();
    let metrics_task = tokio::spawn(enbd_proto::metrics::serve(
        metrics_listener,
        Arc::new(move || scrape.render()),
        shutdown.clone(),
    ));

    tracing::info!(
        nbd = %bound.nbd, mgmt = %bound.mgmt, mgmt_tls = enforce, access = ?cfg.access, metrics = %bound.metrics, server_id = %cfg.server_id.as_str(),
        data_dir = %store.root().display(), io_engine = ?cfg.io_engine, "enbd-server ready"
    );
    ready(&bound);

    let provider: Arc<dyn ExportProvider> = Arc::new(store);
    let sessions = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (sock, peer) = tokio::select! {
            r = nbd.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = sock.set_nodelay(true);
        let provider = provider.clone();
        let cfg = session_cfg.clone();
        let stop = shutdown.child_token();
        let metrics = metrics.clone();
        sessions.spawn(async move {
            metrics.connections_total.fetch_add(1, Ordering::Relaxed);
            metrics.connections_active.fetch_add(1, Ordering::Relaxed);
            let result = session::serve(sock, provider, cfg, stop).await;
            metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(()) | Err(SessionError::Closed) => tracing::debug!(%peer, "connection closed"),
                Err(e) => {
                    metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    // A TCP probe (the kubelet's readiness check every few seconds)
                    // connects and resets: not worth a line per probe at info.
                    if matches!(&e, SessionError::Io(io) if dropped_by_peer(io)) {
                        tracing::debug!(%peer, error = %e, "connection dropped by the peer");
                    } else {
                        tracing::info!(%peer, error = %e, "connection ended");
                    }
                }
            }
            drop(permit);
        });
    }
    drop(nbd);
    sessions.close();
    tracing::info!(sessions = sessions.len(), grace = ?cfg.shutdown_grace, "shutting down: draining sessions");
    if tokio::time::timeout(cfg.shutdown_grace, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = sessions.len(),
            "grace period over; closing remaining sessions"
        );
    }
    let _ = metrics_task.await;
    if let Some(t) = health_task {
        let _ = t.await;
    }
    match mgmt_task.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "management task failed"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The peer went away mid-conversation (reset, or a closed socket under a write).
fn dropped_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}
