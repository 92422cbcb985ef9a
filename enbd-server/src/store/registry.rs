//! Who is using which entry right now: the management operation that holds a name (one at
//! a time per name, others get [`StoreError::Busy`]) and the volumes and snapshots open over
//! NBD (one backend shared by every connection, counted by leases).
//!
//! Invariants: an entry is in the open map iff it has at least one lease, or a force delete
//! has just replaced it; a close ([`Registry::close`]) holds the open map's lock across the
//! caller's removal, so a delete never races a new connection. Nothing here touches files
//! except through the opener the caller passes to [`Registry::lease`].
//! A background copy holds an internal lease on its source (so every connection, including
//! ones opened meanwhile, shares the backend its copy-before-write hook is attached to);
//! internal leases are not connections: they neither show in [`Registry::connections`] nor
//! keep a delete from proceeding.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use super::layout::Kind;
use super::{StoreError, VolumeName};
use crate::export::{FileBackend, OpenError};

type Key = (Kind, String);

/// A volume or snapshot open over NBD: one backend shared by all its connections.
struct OpenVolume {
    backend: Arc<FileBackend>,
    closed: CancellationToken,
    leases: AtomicU64,
    internal: AtomicU64,
}

impl OpenVolume {
    fn connections(&self) -> u64 {
        self.leases
            .load(Ordering::Acquire)
            .saturating_sub(self.internal.load(Ordering::Acquire))
    }
}

#[derive(Default)]
pub(super) struct Registry {
    busy: Mutex<HashSet<Key>>,
    open: Mutex<HashMap<Key, Arc<OpenVolume>>>,
}

/// Releases one claim on an open volume when dropped (one per NBD connection).
pub(super) struct Lease {
    registry: Arc<Registry>,
    key: Key,
    vol: Arc<OpenVolume>,
    internal: bool,
}

impl Lease {
    /// The backend every connection to this entry shares.
    pub(super) fn backend(&self) -> &Arc<FileBackend> {
        &self.vol.backend
    }

    /// Cancelled when the entry is deleted by force under its connections.
    pub(super) fn closed(&self) -> CancellationToken {
        self.vol.closed.child_token()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut open = lock(&self.registry.open);
        if self.internal {
            self.vol.internal.fetch_sub(1, Ordering::AcqRel);
        }
        if self.vol.leases.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Only forget the entry if it is still ours (a force delete may have replaced it).
            if open
                .get(&self.key)
                .is_some_and(|v| Arc::ptr_eq(v, &self.vol))
            {
                open.remove(&self.key);
            }
        }
    }
}

/// Marks one name busy for the duration of a management operation.
pub(super) struct BusyGuard {
    registry: Arc<Registry>,
    key: Key,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        lock(&self.registry.busy).remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Holds `name` for one management operation, or [`StoreError::Busy`].
    pub(super) fn claim(
        self: &Arc<Self>,
        kind: Kind,
        name: &VolumeName,
    ) -> Result<BusyGuard, StoreError> {
        let key = (kind, name.to_string());
        if !lock(&self.busy).insert(key.clone()) {
            return Err(StoreError::Busy(name.to_string()));
        }
        Ok(BusyGuard {
            registry: self.clone(),
            key,
        })
    }

    /// How many NBD connections have the entry open.
    pub(super) fn connections(&self, kind: Kind, name: &VolumeName) -> u64 {
        lock(&self.open)
            .get(&(kind, name.to_string()))
            .map_or(0, |v| v.connections())
    }

    /// Registers one more user of an entry, calling `open` for its backend if nobody has it
    /// open (under the registry's lock, so two first users share one backend).
    pub(super) fn lease(
        self: &Arc<Self>,
        kind: Kind,
        name: &VolumeName,
        open_backend: impl FnOnce() -> Result<FileBackend, OpenError>,
    ) -> Result<Lease, OpenError> {
        self.lease_as(kind, name, false, open_backend)
    }

    /// [`Registry::lease`] for the store's own use (a background copy's source), not counted
    /// as a connection.
    pub(super) fn lease_internal(
        self: &Arc<Self>,
        kind: Kind,
        name: &VolumeName,
        open_backend: impl FnOnce() -> Result<FileBackend, OpenError>,
    ) -> Result<Lease, OpenError> {
        self.lease_as(kind, name, true, open_backend)
    }

    fn lease_as(
        self: &Arc<Self>,
        kind: Kind,
        name: &VolumeName,
        internal: bool,
        open_backend: impl FnOnce() -> Result<FileBackend, OpenError>,
    ) -> Result<Lease, OpenError> {
        let key = (kind, name.to_string());
        let mut open = lock(&self.open);
        let vol = match open.get(&key) {
            Some(v) => v.clone(),
            None => {
                let vol = Arc::new(OpenVolume {
                    backend: Arc::new(open_backend()?),
                    closed: CancellationToken::new(),
                    leases: AtomicU64::new(0),
                    internal: AtomicU64::new(0),
                });
                open.insert(key.clone(), vol.clone());
                vol
            }
        };
        if internal {
            vol.internal.fetch_add(1, Ordering::AcqRel);
        }
        vol.leases.fetch_add(1, Ordering::AcqRel);
        Ok(Lease {
            registry: self.clone(),
            key,
            vol,
            internal,
        })
    }

    /// Closes the entry for a delete and runs `remove` with the registry locked, so no new
    /// connection can open it in between. Open connections refuse it ([`StoreError::InUse`])
    /// unless `force`, which cancels them.
    pub(super) fn close<T>(
        &self,
        kind: Kind,
        name: &VolumeName,
        force: bool,
        remove: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let key = (kind, name.to_string());
        let mut open = lock(&self.open);
        if let Some(vol) = open.get(&key) {
            let connections = vol.connections();
            if connections > 0 && !force {
                return Err(StoreError::InUse {
                    name: name.to_string(),
                    connections,
                });
            }
            vol.closed.cancel();
            open.remove(&key);
        }
        remove()
    }
}
