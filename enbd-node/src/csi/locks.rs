//! Per-volume operation guard: at most one node operation per volume id at a time; a
//! second concurrent one is refused at once (CSI `Aborted`) rather than queued, as the spec
//! asks, so a retrying CO never piles work up behind a slow attach.
//!
//! Invariant: the guard is released when dropped, which happens when the operation's task
//! ends — not when the gRPC handler is cancelled.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::error::NodeError;

#[derive(Debug, Default, Clone)]
pub struct VolumeLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Proof that the holder is the only operation on `volume_id`.
#[derive(Debug)]
pub struct VolumeGuard {
    held: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl VolumeLocks {
    pub fn try_lock(&self, volume_id: &str) -> Result<VolumeGuard, NodeError> {
        // The set stays consistent even if a holder panicked: insert/remove are atomic.
        let mut held = crate::sync::lock(&self.held, "CSI volume guards");
        if !held.insert(volume_id.to_string()) {
            return Err(NodeError::Aborted(volume_id.to_string()));
        }
        Ok(VolumeGuard {
            held: self.held.clone(),
            volume_id: volume_id.to_string(),
        })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        crate::sync::lock(&self.held, "CSI volume guards").remove(&self.volume_id);
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_aborted_until_first_drops() {
        let locks = VolumeLocks::default();
        let g = locks.try_lock("s/a").expect("first");
        assert!(matches!(locks.try_lock("s/a"), Err(NodeError::Aborted(_))));
        let other = locks.try_lock("s/b").expect("other volume");
        drop(g);
        locks.try_lock("s/a").expect("after release");
        drop(other);
    }
}
