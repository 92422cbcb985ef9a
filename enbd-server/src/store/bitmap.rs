//! Write-intent bitmaps: one bit per `region_bytes` region of a volume, kept for a mirror
//! member that is away, set durably before a write to the region is acknowledged.
//!
//! File format (`dirty-<replica-id>.bitmap`): a 16-byte header — the magic `ENBDBMP1`, the
//! region size as a little-endian u32, four zero bytes — then the bits as little-endian u64
//! words: region `i` is bit `i % 64` of word `i / 64`, which is also byte `i / 8`, bit
//! `i % 8`, least significant first (the `GetDirtyRegions` format). The file holds at least
//! `ceil(regions / 64)` words; a longer one (a crash in the middle of an expansion, which
//! grows bitmaps before the data file) is accepted, its excess ignored.
//!
//! Invariants:
//! - `durable` holds only bits that are on disk (written and fdatasynced); [`DirtyBitmap::mark`]
//!   returns only once every bit of its range is in `durable`. The hot path reads `durable`
//!   alone: a region written before costs no lock and no sync.
//! - First writes to not-yet-set regions share syncs (group commit): one writer at a time
//!   writes every word staged so far and syncs; the others wait for the batch that contains
//!   their bits.
//! - Bits past the last region are always zero.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::sys;

const MAGIC: &[u8; 8] = b"ENBDBMP1";
/// Bytes before the first word.
pub const HEADER_LEN: u64 = 16;

/// Number of regions covering `size` bytes (the last one may be partial).
pub fn region_count(size: u64, region_bytes: u32) -> u64 {
    size.div_ceil(u64::from(region_bytes))
}

/// The regions `[offset, offset + len)` touches; empty when `len == 0`.
pub fn regions_of(offset: u64, len: u64, region_bytes: u32) -> Range<u64> {
    let rb = u64::from(region_bytes);
    if len == 0 {
        return 0..0;
    }
    let last = offset.saturating_add(len - 1);
    offset / rb..last / rb + 1
}

fn words_for(regions: u64) -> usize {
    regions.div_ceil(64) as usize
}

/// The word index and mask of each word that `regions` touches.
fn word_masks(regions: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let mut r = regions.start;
    let end = regions.end;
    std::iter::from_fn(move || {
        if r >= end {
            return None;
        }
        let w = r / 64;
        let lo = r % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        r = w * 64 + hi;
        Some((w as usize, mask))
    })
}

/// Mask of the bits of the last word that are regions (all ones if the last word is full).
fn tail_mask(regions: u64) -> u64 {
    match regions % 64 {
        0 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct SyncState {
    /// Durable bits plus those staged for the next batch.
    staged: Vec<u64>,
    /// Words changed in `staged` since the last batch started.
    dirty: BTreeSet<usize>,
    syncing: bool,
    /// The batch that will take the words staged now.
    next_batch: u64,
    /// Every batch up to this one is durable.
    done_batch: u64,
}

pub struct DirtyBitmap {
    path: PathBuf,
    file: File,
    region_bytes: u32,
    regions: u64,
    durable: Box<[AtomicU64]>,
    sync: Mutex<SyncState>,
    synced: Condvar,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("path", &self.path)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

fn header(region_bytes: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&region_bytes.to_le_bytes());
    h
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl DirtyBitmap {
    /// Writes a new bitmap file at `path` (beside it first, fsynced, renamed over; the caller
    /// fsyncs the directory), every region set if `all_dirty`, else none.
    pub fn create(
        path: &Path,
        region_bytes: u32,
        regions: u64,
        all_dirty: bool,
    ) -> io::Result<Self> {
        let n = words_for(regions);
        let mut words = vec![if all_dirty { u64::MAX } else { 0 }; n];
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(regions);
        }
        let tmp = path.with_extension("bitmap.tmp");
        {
            let f = File::create(&tmp)?;
            f.write_all_at(&header(region_bytes), 0)?;
            f.write_all_at(&words_to_bytes(&words), HEADER_LEN)?;
            // A bitmap with no regions still gets its full header on disk.
            f.set_len(HEADER_LEN + 8 * n as u64)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        Self::open_with(path, region_bytes, regions, words)
    }

    fn open_with(
        path: &Path,
        region_bytes: u32,
        regions: u64,
        words: Vec<u64>,
    ) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            region_bytes,
            regions,
            durable: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            sync: Mutex::new(SyncState {
                staged: words,
                dirty: BTreeSet::new(),
                syncing: false,
                next_batch: 1,
                done_batch: 0,
            }),
            synced: Condvar::new(),
        })
    }

    /// Loads the bitmap at `path` for a volume of `regions` regions. A file that cannot be
    /// trusted (missing, wrong magic or region size, too short) is replaced by one with every
    /// region set, and the reason is returned beside it: dirty bits are never dropped.
    pub fn load(
        path: &Path,
        region_bytes: u32,
        regions: u64,
    ) -> io::Result<(Self, Option<String>)> {
        let n = words_for(regions);
        let problem = match fs::read(path) {
            Ok(bytes) => {
                let need = HEADER_LEN as usize + 8 * n;
                if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
                    Some("not a bitmap file (bad header)".to_owned())
                } else if bytes[8..12] != region_bytes.to_le_bytes() {
                    Some(format!(
                        "region size {} does not match the membership record's {region_bytes}",
                        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]])
                    ))
                } else if bytes.len() < need {
                    Some(format!(
                        "{} bytes, {need} needed for {regions} regions",
                        bytes.len()
                    ))
                } else {
                    let mut words: Vec<u64> = bytes[HEADER_LEN as usize..need]
                        .chunks_exact(8)
                        .map(|c| {
                            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect();
                    if let Some(last) = words.last_mut() {
                        *last &= tail_mask(regions);
                    }
                    return Ok((Self::open_with(path, region_bytes, regions, words)?, None));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some("missing".to_owned()),
            Err(e) => return Err(e),
        };
        let b = Self::create(path, region_bytes, regions, true)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok((b, problem))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Whether every region of `regions` is durably set.
    fn all_durable(&self, regions: Range<u64>) -> bool {
        word_masks(regions).all(|(w, m)| self.durable[w].load(Ordering::Acquire) & m == m)
    }

    /// Sets the bits of the regions `[offset, offset + len)` touches and returns once they are
    /// durable. Ranges past the last region are clipped (the session checks ranges first).
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = regions_of(offset, len, self.region_bytes);
        self.mark_regions(r.start.min(self.regions)..r.end.min(self.regions))
    }

    /// Sets every region's bit, durably.
    pub fn mark_all(&self) -> io::Result<()> {
        self.mark_regions(0..self.regions)
    }

    fn mark_regions(&self, regions: Range<u64>) -> io::Result<()> {
        if regions.is_empty() || self.all_durable(regions.clone()) {
            return Ok(());
        }
        let mut st = lock(&self.sync);
        for (w, m) in word_masks(regions.clone()) {
            if st.staged[w] & m != m {
                st.staged[w] |= m;
                st.dirty.insert(w);
            }
        }
        // Every bit of ours is staged now, so the batch after the one running (if any)
        // carries it; an earlier batch may have, too, which `all_durable` notices.
        let target = st.next_batch;
        loop {
            if st.done_batch >= target || self.all_durable(regions.clone()) {
                return Ok(());
            }
            if st.syncing {
                st = self.synced.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let batch = st.next_batch;
            st.next_batch += 1;
            st.syncing = true;
            let words: Vec<(usize, u64)> = std::mem::take(&mut st.dirty)
                .into_iter()
                .map(|w| (w, st.staged[w]))
                .collect();
            drop(st);
            let written = self.write_words(&words);
            st = lock(&self.sync);
            st.syncing = false;
            match written {
                Ok(()) => {
                    for &(w, v) in &words {
                        self.durable[w].fetch_or(v, Ordering::Release);
                    }
                    st.done_batch = batch;
                    self.synced.notify_all();
                }
                Err(e) => {
                    // Still staged: the next batch retries them.
                    st.dirty.extend(words.iter().map(|&(w, _)| w));
                    self.synced.notify_all();
                    return Err(e);
                }
            }
        }
    }

    /// pwrites the given words (runs of adjacent words in one call) and fdatasyncs.
    fn write_words(&self, words: &[(usize, u64)]) -> io::Result<()> {
        let mut i = 0;
        while i < words.len() {
            let mut j = i + 1;
            while j < words.len() && words[j].0 == words[j - 1].0 + 1 {
                j += 1;
            }
            let run: Vec<u64> = words[i..j].iter().map(|&(_, v)| v).collect();
            let at = HEADER_LEN + 8 * words[i].0 as u64;
            self.file.write_all_at(&words_to_bytes(&run), at)?;
            i = j;
        }
        sys::fdatasync(&self.file)
    }

    /// Clears the given regions (indexes already checked against [`Self::regions`]), durably,
    /// and returns how many regions stay set.
    pub fn clear(&self, regions: &[u64]) -> io::Result<u64> {
        let mut st = lock(&self.sync);
        // A batch being written carries words read before this clear: let it land first, so
        // it cannot write a cleared bit back.
        while st.syncing {
            st = self.synced.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let mut changed = BTreeSet::new();
        for &r in regions.iter().filter(|&&r| r < self.regions) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if st.staged[w] & bit != 0 {
                st.staged[w] &= !bit;
                changed.insert(w);
            }
        }
        let words: Vec<(usize, u64)> = changed.into_iter().map(|w| (w, st.staged[w])).collect();
        if !words.is_empty() {
            // Only once on disk do these words become `durable`: they may carry bits staged
            // by a batch that failed, which must not look durable before they are.
            self.write_words(&words)?;
            for &(w, v) in &words {
                self.durable[w].store(v, Ordering::Release);
            }
        }
        Ok(self.count())
    }

    /// Number of regions durably set.
    pub fn count(&self) -> u64 {
        self.durable
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The durable bits in the `GetDirtyRegions` format: `ceil(regions / 8)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let words: Vec<u64> = self
            .durable
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let mut b = words_to_bytes(&words);
        b.truncate(self.regions.div_ceil(8) as usize);
        b
    }

    /// A bitmap for `regions` regions (at least the current number) over the same file,
    /// with the same bits; the file is grown and synced first. The caller must make sure no
    /// mark or clear runs on `self` meanwhile (writes paused) and use the result instead.
    pub fn grown(&self, regions: u64) -> io::Result<Self> {
        let regions = regions.max(self.regions);
        let need = HEADER_LEN + 8 * words_for(regions) as u64;
        if self.file.metadata()?.len() < need {
            self.file.set_len(need)?;
            self.file.sync_all()?;
        }
        let mut words: Vec<u64> = self
            .durable
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        words.resize(words_for(regions), 0);
        Self::open_with(&self.path, self.region_bytes, regions, words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn region_math() {
        let rb = 64 * 1024;
        assert_eq!(region_count(0, rb), 0);
        assert_eq!(region_count(1, rb), 1);
        assert_eq!(region_count(64 * KIB, rb), 1);
        assert_eq!(
            region_count(64 * KIB + 4096, rb),
            2,
            "last partial region counts"
        );
        assert_eq!(regions_of(0, 1, rb), 0..1);
        assert_eq!(regions_of(64 * KIB - 1, 1, rb), 0..1);
        assert_eq!(regions_of(64 * KIB, 1, rb), 1..2);
        assert_eq!(
            regions_of(64 * KIB - 512, 1024, rb),
            0..2,
            "spans two regions"
        );
        assert_eq!(regions_of(0, 3 * 64 * KIB, rb), 0..3);
        assert_eq!(regions_of(10, 0, rb), 0..0);
        assert_eq!(regions_of(u64::MAX - 10, 100, rb).end, u64::MAX / 65536 + 1);
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        for (start, end) in [
            (0u64, 1u64),
            (3, 70),
            (64, 128),
            (63, 65),
            (0, 200),
            (130, 131),
        ] {
            let mut bits = [0u64; 4];
            for (w, m) in word_masks(start..end) {
                assert_eq!(bits[w] & m, 0, "masks do not overlap");
                bits[w] |= m;
            }
            for i in 0..256 {
                let set = bits[i / 64] >> (i % 64) & 1 == 1;
                assert_eq!(
                    set,
                    (start..end).contains(&(i as u64)),
                    "{start}..{end} bit {i}"
                );
            }
        }
        assert_eq!(tail_mask(64), u64::MAX);
        assert_eq!(tail_mask(3), 0b111);
    }

    #[test]
    fn marks_are_on_disk_and_reload() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty-b.bitmap");
        let rb = 4096;
        let b = DirtyBitmap::create(&p, rb, 100, false).unwrap();
        assert_eq!(b.count(), 0);
        b.mark(0, 1).unwrap();
        b.mark(4095, 2).unwrap(); // regions 0 and 1
        b.mark(99 * 4096, 4096).unwrap(); // the last region
        b.mark(70 * 4096, 0).unwrap(); // nothing
        assert_eq!(b.count(), 3);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 13);
        assert_eq!(bytes[0], 0b11);
        assert_eq!(bytes[12], 1 << 3, "region 99 = byte 12 bit 3");
        drop(b);
        let (b, problem) = DirtyBitmap::load(&p, rb, 100).unwrap();
        assert_eq!(problem, None);
        assert_eq!(b.count(), 3);
        assert_eq!(
            b.clear(&[0, 5]).unwrap(),
            2,
            "clearing an unset region is fine"
        );
        drop(b);
        let (b, _) = DirtyBitmap::load(&p, rb, 100).unwrap();
        assert_eq!(b.to_bytes()[0], 0b10);
    }

    #[test]
    fn untrusted_files_come_back_all_dirty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty-b.bitmap");
        let (b, problem) = DirtyBitmap::load(&p, 4096, 70).unwrap();
        assert_eq!(problem.as_deref(), Some("missing"));
        assert_eq!(b.count(), 70, "bits past the last region stay clear");
        drop(b);
        fs::write(&p, b"garbage").unwrap();
        let (b, problem) = DirtyBitmap::load(&p, 4096, 70).unwrap();
        assert!(problem.unwrap().contains("bad header"));
        assert_eq!(b.count(), 70);
        drop(b);
        let (b, problem) = DirtyBitmap::load(&p, 8192, 70).unwrap();
        assert!(problem.unwrap().contains("region size"));
        assert_eq!(b.count(), 70);
        drop(b);
        let (b, problem) = DirtyBitmap::load(&p, 8192, 200).unwrap();
        assert!(
            problem.unwrap().contains("needed"),
            "too short for a grown volume"
        );
        assert_eq!(b.count(), 200);
    }

    #[test]
    fn growing_keeps_bits_and_adds_clear_regions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty-b.bitmap");
        let b = DirtyBitmap::create(&p, 4096, 10, false).unwrap();
        b.mark(9 * 4096, 1).unwrap();
        let g = b.grown(1000).unwrap();
        drop(b);
        assert_eq!((g.regions(), g.count()), (1000, 1));
        g.mark(999 * 4096, 1).unwrap();
        drop(g);
        let (g, problem) = DirtyBitmap::load(&p, 4096, 1000).unwrap();
        assert_eq!(problem, None);
        assert_eq!(g.count(), 2);
    }

    #[test]
    fn concurrent_first_writes_all_become_durable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty-b.bitmap");
        let b = std::sync::Arc::new(DirtyBitmap::create(&p, 4096, 4096, false).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..64u64 {
                        b.mark((t * 64 + i) * 4096 * 3, 4096).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.count(), 512);
        drop(b);
        let (b, _) = DirtyBitmap::load(&p, 4096, 4096).unwrap();
        assert_eq!(b.count(), 512, "every acknowledged mark is in the file");
    }
}
