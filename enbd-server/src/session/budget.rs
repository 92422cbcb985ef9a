//! Memory bounds for requests in flight: each connection's own budget (requests and bytes),
//! taken first, and one server-wide cap on bytes that bounds the sum over all connections.
//!
//! Invariants:
//! - A request holds its [`Ticket`] from the moment its header is read until its reply has
//!   been written (or dropped with the connection): refused requests and replies queued for a
//!   client that does not read count like any other.
//! - A request costs its data (a WRITE's payload, a READ's length) rounded up to 4 KiB, plus
//!   4 KiB for its bookkeeping; costs are clamped to each budget's size, so any single request
//!   fits, and a request larger than what is left waits rather than fails.
//! - A connection with nothing in flight may always start one request without the global
//!   cap: no connection waits forever on other connections' slow clients, and the server-wide
//!   total stays under `max_inflight_bytes` + connections × one request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Budget unit: every request costs at least one.
pub const UNIT: u64 = 4096;
/// Most request bytes one connection may have in flight (a bigger single request still runs,
/// alone).
pub const CONNECTION_BYTES: u64 = 32 << 20;
/// Most requests one connection may have in flight.
pub const CONNECTION_REQUESTS: usize = 1024;
/// `--max-inflight-bytes` default.
pub const DEFAULT_GLOBAL_BYTES: u64 = 256 << 20;

fn units(bytes: u64) -> usize {
    usize::try_from(bytes / UNIT).unwrap_or(usize::MAX)
}

/// What a request of `data` bytes costs, in units, at most `cap`.
fn cost(data: u64, cap: usize) -> u32 {
    let u = data.div_ceil(UNIT).saturating_add(1);
    u32::try_from(u.min(cap as u64)).unwrap_or(u32::MAX)
}

/// The server-wide cap on in-flight request bytes, shared by all connections.
#[derive(Debug)]
pub struct GlobalBudget {
    sem: Arc<Semaphore>,
    units: usize,
}

impl GlobalBudget {
    pub fn new(bytes: u64) -> Self {
        let units = units(bytes).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(units)),
            units,
        }
    }

    /// Bytes currently held by requests in flight.
    pub fn in_use(&self) -> u64 {
        (self.units - self.sem.available_permits()) as u64 * UNIT
    }
}

/// In-flight requests of one connection, and a signal for when they reach zero.
#[derive(Default)]
struct Idle {
    inflight: AtomicUsize,
    zero: Notify,
}

/// One connection's budget. Only its reader acquires; tickets are released wherever replies
/// are written or dropped.
pub struct ConnBudget {
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    bytes_units: usize,
    global: Arc<Semaphore>,
    global_units: usize,
    idle: Arc<Idle>,
}

/// The budget one request holds until its reply is written.
pub struct Ticket {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    global: Option<OwnedSemaphorePermit>,
    idle: Arc<Idle>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Back to the shared cap before waking this connection's reader, which tries it first.
        drop(self.global.take());
        if self.idle.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.zero.notify_waiters();
        }
    }
}

impl ConnBudget {
    pub fn new(global: &GlobalBudget, requests: usize, bytes: u64) -> Self {
        let bytes_units = units(bytes).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            count: Arc::new(Semaphore::new(requests.clamp(1, Semaphore::MAX_PERMITS))),
            bytes: Arc::new(Semaphore::new(bytes_units)),
            bytes_units,
            global: global.sem.clone(),
            global_units: global.units,
            idle: Arc::new(Idle::default()),
        }
    }

    /// Waits until a request with `data` bytes fits: this connection's own budget first, then
    /// the global cap (skipped when nothing else of this connection is in flight). Cancel
    /// safe: dropping the future returns whatever it had taken.
    pub async fn acquire(&self, data: u64) -> Ticket {
        // The semaphores are never closed, so these waits end only by getting their permits.
        let count = loop {
            if let Ok(p) = self.count.clone().acquire_owned().await {
                break p;
            }
        };
        let own = cost(data, self.bytes_units);
        let bytes = loop {
            if let Ok(p) = self.bytes.clone().acquire_many_owned(own).await {
                break p;
            }
        };
        let global = self.global_permit(cost(data, self.global_units)).await;
        self.idle.inflight.fetch_add(1, Ordering::AcqRel);
        Ticket {
            _count: count,
            _bytes: bytes,
            global,
            idle: self.idle.clone(),
        }
    }

    /// A global permit, or none if this connection runs dry while waiting for one.
    async fn global_permit(&self, units: u32) -> Option<OwnedSemaphorePermit> {
        // The common case, without registering for the idle signal. Fair to waiters: permits
        // released while some wait go to them, never to the counter this takes from.
        if let Ok(p) = self.global.clone().try_acquire_many_owned(units) {
            return Some(p);
        }
        loop {
            let zero = self.idle.zero.notified();
            tokio::pin!(zero);
            zero.as_mut().enable();
            if self.idle.inflight.load(Ordering::Acquire) == 0 {
                // Try first: a connection should use the shared budget when it can, so the
                // free pass stays the exception.
                return self.global.clone().try_acquire_many_owned(units).ok();
            }
            tokio::select! {
                biased;
                p = self.global.clone().acquire_many_owned(units) => {
                    if let Ok(p) = p {
                        return Some(p);
                    }
                }
                _ = &mut zero => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn refused_and_empty_requests_still_cost_a_unit() {
        let g = GlobalBudget::new(64 * MIB);
        let c = ConnBudget::new(&g, 4, 64 * MIB);
        let tickets: Vec<Ticket> = futures::future::join_all((0..4).map(|_| c.acquire(0))).await;
        assert_eq!(g.in_use(), 4 * UNIT);
        // The count budget is spent: a fifth request waits.
        let fifth = tokio::time::timeout(Duration::from_millis(50), c.acquire(0)).await;
        assert!(
            fifth.is_err(),
            "a fifth request got past a count budget of 4"
        );
        drop(tickets);
        assert_eq!(g.in_use(), 0);
        let _t = c.acquire(0).await;
    }

    #[tokio::test]
    async fn connection_bytes_bound_in_flight_data_and_a_big_request_still_fits() {
        let g = GlobalBudget::new(1024 * MIB);
        let c = ConnBudget::new(&g, 1024, 4 * MIB);
        let first = c.acquire(2 * MIB).await;
        let second = tokio::time::timeout(Duration::from_millis(50), c.acquire(2 * MIB)).await;
        assert!(
            second.is_err(),
            "4 MiB + 8 KiB fit a 4 MiB connection budget"
        );
        drop(first);
        // Bigger than the whole budget: clamped, runs alone.
        let big = c.acquire(16 * MIB).await;
        drop(big);
    }

    #[tokio::test]
    async fn an_exhausted_global_cap_never_stalls_an_idle_connection() {
        let g = GlobalBudget::new(MIB);
        let hog = ConnBudget::new(&g, 1024, 64 * MIB);
        let held = hog.acquire(MIB).await;
        assert_eq!(g.in_use(), MIB, "clamped to the global cap");
        // The hog's next request waits for the global cap: it has one in flight.
        let waits = tokio::time::timeout(Duration::from_millis(50), hog.acquire(4096)).await;
        assert!(waits.is_err());
        // Another connection with nothing in flight gets one request through anyway...
        let other = ConnBudget::new(&g, 1024, 64 * MIB);
        let one = tokio::time::timeout(Duration::from_secs(1), other.acquire(MIB))
            .await
            .expect("an idle connection was stalled by another's held budget");
        // ...but not a second one while the cap stays spent.
        let two = tokio::time::timeout(Duration::from_millis(50), other.acquire(4096)).await;
        assert!(two.is_err());
        drop(one);
        drop(held);
        assert_eq!(g.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiting_connection_that_runs_dry_proceeds() {
        let g = GlobalBudget::new(MIB);
        let hog = ConnBudget::new(&g, 1024, 64 * MIB);
        let _held = hog.acquire(MIB).await;
        let c = Arc::new(ConnBudget::new(&g, 1024, 64 * MIB));
        let first = c.acquire(4096).await; // free pass
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.acquire(4096).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("a connection whose last request finished stayed stuck")
            .unwrap();
        drop(second);
    }
}
