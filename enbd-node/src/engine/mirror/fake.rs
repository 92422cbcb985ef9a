//! In-memory replicas for the mirror's unit tests: a fake server holding data, a membership
//! record and write-intent bitmaps with the same rules as enbd-server's `ReplicaService`,
//! and a switch that makes it unreachable (both its data path and its management side).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::Backend;
use super::backend::{
    ControlError, DataConnector, ExtraDirty, ReplicaControl, ReplicaData, VolumeFacts,
};
use super::membership::{MemberState, Record};
use crate::engine::{EngineError, EngineStatus, Geometry, IoError};

pub struct State {
    pub id: String,
    pub data: Vec<u8>,
    pub record: Record,
    pub bitmaps: HashMap<String, BTreeSet<u64>>,
    pub activity: BTreeSet<u64>,
    pub up: bool,
    pub written: bool,
    /// Reads fail (as a dead server's would) once this many were served.
    pub fail_reads_after: Option<u64>,
    /// Bytes received as WRITE payload, and as WRITE_ZEROES ranges.
    pub data_bytes_in: u64,
    pub zeroes_bytes_in: u64,
}

#[derive(Clone)]
pub struct FakeServer {
    pub st: Arc<Mutex<State>>,
    pub reads: Arc<AtomicU64>,
}

fn down() -> IoError {
    IoError::BrownoutTimeout(std::time::Duration::from_millis(1))
}

impl FakeServer {
    pub fn new(id: &str, size: usize) -> Self {
        Self {
            st: Arc::new(Mutex::new(State {
                id: id.to_owned(),
                data: vec![0; size],
                record: Record::none(),
                bitmaps: HashMap::new(),
                activity: BTreeSet::new(),
                up: true,
                written: false,
                fail_reads_after: None,
                data_bytes_in: 0,
                zeroes_bytes_in: 0,
            })),
            reads: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_up(&self, up: bool) {
        self.lock().up = up;
    }

    pub fn backend(&self) -> Backend {
        Backend {
            control: Arc::new(self.clone()),
            connector: Arc::new(self.clone()),
        }
    }

    fn region_bytes(st: &State) -> u64 {
        u64::from(st.record.region_bytes.max(4096))
    }

    fn mark(st: &mut State, offset: u64, len: u64) {
        let rb = Self::region_bytes(st);
        let outs: Vec<String> = st.record.ids_in(MemberState::Out);
        for m in outs {
            let bm = st.bitmaps.entry(m).or_default();
            for r in offset / rb..(offset + len).div_ceil(rb) {
                bm.insert(r);
            }
        }
    }

    fn mutate(&self, offset: u64, bytes: Option<&[u8]>, len: u64) -> Result<(), IoError> {
        let mut st = self.lock();
        if !st.up {
            return Err(down());
        }
        Self::mark(&mut st, offset, len);
        st.written = true;
        let o = offset as usize;
        match bytes {
            Some(b) => st.data[o..o + b.len()].copy_from_slice(b),
            None => st.data[o..o + len as usize].fill(0),
        }
        Ok(())
    }
}

impl ReplicaControl for FakeServer {
    fn update_activity(
        &self,
        _region_bytes: u32,
        mark: Vec<u64>,
        clear: Vec<u64>,
    ) -> BoxFuture<'_, Result<u64, ControlError>> {
        Box::pin(async move {
            let mut st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            st.activity.extend(mark);
            for r in clear {
                st.activity.remove(&r);
            }
            Ok(st.activity.len() as u64)
        })
    }

    fn activity(&self) -> BoxFuture<'_, Result<(u32, Vec<u64>), ControlError>> {
        Box::pin(async move {
            let st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            Ok((
                st.record.region_bytes,
                st.activity.iter().copied().collect(),
            ))
        })
    }

    fn get_membership(&self) -> BoxFuture<'_, Result<Record, ControlError>> {
        Box::pin(async move {
            let st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            Ok(st.record.clone())
        })
    }

    fn set_membership(
        &self,
        record: Record,
        extra: ExtraDirty,
    ) -> BoxFuture<'_, Result<Record, ControlError>> {
        Box::pin(async move {
            let mut st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            if record.generation < st.record.generation
                || (record.generation == st.record.generation && record != st.record)
            {
                return Err(ControlError(format!(
                    "FailedPrecondition: current generation {}",
                    st.record.generation
                )));
            }
            st.record = record.clone();
            let me = st.id.clone();
            for (m, s) in &record.members {
                match s {
                    MemberState::Out | MemberState::Resyncing => {
                        st.bitmaps.entry(m.clone()).or_default();
                    }
                    MemberState::InSync => {
                        st.bitmaps.remove(m);
                    }
                }
            }
            st.bitmaps.remove(&me);
            let rb = Self::region_bytes(&st);
            for (m, ranges) in extra {
                let bm = st.bitmaps.entry(m).or_default();
                for (o, l) in ranges {
                    for r in o / rb..(o + l).div_ceil(rb) {
                        bm.insert(r);
                    }
                }
            }
            Ok(record)
        })
    }

    fn dirty_regions<'a>(
        &'a self,
        member: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, ControlError>> {
        Box::pin(async move {
            let st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            Ok(st
                .bitmaps
                .get(member)
                .map(|b| b.iter().copied().collect())
                .unwrap_or_default())
        })
    }

    fn clear_dirty<'a>(
        &'a self,
        member: &'a str,
        regions: Vec<u64>,
    ) -> BoxFuture<'a, Result<u64, ControlError>> {
        Box::pin(async move {
            let mut st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            if st.record.state_of(member) != Some(MemberState::Resyncing) {
                return Err(ControlError("FailedPrecondition: not RESYNCING".into()));
            }
            let bm = st.bitmaps.entry(member.to_owned()).or_default();
            for r in regions {
                bm.remove(&r);
            }
            Ok(bm.len() as u64)
        })
    }

    fn volume(&self) -> BoxFuture<'_, Result<VolumeFacts, ControlError>> {
        Box::pin(async move {
            let st = self.lock();
            if !st.up {
                return Err(ControlError("unreachable".into()));
            }
            Ok(VolumeFacts {
                size: st.data.len() as u64,
                fresh: !st.written,
            })
        })
    }
}

impl ReplicaData for FakeServer {
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, IoError>> {
        Box::pin(async move {
            let st = self.lock();
            let served = self.reads.load(Ordering::Relaxed);
            if !st.up || st.fail_reads_after.is_some_and(|n| served >= n) {
                return Err(down());
            }
            self.reads.fetch_add(1, Ordering::Relaxed);
            let o = offset as usize;
            Ok(Bytes::copy_from_slice(&st.data[o..o + len as usize]))
        })
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(async move {
            self.mutate(offset, Some(&data), data.len() as u64)?;
            self.lock().data_bytes_in += data.len() as u64;
            Ok(())
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(async move { if self.lock().up { Ok(()) } else { Err(down()) } })
    }
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(async move { self.mutate(offset, None, u64::from(len)) })
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
    ) -> BoxFuture<'_, Result<(), IoError>> {
        Box::pin(async move {
            self.mutate(offset, None, u64::from(len))?;
            self.lock().zeroes_bytes_in += u64::from(len);
            Ok(())
        })
    }
    fn geometry(&self) -> Geometry {
        let size = self.lock().data.len() as u64;
        Geometry {
            size,
            min_block: 1,
            pref_block: 4096,
            max_block: 32 << 20,
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: false,
            multi_conn: true,
            flags: 0,
        }
    }
    fn is_up(&self) -> bool {
        self.lock().up
    }
    fn engine_status(&self) -> Option<EngineStatus> {
        None
    }
    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, EngineError>> {
        Box::pin(async move { Ok(self.lock().data.len() as u64) })
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl DataConnector for FakeServer {
    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn ReplicaData>, EngineError>> {
        Box::pin(async move {
            if !self.lock().up {
                return Err(EngineError::Handshake {
                    addr: "fake".into(),
                    reason: "down".into(),
                });
            }
            Ok(Arc::new(self.clone()) as Arc<dyn ReplicaData>)
        })
    }
}
