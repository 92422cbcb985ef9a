//! Per-channel supervisor: connect, run, and after a failure hand the channel's requests back
//! to the journal and reconnect with exponential backoff.
//!
//! Every reconnect re-validates the handshake against the identity from the first one: a
//! server that now reports another size (except growth, an online resize) or other flags
//! stops the engine with a loud error rather than writing to what may be another disk.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::channel::{self, Connected, Ended, Geometry};
use super::error::EngineError;
use super::status::ChannelState;
use super::{Inner, brownout};

/// A connection that lived shorter than this and died is treated like a failed attempt
/// (backoff applies), so a server that accepts and drops cannot make us spin.
const STABLE_AFTER: Duration = Duration::from_secs(1);

/// Exponential backoff between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay to wait now; the following one doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// Why a reconnect's handshake does not describe the same export, if it does not.
pub fn identity_change(first: &Geometry, now: &Geometry) -> Option<String> {
    if now.size < first.size {
        return Some(format!(
            "size shrank from {} to {} bytes",
            first.size, now.size
        ));
    }
    let same_flags = (
        first.read_only,
        first.can_flush,
        first.can_fua,
        first.can_trim,
        first.can_write_zeroes,
        first.multi_conn,
    ) == (
        now.read_only,
        now.can_flush,
        now.can_fua,
        now.can_trim,
        now.can_write_zeroes,
        now.multi_conn,
    );
    if !same_flags {
        return Some(format!(
            "transmission flags changed from {:#06x} to {:#06x}",
            first.flags, now.flags
        ));
    }
    if (first.min_block, first.max_block) != (now.min_block, now.max_block) {
        return Some(format!(
            "block size limits changed from {}..{} to {}..{}",
            first.min_block, first.max_block, now.min_block, now.max_block
        ));
    }
    None
}

/// Drives channel `idx` until the engine stops. `first` is the already-open connection for
/// channel 0; `first_attempt` is signalled once the first connect attempt finished.
pub(crate) async fn supervise(
    inner: Arc<Inner>,
    idx: usize,
    mut first: Option<Connected>,
    first_attempt: oneshot::Sender<()>,
) {
    let slot = inner.slots[idx].clone();
    let mut first_attempt = Some(first_attempt);
    let mut signal_first = || {
        if let Some(tx) = first_attempt.take() {
            let _ = tx.send(());
        }
    };
    let mut backoff = Backoff::new(inner.cfg.reconnect_min, inner.cfg.reconnect_max);
    let stats = &slot.stats;
    loop {
        if inner.cancel.is_cancelled() {
            break;
        }
        let attempt = match first.take() {
            Some(conn) => Ok(conn),
            None => {
                stats.set_state(ChannelState::Connecting);
                tokio::select! {
                    r = channel::open(&inner.server, &inner.cfg.export, inner.cfg.connect_timeout, inner.cfg.tls.as_deref(), inner.cfg.access.as_deref()) => r,
                    _ = inner.cancel.cancelled() => break,
                }
            }
        };
        let mut wait = true;
        match attempt {
            Ok(conn) => {
                let known = inner.current_geometry();
                if let Some(what) = identity_change(&known, &conn.geometry) {
                    let err = EngineError::IdentityChanged {
                        addr: inner.server.clone(),
                        what,
                    };
                    stats.set_error(&err);
                    inner.stop(Some(err.to_string()));
                    signal_first();
                    break;
                }
                // A grown export is the first half of an online resize (the controller grew it,
                // the node's resize follows), so it is news, not a fault.
                if conn.geometry.size > known.size {
                    tracing::info!(
                        server = %inner.server, channel = idx, old = known.size,
                        new = conn.geometry.size, "export grew; the device keeps its size until resized"
                    );
                }
                stats.connects.fetch_add(1, Ordering::Relaxed);
                stats.set_local_addr(conn.local_addr);
                stats.set_state(ChannelState::Up);
                brownout::channel_up(&inner);
                signal_first();
                let started = Instant::now();
                let ended = channel::run(conn, &inner, &slot).await;
                brownout::channel_down(&inner);
                stats.set_state(ChannelState::Down);
                stats.set_local_addr(None);
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                let moved = inner.reissue(slot.inflight.drain());
                stats.reissued.fetch_add(moved as u64, Ordering::Relaxed);
                if let Ended::Cancelled = ended {
                    break;
                }
                stats.set_error(&ended);
                tracing::warn!(
                    server = %inner.server, channel = idx, reissued = moved, reason = %ended,
                    "channel lost; reconnecting"
                );
                if started.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                    wait = false;
                }
            }
            Err(e) => {
                tracing::debug!(server = %inner.server, channel = idx, error = %e, "connect failed");
                stats.set_error(&e);
                signal_first();
            }
        }
        if wait {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = inner.cancel.cancelled() => break,
            }
        }
    }
    stats.set_state(ChannelState::Stopped);
    signal_first();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let seq: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![50, 100, 200, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 50);
    }
}
