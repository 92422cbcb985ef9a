//! Per-object operation guard: at most one operation per volume or snapshot at
//! a time, as the CSI spec asks ("operation pending for volume" → `Aborted`).
//!
//! The operation runs in a tracked task of its own that holds the guard; the
//! RPC handler only awaits it. If the caller's deadline passes, tonic drops the
//! handler but the operation still finishes (and a retry meanwhile gets
//! `Aborted`), so no call leaves half-done state behind. Shutdown waits for
//! these tasks through the [`TaskTracker`].

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::task::TaskTracker;

use crate::error::CsiError;

#[derive(Clone, Default)]
pub struct Ops {
    busy: Arc<Mutex<HashSet<String>>>,
    tasks: TaskTracker,
}

/// Held while an operation on `key` runs; releases it when dropped.
pub struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
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

    /// Claims `key`, or `Aborted` if an operation on it is running.
    pub fn try_begin(&self, key: &str) -> Result<OpGuard, CsiError> {
        let mut busy = crate::sync::lock(&self.busy, "operation guards");
        if !busy.insert(key.to_owned()) {
            return Err(CsiError::Aborted(key.to_owned()));
        }
        Ok(OpGuard {
            busy: Arc::clone(&self.busy),
            key: key.to_owned(),
        })
    }

    /// Runs `op` under the guard for `key` in its own tracked task.
    pub async fn run<T, F>(&self, key: String, op: F) -> Result<T, CsiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, CsiError>> + Send + 'static,
    {
        let guard = self.try_begin(&key)?;
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
