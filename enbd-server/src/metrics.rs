//! Prometheus metrics of the server: process-wide connection counters and, per export,
//! requests, bytes, errors and latency by NBD command. Served on `--metrics-listen` by the
//! shared endpoint (`enbd_proto::metrics`).
//!
//! Hot-path cost: a session looks its export's [`ExportMetrics`] up once, after the
//! handshake; each request then touches relaxed atomics only (a counter, a byte counter, a
//! histogram bucket). Store-wide gauges (volumes, snapshots, free bytes, dirty regions) are
//! read from the store at scrape time, on a blocking thread.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use enbd_proto::metrics::prometheus_client::collector::Collector;
use enbd_proto::metrics::prometheus_client::encoding::DescriptorEncoder;
use enbd_proto::metrics::prometheus_client::registry::Registry;
use enbd_proto::metrics::{self as prom, Histogram, Labels};
use enbd_proto::wire::{Command, NbdError};

/// Commands counted separately (`command` label); anything else counts as `other`.
const COMMANDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
    "other",
];

fn command_index(c: Command) -> usize {
    match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::BlockStatus => 5,
        Command::Cache => 6,
        Command::Disc | Command::Unknown(_) => 7,
    }
}

/// NBD errors counted separately (`error` label, the protocol's names).
const ERRORS: [&str; 9] = [
    "EPERM",
    "EIO",
    "ENOMEM",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
    "other",
];

fn error_index(e: NbdError) -> usize {
    match e {
        NbdError::Perm => 0,
        NbdError::Io => 1,
        NbdError::NoMem => 2,
        NbdError::Inval => 3,
        NbdError::NoSpc => 4,
        NbdError::Overflow => 5,
        NbdError::NotSup => 6,
        NbdError::Shutdown => 7,
        NbdError::Unknown(_) => 8,
    }
}

/// One export's live counters; sessions hold an `Arc` for their connection's life.
pub struct ExportMetrics {
    requests: [AtomicU64; COMMANDS.len()],
    errors: [AtomicU64; ERRORS.len()],
    latency: [Histogram; COMMANDS.len()],
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    open_connections: AtomicU64,
}

impl Default for ExportMetrics {
    fn default() -> Self {
        ExportMetrics {
            requests: Default::default(),
            errors: Default::default(),
            latency: std::array::from_fn(|_| Histogram::latency()),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
        }
    }
}

impl ExportMetrics {
    /// A request arrived (counted whatever its fate).
    pub fn request(&self, c: Command) {
        self.requests[command_index(c)].fetch_add(1, Ordering::Relaxed);
    }

    /// A request was answered with `e` (refused at validation or failed in the backend).
    pub fn error(&self, e: NbdError) {
        self.errors[error_index(e)].fetch_add(1, Ordering::Relaxed);
    }

    /// A request completed (successfully or not) `took` after it was read.
    pub fn completed(&self, c: Command, took: Duration) {
        self.latency[command_index(c)].observe(took);
    }

    pub fn read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn written(&self, bytes: u64) {
        self.written_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts an open connection until the guard drops.
    pub fn open_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }
}

/// Decrements the export's open connections when the session ends.
pub struct ConnectionGuard(Arc<ExportMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the store tells at scrape time.
#[derive(Debug, Default, Clone)]
pub struct StoreView {
    pub volumes: u64,
    pub snapshots: u64,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub dirty_regions: u64,
    /// Every volume's export name (exports of deleted volumes are dropped from the metrics
    /// once no connection serves them).
    pub exports: Vec<String>,
}

/// The store's gauges now; a part that cannot be read (statvfs failing) reads as 0 and is
/// logged.
pub fn store_view(store: &crate::store::VolumeStore) -> StoreView {
    let volumes = store.list_volumes().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "metrics: listing volumes failed");
        Vec::new()
    });
    let snapshots = store.list_snapshots().map(|s| s.len()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "metrics: listing snapshots failed");
        0
    });
    let (total_bytes, available_bytes) = match store.capacity() {
        Ok(c) => (c.total_bytes, c.available_bytes),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: data directory capacity unknown");
            (0, 0)
        }
    };
    StoreView {
        volumes: volumes.len() as u64,
        snapshots: snapshots as u64,
        total_bytes,
        available_bytes,
        dirty_regions: store.dirty_regions_total(),
        exports: volumes.into_iter().map(|v| v.export_name).collect(),
    }
}

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Connections that ended with an error (handshake refused, protocol error, IO error).
    pub connections_refused: AtomicU64,
    exports: Mutex<HashMap<String, Arc<ExportMetrics>>>,
    /// Reads the store's gauges; set once at start-up (tests without a store leave it unset).
    /// Reading it may wait for a membership change.
    pub store: OnceLock<Box<dyn Fn() -> StoreView + Send + Sync>>,
}

impl Metrics {
    /// The export's counters, created on first use. Called once per connection.
    pub fn export(&self, name: &str) -> Arc<ExportMetrics> {
        let mut m = self.lock();
        Arc::clone(m.entry(name.to_owned()).or_default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ExportMetrics>>> {
        // The map holds counters only: a panic elsewhere cannot leave it inconsistent.
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The whole exposition (blocking: reads the store).
    pub fn render(self: &Arc<Self>) -> String {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Scrape(Arc::clone(self))));
        prom::render(&reg)
    }
}

struct Scrape(Arc<Metrics>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("enbd-server metrics")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = &self.0;
        let view = m.store.get().map(|f| f());
        let exports: Vec<(String, Arc<ExportMetrics>)> = {
            let mut map = m.lock();
            if let Some(v) = &view {
                map.retain(|name, e| {
                    v.exports.contains(name) || e.open_connections.load(Ordering::Relaxed) > 0
                });
            }
            let mut all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        };
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let one = |v: u64| [(Labels::new(), v)];
        prom::counters(
            &mut enc,
            "enbd_server_connections",
            "NBD connections accepted.",
            one(r(&m.connections_total)),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_connections_active",
            "NBD connections open now.",
            one(r(&m.connections_active)),
        )?;
        prom::counters(
            &mut enc,
            "enbd_server_connections_failed",
            "NBD connections that ended with an error (handshake refused, protocol or IO error).",
            one(r(&m.connections_refused)),
        )?;
        let ex = |name: &str| -> Labels { vec![("export", name.to_owned())] };
        let by_cmd = |f: &dyn Fn(&ExportMetrics, usize) -> u64| {
            let mut rows = Vec::new();
            for (name, e) in &exports {
                for (i, c) in COMMANDS.iter().enumerate() {
                    let mut l = ex(name);
                    l.push(("command", (*c).to_owned()));
                    rows.push((l, f(e, i)));
                }
            }
            rows
        };
        prom::counters(
            &mut enc,
            "enbd_server_export_requests",
            "NBD requests received, by export and command.",
            by_cmd(&|e, i| r(&e.requests[i])),
        )?;
        let mut errors = Vec::new();
        for (name, e) in &exports {
            for (i, code) in ERRORS.iter().enumerate() {
                let mut l = ex(name);
                l.push(("error", (*code).to_owned()));
                errors.push((l, r(&e.errors[i])));
            }
        }
        prom::counters(
            &mut enc,
            "enbd_server_export_errors",
            "NBD requests answered with an error, by export and NBD error.",
            errors,
        )?;
        prom::counters(
            &mut enc,
            "enbd_server_export_read_bytes",
            "Bytes read by clients, by export.",
            exports.iter().map(|(n, e)| (ex(n), r(&e.read_bytes))),
        )?;
        prom::counters(
            &mut enc,
            "enbd_server_export_written_bytes",
            "Bytes written by clients, by export.",
            exports.iter().map(|(n, e)| (ex(n), r(&e.written_bytes))),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_export_connections",
            "NBD connections open now, by export.",
            exports.iter().map(|(n, e)| (ex(n), r(&e.open_connections))),
        )?;
        let mut lat = Vec::new();
        for (name, e) in &exports {
            for (i, c) in COMMANDS.iter().enumerate() {
                if e.latency[i].count() == 0 {
                    continue;
                }
                let mut l = ex(name);
                l.push(("command", (*c).to_owned()));
                lat.push((l, &e.latency[i]));
            }
        }
        prom::histograms(
            &mut enc,
            "enbd_server_export_request_duration_seconds",
            "Time from reading a request to its completion by the backend, by export and command \
             (command=\"flush\" is the flush latency).",
            lat,
        )?;
        // Without a store (unit tests of sessions) there are no store gauges.
        let Some(v) = view else { return Ok(()) };
        prom::gauges(
            &mut enc,
            "enbd_server_volumes",
            "Volumes in the data directory.",
            one(v.volumes),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_snapshots",
            "Snapshots in the data directory.",
            one(v.snapshots),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_data_dir_size_bytes",
            "Size of the data directory's filesystem.",
            one(v.total_bytes),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_data_dir_free_bytes",
            "Bytes of the data directory's filesystem available to the server.",
            one(v.available_bytes),
        )?;
        prom::gauges(
            &mut enc,
            "enbd_server_mirror_dirty_regions",
            "Regions written here that an away mirror member has not received.",
            one(v.dirty_regions),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_series_carry_labels_units_and_totals() {
        let m = Arc::new(Metrics::default());
        let e = m.export("vol-a");
        let _open = e.open_connection();
        e.request(Command::Write);
        e.written(4096);
        e.completed(Command::Write, Duration::from_micros(300));
        e.request(Command::Read);
        e.error(NbdError::Inval);
        let out = m.render();
        for want in [
            "# TYPE enbd_server_export_requests_total counter\n",
            "enbd_server_export_requests_total{export=\"vol-a\",command=\"write\"} 1\n",
            "enbd_server_export_written_bytes_total{export=\"vol-a\"} 4096\n",
            "enbd_server_export_errors_total{export=\"vol-a\",error=\"EINVAL\"} 1\n",
            "enbd_server_export_connections{export=\"vol-a\"} 1\n",
            "enbd_server_export_request_duration_seconds_bucket{export=\"vol-a\",command=\"write\",le=\"0.0005\"} 1\n",
            "enbd_server_export_request_duration_seconds_count{export=\"vol-a\",command=\"write\"} 1\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn deleted_exports_drop_out_once_closed() {
        let m = Arc::new(Metrics::default());
        let _ = m.store.set(Box::new(|| StoreView {
            exports: vec!["kept".into()],
            ..StoreView::default()
        }));
        drop(m.export("gone"));
        let open = m.export("open").open_connection();
        m.export("kept");
        let out = m.render();
        assert!(!out.contains("export=\"gone\""), "{out}");
        assert!(out.contains("export=\"open\""), "{out}");
        assert!(out.contains("export=\"kept\""), "{out}");
        drop(open);
        assert!(!m.render().contains("export=\"open\""));
    }
}
