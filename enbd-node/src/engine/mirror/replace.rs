//! Changing the replica set: replacing a member whose server is gone for good (an operator's
//! action, never automatic), and finding the set in force when a volume is opened with an
//! older list (the volume context is written once, at creation; the membership records on
//! the servers are what a replacement changes).
//!
//! Invariants:
//! - a replacement changes nothing unless the new replica's volume exists with the mirror's
//!   size and its data path connects; it is made under the exclusive membership lock (no
//!   write in flight) and is in force once one in-sync member holds the new record;
//! - the new member enters the record OUT, so every in-sync server starts its write-intent
//!   bitmap with every region set: the ordinary resync gives it a full copy, throttled by the
//!   mirror's resync limit, and an interrupted copy resumes from the cleared bits;
//! - the replaced member is no longer in the record: it is never read, written or resynced
//!   again, whatever its server says if it returns;
//! - opening follows the newest record the listed replicas hold, using the endpoints it
//!   names (falling back to those given, by id), for as long as that discovers a newer one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::backend::{ClientConnector, ReplicaControl};
use super::membership::{self, Record};
use super::{Backend, Inner, Mirror, MirrorConfig, MirrorError, Replica, ReplicaConfig, lock};

/// Most rounds of following newer records at open (each round may name new members).
const FOLLOW_ROUNDS: usize = 4;

/// How a replacement went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// The record now in force (the new member OUT, the old one gone).
    pub record: Record,
    /// The new replica's volume was created by this call (not found already there).
    pub created: bool,
}

fn replica_err(id: &str, why: impl ToString) -> MirrorError {
    MirrorError::Replica {
        id: id.to_owned(),
        why: why.to_string(),
    }
}

/// Creates `volume` on the server at `new.mgmt` with `size` bytes and the labels the
/// volume has on `template` (an in-sync member), or finds it there already with that size
/// (a retried replacement, or one the controller prepared). Returns whether it was created
/// now. Management calls go the way the mirror's own do ([`MirrorConfig::control`]: TLS and
/// the volume's access token when the address is https).
///
/// Under management TLS the node's role may not create volumes (only the controller may):
/// then the controller prepares the new replica first (`csi-driver prepare-replacement`,
/// which creates it and grants this node access), and this finds it.
pub async fn ensure_volume(
    cfg: &MirrorConfig,
    size: u64,
    template: &ReplicaConfig,
    new: &ReplicaConfig,
) -> Result<bool, MirrorError> {
    // One-off operator calls: no shorter than 5 s even with a tight replica timeout.
    let mut cfg = cfg.clone();
    cfg.replica_timeout = cfg.replica_timeout.max(Duration::from_secs(5));
    let volume = cfg.volume.as_str();
    let control = |r: &ReplicaConfig| cfg.control(&r.mgmt).map_err(|e| replica_err(&r.id, e.0));
    let dst = control(new)?;
    match dst.find_volume().await {
        Ok(Some(v)) if v.size_bytes == size => return Ok(false),
        Ok(Some(v)) => {
            return Err(replica_err(
                &new.id,
                format!(
                    "volume {volume} already exists there with {} bytes, not the mirror's {size}: \
                     delete it or choose another server",
                    v.size_bytes
                ),
            ));
        }
        Ok(None) => {}
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            return Err(replica_err(
                &new.id,
                format!(
                    "GetVolume: {} (this node holds no grant for {volume} there: prepare the \
                 replacement in the controller first — csi-driver prepare-replacement \
                 --volume-id <id> --replica <old> --target {} — then run this again)",
                    s.message(),
                    new.id
                ),
            ));
        }
        Err(s) => return Err(replica_err(&new.id, format!("GetVolume: {}", s.message()))),
    }
    let labels = control(template)?
        .find_volume()
        .await
        .map_err(|s| replica_err(&template.id, format!("GetVolume: {}", s.message())))?
        .map(|v| v.labels)
        .unwrap_or_default();
    match dst.create_volume(size, labels).await {
        Ok(()) => {
            tracing::info!(volume, replica = %new.id, size, "replacement replica's volume created");
            Ok(true)
        }
        Err(s) if s.code() == tonic::Code::PermissionDenied => Err(replica_err(
            &new.id,
            format!(
                "CreateVolume: {} (under management TLS only the controller creates volumes: \
                 prepare the replacement there first — csi-driver prepare-replacement \
                 --volume-id <id> --replica <old> --target {} — then run this again)",
                s.message(),
                new.id
            ),
        )),
        Err(s) => Err(replica_err(
            &new.id,
            format!("CreateVolume: {}", s.message()),
        )),
    }
}

impl Mirror {
    /// Operator action: replaces member `old` (its server gone for good, or being retired)
    /// by `new`, a server that holds no copy yet. Creates the volume there (same name and
    /// size; a retry finds it), connects it, then writes generation g+1 with `old` removed
    /// and `new` in its place OUT, so that the resync copies the whole volume to it.
    ///
    /// Refused, changing nothing, while IO waits (an in-sync member is unreachable: it may
    /// hold writes the others lack — if it is lost for good, promote a survivor first, then
    /// replace), when no other member is in sync, or when `new` is already a member.
    pub async fn replace(&self, old: &str, new: ReplicaConfig) -> Result<Replaced, MirrorError> {
        let inner = &self.inner;
        let cfg = inner.current_cfg();
        let idx = cfg
            .replicas
            .iter()
            .position(|r| r.id == old)
            .ok_or_else(|| {
                MirrorError::Config(format!("{old} is not a replica of {}", cfg.volume))
            })?;
        if cfg.replicas.iter().any(|r| r.id == new.id) {
            return Err(MirrorError::Config(format!(
                "{} is already a replica of {}",
                new.id, cfg.volume
            )));
        }
        // Checked again under the lock; here so that a refusal creates nothing.
        let blocked = lock(&inner.view).blocked.clone();
        if let Some(why) = blocked {
            return Err(MirrorError::Refused {
                volume: cfg.volume.clone(),
                why: format!(
                    "IO waits ({why}); replacing now could discard writes only that replica holds. \
                     If it is lost for good, promote a survivor first, then replace"
                ),
            });
        }
        let rec = inner.record();
        let template = cfg
            .replicas
            .iter()
            .find(|r| r.id != old && rec.state_of(&r.id) == Some(membership::MemberState::InSync))
            .ok_or_else(|| MirrorError::Refused {
                volume: cfg.volume.clone(),
                why: format!(
                    "no replica other than {old} is in sync at generation {}: nothing to copy from",
                    rec.generation
                ),
            })?;
        let created = ensure_volume(&cfg, inner.size(), template, &new).await?;
        let control = cfg
            .control(&new.mgmt)
            .map_err(|e| replica_err(&new.id, e.0))?;
        let backend = Backend {
            control: Arc::new(control),
            connector: Arc::new(ClientConnector(cfg.client_config(&new))),
        };
        let data = tokio::time::timeout(
            cfg.client.connect_timeout + cfg.replica_timeout,
            backend.connector.connect(),
        )
        .await
        .map_err(|_| replica_err(&new.id, "data connection timed out"))?
        .map_err(|e| replica_err(&new.id, e))?;
        if data.geometry().size != inner.size() {
            let size = data.geometry().size;
            data.shutdown().await;
            return Err(replica_err(
                &new.id,
                format!(
                    "export size {size} differs from the mirror's {}",
                    inner.size()
                ),
            ));
        }
        let fresh = Arc::new(Replica::new(new.clone(), backend));
        *lock(&fresh.data) = Some(data);
        let (record, previous) = {
            let _w = inner.membership.write().await;
            match inner.swap_in(idx, old, fresh).await {
                Ok(x) => x,
                Err(e) => return Err(e),
            }
        };
        if let Some(d) = previous.data() {
            d.shutdown().await;
        }
        tracing::warn!(volume = %cfg.volume, old, new = %new.id, generation = record.generation,
            "replica replaced by the operator: the new one gets a full copy");
        Ok(Replaced { record, created })
    }

    /// The replica set in force, in slot (record) order.
    pub fn replica_configs(&self) -> Vec<ReplicaConfig> {
        self.inner.current_cfg().replicas
    }

    /// Sets the resync copy limit (bytes per second, `None`: unlimited) from now on, also
    /// for a pass in progress.
    pub fn set_resync_limit(&self, bytes_per_sec: Option<u64>) {
        self.inner.set_resync_limit(bytes_per_sec);
    }
}

impl Inner {
    /// The body of [`Mirror::replace`] under the exclusive membership lock: puts `fresh`
    /// into slot `idx` and records the change; on failure the slot is as it was.
    async fn swap_in(
        &self,
        idx: usize,
        old: &str,
        fresh: Arc<Replica>,
    ) -> Result<(Record, Arc<Replica>), MirrorError> {
        let volume = self.cfg.volume.clone();
        let blocked = lock(&self.view).blocked.clone();
        if let Some(why) = blocked {
            if let Some(d) = fresh.data() {
                d.shutdown().await;
            }
            return Err(MirrorError::Refused {
                volume,
                why: format!(
                    "IO waits ({why}); replacing now could discard writes only that replica holds. \
                     If it is lost for good, promote a survivor first, then replace"
                ),
            });
        }
        let rec = self.record();
        let next = match membership::replace(
            &rec,
            old,
            &fresh.cfg.id,
            self.next_generation(rec.generation),
        ) {
            Ok(n) => n,
            Err(e) => {
                if let Some(d) = fresh.data() {
                    d.shutdown().await;
                }
                return Err(MirrorError::Refused {
                    volume,
                    why: e.to_string(),
                });
            }
        };
        let previous = std::mem::replace(&mut *lock(&self.slots[idx]), fresh.clone());
        // The survivors first: once an in-sync one holds the record, it is in force.
        let failed = self.publish(&next, &Vec::new(), &[]).await;
        let in_sync = next.ids_in(membership::MemberState::InSync);
        let took = self
            .replicas()
            .iter()
            .enumerate()
            .filter(|(i, r)| in_sync.contains(&r.cfg.id) && !failed.contains(i))
            .count();
        if took == 0 {
            *lock(&self.slots[idx]) = previous;
            if let Some(d) = fresh.data() {
                d.shutdown().await;
            }
            return Err(MirrorError::Refused {
                volume,
                why: "no in-sync replica took the new record; nothing changed".into(),
            });
        }
        self.set_view(next.clone(), None);
        // The new member too (best effort: the resync's first record reaches it anyway).
        let mut told = next.clone();
        told.endpoints = super::endpoints_of(&self.current_cfg().replicas);
        match tokio::time::timeout(
            self.cfg.replica_timeout,
            fresh.control.set_membership(told, Vec::new()),
        )
        .await
        {
            Ok(Ok(_)) => fresh
                .reported_generation
                .store(next.generation, std::sync::atomic::Ordering::Release),
            Ok(Err(e)) => fresh.set_error(format!("SetMembership: {e}")),
            Err(_) => fresh.set_error("SetMembership timed out"),
        }
        if !failed.is_empty()
            && let Err(why) = self.drop_locked(failed).await
        {
            tracing::warn!(volume = %volume, %why, "a survivor did not take the replacement record");
        }
        Ok((self.record(), previous))
    }
}

/// Operator action without an open mirror (the volume attached nowhere): the record part of
/// [`Mirror::replace`]. Creates the volume on `new`, then writes generation g+1 — `old`
/// removed, `new` in its place OUT — on every in-sync member and on `new`; the next mirror
/// that opens the volume (from any replica list: it follows the records) gives `new` its
/// full copy. A retry after a partial write completes it.
///
/// Refused, changing nothing, unless every member the newest record lists in sync other than
/// `old` answers with that record, and `old` is not one of them while unreachable (it may
/// hold writes the others lack: promote a survivor first if it is lost for good).
pub async fn replace_detached(
    cfg: &MirrorConfig,
    old: &str,
    new: ReplicaConfig,
) -> Result<Replaced, MirrorError> {
    use super::membership::MemberState;
    cfg.validate()?;
    let refused = |why: String| MirrorError::Refused {
        volume: cfg.volume.clone(),
        why,
    };
    let set = follow(cfg).await?;
    let mut controls = Vec::with_capacity(set.len());
    for r in &set {
        controls.push(cfg.control(&r.mgmt).map_err(|e| replica_err(&r.id, e.0))?);
    }
    let t = cfg.replica_timeout;
    let records: Vec<Option<Record>> = join_all(
        controls
            .iter()
            .map(|c| async move { tokio::time::timeout(t, c.get_membership()).await.ok()?.ok() }),
    )
    .await;
    let newest = records
        .iter()
        .flatten()
        .max_by_key(|r| r.generation)
        .cloned()
        .filter(|r| r.generation > 0)
        .ok_or_else(|| refused("no replica answers with a membership record".into()))?;
    let done_already = newest.state_of(old).is_none() && newest.state_of(&new.id).is_some();
    for (r, rec) in set.iter().zip(&records) {
        let in_sync = newest.state_of(&r.id) == Some(MemberState::InSync);
        let current = rec
            .as_ref()
            .is_some_and(|x| x.generation == newest.generation);
        if in_sync && !current {
            return Err(refused(if r.id == old {
                format!(
                    "{old} is in sync at generation {} and does not answer: it may hold writes \
                     the others lack. If it is lost for good, promote a survivor first",
                    newest.generation
                )
            } else {
                format!(
                    "in-sync replica {} does not answer with generation {}: retry when it does",
                    r.id, newest.generation
                )
            }));
        }
    }
    let (template, facts) = {
        let mut found = None;
        for (r, c) in set.iter().zip(&controls) {
            if r.id != old
                && newest.state_of(&r.id) == Some(MemberState::InSync)
                && let Ok(Ok(f)) = tokio::time::timeout(t, c.volume()).await
            {
                found = Some((r.clone(), f));
                break;
            }
        }
        found.ok_or_else(|| {
            refused(format!(
                "no replica other than {old} is in sync at generation {}",
                newest.generation
            ))
        })?
    };
    let created = ensure_volume(cfg, facts.size, &template, &new).await?;
    let mut next = if done_already {
        newest
    } else {
        membership::replace(&newest, old, &new.id, newest.generation + 1)
            .map_err(|e| refused(e.to_string()))?
    };
    let members: Vec<ReplicaConfig> = set
        .iter()
        .filter(|r| r.id != old && r.id != new.id)
        .cloned()
        .chain(std::iter::once(new.clone()))
        .collect();
    next.endpoints = super::endpoints_of(&members);
    // The survivors first (once one in-sync member holds it, it is in force), then `new`.
    let new_control = cfg
        .control(&new.mgmt)
        .map_err(|e| replica_err(&new.id, e.0))?;
    let mut failed = Vec::new();
    for (r, c) in set.iter().zip(&controls) {
        if matches!(
            next.state_of(&r.id),
            Some(MemberState::InSync | MemberState::Resyncing)
        ) && let Err(e) = c.set_membership(next.clone(), Vec::new()).await
        {
            failed.push(format!("{}: {e}", r.id));
        }
    }
    if let Err(e) = new_control.set_membership(next.clone(), Vec::new()).await {
        failed.push(format!("{}: {e}", new.id));
    }
    if !failed.is_empty() {
        return Err(refused(format!(
            "generation {} was not written everywhere ({}); run the same replace again",
            next.generation,
            failed.join("; ")
        )));
    }
    tracing::warn!(volume = %cfg.volume, old, new = %new.id, generation = next.generation,
        "replica replaced by the operator (volume not attached): the next attach copies it");
    Ok(Replaced {
        record: next,
        created,
    })
}

/// The replica set `rec` names, with endpoints from the record, else from `known` (by id).
/// `None` when it names the same ids as `current`.
pub fn set_of_record(
    current: &[ReplicaConfig],
    known: &[ReplicaConfig],
    rec: &Record,
) -> Result<Option<Vec<ReplicaConfig>>, String> {
    let mut a: Vec<&str> = current.iter().map(|r| r.id.as_str()).collect();
    let mut b: Vec<&str> = rec.members.iter().map(|(m, _)| m.as_str()).collect();
    a.sort_unstable();
    b.sort_unstable();
    if a == b {
        return Ok(None);
    }
    let by_id: HashMap<&str, &ReplicaConfig> = known
        .iter()
        .chain(current)
        .map(|r| (r.id.as_str(), r))
        .collect();
    rec.members
        .iter()
        .map(|(id, _)| {
            let ep = rec
                .endpoints
                .get(id)
                .filter(|e| !e.nbd.is_empty() && !e.mgmt.is_empty());
            match (ep, by_id.get(id.as_str())) {
                (Some(e), _) => Ok(ReplicaConfig {
                    id: id.clone(),
                    nbd: e.nbd.clone(),
                    mgmt: e.mgmt.clone(),
                }),
                (None, Some(r)) => Ok((*r).clone()),
                (None, None) => Err(format!(
                    "generation {} names replica {id}, whose endpoints neither the record nor the \
                     configuration give",
                    rec.generation
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The replica set in force for `cfg`: the newest record its replicas hold, followed to
/// newer ones it names. Unreachable replicas are skipped; with no record anywhere (a new
/// volume) or none reachable, `cfg.replicas` as given.
pub async fn follow(cfg: &MirrorConfig) -> Result<Vec<ReplicaConfig>, MirrorError> {
    let mut set = cfg.replicas.clone();
    let mut best = 0u64;
    for _ in 0..FOLLOW_ROUNDS {
        let asks = set.iter().map(|r| async move {
            let c = cfg.control(&r.mgmt).ok()?;
            tokio::time::timeout(cfg.replica_timeout, c.get_membership())
                .await
                .ok()?
                .ok()
        });
        let newest = join_all(asks)
            .await
            .into_iter()
            .flatten()
            .max_by_key(|r| r.generation);
        let Some(rec) = newest.filter(|r| r.generation > best) else {
            return Ok(set);
        };
        best = rec.generation;
        match set_of_record(&set, &cfg.replicas, &rec) {
            Ok(None) => return Ok(set),
            Ok(Some(next)) => {
                tracing::info!(volume = %cfg.volume, generation = rec.generation,
                    from = ?set.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    to = ?next.iter().map(|r| &r.id).collect::<Vec<_>>(),
                    "the membership record names another replica set: following it");
                set = next;
            }
            Err(why) => {
                return Err(MirrorError::Refused {
                    volume: cfg.volume.clone(),
                    why,
                });
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::mirror::membership::{Endpoint, MemberState};

    fn rc(id: &str) -> ReplicaConfig {
        ReplicaConfig {
            id: id.into(),
            nbd: format!("{id}:1"),
            mgmt: format!("{id}:2"),
        }
    }

    #[test]
    fn the_record_names_the_set_with_its_endpoints_first() {
        let given = vec![rc("a"), rc("b")];
        let mut rec = Record {
            generation: 5,
            members: vec![
                ("a".into(), MemberState::InSync),
                ("c".into(), MemberState::Out),
            ],
            region_bytes: 1 << 20,
            endpoints: Default::default(),
        };
        // c's endpoints are unknown: refused with the reason.
        let e = set_of_record(&given, &given, &rec).expect_err("no endpoint for c");
        assert!(e.contains("replica c"), "{e}");
        rec.endpoints.insert(
            "c".into(),
            Endpoint {
                nbd: "10.0.0.3:10809".into(),
                mgmt: "10.0.0.3:10810".into(),
            },
        );
        let set = set_of_record(&given, &given, &rec)
            .expect("set")
            .expect("changed");
        assert_eq!(set[0], rc("a"), "a falls back to the configuration");
        assert_eq!(set[1].nbd, "10.0.0.3:10809");
        assert_eq!(set[1].mgmt, "10.0.0.3:10810");
        // The same ids (any order) mean no change.
        let same = vec![rc("c"), rc("a")];
        assert_eq!(set_of_record(&same, &given, &rec).expect("ok"), None);
    }
}
