//! The block journal: every request, payload included, from submission until the server
//! acknowledges it.
//!
//! A request lives in exactly one place at a time: this journal's queue (new, or re-issued
//! after its channel died) or one channel's in-flight table. It leaves only when the server
//! answered it, or when its caller gave up (brownout deadline) — never because a connection
//! broke. Memory is bounded by a byte budget (a semaphore): when the journal is full, `admit`
//! waits, so new IO waits instead of growing memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use enbd_proto::wire::CommandFlags;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use super::error::IoError;

/// The NBD command a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

/// What the caller gets back: read data, or empty for everything else.
pub(crate) type Completion = Result<Bytes, IoError>;

/// One journalled request.
#[derive(Debug)]
pub(crate) struct Request {
    pub op: Op,
    /// NBD command flags (FUA, NO_HOLE), already filtered by what the server supports.
    pub flags: CommandFlags,
    pub offset: u64,
    pub len: u32,
    /// Write payload; kept until acknowledged so the request can be re-issued.
    pub payload: Bytes,
    pub submitted: Instant,
    /// How many times it was put on a wire.
    pub issues: u32,
    done: oneshot::Sender<Completion>,
    _budget: OwnedSemaphorePermit,
}

impl Request {
    /// The caller stopped waiting (brownout deadline or cancellation): do not send it again.
    pub fn abandoned(&self) -> bool {
        self.done.is_closed()
    }

    /// Reports the outcome to the caller; the journal space is released with `self`.
    pub fn complete(self, result: Completion) {
        // The caller may have gone (deadline); then nobody needs the answer.
        let _ = self.done.send(result);
    }
}

/// Journal space a request occupies: its payload or read buffer, plus a header's worth so
/// that zero-length commands are bounded too.
pub(crate) fn cost(op: Op, len: u32) -> u32 {
    const HEADER: u32 = 32;
    match op {
        Op::Read | Op::Write => len.saturating_add(HEADER),
        Op::Flush | Op::Trim | Op::WriteZeroes => HEADER,
    }
}

#[derive(Debug)]
pub(crate) struct Journal {
    budget: Arc<Semaphore>,
    capacity: usize,
    queue: Mutex<VecDeque<Request>>,
    queued: Notify,
}

impl Journal {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            budget: Arc::new(Semaphore::new(capacity_bytes.min(Semaphore::MAX_PERMITS))),
            capacity: capacity_bytes.min(Semaphore::MAX_PERMITS),
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
        }
    }

    /// Waits for journal space, then returns a request ready to `push` and the receiver its
    /// completion arrives on.
    pub async fn admit(
        &self,
        op: Op,
        flags: CommandFlags,
        offset: u64,
        len: u32,
        payload: Bytes,
    ) -> Result<(Request, oneshot::Receiver<Completion>), IoError> {
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(cost(op, len))
            .await
            .map_err(|_| IoError::Shutdown)?;
        let (done, rx) = oneshot::channel();
        Ok((
            Request {
                op,
                flags,
                offset,
                len,
                payload,
                submitted: Instant::now(),
                issues: 0,
                done,
                _budget: budget,
            },
            rx,
        ))
    }

    /// Queues a new request for the next channel that has room.
    pub fn push(&self, req: Request) {
        self.lock().push_back(req);
        self.queued.notify_one();
    }

    /// Puts requests back at the head of the queue after their channel died, in their
    /// original order, so they go out before newer IO. Abandoned ones are dropped here.
    pub fn reissue(&self, mut reqs: Vec<Request>) -> usize {
        reqs.retain(|r| !r.abandoned());
        reqs.sort_by_key(|r| r.submitted);
        let n = reqs.len();
        if n == 0 {
            return 0;
        }
        {
            let mut q = self.lock();
            for r in reqs.into_iter().rev() {
                q.push_front(r);
            }
        }
        self.queued.notify_one();
        n
    }

    /// Waits until the queue is not empty (or may not be: callers re-check with `take`).
    pub async fn wait_queued(&self) {
        let notified = self.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.lock().is_empty() {
            return;
        }
        notified.await;
    }

    /// Takes up to `max` live requests off the queue. If some stay behind, another channel
    /// is woken for them.
    pub fn take(&self, max: usize, out: &mut Vec<Request>) {
        let mut q = self.lock();
        while out.len() < max {
            match q.pop_front() {
                Some(r) if r.abandoned() => drop(r),
                Some(r) => out.push(r),
                None => break,
            }
        }
        if !q.is_empty() {
            self.queued.notify_one();
        }
    }

    pub fn queued_len(&self) -> usize {
        self.lock().len()
    }

    /// Removes every queued request (engine failure / shutdown) so the caller can fail them.
    pub fn drain(&self) -> Vec<Request> {
        self.lock().drain(..).collect()
    }

    /// Stops admitting: waiting and future `admit` calls fail with `Shutdown`.
    pub fn close(&self) {
        self.budget.close();
    }

    /// The byte budget: `held_bytes` reaching it means new IO waits for acknowledgements.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity as u64
    }

    pub fn held_bytes(&self) -> u64 {
        (self.capacity - self.budget.available_permits()) as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Request>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // operation is a single push/pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}
