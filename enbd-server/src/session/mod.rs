//! One NBD connection: the handshake ([`negotiate`]), then the pipelined transmission phase
//! ([`transmission`]), with backend IO issued through an [`io::IoEngine`].
//!
//! Whatever a client sends, the memory a session holds is bounded: the handshake must finish
//! within `handshake_timeout` and answers one option at a time (a client that does not read
//! its option replies stops being read); transmission holds its requests to the
//! [`budget`]s, the connection's own and the server-wide one.

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
}

/// Serves one connection to the end. `stop` asks it to finish: no new requests are read,
/// the ones in flight complete and are answered, then the connection closes.
pub async fn serve<R, W>(
    mut rd: R,
    mut wr: W,
    provider: Arc<dyn ExportProvider>,
    cfg: Arc<SessionConfig>,
    stop: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let negotiated = {
        let mut io = tokio::io::join(&mut rd, &mut wr);
        let handshake = negotiate::negotiate(&mut io, &mut buf, &*provider, cfg.max_request_bytes);
        let limit = cfg.handshake_timeout;
        tokio::select! {
            r = tokio::time::timeout(limit, handshake) => {
                r.map_err(|_| SessionError::HandshakeTimeout(limit))??
            }
            _ = stop.cancelled() => return Ok(()),
        }
    };
    let Some(n) = negotiated else { return Ok(()) };
    let span = tracing::info_span!("export", export = %n.export.name);
    let _enter = span.enter();
    tracing::debug!(size = n.export.size, structured = n.structured, style = ?n.style, "transmission");
    drop(_enter);
    transmission::transmit(rd, wr, buf, n, cfg, stop).await
}
