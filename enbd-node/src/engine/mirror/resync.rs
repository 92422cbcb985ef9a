//! Resync: brings a returning replica back in sync by copying only the regions the in-sync
//! servers recorded as written while it was OUT (their write-intent bitmaps, united), from
//! an in-sync replica, while application IO continues (writes reach it too, as RESYNCING).
//!
//! Invariants:
//! - a region's bits are cleared only after its copy was written and flushed on the target,
//!   so a pass interrupted anywhere (node restart, server restart) resumes from the records;
//! - a region being copied holds its ordering lock, so no application write to it is sent
//!   while its old content is in transit;
//! - the copy source is always an in-sync replica (the ordinary read path);
//! - the target becomes IN_SYNC only at a new generation written while no write is in
//!   flight and no dirty region is left.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::membership::{self, MemberState};
use super::{Inner, lock};
use crate::engine::status::ReplicaHealth;

/// Progress of the current (or last) pass for one replica.
#[derive(Debug, Default)]
pub struct Progress {
    to_copy: AtomicU64,
    copied: AtomicU64,
    started: Mutex<Option<Instant>>,
}

impl Progress {
    fn start(&self, to_copy: u64) {
        self.to_copy.store(to_copy, Ordering::Relaxed);
        self.copied.store(0, Ordering::Relaxed);
        *lock(&self.started) = Some(Instant::now());
    }

    fn add(&self, n: u64) {
        self.copied.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn health(&self) -> ReplicaHealth {
        let copied = self.copied.load(Ordering::Relaxed);
        let secs = lock(&self.started)
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        ReplicaHealth::Resyncing {
            to_copy: self.to_copy.load(Ordering::Relaxed),
            copied,
            bytes_per_sec: if secs > 0.0 {
                copied as f64 / secs
            } else {
                0.0
            },
        }
    }
}

/// The in-sync replicas' dirty regions for member `id`, united.
async fn union_dirty(inner: &Inner, id: &str) -> Result<BTreeSet<u64>, String> {
    let rec = inner.record();
    let mut all = BTreeSet::new();
    for r in &inner.replicas() {
        if rec.state_of(&r.cfg.id) != Some(MemberState::InSync) {
            continue;
        }
        let regions = tokio::time::timeout(inner.cfg.replica_timeout, r.control.dirty_regions(id))
            .await
            .map_err(|_| format!("GetDirtyRegions on {} timed out", r.cfg.id))?
            .map_err(|e| format!("GetDirtyRegions on {}: {e}", r.cfg.id))?;
        all.extend(regions);
    }
    Ok(all)
}

/// Moves replica `i` from OUT to RESYNCING (if it is OUT) at a new generation written to
/// every in-sync member and to it.
async fn begin(inner: &Inner, i: usize) -> Result<(), String> {
    let id = inner.replica(i).cfg.id.clone();
    let _w = inner.membership.write().await;
    let rec = inner.record();
    if rec.state_of(&id) != Some(MemberState::Out) {
        return Ok(());
    }
    let next = membership::transition(
        &rec,
        &id,
        MemberState::Out,
        MemberState::Resyncing,
        inner.next_generation(rec.generation),
    )
    .map_err(|e| e.to_string())?;
    // It receives writes from the record on: it must hold the activity log first.
    inner.al_join(i).await?;
    let failed = inner.publish(&next, &Vec::new(), &[i]).await;
    // Whoever took it stops tracking writes for the target: the view must follow before any
    // write goes out, and whoever did not take it is dropped from there.
    inner.set_view(next, None);
    tracing::info!(volume = %inner.cfg.volume, replica = %id, "resync begins");
    if !failed.is_empty() {
        inner.drop_locked(failed).await?;
    }
    if inner.state_of(i) != Some(MemberState::Resyncing) {
        return Err("the target did not take the RESYNCING record".into());
    }
    Ok(())
}

/// One resync of replica `i` to the end (IN_SYNC), or an error saying where it stopped.
pub(crate) async fn run(inner: &Arc<Inner>, i: usize) -> Result<(), String> {
    begin(inner, i).await?;
    let r = inner.replica(i);
    let id = r.cfg.id.clone();
    let rec = inner.record();
    let rb = u64::from(if rec.region_bytes != 0 {
        rec.region_bytes
    } else {
        inner.cfg.region_bytes
    });
    let size = inner.size();
    loop {
        let dirty: Vec<u64> = union_dirty(inner, &id).await?.into_iter().collect();
        if dirty.is_empty() {
            let _w = inner.membership.write().await;
            // With no write in flight nothing can be set meanwhile; check once more under
            // the lock all the same (a server restart may have restored bits).
            if !union_dirty(inner, &id).await?.is_empty() {
                continue;
            }
            let rec = inner.record();
            let next = membership::transition(
                &rec,
                &id,
                MemberState::Resyncing,
                MemberState::InSync,
                inner.next_generation(rec.generation),
            )
            .map_err(|e| e.to_string())?;
            let failed = inner.publish(&next, &Vec::new(), &[]).await;
            inner.set_view(next, None);
            tracing::info!(volume = %inner.cfg.volume, replica = %id, "resync done: in sync");
            if !failed.is_empty() {
                inner.drop_locked(failed).await?;
            }
            return Ok(());
        }
        r.resync.start(dirty.len() as u64 * rb);
        let started = Instant::now();
        let mut pass_bytes = 0u64;
        for batch in dirty.chunks(inner.cfg.resync_batch) {
            for &reg in batch {
                let offset = reg * rb;
                let len = rb.min(size.saturating_sub(offset));
                if len == 0 {
                    continue;
                }
                if let Some(bw) = inner.resync_limit() {
                    let due = started + Duration::from_secs_f64(pass_bytes as f64 / bw as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                // The copy reads balanced: regions where the replicas may differ go first.
                let unsynced = inner.al.unsynced(Some(inner.al.span(offset, len)));
                if !unsynced.is_empty() {
                    inner.al_sync(&unsynced).await?;
                }
                let guard = inner.regions.copy_range(offset, len).await;
                if inner.state_of(i) != Some(MemberState::Resyncing) {
                    return Err("the target was dropped during the resync".into());
                }
                let data = inner
                    .read(offset, len as u32, None)
                    .await
                    .map_err(|e| format!("reading region {reg} from the in-sync replicas: {e}"))?;
                let target = r.data().ok_or("the target's data path is gone")?;
                // A region that reads as zeros (most of a full copy's: space never written)
                // goes as one WRITE_ZEROES, which the target turns into a hole instead of
                // receiving and storing the bytes. Same result, under the same lock.
                let sent = if is_zeros(&data) {
                    target.write_zeroes(offset, len as u32, false).await
                } else {
                    target.write(offset, data, false).await
                };
                if let Err(e) = sent {
                    drop(guard);
                    inner.drop_replicas(vec![i]).await?;
                    return Err(format!("writing region {reg} to the target: {e}"));
                }
                drop(guard);
                pass_bytes += len;
                r.resync.add(len);
                inner.resync_copied.fetch_add(len, Ordering::Relaxed);
            }
            let target = r.data().ok_or("the target's data path is gone")?;
            if let Err(e) = target.flush().await {
                inner.drop_replicas(vec![i]).await?;
                return Err(format!("flushing the target: {e}"));
            }
            let rec = inner.record();
            for s in &inner.replicas() {
                if rec.state_of(&s.cfg.id) != Some(MemberState::InSync) {
                    continue;
                }
                tokio::time::timeout(
                    inner.cfg.replica_timeout,
                    s.control.clear_dirty(&id, batch.to_vec()),
                )
                .await
                .map_err(|_| format!("ClearDirtyRegions on {} timed out", s.cfg.id))?
                .map_err(|e| format!("ClearDirtyRegions on {}: {e}", s.cfg.id))?;
            }
        }
    }
}

/// All bytes zero. Compares eight at a time: a full copy checks every region it reads.
fn is_zeros(data: &[u8]) -> bool {
    let (words, rest) = data.as_chunks::<8>();
    words.iter().all(|w| u64::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}
