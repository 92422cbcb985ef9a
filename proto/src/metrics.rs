//! Prometheus exposition shared by every binary: the text encoder (prometheus-client's,
//! format 0.0.4), a lock-free latency histogram for hot paths, helpers for scrape-time
//! collectors, and the one small HTTP endpoint that serves `GET /metrics`.
//!
//! Invariants: names carry their unit (`_bytes`, `_seconds`), counters end in `_total` (the
//! encoder appends it), histograms are in seconds; recording a sample never takes a lock
//! (relaxed atomics only); rendering runs off the async threads, since collectors may read
//! state behind locks.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use prometheus_client;
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) for request latency: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations, updated with relaxed atomics (prometheus-client's
/// own histogram takes a mutex per observation, which the IO paths must not).
/// A scrape may see a sample's bucket before its sum; each series stays monotonic.
pub struct Histogram {
    bounds: &'static [f64],
    bounds_ns: Box<[u64]>,
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// `bounds` in seconds, increasing.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// A latency histogram with [`LATENCY_BUCKETS`].
    pub fn latency() -> Self {
        Self::new(LATENCY_BUCKETS)
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|b| *b < ns);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes this histogram as one series of a family (or a plain metric).
    pub fn encode_into(&self, mut enc: MetricEncoder) -> Result<(), fmt::Error> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        // The count is the buckets' total as read, so `+Inf` always equals `_count`.
        let count = counts.iter().sum();
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), fmt::Error> {
        self.encode_into(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Labels as (name, value) pairs; what the collectors below take.
pub type Labels = Vec<(&'static str, String)>;

/// Writes one gauge family from scrape-time values. `name` carries its unit.
pub fn gauges<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter family; `name` without `_total` (the encoder appends it).
pub fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter family of seconds (an `f64` counter).
pub fn seconds_counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one histogram family from live histograms.
pub fn histograms<'h, L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, &'h Histogram)>,
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        h.encode_into(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The registry in the Prometheus text format (0.0.4), as served.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        // Only a collector can fail (fmt::Error); serve what was written rather than nothing.
        tracing::warn!(error = %e, "rendering metrics failed part-way");
    }
    out
}

/// What the endpoint calls for each scrape (on a blocking thread).
pub type RenderFn = Arc<dyn Fn() -> String + Send + Sync>;

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics port; returns the listener and the bound address (port 0 resolved).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` until `stop`; other paths get 404, other
/// methods 405. One request per connection, bounded in size and time; connections in
/// progress are awaited on stop.
pub async fn serve(listener: TcpListener, render: RenderFn, stop: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    // Out of descriptors, typically: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = Arc::clone(&render);
        tasks.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, render)).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// How the endpoint answers a request line.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head: bool },
    NotFound,
    MethodNotAllowed,
}

fn route(request_line: &[u8]) -> Route {
    let line = String::from_utf8_lossy(request_line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::NotFound;
    };
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head: false },
        ("HEAD", "/metrics") => Route::Metrics { head: true },
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

async fn answer(mut stream: TcpStream, render: RenderFn) -> std::io::Result<()> {
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
    let (status, ctype, body, head) = match route(request_line) {
        Route::Metrics { head } => {
            let body = tokio::task::spawn_blocking(move || render())
                .await
                .map_err(std::io::Error::other)?;
            ("200 OK", CONTENT_TYPE, body, head)
        }
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD only\n".into(),
            false,
        ),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.1"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1"),
            Route::Metrics { head: true }
        );
        assert_eq!(route(b"GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_in_seconds() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1)); // on the bound: le is inclusive
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        let mut reg = Registry::default();
        reg.register("t_seconds", "test", h);
        let out = render(&reg);
        assert!(out.contains("t_seconds_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("t_seconds_bucket{le=\"0.01\"} 3\n"), "{out}");
        assert!(out.contains("t_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("t_seconds_count 4\n"), "{out}");
        assert!(out.contains("t_seconds_sum 2.0065\n"), "{out}");
        assert!(out.contains("# TYPE t_seconds histogram\n"), "{out}");
    }

    #[derive(Debug)]
    struct Fixed;
    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
            let l: Labels = vec![("volume", "v\"1".into())];
            counters(&mut enc, "x_bytes", "bytes", [(l.clone(), 7)])?;
            gauges(&mut enc, "y", "gauge", [(l, 1.5)])?;
            Ok(())
        }
    }

    #[test]
    fn collectors_write_help_type_total_and_escape_labels() {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed));
        let out = render(&reg);
        assert_eq!(
            out,
            "# HELP x_bytes_total bytes\n# TYPE x_bytes_total counter\nx_bytes_total{volume=\"v\\\"1\"} 7\n\
             # HELP y gauge\n# TYPE y gauge\ny{volume=\"v\\\"1\"} 1.5\n"
        );
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_with_the_content_type() {
        let (l, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(l, Arc::new(|| "a 1\n".to_owned()), stop.clone()));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("content-type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\na 1\n"), "{ok}");
        let missing = get("GET /other HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        stop.cancel();
        task.await.unwrap();
    }
}
