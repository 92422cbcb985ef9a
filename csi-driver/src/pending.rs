//! Replacement replicas the controller prepared for a node's mirror but that no membership
//! record names yet: their servers hold a copy of the volume and the node's grant, and the
//! grant reconciliation must neither revoke that grant (the server holds a copy but is no
//! member) nor forget to repair it, until the node's `enbd-node replace` records the new
//! member or the hold expires.
//!
//! In memory, like the publications' tokens: after a controller restart a prepared
//! replacement not yet recorded loses its hold, the next pass revokes the grant, and the
//! operator prepares it again (the copy is found there, nothing is created twice).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use enbd_proto::ids::ServerId;

use crate::sync::lock;

/// How long a prepared replacement stays granted without being recorded.
pub const HOLD_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct PendingReplacements {
    /// volume id → server → when the hold ends.
    held: Mutex<BTreeMap<String, BTreeMap<ServerId, Instant>>>,
}

impl PendingReplacements {
    /// Holds `server` for `volume_id` for [`HOLD_FOR`] from now (again, if held already).
    pub fn hold(&self, volume_id: &str, server: &ServerId) {
        let mut held = lock(&self.held, "pending replacements");
        held.entry(volume_id.to_owned())
            .or_default()
            .insert(server.clone(), Instant::now() + HOLD_FOR);
    }

    /// The servers held for `volume_id` now; expired holds are dropped.
    pub fn held(&self, volume_id: &str) -> Vec<ServerId> {
        let now = Instant::now();
        let mut held = lock(&self.held, "pending replacements");
        let Some(servers) = held.get_mut(volume_id) else {
            return Vec::new();
        };
        servers.retain(|_, until| *until > now);
        let out: Vec<ServerId> = servers.keys().cloned().collect();
        if out.is_empty() {
            held.remove(volume_id);
        }
        out
    }

    /// Ends the hold of `server` for `volume_id` (a record names it now).
    pub fn release(&self, volume_id: &str, server: &ServerId) {
        let mut held = lock(&self.held, "pending replacements");
        if let Some(servers) = held.get_mut(volume_id) {
            servers.remove(server);
            if servers.is_empty() {
                held.remove(volume_id);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_lasts_until_released_and_is_per_volume() {
        let p = PendingReplacements::default();
        let c = ServerId::parse("srv-c").unwrap();
        assert!(p.held("srv-a/v").is_empty());
        p.hold("srv-a/v", &c);
        assert_eq!(p.held("srv-a/v"), vec![c.clone()]);
        assert!(p.held("srv-a/w").is_empty());
        p.release("srv-a/v", &c);
        assert!(p.held("srv-a/v").is_empty());
    }

    #[test]
    fn an_expired_hold_is_dropped() {
        let p = PendingReplacements::default();
        let c = ServerId::parse("srv-c").unwrap();
        p.hold("srv-a/v", &c);
        lock(&p.held, "test")
            .get_mut("srv-a/v")
            .unwrap()
            .insert(c, Instant::now() - Duration::from_secs(1));
        assert!(p.held("srv-a/v").is_empty());
        assert!(lock(&p.held, "test").is_empty());
    }
}
