//! Per-region ordering between resync copies and application writes: a region being copied
//! to a returning replica holds it exclusively, so no application write to that region is
//! sent while its old content is in transit (it would be overwritten by the copy); writes to
//! other regions proceed. Application writes hold their regions shared among themselves.
//!
//! Invariant: a lock entry exists only while someone holds or waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// The lock table, keyed by region index.
pub struct RegionLocks {
    region_bytes: u64,
    map: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

enum Held {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// Regions held until dropped.
pub struct RegionGuard<'a> {
    locks: &'a RegionLocks,
    regions: Vec<u64>,
    held: Vec<Held>,
}

impl RegionLocks {
    pub fn new(region_bytes: u32) -> Self {
        Self {
            region_bytes: u64::from(region_bytes.max(1)),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Region indexes that `[offset, offset+len)` touches (a zero-length range touches none).
    pub fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.region_bytes;
        let last = (offset + len - 1) / self.region_bytes;
        first..last + 1
    }

    fn entry(&self, region: u64) -> Arc<RwLock<()>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(region).or_default().clone()
    }

    /// Holds the regions of an application write (shared with other writes).
    pub async fn write_range(&self, offset: u64, len: u64) -> RegionGuard<'_> {
        let regions: Vec<u64> = self.span(offset, len).collect();
        let mut held = Vec::with_capacity(regions.len());
        // Ascending order, like every other holder: no lock-order cycles.
        for &r in &regions {
            held.push(Held::Shared(self.entry(r).read_owned().await));
        }
        RegionGuard {
            locks: self,
            regions,
            held,
        }
    }

    /// Holds the regions of `[offset, offset+len)` for a resync copy (exclusive).
    pub async fn copy_range(&self, offset: u64, len: u64) -> RegionGuard<'_> {
        let regions: Vec<u64> = self.span(offset, len).collect();
        let mut held = Vec::with_capacity(regions.len());
        for &r in &regions {
            held.push(Held::Exclusive(self.entry(r).write_owned().await));
        }
        RegionGuard {
            locks: self,
            regions,
            held,
        }
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        self.held.clear();
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        for r in &self.regions {
            // Only the map's own reference left: nobody holds or waits for it.
            if map.get(r).is_some_and(|l| Arc::strong_count(l) == 1) {
                map.remove(r);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn span_covers_touched_regions() {
        let l = RegionLocks::new(1 << 20);
        assert_eq!(l.span(0, 4096), 0..1);
        assert_eq!(l.span((1 << 20) - 1, 2), 0..2);
        assert_eq!(l.span(3 << 20, 1 << 20), 3..4);
        assert_eq!(l.span(5, 0), 0..0);
    }

    #[tokio::test]
    async fn copy_blocks_writes_to_its_region_only() {
        let l = Arc::new(RegionLocks::new(1 << 20));
        let copy = l.copy_range(2 << 20, 1 << 20).await;
        // Another region: proceeds at once.
        let other = tokio::time::timeout(Duration::from_secs(5), l.write_range(0, 4096))
            .await
            .expect("write to another region must not wait");
        drop(other);
        let l2 = l.clone();
        let blocked = tokio::spawn(async move {
            let _g = l2.write_range(2 << 20, 4096).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !blocked.is_finished(),
            "write to the copied region went ahead"
        );
        drop(copy);
        tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("write must proceed once the copy is done")
            .expect("task");
        assert_eq!(l.entries(), 0);
    }

    #[tokio::test]
    async fn copy_waits_for_writes_in_progress() {
        let l = Arc::new(RegionLocks::new(4096));
        let w = l.write_range(4096, 8192).await;
        let l2 = l.clone();
        let copy = tokio::spawn(async move {
            let _g = l2.copy_range(2 * 4096, 4096).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!copy.is_finished(), "copy overtook a write in progress");
        drop(w);
        tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy proceeds")
            .expect("task");
    }
}
