//! The ENBD client engine: makes an NBD export behave like a local disk.
//!
//! Invariants, whatever the network does:
//! - nothing is reported complete before the server acknowledged it;
//! - every request (payload included) stays in the [`journal`] until acknowledged, and a
//!   broken channel's requests are re-issued on another channel or after reconnect;
//! - a FLUSH is sent only after the writes it must cover were acknowledged (the caller
//!   completed them), and with CAN_MULTI_CONN one FLUSH on any channel covers all channels;
//! - while no channel is up, IO waits (`BrownoutPolicy::Wait`) or fails with EIO once its
//!   deadline passed (`FailAfter`); nothing else turns an outage into an error;
//! - a server that reappears with another size or other flags is refused, loudly.
//!
//! Layout: [`config`] (what to connect to), [`channel`] (one NBD connection: handshake,
//! writer and reader), [`journal`] (requests held until acknowledged, byte budget),
//! [`dispatch`] (how channels share the queue), [`reconnect`] (per-channel supervisor with
//! backoff and identity checks), [`brownout`] (the outage policy), [`status`] (observability).
//! [`mirror`] puts one `Client` per replica under a mirror layer (replicated volumes).
//! [`tls`] holds the client's TLS settings; `channel`'s handshake starts TLS when a volume
//! has them (never falling back to plain text).

pub mod access;
pub mod brownout;
pub mod channel;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod journal;
pub mod mirror;
pub mod reconnect;
pub mod status;
pub mod tls;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use enbd_proto::wire::CommandFlags;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::channel::Geometry;
pub use self::config::{BrownoutPolicy, ClientConfig, ConfigError, MAX_REQUEST_BYTES};
pub use self::error::{EngineError, IoError};
pub use self::status::{ChannelState, ChannelStatus, EngineState, EngineStatus};

use self::channel::InFlight;
use self::journal::{Journal, Op, Request};
use self::status::ChannelStats;

/// A connected volume. Cheap to clone; every clone drives the same channels and journal.
/// Dropping the last clone stops the channels (as `shutdown` does, without waiting).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Cancels the engine's tasks when the last clone goes; they hold `inner` themselves,
    /// so `inner`'s own count cannot tell.
    _stop_on_drop: Arc<tokio_util::sync::DropGuard>,
}

/// One channel slot: a connection that comes and goes, with its counters and in-flight table.
pub(crate) struct Slot {
    pub stats: ChannelStats,
    pub inflight: InFlight,
    /// Poked to drop the current connection (operator, fault test, abandoned request).
    pub reset: Notify,
}

pub(crate) struct Inner {
    pub cfg: ClientConfig,
    pub server: String,
    /// Identity established by the first handshake; reconnects must match it. Its `size`
    /// is the size at connect: the current one is `size`.
    pub geometry: Geometry,
    /// The export size requests are checked against; only grows (`Client::refresh_size`).
    pub size: AtomicU64,
    pub journal: Journal,
    pub slots: Vec<Arc<Slot>>,
    /// Channels currently up (drives the dispatch share and the brownout clock).
    pub up: AtomicUsize,
    /// Milliseconds since `epoch` at which the last channel went down; 0 = some channel up.
    pub down_since_ms: AtomicU64,
    /// Milliseconds of outages that ended (`brownout::outage_total` adds the current one).
    pub outage_ms: AtomicU64,
    pub epoch: Instant,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    stopped: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Client {
    /// Connects the first channel (its handshake defines the volume's geometry), then opens
    /// the others. Fails if the first connection or its handshake fails; later channels that
    /// fail to connect are retried in the background.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, EngineError> {
        cfg.validate()?;
        let server = cfg.servers[0].clone();
        let first = channel::open(
            &server,
            &cfg.export,
            cfg.connect_timeout,
            cfg.tls.as_deref(),
            cfg.access.as_deref(),
        )
        .await?;
        let geometry = first.geometry;
        let channels = if geometry.multi_conn {
            cfg.channels
        } else {
            if cfg.channels > 1 {
                tracing::warn!(
                    server = %server,
                    requested = cfg.channels,
                    "server does not advertise CAN_MULTI_CONN: using one channel"
                );
            }
            1
        };
        let slots = (0..channels as usize)
            .map(|i| {
                Arc::new(Slot {
                    stats: ChannelStats::new(i, server.clone()),
                    inflight: InFlight::default(),
                    reset: Notify::new(),
                })
            })
            .collect();
        let inner = Arc::new(Inner {
            journal: Journal::new(cfg.journal_bytes),
            cfg,
            server,
            geometry,
            size: AtomicU64::new(geometry.size),
            slots,
            up: AtomicUsize::new(0),
            down_since_ms: AtomicU64::new(0),
            outage_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stopped: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let mut first_attempts = Vec::with_capacity(inner.slots.len());
        let mut first = Some(first);
        for idx in 0..inner.slots.len() {
            let (tx, rx) = oneshot::channel();
            first_attempts.push(rx);
            let conn = if idx == 0 { first.take() } else { None };
            inner
                .tasks
                .spawn(reconnect::supervise(inner.clone(), idx, conn, tx));
        }
        // Report a fully connected volume when possible; a channel that cannot connect now
        // keeps retrying in the background (status shows Degraded).
        for rx in first_attempts {
            let _ = rx.await;
        }
        let stop = Arc::new(inner.cancel.clone().drop_guard());
        Ok(Client {
            inner,
            _stop_on_drop: stop,
        })
    }

    /// Block-size constraints and capabilities from the first handshake, with the current
    /// size (grown by [`Client::refresh_size`]).
    pub fn geometry(&self) -> Geometry {
        self.inner.current_geometry()
    }

    /// Asks the server for the export's current size on a short-lived connection of its own
    /// and, if the export grew, lets requests reach the new end. Returns the size now in
    /// force. A smaller size or other capabilities mean another disk: that is an error and
    /// the engine keeps its size.
    ///
    /// A server session keeps the size of its own handshake, so before the new range is
    /// allowed every channel is rolled over, one at a time (the others keep serving; the
    /// rolled channel's requests are re-issued as after any reset), and its new connection,
    /// made after the probe, knows the new size.
    pub async fn refresh_size(&self) -> Result<u64, EngineError> {
        let inner = &self.inner;
        let conn = channel::open(
            &inner.server,
            &inner.cfg.export,
            inner.cfg.connect_timeout,
            inner.cfg.tls.as_deref(),
            inner.cfg.access.as_deref(),
        )
        .await?;
        let now = conn.geometry;
        // The probe carried no IO: closing its socket is all the goodbye it needs.
        drop(conn);
        if let Some(what) = reconnect::identity_change(&inner.current_geometry(), &now) {
            return Err(EngineError::IdentityChanged {
                addr: inner.server.clone(),
                what,
            });
        }
        let before = inner.size.load(Ordering::Acquire);
        if now.size <= before {
            return Ok(before);
        }
        let within = inner.cfg.connect_timeout * 2 + inner.cfg.reconnect_max;
        for (idx, slot) in inner.slots.iter().enumerate() {
            // A channel that is not up makes its next connection after the probe anyway.
            if slot.stats.state() != ChannelState::Up {
                continue;
            }
            let connects = slot.stats.connects.load(Ordering::Acquire);
            slot.reset.notify_one();
            let deadline = Instant::now() + within;
            while slot.stats.connects.load(Ordering::Acquire) == connects {
                if inner.stopped.load(Ordering::Acquire) {
                    // Only a failed reconnect stops the engine by itself: say why.
                    let why = inner.failure.lock().ok().and_then(|f| f.clone());
                    return Err(EngineError::Handshake {
                        addr: inner.server.clone(),
                        reason: format!(
                            "channel {idx} was rolled over to learn the new size and the engine stopped: {}",
                            why.as_deref().unwrap_or("shut down")
                        ),
                    });
                }
                if Instant::now() >= deadline {
                    tracing::warn!(server = %inner.server, channel = idx, size = before,
                        "channel did not come back after the roll-over: the size is unchanged");
                    return Err(EngineError::ConnectTimeout {
                        addr: inner.server.clone(),
                        secs: within.as_secs_f64(),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let was = inner.size.fetch_max(now.size, Ordering::AcqRel);
        tracing::info!(server = %inner.server, old = was, new = now.size, "export grew: engine uses the new size");
        Ok(was.max(now.size))
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.check_range(offset, len)?;
        self.submit(Op::Read, CommandFlags::empty(), offset, len, Bytes::new())
            .await
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns (emulated with a
    /// FLUSH when the server has no FUA).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = u32::try_from(data.len()).map_err(|_| IoError::Invalid {
            len: data.len() as u64,
            why: "larger than 4 GiB",
        })?;
        self.check_range(offset, len)?;
        self.check_writable()?;
        let g = &self.inner.geometry;
        let native_fua = fua && g.can_fua;
        let flags = if native_fua {
            CommandFlags::FUA
        } else {
            CommandFlags::empty()
        };
        self.submit(Op::Write, flags, offset, len, data).await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write completed before this call durable.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.check_writable()?;
        if !self.inner.geometry.can_flush {
            // No FLUSH advertised: the server has no volatile cache to flush.
            return Ok(());
        }
        self.submit(Op::Flush, CommandFlags::empty(), 0, 0, Bytes::new())
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.check_range(offset, len)?;
        self.check_writable()?;
        if !self.inner.geometry.can_trim {
            return Err(IoError::Unsupported("TRIM"));
        }
        self.submit(Op::Trim, CommandFlags::empty(), offset, len, Bytes::new())
            .await
            .map(drop)
    }

    /// Zeroes a range; `no_hole` asks the server to keep it allocated. Emulated with a write
    /// of zeroes when the server lacks WRITE_ZEROES.
    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), IoError> {
        self.check_range(offset, len)?;
        self.check_writable()?;
        if !self.inner.geometry.can_write_zeroes {
            return self
                .write(offset, Bytes::from(vec![0u8; len as usize]), false)
                .await;
        }
        let flags = if no_hole {
            CommandFlags::NO_HOLE
        } else {
            CommandFlags::empty()
        };
        self.submit(Op::WriteZeroes, flags, offset, len, Bytes::new())
            .await
            .map(drop)
    }

    pub fn status(&self) -> EngineStatus {
        self.inner.status()
    }

    /// Drops channel `idx`'s current connection; its requests are re-issued and the channel
    /// reconnects. Out-of-range indexes are ignored.
    pub fn reset_channel(&self, idx: usize) {
        if let Some(slot) = self.inner.slots.get(idx) {
            slot.reset.notify_one();
        }
    }

    /// Closes every channel (politely when idle) and fails whatever IO is still journalled
    /// with `Shutdown`. Callers should stop submitting and wait for their IO first.
    pub async fn shutdown(&self) {
        self.inner.stop(None);
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.fail_queued();
    }

    fn check_range(&self, offset: u64, len: u32) -> Result<(), IoError> {
        let size = self.inner.size.load(Ordering::Acquire);
        if len as usize > MAX_REQUEST_BYTES {
            return Err(IoError::Invalid {
                len: len as u64,
                why: "larger than the engine's request limit",
            });
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset,
                len: len as u64,
                size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.inner.geometry.read_only {
            Err(IoError::ReadOnly)
        } else {
            Ok(())
        }
    }

    async fn submit(
        &self,
        op: Op,
        flags: CommandFlags,
        offset: u64,
        len: u32,
        payload: Bytes,
    ) -> Result<Bytes, IoError> {
        let inner = &self.inner;
        inner.check_running()?;
        let attempt = async {
            let (req, rx) = inner.journal.admit(op, flags, offset, len, payload).await?;
            inner.enqueue(req);
            // The sender is only dropped unanswered if the engine stopped meanwhile.
            rx.await.unwrap_or_else(|_| Err(inner.stopped_error()))
        };
        brownout::apply(inner, attempt).await
    }
}

impl Inner {
    /// The first handshake's geometry with the size in force now.
    pub(crate) fn current_geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::Acquire),
            ..self.geometry
        }
    }

    fn status(&self) -> EngineStatus {
        let channels: Vec<ChannelStatus> = self.slots.iter().map(|s| s.stats.snapshot()).collect();
        let failure = self.failure.lock().ok().and_then(|g| g.clone());
        let in_flight: u64 = channels.iter().map(|c| c.in_flight).sum();
        EngineStatus {
            state: status::overall(&channels, self.stopped.load(Ordering::Acquire)),
            journal_requests: self.journal.queued_len() as u64 + in_flight,
            journal_bytes: self.journal.held_bytes(),
            journal_capacity_bytes: self.journal.capacity_bytes(),
            outage_total: brownout::outage_total(self),
            waiting_for: brownout::waiting_for(self),
            failure,
            channels,
        }
    }

    fn check_running(&self) -> Result<(), IoError> {
        if self.stopped.load(Ordering::Acquire) {
            Err(self.stopped_error())
        } else {
            Ok(())
        }
    }

    fn stopped_error(&self) -> IoError {
        match self.failure.lock().ok().and_then(|g| g.clone()) {
            Some(reason) => IoError::EngineFailed(reason),
            None => IoError::Shutdown,
        }
    }

    /// Queues a request; if the engine stopped concurrently, fails it instead of leaving it
    /// in a queue nobody serves.
    pub(crate) fn enqueue(&self, req: Request) {
        self.journal.push(req);
        if self.stopped.load(Ordering::Acquire) {
            self.fail_queued();
        }
    }

    /// Hands a dead connection's requests back to the journal (or fails them if the engine
    /// stopped).
    pub(crate) fn reissue(&self, reqs: Vec<Request>) -> usize {
        let n = self.journal.reissue(reqs);
        if self.stopped.load(Ordering::Acquire) {
            self.fail_queued();
        }
        n
    }

    /// Marks the engine stopped; with a reason it is a failure (reported in status and IO
    /// errors), without one a shutdown.
    pub(crate) fn stop(&self, failure: Option<String>) {
        if let Some(reason) = failure {
            tracing::error!(server = %self.server, export = %self.cfg.export, %reason, "engine failed");
            if let Ok(mut g) = self.failure.lock() {
                g.get_or_insert(reason);
            }
            self.cancel.cancel();
        }
        self.stopped.store(true, Ordering::Release);
        self.journal.close();
        self.fail_queued();
    }

    fn fail_queued(&self) {
        let err = self.stopped_error();
        for req in self.journal.drain() {
            req.complete(Err(err.clone()));
        }
    }

    /// After a caller gave up on a request (brownout deadline): reset every channel that
    /// still has an abandoned request in flight, so it can never be applied after newer
    /// writes. Queued abandoned requests are simply skipped by the dispatcher.
    pub(crate) fn reset_abandoned(&self) {
        for slot in &self.slots {
            if slot.inflight.has_abandoned() {
                slot.reset.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_shareable_across_threads() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Client>();
        fn sendable<T: Send>(_: &T) {}
        // The IO futures cross threads too (the device layer runs them on its own runtime).
        let cfg = ClientConfig::new("127.0.0.1:1", "x");
        sendable(&Client::connect(cfg));
    }
}
