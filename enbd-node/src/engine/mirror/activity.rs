//! The activity log (DRBD's name for it): the regions this mirror may have writes in flight
//! to, recorded durably on every replica that receives writes (`UpdateActivity`, the
//! servers' `activity.bitmap`), so that after a node crash the regions where in-sync
//! replicas may differ are known.
//!
//! Invariants:
//! - a region is durably in the log on every replica receiving writes before any write,
//!   TRIM or WRITE_ZEROES to it is sent to any replica (group commit: one `UpdateActivity`
//!   per batch of newly hot regions; a hot region costs a map lookup);
//! - a region leaves the log (lazily: idle for [`ActivityConfig::idle`], or the log is over
//!   its capacity) only when no mutation to it is in flight and it is not *unsynced*;
//! - *unsynced* regions — the log found at open (a stop without a clean close), and regions
//!   of mutations that ended in an error or were abandoned (they may have landed on some
//!   replicas only) — are served by one replica, the *source* (highest reported generation,
//!   then lowest id, among the in-sync replicas), until they are copied from it to every
//!   other replica receiving writes; reads of them wait for that copy (see `Inner::al_sync`).
//!
//! The log's region size is the record's, fixed once the record is known (`load`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::lock;
use crate::engine::status::ActivityStatus;

/// Tuning of the activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityConfig {
    /// Regions a hot set may hold before idle ones are evicted to make room (a soft limit:
    /// regions with mutations in flight are never evicted). Bounds what an unclean stop
    /// makes the next open copy: `capacity × region_bytes`.
    pub capacity: usize,
    /// A region idle this long leaves the log at the next supervisor pass.
    pub idle: Duration,
    /// Off only to measure what the log costs (`enbd-node bench --no-activity-log`): a
    /// mirror without it gives no consistency guarantee after a node crash.
    pub enabled: bool,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            idle: Duration::from_secs(5),
            enabled: true,
        }
    }
}

struct Entry {
    /// Mutations in flight to the region.
    inflight: u32,
    /// In the log on every replica receiving writes.
    durable: bool,
    last: Instant,
}

#[derive(Default)]
struct State {
    /// Region size of the log (the record's); 0 until loaded.
    region_bytes: u64,
    entries: HashMap<u64, Entry>,
    unsynced: BTreeSet<u64>,
}

/// The in-memory side of the log; the durable side is on the servers.
pub struct ActivityLog {
    pub cfg: ActivityConfig,
    st: Mutex<State>,
    /// Serializes `UpdateActivity` batches (writers wait here for the batch with theirs).
    pub(crate) marker: tokio::sync::Mutex<()>,
    /// `unsynced.len()`, readable without the lock (the read path's fast check).
    unsynced_count: AtomicUsize,
    pub(crate) synced_bytes: AtomicU64,
    pub(crate) synced_regions: AtomicU64,
    pub(crate) found_at_open: AtomicU64,
    pub(crate) marks: AtomicU64,
}

/// A batch to send: regions to set and (capacity evictions) to clear.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub mark: Vec<u64>,
    pub clear: Vec<u64>,
}

impl ActivityLog {
    pub fn new(cfg: ActivityConfig) -> Self {
        Self {
            cfg,
            st: Mutex::new(State::default()),
            marker: tokio::sync::Mutex::new(()),
            unsynced_count: AtomicUsize::new(0),
            synced_bytes: AtomicU64::new(0),
            synced_regions: AtomicU64::new(0),
            found_at_open: AtomicU64::new(0),
            marks: AtomicU64::new(0),
        }
    }

    pub fn region_bytes(&self) -> u64 {
        lock(&self.st).region_bytes
    }

    /// Installs the log found on the servers at open: those regions are hot, durable (the
    /// caller made them so on every replica receiving writes) and unsynced.
    pub fn load(&self, region_bytes: u32, found: &BTreeSet<u64>) {
        let mut st = lock(&self.st);
        st.region_bytes = u64::from(region_bytes);
        let now = Instant::now();
        for &r in found {
            st.entries.entry(r).or_insert(Entry {
                inflight: 0,
                durable: true,
                last: now,
            });
            st.unsynced.insert(r);
        }
        self.unsynced_count
            .store(st.unsynced.len(), Ordering::Release);
        self.found_at_open
            .fetch_add(found.len() as u64, Ordering::Relaxed);
    }

    pub fn is_loaded(&self) -> bool {
        lock(&self.st).region_bytes != 0
    }

    /// Regions that `[offset, offset + len)` touches, in the log's granularity.
    pub fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let rb = self.region_bytes();
        span(rb, offset, len)
    }

    /// Counts a mutation of `regions` in flight; returns whether they are all durably
    /// logged already (else: [`ActivityLog::take_batch`] under the marker).
    pub fn enter(&self, regions: std::ops::Range<u64>) -> bool {
        let mut st = lock(&self.st);
        let now = Instant::now();
        let mut ready = true;
        for r in regions {
            let e = st.entries.entry(r).or_insert(Entry {
                inflight: 0,
                durable: false,
                last: now,
            });
            e.inflight += 1;
            e.last = now;
            ready &= e.durable;
        }
        ready
    }

    /// Whether every region of `regions` is durably logged.
    pub fn durable(&self, regions: std::ops::Range<u64>) -> bool {
        let st = lock(&self.st);
        regions
            .clone()
            .all(|r| st.entries.get(&r).is_some_and(|e| e.durable))
    }

    /// Under the marker: every region waiting to be marked, and (over capacity) the least
    /// recently used evictable regions to clear in the same call (removed from the log now;
    /// a writer that wants one back marks it again after this batch).
    pub fn take_batch(&self) -> Batch {
        let mut st = lock(&self.st);
        let mut mark: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| !e.durable)
            .map(|(&r, _)| r)
            .collect();
        mark.sort_unstable();
        let mut clear = Vec::new();
        let over = st.entries.len().saturating_sub(self.cfg.capacity);
        if over > 0 {
            let mut idle: Vec<(Instant, u64)> = st
                .entries
                .iter()
                .filter(|(r, e)| e.inflight == 0 && e.durable && !st.unsynced.contains(r))
                .map(|(&r, e)| (e.last, r))
                .collect();
            idle.sort_unstable();
            clear = idle.into_iter().take(over).map(|(_, r)| r).collect();
            for r in &clear {
                st.entries.remove(r);
            }
        }
        Batch { mark, clear }
    }

    /// The batch was applied on every replica receiving writes.
    pub fn batch_done(&self, b: &Batch) {
        let mut st = lock(&self.st);
        for r in &b.mark {
            if let Some(e) = st.entries.get_mut(r) {
                e.durable = true;
            }
        }
        self.marks.fetch_add(1, Ordering::Relaxed);
    }

    /// The batch failed somewhere: its marks are not durable everywhere (they stay pending),
    /// and its clears are put back (still set on some replica: harmless, they stay hot).
    pub fn batch_failed(&self, b: &Batch) {
        let mut st = lock(&self.st);
        let now = Instant::now();
        for &r in &b.clear {
            st.entries.entry(r).or_insert(Entry {
                inflight: 0,
                durable: true,
                last: now,
            });
        }
    }

    /// A mutation of `regions` ended; `clean` = it completed on every replica receiving
    /// writes (or those that missed it are recorded OUT). Otherwise its regions become
    /// unsynced: some replicas may hold it and others not.
    pub fn leave(&self, regions: std::ops::Range<u64>, clean: bool) {
        let mut st = lock(&self.st);
        let now = Instant::now();
        for r in regions {
            if let Some(e) = st.entries.get_mut(&r) {
                e.inflight = e.inflight.saturating_sub(1);
                e.last = now;
            }
            if !clean {
                st.unsynced.insert(r);
            }
        }
        if !clean {
            self.unsynced_count
                .store(st.unsynced.len(), Ordering::Release);
        }
    }

    /// Regions idle for `idle` or more (evictable), removed from the log now: the caller
    /// holds the marker and clears them on the servers.
    pub fn take_idle(&self, idle: Duration) -> Vec<u64> {
        let mut st = lock(&self.st);
        let now = Instant::now();
        let State {
            entries, unsynced, ..
        } = &mut *st;
        let mut out: Vec<u64> = entries
            .iter()
            .filter(|(r, e)| {
                e.inflight == 0
                    && e.durable
                    && !unsynced.contains(r)
                    && now.saturating_duration_since(e.last) >= idle
            })
            .map(|(&r, _)| r)
            .collect();
        out.sort_unstable();
        for r in &out {
            entries.remove(r);
        }
        out
    }

    /// Every durable region (to mark on a replica that starts receiving writes).
    pub fn durable_regions(&self) -> Vec<u64> {
        let st = lock(&self.st);
        let mut v: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| e.durable)
            .map(|(&r, _)| r)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any region of `[offset, offset + len)` is unsynced (lock-free when none is).
    pub fn any_unsynced(&self, offset: u64, len: u64) -> bool {
        if self.unsynced_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let st = lock(&self.st);
        span(st.region_bytes, offset, len).any(|r| st.unsynced.contains(&r))
    }

    /// The unsynced regions among `regions`, or all of them if `None`.
    pub fn unsynced(&self, regions: Option<std::ops::Range<u64>>) -> Vec<u64> {
        let st = lock(&self.st);
        match regions {
            None => st.unsynced.iter().copied().collect(),
            Some(rs) => rs.filter(|r| st.unsynced.contains(r)).collect(),
        }
    }

    pub fn is_unsynced(&self, region: u64) -> bool {
        lock(&self.st).unsynced.contains(&region)
    }

    /// Region `r` was copied from the source to every other replica receiving writes.
    pub fn synced(&self, r: u64, bytes: u64) {
        let mut st = lock(&self.st);
        if st.unsynced.remove(&r) {
            self.synced_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.synced_regions.fetch_add(1, Ordering::Relaxed);
        }
        self.unsynced_count
            .store(st.unsynced.len(), Ordering::Release);
    }

    pub fn status(&self) -> ActivityStatus {
        let st = lock(&self.st);
        ActivityStatus {
            active_regions: st.entries.len() as u64,
            region_bytes: st.region_bytes,
            unsynced_regions: st.unsynced.len() as u64,
            found_at_open: self.found_at_open.load(Ordering::Relaxed),
            synced_regions: self.synced_regions.load(Ordering::Relaxed),
            synced_bytes: self.synced_bytes.load(Ordering::Relaxed),
            updates: self.marks.load(Ordering::Relaxed),
        }
    }
}

fn span(rb: u64, offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 || rb == 0 {
        return 0..0;
    }
    offset / rb..(offset + len - 1) / rb + 1
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn log(capacity: usize) -> ActivityLog {
        let l = ActivityLog::new(ActivityConfig {
            capacity,
            idle: Duration::from_secs(5),
            enabled: true,
        });
        l.load(4096, &BTreeSet::new());
        l
    }

    #[test]
    fn a_hot_region_needs_one_mark() {
        let l = log(16);
        assert!(!l.enter(l.span(0, 8192)));
        let b = l.take_batch();
        assert_eq!(b.mark, vec![0, 1]);
        l.batch_done(&b);
        assert!(l.enter(l.span(4096, 10)));
        assert_eq!(l.take_batch(), Batch::default());
        l.leave(l.span(0, 8192), true);
        l.leave(l.span(4096, 10), true);
        assert_eq!(l.status().active_regions, 2, "stays hot after completing");
        assert_eq!(l.take_idle(Duration::ZERO), vec![0, 1]);
        assert_eq!(l.status().active_regions, 0);
    }

    #[test]
    fn busy_and_unsynced_regions_are_never_evicted() {
        let l = log(1);
        let _ = l.enter(0..1);
        let b = l.take_batch();
        l.batch_done(&b);
        let _ = l.enter(1..2); // region 0 still in flight: over capacity, nothing evictable
        assert_eq!(l.take_batch().clear, Vec::<u64>::new());
        l.leave(0..1, false); // failed: unsynced
        assert!(l.any_unsynced(100, 1));
        assert!(l.take_idle(Duration::ZERO).is_empty());
        let _ = l.enter(2..3);
        assert!(l.take_batch().clear.is_empty(), "unsynced stays");
        l.synced(0, 4096);
        assert!(!l.any_unsynced(0, 4096));
        let b = l.take_batch();
        assert_eq!(
            b.clear,
            vec![0],
            "LRU evictable region goes when over capacity"
        );
        assert_eq!(l.status().synced_bytes, 4096);
    }

    #[test]
    fn the_log_found_at_open_is_unsynced() {
        let l = ActivityLog::new(ActivityConfig::default());
        l.load(1 << 20, &[3u64, 9].into());
        assert_eq!(l.unsynced(None), vec![3, 9]);
        assert!(l.any_unsynced(3 << 20, 1));
        assert!(!l.any_unsynced(4 << 20, 1 << 20));
        assert!(l.enter(l.span(3 << 20, 4096)));
        assert_eq!(l.status().found_at_open, 2);
    }
}
