//! Brownout policy: what IO does while the server cannot be reached.
//!
//! `Wait` needs no code on the IO path: requests simply stay journalled until a channel takes
//! them. `FailAfter(d)` bounds each request's life to `d` from submission (journal admission
//! included); on expiry the caller gets EIO and every channel holding an abandoned request is
//! reset, so a late copy of that request cannot land after IO the caller issues next.
//! Errors therefore never come before the deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::Inner;
use super::config::BrownoutPolicy;
use super::error::IoError;

/// Runs one submission under the volume's brownout policy.
pub(crate) async fn apply(
    inner: &Inner,
    attempt: impl Future<Output = Result<Bytes, IoError>>,
) -> Result<Bytes, IoError> {
    match inner.cfg.brownout {
        BrownoutPolicy::Wait => attempt.await,
        BrownoutPolicy::FailAfter(deadline) => {
            match tokio::time::timeout(deadline, attempt).await {
                Ok(result) => result,
                Err(_) => {
                    // `attempt` (and the completion receiver inside it) is dropped by now, so the
                    // request reads as abandoned to the channels.
                    inner.reset_abandoned();
                    Err(IoError::BrownoutTimeout(deadline))
                }
            }
        }
    }
}

/// Bookkeeping when a channel comes up.
pub(crate) fn channel_up(inner: &Inner) {
    inner.up.fetch_add(1, Ordering::AcqRel);
    let since = inner.down_since_ms.swap(0, Ordering::AcqRel);
    if since != 0 {
        let now = inner.epoch.elapsed().as_millis() as u64 + 1;
        inner
            .outage_ms
            .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
    }
}

/// Bookkeeping when a channel goes down: the last one starts the outage clock.
pub(crate) fn channel_down(inner: &Inner) {
    if inner.up.fetch_sub(1, Ordering::AcqRel) == 1 {
        // Stored +1 so that 0 keeps meaning "not waiting".
        let ms = inner.epoch.elapsed().as_millis() as u64 + 1;
        inner.down_since_ms.store(ms, Ordering::Release);
    }
}

/// Time with no channel up since the engine started: ended outages plus the current one.
/// (Before the first connection completes nothing counts: the engine starts connected.)
pub(crate) fn outage_total(inner: &Inner) -> Duration {
    let ended = Duration::from_millis(inner.outage_ms.load(Ordering::Relaxed));
    ended + waiting_for(inner).unwrap_or_default()
}

/// How long IO has been waiting with no channel up.
pub(crate) fn waiting_for(inner: &Inner) -> Option<Duration> {
    let since = inner.down_since_ms.load(Ordering::Acquire);
    if since == 0 || inner.up.load(Ordering::Acquire) > 0 {
        return None;
    }
    let now = inner.epoch.elapsed().as_millis() as u64 + 1;
    Some(Duration::from_millis(now.saturating_sub(since)))
}
