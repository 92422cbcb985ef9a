//! Taking over devices a previous daemon left behind: a restarted daemon reads the state
//! file, connects each volume's engine (retrying while its server is unreachable; the
//! device's IO waits in the kernel meanwhile) and recovers the QUIESCED device, or creates it
//! again when the node rebooted.
//!
//! Invariants: a takeover runs in its own task that a detach can cancel; it never waits for
//! the manager's `ops` lock without also watching its cancellation token (the detach that
//! cancelled it holds `ops` while it waits for the task).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{AttachError, AttachmentManager, Phase, Volume, blocking, device_geometry};
use crate::backing::{Backing, EngineTarget};
use crate::device::{self, Device, DeviceError, DeviceOptions, DeviceState, Start};
use crate::engine::BrownoutPolicy;
use crate::engine::mirror::MirrorError;
use crate::engine::reconnect::Backoff;
use crate::state::AttachmentRecord;

/// How long a device whose daemon died may still report LIVE before the kernel quiesces it.
const QUIESCE_WAIT: Duration = Duration::from_secs(10);
/// Reconnect back-off while taking over a device whose server is unreachable.
const TAKEOVER_RETRY_MIN: Duration = Duration::from_millis(200);
const TAKEOVER_RETRY_MAX: Duration = Duration::from_secs(5);

/// A running takeover of a restored volume, so that a detach can cancel it.
pub(super) struct Takeover {
    pub(super) cancel: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

impl AttachmentManager {
    /// Takes over every device listed in the state directory: each in its own task, which
    /// connects the engine (retrying while the server is unreachable; the device's IO waits
    /// in the kernel meanwhile) and then recovers the device. Returns how many it started.
    ///
    /// A record that cannot be served (hand-edited, or written by a buggy version: no server,
    /// a zero queue count, ...) is not taken over: it is listed as [`Phase::Failed`] with the
    /// reason, and a detach removes its device.
    pub fn restore(&self) -> Result<usize, AttachError> {
        let records = self.inner.store.load()?;
        let mut good = Vec::new();
        {
            let mut vols = self.lock_volumes();
            for r in records {
                if vols.contains_key(&r.volume_id) {
                    tracing::error!(volume_id = %r.volume_id, dev_id = r.dev_id,
                        state_dir = %self.inner.store.dir().display(),
                        "state file lists this volume twice; ignoring the later record");
                    continue;
                }
                let phase = match r.problem() {
                    Some(why) => {
                        tracing::error!(volume_id = %r.volume_id, dev_id = r.dev_id, problem = %why,
                            state_dir = %self.inner.store.dir().display(),
                            "state record unusable; not taking the device over (detach removes it)");
                        Phase::Failed(format!("state record unusable: {why}"))
                    }
                    None => {
                        good.push(r.clone());
                        Phase::Recovering
                    }
                };
                vols.insert(r.volume_id.clone(), Volume::new(r, phase));
            }
        }
        let n = good.len();
        for r in good {
            let id = r.volume_id.clone();
            let cancel = CancellationToken::new();
            let mgr = self.clone();
            let token = cancel.clone();
            // The volume table is locked across the spawn, so the task cannot look for its
            // volume before the handle is stored.
            let mut vols = self.lock_volumes();
            let task = self.inner.rt.spawn(async move {
                let id = r.volume_id.clone();
                match mgr.take_over(r, token).await {
                    Ok(()) => {}
                    Err(AttachError::Cancelled(_)) => {
                        tracing::info!(volume_id = %id, "takeover cancelled by a detach");
                    }
                    Err(e) => {
                        tracing::error!(volume_id = %id, error = %e, "taking over the device failed");
                        if let Some(v) = mgr.lock_volumes().get_mut(&id) {
                            v.phase = Phase::Failed(e.to_string());
                            v.takeover = None;
                        }
                    }
                }
            });
            if let Some(v) = vols.get_mut(&id) {
                v.takeover = Some(Takeover { cancel, task });
            }
        }
        Ok(n)
    }

    async fn take_over(
        &self,
        r: AttachmentRecord,
        cancel: CancellationToken,
    ) -> Result<(), AttachError> {
        let cancelled = || AttachError::Cancelled(r.volume_id.clone());
        let brownout: BrownoutPolicy = r
            .brownout
            .parse()
            .map_err(|e| AttachError::Internal(format!("stored brownout policy: {e}")))?;
        let mut backoff = Backoff::new(TAKEOVER_RETRY_MIN, TAKEOVER_RETRY_MAX);
        let client = loop {
            let attempt = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(cancelled()),
                attempt = Backing::connect(&r, brownout, self.inner.journal_bytes, self.inner.tls.as_ref(), self.inner.mgmt_tls.get()) => attempt,
            };
            match attempt {
                Ok(c) => break c,
                Err(
                    e @ (AttachError::Invalid(_) | AttachError::Mirror(MirrorError::Config(_))),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(volume_id = %r.volume_id, error = %e, retry_in = ?delay,
                        "server unreachable while taking over; device IO waits");
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return Err(cancelled()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        if cancel.is_cancelled() {
            client.shutdown().await;
            return Err(cancelled());
        }
        let dev_id = r.dev_id;
        let start = blocking(move || {
            match device::wait_recoverable(dev_id, QUIESCE_WAIT) {
                Ok(DeviceState::Quiesced) => Ok(Start::Recover { dev_id }),
                // Gone (node rebooted): create it again, under the same id if free.
                Err(DeviceError::NotFound(_)) => Ok(Start::New {
                    dev_id: Some(dev_id),
                }),
                Ok(DeviceState::Dead) => device::delete(dev_id).map(|()| Start::New {
                    dev_id: Some(dev_id),
                }),
                Ok(state) => Err(DeviceError::NotRecoverable { dev_id, state }),
                Err(e) => Err(e),
            }
        })
        .await;
        let start = match start {
            Ok(Ok(s)) if !cancel.is_cancelled() => s,
            other => {
                client.shutdown().await;
                return Err(match other {
                    Ok(Err(e)) => e.into(),
                    Err(e) => e,
                    Ok(Ok(_)) => cancelled(),
                });
            }
        };
        let mut geometry = device_geometry(&client.geometry(), r.read_only);
        let export_size = geometry.size_bytes;
        if matches!(start, Start::Recover { .. }) && r.size_bytes > 0 {
            // The kernel keeps the size it had; an export grown meanwhile is grown online
            // below, once the device serves IO again.
            geometry.size_bytes = geometry.size_bytes.min(r.size_bytes);
        }
        let device_size = geometry.size_bytes;
        let opts = DeviceOptions {
            queues: r.queues,
            queue_depth: r.queue_depth,
            geometry,
        };
        let target = Arc::new(EngineTarget::new(
            client.clone(),
            self.io_metrics(&r.volume_id),
        ));
        let rt = self.inner.rt.clone();
        let device = match blocking(move || Device::start(&opts, start, target, rt)).await? {
            Ok(d) => d,
            Err(e) => {
                client.shutdown().await;
                return Err(e.into());
            }
        };
        // A detach that cancelled us holds `ops` while it waits for this task: never wait for
        // `ops` without also watching the token.
        let ops = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            g = self.inner.ops.lock() => Some(g),
        };
        let Some(ops_guard) = ops.filter(|_| !cancel.is_cancelled()) else {
            // The detach removes the device anyway; stopping it here also ends its threads.
            if let Err(e) = blocking(move || device.stop()).await? {
                tracing::warn!(volume_id = %r.volume_id, error = %e,
                    "stopping a device whose takeover was cancelled");
            }
            client.shutdown().await;
            return Err(cancelled());
        };
        tracing::info!(volume_id = %r.volume_id, dev_id = device.dev_id(), ?start, "device taken over");
        self.adopt(&r.volume_id, client, device, device_size)?;
        drop(ops_guard);
        if export_size > device_size {
            // Expanded on its server while no daemon ran: catch up, as `resize` would.
            match self.resize(&r.volume_id).await {
                Ok(size) => tracing::info!(volume_id = %r.volume_id, old = device_size, new = size,
                    "export grew while the daemon was down; device grown after takeover"),
                Err(e) => tracing::warn!(volume_id = %r.volume_id, old = device_size,
                    new = export_size, error = %e,
                    "export grew while the daemon was down; the device keeps its old size"),
            }
        }
        Ok(())
    }

    /// Records a taken-over device as attached and persists the state. Caller holds `ops`.
    fn adopt(
        &self,
        volume_id: &str,
        client: Backing,
        device: Device,
        device_size: u64,
    ) -> Result<(), AttachError> {
        let records = {
            let mut vols = self.lock_volumes();
            let v = vols
                .get_mut(volume_id)
                .ok_or_else(|| AttachError::Internal("volume vanished during takeover".into()))?;
            v.record.dev_id = device.dev_id();
            v.record.size_bytes = device_size;
            client.follow_into(&mut v.record);
            v.client = Some(client);
            v.device = Some(device);
            v.phase = Phase::Attached;
            v.takeover = None;
            vols.values().map(|v| v.record.clone()).collect::<Vec<_>>()
        };
        self.inner.store.save(&records)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{dead_server, manager_with, saved_volumes, stored};
    use super::super::{AttachError, Phase};
    use crate::state::AttachmentRecord;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detach_cancels_a_takeover_whose_server_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mgr = manager_with(dir.path(), &[stored("vol", &dead_server(), 4001)]);
        assert_eq!(mgr.restore().expect("restore"), 1);
        assert_eq!(mgr.get("vol").expect("listed").phase, Phase::Recovering);
        let detached = tokio::time::timeout(Duration::from_secs(30), mgr.detach("vol"))
            .await
            .expect("detach returns instead of waiting for the server");
        detached.expect("detach of a recovering volume succeeds");
        assert!(mgr.get("vol").is_none());
        assert!(saved_volumes(dir.path()).is_empty());
        // Gone means gone: a second detach is the ordinary "not attached".
        assert!(matches!(
            mgr.detach("vol").await,
            Err(AttachError::NotAttached(_))
        ));
    }

    #[tokio::test]
    async fn unusable_state_records_are_failed_with_a_reason_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = AttachmentRecord {
            servers: vec![],
            ..stored("bad", "unused", 4002)
        };
        let mgr = manager_with(dir.path(), &[bad]);
        assert_eq!(mgr.restore().expect("restore"), 0, "nothing to take over");
        match mgr.get("bad").expect("listed").phase {
            Phase::Failed(why) => assert!(why.contains("server list"), "{why}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        mgr.detach("bad").await.expect("detach removes it");
        assert!(mgr.list().is_empty());
        assert!(saved_volumes(dir.path()).is_empty());
    }

    /// A state file with a malformed mirrored record: the daemon starts and lists that
    /// volume as failed with the reason; promote on it is refused by name.
    #[tokio::test]
    async fn a_malformed_mirrored_record_is_listed_as_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = crate::backing::parse_replica("a@127.0.0.1:1@127.0.0.1:2").expect("r");
        let record = AttachmentRecord {
            replicas: vec![one],
            ..stored("m", "127.0.0.1:1", 4004)
        };
        let mgr = manager_with(dir.path(), &[record]);
        assert_eq!(mgr.restore().expect("restore"), 0, "nothing to take over");
        let s = mgr.get("m").expect("listed");
        assert_eq!(
            s.phase,
            Phase::Failed(
                "state record unusable: mirrored volume m lists 1 replica; \
                 a mirror needs at least 2"
                    .into()
            )
        );
        assert_eq!(s.replicas.len(), 1);
        let e = mgr.promote("m", "a").await.expect_err("not open");
        assert!(matches!(e, AttachError::InProgress(_)), "{e}");
        let e = mgr.promote("nope", "a").await.expect_err("unknown");
        assert!(matches!(e, AttachError::NotAttached(_)), "{e}");
    }
}
