//! Observable engine state: overall health plus per-channel counters.
//! Counters are relaxed atomics updated on the IO path; `snapshot` reads them without locks.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

/// Health of the whole volume connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// Every channel is connected.
    Healthy,
    /// Some channels are down; IO continues on the others.
    Degraded,
    /// No channel is connected; IO waits in the journal (or fails after the brownout deadline).
    Waiting,
    /// The engine gave up (server identity changed, or shut down); IO fails with EIO.
    Failed,
}

/// Life cycle of one channel (one TCP connection slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    Connecting,
    Up,
    Down,
    Stopped,
}

impl ChannelState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Up,
            2 => Self::Down,
            _ => Self::Stopped,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            Self::Connecting => 0,
            Self::Up => 1,
            Self::Down => 2,
            Self::Stopped => 3,
        }
    }
}

/// A point-in-time copy of one channel's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelStatus {
    pub index: usize,
    pub server: String,
    pub state: ChannelState,
    /// Our end of the current connection, when up (lets tests and operators match it to a
    /// socket on the wire).
    pub local_addr: Option<SocketAddr>,
    pub in_flight: u64,
    pub completed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests moved off this channel onto another one (or the same after reconnect).
    pub reissued: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub last_error: Option<String>,
}

/// A point-in-time copy of the engine's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatus {
    pub state: EngineState,
    pub channels: Vec<ChannelStatus>,
    /// Requests held by the journal (queued or in flight, not yet acknowledged).
    pub journal_requests: u64,
    pub journal_bytes: u64,
    /// The journal's byte budget (`journal_bytes` at this value: new IO waits).
    pub journal_capacity_bytes: u64,
    /// Time spent with no channel up since the engine started, the current outage included.
    pub outage_total: Duration,
    /// How long IO has been waiting with no channel up, if it is.
    pub waiting_for: Option<Duration>,
    /// Why the engine failed, if it did.
    pub failure: Option<String>,
}

/// Live counters of one channel slot.
#[derive(Debug)]
pub(crate) struct ChannelStats {
    pub index: usize,
    pub server: String,
    state: AtomicU8,
    pub in_flight: AtomicU64,
    pub completed: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub reissued: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub local_addr: Mutex<Option<SocketAddr>>,
    pub last_error: Mutex<Option<String>>,
}

impl ChannelStats {
    pub fn new(index: usize, server: String) -> Self {
        Self {
            index,
            server,
            state: AtomicU8::new(ChannelState::Connecting.as_u8()),
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            reissued: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            local_addr: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    pub fn state(&self) -> ChannelState {
        ChannelState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: ChannelState) {
        self.state.store(s.as_u8(), Ordering::Release);
    }

    pub fn set_error(&self, e: impl ToString) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }

    pub fn set_local_addr(&self, a: Option<SocketAddr>) {
        if let Ok(mut g) = self.local_addr.lock() {
            *g = a;
        }
    }

    pub fn snapshot(&self) -> ChannelStatus {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChannelStatus {
            index: self.index,
            server: self.server.clone(),
            state: self.state(),
            local_addr: self.local_addr.lock().ok().and_then(|g| *g),
            in_flight: r(&self.in_flight),
            completed: r(&self.completed),
            bytes_read: r(&self.bytes_read),
            bytes_written: r(&self.bytes_written),
            reissued: r(&self.reissued),
            connects: r(&self.connects),
            disconnects: r(&self.disconnects),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
        }
    }
}

/// Overall state from the channels' states.
pub(crate) fn overall(channels: &[ChannelStatus], failed: bool) -> EngineState {
    if failed {
        return EngineState::Failed;
    }
    let up = channels
        .iter()
        .filter(|c| c.state == ChannelState::Up)
        .count();
    match up {
        0 => EngineState::Waiting,
        n if n == channels.len() => EngineState::Healthy,
        _ => EngineState::Degraded,
    }
}

/// Where one replica of a mirrored volume stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaHealth {
    /// Receives every write and serves reads.
    InSync,
    /// Missed writes; the in-sync servers track what it missed.
    Out,
    /// Receives writes and is being sent what it missed.
    Resyncing {
        /// Bytes of dirty regions found when this pass started.
        to_copy: u64,
        copied: u64,
        /// Copy rate since the pass started.
        bytes_per_sec: f64,
    },
    /// Cannot be reached (management or data path); its record may be anything.
    Down,
}

/// A point-in-time view of one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub id: String,
    /// NBD data address.
    pub address: String,
    pub mgmt_address: String,
    /// The generation its server last reported (0: never answered, or no record).
    pub generation: u64,
    pub health: ReplicaHealth,
    /// Reads it served (balancing is visible here).
    pub reads: u64,
    pub writes: u64,
    pub last_error: Option<String>,
    /// Its data path's own status, while connected.
    pub engine: Option<EngineStatus>,
}

/// Health of a mirrored volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// Every replica is in sync.
    Healthy,
    /// Serving, with some replica not in sync.
    Degraded,
    /// IO waits: see `MirrorStatus::waiting`.
    Waiting,
    /// Shut down.
    Stopped,
}

/// A point-in-time copy of a mirror's state.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorStatus {
    pub state: MirrorState,
    /// The generation of the record in force.
    pub generation: u64,
    pub replicas: Vec<ReplicaStatus>,
    /// Why IO waits, when it does.
    pub waiting: Option<String>,
    /// Bytes resync has copied since this mirror was opened (regions that read as zeros
    /// count too: they reach the target as WRITE_ZEROES).
    pub resync_bytes_copied: u64,
    /// The activity log (regions that may have writes in flight).
    pub activity: ActivityStatus,
}

/// The mirror's activity log: see `engine::mirror::activity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ActivityStatus {
    /// Regions in the log now (hot, or not yet synced).
    pub active_regions: u64,
    /// The log's region size (0 until the record is known).
    pub region_bytes: u64,
    /// Regions that may differ between replicas until copied from one in-sync replica.
    pub unsynced_regions: u64,
    /// Regions the log held when the mirror opened (a stop without a clean close).
    pub found_at_open: u64,
    /// Regions copied to bring replicas together, and the bytes read for that.
    pub synced_regions: u64,
    pub synced_bytes: u64,
    /// `UpdateActivity` batches that marked regions (each cost one sync per server).
    pub updates: u64,
}
