//! Mirror membership kept beside each volume's data ("membership lives with the data"): a
//! generation-numbered record of the replicas and their states, and one write-intent bitmap
//! ([`super::bitmap`]) per member that is OUT or RESYNCING. The contract is the
//! `ReplicaService` block of `proto/enbd.proto`.
//!
//! On disk, in `DATA/volumes/<name>/`:
//! - `membership.json`: `{"format":1,"generation":g,"region_bytes":r,"members":[{"replica_id":
//!   "...","state":"in_sync"|"out"|"resyncing"}]}`; absent = single copy (generation 0). It is
//!   replaced whole: written beside as `membership.json.tmp`, fsynced, renamed over, directory
//!   fsynced.
//! - `dirty-<replica-id>.bitmap` for each member OUT or RESYNCING other than this server.
//!   A new one is created (beside, fsynced, renamed, directory fsynced) before the record that
//!   needs it is committed; obsolete ones are removed after. So after a crash every bitmap the
//!   record names exists; strays are removed when the volume is loaded.
//!
//! Limits: 1 to [`MAX_MEMBERS`] members with distinct server ids, at least one IN_SYNC, this
//! server among them; `region_bytes` a power of two from 4 KiB to 64 MiB, fixed by the first
//! record; at most [`MAX_REGIONS`] regions (so a bitmap fits one gRPC message); at most
//! [`MAX_EXTRA_RANGES`] `extra_dirty` ranges per call, each inside the volume.
//!
//! Bitmap life: a member gets a bitmap when it becomes OUT or RESYNCING. It starts empty if
//! the member was IN_SYNC in the previous record, and with every region set if the member is
//! new to the record (no record, or not in it: nothing says it holds any of the data). It is
//! kept, bits included, between OUT and RESYNCING, and deleted when the member becomes IN_SYNC
//! or leaves. `extra_dirty` ranges are set, durably, before the record is committed (also on
//! an idempotent retry: the first attempt's answer may have been lost before they were set).
//! Only OUT members' bitmaps get bits from writes; clearing is allowed only while RESYNCING
//! (while OUT a write could set a bit between the caller's copy and its clear, and be lost).
//!
//! Ordering against the data path: a record is committed and the in-memory write intent
//! switched while the volume's writes are paused (the backend's write gate frozen, with every
//! connection held on that one backend). So when SetMembership returns, every write whose
//! data IO started before the switch has finished, and every write that starts after it logs
//! according to the new record before it is acknowledged. Writes in flight during the call
//! may land on either side: the caller covers writes the OUT member may have missed with
//! `extra_dirty`.
//!
//! Activity log (`activity.bitmap`, the bitmap format with the record's region size): the
//! regions the node's mirror may have writes in flight to (`UpdateActivity`). It is only
//! ever changed by that call, under the state lock: marks are durable before it returns,
//! clears after. Missing = empty (no mirror has logged activity here); unreadable = every
//! region set (logged), so a crash never loses an entry. It is not tied to a generation:
//! entries survive membership changes, and growing the volume grows it first like the
//! write-intent bitmaps.
//!
//! Damage: an unreadable or invalid `membership.json` makes the volume refuse mirror calls and
//! NBD connections (`Damaged`, naming the file) — serving writes would drop the dirty bits of
//! members we can no longer name — until an operator repairs or removes the file and restarts
//! the server. A damaged bitmap is replaced by one with every region set (logged).
//!
//! Snapshots and clones copy the data file only: a clone is a new single-copy volume until
//! someone writes its membership.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use enbd_proto::ids::ServerId;
use serde::{Deserialize, Serialize};

use super::bitmap::{self, DirtyBitmap};
use crate::export::WriteIntent;

pub const MEMBERSHIP_FILE: &str = "membership.json";
pub const ACTIVITY_FILE: &str = "activity.bitmap";
pub const MAX_MEMBERS: usize = 3;
pub const MIN_REGION_BYTES: u32 = 4096;
pub const MAX_REGION_BYTES: u32 = 64 << 20;
/// 2 MiB of bitmap: 16 TiB at 1 MiB regions.
pub const MAX_REGIONS: u64 = 1 << 24;
pub const MAX_EXTRA_RANGES: usize = 65536;
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("invalid membership: {0}")]
    Invalid(String),
    #[error("volume {volume:?} is at generation {current}: {reason}")]
    Generation {
        volume: String,
        current: u64,
        reason: String,
    },
    #[error("volume {volume:?}: {reason}")]
    Precondition { volume: String, reason: String },
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("replica metadata of volume {volume:?} is damaged: {path}: {reason}")]
    Damaged {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ReplicaError {
    move |source| ReplicaError::Io {
        context: context.into(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    InSync,
    Out,
    Resyncing,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub replica_id: String,
    pub state: MemberState,
    /// Where nodes reach the member (NBD `HOST:PORT`, management URL); empty = unknown.
    /// Kept as given so the record alone names the replica set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mgmt_url: String,
}

/// Longest endpoint string a member may carry.
pub const MAX_ENDPOINT_BYTES: usize = 512;

/// One membership record; generation 0 with no members means "no record".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub generation: u64,
    pub region_bytes: u32,
    pub members: Vec<Member>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    format: u32,
    generation: u64,
    region_bytes: u32,
    members: Vec<Member>,
}

/// What a caller asks [`Mirror::set`] to do.
#[derive(Debug, Clone)]
pub struct SetRequest {
    pub membership: Membership,
    /// `(replica_id, offset, length)` ranges to mark dirty.
    pub extra_dirty: Vec<(String, u64, u64)>,
}

/// The per-volume write intent the backend consults: the bitmaps of OUT members.
#[derive(Default)]
pub struct Intent {
    active: AtomicBool,
    out: RwLock<Vec<Arc<DirtyBitmap>>>,
}

impl WriteIntent for Intent {
    fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn log(&self, offset: u64, len: u64) -> io::Result<()> {
        let out = self.out.read().unwrap_or_else(|p| p.into_inner());
        for b in out.iter() {
            b.mark(offset, len)?;
        }
        Ok(())
    }
}

impl Intent {
    /// Installs the OUT bitmaps. Only while the volume's writes are paused (or it has none).
    fn install(&self, out: Vec<Arc<DirtyBitmap>>) {
        let active = !out.is_empty();
        *self.out.write().unwrap_or_else(|p| p.into_inner()) = out;
        self.active.store(active, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    record: Option<Membership>,
    /// Members OUT or RESYNCING (this server excluded).
    bitmaps: BTreeMap<String, Arc<DirtyBitmap>>,
    /// The activity log, once it exists (see the module doc).
    activity: Option<DirtyBitmap>,
}

/// One volume's mirror metadata. `state`'s lock serializes every change on the volume and
/// is held while the volume's size changes; `damaged` and `deleted` need no lock, so opening
/// a connection (under the store's open registry) never waits for a mirror call.
pub struct Mirror {
    name: String,
    dir: PathBuf,
    intent: Arc<Intent>,
    state: Mutex<State>,
    /// Why the record cannot be trusted (the file and the reason); fixed at load.
    damaged: Option<(PathBuf, String)>,
    deleted: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bitmap_path(dir: &Path, replica: &str) -> PathBuf {
    dir.join(format!("dirty-{replica}.bitmap"))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn data_size(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir.join("data"))?.len())
}

/// Checks a record's shape (not its generation against the current one).
fn check_record(m: &Membership, self_id: Option<&ServerId>, size: u64) -> Result<(), String> {
    if m.generation == 0 {
        return Err("generation must be at least 1 (0 means no record)".into());
    }
    let rb = m.region_bytes;
    if !rb.is_power_of_two() || !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&rb) {
        return Err(format!(
            "region_bytes {rb} must be a power of two from {MIN_REGION_BYTES} to {MAX_REGION_BYTES}"
        ));
    }
    let regions = bitmap::region_count(size, rb);
    if regions > MAX_REGIONS {
        return Err(format!(
            "{regions} regions of {rb} bytes for a {size}-byte volume; at most {MAX_REGIONS}: use larger regions"
        ));
    }
    if m.members.is_empty() || m.members.len() > MAX_MEMBERS {
        return Err(format!(
            "{} members; a record has 1 to {MAX_MEMBERS}",
            m.members.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for mem in &m.members {
        ServerId::parse(&mem.replica_id).map_err(|e| format!("replica id: {e}"))?;
        if !seen.insert(mem.replica_id.as_str()) {
            return Err(format!("replica {:?} is listed twice", mem.replica_id));
        }
        for (what, v) in [
            ("data_address", &mem.data_address),
            ("mgmt_url", &mem.mgmt_url),
        ] {
            if v.len() > MAX_ENDPOINT_BYTES
                || v.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(format!(
                    "member {:?}: {what} must be at most {MAX_ENDPOINT_BYTES} printable bytes without spaces",
                    mem.replica_id
                ));
            }
        }
    }
    if !m.members.iter().any(|x| x.state == MemberState::InSync) {
        return Err("at least one member must be IN_SYNC".into());
    }
    if let Some(me) = self_id
        && !seen.contains(me.as_str())
    {
        return Err(format!(
            "this server ({me}) is not a member: the record belongs on every replica's server, \
             this one included"
        ));
    }
    Ok(())
}

fn same_members(a: &Membership, b: &Membership) -> bool {
    let mut x = a.members.clone();
    let mut y = b.members.clone();
    x.sort();
    y.sort();
    a.region_bytes == b.region_bytes && x == y
}

/// Writes the record beside the current one and renames it over; the caller fsyncs `dir`.
/// On error nothing changed (the old record is still the one in place).
fn write_record(dir: &Path, m: &Membership) -> io::Result<()> {
    let rec = RecordFile {
        format: FORMAT,
        generation: m.generation,
        region_bytes: m.region_bytes,
        members: m.members.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{MEMBERSHIP_FILE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(MEMBERSHIP_FILE))
}

/// Reads the record; `Ok(None)` if there is none, `Err(reason)` if it cannot be trusted.
fn read_record(dir: &Path) -> Result<Option<Membership>, String> {
    let bytes = match fs::read(dir.join(MEMBERSHIP_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let rec: RecordFile =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a valid record: {e}"))?;
    if rec.format != FORMAT {
        return Err(format!("unknown format {}", rec.format));
    }
    let m = Membership {
        generation: rec.generation,
        region_bytes: rec.region_bytes,
        members: rec.members,
    };
    let size = data_size(dir).map_err(|e| format!("cannot stat the data file: {e}"))?;
    check_record(&m, None, size)?;
    Ok(Some(m))
}

impl Mirror {
    /// Loads the record and bitmaps of the volume in `dir` (`self_id` = this server, which
    /// keeps no bitmap for itself). Damage is recorded, not returned.
    fn load(name: &str, dir: PathBuf, self_id: Option<&ServerId>) -> Self {
        let mut state = State::default();
        let mut damaged = None;
        match read_record(&dir) {
            Ok(rec) => match Self::load_bitmaps(name, &dir, rec.as_ref(), self_id, &mut state) {
                Ok(()) => state.record = rec,
                Err(d) => damaged = Some(d),
            },
            Err(reason) => damaged = Some((dir.join(MEMBERSHIP_FILE), reason)),
        }
        if let Some((path, reason)) = &damaged {
            tracing::error!(volume = name, path = %path.display(), reason = %reason,
                "mirror metadata damaged: the volume refuses mirror calls and NBD connections");
        }
        let intent = Arc::new(Intent::default());
        intent.install(out_bitmaps(&state));
        Self {
            name: name.to_owned(),
            dir,
            intent,
            state: Mutex::new(state),
            damaged,
            deleted: AtomicBool::new(false),
        }
    }

    fn load_bitmaps(
        name: &str,
        dir: &Path,
        rec: Option<&Membership>,
        self_id: Option<&ServerId>,
        state: &mut State,
    ) -> Result<(), (PathBuf, String)> {
        let mut keep = BTreeSet::new();
        if let Some(rec) = rec {
            let size = data_size(dir).map_err(|e| (dir.join("data"), e.to_string()))?;
            let regions = bitmap::region_count(size, rec.region_bytes);
            for m in tracked(rec, self_id) {
                let path = bitmap_path(dir, &m.replica_id);
                let (b, problem) = DirtyBitmap::load(&path, rec.region_bytes, regions)
                    .map_err(|e| (path.clone(), e.to_string()))?;
                if let Some(p) = problem {
                    tracing::warn!(volume = name, path = %path.display(), problem = %p,
                        "dirty-region bitmap cannot be trusted: every region marked dirty");
                }
                keep.insert(path.file_name().map(|f| f.to_owned()));
                state.bitmaps.insert(m.replica_id.clone(), Arc::new(b));
            }
            let path = dir.join(ACTIVITY_FILE);
            if path.exists() {
                let (b, problem) = DirtyBitmap::load(&path, rec.region_bytes, regions)
                    .map_err(|e| (path.clone(), e.to_string()))?;
                if let Some(p) = problem {
                    tracing::warn!(volume = name, path = %path.display(), problem = %p,
                        "activity log cannot be trusted: every region marked active");
                }
                state.activity = Some(b);
            }
        }
        // Strays: bitmaps of an uncommitted change or not yet removed after one, temp files.
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let f = e.file_name();
                let s = f.to_string_lossy();
                let stray = (s.starts_with("dirty-") && !keep.contains(&Some(f.clone())))
                    || s.ends_with(".tmp");
                if stray && let Err(err) = fs::remove_file(e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove stray file");
                }
            }
        }
        Ok(())
    }

    fn usable(&self) -> Result<(), ReplicaError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(ReplicaError::NotFound(self.name.clone()));
        }
        if let Some((path, reason)) = &self.damaged {
            return Err(ReplicaError::Damaged {
                volume: self.name.clone(),
                path: path.clone(),
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    /// Locks the state of a volume that is neither deleted nor damaged.
    fn live(&self) -> Result<MutexGuard<'_, State>, ReplicaError> {
        self.usable()?;
        let st = lock(&self.state);
        // A delete may have finished while we waited for the lock.
        self.usable()?;
        Ok(st)
    }

    /// The write intent for this volume's backend; `Err` if the volume must not be served.
    /// Takes no lock (see [`Mirror`]).
    pub fn intent(&self) -> Result<Arc<Intent>, ReplicaError> {
        self.usable()?;
        Ok(self.intent.clone())
    }

    fn size(&self) -> Result<u64, ReplicaError> {
        data_size(&self.dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ReplicaError::NotFound(self.name.clone()),
            _ => ReplicaError::Io {
                context: format!("stat {}", self.dir.join("data").display()),
                source: e,
            },
        })
    }

    /// The record (generation 0 if none) and the number of dirty regions per tracked member.
    pub fn get(&self) -> Result<(Membership, BTreeMap<String, u64>), ReplicaError> {
        let st = self.live()?;
        let counts = st
            .bitmaps
            .iter()
            .map(|(id, b)| (id.clone(), b.count()))
            .collect();
        Ok((st.record.clone().unwrap_or_default(), counts))
    }

    /// Applies a SetMembership call (see the module doc). `pause` pauses the volume's writes
    /// for as long as its result lives.
    pub fn set<P>(
        &self,
        self_id: Option<&ServerId>,
        req: SetRequest,
        pause: impl FnOnce() -> Result<P, ReplicaError>,
    ) -> Result<Membership, ReplicaError> {
        let mut st = self.live()?;
        let size = self.size()?;
        let new = req.membership;
        check_record(&new, self_id, size).map_err(ReplicaError::Invalid)?;
        if let Some(cur) = &st.record
            && new.region_bytes != cur.region_bytes
        {
            return Err(ReplicaError::Invalid(format!(
                "region_bytes is fixed at {} by the first record; {} refused",
                cur.region_bytes, new.region_bytes
            )));
        }
        if req.extra_dirty.len() > MAX_EXTRA_RANGES {
            return Err(ReplicaError::Invalid(format!(
                "{} extra_dirty ranges; at most {MAX_EXTRA_RANGES}",
                req.extra_dirty.len()
            )));
        }
        let tracked_ids: BTreeSet<&str> = tracked(&new, self_id)
            .map(|m| m.replica_id.as_str())
            .collect();
        for (id, off, len) in &req.extra_dirty {
            if !tracked_ids.contains(id.as_str()) {
                return Err(ReplicaError::Invalid(format!(
                    "extra_dirty names {id:?}, which is not a member OUT or RESYNCING (other than this server) in the new record"
                )));
            }
            if off.checked_add(*len).is_none_or(|end| end > size) {
                return Err(ReplicaError::Invalid(format!(
                    "extra_dirty range {off}+{len} for {id:?} is outside the {size}-byte volume"
                )));
            }
        }
        let current = st.record.as_ref().map_or(0, |r| r.generation);
        if new.generation < current {
            return Err(
                self.generation_error(current, format!("generation {} is older", new.generation))
            );
        }
        if new.generation == current {
            let same = st
                .record
                .as_ref()
                .is_some_and(|cur| same_members(cur, &new));
            if !same {
                return Err(self.generation_error(
                    current,
                    "a different record with the same generation exists".into(),
                ));
            }
            // Idempotent retry: make sure its extra ranges are there, change nothing else.
            for (id, off, len) in &req.extra_dirty {
                if let Some(b) = st.bitmaps.get(id) {
                    b.mark(*off, *len)
                        .map_err(io_err(format!("marking {}", b.path().display())))?;
                }
            }
            return Ok(st.record.clone().unwrap_or_default());
        }

        // Build the bitmaps the new record needs: kept ones, and new ones created durably.
        let regions = bitmap::region_count(size, new.region_bytes);
        let mut bitmaps = BTreeMap::new();
        let mut created = Vec::new();
        let built = (|| {
            for m in tracked(&new, self_id) {
                if let Some(b) = st.bitmaps.get(&m.replica_id) {
                    bitmaps.insert(m.replica_id.clone(), b.clone());
                    continue;
                }
                let was_member = st
                    .record
                    .as_ref()
                    .is_some_and(|r| r.members.iter().any(|x| x.replica_id == m.replica_id));
                let path = bitmap_path(&self.dir, &m.replica_id);
                let b = DirtyBitmap::create(&path, new.region_bytes, regions, !was_member)
                    .map_err(io_err(format!("creating {}", path.display())))?;
                created.push(path);
                bitmaps.insert(m.replica_id.clone(), Arc::new(b));
            }
            if !created.is_empty() {
                fsync_dir(&self.dir).map_err(io_err("syncing the volume directory"))?;
            }
            for (id, off, len) in &req.extra_dirty {
                if let Some(b) = bitmaps.get(id) {
                    b.mark(*off, *len)
                        .map_err(io_err(format!("marking {}", b.path().display())))?;
                }
            }
            Ok::<_, ReplicaError>(())
        })();
        // On failure before the rename nothing changed but new bitmap files, which are never
        // unsafe to keep: the next load removes those the record does not name.
        built?;
        let record_path = self.dir.join(MEMBERSHIP_FILE);
        {
            let _paused = pause()?;
            write_record(&self.dir, &new)
                .map_err(io_err(format!("writing {}", record_path.display())))?;
            // Renamed: the new record is the one any reader sees, so it takes effect now
            // even if syncing the directory fails below.
            self.intent.install(out_of(&new, &bitmaps));
        }
        let obsolete: Vec<PathBuf> = st
            .bitmaps
            .iter()
            .filter(|(id, _)| !bitmaps.contains_key(*id))
            .map(|(_, b)| b.path().to_owned())
            .collect();
        st.bitmaps = bitmaps;
        st.record = Some(new.clone());
        fsync_dir(&self.dir).map_err(io_err(format!("syncing {}", self.dir.display())))?;
        for p in &obsolete {
            if let Err(e) = fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove an obsolete bitmap; it goes at the next start");
            }
        }
        if !obsolete.is_empty() {
            let _ = fsync_dir(&self.dir);
        }
        tracing::info!(volume = %self.name, generation = new.generation, members = ?new.members, "membership changed");
        Ok(new)
    }

    fn generation_error(&self, current: u64, reason: String) -> ReplicaError {
        ReplicaError::Generation {
            volume: self.name.clone(),
            current,
            reason,
        }
    }

    fn member_bitmap(
        &self,
        st: &State,
        replica: &str,
    ) -> Result<(Membership, Option<Arc<DirtyBitmap>>, MemberState), ReplicaError> {
        let precondition = |reason: String| ReplicaError::Precondition {
            volume: self.name.clone(),
            reason,
        };
        let rec = st
            .record
            .clone()
            .ok_or_else(|| precondition("no membership record (single copy)".into()))?;
        let state = rec
            .members
            .iter()
            .find(|m| m.replica_id == replica)
            .map(|m| m.state)
            .ok_or_else(|| {
                precondition(format!(
                    "{replica:?} is not a member at generation {}",
                    rec.generation
                ))
            })?;
        Ok((rec, st.bitmaps.get(replica).cloned(), state))
    }

    /// `(region_bytes, region_count, bitmap)` of a member; all clear for one with no bitmap
    /// (IN_SYNC, or this server).
    pub fn dirty_regions(&self, replica: &str) -> Result<(u32, u64, Vec<u8>), ReplicaError> {
        let st = self.live()?;
        let size = self.size()?;
        let (rec, b, _) = self.member_bitmap(&st, replica)?;
        let regions = bitmap::region_count(size, rec.region_bytes);
        Ok(match b {
            Some(b) => {
                let mut bytes = b.to_bytes();
                bytes.resize(regions.div_ceil(8) as usize, 0);
                (rec.region_bytes, regions, bytes)
            }
            None => (
                rec.region_bytes,
                regions,
                vec![0; regions.div_ceil(8) as usize],
            ),
        })
    }

    /// Clears regions of a RESYNCING member's bitmap; returns how many stay set.
    pub fn clear(&self, replica: &str, regions: &[u64]) -> Result<u64, ReplicaError> {
        let st = self.live()?;
        let (rec, b, state) = self.member_bitmap(&st, replica)?;
        let Some(b) = b.filter(|_| state == MemberState::Resyncing) else {
            return Err(ReplicaError::Precondition {
                volume: self.name.clone(),
                reason: format!(
                    "{replica:?} is {state:?} at generation {}: regions are cleared only while RESYNCING",
                    rec.generation
                ),
            });
        };
        if let Some(bad) = regions.iter().find(|&&r| r >= b.regions()) {
            return Err(ReplicaError::Invalid(format!(
                "region {bad} is past the last region ({} regions)",
                b.regions()
            )));
        }
        b.clear(regions)
            .map_err(io_err(format!("clearing {}", b.path().display())))
    }

    /// Grows the volume to `size` bytes: every bitmap first, then the data file through
    /// `grow_data` (so a crash in between leaves bitmaps long enough), all under the state
    /// lock (so no SetMembership sizes a new bitmap meanwhile). `pause` as for [`Mirror::set`].
    pub fn grow<P>(
        &self,
        size: u64,
        pause: impl FnOnce() -> Result<P, ReplicaError>,
        grow_data: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), ReplicaError> {
        let mut st = self.live()?;
        let grow_data = || {
            grow_data().map_err(io_err(format!(
                "growing {}",
                self.dir.join("data").display()
            )))
        };
        let Some(rec) = st.record.clone() else {
            return grow_data();
        };
        let regions = bitmap::region_count(size, rec.region_bytes);
        if regions > MAX_REGIONS {
            return Err(ReplicaError::Invalid(format!(
                "{regions} regions of {} bytes; a mirrored volume has at most {MAX_REGIONS}",
                rec.region_bytes
            )));
        }
        if let Some(a) = &st.activity {
            let g = a
                .grown(regions)
                .map_err(io_err(format!("growing {}", a.path().display())))?;
            st.activity = Some(g);
        }
        if !st.bitmaps.is_empty() {
            // Paused: no mark may land on the old in-memory bitmaps while they are copied.
            let _paused = pause()?;
            let mut grown = BTreeMap::new();
            for (id, b) in &st.bitmaps {
                let g = b
                    .grown(regions)
                    .map_err(io_err(format!("growing {}", b.path().display())))?;
                grown.insert(id.clone(), Arc::new(g));
            }
            st.bitmaps = grown;
            self.intent.install(out_bitmaps(&st));
        }
        grow_data()
    }

    /// Applies an UpdateActivity call: `mark` durably, then `clear`; returns how many
    /// regions stay active. Indexes are in `region_bytes` regions, which must be the record's.
    pub fn update_activity(
        &self,
        region_bytes: u32,
        mark: &[u64],
        clear: &[u64],
    ) -> Result<u64, ReplicaError> {
        let mut st = self.live()?;
        let size = self.size()?;
        let rec = st
            .record
            .clone()
            .ok_or_else(|| ReplicaError::Precondition {
                volume: self.name.clone(),
                reason: "no membership record (single copy): no activity log".into(),
            })?;
        if region_bytes != rec.region_bytes {
            return Err(ReplicaError::Precondition {
                volume: self.name.clone(),
                reason: format!(
                    "activity in {region_bytes}-byte regions; the record's are {}",
                    rec.region_bytes
                ),
            });
        }
        let regions = bitmap::region_count(size, rec.region_bytes);
        if let Some(bad) = mark.iter().chain(clear).find(|&&r| r >= regions) {
            return Err(ReplicaError::Invalid(format!(
                "region {bad} is past the last region ({regions} regions)"
            )));
        }
        if st.activity.is_none() {
            if mark.is_empty() {
                return Ok(0);
            }
            let path = self.dir.join(ACTIVITY_FILE);
            let b = DirtyBitmap::create(&path, rec.region_bytes, regions, false)
                .map_err(io_err(format!("creating {}", path.display())))?;
            fsync_dir(&self.dir).map_err(io_err("syncing the volume directory"))?;
            st.activity = Some(b);
        }
        let Some(a) = st.activity.as_ref() else {
            return Ok(0);
        };
        let rb = u64::from(rec.region_bytes);
        // Runs of adjacent regions share one call (one sync for the whole list).
        let mut sorted = mark.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let (first, n) = (sorted[i], (j - i) as u64);
            a.mark(
                first * rb,
                (n * rb).min(size.saturating_sub(first * rb)).max(1),
            )
            .map_err(io_err(format!("marking {}", a.path().display())))?;
            i = j;
        }
        if clear.is_empty() {
            return Ok(a.count());
        }
        a.clear(clear)
            .map_err(io_err(format!("clearing {}", a.path().display())))
    }

    /// `(region_bytes, region_count, bitmap)` of the activity log; all clear if none.
    pub fn activity(&self) -> Result<(u32, u64, Vec<u8>), ReplicaError> {
        let st = self.live()?;
        let size = self.size()?;
        let rec = st
            .record
            .clone()
            .ok_or_else(|| ReplicaError::Precondition {
                volume: self.name.clone(),
                reason: "no membership record (single copy): no activity log".into(),
            })?;
        let regions = bitmap::region_count(size, rec.region_bytes);
        let mut bytes = st
            .activity
            .as_ref()
            .map(|a| a.to_bytes())
            .unwrap_or_default();
        bytes.resize(regions.div_ceil(8) as usize, 0);
        Ok((rec.region_bytes, regions, bytes))
    }

    /// Regions in the activity log (for the metrics gauge).
    pub fn active_total(&self) -> u64 {
        lock(&self.state).activity.as_ref().map_or(0, |a| a.count())
    }

    /// Dirty regions summed over members (for the metrics gauge).
    pub fn dirty_total(&self) -> u64 {
        lock(&self.state).bitmaps.values().map(|b| b.count()).sum()
    }
}

/// Members that get a bitmap on this server: OUT or RESYNCING, this server excluded.
fn tracked<'a>(
    rec: &'a Membership,
    self_id: Option<&'a ServerId>,
) -> impl Iterator<Item = &'a Member> + 'a {
    rec.members.iter().filter(move |m| {
        matches!(m.state, MemberState::Out | MemberState::Resyncing)
            && self_id.is_none_or(|me| me.as_str() != m.replica_id)
    })
}

/// The bitmaps writes must mark: those of OUT members.
fn out_of(rec: &Membership, bitmaps: &BTreeMap<String, Arc<DirtyBitmap>>) -> Vec<Arc<DirtyBitmap>> {
    rec.members
        .iter()
        .filter(|m| m.state == MemberState::Out)
        .filter_map(|m| bitmaps.get(&m.replica_id).cloned())
        .collect()
}

fn out_bitmaps(st: &State) -> Vec<Arc<DirtyBitmap>> {
    st.record
        .as_ref()
        .map_or_else(Vec::new, |rec| out_of(rec, &st.bitmaps))
}

/// Every volume's [`Mirror`], loaded on first use.
///
/// Lock order: a mirror's state, then the store's open-volume registry, then this map.
pub struct Mirrors {
    volumes_dir: PathBuf,
    self_id: Option<ServerId>,
    map: Mutex<HashMap<String, Arc<Mirror>>>,
}

impl Mirrors {
    pub fn new(volumes_dir: PathBuf, self_id: Option<ServerId>) -> Self {
        Self {
            volumes_dir,
            self_id,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn self_id(&self) -> Option<&ServerId> {
        self.self_id.as_ref()
    }

    /// The mirror of volume `name` (a valid name); `None` if the volume does not exist.
    pub fn get(&self, name: &str) -> Option<Arc<Mirror>> {
        let mut map = lock(&self.map);
        if let Some(m) = map.get(name) {
            return Some(m.clone());
        }
        let dir = self.volumes_dir.join(name);
        if !dir.join("data").exists() {
            return None;
        }
        let m = Arc::new(Mirror::load(name, dir, self.self_id.as_ref()));
        map.insert(name.to_owned(), m.clone());
        Some(m)
    }

    /// Forgets a volume that is being deleted; runs `remove` with its state locked so no
    /// mirror call interleaves, and marks it deleted if `remove` succeeds.
    pub fn delete<T, E>(&self, name: &str, remove: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let Some(m) = self.get(name) else {
            return remove();
        };
        let st = lock(&m.state);
        let r = remove()?;
        m.deleted.store(true, Ordering::Release);
        drop(st);
        let mut map = lock(&self.map);
        if map.get(name).is_some_and(|x| Arc::ptr_eq(x, &m)) {
            map.remove(name);
        }
        Ok(r)
    }

    /// Dirty regions summed over every loaded volume and member.
    pub fn dirty_total(&self) -> u64 {
        let all: Vec<Arc<Mirror>> = lock(&self.map).values().cloned().collect();
        all.iter().map(|m| m.dirty_total()).sum()
    }
}
