//! Online growth of an attached mirror: after every replica's volume was expanded (the
//! controller grows all of them before any node is told), the mirror learns the new size.
//!
//! Invariants:
//! - the size changes under the exclusive membership lock (no write in flight) and only
//!   when every replica receiving writes (in sync or resyncing) reports the same, larger
//!   size and its data path serves up to it; otherwise nothing changes and the error says
//!   which replica disagrees;
//! - the grown range is zeros on every replica (sparse growth), so it needs no resync;
//! - a replica that is OUT keeps its data path only if it grew too; otherwise it is
//!   reconnected later and admitted once its export has the mirror's size.

use std::sync::atomic::Ordering;

use super::membership::MemberState;
use super::{Mirror, MirrorError, lock};

impl Mirror {
    /// Re-reads every replica's size and, when all replicas receiving writes agree on a larger
    /// one, serves up to it. Returns the size in force (unchanged if nothing grew).
    pub async fn refresh_size(&self) -> Result<u64, MirrorError> {
        let inner = &self.inner;
        let _w = inner.membership.write().await;
        let before = inner.size();
        let rec = inner.record();
        let replicas = inner.replicas();
        let t = inner.cfg.replica_timeout;
        let mut sizes = Vec::new();
        for r in &replicas {
            let Some(state) = rec.state_of(&r.cfg.id) else {
                continue;
            };
            let asked = tokio::time::timeout(t, r.control.volume()).await;
            let size = match asked {
                Ok(Ok(f)) => Some(f.size),
                Ok(Err(e)) => {
                    r.set_error(format!("GetVolume: {e}"));
                    None
                }
                Err(_) => None,
            };
            sizes.push((r.clone(), state, size));
        }
        let receiving: Vec<_> = sizes
            .iter()
            .filter(|(_, s, _)| matches!(s, MemberState::InSync | MemberState::Resyncing))
            .collect();
        let listed: Vec<String> = receiving
            .iter()
            .map(|(r, _, s)| match s {
                Some(s) => format!("{} {s}", r.cfg.id),
                None => format!("{} unreachable", r.cfg.id),
            })
            .collect();
        let refused = |why: String| MirrorError::Refused {
            volume: inner.cfg.volume.clone(),
            why,
        };
        let Some(new) = receiving.first().and_then(|(_, _, s)| *s) else {
            return Err(refused(format!(
                "no replica's size is known: {}",
                listed.join(", ")
            )));
        };
        if receiving.iter().any(|(_, _, s)| *s != Some(new)) {
            return Err(refused(format!(
                "the replicas do not agree on the volume's size ({}): every replica must be \
                 expanded before the node grows (ControllerExpandVolume does so; retry it)",
                listed.join(", ")
            )));
        }
        if new <= before {
            return Ok(before);
        }
        for (r, _, _) in &receiving {
            let d = r
                .data()
                .ok_or_else(|| refused(format!("replica {}: data path not connected", r.cfg.id)))?;
            let now = d
                .refresh_size()
                .await
                .map_err(|e| refused(format!("replica {}: {e}", r.cfg.id)))?;
            if now != new {
                return Err(refused(format!(
                    "replica {}: its data path serves {now} bytes after the refresh, not {new}",
                    r.cfg.id
                )));
            }
        }
        // OUT members: keep a data path only if it grew too.
        for (r, state, size) in &sizes {
            if *state != MemberState::Out {
                continue;
            }
            let Some(d) = r.data() else { continue };
            let grown = *size == Some(new) && d.refresh_size().await.is_ok_and(|s| s == new);
            if !grown {
                lock(&r.data).take();
                d.shutdown().await;
                r.set_error(format!(
                    "not grown to {new} bytes yet: reconnected once it is"
                ));
            }
        }
        inner.size.store(new, Ordering::Release);
        tracing::info!(volume = %inner.cfg.volume, old = before, new, "mirror grown online");
        Ok(new)
    }
}
