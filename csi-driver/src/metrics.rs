//! Prometheus metrics in the text exposition format, on their own port.
//!
//! Counters are kept per (RPC, gRPC code); server gauges are computed from the
//! registry at scrape time so they can never drift from it. The HTTP side is
//! deliberately tiny: one GET per connection, `/metrics` or 404, bounded
//! request size and time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::servers::{Health, Servers};

#[derive(Default)]
pub struct Metrics {
    rpcs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn record(&self, rpc: &'static str, code: tonic::Code) {
        let mut rpcs = crate::sync::lock(&self.rpcs, "rpc metrics");
        *rpcs.entry((rpc, code_name(code))).or_default() += 1;
    }

    pub fn render(&self, servers: &Servers) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP enbd_csi_controller_rpcs_total CSI RPCs handled, by method and gRPC code.\n",
        );
        out.push_str("# TYPE enbd_csi_controller_rpcs_total counter\n");
        let rpcs = crate::sync::lock(&self.rpcs, "rpc metrics").clone();
        for ((rpc, code), n) in rpcs {
            let _ = writeln!(
                out,
                "enbd_csi_controller_rpcs_total{{method=\"{rpc}\",code=\"{code}\"}} {n}"
            );
        }
        out.push_str("# HELP enbd_csi_controller_server_up Whether an enbd-server answered its last health check.\n");
        out.push_str("# TYPE enbd_csi_controller_server_up gauge\n");
        for s in servers.status() {
            let up = u8::from(matches!(s.health, Health::Live { .. }));
            let _ = writeln!(
                out,
                "enbd_csi_controller_server_up{{server=\"{}\"}} {up}",
                s.id
            );
        }
        out
    }
}

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listener` until cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    servers: Arc<Servers>,
    cancel: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (metrics, servers) = (Arc::clone(&metrics), Arc::clone(&servers));
        tasks.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics, &servers)).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    servers: &Servers,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if request_line.starts_with(b"GET /metrics ") {
        ("200 OK", metrics.render(servers))
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics port; returns the bound address (port 0 resolved).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
