//! Prometheus metrics: process-wide counters updated with relaxed atomics on the IO path,
//! rendered in the text exposition format on `--metrics-listen`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_refused: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Reads the number of dirty regions over every mirrored volume and member (the store's
    /// bitmaps); set once at start-up. Rendering it may wait for a membership change.
    pub dirty_regions: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
}

impl Metrics {
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 7] = [
            (
                "enbd_server_connections_total",
                "counter",
                "NBD connections accepted",
                &self.connections_total,
            ),
            (
                "enbd_server_connections_active",
                "gauge",
                "NBD connections open now",
                &self.connections_active,
            ),
            (
                "enbd_server_connections_refused_total",
                "counter",
                "NBD connections that failed the handshake",
                &self.connections_refused,
            ),
            (
                "enbd_server_requests_total",
                "counter",
                "NBD requests received",
                &self.requests,
            ),
            (
                "enbd_server_request_errors_total",
                "counter",
                "NBD requests answered with an error",
                &self.errors,
            ),
            (
                "enbd_server_read_bytes_total",
                "counter",
                "bytes read by clients",
                &self.read_bytes,
            ),
            (
                "enbd_server_written_bytes_total",
                "counter",
                "bytes written by clients",
                &self.write_bytes,
            ),
        ];
        let mut s = String::new();
        for (name, kind, help, v) in rows {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        if let Some(dirty) = self.dirty_regions.get() {
            let name = "enbd_server_mirror_dirty_regions";
            s.push_str(&format!(
                "# HELP {name} regions written here that an away mirror member has not received
# TYPE {name} gauge
{name} {}
",
                dirty()
            ));
        }
        s
    }
}

/// Serves `GET /metrics` (any path, in fact) until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            // One read is enough for a scrape request; the body is ignored.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut req)).await;
            // Off the async threads: the dirty-region gauge takes the store's locks.
            let body = tokio::task::spawn_blocking(move || metrics.render())
                .await
                .unwrap_or_default();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
