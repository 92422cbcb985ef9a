//! Background copies of snapshots and clones, with copy-before-write against the source's
//! writes, so taking a snapshot never pauses the source for the length of the copy.
//!
//! A [`CopyJob`] copies a source's content as of one instant (when its hook was attached,
//! with the source's writes paused and drained) into a new entry being built in `staging/`.
//! The source is cut into regions of [`REGION_BYTES`]; a region's bit in `copied` is set once
//! the region's content at that instant is in the destination. Two parties copy regions: the
//! source's writes, through [`PreWrite`], before they change a region not yet copied; and the
//! job's background thread, which walks every region in order.
//!
//! Invariants:
//! - A region is copied at most once, under its stripe lock, and its bit is set only after the
//!   copy. A write that finds the bit set goes ahead; one that does not takes the stripe lock
//!   (waiting out a copy in progress), copies the region, then writes. So the destination
//!   holds exactly the source's content at the instant, whatever the writes do meanwhile.
//! - Nothing of a job is durable before it has finished: its entry is committed (renamed out
//!   of `staging/`) only after every region is copied and the data fsynced. A restart empties
//!   `staging/`, so an unfinished copy is never served, reported ready or used as a source.
//! - A failure (the destination's filesystem full, say) fails the job, never the source's
//!   write that triggered the copy.
//! - Holes stay holes: only the data extents of a region (SEEK_DATA/SEEK_HOLE) are copied.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::VolumeName;
use super::layout::Kind;
use super::meta::{ContentSource, SnapshotMeta, VolumeMeta};
use crate::export::PreWrite;
use crate::sys;

/// Copy-before-write granularity: the first write to a region after the instant copies this
/// much (less if the region is partly holes) before it proceeds. Small, because that copy is
/// latency added to an application write; the background pass is not slowed by it.
pub const REGION_BYTES: u64 = 128 << 10;
/// The background pass starts writeback of what it copied every this many bytes and waits
/// for the window before that: the copy never holds more than about twice this in dirty
/// pages, so the kernel's dirty-page throttling does not stall the source's writers.
const WRITEBACK_WINDOW: u64 = 16 << 20;
/// Stripe locks serialising the copy of a region against writes to it.
const STRIPES: u64 = 64;

/// Where a copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyState {
    Copying,
    Done,
    Failed(String),
    Cancelled,
}

/// A copy's progress: bytes of the source gone through (holes included) out of its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyProgress {
    pub total_bytes: u64,
    pub copied_bytes: u64,
}

/// What the finished copy becomes.
#[derive(Debug, Clone)]
pub(super) enum Target {
    Snapshot(SnapshotMeta),
    /// A clone: `size` is the new volume's size (at least the source's).
    Volume {
        meta: VolumeMeta,
        size: u64,
    },
}

impl Target {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Target::Snapshot(_) => Kind::Snapshot,
            Target::Volume { .. } => Kind::Volume,
        }
    }

    /// The source named the way the caller's idempotency check compares it.
    pub(super) fn source(&self) -> ContentSource {
        match self {
            Target::Snapshot(m) => ContentSource::Volume(m.source_volume.clone()),
            Target::Volume { meta, .. } => meta
                .source
                .clone()
                .unwrap_or_else(|| ContentSource::Volume(String::new())),
        }
    }
}

pub(super) struct CopyJob {
    pub(super) name: VolumeName,
    pub(super) target: Target,
    pub(super) stage: PathBuf,
    src: File,
    pub(super) dst: File,
    size: u64,
    regions: u64,
    copied: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
    /// Source bytes gone through (regions done, holes included).
    done: AtomicU64,
    /// Data bytes actually copied (for the log).
    data: AtomicU64,
    cancelled: AtomicBool,
    failed: AtomicBool,
    /// The failure was the destination's filesystem being full (or over quota).
    no_space: AtomicBool,
    error: Mutex<Option<String>>,
    state: Mutex<CopyState>,
    changed: Condvar,
    /// Background copy rate limit in bytes per second, 0 for none.
    rate: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CopyJob {
    /// A job copying the first `size` bytes of `src` into `dst` (already `size` long).
    pub(super) fn new(
        name: VolumeName,
        target: Target,
        stage: PathBuf,
        src: File,
        dst: File,
        size: u64,
        rate: u64,
    ) -> Self {
        let regions = size.div_ceil(REGION_BYTES);
        Self {
            name,
            target,
            stage,
            src,
            dst,
            size,
            regions,
            copied: (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            done: AtomicU64::new(0),
            data: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            no_space: AtomicBool::new(false),
            error: Mutex::new(None),
            state: Mutex::new(CopyState::Copying),
            changed: Condvar::new(),
            rate,
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn progress(&self) -> CopyProgress {
        CopyProgress {
            total_bytes: self.size,
            copied_bytes: self.done.load(Ordering::Acquire).min(self.size),
        }
    }

    pub(super) fn data_bytes(&self) -> u64 {
        self.data.load(Ordering::Relaxed)
    }

    fn is_copied(&self, r: u64) -> bool {
        self.copied[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    /// Copies region `r` unless it already is (see the module's invariant).
    fn copy_region(&self, r: u64) {
        if self.is_copied(r) {
            return;
        }
        let _stripe = lock(&self.stripes[(r % STRIPES) as usize]);
        if self.is_copied(r) {
            return;
        }
        let start = r * REGION_BYTES;
        let end = (start + REGION_BYTES).min(self.size);
        match copy_data(&self.src, &self.dst, start, end) {
            Ok(n) => {
                self.data.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.fail_io(format!("copying bytes {start}..{end}"), &e),
        }
        self.done.fetch_add(end - start, Ordering::AcqRel);
        self.copied[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
    }

    /// Fails the job with an IO error (remembering whether the disk was full).
    pub(super) fn fail_io(&self, context: String, e: &io::Error) {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            self.no_space.store(true, Ordering::Release);
        }
        self.fail(format!("{context}: {e}"));
    }

    fn fail(&self, why: String) {
        let mut e = lock(&self.error);
        if e.is_none() {
            tracing::warn!(name = %self.name, error = %why, "background copy failed");
            *e = Some(why);
        }
        self.failed.store(true, Ordering::Release);
    }

    pub(super) fn out_of_space(&self) -> bool {
        self.no_space.load(Ordering::Acquire)
    }

    pub(super) fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Asks the background thread to stop; [`CopyJob::wait`] for it to have.
    pub(super) fn cancel(&self) {
        let _st = lock(&self.state);
        self.cancelled.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Waits until the job is no longer copying, or `timeout` passed; returns its state.
    pub(super) fn wait(&self, timeout: Option<Duration>) -> CopyState {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.state);
        while *st == CopyState::Copying {
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    self.changed
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        st.clone()
    }

    /// The background pass: copies every region not yet copied, pacing itself to the rate
    /// limit. Returns early on cancel or failure.
    pub(super) fn copy_all(&self) {
        let started = Instant::now();
        let mut window = 0;
        for r in 0..self.regions {
            if self.is_cancelled() || self.failed.load(Ordering::Acquire) {
                return;
            }
            self.copy_region(r);
            let end = ((r + 1) * REGION_BYTES).min(self.size);
            if end - window >= WRITEBACK_WINDOW || end == self.size {
                // Best effort: a failure here only means more dirty pages.
                let _ = sys::writeback(&self.dst, window, end - window, false);
                if window >= WRITEBACK_WINDOW {
                    let _ = sys::writeback(
                        &self.dst,
                        window - WRITEBACK_WINDOW,
                        WRITEBACK_WINDOW,
                        true,
                    );
                }
                window = end;
            }
            self.pace(started);
        }
    }

    fn pace(&self, started: Instant) {
        if self.rate == 0 {
            return;
        }
        let due =
            Duration::from_secs_f64(self.done.load(Ordering::Acquire) as f64 / self.rate as f64);
        let mut st = lock(&self.state);
        loop {
            let elapsed = started.elapsed();
            if elapsed >= due || self.is_cancelled() {
                return;
            }
            st = self
                .changed
                .wait_timeout(st, due - elapsed)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends the job: runs `commit` (the rename out of staging) unless it was cancelled, under
    /// the state lock so a delete that cancels either sees it committed or stops it.
    pub(super) fn end(&self, commit: impl FnOnce() -> Result<(), String>) -> CopyState {
        let mut st = lock(&self.state);
        let outcome = if self.is_cancelled() {
            CopyState::Cancelled
        } else if let Some(e) = self.error() {
            CopyState::Failed(e)
        } else {
            match commit() {
                Ok(()) => CopyState::Done,
                Err(e) => CopyState::Failed(e),
            }
        };
        *st = outcome.clone();
        self.changed.notify_all();
        outcome
    }
}

impl PreWrite for CopyJob {
    fn before_write(&self, offset: u64, len: u64) {
        if offset >= self.size || self.is_cancelled() || self.failed.load(Ordering::Acquire) {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        for r in offset / REGION_BYTES..=(end - 1) / REGION_BYTES {
            self.copy_region(r);
        }
    }
}

/// Copies the data extents of `[start, end)` of `src` into `dst`; returns the bytes copied.
fn copy_data(src: &File, dst: &File, start: u64, end: u64) -> io::Result<u64> {
    let mut pos = start;
    let mut copied = 0;
    while pos < end {
        let Some(data) = sys::seek_data(src, pos)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = sys::seek_hole(src, data)?.unwrap_or(end).min(end);
        let hole = if hole <= data { end } else { hole };
        sys::copy_range(src, dst, data, hole - data)?;
        copied += hole - data;
        pos = hole;
    }
    Ok(copied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    fn file(dir: &tempfile::TempDir, name: &str, len: u64) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn job(src: &File, dst: File, size: u64, rate: u64) -> CopyJob {
        CopyJob::new(
            VolumeName::parse("s").unwrap(),
            Target::Snapshot(SnapshotMeta {
                format: 1,
                source_volume: "v".into(),
                created_at_unix: 0,
                created_at_nanos: 0,
            }),
            PathBuf::new(),
            src.try_clone().unwrap(),
            dst,
            size,
            rate,
        )
    }

    #[test]
    fn holes_stay_holes_and_data_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let src = file(&dir, "s", 8 << 20);
        src.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        src.write_all_at(&[9u8; 4096], 6 << 20).unwrap();
        let dst = file(&dir, "d", 8 << 20);
        let j = job(&src, dst.try_clone().unwrap(), 8 << 20, 0);
        j.copy_all();
        assert!(j.error().is_none());
        assert_eq!(j.progress().copied_bytes, 8 << 20);
        let copied = j.data_bytes();
        assert!((8192..(8 << 20)).contains(&copied), "copied {copied}");
        let mut b = [0u8; 4096];
        dst.read_exact_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        dst.read_exact_at(&mut b, 6 << 20).unwrap();
        assert_eq!(b, [9u8; 4096]);
        assert_eq!(
            sys::seek_data(&dst, 0).unwrap().map(|d| d >= 1 << 20),
            Some(true),
            "the leading hole stays a hole"
        );
    }

    /// Writers that go through the hook while the background pass runs (rate-limited so
    /// both really interleave): the copy is the content before any of their writes.
    #[test]
    fn copy_before_write_keeps_the_instant() {
        const SIZE: u64 = 16 << 20;
        let dir = tempfile::tempdir().unwrap();
        let src = file(&dir, "s", SIZE);
        for i in 0..SIZE / 65536 {
            src.write_all_at(&[(i % 251) as u8 + 1; 65536], i * 65536)
                .unwrap();
        }
        let before = std::fs::read(dir.path().join("s")).unwrap();
        let dst = file(&dir, "d", SIZE);
        let j = Arc::new(job(&src, dst.try_clone().unwrap(), SIZE, 32 << 20));
        let bg = {
            let j = j.clone();
            std::thread::spawn(move || j.copy_all())
        };
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let j = j.clone();
                let f = src.try_clone().unwrap();
                std::thread::spawn(move || {
                    for k in 0..200u64 {
                        let off = ((k * 7919 + w * 104_729) * 4096) % SIZE;
                        j.before_write(off, 8192.min(SIZE - off));
                        f.write_all_at(&vec![0xEE; 8192.min(SIZE - off) as usize], off)
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        bg.join().unwrap();
        assert!(j.error().is_none());
        let after = std::fs::read(dir.path().join("d")).unwrap();
        assert!(
            after == before,
            "the copy differs from the content at the instant"
        );
        let now = std::fs::read(dir.path().join("s")).unwrap();
        assert!(now != before, "the writers did change the source");
    }

    #[test]
    fn cancel_stops_a_paced_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = file(&dir, "s", 64 << 20);
        src.write_all_at(&[1u8; 4096], 0).unwrap();
        let dst = file(&dir, "d", 64 << 20);
        // 1 MiB/s: the whole copy would take a minute.
        let j = Arc::new(job(&src, dst, 64 << 20, 1 << 20));
        let bg = {
            let j = j.clone();
            std::thread::spawn(move || {
                j.copy_all();
                j.end(|| Ok(()))
            })
        };
        assert_eq!(j.wait(Some(Duration::from_millis(50))), CopyState::Copying);
        j.cancel();
        assert_eq!(bg.join().unwrap(), CopyState::Cancelled);
        assert_eq!(j.wait(None), CopyState::Cancelled);
        assert!(j.progress().copied_bytes < 64 << 20);
    }
}
