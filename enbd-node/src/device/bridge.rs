//! The bridge between a queue thread (a single-threaded io_uring loop) and the Tokio runtime
//! that serves IO.
//!
//! Requests go over a bounded channel sized to the queue depth (a tag has at most one request
//! outstanding, so a send never finds it full); each reply travels on its own oneshot, whose
//! waker schedules the tag's task on the queue thread's executor. That thread sleeps in its
//! io_uring wait, so after replying the Tokio side also writes an eventfd that the queue keeps a
//! read armed on: the read's completion wakes the ring. No lock is shared on this path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use super::request::{BlockRequest, BlockTarget};

/// One request on its way to the target, with where its answer goes.
pub(crate) struct Job {
    pub req: BlockRequest,
    pub reply: oneshot::Sender<Result<Bytes, i32>>,
}

/// An eventfd used purely as a doorbell for a queue's io_uring.
pub(crate) struct Doorbell(OwnedFd);

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter: wakes a pending read. Several rings coalesce into one read.
    pub fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack buffer to a descriptor we own. A failed write
        // can only be EAGAIN on counter overflow, which means a wake-up is pending anyway.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What a queue thread holds to reach the runtime.
#[derive(Clone)]
pub(crate) struct QueueLink {
    pub jobs: mpsc::Sender<Job>,
    pub doorbell: Arc<Doorbell>,
}

/// Starts the runtime side of one queue: a dispatcher task that runs each request as its own
/// task (so requests of one queue proceed concurrently) and rings the doorbell on completion.
/// The dispatcher ends when the queue thread drops its sender.
pub(crate) fn spawn_queue<T: BlockTarget>(
    rt: &Handle,
    target: Arc<T>,
    depth: u16,
) -> io::Result<QueueLink> {
    let doorbell = Arc::new(Doorbell::new()?);
    let (jobs, mut rx) = mpsc::channel::<Job>(usize::from(depth.max(1)));
    let bell = doorbell.clone();
    rt.spawn(async move {
        while let Some(job) = rx.recv().await {
            let target = target.clone();
            let bell = bell.clone();
            tokio::spawn(async move {
                let result = target.submit(job.req).await;
                // The receiver is gone only if the queue thread died; nothing to tell then.
                let _ = job.reply.send(result);
                bell.ring();
            });
        }
    });
    Ok(QueueLink { jobs, doorbell })
}
