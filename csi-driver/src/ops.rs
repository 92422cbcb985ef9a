//! Per-object operation guard: at most one operation per volume or snapshot at
//! a time, as the CSI spec asks ("operation pending for volume" → `Aborted`).
//!
//! The operation runs in a tracked task of its own that holds the guard; the
//! RPC handler only awaits it. If the caller's deadline passes, tonic drops the
//! handler but the operation still finishes (and a retry meanwhile gets
//! `Aborted`), so no call leaves half-done state behind. Shutdown waits for
//! these tasks through the [`TaskTracker`].
//!
//! Background work (the controller's grant reconciliation) takes the same guard, but a CSI
//! call that finds a volume held by it waits for it (it holds a volume for a few management
//! calls) instead of failing: the sidecars retry an `Aborted`, but tools such as csi-sanity
//! do not, and a call should not fail because of the controller's own housekeeping (the VM
//! suite's csi-sanity hit exactly that).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::error::CsiError;

/// How long a CSI call waits for background work holding its volume before `Aborted`.
const BACKGROUND_WAIT: Duration = Duration::from_secs(15);
const BACKGROUND_POLL: Duration = Duration::from_millis(20);

/// Who holds a key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Holder {
    /// A CSI call: another call on the key is `Aborted` at once.
    Call,
    /// The controller's own background work: a CSI call waits for it.
    Background,
}

#[derive(Clone, Default)]
pub struct Ops {
    busy: Arc<Mutex<HashMap<String, Holder>>>,
    tasks: TaskTracker,
}

/// Held while an operation on `key` runs; releases it when dropped.
pub struct OpGuard {
    busy: Arc<Mutex<HashMap<String, Holder>>>,
    key: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        crate::sync::lock(&self.busy, "operation guards").remove(&self.key);
    }
}

impl Ops {
    pub fn new() -> Self {
        Self::default()
    }

    /// Operations running now (their callers may have given up; they still run).
    pub fn in_progress(&self) -> usize {
        crate::sync::lock(&self.busy, "operation guards").len()
    }

    /// Claims `key` for `holder`, or says who holds it.
    fn claim(&self, key: &str, holder: Holder) -> Result<OpGuard, Holder> {
        let mut busy = crate::sync::lock(&self.busy, "operation guards");
        if let Some(held) = busy.get(key) {
            return Err(*held);
        }
        busy.insert(key.to_owned(), holder);
        Ok(OpGuard {
            busy: Arc::clone(&self.busy),
            key: key.to_owned(),
        })
    }

    /// Claims `key`, or `Aborted` if an operation on it is running.
    pub fn try_begin(&self, key: &str) -> Result<OpGuard, CsiError> {
        self.claim(key, Holder::Call)
            .map_err(|_| CsiError::Aborted(key.to_owned()))
    }

    /// Claims `key` for background work, or `None` while anything holds it. CSI calls that
    /// arrive meanwhile wait for the guard to drop (up to 15 s).
    pub fn try_begin_background(&self, key: &str) -> Option<OpGuard> {
        self.claim(key, Holder::Background).ok()
    }

    /// Claims `key` for a CSI call: `Aborted` at once if another call holds it; waits
    /// while background work holds it.
    async fn begin(&self, key: &str) -> Result<OpGuard, CsiError> {
        let deadline = tokio::time::Instant::now() + BACKGROUND_WAIT;
        loop {
            match self.claim(key, Holder::Call) {
                Ok(guard) => return Ok(guard),
                Err(Holder::Background) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(BACKGROUND_POLL).await;
                }
                Err(_) => return Err(CsiError::Aborted(key.to_owned())),
            }
        }
    }

    /// Runs `op` under the guard for `key` in its own tracked task.
    pub async fn run<T, F>(&self, key: String, op: F) -> Result<T, CsiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, CsiError>> + Send + 'static,
    {
        let guard = self.begin(&key).await?;
        let task = self.tasks.spawn(async move {
            let _guard = guard;
            op.await
        });
        task.await
            .map_err(|e| CsiError::Internal(format!("operation on {key} failed: {e}")))?
    }

    /// Stops accepting new work and waits for running operations to finish.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_operation_on_same_key_is_aborted() {
        let ops = Ops::new();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let ops = ops.clone();
            async move {
                ops.run("volume:a".into(), async move {
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    Ok(1)
                })
                .await
            }
        });
        started_rx.await.unwrap();
        let second = ops.run("volume:a".into(), async { Ok(2) }).await;
        assert!(matches!(second, Err(CsiError::Aborted(k)) if k == "volume:a"));
        // Another key is independent.
        assert_eq!(
            ops.run("volume:b".into(), async { Ok(3) }).await.unwrap(),
            3
        );
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        // Released: the key can be used again.
        assert_eq!(
            ops.run("volume:a".into(), async { Ok(4) }).await.unwrap(),
            4
        );
    }

    #[tokio::test]
    async fn a_call_waits_for_background_work_instead_of_aborting() {
        let ops = Ops::new();
        let background = ops.try_begin_background("volume:a").expect("free");
        // Background work never waits: a second claim while it holds the key is refused.
        assert!(ops.try_begin_background("volume:a").is_none());
        let call = tokio::spawn({
            let ops = ops.clone();
            async move { ops.run("volume:a".into(), async { Ok(7) }).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !call.is_finished(),
            "the call did not wait for the background work"
        );
        drop(background);
        assert_eq!(call.await.unwrap().unwrap(), 7);
        // A call holding the key makes background work skip it.
        let held = ops.try_begin("volume:a").unwrap();
        assert!(ops.try_begin_background("volume:a").is_none());
        drop(held);
        assert!(ops.try_begin_background("volume:a").is_some());
    }

    #[tokio::test]
    async fn operation_outlives_a_dropped_caller() {
        let ops = Ops::new();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let call = tokio::spawn({
            let ops = ops.clone();
            async move {
                ops.run("volume:c".into(), async move {
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    let _ = done_tx.send(());
                    Ok(())
                })
                .await
            }
        });
        started_rx.await.unwrap();
        call.abort();
        let _ = call.await;
        // The caller is gone but the operation still holds its key...
        assert!(matches!(
            ops.try_begin("volume:c"),
            Err(CsiError::Aborted(_))
        ));
        release_tx.send(()).unwrap();
        // ...and runs to completion.
        done_rx.await.unwrap();
        ops.drain().await;
        assert!(ops.try_begin("volume:c").is_ok());
    }
}
