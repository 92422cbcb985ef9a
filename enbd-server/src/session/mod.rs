//! One NBD connection: the handshake ([`negotiate`]), then the pipelined transmission phase
//! ([`transmission`]), with backend IO issued through an [`io::IoEngine`].
//!
//! Whatever a client sends, the memory a session holds is bounded: the handshake must finish
//! within `handshake_timeout` and answers one option at a time (a client that does not read
//! its option replies stops being read); transmission holds its requests to the
//! [`budget`]s, the connection's own and the server-wide one.
//!
//! TLS (`--tls`): after NBD_OPT_STARTTLS the rest of the handshake and the whole transmission
//! phase run over a rustls stream (TLS 1.3), within the same handshake timeout and budgets.
//! The plain-text path is unchanged: its socket halves are the TCP stream's own.

pub mod budget;
pub mod io;
pub mod lanes;
pub mod negotiate;
pub mod pool;
pub mod transmission;
pub mod uring;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use enbd_proto::wire::WireError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use self::negotiate::{Negotiated, Step, TlsPhase};
use crate::tls::ReloadingConfig;

use crate::export::{ExportProvider, OpenError};
use crate::metrics::Metrics;
pub use io::IoEngine;

/// `--handshake-timeout-secs` default: how long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings shared by all sessions of a server.
pub struct SessionConfig {
    pub max_request_bytes: u32,
    pub io: IoEngine,
    pub metrics: Arc<Metrics>,
    /// The server-wide cap on in-flight request bytes (`--max-inflight-bytes`).
    pub budget: Arc<budget::GlobalBudget>,
    /// How long a client may take from connecting to finishing the handshake.
    pub handshake_timeout: Duration,
    /// TLS on the data path; `None` with `--tls off`.
    pub tls: Option<DataTls>,
    /// `--access published`: the grants; `None` with `--access open`.
    pub grants: Option<Arc<crate::access::Grants>>,
}

/// `--tls optional|require` with its certificates.
pub struct DataTls {
    /// Clients must start TLS before anything else.
    pub required: bool,
    pub config: Arc<ReloadingConfig>,
}

/// A connection the session can split into a read half and a write half for transmission.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Rd: AsyncRead + Unpin + Send + 'static;
    type Wr: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Rd, Self::Wr);
}

impl Transport for tokio::net::TcpStream {
    type Rd = tokio::net::tcp::OwnedReadHalf;
    type Wr = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

impl Transport for tokio::io::DuplexStream {
    type Rd = tokio::io::ReadHalf<Self>;
    type Wr = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Rd, Self::Wr) {
        tokio::io::split(self)
    }
}

/// The stream transmission runs on.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection closed by the client")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    #[error("{0}")]
    Open(OpenError),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("more than {0} options in one handshake")]
    TooManyOptions(usize),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client asked for an export without TLS, which this server requires")]
    TlsRequired,
    #[error("client sent data after NBD_OPT_STARTTLS before its reply")]
    DataBeforeTls,
    #[error("client asked for an export it holds no grant for (NBD_OPT_EXPORT_NAME)")]
    NotPublished,
}

/// Serves one connection to the end. `stop` asks it to finish: no new requests are read,
/// the ones in flight complete and are answered, then the connection closes.
pub async fn serve<S: Transport>(
    stream: S,
    provider: Arc<dyn ExportProvider>,
    cfg: Arc<SessionConfig>,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let negotiated = {
        let handshake = handshake(stream, &mut buf, &*provider, &cfg);
        let limit = cfg.handshake_timeout;
        tokio::select! {
            r = tokio::time::timeout(limit, handshake) => {
                r.map_err(|_| SessionError::HandshakeTimeout(limit))??
            }
            _ = stop.cancelled() => return Ok(()),
        }
    };
    let Some((conn, mut n)) = negotiated else {
        return Ok(());
    };
    // Revoking the grant stops the session like a shutdown does: nothing new is read, the
    // requests in flight are answered, the connection closes.
    let _counted = n.grant.as_ref().map(|g| g.enter());
    let mut _end_watch = None;
    let stop = match n.grant.take() {
        None => stop,
        Some(g) => {
            let both = stop.child_token();
            let watch = both.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = g.revoked.cancelled() => {
                        tracing::info!(export = %g.volume, "grant revoked: closing the connection");
                        watch.cancel();
                    }
                    _ = watch.cancelled() => {}
                }
            });
            // The watcher ends with the session.
            _end_watch = Some(both.clone().drop_guard());
            both
        }
    };
    let span = tracing::info_span!("export", export = %n.export.name);
    let _enter = span.enter();
    tracing::debug!(size = n.export.size, structured = n.structured, style = ?n.style,
        tls = matches!(conn, Conn::Tls(_)), "transmission");
    drop(_enter);
    match conn {
        Conn::Plain(s) => {
            let (rd, wr) = s.into_halves();
            transmission::transmit(rd, wr, buf, n, cfg, stop).await
        }
        Conn::Tls(s) => {
            let (rd, wr) = tokio::io::split(*s);
            transmission::transmit(rd, wr, buf, n, cfg, stop).await
        }
    }
}

/// Greeting and options, with the TLS handshake in between when the client starts TLS.
async fn handshake<S: Transport>(
    mut stream: S,
    buf: &mut BytesMut,
    provider: &dyn ExportProvider,
    cfg: &SessionConfig,
) -> Result<Option<(Conn<S>, Negotiated)>, SessionError> {
    let no_zeroes = negotiate::greet(&mut stream, buf).await?;
    let mut left = negotiate::MAX_OPTIONS;
    let phase = match &cfg.tls {
        None => TlsPhase::Unavailable,
        Some(t) => TlsPhase::Offered {
            required: t.required,
        },
    };
    let max = cfg.max_request_bytes;
    let access = negotiate::Access {
        grants: cfg.grants.as_deref(),
    };
    let step = negotiate::options(
        &mut stream,
        buf,
        provider,
        max,
        no_zeroes,
        phase,
        access,
        &mut left,
    )
    .await?;
    let tls = match (step, &cfg.tls) {
        (Step::Done(n), _) => return Ok(n.map(|n| (Conn::Plain(stream), n))),
        (Step::StartTls, Some(tls)) => tls,
        // `options` acknowledges STARTTLS only when TLS is offered.
        (Step::StartTls, None) => return Err(SessionError::DataBeforeTls),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current());
    let mut stream = acceptor.accept(stream).await.map_err(SessionError::Tls)?;
    let step = negotiate::options(
        &mut stream,
        buf,
        provider,
        max,
        no_zeroes,
        TlsPhase::Active,
        access,
        &mut left,
    )
    .await?;
    match step {
        Step::Done(n) => Ok(n.map(|n| (Conn::Tls(Box::new(stream)), n))),
        // Over TLS a second STARTTLS is refused with NBD_REP_ERR_INVALID, never acknowledged.
        Step::StartTls => Err(SessionError::DataBeforeTls),
    }
}
